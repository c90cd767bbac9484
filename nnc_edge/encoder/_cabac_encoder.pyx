# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled twin of nnc_edge.encoder.cabac_encoder.encode_tensor_levels(): the same bins in the same order,
so both give byte-identical segments (tests/test_encoding.py checks it).

The Python ArithmeticEncoder's registers (out, low, nbits, range, t) are read before and written
back after, so the engine state carries over between the tensors of one segment and into finish().
The profile-1 start bins, the pseudo pass of the parameter optimizer (supplement 5.3: nine shadow
estimators per context, costs from EstBits) and quant_tensor() run in C without the GIL, so several
NDUs can be coded on threads at once.

encode_tensor_levels() returns None for what it leaves to the Python path (empty tensors, one-entry
codebooks, levels that are not plain integers), before touching the engine.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy

import numpy as np


ctypedef struct Ctx:
    int32_t s0       # pStateIdx0
    int32_t s1       # pStateIdx1
    int32_t sh0      # shift0 + 4
    int32_t sh1      # shift1


ctypedef struct Enc:
    uint8_t* out
    Py_ssize_t n        # bytes written
    Py_ssize_t cap
    uint64_t low        # the lowest nbits bits of the lower bound (cabac_encoder.ArithmeticEncoder)
    int nbits
    uint32_t rng
    int64_t t           # renormalization shifts so far
    int no_memory


ctypedef struct Est9:
    int32_t s0[9]       # the nine shadow estimators of one context, setId 0..8 (supplement 5.3)
    int32_t s1[9]
    int64_t cost[9]     # accumulated EstBits


ctypedef struct Shadow:
    Est9* est           # one per context


cdef enum:
    E_OK = 0
    E_ODD = 1           # odd n where the DQ state reconstructs even multiples
    E_EVEN = 2          # even n where it reconstructs odd multiples
    E_SIGN = 3          # wrong sign for a codebook whose sign is inferred (6.8)
    E_RANGE = 4         # outside the codebook
    E_TOO_LARGE = 5     # the remainder does not fit its exp-Golomb prefix
    E_NO_MEMORY = 6


ctypedef struct Layout:
    int sig, sig_tca, sig_hdsp, sign, sign_tca, gtx, gtx_tca, gtx2, total


ctypedef struct Pass:
    const int32_t* levels
    const int32_t* base         # NULL without TCA
    const uint8_t* hist         # NULL without HDSP history
    const uint8_t* row_skip     # NULL without row skipping
    Py_ssize_t h, w, bh, bw
    int dq, N, cb, S, Z, sign_coded, use_eps, pseudo
    int skip_trans[8]
    Layout lay
    Ctx* ctx
    const Ctx* image            # the contexts after shift_parameter_ids(), restored at entry points
    Shadow sh
    int64_t* mark_t             # real pass: (t, low & 511, state) at each later block row
    int32_t* mark_low
    int32_t* mark_state
    Py_ssize_t marks
    int err
    Py_ssize_t err_pos
    int64_t err_level
    int err_state


cdef uint8_t RLPS[256]
cdef uint8_t RENORM[256]
cdef int32_t CURVE[32]
cdef uint8_t TRANS[16]
cdef int32_t CTXP[36]
cdef int32_t EST0[1024]         # EstBits[512 + i][0], i = -512..511
cdef int32_t EST1[1024]
cdef bint _ready = False
_py = None                      # nnc_edge.encoder.cabac_encoder, imported on first use (it imports this module)


