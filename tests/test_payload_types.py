"""Payload types and tools the reference encoder never writes (issue 3), in streams built here.

Streams are assembled with nnc_edge.encoder.unitwriter and coded with nnc_edge.encoder.cabac_encoder, then decoded with
decoder_core.decode and nnc_edge.decode. Expected values are computed independently in this file:
QuantParam * stepSize (7.3.6 / supplement 4.1) rounded to float32, codebook values * stepSize in float64
(supplement 4.3), and numpy's own split / moveaxis for topology_tensor_dimension_mapping (7.3.1).
"""

import random

import numpy as np
import pytest

import decoder_core
import nnc_edge
from decoder_core import backend
from decoder_core.tables import NNR_CPT_BI, NNR_CPT_BN, NNR_CPT_DC, NNR_CPT_LS, NNR_PT_BLOCK, NNR_PT_FLOAT, NNR_PT_INT
from decoder_core.tables import NNR_PT_RAW_FLOAT
from nnc_edge.encoder.cabac_encoder import (
    SegmentTensor, TensorCoding, block_roles, dq_reconstruction_indices, encode_segment,
)
from nnc_edge.encoder.unitwriter import (
    aggregate_unit, compressed_data_unit, layer_parameter_set_unit, model_parameter_set_unit, partial_data_units,
    raw_float_payload, start_unit,
)


@pytest.fixture(autouse=True, params=backend.available())
def decoder_backend(request):
    """Every test runs with each DeepCABAC backend (compiled and pure Python)."""
    previous = backend.name()
    backend.use(request.param)
    yield request.param
    backend.use(previous)


# --- independent expectations ---------------------------------------------------------------------------
def step_size(qp, qp_density):
    """Supplement 4.1 (7.3.6 as NNCodec reads it), exact in Python floats."""
    mul = (1 << qp_density) + (qp & ((1 << qp_density) - 1))
    return mul * 2.0 ** ((qp >> qp_density) - qp_density)


def uniform_values(levels, qp, qp_density):
    """float32(QuantParam) * float32(stepSize), rounded once to float32."""
    return np.asarray(levels, dtype=np.float32) * np.float32(step_size(qp, qp_density))


def codebook_values(levels, codebook, zero_offset, qp, qp_density):
    """Codebook[QuantParam + CbZeroOffset] * stepSize in float64, then float32."""
    book = np.asarray(codebook, dtype=np.float64) * step_size(qp, qp_density)
    return book[np.asarray(levels) + zero_offset].astype(np.float32)


def assert_same(got, want, where=""):
    want = np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (where, got.dtype, got.shape, want.dtype, want.shape)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), where


def decode_both(data):
    """decoder_core.decode and nnc_edge.decode agree; returns nnc_edge's dict (stream order)."""
    core = decoder_core.decode(data)
    out = nnc_edge.decode(data)
    assert list(out) == [name for name, _, _ in core]
    for name, shape, values in core:
        dtype = np.float32 if values.typecode == "f" else np.int32
        assert_same(out[name], np.frombuffer(values, dtype=dtype).reshape(shape), name)
    return out


# --- stream building ----------------------------------------------------------------------------------------
def prod(dims):
    p = 1
    for d in dims:
        p *= d
    return p


def random_levels(rnd, count, scale=12.0, density=0.7):
    return [int(rnd.expovariate(1.0 / scale)) * rnd.choice((1, -1)) if rnd.random() < density else 0
            for _ in range(count)]


