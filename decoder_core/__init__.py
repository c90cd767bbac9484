"""nnc-edge portable decoder core: ISO/IEC 15938-17 (NNC) bitstreams to tensors.

Pure Python that also runs on MicroPython. Public API: ``decode``, ``Decoder``, ``NNCError``.
"""

from .errors import NNCError
from .decoder import Decoder, decode

__all__ = ["NNCError", "Decoder", "decode"]