cdef _init():
    global _ready, _py
    from . import cabac_encoder as ce
    from decoder_core.deepcabac import _RENORM
    from decoder_core.tables import CtxParameterList, CurveTab, RangeTabLps, StateTransTab
    cdef int i, j
    for i in range(256):
        RLPS[i] = RangeTabLps[i]
        RENORM[i] = _RENORM[i]
    for i in range(32):
        CURVE[i] = CurveTab[i]
    for i in range(8):
        TRANS[2 * i] = StateTransTab[i][0]
        TRANS[2 * i + 1] = StateTransTab[i][1]
    for i in range(9):
        for j in range(4):
            CTXP[4 * i + j] = CtxParameterList[i][j]
        if SHIFT0[i] != CtxParameterList[i][0] + 4 or SHIFT1[i] != CtxParameterList[i][1]:
            raise RuntimeError("nnc_edge.encoder._cabac_encoder: compiled-in shifts differ from CtxParameterList")
    for i in range(-512, 512):
        # ce._EST0[i] for negative i, without relying on wraparound (off in this module)
        EST0[512 + i] = ce._EST0[i & 1023]
        EST1[512 + i] = ce._EST1[i & 1023]
    _py = ce
    _ready = True


# --- the engine (cabac_encoder.ArithmeticEncoder) ----------------------------------------------------
cdef inline void put_byte(Enc* e, uint32_t v) noexcept nogil:
    cdef uint8_t* grown
    if e.n == e.cap:
        grown = <uint8_t*>realloc(e.out, 2 * e.cap)
        if grown == NULL:
            e.no_memory = 1
            return
        e.out = grown
        e.cap *= 2
    e.out[e.n] = <uint8_t>v
    e.n += 1


cdef inline void carry(Enc* e) noexcept nogil:
    cdef Py_ssize_t i = e.n - 1
    while e.out[i] == 0xFF:
        e.out[i] = 0
        i -= 1
    e.out[i] += 1


cdef inline void shift(Enc* e, uint64_t low, int n) noexcept nogil:
    cdef int nbits = e.nbits + n
    e.t += n
    while nbits >= 17:
        nbits -= 8
        put_byte(e, <uint32_t>(low >> nbits))
        low &= ((<uint64_t>1) << nbits) - 1
    e.low = low
    e.nbits = nbits


cdef inline void update(Ctx* c, int b) noexcept nogil:
    # 1.6: the two-rate estimator update
    cdef int32_t s0 = c.s0
    cdef int32_t s1 = c.s1
    if b:
        c.s0 = s0 + (CURVE[16 + (s0 >> 3)] >> c.sh0)
        c.s1 = s1 + (CURVE[16 + (s1 >> 7)] >> c.sh1)
    else:
        c.s0 = s0 - (CURVE[16 + ((-s0) >> 3)] >> c.sh0)
        c.s1 = s1 - (CURVE[16 + ((-s1) >> 7)] >> c.sh1)


cdef inline void encode_decision(Enc* e, Ctx* c, int b) noexcept nogil:
    cdef int32_t p = 16 * c.s0 + c.s1
    cdef int32_t q = p >> 7
    cdef uint32_t rng = e.rng
    cdef uint32_t lps
    cdef uint64_t low
    cdef int n
    if q < 0:
        q = -q
    lps = RLPS[(rng & 0xE0) + q]
    rng -= lps
    if b != (p >= 0):
        low = e.low + rng
        if low >> e.nbits:
            low -= (<uint64_t>1) << e.nbits
            carry(e)
        n = RENORM[lps]
        e.rng = lps << n
        shift(e, low << n, n)
    elif rng < 256:
        e.rng = rng << 1
        shift(e, e.low << 1, 1)
    else:
        e.rng = rng
    update(c, b)


cdef inline void encode_bypass(Enc* e, int b) noexcept nogil:
    cdef uint64_t low = e.low << 1
    if b:
        low += e.rng
        if low >> (e.nbits + 1):
            low -= (<uint64_t>1) << (e.nbits + 1)
            carry(e)
    shift(e, low, 1)


cdef inline void init_ctx(Ctx* c, int set_id) noexcept nogil:
    c.s0 = CTXP[4 * set_id + 2]
    c.s1 = CTXP[4 * set_id + 3]
    c.sh0 = CTXP[4 * set_id] + 4
    c.sh1 = CTXP[4 * set_id + 1]


