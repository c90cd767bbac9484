"""``apply --trusted-key``: the model and the record of the last sequence applied change together.

Issue 16, finding 9: the sequence file was written after the model was replaced, so a failure
there exited 1 with the model already new, and a kill between the two left a new model whose
update could be replayed. Now the sequence record goes first, fsynced, as a pending record that
names the model digest the update produces; an exit status other than 0 means the model is as it
was; and whatever step a failure or a kill interrupts, the next run applies the update (the model
was old) or refuses it as a replay (the model is new).
"""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nnc_edge import cli, modelio, signing
from nnc_edge.updates import ChainState, encode_update, model_digest, read_update_info

from conftest import REPO


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(d):
    return {name: sha(os.path.join(d, name)) for name in sorted(os.listdir(d))}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A folder with the device's model dev.safetensors, two signed updates u1.nnc and u2.nnc of one
    chain (u2 continues u1's decoder state) and the publisher's keys; and the SHA-256 of the model
    file after each update."""
    d = tmp_path_factory.mktemp("signed")
    rng = np.random.default_rng(11)
    model = {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=32).astype(np.float32)}
    modelio.save(str(d / "dev.safetensors"), model)
    state = ChainState(model_digest(model))
    key = signing.SigningKey.generate()
    key.save(str(d / "pub.key"))
    for i in (1, 2):
        new = {k: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in model.items()}
        data, model = encode_update(model, new, residual=state, return_model=True)
        (d / ("u%d.nnc" % i)).write_bytes(data)
        signing.sign_bitstream(data, key, i, "kws", read_update_info(data).parent).save(str(d / ("u%d.nnc.sig" % i)))
    # The model files each update produces, from a run without faults.
    clean = tmp_path_factory.mktemp("clean")
    shutil.copy(str(d / "dev.safetensors"), str(clean / "dev.safetensors"))
    shas = [sha(str(clean / "dev.safetensors"))]
    for i in (1, 2):
        assert cli.main(argv(clean, d, "u%d.nnc" % i)) == 0
        shas.append(sha(str(clean / "dev.safetensors")))
    return d, shas


def argv(device, source, update, *extra):
    return ["apply", "--base", str(device / "dev.safetensors"), str(source / update), "-o",
            str(device / "dev.safetensors"), "--trusted-key", str(source / "pub.key.pub"), "--model", "kws", "-q"] \
        + list(extra)


@pytest.fixture
def device(chain, tmp_path):
    """A device at update 1 of the chain (its sequence file says 1)."""
    d, _ = chain
    shutil.copy(str(d / "dev.safetensors"), str(tmp_path / "dev.safetensors"))
    assert cli.main(argv(tmp_path, d, "u1.nnc")) == 0
    return tmp_path


def test_a_sequence_file_that_cannot_be_written_leaves_the_model_as_it_was(chain, device, capsys):
    d, shas = chain
    capsys.readouterr()
    before = snapshot(str(device))
    seq = device / "nodir" / "seq.json"
    status = cli.main([a for a in argv(device, d, "u2.nnc", "--sequence-file", str(seq)) if a != "-q"])
    out, err = capsys.readouterr()
    assert (status, out, err) == (1, "", "nnc-edge apply: error: cannot write %s: No such file or directory\n" % seq)
    assert snapshot(str(device)) == before


def replay_is_refused(source, device, capsys, update="u2.nnc"):
    before = snapshot(str(device))
    assert cli.main(argv(device, source, update)) == 2
    assert "refused as a replay" in capsys.readouterr().err
    assert snapshot(str(device)) == before


def check_after_interruption(chain, device, status, capsys):
    """After a run of u2 that ``status`` ended (None: killed): the model is the old one and the next
    run applies u2, or it is the new one and u2 is refused as a replay; nothing is left behind."""
    d, shas = chain
    now = sha(str(device / "dev.safetensors"))
    assert now in (shas[1], shas[2])
    if status is not None:
        assert (status == 0) == (now == shas[2])
    capsys.readouterr()
    # The next run, which removes what the interrupted one left.
    assert cli.main(argv(device, d, "u2.nnc")) == (0 if now == shas[1] else 2)
    assert now == shas[1] or "refused as a replay" in capsys.readouterr().err
    assert sha(str(device / "dev.safetensors")) == shas[2]
    replay_is_refused(d, device, capsys)
    replay_is_refused(d, device, capsys, "u1.nnc")
    digest = model_digest(modelio.load(str(device / "dev.safetensors")))
    assert sorted(os.listdir(str(device))) == ["dev.safetensors", "dev.safetensors.%s.nncstate" % digest.hex()[:16],
                                               "nnc-edge-sequences.json"]
    assert signing.SequenceStore(str(device / "nnc-edge-sequences.json")).last("kws") == 2


def calls_in_a_run(chain, device, name):
    """How many times a run of u2 calls os.<name>."""
    d, _ = chain
    real = getattr(os, name)
    calls = []

    def counting(*args, **kw):
        calls.append(args)
        return real(*args, **kw)
    probe = device.parent / (device.name + "-probe")
    shutil.copytree(str(device), str(probe))
    try:
        os_patch = pytest.MonkeyPatch()
        os_patch.setattr(os, name, counting)
        try:
            assert cli.main(argv(probe, d, "u2.nnc")) == 0
        finally:
            os_patch.undo()
    finally:
        shutil.rmtree(str(probe))
    return len(calls)


@pytest.mark.parametrize("name", ["replace", "fsync"])
def test_a_failure_at_any_step_leaves_the_old_model_or_a_new_one_and_a_status_that_says_which(
        chain, device, capsys, monkeypatch, name):
    d, shas = chain
    total = calls_in_a_run(chain, device, name)
    assert total >= 3  # the state file, the sequence record, the model (and the record settled)
    real = getattr(os, name)
    pristine = device.parent / (device.name + "-pristine")
    shutil.copytree(str(device), str(pristine))
    for fail_at in range(total):
        shutil.rmtree(str(device))
        shutil.copytree(str(pristine), str(device))
        calls = []

        def failing(*args, **kw):
            calls.append(args)
            if len(calls) - 1 == fail_at:
                raise OSError(errno.EIO, "Input/output error")
            return real(*args, **kw)
        monkeypatch.setattr(os, name, failing)
        status = cli.main(argv(device, d, "u2.nnc"))
        monkeypatch.undo()
        assert status in (0, 1), fail_at
        check_after_interruption(chain, device, status, capsys)


DRIVER = textwrap.dedent("""
    import os, signal, sys
    name, kill_at = sys.argv[1], int(sys.argv[2])
    real = getattr(os, name)
    calls = []

    def killing(*args, **kw):
        calls.append(args)
        if len(calls) - 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kw)

    setattr(os, name, killing)
    from nnc_edge import cli
    sys.exit(cli.main(sys.argv[3:]))
