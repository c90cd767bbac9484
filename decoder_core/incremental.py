"""Constant-memory decoding: NDU payloads decoded while their bytes arrive, tensors out in slices.

``StreamDecoder(slice_elements=N)`` hands its input to a SliceFramer. The framer reads
nnr_unit_size() and the unit header (6.2, 6.3.2); an NDU's payload bytes then go into a window of
fixed size (PayloadInput) from which the arithmetic decoder reads, and payload_slices() decodes as far
as the bytes allow, stopping between parameters (deepcabac.TensorSteps). A partial-data sequence
(6.4.3.1) is one payload whose bytes arrive in several units. Tensors come out as slices of at most N
row-major elements: (name, shape, start, values).

What stays in memory does not depend on the size of a tensor or of a unit: the window, one slice of
levels and values, the contexts, and the row-skip flags of the current tensor (one byte per row).
Three layouts cost more:
- a block scan (scan_order > 0) produces whole block rows (4 << scan_order rows): a slice may hold
  a block row, whatever N;
- a tensor coded with a topology_tensor_dimension_mapping() (TensorSplit / AxisSwap of several
  topology elements in one NDU) is only known in row-major order once whole: it comes out as one
  slice per element, and memory follows that tensor;
- an aggregate unit (NNR_AGG) and every unit other than an NDU is held whole until its last byte
  (NDUs inside an aggregate unit then come out in slices like any other): memory follows that unit.

Update chains read and write their state per slice through a chain state (MemoryChainState here,
files elsewhere), so that the TCA base and HDSP history of a tensor need not be in memory either.

Checks that need the unit's end (terminate_cabac(), the payload's length) run when its last byte
arrives; a stream that fails after slices were emitted raises NNCError then, and whoever stored the
slices discards them.

Pure Python for CPython and MicroPython; on CPython the compiled backend runs the position loop.
"""

import sys
from array import array

from . import backend
from .compat import from_raw, zeros
from .deepcabac import NEED_INPUT, WHOLE, ArithmeticDecoder, TensorCoding, TensorSteps, lookahead_bytes
from .errors import Incomplete, NNCError, move_offset
from .payload import _block_roles, _entry_points, _prod, _split
from .reconstruction import LevelHalves, level_values, step_size
from .tables import NNR_CPT_DC, NNR_NDU, NNR_PT_BLOCK, NNR_PT_FLOAT, NNR_PT_INT, NNR_PT_RAW_FLOAT
from .units import nnr_unit_size, parse_unit_header

_MICROPYTHON = sys.implementation.name == "micropython"
try:
    # MicroPython: float tensors are decoded as int32 levels into their float32 array and turned
    # into values in place (reconstruction.LevelHalves), with no float object per table entry.
    import uctypes as _uctypes
except ImportError:
    _uctypes = None

# The window always holds two parameters' worth of look-ahead of the longest unary binarization.
_MIN_WINDOW = 2 * lookahead_bytes(255) + 64
# Levels whose value LevelHalves keeps in a table (4 bytes each); the others (about 40 % on
# silero-vad) are computed per parameter in small integers. A larger table is faster and bigger.
_HALVES_RADIUS = 31
# Header bytes tried first; doubled while the header goes on past them. A probe buffer up to
# _KEPT_PROBE bytes is kept for the next NDU header.
_FIRST_PROBE = 64
_KEPT_PROBE = 256
# What SliceFramer._unit_bytes() found.
_MORE = 0
_WHOLE_UNIT = 1
_PAYLOAD = 2


class MemoryChainState:
    """Update-chain state in RAM: each tensor's last integer levels (TCA base, 6.6) and HDSP history
    (6.7) in the dicts ``bases`` (name -> array('i')) and ``history`` (name -> bytearray), the same
    dicts the whole-unit Decoder keeps. A tensor's new state replaces the old one when its last
    slice is written.

    Any object with open(name, count) returning an object with ``base_count``, ``has_history``,
    read_base(lo, hi), read_history(lo, hi), write(lo, levels, history) and done() can stand in for
    it (StreamDecoder(chain=...)), e.g. one that keeps the state in files.
    """

    def __init__(self, bases=None, history=None):
        self.bases = {} if bases is None else bases
        self.history = {} if history is None else history

    def open(self, name, count):
        return _MemoryTensorState(self, name, count)