# --- the parameter optimizer's shadow estimators (supplement 5.3) -------------------------------------
# The shifts of CtxParameterList[setId] (shift0 + 4, shift1) are compiled in as constants so that the
# nine updates of a bin unroll; _init() checks them against the table.
cdef int32_t SHIFT0[9]
cdef int32_t SHIFT1[9]
SHIFT0[:] = [5, 5, 5, 4, 6, 6, 6, 7, 7]
SHIFT1[:] = [4, 4, 4, 5, 6, 6, 6, 5, 5]


cdef inline void est_one(Est9* x, int s, const int32_t sh0, const int32_t sh1) noexcept nogil:
    cdef int32_t s0 = x.s0[s]
    cdef int32_t s1 = x.s1[s]
    x.cost[s] += EST1[512 + ((16 * s0 + s1) >> 3)]
    x.s0[s] = s0 + (CURVE[16 + (s0 >> 3)] >> sh0)
    x.s1[s] = s1 + (CURVE[16 + (s1 >> 7)] >> sh1)


cdef inline void est_zero(Est9* x, int s, const int32_t sh0, const int32_t sh1) noexcept nogil:
    cdef int32_t s0 = x.s0[s]
    cdef int32_t s1 = x.s1[s]
    x.cost[s] += EST0[512 + ((16 * s0 + s1) >> 3)]
    x.s0[s] = s0 - (CURVE[16 + ((-s0) >> 3)] >> sh0)
    x.s1[s] = s1 - (CURVE[16 + ((-s1) >> 7)] >> sh1)


cdef inline void shadow_bin(Shadow* sh, int ci, int b) noexcept nogil:
    cdef Est9* x = &sh.est[ci]
    if b:
        est_one(x, 0, 5, 4)
        est_one(x, 1, 5, 4)
        est_one(x, 2, 5, 4)
        est_one(x, 3, 4, 5)
        est_one(x, 4, 6, 6)
        est_one(x, 5, 6, 6)
        est_one(x, 6, 6, 6)
        est_one(x, 7, 7, 5)
        est_one(x, 8, 7, 5)
    else:
        est_zero(x, 0, 5, 4)
        est_zero(x, 1, 5, 4)
        est_zero(x, 2, 5, 4)
        est_zero(x, 3, 4, 5)
        est_zero(x, 4, 6, 6)
        est_zero(x, 5, 6, 6)
        est_zero(x, 6, 6, 6)
        est_zero(x, 7, 7, 5)
        est_zero(x, 8, 7, 5)


cdef inline void shadow_reset(Shadow* sh, int total) noexcept nogil:
    cdef int ci, s
    for ci in range(total):
        for s in range(9):
            sh.est[ci].s0[s] = CTXP[4 * s + 2]
            sh.est[ci].s1[s] = CTXP[4 * s + 3]


cdef inline void bin_(Pass* P, Enc* e, int ci, int b) noexcept nogil:
    if P.pseudo:
        shadow_bin(&P.sh, ci, b)
    else:
        encode_decision(e, &P.ctx[ci], b)


cdef inline int neighbour_class(int64_t nb) noexcept nogil:
    return 0 if nb == 0 else (1 if nb < 0 else 2)


