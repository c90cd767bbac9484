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


# --- issue 16, finding 11: outputs all or nothing, messages that name the user's files ------------
@pytest.fixture
def small(tmp_path):
    """b.safetensors and n.safetensors (two small tensors), and u1.nnc from one to the other."""
    rng = np.random.default_rng(3)
    base = {"w": rng.normal(size=(16, 8)).astype(np.float32), "b": rng.normal(size=8).astype(np.float32)}
    new = {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
    modelio.save(tmp_path / "b.safetensors", base)
    modelio.save(tmp_path / "n.safetensors", new)
    (tmp_path / "u1.nnc").write_bytes(nnc_edge.encode_update(base, new))
    return tmp_path


def snapshot(d):
    return {name: sha(d / name) for name in sorted(os.listdir(d)) if os.path.isfile(d / name)}


@pytest.mark.parametrize("where", ["output", "result", "residual"])
def test_update_writes_every_output_or_none(small, capsys, where):
    d = small
    outputs = {"output": d / "u.nnc", "result": d / "m1.safetensors", "residual": d / "chain.state"}
    outputs[where] = d / "nodir" / outputs[where].name
    (d / "u.nnc").write_bytes(b"the previous update")
    before = snapshot(d)
    status, out, err = run(capsys, "update", "--base", d / "b.safetensors", "--new", d / "n.safetensors",
                           "-o", outputs["output"], "--result", outputs["result"], "--residual", outputs["residual"])
    assert (status, out) == (1, "")
    assert err == "nnc-edge update: error: cannot write %s: No such file or directory\n" % outputs[where]
    assert snapshot(d) == before and sorted(os.listdir(d)) == sorted(before)


def test_update_checks_the_result_format_before_writing(small, capsys):
    d = small
    before = snapshot(d)
    status, out, err = run(capsys, "update", "--base", d / "b.safetensors", "--new", d / "n.safetensors",
                           "-o", d / "u.nnc", "--result", d / "m1.bin")
    assert (status, out) == (2, "")
    assert err == ("nnc-edge update: error: %s: unsupported model file suffix '.bin' (use .safetensors or .npz)\n"
                   % (d / "m1.bin"))
    assert snapshot(d) == before


def deep_model(path):
    """A .safetensors file with a 65-dimensional tensor, which numpy cannot hold."""
    header = modelio.safetensors_header([("deep", np.float32, [1] * 65), ("w", np.float32, [2])])
    path.write_bytes(header + bytes(12))


def test_a_tensor_with_more_than_64_dimensions_is_a_clear_error(small, capsys):
    d = small
    deep_model(d / "deep.safetensors")
    message = ("%s: tensor 'deep' has 65 dimensions, more than the %d a numpy array can have\n"
               % (d / "deep.safetensors", modelio.MAX_DIMENSIONS))
    for argv in (["update", "--base", d / "deep.safetensors", "--new", d / "n.safetensors", "-o", d / "x.nnc"],
                 ["update", "--base", d / "b.safetensors", "--new", d / "deep.safetensors", "-o", d / "x.nnc"],
                 ["encode", d / "deep.safetensors", "-o", d / "x.nnc"],
                 ["apply", "--base", d / "deep.safetensors", d / "u1.nnc", "-o", d / "x.safetensors"],
                 ["apply", "--base", d / "deep.safetensors", d / "u1.nnc", "-o", d / "x.npz"],
                 ["decode", d / "u1.nnc", "--topology", d / "deep.safetensors", "-o", d / "x.npz"]):
        status, out, err = run(capsys, *argv)
        assert (status, out, err) == (2, "", "nnc-edge %s: error: %s" % (argv[0], message)), argv
    assert not any(os.path.exists(d / name) for name in ("x.nnc", "x.safetensors", "x.npz"))


def test_model_file_errors_say_what_is_wrong_once(small, capsys):
    d = small
    (d / "empty.safetensors").write_bytes(b"")
    np.savez(d / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    (d / "adir.safetensors").mkdir()
    empty = "%s: too short for a safetensors header length" % (d / "empty.safetensors")
    objects = "%s: tensor 'a' holds Python objects, which a model file cannot hold" % (d / "objects.npz")
    directory = "cannot read %s: Is a directory" % (d / "adir.safetensors")
    for model, message, status in ((d / "empty.safetensors", empty, 2), (d / "objects.npz", objects, 2),
                                   (d / "adir.safetensors", directory, 1)):
        for argv in (["encode", model, "-o", d / "x.nnc"],
                     ["update", "--base", model, "--new", d / "n.safetensors", "-o", d / "x.nnc"],
                     ["apply", "--base", model, d / "u1.nnc", "-o", d / "x.safetensors"],
                     ["decode", d / "u1.nnc", "--topology", model, "-o", d / "x.npz"]):
            got = run(capsys, *argv)
            assert got == (status, "", "nnc-edge %s: error: %s\n" % (argv[0], message)), argv


def test_apply_names_the_files_it_cannot_use(small, capsys):
    d = small
    (d / "adir.nnc").mkdir()
    (d / "out.safetensors").mkdir()
    (d / "empty.nnc").write_bytes(b"")
    before = snapshot(d)
    cases = [
        ([d / "adir.nnc", "-o", d / "x.safetensors"], 1, "cannot read %s: Is a directory" % (d / "adir.nnc")),
        ([d / "u1.nnc", "-o", d / "out.safetensors"], 1, "cannot write %s: Is a directory" % (d / "out.safetensors")),
        ([d / "u1.nnc", "-o", d / "nodir" / "x.safetensors"], 1,
         "cannot write %s: No such file or directory" % (d / "nodir" / "x.safetensors")),
        ([d / "empty.nnc", "-o", d / "x.safetensors"], 2, "%s: the bitstream is empty (0 bytes)" % (d / "empty.nnc")),
        ([CONFORMANCE_DIR / "p1_tca_0.nnc", "-o", d / "x.safetensors"], 2,
         "%s carries no nnc-edge update record, so the model it applies to is unknown; --allow-anonymous applies "
         "it anyway" % (CONFORMANCE_DIR / "p1_tca_0.nnc")),
    ]
    for argv, status, message in cases:
        got = run(capsys, "apply", "--base", d / "b.safetensors", *argv)
        assert got == (status, "", "nnc-edge apply: error: %s\n" % message), argv
        assert snapshot(d) == before
