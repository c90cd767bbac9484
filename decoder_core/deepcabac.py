"""DeepCABAC decoding (clause 10 and the supplement, sections 1, 2, 3 and 6): the arithmetic
decoding engine, the context models, and quant_tensor() for one tensor.

This is the pure-Python backend; decoder_core/_deepcabac.pyx mirrors decode_tensor_levels() with the
same signature.
"""

import sys
from array import array

from .compat import zeros
from .errors import NNCError
from .limits import DEFAULT_MAX_BINS_PER_TENSOR, exceeded
from .tables import CtxParameterList, CurveTab, RangeTabLps, StateTransTab

_MICROPYTHON = sys.implementation.name == "micropython"

# Number of left shifts that bring an LPS range (2..228) back to at least 256.
_RENORM = bytearray(256)
for _r in range(1, 256):
    _n = 0
    while (_r << _n) < 256:
        _n += 1
    _RENORM[_r] = _n


def _table(typecode, values):
    """A constant table of the position loop: an array on MicroPython (half the memory of a tuple or
    less), a tuple on CPython (where an array makes an int object per item read)."""
    return array(typecode, values) if _MICROPYTHON else tuple(values)


# The tables below are computed into this list, not a new list each: on MicroPython a list per
# table would be garbage between the tables, holes too small for a slice array later.
_SCRATCH = [0] * 64


# The position loop's forms of the tables. It keeps R = IvlCurrRange << 7 and a context as
# [16 * pStateIdx0 + 4096, pStateIdx1, _STEPS[set id], next] (_context), so that its
# t = (16 * pStateIdx0 + 4096 + pStateIdx1) >> 7 is (pStateIdx >> 7) + 32 for pStateIdx = 16 * pStateIdx0 +
# pStateIdx1: _LPS_ROWS[R >> 12][t] = rangeTabLps[(IvlCurrRange & 0xE0) + |t - 32|] << 7. (The
# reachable states, |pStateIdx0| <= 123 and |pStateIdx1| <= 1923, keep t in 1..63.) 1 KiB.
_LPS_ROWS = [None] * 16
for _r in range(8):
    for _t in range(64):
        _SCRATCH[_t] = RangeTabLps[min(32 * _r + (32 - _t if _t < 32 else _t - 32), 255)] << 7
    _LPS_ROWS[8 + _r] = _table("H", _SCRATCH)
# The estimators' steps (1.6) in one table per (shift0, shift1): on a 1 the first entry of a context
# moves by d[c[0] >> 7] (16 times pStateIdx0's step; indexes 16..47) and pStateIdx1 by d[c[1] >> 7]
# (indexes 0..15 and, negative, 48..63); on a 0 by -d[(8192 - c[0]) >> 7] and -d[-c[1] >> 7].
# _STEPS[set id]: the 4 tables of CtxParameterList's 4 pairs, 576 bytes.
_STEPS = [None] * len(CtxParameterList)
for _k in range(len(_STEPS)):
    _row = CtxParameterList[_k]
    for _set in range(_k):
        if CtxParameterList[_set][0] == _row[0] and CtxParameterList[_set][1] == _row[1]:
            _STEPS[_k] = _STEPS[_set]
            break
    else:
        for _i in range(64):
            _SCRATCH[_i] = ((CurveTab[_i - 16] >> (_row[0] + 4)) << 4 if 16 <= _i < 48 else
                            CurveTab[(_i + 16) % 32] >> _row[1])
        _STEPS[_k] = _table("H", _SCRATCH)
del _SCRATCH
# StateTransTab for 3 * state: _TRANS3[3 * state + parity] = 3 * StateTransTab[state][parity].
_TRANS3 = [0] * (3 * len(StateTransTab))
for _r in range(len(StateTransTab)):
    _TRANS3[3 * _r] = 3 * StateTransTab[_r][0]
    _TRANS3[3 * _r + 1] = 3 * StateTransTab[_r][1]

# Both bounds are constants: on MicroPython they are big ints, and computing -_INT32_MAX - 1 per
# level would allocate.
_INT32_MAX = 0x7FFFFFFF
_INT32_MIN = -0x80000000