cdef void code_levels(Pass* P, Enc* e) noexcept nogil:
    """quant_tensor() for both passes (cabac_encoder._Tensor.code_levels, same quirks)."""
    # The hot loop, one function on purpose: state in C locals, and bin for bin as _Tensor.code_levels.
    cdef const int32_t* levels = P.levels
    cdef Py_ssize_t h = P.h, w = P.w, bh = P.bh, bw = P.bw
    cdef Py_ssize_t by, bx, y, y_end, x_end, pos, row
    cdef int dq = P.dq, N = P.N, cb = P.cb, pseudo = P.pseudo
    cdef int64_t S = P.S, Z = P.Z
    cdef int inferred_sign = 1 if Z != 0 else 0
    cdef int state = 0
    cdef int64_t nb = 0
    cdef int64_t n, k, v, bv, a, q, limit, absb, r
    cdef int s, g, j, ci, rem_bits, i
    cdef Layout L = P.lay
    by = 0
    while by < h:
        if by > 0 and P.use_eps:
            if pseudo:
                shadow_reset(&P.sh, L.total)     # quirk (b): nb is kept
            else:
                e.rng = 256
                P.mark_t[P.marks] = e.t
                P.mark_low[P.marks] = <int32_t>(e.low & 511)
                P.mark_state[P.marks] = state
                P.marks += 1
                memcpy(P.ctx, P.image, L.total * sizeof(Ctx))
                nb = 0
        y_end = by + bh if by + bh < h else h
        bx = 0
        while bx < w:
            x_end = bx + bw if bx + bw < w else w
            for y in range(by, y_end):
                if P.row_skip != NULL and P.row_skip[y]:
                    if dq:
                        state = P.skip_trans[state]
                    continue
                row = y * w
                for pos in range(row + bx, row + x_end):
                    n = levels[pos]
                    k = n
                    if dq and n:
                        if state & 1:
                            if not (n & 1):
                                P.err = E_EVEN
                                P.err_pos = pos
                                P.err_level = n
                                P.err_state = state
                                return
                            k = (n + (1 if n > 0 else -1)) >> 1
                        else:
                            if n & 1:
                                P.err = E_ODD
                                P.err_pos = pos
                                P.err_level = n
                                P.err_state = state
                                return
                            k = n >> 1
                    v = n if pseudo else k
                    bv = P.base[pos] if P.base != NULL else 0
                    # sig_flag (2.4 with the profile-1 overrides)
                    if P.hist != NULL and P.hist[pos]:
                        ci = L.sig_hdsp + state
                    elif bv:
                        ci = L.sig_tca + 2 * state + (1 if (bv > 1 or bv < -1) else 0)
                    else:
                        ci = L.sig + 3 * state + neighbour_class(nb)
                    if not v:
                        bin_(P, e, ci, 0)
                        if dq:
                            state = TRANS[2 * state]
                        nb = 0
                        continue
                    bin_(P, e, ci, 1)
                    s = 1 if v < 0 else 0
                    a = -v if s else v
                    if not P.sign_coded:
                        if s != inferred_sign:
                            P.err = E_SIGN
                            P.err_pos = pos
                            P.err_level = n
                            return
                    elif bv:
                        bin_(P, e, L.sign_tca + (0 if bv < 0 else 1), s)
                    else:
                        bin_(P, e, L.sign + neighbour_class(nb), s)
                    q = 1
                    if cb:
                        limit = Z if s else S - 1 - Z
                        if a > limit:
                            P.err = E_RANGE
                            P.err_pos = pos
                            P.err_level = n
                            return
                    else:
                        limit = 0
                    if not cb or limit > 1:
                        # abs_level_greater_x[j]
                        absb = bv if bv >= 0 else -bv
                        j = 0
                        while True:
                            g = 1 if a > q else 0
                            if bv:
                                bin_(P, e, L.gtx_tca + 2 * j + (0 if absb >= j else 1), g)
                            else:
                                bin_(P, e, L.gtx + 2 * j + s, g)
                            q += g
                            j += 1
                            if not g or j >= N or (cb and q >= limit):
                                break
                        if g and (not cb or q < limit):
                            # abs_level_greater_x2: exp-Golomb prefix, then abs_remainder
                            rem_bits = 0
                            j = 0
                            while True:
                                g = 1 if a - q >= ((<int64_t>1) << rem_bits) else 0
                                bin_(P, e, L.gtx2 + j, g)
                                if g:
                                    q += (<int64_t>1) << rem_bits
                                    rem_bits += 1
                                j += 1
                                if not g or j > 30 or (cb and q + ((<int64_t>1) << rem_bits) > limit):
                                    break
                            if not pseudo:
                                r = a - q
                                if r >> rem_bits:
                                    P.err = E_TOO_LARGE
                                    P.err_pos = pos
                                    P.err_level = n
                                    return
                                for i in range(rem_bits - 1, -1, -1):
                                    encode_bypass(e, <int>((r >> i) & 1))
                    nb = v
                    if dq:
                        state = TRANS[2 * state + <int>(k & 1)]
            bx += bw
        if e.no_memory:
            P.err = E_NO_MEMORY
            return
        by += bh


