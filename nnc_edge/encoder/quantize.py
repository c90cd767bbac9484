"""The host encoder's quantizers: float tensors to the integer QuantParam arrays of 7.3.6.

The mirror of the dequantizer in decoder_core.payload: whatever is returned here reconstructs, through
our decoder, to ``QuantParam * stepSize`` (or ``Codebook[QuantParam + CbZeroOffset] * stepSize``).

* step size and qp: ``step_size`` (reused from the decoder), ``qp_range``, ``check_qp``,
  ``qp_from_step_size``, ``overflow_safe_qp``;
* uniform quantization (dq_flag 0): ``quantize_uniform``;
* dependent quantization (dq_flag 1), the 8-state trellis over the scan order, optionally with a rate
  term: ``quantize_dq``;
* codebook quantization: ``integer_codebook`` / ``quantize_codebook``, ``integer_codebook_bits``;
* integer-aligned bit depth: ``bitdepth_qp``;
* the per-tensor policy (weights, 1-D tensors, integer tensors): ``tensor_qp`` and ``quantize_tensor``,
  which returns a ``QuantizedTensor`` ready for the entropy coder and the unit writer.

With the default options the levels equal NNCodec 2.1.3's (supplement 5.2, 5.4, 5.5) on the same
float32 input; where NNCodec's encoder writes streams that do not decode to what it intended
(DQ with block scan and row skipping, DQ with bit-depth clipping, qp_value wrapping) we deviate so
that decoding reproduces our levels exactly.
"""

import math
import sys
import warnings

import numpy as np

from decoder_core.errors import NNCError
from decoder_core.payload import step_size
from decoder_core.tables import NNR_PT_FLOAT, NNR_PT_INT, StateTransTab
from decoder_core.units import MAX_LIST_ENTRIES

try:
    from . import _trellis as _trellis_ext
except ImportError:  # the Cython speed-up is optional (setup.py builds it when it can)
    _trellis_ext = None

__all__ = [
    "QuantizationWarning", "QuantizedTensor", "step_size", "qp_range", "check_qp", "qp_from_step_size",
    "overflow_safe_qp", "tensor_qp", "scan_positions", "quantize_uniform", "quantize_dq", "bitdepth_qp",
    "integer_codebook", "quantize_codebook", "integer_codebook_bits", "best_codebook_egk",
    "estimate_level_bits", "quantize_tensor", "trellis_backend", "dq_lambda",
    "DEFAULT_QP", "DEFAULT_QP_DENSITY", "DEFAULT_NONWEIGHT_QP",
]

DEFAULT_QP = -32            # nncodec.tensor / nncodec.nn (nnc.compress uses -38)
DEFAULT_QP_DENSITY = 2
DEFAULT_NONWEIGHT_QP = -75  # NNCodec's nonweight_qp, meant for qp_density 2
DEFAULT_UNARY_LENGTH_MINUS1 = 10

_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1
# NNCodec's per-element overflow checks on round(w / stepSize) (Quant.cpp, with its int wrap-around):
# [-2^31, 2^31 - 1] for uniform quantization and [-(2^31 - 2), 2^31 - 3] for the trellis.
_URQ_LIMITS = (-(1 << 31), (1 << 31) - 1)
_TCQ_LIMITS = (-((1 << 31) - 2), (1 << 31) - 3)

# The trellis (supplement 5.2). The candidates of one element are its four consecutive multiples
# m0..m0+3 of stepSize, stored at slot (multiple & 3), and zero at slot 4. _BRANCHES[c] lists the
# branches into state c as (previous state, slot), in the order NNCodec tries them (ties keep the
# first), derived from StateTransTab: from state s, quantizer s & 1 and coded-level parity t lead to
# StateTransTab[s][t]; Q0 uses slot 0 (t = 0) / 2 (t = 1), Q1 slot 3 / 1, and zero is a t = 0 branch.
def _branches():
    into = [[] for _ in range(8)]
    for prev in range(8):
        quantizer = prev & 1
        into[StateTransTab[prev][0]] += [(prev, 3 * quantizer), (prev, 4)]
        into[StateTransTab[prev][1]].append((prev, 2 - quantizer))
    return tuple(tuple(b) for b in into)


_BRANCHES = _branches()
_UNREACHED = 0.5 * sys.float_info.max   # NNCodec's initial cost of every state but 0
_NO_LIMIT = 1 << 31


class QuantizationWarning(UserWarning):
    """A quantization parameter was changed (clipped into the qp_value range, raised against overflow)."""


def _warn(message):
    warnings.warn(message, QuantizationWarning, stacklevel=3)


def _label(name):
    return " for '%s'" % name if name else ""


# --- step size and qp ------------------------------------------------------------------------------
def qp_range(qp_density, quantization_parameter=0):
    """The qp values that can be signalled: qp_value = qp - QuantizationParameter is iae(6 + QpDensity)
    (7.3.6), so qp lies in QuantizationParameter + [-2^(5+QpDensity), 2^(5+QpDensity) - 1]."""
    half = 1 << (5 + qp_density)
    return quantization_parameter - half, quantization_parameter + half - 1


