"""nnc_device.store on CPython: the device's tensor store.

The stored files equal the conformance reference bit for bit (every vector; chains in step order,
also applied as updates), and real updates made by nnc_edge.encode_update give what
nnc_edge.apply_update gives. A refused update, a failed stream and a killed run leave the committed
generation byte for byte as it was, with no stray file; the next run clears what a killed one left.
The same code runs on MicroPython (tests/test_micropython_slices.py).
"""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import nnc_edge
from decoder_core import NNCError
from decoder_core.units import nnr_unit_size
from nnc_device import record
from nnc_device.store import (
    AlreadyAppliedError, CorruptUpdateError, MissingStateError, StoreError, StoreSession, WrongBaseError, read_index,
    relabel, store_stream,
)
from nnc_edge import updates
from test_conformance import CASES, expected_tensors, read_vector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAINS = [case for case in CASES if len(case[1]) > 1]


def stored(directory):
    """The store's tensors as numpy arrays, in index order (memory-mapped, as a runtime would)."""
    out = {}
    for t in read_index(str(directory))["tensors"]:
        path = os.path.join(str(directory), t["file"])
        out[t["name"]] = np.memmap(path, dtype=t["dtype"], mode="r", shape=tuple(t["shape"])) \
            if os.path.getsize(path) else np.zeros(t["shape"], dtype=t["dtype"])
    return out


def snapshot(directory):
    """Every file of the directory with its bytes."""
    out = {}
    for name in sorted(os.listdir(str(directory))):
        with open(os.path.join(str(directory), name), "rb") as f:
            out[name] = f.read()
    return out


def referenced(index):
    names = {"index%d.json" % index["generation"]}
    names.update(t["file"] for t in index["tensors"])
    for c in index["chain"]:
        names.update((c["levels"], c["history"]))
    return names


def assert_same_bits(got, want, where):
    assert list(got) == list(want), where
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, (where, name, g.dtype, g.shape)
        assert np.array_equal(np.asarray(g).view(np.uint32), np.asarray(w).view(np.uint32)), (where, name)


def store_bytes(data, directory, **options):
    return store_stream(io.BytesIO(data), str(directory), **options)


