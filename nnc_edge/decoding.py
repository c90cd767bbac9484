"""The CPython face of the decoder: numpy arrays out, state kept across calls for update chains."""

import os

import numpy as np

import decoder_core
from decoder_core import NNCError

from .parallel import check_threads, decode_units


def _as_bytes(data_or_path):
    if isinstance(data_or_path, (str, os.PathLike)):
        try:
            with open(data_or_path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise NNCError("cannot read %s: %s" % (data_or_path, exc.strerror))
    if isinstance(data_or_path, (bytes, bytearray, memoryview)):
        return data_or_path
    raise TypeError("expected bytes or a path, not %s" % type(data_or_path).__name__)


def empty_bitstream():
    """The error for a bitstream of 0 bytes. It holds no unit, so a decoder would return an empty
    model; but no encoder writes one, and a download that failed leaves one behind."""
    return NNCError("the bitstream is empty (0 bytes)")


def to_numpy(dims, values):
    """View a decoder_core values array (or a NumpyBuffers one) as a numpy array of the tensor's shape
    (no copy)."""
    if isinstance(values, np.ndarray):
        return values.reshape(tuple(dims))
    dtype = np.float32 if values.typecode == "f" else np.int32
    return np.frombuffer(values, dtype=dtype).reshape(tuple(dims))


class NumpyBuffers:
    """decoder_core output hook (PayloadContext.output): each tensor is decoded straight into its final
    numpy array. Its int32 levels are written there and converted to float32 in place, so a float
    tensor costs one buffer and no per-element Python objects."""

    def levels(self, name, count):
        return np.empty(count, dtype=np.int32)

    def values(self, buffer, typecode):
        return buffer.view(np.float32) if typecode == "f" else buffer


class Decoder:
    """Decodes NNR bitstreams, keeping decoder state across calls.

    A chain of incremental bitstreams decodes in order through one Decoder: each step uses what
    the earlier steps left (temporal context adaptation against the previous tensor of the same
    name, significance history).

    ``threads`` (default: the number of CPUs) decode NDUs, and the block rows of tensors coded with
    scan_order > 0, concurrently; the result is identical to threads=1.

    ``limits`` (decoder_core.Limits) bounds what a bitstream may make the decoder allocate or do
    (LimitError, an NNCError, beyond).

    ``topology`` is the out-of-band topology of streams that do not carry it (topology_carriage_flag
    0): a dict name -> shape, or a list of (name, shape) pairs whose order also resolves tensors
    named by index, e.g. ``nnc_edge.update_topology(base)`` for an update written by encode_update.
    """

    def __init__(self, topology=None, threads=None, limits=None):
        self.threads = check_threads(threads)
        self._core = decoder_core.Decoder(topology, limits=limits)
        self._core.output = NumpyBuffers()

    def decode(self, data_or_path):
        """Decode one bitstream (bytes or a file path) into a dict name -> numpy array, in stream order."""
        data = _as_bytes(data_or_path)
        if not len(data):
            raise empty_bitstream()
        return {name: to_numpy(dims, values) for name, dims, values in decode_units(self._core, data, self.threads)}


def decode(data_or_path, topology=None, threads=None, limits=None):
    """Decode a whole NNR bitstream (bytes or a path) into a dict name -> numpy array.

    Arrays are float32, or int32 for integer tensors (NNR_PT_INT), in stream order. ``threads``
    defaults to the number of CPUs, ``limits`` to decoder_core's defaults; ``topology`` as for Decoder.
    """
    return Decoder(topology, threads, limits).decode(data_or_path)
