"""Tensor sinks for streaming decoding: files written tensor by tensor, or slice by slice, never the
whole model in RAM.

Every sink has ``write(name, array)``, ``write_slice(name, shape, start, array)`` (the slices of the
slice mode of nnc_edge.streaming: a tensor's slices in order, one tensor at a time), ``close()``
(commit) and ``abort()`` (discard), and is a context manager that commits on success and aborts on
an exception. File sinks write next to the target into temporary files and replace the target
atomically (fsync, then rename) only when closed without error: a failed or interrupted decode
leaves an existing target unchanged and leaves no temporary file behind. A file written from
slices is byte for byte the file written from the whole tensors.

    from nnc_edge import iter_decode
    from nnc_edge.sinks import SafetensorsSink

    with SafetensorsSink("model.safetensors") as sink:
        sink.write_all(iter_decode("model.nnc", slice_elements=65536))
"""

import os
import shutil
import zipfile

import numpy as np

from . import modelio
from .atomicfile import commit, discard, temp_beside

_COPY_CHUNK = 1 << 20


class Sink:
    """Base class: a context manager around write / write_slice / close / abort."""

    closed = False

    def write(self, name, array):
        raise NotImplementedError

    def write_slice(self, name, shape, start, array):
        """Write the elements ``start .. start + array.size - 1`` of the row-major tensor ``name`` of
        ``shape``: ``array`` is 1-D. A tensor's slices come in order without gaps, the first at 0,
        and one tensor's are all written before the next tensor's."""
        raise NotImplementedError

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def write_all(self, items):
        """Write every (name, array) or slice (name, shape, start, array) of an iterable (e.g.
        iter_decode); returns how many items.

        Drops its reference to each item before asking for the next, so a streaming source
        never has two large tensors alive at once because of this loop.
        """
        count = 0
        it = iter(items)
        while True:
            item = next(it, None)
            if item is None:
                return count
            self._put(item)
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
            self._put(item)
            item = None
            count += 1

    def _put(self, item):
        if len(item) == 4:
            self.write_slice(item[0], item[1], item[2], item[3])
        else:
            self.write(item[0], item[1])

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class _FileSink(Sink):
    """What the file sinks share: whole tensors as one slice, and the order of slices checked (a
    slice out of place would silently corrupt the file)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._names = set()
        self._open = None   # [name, dtype, elements, elements written] of the tensor being written

    def write(self, name, array):
        array = self._prepare(name, array)
        self.write_slice(name, array.shape, 0, array.reshape(-1))

    def write_slice(self, name, shape, start, array):
        if self.closed:
            raise ValueError("write to a closed sink")
        array = self._prepare(name, array)
        current = self._open
        if current is None:
            if name in self._names:
                raise modelio.ModelFormatError("duplicate tensor name %r in %s" % (name, self.path))
            if start != 0:
                raise ValueError("%s: the first slice of tensor %r starts at element %d, not 0" % (self.path, name, start))
            shape = tuple(int(d) for d in shape)
            current = [name, array.dtype, _elements(shape), 0]
            self._begin(name, shape, array.dtype)
            self._names.add(name)
            self._open = current
        elif name != current[0]:
            raise ValueError("%s: a slice of tensor %r arrived while tensor %r has %d of its %d elements"
                             % (self.path, name, current[0], current[3], current[2]))
        elif start != current[3] or array.dtype != current[1]:
            raise ValueError("%s: slice of tensor %r at element %d (%s), the next is at %d (%s)"
                             % (self.path, name, start, array.dtype, current[3], current[1]))
        end = current[3] + array.size
        if end > current[2]:
            raise ValueError("%s: slice of tensor %r ends at element %d, beyond its %d elements"
                             % (self.path, name, end, current[2]))
        self._data(array.reshape(-1).view(np.uint8))
        current[3] = end
        if end == current[2]:
            self._end()
            self._open = None

    def close(self):
        if self.closed:
            return
        current = self._open
        if current is not None:
            self.abort()
            raise ValueError("%s: tensor %r is incomplete: %d of its %d elements were written"
                             % (self.path, current[0], current[3], current[2]))
        try:
            self._commit()
        finally:
            self.abort()

    def _prepare(self, name, array):
        """``array`` as the C-contiguous array whose bytes the file stores."""
        raise NotImplementedError

    def _begin(self, name, shape, dtype):
        pass

    def _data(self, raw):
        raise NotImplementedError

    def _end(self):
        pass

    def _commit(self):
        raise NotImplementedError


def _elements(shape):
    count = 1
    for d in shape:
        count *= d
    return count


class SafetensorsSink(_FileSink):
    """Writes a .safetensors file incrementally.

    Tensor bytes go to a temporary data file as they arrive; ``close()`` writes the header (known
    only now) into a second temporary file, copies the data after it in 1 MiB chunks, fsyncs and
    renames it onto ``path``. Memory: one tensor or slice (the caller's) plus the copy buffer.
    ``metadata``: an optional str -> str map stored as "__metadata__".
    """

    def __init__(self, path, metadata=None):
        _FileSink.__init__(self, path)
        self.metadata = metadata
        self._layout = []  # (name, dtype, shape) in data order
        self._data_file, self._data_tmp = temp_beside(self.path, ".data.tmp")

    def _prepare(self, name, array):
        return modelio._contiguous_array(name, array)

    def _begin(self, name, shape, dtype):
        self._layout.append((name, dtype, shape))

    def _data(self, raw):
        self._data_file.write(raw)

    def _commit(self):
        out = tmp = None
        try:
            header = modelio.safetensors_header(self._layout, self.metadata)
            out, tmp = temp_beside(self.path, ".tmp")
            out.write(header)
            self._data_file.seek(0)
            shutil.copyfileobj(self._data_file, out, _COPY_CHUNK)
            # The data file goes before the rename: a kill after the rename then leaves nothing
            # behind (a model already current is not written again, which would clear it).
            discard(self._data_file, self._data_tmp)
            self._data_file = self._data_tmp = None
            commit(out, tmp, self.path)
            out = tmp = None
        finally:
            discard(out, tmp)

    def abort(self):
        self.closed = True
        discard(self._data_file, self._data_tmp)
        self._data_file = self._data_tmp = None


class NpzSink(_FileSink):
    """Writes an .npz archive (what numpy.load reads) with one .npy member per tensor, streamed into
    the archive as the tensor or its slices arrive; renamed onto ``path`` at ``close()``. ``compress``
    deflates the members (numpy.savez_compressed)."""

    def __init__(self, path, compress=False):
        _FileSink.__init__(self, path)
        self._member = None
        self._file, self._tmp = temp_beside(self.path, ".tmp")
        self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED,
                                    allowZip64=True)

    def _prepare(self, name, array):
        if not isinstance(name, str):
            raise modelio.ModelFormatError("tensor names must be strings, not %r" % (name,))
        return np.asarray(array, order="C")  # not ascontiguousarray, which makes a 0-d array 1-d

    def _begin(self, name, shape, dtype):
        # What np.lib.format.header_data_from_array_1_0 gives for a C-contiguous array of this shape.
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        self._member = self._zip.open(name + ".npy", "w", force_zip64=True)
        try:
            np.lib.format.write_array_header_1_0(self._member, header)
        except ValueError:  # header too long for format 1.0
            np.lib.format.write_array_header_2_0(self._member, header)

    def _data(self, raw):
        # The caller's buffer, not a copy (numpy's write_array copies 16 MiB at a time), in pieces:
        # deflate returns what a whole piece compresses to in one bytes object.
        raw = memoryview(raw)
        for start in range(0, len(raw), _COPY_CHUNK):
            self._member.write(raw[start:start + _COPY_CHUNK])

    def _end(self):
        member, self._member = self._member, None
        member.close()

    def _commit(self):
        self._zip.close()
        commit(self._file, self._tmp, self.path)
        self._file = self._tmp = None

    def abort(self):
        self.closed = True
        if self._file is not None:
            # Finish the archive's bookkeeping so that nothing writes into the file once it is closed.
            for part in (self._member, self._zip):
                try:
                    if part is not None:
                        part.close()
                except (OSError, ValueError):
                    pass
        self._member = None
        discard(self._file, self._tmp)
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

    ``on_slice(name, shape, start, array)`` (optional) takes the slices of the slice mode, e.g.
    ``params[name].view(-1)[start:start + array.size].copy_(torch.from_numpy(array))``; without it a
    slice is refused with ValueError.

    ``on_close`` / ``on_abort`` (optional, no arguments) run when the sink commits or fails: after a
    failed stream, ``on_abort`` is where to discard what the slices already changed.
    """

    def __init__(self, fn, on_close=None, on_abort=None, on_slice=None):
        self.fn = fn
        self.on_close = on_close
        self.on_abort = on_abort
        self.on_slice = on_slice

    def write(self, name, array):
        if self.closed:
            raise ValueError("write to a closed sink")
        self.fn(name, array)

    def write_slice(self, name, shape, start, array):
        if self.closed:
            raise ValueError("write to a closed sink")
        if self.on_slice is None:
            raise ValueError("CallbackSink got a slice of tensor %r (element %d on) but has no on_slice function"
                             % (name, start))
        self.on_slice(name, shape, start, array)

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
