"""The CPython face of the decoder: numpy arrays out, state kept across calls for update chains."""

import os

import numpy as np

import decoder_core
from decoder_core import NNCError


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


def to_numpy(dims, values):
    """View a decoder_core values array as a numpy array of the tensor's shape (no copy)."""
    dtype = np.float32 if values.typecode == "f" else np.int32
    return np.frombuffer(values, dtype=dtype).reshape(tuple(dims))


class Decoder:
    """Decodes NNR bitstreams, keeping decoder state across calls.

    A chain of incremental bitstreams decodes in order through one Decoder: each step uses what
    the earlier steps left (temporal context adaptation against the previous tensor of the same
    name, significance history).
    """

    def __init__(self, topology=None):
        self._core = decoder_core.Decoder(topology)

    def decode(self, data_or_path):
        """Decode one bitstream (bytes or a file path) into a dict name -> numpy array, in stream order."""
        data = _as_bytes(data_or_path)
        return {name: to_numpy(dims, values) for name, dims, values in self._core.decode(data)}


def decode(data_or_path, topology=None):
    """Decode a whole NNR bitstream (bytes or a path) into a dict name -> numpy array.

    Arrays are float32, or int32 for integer tensors (NNR_PT_INT), in stream order.
    """
    return Decoder(topology).decode(data_or_path)
