"""The host encoder's public API (nnc_edge.encode, nnc_edge.Encoder) through our own decoder.

* Every option round-trips: the decoder returns exactly QuantizedTensor.reconstruct() of what the
  encoder quantized (and that equals nnc_edge.encoder.quantize.quantize_tensor() called directly), and the
  error stays within the mode's bound (step/2 uniform and codebook, 2 steps for the DQ trellis).
* Integer tensors (NNR_PT_INT) and NNR_PT_RAW_FLOAT come back exactly.
* Stream structure: partial-data units never exceed max_unit_bytes, NNR_AGG units carry correct entry
  points, NNR_PT_BLOCK groups, profile-0 / profile-1 headers.
* Update chains through Encoder / Decoder: parent signalling, TCA, HDSP, omitted all-zero tensors.
* The compiled entropy coder (nnc_edge.encoder._cabac_encoder) writes the same bytes as the Python one.
"""

import os
import random
import warnings

import numpy as np
import pytest

import nnc_edge
from decoder_core import NNCError
from decoder_core.deepcabac import TensorCoding
from decoder_core.tables import (
    NNR_AGG, NNR_MPS, NNR_NDU, NNR_PT_BLOCK, NNR_PT_FLOAT, NNR_PT_INT, NNR_PT_RAW_FLOAT, NNR_STR, NNR_TPL,
)
from nnc_edge import modelio
from nnc_edge.encoder import cabac_encoder
from nnc_edge.encoder.cabac_encoder import SegmentTensor, dq_reconstruction_indices, encode_segment
from nnc_edge.cli.decode import iter_units
from nnc_edge.encoder.encoding import Encoder, encode, load_tensors
from nnc_edge.encoder.quantize import QuantizationWarning, quantize_tensor, step_size


def rng(seed):
    return np.random.default_rng(seed)


def weights(seed, shape, scale=0.05, zero_rows=(), sparsity=0.0):
    r = rng(seed)
    w = (r.laplace(size=shape) * scale).astype(np.float32)
    if sparsity:
        w[r.random(shape) < sparsity] = 0
    for row in zero_rows:
        w[row] = 0
    return w


def model(seed=0):
    """A small model: weights of several ranks, biases, an integer tensor."""
    return {
        "conv.weight": weights(seed, (12, 3, 3, 3), 0.2),
        "conv.bias": weights(seed + 1, (12,), 0.1),
        "fc.weight": weights(seed + 2, (20, 48), 0.05),
        "fc.bias": weights(seed + 3, (20,), 0.02),
        "steps": np.arange(-7, 9, dtype=np.int64).reshape(4, 4),
    }


def units(data):
    """(depth, unit) of every NNR unit, aggregate members after their NNR_AGG."""
    return [(depth, unit) for depth, unit, _ in iter_units(data)]


def ndus(data):
    return [unit for _, unit in units(data) if unit.nnr_unit_type == NNR_NDU]


def roundtrip(tensors, encoder=None, **options):
    """Encode with quantized tensors kept; check the decoder returns exactly their reconstruction."""
    encoder = encoder or Encoder(keep_quantized=True, threads=1)
    data = encoder.encode(tensors, **options)
    decoded = nnc_edge.decode(data)
    for report in encoder.report:
        if report.omitted:
            assert report.name not in decoded
            continue
        got = decoded[report.name]
        original = dict(load_tensors(tensors))[report.name]
        if report.payload_type == NNR_PT_RAW_FLOAT:
            want = original.astype(np.float32)
        else:
            want = report.quantized.reconstruct()
        assert got.dtype == want.dtype, report
        assert np.array_equal(got.reshape(want.shape).view(np.uint32), want.view(np.uint32)), report
    return data, decoded, encoder.report


def max_error_in_steps(original, decoded, qp, density):
    return float(np.abs(decoded.reshape(original.shape).astype(np.float64) - original).max() / step_size(qp, density))


