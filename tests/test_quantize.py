"""The host quantizers (nnc_edge.encoder.quantize): error bounds, decodability of DQ levels, codebooks, bit depth,
qp handling, and equality with NNCodec 2.1.3's quantizer when the reference venv is present."""

import os
import subprocess
import warnings

import numpy as np
import pytest

from decoder_core import NNCError
from decoder_core import payload
from decoder_core.bitreader import BitReader
from decoder_core.tables import NNR_PT_FLOAT, NNR_PT_INT, StateTransTab
from decoder_core.units import integer_codebook as parse_integer_codebook
from nnc_edge.encoder import quantize as q
from nnc_edge.encoder.bitwriter import BitWriter

REFERENCE_VENV = os.environ.get("NNC_REFERENCE_VENV", "/tmp/refvenv")
REFERENCE_PYTHON = os.path.join(REFERENCE_VENV, "bin", "python")

BACKENDS = ["python", pytest.param("cython", marks=pytest.mark.skipif(
    q.trellis_backend() != "cython", reason="nnc_edge.encoder._trellis is not built (needs Cython and a C compiler)"))]


def rng(seed):
    return np.random.default_rng(seed)


def weights(seed, shape, scale=0.05, zero_rows=(), sparsity=0.0):
    r = rng(seed)
    w = r.standard_normal(shape) * scale
    if sparsity:
        w[r.random(shape) < sparsity] = 0
    for row in zero_rows:
        w[row] = 0
    return w.astype(np.float32)


def decoded_dq(n, scan_order, row_skip):
    """What the decoder makes of DQ levels n: the encoder's n -> k mapping (supplement 5.1 step 7)
    followed by the decoder's k -> n mapping, with the states, scan and row skipping of
    decoder_core.deepcabac.decode_tensor_levels (written out here independently of quantize.py)."""
    h = n.shape[0]
    w = n.size // h
    flat = n.reshape(-1)
    out = np.zeros_like(flat)
    bh, bw = (4 << scan_order, 4 << scan_order) if scan_order else (h, w)
    skip = [row_skip and not flat[y * w:(y + 1) * w].any() for y in range(h)]
    state = 0
    for by in range(0, h, bh):
        for bx in range(0, w, bw):
            for y in range(by, min(by + bh, h)):
                if skip[y]:
                    for _ in range(w):  # 6.5: w transitions for every skipped segment
                        state = StateTransTab[state][0]
                    continue
                for x in range(bx, min(bx + bw, w)):
                    v = int(flat[y * w + x])
                    sgn = (v > 0) - (v < 0)
                    k = (v + sgn * (state & 1)) >> 1
                    prev, state = state, StateTransTab[state][k & 1]
                    if k and prev & 1:
                        k = 2 * k + (1 if k < 0 else -1)
                    else:
                        k = 2 * k
                    out[y * w + x] = k
    return out.reshape(n.shape)


def greedy_dq(w, step):
    """Per element the nearest value of the current state's quantizer, without look-ahead."""
    state = 0
    out = np.zeros(w.size, dtype=np.int64)
    for i, v in enumerate(w.reshape(-1).astype(np.float64) / step):
        if state & 1:
            cands = [0] + [2 * m + 1 for m in (int(np.floor((v - 1) / 2)), int(np.floor((v - 1) / 2)) + 1)]
        else:
            cands = [2 * m for m in (int(np.floor(v / 2)), int(np.floor(v / 2)) + 1)]
        n = min(cands, key=lambda c: abs(v - c))
        k = (n + ((n > 0) - (n < 0)) * (state & 1)) >> 1
        state = StateTransTab[state][k & 1]
        out[i] = n
    return out.reshape(w.shape)


# --- step size and qp ------------------------------------------------------------------------------
def test_step_size_is_the_decoders():
    assert q.step_size is payload.step_size
    assert q.step_size(-29, 2) == 7 * 2.0 ** -10


