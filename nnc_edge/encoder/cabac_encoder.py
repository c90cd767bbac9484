"""DeepCABAC encoding: the mirror of decoder_core.deepcabac (supplement sections 1.12, 2, 3, 5 and 6).

* ArithmeticEncoder: the encoding engine of supplement 1.12 (context-coded, bypass and terminating
  bins, range resets at entry points), writing bytes.
* encode_tensor_levels(): qp-free coding of one tensor's QuantParam array (the profile-1 start bins,
  shift_parameter_ids() chosen by the parameter optimizer of 5.3, quant_tensor()), the inverse of
  decode_tensor_levels() for the same TensorCoding.
* encode_segment(): the DeepCABAC segment of one NDU (one or several tensors, each with its qp_value,
  then terminate_cabac()) together with the entry-point lists of its header (1.11).

Levels are QuantParam values: for dq_flag 1 the reconstruction indices n, which are mapped to the coded
levels k with the dependent-quantization state machine here (4.2).
"""

from decoder_core.deepcabac import _RENORM, TensorCoding, _ctx, _reset
from decoder_core.tables import (
    NNR_CPT_BI, NNR_CPT_BN, NNR_CPT_DC, NNR_CPT_LS, CtxParameterList, CurveTab, RangeTabLps, StateTransTab,
)

from ._cabac_tables import EST_BITS_1_511

try:
    from . import _cabac_encoder as _compiled
except ImportError:  # the Cython twin of encode_tensor_levels() is optional (setup.py builds it when it can)
    _compiled = None

__all__ = ["ArithmeticEncoder", "TensorCoding", "SegmentTensor", "Segment", "CodedTensor", "encode_tensor_levels",
           "encode_segment", "entry_point_lists", "block_roles", "dq_reconstruction_indices", "scan_positions",
           "block_rows", "encoder_backend"]

_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1


