"""nnc-edge: ISO/IEC 15938-17 Neural Network Coding for edge devices."""

from decoder_core import NNCError

from .decoding import Decoder, decode
from .streaming import StreamDecoder, decode_stream, iter_decode

__version__ = "0.1.0"
__all__ = ["NNCError", "Decoder", "decode", "StreamDecoder", "decode_stream", "iter_decode", "__version__"]
