"""Files replaced atomically (nnc_edge.atomicfile) by every writer outside the sinks: the model copy
and chain state of ``apply``, ``modelio.save``, ``encode``'s and ``update``'s bitstreams, signature
and sequence files, a host's chain state.

Issue 16, finding 8: a writer that is killed leaves its temporary file behind, and one whose close()
fails (a full disk) leaked it too; each writer now clears the stale temporary files of its own
pattern, and only those, when it starts, and removes its temporary file on a failure whatever
close() does. Finding 10: temporary names were ``PATH.tmp<pid>``, opened with open(..., "w"), which
follows a symbolic link planted there; they are now random and created with O_CREAT | O_EXCL.
"""

import errno
import os

import numpy as np
import pytest

from nnc_edge import atomicfile, cli, modelio, signing
from nnc_edge.updates import ChainState, apply_update, encode_update, model_digest

from test_state_file import snapshot


def small_models(seed=0):
    rng = np.random.default_rng(seed)
    base = {"w": rng.normal(size=(16, 8)).astype(np.float32), "b": rng.normal(size=8).astype(np.float32)}
    new = {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
    return base, new


@pytest.fixture(scope="module")
def key():
    return signing.SigningKey.generate()


# Each writer: (prepare(d) -> run, the target it replaces, the suffixes of its temporary files).
# ``prepare`` makes what the write needs and returns the function that makes it.
def _modelio_save(d, key):
    return lambda: modelio.save(str(d / "m.safetensors"), small_models()[0])


def _encode(d, key):
    modelio.save(str(d / "in.safetensors"), small_models()[0])

    def run():
        status = cli.main(["encode", str(d / "in.safetensors"), "-o", str(d / "m.nnc"), "-q"])
        if status:
            raise OSError("encode exited with status %d" % status)
    return run


def _update(d, key):
    base, new = small_models()
    modelio.save(str(d / "base.safetensors"), base)
    modelio.save(str(d / "new.safetensors"), new)

    def run():
        status = cli.main(["update", "--base", str(d / "base.safetensors"), "--new", str(d / "new.safetensors"),
                           "-o", str(d / "u.nnc"), "-q"])
        if status:
            raise OSError("update exited with status %d" % status)
    return run


def _signature(d, key):
    sig = signing.sign_bitstream(b"data", key, 1, "kws")
    return lambda: sig.save(str(d / "u.nnc.sig"))


def _sequence(d, key):
    with open(str(d / "seq.json"), "w") as f:
        f.write('{"kws": 1}\n')
    return lambda: signing.SequenceStore(str(d / "seq.json")).record("kws", 2)


def _apply(d, key):
    base, new = small_models()
    modelio.save(str(d / "dev.safetensors"), base)
    update = encode_update(base, new)
    return lambda: apply_update(str(d / "dev.safetensors"), update, str(d / "dev.safetensors"))


def _chain_state(d, key):
    state = ChainState(model_digest(small_models()[0]))
    state.residual = {"w": np.ones((2, 3), np.float32)}
    return lambda: state.save(str(d / "chain.state"))


WRITERS = {
    "modelio.save": (_modelio_save, "m.safetensors", (".tmp",)),
    "encode": (_encode, "m.nnc", (".tmp",)),
    "update": (_update, "u.nnc", (".tmp",)),
    "signature": (_signature, "u.nnc.sig", (".tmp",)),
    "sequence file": (_sequence, "seq.json", (".tmp",)),
    "apply": (_apply, "dev.safetensors", (".tmp", ".nncstate.tmp")),
    "chain state": (_chain_state, "chain.state", (".nncstate.tmp",)),
}


def temporary(names):
    return sorted(n for n in names if n.endswith(".tmp") or ".tmp" in n)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_writer_clears_stale_temporary_files_of_its_own_pattern_and_nothing_else(writer, key, tmp_path):
    prepare, target, suffixes = WRITERS[writer]
    run = prepare(tmp_path, key)
    stale = [".%s.0123abcd%s" % (target, suffix) for suffix in suffixes]
    # Alike, but another writer's (the sinks' data file, another target, a name we never make).
    others = [".%s.0123abcd.data.tmp" % target, ".other.bin.0123abcd.tmp", "%s.tmp%d" % (target, os.getpid()),
              ".%s.0123ABCD.tmp" % target, ".%s.0123abcd.tmp.keep" % target, "%s.0123abcd.tmp" % target]
    others = [n for n in others if n not in stale]
    for name in stale + others:
        (tmp_path / name).write_bytes(name.encode())
    run()
    for name in stale:
        assert not (tmp_path / name).exists(), name
    for name in others:
        assert (tmp_path / name).read_bytes() == name.encode(), name
    assert temporary(os.listdir(str(tmp_path))) == temporary(others)


def _failing(monkeypatch, what):
    """Make the disk fill: at fsync, or at the flush and close of a file opened from a descriptor
    (how temporary files are made), after closing it for real."""
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    if what == "fsync":
        monkeypatch.setattr(os, "fsync", full)
        return
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self._f = f

        def flush(self):
            full()

        def close(self):
            self._f.close()
            full()

        def __getattr__(self, name):
            return getattr(self._f, name)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))


