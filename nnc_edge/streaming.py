"""Streaming decoding on CPython: numpy tensors out while the bytes are still arriving.

``decode_stream(source)`` is an async iterator of (name, ndarray) over an async byte source;
``iter_decode(file_or_path)`` is its synchronous counterpart; ``StreamDecoder`` is the push
interface underneath (``feed(chunk)`` -> list of (name, ndarray)). Each tensor comes out as soon
as the last byte of its NNR unit (or of its last partial unit) has arrived, and the decoder holds
at most one NNR unit of input (see decoder_core.stream), so memory follows the largest tensor,
not the model.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import decoder_core.stream as core_stream
from decoder_core import NNCError

from .decoding import NumpyBuffers, to_numpy
from .parallel import ChunkRunner, check_threads

DEFAULT_CHUNK_SIZE = 1 << 16


class StreamDecoder:
    """Push decoder with numpy output. ``feed(chunk)`` returns [(name, ndarray), ...] for the
    tensors that chunk completed; ``close()`` raises NNCError if the stream stopped inside a unit
    or a partial-data sequence. Reusable for the next bitstream of an update chain after close().

    ``bytes``, ``units`` and ``tensors`` count what has been fed, framed and emitted.

    ``threads`` (default: the number of CPUs) decode the block rows of a tensor coded with
    scan_order > 0 concurrently (nnc_edge.parallel); units themselves are decoded one at a time,
    in arrival order, so that each tensor is out as soon as its unit is.

    ``limits`` (decoder_core.Limits) bounds what a stream may make the decoder allocate or do;
    ``topology`` is the out-of-band topology, as for nnc_edge.Decoder.
    """

    def __init__(self, topology=None, max_unit_size=None, threads=None, limits=None):
        self.threads = check_threads(threads)
        self._pool = None
        self._core = core_stream.StreamDecoder(topology, max_unit_size, limits=limits)
        # Each tensor is decoded straight into its numpy array (levels converted in place).
        self._core.decoder.output = NumpyBuffers()

    def feed(self, chunk):
        if self.threads > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="nnc-edge-stream")
            self._core.decoder.runner = ChunkRunner(self._pool, self.threads)
        return [(name, to_numpy(shape, values)) for name, shape, values in self._core.feed(chunk)]

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


async def decode_stream(source, *, progress=None, topology=None, decoder=None, chunk_size=DEFAULT_CHUNK_SIZE,
                        offload=True, threads=None):
    """Decode an NNR bitstream from an async byte source: ``async for name, array in ...``.

    ``source``: an ``asyncio.StreamReader``, an async iterator of bytes (a transport such as
    ``transports.file.FileSource``) or any object with an async ``read(n)``. ``progress`` is
    called with (bytes, units, tensors) after each chunk. ``decoder`` continues an update chain
    (or lets a follow-mode source watch ``decoder.at_boundary``); otherwise a new
    ``StreamDecoder(topology, threads=threads)`` is used. Arrays are float32 (int32 for integer
    tensors).

    With ``offload``, a chunk that completes an NNR unit is decoded in the default executor so
    the event loop keeps running during long units; other chunks are only copied, inline.

    Raises NNCError for a bad stream, including one that ends inside a unit or a partial-data
    sequence (after every complete tensor before that point has been yielded).
    """
    import asyncio  # here, not at module level: `import nnc_edge` stays light on devices

    dec = decoder if decoder is not None else StreamDecoder(topology, threads=threads)
    loop = asyncio.get_running_loop()
    try:
        async for chunk in _chunks(source, chunk_size):
            if offload and len(chunk) >= max(dec.pending, 1):
                tensors = await loop.run_in_executor(None, dec.feed, chunk)
            else:
                tensors = dec.feed(chunk)
            if progress is not None:
                progress(dec.bytes, dec.units, dec.tensors)
            for item in tensors:
                yield item
            tensors = item = None  # hand each tensor over without keeping it alive here
        dec.close()
    finally:
        dec.release_threads()


def iter_decode(fileobj_or_path, chunk_size=DEFAULT_CHUNK_SIZE, *, progress=None, topology=None, decoder=None,
                threads=None):
    """Synchronous streaming decode of a binary file object or a path: yields (name, ndarray).

    Reads ``chunk_size`` bytes at a time; ``progress``, ``decoder`` and ``threads`` as for
    ``decode_stream``.
    """
    if isinstance(fileobj_or_path, (str, os.PathLike)):
        try:
            f = open(fileobj_or_path, "rb")
        except OSError as exc:
            raise NNCError("cannot read %s: %s" % (fileobj_or_path, exc.strerror))
        with f:
            yield from iter_decode(f, chunk_size, progress=progress, topology=topology, decoder=decoder,
                                   threads=threads)
        return
    dec = decoder if decoder is not None else StreamDecoder(topology, threads=threads)
    try:
        while True:
            chunk = fileobj_or_path.read(chunk_size)
            if not chunk:
                break
            tensors = dec.feed(chunk)
            if progress is not None:
                progress(dec.bytes, dec.units, dec.tensors)
            yield from tensors
            tensors = None
        dec.close()
    finally:
        dec.release_threads()