# --- round trips of the options ----------------------------------------------------------------------------
@pytest.mark.parametrize("profile", [0, 1])
@pytest.mark.parametrize("dq", [False, True])
def test_default_model_round_trip(profile, dq):
    tensors = model(1)
    data, decoded, reports = roundtrip(tensors, Encoder(profile=profile, keep_quantized=True, threads=1), dq=dq)
    assert list(decoded) == list(tensors)
    kinds = {r.name: r.payload_type for r in reports}
    assert kinds["steps"] == NNR_PT_INT and decoded["steps"].dtype == np.int32
    assert np.array_equal(decoded["steps"], tensors["steps"])
    for r in reports:
        if r.payload_type == NNR_PT_FLOAT:
            # the encoder's quantization is quantize_tensor's with the same options
            direct = quantize_tensor(tensors[r.name], qp=-32, dq=dq)
            assert np.array_equal(direct.levels, r.quantized.levels) and direct.qp == r.qp
            assert r.qp == (-32 if tensors[r.name].ndim > 1 else -75)
            assert r.dq_flag == int(dq)
            bound = 2.0 if dq else 0.5
            assert max_error_in_steps(tensors[r.name], decoded[r.name], r.qp, 2) <= bound + 1e-6
    assert units(data)[0][1].general_profile_idc == profile