# --- Python entry point ------------------------------------------------------------------------------
_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1


def _int32(values, count, what):
    """values as a contiguous int32 numpy vector in row-major order (ValueErrors as _flat_ints), or
    None when they are not a plain numeric array (the Python path then handles them)."""
    a = np.asarray(values)
    if a.dtype.kind not in "iub" and not (a.dtype.kind == "f" and np.isfinite(a).all()):
        return None
    a = a.reshape(-1)
    if a.shape[0] != count:
        raise ValueError("%s has %d elements, the tensor %d" % (what, a.shape[0], count))
    if a.dtype == np.int32:
        return np.ascontiguousarray(a)
    if a.dtype.kind == "f":
        a = np.trunc(a)  # int() of a float, as _flat_ints
    if a.size:
        bad = (a < _INT32_MIN) | (a > _INT32_MAX)
        if bad.any():
            raise ValueError("level %d does not fit in 32 bits" % int(a[np.argmax(bad)]))
    return np.ascontiguousarray(a, dtype=np.int32)


def _presence(kind, a, cb, sign_coded, max_abs, N):
    """6.8: whether shift_idx() is coded for context a of a group (cabac_encoder._Tensor.shift_idx_present)."""
    if not cb:
        return True
    if kind == 1:
        return sign_coded
    if kind == 2:
        return a < 2 * max_abs
    if kind == 3:
        return a < 2 * (max_abs - 1)
    if kind == 4:
        return (N - 1) + ((2 << a) - 1) < max_abs
    return True