@pytest.mark.parametrize("density", [0, 2, 5])
def test_qp_range_and_check(density):
    lo, hi = q.qp_range(density)
    assert (lo, hi) == (-(1 << (5 + density)), (1 << (5 + density)) - 1)
    assert q.check_qp(lo, density) == lo and q.check_qp(hi, density) == hi
    assert q.qp_range(density, quantization_parameter=-10) == (lo - 10, hi - 10)
    for bad in (lo - 1, hi + 1):
        with pytest.raises(NNCError) as info:
            q.check_qp(bad, density)
        assert info.value.element == "qp_value"
        with pytest.warns(q.QuantizationWarning, match="clipped"):
            assert q.check_qp(bad, density, clip=True) == min(max(bad, lo), hi)


def test_qp_out_of_range_is_never_wrapped():
    # NNCodec writes qp -39 with QpDensity 0 as 25 (supplement 4.1); we refuse or clip.
    w = weights(1, (8, 8))
    with pytest.raises(NNCError):
        q.quantize_tensor(w, qp=-39, qp_density=0)
    with pytest.warns(q.QuantizationWarning):
        t = q.quantize_tensor(w, qp=-39, qp_density=0, clip_qp=True)
    assert t.qp == -32
    with pytest.raises(NNCError):
        q.check_qp(-32.5, 2)
    with pytest.raises(NNCError):
        q.check_qp(-32, 8)


def test_qp_from_step_size_inverts_step_size():
    for density in (0, 1, 2, 3, 6):
        for qp in range(-100, 40, 7):
            assert q.qp_from_step_size(q.step_size(qp, density), density) == pytest.approx(qp, abs=1e-9)


# --- uniform quantization ---------------------------------------------------------------------------
def test_uniform_rounds_half_away_from_zero():
    step = q.step_size(-32, 2)
    assert step == 2.0 ** -8
    w = np.array([0.5, -0.5, 2.5, -2.5, 1.4999999, 0.0, -0.0, 3.5], dtype=np.float64) * step
    levels, qp = q.quantize_uniform(w, -32, 2)
    assert qp == -32
    assert levels.dtype == np.int32
    assert levels.tolist() == [1, -1, 3, -3, 1, 0, 0, 4]


@pytest.mark.parametrize("qp,density", [(-32, 2), (-29, 2), (-41, 3), (-7, 0), (-20, 1)])
def test_uniform_error_bound(qp, density):
    w = weights(-qp, (37, 23), scale=0.1)
    levels, qp_used = q.quantize_uniform(w, qp, density)
    step = q.step_size(qp_used, density)
    err = np.abs(w.astype(np.float64) - levels * step)
    assert err.max() <= step / 2 * (1 + 1e-6)


def test_overflow_guard_raises_qp():
    w = weights(2, (20, 20), scale=1e7)
    with pytest.warns(q.QuantizationWarning, match="raised"):
        levels, qp = q.quantize_uniform(w, -32, 2)
    assert qp > -32
    assert np.abs(levels.astype(np.int64)).max() <= 2 ** 31 - 1
    # one qp lower the levels would not fit: the guard picks the smallest workable qp
    r = np.abs(w.astype(np.float64)).max() / q.step_size(qp - 1, 2)
    assert r > 2 ** 31 - 3
    with pytest.warns(q.QuantizationWarning):
        n, qp_dq = q.quantize_dq(w, -32, 2)
    assert np.abs(n.astype(np.int64)).max() < 2 ** 31


def test_overflow_beyond_any_qp_raises():
    w = np.array([[3e38, -3e38], [1.0, 2.0]], dtype=np.float32)
    with pytest.raises(NNCError):
        q.quantize_uniform(w, -32, 0)


def test_non_finite_values_raise():
    w = weights(3, (4, 4))
    w[1, 2] = np.nan
    with pytest.raises(NNCError):
        q.quantize_tensor(w)


