"""Push decoding: bytes in any chunking, tensors out as soon as their NNR unit is complete.

This is the framer of design.md. It knows only nnr_unit_size (6.2.2) and unit boundaries: it
holds at most one incomplete NNR unit, in a buffer allocated once the unit's size is known, and
hands every complete unit to ``Decoder.decode_unit``, which joins partial-data units (6.4.3.1)
and keeps the decoder state. Consumed input is never kept.

Pure Python for CPython and MicroPython (no numpy)::

    dec = StreamDecoder()
    while True:
        chunk = f.read(4096)
        if not chunk:
            break
        for name, shape, values in dec.feed(chunk):
            use(name, shape, values)
    dec.close()
"""

from .decoder import Decoder
from .errors import NNCError, move_offset
from .incremental import SliceFramer
from .limits import DEFAULT_MAX_UNIT_SIZE, exceeded  # noqa: F401 (DEFAULT_MAX_UNIT_SIZE re-exported)
from .units import nnr_unit_size


class StreamDecoder:
    """Incremental NNR decoder fed with chunks of any size (down to one byte).

    ``feed(chunk)`` returns the list of (name, shape, values) tensors completed by that chunk,
    like ``decoder_core.decode``; ``close()`` checks the stream ended cleanly. After ``close()``
    the same object accepts the next bitstream, keeping the decoder state an update chain needs
    (temporal context adaptation bases, significance history); consecutive bitstreams may also
    simply be fed back to back.

    Progress counters: ``bytes`` fed, complete top-level ``units``, ``tensors`` emitted (all
    cumulative over the object's life).

    ``limits`` (decoder_core.Limits) as for Decoder; a unit larger than ``limits.max_unit_size``
    (or ``max_unit_size``, which overrides it) is refused before any memory is allocated for it.
    """

    def __init__(self, topology=None, max_unit_size=None, decoder=None, limits=None, slice_elements=None,
                 chain=None, window=None):
        if decoder is None:
            decoder = Decoder(topology, limits=limits)
        elif limits is not None:
            decoder.set_limits(limits)
        if max_unit_size is not None:
            decoder.set_limits(decoder.limits.replace(max_unit_size=max_unit_size))
        self.decoder = decoder
        self._bytes = 0
        self._units = 0
        self._tensors = 0
        self._head = bytearray(4)  # nnr_unit_size() bytes of the next unit, while incomplete
        self._head_len = 0
        self._buf = None           # the current unit, preallocated from its nnr_unit_size
        self._size = 0             # nnr_unit_size of the current unit (0: at a unit boundary)
        self._fill = 0
        self._start = 0            # stream offset of the current unit
        # Slice mode (decoder_core.incremental): payloads decode while they arrive.
        self._slices = None
        if slice_elements is not None:
            self._slices = SliceFramer(decoder, slice_elements, window, chain)

    # --- state ----------------------------------------------------------------------------------
    # The progress counters; in slice mode the SliceFramer's.
    @property
    def bytes(self):
        return self._bytes if self._slices is None else self._slices.bytes

    @bytes.setter
    def bytes(self, value):
        self._bytes = value

    @property
    def units(self):
        return self._units if self._slices is None else self._slices.units

    @units.setter
    def units(self, value):
        self._units = value

    @property
    def tensors(self):
        return self._tensors if self._slices is None else self._slices.tensors

    @tensors.setter
    def tensors(self, value):
        self._tensors = value

    @property
    def limits(self):
        return self.decoder.limits

    @property
    def max_unit_size(self):
        return self.decoder.limits.max_unit_size

    @property
    def at_unit_boundary(self):
        """True when no byte of an incomplete unit is held."""
        if self._slices is not None:
            return self._slices.at_unit_boundary
        return self._head_len == 0 and self._size == 0

    @property
    def at_boundary(self):
        """True at a unit boundary with no partial-data sequence open: the stream may end here."""
        if self._slices is not None:
            return self._slices.at_boundary
        return self.at_unit_boundary and not self.decoder.in_partial_data

    @property
    def pending(self):
        """Bytes still needed to complete the current unit (at least 1 inside nnr_unit_size())."""
        if self._slices is not None:
            return self._slices.pending
        if self._size:
            return self._size - self._fill
        if self._head_len:
            return (4 if self._head[0] & 0x80 else 2) - self._head_len
        return 0

    # --- input ----------------------------------------------------------------------------------
    def feed(self, chunk):
        """Add the next bytes of the stream; return the tensors whose last unit byte they carry, or
        in slice mode the slices (name, shape, start, values) that the chunk completed."""
        if self._slices is not None:
            return list(self.iter_feed(chunk))
        n = len(chunk)
        out = []
        if n == 0:
            return out
        mv = memoryview(chunk)
        pos = 0
        try:
            while pos < n:
                if self._size == 0:
                    pos = self._read_size(chunk, mv, pos, n, out)
                    continue
                take = self._size - self._fill
                if take > n - pos:
                    take = n - pos
                self._buf[self._fill:self._fill + take] = mv[pos:pos + take]
                self._fill += take
                pos += take
                self.bytes += take
                if self._fill == self._size:
                    size = self._size
                    self._size = 0
                    self._decode(self._buf, 0, size, out)
        except NNCError:
            # Whatever failed, the framer drops the unit it held; the caller decides what next.
            self._drop()
            raise
        finally:
            mv = None  # MicroPython and CPython: do not keep the caller's buffer exported
        return out

    def iter_feed(self, chunk, reuse=False):
        """Slice mode: feed() as a generator, each slice handed out before the next is decoded.
        Iterate it to the end before feeding more. With ``reuse`` the slices of a tensor share one
        array, which the next slice overwrites: use (write away, copy) each slice before taking the
        next, and a chunk that completes many slices still holds one slice of memory."""
        if self._slices is None:
            raise ValueError("iter_feed() needs StreamDecoder(slice_elements=N)")
        # The framer's generator itself: no generator object of this method's per chunk.
        return self._slices.iter_feed(chunk, reuse)

    def close(self):
        """End of the stream: raise NNCError unless it ended on a unit boundary with no open
        partial-data sequence. The decoder state for update chains is kept."""
        if self._slices is not None:
            self._slices.close()
            return
        if not self.at_unit_boundary:
            if self._size:
                msg = "stream ends inside an NNR unit: %d of its %d bytes arrived" % (self._fill, self._size)
                element = "nnr_unit"
            else:
                msg = "stream ends inside nnr_unit_size() (%d byte(s) of it arrived)" % self._head_len
                element = "nnr_unit_size"
            offset = self._start
            self.reset()
            raise NNCError(msg, offset, element)
        self._buf = None
        self.decoder.finish()

    def release(self):
        """Slice mode, at a boundary between payloads (e.g. where the stream may end): free the
        window, slice arrays, contexts and value tables kept for the next payload, which then makes
        them anew. On a small heap, before other work (a commit) that needs the memory."""
        if self._slices is not None:
            self._slices.release()

    def reset(self):
        """Forget any incomplete unit and open partial-data sequence (e.g. an abandoned
        transfer); the next byte fed starts a new unit. Update-chain state is kept."""
        if self._slices is not None:
            self._slices.reset()
            return
        self._drop()
        self._discard_partial()

    # --- framing --------------------------------------------------------------------------------
    def _read_size(self, chunk, mv, pos, n, out):
        """Collect nnr_unit_size() (6.2.2: 2 or 4 bytes by its first bit); then either decode a
        unit lying wholly inside ``chunk`` in place, or allocate the unit's buffer."""
        head = self._head
        if self._head_len == 0:
            self._start = self.bytes
            nbytes = 4 if chunk[pos] & 0x80 else 2
            if n - pos >= nbytes:
                size = self._unit_size(chunk, pos, pos + nbytes)
                if n - pos >= size:
                    # The whole unit is in this chunk: decode it where it is, no copy.
                    self.bytes += size
                    self._decode(chunk if isinstance(chunk, (bytes, bytearray)) else mv, pos, pos + size, out)
                    return pos + size
                self._allocate(size)
                self._buf[0:nbytes] = mv[pos:pos + nbytes]
                self._fill = nbytes
                self.bytes += nbytes
                return pos + nbytes
        # nnr_unit_size() itself is split across chunks.
        head[self._head_len] = chunk[pos]
        self._head_len += 1
        self.bytes += 1
        nbytes = 4 if head[0] & 0x80 else 2
        if self._head_len == nbytes:
            self._head_len = 0
            size = self._unit_size(head, 0, nbytes)
            self._allocate(size)
            self._buf[0:nbytes] = head[0:nbytes]
            self._fill = nbytes
        return pos + 1

    def _unit_size(self, data, offset, end):
        try:
            size = nnr_unit_size(data, offset, end)[0]
        except NNCError as exc:
            _rebase(exc, self._start, offset)
            raise
        limit = self.decoder.limits.max_unit_size
        if size > limit:
            raise exceeded("max_unit_size", "nnr_unit_size %d" % size, limit, self._start, "nnr_unit_size")
        return size

    def _allocate(self, size):
        # One buffer, reused while it is big enough: the framer holds at most one unit.
        if self._buf is None or len(self._buf) < size:
            self._buf = None
            self._buf = bytearray(size)
        self._size = size

    def _decode(self, data, offset, end, out):
        try:
            tensors = self.decoder.decode_unit(data, offset, end)
        except NNCError as exc:
            _rebase(exc, self._start, offset)
            raise
        self.units += 1
        for t in tensors:
            out.append((t[0], tuple(t[1]), t[2]))
        self.tensors += len(tensors)

    def _drop(self):
        self._head_len = 0
        self._size = 0
        self._fill = 0
        self._buf = None

    def _discard_partial(self):
        try:
            self.decoder.finish()
        except NNCError:
            pass


def _rebase(exc, start, base):
    """Turn an offset into the unit's buffer (which holds the unit at ``base``) into a stream
    offset, keeping NNCError's message format."""
    if exc.offset is None or start == base:
        return
    if not move_offset(exc, exc.offset + start - base):
        # Offsets into joined partial data are relative to the joined payload: keep them.
        exc.args = (exc.args[0] + " [in the NNR unit at stream byte %d]" % start,)