def encode_tensor_levels(engine, coding, levels, row_skip_enabled_flag=0, hist_dep_sig_prob_enabled_flag=0,
                         param_opt_flag=1):
    """cabac_encoder.encode_tensor_levels() without ``shift_set_ids``; None where the Python path must
    run instead (nothing is written then)."""
    if not _ready:
        _init()
    ce = _py
    count, h, w, scan, bh, bw = ce._geometry(coding.dims, coding.scan_order)
    if count == 0:
        return None
    profile = coding.profile
    S = coding.codebook_size if profile == 1 else 0
    Z = coding.codebook_zero_offset
    if S == 1:
        return None  # 6.8: nothing is coded (and nonzero levels are refused there)
    lv = _int32(levels, count, "levels")
    if lv is None:
        return None
    dq = 1 if coding.dq_flag else 0
    N = coding.cabac_unary_length_minus1 + 1
    cb = 1 if (profile == 1 and S > 1) else 0
    max_abs = Z if Z > S - 1 - Z else S - 1 - Z
    sign_coded = 0 if (cb and (Z == 0 or Z == S - 1)) else 1
    tca = profile == 1 and coding.tca_base is not None
    base = None
    if tca:
        base = _int32(coding.tca_base, count, "temporal context base")
        if base is None:
            return None
    start_bins = ce._start_bins_present(coding, h, w)
    if hist_dep_sig_prob_enabled_flag and not coding.parent_node_id_present_flag:
        raise ValueError("hist_dep_sig_prob_enabled_flag needs parent_node_id_present_flag")
    hdsp = 1 if (hist_dep_sig_prob_enabled_flag and start_bins) else 0
    hist = coding.hdsp_history if profile == 1 else None
    if hist is not None and len(hist) != count:
        hist = None
    if hist is not None and hdsp:
        hist = np.ascontiguousarray(np.asarray(hist).reshape(-1) != 0, dtype=np.uint8)
    else:
        hist = None
    row_skip = None
    if row_skip_enabled_flag and start_bins:
        row_skip = np.ascontiguousarray(~lv.reshape(h, w).any(axis=1), dtype=np.uint8)
    use_eps = 1 if (scan > 0 and h > bh) else 0
    rows = (h + bh - 1) // bh

    # contexts in shift_parameter_ids() order (2.6): kind 0 plain, 1 sign, 2 gtx, 3 gtx_tca, 4 gtx2
    sizes = (24 if dq else 3, (16 if dq else 2) if tca else 0, (8 if dq else 1) if hdsp else 0, 3,
             2 if tca else 0, 2 * N, 2 * N if tca else 0, 31)
    kinds = (0, 0, 0, 1, 1, 2, 3, 4)
    offsets = []
    total = 0
    for size in sizes:
        offsets.append(total)
        total += size

    cdef Pass P
    cdef Enc e
    cdef Ctx shift_flag
    cdef Ctx row_ctx
    cdef Ctx* ctx = NULL
    cdef Ctx* image = NULL
    cdef int32_t[::1] lv_view = lv
    cdef int32_t[::1] base_view
    cdef uint8_t[::1] hist_view
    cdef uint8_t[::1] skip_view
    cdef uint8_t[::1] present_view
    cdef int32_t[::1] ids_view
    cdef int index
    cdef int i, set_id, s, parent_flag, r
    cdef bytes old = bytes(engine.out)
    clear_pass(&P)
    P.levels = &lv_view[0]
    if base is not None:
        base_view = base
        P.base = &base_view[0]
    if hist is not None:
        hist_view = hist
        P.hist = &hist_view[0]
    if row_skip is not None:
        skip_view = row_skip
        P.row_skip = &skip_view[0]
    P.h = h
    P.w = w
    P.bh = bh
    P.bw = bw
    P.dq = dq
    P.N = N
    P.S = S
    P.Z = Z
    P.use_eps = use_eps
    for i, s in enumerate(ce._skip_transitions(w)):
        P.skip_trans[i] = s
    P.lay.sig = offsets[0]
    P.lay.sig_tca = offsets[1]
    P.lay.sig_hdsp = offsets[2]
    P.lay.sign = offsets[3]
    P.lay.sign_tca = offsets[4]
    P.lay.gtx = offsets[5]
    P.lay.gtx_tca = offsets[6]
    P.lay.gtx2 = offsets[7]
    P.lay.total = total
    parent_flag = 1 if coding.parent_node_id_present_flag else 0

    e.cap = len(old) + count // 2 + 4096
    e.out = <uint8_t*>malloc(e.cap)
    ctx = <Ctx*>malloc(total * sizeof(Ctx))
    image = <Ctx*>malloc(total * sizeof(Ctx))
    P.mark_t = <int64_t*>malloc(rows * sizeof(int64_t))
    P.mark_low = <int32_t*>malloc(rows * sizeof(int32_t))
    P.mark_state = <int32_t*>malloc(rows * sizeof(int32_t))
    try:
        if (e.out == NULL or ctx == NULL or image == NULL or P.mark_t == NULL or P.mark_low == NULL
                or P.mark_state == NULL):
            raise MemoryError()
        if old:
            memcpy(e.out, <const char*>old, len(old))
        e.n = len(old)
        e.low = engine.low
        e.nbits = engine.nbits
        e.rng = engine.range
        e.t = engine.t
        e.no_memory = 0
        for i in range(total):
            init_ctx(&ctx[i], 0)
        P.ctx = ctx
        P.image = image

        # 2.1 step 3 / 6.4: profile-1 bins at the start of the tensor.
        if start_bins:
            if parent_flag:
                encode_bypass(&e, hdsp)
            encode_bypass(&e, 1 if row_skip is not None else 0)
            if row_skip is not None:
                init_ctx(&row_ctx, 0)
                for r in range(h):
                    encode_decision(&e, &row_ctx, P.row_skip[r])

        # 5.3: the pseudo pass, nine shadow estimators per context; the cheapest initialization wins.
        present = np.array([_presence(kinds[g], a, cb, sign_coded, max_abs, N)
                            for g, size in enumerate(sizes) for a in range(size)], dtype=np.uint8)
        if param_opt_flag:
            costs = np.zeros(9 * total, dtype=np.int64)
            run_pseudo(&P, &e, costs)
            if P.err:
                _raise(P)
            # argmin over setId of the cost plus 3 bits (2^15 scale) for shift_idx_minus_1, ties to the
            # smallest; (d): an absent shift_idx() leaves setId 0
            costs = costs.reshape(total, 9) + np.array([0] + [3 * 32768] * 8, dtype=np.int64)
            set_ids = np.where(present, np.argmin(costs, axis=1), 0).astype(np.int32)
        else:
            set_ids = np.zeros(total, dtype=np.int32)
        present_view = present
        ids_view = set_ids
        # 2.6: shift_parameter_ids()
        init_ctx(&shift_flag, 0)
        for index in range(total):
            set_id = ids_view[index]
            if present_view[index]:
                encode_decision(&e, &shift_flag, 1 if set_id else 0)
                if set_id:
                    for i in range(2, -1, -1):
                        encode_bypass(&e, ((set_id - 1) >> i) & 1)
            init_ctx(&ctx[index], set_id)
        memcpy(image, ctx, total * sizeof(Ctx))

        start_t = None
        if use_eps:
            # 1.11: IvlCurrRange = 256 before the first parameter as well.
            e.rng = 256
            start_t = e.t
        P.pseudo = 0
        P.cb = cb
        P.sign_coded = sign_coded
        P.marks = 0
        with nogil:
            code_levels(&P, &e)
        if P.err:
            _raise(P)
        if e.no_memory:
            raise MemoryError()
        engine.out = bytearray((<char*>e.out)[:e.n])
        engine.low = e.low
        engine.nbits = e.nbits
        engine.range = e.rng
        engine.t = e.t
        marks = [(P.mark_t[i], P.mark_low[i], P.mark_state[i]) for i in range(P.marks)]
        return ce.CodedTensor(hdsp, bytearray(row_skip) if row_skip is not None else None, start_t, marks)
    finally:
        free(e.out)
        free(ctx)
        free(image)
        free(P.mark_t)
        free(P.mark_low)
        free(P.mark_state)