@pytest.mark.parametrize("scan_order", [1, 2, 3, 4])
@pytest.mark.parametrize("dq", [False, True])
def test_scan_orders_with_entry_points(scan_order, dq):
    tensors = {"w": weights(3, (150, 70), 0.1), "x": weights(4, (40, 9, 2), 0.3), "b": weights(5, (33,))}
    data, decoded, reports = roundtrip(tensors, dq=dq, scan_order=scan_order)
    by_name = {u.names[0]: u for u in ndus(data)}
    for name in ("w", "x"):
        ndu = by_name[name].ndu
        rows = -(-tensors[name].shape[0] // (4 << scan_order))
        assert ndu.scan_order == scan_order
        assert len(ndu.cabac_offset_list) == rows - 1 == len(ndu.BitOffsetList)
        assert len(ndu.dq_state_list) == (rows - 1 if dq else 0)
    assert by_name["b"].ndu.get("scan_order", 0) == 0
    # The entry points are right: decoding with them in parallel gives the same as sequentially.
    assert all(np.array_equal(decoded[k], v) for k, v in nnc_edge.decode(data, threads=2).items())


@pytest.mark.parametrize("density", [0, 1, 3])
def test_qp_density_and_nonweight_qp(density):
    tensors = {"w": weights(6, (30, 40), 0.3), "b": weights(7, (50,), 0.3)}
    qp = -4 << density  # about the same step size in every density
    for nonweight, want in (("default", None), (None, qp - (2 << density)), (qp - 3, qp - 3)):
        data, decoded, reports = roundtrip(tensors, qp=qp, qp_density=density, nonweight_qp=nonweight,
                                           raw_float=False)
        r = {x.name: x for x in reports}
        assert r["w"].qp == qp
        if want is not None:
            assert r["b"].qp == want
        assert [u for _, u in units(data) if u.nnr_unit_type == NNR_MPS][0].mps.mps_qp_density == density


def test_qp_per_tensor():
    tensors = {"w": weights(8, (30, 40)), "v": weights(9, (30, 40)), "b": weights(10, (40,))}
    data, decoded, reports = roundtrip(tensors, qp=-30, qp_per_tensor={"v": -40, "b": -20})
    assert [r.qp for r in reports] == [-30, -40, -20]


@pytest.mark.parametrize("profile", [0, 1])
@pytest.mark.parametrize("dq", [False, True])
def test_codebook_modes(profile, dq):
    # few distinct levels: the codebook pays for the coarse tensor, not for the fine one
    coarse = (np.round(rng(11).standard_normal((40, 30)) * 1.5) * step_size(-20, 2)).astype(np.float32)
    fine = weights(12, (40, 30), 0.3)
    tensors = {"coarse": coarse, "fine": fine}
    enc = Encoder(profile=profile, keep_quantized=True, threads=1)
    always, decoded, reports = roundtrip(tensors, enc, qp=-20, dq=dq, codebook=1)
    assert all(r.codebook_size > 1 and r.dq_flag == 0 for r in reports)
    for r in reports:
        # a codebook tensor is quantized uniformly at the finer qp of similar quality (supplement 5.4)
        assert r.qp == (-24 if dq else -20)
        assert max_error_in_steps(tensors[r.name], decoded[r.name], r.qp, 2) <= 0.5 + 1e-6
    best, _, reports2 = roundtrip(tensors, enc, qp=-20, dq=dq, codebook=2)
    off, _, reports0 = roundtrip(tensors, enc, qp=-20, dq=dq, codebook=0)
    sizes = {r.name: r.unit_bytes for r in reports}
    sizes0 = {r.name: r.unit_bytes for r in reports0}
    for r in reports2:
        assert r.unit_bytes == min(sizes[r.name], sizes0[r.name])
        assert (r.codebook_size > 0) == (sizes[r.name] < sizes0[r.name])
    assert len(best) <= min(len(always), len(off))


def test_one_entry_codebook():
    tensors = {"zero": np.zeros((8, 8), np.float32), "w": weights(13, (8, 8))}
    data, decoded, reports = roundtrip(tensors, codebook=1)
    assert reports[0].codebook_size == 1 and not decoded["zero"].any()


@pytest.mark.parametrize("bitdepth", [2, 4, 8])
@pytest.mark.parametrize("dq", [False, True])
def test_bitdepth(bitdepth, dq):
    tensors = {"w": weights(14, (40, 50), 0.5), "pos": np.abs(weights(15, (30, 20))), "b": weights(16, (60,))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QuantizationWarning)
        data, decoded, reports = roundtrip(tensors, dq=dq, bitdepth=bitdepth, raw_float=False)
    for r in reports:
        bw = bitdepth if (bitdepth > 7 or r.name != "b") else 8
        n = r.quantized.levels.astype(np.int64)
        lo, hi = r.quantized.level_range
        assert hi - lo == (1 << bw) - 1
        assert lo <= n.min() and n.max() <= hi


def test_lambda_scale_trades_distortion_for_rate():
    tensors = {"w": weights(17, (120, 80), 0.05)}
    plain, decoded0, _ = roundtrip(tensors, qp=-36)
    rd, decoded1, _ = roundtrip(tensors, qp=-36, lambda_scale=1.0)
    mse = [float(((d["w"] - tensors["w"]) ** 2).mean()) for d in (decoded0, decoded1)]
    assert len(rd) < len(plain) and mse[1] > mse[0]


def test_unary_length_and_param_opt():
    tensors = {"w": weights(18, (40, 40), 0.5)}
    sizes = []
    for unary, opt in ((10, True), (10, False), (2, True), (30, True)):
        data, _, _ = roundtrip(tensors, qp=-40, cabac_unary_length_minus1=unary, param_opt=opt)
        assert ndus(data)[0].ndu.cabac_unary_length_minus1 == unary
        sizes.append(len(data))
    assert sizes[0] < sizes[1]  # the parameter optimizer pays


# --- integer and raw float tensors ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint32, np.bool_])
def test_integer_tensors_exact(dtype):
    r = rng(19)
    info = np.iinfo(dtype) if dtype is not np.bool_ else None
    if info is None:
        values = r.random((9, 7)) < 0.3
    else:
        lo, hi = max(info.min, -(1 << 31)), min(info.max, (1 << 31) - 1)
        values = r.integers(lo, hi, size=(9, 7), endpoint=True, dtype=np.int64)
        values[0, :2] = (lo, hi)
    tensors = {"ints": values.astype(dtype), "one": np.array(5, dtype=dtype if info else np.int32)}
    for scan in (0, 1):
        data, decoded, reports = roundtrip(tensors, scan_order=scan)
        assert all(r.payload_type == NNR_PT_INT for r in reports)
        assert decoded["ints"].dtype == np.int32
        assert np.array_equal(decoded["ints"], values.astype(np.int64))
        assert decoded["one"].tolist() == [tensors["one"].item()]


def test_integer_tensor_outside_int32():
    with pytest.raises(NNCError):
        encode({"big": np.array([1 << 40], dtype=np.int64)})


def test_raw_float_where_coding_does_not_pay():
    tensors = {"scalar": np.float32(0.123456), "pair": np.array([1e-3, 7.5], np.float32),
               "w": weights(20, (30, 30))}
    data, decoded, reports = roundtrip(tensors)
    kinds = {r.name: r.payload_type for r in reports}
    assert kinds == {"scalar": NNR_PT_RAW_FLOAT, "pair": NNR_PT_RAW_FLOAT, "w": NNR_PT_FLOAT}
    assert decoded["scalar"].shape == (1,) and decoded["scalar"][0] == np.float32(0.123456)
    coded, _, reports = roundtrip(tensors, raw_float=False)
    assert all(r.payload_type == NNR_PT_FLOAT for r in reports)
    assert len(data) < len(coded)
    # A set of names: those always go as their float32 values (a rollback's exact model), the others
    # as before.
    exact, decoded, reports = roundtrip(tensors, raw_float=frozenset({"w"}))
    assert {r.name: r.payload_type for r in reports} == {n: NNR_PT_RAW_FLOAT for n in tensors}
    assert decoded["w"].tobytes() == tensors["w"].tobytes() and len(exact) > len(data)


# --- row skipping ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dq,scan_order,width", [(True, 0, 40), (False, 1, 40), (True, 1, 43), (True, 2, 70)])
def test_row_skipping_where_it_pays(dq, scan_order, width):
    zero_rows = (0, 3, 4, 5, 17, 18, 31)
    tensors = {"w": weights(21, (40, width), 0.05, zero_rows=zero_rows), "dense": weights(22, (40, width), 0.05)}
    data, decoded, reports = roundtrip(tensors, dq=dq, scan_order=scan_order)
    r = {x.name: x for x in reports}
    assert r["w"].row_skip == 1 and r["dense"].row_skip == 0
    plain, _, _ = roundtrip(tensors, dq=dq, scan_order=scan_order, row_skip=False)
    assert len(data) < len(plain)
    # profile 0 has no row skipping
    _, _, reports0 = roundtrip(tensors, Encoder(profile=0, keep_quantized=True), dq=dq, scan_order=scan_order)
    assert all(x.row_skip == 0 for x in reports0)


# --- stream structure -----------------------------------------------------------------------------------------
def test_stream_layout_as_nncodec():
    tensors = model(2)
    data = encode(tensors)
    kinds = [u.nnr_unit_type for _, u in units(data)]
    assert kinds == [NNR_STR, NNR_MPS, NNR_TPL] + [NNR_NDU] * len(tensors)
    tpl = units(data)[2][1]
    assert tpl.nnr_unit_size == 6 and data[tpl.offset + 3:tpl.offset + 6] == b"\x00\x00\x00"
    for index, unit in enumerate(ndus(data)):
        ndu = unit.ndu
        assert unit.names == [list(tensors)[index]]
        assert (ndu.node_id_present_flag, ndu.device_id, ndu.parameter_id, ndu.put_node_depth) == (1, 0, index, 0)
        assert ndu.get("parent_node_id_present_flag", 0) == 0
    assert encode(tensors, topology=False) != data
    assert [u.nnr_unit_type for _, u in units(encode(tensors, topology=False))][:3] == [NNR_STR, NNR_MPS, NNR_NDU]
    for u in ndus(encode(tensors, profile=0)):
        assert u.ndu.get("node_id_present_flag") is None


@pytest.mark.parametrize("limit", [60, 200, 1000])
def test_partial_units_never_exceed_max_unit_bytes(limit):
    tensors = {"w": weights(23, (64, 50), 0.2), "v": weights(24, (8, 8)), "b": weights(25, (64,))}
    whole = encode(tensors, scan_order=1)
    data = encode(tensors, scan_order=1, max_unit_bytes=limit)
    parts = [u for _, u in units(data) if u.nnr_unit_type == NNR_NDU]
    assert all(u.nnr_unit_size <= limit for u in parts)
    counters = [u.partial_data_counter for u in parts if u.names == ["w"]]
    assert len(counters) > 1 and counters == list(range(len(counters), 0, -1))
    want = nnc_edge.decode(whole)
    got = nnc_edge.decode(data)
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_max_unit_bytes_limits():
    tensors = {"a_rather_long_tensor_name.weight": weights(26, (64, 64), 0.5)}
    with pytest.raises(ValueError, match="too small"):
        encode(tensors, max_unit_bytes=40)
    with pytest.raises(ValueError, match="partial_data_counter allows 255"):
        encode(tensors, qp=-44, max_unit_bytes=50)
    with pytest.raises(ValueError):
        encode(tensors, max_unit_bytes=8)


@pytest.mark.parametrize("aggregate,limit", [(True, None), (3, None), (True, 700)])
def test_aggregate_units_with_entry_points(aggregate, limit):
    tensors = {"t%d" % i: weights(30 + i, (10 + i, 20)) for i in range(8)}
    tensors["big"] = weights(40, (60, 60), 0.3)
    data = encode(tensors, aggregate=aggregate, max_unit_bytes=limit)
    top = [u for depth, u in units(data) if depth == 0]
    aggs = [u for u in top if u.nnr_unit_type == NNR_AGG]
    assert aggs
    for agg in aggs:
        members = agg.units
        assert 2 <= len(members) <= (aggregate if aggregate is not True else 65537)
        assert agg.agg.entry_points_present_flag == 1
        assert agg.agg.nnr_unit_type == [NNR_NDU] * len(members)
        # entry points: byte offsets of the members from the start of the aggregate unit
        assert [agg.offset + e for e in agg.agg.nnr_unit_entry_point] == [m.offset for m in members]
    if limit:
        assert all(u.nnr_unit_size <= limit for u in top)
        assert any(u.partial_data_counter for _, u in units(data))
    want = nnc_edge.decode(encode(tensors))
    got = nnc_edge.decode(data)
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_block_groups():
    tensors = model(3)
    tensors["bn.weight"] = weights(41, (20,), 0.5) + 1
    tensors["bn.bias"] = weights(42, (20,), 0.1)
    tensors["bn.running_mean"] = weights(43, (20,), 0.1)
    tensors["bn.running_var"] = np.abs(weights(44, (20,), 0.5)) + 0.5
    data, decoded, reports = roundtrip(tensors, block=True, scan_order=1)
    blocks = [u for u in ndus(data) if u.ndu.nnr_compressed_data_unit_payload_type == NNR_PT_BLOCK]
    assert [u.names for u in blocks] == [["conv.weight", "conv.bias"], ["fc.weight", "fc.bias"]]
    assert sorted(decoded) == sorted(tensors)
    explicit = [{"W": "fc.weight", "BI": "fc.bias", "gamma": "bn.weight", "beta": "bn.bias",
                 "mean": "bn.running_mean", "var": "bn.running_var"}]
    for dq in (True, False):
        for codebook in (0, 1):
            data, decoded, reports = roundtrip(tensors, block=explicit, dq=dq, codebook=codebook)
            block = [u for u in ndus(data) if u.ndu.nnr_compressed_data_unit_payload_type == NNR_PT_BLOCK]
            assert block[0].names == ["fc.weight", "bn.bias", "bn.weight", "bn.running_mean", "bn.running_var",
                                      "fc.bias"]
            assert {r.dq_flag for r in reports if r.payload_type == NNR_PT_BLOCK} == {int(dq and not codebook)}
    for bad in ([{"W": "fc.weight", "gamma": "bn.weight"}], [{"BI": "fc.bias", "LS": "conv.bias"}],
                [{"W": "fc.weight", "BI": "conv.bias"}], [{"W": "fc.weight", "BI": "nope"}],
                [{"W": "fc.bias", "BI": "conv.bias"}], [{"W": "fc.weight"}],
                [{"W": "fc.weight", "BI": "fc.bias"}, {"W": "conv.weight", "BI": "fc.bias"}]):
        with pytest.raises(ValueError):
            encode(tensors, block=bad)


def test_threads_give_identical_output():
    tensors = model(4)
    tensors.update({"m%d" % i: weights(50 + i, (16, 24)) for i in range(6)})
    assert Encoder(threads=1).encode(tensors, scan_order=1) == Encoder(threads=3).encode(tensors, scan_order=1)


def test_progress_callback():
    tensors = model(5)
    calls = []
    encode(tensors, progress=lambda done, total, name: calls.append((done, total, name)))
    total = sum(np.asarray(v).size for v in tensors.values())
    assert [c[2] for c in calls] == list(tensors)
    assert [c[0] for c in calls] == list(np.cumsum([np.asarray(v).size for v in tensors.values()]))
    assert all(c[1] == total for c in calls)


# --- inputs ----------------------------------------------------------------------------------------------------
class FakeTorchTensor:
    """What the encoder uses of a torch.Tensor: detach().cpu().numpy() and dtype."""

    def __init__(self, array):
        self.array = array
        self.dtype = "torch.float32"

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


def test_inputs_dict_pairs_files_and_state_dicts(tmp_path):
    tensors = model(6)
    want = encode(tensors)
    assert encode(list(tensors.items())) == want
    assert encode({k: FakeTorchTensor(v) for k, v in tensors.items()}) == want
    for suffix in (".npz", ".safetensors"):
        path = str(tmp_path / ("m" + suffix))
        modelio.save(path, tensors)
        assert encode(path) == want
    float64 = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in tensors.items()}
    assert encode(float64) == want