class ArithmeticEncoder:
    """The H.264-style engine of supplement 1.12 with the output kept as bytes plus a carry.

    ``low`` holds the lowest ``nbits`` bits of the code value's lower bound; everything above is in
    ``out`` (a carry out of ``low`` is propagated into it). After ``t`` renormalization shifts the
    decoder's bit pointer (1.1) is 9 + t and its IvlOffset is the 9 bits of the final stream that end
    there minus the lower bound, which is how entry points are resolved once the segment is finished.
    """

    def __init__(self):
        self.out = bytearray()
        self.low = 0
        self.nbits = 9
        self.range = 510
        self.t = 0
        self.data = None

    def bit_pointer(self):
        """The decoder's get_bit_pointer() (relative to the segment start) at this point."""
        return 9 + self.t

    def _carry(self):
        out = self.out
        i = len(out) - 1
        while out[i] == 0xFF:
            out[i] = 0
            i -= 1
        out[i] += 1

    def _shift(self, low, n):
        nbits = self.nbits + n
        self.t += n
        if nbits >= 17:
            out = self.out
            while nbits >= 17:
                nbits -= 8
                out.append(low >> nbits)
                low &= (1 << nbits) - 1
        self.low = low
        self.nbits = nbits

    def encode_decision(self, ctx, b):
        """1.5-1.7 in encoder form: one context-coded bin; ctx = [pStateIdx0, pStateIdx1, shift0 + 4, shift1]."""
        s0 = ctx[0]
        s1 = ctx[1]
        p = 16 * s0 + s1
        rng = self.range
        q = p >> 7
        lps = RangeTabLps[(rng & 0xE0) + (q if q >= 0 else -q)]
        rng -= lps
        if b != (p >= 0):
            low = self.low + rng
            if low >> self.nbits:
                low -= 1 << self.nbits
                self._carry()
            n = _RENORM[lps]
            self.range = lps << n
            self._shift(low << n, n)
        elif rng < 256:
            self.range = rng << 1
            self._shift(self.low << 1, 1)
        else:
            self.range = rng
        # 1.6: the same two-rate estimator update as the decoder
        if b:
            ctx[0] = s0 + (CurveTab[16 + (s0 >> 3)] >> ctx[2])
            ctx[1] = s1 + (CurveTab[16 + (s1 >> 7)] >> ctx[3])
        else:
            ctx[0] = s0 - (CurveTab[16 + ((-s0) >> 3)] >> ctx[2])
            ctx[1] = s1 - (CurveTab[16 + ((-s1) >> 7)] >> ctx[3])

    def encode_bypass(self, b):
        low = self.low << 1
        if b:
            low += self.range
            if low >> (self.nbits + 1):
                low -= 1 << (self.nbits + 1)
                self._carry()
        self._shift(low, 1)

    def uae(self, n, value):
        if value < 0 or value >> n:
            raise ValueError("%d does not fit uae(%d)" % (value, n))
        for i in range(n - 1, -1, -1):
            self.encode_bypass((value >> i) & 1)

    def iae(self, n, value):
        if not -(1 << (n - 1)) <= value < (1 << (n - 1)):
            raise ValueError("%d does not fit iae(%d)" % (value, n))
        self.uae(n, value & ((1 << n) - 1))

    def reset_range(self):
        """1.11: IvlCurrRange = 256 at an entry point; no bits are written."""
        self.range = 256

    def finish(self):
        """terminate_cabac(): terminating_one_bit = 1, flush with the stop bit, nesting_zero_bits."""
        if self.data is not None:
            return self.data
        rng = self.range - 2
        low = self.low + rng
        if low >> self.nbits:
            low -= 1 << self.nbits
            self._carry()
        self.range = 2 << 7
        self._shift(low << 7, 7)
        # The code value: every bit of the lower bound except its lowest 8, then the stop bit.
        nbits = self.nbits - 7
        tail = ((self.low >> 8) << 1) | 1
        pad = -nbits % 8
        self.out += (tail << pad).to_bytes((nbits + pad) >> 3, "big")
        self.data = bytes(self.out)
        return self.data

    def ivl_offset_at(self, t, low9):
        """IvlOffset the decoder holds after t shifts, given the lower bound's low 9 bits then."""
        data = self.data
        byte = t >> 3
        chunk = int.from_bytes(data[byte:byte + 3].ljust(3, b"\x00"), "big")
        window = (chunk >> (15 - (t & 7))) & 511
        return (window - low9) & 511


def encoder_backend():
    """'cython' when the compiled encode_tensor_levels() is available, else 'python'."""
    return "cython" if _compiled is not None else "python"


# --- scan helpers ---------------------------------------------------------------------------------
def _geometry(dims, scan_order):
    count = 1
    for d in dims:
        count *= d
    h = dims[0]
    w = count // h if h else 0
    scan = scan_order if len(dims) > 1 else 0
    if scan > 0:
        bh = bw = 4 << scan
    else:
        bh = h
        bw = w
    return count, h, w, scan, bh, bw


def scan_positions(dims, scan_order=0):
    """Flat (row-major) positions in the order quant_tensor() visits them (3.1, 3.2)."""
    count, h, w, scan, bh, bw = _geometry(dims, scan_order)
    out = []
    for by in range(0, h, bh):
        y_end = min(by + bh, h)
        for bx in range(0, w, bw):
            x_end = min(bx + bw, w)
            for y in range(by, y_end):
                out.extend(range(y * w + bx, y * w + x_end))
    return out


def block_rows(dims, scan_order=0):
    """Number of block rows (NumBlockRowsMinus1 + 1 for a single tensor, 6.4.3.7)."""
    count, h, w, scan, bh, bw = _geometry(dims, scan_order)
    return (h + bh - 1) // bh if bh else 0


def _skip_transitions(w):
    # 6.5: a skipped row segment moves the DQ state w times along parity-0 transitions; the cycles of
    # StateTransTab[.][0] have length 1, 2 or 4.
    t = list(range(8))
    for _ in range(w % 4):
        t = [StateTransTab[s][0] for s in t]
    return t


