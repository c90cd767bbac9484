"""Corrupt arithmetic-coded data: bit flips and truncations inside NDU payloads raise NNCError and nothing
else, with every decoder backend; absurd headers are refused before the work they announce.

Decoding a corrupted stream may also succeed (a flipped bit can give another valid stream): then it just
has to return. Times are not asserted; the streams are small enough that a hang would show as a slow run.
"""

import random
import tracemalloc

import numpy as np
import pytest

import decoder_core
import nnc_edge
from conftest import CONFORMANCE_DIR
from decoder_core import NNCError, backend
from decoder_core.tables import NNR_AGG, NNR_CPT_BI, NNR_CPT_BN, NNR_CPT_DC, NNR_CPT_LS, NNR_NDU, NNR_PT_BLOCK
from decoder_core.tables import NNR_PT_INT
from decoder_core.units import ParserState, nnr_unit_size, parse_unit
from nnc_edge.encoder.unitwriter import aggregate_unit, compressed_data_unit
from test_payload_types import Stream, codebook_values, ndu_fields, prod, random_levels


@pytest.fixture(params=backend.available())
def decoder_backend(request):
    previous = backend.name()
    backend.use(request.param)
    yield request.param
    backend.use(previous)


# --- streams ----------------------------------------------------------------------------------------------
CONFORMANCE = ["p1_dq_2d", "p0_uniform_2d", "p1_codebook_2d", "p0_codebook_2d", "p1_sparse_rowskip_2d",
               "p1_int_3d", "p1_bias_1d", "p0_entrypoints_scan1", "p1_entrypoints_scan3", "p1_model_dict"]


def conformance_stream(name):
    path = CONFORMANCE_DIR / (name + ".nnc")
    if not path.exists():
        pytest.skip("conformance vectors not found in %s" % CONFORMANCE_DIR)
    return path.read_bytes()


def built_stream(kind):
    """Streams of the encoder with the tools NNCodec does not write."""
    rnd = random.Random(kind)
    s = Stream(1 if kind in ("block", "codebook") else 0)
    if kind == "block":
        dims = [24, 10]
        names = ["w", "ls", "beta", "gamma", "mean", "var", "bias"]
        fields = dict(nnr_compressed_data_unit_payload_type=NNR_PT_BLOCK, topology_elements_ids_list=names,
                      compressed_parameter_types=NNR_CPT_LS | NNR_CPT_BN | NNR_CPT_BI, tensor_dimensions=dims,
                      cabac_unary_length_minus1=10, dq_flag=1, scan_order=1)
        items = [s.tensor(fields, [24], random_levels(rnd, 24), qp_value=-40) for _ in range(6)]
        items.append(s.tensor(fields, dims, random_levels(rnd, prod(dims)), qp_value=-30))
        return s.bytes(s.ndu(fields, items))
    if kind == "decomposition":
        dims = [20, 12]
        fields = dict(nnr_compressed_data_unit_payload_type=NNR_PT_BLOCK, topology_elements_ids_list=["g", "h"],
                      compressed_parameter_types=NNR_CPT_DC, decomposition_rank=18, g_number_of_rows=20,
                      tensor_dimensions=dims, cabac_unary_length_minus1=3, dq_flag=1, scan_order=1)
        g = s.tensor(fields, [20, 18], random_levels(rnd, 360), qp_value=-30)
        h = s.tensor(fields, [18, 12], random_levels(rnd, 216), qp_value=-31)
        return s.bytes(s.ndu(fields, [g, h]))
    if kind == "codebook":
        dims = [20, 16]
        fields = ndu_fields("cb", dims, Codebook=[-9, -4, 0, 3, 11], CbZeroOffset=2, scan_order=1)
        k = [rnd.randint(-2, 2) for _ in range(prod(dims))]
        return s.bytes(s.ndu(fields, [s.tensor(fields, dims, k, qp_value=-20, codebook_size=5, zero_offset=2)]))
    if kind == "split_int_agg":
        dims = [6, 8, 2]
        mapping = dict(concatentation_axis_index=1, split_index=[3], shift_index=[[2], []], shift_value=[[1], []])
        fields = dict(nnr_compressed_data_unit_payload_type=NNR_PT_INT, topology_elements_ids_list=["a", "b"],
                      tensor_dimensions=dims, cabac_unary_length_minus1=10, topology_tensor_dimension_mapping=mapping)
        first = s.ndu(fields, [s.tensor(fields, dims, random_levels(rnd, prod(dims), 500))])
        fields2 = ndu_fields("c", [30], dq_flag=1)
        second = s.ndu(fields2, [s.tensor(fields2, [30], random_levels(rnd, 30), qp_value=-3)])
        return s.bytes(aggregate_unit([first, second], mps=s.mps))
    if kind == "partial":
        dims = [30, 10]
        fields = ndu_fields("p", dims, dq_flag=1, scan_order=1)
        parts = s.ndu(fields, [s.tensor(fields, dims, random_levels(rnd, prod(dims)), qp_value=-30)],
                      max_payload_bytes=60)
        return s.bytes(*parts)
    raise ValueError(kind)