def check_qp(qp, qp_density, quantization_parameter=0, clip=False, name=None):
    """Return qp as int if its qp_value fits iae(6 + QpDensity).

    Out of range it raises NNCError, or with ``clip`` clips it and issues a QuantizationWarning
    (NNCodec silently keeps only the low bits, supplement 4.1).
    """
    if not 0 <= qp_density <= 7:
        raise NNCError("qp_density %r outside 0..7 (u(3))" % (qp_density,), None, "qp_density")
    if qp is None or not float(qp).is_integer():
        raise NNCError("qp %r%s is not an integer" % (qp, _label(name)), None, "qp_value")
    qp = int(qp)
    lo, hi = qp_range(qp_density, quantization_parameter)
    if lo <= qp <= hi:
        return qp
    if not clip:
        raise NNCError("qp %d%s outside [%d, %d]: qp_value = qp - %d must fit iae(%d); use a larger qp_density"
                       % (qp, _label(name), lo, hi, quantization_parameter, 6 + qp_density), None, "qp_value")
    clipped = min(max(qp, lo), hi)
    _warn("qp %d%s clipped to %d: qp_value must fit iae(%d) with qp_density %d"
          % (qp, _label(name), clipped, 6 + qp_density, qp_density))
    return clipped


def qp_from_step_size(step, qp_density):
    """The (real) qp whose step size is ``step``: the inverse of step_size(), as NNCodec's
    get_qp_from_stepsize. Round it for a qp near ``step``."""
    k = 1 << qp_density
    base = math.floor(math.log2(step)) * k
    return base + (step * k / 2.0 ** (base / k) - k)


def _step32(qp, qp_density):
    """float32(stepSize) and float32(1 / stepSize) as NNCodec's quantLayer computes them."""
    step = np.float32(step_size(qp, qp_density))
    if not np.isfinite(step) or step <= 0:
        raise NNCError("step size of qp %d with qp_density %d is not a positive float32" % (qp, qp_density),
                       None, "qp_value")
    return step, np.float32(1.0) / step


def _round_levels(w32, qp, qp_density):
    """round half away from zero of float32(1 / stepSize) * w in float32 (NNCodec's quantizeURQ).

    Returned as float32 integers; every step is exact in float32 (x - trunc(x) and trunc(x) +- 1
    below 2^24, no fraction above)."""
    _, scale = _step32(qp, qp_density)
    with np.errstate(over="ignore", invalid="ignore"):  # an infinite product fails the int32 check
        prod = np.atleast_1d(w32 * scale)  # a 0-d tensor's product is a numpy scalar
        rounded = np.trunc(prod)
        away = np.abs(prod - rounded) >= 0.5
        rounded[away] += np.sign(prod[away])
    return rounded.reshape(np.shape(w32))


def _in_limits(rounded, limits):
    return rounded.size == 0 or (float(rounded.max()) <= limits[1] and float(rounded.min()) >= limits[0])


def _fits(w32, qp, qp_density, limits):
    return _in_limits(_round_levels(w32, qp, qp_density), limits)


def overflow_safe_qp(w, qp, qp_density, dq=False, quantization_parameter=0, name=None):
    """qp, raised as NNCodec does when round(w / stepSize) would not fit int32 (supplement 5.2).

    Returns qp unchanged when the levels fit. Otherwise NNCodec's formula gives the new qp (a
    QuantizationWarning says so); if even the largest qp that can be signalled does not help, NNCError.
    """
    w32 = _as_float32(w, name)
    limits = _TCQ_LIMITS if dq else _URQ_LIMITS
    if _fits(w32, qp, qp_density, limits):
        return qp
    k = 1 << qp_density
    max_abs = np.float32(np.abs(w32).max())
    min_step = float(max_abs) / float((1 << 31) - 3)
    base = np.float32(math.floor(math.log2(min_step)) * k)
    new_qp = int(math.ceil(np.float32(float(base) + (min_step * k / 2.0 ** (float(base) / k) - k))))
    hi = qp_range(qp_density, quantization_parameter)[1]
    new_qp = max(new_qp, qp)
    while not _fits(w32, new_qp, qp_density, limits):  # NNCodec gives up here; a larger step fits in the end
        new_qp += 1
        if new_qp > hi:
            break
    if new_qp > hi:
        raise NNCError("values up to %g%s cannot be quantized to int32 levels with any qp up to %d (qp_density %d)"
                       % (float(max_abs), _label(name), hi, qp_density), None, "qp_value")
    _warn("qp%s raised from %d to %d so that the levels fit int32" % (_label(name), qp, new_qp))
    return new_qp


def tensor_qp(shape, qp=DEFAULT_QP, qp_density=DEFAULT_QP_DENSITY, nonweight_qp="default"):
    """The per-tensor qp policy of NNCodec (supplement 5.2).

    Weights (more than one dimension) use ``qp``. 1-D (and 0-d) tensors such as biases and norms use
    the finer ``nonweight_qp``: by default NNCodec's -75 (for qp_density 2; for other densities the qp
    with the nearest step size), or ``qp - (2 << qp_density)`` (a quarter of the step) when None.
    """
    if len(shape) > 1:
        return qp
    if nonweight_qp is None:
        return qp - (2 << qp_density)
    if isinstance(nonweight_qp, str):
        if nonweight_qp != "default":
            raise ValueError("nonweight_qp must be an int, None or 'default', not %r" % (nonweight_qp,))
        if qp_density == DEFAULT_QP_DENSITY:
            return DEFAULT_NONWEIGHT_QP
        return int(round(qp_from_step_size(step_size(DEFAULT_NONWEIGHT_QP, DEFAULT_QP_DENSITY), qp_density)))
    return int(nonweight_qp)