def _flat_ints(values, count, what):
    if hasattr(values, "ravel"):
        values = values.ravel()  # numpy: row-major
    if hasattr(values, "tolist"):
        values = values.tolist()
    out = [int(v) for v in values]
    if len(out) != count:
        raise ValueError("%s has %d elements, the tensor %d" % (what, len(out), count))
    return out


def dq_reconstruction_indices(coded_levels, coding, row_skip_enabled_flag=0):
    """Map coded levels k (row-major) to the QuantParam values n the decoder reconstructs (4.2).

    The state machine runs in scan order with the row-skip rule of 6.5, so any integer tensor k gives
    a valid input for encode_tensor_levels(). Without dq_flag this is the identity.
    """
    count, h, w, scan, bh, bw = _geometry(coding.dims, coding.scan_order)
    k = _flat_ints(coded_levels, count, "coded levels")
    if not coding.dq_flag:
        return k
    skip = _row_skip_flags(k, coding, row_skip_enabled_flag, h, w)
    skip_trans = _skip_transitions(w)
    n = [0] * count
    state = 0
    for by in range(0, h, bh):
        y_end = min(by + bh, h)
        for bx in range(0, w, bw):
            x_end = min(bx + bw, w)
            for y in range(by, y_end):
                if skip is not None and skip[y]:
                    state = skip_trans[state]
                    continue
                for pos in range(y * w + bx, y * w + x_end):
                    v = k[pos]
                    st = state
                    state = StateTransTab[st][v & 1]
                    if v:
                        n[pos] = 2 * v + ((1 if v < 0 else -1) if st & 1 else 0)
    return n


def _start_bins_present(coding, h, w):
    # 6.4: profile 1, w > 1, h > 1 (codebookSize == 1 codes no bins at all).
    return coding.profile == 1 and w > 1 and h > 1


def _row_skip_flags(levels, coding, row_skip_enabled_flag, h, w):
    """row_skip_flag[r] = 1 iff row r is all zero (NNCodec's rule), or None when not coded."""
    if not row_skip_enabled_flag or not _start_bins_present(coding, h, w):
        return None
    flags = bytearray(h)
    for r in range(h):
        row = levels[r * w:(r + 1) * w]
        flags[r] = 0 if any(row) else 1
    return flags


# --- the parameter optimizer (supplement 5.3) -------------------------------------------------------
def _est_bits_table():
    """EstBits[512 + i] for i = -512..511, as two lists indexable by i (negative i wraps)."""
    est = [None] * 1024
    for k in range(1, 512):
        est[k] = (EST_BITS_1_511[2 * k - 2], EST_BITS_1_511[2 * k - 1])
    est[0] = est[1]
    est[512] = (32968, 32568)
    for k in range(1, 512):
        b0, b1 = est[k]
        est[1024 - k] = (b1, b0)
    rotated = est[512:] + est[:512]
    return [e[0] for e in rotated], [e[1] for e in rotated]


_EST0, _EST1 = _est_bits_table()


def _estimator_tables(shift, size, step):
    """Next-state lists for one estimator (up on a 1, down on a 0), indexable by negative states."""
    up = [0] * size
    down = [0] * size
    half = size // 2
    # The reachable states (1.6: |pStateIdx0| <= 123, |pStateIdx1| <= 1923) stay clear of the ends.
    for s in range(1 - half, half):
        up[s] = s + (CurveTab[16 + (s >> step)] >> shift)
        down[s] = s - (CurveTab[16 + ((-s) >> step)] >> shift)
    return up, down


_FAST = {}
_SLOW = {}
for _row in CtxParameterList:
    if _row[0] + 4 not in _FAST:
        _FAST[_row[0] + 4] = _estimator_tables(_row[0] + 4, 256, 3)
    if _row[1] not in _SLOW:
        _SLOW[_row[1]] = _estimator_tables(_row[1], 4096, 7)

