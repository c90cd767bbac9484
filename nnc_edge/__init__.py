"""nnc-edge: ISO/IEC 15938-17 Neural Network Coding for edge devices."""

from decoder_core import NNCError

from .decoding import Decoder, decode

__version__ = "0.1.0"
__all__ = ["NNCError", "Decoder", "decode", "__version__"]