BUILT = ["block", "decomposition", "codebook", "split_int_agg", "partial"]


def ndu_payload_ranges(data):
    """(start, end) of every NDU payload, top level and inside aggregate units."""
    ranges = []
    state = ParserState()

    def walk(unit):
        if unit.nnr_unit_type == NNR_NDU:
            if unit.payload_end > unit.payload_start:
                ranges.append((unit.payload_start, unit.payload_end))
        elif unit.nnr_unit_type == NNR_AGG:
            for child in unit.units:
                walk(child)

    offset = 0
    while offset < len(data):
        unit = parse_unit(data, offset, len(data), state)
        walk(unit)
        offset += unit.nnr_unit_size
    return ranges


def top_level_ndus(data):
    """(unit offset, size-field bytes, payload start, payload end) of the top-level NDUs."""
    out = []
    state = ParserState()
    offset = 0
    while offset < len(data):
        unit = parse_unit(data, offset, len(data), state)
        if unit.nnr_unit_type == NNR_NDU:
            out.append((offset, nnr_unit_size(data, offset)[1], unit.payload_start, unit.payload_end))
        offset += unit.nnr_unit_size
    return out


def decode_or_nncerror(data, both=True):
    """A result or NNCError, nothing else (pytest reports any other exception); ``both`` adds
    nnc_edge.decode (numpy output buffers, threads) to decoder_core.decode."""
    for decode in (decoder_core.decode, nnc_edge.decode) if both else (decoder_core.decode,):
        try:
            decode(data)
        except NNCError as exc:
            assert exc.args and isinstance(exc.args[0], str)


def flips(data, rnd, count):
    ranges = ndu_payload_ranges(data)
    assert ranges
    for _ in range(count):
        start, end = rnd.choice(ranges)
        pos = rnd.randrange(start, end)
        bad = bytearray(data)
        bad[pos] ^= 1 << rnd.randrange(8)
        yield bytes(bad)


def truncations(data, rnd, count):
    """Top-level NDUs whose payload is cut short, with nnr_unit_size rewritten to match."""
    ndus = top_level_ndus(data)
    for _ in range(count):
        offset, size_bytes, start, end = rnd.choice(ndus)
        keep = rnd.randrange(0, end - start)
        unit = bytearray(data[offset:start + keep])
        size = len(unit)
        if size_bytes == 4:
            unit[0:4] = (0x80000000 | size).to_bytes(4, "big")
        else:
            unit[0:2] = size.to_bytes(2, "big")
        yield data[:offset] + bytes(unit) + data[end:]


# --- bit flips and truncations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFORMANCE)
def test_conformance_payload_bit_flips(name, decoder_backend):
    data = conformance_stream(name)
    decode_or_nncerror(data)
    rnd = random.Random(name)
    for i, bad in enumerate(flips(data, rnd, 16)):
        decode_or_nncerror(bad, i % 4 == 0)


@pytest.mark.parametrize("name", CONFORMANCE)
def test_conformance_payload_truncations(name, decoder_backend):
    data = conformance_stream(name)
    rnd = random.Random(name)
    for i, bad in enumerate(truncations(data, rnd, 10)):
        with pytest.raises(NNCError):
            decoder_core.decode(bad)
        if i % 3 == 0:
            with pytest.raises(NNCError):
                nnc_edge.decode(bad)


@pytest.mark.parametrize("kind", BUILT)
def test_built_stream_bit_flips_and_truncations(kind, decoder_backend):
    data = built_stream(kind)
    decode_or_nncerror(data)
    assert decoder_core.decode(data)
    rnd = random.Random(kind)
    for i, bad in enumerate(flips(data, rnd, 40)):
        decode_or_nncerror(bad, i % 4 == 0)
    if kind != "split_int_agg":  # the NDUs of that stream sit inside an aggregate unit
        for bad in truncations(data, rnd, 15):
            with pytest.raises(NNCError):
                decoder_core.decode(bad)


def test_tca_chain_with_a_corrupt_step(decoder_backend):
    """A flipped bit in the last step of an update chain: decoder state from the good steps, then NNCError
    or a result."""
    steps = [conformance_stream("p1_tca_%d" % i) for i in range(4)]
    rnd = random.Random(4)
    for bad in flips(steps[3], rnd, 20):
        dec = decoder_core.Decoder()
        for good in steps[:3]:
            dec.decode(good)
        try:
            dec.decode(bad)
        except NNCError:
            pass


