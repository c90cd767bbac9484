"""nnc-edge: ISO/IEC 15938-17 Neural Network Coding for edge devices, the CPython face of decoder_core.

* decoding with numpy: ``decoding`` (``decode``, ``Decoder``), ``streaming`` (``StreamDecoder``,
  ``decode_stream``, ``iter_decode``), ``parallel`` (payloads on threads), ``sinks`` (tensors written
  to files as they are decoded), ``modelio`` (.safetensors / .npz), ``atomicfile``;
* ``encoder/``: the encoder (``encode``, ``Encoder``);
* ``updates`` (incremental updates, their records and chain state) and ``signing`` (Ed25519);
* ``cli/``: the ``nnc-edge`` command: the command registry (``cli/__init__``, ``__main__``), a module
  per command group (``decode``, ``stream``, ``encode``, ``update``, ``mqtt``, ``keys``), and ``demo``.

Importing nnc_edge loads the decoding side only: the encoder and the updates are imported on first
use (below), numpy is the only dependency outside the standard library. Only the command line
(``cli/``) imports ``transports.mqtt``; ``signing`` uses ``transports.ed25519`` on first use.
Nothing outside the command line imports ``nnc_edge.cli``.
"""

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
    # The encoder (nnc_edge.encoder.encoding) is imported on first use: decoding never loads it.
    if name in ("encode", "Encoder"):
        from .encoder import encoding
        return getattr(encoding, name)
    if name in _UPDATES:
        from . import updates
        return getattr(updates, name)
    raise AttributeError("module 'nnc_edge' has no attribute %r" % name)
