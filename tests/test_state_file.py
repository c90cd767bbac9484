"""The chain-state file (nnc_edge.updates: state version 2): raw arrays and a small JSON header, read
and written a slice at a time by the decoder during apply, committed with the model.

The layout is in the docstring of nnc_edge/updates.py: a 28-byte preamble, each tensor's int32
levels and uint8 history, the host's float32 residual, then the JSON header.
"""

import io
import json
import os

import numpy as np
import pytest

from decoder_core import NNCError, StreamDecoder
from decoder_core.incremental import MemoryChainState
import nnc_edge
from nnc_edge import modelio, updates
from nnc_edge.updates import ChainState, apply_update, encode_update, model_digest, read_update_info, update_topology

from conftest import CONFORMANCE_DIR
from test_conformance import expected_tensors, read_vector
from test_updates import assert_same_model, file_sha256, listing

PREAMBLE = updates._STATE_PREAMBLE.size


def header(path):
    """(the JSON header, the file's bytes, the header's offset) of a state file."""
    with open(path, "rb") as f:
        raw = f.read()
    magic, version, at, length = updates._STATE_PREAMBLE.unpack(raw[:PREAMBLE])
    assert magic == b"NNCSTATE" and version == 2 and at + length == len(raw)
    return json.loads(raw[at:].decode("utf-8")), raw, at


def snapshot(folder):
    """Every file of the folder with its SHA-256."""
    return {name: file_sha256(os.path.join(folder, name)) for name in listing(folder)}


@pytest.fixture(scope="module")
def two_step_chain():
    """A model of two tensors; update 1 changes both, update 2 (TCA against update 1) only "a", so
    that applying it reads the state of "a" and copies the state of "b"."""
    rng = np.random.default_rng(7)
    base = {"a": rng.normal(0, 0.1, (64, 48)).astype(np.float32), "b": rng.normal(0, 0.1, 300).astype(np.float32)}
    state = ChainState(model_digest(base))
    new = {name: w + rng.normal(0, 0.02, w.shape).astype(np.float32) for name, w in base.items()}
    u1, v1 = encode_update(base, new, residual=state, error_feedback=False, return_model=True)
    new = dict(v1, a=v1["a"] + rng.normal(0, 0.02, v1["a"].shape).astype(np.float32))
    u2, v2 = encode_update(v1, new, residual=state, error_feedback=False, return_model=True)
    assert read_update_info(u2).continues_state
    decoder = nnc_edge.Decoder(update_topology(base))
    assert list(decoder.decode(u1)) == ["a", "b"] and list(decoder.decode(u2)) == ["a"]
    return base, [u1, u2], [base, v1, v2]


@pytest.fixture
def after_first(two_step_chain, tmp_path):
    """The model file after update 1 (file to file): (model path, its state file, the ChainState)."""
    base, ups, _ = two_step_chain
    model = str(tmp_path / "model.safetensors")
    modelio.save(model, base)
    _, state = apply_update(model, ups[0], model, return_state=True)
    return model, updates.state_path(model, state.model), state


def test_the_state_file_is_raw_5_bytes_per_element(two_step_chain, after_first):
    _, ups, views = two_step_chain
    model, path, _ = after_first
    meta, raw, at = header(path)
    counts = {t["name"]: t["count"] for t in meta["tensors"]}
    assert counts == {"a": 64 * 48, "b": 300} and meta["sequence"] == 1 and meta["residual"] == []
    # No compression, no padding: the preamble, 5 bytes per element, the header.
    assert at == PREAMBLE + 5 * sum(counts.values()) and len(raw) - at < 1000
    # The bytes are the decoder's own state: little-endian levels, then one history byte per element.
    memory = apply_update(views[0], ups[0], return_state=True)[1]
    for t in meta["tensors"]:
        at, n = t["offset"], t["count"]
        assert raw[at:at + 4 * n] == memory.bases[t["name"]].astype("<i4").tobytes()
        assert raw[at + 4 * n:at + 5 * n] == memory.history[t["name"]].tobytes()