# --- conformance -----------------------------------------------------------------------------------
@pytest.mark.parametrize("slices, chunk", [(7, 333), (4096, 1 << 20)], ids=["slice7-chunk333", "slice4096-whole"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_store_equals_the_conformance_reference(case, slices, chunk, tmp_path):
    # A chain's steps go into one store: each needs the TCA base and HDSP history the previous one
    # left in the store's files.
    for name in case[1]:
        index = store_bytes(read_vector(name), tmp_path, slice_elements=slices, chunk_size=chunk)
        assert_same_bits(stored(tmp_path), expected_tensors(name), name)
        assert set(os.listdir(str(tmp_path))) == referenced(index), name
        assert read_index(str(tmp_path)) == index


@pytest.mark.parametrize("case", CHAINS, ids=[c[0] for c in CHAINS])
def test_chain_steps_applied_as_updates(case, tmp_path, backend):
    # Each later step decodes to a difference: the store adds it to what it holds (update rule).
    steps = case[1]
    store_bytes(read_vector(steps[0]), tmp_path, slice_elements=100)
    model = expected_tensors(steps[0])
    for name in steps[1:]:
        before = read_index(str(tmp_path))
        index = store_bytes(read_vector(name), tmp_path, update=True, slice_elements=100, chunk_size=64)
        model = {k: updates.add_difference(v, expected_tensors(name)[k]) for k, v in model.items()}
        assert_same_bits(stored(tmp_path), model, name)
        assert index["digest"] == updates.model_digest(model).hex()
        # Without a record the chain position stays; the chain state is the step's own.
        assert (index["sequence"], index["root"]) == (before["sequence"], before["root"])
        assert [c["name"] for c in index["chain"]] == list(model)


# --- real updates -----------------------------------------------------------------------------------
def small_model(seed=3):
    rng = np.random.default_rng(seed)
    return {"enc.weight": rng.normal(size=(48, 40)).astype(np.float32),
            "enc.bias": rng.normal(size=40).astype(np.float32),
            "dec.weight": rng.normal(size=(24, 48)).astype(np.float32),
            "steps": np.arange(12, dtype=np.int32).reshape(3, 4)}


def drift(model, rng, scale=0.05, keep=("enc.bias",)):
    """A fine-tuned model: every float tensor but ``keep`` moved a little."""
    return {k: (v + (rng.normal(size=v.shape) * scale).astype(np.float32)
                if v.dtype == np.float32 and k not in keep else v) for k, v in model.items()}


@pytest.fixture
def device(tmp_path):
    """A store holding a small model sent whole, and that model as the device decodes it."""
    data = nnc_edge.encode(small_model())
    store_bytes(data, tmp_path / "store")
    return tmp_path / "store", nnc_edge.decode(data)


def test_real_update_chain_equals_apply_update(device, tmp_path_factory, backend):
    directory, model = device
    rng = np.random.default_rng(7)
    residual = str(tmp_path_factory.mktemp("host") / "chain.state")
    reference, state = model, None
    options = [{"sparsity": 0.5}, {"row_sparsity": 0.3}, {}, {"sparsity": 0.9, "dq": False}]
    for step, extra in enumerate(options, 1):
        before = read_index(str(directory))
        data, produced = updates.encode_update(model, drift(model, rng), residual=residual, return_model=True,
                                               **extra)
        info = updates.read_update_info(data)
        index = store_bytes(data, directory, slice_elements=64, chunk_size=100)
        reference, state = updates.apply_update(reference, data, state=state, return_state=True)
        assert_same_bits(stored(directory), produced, step)
        assert_same_bits(stored(directory), {k: np.asarray(v) for k, v in reference.items()}, step)
        assert index["sequence"] == info.sequence == step
        assert index["digest"] == info.result.hex() and index["root"] == info.root.hex()
        assert step == 1 or info.continues_state
        # Tensors the update leaves alone keep their file; the others are new.
        old = {t["name"]: t["file"] for t in before["tensors"]}
        for t in index["tensors"]:
            assert (t["file"] == old[t["name"]]) == (t["name"] in ("enc.bias", "steps")), (step, t)
        assert set(os.listdir(str(directory))) == referenced(index)
        model = produced


def test_update_with_the_record_in_base_model_id(device):
    directory, model = device
    data, produced = updates.encode_update(model, drift(model, np.random.default_rng(1)), nncodec_compatible=True,
                                           return_model=True)
    assert updates.read_update_info(data).source == "base_model_id"
    index = store_bytes(data, directory)
    assert_same_bits(stored(directory), produced, "base_model_id")
    assert index["sequence"] == 1


def test_record_and_digest_agree_with_nnc_edge():
    info = updates.UpdateInfo(7, bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34)), True)
    for parsed in (record.parse_record(info.to_bytes()), record.parse_record_text(info.to_text())):
        assert (parsed.sequence, parsed.parent, parsed.result, parsed.root, parsed.continues_state) == \
            (7, info.parent, info.result, info.root, True)
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.int32(5), "é": np.zeros((0, 4), np.float32)}
    raw = {k: np.ascontiguousarray(v).tobytes() for k, v in tensors.items()}
    specs = [(k, np.asarray(v).dtype.str, np.shape(v), len(raw[k])) for k, v in tensors.items()]
    assert record.model_digest(specs, lambda name, h: h.update(raw[name])) == updates.model_digest(tensors)


@pytest.mark.parametrize("payload", [b"NNCU", b"XXXX" + bytes(102), b"NNCU\x02" + bytes(101), b"NNCU\x01\x02" + bytes(100)])
def test_bad_record_payload_is_an_nncerror(payload):
    with pytest.raises(NNCError):
        record.parse_record(payload)


# --- refusals and failures leave the store as it was --------------------------------------------------
def test_update_for_another_model_is_refused(device):
    directory, model = device
    other = drift(model, np.random.default_rng(2))
    data = updates.encode_update(other, drift(other, np.random.default_rng(3)))
    before = snapshot(directory)
    with pytest.raises(WrongBaseError) as info:
        store_bytes(data, directory)
    assert "applies to the model with digest %s" % updates.model_digest(other).hex()[:16] in str(info.value)
    assert snapshot(directory) == before


def test_repeated_update_and_missing_state_are_refused(device, tmp_path_factory):
    directory, model = device
    residual = str(tmp_path_factory.mktemp("host") / "chain.state")
    rng = np.random.default_rng(4)
    first, model1 = updates.encode_update(model, drift(model, rng), residual=residual, return_model=True)
    second = updates.encode_update(model1, drift(model1, rng), residual=residual)
    assert updates.read_update_info(second).continues_state
    store_bytes(first, directory)
    before = snapshot(directory)
    with pytest.raises(AlreadyAppliedError):
        store_bytes(first, directory)
    assert snapshot(directory) == before
    # A store at this model but not at this point of the chain lacks the decoder state update 2 needs.
    index_name = "index%d.json" % read_index(str(directory))["generation"]
    index = json.loads(before[index_name])
    index["sequence"] = 0
    with open(os.path.join(str(directory), index_name), "w") as f:
        json.dump(index, f)
    before = snapshot(directory)
    with pytest.raises(MissingStateError):
        store_bytes(second, directory)
    assert snapshot(directory) == before


