"""Files as async byte sources for nnc_edge.decode_stream, including files still being written.

``FileSource(path)`` is an async iterator of byte chunks; every read runs in the event loop's
default executor, so a slow disk never blocks the loop.

Follow mode (``follow=True``, like ``tail -f``) keeps reading while another process appends to
the file. An NNR bitstream has no end marker, so the end is decided by this rule:

* the stream is over once the file has not grown for ``idle_timeout`` seconds **and**
  ``complete()`` returns True (when no ``complete`` is given, idleness alone ends it);
* ``complete`` is typically the decoder's boundary test, so a writer that pauses in the middle of
  an NNR unit or of a partial-data sequence is waited for::

      dec = nnc_edge.StreamDecoder()
      src = FileSource(path, follow=True, complete=lambda: dec.at_boundary)
      async for name, array in nnc_edge.decode_stream(src, decoder=dec):
          ...

  (or any other signal, e.g. ``complete=lambda: os.path.exists(path + ".done")``);
* a writer that stalls for ``stall_timeout`` seconds ends the stream whatever ``complete()``
  says, so nothing waits forever; the decoder's ``close()`` then raises NNCError if the stream
  stopped inside a unit. ``stall_timeout=None`` waits indefinitely.

In follow mode a file that does not exist yet is waited for (up to ``stall_timeout``). A followed
file that shrinks was rewritten, not appended to, and raises NNCError.
"""

import asyncio
import os
import time

from decoder_core import NNCError

DEFAULT_CHUNK_SIZE = 1 << 16


class FileSource:
    """Async iterator of the chunks of a file: ``async for chunk in FileSource(path): ...``."""

    def __init__(self, path, chunk_size=DEFAULT_CHUNK_SIZE, *, follow=False, idle_timeout=2.0,
                 poll_interval=0.05, complete=None, stall_timeout=60.0):
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.path = os.fspath(path)
        self.chunk_size = chunk_size
        self.follow = follow
        self.idle_timeout = idle_timeout
        self.poll_interval = poll_interval
        self.complete = complete
        self.stall_timeout = stall_timeout
        self.bytes_read = 0

    def __aiter__(self):
        return self._chunks()

    async def _chunks(self):
        loop = asyncio.get_running_loop()
        f = await self._open(loop)
        try:
            idle_since = time.monotonic()
            while True:
                chunk = await loop.run_in_executor(None, f.read, self.chunk_size)
                if chunk:
                    self.bytes_read += len(chunk)
                    idle_since = time.monotonic()
                    yield chunk
                    continue
                if not self.follow:
                    return
                if self._grew(f):
                    continue
                if self._finished(time.monotonic() - idle_since) and not self._grew(f):
                    return  # (checked again: the writer may have appended while complete() ran)
                await asyncio.sleep(self.poll_interval)
        finally:
            f.close()

    def _grew(self, f):
        size = os.fstat(f.fileno()).st_size
        if size < self.bytes_read:
            raise NNCError("%s shrank to %d bytes while being followed (it was rewritten)"
                           % (self.path, size), self.bytes_read, "file")
        return size > self.bytes_read

    def _finished(self, idle):
        if self.stall_timeout is not None and idle >= self.stall_timeout:
            return True
        return idle >= self.idle_timeout and (self.complete is None or self.complete())

    async def _open(self, loop):
        started = time.monotonic()
        while True:
            try:
                return await loop.run_in_executor(None, open, self.path, "rb")
            except FileNotFoundError:
                if not self.follow or (self.stall_timeout is not None
                                       and time.monotonic() - started >= self.stall_timeout):
                    raise
            await asyncio.sleep(self.poll_interval)
