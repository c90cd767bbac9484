"""``nnc-edge update`` and ``nnc-edge apply``: a chain through the command line, refusals, exit statuses."""

import hashlib
import os

import numpy as np
import pytest

import nnc_edge
from nnc_edge import cli, modelio
from nnc_edge.updates import ChainState, add_difference, model_digest, read_update_info

from conftest import CONFORMANCE_DIR
from test_updates import assert_same_model, finetune

SILERO = str(CONFORMANCE_DIR / "p1_real_silero_vad.nnc")


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def models(tmp_path):
    """m0 (silero-vad) and three fine-tuning targets t1..t3 as .safetensors files."""
    base = nnc_edge.decode(SILERO)
    modelio.save(tmp_path / "m0.safetensors", base)
    rng = np.random.default_rng(7)
    for i in (1, 2, 3):
        modelio.save(tmp_path / ("t%d.safetensors" % i), finetune(base, i, rng))
    return tmp_path


def test_update_and_apply_a_chain(models, capsys):
    d = models
    for i, extra in ((1, []), (2, ["--sparsity", "0.3"]), (3, ["--row-sparsity", "0.2", "--no-tca", "--no-hdsp"])):
        status, out, err = run(capsys, "update", "--base", d / ("m%d.safetensors" % (i - 1)),
                               "--new", d / ("t%d.safetensors" % i), "-o", d / ("u%d.nnc" % i),
                               "--residual", d / "chain.state", "--result", d / ("m%d.safetensors" % i), *extra)
        assert status == 0 and err == ""
        info = read_update_info(str(d / ("u%d.nnc" % i)))
        assert out.startswith("%s: update %d, %d bytes, 14 of 15 tensors changed; applies to %s, produces %s"
                              % (d / ("u%d.nnc" % i), i, os.path.getsize(d / ("u%d.nnc" % i)),
                                 info.parent.hex()[:16], info.result.hex()[:16]))
        assert info.result == model_digest(modelio.load(d / ("m%d.safetensors" % i)))
        assert ChainState.load(str(d / "chain.state")).sequence == i
    assert not read_update_info(str(d / "u3.nnc")).continues_state  # --no-tca --no-hdsp
    assert read_update_info(str(d / "u2.nnc")).continues_state
    # The device: one update at a time, in place.
    device = d / "device.safetensors"
    modelio.save(device, modelio.load(d / "m0.safetensors"))
    for i in (1, 2, 3):
        status, out, err = run(capsys, "apply", "--base", device, d / ("u%d.nnc" % i), "-o", device)
        assert status == 0 and err == ""
        assert out == "%s: 1 update applied, now at update %d of its chain (model %s)\n" % (
            device, i, read_update_info(str(d / ("u%d.nnc" % i))).result.hex()[:16])
        assert_same_model(modelio.load(device), modelio.load(d / ("m%d.safetensors" % i)))
    assert sha(device) == sha(d / "m3.safetensors")  # the same file, byte for byte
    # A second device takes the whole chain in one call into a new .npz file.
    status, out, err = run(capsys, "apply", "--base", d / "m0.safetensors", d / "u1.nnc", d / "u2.nnc", d / "u3.nnc",
                           "-o", d / "other.npz", "-q")
    assert status == 0 and out == "" and err == ""
    assert_same_model(modelio.load(d / "other.npz"), modelio.load(d / "m3.safetensors"))


def test_apply_refuses_and_leaves_the_model_untouched(models, capsys):
    d = models
    assert run(capsys, "update", "--base", d / "m0.safetensors", "--new", d / "t1.safetensors", "-o", d / "u1.nnc",
               "--residual", d / "s", "--result", d / "m1.safetensors", "-q")[0] == 0
    assert run(capsys, "update", "--base", d / "m1.safetensors", "--new", d / "t2.safetensors", "-o", d / "u2.nnc",
               "--residual", d / "s", "-q")[0] == 0
    corrupt = d / "bad.nnc"
    corrupt.write_bytes((d / "u1.nnc").read_bytes()[:-3])
    device = d / "m0.safetensors"
    before = (sha(device), sorted(os.listdir(d)))
    cases = [
        ([d / "u2.nnc"], 2, "u2.nnc: update 2 needs the model after update 1, but the model is at update 0: "
                            "update 1 missing"),
        ([d / "u1.nnc", d / "u1.nnc"], 2, "u1.nnc: update 1 has already been applied"),
        ([d / "missing.nnc"], 1, "cannot read"),
        ([CONFORMANCE_DIR / "p1_tca_0.nnc"], 2, "carries no nnc-edge update record"),
    ]
    cases.append(([corrupt], 2, "bad.nnc: "))
    for updates, status, message in cases:
        got, out, err = run(capsys, "apply", "--base", device, *updates, "-o", device)
        assert got == status and out == "" and message in err, err
        assert err.startswith("nnc-edge apply: error: ")
        assert (sha(device), sorted(os.listdir(d))) == before
    # The update command refuses a base that is not where the chain stands.
    status, out, err = run(capsys, "update", "--base", d / "m0.safetensors", "--new", d / "t2.safetensors",
                           "-o", d / "x.nnc", "--residual", d / "s")
    assert status == 2 and "not the model the chain's last update produced" in err
    assert not os.path.exists(d / "x.nnc")