def test_relabel_commits_the_same_tensors_without_chain_state(device, tmp_path_factory, monkeypatch):
    # A version restored without a download (nnc_device.agent): a new generation naming the same tensor
    # files, the update chain's decoder state dropped (the restored version starts a new chain).
    directory, model = device
    residual = str(tmp_path_factory.mktemp("host") / "chain.state")
    rng = np.random.default_rng(6)
    first, model1 = updates.encode_update(model, drift(model, rng), residual=residual, return_model=True)
    store_bytes(first, directory)
    old = read_index(str(directory))
    assert old["chain"]
    tensors = {t["file"]: open(os.path.join(str(directory), t["file"]), "rb").read() for t in old["tensors"]}
    # A failed commit leaves the store as it was, with no temporary file.
    before = snapshot(directory)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "rename", full_disk)
    with pytest.raises(OSError):
        relabel(str(directory), {"seq": 9})
    monkeypatch.undo()
    assert snapshot(directory) == before

    new = relabel(str(directory), {"seq": 9})
    assert new == read_index(str(directory))
    assert (new["generation"], new["meta"], new["chain"], new["sequence"], new["root"]) == \
        (old["generation"] + 1, {"seq": 9}, [], 0, old["digest"])
    assert new["tensors"] == old["tensors"] and new["digest"] == old["digest"]
    assert sorted(os.listdir(str(directory))) == sorted(list(tensors) + ["index%d.json" % new["generation"]])
    assert {name: open(os.path.join(str(directory), name), "rb").read() for name in tensors} == tensors
    with pytest.raises(StoreError):
        relabel(str(tmp_path_factory.mktemp("empty")), {"seq": 1})


def test_update_needs_a_stored_model_and_a_model_stream_is_not_an_update(device, tmp_path):
    directory, model = device
    data = updates.encode_update(model, drift(model, np.random.default_rng(5)))
    empty = tmp_path / "empty"
    with pytest.raises(StoreError) as info:
        store_bytes(data, empty)
    assert "needs a stored model" in str(info.value)
    assert os.listdir(str(empty)) == []
    before = snapshot(directory)
    with pytest.raises(StoreError) as info:
        store_bytes(data, directory, update=False)
    assert "carries an update record" in str(info.value)
    assert snapshot(directory) == before


def test_update_whose_result_differs_from_its_record_is_refused(device):
    directory, model = device
    data = bytearray(updates.encode_update(model, drift(model, np.random.default_rng(6))))
    # The record unit follows NNR_STR: flip a bit of its result digest (the payload's last 32 bytes).
    start = nnr_unit_size(data, 0)[0]
    end = start + nnr_unit_size(data, start)[0]
    data[end - 1] ^= 1
    before = snapshot(directory)
    with pytest.raises(CorruptUpdateError):
        store_bytes(bytes(data), directory)
    assert snapshot(directory) == before


@pytest.mark.parametrize("cut", [5, 40, 0.5, -1])
def test_truncated_stream_leaves_the_previous_generation(device, cut):
    directory, _ = device
    data = read_vector("p1_real_silero_vad")
    end = cut if isinstance(cut, int) and cut > 0 else len(data) + cut if isinstance(cut, int) else int(len(data) * cut)
    before = snapshot(directory)
    with pytest.raises(NNCError) as info:
        store_bytes(data[:end], directory, chunk_size=4096)
    assert "ends inside" in str(info.value)
    assert snapshot(directory) == before


def test_corrupt_stream_failing_after_its_slices_were_written_leaves_nothing(device):
    directory, _ = device
    data = bytearray(read_vector("p1_large_2d"))
    # Breaks terminate_cabac() in the unit's last bytes: every slice was stored before the error.
    data[-1] = 0
    data[-2] ^= 0xFF
    before = snapshot(directory)
    written = []
    session = StoreSession(str(directory), slice_elements=64)
    with pytest.raises(NNCError):
        for i in range(0, len(data), 50):
            session.feed(bytes(data[i:i + 50]))
            written.append(len(os.listdir(str(directory))))
        session.close()
    assert max(written) > len(before)  # the new tensor's file existed while it streamed
    assert snapshot(directory) == before