class _MemoryTensorState:
    def __init__(self, chain, name, count):
        self.chain = chain
        self.name = name
        self.count = count
        self.base = chain.bases.get(name)
        self.base_count = None if self.base is None else len(self.base)
        hist = chain.history.get(name)
        self.hist = hist if hist is not None and len(hist) == count else None
        self.has_history = self.hist is not None
        self.new_base = None
        self.new_hist = None

    def read_base(self, lo, hi):
        return self.base[lo:hi]

    def read_history(self, lo, hi):
        return bytearray(self.hist[lo:hi]) if self.hist is not None else bytearray(hi - lo)

    def write(self, lo, levels, history):
        if self.new_base is None:
            self.new_base = zeros("i", self.count)
            self.new_hist = bytearray(self.count)
        hi = lo + len(levels)
        self.new_base[lo:hi] = levels
        self.new_hist[lo:hi] = history

    def done(self):
        if self.new_base is None:  # an empty tensor
            self.new_base = zeros("i", 0)
            self.new_hist = bytearray(0)
        # The old state is read for the last time: drop it before the new one is kept.
        self.base = self.hist = None
        self.chain.bases.pop(self.name, None)
        self.chain.history.pop(self.name, None)
        self.chain.bases[self.name] = self.new_base
        self.chain.history[self.name] = self.new_hist


class SliceBuffers:
    """What slice decoding allocates once per stream instead of once per payload or tensor: the
    input window and the contexts. And the arrays slices are decoded into: a new one per slice, or
    with ``reuse`` (set by
    StreamDecoder.iter_feed(chunk, reuse=True)) one array per typecode that the next slice of that
    size overwrites, so that a consumer that writes each slice away holds one slice of memory
    however many slices a chunk completes."""

    def __init__(self):
        self.reuse = False
        self._kept = {}
        self._window = None
        # deepcabac.TensorSteps takes its context objects from here instead of making new ones.
        self.contexts = {}
        self._values = []  # [(step, value_of, halves)], the last two used
        # The last tensor's deepcabac.TensorCoding and TensorSteps, and the last PayloadInput, set
        # anew for the next one (incremental._tensor_slices, SliceFramer).
        self.coding = None
        self.steps = None
        self.input = None
        self.context = None  # the last payload's PayloadContext (decoder.payload_context)
        self.engine = None   # and its ArithmeticDecoder
        self._views = None  # (kept array('f'), its INT32 view, its UINT16 view)

    def release(self):
        """Let go of the window, the slice arrays, the contexts, the value tables and the objects
        kept for reuse (between payloads: the next payload makes them anew)."""
        self._kept = {}
        self._window = None
        self.contexts = {}
        self._values = []
        self._views = None
        self.coding = self.steps = self.input = self.context = self.engine = None

    def values_for(self, step, halves=False):
        """reconstruction.level_values(step) (or with ``halves`` a reconstruction.LevelHalves), kept
        for the last two step sizes (weights and biases alternate): a table of reconstructed values
        is filled once, not once per tensor."""
        for entry in self._values:
            if entry[0] == step and entry[2] == halves:
                return entry[1]
        if len(self._values) >= 2:
            del self._values[0]
        value_of = LevelHalves(step, _HALVES_RADIUS) if halves else level_values(step, 0)
        self._values.append((step, value_of, halves))
        return value_of

    def views(self, out, n):
        """uctypes views (INT32, UINT16) of the first ``n`` items of ``out``, an array('f') from
        get() (or a view of one); those of the kept array are made once."""
        kept = self._kept.get("f") if self.reuse else None
        if kept is not None and _uctypes.addressof(out) == _uctypes.addressof(kept):
            if self._views is None or self._views[0] is not kept:
                self._views = None
                self._views = (kept,) + _views(kept, len(kept))
            return self._views[1], self._views[2]
        return _views(out, n)

    def window(self, capacity):
        """The payload input window, one for the life of the stream (payloads follow each other)."""
        if capacity < _MIN_WINDOW:
            capacity = _MIN_WINDOW
        if self._window is None or len(self._window) != capacity:
            self._window = bytearray(capacity)
        return self._window

    def get(self, typecode, n):
        if not self.reuse:
            return zeros(typecode, n)
        kept = self._kept.get(typecode)
        if kept is not None and len(kept) >= n:
            # A shorter slice (a tensor's last) is a view of the kept array: no array per tensor.
            out = kept if len(kept) == n else memoryview(kept)[:n]
            _clear(out, typecode)
            return out
        kept = None
        if _MICROPYTHON:
            # array(range(n)) is sized from len(): no n-byte temporary as in compat.zeros.
            out = array(typecode, range(n))
            _clear(out, typecode)
        else:
            out = zeros(typecode, n)
        self._kept[typecode] = out
        return out


def _views(a, n):
    address = _uctypes.addressof(a)
    ints = _uctypes.struct(address, {"v": (_uctypes.ARRAY | 0, _uctypes.INT32 | n)}, _uctypes.LITTLE_ENDIAN).v
    halves = _uctypes.struct(address, {"v": (_uctypes.ARRAY | 0, _uctypes.UINT16 | 2 * n)}, _uctypes.LITTLE_ENDIAN).v
    return ints, halves


