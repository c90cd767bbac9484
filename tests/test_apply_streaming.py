"""apply_update from a .safetensors file to a .safetensors file: the model is patched in a copy beside
the output, a region at a time, and never loaded (nnc_edge.updates._FileModel).

Uses the silero-vad chain of test_updates.py; every result is compared with the in-memory path
(a dict base), which test_updates.py checks against the host's view.
"""

import os

import numpy as np
import pytest

import nnc_edge
from decoder_core import NNCError
from nnc_edge import modelio, updates
from nnc_edge.updates import CorruptUpdateError, apply_update, model_digest

from test_updates import Chain, assert_same_model, file_sha256, listing, silero_base  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def short_chain(silero_base):  # noqa: F811
    return Chain(silero_base, steps=3)


def no_loading(monkeypatch):
    """Make loading a whole model fail, so a test proves the file path never does."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded whole")
    monkeypatch.setattr(modelio, "load", refuse)
    monkeypatch.setattr(modelio, "read_safetensors", refuse)


def scrambled(model):
    """The model's tensors in reverse name order (data order != the sorted order the digest uses)."""
    return {name: model[name] for name in sorted(model, reverse=True)}


def test_file_to_file_never_loads_the_model_and_matches_the_memory_path(short_chain, tmp_path, monkeypatch):
    base = str(tmp_path / "base.safetensors")
    modelio.save(base, scrambled(short_chain.base), metadata={"owner": "test"})
    paths = []
    for i, data in enumerate(short_chain.updates, 1):
        paths.append(str(tmp_path / ("u%d.nnc" % i)))
        with open(paths[-1], "wb") as f:
            f.write(data)
    base_hash = file_sha256(base)
    out = str(tmp_path / "out.safetensors")
    expected = apply_update(short_chain.base, short_chain.updates)

    no_loading(monkeypatch)
    new, state = apply_update(base, paths[:1], out, return_state=True)
    new, state = apply_update(out, paths[1:], out, return_state=True)
    monkeypatch.undo()

    assert_same_model(new, expected)
    assert_same_model(new, short_chain.views[3])
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in new.values())
    assert state.sequence == 3 and state.model == model_digest(expected)
    assert file_sha256(base) == base_hash  # the base is only read
    assert modelio.load_metadata(out) == {"owner": "test"}
    assert_same_model(modelio.load(out), expected)
    # The decoder state sits beside the output only, for the output's digest.
    names = listing(tmp_path)
    assert [n for n in names if n.endswith(".nncstate")] == [os.path.basename(updates.state_path(out, state.model))]
    assert not [n for n in names if n.startswith(".")]  # no temporary file left


def test_regions_smaller_than_a_tensor(short_chain, tmp_path, monkeypatch):
    """Patching and hashing a few bytes at a time gives the same model (region edges everywhere)."""
    monkeypatch.setattr(updates, "_REGION_BYTES", 100)  # 25 float32: not a divisor of the tensor sizes
    model = str(tmp_path / "model.safetensors")
    modelio.save(model, short_chain.base)
    for data in short_chain.updates:
        new = apply_update(model, data, model)
    assert_same_model(new, short_chain.views[3])


def test_only_regions_with_a_change_are_patched(short_chain, tmp_path, monkeypatch):
    """A region of the copy is read back and rewritten only where the difference is nonzero."""
    region = 4096
    monkeypatch.setattr(updates, "_REGION_BYTES", region)
    patched = []
    original = updates.add_difference

    def counting(weights, difference, in_place=False):
        patched.append(weights.nbytes)
        return original(weights, difference, in_place)

    diffs = nnc_edge.Decoder(updates.update_topology(short_chain.base)).decode(short_chain.updates[0])
    per_region = region // 4
    expected = 0
    for diff in diffs.values():
        flat = diff.reshape(-1)
        for first in range(0, flat.size, per_region):
            if flat[first:first + per_region].any():
                expected += 4 * flat[first:first + per_region].size
    model = str(tmp_path / "model.safetensors")
    modelio.save(model, short_chain.base)
    monkeypatch.setattr(updates, "add_difference", counting)
    apply_update(model, short_chain.updates[0], model)
    total = sum(a.nbytes for a in short_chain.base.values())
    assert 0 < sum(patched) == expected < total
    monkeypatch.undo()
    assert_same_model(modelio.load(model), short_chain.views[1])