def test_abort_removes_what_the_session_wrote(device):
    directory, _ = device
    before = snapshot(directory)
    session = StoreSession(str(directory))
    data = read_vector("p1_model_dict")
    session.feed(data[:len(data) // 2])
    session.abort()
    assert snapshot(directory) == before
    with pytest.raises(ValueError):
        session.feed(data)


# --- killed runs --------------------------------------------------------------------------------------
_KILLED = """\
import os, sys
sys.path.insert(0, %(repo)r)
from nnc_device import store
point = sys.argv[2]
if point == "rename":
    store.os.rename = lambda *a: os._exit(3)          # killed just before the commit
elif point == "cleanup":
    real = store.os.rename
    def rename(*a):
        real(*a)
        store.os.remove = lambda *a: os._exit(3)      # killed right after it
    store.os.rename = rename
session = store.StoreSession(sys.argv[1], slice_elements=64)
data = open(sys.argv[3], "rb").read()
if point == "midway":
    session.feed(data[:len(data) // 2])
    os._exit(3)
session.feed(data)
session.close()
"""


@pytest.mark.parametrize("point", ["midway", "rename", "cleanup"])
def test_killed_run_leftovers_are_cleared_by_the_next_run(device, tmp_path, point):
    directory, _ = device
    script = tmp_path / "killed.py"
    script.write_text(_KILLED % {"repo": REPO})
    before = snapshot(directory)
    vector = os.path.join(str(tmp_path), "v.nnc")
    with open(vector, "wb") as f:
        f.write(read_vector("p1_model_dict"))
    proc = subprocess.run([sys.executable, str(script), str(directory), point, vector])
    assert proc.returncode == 3
    left = snapshot(directory)
    assert set(left) > set(before)
    if point == "cleanup":
        # Killed after the commit: the new generation is the store, the old one is left over.
        assert_same_bits(stored(directory), expected_tensors("p1_model_dict"), point)
    else:
        assert {name: left[name] for name in before} == before
        assert read_index(str(directory)) == json.loads(before["index1.json"])
    # The next run clears the leftovers before it writes anything.
    index = store_bytes(read_vector("p1_uniform_2d"), directory)
    assert set(os.listdir(str(directory))) == referenced(index)
    assert_same_bits(stored(directory), expected_tensors("p1_uniform_2d"), point)


def test_commit_never_renames_onto_an_existing_file(device, monkeypatch):
    # FAT (MicroPython's fallback filesystem) cannot replace a file by renaming onto it.
    directory, _ = device
    from nnc_device import store

    real = os.rename

    def rename(src, dst):
        assert not os.path.exists(dst), dst
        real(src, dst)

    monkeypatch.setattr(store.os, "rename", rename)
    for name in ("p1_model_dict", "p1_model_dict", "p1_uniform_2d"):
        store_bytes(read_vector(name), directory)


# --- the index -----------------------------------------------------------------------------------------
def test_index_describes_files_a_runtime_can_map(tmp_path):
    assert read_index(str(tmp_path)) is None
    index = store_bytes(read_vector("p1_model_dict"), tmp_path, slice_elements=10)
    assert index["format"] == "nnc-device-store" and index["version"] == 1 and index["generation"] == 1
    want = expected_tensors("p1_model_dict")
    assert [(t["name"], t["dtype"], t["shape"]) for t in index["tensors"]] == \
        [(k, v.dtype.str, list(v.shape)) for k, v in want.items()]
    for t in index["tensors"]:
        raw = np.fromfile(os.path.join(str(tmp_path), t["file"]), dtype=t["dtype"])
        assert raw.size == want[t["name"]].size
    assert index["digest"] == updates.model_digest(want).hex()
    assert (index["sequence"], index["root"]) == (0, index["digest"])
    with open(os.path.join(str(tmp_path), "index1.json")) as f:
        assert json.load(f) == index
    (tmp_path / "index1.json").write_text("{not json")
    with pytest.raises(StoreError):
        read_index(str(tmp_path))


def test_store_reads_any_source_with_read_or_readinto(tmp_path):
    data = read_vector("p1_int_3d")

    class ReadOnly:
        def __init__(self):
            self.f = io.BytesIO(data)

        def read(self, n):
            return self.f.read(min(n, 5))

    store_stream(ReadOnly(), str(tmp_path / "a"))
    store_stream(io.BufferedReader(io.BytesIO(data)), str(tmp_path / "b"), chunk_size=3)
    for d in ("a", "b"):
        assert_same_bits(stored(tmp_path / d), expected_tensors("p1_int_3d"), d)


def test_nnc_device_imports_neither_nnc_edge_nor_numpy():
    code = textwrap.dedent("""\
        import sys
        import nnc_device.store, nnc_device.record
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("nnc_edge", "numpy", "typing", "dataclasses")))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    assert proc.stdout.strip() == "[]"
