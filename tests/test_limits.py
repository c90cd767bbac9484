"""Resource limits (decoder_core.limits): each one hit and reported by name, before the work or the
allocation it bounds, on both backends and through every entry point; and entry points that would make
block rows decode the same bits again."""

import copy

import numpy as np
import pytest

import decoder_core
import nnc_edge
from decoder_core import LimitError, Limits, NNCError
from decoder_core import backend as core_backend
from decoder_core import limits as limits_module
from decoder_core.stream import StreamDecoder as CoreStreamDecoder
from decoder_core.tables import NNR_NDU, NNR_PT_RAW_FLOAT
from decoder_core.units import ParserState, parse_units
from nnc_edge.encoder import unitwriter as uw

from conftest import CONFORMANCE_DIR, require_compiled_backend


def read(name):
    with open(str(CONFORMANCE_DIR / (name + ".nnc")), "rb") as f:
        return f.read()


@pytest.fixture(autouse=True)
def _vectors(conformance_dir):
    return conformance_dir


def units(data):
    """[(offset, parsed unit, profile, active MPS)] of the top-level units."""
    state = ParserState()
    out = []
    for u in parse_units(data, state):
        out.append((u.offset, u, state.profile, state.mps))
    return out


def with_ndu_header(data, **changes):
    """``data`` with the header of its first NDU re-written with some elements changed."""
    for offset, u, profile, mps in units(data):
        if u.nnr_unit_type == NNR_NDU:
            ndu = copy.deepcopy(dict(u.ndu.__dict__))
            ndu.update(changes)
            header = uw.compressed_data_unit_header(ndu, profile, mps)
            unit = uw.nnr_unit(NNR_NDU, header, data[u.payload_start:u.payload_end])
            return data[:offset] + unit + data[offset + u.nnr_unit_size:]
    raise AssertionError("no NDU")


def assert_limit(info, name):
    assert isinstance(info.value, LimitError) and isinstance(info.value, NNCError)
    assert info.value.limit == name
    assert "(%s)" % name in str(info.value)


def tensor_elements(tensors):
    return sum(len(values) for _, _, values in tensors)


# --- the Limits object ----------------------------------------------------------------------------
def test_defaults_are_documented_and_configurable():
    default = Limits()
    assert default.as_dict() == {
        "max_tensor_elements": 1 << 26, "max_decoded_bytes": 1 << 30, "max_unit_size": 1 << 26,
        "max_agg_nesting": 4, "max_string_bytes": 65536, "max_bins_per_tensor": 1 << 30}
    for name, value in default.as_dict().items():
        assert "``%s``" % name in limits_module.__doc__
    small = default.replace(max_unit_size=100)
    assert small.max_unit_size == 100 and small.max_tensor_elements == default.max_tensor_elements
    assert decoder_core.Decoder().limits == default
    assert decoder_core.Decoder(limits=small).limits is small
    with pytest.raises(ValueError, match="unknown limit"):
        default.replace(max_whatever=1)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_unit_size"):
            Limits(max_unit_size=bad)
    with pytest.raises(TypeError):
        decoder_core.Decoder(limits={"max_unit_size": 1})


# --- each limit -----------------------------------------------------------------------------------
def test_max_tensor_elements(backend):
    data = read("p1_uniform_2d")  # one 64 x 32 tensor
    assert tensor_elements(decoder_core.decode(data, limits=Limits(max_tensor_elements=2048))) == 2048
    with pytest.raises(NNCError) as info:
        decoder_core.decode(data, limits=Limits(max_tensor_elements=2047))
    assert_limit(info, "max_tensor_elements")
    assert info.value.element == "tensor_dimensions" and "tensor of 2048 elements" in str(info.value)
    with pytest.raises(NNCError) as info:
        nnc_edge.decode(data, limits=Limits(max_tensor_elements=2047))
    assert_limit(info, "max_tensor_elements")


def test_max_decoded_bytes_per_stream():
    data = read("p1_model_dict")
    total = 4 * tensor_elements(decoder_core.decode(data))
    exact = Limits(max_decoded_bytes=total)
    dec = decoder_core.Decoder(limits=exact)
    dec.decode(data)
    dec.decode(data)  # every decode() is a stream of its own
    with pytest.raises(NNCError) as info:
        decoder_core.decode(data, limits=Limits(max_decoded_bytes=total - 1))
    assert_limit(info, "max_decoded_bytes")
    assert info.value.offset == units(data)[-1][0]  # refused at the last NDU, before decoding it
    # Streaming: the count starts again after close(); bitstreams fed back to back are one stream.
    stream = CoreStreamDecoder(limits=exact)
    for _ in range(2):
        stream.feed(data)
        stream.close()
    stream.feed(data)
    with pytest.raises(NNCError) as info:
        stream.feed(data)
    assert_limit(info, "max_decoded_bytes")
    with pytest.raises(NNCError) as info:
        nnc_edge.decode(data, threads=2, limits=Limits(max_decoded_bytes=total - 1))
    assert_limit(info, "max_decoded_bytes")
    nnc_edge.decode(data, threads=2, limits=exact)


def test_max_unit_size():
    data = read("p1_model_dict")
    largest = max(u.nnr_unit_size for _, u, _, _ in units(data))  # 4774 bytes
    decoder_core.decode(data, limits=Limits(max_unit_size=largest))
    with pytest.raises(NNCError) as info:
        decoder_core.decode(data, limits=Limits(max_unit_size=largest - 1))
    assert_limit(info, "max_unit_size")
    assert info.value.element == "nnr_unit_size"
    # The streaming decoder refuses it once nnr_unit_size() has arrived, before allocating the unit.
    offset = [o for o, u, _, _ in units(data) if u.nnr_unit_size == largest][0]
    dec = nnc_edge.StreamDecoder(limits=Limits(max_unit_size=largest - 1), threads=1)
    dec.feed(data[:offset + 1])
    with pytest.raises(NNCError) as info:
        dec.feed(data[offset + 1:offset + 2])
    assert_limit(info, "max_unit_size")
    assert info.value.offset == offset


