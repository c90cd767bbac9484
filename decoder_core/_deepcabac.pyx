# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled DeepCABAC: the C twin of decode_tensor_levels() in deepcabac.py and of reconstruct() in
payload.py, with the same inputs and bit-identical results.

The preamble of a tensor (profile-1 start bins, shift_parameter_ids()) and the position loop of
quant_tensor() run in C; the position loop runs without the GIL over a raw byte pointer. The Python
ArithmeticDecoder's registers (p, range, value, bits_needed) are read before and written back after,
so the engine state carries over between the tensors of one segment and into terminate_cabac().

Block rows with entry points (supplement 1.11) restart with fresh contexts, so a tensor's block rows
can be decoded in independent chunks; ``coding.runner`` (see nnc_edge.parallel) runs them on threads.
"""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from cpython.pyport cimport PY_SSIZE_T_MAX

from .compat import zeros
from .errors import NNCError
from .limits import DEFAULT_MAX_BINS_PER_TENSOR, exceeded
from .tables import CtxParameterList, CurveTab, RangeTabLps, StateTransTab


ctypedef struct Ctx:
    int32_t s0       # pStateIdx0
    int32_t s1       # pStateIdx1
    int32_t sh0      # shift0 + 4 (supplement 1.4)
    int32_t sh1      # shift1


ctypedef struct Eng:
    const uint8_t* data
    Py_ssize_t start
    Py_ssize_t end
    Py_ssize_t p
    uint32_t rng        # IvlCurrRange
    uint32_t value      # IvlOffset << 7 plus look-ahead bits (supplement 1.10)
    int bn              # bits_needed, -8..-1
    int err             # one of the E_* codes; sticky
    Py_ssize_t err_p    # byte offset for the error message
    int64_t err_val     # the level / entry-point index of the error
    int64_t bins        # bins decoded (for benchmarks)


cdef enum:
    E_OK = 0
    E_PAST_END = 1
    E_LEVEL = 2
    E_NO_ENTRY = 3
    E_ENTRY_POINTER = 4
    E_NO_MEMORY = 5
    E_BINS = 6            # Limits.max_bins_per_tensor
    E_ENTRY_REWIND = 7    # an entry point before bits already decoded


cdef uint8_t RLPS[256]
cdef int32_t CURVE[32]
cdef uint8_t TRANS[16]
cdef int32_t CTXP[36]
cdef uint8_t RENORM[256]
cdef int64_t _total_bins = 0


cdef void _init_tables():
    cdef int i, n
    for i in range(256):
        RLPS[i] = RangeTabLps[i]
        n = 0
        if i:
            while (i << n) < 256:
                n += 1
        RENORM[i] = n
    for i in range(32):
        CURVE[i] = CurveTab[i]
    for i in range(8):
        TRANS[2 * i] = StateTransTab[i][0]
        TRANS[2 * i + 1] = StateTransTab[i][1]
    for i in range(9):
        for n in range(4):
            CTXP[4 * i + n] = CtxParameterList[i][n]


_init_tables()


def bins_decoded():
    """Total number of bins decoded by this module's position loops (a cheap counter for benchmarks)."""
    return _total_bins


# --- the arithmetic decoding engine (supplement 1.5-1.8, scaled form of 1.10) -----------------------
cdef inline uint32_t _fetch(Eng* e) noexcept nogil:
    cdef Py_ssize_t p = e.p
    if p >= e.end:
        if e.err == E_OK:
            e.err = E_PAST_END
            e.err_p = p
        return 0
    e.p = p + 1
    return e.data[p]


cdef inline int _decision(Eng* e, Ctx* c) noexcept nogil:
    cdef int32_t s0 = c.s0
    cdef int32_t s1 = c.s1
    cdef int32_t p = 16 * s0 + s1
    cdef int32_t q = p >> 7
    cdef uint32_t rng = e.rng
    cdef uint32_t lps, scaled, n
    cdef int b
    if q < 0:
        q = -q
    lps = RLPS[(rng & 0xE0) + q]
    rng -= lps
    scaled = rng << 7
    e.bins += 1
    if e.value < scaled:
        b = p >= 0
        if rng < 256:
            rng <<= 1
            e.value <<= 1
            e.bn += 1
            if e.bn == 0:
                e.bn = -8
                e.value += _fetch(e)
    else:
        b = p < 0
        n = RENORM[lps]
        e.value = (e.value - scaled) << n
        rng = lps << n
        e.bn += n
        if e.bn >= 0:
            e.value += _fetch(e) << e.bn
            e.bn -= 8
    e.rng = rng
    # 1.6: two-rate estimator update
    if b:
        c.s0 = s0 + (CURVE[16 + (s0 >> 3)] >> c.sh0)
        c.s1 = s1 + (CURVE[16 + (s1 >> 7)] >> c.sh1)
    else:
        c.s0 = s0 - (CURVE[16 + ((-s0) >> 3)] >> c.sh0)
        c.s1 = s1 - (CURVE[16 + ((-s1) >> 7)] >> c.sh1)
    return b


cdef inline int _bypass(Eng* e) noexcept nogil:
    cdef uint32_t scaled
    e.bins += 1
    e.value <<= 1
    e.bn += 1
    if e.bn >= 0:
        e.bn = -8
        e.value += _fetch(e)
    scaled = e.rng << 7
    if e.value >= scaled:
        e.value -= scaled
        return 1
    return 0


