"""32-bit platforms (armhf: Raspberry Pi OS 32-bit, Pi Zero/2/3) decode, refuse and encode exactly as 64-bit ones.

There, C long, size_t and Py_ssize_t have 32 bits and numpy's intp is int32, while a 300 MB unit has 2.4 G
bits. The values past 2^31 are made synthetically, so these tests take seconds on either word size;
benchmarks/arm_check.sh runs them on arm64 and armhf:
- a segment that began 256 MiB or 2 GiB before the bytes at hand (as in streaming, once the window has
  dropped the first bytes of a large unit) puts its bit pointers past 2^31 and 2^32: block rows with
  entry points decode identically on both backends, whole and in windows;
- tensor headers and state files claiming 2^31, 2^32 or 2^64 elements are refused with the same error;
- the encoder's counts under numpy's 32-bit casting rules (np.bincount refuses int64 there before
  numpy 2.2.4) give the same quantization.
"""

import json

import numpy as np
import pytest

import decoder_core
from decoder_core import LimitError, Limits, NNCError
from decoder_core import backend as core_backend
from decoder_core import deepcabac
from decoder_core.compat import zeros
from decoder_core.decoder import unit_spans
from nnc_edge import updates
from nnc_edge.encoder import quantize
from nnc_edge.updates import ChainState, StateFileError

from test_conformance import read_vector
from test_payload_corruption import one_ndu_stream
from test_payload_types import ndu_fields

ENTRY_POINT_VECTORS = ["p%d_entrypoints_scan%d" % (p, s) for p in (0, 1) for s in (1, 3)]
# Bytes of the segment before the data at hand: bit pointers then pass 2^31, and 2^32.
SHIFTS = [0, (1 << 28) + 3, (1 << 31) - (1 << 20)]


@pytest.fixture(autouse=True)
def _vectors(conformance_dir):
    return conformance_dir


def compiled_module():
    if "cython" not in core_backend.available():
        pytest.skip("the compiled backend is not built")
    from decoder_core import _deepcabac
    return _deepcabac


def tensor_engine(name, shift):
    """(engine before the tensor's first bin, its TensorCoding) of a one-tensor vector, the segment
    taken to start ``shift`` bytes before the data."""
    data = read_vector(name)
    core = decoder_core.Decoder()
    (job,) = [job for offset, end in unit_spans(data) for job in core.plan_unit(data, offset, end)]
    ndu = job.unit.ndu
    engine = deepcabac.ArithmeticDecoder(data, job.start, job.end)
    engine.iae(6 + job.ctx.qp_density)
    engine.start -= shift
    coding = deepcabac.TensorCoding(ndu.TensorDimensions, ndu.dq_flag, ndu.cabac_unary_length_minus1,
                                    ndu.scan_order, job.ctx.profile,
                                    entry_points=(ndu.cabac_offset_list, ndu.dq_state_list, ndu.BitOffsetList, 0),
                                    parent_node_id_present_flag=ndu.get("parent_node_id_present_flag", 0))
    return engine, coding


def decode_whole(module, name, shift):
    engine, coding = tensor_engine(name, shift)
    levels = module.decode_tensor_levels(engine, coding)
    return bytes(levels), engine


def decode_in_windows(compiled, name, shift):
    """One block row per window, as streaming decodes it (deepcabac.TensorSteps, or the compiled twin)."""
    engine, coding = tensor_engine(name, shift)
    steps = deepcabac.TensorSteps(engine, coding)
    fast = None
    if compiled is not None:
        assert steps.preamble() == deepcabac.PREAMBLE_DONE  # the whole segment is present
        fast = compiled.TensorSteps(engine, coding, steps)
    out = bytearray()
    lo = 0
    while lo < steps.count:
        hi = steps.window_end(lo, 1)
        window = zeros("i", hi - lo)
        if fast is not None:
            assert fast.run(engine, window, lo, hi) == deepcabac.WINDOW_DONE
        else:
            steps.set_window(lo, hi, window)
            assert steps.run() == deepcabac.WINDOW_DONE
        out += bytes(window)
        lo = hi
    return bytes(out), engine


@pytest.mark.parametrize("name", ENTRY_POINT_VECTORS)
def test_bit_pointers_past_2_31_decode_identically(name):
    compiled = compiled_module() if "cython" in core_backend.available() else None
    results = set()
    for shift in SHIFTS:
        runs = [decode_whole(deepcabac, name, shift), decode_in_windows(None, name, shift)]
        if compiled is not None:
            runs += [decode_whole(compiled, name, shift), decode_in_windows(compiled, name, shift)]
        for levels, engine in runs:
            engine.terminate_cabac()
            results.add((levels, engine.p, engine.range, engine.value, engine.get_bit_pointer() - 8 * shift))
    assert len(results) == 1