class Stream:
    """NNR_STR and NNR_MPS, then NDUs coded from integer levels."""

    def __init__(self, profile=0, qp_density=2, quantization_parameter=0, **mps):
        self.profile = profile
        self.mps = dict(mps_qp_density=qp_density, mps_quantization_parameter=quantization_parameter, **mps)
        self.units = [start_unit(profile), model_parameter_set_unit(self.mps, general_profile_idc=profile)]
        self.qp_density = qp_density
        self.quantization_parameter = quantization_parameter

    def coding(self, fields, dims, codebook_size=0, zero_offset=0):
        """The TensorCoding the decoder builds for a tensor of this NDU (7.3.6)."""
        return TensorCoding(list(dims), fields.get("dq_flag", 0), fields.get("cabac_unary_length_minus1", 10),
                            fields.get("scan_order", 0), self.profile, codebook_size, zero_offset)

    def tensor(self, fields, dims, k, qp_value=None, codebook_size=0, zero_offset=0, qp_density=None, row_skip=0):
        """A SegmentTensor from coded levels k (mapped to QuantParam n when dq_flag is set)."""
        coding = self.coding(fields, dims, codebook_size, zero_offset)
        n = dq_reconstruction_indices(k, coding, row_skip)
        return SegmentTensor(n, coding, qp_value, self.qp_density if qp_density is None else qp_density, row_skip)

    def ndu(self, fields, items, max_payload_bytes=None):
        """The NDU unit(s) of ``items`` coded in one segment; several partial units with max_payload_bytes."""
        segment = encode_segment(items)
        fields = dict(fields)
        if fields.get("scan_order"):
            fields.update(segment.header_fields(fields.get("dq_flag", 0)))
        if max_payload_bytes is None:
            return compressed_data_unit(fields, segment.data, self.profile, self.mps)
        return partial_data_units(fields, segment.data, max_payload_bytes, self.profile, self.mps)

    def bytes(self, *more):
        return b"".join(self.units) + b"".join(more)


def ndu_fields(name, dims, pt=NNR_PT_FLOAT, **kw):
    fields = dict(nnr_compressed_data_unit_payload_type=pt, topology_elem_id=name, tensor_dimensions=list(dims),
                  cabac_unary_length_minus1=10)
    fields.update(kw)
    return fields


# --- NNR_PT_INT, NNR_PT_FLOAT with LPS, NNR_PT_RAW_FLOAT ------------------------------------------------------
@pytest.mark.parametrize("profile", [0, 1])
@pytest.mark.parametrize("dq", [0, 1])
def test_pt_int_decodes_to_int32_quant_param(profile, dq):
    rnd = random.Random(profile + 2 * dq)
    s = Stream(profile)
    units = []
    want = {}
    for name, dims in (("ints", [6, 50]), ("vec", [77]), ("cube", [3, 4, 5])):
        fields = ndu_fields(name, dims, NNR_PT_INT, dq_flag=dq)
        k = random_levels(rnd, prod(dims), scale=1000)
        k[0] = (1 << 29) if dq else (1 << 31) - 1
        item = s.tensor(fields, dims, k)
        units.append(s.ndu(fields, [item]))
        want[name] = np.asarray(item.levels, dtype=np.int32).reshape(dims)  # n: QuantParam, no scaling
    out = decode_both(s.bytes(*units))
    assert list(out) == list(want)
    for name in want:
        assert_same(out[name], want[name], name)
    if dq:
        assert any(a != b for a, b in zip(want["ints"].ravel(), np.asarray(k)))  # n differs from coded k


@pytest.mark.parametrize("profile", [0, 1])
def test_pt_float_with_lps_overriding_qp_density_and_parameter(profile):
    rnd = random.Random(7)
    s = Stream(profile, qp_density=2, quantization_parameter=-4)
    dims = [12, 20]
    fields = ndu_fields("before", dims, dq_flag=1)
    k1 = random_levels(rnd, prod(dims))
    before = s.tensor(fields, dims, k1, qp_value=-20)
    lps = layer_parameter_set_unit(lps_qp_density=5, lps_quantization_parameter=-150)
    fields2 = ndu_fields("after", dims, dq_flag=1)
    # qp_value is iae(6 + lps_qp_density): 11 bits now, and QuantizationParameter comes from the LPS.
    after = s.tensor(fields2, dims, random_levels(rnd, prod(dims)), qp_value=-900, qp_density=5)
    out = decode_both(s.bytes(s.ndu(fields, [before]), lps, s.ndu(fields2, [after])))
    assert_same(out["before"], uniform_values(before.levels, -20 - 4, 2).reshape(dims))
    assert_same(out["after"], uniform_values(after.levels, -900 - 150, 5).reshape(dims))
    assert step_size(-1050, 5) == (32 + (-1050 & 31)) * 2.0 ** ((-1050 >> 5) - 5)