cdef inline void _ctx_init(Ctx* c, int set_id) noexcept nogil:
    c.s0 = CTXP[4 * set_id + 2]
    c.s1 = CTXP[4 * set_id + 3]
    c.sh0 = CTXP[4 * set_id] + 4
    c.sh1 = CTXP[4 * set_id + 1]


# --- one tensor --------------------------------------------------------------------------------------
ctypedef struct Plan:
    int64_t h, w, count
    int dq, N, S, Z, cb, sign_coded, tca, hdsp_lookup
    const int32_t* base     # the TCA base, the HDSP history and the output of the positions
    const uint8_t* hist     # off .. off + window length - 1, each indexed by position - off
    int32_t* out
    int64_t off
    const uint8_t* row_skip
    int64_t bh, bw, rows
    int use_eps
    int n_ctx
    int o_sig, o_sig_tca, o_sig_hdsp, o_sign, o_sign_tca, o_gtx, o_gtx_tca, o_gtx2
    Ctx* init               # every context's state right after shift_parameter_ids()
    int64_t n_eps           # entry points available for block rows 1..n_eps
    uint32_t* ep_offset     # per block row r >= 1, at index r - 1
    uint8_t* ep_state
    int64_t* ep_pointer     # segment-relative bit pointer, or -1 when before bit 9
    int64_t seg_bits        # the segment's length in bits, or -1 while it is still arriving
    uint8_t skip_trans[8]
    int64_t max_bins        # Limits.max_bins_per_tensor


ctypedef struct Cursor:
    # Where the position loop goes on: block row r, block column bx, row y, column x, with the
    # DQ state and the previous level; ``fresh`` while block row r's entry point is not set yet.
    int64_t r, bx, y, x
    int state
    int64_t nb
    int fresh


cdef inline int64_t _bit_pointer(const Eng* e) noexcept nogil:
    # In 64 bits: 8 * a Py_ssize_t overflows past 256 MiB where it has 32 (armhf).
    return 8 * (<int64_t>e.p - e.start) + e.bn + 1


cdef inline void _cursor_at(Cursor* cur, const Plan* P, int64_t r) noexcept nogil:
    cur.r = r
    cur.bx = 0
    cur.y = r * P.bh
    cur.x = 0
    cur.state = 0
    cur.nb = 0
    cur.fresh = 1


cdef inline int _entry_error(Eng* e, int code, int64_t j) noexcept nogil:
    e.err = code
    e.err_val = j
    e.err_p = e.start
    return 0


cdef inline int _set_entry_point(Eng* e, const Plan* P, int64_t j) noexcept nogil:
    """1.11: IvlCurrRange = 256, IvlOffset = cabac_offset_list[j], set_bit_pointer(pointer).

    As deepcabac.ArithmeticDecoder.set_entry_point, an entry point before the bits already decoded
    is refused (decoding moves forward only)."""
    cdef int64_t pointer = P.ep_pointer[j]
    cdef int64_t byte, bit, a
    # seg_bits < 0: the segment is still arriving, and the caller waited for the entry point's bytes.
    if pointer < 0 or (P.seg_bits >= 0 and pointer > P.seg_bits):
        return _entry_error(e, E_ENTRY_POINTER, j)
    byte = pointer >> 3
    bit = pointer & 7
    if bit != 0 and P.seg_bits >= 0 and 8 * byte >= P.seg_bits:
        return _entry_error(e, E_ENTRY_POINTER, j)
    if _bit_pointer(e) > pointer:
        return _entry_error(e, E_ENTRY_REWIND, j)
    e.rng = 256
    if bit == 0:
        e.p = e.start + byte
        e.bn = -1
        e.value = P.ep_offset[j] << 7
    else:
        a = 8 - bit
        e.p = e.start + byte + 1
        e.bn = -1 - a
        e.value = (P.ep_offset[j] << 7) + ((e.data[e.start + byte] & ((1 << a) - 1)) << (7 - a))
    return 1


# What _decode_span returns (the first two are deepcabac.WINDOW_DONE and NEED_INPUT's meanings).
cdef enum:
    SPAN_DONE = 0     # reached block row r_end or position pos_end
    SPAN_INPUT = 1    # stopped before a parameter: the engine passed ``safe``
    SPAN_ERROR = 2    # e.err says why


