"""Streaming decoding on CPython: numpy tensors out while the bytes are still arriving.

``decode_stream(source)`` is an async iterator of (name, ndarray) over an async byte source;
``iter_decode(file_or_path)`` is its synchronous counterpart; ``StreamDecoder`` is the push
interface underneath (``feed(chunk)`` -> list of (name, ndarray)). Each tensor comes out as soon
as the last byte of its NNR unit (or of its last partial unit) has arrived, and the decoder holds
at most one NNR unit of input (see decoder_core.stream), so memory follows the largest tensor,
not the model.

With ``slice_elements=N`` all three work in slice mode (decoder_core.incremental): payloads are
decoded while their bytes arrive and each tensor comes out in slices ``(name, shape, start,
array)``, ``array`` a 1-D numpy view of the elements ``start .. start + len(array) - 1`` of the
row-major tensor of ``shape``. A tensor's slices come in increasing ``start`` without gaps, the
first at 0, each of at most N elements (except a block row of a block scan, and the layouts that
come whole: see decoder_core.incremental). Memory then depends on neither the size of a tensor nor
that of an NNR unit.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import decoder_core.stream as core_stream
from decoder_core import NNCError

from .decoding import NumpyBuffers, empty_bitstream, to_numpy
from .parallel import ChunkRunner, check_threads

DEFAULT_CHUNK_SIZE = 1 << 16
# 256 KiB of float32 per slice: small against a model, large enough that the work per slice outside
# the compiled position loop does not show in the decoding time.
DEFAULT_SLICE_ELEMENTS = 1 << 16


class StreamDecoder:
    """Push decoder with numpy output. ``feed(chunk)`` returns [(name, ndarray), ...] for the
    tensors that chunk completed; ``close()`` raises NNCError if the stream stopped inside a unit
    or a partial-data sequence. Reusable for the next bitstream of an update chain after close().

    ``bytes``, ``units`` and ``tensors`` count what has been fed, framed and emitted.

    ``threads`` (default: parallel.default_threads()) decode the block rows of a tensor coded with
    scan_order > 0 concurrently (nnc_edge.parallel); units themselves are decoded one at a time,
    in arrival order, so that each tensor is out as soon as its unit is.

    ``slice_elements=N``: slice mode (see the module). ``feed(chunk)`` returns the slices
    (name, shape, start, array) the chunk completed, and ``iter_feed(chunk)`` hands them out one at
    a time, so that only one is in memory. Payloads are then decoded sequentially as their bytes
    arrive: ``threads`` are not used.

    ``limits`` (decoder_core.Limits) bounds what a stream may make the decoder allocate or do;
    ``topology`` is the out-of-band topology, as for nnc_edge.Decoder.
    """

    def __init__(self, topology=None, max_unit_size=None, threads=None, limits=None, slice_elements=None):
        self.threads = check_threads(threads)
        self.slice_elements = slice_elements
        self._pool = None
        self._core = core_stream.StreamDecoder(topology, max_unit_size, limits=limits, slice_elements=slice_elements)
        # Each tensor is decoded straight into its numpy array (levels converted in place); in slice
        # mode this concerns only the tensors that come whole (aggregate units).
        self._core.decoder.output = NumpyBuffers()

    def feed(self, chunk):
        if self.slice_elements is not None:
            return list(self.iter_feed(chunk))
        if self.threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="nnc-edge-stream")
            self._core.decoder.runner = ChunkRunner(self._pool, self.threads)
        return [(name, to_numpy(shape, values)) for name, shape, values in self._core.feed(chunk)]

    def iter_feed(self, chunk):
        """Slice mode: the slices of ``chunk`` as a generator, each decoded only when the previous one
        has been taken. Iterate it to the end before feeding more. NNCError is raised when the
        stream turns out bad, possibly after slices of the failing tensor were handed out."""
        for name, shape, start, values in self._core.iter_feed(chunk):
            yield name, shape, start, to_numpy((len(values),), values)
            values = None  # not alive while the next slice decodes

    def close(self):
        """End of one bitstream (see decoder_core.stream.StreamDecoder.close); stops the threads."""
        self.release_threads()
        self._core.close()

    def release_threads(self):
        """Stop the worker threads now (the next feed starts them again); state is kept."""
        pool, self._pool = self._pool, None
        if pool is not None:
            self._core.decoder.runner = None
            pool.shutdown(wait=True)

    def reset(self):
        """Drop an incomplete unit and any open partial-data sequence (keeps update-chain state)."""
        self._core.reset()

    @property
    def bytes(self):
        return self._core.bytes

    @property
    def units(self):
        return self._core.units

    @property
    def tensors(self):
        return self._core.tensors

    @property
    def pending(self):
        """Bytes still needed to complete the NNR unit being received (0 at a unit boundary)."""
        return self._core.pending

    @property
    def at_boundary(self):
        """True when the stream may end here: no incomplete unit and no open partial-data sequence."""
        return self._core.at_boundary

    def progress(self):
        return self._core.bytes, self._core.units, self._core.tensors


async def _chunks(source, chunk_size):
    """Adapt the accepted sources to one async iterator of byte chunks."""
    import inspect

    read = getattr(source, "read", None)
    if read is not None and (inspect.iscoroutinefunction(read) or not hasattr(source, "__aiter__")):
        # asyncio.StreamReader and anything with an async read(n); b"" means end of stream.
        while True:
            chunk = read(chunk_size)
            if not inspect.isawaitable(chunk):
                raise TypeError("%s.read() is not async: use iter_decode for blocking file objects"
                                % type(source).__name__)
            chunk = await chunk
            if not chunk:
                return
            yield chunk
    elif hasattr(source, "__aiter__"):
        async for chunk in source:
            yield chunk
    else:
        raise TypeError("decode_stream needs an asyncio.StreamReader, an async iterator of bytes or an object "
                        "with an async read(n), not %s" % type(source).__name__)


def _decoder(decoder, topology, threads, slice_elements):
    if decoder is None:
        return StreamDecoder(topology, threads=threads, slice_elements=slice_elements)
    if slice_elements is not None and slice_elements != decoder.slice_elements:
        raise ValueError("slice_elements=%r differs from the given decoder's slice_elements=%r: set it on the "
                         "StreamDecoder" % (slice_elements, decoder.slice_elements))
    return decoder


async def decode_stream(source, *, progress=None, topology=None, decoder=None, chunk_size=DEFAULT_CHUNK_SIZE,
                        offload=True, threads=None, slice_elements=None):
    """Decode an NNR bitstream from an async byte source: ``async for name, array in ...``.

    ``source``: an ``asyncio.StreamReader``, an async iterator of bytes (a transport such as
    ``transports.file.FileSource``) or any object with an async ``read(n)``. ``progress`` is
    called with (bytes, units, tensors) after each chunk. ``decoder`` continues an update chain
    (or lets a follow-mode source watch ``decoder.at_boundary``); otherwise a new
    ``StreamDecoder(topology, threads=threads)`` is used. Arrays are float32 (int32 for integer
    tensors).

    With ``offload``, a chunk that completes an NNR unit is decoded in the default executor so
    the event loop keeps running during long units; other chunks are only copied, inline.

    ``slice_elements=N`` (or a ``decoder`` made with it): slice mode, yielding
    ``(name, shape, start, array)`` slices instead (see StreamDecoder); with ``offload`` each slice
    is decoded in the executor. ``progress`` is then called after the chunk's last slice.

    Raises NNCError for a bad stream, including one that ends inside a unit or a partial-data
    sequence (after every complete tensor, or every slice, before that point has been yielded).
    """
    import asyncio  # here, not at module level: `import nnc_edge` stays light on devices

    dec = _decoder(decoder, topology, threads, slice_elements)
    loop = asyncio.get_running_loop()
    empty = True
    try:
        async for chunk in _chunks(source, chunk_size):
            empty = empty and not chunk
            if dec.slice_elements is not None:
                slices = dec.iter_feed(chunk)
                while True:
                    item = await loop.run_in_executor(None, next, slices, None) if offload else next(slices, None)
                    if item is None:
                        break
                    yield item
                    item = None
                if progress is not None:
                    progress(dec.bytes, dec.units, dec.tensors)
                continue
            if offload and len(chunk) >= max(dec.pending, 1):
                tensors = await loop.run_in_executor(None, dec.feed, chunk)
            else:
                tensors = dec.feed(chunk)
            if progress is not None:
                progress(dec.bytes, dec.units, dec.tensors)
            for item in tensors:
                yield item
            tensors = item = None  # hand each tensor over without keeping it alive here
        if empty:
            raise empty_bitstream()
        dec.close()
    finally:
        dec.release_threads()


def iter_decode(fileobj_or_path, chunk_size=DEFAULT_CHUNK_SIZE, *, progress=None, topology=None, decoder=None,
                threads=None, slice_elements=None):
    """Synchronous streaming decode of a binary file object or a path: yields (name, ndarray), or in
    slice mode (name, shape, start, array).

    Reads ``chunk_size`` bytes at a time; ``progress``, ``decoder``, ``threads`` and
    ``slice_elements`` as for ``decode_stream``.
    """
    if isinstance(fileobj_or_path, (str, os.PathLike)):
        try:
            f = open(fileobj_or_path, "rb")
        except OSError as exc:
            raise NNCError("cannot read %s: %s" % (fileobj_or_path, exc.strerror))
        with f:
            yield from iter_decode(f, chunk_size, progress=progress, topology=topology, decoder=decoder,
                                   threads=threads, slice_elements=slice_elements)
        return
    dec = _decoder(decoder, topology, threads, slice_elements)
    empty = True
    try:
        while True:
            chunk = fileobj_or_path.read(chunk_size)
            if not chunk:
                break
            empty = False
            if dec.slice_elements is not None:
                yield from dec.iter_feed(chunk)
                if progress is not None:
                    progress(dec.bytes, dec.units, dec.tensors)
                continue
            tensors = dec.feed(chunk)
            if progress is not None:
                progress(dec.bytes, dec.units, dec.tensors)
            yield from tensors
            tensors = None
        if empty:
            raise empty_bitstream()
        dec.close()
    finally:
        dec.release_threads()
