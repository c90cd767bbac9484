"""nnc-edge: ISO/IEC 15938-17 Neural Network Coding for edge devices."""

from decoder_core import LimitError, Limits, NNCError

from .decoding import Decoder, decode
from .streaming import StreamDecoder, decode_stream, iter_decode

__version__ = "0.1.0"
__all__ = ["NNCError", "LimitError", "Limits", "Decoder", "decode", "StreamDecoder", "decode_stream", "iter_decode", "encode", "Encoder",
           "encode_update", "apply_update", "read_update_info", "model_digest", "update_topology", "ChainState",
           "UpdateInfo", "UpdateError", "__version__"]

_UPDATES = ("encode_update", "apply_update", "read_update_info", "model_digest", "update_topology", "ChainState",
            "UpdateInfo", "UpdateError")


def __getattr__(name):
    # The encoder (nnc_edge.encoding) is imported on first use: decoding never loads it.
    if name in ("encode", "Encoder"):
        from . import encoding
        return getattr(encoding, name)
    if name in _UPDATES:
        from . import updates
        return getattr(updates, name)
    raise AttributeError("module 'nnc_edge' has no attribute %r" % name)