class ArithmeticDecoder:
    """The 9-bit engine of supplement 1.1-1.9 in the scaled form of 1.10.

    ``value`` holds IvlOffset << 7 plus up to 7 look-ahead bits; ``bits_needed`` is -8..-1.
    The standard's bit pointer (relative to the segment start) is 8 * (p - start) + bits_needed + 1.
    """

    def __init__(self, data, start, end):
        self.data = data
        self.start = start
        self.end = end
        self.p = start
        # Streaming (decoder_core.incremental): ``end`` is where the bytes that have arrived end,
        # ``seg_end`` the segment's end once known (else None), and decoding stops for input before a
        # parameter once ``p`` has passed ``safe``. Positions are indexes into ``data``.
        self.seg_end = end
        self.safe = WHOLE
        # 1.3: IvlCurrRange = 510, IvlOffset = read_bits(9)
        self.range = 510
        self.value = (self._fetch() << 8) | self._fetch()
        self.bits_needed = -8

    def _fetch(self):
        p = self.p
        if p >= self.end:
            raise NNCError("arithmetic-coded data runs past the end of the NNR unit", p, "ae(v)")
        self.p = p + 1
        return self.data[p]

    def left(self):
        """Bytes of the segment not read yet, or None while its end is unknown."""
        return None if self.seg_end is None else self.seg_end - self.p

    def get_bit_pointer(self):
        return 8 * (self.p - self.start) + self.bits_needed + 1

    def ivl_offset(self):
        return self.value >> 7

    def decode_decision(self, ctx):
        """1.5-1.7: one context-coded bin; ctx = [pStateIdx0, pStateIdx1, shift0 + 4, shift1]."""
        s0 = ctx[0]
        s1 = ctx[1]
        p = 16 * s0 + s1
        rng = self.range
        q = p >> 7
        lps = RangeTabLps[(rng & 0xE0) + (q if q >= 0 else -q)]
        rng -= lps
        scaled = rng << 7
        value = self.value
        if value < scaled:
            b = 1 if p >= 0 else 0
            if rng < 256:
                rng <<= 1
                value <<= 1
                bn = self.bits_needed + 1
                if bn == 0:
                    bn = -8
                    value += self._fetch()
                self.bits_needed = bn
        else:
            b = 0 if p >= 0 else 1
            n = _RENORM[lps]
            value = (value - scaled) << n
            rng = lps << n
            bn = self.bits_needed + n
            if bn >= 0:
                value += self._fetch() << bn
                bn -= 8
            self.bits_needed = bn
        self.range = rng
        self.value = value
        # 1.6: two-rate estimator update
        if b:
            ctx[0] = s0 + (CurveTab[16 + (s0 >> 3)] >> ctx[2])
            ctx[1] = s1 + (CurveTab[16 + (s1 >> 7)] >> ctx[3])
        else:
            ctx[0] = s0 - (CurveTab[16 + ((-s0) >> 3)] >> ctx[2])
            ctx[1] = s1 - (CurveTab[16 + ((-s1) >> 7)] >> ctx[3])
        return b

    def decode_bypass(self):
        """1.8"""
        value = self.value << 1
        bn = self.bits_needed + 1
        if bn >= 0:
            bn = -8
            value += self._fetch()
        self.bits_needed = bn
        scaled = self.range << 7
        if value >= scaled:
            self.value = value - scaled
            return 1
        self.value = value
        return 0

    def uae(self, n):
        x = 0
        for _ in range(n):
            x = (x << 1) | self.decode_bypass()
        return x

    def iae(self, n):
        x = self.uae(n)
        if n and x >= 1 << (n - 1):
            x -= 1 << n
        return x

    def decode_terminate(self):
        """1.9"""
        rng = self.range - 2
        scaled = rng << 7
        if self.value >= scaled:
            self.range = rng
            return 1
        if rng < 256:
            rng <<= 1
            self.value <<= 1
            bn = self.bits_needed + 1
            if bn == 0:
                bn = -8
                self.value += self._fetch()
            self.bits_needed = bn
        self.range = rng
        return 0

    def terminate_cabac(self):
        """10.2.1.2 with the checks of 1.9: stop bit, nesting_zero_bits, and the end of the unit."""
        if not self.decode_terminate():
            raise NNCError("terminating_one_bit is 0", self.p, "terminate_cabac()")
        ptr = self.get_bit_pointer()
        seg_len = self.end - self.start
        last = ptr - 1
        if last < 0 or not (self.data[self.start + (last >> 3)] >> (7 - (last & 7))) & 1:
            raise NNCError("arithmetic-coded data does not end with its stop bit", self.p, "terminate_cabac()")
        if (ptr + 7) >> 3 != seg_len:
            raise NNCError("arithmetic-coded data ends %d bytes before the end of the NNR unit"
                           % (seg_len - ((ptr + 7) >> 3)), self.start + ((ptr + 7) >> 3), "terminate_cabac()")
        if ptr & 7 and self.data[self.start + (ptr >> 3)] & ((1 << (8 - (ptr & 7))) - 1):
            raise NNCError("nesting_zero_bit is 1", self.start + (ptr >> 3), "nesting_zero_bit")

    def reset_range(self):
        self.range = 256

    def fork(self):
        """A copy of the engine state, to look ahead without moving this engine."""
        e = ArithmeticDecoder(self.data, self.start, self.end)
        e.seg_end = self.seg_end
        e.p = self.p
        e.range = self.range
        e.value = self.value
        e.bits_needed = self.bits_needed
        return e

    def set_entry_point(self, ivl_offset, pointer, index=0):
        """1.11: IvlCurrRange = 256, IvlOffset = cabac_offset_list[j], set_bit_pointer(pointer).

        Decoding moves forward only: an entry point before the bits the previous block row has already
        read (NNCodec's streams have them equal) would make rows decode the same bits again, so a
        small payload could stand for unbounded work; it is refused.
        """
        seg_len = (self.seg_end if self.seg_end is not None else self.end) - self.start
        if pointer < 9 or pointer > 8 * seg_len:
            raise NNCError("entry point bit offset %d outside the segment" % pointer, self.start, "BitOffsetList")
        byte = pointer >> 3
        bit = pointer & 7
        if bit and byte >= seg_len:
            raise NNCError("entry point bit offset %d outside the segment" % pointer, self.start, "BitOffsetList")
        if self.get_bit_pointer() > pointer:
            raise NNCError("entry point %d at bit offset %d lies before bits already decoded" % (index, pointer),
                           self.start, "BitOffsetList")
        self.range = 256
        if bit == 0:
            self.p = self.start + byte
            self.bits_needed = -1
            self.value = ivl_offset << 7
        else:
            a = 8 - bit
            self.p = self.start + byte + 1
            self.bits_needed = -1 - a
            self.value = (ivl_offset << 7) + ((self.data[self.start + byte] & ((1 << a) - 1)) << (7 - a))


def _ctx(set_id):
    s = CtxParameterList[set_id]
    return [s[2], s[3], s[0] + 4, s[1]]


def _set_ctx(c, set_id):
    """_ctx(set_id) in an existing context."""
    s = CtxParameterList[set_id]
    c[0] = s[2]
    c[1] = s[3]
    c[2] = s[0] + 4
    c[3] = s[1]


def _reset(group, set_ids):
    for i in range(len(group)):
        _set_ctx(group[i], set_ids[i])


def _context(set_id):
    """A context as TensorSteps._positions uses it: [16 * pStateIdx0 + 4096, pStateIdx1, its steps
    (_STEPS), the next context of the unary ladder (set by _contexts)]. ArithmeticDecoder.decode_decision
    takes _ctx()'s form."""
    s = CtxParameterList[set_id]
    return [16 * s[2] + 4096, s[3], _STEPS[set_id], None]