# --- dependent quantization -------------------------------------------------------------------------
def test_scan_positions_follow_the_block_scan():
    h, w = 21, 19
    for so in (1, 2):
        bs = 4 << so
        expected = [y * w + x for by in range(0, h, bs) for bx in range(0, w, bs)
                    for y in range(by, min(by + bs, h)) for x in range(bx, min(bx + bs, w))]
        assert q.scan_positions((h, w), so).tolist() == expected
        assert q.scan_positions((h, 1, w), so).tolist() == expected
    assert q.scan_positions((h, w), 0).tolist() == list(range(h * w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,scan_order", [((40, 24), 0), ((33, 17, 3), 1), ((70, 9), 2), ((300,), 0),
                                              ((1, 50), 0), ((50, 1), 0)])
def test_dq_decodes_to_its_levels(backend, shape, scan_order):
    w = weights(len(shape) + scan_order, shape, sparsity=0.3)
    n, qp = q.quantize_dq(w, -30, 2, scan_order=scan_order, backend=backend)
    assert n.dtype == np.int32 and n.shape == shape
    assert (decoded_dq(n.reshape(shape[0], -1), scan_order, False) == n.reshape(shape[0], -1)).all()
    step = q.step_size(qp, 2)
    # a coded value is always one of the two candidates of its branch, or zero instead of one nearer
    assert np.abs(w.astype(np.float64) - n * step).max() < 2 * step


@pytest.mark.parametrize("backend", BACKENDS)
def test_dq_beats_greedy_choice(backend):
    w = weights(7, (30, 40), scale=0.02)
    n, qp = q.quantize_dq(w, -32, 2, backend=backend)
    step = q.step_size(qp, 2)
    greedy = greedy_dq(w, step)
    assert (decoded_dq(greedy, 0, False) == greedy).all()  # the baseline is itself decodable
    d_trellis = ((w.astype(np.float64) - n * step) ** 2).sum()
    d_greedy = ((w.astype(np.float64) - greedy * step) ** 2).sum()
    assert d_trellis < 0.9 * d_greedy
    # the look-ahead may take a farther candidate of the other parity, but never beyond the four
    assert np.abs(w.astype(np.float64) - n * step).max() < 2 * step
    assert np.sqrt(((w.astype(np.float64) - n * step) ** 2).mean()) < 0.5 * step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,scan_order", [((40, 27), 1), ((35, 50), 2), ((20, 3, 7), 1)])
def test_dq_row_skipping_with_block_scan(backend, shape, scan_order):
    w = weights(11, shape, zero_rows=(0, 3, 4, 17), sparsity=0.2)
    h = shape[0]
    w2 = w.reshape(h, -1)
    w2[5] *= 1e-3  # a row that quantizes to zero without being zero
    w = w2.reshape(shape)
    n, _ = q.quantize_dq(w, -32, 2, scan_order=scan_order, row_skip=True, backend=backend)
    n2 = n.reshape(h, -1)
    assert not n2[[0, 3, 4, 5, 17]].any()
    assert (decoded_dq(n2, scan_order, True) == n2).all()
    # Without telling the trellis about row skipping, these levels would not survive it (6.5).
    plain, _ = q.quantize_dq(w, -32, 2, scan_order=scan_order, row_skip=False, backend=backend)
    plain2 = plain.reshape(h, -1)
    assert (decoded_dq(plain2, scan_order, False) == plain2).all()
    assert not (decoded_dq(plain2, scan_order, True) == plain2).all()


@pytest.mark.parametrize("shape,scan_order,lambda_scale", [((40, 27), 1, 0.0), ((35, 50), 2, 2.0), ((20, 3, 7), 1, 0.0),
                                                        ((64, 33), 0, 1.0)])