def test_every_truncation_of_one_segment(decoder_backend):
    """All cut points of one small segment, including inside the terminating bits."""
    data = built_stream("codebook")
    (offset, size_bytes, start, end), = top_level_ndus(data)
    for keep in range(end - start):
        unit = bytearray(data[offset:start + keep])
        unit[0:2] = len(unit).to_bytes(2, "big")
        with pytest.raises(NNCError):
            decoder_core.decode(data[:offset] + bytes(unit))


def test_trailing_bytes_after_the_segment_are_refused(decoder_backend):
    data = built_stream("codebook")
    (offset, size_bytes, start, end), = top_level_ndus(data)
    for extra in (b"\x00", b"\x80", b"\x00\x00\x00"):
        unit = bytearray(data[offset:end] + extra)
        unit[0:2] = len(unit).to_bytes(2, "big")
        with pytest.raises(NNCError, match="terminate|stop bit|ends"):
            decoder_core.decode(data[:offset] + bytes(unit))


# --- absurd headers -----------------------------------------------------------------------------------------
def peak_allocation(fn):
    """Peak Python-heap bytes allocated while fn() runs (what a decoder allocates for a tensor)."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def one_ndu_stream(profile, fields, payload):
    s = Stream(profile)
    return s.bytes(compressed_data_unit(fields, payload, profile, s.mps))


@pytest.mark.parametrize("profile", [0, 1])
@pytest.mark.parametrize("dims", [[16384, 16384], [1 << 28], [4, 1 << 26], [2048, 128, 1024]])
def test_huge_tensor_with_a_tiny_payload_is_refused_before_allocation(profile, dims, decoder_backend):
    """A header may claim up to the parser's element limit, but DeepCABAC needs at least one bin per coded
    position and at most 128 context-coded bins fit in one bit (supplement 1.5: an MPS bin shrinks
    IvlCurrRange by at least 2): a payload of a few bytes cannot hold 2^28 positions."""
    fields = ndu_fields("huge", dims, dq_flag=1)
    data = one_ndu_stream(profile, fields, bytes(range(17, 57)))

    def run():
        with pytest.raises(NNCError):
            decoder_core.decode(data)

    assert peak_allocation(run) < (16 << 20)


def test_many_block_rows_over_a_small_payload_are_refused_before_work(decoder_backend):
    """4096 block rows of 8 x 64 positions whose entry points all point at the same bits: the header is
    valid, the payload a few bytes."""
    rows = 4095
    dims = [8 * (rows + 1), 64]
    fields = ndu_fields("rows", dims, scan_order=1, cabac_offset_list=[0] * rows, BitOffsetList=[0] * rows)
    data = one_ndu_stream(0, fields, bytes(range(100, 164)))

    def run():
        with pytest.raises(NNCError, match="cannot fit"):
            decoder_core.decode(data)

    assert peak_allocation(run) < (16 << 20)


def test_entry_points_that_rewind_end_in_nncerror(decoder_backend):
    """BitOffsetList entries of 0 make every block row re-read the same bits. The payload is large enough
    for the positions, so this decodes (work bounded by 1024 positions per payload byte) and then fails
    at terminate_cabac()."""
    rows = 1023
    dims = [8 * (rows + 1), 64]
    fields = ndu_fields("rewind", dims, scan_order=1, cabac_offset_list=[0] * rows, BitOffsetList=[0] * rows)
    rnd = random.Random(3)
    data = one_ndu_stream(0, fields, bytes(rnd.randrange(256) for _ in range(600)))
    with pytest.raises(NNCError):
        decoder_core.decode(data)


def test_flips_anywhere_in_small_streams_raise_only_nncerror(decoder_backend):
    """Headers included: every bit of two small streams flipped in turn."""
    for data in (built_stream("codebook"), built_stream("split_int_agg")):
        for pos in range(len(data)):
            for bit in (0, 3, 7):
                bad = bytearray(data)
                bad[pos] ^= 1 << bit
                decode_or_nncerror(bytes(bad), False)


def test_decoded_values_of_an_intact_built_stream():
    """The corruption tests start from streams that decode to what was coded."""
    rnd = random.Random("codebook")
    k = [rnd.randint(-2, 2) for _ in range(320)]
    out = nnc_edge.decode(built_stream("codebook"))
    assert np.array_equal(out["cb"], codebook_values(k, [-9, -4, 0, 3, 11], 2, -20, 2).reshape(20, 16))