def _reset_contexts(contexts, set_ids):
    for i in range(len(contexts)):
        set_id = set_ids[i]
        s = CtxParameterList[set_id]
        c = contexts[i]
        c[0] = 16 * s[2] + 4096
        c[1] = s[3]
        c[2] = _STEPS[set_id]


# Supplement 1.5: a context-coded bin that reads no bit lowers IvlCurrRange (at most 510) by at least 2
# (rangeTabLps >= 2), so at most 128 bins pass per bit read; a bypass bin reads one bit.
_BINS_PER_BIT = 128

# What TensorSteps.run() and TensorSteps.preamble() return.
NEED_INPUT = 0     # decoding stopped before a parameter because engine.p passed engine.safe
WINDOW_DONE = 1    # every position of the current output window is decoded
PREAMBLE_DONE = 2  # the bins before the first parameter are decoded

# engine.safe while every byte of the segment is present: decoding never stops for input.
WHOLE = 1 << 60


def lookahead_bytes(cabac_unary_length_minus1):
    """The most bytes the engine can read for one parameter: sig_flag, sign_flag, N
    abs_level_greater_x and 31 abs_level_greater_x2 decisions of at most 7 bits each (rangeTabLps >= 2
    renormalizes by at most 7), 31 abs_remainder bypass bits, the register's look-ahead byte, and
    the byte an entry point reads before its bits. The preamble's steps read less."""
    n = cabac_unary_length_minus1 + 1
    return (7 * (n + 33) + 31) // 8 + 4


def check_codable(engine, coding):
    """Refuse a tensor with more coded positions than the rest of the segment can hold.

    Every position that is coded at all (not in a skipped row, not a one-entry codebook) needs its
    sig_flag bin. Called before anything is allocated, so a header claiming a huge tensor over a few
    bytes is refused without work. Profile-1 row skipping (6.4) is looked ahead on a copy of the engine.
    """
    count = 1
    for d in coding.dims:
        count *= d
    if count == 0 or (coding.profile == 1 and coding.codebook_size == 1):
        return
    h = coding.dims[0]
    w = count // h
    coded = count
    if coding.profile == 1 and w > 1 and h > 1:
        peek = engine.fork()
        if coding.parent_node_id_present_flag:
            peek.decode_bypass()
        if peek.decode_bypass():
            ctx = _ctx(0)
            for _ in range(h):
                if peek.decode_decision(ctx):
                    coded -= w
    _check_coded(coded, engine.end - engine.p, engine)


def _check_coded(coded, left, engine):
    # The unread bytes plus at most 16 bits already in IvlOffset and its look-ahead.
    if coded > _BINS_PER_BIT * (8 * left + 17):
        raise NNCError("a tensor of %d coded positions cannot fit in the %d bytes left of the segment"
                       % (coded, left), engine.p, "quant_tensor()")


class TensorCoding:
    """How one tensor is coded: everything decode_tensor_levels() needs besides the engine.

    ``tca_base`` (the previous integer tensor, 6.6) and ``hdsp_history`` (6.7) are whole arrays for
    the whole-tensor decoders; TensorSteps reads them per output window instead (set_window), and only
    needs ``tca`` and ``history`` to say whether they exist.
    """

    def __init__(self, dims, dq_flag, cabac_unary_length_minus1, scan_order=0, profile=0,
                 codebook_size=0, codebook_zero_offset=0, entry_points=None, tca_base=None,
                 hdsp_history=None, parent_node_id_present_flag=0):
        self.dims = dims
        self.dq_flag = dq_flag
        self.cabac_unary_length_minus1 = cabac_unary_length_minus1
        self.scan_order = scan_order
        self.profile = profile
        self.codebook_size = codebook_size
        self.codebook_zero_offset = codebook_zero_offset
        # entry_points: (cabac_offset_list, dq_state_list, BitOffsetList, first index) or None
        self.entry_points = entry_points
        self.tca_base = tca_base
        self.hdsp_history = hdsp_history
        self.tca = profile == 1 and tca_base is not None
        self.history = profile == 1 and hdsp_history is not None
        self.parent_node_id_present_flag = parent_node_id_present_flag
        # Optional (compiled backend): an object with ``workers`` and ``run(n, fn)`` that runs the
        # chunks of block rows (entry points, supplement 1.11) concurrently.
        self.runner = None
        # Limits.max_bins_per_tensor: the most bins (context-coded and bypass) the tensor may take.
        self.max_bins = DEFAULT_MAX_BINS_PER_TENSOR
        # Optional dict of context objects TensorSteps reuses (see _contexts; incremental.SliceBuffers).
        self.context_pool = None


def decode_tensor_levels(engine, coding, out=None):
    """Contexts, the profile-1 start bins, shift_parameter_ids() and quant_tensor() of one tensor.

    Returns QuantParam (after the dependent-quantization mapping) as array('i') in row-major order,
    or, when ``out`` (a writable buffer of 4-byte items; CPython) is given, copied into it and ``out``.
    """
    levels = _decode_whole(engine, coding, "i", None)
    if out is None:
        return levels
    memoryview(out).cast("B")[:] = memoryview(levels).cast("B")
    return out


def decode_tensor_values(engine, coding, value_of):
    """decode_tensor_levels storing ``value_of(QuantParam)`` (the reconstructed value) into an
    array('f'): one buffer for the tensor instead of its int32 levels and float32 values."""
    return _decode_whole(engine, coding, "f", value_of)


def _decode_whole(engine, coding, typecode, value_of):
    steps = TensorSteps(engine, coding, value_of)
    out = zeros(typecode, steps.count)
    if steps.count:
        steps.set_window(0, steps.count, out, coding.tca_base, coding.hdsp_history if coding.history else None)
        if steps.run() != WINDOW_DONE:
            raise NNCError("arithmetic-coded data runs past the end of the NNR unit", engine.p, "ae(v)")
    return out