_ZERO_RUN = 64


_ZERO_RUNS = {}


def _clear(a, typecode):
    zero = 0.0 if typecode == "f" else 0
    n = len(a)
    i = 0
    if not _MICROPYTHON:
        # Slice assignment from a short run of zeros: a C copy per 64 elements, no array-sized
        # temporary. (MicroPython allocates a slice object per assignment: element by element there.)
        run = _ZERO_RUNS.get(typecode)
        if run is None:
            run = _ZERO_RUNS[typecode] = zeros(typecode, _ZERO_RUN)
        while i + _ZERO_RUN <= n:
            a[i:i + _ZERO_RUN] = run
            i += _ZERO_RUN
    for i in range(i, n):
        a[i] = zero


class PayloadInput:
    """The bytes of one payload as they arrive, in a window of fixed size that the arithmetic
    decoder reads from. Bytes before the decoder's position are dropped to make room."""

    def __init__(self, buf):
        self.buf = buf
        self.fill = 0          # bytes held in buf
        self.dropped = 0       # payload offset of buf[0]
        self.received = 0      # payload bytes that have arrived
        self.total = None      # the payload's length once known
        self.skip = 0          # arriving bytes to discard: they lie before an entry point
        self.p = 0             # the next byte to read when no arithmetic decoder reads (raw floats)
        self.engine = None
        self.lookahead = 0

    @property
    def complete(self):
        return self.total is not None and self.received >= self.total

    def push(self, data, pos, n):
        """Take up to ``n`` bytes of ``data[pos:]``; returns how many were taken (0: the window is
        full until the decoder moves on)."""
        if self.skip:
            k = self.skip if self.skip < n else n
            self.skip -= k
            self.received += k
            return k
        if len(self.buf) - self.fill < n:
            self._compact()  # only when needed: each compaction copies what the window holds
        room = len(self.buf) - self.fill
        k = n if n < room else room
        if k:
            self.buf[self.fill:self.fill + k] = data[pos:pos + k]
            self.fill += k
            self.received += k
        return k

    def _compact(self):
        e = self.engine
        # Keep the byte before the decoder's position: terminate_cabac() reads the last bit's byte.
        keep = e.p - 1 if e is not None else self.p
        if keep <= 0:
            return
        fill = self.fill
        if keep > fill:
            # An entry point beyond what has arrived: the bytes before it are skipped as they come.
            self.skip = keep - fill
            fill = keep
        elif _MICROPYTHON:
            # A slice of a bytearray is a copy there: move the bytes one by one instead (forward:
            # the target lies before the source).
            buf = self.buf
            for i in range(fill - keep):
                buf[i] = buf[keep + i]
        else:
            self.buf[0:fill - keep] = self.buf[keep:fill]
        self.fill = fill - keep
        self.dropped += keep
        self.p -= keep
        if e is not None:
            e.p -= keep
            e.start -= keep
        self.update()

    def update(self):
        """Tell the arithmetic decoder how far it may read (after input arrived or the end became known)."""
        e = self.engine
        if e is None:
            return
        e.end = self.fill
        if self.complete:
            e.seg_end = self.total - self.dropped
            e.safe = WHOLE
        else:
            e.seg_end = None if self.total is None else self.total - self.dropped
            e.safe = self.fill - self.lookahead
            if self.skip:
                e.safe = -1

    def start_engine(self, reuse=None):
        """The arithmetic decoder over the window (``reuse``: one no longer used, set anew)."""
        if reuse is None:
            e = ArithmeticDecoder(self.buf, 0, self.fill)  # reads the first 2 bytes (NNCError if absent)
        else:
            e = reuse
            e.__init__(self.buf, 0, self.fill)
        self.engine = e
        self.update()
        return e

    def available(self):
        return self.fill - self.p


def payload_slices(unit, ctx, inp, n):
    """Decode the NDU payload arriving in ``inp`` (7.3); a generator that yields None while it needs
    more bytes, and each slice (name, shape, start, values) as soon as it is decoded. A payload of
    one arithmetic-coded tensor (the common case) is that tensor's _tensor_slices() itself: one
    generator less per tensor on a small heap."""
    ndu = unit.ndu
    pt = ndu.nnr_compressed_data_unit_payload_type
    dims = ndu.get("TensorDimensions")
    unary = ndu.get("cabac_unary_length_minus1")
    if (len(unit.names) == 1 and pt != NNR_PT_RAW_FLOAT and pt != NNR_PT_BLOCK and dims is not None
            and unary is not None):
        return _tensor_slices(None, inp, ctx, ndu, unit.names[0], dims, unary, pt, None, 0, None, n)
    return _payload_slices(unit, ctx, inp, n)