cdef int _decode_span(Plan* P, Eng* eng, Ctx* ctx, Cursor* cur, int64_t r_end, int64_t pos_end,
                      Py_ssize_t safe) noexcept nogil:
    """quant_tensor() (2.2, 2.4, 3, 6.5-6.8) from the cursor up to block row r_end or, within a row,
    position pos_end, stopping early before a parameter once the engine has passed byte ``safe``.

    One loop serves the whole-tensor decoder (safe beyond the segment, one call per chunk of block
    rows) and streaming (TensorSteps windows): it is the hot loop, kept in one piece on purpose.
    """
    cdef Eng e = eng[0]          # a local copy keeps the registers out of memory
    cdef int64_t h = P.h, w = P.w, bh = P.bh, bw = P.bw, off = P.off
    cdef int dq = P.dq, N = P.N, S = P.S, Z = P.Z, cb = P.cb, sign_coded = P.sign_coded
    cdef int tca = P.tca, hdsp_lookup = P.hdsp_lookup
    cdef const int32_t* base = P.base
    cdef const uint8_t* hist = P.hist
    cdef const uint8_t* row_skip = P.row_skip
    cdef int32_t* out = P.out
    cdef Ctx* sig = ctx + P.o_sig
    cdef Ctx* sig_tca = ctx + P.o_sig_tca
    cdef Ctx* sig_hdsp = ctx + P.o_sig_hdsp
    cdef Ctx* sign = ctx + P.o_sign
    cdef Ctx* sign_tca = ctx + P.o_sign_tca
    cdef Ctx* gtx = ctx + P.o_gtx
    cdef Ctx* gtx_tca = ctx + P.o_gtx_tca
    cdef Ctx* gtx2 = ctx + P.o_gtx2
    cdef size_t ctx_bytes = P.n_ctx * sizeof(Ctx)
    cdef int64_t max_bins = P.max_bins
    cdef int64_t r = cur.r, bx = cur.bx, y = cur.y, x = cur.x
    cdef int state = cur.state
    cdef int64_t nb = cur.nb
    cdef int fresh = cur.fresh
    cdef int status = SPAN_DONE
    cdef int halt = 0            # stopped at pos_end inside a row
    cdef int64_t by, y_end, x_end, x_stop, row, pos, j, pointer, tb
    cdef int64_t q, k, limit, rem, absb
    cdef int32_t bv
    cdef int s, g, jj, rem_bits, st
    cdef Ctx* c
    while r < r_end and not halt:
        by = r * bh
        y_end = by + bh if by + bh < h else h
        if fresh:
            if r > 0 and P.use_eps:
                j = r - 1
                if j >= P.n_eps:
                    e.err = E_NO_ENTRY
                    e.err_val = j
                    e.err_p = e.p
                    status = SPAN_ERROR
                    break
                pointer = P.ep_pointer[j]
                if pointer >= 0 and (P.seg_bits < 0 or pointer <= P.seg_bits) and _bit_pointer(&e) <= pointer:
                    # Streaming: wait for the entry point's bytes; the bits before it belong to
                    # no block row and are skipped.
                    tb = e.start + (pointer >> 3)
                    if e.p < tb:
                        # tb may lie past what a 32-bit Py_ssize_t holds (the segment end still unknown):
                        # such a position is never reached, just as a 64-bit one would not be.
                        e.p = <Py_ssize_t>(tb if tb < PY_SSIZE_T_MAX else PY_SSIZE_T_MAX)
                    if tb > safe:
                        status = SPAN_INPUT
                        break
                if not _set_entry_point(&e, P, j):
                    status = SPAN_ERROR
                    break
                if dq:
                    state = P.ep_state[j]
                memcpy(ctx, P.init, ctx_bytes)
                nb = 0
            fresh = 0
        while bx < w and not halt:
            x_end = bx + bw if bx + bw < w else w
            while y < y_end:
                row = y * w
                x_stop = x_end
                if row + x_stop > pos_end:
                    x_stop = pos_end - row
                if row_skip != NULL and row_skip[y]:
                    # 6.5: the segment stays 0, nb is unchanged, the DQ state moves w times.
                    if x < x_stop:
                        memset(out + row + x - off, 0, (x_stop - x) * sizeof(int32_t))
                        x = x_stop
                    if x < x_end:
                        halt = 1
                        break
                    if dq:
                        state = P.skip_trans[state]
                    y += 1
                    x = bx
                    continue
                while x < x_stop:
                    if e.p > safe:
                        status = SPAN_INPUT
                        break
                    if e.bins > max_bins:
                        if e.err == E_OK:
                            e.err = E_BINS
                            e.err_p = e.p
                        status = SPAN_ERROR
                        break
                    pos = row + x
                    bv = base[pos - off] if tca else 0
                    # sig_flag (2.4)
                    if hdsp_lookup and hist[pos - off]:
                        c = sig_hdsp + state
                    elif bv:
                        c = sig_tca + 2 * state + (1 if (bv > 1 or bv < -1) else 0)
                    else:
                        c = sig + 3 * state + (0 if nb == 0 else (1 if nb < 0 else 2))
                    if not _decision(&e, c):
                        if dq:
                            state = TRANS[2 * state]
                        nb = 0
                        out[pos - off] = 0
                        x += 1
                        continue
                    # sign_flag
                    if not sign_coded:
                        s = 1 if Z != 0 else 0
                    elif bv:
                        s = _decision(&e, sign_tca + (0 if bv < 0 else 1))
                    else:
                        s = _decision(&e, sign + (0 if nb == 0 else (1 if nb < 0 else 2)))
                    q = 1
                    if cb:
                        limit = Z if s else S - 1 - Z
                    else:
                        limit = 0
                    if not cb or limit > 1:
                        # abs_level_greater_x[j]
                        absb = bv if bv >= 0 else -<int64_t>bv
                        jj = 0
                        while True:
                            if bv:
                                g = _decision(&e, gtx_tca + 2 * jj + (0 if absb >= jj else 1))
                            else:
                                g = _decision(&e, gtx + 2 * jj + s)
                            q += g
                            jj += 1
                            if not g or jj >= N or (cb and q >= limit):
                                break
                        if g and (not cb or q < limit):
                            # abs_level_greater_x2 (exp-Golomb prefix) and abs_remainder
                            rem_bits = 0
                            jj = 0
                            while True:
                                g = _decision(&e, gtx2 + jj)
                                if g:
                                    q += (<int64_t>1) << rem_bits
                                    rem_bits += 1
                                jj += 1
                                if not g or jj > 30 or (cb and q + ((<int64_t>1) << rem_bits) > limit):
                                    break
                            if rem_bits:
                                rem = 0
                                for jj in range(rem_bits):
                                    rem = (rem << 1) | _bypass(&e)
                                q += rem
                    k = -q if s else q
                    if dq:
                        st = state
                        state = TRANS[2 * st + (k & 1)]
                        if st & 1:
                            k = 2 * k + (1 if k < 0 else -1)
                        else:
                            k = 2 * k
                    if k > 2147483647 or k < -2147483648:
                        if e.err == E_OK:
                            e.err = E_LEVEL
                            e.err_val = k
                            e.err_p = e.p
                        status = SPAN_ERROR
                        break
                    out[pos - off] = <int32_t>k
                    nb = k
                    x += 1
                if status == SPAN_DONE and e.err:
                    status = SPAN_ERROR   # the engine ran past the end of the data
                if status != SPAN_DONE:
                    break
                if x < x_end:
                    halt = 1   # the window ends inside this row
                    break
                y += 1
                x = bx
            if status != SPAN_DONE or halt:
                break
            bx += bw
            y = by
            x = bx
        if status != SPAN_DONE or halt:
            break
        r += 1
        fresh = 1
        bx = 0
        y = r * bh
        x = 0
    if e.err and status == SPAN_DONE:
        status = SPAN_ERROR   # the engine ran past the end of the data
    cur.r = r
    cur.bx = bx
    cur.y = y
    cur.x = x
    cur.state = state
    cur.nb = nb
    cur.fresh = fresh
    eng[0] = e
    return status