def test_raw_float_keeps_every_bit():
    values = np.array([0.0, -0.0, 1.5, -3.25e-7, np.inf, -np.inf, 3.4e38, 1e-45, np.nan, 7.0], dtype=np.float32)
    s = Stream(0)
    fields = dict(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, topology_elem_id="raw",
                  tensor_dimensions=[2, 5])
    unit = compressed_data_unit(fields, raw_float_payload(values.tolist()), 0, s.mps)
    out = decode_both(s.bytes(unit))
    assert_same(out["raw"], values.reshape(2, 5))


# --- NNR_PT_BLOCK -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [0, 1])
@pytest.mark.parametrize("dq,scan", [(0, 0), (1, 1), (1, 2)])
def test_pt_block_weight_scaling_batch_norm_and_bias(profile, dq, scan):
    """7.3.5: ids list W, LS, beta, gamma, mean, var, BI; payload LS, BI, beta, gamma, mean, var, W."""
    rnd = random.Random(profile * 10 + scan)
    s = Stream(profile, qp_density=3)
    dims = [40, 6, 3]
    cpt = NNR_CPT_LS | NNR_CPT_BN | NNR_CPT_BI
    names = ["w", "w.ls", "bn.beta", "bn.gamma", "bn.mean", "bn.var", "w.bias"]
    fields = dict(nnr_compressed_data_unit_payload_type=NNR_PT_BLOCK, topology_elements_ids_list=names,
                  compressed_parameter_types=cpt, tensor_dimensions=dims, cabac_unary_length_minus1=6, dq_flag=dq,
                  scan_order=scan)
    qps = {"w": -40, "w.ls": -60, "bn.beta": -50, "bn.gamma": -51, "bn.mean": -52, "bn.var": -30, "w.bias": -70}
    items = {}
    for name in names:
        d = dims if name == "w" else [dims[0]]
        items[name] = s.tensor(fields, d, random_levels(rnd, prod(d)), qp_value=qps[name])
    payload_order = ["w.ls", "w.bias", "bn.beta", "bn.gamma", "bn.mean", "bn.var", "w"]
    role = dict(zip(block_roles(cpt)[0], names))
    assert block_roles(cpt) == (["W", "LS", "beta", "gamma", "mean", "var", "BI"],
                                ["LS", "BI", "beta", "gamma", "mean", "var", "W"])
    assert [role[r] for r in block_roles(cpt)[1]] == payload_order
    out = decode_both(s.bytes(s.ndu(fields, [items[n] for n in payload_order])))
    assert list(out) == names
    for name in names:
        d = dims if name == "w" else [dims[0]]
        assert_same(out[name], uniform_values(items[name].levels, qps[name], 3).reshape(d), name)


def random_codebook(rnd, size, zero_offset):
    values = sorted(rnd.sample(range(-300, 300), size))
    return values, zero_offset