def test_entry_point_past_the_segment_is_refused_at_any_offset():
    """The last entry point moved 2^32 bits on: outside the segment, whatever bits came before it."""
    compiled = compiled_module() if "cython" in core_backend.available() else None
    for shift in SHIFTS:
        messages = set()
        for module in [deepcabac] + ([compiled] if compiled is not None else []):
            engine, coding = tensor_engine("p0_entrypoints_scan1", shift)
            offsets, states, bits, first = coding.entry_points
            coding.entry_points = (offsets, states, bits[:-1] + [bits[-1] + (1 << 32)], first)
            with pytest.raises(NNCError) as info:
                module.decode_tensor_levels(engine, coding)
            messages.add(str(info.value))
        assert len(messages) == 1 and "outside the segment" in messages.pop()


# --- headers and state files past 2^31 ----------------------------------------------------------------------
def decode_outcome(data, limits=None):
    try:
        decoder_core.decode(data, limits=limits)
    except NNCError as exc:
        return type(exc).__name__, getattr(exc, "limit", None), str(exc)
    raise AssertionError("decoded")


@pytest.mark.parametrize("dims", [[1 << 31], [1 << 16, 1 << 16], [1 << 20, 1 << 16, 8], [1 << 32, 1 << 32]])
def test_tensor_headers_past_2_31_elements_are_refused_identically(dims):
    data = one_ndu_stream(0, ndu_fields("huge", dims, dq_flag=1), bytes(range(17, 57)))
    wide = Limits(max_tensor_elements=1 << 62, max_decoded_bytes=1 << 62)
    previous = core_backend.name()
    try:
        outcomes = set()
        for backend in core_backend.available():
            core_backend.use(backend)
            outcomes.add((decode_outcome(data), decode_outcome(data, wide)))
    finally:
        core_backend.use(previous)
    assert len(outcomes) == 1
    (kind, limit, message), (_, wide_limit, wide_message) = outcomes.pop()
    count = int(np.prod(dims, dtype=object))
    assert kind == LimitError.__name__ and limit == "max_tensor_elements" and str(count) in message, message
    if count <= wide.max_tensor_elements:
        assert wide_limit is None and "cannot fit" in wide_message, wide_message


@pytest.mark.parametrize("shape", [[1 << 16, 1 << 16], [1 << 32, 1 << 32]])
def test_state_file_residual_of_2_32_or_2_64_elements_is_refused(tmp_path, shape):
    """np.prod of such a shape wraps to 0 in int32 (armhf) or int64: the region check must not."""
    state = ChainState(bytes(32))
    state.bases = {"a": np.arange(12, dtype=np.int32)}
    state.history = {"a": np.ones(12, np.uint8)}
    state.residual = {"a": np.zeros((3, 4), np.float32)}
    path = str(tmp_path / "chain.state")
    state.save(path)
    with open(path, "rb") as f:
        raw = f.read()
    preamble = updates._STATE_PREAMBLE
    magic, version, at, _ = preamble.unpack(raw[:preamble.size])
    meta = json.loads(raw[at:].decode("utf-8"))
    meta["residual"][0]["shape"] = shape
    header = json.dumps(meta).encode("utf-8")
    with open(path, "wb") as f:
        f.write(preamble.pack(magic, version, at, len(header)) + raw[preamble.size:at] + header)
    with pytest.raises(StateFileError, match="lie outside the data"):
        ChainState.load(path)


# --- the encoder's counts under 32-bit numpy ------------------------------------------------------------------
class Numpy32:
    """numpy as quantize.py meets it on a 32-bit platform with numpy < 2.2.4: intp is int32, and
    np.bincount refuses input that does not cast 'safe' to it (int64 does not)."""

    intp = np.int32

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def bincount(x, weights=None, minlength=0):
        x = np.asarray(x)
        if not np.can_cast(x.dtype, np.int32, "safe"):
            raise TypeError("Cannot cast array data from dtype('%s') to dtype('int32') according to the rule 'safe'"
                            % x.dtype)
        return np.bincount(x, weights, minlength)


def quantizations(w):
    results = [quantize.quantize_dq(w, -36, quantize.DEFAULT_QP_DENSITY, lambda_scale=1.0, backend=backend)
               for backend in ("python", "cython") if backend == "python" or quantize._trellis_ext is not None]
    results.append(quantize.quantize_dq(w, -36, quantize.DEFAULT_QP_DENSITY, scan_order=1, lambda_scale=0.5))
    results.append(quantize.quantize_codebook(w, -38, quantize.DEFAULT_QP_DENSITY))
    big = np.concatenate([w.reshape(-1), np.linspace(-3, 3, 200, dtype=np.float32)])
    results.append(quantize.quantize_codebook(big, -60, quantize.DEFAULT_QP_DENSITY))  # > 64 entries
    return results


def test_encoder_counts_are_the_same_under_32_bit_numpy(monkeypatch):
    with pytest.raises(TypeError):
        Numpy32().bincount(np.arange(3, dtype=np.int64))
    w = np.random.default_rng(17).normal(0, 0.05, (120, 80)).astype(np.float32)
    native = quantizations(w)
    monkeypatch.setattr(quantize, "np", Numpy32())
    narrow = quantizations(w)
    assert len(native) == len(narrow)
    for a, b in zip(native, narrow):
        assert repr(a[1:]) == repr(b[1:]) and np.array_equal(a[0], b[0]) and a[0].dtype == b[0].dtype