_RESET = 2  # marker in a pseudo-pass bin string: the estimators return to their initial states


def _set_id_costs(bins):
    """Accumulated EstBits of a context's bins for each of the nine initializations (5.3)."""
    costs = []
    e0 = _EST0
    e1 = _EST1
    for shift0, shift1, init0, init1 in CtxParameterList:
        up0, down0 = _FAST[shift0 + 4]
        up1, down1 = _SLOW[shift1]
        s0 = init0
        s1 = init1
        acc = 0
        for b in bins:
            if b == 1:
                acc += e1[((s0 << 4) + s1) >> 3]
                s0 = up0[s0]
                s1 = up1[s1]
            elif b == 0:
                acc += e0[((s0 << 4) + s1) >> 3]
                s0 = down0[s0]
                s1 = down1[s1]
            else:
                s0 = init0
                s1 = init1
        costs.append(acc)
    return costs


def _best_set_id(bins):
    """argmin over setId of the cost plus 3 bits (2^15 scale) for shift_idx_minus_1; ties to the smallest."""
    if not bins or bins.count(_RESET) == len(bins):
        return 0
    costs = _set_id_costs(bins)
    best = 0
    best_cost = costs[0]
    for s in range(1, 9):
        c = costs[s] + 3 * 32768
        if c < best_cost:
            best = s
            best_cost = c
    return best