def test_bad_inputs():
    with pytest.raises(ValueError, match="tensor_dimensions must be positive"):
        encode({"empty": np.zeros((0, 3), np.float32)})
    with pytest.raises(TypeError):
        encode({"s": np.array(["x"])})
    with pytest.raises(TypeError):
        encode({1: np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="given twice"):
        encode([("a", np.zeros(3, np.float32)), ("a", np.ones(3, np.float32))])
    with pytest.raises(NNCError):
        encode({"w": weights(1, (4, 4))}, qp=-200)  # qp_value does not fit iae(8)
    with pytest.raises(NNCError):
        encode({"w": np.array([[np.nan, 1.0]], np.float32)})
    with pytest.raises(ValueError):
        encode({"w": weights(1, (4, 4))}, codebook=3)
    with pytest.raises(ValueError):
        encode({"w": weights(1, (4, 4))}, scan_order=5)
    with pytest.raises(ValueError):
        encode({"w": weights(1, (4, 4))}, aggregate=1)
    with pytest.raises(TypeError):
        encode({"w": weights(1, (4, 4))}, no_such_option=1)
    with pytest.raises(ValueError):
        Encoder(profile=0, parent_signalling=True)
    with pytest.raises(ValueError):
        Encoder(tca=True)
    with pytest.raises(ValueError):
        Encoder(profile=2)


# --- update chains -------------------------------------------------------------------------------------------
def chain_steps(seed, steps=4):
    """Sparse weight differences drifting over a few steps; one tensor unchanged in step 2."""
    r = rng(seed)
    out = []
    changing = r.random((32, 24)) < 0.25  # "a.weight" changes at the same positions every step
    for s in range(steps):
        step = {}
        for name, shape in (("a.weight", (32, 24)), ("b.weight", (16, 40)), ("b.bias", (16,)),
                            ("c.ids", (3, 5))):
            if name == "c.ids":
                step[name] = (r.integers(1, 3, size=shape) * (r.random(shape) < 0.3)).astype(np.int32)
                continue
            d = (r.standard_normal(shape) * 0.01).astype(np.float32)
            d[~changing if name == "a.weight" else r.random(shape) < 0.8] = 0
            step[name] = d
        if s == 2:
            step["b.weight"] = np.zeros((16, 40), np.float32)
        out.append(step)
    return out


@pytest.mark.parametrize("tca,hdsp", [(False, False), (True, False), (True, True), (False, True)])
def test_update_chain_through_one_decoder(tca, hdsp):
    steps = chain_steps(60)
    enc = Encoder(parent_signalling=True, tca=tca, hdsp=hdsp, keep_quantized=True, threads=2)
    dec = nnc_edge.Decoder()
    depth = {}
    used_hdsp = False
    for index, step in enumerate(steps):
        data = enc.encode(step, qp=-44)
        decoded = dec.decode(data)
        reports = {r.name: r for r in enc.report}
        assert [u.nnr_unit_type for _, u in units(data)][1] == NNR_MPS
        assert units(data)[1][1].mps.mps_parent_signalling_enabled_flag == 1
        assert reports["b.weight"].omitted == (index == 2)
        for name, array in step.items():
            r = reports[name]
            used_hdsp = used_hdsp or bool(r.hdsp)
            if r.omitted:
                assert name not in decoded  # 5.7: all-zero updates are omitted
                continue
            want = r.quantized.reconstruct() if r.payload_type != NNR_PT_RAW_FLOAT else array
            assert np.array_equal(decoded[name].reshape(want.shape), want), (index, name)
        for u in ndus(data):
            ndu = u.ndu
            name = u.names[0]
            depth[name] = depth.get(name, 0) + 1
            assert ndu.parent_node_id_present_flag == 1 and ndu.parent_node_id_type == 0
            assert ndu.put_node_depth == depth[name]
            assert ndu.parameter_id == list(step).index(name)
            assert ndu.temporal_context_modeling_flag == (1 if tca and depth[name] > 1 else 0)
            assert reports[name].tca == ndu.temporal_context_modeling_flag
    if not hdsp:
        assert not used_hdsp
    elif not tca:
        assert used_hdsp  # "a.weight" changes where it changed before: the history pays (without TCA)


def test_chain_state_follows_shapes_and_omissions():
    enc = Encoder(parent_signalling=True, tca=True, hdsp=True, keep_quantized=True)
    dec = nnc_edge.Decoder()
    sequence = [{"w": weights(70, (12, 10), 0.01, sparsity=0.5)},
                {"w": weights(71, (12, 10), 0.01, sparsity=0.5), "new": weights(72, (5, 6), 0.01)},
                {"w": weights(73, (8, 20), 0.01, sparsity=0.5)},          # new size: no TCA, fresh history
                {"w": np.zeros((8, 20), np.float32)},                     # omitted: state unchanged
                {"w": weights(74, (8, 20), 0.01, sparsity=0.5), "new": weights(75, (5, 6), 0.01)}]
    flags = []
    for step in sequence:
        data = enc.encode(step, qp=-44)
        decoded = dec.decode(data)
        for r in enc.report:
            if not r.omitted:
                assert np.array_equal(decoded[r.name], r.quantized.reconstruct())
        flags.append({u.names[0]: u.ndu.temporal_context_modeling_flag for u in ndus(data)})
    assert flags == [{"w": 0}, {"w": 1, "new": 0}, {"w": 0}, {}, {"w": 1, "new": 1}]


# --- the compiled entropy coder writes what the Python one writes ---------------------------------------------
def compiled_or_skip():
    if cabac_encoder._compiled is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nnc_edge.encoder._cabac_encoder is not built (pip install -e .)")
        pytest.skip("nnc_edge.encoder._cabac_encoder is not built")


def random_segment(seed):
    """A random NDU segment exercising every coding tool, and whether it is profile 1."""
    r = random.Random(seed)
    profile = r.randint(0, 1)
    dq = r.randint(0, 1)
    items = []
    for k in range(r.randint(1, 3)):
        h = r.choice([1, 2, 5, 17, 40])
        w = r.choice([1, 3, 16, 37])
        dims = [h, w] if r.random() < 0.8 else [h * w]
        scan = r.randint(0, 3) if len(dims) > 1 and h > 1 and w > 1 else 0
        count = h * w
        codebook = r.random() < 0.25 and not dq
        S = Z = 0
        if codebook:
            S = r.randint(1, 9)
            Z = r.randint(0, S - 1)
            k_levels = [r.randint(-Z, S - 1 - Z) if r.random() < 0.6 else 0 for _ in range(count)]
        else:
            scale = r.choice([1, 4, 60, 5000])
            k_levels = [int(r.expovariate(1.0 / scale)) * r.choice([-1, 1]) if r.random() < 0.5 else 0
                        for _ in range(count)]
        for row in range(h):
            if r.random() < 0.3:
                k_levels[row * w:(row + 1) * w] = [0] * w
        parent = profile == 1 and r.random() < 0.5
        base = [r.randint(-3, 3) if r.random() < 0.4 else 0 for _ in range(count)] \
            if (parent and r.random() < 0.6) else None
        hist = bytearray(1 if r.random() < 0.3 else 0 for _ in range(count)) \
            if (parent and r.random() < 0.6) else None
        coding = TensorCoding(dims, dq, r.choice([0, 2, 10]), scan, profile, S, Z, None, base, hist,
                              1 if parent else 0)
        row_skip = r.randint(0, 1)
        n = dq_reconstruction_indices(k_levels, coding, row_skip)
        hdsp = r.choice([0, 1, None]) if (parent and hist is not None) else 0
        qp = r.randint(-60, 20) if r.random() < 0.8 else None
        items.append(SegmentTensor(np.array(n, dtype=r.choice([np.int32, np.int64])).reshape(dims), coding, qp,
                                   2, row_skip, hdsp, r.randint(0, 1) if r.random() < 0.2 else 1))
    return items


def test_compiled_encoder_is_byte_identical_with_python(monkeypatch):
    compiled_or_skip()
    # levels of about 2^20: some 40 bits each, more than the compiled coder's first output buffer
    large = rng(80).integers(-(1 << 20), 1 << 20, size=(64, 64)).astype(np.int32)
    cases = [[SegmentTensor(large, TensorCoding([64, 64], 0, 10, 1, 1), -30, 2)]]
    for seed in range(120):
        cases.append(random_segment(seed))
    for seed, items in enumerate(cases):
        fast = encode_segment(items)
        with monkeypatch.context() as m:
            m.setattr(cabac_encoder, "_compiled", None)
            slow = encode_segment(items)
        assert fast.data == slow.data, seed
        assert (fast.cabac_offset_list, fast.dq_state_list, fast.BitOffsetList) == \
               (slow.cabac_offset_list, slow.dq_state_list, slow.BitOffsetList), seed
        for a, b in zip(fast.tensors, slow.tensors):
            assert a.hist_dep_sig_prob_enabled_flag == b.hist_dep_sig_prob_enabled_flag
            assert a.row_skip_flag == b.row_skip_flag


def test_compiled_encoder_refuses_what_python_refuses(monkeypatch):
    compiled_or_skip()
    dq = TensorCoding([2, 3], 1, 10)
    codebook = TensorCoding([2, 3], 0, 10, 0, 1, 4, 0)
    cases = [(dq, [0, 1, 0, 0, 0, 0]),            # odd n in state 0
             (dq, [2, 2, 2, 0, 0, 0]),            # states 0, 2, 3: an even n where odd multiples are needed
             (codebook, [0, -1, 0, 0, 0, 0]),     # a sign the codebook cannot have (6.8)
             (codebook, [0, 4, 0, 0, 0, 0]),      # outside the codebook
             (TensorCoding([1, 2], 0, 10), [1 << 32, 0]),
             (TensorCoding([1, 2], 0, 10), [1, 2, 3])]
    for coding, levels in cases:
        for compiled in (True, False):
            with monkeypatch.context() as m:
                if not compiled:
                    m.setattr(cabac_encoder, "_compiled", None)
                with pytest.raises(ValueError) as info:
                    encode_segment([SegmentTensor(np.array(levels, dtype=np.int64), coding, 0, 2)])
            if compiled:
                message = str(info.value)
            else:
                assert str(info.value) == message


def test_pure_python_encoder_writes_the_same_stream(monkeypatch):
    compiled_or_skip()
    from nnc_edge.encoder import quantize
    tensors = model(7)
    options = dict(scan_order=1, row_skip=True, codebook=2, threads=1)
    tensors["fc.weight"][::4] = 0
    fast = encode(tensors, **options)
    monkeypatch.setattr(cabac_encoder, "_compiled", None)
    monkeypatch.setattr(quantize, "_trellis_ext", None)
    assert encode(tensors, **options) == fast