@pytest.mark.parametrize("what", ["fsync", "close"])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_failed_write_leaves_the_target_and_no_temporary_file(writer, what, key, tmp_path, monkeypatch):
    prepare, target, _ = WRITERS[writer]
    run = prepare(tmp_path, key)
    before = snapshot(str(tmp_path))
    _failing(monkeypatch, what)
    with pytest.raises(OSError):
        run()
    monkeypatch.undo()
    assert snapshot(str(tmp_path)) == before


@pytest.mark.parametrize("writer", ["modelio.save", "encode", "signature", "sequence file"])
def test_a_symbolic_link_at_the_old_predictable_name_is_not_followed(writer, key, tmp_path):
    prepare, target, _ = WRITERS[writer]
    run = prepare(tmp_path, key)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(str(victim), str(tmp_path / ("%s.tmp%d" % (target, os.getpid()))))
    run()
    assert victim.read_bytes() == b"precious"
    assert os.path.getsize(str(tmp_path / target)) > 0


def test_a_name_taken_after_the_stale_files_were_cleared_is_skipped(tmp_path, monkeypatch):
    """O_EXCL: a link planted at the very name about to be used (between clearing and creating) is
    neither followed nor removed; another name is taken."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = str(tmp_path / "out.bin")
    draws = iter([b"\x00" * 4, b"\x11" * 4])
    planted = str(tmp_path / ".out.bin.00000000.tmp")

    def urandom(n):
        value = next(draws)
        if value == b"\x00" * 4:
            os.symlink(str(victim), planted)
        return value

    monkeypatch.setattr(os, "urandom", urandom)
    atomicfile.write_file(target, b"new")
    monkeypatch.undo()
    assert victim.read_bytes() == b"precious" and os.path.islink(planted)
    with open(target, "rb") as f:
        assert f.read() == b"new"


def test_errors_name_the_target_not_the_temporary_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        atomicfile.write_file(str(tmp_path / "nodir" / "out.bin"), b"x")
    assert info.value.filename == str(tmp_path / "nodir" / "out.bin")
    (tmp_path / "adir").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        atomicfile.write_file(str(tmp_path / "adir"), b"x")
    assert info.value.filename == str(tmp_path / "adir")
    assert os.listdir(str(tmp_path / "adir")) == [] and sorted(os.listdir(str(tmp_path))) == ["adir"]


def test_a_batch_is_all_or_nothing(tmp_path):
    (tmp_path / "old").write_bytes(b"old")
    with pytest.raises(FileNotFoundError) as info:
        with atomicfile.Batch() as batch:
            batch.add(str(tmp_path / "old")).write(b"new")
            batch.add(str(tmp_path / "nodir" / "x")).write(b"x")
            batch.commit()
    assert info.value.filename == str(tmp_path / "nodir" / "x")
    assert sorted(os.listdir(str(tmp_path))) == ["old"] and (tmp_path / "old").read_bytes() == b"old"
    # A rename that fails after another was made: what this batch created goes again, the rest is
    # not renamed.
    with pytest.raises(OSError):
        with atomicfile.Batch() as batch:
            batch.add(str(tmp_path / "first")).write(b"1")
            batch.add(str(tmp_path / "late")).write(b"2")
            batch.add(str(tmp_path / "old")).write(b"new")
            os.mkdir(str(tmp_path / "late"))  # the directory changes under us before the renames
            os.mkdir(str(tmp_path / "late" / "x"))
            batch.commit()
    assert sorted(os.listdir(str(tmp_path))) == ["late", "old"] and (tmp_path / "old").read_bytes() == b"old"


@pytest.mark.parametrize("links", [True, False])
def test_place_links_or_copies_atomically(tmp_path, monkeypatch, links):
    # A device's previous model (A/B) is placed with atomicfile.place: a hard link where the file
    # system has them, a copy where it does not (FAT); the old target stays until the rename.
    source, target = tmp_path / "model.safetensors", tmp_path / "previous.safetensors"
    source.write_bytes(b"new model" * 1000)
    target.write_bytes(b"old model")
    (tmp_path / ".previous.safetensors.0123abcd.tmp").write_bytes(b"left by a killed writer")
    if not links:
        def no_links(*args):
            raise OSError(errno.EPERM, "no hard links on this file system")
        monkeypatch.setattr(os, "link", no_links)
    atomicfile.place(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert (os.stat(target).st_ino == os.stat(source).st_ino) == links
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "previous.safetensors"]

    def failing_replace(*args):
        raise OSError(errno.ENOSPC, "no space left")
    monkeypatch.setattr(os, "replace", failing_replace)
    source.unlink()  # a new file: writing the linked one in place would change the target too
    source.write_bytes(b"newer")
    with pytest.raises(OSError) as info:
        atomicfile.place(source, target)
    assert info.value.filename == str(target)
    assert target.read_bytes() == b"new model" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "previous.safetensors"]