# --- one tensor --------------------------------------------------------------------------------------
class _Tensor:
    """Everything about one tensor that both coding passes use."""

    def __init__(self, coding, levels, row_skip_enabled_flag, hist_dep_sig_prob_enabled_flag):
        self.coding = coding
        dims = coding.dims
        count, h, w, scan, bh, bw = _geometry(dims, coding.scan_order)
        self.count, self.h, self.w, self.scan, self.bh, self.bw = count, h, w, scan, bh, bw
        self.levels = levels = _flat_ints(levels, count, "levels")
        for v in levels:
            if v < _INT32_MIN or v > _INT32_MAX:
                raise ValueError("level %d does not fit in 32 bits" % v)
        self.dq = coding.dq_flag
        self.N = coding.cabac_unary_length_minus1 + 1
        profile = coding.profile
        self.S = S = coding.codebook_size if profile == 1 else 0
        self.Z = Z = coding.codebook_zero_offset
        self.cb = profile == 1 and S > 1
        self.max_abs = Z if Z > S - 1 - Z else S - 1 - Z
        self.sign_coded = not (self.cb and (Z == 0 or Z == S - 1))
        self.tca = profile == 1 and coding.tca_base is not None
        if self.tca:
            self.base = _flat_ints(coding.tca_base, count, "temporal context base")
        else:
            self.base = None
        start_bins = _start_bins_present(coding, h, w) and S != 1
        if hist_dep_sig_prob_enabled_flag and not coding.parent_node_id_present_flag:
            raise ValueError("hist_dep_sig_prob_enabled_flag needs parent_node_id_present_flag")
        self.hdsp = 1 if (hist_dep_sig_prob_enabled_flag and start_bins) else 0
        hist = coding.hdsp_history if profile == 1 else None
        if hist is not None and len(hist) != count:
            hist = None  # as payload._decode_one: a history of another shape is not used
        self.hist = hist if self.hdsp else None
        self.row_skip = _row_skip_flags(levels, coding, row_skip_enabled_flag, h, w) if start_bins else None
        self.use_eps = scan > 0 and h > bh
        self.skip_trans = _skip_transitions(w)
        if S == 1 and any(levels):
            raise ValueError("a codebook of one entry codes only QuantParam 0 (6.8)")

    def groups(self, factory):
        """The context groups of 2.3 in shift_parameter_ids() order; ``factory`` makes one context."""
        dq = self.dq
        N = self.N
        sig = [factory() for _ in range(24 if dq else 3)]
        sig_tca = [factory() for _ in range(16 if dq else 2)] if self.tca else []
        sig_hdsp = [factory() for _ in range(8 if dq else 1)] if self.hdsp else []
        sign = [factory() for _ in range(3)]
        sign_tca = [factory() for _ in range(2)] if self.tca else []
        gtx = [factory() for _ in range(2 * N)]
        gtx_tca = [factory() for _ in range(2 * N)] if self.tca else []
        gtx2 = [factory() for _ in range(31)]
        return (sig, sig_tca, sig_hdsp, sign, sign_tca, gtx, gtx_tca, gtx2)

    def shift_idx_present(self, kind, a):
        """6.8: whether shift_idx() is coded for context a of a group (always without a codebook)."""
        if not self.cb:
            return True
        N = self.N
        if kind == "sign":
            return self.sign_coded
        if kind == "gtx":
            return a < 2 * self.max_abs
        if kind == "gtx_tca":
            return a < 2 * (self.max_abs - 1)
        if kind == "gtx2":
            return (N - 1) + ((2 << a) - 1) < self.max_abs
        return True

    def code_levels(self, groups, dd, byp, pseudo, engine=None, reset_groups=None):
        """quant_tensor() for both passes: bins go to dd(ctx, bin) / byp(bin).

        The pseudo pass (5.3) follows NNCodec: it binarizes n rather than k, keeps nb across block
        rows, ignores the codebook limits, and only marks where the estimators are reset.
        """
        # The hot loop, one function on purpose: in Python a call per position costs more than its bins.
        sig, sig_tca, sig_hdsp, sign, sign_tca, gtx, gtx_tca, gtx2 = groups
        levels = self.levels
        h, w, bh, bw = self.h, self.w, self.bh, self.bw
        dq = self.dq
        N = self.N
        cb = self.cb and not pseudo
        S = self.S
        Z = self.Z
        sign_coded = self.sign_coded or pseudo
        inferred_sign = 1 if Z != 0 else 0
        tca = self.tca
        base = self.base
        hist = self.hist
        row_skip = self.row_skip
        skip_trans = self.skip_trans
        trans = StateTransTab
        use_eps = self.use_eps
        marks = []
        all_ctx = [c for g in groups for c in g] if (use_eps and pseudo) else None
        state = 0
        nb = 0
        for by in range(0, h, bh):
            if by > 0 and use_eps:
                if pseudo:
                    for c in all_ctx:
                        c.append(_RESET)
                else:
                    engine.reset_range()
                    marks.append((engine.t, engine.low & 511, state))
                    for g, ids in reset_groups:
                        _reset(g, ids)
                    nb = 0
            y_end = by + bh if by + bh < h else h
            for bx in range(0, w, bw):
                x_end = bx + bw if bx + bw < w else w
                for y in range(by, y_end):
                    if row_skip is not None and row_skip[y]:
                        if dq:
                            state = skip_trans[state]
                        continue
                    row = y * w
                    for pos in range(row + bx, row + x_end):
                        n = levels[pos]
                        # 4.2: the coded level k of the reconstruction index n in this state
                        k = n
                        if dq and n:
                            if state & 1:
                                if not n & 1:
                                    raise ValueError("level %d at position %d is even; DQ state %d reconstructs "
                                                     "odd multiples only" % (n, pos, state))
                                k = (n + (1 if n > 0 else -1)) >> 1
                            else:
                                if n & 1:
                                    raise ValueError("level %d at position %d is odd; DQ state %d reconstructs "
                                                     "even multiples only" % (n, pos, state))
                                k = n >> 1
                        v = n if pseudo else k
                        bv = base[pos] if tca else 0
                        # sig_flag (2.4 with the profile-1 overrides)
                        if hist is not None and hist[pos]:
                            c = sig_hdsp[state]
                        elif bv:
                            c = sig_tca[2 * state + (1 if bv > 1 or bv < -1 else 0)]
                        else:
                            c = sig[3 * state + (0 if nb == 0 else (1 if nb < 0 else 2))]
                        if not v:
                            dd(c, 0)
                            if dq:
                                state = trans[state][0]
                            nb = 0
                            continue
                        dd(c, 1)
                        s = 1 if v < 0 else 0
                        a = -v if s else v
                        if not sign_coded:
                            if s != inferred_sign:
                                raise ValueError("level %d at position %d has the wrong sign for a codebook with "
                                                 "CbZeroOffset %d (6.8)" % (n, pos, Z))
                        elif bv:
                            dd(sign_tca[0 if bv < 0 else 1], s)
                        else:
                            dd(sign[0 if nb == 0 else (1 if nb < 0 else 2)], s)
                        q = 1
                        if cb:
                            limit = Z if s else S - 1 - Z
                            if a > limit:
                                raise ValueError("level %d at position %d is outside the codebook range %d..%d"
                                                 % (n, pos, -Z, S - 1 - Z))
                        else:
                            limit = 0
                        if not cb or limit > 1:
                            # abs_level_greater_x[j]
                            absb = bv if bv >= 0 else -bv
                            j = 0
                            while True:
                                g = 1 if a > q else 0
                                if bv:
                                    dd(gtx_tca[2 * j + (0 if absb >= j else 1)], g)
                                else:
                                    dd(gtx[2 * j + s], g)
                                q += g
                                j += 1
                                if not g or j >= N or (cb and q >= limit):
                                    break
                            if g and (not cb or q < limit):
                                # abs_level_greater_x2: exp-Golomb prefix, then abs_remainder
                                rem_bits = 0
                                j = 0
                                while True:
                                    g = 1 if a - q >= (1 << rem_bits) else 0
                                    dd(gtx2[j], g)
                                    if g:
                                        q += 1 << rem_bits
                                        rem_bits += 1
                                    j += 1
                                    if not g or j > 30 or (cb and q + (1 << rem_bits) > limit):
                                        break
                                if not pseudo:
                                    r = a - q
                                    if r >> rem_bits:
                                        raise ValueError("level %d at position %d is too large to code" % (n, pos))
                                    for i in range(rem_bits - 1, -1, -1):
                                        byp((r >> i) & 1)
                        nb = v
                        if dq:
                            state = trans[state][k & 1]
        return marks


