"""The nnc-edge command line: inspect, decode, --version, exit statuses and the subcommand registry."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import decoder_core
import nnc_edge
from nnc_edge import cli, modelio
from nnc_edge.encoder.unitwriter import aggregate_unit
from decoder_core.units import nnr_unit_size
from conftest import CONFORMANCE_DIR, REPO
from test_conformance import assert_bit_exact, expected_tensors, read_vector

MODEL = str(CONFORMANCE_DIR / "p1_model_dict.nnc")


def run(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def top_level_units(data):
    """[(offset, size)] of the units of a stream, walking nnr_unit_size only."""
    units = []
    offset = 0
    while offset < len(data):
        size = nnr_unit_size(data, offset)[0]
        units.append((offset, size))
        offset += size
    return units


# --- --version ------------------------------------------------------------------------------------
def expected_version_line():
    get = getattr(decoder_core, "backend_name", None)
    return "nnc-edge %s (decoding backend: %s)\n" % (nnc_edge.__version__, get() if get else "pure-python")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == expected_version_line()


def test_python_dash_m_runs_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "nnc_edge", "--version"], cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == expected_version_line()


def test_no_command_prints_usage(capsys):
    status, out, err = run(capsys)
    assert status == 2 and "inspect" in err and "decode" in err


# --- inspect --------------------------------------------------------------------------------------
def test_inspect_lists_every_unit(capsys):
    status, out, err = run(capsys, "inspect", MODEL)
    assert status == 0 and err == ""
    header, *lines = out.splitlines()
    assert header.split() == ["offset", "size", "type", "profile", "payload", "dq", "scan", "entry", "part",
                              "tensor"]
    data = read_vector("p1_model_dict")
    units = top_level_units(data)
    assert len(lines) == len(units)
    rows = [line.split() for line in lines]
    assert [(int(r[0]), int(r[1])) for r in rows] == units
    assert [r[2] for r in rows] == ["NNR_STR", "NNR_MPS", "NNR_TPL"] + ["NNR_NDU"] * 5
    assert all(r[3] == "1" for r in rows)  # general_profile_idc
    assert rows[0][4:8] == ["-", "-", "-", "-"] and rows[0][8] == "0"
    tensors = expected_tensors("p1_model_dict")
    ndus = rows[3:]
    assert [r[4] for r in ndus] == ["NNR_PT_FLOAT"] * 5
    assert [r[5:9] for r in ndus] == [["1", "0", "0", "0"]] * 5  # dq_flag, scan_order, entry points, counter
    described = [(r[9], " ".join(r[10:])) for r in ndus]
    assert described == [(name, str(list(a.shape))) for name, a in tensors.items()]


def test_inspect_shows_entry_points(capsys):
    status, out, _ = run(capsys, "inspect", str(CONFORMANCE_DIR / "p1_entrypoints_scan1.nnc"))
    assert status == 0
    ndu = [line.split() for line in out.splitlines() if "NNR_NDU" in line]
    assert len(ndu) == 1
    # scan_order 1 on a 150-row tensor: 8x8 blocks, ceil(150 / 8) = 19 block rows, 18 entry points.
    assert ndu[0][5:9] == ["1", "1", "18", "0"] and ndu[0][9:] == ["w", "[150,", "90]"]


def test_inspect_json(capsys):
    status, out, err = run(capsys, "inspect", "--json", MODEL)
    assert status == 0 and err == ""
    units = json.loads(out)
    data = read_vector("p1_model_dict")
    assert [(u["offset"], u["nnr_unit_size"]) for u in units] == top_level_units(data)
    assert [u["type_name"] for u in units] == ["NNR_STR", "NNR_MPS", "NNR_TPL"] + ["NNR_NDU"] * 5
    assert units[0]["general_profile_idc"] == 1
    assert units[1]["mps"]["mps_qp_density"] == 2
    tensors = expected_tensors("p1_model_dict")
    assert [(u["names"], u["ndu"]["TensorDimensions"]) for u in units[3:]] == \
        [([name], list(a.shape)) for name, a in tensors.items()]
    assert all(u["payload_end"] == u["offset"] + u["nnr_unit_size"] for u in units[3:])


@pytest.mark.parametrize("entry_points", [False, True])
def test_inspect_indents_units_inside_an_aggregate_unit(tmp_path, capsys, entry_points):
    data = read_vector("p1_model_dict")
    units = [data[o:o + s] for o, s in top_level_units(data)]
    agg = aggregate_unit(units[3:], entry_points_present_flag=1 if entry_points else 0)
    path = tmp_path / "agg.nnc"
    path.write_bytes(b"".join(units[:3]) + agg)

    status, out, err = run(capsys, "inspect", str(path))
    assert status == 0, err
    lines = out.splitlines()[1:]
    assert len(lines) == 4 + 5
    agg_row = lines[3].split()
    assert agg_row[:3] == ["%d" % sum(len(u) for u in units[:3]), str(len(agg)), "NNR_AGG"]
    assert agg_row[7] == ("5" if entry_points else "0") and agg_row[9:] == ["5", "units"]
    type_column = lines[0].index("NNR_STR")
    for line, name in zip(lines[4:], expected_tensors("p1_model_dict")):
        assert line[type_column:type_column + 2] == "  " and line[type_column + 2:].startswith("NNR_NDU"), line
        assert line.split()[9] == name

    status, out, _ = run(capsys, "inspect", "--json", str(path))
    assert status == 0
    top = json.loads(out)
    assert [u["type_name"] for u in top] == ["NNR_STR", "NNR_MPS", "NNR_TPL", "NNR_AGG"]
    assert [u["names"][0] for u in top[3]["units"]] == list(expected_tensors("p1_model_dict"))

    # The same tensors come out of the aggregated stream.
    out_path = tmp_path / "agg.npz"
    status, _, err = run(capsys, "decode", str(path), "-o", str(out_path))
    assert status == 0, err
    assert_bit_exact(modelio.load(out_path), expected_tensors("p1_model_dict"), "agg")


def test_inspect_every_conformance_file(capsys):
    # One NDU line per tensor, with the names and shapes of the reference output, in order.
    for path in sorted(CONFORMANCE_DIR.glob("*.nnc")):
        status, out, err = run(capsys, "inspect", str(path))
        assert status == 0 and err == "", path
        rows = [line.split() for line in out.splitlines()[1:]]
        assert [(int(r[0]), int(r[1])) for r in rows] == top_level_units(path.read_bytes()), path
        ndus = [(r[9], " ".join(r[10:])) for r in rows if r[2] == "NNR_NDU"]
        assert ndus == [(name, str(list(a.shape))) for name, a in expected_tensors(path.stem).items()], path


def test_inspect_lists_reserved_and_unspecified_units(tmp_path, capsys):
    # Units of reserved (7..31) and unspecified (32..63) type are listed and skipped by their size.
    reserved = bytes([0x00, 0x05, 7 << 2, 0xAB, 0xCD])
    unspecified = bytes([0x00, 0x03, 40 << 2])
    path = tmp_path / "extra.nnc"
    path.write_bytes(reserved + read_vector("p1_model_dict") + unspecified)
    status, out, err = run(capsys, "inspect", str(path))
    assert status == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows[0] == ["0", "5", "NNR_RSVD", "-", "-", "-", "-", "-", "0"]
    assert rows[-1][:4] == [str(path.stat().st_size - 3), "3", "NNR_UNSP", "1"]
    assert [r[2] for r in rows[1:-1]] == ["NNR_STR", "NNR_MPS", "NNR_TPL"] + ["NNR_NDU"] * 5


def test_inspect_errors(tmp_path, capsys):
    data = read_vector("p1_model_dict")
    bad = tmp_path / "truncated.nnc"
    bad.write_bytes(data[:300])
    status, out, err = run(capsys, "inspect", str(bad))
    assert status == 2
    assert err.startswith("nnc-edge inspect: error: %s: " % bad) and "at byte 185" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert len(out.splitlines()) == 1 + 5  # the units before the damage are listed

    status, out, err = run(capsys, "inspect", "--json", str(bad))
    assert status == 2 and out == "" and "nnr_unit_size" in err

    status, out, err = run(capsys, "inspect", str(tmp_path / "missing.nnc"))
    assert status == 1 and out == "" and "cannot read" in err and "missing.nnc" in err


# --- decode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_decode_to_a_file(tmp_path, capsys, suffix):
    out_path = tmp_path / ("model" + suffix)
    status, out, err = run(capsys, "decode", MODEL, "-o", str(out_path))
    assert status == 0 and err == ""
    assert out == "%s -> %s: 5 tensors, 6889 parameters\n" % (MODEL, out_path)
    assert_bit_exact(modelio.load(out_path), expected_tensors("p1_model_dict"), suffix)


def test_decode_into_an_existing_directory(tmp_path, capsys):
    status, _, err = run(capsys, "decode", "-q", MODEL, "-o", str(tmp_path), "--format", "npz")
    assert status == 0 and err == ""
    assert_bit_exact(modelio.load(tmp_path / "p1_model_dict.npz"), expected_tensors("p1_model_dict"), "dir")


@pytest.mark.parametrize("chain, fmt", [("p1_tca", "npz"), ("p1_diff", None)])
def test_decode_a_chain_into_a_directory(tmp_path, capsys, chain, fmt):
    steps = sorted(p.stem for p in CONFORMANCE_DIR.glob(chain + "_*.nnc"))
    assert len(steps) >= 3
    out_dir = tmp_path / "decoded"
    argv = ["decode"] + [str(CONFORMANCE_DIR / (s + ".nnc")) for s in steps] + ["-o", str(out_dir)]
    status, out, err = run(capsys, *argv + (["--format", fmt] if fmt else []))
    assert status == 0 and err == ""
    assert len(out.splitlines()) == len(steps)
    suffix = "." + (fmt or "safetensors")
    assert sorted(os.listdir(out_dir)) == [s + suffix for s in steps]
    for s in steps:
        assert_bit_exact(modelio.load(out_dir / (s + suffix)), expected_tensors(s), s)


def test_decode_errors(tmp_path, capsys):
    data = read_vector("p1_model_dict")
    bad = tmp_path / "flipped.nnc"
    bad.write_bytes(data[:4] + bytes([data[4] ^ 0x7F]) + data[5:])  # nnr_unit_size of the MPS
    out_path = tmp_path / "out.npz"
    status, out, err = run(capsys, "decode", str(bad), "-o", str(out_path))
    assert status == 2 and out == "" and err.startswith("nnc-edge decode: error: %s: " % bad)
    assert not out_path.exists()

    status, _, err = run(capsys, "decode", str(tmp_path / "missing.nnc"), "-o", str(out_path))
    assert status == 1 and "cannot read" in err

    status, _, err = run(capsys, "decode", MODEL, "-o", str(tmp_path / "model.pt"))
    assert status == 2 and "unsupported model file suffix" in err

    status, _, err = run(capsys, "decode", MODEL)
    assert status == 2 and "-o/--output is required" in err

    status, _, err = run(capsys, "decode", MODEL, "-o", str(tmp_path / "m.npz"), "--format", "safetensors")
    assert status == 2 and "contradicts" in err

    status, _, err = run(capsys, "decode", MODEL, MODEL, "-o", str(tmp_path / "d"))
    assert status == 2 and "same file name" in err
    assert list(tmp_path.iterdir()) == [bad]

    status, _, err = run(capsys, "decode", MODEL, "-o", str(tmp_path / "no" / "such" / "dir.npz"))
    assert status == 1 and "cannot write" in err


def test_chain_error_names_the_failing_step(tmp_path, capsys):
    # p1_tca_1 without p1_tca_0 before it has no base for temporal context adaptation.
    out_dir = tmp_path / "d"
    status, out, err = run(capsys, "decode", MODEL, str(CONFORMANCE_DIR / "p1_tca_1.nnc"), "-o", str(out_dir))
    assert status == 2 and err.startswith("nnc-edge decode: error: %s: " % (CONFORMANCE_DIR / "p1_tca_1.nnc"))
    assert out.startswith(MODEL + " -> ") and os.listdir(out_dir) == ["p1_model_dict.safetensors"]


def test_corrupt_file_in_a_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.nnc"
    bad.write_bytes(read_vector("p1_model_dict")[:100])
    proc = subprocess.run([sys.executable, "-m", "nnc_edge", "decode", str(bad), "-o", str(tmp_path / "o.npz")],
                          cwd=str(REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("nnc-edge decode: error: ") and "Traceback" not in proc.stderr


# --- the registry other modules extend ------------------------------------------------------------
@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", copy.deepcopy(cli.COMMANDS))
    return cli.COMMANDS


def test_modules_can_add_commands_and_options(registry, capsys):
    @cli.command("echo", help="print the arguments", examples=("nnc-edge echo a b",))
    def run_echo(args):
        print(" ".join(args.words))
        return 3

    @cli.arguments("echo")
    def echo_arguments(parser):
        parser.add_argument("words", nargs="*")

    @cli.arguments("decode")
    def stream_arguments(parser):
        parser.add_argument("--shout", action="store_true")

    @cli.alternative("decode", "shout")
    def run_shouting_decode(args):
        print("DECODE " + " ".join(args.inputs).upper())

    assert run(capsys, "echo", "a", "b") == (3, "a b\n", "")
    assert run(capsys, "decode", "--shout", "x.nnc") == (0, "DECODE X.NNC\n", "")
    # Without the option, decode is itself again.
    status, _, err = run(capsys, "decode", "x.nnc", "-o", "x.npz")
    assert status == 1 and "cannot read x.nnc" in err
    with pytest.raises(ValueError, match="registered twice"):
        cli.command("echo", help="again")(run_echo)


# --- the README's examples ------------------------------------------------------------------------
def readme_python_examples(section):
    with open(REPO / "README.md", encoding="utf-8") as f:
        text = f.read()
    body = text.split("\n## " + section + "\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n```", 1)[0] for block in body.split("```python\n")[1:]]


def test_readme_python_api_examples_run(tmp_path, monkeypatch, capsys):
    # In a scratch directory where ../shared/conformance/nncodec-2.1.3 leads to the vectors, as beside
    # a checkout, so the examples' output files stay out of the repository.
    (tmp_path / "shared" / "conformance").mkdir(parents=True)
    (tmp_path / "shared" / "conformance" / "nncodec-2.1.3").symlink_to(CONFORMANCE_DIR)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    examples = readme_python_examples("Python API")
    assert len(examples) >= 5
    for code in examples:
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "layer2.weight float32 (24, 268)" in out
    assert "3 {'0': (64, 48)}" in out
    assert "layer0.bias (17,) f 17" in out
    assert "185 nnr_unit_size nnr_unit_size 4774 runs past the end" in out
    assert nnc_edge.NNCError is decoder_core.NNCError


# --- issue 16, finding 11: decode's outputs, empty bitstreams, the update record ------------------
TCA = [str(CONFORMANCE_DIR / "p1_tca_0.nnc"), str(CONFORMANCE_DIR / "p1_tca_1.nnc")]


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_decode_several_inputs_into_what_cannot_be_their_directory(tmp_path, capsys, monkeypatch, stream):
    (tmp_path / "file").write_bytes(b"mine")
    target = str(tmp_path / "file")
    assert run(capsys, "decode", *TCA, "-o", target, *stream) == (
        2, "", "nnc-edge decode: error: -o %s is a file: several inputs are decoded into a directory\n" % target)
    below = str(tmp_path / "file" / "sub")
    assert run(capsys, "decode", *TCA, "-o", below, *stream) == (
        1, "", "nnc-edge decode: error: cannot create the directory %s: Not a directory\n" % below)

    def refused(path, mode=0o777, exist_ok=False):
        raise PermissionError(13, "Permission denied", os.path.dirname(path))
    monkeypatch.setattr(os, "makedirs", refused)
    new = str(tmp_path / "new")
    assert run(capsys, "decode", *TCA, "-o", new, *stream) == (
        1, "", "nnc-edge decode: error: cannot create the directory %s: Permission denied\n" % new)
    assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_bytes() == b"mine"


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_an_empty_bitstream_is_an_error_not_an_empty_model(tmp_path, capsys, stream):
    empty = tmp_path / "empty.nnc"
    empty.write_bytes(b"")
    (tmp_path / "m.safetensors").write_bytes(b"the model before")
    message = "nnc-edge decode: error: %s: the bitstream is empty (0 bytes)\n" % empty
    assert run(capsys, "decode", str(empty), "-o", str(tmp_path / "m.safetensors"), *stream) == (2, "", message)
    # In a chain, before anything of the chain is written.
    assert run(capsys, "decode", MODEL, str(empty), "-o", str(tmp_path / "d"), *stream) == (2, "", message)
    assert sorted(os.listdir(tmp_path)) == ["empty.nnc", "m.safetensors"]
    assert (tmp_path / "m.safetensors").read_bytes() == b"the model before"


def test_the_api_refuses_an_empty_bitstream():
    for decode in (nnc_edge.decode, nnc_edge.Decoder().decode):
        with pytest.raises(decoder_core.NNCError) as info:
            decode(b"")
        assert str(info.value) == "the bitstream is empty (0 bytes)"
    with pytest.raises(decoder_core.NNCError) as info:
        nnc_edge.apply_update({"w": np.zeros(3, np.float32)}, b"")
    assert str(info.value) == "<update>: the bitstream is empty (0 bytes)"


def test_publish_refuses_an_empty_bitstream_before_connecting(tmp_path, capsys):
    empty = tmp_path / "empty.nnc"
    empty.write_bytes(b"")
    # Port 9 (discard) on loopback: nothing listens; a connection attempt would fail differently.
    status, out, err = run(capsys, "publish", str(empty), "--broker", "mqtt://127.0.0.1:9", "--model", "kws",
                           "--retries", "0", "--state-dir", str(tmp_path / "state"))
    assert (status, out, err) == (2, "", "nnc-edge publish: error: %s: the bitstream is empty (0 bytes)\n" % empty)


def _record_columns(info):
    flags = "0x%02x%s" % (info.flags, " (continues_state)" if info.continues_state else "")
    return "update %d: parent %s, result %s, root %s, flags %s" % (
        info.sequence, info.parent.hex()[:16], info.result.hex()[:16], info.root.hex()[:16], flags)


@pytest.mark.parametrize("nncodec_compatible", [False, True])
def test_inspect_shows_the_update_record(tmp_path, capsys, nncodec_compatible):
    from nnc_edge.updates import ChainState, encode_update, model_digest, read_update_info

    rng = np.random.default_rng(5)
    base = {"w": rng.normal(size=(16, 8)).astype(np.float32)}
    state = ChainState(model_digest(base))
    steps = []
    for _ in range(2):
        new = {"w": (base["w"] + 0.05 * rng.normal(size=(16, 8))).astype(np.float32)}
        data, base = encode_update(base, new, residual=state, return_model=True,
                                   nncodec_compatible=nncodec_compatible)
        steps.append(data)
    path = tmp_path / "u2.nnc"
    path.write_bytes(steps[1])
    info = read_update_info(steps[1])
    assert info.sequence == 2 and (info.continues_state or nncodec_compatible)
    status, out, err = run(capsys, "inspect", str(path))
    assert status == 0 and err == ""
    unit = "NNR_MPS" if nncodec_compatible else "NNR_UNSP"
    rows = [line for line in out.splitlines() if line.split()[2] == unit]
    assert len(rows) == 1 and rows[0].endswith("  " + _record_columns(info))
    status, out, err = run(capsys, "inspect", "--json", str(path))
    record = [u for u in json.loads(out) if u["type_name"] == unit][0]["update_record"]
    assert record == {"sequence": 2, "parent": info.parent.hex(), "result": info.result.hex(),
                      "root": info.root.hex(), "flags": info.flags, "continues_state": info.continues_state}


def test_inspect_leaves_other_unspecified_units_alone(tmp_path, capsys):
    """Type 40 is an application's: another application's payload is listed as it is, not as a record."""
    path = tmp_path / "extra.nnc"
    path.write_bytes(read_vector("p1_model_dict") + bytes([0x00, 0x07, 40 << 2]) + b"NNCX")
    status, out, err = run(capsys, "inspect", str(path))
    assert status == 0 and out.splitlines()[-1].split()[2:] == ["NNR_UNSP", "1", "-", "-", "-", "-", "0"]


@pytest.mark.parametrize("argv", [["inspect"], ["inspect", "--json"], ["sign", "--key", "k", "--model", "kws"],
                                  ["verify", "--trusted-key", "k.pub"]])
def test_every_command_reading_a_bitstream_refuses_an_empty_one(tmp_path, capsys, argv, monkeypatch):
    from nnc_edge import signing

    signing.SigningKey.generate().save(str(tmp_path / "k"))
    empty = tmp_path / "empty.nnc"
    empty.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, argv[0], str(empty), *argv[1:])
    assert (status, out, err) == (2, "", "nnc-edge %s: error: %s: the bitstream is empty (0 bytes)\n"
                                  % (argv[0], empty))
    assert sorted(os.listdir(tmp_path)) == ["empty.nnc", "k", "k.pub"]