def test_dq_round_trip_through_the_entropy_coder(shape, scan_order, lambda_scale):
    """Profile 1 with row skipping: the levels survive nnc_edge.encoder.cabac_encoder and our decoder exactly."""
    cabac = pytest.importorskip("nnc_edge.encoder.cabac_encoder")
    from decoder_core.deepcabac import ArithmeticDecoder, TensorCoding, decode_tensor_levels
    w = weights(31, shape, zero_rows=(0, 3, 9, 17), sparsity=0.5)
    n, qp = q.quantize_dq(w, -30, 2, scan_order=scan_order, row_skip=True, lambda_scale=lambda_scale)
    coding = TensorCoding(list(shape), 1, 10, scan_order, 1)
    seg = cabac.encode_segment([cabac.SegmentTensor(n, coding, qp_value=qp, qp_density=2, row_skip_enabled_flag=1)])
    eps = (seg.cabac_offset_list, seg.dq_state_list, seg.BitOffsetList, 0) if seg.BitOffsetList else None
    engine = ArithmeticDecoder(seg.data, 0, len(seg.data))
    assert engine.iae(8) == qp
    levels = decode_tensor_levels(engine, TensorCoding(list(shape), 1, 10, scan_order, 1, 0, 0, eps))
    engine.terminate_cabac()
    assert (np.array(levels).reshape(shape) == n).all()
    assert any(seg.tensors[0].row_skip_flag)


def test_dq_row_skipping_with_raster_scan_needs_nothing_special():
    w = weights(12, (30, 27), zero_rows=(2, 9))
    n, _ = q.quantize_dq(w, -32, 2, scan_order=0, row_skip=True)
    plain, _ = q.quantize_dq(w, -32, 2, scan_order=0)
    assert (n == plain).all()
    assert (decoded_dq(n, 0, True) == n).all()


@pytest.mark.skipif(q.trellis_backend() != "cython", reason="nnc_edge.encoder._trellis is not built")
def test_trellis_backends_agree():
    from nnc_edge.encoder import _trellis
    assert _trellis.branches() == q._BRANCHES
    r = rng(21)
    for i in range(12):
        shape = (int(r.integers(2, 40)), int(r.integers(2, 40)))
        w = (r.laplace(size=shape) * 10 ** r.uniform(-3, 1)).astype(np.float32)
        if i % 3 == 0:
            w[r.random(shape) < 0.6] = 0
        kwargs = dict(scan_order=int(r.integers(0, 3)), row_skip=bool(i % 2),
                      level_range=(-8, 7) if i % 4 == 1 else None, lambda_scale=[0.0, 1.0, 3.0][i % 3])
        qp = int(r.integers(-40, -10))
        a, qa = q.quantize_dq(w, qp, 2, backend="python", **kwargs)
        b, qb = q.quantize_dq(w, qp, 2, backend="cython", **kwargs)
        assert qa == qb
        assert (a == b).all()