def _no_bypass(b):
    pass


class CodedTensor:
    """What encode_tensor_levels() decided for one tensor: the flags it coded and where its block rows
    start (``start_t`` None without entry points), resolved into header values by entry_point_lists()."""

    def __init__(self, hist_dep_sig_prob_enabled_flag, row_skip_flag, start_t=None, marks=()):
        self.hist_dep_sig_prob_enabled_flag = hist_dep_sig_prob_enabled_flag
        self.row_skip_flag = row_skip_flag
        self.start_t = start_t
        self.marks = marks


def encode_tensor_levels(engine, coding, levels, row_skip_enabled_flag=0, hist_dep_sig_prob_enabled_flag=0,
                         param_opt_flag=1, shift_set_ids=None):
    """The inverse of decode_tensor_levels(): code one tensor's QuantParam values (no qp_value).

    ``coding`` is the decoder's TensorCoding (its entry_points are ignored: they are produced here).
    ``row_skip_enabled_flag`` and ``hist_dep_sig_prob_enabled_flag`` are coded where 6.4 puts them;
    row_skip_flag[r] is 1 for every all-zero row. ``shift_set_ids``, one setId per context in
    shift_parameter_ids() order, replaces the parameter optimizer (param_opt_flag 0 means all 0).
    Returns a CodedTensor for entry_point_lists().
    """
    if _compiled is not None and shift_set_ids is None:
        # The compiled twin writes the same bins; it returns None for what it leaves to this path.
        coded = _compiled.encode_tensor_levels(engine, coding, levels, row_skip_enabled_flag,
                                               hist_dep_sig_prob_enabled_flag, param_opt_flag)
        if coded is not None:
            return coded
    t = _Tensor(coding, levels, row_skip_enabled_flag, hist_dep_sig_prob_enabled_flag)
    if t.count == 0 or t.S == 1:
        # 6.8: a one-entry codebook codes no bins at all. The header still lists its entry points;
        # they point at the end of the (empty) tensor and the decoder does not use them.
        rows = (t.h + t.bh - 1) // t.bh if t.use_eps else 1
        return CodedTensor(0, None, engine.t if t.use_eps else None, [(engine.t, None, 0)] * (rows - 1))
    groups = t.groups(lambda: _ctx(0))
    kinds = (None, None, None, "sign", "sign", "gtx", "gtx_tca", "gtx2")

    # 2.1 step 3 / 6.4: profile-1 bins at the start of the tensor.
    if _start_bins_present(coding, t.h, t.w):
        if coding.parent_node_id_present_flag:
            engine.encode_bypass(t.hdsp)
        engine.encode_bypass(1 if t.row_skip is not None else 0)
        if t.row_skip is not None:
            row_skip_ctx = _ctx(0)
            for r in range(t.h):
                engine.encode_decision(row_skip_ctx, t.row_skip[r])

    # 5.3: the pseudo pass collects each context's bins; the cheapest initialization wins.
    if shift_set_ids is not None:
        shift_set_ids = list(shift_set_ids)
        total = sum(len(g) for g in groups)
        if len(shift_set_ids) != total or not all(0 <= x <= 8 for x in shift_set_ids):
            raise ValueError("shift_set_ids needs %d setIds in 0..8, one per context" % total)
    elif param_opt_flag:
        bins = t.groups(bytearray)
        t.code_levels(bins, bytearray.append, _no_bypass, True)
    # 2.6: shift_parameter_ids(); the sign group of the decoder is SignCtx followed by SignTcaCtx.
    shift_flag = _ctx(0)
    reset_groups = []
    index = 0
    for members in ((0,), (1,), (2,), (3, 4), (5,), (6,), (7,)):
        group = []
        ids = []
        for m in members:
            for i, ctx in enumerate(groups[m]):
                present = t.shift_idx_present(kinds[m], i)
                if shift_set_ids is not None:
                    set_id = shift_set_ids[index]
                    if set_id and not present:
                        raise ValueError("context %d has no shift_idx() (6.8): its setId is 0" % index)
                else:
                    # (d): an absent shift_idx() leaves setId 0 whatever the costs
                    set_id = _best_set_id(bins[m][i]) if (param_opt_flag and present) else 0
                index += 1
                if present:
                    engine.encode_decision(shift_flag, 1 if set_id else 0)
                    if set_id:
                        engine.uae(3, set_id - 1)
                group.append(ctx)
                ids.append(set_id)
        _reset(group, ids)
        reset_groups.append((group, ids))

    start_t = None
    if t.use_eps:
        # 1.11: IvlCurrRange = 256 before the first parameter as well.
        engine.reset_range()
        start_t = engine.t
    marks = t.code_levels(groups, engine.encode_decision, engine.encode_bypass, False, engine, reset_groups)
    return CodedTensor(t.hdsp, t.row_skip, start_t, marks)