cdef int _plan(Plan* P, coding, int64_t count, int64_t h, int64_t w, int tca, int hdsp, list keep) except -1:
    """The parts of the plan that do not depend on decoded bins: sizes, context layout, scan geometry."""
    cdef int dq = 1 if coding.dq_flag else 0
    cdef int N = coding.cabac_unary_length_minus1 + 1
    cdef int profile = coding.profile
    cdef int S = coding.codebook_size if profile == 1 else 0
    cdef int Z = coding.codebook_zero_offset
    cdef int scan, st, i, r
    cdef int64_t max_abs
    P.h = h
    P.w = w
    P.count = count
    P.dq = dq
    P.N = N
    P.S = S
    P.Z = Z
    P.max_bins = getattr(coding, "max_bins", DEFAULT_MAX_BINS_PER_TENSOR)
    P.tca = tca
    P.off = 0
    P.out = NULL
    P.base = NULL
    P.hist = NULL
    P.hdsp_lookup = 0
    P.row_skip = NULL
    P.seg_bits = -1
    P.cb = 1 if (profile == 1 and S > 1) else 0
    P.sign_coded = 0 if (P.cb and (Z == 0 or Z == S - 1)) else 1
    # Context layout: the shift_parameter_ids() groups of 2.6, in their order (deepcabac._context_groups).
    P.o_sig = 0
    P.o_sig_tca = P.o_sig + (24 if dq else 3)
    P.o_sig_hdsp = P.o_sig_tca + ((16 if dq else 2) if tca else 0)
    P.o_sign = P.o_sig_hdsp + ((8 if dq else 1) if hdsp else 0)
    P.o_sign_tca = P.o_sign + 3
    P.o_gtx = P.o_sign_tca + (2 if tca else 0)
    P.o_gtx_tca = P.o_gtx + 2 * N
    P.o_gtx2 = P.o_gtx_tca + (2 * N if tca else 0)
    P.n_ctx = P.o_gtx2 + 31
    P.init = <Ctx*>malloc(P.n_ctx * sizeof(Ctx))
    if P.init == NULL:
        raise MemoryError()
    # Scan geometry (3.1, 3.2).
    scan = coding.scan_order if len(coding.dims) > 1 else 0
    if scan > 0:
        P.bh = P.bw = 4 << scan
    else:
        P.bh = h
        P.bw = w
    P.rows = (h + P.bh - 1) // P.bh if h else 0
    # Parity-0 transitions repeated w times (6.5): the cycles have length 1, 2 or 4.
    for i in range(8):
        st = i
        for r in range(w % 4 if w % 4 else 4):
            st = TRANS[2 * st]
        P.skip_trans[i] = st
    return 0