cdef void clear_pass(Pass* P) noexcept:
    P.levels = NULL
    P.base = NULL
    P.hist = NULL
    P.row_skip = NULL
    P.ctx = NULL
    P.image = NULL
    P.sh.est = NULL
    P.mark_t = NULL
    P.mark_low = NULL
    P.mark_state = NULL
    P.marks = 0
    P.err = E_OK
    P.err_pos = 0
    P.err_level = 0
    P.err_state = 0
    P.pseudo = 0


cdef run_pseudo(Pass* P, Enc* e, int64_t[::1] costs):
    """The pseudo pass: binarizes n, ignores the codebook limits (quirks a-c of 5.3); costs[9 * ci + s]."""
    cdef int total = P.lay.total
    cdef int ci, s
    P.sh.est = <Est9*>malloc(total * sizeof(Est9))
    if P.sh.est == NULL:
        raise MemoryError()
    P.pseudo = 1
    P.cb = 0
    P.sign_coded = 1
    P.marks = 0
    try:
        with nogil:
            shadow_reset(&P.sh, total)
            for ci in range(total):
                for s in range(9):
                    P.sh.est[ci].cost[s] = 0
            code_levels(P, e)
            for ci in range(total):
                for s in range(9):
                    costs[9 * ci + s] = P.sh.est[ci].cost[s]
    finally:
        free(P.sh.est)
        P.sh.est = NULL


cdef _raise(Pass P):
    n = P.err_level
    pos = P.err_pos
    if P.err == E_EVEN:
        raise ValueError("level %d at position %d is even; DQ state %d reconstructs odd multiples only"
                         % (n, pos, P.err_state))
    if P.err == E_ODD:
        raise ValueError("level %d at position %d is odd; DQ state %d reconstructs even multiples only"
                         % (n, pos, P.err_state))
    if P.err == E_SIGN:
        raise ValueError("level %d at position %d has the wrong sign for a codebook with CbZeroOffset %d (6.8)"
                         % (n, pos, P.Z))
    if P.err == E_RANGE:
        raise ValueError("level %d at position %d is outside the codebook range %d..%d"
                         % (n, pos, -P.Z, P.S - 1 - P.Z))
    if P.err == E_TOO_LARGE:
        raise ValueError("level %d at position %d is too large to code" % (n, pos))
    raise MemoryError()