def entry_point_lists(engine, coded_tensors):
    """cabac_offset_list, dq_state_list and BitOffsetList (1.11) of a finished segment."""
    cabac_offset_list = []
    dq_state_list = []
    bit_offset_list = []
    for ep in coded_tensors:
        if ep.start_t is None:
            continue
        prev = ep.start_t
        for t, low9, state in ep.marks:
            offset = 0 if low9 is None else engine.ivl_offset_at(t, low9)
            assert offset < 256, "IvlOffset %d at an entry point with IvlCurrRange 256" % offset
            cabac_offset_list.append(offset)
            dq_state_list.append(state)
            bit_offset_list.append(t - prev)
            prev = t
    return cabac_offset_list, dq_state_list, bit_offset_list


# --- one segment ------------------------------------------------------------------------------------------
def block_roles(compressed_parameter_types):
    """7.3.5: the tensors of an NNR_PT_BLOCK NDU, in topology_elements_ids_list order and in payload order.

    Roles: "W" (or "G", "H" with NNR_CPT_DC), "LS", "beta", "gamma", "mean", "var", "BI".
    """
    cpt = compressed_parameter_types
    weight = ["G", "H"] if cpt & NNR_CPT_DC else ["W"]
    extra = (["LS"] if cpt & NNR_CPT_LS else []) + (["beta", "gamma", "mean", "var"] if cpt & NNR_CPT_BN else [])
    ids = weight + extra + (["BI"] if cpt & NNR_CPT_BI else [])
    payload = [r for r in ("LS", "BI", "beta", "gamma", "mean", "var") if r in ids] + weight
    return ids, payload