def _payload_slices(unit, ctx, inp, n):
    ndu = unit.ndu
    names = unit.names
    pt = ndu.nnr_compressed_data_unit_payload_type
    dims = ndu.get("TensorDimensions")
    if dims is None:
        raise NNCError("tensor dimensions are neither in the NDU header nor given out of band", 0,
                       "tensor_dimensions")
    if pt == NNR_PT_RAW_FLOAT:
        yield from _raw_float_slices(ndu, names, dims, inp, n)
        return
    unary = ndu.get("cabac_unary_length_minus1")
    if unary is None:
        raise NNCError("cabac_unary_length_minus1 is not in the NDU header", 0, "cabac_unary_length_minus1")
    while inp.fill < 2 and not inp.complete:
        yield None
    buffers = ctx.slice_buffers
    engine = buffers.engine = inp.start_engine(buffers.engine)  # the last payload's engine, set anew
    if pt == NNR_PT_BLOCK:
        parts = _block_parts(ndu, names, dims)
    else:
        codebook, zero = _codebook(ndu)
        name = names[0] if len(names) == 1 else "|".join(names)
        parts = [(name, dims, pt, codebook, zero, _entry_points(ndu, 0))]
    whole = len(names) > 1 and pt != NNR_PT_BLOCK
    # An NNR_PT_BLOCK decodes its 1-D parts (LS, batch-norm, bias) before the weight, but lists the
    # weight first (7.3.5): the 1-D parts (one value per row) are held back and follow the weight,
    # so that the tensors come in the order the whole-unit decoder returns them.
    held = []
    for name, part_dims, part_pt, codebook, zero, eps in parts:
        size = _prod(part_dims) if whole else n
        tensor = _tensor_slices(engine, inp, ctx, ndu, name, part_dims, unary, part_pt, codebook, zero, eps, size)
        if pt == NNR_PT_BLOCK and part_pt != NNR_PT_BLOCK:
            for item in tensor:
                if item is None:
                    yield None
                else:
                    held.append((item[0], item[1], item[2], item[3][:]))  # a copy: slice arrays may be reused
            continue
        if not whole:
            yield from tensor
            continue
        for item in tensor:
            if item is None:
                yield None
                continue
            # TensorSplit / AxisSwap (7.3.1) need the whole tensor: it is one slice here.
            for sub_name, sub_dims, values, _ in _split(ndu, names, dims, item[3], None, 0):
                yield (sub_name, tuple(sub_dims), 0, values)
    for name in names:
        for item in held:
            if item[0] == name:
                yield item
    held = None
    while not inp.complete:
        yield None
    engine.terminate_cabac()


def _codebook(ndu):
    """The codebook and its zero offset of an NDU's tensor (7.3.6; a decomposition's H has its own)."""
    codebook = ndu.Codebook if ndu.codebook_present_flag else None
    zero = ndu.get("CbZeroOffset", 0)
    if ndu.get("decomposed_part") == "H" and ndu.codebook_present_flag:
        codebook, zero = ndu.get("CodebookDC", codebook), ndu.get("CbZeroOffsetDC", zero)
    return codebook, zero


def _block_parts(ndu, names, dims):
    """7.3.5: the tensors of an NNR_PT_BLOCK in decoding order: LS, bias, batch-norm, then the weight
    (or G then H), each as (name, dims, payload type, codebook, zero offset, entry points)."""
    cpt = ndu.compressed_parameter_types
    roles = _block_roles(cpt)
    if len(names) != len(roles):
        raise NNCError("NNR_PT_BLOCK with compressed_parameter_types %d needs %d topology elements, the header lists %d"
                       % (cpt, len(roles), len(names)), 0, "topology_elements_ids_list")
    name_of = dict(zip(roles, names))
    parts = []
    for role in ("LS", "BI", "beta", "gamma", "mean", "var"):
        if role in name_of:
            parts.append((name_of[role], [dims[0]], NNR_PT_FLOAT, None, 0, None))
    codebook = ndu.Codebook if ndu.codebook_present_flag else None
    zero = ndu.get("CbZeroOffset", 0)
    if cpt & NNR_CPT_DC:
        g_dims = ndu.TensorDimensionsG
        parts.append((name_of["G"], g_dims, NNR_PT_BLOCK, codebook, zero, _entry_points(ndu, 0)))
        bs = 4 << ndu.scan_order
        h_first = ((g_dims[0] + bs - 1) >> (2 + ndu.scan_order)) - 1
        cb_dc = ndu.get("CodebookDC") if ndu.codebook_present_flag else None
        parts.append((name_of["H"], ndu.TensorDimensionsH, NNR_PT_BLOCK, cb_dc, ndu.get("CbZeroOffsetDC", 0),
                      _entry_points(ndu, h_first)))
    else:
        parts.append((name_of["W"], dims, NNR_PT_BLOCK, codebook, zero, _entry_points(ndu, 0)))
    return parts