def test_apply_anonymous_updates_and_sequence_option(tmp_path, capsys):
    with np.load(str(CONFORMANCE_DIR / "p1_diff_0.npz")) as npz:
        shape = npz["0"].shape
        first = npz["0"]
    base = tmp_path / "zero.npz"
    modelio.save(base, {"0": np.zeros(shape, np.float32)})
    status, out, err = run(capsys, "apply", "--base", base, CONFORMANCE_DIR / "p1_diff_0.nnc", "-o",
                           tmp_path / "one.npz", "--allow-anonymous")
    assert status == 0
    assert np.array_equal(modelio.load(tmp_path / "one.npz")["0"], first)
    status, out, err = run(capsys, "update", "--base", tmp_path / "one.npz", "--new", base, "-o", tmp_path / "back.nnc",
                           "--sequence", "9", "--qp", "-40", "--nncodec-compatible", "-q")
    assert status == 0 and out == ""
    info = read_update_info(str(tmp_path / "back.nnc"))
    assert info.sequence == 9 and info.source == "base_model_id"
    status, out, err = run(capsys, "apply", "--base", tmp_path / "one.npz", tmp_path / "back.nnc", "-o",
                           tmp_path / "one.npz")
    assert status == 0 and "now at update 9" in out


def test_help_texts(capsys):
    for command in ("update", "apply"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and "nnc-edge %s" % command in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["update", "--base", "a.npz", "--new", "b.npz", "-o", "u.nnc", "--sparsity", "1.5"])
    assert exit_info.value.code == 2


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    from test_cli import readme_python_examples

    (tmp_path / "shared" / "conformance").mkdir(parents=True)
    (tmp_path / "shared" / "conformance" / "nncodec-2.1.3").symlink_to(CONFORMANCE_DIR)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    examples = readme_python_examples("Incremental updates")
    assert len(examples) == 1
    exec(compile(examples[0], "README.md", "exec"), {"__name__": "__readme__"})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["1", "2", "3"]
    assert "UpdateInfo(sequence=3," in lines[2] and "continues_state=True" in lines[2]


@pytest.mark.parametrize("stream", [False, True])
def test_decode_an_update_with_its_topology(models, capsys, stream):
    d = models
    status, _, _ = run(capsys, "update", "--base", d / "m0.safetensors", "--new", d / "t1.safetensors", "-o", d / "u1.nnc")
    assert status == 0
    base = modelio.load(d / "m0.safetensors")
    names = sorted(base)  # all ASCII: UTF-8 byte order is string order
    extra = ["--stream"] if stream else []
    # Update streams name tensors by index into the base model's topology (topology_carriage_flag 0).
    status, out, err = run(capsys, "decode", d / "u1.nnc", "-o", d / "bare.npz", *extra)
    assert status == 0 and err == ""
    bare = modelio.load(d / "bare.npz")
    status, out, err = run(capsys, "decode", d / "u1.nnc", "--topology", d / "m0.safetensors", "-o",
                           d / "named.safetensors", *extra)
    assert status == 0 and err == "" and "14 tensors" in out
    named = modelio.load(d / "named.safetensors")
    assert len(named) == 14 and set(named) <= set(names)
    assert {names[int(k)]: v.shape for k, v in bare.items()} == {k: v.shape for k, v in named.items()}
    applied = nnc_edge.apply_update(base, str(d / "u1.nnc"))
    for name, diff in named.items():
        assert np.array_equal(applied[name], add_difference(base[name], diff))
    status, out, err = run(capsys, "decode", d / "u1.nnc", "--topology", d / "missing.safetensors", "-o", d / "x.npz")
    assert status != 0 and "missing.safetensors" in err