def test_max_unit_size_bounds_joined_partial_data():
    tensor = np.arange(300, dtype=np.float32)
    head = uw.start_unit(0) + uw.model_parameter_set_unit({}, general_profile_idc=0)
    parts = uw.partial_data_units(dict(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, topology_elem_id="w",
                                       tensor_dimensions=[300]), tensor.astype("<f4").tobytes(), max_payload_bytes=400)
    data = head + b"".join(parts)
    assert max(len(p) for p in parts) < 500
    out = decoder_core.decode(data, limits=Limits(max_unit_size=1200))
    assert list(out[0][2]) == list(tensor)
    with pytest.raises(NNCError) as info:
        decoder_core.decode(data, limits=Limits(max_unit_size=1199))
    assert_limit(info, "max_unit_size")
    assert info.value.element == "partial_data_counter"


def test_max_agg_nesting():
    data = read("p1_model_dict")
    parsed = units(data)
    nested = uw.aggregate_unit([data[o:o + u.nnr_unit_size] for o, u, _, _ in parsed[3:]])
    nested = uw.aggregate_unit([nested, uw.nnr_unit(40, b"", b"")])
    stream = data[:parsed[3][0]] + nested
    assert [t[0] for t in decoder_core.decode(stream, limits=Limits(max_agg_nesting=2))][:1] == ["layer0.weight"]
    with pytest.raises(NNCError) as info:
        decoder_core.decode(stream, limits=Limits(max_agg_nesting=1))
    assert_limit(info, "max_agg_nesting")
    assert "nested 2 deep" in str(info.value)


def test_max_string_bytes():
    data = read("p1_model_dict")  # topology_elem_id "layer0.weight" is 13 bytes
    decoder_core.decode(data, limits=Limits(max_string_bytes=13))
    with pytest.raises(NNCError) as info:
        decoder_core.decode(data, limits=Limits(max_string_bytes=12))
    assert_limit(info, "max_string_bytes")
    assert info.value.element == "topology_elem_id"


def _bins_of(data):
    """The bins the compiled backend decodes for ``data`` (its position loops count them)."""
    require_compiled_backend()
    previous = core_backend.name()
    core_backend.use("cython")
    try:
        before = core_backend._compiled.bins_decoded()
        decoder_core.decode(data)
        return core_backend._compiled.bins_decoded() - before
    finally:
        core_backend.use(previous)


@pytest.mark.parametrize("name", ["p1_uniform_2d", "p1_sparse_rowskip_2d", "p0_entrypoints_scan1"])
def test_max_bins_per_tensor_counts_the_same_on_both_backends(backend, name):
    data = read(name)  # one tensor each: uniform; row skipping; entry points
    bins = _bins_of(data)
    assert bins > 0
    decoder_core.decode(data, limits=Limits(max_bins_per_tensor=bins))
    with pytest.raises(NNCError) as info:
        decoder_core.decode(data, limits=Limits(max_bins_per_tensor=bins - 1))
    assert_limit(info, "max_bins_per_tensor")
    assert info.value.element == "quant_tensor()"
    with pytest.raises(NNCError) as early:
        decoder_core.decode(data, limits=Limits(max_bins_per_tensor=bins // 2))
    assert early.value.offset < info.value.offset  # stopped part way, not after the whole tensor


# --- entry points that rewind ----------------------------------------------------------------------
def _rewound(name, j, bits=8):
    """``name`` with block row j + 1 signalled ``bits`` before the point where row j ends."""
    for _, u, _, _ in units(read(name)):
        if u.nnr_unit_type == NNR_NDU:
            lengths = list(u.ndu.BitOffsetList)
    lengths[j] -= bits
    if j + 1 < len(lengths):
        lengths[j + 1] += bits  # only this one entry point moves
    return with_ndu_header(read(name), BitOffsetList=lengths)


@pytest.mark.parametrize("name", ["p0_entrypoints_scan1", "p1_entrypoints_scan3"])
def test_entry_point_before_bits_already_decoded_is_refused(backend, name):
    data = read(name)
    unchanged = with_ndu_header(data)
    assert unchanged == data
    for j in (0, 1):
        with pytest.raises(NNCError, match="entry point %d at bit offset \\d+ lies before bits already decoded" % j) \
                as info:
            decoder_core.decode(_rewound(name, j))
        assert info.value.element == "BitOffsetList"


def test_parallel_block_rows_check_rewinds_at_chunk_boundaries(monkeypatch):
    require_compiled_backend()
    monkeypatch.setattr(core_backend._compiled, "PARALLEL_MIN_COUNT", 1)
    previous = core_backend.name()
    core_backend.use("cython")
    try:
        name = "p0_entrypoints_scan1"  # 19 block rows: with 2 threads, chunks start at rows 2, 4, 7, ...
        want = nnc_edge.decode(read(name), threads=1)["w"]
        assert np.array_equal(nnc_edge.decode(read(name), threads=2)["w"], want)
        for j in (0, 1, 3):  # inside the first chunk, and the entry points that start chunks 1 and 2
            with pytest.raises(NNCError) as one:
                nnc_edge.decode(_rewound(name, j), threads=1)
            with pytest.raises(NNCError) as two:
                nnc_edge.decode(_rewound(name, j), threads=2)
            assert str(two.value) == str(one.value)
            assert "entry point %d " % j in str(two.value)
    finally:
        core_backend.use(previous)