def test_refusals_and_failures_leave_no_trace(short_chain, tmp_path, monkeypatch):
    model = str(tmp_path / "model.safetensors")
    modelio.save(model, short_chain.base)
    apply_update(model, short_chain.updates[0], model)
    before = (file_sha256(model), listing(tmp_path))
    # A corrupted payload after the copy was made and patched: the copy goes, the model stays.
    bad = bytearray(short_chain.updates[1])
    bad[len(bad) - 40] ^= 0x10
    with pytest.raises(NNCError):
        apply_update(model, bytes(bad), model)
    assert (file_sha256(model), listing(tmp_path)) == before
    # The disk fails at the rename.
    def full_disk(f, tmp, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(updates, "commit", full_disk)
    with pytest.raises(OSError, match="No space left"):
        apply_update(model, short_chain.updates[1], model)
    monkeypatch.undo()
    assert (file_sha256(model), listing(tmp_path)) == before
    new = apply_update(model, short_chain.updates[1:], model)
    assert_same_model(new, short_chain.views[3])
    assert len([n for n in listing(tmp_path) if n.endswith(".nncstate")]) == 1


def test_a_truncated_base_file_is_refused_before_anything_is_written(short_chain, tmp_path):
    model = tmp_path / "model.safetensors"
    modelio.save(str(model), short_chain.base)
    model.write_bytes(model.read_bytes()[:-10])
    before = listing(tmp_path)
    with pytest.raises(modelio.ModelFormatError, match="data"):
        apply_update(str(model), short_chain.updates[0], str(tmp_path / "out.safetensors"))
    assert listing(tmp_path) == before


def test_a_result_that_breaks_its_promise_is_not_written(short_chain, tmp_path, monkeypatch):
    """The result digest is computed from the patched copy: a wrong patch is caught there."""
    model = str(tmp_path / "model.safetensors")
    modelio.save(model, short_chain.base)
    before = (file_sha256(model), listing(tmp_path))
    original = updates.add_difference

    def off_by_one(weights, difference, in_place=False):
        out = original(weights, difference, in_place)
        out.reshape(-1)[:1] += np.float32(1.0)
        return out

    monkeypatch.setattr(updates, "add_difference", off_by_one)
    with pytest.raises(CorruptUpdateError, match="decoded to a model with digest"):
        apply_update(model, short_chain.updates[0], model)
    assert (file_sha256(model), listing(tmp_path)) == before


def test_apply_never_holds_a_whole_tensor(tmp_path, monkeypatch):
    """File to file, the largest allocation is a slice, not the tensor: neither the model's tensor nor
    its difference nor its decoder state (TCA levels, HDSP history) is ever whole in memory."""
    import tracemalloc

    rng = np.random.default_rng(3)
    base = {"big": rng.normal(0, 0.05, (1024, 1024)).astype(np.float32), "small": np.ones(10, np.float32)}
    chain = updates.ChainState(model_digest(base))
    views, steps = [base], []
    for _ in range(2):  # the second update codes against the first one's levels (TCA) and history
        w = views[-1]
        new = {k: v + (rng.random(v.shape) < 0.05) * rng.normal(0, 0.01, v.shape).astype(np.float32)
               for k, v in w.items()}
        data, view = updates.encode_update(w, new, residual=chain, return_model=True)
        steps.append(data)
        views.append(view)
    assert updates.read_update_info(steps[1]).continues_state
    model = str(tmp_path / "model.safetensors")
    modelio.save(model, base)
    monkeypatch.setattr(updates, "_REGION_BYTES", 64 << 10)  # slices of 16 Ki elements: 1/64 of the tensor
    for step, data in enumerate(steps, 1):
        tracemalloc.start()
        try:
            new = apply_update(model, data, model)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < base["big"].nbytes // 4, (step, peak)
        assert_same_model(new, views[step])