@pytest.mark.parametrize("profile", [0, 1])
@pytest.mark.parametrize("codebook", [False, True])
@pytest.mark.parametrize("scan", [0, 1])
def test_pt_block_decomposition(profile, codebook, scan):
    """G and H in one segment; with scan_order > 0, H's entry points follow G's block rows."""
    rnd = random.Random(profile + 2 * codebook + 4 * scan)
    s = Stream(profile)
    dims = [24, 5, 3]        # 360 elements
    rank, rows = 20, 24      # G is 24 x 20, H is 20 x 15
    g_dims, h_dims = [rows, rank], [rank, prod(dims) // rows]
    fields = dict(nnr_compressed_data_unit_payload_type=NNR_PT_BLOCK, topology_elements_ids_list=["g", "h", "bias"],
                  compressed_parameter_types=NNR_CPT_DC | NNR_CPT_BI, decomposition_rank=rank,
                  g_number_of_rows=rows, tensor_dimensions=dims, cabac_unary_length_minus1=10,
                  dq_flag=0 if codebook else 1, scan_order=scan)
    bias = s.tensor(fields, [dims[0]], random_levels(rnd, dims[0]), qp_value=-60)
    if codebook:
        book, z = random_codebook(rnd, 9, 3)
        book_dc, z_dc = random_codebook(rnd, 5, 0)  # CodebookDC with CbZeroOffsetDC 0: no signs coded
        fields.update(Codebook=book, CbZeroOffset=z, CodebookDC=book_dc, CbZeroOffsetDC=z_dc, codebook_egk=1)
        g = s.tensor(fields, g_dims, [rnd.randint(-z, len(book) - 1 - z) for _ in range(prod(g_dims))], -30, 9, z)
        h = s.tensor(fields, h_dims, [rnd.randint(0, len(book_dc) - 1) for _ in range(prod(h_dims))], -25, 5, z_dc)
        want_g = codebook_values(g.levels, book, z, -30, 2)
        want_h = codebook_values(h.levels, book_dc, z_dc, -25, 2)
    else:
        g = s.tensor(fields, g_dims, random_levels(rnd, prod(g_dims)), qp_value=-30)
        h = s.tensor(fields, h_dims, random_levels(rnd, prod(h_dims)), qp_value=-25)
        want_g = uniform_values(g.levels, -30, 2)
        want_h = uniform_values(h.levels, -25, 2)
    assert block_roles(NNR_CPT_DC | NNR_CPT_BI) == (["G", "H", "BI"], ["BI", "G", "H"])
    unit = s.ndu(fields, [bias, g, h])
    out = decode_both(s.bytes(unit))
    assert list(out) == ["g", "h", "bias"]
    assert_same(out["g"], want_g.reshape(g_dims))
    assert_same(out["h"], want_h.reshape(h_dims))
    assert_same(out["bias"], uniform_values(bias.levels, -60, 2))
    if scan:
        segment = encode_segment([bias, g, h])
        assert len(segment.BitOffsetList) == 2 + 2  # G: 3 block rows of 8, H: 3 block rows of 8


@pytest.mark.parametrize("profile", [0, 1])
@pytest.mark.parametrize("scan", [0, 2])
def test_decomposed_tensors_in_separate_ndus(profile, scan):
    """An NDU with NNR_CPT_DC outside NNR_PT_BLOCK carries G, the next one H ("<id>.G", "<id>.H")."""
    rnd = random.Random(profile + scan)
    s = Stream(profile)
    dims = [40, 30]
    rank, rows = 36, 40
    g_dims, h_dims = [rows, rank], [rank, 30]
    common = dict(compressed_parameter_types=NNR_CPT_DC, decomposition_rank=rank, g_number_of_rows=rows, dq_flag=1,
                  scan_order=scan)
    g_fields = ndu_fields("fc", dims, decomposed_part="G", **common)
    h_fields = ndu_fields("fc", dims, decomposed_part="H", **common)
    g = s.tensor(g_fields, g_dims, random_levels(rnd, prod(g_dims)), qp_value=-33)
    h = s.tensor(h_fields, h_dims, random_levels(rnd, prod(h_dims)), qp_value=-35)
    other = ndu_fields("other", [5, 5], dq_flag=1)
    o = s.tensor(other, [5, 5], random_levels(rnd, 25), qp_value=-10)
    out = decode_both(s.bytes(s.ndu(g_fields, [g]), s.ndu(h_fields, [h]), s.ndu(other, [o])))
    assert list(out) == ["fc.G", "fc.H", "other"]
    assert_same(out["fc.G"], uniform_values(g.levels, -33, 2).reshape(g_dims))
    assert_same(out["fc.H"], uniform_values(h.levels, -35, 2).reshape(h_dims))
    assert_same(out["other"], uniform_values(o.levels, -10, 2).reshape(5, 5))


# --- several topology elements in one tensor ---------------------------------------------------------------------
@pytest.mark.parametrize("profile", [0, 1])
@pytest.mark.parametrize("pt", [NNR_PT_FLOAT, NNR_PT_INT])
def test_tensor_split_and_axis_swap(profile, pt):
    """7.3.1: split along concatentation_axis_index at split_index, then each part's AxisSwaps: the axis at
    shift_index moves left by shift_value (numpy.moveaxis, one shift after the other)."""
    rnd = random.Random(profile)
    s = Stream(profile)
    dims = [4, 10, 3, 2]
    mapping = dict(concatentation_axis_index=1, split_index=[3, 7],
                   shift_index=[[], [2], [1, 3]], shift_value=[[], [2], [1, 2]])
    fields = dict(nnr_compressed_data_unit_payload_type=pt, topology_elements_ids_list=["a", "b", "c"],
                  tensor_dimensions=dims, cabac_unary_length_minus1=10, dq_flag=1,
                  topology_tensor_dimension_mapping=mapping)
    item = s.tensor(fields, dims, random_levels(rnd, prod(dims)), qp_value=None if pt == NNR_PT_INT else -12)
    out = decode_both(s.bytes(s.ndu(fields, [item])))
    if pt == NNR_PT_INT:
        whole = np.asarray(item.levels, dtype=np.int32).reshape(dims)
    else:
        whole = uniform_values(item.levels, -12, 2).reshape(dims)
    parts = np.split(whole, [3, 7], axis=1)
    want = {"a": parts[0],
            "b": np.moveaxis(parts[1], 2, 0),
            "c": np.moveaxis(np.moveaxis(parts[2], 1, 0), 3, 1)}
    assert list(out) == ["a", "b", "c"]
    assert out["b"].shape == (3, 4, 4, 2) and out["c"].shape == (3, 2, 4, 3)
    for name in want:
        assert_same(out[name], np.ascontiguousarray(want[name]), name)


# --- codebooks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [0, 1])
@pytest.mark.parametrize("size,zero_offset", [(1, 0), (2, 0), (6, 5), (7, 3), (64, 20)])
def test_codebooks(profile, size, zero_offset):
    """Profile 1 codes codebook indices with the limits of 6.8; profile 0 like any levels (4.3 either way)."""
    rnd = random.Random(size * 7 + profile)
    s = Stream(profile)
    dims = [30, 16]
    book, z = random_codebook(rnd, size, zero_offset)
    fields = ndu_fields("cb", dims, Codebook=book, CbZeroOffset=z, codebook_egk=rnd.randrange(4), scan_order=1)
    k = [rnd.randint(-z, size - 1 - z) for _ in range(prod(dims))]
    item = s.tensor(fields, dims, k, qp_value=-20, codebook_size=size, zero_offset=z)
    out = decode_both(s.bytes(s.ndu(fields, [item])))
    assert_same(out["cb"], codebook_values(k, book, z, -20, 2).reshape(dims))


# --- aggregate and partial units ------------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [0, 1])
def test_ndus_inside_an_aggregate_unit_with_entry_points(profile):
    rnd = random.Random(profile)
    s = Stream(profile)
    inside = []
    want = {}
    lps = layer_parameter_set_unit(lps_qp_density=4, lps_quantization_parameter=-64)
    for name, dims, density in (("a", [30, 20], 2), ("b", [70], 2), ("c", [50, 9], 4)):
        fields = ndu_fields(name, dims, dq_flag=1, scan_order=1 if len(dims) > 1 else 0)
        item = s.tensor(fields, dims, random_levels(rnd, prod(dims)), qp_value=-5, qp_density=density)
        inside.append(s.ndu(fields, [item]))
        # "a" and "b" precede the LPS inside the aggregate unit; "c" follows it.
        want[name] = uniform_values(item.levels, -5 + (-64 if density == 4 else 0), density).reshape(dims)
        if name == "b":
            inside.append(lps)
    agg = aggregate_unit(inside, mps=s.mps)
    # After the aggregate unit the LPS is no longer active (6.2.3): the MPS qp density applies again.
    fields = ndu_fields("d", [4, 4])
    after = s.tensor(fields, [4, 4], random_levels(rnd, 16), qp_value=3)
    want["d"] = uniform_values(after.levels, 3, 2).reshape(4, 4)
    out = decode_both(s.bytes(agg, s.ndu(fields, [after])))
    assert list(out) == ["a", "b", "c", "d"]
    for name in want:
        assert_same(out[name], want[name], name)


@pytest.mark.parametrize("profile", [0, 1])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_partial_units_join_to_the_whole_payload(profile, chunk):
    rnd = random.Random(chunk)
    s = Stream(profile)
    dims = [40, 12]
    cpt = NNR_CPT_LS | NNR_CPT_BI
    fields = dict(nnr_compressed_data_unit_payload_type=NNR_PT_BLOCK, topology_elements_ids_list=["w", "ls", "bi"],
                  compressed_parameter_types=cpt, tensor_dimensions=dims, cabac_unary_length_minus1=10, dq_flag=1,
                  scan_order=1)
    items = [s.tensor(fields, d, random_levels(rnd, prod(d)), qp_value=q)
             for d, q in (([40], -50), ([40], -70), (dims, -30))]
    parts = s.ndu(fields, items, max_payload_bytes=chunk if chunk > 1 else 40)
    assert len(parts) > 1
    whole = s.ndu(fields, items)
    fields2 = ndu_fields("next", [3, 3])
    nxt = s.tensor(fields2, [3, 3], random_levels(rnd, 9), qp_value=0)
    out = decode_both(s.bytes(*(parts + [s.ndu(fields2, [nxt])])))
    ref = decode_both(s.bytes(whole, s.ndu(fields2, [nxt])))
    assert list(out) == ["w", "ls", "bi", "next"]
    for name in ref:
        assert_same(out[name], ref[name], name)
    assert_same(out["w"], uniform_values(items[2].levels, -30, 2).reshape(dims))
    assert_same(out["bi"], uniform_values(items[1].levels, -70, 2))
    # Partial units inside an aggregate unit join the same way.
    agg = aggregate_unit(parts + [s.ndu(fields2, [nxt])], mps=s.mps)
    out = decode_both(s.bytes(agg))
    for name in ref:
        assert_same(out[name], ref[name], name)


def test_entry_points_drive_the_parallel_decoder():
    """A tensor large enough for nnc_edge's threads: block rows are decoded from the signalled
    cabac_offset_list / dq_state_list / BitOffsetList, each on its own (supplement 1.11)."""
    rnd = random.Random(11)
    s = Stream(1)
    dims = [256, 150]
    fields = ndu_fields("big", dims, dq_flag=1, scan_order=1)
    k = random_levels(rnd, prod(dims), scale=4, density=0.4)
    for r in range(0, 256, 7):
        k[r * 150:(r + 1) * 150] = [0] * 150  # zero rows, skipped: the DQ state moves w times (6.5)
    item = s.tensor(fields, dims, k, qp_value=-28, row_skip=1)
    data = s.bytes(s.ndu(fields, [item]))
    want = uniform_values(item.levels, -28, 2).reshape(dims)
    for threads in (1, 4):
        assert_same(nnc_edge.Decoder(threads=threads).decode(data)["big"], want)
    assert_same(decode_both(data)["big"], want)