def _tensor_slices(engine, inp, ctx, ndu, name, dims, unary, pt, codebook, zero, eps, n):
    """7.3.6 for one tensor, window by window: quant_param(), quant_tensor(), reconstruction. With
    no ``engine`` the tensor is the whole payload (payload_slices): it starts and ends the payload's
    arithmetic decoder itself and takes its codebook and entry points from ``ndu``."""
    whole_payload = engine is None
    if whole_payload:
        codebook, zero = _codebook(ndu)
        eps = _entry_points(ndu, 0)
        while inp.fill < 2 and not inp.complete:
            yield None
        buffers = ctx.slice_buffers
        engine = buffers.engine = inp.start_engine(buffers.engine)  # the last payload's engine, set anew
    qp_value = None
    if pt != NNR_PT_INT:
        if ctx.qp_density is None:
            raise NNCError("no qp density: neither the MPS nor an active LPS signals quantization parameters",
                           engine.p, "QpDensity")
        while engine.p > engine.safe:
            yield None
        qp_value = engine.iae(6 + ctx.qp_density)
    count = _prod(dims)
    tca = bool(ndu.get("temporal_context_modeling_flag")) and ctx.profile == 1
    state = None
    if ctx.chain is not None:
        # Update chains: the tensor's previous levels (TCA) and significance history (HDSP).
        state = ctx.chain.open(name, count)
    if tca:
        if state is None or state.base_count is None:
            raise NNCError("temporal context adaptation for '%s' needs its previously decoded tensor" % name,
                           engine.p, "temporal_context_modeling_flag")
        if state.base_count != count:
            raise NNCError("temporal context base for '%s' has %d elements, the tensor %d"
                           % (name, state.base_count, count), engine.p, "temporal_context_modeling_flag")
    compiled = backend.tensor_steps
    buffers = ctx.slice_buffers
    # Without the compiled backend, the TensorCoding and TensorSteps of the previous tensor (done
    # with) are set anew: fewer objects made per tensor on a small heap.
    coding = buffers.coding if compiled is None else None
    if coding is None:
        coding = TensorCoding(dims, 0, 0)
        if compiled is None:
            buffers.coding = coding
    coding.__init__(dims, ndu.dq_flag, unary, ndu.scan_order, ctx.profile,
                    len(codebook) if codebook is not None else 0, zero, eps, None, None,
                    ndu.get("parent_node_id_present_flag", 0))
    coding.tca = tca
    coding.history = ctx.profile == 1 and state is not None and state.has_history
    coding.max_bins = ctx.max_bins
    coding.context_pool = buffers.contexts
    qp = None if qp_value is None else qp_value + ctx.quantization_parameter
    # Without the compiled backend, plain float tensors are decoded straight into their values: one
    # buffer per slice instead of levels and values. With uctypes (MicroPython) also those of an
    # update chain: the slice's int32 levels are written to the chain state before they become values
    # in place, instead of a float object per parameter from reconstruct() (garbage of some KB per
    # slice, which this port's GC may not collect before the next).
    direct = (compiled is None and pt != NNR_PT_INT and codebook is None
              and (state is None or _uctypes is not None))
    value_of = halves = None
    if direct:
        value_of = buffers.values_for(step_size(qp, ctx.qp_density), _uctypes is not None)
        if _uctypes is not None:
            halves, value_of = value_of, None  # levels into the float32 array, values after each window
    steps = buffers.steps if compiled is None else None
    if steps is None:
        steps = TensorSteps(engine, coding, value_of)
        if compiled is None:
            buffers.steps = steps
    else:
        steps.__init__(engine, coding, value_of)
    value_of = None
    inp.lookahead = steps.lookahead
    inp.update()
    fast = None
    if compiled is not None and count and not (ctx.profile == 1 and coding.codebook_size == 1):
        while steps.preamble() == NEED_INPUT:
            yield None
        fast = compiled(engine, coding, steps)
    shape = tuple(dims)
    if count == 0:
        yield (name, shape, 0, zeros("i" if pt == NNR_PT_INT else "f", 0))
    lo = 0
    while lo < count:
        hi = steps.window_end(lo, n)
        out = ctx.slice_buffers.get("f" if direct else "i", hi - lo)
        base = state.read_base(lo, hi) if tca else None
        hist = state.read_history(lo, hi) if state is not None else None
        lookup = hist if coding.history else None
        if fast is not None:
            while fast.run(engine, out, lo, hi, base, lookup) == NEED_INPUT:
                yield None
        elif halves is not None:
            ints, words = ctx.slice_buffers.views(out, hi - lo)
            steps.set_window(lo, hi, ints, base, lookup)
            while steps.run() == NEED_INPUT:
                yield None
            if state is not None:
                # ``out`` holds the int32 levels' bytes until fill() turns them into values.
                backend.update_history(ints, hist)
                state.write(lo, out, hist)
            halves.fill(out, ints, words, hi - lo)
            ints = words = None
        else:
            steps.set_window(lo, hi, out, base, lookup)
            while steps.run() == NEED_INPUT:
                yield None
        base = None
        if state is not None and halves is None:
            backend.update_history(out, hist)
            state.write(lo, out, hist)
        hist = lookup = None
        if direct or pt == NNR_PT_INT:
            values = out
        else:
            values = backend.reconstruct(out, qp, ctx.qp_density, codebook, zero, lo, False,
                                         ctx.slice_buffers.get("f", hi - lo) if ctx.slice_buffers.reuse else None)
        out = None
        yield (name, shape, lo, values)
        values = None
        lo = hi
    steps.set_window(0, 0, None)
    if state is not None:
        state.done()
    if whole_payload:
        state = steps = coding = buffers = None
        while not inp.complete:
            yield None
        engine.terminate_cabac()