class TensorSteps:
    """quant_tensor() of one tensor (supplement 2, 3 and 6.4-6.8) that can stop between parameters.

    The tensor is produced in output windows of row-major positions: set_window(lo, hi, out, base,
    hist) gives the buffers for positions lo .. hi-1, each indexed by position - lo (``out`` starts
    zeroed; ``base`` holds the TCA base and ``hist`` the HDSP history of those positions when the
    coding has them). run() decodes until the window is complete (WINDOW_DONE) or until the engine
    has passed ``engine.safe`` (NEED_INPUT: add input, move engine.safe, run() again). A streaming
    caller keeps ``engine.safe`` at least ``lookahead`` bytes before the end of what has arrived, so a
    parameter never runs out of bytes in the middle. Windows follow each other (window_end() says how
    far the next may reach); a block scan (scan_order > 0) needs whole block rows in a window.

    The preamble (profile-1 start bins, row-skip flags, shift_parameter_ids()) runs in preamble(),
    which run() calls; the compiled backend takes its result and runs its own position loop.

    A TensorSteps set anew with __init__ for the next tensor (slice decoding keeps one per stream)
    keeps its loops (generators): they take the next tensor when they see a new ``serial``. On
    MicroPython a generator is some hundred bytes, garbage per tensor otherwise.
    """

    def __init__(self, engine, coding, value_of=None):
        dims = coding.dims
        count = 1
        for d in dims:
            count *= d
        h = dims[0] if dims else 1
        self.count = count
        self.h = h
        self.w = count // h if h else 0
        scan = coding.scan_order if len(dims) > 1 else 0
        self.block_scan = scan > 0
        self.bh = self.bw = 4 << scan
        if not scan:
            self.bh = h
            self.bw = self.w
        self.lookahead = lookahead_bytes(coding.cabac_unary_length_minus1)
        self.engine = engine
        self.coding = coding
        self.value_of = value_of
        self.lo = self.hi = 0
        self.out = self.base = self.hist = None
        # Set by preamble().
        self.nbins = 0
        self.hdsp = 0
        self.row_skip = None
        self.set_ids = None
        self.use_eps = False
        self.serial += 1  # the class's 0 at first
        loops = self._loops
        if loops is None:
            # run()'s and preamble()'s generators (made on first use), and whether each waits for
            # the next tensor, its last one done.
            self._loops = [None, None, True, True]
        else:
            for k in (0, 1):
                if not loops[k + 2]:
                    # Stopped inside its tensor (the stream was given up there): it cannot take this one.
                    loops[k] = None
                    loops[k + 2] = True

    def window_end(self, lo, n):
        """Where a window starting at ``lo`` (where the previous one ended) ends: at most ``n``
        positions, but whole block rows for a block scan (at least one)."""
        if not self.block_scan:
            end = lo + (n if n > 0 else 1)
        else:
            rows = self.bh * self.w
            end = lo + rows
            while end + rows <= lo + n:
                end += rows
        return end if end < self.count else self.count

    def set_window(self, lo, hi, out, base=None, hist=None):
        self.lo = lo
        self.hi = hi
        self.out = out
        self.base = base
        self.hist = hist

    def _window(self):
        return self.out, self.lo, self.hi, self.base, self.hist

    serial = 0
    _loops = None
    _ids = None  # the set ids' buffer (id_buffer)

    def id_buffer(self, count):
        """A bytearray for the ``count`` set ids (0..8) preamble() decodes, sized up front (appending
        regrows it on a small heap) and kept for the next tensor set anew with as many."""
        ids = self._ids
        if ids is None or len(ids) != count:
            ids = self._ids = bytearray(count)
        return ids

    def run(self):
        return self._resume(0)

    def preamble(self):
        """Decode the bins before the first parameter (2.1 step 3, 6.4, 2.6) as far as the input
        allows: NEED_INPUT, or PREAMBLE_DONE once ``hdsp``, ``row_skip``, ``set_ids``, ``use_eps``
        and ``nbins`` are set (again PREAMBLE_DONE until the next tensor)."""
        return self._resume(1)

    def _resume(self, k):
        loops = self._loops
        loop = loops[k]
        if loop is None:
            loop = loops[k] = self._positions() if k == 0 else _preambles(self)
        try:
            return next(loop)
        except BaseException:
            loops[k] = None  # a loop that raised has ended: the next tensor makes another
            raise

    def _positions(self):
        # The hot loop, one function on purpose: locals and inline bins; a call per bin would cost
        # more than the bin. Each decision site below is the same inline decode_decision() (1.5-1.7)
        # on the hot loop's context form (_context): each of the four ends of its branches (MPS or
        # LPS path, MPS 1 or 0) updates the estimators and acts on the bin's value itself.
        loops = self._loops
        while True:
            serial = self.serial
            loops[2] = False
            engine = self.engine
            coding = self.coding
            if self.count == 0 or (coding.profile == 1 and coding.codebook_size == 1):
                loops[2] = True
                while self.serial == serial:
                    yield WINDOW_DONE  # 6.8: a one-entry codebook codes no bins; every QuantParam is 0.
                continue
            while self.preamble() == NEED_INPUT:
                yield NEED_INPUT
            h = self.h
            w = self.w
            dq = coding.dq_flag
            N = coding.cabac_unary_length_minus1 + 1
            profile = coding.profile
            S = coding.codebook_size if profile == 1 else 0
            Z = coding.codebook_zero_offset
            tca = coding.tca
            hdsp_lookup = self.hdsp and coding.history  # 6.7: without an earlier decode the history is all 0
            row_skip = self.row_skip
            cb = profile == 1 and S > 1
            sign_coded = not (cb and (Z == 0 or Z == S - 1))
            # Tensors without a codebook, TCA base or HDSP history (the common case) take a path of
            # their own; the others the phase loop, which handles everything.
            general = cb or tca or hdsp_lookup
            value_of = self.value_of
            direct = value_of is None
            nbins = self.nbins
            max_bins = coding.max_bins

            # Every context, in the order of shift_parameter_ids() (2.6), from the set ids it decoded.
            ids = self.set_ids
            # sig_flag's contexts come first (offset 0); the other groups by their offsets.
            contexts, sign, offsets = _contexts(coding.context_pool, ids, dq, N, tca, self.hdsp)
            o_sig_tca, o_sig_hdsp, o_sign_tca, o_gtx, o_gtx_tca, o_gtx2 = offsets
            ladder0 = contexts[o_gtx]
            ladder1 = contexts[o_gtx + 1]

            bh = self.bh
            bw = self.bw
            block_scan = self.block_scan
            use_eps = self.use_eps
            if use_eps:
                bit_pointer = engine.get_bit_pointer()
                ep_offsets, ep_states, ep_bits, ep_first = coding.entry_points
                sum_offset = 0

            out, lo, hi, base, hist = self._window()
            sb = 0  # 3 * the dependent-quantization state: where its 3 sig_flag contexts start
            nbc = 0  # the previous QuantParam's class in context selection: 0 zero, 1 negative, 2 positive
            tr3 = _TRANS3
            # Parity-0 transitions repeated w times (6.5): the cycles have length 1, 2 or 4.
            skip_trans = _skip_transitions(w)
            # The engine's registers live in locals here (supplement 1.10's scaled form, as in
            # ArithmeticDecoder, with IvlCurrRange scaled as well: R = IvlCurrRange << 7): a bytecode
            # interpreter looks up an attribute or a global by name and a local by index, and this loop
            # runs for every parameter. They go back into the engine at every yield and wherever engine
            # methods run.
            lps_rows = _LPS_ROWS
            renorm = _RENORM
            data = engine.data
            p = engine.p
            end = engine.end
            safe = engine.safe
            R = engine.range << 7
            value = engine.value
            bn = engine.bits_needed
            block_row = 0
            for by in range(0, h, bh):
                if by > 0 and use_eps:
                    j = ep_first + block_row - 1
                    if j >= len(ep_bits):
                        raise NNCError("entry point %d missing from the NDU header" % j, p, "cabac_offset_list")
                    sum_offset += ep_bits[j]
                    pointer = bit_pointer + sum_offset
                    engine.p, engine.range, engine.value, engine.bits_needed = p, R >> 7, value, bn
                    for status in _reach_entry_point(engine, pointer, j):
                        yield status
                    engine.set_entry_point(ep_offsets[j], pointer, j)
                    p, end, safe = engine.p, engine.end, engine.safe
                    R, value, bn = engine.range << 7, engine.value, engine.bits_needed
                    if dq:
                        sb = 3 * ep_states[j]
                    _reset_contexts(contexts, ids)
                    nbc = 0
                block_row += 1
                y_end = by + bh if by + bh < h else h
                for bx in range(0, w, bw):
                    x_end = bx + bw if bx + bw < w else w
                    for y in range(by, y_end):
                        if row_skip is not None and row_skip[y]:
                            # 6.5: the segment stays 0 (out starts zeroed), nbc is unchanged, the DQ
                            # state moves w times.
                            if dq:
                                sb = 3 * skip_trans[sb // 3]
                            continue
                        row = y * w
                        for x in range(bx, x_end):
                            pos = row + x
                            if pos >= hi or p > safe:
                                engine.p, engine.range, engine.value, engine.bits_needed = p, R >> 7, value, bn
                                while pos >= hi:
                                    # Only in a raster scan: windows may end anywhere.
                                    self.nbins = nbins
                                    yield WINDOW_DONE
                                    out, lo, hi, base, hist = self._window()
                                while engine.p > engine.safe:
                                    yield NEED_INPUT
                                data, p, end, safe = engine.data, engine.p, engine.end, engine.safe
                            if nbins > max_bins:
                                raise _too_many_bins(max_bins, engine)
                            if general:
                                # sig_flag (2.4), then sign_flag, abs_level_greater_x[j] and
                                # abs_level_greater_x2[j] (2.2): one decision site for all of them, phase
                                # ``ph`` says which bin it is, and each phase picks the next context.
                                state = sb // 3
                                if tca:
                                    bv = base[pos - lo]
                                else:
                                    bv = 0
                                if hdsp_lookup and hist[pos - lo]:
                                    c = contexts[o_sig_hdsp + state]
                                elif bv:
                                    c = contexts[o_sig_tca + 2 * state + (1 if bv > 1 or bv < -1 else 0)]
                                else:
                                    c = contexts[sb + nbc]
                                ph = 0
                                while True:
                                    s0, s1, d, nx = c
                                    t = s0 + s1 >> 7
                                    lps = lps_rows[R >> 12][t]
                                    R -= lps
                                    if value < R:
                                        if R < 32768:
                                            R <<= 1
                                            value <<= 1
                                            bn += 1
                                            if not bn:
                                                if p >= end:
                                                    raise _past_end(p)
                                                bn = -8
                                                value += data[p]
                                                p += 1
                                        if t >= 32:
                                            c[0] = s0 + d[s0 >> 7]
                                            c[1] = s1 + d[s1 >> 7]
                                            b = 1
                                        else:
                                            c[0] = s0 - d[8192 - s0 >> 7]
                                            c[1] = s1 - d[-s1 >> 7]
                                            b = 0
                                    else:
                                        value -= R
                                        R = renorm[lps >> 7]
                                        value <<= R
                                        bn += R
                                        R = lps << R
                                        if bn >= 0:
                                            if p >= end:
                                                raise _past_end(p)
                                            value += data[p] << bn
                                            p += 1
                                            bn -= 8
                                        if t >= 32:
                                            c[0] = s0 - d[8192 - s0 >> 7]
                                            c[1] = s1 - d[-s1 >> 7]
                                            b = 0
                                        else:
                                            c[0] = s0 + d[s0 >> 7]
                                            c[1] = s1 + d[s1 >> 7]
                                            b = 1
                                    nbins += 1
                                    if ph == 0:
                                        # sig_flag
                                        if not b:
                                            break
                                        if sign_coded:
                                            c = contexts[o_sign_tca + (0 if bv < 0 else 1)] if bv else sign[nbc]
                                            ph = 1
                                            continue
                                        s = 1 if Z != 0 else 0
                                    elif ph == 1:
                                        s = b
                                    elif ph == 2:
                                        q += b
                                        j += 1
                                        if b and j < N and not (cb and q >= limit):
                                            if bv:
                                                c = contexts[o_gtx_tca + 2 * j + (0 if absb >= j else 1)]
                                            else:
                                                c = contexts[o_gtx + 2 * j + s]
                                            continue
                                        if b and (not cb or q < limit):
                                            ph = 3
                                            j = 0
                                            c = contexts[o_gtx2]
                                            continue
                                        break
                                    else:
                                        if b:
                                            q += 1 << rb
                                            rb += 1
                                        j += 1
                                        if b and j <= 30 and not (cb and q + (1 << rb) > limit):
                                            c = contexts[o_gtx2 + j]
                                            continue
                                        break
                                    # The sign is known: the magnitude's bins follow.
                                    ph = 1
                                    q = 1
                                    rb = 0
                                    limit = (Z if s else S - 1 - Z) if cb else 0
                                    if cb and limit <= 1:
                                        break
                                    absb = bv if bv >= 0 else -bv
                                    j = 0
                                    c = contexts[o_gtx_tca + (0 if absb >= 0 else 1)] if bv else contexts[o_gtx + s]
                                    ph = 2
                                if ph == 0:
                                    if dq:
                                        sb = tr3[sb]
                                    nbc = 0
                                    continue
                                if ph != 3:
                                    rb = 0
                            else:
                                # sig_flag (2.4)
                                c = contexts[sb + nbc]
                                s0, s1, d, nx = c
                                t = s0 + s1 >> 7
                                lps = lps_rows[R >> 12][t]
                                R -= lps
                                if value < R:
                                    if R < 32768:
                                        R <<= 1
                                        value <<= 1
                                        bn += 1
                                        if not bn:
                                            if p >= end:
                                                raise _past_end(p)
                                            bn = -8
                                            value += data[p]
                                            p += 1
                                    if t >= 32:
                                        c[0] = s0 + d[s0 >> 7]
                                        c[1] = s1 + d[s1 >> 7]
                                    else:
                                        c[0] = s0 - d[8192 - s0 >> 7]
                                        c[1] = s1 - d[-s1 >> 7]
                                        if dq:
                                            sb = tr3[sb]
                                        nbc = 0
                                        nbins += 1
                                        continue
                                else:
                                    value -= R
                                    R = renorm[lps >> 7]
                                    value <<= R
                                    bn += R
                                    R = lps << R
                                    if bn >= 0:
                                        if p >= end:
                                            raise _past_end(p)
                                        value += data[p] << bn
                                        p += 1
                                        bn -= 8
                                    if t >= 32:
                                        c[0] = s0 - d[8192 - s0 >> 7]
                                        c[1] = s1 - d[-s1 >> 7]
                                        if dq:
                                            sb = tr3[sb]
                                        nbc = 0
                                        nbins += 1
                                        continue
                                    else:
                                        c[0] = s0 + d[s0 >> 7]
                                        c[1] = s1 + d[s1 >> 7]
                                # sign_flag (2.2); a 1 is a negative QuantParam
                                c = sign[nbc]
                                s0, s1, d, nx = c
                                t = s0 + s1 >> 7
                                lps = lps_rows[R >> 12][t]
                                R -= lps
                                if value < R:
                                    if R < 32768:
                                        R <<= 1
                                        value <<= 1
                                        bn += 1
                                        if not bn:
                                            if p >= end:
                                                raise _past_end(p)
                                            bn = -8
                                            value += data[p]
                                            p += 1
                                    if t >= 32:
                                        c[0] = s0 + d[s0 >> 7]
                                        c[1] = s1 + d[s1 >> 7]
                                        s = 1
                                        c = ladder1
                                    else:
                                        c[0] = s0 - d[8192 - s0 >> 7]
                                        c[1] = s1 - d[-s1 >> 7]
                                        s = 0
                                        c = ladder0
                                else:
                                    value -= R
                                    R = renorm[lps >> 7]
                                    value <<= R
                                    bn += R
                                    R = lps << R
                                    if bn >= 0:
                                        if p >= end:
                                            raise _past_end(p)
                                        value += data[p] << bn
                                        p += 1
                                        bn -= 8
                                    if t >= 32:
                                        c[0] = s0 - d[8192 - s0 >> 7]
                                        c[1] = s1 - d[-s1 >> 7]
                                        s = 0
                                        c = ladder0
                                    else:
                                        c[0] = s0 + d[s0 >> 7]
                                        c[1] = s1 + d[s1 >> 7]
                                        s = 1
                                        c = ladder1
                                # abs_level_greater_x[j] for j < N, then abs_level_greater_x2[j - N]
                                # (2.2): a unary ladder of contexts, each naming the next ([3]). The first
                                # 0 ends it, and so does its end (31 abs_level_greater_x2 of 1).
                                j = 0
                                try:
                                    while True:
                                        s0, s1, d, nx = c
                                        t = s0 + s1 >> 7
                                        lps = lps_rows[R >> 12][t]
                                        R -= lps
                                        if value < R:
                                            if R < 32768:
                                                R <<= 1
                                                value <<= 1
                                                bn += 1
                                                if not bn:
                                                    if p >= end:
                                                        raise _past_end(p)
                                                    bn = -8
                                                    value += data[p]
                                                    p += 1
                                            if t >= 32:
                                                c[0] = s0 + d[s0 >> 7]
                                                c[1] = s1 + d[s1 >> 7]
                                                c = nx
                                                j += 1
                                            else:
                                                c[0] = s0 - d[8192 - s0 >> 7]
                                                c[1] = s1 - d[-s1 >> 7]
                                                break
                                        else:
                                            value -= R
                                            R = renorm[lps >> 7]
                                            value <<= R
                                            bn += R
                                            R = lps << R
                                            if bn >= 0:
                                                if p >= end:
                                                    raise _past_end(p)
                                                value += data[p] << bn
                                                p += 1
                                                bn -= 8
                                            if t >= 32:
                                                c[0] = s0 - d[8192 - s0 >> 7]
                                                c[1] = s1 - d[-s1 >> 7]
                                                break
                                            else:
                                                c[0] = s0 + d[s0 >> 7]
                                                c[1] = s1 + d[s1 >> 7]
                                                c = nx
                                                j += 1
                                except TypeError:
                                    # past the last context, whose successor is None
                                    nbins -= 1
                                nbins += j + 3
                                if j < N:
                                    q = j + 1
                                    rb = 0
                                else:
                                    rb = j - N
                                    q = N + (1 << rb)
                            if rb:
                                # abs_remainder: rb bypass bins (1.8), up to 12 at a time. While IvlOffset
                                # < IvlCurrRange, bin after bin is a long division of the bits by R; bad
                                # input can make IvlOffset >= IvlCurrRange, and then every bin is a 1.
                                nbins += rb
                                if rb < 13:
                                    value <<= rb
                                    bn += rb
                                    while bn >= 0:
                                        if p >= end:
                                            raise _past_end(p)
                                        value += data[p] << bn
                                        p += 1
                                        bn -= 8
                                    t = value // R
                                    if t >> rb:
                                        t = (1 << rb) - 1
                                    value -= t * R
                                    q += t
                                else:
                                    r = 0
                                    n = rb
                                    while n:
                                        m = n if n < 13 else 12
                                        n -= m
                                        value <<= m
                                        bn += m
                                        while bn >= 0:
                                            if p >= end:
                                                raise _past_end(p)
                                            value += data[p] << bn
                                            p += 1
                                            bn -= 8
                                        t = value // R
                                        if t >> m:
                                            t = (1 << m) - 1
                                        value -= t * R
                                        r = (r << m) + t
                                    q += r
                            if dq:
                                # 2.3: QuantParam from the level, and the next state
                                t = sb & 1
                                sb = tr3[sb + (q & 1)]
                                q += q - t
                            if s:
                                k = -q
                                nbc = 1
                            else:
                                k = q
                                nbc = 2
                            if rb > 28 and (k > _INT32_MAX or k < _INT32_MIN):
                                # (with rb <= 28, |QuantParam| < 2 * (256 + 2 ** 29) + 1)
                                raise NNCError("decoded level %d does not fit in 32 bits" % k, p, "int_param()")
                            if direct:
                                out[pos - lo] = k
                            else:
                                out[pos - lo] = value_of(k)
                if block_scan and y_end * w >= hi and y_end < h:
                    engine.p, engine.range, engine.value, engine.bits_needed = p, R >> 7, value, bn
                    self.nbins = nbins
                    yield WINDOW_DONE
                    out, lo, hi, base, hist = self._window()
                    data, p, end, safe = engine.data, engine.p, engine.end, engine.safe
            engine.p, engine.range, engine.value, engine.bits_needed = p, R >> 7, value, bn
            if nbins > max_bins:
                raise _too_many_bins(max_bins, engine)
            self.nbins = nbins
            loops[2] = True
            while self.serial == serial:
                # The last windows (after skipped rows, several may be left), until the next tensor.
                yield WINDOW_DONE


_SKIP_TRANSITIONS = {}


def _skip_transitions(w):
    """Each DQ state after w parity-0 transitions (6.5): the cycles have length 1, 2 or 4, so only
    w % 4 matters; four lists for the life of the process."""
    key = w % 4 if w % 4 else 4
    states = _SKIP_TRANSITIONS.get(key)
    if states is None:
        states = list(range(8))
        for _ in range(key):
            states = [StateTransTab[s][0] for s in states]
        _SKIP_TRANSITIONS[key] = states
    return states


def _past_end(p):
    return NNCError("arithmetic-coded data runs past the end of the NNR unit", p, "ae(v)")


def _reach_entry_point(engine, pointer, j):
    """Wait until the bytes at an entry point (1.11) have arrived. The bits between the previous block
    row's end and the entry point belong to no block row: they are skipped, not kept."""
    if engine.seg_end is not None and engine.start + (pointer >> 3) >= engine.seg_end:
        return  # outside the segment: set_entry_point refuses it
    if engine.get_bit_pointer() > pointer:
        return  # before bits already decoded: set_entry_point refuses it
    target = engine.start + (pointer >> 3)
    if engine.p < target:
        engine.p = target
    while engine.start + (pointer >> 3) > engine.safe:
        yield NEED_INPUT


# How many context layouts a pool keeps. A layout with TCA and HDSP is about 100 contexts (5 KB on
# MicroPython); an update's tensors mix layouts (TCA, HDSP, dependent quantization per tensor), so
# a small heap keeps only the last one and makes another anew when the layout changes (measured in
# tests/test_agent_micropython.py: 4.7 KB less live state during the updates, the same peak).
_POOL_LAYOUTS = 1 if _MICROPYTHON else 4


def _contexts(pool, ids, dq, N, tca, hdsp):
    """Every context of a tensor (_context's form), in the order of shift_parameter_ids() (2.6), set
    from the set ids it decoded; sign_flag's 3 contexts (a list of their own: the hot loop's fast
    path picks one per nonzero parameter); and the offsets into the first list of the groups
    sig_tca, sig_hdsp, sign_tca, gtx, gtx_tca and gtx2 (sig starts at 0). Offsets, not a list per
    group: about 0.7 KB less per layout on MicroPython. The contexts of gtx (abs_level_greater_x,
    index 2 * j + sign) and gtx2 (abs_level_greater_x2) also hold the unary ladder of either sign in
    themselves: [3] is the next context (gtx[2 * j + 2 + sign], after the last gtx2[0], after
    gtx2[30] None). With a ``pool`` (a dict; slice decoding keeps one per stream) the objects of an
    earlier tensor with the same layout are set anew instead of made: fewer allocations per tensor
    on a small heap."""
    key = (dq, N, tca, hdsp)
    entry = pool.get(key) if pool is not None else None
    if entry is not None:
        _reset_contexts(entry[0], ids)
        return entry
    contexts = [_context(i) for i in ids]
    k = 0
    starts = []
    for n, _ in _context_groups(dq, N, tca, hdsp):
        starts.append(k)
        k += n
    o_sign = starts[3]
    o_gtx = starts[4]
    o_gtx2 = starts[6]
    for i in range(2 * N):
        contexts[o_gtx + i][3] = contexts[o_gtx + i + 2] if i + 2 < 2 * N else contexts[o_gtx2]
    for i in range(30):
        contexts[o_gtx2 + i][3] = contexts[o_gtx2 + i + 1]
    entry = (contexts, contexts[o_sign:o_sign + 3], (starts[1], starts[2], o_sign + 3, o_gtx, starts[5], o_gtx2))
    if pool is not None:
        if len(pool) >= _POOL_LAYOUTS:
            pool.clear()  # layouts rarely change within a stream; keep the one or few in use
        pool[key] = entry
    return entry


def _context_groups(dq, N, tca, hdsp):
    """The context groups of shift_parameter_ids() (2.6) in decoding order, with their sizes; the
    sign group holds sign_flag's 3 contexts, then the 2 of its TCA variant."""
    return ((24 if dq else 3, None), ((16 if dq else 2) if tca else 0, None), ((8 if dq else 1) if hdsp else 0, None),
            (5 if tca else 3, "sign"), (2 * N, "gtx"), (2 * N if tca else 0, "gtx_tca"), (31, "gtx2"))


_GROUPS = {}


def _preamble_groups(dq, N, tca, hdsp):
    """_context_groups(), made once per layout: a tuple of tuples per tensor is garbage on a small heap."""
    key = 8 * N + (4 if dq else 0) + (2 if tca else 0) + (1 if hdsp else 0)  # an int: no key object
    groups = _GROUPS.get(key)
    if groups is None:
        if len(_GROUPS) >= 16:
            _GROUPS.clear()
        groups = _GROUPS[key] = _context_groups(dq, N, tca, hdsp)
    return groups


def _preambles(steps):
    """TensorSteps.preamble()'s loop: the bins before the first parameter of each tensor ``steps``
    is set to (2.1 step 3, 6.4, 2.6): the HDSP flag and row-skip flags of profile 1, then
    shift_parameter_ids(). Yields NEED_INPUT while it waits for bytes; stores what it decoded in
    ``steps`` (hdsp, row_skip, set_ids, use_eps, nbins), then yields PREAMBLE_DONE until the next
    tensor."""
    row_flag = _ctx(0)
    shift_flag = _ctx(0)
    loops = steps._loops
    while True:
        serial = steps.serial
        loops[3] = False
        engine = steps.engine
        coding = steps.coding
        h = steps.h
        w = steps.w
        profile = coding.profile
        nbins = 0
        hdsp = 0
        row_skip = None
        while engine.p > engine.safe:
            yield NEED_INPUT
        if profile == 1 and w > 1 and h > 1:
            if coding.parent_node_id_present_flag:
                hdsp = engine.decode_bypass()
                nbins += 1
            nbins += 1
            if engine.decode_bypass():
                row_skip = bytearray(h)
                nbins += h
                _set_ctx(row_flag, 0)
                for r in range(h):
                    while engine.p > engine.safe:
                        yield NEED_INPUT
                    row_skip[r] = engine.decode_decision(row_flag)
        left = engine.left()
        if left is not None and steps.count:
            skipped = 0
            if row_skip is not None:
                for r in range(h):
                    skipped += row_skip[r]
            _check_coded(steps.count - skipped * w, left, engine)

        dq = coding.dq_flag
        N = coding.cabac_unary_length_minus1 + 1
        S = coding.codebook_size if profile == 1 else 0
        Z = coding.codebook_zero_offset
        cb = profile == 1 and S > 1
        max_abs = Z if Z > S - 1 - Z else S - 1 - Z
        sign_coded = not (cb and (Z == 0 or Z == S - 1))
        _set_ctx(shift_flag, 0)
        groups = _preamble_groups(dq, N, coding.tca, hdsp)
        count = 0
        for size, _ in groups:
            count += size
        ids = steps.id_buffer(count)
        k = 0
        for size, kind in groups:
            for a in range(size):
                present = True
                if cb:
                    # 6.8: which shift_idx() are present with a profile-1 codebook
                    if kind == "sign":
                        present = sign_coded
                    elif kind == "gtx":
                        present = a < 2 * max_abs
                    elif kind == "gtx_tca":
                        present = a < 2 * (max_abs - 1)
                    elif kind == "gtx2":
                        present = (N - 1) + ((2 << a) - 1) < max_abs
                set_id = 0
                if present:
                    while engine.p > engine.safe:
                        yield NEED_INPUT
                    nbins += 1
                    if engine.decode_decision(shift_flag):
                        set_id = 1 + engine.uae(3)
                        nbins += 3
                ids[k] = set_id
                k += 1
        eps = coding.entry_points
        use_eps = steps.block_scan and h > steps.bh and eps is not None
        if use_eps:
            # 1.11: IvlCurrRange = 256 before the first parameter as well.
            engine.reset_range()
        steps.hdsp = hdsp
        steps.row_skip = row_skip
        steps.set_ids = ids
        steps.use_eps = use_eps
        steps.nbins = nbins
        loops[3] = True
        while steps.serial == serial:
            yield PREAMBLE_DONE


def _too_many_bins(max_bins, engine):
    return exceeded("max_bins_per_tensor", "the number of bins decoded for the tensor", max_bins, engine.p,
                    "quant_tensor()")