def test_host_state_round_trip(two_step_chain, tmp_path):
    base, _, views = two_step_chain
    state = ChainState(model_digest(views[1]), 1, model_digest(base))
    rng = np.random.default_rng(1)
    state.bases = {"a": rng.integers(-9, 9, 3072, dtype=np.int32), "é": np.arange(5, dtype=np.int32)}
    state.history = {"a": (state.bases["a"] != 0).astype(np.uint8), "é": np.ones(5, np.uint8)}
    state.residual = {"a": rng.normal(0, 1e-3, (64, 48)).astype(np.float32)}
    state.encoder_depths = {"a": 2, "é": 1}
    state.parameter_ids = {"a": 0, "é": 7}
    path = str(tmp_path / "chain.state")
    state.save(path)
    assert header(path)[2] == PREAMBLE + 5 * (3072 + 5) + 4 * 3072  # levels and history, then the residual
    back = ChainState.load(path)
    assert (back.model, back.sequence, back.root) == (state.model, 1, state.root)
    assert back.encoder_depths == state.encoder_depths and back.parameter_ids == state.parameter_ids
    for group in ("bases", "history", "residual"):
        ours, theirs = getattr(state, group), getattr(back, group)
        assert list(ours) == list(theirs)
        for name in ours:
            assert theirs[name].dtype == ours[name].dtype and theirs[name].shape == ours[name].shape
            assert np.array_equal(theirs[name], ours[name]), (group, name)
    assert listing(tmp_path) == ["chain.state"]  # no temporary file left


def decode_slices(decoder, data, chunk=64):
    out = []
    for i in range(0, len(data), chunk):
        out.extend((name, shape, start, values.tolist())
                   for name, shape, start, values in decoder.feed(data[i:i + chunk]))
    decoder.close()
    return out


def stored_tensors(path):
    with updates._StateFile(path) as stored:
        return stored.read_tensors()


def assert_same_state(path, memory):
    bases, history = stored_tensors(path)
    assert sorted(bases) == sorted(memory.bases) == sorted(history) == sorted(memory.history)
    for name in bases:
        assert bases[name].tolist() == memory.bases[name].tolist(), name
        assert history[name].tolist() == list(memory.history[name]), name


@pytest.mark.parametrize("one_writer", [False, True], ids=["file per step", "one file for the chain"])
def test_p1_tca_state_files_equal_the_memory_chain(backend, tmp_path, one_writer):
    """Slice by slice, decoding through state files gives the slices and the state that the in-memory
    chain state gives: one state file per step (each read by the next), or one writer for the whole
    chain (its tensors read and overwritten in place)."""
    memory = MemoryChainState()
    reference = StreamDecoder(slice_elements=7, chain=memory)
    beside = str(tmp_path / "model.safetensors")
    writer = updates._StateWriter(None, beside)
    previous = None
    for step in range(4):
        name = "p1_tca_%d" % step
        if not one_writer and previous is not None:
            writer = updates._StateWriter(updates._StateFile(previous), beside)
        got = decode_slices(StreamDecoder(slice_elements=7, chain=writer), read_vector(name))
        assert got == decode_slices(reference, read_vector(name)), name
        for tensor, want in expected_tensors(name).items():
            values = np.concatenate([np.array(s[3], want.dtype) for s in got if s[0] == tensor])
            assert np.array_equal(values, want.reshape(-1)), (name, tensor)
        if not one_writer or step == 3:
            previous = str(tmp_path / ("state%d" % step))
            writer.save(previous, ChainState(bytes(32), step))
            writer.close()
            assert_same_state(previous, memory)
    # Nothing else is left: no temporary file.
    assert listing(tmp_path) == ["state%d" % s for s in (range(4) if not one_writer else [3])]


def test_p1_tca_applies_file_to_file_step_by_step_and_in_one_call(tmp_path):
    paths = [str(CONFORMANCE_DIR / ("p1_tca_%d.nnc" % i)) for i in range(4)]
    total = None
    for i in range(4):
        d = expected_tensors("p1_tca_%d" % i)["0"]
        total = d.copy() if total is None else updates.add_difference(total, d)
    zero = {"0": np.zeros(total.shape, np.float32)}
    results = []
    for label, groups in (("steps", [[p] for p in paths]), ("one", [paths])):
        model = str(tmp_path / label / "m.safetensors")
        os.makedirs(os.path.dirname(model))
        modelio.save(model, zero)
        for group in groups:
            new, state = apply_update(model, group, model, allow_anonymous=True, return_state=True)
        assert np.array_equal(new["0"], total)
        results.append(state)
    # The state read back (lazily, from its file) is the same either way.
    assert results[0].bases["0"].tolist() == results[1].bases["0"].tolist()
    assert results[0].history["0"].tolist() == results[1].history["0"].tolist()


