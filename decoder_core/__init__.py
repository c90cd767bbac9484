"""nnc-edge portable decoder core: ISO/IEC 15938-17 (NNC) bitstreams to tensors.

Pure Python that also runs on MicroPython. Imports nothing outside decoder_core (no numpy, nnc_edge,
transports or nnc_device) and only modules MicroPython has (array, struct, zlib/deflate, io, os,
sys), so the package can be copied to a board alone; on CPython backend.py loads the optional
compiled _deepcabac. Public API: ``decode``, ``Decoder``, ``StreamDecoder``
(push decoding), ``NNCError``, ``Limits`` and ``LimitError`` (resource limits, decoder_core.limits),
``backend_name`` (on CPython a compiled DeepCABAC backend is used when built).

On MicroPython importing the package imports none of its modules: the names above are loaded when
first used (module ``__getattr__``), so that a small heap can import the modules one at a time,
in the order of ``MODULES``, collecting garbage between them. Loading a module leaves garbage (about
a fifth of what it allocates) between the objects it keeps; collected before the next module loads,
those holes are filled by it instead of fragmenting the heap (README "MicroPython").
"""

import sys

# decoder_core's modules in dependency order: each imports only modules before it.
MODULES = ("compat", "errors", "tables", "limits", "bitreader", "units", "reconstruction", "deepcabac",
           "backend", "payload", "decoder", "incremental", "stream")

__all__ = ["NNCError", "LimitError", "Limits", "Decoder", "decode", "StreamDecoder", "backend_name"]

if sys.implementation.name == "micropython":
    _HOMES = {"NNCError": "errors", "LimitError": "limits", "Limits": "limits", "Decoder": "decoder",
              "decode": "decoder", "StreamDecoder": "stream"}

    def __getattr__(name):
        home = _HOMES.get(name)
        if home is not None:
            return getattr(__import__("decoder_core." + home, None, None, (name,)), name)
        if name in MODULES:
            # ``from . import backend`` in the package's modules: MicroPython asks here before it
            # imports the submodule.
            return __import__("decoder_core." + name, None, None, (name,))
        raise AttributeError(name)
else:
    from .errors import NNCError  # noqa: F401
    from .limits import LimitError, Limits  # noqa: F401
    from .decoder import Decoder, decode  # noqa: F401
    from .stream import StreamDecoder  # noqa: F401


def backend_name():
    """The active DeepCABAC backend: "cython" (compiled) or "python" (see decoder_core.backend)."""
    from . import backend

    return backend.name()