def _raw_float_slices(ndu, names, dims, inp, n):
    """NNR_PT_RAW_FLOAT: little-endian float32 values, slice by slice as their bytes arrive."""
    count = _prod(dims)
    whole = len(names) > 1
    step = count if whole else (n if n > 0 else 1)
    lo = 0
    while True:
        hi = lo + step if lo + step < count else count
        need = 4 * (hi - lo)
        while inp.available() < need and not inp.complete:
            yield None
        if inp.complete and inp.total != 4 * count:
            raise NNCError("NNR_PT_RAW_FLOAT payload has %d bytes, %d expected" % (inp.total, 4 * count), 0,
                           "raw_float32_parameter")
        values = from_raw("f", bytes(inp.buf[inp.p:inp.p + need]))
        inp.p += need
        if whole:
            for sub_name, sub_dims, sub_values, _ in _split(ndu, names, dims, values, None, 0):
                yield (sub_name, tuple(sub_dims), 0, sub_values)
        else:
            yield (names[0], tuple(dims), lo, values)
        values = None
        lo = hi
        if lo >= count:
            break
    while not inp.complete:
        yield None


class SliceFramer:
    """The input side of StreamDecoder(slice_elements=N): units in, slices out (see the module)."""

    def __init__(self, decoder, slice_elements, window=None, chain=None):
        if slice_elements < 1:
            raise ValueError("slice_elements must be at least 1, not %r" % (slice_elements,))
        self.decoder = decoder
        self.n = slice_elements
        self.window = window if window is not None else _default_window()
        self.chain = chain if chain is not None else MemoryChainState(decoder.bases, decoder.history)
        self.bytes = 0
        self.units = 0
        self.tensors = 0
        self._head = bytearray(4)  # nnr_unit_size() of the next unit, while incomplete
        self._head_len = 0
        self._start = 0            # stream offset of the current unit
        self._size = 0             # nnr_unit_size of the current unit (0: at a unit boundary)
        self._got = 0              # bytes of the current unit consumed
        self._buf = None           # the unit's first bytes (an NDU header) or the whole unit
        self._limit = 0            # how many bytes of _buf the unit uses so far
        self._probe = None         # the buffer NDU headers are read into, kept while small
        self._fill = 0
        self._ndu = False
        self._unit = None          # the NDU whose payload is streaming
        self._input = None
        self._payload = None       # payload_slices() of the open payload (spans partial units)
        self._payload_at = 0       # stream offset of the payload's first byte, for messages
        self._payload_names = ()   # and its tensors
        self.buffers = SliceBuffers()

    # --- state ----------------------------------------------------------------------------------
    @property
    def at_unit_boundary(self):
        return self._size == 0 and self._head_len == 0

    @property
    def at_boundary(self):
        return self.at_unit_boundary and self._payload is None and not self.decoder.in_partial_data

    @property
    def pending(self):
        if self._size:
            return self._size - self._got
        if self._head_len:
            return (4 if self._head[0] & 0x80 else 2) - self._head_len
        return 0

    def close(self):
        if not self.at_unit_boundary or self._payload is not None:
            if self._size:
                msg = "stream ends inside an NNR unit: %d of its %d bytes arrived" % (self._got, self._size)
                element = "nnr_unit"
            elif self._head_len:
                msg = "stream ends inside nnr_unit_size() (%d byte(s) of it arrived)" % self._head_len
                element = "nnr_unit_size"
            else:
                msg = "stream ends inside a partial-data sequence for %s" % ", ".join(self._payload_names)
                element = "partial_data_counter"
            offset = self._start
            self.reset()
            raise NNCError(msg, offset, element)
        self.decoder.finish()

    def release(self):
        """Between payloads (at_boundary): free the buffers kept for the next payload."""
        if self._payload is None and self._input is None:
            self.buffers.release()

    def reset(self):
        self._drop()
        try:
            self.decoder.finish()
        except NNCError:
            pass

    def _drop(self):
        self._head_len = 0
        self._size = 0
        self._got = 0
        self._buf = None
        self._unit = None
        self._input = None
        self._payload = None
        self.decoder._partial = None

    # --- input ----------------------------------------------------------------------------------
    def feed(self, chunk):
        return list(self.iter_feed(chunk))

    def iter_feed(self, chunk, reuse=False):
        """Consume ``chunk``, yielding each slice as soon as it is decoded. Iterate to the end.
        With ``reuse`` a slice's array is overwritten by a later slice (see SliceBuffers)."""
        self.buffers.reuse = reuse
        n = len(chunk)
        if n == 0:
            return
        mv = memoryview(chunk)
        pos = 0
        stalled = 0
        try:
            while pos < n:
                if self._size == 0:
                    pos = self._read_size(chunk, pos)
                elif self._unit is None:
                    take = self._size - self._got
                    if take > n - pos:
                        take = n - pos
                    if take > self._limit - self._fill:
                        take = self._limit - self._fill
                    self._buf[self._fill:self._fill + take] = mv[pos:pos + take]
                    self._fill += take
                    self._got += take
                    self.bytes += take
                    pos += take
                    got = self._unit_bytes()
                    if got == _WHOLE_UNIT:
                        yield from self._whole_unit()
                    elif got == _PAYLOAD:
                        # The payload's first bytes (after the NDU header) are in the window.
                        done = self._got == self._size
                        item = self._pull()
                        while item is not None:
                            yield item
                            item = None  # the caller may drop the slice before the next one is decoded
                            item = self._pull()
                        if done:
                            self._unit_end()
                else:
                    take = self._size - self._got
                    if take > n - pos:
                        take = n - pos
                    k = self._input.push(mv, pos, take)
                    if k == 0:
                        # The window is full: the decoder must move on before it takes more.
                        stalled += 1
                        if stalled > 1:
                            raise NNCError("payload decoding made no progress with a full input window",
                                           self._start + self._got, "nnr_compressed_data_unit_payload")
                    else:
                        stalled = 0
                    pos += k
                    self._got += k
                    self.bytes += k
                    self._input.update()
                    done = self._got == self._size
                    item = self._pull()
                    while item is not None:
                        yield item
                        item = None
                        item = self._pull()
                    if done:
                        self._unit_end()
        except NNCError as exc:
            self._drop()
            _rebase(exc, self._start, 0)
            raise
        finally:
            mv = None

    def _read_size(self, chunk, pos):
        head = self._head
        if self._head_len == 0:
            self._start = self.bytes
        head[self._head_len] = chunk[pos]
        self._head_len += 1
        self.bytes += 1
        nbytes = 4 if head[0] & 0x80 else 2
        if self._head_len < nbytes:
            return pos + 1
        self._head_len = 0
        size = nnr_unit_size(head, 0, nbytes)[0]
        limit = self.decoder.limits.max_unit_size
        if size > limit:
            from .limits import exceeded
            raise exceeded("max_unit_size", "nnr_unit_size %d" % size, limit, 0, "nnr_unit_size")
        self._size = size
        self._got = nbytes
        # The unit type is in the next byte: an NDU header is then read in growing probes, any
        # other unit whole.
        self._ndu = None
        probe = self._probe
        if probe is None:
            probe = self._probe = bytearray(_FIRST_PROBE)
        for i in range(nbytes):
            probe[i] = head[i]
        self._buf = probe
        self._limit = nbytes + 1
        self._fill = nbytes
        return pos + 1

    def _unit_bytes(self):
        """Bytes of a unit before its payload streams: find its type, parse an NDU header. Returns
        what comes next: _MORE (bytes), _WHOLE_UNIT (a unit read whole, to decode) or _PAYLOAD
        (the NDU's payload began). A plain method, not a generator: no generator object per call."""
        if self._fill < self._limit and self._got < self._size:
            return _MORE
        if self._ndu is None:
            self._ndu = (self._buf[self._fill - 1] >> 2) == NNR_NDU  # nnr_unit_type, u(6)
            self._grow(_FIRST_PROBE if self._ndu else self._size)
            if self._fill < self._limit and self._got < self._size:
                return _MORE
        if not self._ndu:
            return _WHOLE_UNIT
        try:
            unit = parse_unit_header(self._buf, 0, self._fill, self.decoder.parser)
        except Incomplete:
            self._grow(2 * self._limit)
            return _MORE
        self._begin_payload(unit)
        return _PAYLOAD

    def _grow(self, size):
        """Let the unit's buffer take ``size`` bytes (at most the unit): an NDU header's probes use
        one buffer kept from unit to unit while it stays small, other units get their own."""
        if size > self._size:
            size = self._size
        self._limit = size
        if self._ndu and size <= len(self._buf):
            return
        buf = bytearray(size)
        buf[0:self._fill] = self._buf[0:self._fill]
        self._buf = buf
        if self._ndu and size <= _KEPT_PROBE:
            self._probe = buf

    def _whole_unit(self):
        """A unit other than an NDU, read whole: parameter sets, topology, and aggregate units,
        whose NDUs are decoded here from the buffered unit, in slices and through the chain state
        like any other."""
        buf = self._buf
        size = self._size
        self._buf = None
        self._size = 0
        jobs = self.decoder.plan_unit(buf, 0, size)
        self.units += 1
        for job in jobs:
            self._payload_at = self._start + job.start
            self._input = PayloadInput(memoryview(job.data)[job.start:job.end])
            self._input.fill = self._input.received = self._input.total = job.end - job.start
            self._payload = payload_slices(job.unit, self._context(job.unit, job.ctx), self._input, self.n)
            item = self._pull()
            while item is not None:
                yield item
                item = None
                item = self._pull()
            if self._payload is not None:
                raise NNCError("payload decoding stopped before the end of its data", self._payload_at,
                               "nnr_compressed_data_unit_payload")

    def _context(self, unit, ctx):
        ctx.chain = self.chain if unit.parent_signalling else None
        ctx.slice_buffers = self.buffers
        return ctx

    def _begin_payload(self, unit):
        decoder = self.decoder
        header = self._buf
        start = unit.payload_start
        counter = unit.partial_data_counter
        if counter > 0:
            first = decoder.continue_partial(header, unit).unit is unit
        else:
            if decoder.in_partial_data:
                decoder._interrupted(unit)
            first = True
        if first:
            ctx = self.buffers.context = self._context(unit, decoder.payload_context(unit, self.buffers.context))
            inp = self.buffers.input
            if inp is None:
                inp = self.buffers.input = PayloadInput(None)
            inp.__init__(self.buffers.window(self.window))
            self._input = inp
            self._payload = payload_slices(unit, ctx, self._input, self.n)
            self._payload_at = self._start + start
            self._payload_names = unit.names
        inp = self._input
        if counter <= 1:
            inp.total = inp.received + (self._size - start)
        self._unit = unit
        self._buf = None
        rest = self._fill - start
        if rest > 0:
            k = inp.push(memoryview(header), start, rest)
            if k != rest:
                raise NNCError("payload window too small for the NDU header's trailing bytes", start,
                               "nnr_compressed_data_unit_payload")
        inp.update()

    def _unit_end(self):
        """The unit's last byte is in (its payload decoded as far as it goes)."""
        self._size = 0
        self._unit = None
        self.units += 1
        if self._payload is not None and self._input.complete:
            raise NNCError("payload decoding stopped before the end of its data", self._payload_at,
                           "nnr_compressed_data_unit_payload")

    def _pull(self):
        """The next slice of the open payload, or None when it needs more bytes or has ended."""
        gen = self._payload
        if gen is None:
            return None
        try:
            item = next(gen)
        except StopIteration:
            self._payload = None
            self._input = None
            return None
        except NNCError as exc:
            _in_payload(exc, self._input, self._payload_at)
            raise
        if item is not None and item[2] == 0:
            self.tensors += 1
        return item


def _default_window():
    # A board's heap is small; on CPython a large window means fewer trips through Python.
    return 640 if _MICROPYTHON else 1 << 16


def _in_payload(exc, inp, payload_at):
    """Turn an offset into the payload window into a stream offset (for a payload in one unit) or a
    payload offset (a partial-data sequence, whose payload is spread over units)."""
    if exc.offset is None or inp is None or getattr(exc, "_rebased", False):
        return
    offset = inp.dropped + exc.offset
    _replace_offset(exc, payload_at + offset)
    exc._rebased = True


def _rebase(exc, start, base):
    """An offset into a unit's buffer (the unit at ``base``) as a stream offset."""
    if exc.offset is None or getattr(exc, "_rebased", False):
        return
    _replace_offset(exc, exc.offset + start - base)
    exc._rebased = True


def _replace_offset(exc, offset):
    if not move_offset(exc, offset):
        exc.offset = offset