# --- scan order --------------------------------------------------------------------------------------
def _matrix(shape):
    """The 2-D view of 3.1: h = dims[0] rows of w = Prod(dims[1..]) columns (0-d: one element)."""
    if len(shape) == 0:
        return 1, 1
    h = int(shape[0])
    count = int(np.prod(shape, dtype=np.int64))
    return h, (count // h if h else 0)


def scan_positions(shape, scan_order=0):
    """Flat (row-major) indices in the order quant_tensor() visits them (supplement 3.2)."""
    h, w = _matrix(shape)
    count = h * w
    if scan_order == 0 or len(shape) < 2 or h <= 1 or w <= 1:
        return np.arange(count, dtype=np.int64)  # block scan degenerates to raster order here (3.3)
    bs = 4 << scan_order
    index = np.arange(count, dtype=np.int64).reshape(h, w)
    full = (w // bs) * bs
    parts = []
    for by in range(0, h, bs):
        rows = index[by:by + bs]
        if full:
            parts.append(rows[:, :full].reshape(rows.shape[0], w // bs, bs).transpose(1, 0, 2).ravel())
        if full < w:
            parts.append(rows[:, full:].ravel())
    return np.concatenate(parts)


# --- uniform quantization ---------------------------------------------------------------------------
def _as_float32(w, name=None):
    w32 = np.asarray(w, dtype=np.float32)
    if w32.size and not np.isfinite(w32).all():
        raise NNCError("tensor%s has NaN or infinite values, which cannot be quantized" % _label(name), None,
                       "QuantParam")
    return w32


def quantize_uniform(w, qp, qp_density, level_range=None, name=None):
    """dq_flag 0: QuantParam = round(float32(1 / stepSize) * w), rounding half away from zero.

    Identical to NNCodec's quantizeURQ with lambda_scale 0 on the float32 values of ``w``.
    ``level_range`` (lo, hi) clips the levels (bit-depth mode). Returns (levels int32 of w's shape,
    qp); qp is raised when the levels would not fit int32.
    """
    w32 = _as_float32(w, name)
    levels = _round_levels(w32, qp, qp_density)
    if not _in_limits(levels, _URQ_LIMITS):
        qp = overflow_safe_qp(w32, qp, qp_density, dq=False, name=name)
        levels = _round_levels(w32, qp, qp_density)
    if level_range is not None:
        levels = np.clip(levels, level_range[0], level_range[1])
    return levels.astype(np.int32), qp


# --- dependent quantization -------------------------------------------------------------------------
def trellis_backend():
    """'cython' when the compiled trellis is available, else 'python'."""
    return "cython" if _trellis_ext is not None else "python"


def _skip_transition(w):
    """The state permutation of a skipped row segment: StateTransTab[.][0] applied w times (6.5)."""
    perm = list(range(8))
    for _ in range(w % 4):  # the parity-0 transitions form cycles of length 1, 2 and 4
        perm = [StateTransTab[s][0] for s in perm]
    return perm


class _RateModel:
    """Static bit estimates for the trellis' rate term, from the levels of an earlier pass.

    For the coded level k at DQ state s after a level of class nbClass (2.4): sig_flag costs
    sig[2 * (3 s + nbClass) + (k != 0)], a nonzero k adds sign[2 * nbClass + (k < 0)] and
    mag[(k < 0) * size + |k|] (abs_level_greater_x flags, exp-Golomb remainder). Each bin costs
    -log2 of its context's probability as counted over the earlier pass (a prior of half a count, kept
    within [1/256, 255/256]); the shift_parameter_ids() adaptation and the neighbour resets at entry
    points are left out.
    """

    def __init__(self, sig, sign, mag):
        self.sig = np.ascontiguousarray(sig, dtype=np.float64)
        self.sign = np.ascontiguousarray(sign, dtype=np.float64)
        self.mag = np.ascontiguousarray(mag, dtype=np.float64)

    @classmethod
    def from_levels(cls, n, states, max_level, unary_length):
        """From the reconstruction indices n of the coded items and the state before each."""
        n = n.astype(np.int64)
        s = states.astype(np.intp)
        k = (n + np.sign(n) * (s & 1)) >> 1
        nonzero = k != 0
        neg = k < 0
        cls_of = nonzero.astype(np.intp) + (nonzero & ~neg)   # nbClass of the next position
        nbc = np.empty_like(cls_of)
        nbc[0] = 0
        nbc[1:] = cls_of[:-1]
        counts = _bincount(2 * (3 * s + nbc) + nonzero, 48).reshape(24, 2)
        sig = _bin_bits(counts[:, 1], counts.sum(axis=1))
        counts = _bincount((2 * nbc + neg)[nonzero], 6).reshape(3, 2)
        sign = _bin_bits(counts[:, 1], counts.sum(axis=1))
        a = np.abs(k[nonzero])
        negative = neg[nonzero]
        size = int(min(max(max_level, unary_length + 2) + 1, 1 << 16))
        mag = np.zeros((2, size))
        levels = np.arange(size)
        # Gtx2Ctx[j]: coded while the exp-Golomb prefix has ones, one iff the prefix is longer than j
        at_least = _count_at_least(_eg_prefix_length(a[a > unary_length] - 1 - unary_length), 32)
        g2 = _bin_bits(at_least[1:32], at_least[0:31])
        for sgn_index in (0, 1):
            # GtxCtx[2j + sign]: coded for |k| > j, one iff |k| > j + 1
            at_least = _count_at_least(np.minimum(a[negative == bool(sgn_index)], unary_length + 1),
                                       unary_length + 2)
            gtx = _bin_bits(at_least[2:unary_length + 2], at_least[1:unary_length + 1])
            ones_cum = np.concatenate([[0.0], np.cumsum(gtx[:, 1])])
            small = np.minimum(levels, unary_length + 1)
            cost = ones_cum[np.maximum(small - 1, 0)]
            stop = (levels >= 1) & (levels <= unary_length)
            cost[stop] += gtx[levels[stop] - 1, 0]
            big = levels > unary_length
            m = _eg_prefix_length(levels[big] - 1 - unary_length)
            g2_cum = np.concatenate([[0.0], np.cumsum(g2[:, 1])])
            cost[big] += g2_cum[m] + np.where(m < 31, g2[np.minimum(m, 30), 0], 0.0) + m
            cost[0] = 0.0
            mag[sgn_index] = cost
        return cls(sig.reshape(-1), sign.reshape(-1), mag.reshape(-1))


def _bin_bits(ones, total):
    """(bits of a 0, bits of a 1) per context from counts, as an (n, 2) array."""
    ones = np.asarray(ones, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    p = np.clip((ones + 0.5) / (total + 1.0), 1.0 / 256, 255.0 / 256)
    return np.stack([-np.log2(1 - p), -np.log2(p)], axis=-1)


def _bincount(values, size):
    """np.bincount(values, minlength=size) of small non-negative integers. numpy < 2.2.4 refuses int64
    input where intp has 32 bits (armhf: no 'safe' cast), so every caller goes through here."""
    return np.bincount(np.asarray(values).astype(np.intp, copy=False), minlength=size)


def _count_at_least(values, size):
    """c[j] = number of values >= j, for j = 0 .. size - 1 (values in 0 .. size - 1)."""
    return np.cumsum(_bincount(values, size)[::-1])[::-1].astype(np.float64)


def _eg_prefix_length(r):
    """Floor(Log2(r + 1)): the number of ones of the order-0 exp-Golomb prefix of r (2.2), capped at 31."""
    _, exponent = np.frexp(np.asarray(r, dtype=np.float64) + 1.0)
    return np.minimum(exponent.astype(np.int64) - 1, 31)


_NO_RATE = _RateModel(np.zeros(48), np.zeros(6), np.zeros(4))


def _trellis_python(values, skip, skip_perm, lim_pos, lim_neg, lam=0.0, rate=_NO_RATE):
    """The pure-Python trellis, twin of _trellis.pyx's dq_trellis (identical results).

    ``values``: w / stepSize (float64) of the items in scan order; ``skip``: 1 for an item that stands
    for a skipped row segment (its value is ignored, the states move by ``skip_perm``); ``lim_pos`` /
    ``lim_neg``: the largest |n| allowed for positive / negative values; ``lam`` and ``rate``: the
    optional rate term (_RateModel). Returns (n, state before each item).
    """
    vals = values.tolist()
    skips = skip.tolist() if skip is not None else None
    lim_pos = int(lim_pos)
    lim_neg = int(lim_neg)
    sig_bits = rate.sig.tolist()
    sign_bits = rate.sign.tolist()
    mag_bits = rate.mag.tolist()
    mag_size = len(mag_bits) // 2
    log2 = math.log2
    count = len(vals)
    branches = _BRANCHES
    big = sys.float_info.max
    inf = float("inf")
    cost = [0.0] + [_UNREACHED] * 7
    nbc = [0] * 8
    decisions = [0] * count
    inverse = [0] * 8
    for s in range(8):
        inverse[skip_perm[s]] = s
    dist = [0.0] * 5
    mag = [0.0] * 4
    for i in range(count):
        if skips is not None and skips[i]:
            cost = [cost[inverse[c]] for c in range(8)]
            nbc = [nbc[inverse[c]] for c in range(8)]
            continue
        v = vals[i]
        neg = 1 if v < 0 else 0
        if neg:
            o = -v
            lim = lim_neg
        else:
            o = v
            lim = lim_pos
        m0 = int(o) - 1
        if m0 > lim - 3:
            m0 = lim - 3
        if m0 < 1:
            m0 = 1
        dist[4] = o * o
        for q in range(m0, m0 + 4):
            if q <= lim:
                d = o - q
                dist[q & 3] = d * d
            else:
                dist[q & 3] = inf
            if lam:
                a = (q + 1) >> 1
                if a < mag_size:
                    mag[q & 3] = mag_bits[neg * mag_size + a]
                else:
                    mag[q & 3] = mag_bits[neg * mag_size + mag_size - 1] + 2.0 * log2(a / (mag_size - 1))
        new = [0.0] * 8
        new_nbc = [0] * 8
        packed = 0
        for c in range(8):
            best = big
            choice = 0
            b = 0
            for prev, slot in branches[c]:
                x = cost[prev] + dist[slot]
                if lam:
                    ctx = 2 * (3 * prev + nbc[prev])
                    if slot == 4:
                        r = sig_bits[ctx]
                    else:
                        r = sig_bits[ctx + 1] + sign_bits[2 * nbc[prev] + neg] + mag[slot]
                    x = x + lam * r
                if x < best:
                    best = x
                    choice = b
                b += 1
            new[c] = best
            new_nbc[c] = 0 if branches[c][choice][1] == 4 else (1 if neg else 2)
            packed |= choice << (2 * c)
        cost = new
        nbc = new_nbc
        decisions[i] = packed
    state = 0
    for c in range(1, 8):
        if cost[c] < cost[state]:
            state = c
    out = np.zeros(count, dtype=np.int32)
    states = np.zeros(count, dtype=np.uint8)
    for i in range(count - 1, -1, -1):
        if skips is not None and skips[i]:
            state = inverse[state]
            states[i] = state
            continue
        prev, slot = branches[state][(decisions[i] >> (2 * state)) & 3]
        if slot != 4:
            v = vals[i]
            o = -v if v < 0 else v
            lim = lim_neg if v < 0 else lim_pos
            m0 = int(o) - 1
            if m0 > lim - 3:
                m0 = lim - 3
            if m0 < 1:
                m0 = 1
            q = m0 + ((slot - m0) & 3)
            out[i] = -q if v < 0 else q
        state = prev
        states[i] = state
    return out, states


class _TrellisRun:
    """One trellis configuration: level limits, rate term and backend."""

    def __init__(self, lim_pos, lim_neg, backend, lam=0.0, rate=_NO_RATE):
        self.lim_pos = lim_pos
        self.lim_neg = lim_neg
        self.backend = trellis_backend() if backend is None else backend
        if self.backend not in ("cython", "python"):
            raise ValueError("unknown trellis backend %r" % (backend,))
        if self.backend == "cython" and _trellis_ext is None:
            raise ImportError("nnc_edge.encoder._trellis is not built (install with Cython and a C compiler)")
        self.lam = lam
        self.rate = rate

    def __call__(self, values, skip=None, skip_perm=tuple(range(8))):
        values = np.ascontiguousarray(values, dtype=np.float64)
        if self.backend == "python":
            return _trellis_python(values, skip, skip_perm, self.lim_pos, self.lim_neg, self.lam, self.rate)
        count = values.shape[0]
        out = np.zeros(count, dtype=np.int32)
        states = np.zeros(count, dtype=np.uint8)
        decisions = np.empty(count, dtype=np.uint16)
        skip_arr = np.zeros(count, dtype=np.uint8) if skip is None else np.ascontiguousarray(skip, dtype=np.uint8)
        _trellis_ext.dq_trellis(values, skip_arr, np.asarray(skip_perm, dtype=np.int32), self.lim_pos, self.lim_neg,
                                out, decisions, states, float(self.lam), self.rate.sig, self.rate.sign,
                                self.rate.mag)
        return out, states


def dq_lambda(lambda_scale):
    """NNCodec's lambda for the trellis (Quant.cpp): lambda_scale * 4 * ln(2) / 6 * 0.7, in squared
    steps per bit."""
    return lambda_scale * 4.0 * (math.log(2.0) / 6.0) * 0.7


def quantize_dq(w, qp, qp_density, scan_order=0, row_skip=False, level_range=None, lambda_scale=0.0,
                rate_passes=2, cabac_unary_length_minus1=DEFAULT_UNARY_LENGTH_MINUS1, name=None, backend=None):
    """dq_flag 1: the 8-state trellis of supplement 5.2 over the scan order.

    Returns (n, qp): n int32 of w's shape is QuantParam after the DQ mapping (7.3.6 / supplement 4.2),
    chosen so that the decoder, tracking the states in the same scan order, reproduces it exactly.
    With ``lambda_scale`` 0 (NNCodec's default) the trellis minimizes distortion only and n equals
    NNCodec's quantLayer with dq_flag 1, except in two cases where NNCodec's own streams decode to
    other values:

    * ``row_skip`` with ``scan_order > 0``: the decoder moves the state by w transitions per skipped row
      segment (6.5). Set ``row_skip`` exactly when the entropy coder will signal row_skip_enabled_flag 1;
      the trellis then treats all-zero rows as skipped (rows that uniform quantization zeroes start
      out skipped; the set grows until the zero rows are stable).
    * ``level_range`` (lo, hi), the bit-depth limits: candidates outside it are excluded in the trellis
      instead of clipping n afterwards.

    With ``lambda_scale`` > 0 each branch also costs dq_lambda(lambda_scale) times its estimated bits
    (a static model of the DeepCABAC bins counted on the previous pass, _RateModel), over
    ``rate_passes`` passes after the distortion-only one. This is our rate-distortion optimization,
    not NNCodec's (which simulates its adaptive contexts per state).

    ``backend``: 'cython', 'python' or None (the compiled one when available); both give identical n.
    """
    w32 = _as_float32(w, name)
    shape = w32.shape
    qp = overflow_safe_qp(w32, qp, qp_density, dq=True, name=name)
    if w32.size == 0:
        return np.zeros(shape, dtype=np.int32), qp
    # NNCodec's PreQuant: org = (1.0 / qstep) * w in double, with qstep = float32(stepSize).
    step32, _ = _step32(qp, qp_density)
    h, width = _matrix(shape)
    raster = scan_order == 0 or len(shape) < 2 or h <= 1 or width <= 1
    order = None if raster else scan_positions(shape, scan_order)
    flat = w32.reshape(-1) if raster else w32.reshape(-1)[order]
    scaled = flat.astype(np.float64) * (1.0 / float(step32))
    lim_pos = lim_neg = _NO_LIMIT
    if level_range is not None:
        lo, hi = int(level_range[0]), int(level_range[1])
        if lo > 0 or hi < 0:
            raise ValueError("level_range %r must contain 0" % (level_range,))
        lim_pos, lim_neg = hi, -lo
    run = _TrellisRun(lim_pos, lim_neg, backend)
    n_scan, states = run(scaled)
    if lambda_scale:
        if lambda_scale < 0:
            raise ValueError("lambda_scale must not be negative")
        max_level = (min(float(np.abs(scaled).max()), float(_NO_LIMIT)) + 5) // 2
        unary = cabac_unary_length_minus1 + 1
        for _ in range(rate_passes):
            rate = _RateModel.from_levels(n_scan, states, max_level, unary)
            run = _TrellisRun(lim_pos, lim_neg, backend, dq_lambda(lambda_scale), rate)
            n_scan, states = run(scaled)
    if raster:
        return n_scan.reshape(shape), qp
    bw = 4 << scan_order
    if row_skip and width > bw and width % 4:
        # Segments of a skipped row move the state StateTransTab[.][0]^w, not ^length (6.5).
        n_scan = _dq_row_skip(scaled, n_scan, order, h, width, bw, run)
    n = np.empty(w32.size, dtype=np.int32)
    n[order] = n_scan
    return n.reshape(shape), qp


def _dq_row_skip(scaled, n_scan, order, h, width, bw, run):
    rows = order // width
    seg_start = (order % width) % bw == 0
    perm = _skip_transition(width)
    # Rows that uniform quantization zeroes start out skipped: zero is the nearest value of every
    # element there, and a skipped row costs one flag.
    skipped = np.ones(h, dtype=bool)
    skipped[rows[np.abs(scaled) >= 0.5]] = False
    first = True
    while True:
        zero = np.ones(h, dtype=bool)
        zero[rows[n_scan != 0]] = False
        new = zero & ~skipped
        if not new.any() and not (first and skipped.any()):
            return n_scan
        first = False
        skipped |= zero
        in_skipped = skipped[rows]
        items = ~in_skipped | seg_start         # coded positions, plus one item per skipped segment
        item_skip = (in_skipped & seg_start)[items]
        n_items, _ = run(scaled[items], item_skip.astype(np.uint8), perm)
        n_scan = np.zeros_like(n_scan)
        n_scan[~in_skipped] = n_items[~item_skip]


# --- integer-aligned bit depth ------------------------------------------------------------------------
def bitdepth_qp(w, bitdepth, qp_density=DEFAULT_QP_DENSITY, is_weight=True, quantization_parameter=0, name=None):
    """Integer-aligned bit-depth mode (supplement 5.5): (qp, (lo, hi) level range) for one tensor.

    The step maps the 99.95th percentile of |w| to the largest level of a ``bitdepth``-bit integer,
    unsigned ([0, 2^bw - 1]) when w has no negative values. Non-weight tensors get at least 8 bits.
    The qp is clipped into the signalled range (with a QuantizationWarning) and rounded, as NNCodec.
    Nothing of this is signalled: the caller clips the levels to the returned range.
    """
    bitdepth = int(bitdepth)
    if not 1 <= bitdepth <= 31:
        raise ValueError("bitdepth %d outside 1..31" % bitdepth)
    bw = bitdepth if (bitdepth > 7 or is_weight) else 8
    w32 = _as_float32(w, name)
    unsigned = not bool((w32 < 0).any())
    if unsigned:
        lo, hi = 0, (1 << bw) - 1
    else:
        lo, hi = -(1 << (bw - 1)), (1 << (bw - 1)) - 1
    qlo, qhi = qp_range(qp_density, quantization_parameter)
    absw = np.abs(w32).astype(np.float64).reshape(-1)
    if absw.size == 0 or not absw.any():
        return min(max(0, qlo), qhi), (lo, hi)  # NNCodec uses qp 0 for all-zero tensors
    denom = max(hi, 1)  # 2^bw - 1 or 2^(bw-1) - 1; a signed 1-bit tensor still needs a step
    step = float(np.percentile(absw, 99.95)) / denom
    if step == 0:
        step = float(absw.max()) / denom
    qp = qp_from_step_size(step, qp_density)
    if qp < qlo or qp > qhi:
        clipped = min(max(qp, qlo), qhi)
        _warn("bit-depth qp %.2f%s clipped to %d" % (qp, _label(name), clipped))
        qp = clipped
    return int(np.round(qp)), (lo, hi)


# --- codebook -----------------------------------------------------------------------------------------
def _ue_bits(k, values):
    """Bits of ue(k) (6.1.3) for non-negative integer values (numpy array): 2p + k + 1 with p the
    number of prefix zeros, p = bit_length(v + 2^k) - 1 - k."""
    v = np.asarray(values, dtype=np.float64) + float(1 << k)   # exact below 2^53
    _, exponent = np.frexp(v)
    p = exponent.astype(np.int64) - 1 - k
    return 2 * p + k + 1


def _ie_bits(k, value):
    value = int(value)
    mapped = 2 * value - 1 if value > 0 else -2 * value
    return int(_ue_bits(k, [mapped])[0])


def integer_codebook_bits(codebook, cb_zero_offset, codebook_egk):
    """Exact size in bits of integer_codebook() (6.3.3.7): codebook_egk u(4), codebook_size ue(2),
    codebook_centre_offset ie(2), codebook_zero_value ie(7), deltas ue(codebook_egk)."""
    cb = np.asarray(codebook, dtype=np.int64)
    size = cb.shape[0]
    bits = 4 + int(_ue_bits(2, [size])[0]) + _ie_bits(2, cb_zero_offset - (size >> 1)) + _ie_bits(7, cb[cb_zero_offset])
    if size > 1:
        deltas = np.diff(cb) - 1
        bits += int(_ue_bits(codebook_egk, deltas).sum())
    return bits


def best_codebook_egk(codebook, cb_zero_offset):
    """The codebook_egk in 0..15 with the smallest integer_codebook(); the smallest on ties (as NNCodec)."""
    sizes = [integer_codebook_bits(codebook, cb_zero_offset, egk) for egk in range(16)]
    return int(np.argmin(sizes))


def _binary_entropy_bits(ones, total):
    """total * H(ones / total), with the probability kept within [1/128, 127/128]: an adaptive context
    never becomes certain, so even a constant bin costs about 0.01 bit."""
    ones = np.asarray(ones, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    p = np.clip(ones / np.maximum(total, 1), 1.0 / 128, 127.0 / 128)
    h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return float((total * h).sum())


def estimate_level_bits(levels, cabac_unary_length_minus1=DEFAULT_UNARY_LENGTH_MINUS1):
    """A quick estimate of the DeepCABAC size of integer levels, in bits.

    Each context-coded bin of the binarization of 2.2 (sig_flag, sign_flag, abs_level_greater_x[j])
    is charged its empirical binary entropy, as an ideally adapted context would cost, ignoring the
    neighbour and state contexts; the exp-Golomb remainder costs 2 floor(log2(r + 1)) + 1 bits.
    """
    values, counts = np.unique(np.asarray(levels).reshape(-1), return_counts=True)
    return _histogram_bits(values.astype(np.int64), counts, cabac_unary_length_minus1 + 1)


def _histogram_bits(values, counts, unary_length):
    mags = np.abs(values)
    total = counts.sum()
    nonzero = counts[mags > 0].sum()
    bits = _binary_entropy_bits(nonzero, total)
    bits += _binary_entropy_bits(counts[values < 0].sum(), nonzero)
    # abs_level_greater_x[j - 1], j = 1..N: coded for |v| >= j, one iff |v| > j
    top = min(int(mags.max()), unary_length) if mags.size else 0
    at_least = np.array([counts[mags >= j].sum() for j in range(1, top + 1)])
    greater = np.array([counts[mags > j].sum() for j in range(1, top + 1)])
    bits += _binary_entropy_bits(greater, at_least)
    rem = mags[mags > unary_length] - unary_length - 1
    if rem.size:
        bits += float((counts[mags > unary_length] * (2 * np.floor(np.log2(rem + 1.0)) + 1)).sum())
    return bits


def integer_codebook(levels, estimate_bits=None, candidates=None,
                     cabac_unary_length_minus1=DEFAULT_UNARY_LENGTH_MINUS1):
    """Codebook quantization of integer levels (supplement 5.4).

    Codebook is the sorted set of distinct levels; QuantParam = index - CbZeroOffset. CbZeroOffset is
    the candidate with the fewest estimated bits: ``estimate_bits(qparams, codebook_size, cb_zero_offset)``
    when given (e.g. the entropy coder's cost estimate), else estimate_level_bits(). ``candidates``
    defaults to every index for codebooks of up to 64 entries, else the 32 most frequent indices and
    the index of level 0 (pass range(size) to try all, as NNCodec). codebook_egk minimizes
    integer_codebook(). Returns (qparams int32 of the levels' shape, Codebook list, CbZeroOffset,
    codebook_egk).
    """
    levels = np.asarray(levels)
    if levels.size == 0:
        return np.zeros(levels.shape, dtype=np.int32), [0], 0, 0
    codebook, index = np.unique(levels.reshape(-1), return_inverse=True)
    size = codebook.shape[0]
    if size > MAX_LIST_ENTRIES:
        raise NNCError("codebook of %d entries exceeds the decoder's limit of %d" % (size, MAX_LIST_ENTRIES),
                       None, "codebook_size")
    counts = _bincount(index, size)
    if candidates is None:
        if size <= 64:
            candidates = range(size)
        else:
            candidates = set(np.argsort(-counts, kind="stable")[:32].tolist())
            candidates.update(np.flatnonzero(codebook == 0).tolist())
            candidates = sorted(candidates)
    unary = cabac_unary_length_minus1 + 1
    best = None
    for c in candidates:
        c = int(c)
        if not 0 <= c < size:
            raise ValueError("CbZeroOffset candidate %d outside 0..%d" % (c, size - 1))
        if estimate_bits is None:
            bits = _histogram_bits(np.arange(size, dtype=np.int64) - c, counts, unary)
        else:
            bits = estimate_bits((index - c).astype(np.int32).reshape(levels.shape), size, c)
        if best is None or bits < best[0]:
            best = (bits, c)
    zero_offset = best[1]
    book = [int(v) for v in codebook]
    qparams = (index - zero_offset).astype(np.int32).reshape(levels.shape)
    return qparams, book, zero_offset, best_codebook_egk(book, zero_offset)


def quantize_codebook(w, qp, qp_density, dq=False, level_range=None, estimate_bits=None, candidates=None,
                      cabac_unary_length_minus1=DEFAULT_UNARY_LENGTH_MINUS1, name=None):
    """Uniform levels (without DQ; with ``dq`` requested, qp is first lowered by 2^QpDensity as NNCodec
    does for a similar quality) turned into a codebook. Returns (qparams, Codebook, CbZeroOffset,
    codebook_egk, qp). The tensor is sent with dq_flag 0."""
    if dq:
        qp -= 1 << qp_density
    levels, qp = quantize_uniform(w, qp, qp_density, level_range=level_range, name=name)
    qparams, book, zero_offset, egk = integer_codebook(levels, estimate_bits, candidates, cabac_unary_length_minus1)
    return qparams, book, zero_offset, egk, qp


# --- the per-tensor policy ------------------------------------------------------------------------------
class QuantizedTensor:
    """One quantized tensor, as the entropy coder and the unit writer need it.

    ``levels``: int32 QuantParam of the tensor's shape (n after the DQ mapping; index - CbZeroOffset
    with a codebook; the values themselves for NNR_PT_INT). ``qp`` is the full qp (qp_value +
    QuantizationParameter), None for NNR_PT_INT.
    """

    def __init__(self, levels, payload_type, qp=None, qp_density=None, dq_flag=0, scan_order=0, codebook=None,
                 cb_zero_offset=0, codebook_egk=0, level_range=None):
        self.levels = levels
        self.payload_type = payload_type
        self.qp = qp
        self.qp_density = qp_density
        self.dq_flag = dq_flag
        self.scan_order = scan_order
        self.codebook = codebook
        self.cb_zero_offset = cb_zero_offset
        self.codebook_egk = codebook_egk
        self.level_range = level_range

    @property
    def shape(self):
        return self.levels.shape

    def step_size(self):
        return None if self.qp is None else step_size(self.qp, self.qp_density)

    def reconstruct(self):
        """The decoder's output (7.3.6, supplement 4.3), bit-exact: float32, or int32 for NNR_PT_INT."""
        if self.payload_type == NNR_PT_INT:
            return self.levels.astype(np.int32)
        step = self.step_size()
        if self.codebook is not None:
            scaled = np.asarray(self.codebook, dtype=np.float64) * step
            return scaled[self.levels.astype(np.int64) + self.cb_zero_offset].astype(np.float32)
        return self.levels.astype(np.float32) * np.float32(step)

    def __repr__(self):
        kind = "NNR_PT_INT" if self.payload_type == NNR_PT_INT else (
            "codebook(%d)" % len(self.codebook) if self.codebook is not None else ("dq" if self.dq_flag else "uniform"))
        return "QuantizedTensor(%s, shape=%s, qp=%s)" % (kind, self.levels.shape, self.qp)


def quantize_tensor(array, qp=DEFAULT_QP, qp_density=DEFAULT_QP_DENSITY, dq=True, nonweight_qp="default",
                    method="uniform", bitdepth=None, scan_order=0, row_skip=False, quantization_parameter=0,
                    clip_qp=False, lambda_scale=0.0, estimate_bits=None,
                    cabac_unary_length_minus1=DEFAULT_UNARY_LENGTH_MINUS1, name=None, backend=None):
    """Quantize one tensor with NNCodec's per-tensor policy.

    * integer dtypes: NNR_PT_INT, not quantized (the values must fit int32);
    * floats: the qp of tensor_qp() (``qp`` for weights, ``nonweight_qp`` for 1-D tensors), or with
      ``bitdepth`` the integer-aligned qp of bitdepth_qp() and clipped levels;
    * ``method`` 'uniform' (with ``dq`` the trellis, rate-aware with ``lambda_scale`` > 0) or 'codebook'
      (always dq_flag 0);
    * ``scan_order`` applies to tensors with more than one dimension, h > 1 and w > 1 (others use 0);
      ``row_skip`` must say whether the entropy coder will signal row skipping (see quantize_dq).

    A qp outside the range of qp_value raises NNCError, or is clipped with a warning with ``clip_qp``.
    """
    arr = np.asarray(array)
    if arr.dtype.kind in "iub":
        if arr.size and (arr.min() < _INT32_MIN or arr.max() > _INT32_MAX):
            raise NNCError("integer tensor%s has values outside int32" % _label(name), None, "QuantParam")
        return QuantizedTensor(arr.astype(np.int32), NNR_PT_INT)
    if arr.dtype.kind != "f":
        raise TypeError("cannot quantize a tensor of dtype %s%s" % (arr.dtype, _label(name)))
    if method not in ("uniform", "codebook"):
        raise ValueError("method must be 'uniform' or 'codebook', not %r" % (method,))
    h, width = _matrix(arr.shape)
    if len(arr.shape) < 2 or h <= 1 or width <= 1:
        scan_order = 0  # 3.3: NNCodec cannot write these with a block scan
    level_range = None
    if bitdepth:
        tqp, level_range = bitdepth_qp(arr, bitdepth, qp_density, is_weight=arr.ndim > 1,
                                       quantization_parameter=quantization_parameter, name=name)
    else:
        tqp = check_qp(tensor_qp(arr.shape, qp, qp_density, nonweight_qp), qp_density, quantization_parameter,
                       clip_qp, name)
    if method == "codebook":
        if dq:  # 5.4: a codebook is sent without DQ, at the finer qp of similar quality
            tqp = check_qp(tqp - (1 << qp_density), qp_density, quantization_parameter, clip_qp, name)
        qparams, book, zero_offset, egk, tqp = quantize_codebook(
            arr, tqp, qp_density, False, level_range, estimate_bits, None, cabac_unary_length_minus1, name)
        tqp = check_qp(tqp, qp_density, quantization_parameter, name=name)  # after the overflow guard
        return QuantizedTensor(qparams, NNR_PT_FLOAT, tqp, qp_density, 0, scan_order, book, zero_offset, egk,
                               level_range)
    if dq:
        levels, tqp = quantize_dq(arr, tqp, qp_density, scan_order=scan_order, row_skip=row_skip,
                                  level_range=level_range, lambda_scale=lambda_scale,
                                  cabac_unary_length_minus1=cabac_unary_length_minus1, name=name, backend=backend)
    else:
        levels, tqp = quantize_uniform(arr, tqp, qp_density, level_range, name)
    tqp = check_qp(tqp, qp_density, quantization_parameter, name=name)
    return QuantizedTensor(levels, NNR_PT_FLOAT, tqp, qp_density, 1 if dq else 0, scan_order,
                           level_range=level_range)