cdef list _plan_entry_points(Plan* P, coding, int64_t pointer):
    """1.11: the entry point of every block row after the first, from the bit pointer at the first
    parameter; returns the pointers as Python ints for messages."""
    cdef int64_t n_rows, j
    cdef int dq = P.dq
    P.n_eps = 0
    P.ep_offset = NULL
    P.ep_state = NULL
    P.ep_pointer = NULL
    pointers = []
    if not P.use_eps:
        return pointers
    ep_offsets, ep_states, ep_bits, ep_first = coding.entry_points
    # Only the entry points the header lists are stored: the height of the tensor must not size these
    # arrays (n_rows * 8 also wraps a 32-bit size_t).
    n_rows = max(0, min(P.rows - 1, len(ep_bits) - ep_first))
    P.ep_offset = <uint32_t*>malloc(n_rows * sizeof(uint32_t) + 1)
    P.ep_state = <uint8_t*>malloc(n_rows + 1)
    P.ep_pointer = <int64_t*>malloc(n_rows * sizeof(int64_t) + 1)
    if P.ep_offset == NULL or P.ep_state == NULL or P.ep_pointer == NULL:
        raise MemoryError()
    for j in range(n_rows):
        if ep_first + j >= len(ep_bits) or ep_first + j < 0:
            break
        pointer += ep_bits[ep_first + j]
        pointers.append(pointer)
        P.ep_offset[j] = ep_offsets[ep_first + j] & 0xFF
        P.ep_state[j] = (ep_states[ep_first + j] & 7) if dq else 0
        P.ep_pointer[j] = pointer if pointer >= 9 else -1
        P.n_eps = j + 1
    return pointers


cdef void _free_plan(Plan* P) noexcept:
    free(P.init)
    free(P.ep_offset)
    free(P.ep_state)
    free(P.ep_pointer)
    P.init = NULL
    P.ep_offset = NULL
    P.ep_state = NULL
    P.ep_pointer = NULL


cdef _raise(Eng* e, int64_t ep_first, pointers, int64_t max_bins):
    if e.err == E_PAST_END:
        raise NNCError("arithmetic-coded data runs past the end of the NNR unit", e.err_p, "ae(v)")
    if e.err == E_LEVEL:
        raise NNCError("decoded level %d does not fit in 32 bits" % e.err_val, e.err_p, "int_param()")
    if e.err == E_NO_ENTRY:
        raise NNCError("entry point %d missing from the NDU header" % (ep_first + e.err_val), e.err_p,
                       "cabac_offset_list")
    if e.err == E_ENTRY_POINTER:
        raise NNCError("entry point bit offset %d outside the segment" % pointers[e.err_val], e.err_p,
                       "BitOffsetList")
    if e.err == E_ENTRY_REWIND:
        raise NNCError("entry point %d at bit offset %d lies before bits already decoded"
                       % (ep_first + e.err_val, pointers[e.err_val]), e.err_p, "BitOffsetList")
    if e.err == E_BINS:
        raise exceeded("max_bins_per_tensor", "the number of bins decoded for the tensor", max_bins, e.err_p,
                       "quant_tensor()")
    raise MemoryError()