""")


@pytest.mark.parametrize("name", ["replace", "fsync"])
def test_a_kill_at_any_step_leaves_the_old_model_or_the_new_one_and_the_next_run_knows_which(
        chain, device, capsys, name):
    """A process killed (SIGKILL) at each call of os.replace / os.fsync in turn: the record and the
    model survive in a state the next run reads right."""
    d, shas = chain
    total = calls_in_a_run(chain, device, name)
    pristine = device.parent / (device.name + "-pristine")
    shutil.copytree(str(device), str(pristine))
    killed = 0
    for kill_at in range(total):
        shutil.rmtree(str(device))
        shutil.copytree(str(pristine), str(device))
        proc = subprocess.run([sys.executable, "-c", DRIVER, name, str(kill_at)] + argv(device, d, "u2.nnc"),
                              cwd=str(REPO), capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        killed += 1
        check_after_interruption(chain, device, None, capsys)
    assert killed == total


def test_a_pending_record_is_read_by_the_model_it_names(tmp_path):
    """The record written before the model is replaced: until the model file has the digest it
    names, the sequence before it counts."""
    model = tmp_path / "dev.safetensors"
    modelio.save(str(model), {"w": np.zeros(3, np.float32)})
    old = model_digest(modelio.load(str(model)))
    store = signing.SequenceStore(str(tmp_path / "seq.json"))
    store.record("kws", 4)
    new = model_digest({"w": np.ones(3, np.float32)})
    store.begin("kws", 5, str(model), new)
    assert signing.SequenceStore(store.path).last("kws") == 4
    modelio.save(str(model), {"w": np.ones(3, np.float32)})
    assert signing.SequenceStore(store.path).last("kws") == 5
    os.remove(str(model))
    assert signing.SequenceStore(store.path).last("kws") == 4
    assert old != new
