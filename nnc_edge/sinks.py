"""Tensor sinks for streaming decoding: files written tensor by tensor, never the whole model in RAM.

Every sink has ``write(name, array)``, ``close()`` (commit) and ``abort()`` (discard), and is a
context manager that commits on success and aborts on an exception. File sinks write next to
the target into temporary files and replace the target atomically (fsync, then rename) only when
closed without error: a failed or interrupted decode leaves an existing target unchanged and
leaves no temporary file behind.

    from nnc_edge import iter_decode
    from nnc_edge.sinks import SafetensorsSink

    with SafetensorsSink("model.safetensors") as sink:
        sink.write_all(iter_decode("model.nnc"))
"""

import os
import shutil
import zipfile

import numpy as np

from . import modelio

_COPY_CHUNK = 1 << 20


class Sink:
    """Base class: a context manager around write / close / abort."""

    closed = False

    def write(self, name, array):
        raise NotImplementedError

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def write_all(self, items):
        """Write every (name, array) of an iterable (e.g. iter_decode); returns how many.

        Drops its reference to each tensor before asking for the next, so a streaming source
        never has two large tensors alive at once because of this loop.
        """
        count = 0
        it = iter(items)
        while True:
            item = next(it, None)
            if item is None:
                return count
            self.write(item[0], item[1])
            item = None
            count += 1

    async def write_all_async(self, items):
        """The same for an async iterable (e.g. decode_stream); returns how many."""
        count = 0
        it = items.__aiter__()
        while True:
            try:
                item = await it.__anext__()
            except StopAsyncIteration:
                return count
            self.write(item[0], item[1])
            item = None
            count += 1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def _temp_beside(path, suffix):
    """A new temporary file in the target's directory (same file system: rename is atomic),
    created with the permissions a plain open() would give the target (0666 minus umask)."""
    directory, base = os.path.split(os.path.abspath(path))
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, ".%s.%s%s" % (base, os.urandom(4).hex(), suffix))
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        return os.fdopen(fd, "w+b"), tmp


def _commit(f, tmp, path):
    """fsync f (a temp file beside path), rename it onto path, fsync the directory."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return  # directories cannot be opened on every platform; the rename is done
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(f, tmp):
    if f is not None:
        f.close()
    if tmp is not None and os.path.exists(tmp):
        os.remove(tmp)


class SafetensorsSink(Sink):
    """Writes a .safetensors file incrementally.

    Tensor bytes go to a temporary data file as they arrive; ``close()`` writes the header (known
    only now) into a second temporary file, copies the data after it in 1 MiB chunks, fsyncs and
    renames it onto ``path``. Memory: one tensor (the caller's) plus the copy buffer.
    ``metadata``: an optional str -> str map stored as "__metadata__".
    """

    def __init__(self, path, metadata=None):
        self.path = os.fspath(path)
        self.metadata = metadata
        self._layout = []  # (name, dtype, shape) in data order
        self._names = set()
        self._data, self._data_tmp = _temp_beside(self.path, ".data.tmp")

    def write(self, name, array):
        if self.closed:
            raise ValueError("write to a closed sink")
        if name in self._names:
            raise modelio.ModelFormatError("duplicate tensor name %r in %s" % (name, self.path))
        array = modelio._contiguous_array(name, array)
        self._data.write(array.reshape(-1).view(np.uint8))
        self._names.add(name)
        self._layout.append((name, array.dtype, array.shape))

    def close(self):
        if self.closed:
            return
        out = tmp = None
        try:
            header = modelio.safetensors_header(self._layout, self.metadata)
            out, tmp = _temp_beside(self.path, ".tmp")
            out.write(header)
            self._data.seek(0)
            shutil.copyfileobj(self._data, out, _COPY_CHUNK)
            _commit(out, tmp, self.path)
            out = tmp = None
        finally:
            _discard(out, tmp)
            self.abort()

    def abort(self):
        self.closed = True
        _discard(self._data, self._data_tmp)
        self._data = self._data_tmp = None


class NpzSink(Sink):
    """Writes an .npz archive (what numpy.load reads) with one .npy member per tensor as it arrives;
    renamed onto ``path`` at ``close()``. ``compress`` deflates the members (numpy.savez_compressed)."""

    def __init__(self, path, compress=False):
        self.path = os.fspath(path)
        self._names = set()
        self._file, self._tmp = _temp_beside(self.path, ".tmp")
        self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED,
                                    allowZip64=True)

    def write(self, name, array):
        if self.closed:
            raise ValueError("write to a closed sink")
        if not isinstance(name, str):
            raise modelio.ModelFormatError("tensor names must be strings, not %r" % (name,))
        if name in self._names:
            raise modelio.ModelFormatError("duplicate tensor name %r in %s" % (name, self.path))
        array = np.ascontiguousarray(array)
        header = np.lib.format.header_data_from_array_1_0(array)
        with self._zip.open(name + ".npy", "w", force_zip64=True) as member:
            try:
                np.lib.format.write_array_header_1_0(member, header)
            except ValueError:  # header too long for format 1.0
                np.lib.format.write_array_header_2_0(member, header)
            # The tensor's own buffer, not a copy (numpy's write_array copies 16 MiB at a time), in
            # pieces: deflate returns what a whole piece compresses to in one bytes object.
            raw = memoryview(array.reshape(-1).view(np.uint8))
            for start in range(0, len(raw), _COPY_CHUNK):
                member.write(raw[start:start + _COPY_CHUNK])
        self._names.add(name)

    def close(self):
        if self.closed:
            return
        try:
            self._zip.close()
            _commit(self._file, self._tmp, self.path)
            self._file = self._tmp = None
        finally:
            self.abort()

    def abort(self):
        self.closed = True
        if self._file is not None:
            try:
                self._zip.close()
            except (OSError, ValueError):
                pass
        _discard(self._file, self._tmp)
        self._file = self._tmp = None


class CallbackSink(Sink):
    """Hands each tensor to ``fn(name, array)``, e.g. to load it straight into a live model.

    The array is only valid for the call's purposes: copy it if it must outlive the call. With a
    PyTorch module (torch is not a dependency of nnc-edge)::

        import torch
        params = dict(model.state_dict(keep_vars=True))

        def load(name, array):
            with torch.no_grad():
                params[name].copy_(torch.from_numpy(array))

        with CallbackSink(load) as sink:
            sink.write_all(iter_decode("update.nnc"))

    ``on_close`` / ``on_abort`` (optional, no arguments) run when the sink commits or fails.
    """

    def __init__(self, fn, on_close=None, on_abort=None):
        self.fn = fn
        self.on_close = on_close
        self.on_abort = on_abort

    def write(self, name, array):
        if self.closed:
            raise ValueError("write to a closed sink")
        self.fn(name, array)

    def close(self):
        if not self.closed:
            self.closed = True
            if self.on_close is not None:
                self.on_close()

    def abort(self):
        if not self.closed:
            self.closed = True
            if self.on_abort is not None:
                self.on_abort()


def open_sink(path, **options):
    """A SafetensorsSink or NpzSink chosen by the suffix of path (modelio.format_of)."""
    if modelio.format_of(path) == "safetensors":
        return SafetensorsSink(path, **options)
    return NpzSink(path, **options)
