"""Which implementation decodes DeepCABAC levels and reconstructs values: "cython" or "python".

The compiled module decoder_core._deepcabac (built by setup.py when Cython and a C compiler are
present) is chosen automatically when it imports; otherwise, and always on MicroPython, the pure-Python
code is used. The environment variable NNC_EDGE_BACKEND=python|cython forces one at import time, and
use(name) switches at run time (tests run both). Both give bit-identical results.

The functions the payload decoder calls through this module:
    decode_tensor_levels(engine, coding, out=None) -> levels (int32, row-major; ``out`` if given)
    reconstruct(levels, qp, qp_density, codebook=None, zero_offset=0, where=0, in_place=False, out=None)
    update_history(levels, history)
    tensor_steps: None, or the compiled position loop for streaming (deepcabac.TensorSteps's twin,
        made from one whose preamble() has run)
"""

from . import deepcabac, reconstruction

_compiled = None
_compiled_error = None
try:
    from . import _deepcabac as _compiled
except Exception as exc:  # not built, or built for another interpreter
    _compiled_error = exc

_name = None
decode_tensor_levels = None
reconstruct = None
update_history = None
tensor_steps = None


def _python_update_history(levels, history):
    for i in range(len(history)):
        if levels[i]:
            history[i] = 1


def available():
    """The backends that can be used here, the preferred first."""
    return ["cython", "python"] if _compiled is not None else ["python"]


def name():
    """The active backend: "cython" or "python"."""
    return _name


def use(backend):
    """Switch the active backend ("cython" or "python"); ImportError if "cython" is not built."""
    global _name, decode_tensor_levels, reconstruct, update_history, tensor_steps
    if backend == "python":
        decode_tensor_levels = deepcabac.decode_tensor_levels
        reconstruct = reconstruction.reconstruct
        update_history = _python_update_history
        tensor_steps = None
    elif backend == "cython":
        if _compiled is None:
            raise ImportError("the compiled DeepCABAC backend (decoder_core._deepcabac) is not available: %s; "
                              "install Cython and a C compiler, then reinstall (pip install -e .)" % _compiled_error)
        decode_tensor_levels = _compiled.decode_tensor_levels
        reconstruct = _compiled.reconstruct
        update_history = _compiled.update_history
        tensor_steps = _compiled.TensorSteps
    else:
        raise ValueError("unknown backend %r: use 'python' or 'cython'" % (backend,))
    _name = backend


def _requested():
    try:
        import os
        return os.environ.get("NNC_EDGE_BACKEND") or None
    except Exception:  # MicroPython: no os.environ
        return None


use(_requested() or available()[0])