def coded_levels(n):
    """The coded levels k of raster-scan DQ levels n (the encoder's n -> k mapping)."""
    state = 0
    out = []
    for v in n.reshape(-1).tolist():
        k = (v + ((v > 0) - (v < 0)) * (state & 1)) >> 1
        state = StateTransTab[state][k & 1]
        out.append(k)
    return np.array(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dq_rate_term_trades_distortion_for_bits(backend):
    w = weights(23, (60, 50), scale=0.03)
    plain, qp = q.quantize_dq(w, -28, 2, backend=backend)
    assert (q.quantize_dq(w, -28, 2, lambda_scale=0.0, backend=backend)[0] == plain).all()
    rdo, qp2 = q.quantize_dq(w, -28, 2, lambda_scale=4.0, backend=backend)
    assert qp2 == qp
    assert (decoded_dq(rdo, 0, False) == rdo).all()
    step = q.step_size(qp, 2)
    d_plain = ((w.astype(np.float64) - plain * step) ** 2).sum()
    d_rdo = ((w.astype(np.float64) - rdo * step) ** 2).sum()
    assert d_rdo > d_plain
    assert q.estimate_level_bits(coded_levels(rdo)) < 0.97 * q.estimate_level_bits(coded_levels(plain))
    assert (np.abs(rdo) <= np.abs(plain) + 2).all()
    assert q.dq_lambda(1.0) == pytest.approx(4 * np.log(2) / 6 * 0.7)
    with pytest.raises(ValueError):
        q.quantize_dq(w, -28, 2, lambda_scale=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dq_rate_term_with_row_skipping(backend):
    w = weights(24, (40, 27), zero_rows=(1, 8, 30), sparsity=0.3)
    n, _ = q.quantize_dq(w, -30, 2, scan_order=1, row_skip=True, lambda_scale=2.0, backend=backend)
    assert not n[[1, 8, 30]].any()
    assert (decoded_dq(n, 1, True) == n).all()


# --- bit depth ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bitdepth", [2, 4, 8])
@pytest.mark.parametrize("dq", [False, True])
def test_bitdepth_levels_within_range(bitdepth, dq):
    w = weights(bitdepth, (64, 32), scale=0.1)
    w[0, 0] = 5.0  # an outlier above the 99.95th percentile gets clipped
    t = q.quantize_tensor(w, dq=dq, bitdepth=bitdepth)
    lo, hi = t.level_range
    assert (lo, hi) == (-(1 << (bitdepth - 1)), (1 << (bitdepth - 1)) - 1)
    assert t.levels.min() >= lo and t.levels.max() <= hi
    # the trellis may take the neighbouring multiple of the other parity
    assert t.levels[0, 0] >= (hi - 1 if dq else hi)
    if dq:
        assert (decoded_dq(t.levels, 0, False) == t.levels).all()
    else:
        step = t.step_size()
        inside = np.abs(w) <= hi * step
        assert np.abs(w[inside].astype(np.float64) - t.levels[inside] * step).max() <= step / 2 * (1 + 1e-6)


def test_bitdepth_unsigned_and_nonweight_minimum():
    w = np.abs(weights(5, (16, 16)))
    qp, (lo, hi) = q.bitdepth_qp(w, 4, 2)
    assert (lo, hi) == (0, 15)
    qp1, (lo1, hi1) = q.bitdepth_qp(weights(5, (16,)), 4, 2, is_weight=False)
    assert (lo1, hi1) == (-128, 127)  # non-weight tensors get at least 8 bits
    qp16, (lo16, hi16) = q.bitdepth_qp(weights(5, (16,)), 16, 2, is_weight=False)
    assert (lo16, hi16) == (-(1 << 15), (1 << 15) - 1)
    assert q.bitdepth_qp(np.zeros((4, 4), np.float32), 8, 2)[0] == 0
    t = q.quantize_tensor(weights(6, (40,)), bitdepth=4, dq=False)
    assert t.level_range == (-128, 127)


def test_bitdepth_qp_clipped_into_range():
    w = weights(8, (16, 16), scale=1e-12)
    with pytest.warns(q.QuantizationWarning, match="clipped"):
        qp, _ = q.bitdepth_qp(w, 8, 0)
    assert qp == q.qp_range(0)[0]


# --- codebook ----------------------------------------------------------------------------------------
def test_integer_codebook_bits_are_exact():
    r = rng(9)
    for trial in range(20):
        size = int(r.integers(1, 40))
        book = np.cumsum(r.integers(1, 300, size)) - int(r.integers(0, 2000))
        zero = int(r.integers(0, size))
        for egk in (0, 1, 3, 7, 15):
            bw = BitWriter()
            bw.u(4, egk).ue(2, size).ie(2, zero - (size >> 1)).ie(7, int(book[zero]))
            for j in range(zero - 1, -1, -1):
                bw.ue(egk, int(book[j + 1] - book[j] - 1))
            for j in range(zero + 1, size):
                bw.ue(egk, int(book[j] - book[j - 1] - 1))
            assert q.integer_codebook_bits(book, zero, egk) == len(bw)
            bw.zero_pad()
            data = bw.getvalue()
            parsed = parse_integer_codebook(BitReader(data, 0, len(data)))
            assert (parsed[0], parsed[1]) == (zero, book.tolist())
        best = q.best_codebook_egk(book, zero)
        sizes = [q.integer_codebook_bits(book, zero, e) for e in range(16)]
        assert sizes[best] == min(sizes) and sizes.index(min(sizes)) == best


def test_codebook_round_trip():
    w = weights(13, (48, 40), scale=0.03, sparsity=0.4)
    t = q.quantize_tensor(w, qp=-30, dq=False, method="codebook")
    assert t.dq_flag == 0 and t.payload_type == NNR_PT_FLOAT
    book = t.codebook
    assert book == sorted(set(book)) and all(isinstance(v, int) for v in book)
    idx = t.levels.astype(np.int64) + t.cb_zero_offset
    assert idx.min() == 0 and idx.max() == len(book) - 1
    uniform, qp = q.quantize_uniform(w, -30, 2)
    assert qp == t.qp
    assert (np.asarray(book)[idx] == uniform).all()
    assert t.codebook_egk == q.best_codebook_egk(book, t.cb_zero_offset)
    # the decoder's reconstruction, bit-exact
    values = payload.reconstruct(list(t.levels.reshape(-1)), t.qp, 2, book, t.cb_zero_offset)
    assert (np.frombuffer(values, np.float32).reshape(w.shape) == t.reconstruct()).all()
    assert (t.reconstruct() == uniform.astype(np.float32) * np.float32(q.step_size(qp, 2))).all()


def test_codebook_with_dq_lowers_qp():
    w = weights(14, (20, 20))
    t = q.quantize_tensor(w, qp=-30, dq=True, method="codebook")
    assert t.qp == -34 and t.dq_flag == 0


def test_codebook_zero_offset_uses_the_estimate():
    r = rng(4)
    levels = (3 + np.round(r.laplace(size=(40, 50)) * 2)).astype(np.int32)
    qparams, book, zero, egk = q.integer_codebook(levels)
    assert abs(book[zero] - 3) <= 1  # about the centre of the distribution becomes QuantParam 0
    assert (np.asarray(book)[qparams + zero] == levels).all()
    levels = np.array([[-2, -1, 0, 1, 5, 5, 5, 5]], dtype=np.int32)
    seen = []

    def estimate(qp, size, z):
        seen.append(z)
        assert size == 5 and (qp + z).min() == 0
        return abs(z - 1)

    qparams, book, zero, egk = q.integer_codebook(levels, estimate_bits=estimate)
    assert zero == 1 and sorted(seen) == [0, 1, 2, 3, 4]
    assert (qparams == np.array([[-1, 0, 1, 2, 3, 3, 3, 3]])).all()


def test_codebook_too_large_raises():
    levels = np.arange(q.MAX_LIST_ENTRIES + 1, dtype=np.int32)
    with pytest.raises(NNCError):
        q.integer_codebook(levels)


def test_estimate_level_bits_orders_sensibly():
    sparse = np.zeros(1000, np.int32)
    sparse[::50] = 1
    dense = rng(3).integers(-20, 20, 1000)
    assert 0 < q.estimate_level_bits(np.zeros(1000, np.int32)) < 0.1 * 1000
    assert q.estimate_level_bits(np.zeros(1000, np.int32)) < q.estimate_level_bits(sparse)
    assert q.estimate_level_bits(sparse) < q.estimate_level_bits(dense)
    assert q.estimate_level_bits(dense) < q.estimate_level_bits(dense * 4)


# --- per-tensor policy -------------------------------------------------------------------------------
def test_tensor_qp_policy():
    assert q.tensor_qp((4, 4), -38, 2) == -38
    assert q.tensor_qp((4,), -38, 2) == -75
    assert q.tensor_qp((4,), -38, 2, nonweight_qp=None) == -46
    assert q.tensor_qp((4,), -38, 2, nonweight_qp=-60) == -60
    assert q.step_size(q.tensor_qp((4,), -38, 3), 3) == pytest.approx(q.step_size(-75, 2), rel=0.1)
    t = q.quantize_tensor(weights(1, (100,)), qp=-38)
    assert t.qp == -75 and t.dq_flag == 1 and t.scan_order == 0


def test_integer_tensors_are_not_quantized():
    ints = rng(2).integers(-1000, 1000, (3, 8, 16)).astype(np.int64)
    t = q.quantize_tensor(ints, qp=-20)
    assert t.payload_type == NNR_PT_INT and t.qp is None and t.dq_flag == 0
    assert t.levels.dtype == np.int32 and (t.levels == ints).all()
    assert (t.reconstruct() == ints).all()
    assert q.quantize_tensor(np.array([True, False])).payload_type == NNR_PT_INT
    with pytest.raises(NNCError):
        q.quantize_tensor(np.array([2 ** 31], dtype=np.int64))


def test_block_scan_only_for_matrices():
    assert q.quantize_tensor(weights(1, (1, 64)), scan_order=2).scan_order == 0
    assert q.quantize_tensor(weights(1, (64, 1)), scan_order=2).scan_order == 0
    assert q.quantize_tensor(weights(1, (64, 64)), scan_order=2).scan_order == 2


@pytest.mark.parametrize("dq", [False, True])
def test_reconstruct_matches_the_decoder(dq):
    w = weights(15, (30, 20), scale=0.2)
    t = q.quantize_tensor(w, qp=-27, dq=dq)
    values = payload.reconstruct(list(t.levels.reshape(-1)), t.qp, t.qp_density)
    assert (np.frombuffer(values, np.float32).reshape(w.shape) == t.reconstruct()).all()


# --- equality with NNCodec -----------------------------------------------------------------------------
REFERENCE_SCRIPT = r'''
import sys
import numpy as np
from nncodec.extensions import deepCABAC
from nncodec.nnc_core.approximator import ApproxInfo
from nncodec.nnc_core.approximator.codebook import get_best_egk
data = np.load(sys.argv[1])
out = {}
for i in range(int(data["count"])):
    w = np.ascontiguousarray(data["w%d" % i])
    kind, a, b, c, d = [int(x) for x in data["cfg%d" % i]]
    if kind == 0:  # quantLayer(dq_flag a, qp_density c, qp b, scan_order d), lambda_scale 0
        levels = np.zeros(w.shape, dtype=np.int32)
        enc = deepCABAC.Encoder()
        enc.initCtxModels(10, 0)
        out["qp%d" % i] = np.int64(enc.quantLayer(w, levels, a, c, b, 0.0, 10, d, 0))
        out["n%d" % i] = levels
    elif kind == 1:  # integer-aligned qp, bit depth a, qp_density c
        out["qp%d" % i] = np.int64(ApproxInfo._get_intaligned_qp(None, w, c, a, True))
    else:  # codebook_egk of the codebook w with CbZeroOffset a
        egk, bits = get_best_egk(w, a)
        out["qp%d" % i] = np.array([egk, bits])
np.savez(sys.argv[2], **out)
'''


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Runs a batch of quantizer calls through NNCodec: reference(cases) -> outputs (one subprocess)."""
    if not os.path.exists(REFERENCE_PYTHON):
        pytest.skip("NNCodec reference venv not found at %s (../shared/tools/reference-venv.sh DIR, "
                    "NNC_REFERENCE_VENV=DIR); the reference is never a dependency" % REFERENCE_VENV)
    tmp = tmp_path_factory.mktemp("reference")
    script = tmp / "ref.py"
    script.write_text(REFERENCE_SCRIPT)

    def run(cases):
        data = {"count": len(cases)}
        for i, (w, cfg) in enumerate(cases):
            data["w%d" % i] = w
            data["cfg%d" % i] = np.array(cfg)
        np.savez(tmp / "in.npz", **data)
        proc = subprocess.run([REFERENCE_PYTHON, str(script), str(tmp / "in.npz"), str(tmp / "out.npz")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return np.load(tmp / "out.npz")
    return run


def compare_levels(reference, cases):
    """cases: (w, dq, qp, qp_density, scan_order). Returns mismatches as readable strings."""
    out = reference([(w, (0, dq, qp, dens, so)) for w, dq, qp, dens, so in cases])
    mismatches = []
    for i, (w, dq, qp, dens, so) in enumerate(cases):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", q.QuantizationWarning)
            if dq:
                n, qp_used = q.quantize_dq(w, qp, dens, scan_order=so)
            else:
                n, qp_used = q.quantize_uniform(w, qp, dens)
        ref_n = out["n%d" % i]
        if qp_used != int(out["qp%d" % i]) or not (n == ref_n).all():
            mismatches.append("case %d %s dq=%d qp=%d density=%d scan=%d: qp %d vs %d, %d levels differ"
                              % (i, w.shape, dq, qp, dens, so, qp_used, int(out["qp%d" % i]), (n != ref_n).sum()))
    return mismatches


def test_levels_equal_nncodec_random(reference):
    r = rng(2024)
    shapes = [(64, 37), (40, 24), (300,), (16, 8, 3, 3), (150, 90), (7, 129), (1, 50), (50, 1)]
    cases = []
    for i in range(32):
        shape = shapes[i % len(shapes)]
        w = (r.standard_normal(shape) * 10 ** r.uniform(-3, 0)).astype(np.float32)
        if i % 5 == 0:
            w[r.random(shape) < 0.5] = 0
        density = int(r.integers(0, 4))
        lo, hi = q.qp_range(density)
        qp = min(max(int(r.integers(-50, -10)), lo), hi)
        scan = int(r.integers(0, 4)) if len(shape) > 1 else 0
        cases.append((w, i % 2, qp, density, scan))
    # exact ties of the rounding, and the int32 overflow guard
    step = q.step_size(-32, 2)
    ties = (np.arange(-40, 40).reshape(8, 10) + 0.5) * step
    cases += [(ties.astype(np.float32), 0, -32, 2, 0), (ties.astype(np.float32), 1, -32, 2, 0)]
    big = weights(3, (20, 20), scale=1e7)
    cases += [(big, 0, -32, 2, 0), (big, 1, -32, 2, 0), (big, 1, -38, 2, 1)]
    assert compare_levels(reference, cases) == []


def test_levels_equal_nncodec_silero(reference, conformance_dir):
    import nnc_edge
    tensors = nnc_edge.decode(str(conformance_dir / "p1_real_silero_vad.nnc"))
    cases = []
    for name in ("conv1.weight", "conv2.bias", "lstm_cell.weight_ih", "final_conv.weight", "stft_conv.weight"):
        w = tensors[name]
        for dq, qp, scan in ((1, -38, 0), (0, -33, 0), (1, -27, 1), (0, -41, 2)):
            cases.append((w, dq, q.tensor_qp(w.shape, qp, 2), 2, scan if w.ndim > 1 else 0))
    assert compare_levels(reference, cases) == []


def test_bitdepth_qp_equals_nncodec(reference):
    r = rng(77)
    cases = []
    for i in range(12):
        w = (r.laplace(size=(int(r.integers(1, 60)), 17)) * 10 ** r.uniform(-4, 1)).astype(np.float32)
        if i % 3 == 0:
            w = np.abs(w)
        cases.append((w, (1, [2, 4, 8, 16][i % 4], 0, i % 4, 0)))
    out = reference(cases)
    for i, (w, (_, bw, _, density, _)) in enumerate(cases):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", q.QuantizationWarning)
            assert q.bitdepth_qp(w, bw, density)[0] == int(out["qp%d" % i]), i


def test_codebook_egk_equals_nncodec(reference):
    r = rng(31)
    cases = []
    for i in range(10):
        size = int(r.integers(2, 60))
        book = (np.cumsum(r.integers(1, 10 ** int(r.integers(1, 4)), size)) - 100).astype(np.int32)
        cases.append((book, (2, int(r.integers(0, size)), 0, 0, 0)))
    out = reference(cases)
    for i, (book, (_, zero, _, _, _)) in enumerate(cases):
        egk, bits = out["qp%d" % i]
        assert q.best_codebook_egk(book, zero) == egk
        assert q.integer_codebook_bits(book, zero, int(egk)) == bits


def test_round_levels_accepts_zero_dimensional_tensors():
    from nnc_edge.encoder.quantize import _round_levels
    w = np.float32(0.75)
    out = _round_levels(w, -8, 2)  # step 2^-2: 0.75 / 0.25 = 3
    assert out.shape == () and float(out) == 3.0
    np.testing.assert_array_equal(_round_levels(np.array([0.375, -0.375], np.float32), -8, 2), [2.0, -2.0])