cdef class _Tensor:
    """A tensor after its preamble: what the (possibly parallel) position loop needs."""
    cdef Plan P
    cdef Eng start          # the engine at the start of block row 0
    cdef Eng* chunk_eng     # the engine after each chunk
    cdef int64_t* chunk_rows
    cdef Py_ssize_t n_chunks
    cdef object keep        # Python objects whose buffers P points into
    cdef object pointers    # Python ints of the entry-point pointers, for messages
    cdef int64_t ep_first

    def __dealloc__(self):
        _free_plan(&self.P)
        free(self.chunk_eng)
        free(self.chunk_rows)

    cdef int split(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t i
        free(self.chunk_eng)
        free(self.chunk_rows)
        self.chunk_eng = <Eng*>malloc(n * sizeof(Eng))
        self.chunk_rows = <int64_t*>malloc((n + 1) * sizeof(int64_t))
        if self.chunk_eng == NULL or self.chunk_rows == NULL:
            raise MemoryError()
        self.n_chunks = n
        for i in range(n + 1):
            self.chunk_rows[i] = self.P.rows * i // n
        return 0

    def run_chunk(self, Py_ssize_t i):
        """Decode chunk i (a run of block rows) without the GIL."""
        cdef Eng e = self.start
        cdef Ctx* ctx
        cdef Cursor cur
        if i > 0:
            e.bins = 0   # the preamble's bins are counted once, in chunk 0
        with nogil:
            ctx = <Ctx*>malloc(self.P.n_ctx * sizeof(Ctx))
            if ctx == NULL:
                e.err = E_NO_MEMORY
            else:
                memcpy(ctx, self.P.init, self.P.n_ctx * sizeof(Ctx))
                _cursor_at(&cur, &self.P, self.chunk_rows[i])
                _decode_span(&self.P, &e, ctx, &cur, self.chunk_rows[i + 1], self.P.count, PY_SSIZE_T_MAX)
                free(ctx)
            self.chunk_eng[i] = e

    cdef finish(self, engine):
        """Raise the first error in scan order, else hand the final engine state back to Python.

        Chunks after the first start at their entry point without knowing where the chunk before
        them ended: that it did not read past the entry point is checked here, in scan order, as
        sequential decoding checks it at every block row."""
        global _total_bins
        cdef Py_ssize_t i
        cdef Eng* e
        cdef int64_t j, bins = 0
        for i in range(self.n_chunks):
            _total_bins += self.chunk_eng[i].bins
            bins += self.chunk_eng[i].bins
        for i in range(self.n_chunks):
            e = &self.chunk_eng[i]
            if e.err:
                _raise(e, self.ep_first, self.pointers, self.P.max_bins)
            if i + 1 < self.n_chunks:
                j = self.chunk_rows[i + 1] - 1
                if 0 <= j < self.P.n_eps and self.P.ep_pointer[j] >= 0 and _bit_pointer(e) > self.P.ep_pointer[j]:
                    e.err = E_ENTRY_REWIND
                    e.err_val = j
                    e.err_p = e.start
                    _raise(e, self.ep_first, self.pointers, self.P.max_bins)
        e = &self.chunk_eng[self.n_chunks - 1]
        if bins > self.P.max_bins:
            e.err = E_BINS
            e.err_p = e.p
            _raise(e, self.ep_first, self.pointers, self.P.max_bins)
        _store_engine(e, engine)


cdef inline void _store_engine(const Eng* e, engine):
    engine.p = e.p
    engine.range = e.rng
    engine.value = e.value
    engine.bits_needed = e.bn


cdef const uint8_t[::1] _load_engine(Eng* e, engine):
    """The Python engine's registers into ``e``; returns the view of its data that e.data points into."""
    cdef const uint8_t[::1] data = _bytes_view(engine.data)
    e.data = &data[0] if data.shape[0] else NULL
    e.start = engine.start
    e.end = engine.end
    e.p = engine.p
    e.rng = engine.range
    e.value = engine.value
    e.bn = engine.bits_needed
    e.err = E_OK
    # p may lie past end: streaming moved it to an entry point whose bytes have not arrived (no
    # byte is read there before they have; _fetch checks end).
    if e.end > data.shape[0] or e.p < 0 or e.start > e.p:
        raise ValueError("engine position outside its data")
    return data


cdef const uint8_t[::1] _bytes_view(obj):
    try:
        return obj
    except (TypeError, ValueError):
        return memoryview(obj).cast("B")


cdef uint8_t[::1] _writable_int32(obj, int64_t count):
    cdef uint8_t[::1] raw
    mv = memoryview(obj)
    if mv.itemsize != 4 or mv.readonly or not mv.c_contiguous or mv.nbytes != 4 * count:
        raise ValueError("out must be a writable contiguous buffer of %d 4-byte items" % count)
    raw = mv.cast("B")
    return raw


cdef const uint8_t[::1] _int32_view(obj, int64_t count):
    mv = memoryview(obj)
    if mv.itemsize != 4 or not mv.c_contiguous or mv.nbytes != 4 * count:
        raise ValueError("temporal context base must hold %d int32 items" % count)
    return mv.cast("B")


cdef _Tensor _prepare(engine, coding, int64_t count, int64_t h, int64_t w, levels):
    """Everything of 2.1 before the position loop: contexts, profile-1 start bins, shift_parameter_ids()."""
    cdef _Tensor t = _Tensor.__new__(_Tensor)
    cdef Plan* P = &t.P
    cdef Eng e
    cdef const uint8_t[::1] data
    cdef uint8_t[::1] out = _writable_int32(levels, count)
    cdef const uint8_t[::1] base_v
    cdef const uint8_t[::1] hist_v
    cdef Ctx shift_flag, row_skip_ctx
    cdef int profile = coding.profile
    cdef int tca, hdsp = 0, present, set_id, scan
    cdef int64_t max_abs, a, r, i
    cdef bytearray row_skip = None
    cdef uint8_t* rs
    data = _load_engine(&e, engine)
    keep = [data, out]
    t.keep = keep
    e.bins = 0
    P.init = NULL
    P.ep_offset = NULL
    P.ep_state = NULL
    P.ep_pointer = NULL
    tca = 1 if (profile == 1 and coding.tca_base is not None) else 0
    hist = coding.hdsp_history if profile == 1 else None

    # 2.1 step 3 / 6.4: profile-1 bins at the start of the tensor.
    _ctx_init(&shift_flag, 0)
    _ctx_init(&row_skip_ctx, 0)
    if profile == 1 and w > 1 and h > 1:
        if coding.parent_node_id_present_flag:
            hdsp = _bypass(&e)
        if _bypass(&e):
            row_skip = bytearray(h)
            rs = <uint8_t*><char*>row_skip
            for r in range(h):
                rs[r] = _decision(&e, &row_skip_ctx)
                if e.err:
                    break
    _plan(P, coding, count, h, w, tca, hdsp, keep)
    P.out = <int32_t*>&out[0] if count else NULL
    P.seg_bits = 8 * (<int64_t>e.end - e.start)
    if row_skip is not None:
        keep.append(row_skip)
        P.row_skip = <uint8_t*><char*>row_skip
    if tca:
        base_v = _int32_view(coding.tca_base, count)
        keep.append(base_v)
        P.base = <const int32_t*>&base_v[0]
    if hist is not None and hdsp:
        hist_v = hist
        if hist_v.shape[0] != count:
            raise ValueError("HDSP history must hold %d items" % count)
        keep.append(hist_v)
        P.hist = &hist_v[0]
        P.hdsp_lookup = 1   # 6.7: without an earlier decode the history is all 0

    # 2.6: shift_parameter_ids(); 6.8: which shift_idx() are present with a profile-1 codebook.
    max_abs = P.Z if P.Z > P.S - 1 - P.Z else P.S - 1 - P.Z
    for i in range(P.n_ctx):
        present = 1
        if P.cb:
            if i >= P.o_gtx2:
                a = i - P.o_gtx2
                present = (P.N - 1) + (((<int64_t>2) << a) - 1) < max_abs
            elif i >= P.o_gtx_tca:
                present = i - P.o_gtx_tca < 2 * (max_abs - 1)
            elif i >= P.o_gtx:
                present = i - P.o_gtx < 2 * max_abs
            elif i >= P.o_sign:
                present = P.sign_coded
        set_id = 0
        if present and _decision(&e, &shift_flag):
            # shift_idx_minus_1, uae(3), MSB first
            set_id = _bypass(&e)
            set_id = (set_id << 1) | _bypass(&e)
            set_id = 1 + ((set_id << 1) | _bypass(&e))
        _ctx_init(&P.init[i], set_id)
    t.ep_first = 0
    t.pointers = []
    if e.err:
        _raise(&e, 0, t.pointers, P.max_bins)

    eps = coding.entry_points
    scan = coding.scan_order if len(coding.dims) > 1 else 0
    P.use_eps = 1 if (scan > 0 and h > P.bh and eps is not None) else 0
    if P.use_eps:
        # 1.11: IvlCurrRange = 256 before the first parameter as well.
        e.rng = 256
        t.ep_first = eps[3]
    t.pointers = _plan_entry_points(P, coding, _bit_pointer(&e))
    t.start = e
    return t


def decode_tensor_levels(engine, coding, out=None):
    """Same contract as deepcabac.decode_tensor_levels: QuantParam of one tensor, int32, row-major.

    ``out`` is an optional writable buffer of Prod(dims) 4-byte items that receives the levels (every
    element is written) and is returned; otherwise a new array('i') is. ``coding.runner`` (optional,
    with ``workers`` and ``run(n, fn)``) decodes chunks of block rows concurrently.
    """
    cdef int64_t count = 1, h, w
    cdef _Tensor t
    cdef Py_ssize_t n = 1, i
    dims = coding.dims
    for d in dims:
        count *= d
    h = dims[0]
    w = count // h if h else 0
    levels = zeros("i", count) if out is None else out
    if count == 0:
        return levels
    if (coding.codebook_size if coding.profile == 1 else 0) == 1:
        # 6.8: no bins at all; every QuantParam is 0.
        if out is not None:
            memoryview(out).cast("B")[:] = bytes(4 * count)
        return levels
    t = _prepare(engine, coding, count, h, w, levels)
    runner = getattr(coding, "runner", None)
    if runner is not None and t.P.use_eps and t.P.rows > 1 and count >= PARALLEL_MIN_COUNT:
        n = min(t.P.rows, 4 * runner.workers)
    t.split(n if n > 1 else 1)
    if t.n_chunks > 1:
        runner.run(t.n_chunks, t.run_chunk)
    else:
        t.run_chunk(0)
    t.finish(engine)
    return levels


cdef class TensorSteps:
    """The compiled position loop of deepcabac.TensorSteps for streaming: same windows, same results.

    Made after deepcabac.TensorSteps.preamble() has decoded the tensor's first bins (``steps`` holds them);
    run(engine, out, lo, hi, base, hist) decodes positions lo .. hi-1 into ``out`` (array('i') or
    any writable buffer of 4-byte items, indexed by position - lo), reading the engine's registers
    before and writing them back after, and returns deepcabac.WINDOW_DONE or NEED_INPUT.
    """
    cdef Plan P
    cdef Ctx* ctx
    cdef Cursor cur
    cdef int64_t bins
    cdef object keep
    cdef object pointers
    cdef int64_t ep_first

    def __cinit__(self):
        self.P.init = NULL
        self.P.ep_offset = NULL
        self.P.ep_state = NULL
        self.P.ep_pointer = NULL
        self.ctx = NULL

    def __dealloc__(self):
        _free_plan(&self.P)
        free(self.ctx)

    def __init__(self, engine, coding, steps):
        cdef Plan* P = &self.P
        cdef int64_t i
        cdef uint8_t* rs
        ids = steps.set_ids
        self.keep = []
        _plan(P, coding, steps.count, steps.h, steps.w, 1 if coding.tca else 0, 1 if steps.hdsp else 0, self.keep)
        if len(ids) != P.n_ctx:
            raise ValueError("%d context set ids for %d contexts" % (len(ids), P.n_ctx))
        for i in range(P.n_ctx):
            _ctx_init(&P.init[i], ids[i])
        self.ctx = <Ctx*>malloc(P.n_ctx * sizeof(Ctx))
        if self.ctx == NULL:
            raise MemoryError()
        memcpy(self.ctx, P.init, P.n_ctx * sizeof(Ctx))
        if steps.row_skip is not None:
            row_skip = bytearray(steps.row_skip)
            self.keep.append(row_skip)
            P.row_skip = <uint8_t*><char*>row_skip
        P.hdsp_lookup = 1 if (steps.hdsp and coding.history) else 0
        P.use_eps = 1 if steps.use_eps else 0
        self.ep_first = coding.entry_points[3] if P.use_eps else 0
        self.pointers = _plan_entry_points(P, coding, engine.get_bit_pointer())
        self.bins = steps.nbins
        _cursor_at(&self.cur, P, 0)

    def run(self, engine, out, Py_ssize_t lo, Py_ssize_t hi, base=None, hist=None):
        global _total_bins
        cdef Plan* P = &self.P
        cdef Eng e
        cdef const uint8_t[::1] data = _load_engine(&e, engine)
        cdef uint8_t[::1] out_v = _writable_int32(out, hi - lo)
        cdef const uint8_t[::1] base_v
        cdef const uint8_t[::1] hist_v
        cdef int64_t r_end, pos_end, before
        cdef Py_ssize_t safe
        cdef int status
        safe_obj = engine.safe
        safe = safe_obj if safe_obj < PY_SSIZE_T_MAX else PY_SSIZE_T_MAX
        seg_end = engine.seg_end
        P.seg_bits = 8 * (seg_end - engine.start) if seg_end is not None else -1
        P.off = lo
        P.out = <int32_t*>&out_v[0] if hi > lo else NULL
        if P.tca:
            base_v = _int32_view(base, hi - lo)
            P.base = <const int32_t*>&base_v[0] if hi > lo else NULL
        if P.hdsp_lookup:
            hist_v = hist
            if hist_v.shape[0] != hi - lo:
                raise ValueError("HDSP history window must hold %d items" % (hi - lo))
            P.hist = &hist_v[0] if hi > lo else NULL
        if P.bh == P.h:
            r_end = P.rows
            pos_end = hi
        else:
            r_end = (hi // P.w + P.bh - 1) // P.bh if P.w else P.rows
            pos_end = P.count
        e.bins = self.bins
        before = e.bins
        with nogil:
            status = _decode_span(P, &e, self.ctx, &self.cur, r_end, pos_end, safe)
        _total_bins += e.bins - before
        self.bins = e.bins
        P.out = NULL
        P.base = NULL
        P.hist = NULL
        if status == SPAN_ERROR:
            _raise(&e, self.ep_first, self.pointers, P.max_bins)
        _store_engine(&e, engine)
        if status == SPAN_INPUT:
            return 0   # deepcabac.NEED_INPUT
        if self.cur.r >= P.rows and self.bins > P.max_bins:
            e.err = E_BINS
            e.err_p = e.p
            _raise(&e, self.ep_first, self.pointers, P.max_bins)
        return 1       # deepcabac.WINDOW_DONE


# Below this many parameters a tensor's block rows are not worth handing to other threads.
PARALLEL_MIN_COUNT = 1 << 15


# --- reconstruction (7.3.6, supplement 4.3) ---------------------------------------------------------
_last_codebook = None  # (codebook, step, its float32 values): see reconstruct()

def reconstruct(levels, qp, qp_density, codebook=None, zero_offset=0, where=0, in_place=False, out=None):
    """Same contract as reconstruction.reconstruct; with in_place the float32 results overwrite
    ``levels`` (a writable buffer of 4-byte items), which is returned; ``out`` receives them instead
    of a new array."""
    from .reconstruction import step_size
    cdef int64_t n, i, k, size
    cdef float s32, v
    cdef int32_t lv
    cdef float* table
    cdef int64_t bad_level = 0
    cdef int bad = 0
    cdef const uint8_t[::1] src
    cdef uint8_t[::1] dst
    cdef float[::1] table_v
    step = step_size(qp, qp_density)
    mv = memoryview(levels)
    if mv.itemsize != 4 or not mv.c_contiguous:
        raise ValueError("levels must be a contiguous buffer of 4-byte items")
    n = mv.nbytes // 4
    if in_place:
        values = levels
        dst = _writable_int32(levels, n)
        src = dst
    else:
        values = zeros("f", n) if out is None else out
        src = mv.cast("B")
        dst = memoryview(values).cast("B")
        if dst.shape[0] != 4 * n:
            raise ValueError("out must hold %d float32 items" % n)
    if n == 0:
        return values
    cdef const int32_t* l = <const int32_t*>&src[0]
    cdef float* f = <float*>&dst[0]
    if codebook is None:
        s32 = <float>step
        with nogil:
            for i in range(n):
                lv = l[i]
                v = (<float>lv) * s32    # float32(QuantParam) * float32(stepSize), rounded once
                memcpy(&f[i], &v, 4)
        return values
    # Codebook values are scaled in float64 and rounded once to float32 (supplement 4.3), once per
    # codebook and step: slice decoding reconstructs a tensor in many calls.
    global _last_codebook
    last = _last_codebook
    if last is not None and last[0] is codebook and last[1] == step and len(last[2]) == len(codebook):
        scaled = last[2]
    else:
        scaled = zeros("f", len(codebook))
        for i in range(len(codebook)):
            scaled[i] = codebook[i] * step
        _last_codebook = (codebook, step, scaled)  # one assignment: threads see a whole entry
    size = len(codebook)
    table_v = scaled
    table = &table_v[0] if size else NULL
    cdef int32_t zo = zero_offset
    with nogil:
        for i in range(n):
            lv = l[i]
            k = <int64_t>lv + zo
            if k < 0 or k >= size:
                bad = 1
                bad_level = lv
                break
            memcpy(&f[i], &table[k], 4)
    if bad:
        raise NNCError("level %d indexes outside a codebook of %d entries" % (bad_level, size), where, "QuantParam")
    return values


def update_history(levels, history):
    """6.7: mark every position whose QuantParam is nonzero in the HDSP history (a bytearray)."""
    cdef const uint8_t[::1] src = memoryview(levels).cast("B")
    cdef uint8_t[::1] hist = history
    cdef int64_t n = hist.shape[0], i
    if src.shape[0] != 4 * n:
        raise ValueError("history and levels differ in length")
    if n == 0:
        return
    cdef const int32_t* l = <const int32_t*>&src[0]
    with nogil:
        for i in range(n):
            if l[i]:
                hist[i] = 1