class SegmentTensor:
    """One tensor of an NDU segment: QuantParam levels and how they are coded.

    ``qp_value`` is None for NNR_PT_INT (no quant_param()); otherwise it is coded as iae(6 + qp_density).
    ``hist_dep_sig_prob_enabled_flag`` None lets encode_segment() choose (5.6).
    """

    def __init__(self, levels, coding, qp_value=None, qp_density=0, row_skip_enabled_flag=0,
                 hist_dep_sig_prob_enabled_flag=0, param_opt_flag=1, shift_set_ids=None):
        self.levels = levels
        self.coding = coding
        self.qp_value = qp_value
        self.qp_density = qp_density
        self.row_skip_enabled_flag = row_skip_enabled_flag
        self.hist_dep_sig_prob_enabled_flag = hist_dep_sig_prob_enabled_flag
        self.param_opt_flag = param_opt_flag
        self.shift_set_ids = shift_set_ids


class Segment:
    """A finished segment: ``data``, the entry-point lists for the NDU header, and per tensor the
    hist_dep_sig_prob_enabled_flag and row_skip_flag[] that were coded (CodedTensor)."""

    def __init__(self, data, cabac_offset_list, dq_state_list, BitOffsetList, tensors):
        self.data = data
        self.cabac_offset_list = cabac_offset_list
        self.dq_state_list = dq_state_list
        self.BitOffsetList = BitOffsetList
        self.tensors = tensors

    def header_fields(self, dq_flag):
        """The NDU header's entry-point elements (dq_state_list only with dq_flag)."""
        return {"cabac_offset_list": list(self.cabac_offset_list),
                "dq_state_list": list(self.dq_state_list) if dq_flag else [],
                "BitOffsetList": list(self.BitOffsetList)}


def _encode_segment_once(tensors, hdsp):
    engine = ArithmeticEncoder()
    coded = []
    for item in tensors:
        if item.qp_value is not None:
            engine.iae(6 + item.qp_density, item.qp_value)
        flag = item.hist_dep_sig_prob_enabled_flag
        coded.append(encode_tensor_levels(engine, item.coding, item.levels, item.row_skip_enabled_flag,
                                          hdsp if flag is None else flag, item.param_opt_flag,
                                          item.shift_set_ids))
    engine.finish()
    lists = entry_point_lists(engine, coded)
    return Segment(engine.data, lists[0], lists[1], lists[2], coded)


def encode_segment(tensors):
    """Encode the tensors of one NDU, in payload order (7.3.5 for NNR_PT_BLOCK), into one segment.

    With ``hist_dep_sig_prob_enabled_flag`` None, the segment is coded with HDSP off and on when every
    such tensor has a history and parent signalling, and the shorter is kept (off on a tie), as 5.6.
    """
    auto = [item for item in tensors if item.hist_dep_sig_prob_enabled_flag is None]
    best = _encode_segment_once(tensors, 0)
    if auto and all(item.coding.hdsp_history is not None and item.coding.parent_node_id_present_flag
                    and item.coding.profile == 1 for item in auto):
        other = _encode_segment_once(tensors, 1)
        if len(other.data) < len(best.data):
            best = other
    return best