def test_file_to_file_state_equals_the_in_memory_state(two_step_chain, after_first):
    base, ups, views = two_step_chain
    model, _, first = after_first
    # The state a file-to-file apply returns is read from its file only when used: it continues the
    # chain in memory as the in-memory path's state does.
    assert first._stored is not None
    assert_same_model(apply_update(views[1], ups[1], state=first), views[2])
    new, state = apply_update(model, ups[1], model, return_state=True)
    assert_same_model(new, views[2])
    _, memory = apply_update(base, ups, return_state=True)
    assert sorted(state.bases) == sorted(memory.bases) == ["a", "b"]
    for name in memory.bases:
        assert np.array_equal(state.bases[name], memory.bases[name])
        assert np.array_equal(state.history[name], memory.history[name])


def damage(path, how):
    meta, raw, at = header(path)
    raw = bytearray(raw)
    entry = {t["name"]: t for t in meta["tensors"]}
    if how == "truncated":
        del raw[-10:]
    elif how == "header":
        raw[at] ^= 0x20
    elif how == "version":
        raw[8] = 3
    elif how == "levels read by update 2":
        raw[entry["a"]["offset"] + 4 * 100] ^= 0x01
    elif how == "history read by update 2":
        raw[entry["a"]["offset"] + 4 * entry["a"]["count"] + 5] ^= 0x01
    elif how == "history copied by update 2":
        raw[entry["b"]["offset"] + 4 * entry["b"]["count"] + 7] ^= 0x01
    elif how == "old format":
        buffer = io.BytesIO()
        np.savez_compressed(buffer, meta=np.zeros(3, np.uint8))
        raw = bytearray(buffer.getvalue())
    with open(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("how", ["truncated", "header", "version", "levels read by update 2",
                                 "history read by update 2", "history copied by update 2", "old format"])
def test_a_damaged_state_file_is_refused_and_changes_nothing(two_step_chain, after_first, how):
    _, ups, views = two_step_chain
    model, path, _ = after_first
    with open(path, "rb") as f:
        good = f.read()
    damage(path, how)
    folder = os.path.dirname(model)
    before = snapshot(folder)
    with pytest.raises(NNCError) as info:
        apply_update(model, ups[1], model)
    assert snapshot(folder) == before
    message = str(info.value)
    assert os.path.basename(path) in message or "decoded to a model with digest" in message, message
    if how == "old format":
        assert "apply the full model again" in message
    with open(path, "wb") as f:
        f.write(good)
    assert_same_model(apply_update(model, ups[1], model), views[2])


class FullDisk:
    """A temporary file whose ``fail_at``-th write (and every flush after it) fails as on a full disk."""

    def __init__(self, f, fail_at):
        self._f = f
        self._writes = 0
        self._fail_at = fail_at

    def write(self, data):
        self._writes += 1
        if self._writes >= self._fail_at:
            raise OSError(28, "No space left on device")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.mark.parametrize("fail_at", [3, 10 ** 9])
def test_a_full_disk_while_the_state_is_written_changes_nothing(two_step_chain, after_first, monkeypatch, fail_at):
    _, ups, views = two_step_chain
    model, _, _ = after_first
    folder = os.path.dirname(model)
    before = snapshot(folder)
    original = updates.temp_beside

    def temp_beside(path, suffix):
        f, tmp = original(path, suffix)
        if suffix != updates.STATE_SUFFIX + ".tmp":
            return f, tmp
        if fail_at > 100:  # the disk fills at the commit instead: the flush in fsync's way fails
            def flush():
                raise OSError(28, "No space left on device")
            f.flush = flush
            return f, tmp
        return FullDisk(f, fail_at), tmp

    monkeypatch.setattr(updates, "temp_beside", temp_beside)
    with pytest.raises(OSError, match="No space left on device") as info:
        apply_update(model, ups[1], model)
    assert info.value.filename == model  # the user's file, not a temporary name
    monkeypatch.undo()
    assert snapshot(folder) == before
    assert_same_model(apply_update(model, ups[1], model), views[2])
