"""nnc-edge portable decoder core: ISO/IEC 15938-17 (NNC) bitstreams to tensors.

Pure Python that also runs on MicroPython. Imports nothing outside decoder_core (no numpy, nnc_edge,
transports or nnc_device) and only modules MicroPython has (array, struct, zlib/deflate, io, os,
sys), so the package can be copied to a board alone; on CPython backend.py loads the optional
compiled _deepcabac. Public API: ``decode``, ``Decoder``, ``StreamDecoder``
(push decoding), ``NNCError``, ``Limits`` and ``LimitError`` (resource limits, decoder_core.limits),
``backend_name`` (on CPython a compiled DeepCABAC backend is used when built).
"""

from .errors import NNCError
from .limits import LimitError, Limits
from .decoder import Decoder, decode
from .stream import StreamDecoder
from . import backend as _backend


def backend_name():
    """The active DeepCABAC backend: "cython" (compiled) or "python" (see decoder_core.backend)."""
    return _backend.name()


__all__ = ["NNCError", "LimitError", "Limits", "Decoder", "decode", "StreamDecoder", "backend_name"]
