"""Both decoder_core backends (pure Python, compiled Cython) and parallel decoding give identical results.

- every conformance vector decodes bit-exactly on each backend, through nnc_edge and decoder_core;
- threads=1 and threads=2 give the same tensors in the same order, across NDUs and across the block
  rows of one tensor (entry points), including update chains that tie NDUs together;
- damaged input raises the same NNCError on both backends.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import decoder_core
import nnc_edge
from decoder_core import NNCError
from decoder_core import backend as core_backend
from decoder_core.decoder import unit_spans
from decoder_core.deepcabac import ArithmeticDecoder, TensorCoding
from nnc_edge.decoding import NumpyBuffers
from nnc_edge.parallel import ChunkRunner, PayloadScheduler, decode_units
from conftest import require_compiled_backend
from test_conformance import CASES, assert_bit_exact, core_as_numpy, expected_tensors, read_vector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINT_VECTORS = ["p%d_entrypoints_scan%d" % (p, s) for p in (0, 1) for s in (1, 2, 3)]


def compiled():
    require_compiled_backend()
    from decoder_core import _deepcabac
    return _deepcabac


@pytest.fixture
def split_small_tensors(monkeypatch):
    """Let the compiled backend split even the small conformance tensors into block-row chunks."""
    monkeypatch.setattr(compiled(), "PARALLEL_MIN_COUNT", 0)


def decode_list(data, threads):
    """All tensors of a stream as [(name, shape, numpy array)] in stream order (duplicates kept)."""
    core = decoder_core.Decoder()
    core.output = NumpyBuffers()
    return [(name, dims, nnc_edge.decoding.to_numpy(dims, values)) for name, dims, values in
            decode_units(core, data, threads)]


def assert_same_list(a, b):
    assert [(name, dims) for name, dims, _ in a] == [(name, dims) for name, dims, _ in b]
    for (name, _, x), (_, _, y) in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint32), y.view(np.uint32)), name


# --- backend selection ------------------------------------------------------------------------------
def test_backend_name_is_exported_and_switchable(backend):
    assert decoder_core.backend_name() == backend
    assert backend in core_backend.available()


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError):
        core_backend.use("fortran")


def test_compiled_backend_is_chosen_by_default_when_built():
    code = "import decoder_core, sys; sys.stdout.write(decoder_core.backend_name())"
    env = dict(os.environ)
    env.pop("NNC_EDGE_BACKEND", None)
    env["PYTHONPATH"] = REPO
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out == core_backend.available()[0]
    env["NNC_EDGE_BACKEND"] = "python"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out == "python"


def test_forcing_a_missing_compiled_backend_fails_clearly():
    # A stand-in package whose compiled module cannot import: NNC_EDGE_BACKEND=cython must not fall back.
    code = ("import sys; sys.modules['decoder_core._deepcabac'] = None\n"
            "try:\n    import decoder_core\nexcept ImportError as exc:\n    print('ImportError', exc)\n")
    env = dict(os.environ, NNC_EDGE_BACKEND="cython", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("ImportError") and "decoder_core._deepcabac" in out


# --- conformance on each backend --------------------------------------------------------------------
@pytest.mark.parametrize("steps", [steps for _, steps in CASES], ids=[case for case, _ in CASES])
def test_conformance_bit_exact_on_each_backend(backend, steps):
    numpy_decoder = nnc_edge.Decoder(threads=1)
    core_decoder = decoder_core.Decoder()
    for name in steps:
        data = read_vector(name)
        want = expected_tensors(name)
        assert_bit_exact(numpy_decoder.decode(data), want, name)
        assert_bit_exact(core_as_numpy(core_decoder.decode(data)), want, name)


# --- threads ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [steps for _, steps in CASES], ids=[case for case, _ in CASES])
def test_two_threads_decode_like_one(split_small_tensors, steps):
    # The compiled backend (the pure-Python one takes the same scheduling path, see the chain test).
    serial = nnc_edge.Decoder(threads=1)
    parallel = nnc_edge.Decoder(threads=2)
    for name in steps:
        data = read_vector(name)
        one = serial.decode(data)
        two = parallel.decode(data)
        assert list(one) == list(two)
        assert_bit_exact(two, one, name)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_threads_must_be_a_positive_int(threads):
    with pytest.raises(ValueError):
        nnc_edge.Decoder(threads=threads)


def test_many_ndus_with_entry_points_on_two_threads(split_small_tensors):
    # Several NDUs split into block-row chunks on one pool: the jobs nest chunk runs without deadlock.
    compiled()
    data = b"".join(read_vector(name) for name in ENTRY_POINT_VECTORS + ["p1_real_silero_vad"])
    assert_same_list(decode_list(data, 2), decode_list(data, 1))
    assert_same_list(decode_list(data, 3), decode_list(data, 1))


def test_update_chain_in_one_stream_decodes_in_order_on_two_threads(backend):
    # The TCA steps concatenated: each NDU of tensor "0" codes against the previous one, so the
    # scheduler must run them one after the other although they are parsed up front.
    steps = dict(CASES)["p1_tca"]
    data = b"".join(read_vector(name) for name in steps)
    got = decode_list(data, 2)
    assert [name for name, _, _ in got] == ["0"] * len(steps)
    for (_, _, array), step in zip(got, steps):
        assert_bit_exact({"0": array}, expected_tensors(step), step)


class FakeJob:
    def __init__(self, name, chain_names, log, wait=None, release=None):
        self.name = name
        self.chain_names = chain_names
        self.log = log
        self.wait = wait
        self.release = release

    def run(self):
        if self.wait is not None:
            assert self.wait.wait(30)
        self.log.append(self.name)
        if self.release is not None:
            self.release.set()
        return [(self.name, [1], None, None)]


def test_scheduler_orders_chained_jobs_and_returns_stream_order():
    # A blocks until C has run; B shares A's chain name so it must wait for A even though a thread is
    # free. Without the dependency the free thread would run B before C.
    log = []
    event = threading.Event()
    jobs = [FakeJob("A", ["w"], log, wait=event), FakeJob("B", ["w"], log), FakeJob("C", (), log, release=event)]
    with PayloadScheduler(2) as scheduler:
        for job in jobs:
            scheduler.submit(job)
        results = [out[0][0] for out in scheduler.results()]
    assert results == ["A", "B", "C"]
    assert log == ["C", "A", "B"]


def test_chunk_runner_runs_every_chunk_once_and_raises_the_first_error():
    from concurrent.futures import ThreadPoolExecutor
    seen = []
    with ThreadPoolExecutor(2) as pool:
        runner = ChunkRunner(pool, 2)
        runner.run(7, seen.append)
        assert sorted(seen) == list(range(7))

        def fail(i):
            if i in (3, 5):
                raise KeyError(i)
        with pytest.raises(KeyError) as info:
            runner.run(7, fail)
        assert info.value.args == (3,)


def test_block_rows_decode_in_any_order(split_small_tensors):
    # The compiled backend's chunks start at their entry points: running them backwards gives the
    # same levels and leaves the engine where serial decoding leaves it.
    mod = compiled()

    class Backwards:
        workers = 4

        def run(self, n, fn):
            self.n = n
            for i in reversed(range(n)):
                fn(i)

    for name in ENTRY_POINT_VECTORS:
        data = read_vector(name)
        core = decoder_core.Decoder()
        jobs = [job for offset, end in unit_spans(data) for job in core.plan_unit(data, offset, end)]
        (job,) = jobs
        ndu = job.unit.ndu
        results = []
        for runner in (None, Backwards()):
            engine = ArithmeticDecoder(data, job.start, job.end)
            engine.iae(6 + job.ctx.qp_density)
            coding = TensorCoding(ndu.TensorDimensions, ndu.dq_flag, ndu.cabac_unary_length_minus1, ndu.scan_order,
                                  job.ctx.profile, entry_points=(ndu.cabac_offset_list, ndu.dq_state_list,
                                                                 ndu.BitOffsetList, 0),
                                  parent_node_id_present_flag=ndu.get("parent_node_id_present_flag", 0))
            coding.runner = runner
            levels = mod.decode_tensor_levels(engine, coding)
            engine.terminate_cabac()
            results.append((bytes(levels), engine.p, engine.range, engine.value, engine.bits_needed))
        assert runner.n > 1, name
        assert results[0] == results[1], name


# --- damaged input ----------------------------------------------------------------------------------
def outcome(data):
    """The decoded tensors as bytes, or the NNCError message."""
    try:
        return [(name, dims, bytes(values)) for name, dims, values in decoder_core.decode(data)]
    except NNCError as exc:
        return "NNCError: %s" % exc


def on_both_backends(fn):
    compiled()
    previous = core_backend.name()
    try:
        results = []
        for name in ("python", "cython"):
            core_backend.use(name)
            results.append(fn())
        return results
    finally:
        core_backend.use(previous)


@pytest.mark.parametrize("name", ["p1_uniform_2d", "p1_dq_2d", "p1_sparse_rowskip_2d", "p0_entrypoints_scan2",
                                  "p1_codebook_2d", "p1_bias_1d"])
def test_truncated_payload_raises_the_same_nncerror(name):
    data = read_vector(name)
    core = decoder_core.Decoder()
    jobs = [job for offset, end in unit_spans(data) for job in core.plan_unit(data, offset, end)]
    job = jobs[-1]
    for keep in (3, (job.end - job.start) // 2, job.end - job.start - 2):
        job.end = job.start + keep

        def run():
            try:
                job.run()
            except NNCError as exc:
                return str(exc)
            return None
        python, cython = on_both_backends(run)
        assert python is not None and python == cython, (name, keep)


@pytest.mark.parametrize("name", ["p1_dq_2d", "p1_sparse_rowskip_2d", "p1_entrypoints_scan1", "p0_entrypoints_scan3",
                                  "p1_codebook_2d", "p0_int_3d", "p1_tca_1"])
def test_damaged_streams_behave_the_same_on_both_backends(name):
    data = read_vector(name)
    rng = np.random.default_rng(len(data))
    spans = list(unit_spans(data))
    offset, end = spans[-1]
    errors = 0
    for _ in range(12):
        damaged = bytearray(data)
        for pos in rng.integers(offset + 3, end, size=2):
            damaged[pos] ^= int(rng.integers(1, 256))
        python, cython = on_both_backends(lambda: outcome(bytes(damaged)))
        assert python == cython
        errors += isinstance(python, str)
    assert errors > 0  # the damage was noticed at least once


def test_corrupt_input_raises_nncerror_with_threads(backend):
    data = bytearray(read_vector("p1_model_dict"))
    spans = list(unit_spans(bytes(data)))
    offset, end = spans[len(spans) // 2]
    data[end - 1] ^= 0xFF  # breaks the stop bit / nesting zero bits of that NDU
    with pytest.raises(NNCError) as serial:
        nnc_edge.decode(bytes(data), threads=1)
    with pytest.raises(NNCError) as parallel:
        nnc_edge.decode(bytes(data), threads=2)
    assert str(serial.value) == str(parallel.value)


def test_compiled_reconstruction_matches_python(backend):
    # float32(level) * float32(step), rounded once, for levels beyond 2**24 as well; codebooks in float64.
    from array import array
    from decoder_core import payload
    levels = array("i", [0, 1, -1, 7, 123456, -(1 << 24) - 1, (1 << 30) + 3, -(1 << 31), (1 << 31) - 1])
    for qp, density in ((-32, 2), (-29, 2), (-75, 2), (5, 0), (-300, 3)):
        want = payload.reconstruct(levels, qp, density)
        assert bytes(core_backend.reconstruct(levels, qp, density)) == bytes(want)
        buf = np.frombuffer(bytes(levels), dtype=np.int32).copy()
        core_backend.reconstruct(buf, qp, density, in_place=True)
        assert buf.tobytes() == bytes(want)
    book = [-5, -2, 0, 3, 1000]
    cb_levels = array("i", [-2, -1, 0, 1, 2, 0])
    want = payload.reconstruct(cb_levels, -30, 2, book, 2)
    assert bytes(core_backend.reconstruct(cb_levels, -30, 2, book, 2)) == bytes(want)
    with pytest.raises(NNCError, match="outside a codebook"):
        core_backend.reconstruct(array("i", [0, 3]), -30, 2, book, 2)
