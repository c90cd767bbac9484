"""``nnc-edge encode``: end to end from a model file to a bitstream that decodes, options, summary,
progress bar, exit statuses."""

import io
import math
import re
import subprocess
import sys

import numpy as np
import pytest

import nnc_edge
from conftest import REPO
from decoder_core.tables import NNR_AGG, NNR_NDU, NNR_PT_BLOCK
from nnc_edge import cli, modelio
from nnc_edge.cli import encode as encode_cli
from nnc_edge.cli.decode import iter_units
from nnc_edge.encoder.encoding import Encoder

SUMMARY = re.compile(r"^(?P<model>\S+) -> (?P<out>\S+): (?P<tensors>\d+) tensors?, (?P<params>\d+) parameters, "
                     r"\S+ \S+ -> \S+ \S+ \(\S+x\), (?P<bpp>[\d.]+) bits/parameter, (?P<quality>.*), [\d.]+ s$")


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def model_file(tmp_path):
    r = np.random.default_rng(5)
    tensors = {
        "layer1.weight": (r.laplace(size=(48, 40)) * 0.05).astype(np.float32),
        "layer1.bias": (r.standard_normal(48) * 0.01).astype(np.float32),
        "layer2.weight": (r.laplace(size=(10, 48)) * 0.1).astype(np.float32),
        "layer2.bias": (r.standard_normal(10) * 0.01).astype(np.float32),
        "position_ids": np.arange(64, dtype=np.int64).reshape(1, 64),
    }
    path = tmp_path / "model.safetensors"
    modelio.save(str(path), tensors)
    return path, tensors


def psnr_and_error(tensors, decoded):
    squared = count = 0
    peak = max_error = 0.0
    for name, array in tensors.items():
        if array.dtype.kind != "f":
            continue
        diff = decoded[name].astype(np.float64) - array
        squared += float((diff ** 2).sum())
        count += array.size
        peak = max(peak, float(np.abs(array).max()))
        max_error = max(max_error, float(np.abs(diff).max()))
    return 10 * math.log10(peak * peak / (squared / count)), max_error


def test_encode_end_to_end(capsys, model_file, tmp_path):
    path, tensors = model_file
    out = tmp_path / "model.nnc"
    status, stdout, err = run(capsys, "encode", path, "-o", out)
    assert status == 0 and err == ""  # no progress bar when stderr is not a terminal
    data = out.read_bytes()
    assert data == nnc_edge.encode(tensors)  # the command writes what the API writes
    decoded = nnc_edge.decode(data)
    assert list(decoded) == list(tensors)
    assert np.array_equal(decoded["position_ids"], tensors["position_ids"])
    m = SUMMARY.match(stdout.strip())
    assert m, stdout
    params = sum(a.size for a in tensors.values())
    assert (m["model"], m["out"], int(m["tensors"]), int(m["params"])) == (str(path), str(out), 5, params)
    assert float(m["bpp"]) == pytest.approx(8 * len(data) / params, abs=1e-3)
    psnr, max_error = psnr_and_error(tensors, decoded)
    quality = re.match(r"PSNR ([\d.]+) dB, max abs error (\S+)$", m["quality"])
    assert float(quality[1]) == pytest.approx(psnr, abs=0.01)
    assert float(quality[2]) == pytest.approx(max_error, rel=1e-2)


def test_encode_options_reach_the_encoder(capsys, model_file, tmp_path):
    path, tensors = model_file
    out = tmp_path / "o.nnc"
    cases = [
        (["--qp", "-40", "--qp-density", "3", "--nonweight-qp", "none", "--scan-order", "2"],
         dict(qp=-40, qp_density=3, nonweight_qp=None, scan_order=2)),
        (["--no-dq", "--codebook", "2", "--profile", "0"], dict(dq=False, codebook=2, profile=0)),
        (["--bitdepth", "6", "--no-row-skip", "--no-raw-float", "--nonweight-qp", "-60"],
         dict(bitdepth=6, row_skip=False, raw_float=False, nonweight_qp=-60)),
        (["--block", "--lambda-scale", "0.5", "--threads", "1"], dict(block=True, lambda_scale=0.5, threads=1)),
        (["--max-unit-bytes", "300", "--aggregate"], dict(max_unit_bytes=300, aggregate=True)),
        (["--aggregate", "2"], dict(aggregate=2)),
    ]
    for argv, options in cases:
        status, stdout, _ = run(capsys, "encode", path, "-o", out, "-q", *argv)
        assert status == 0 and stdout == ""
        assert out.read_bytes() == nnc_edge.encode(tensors, **options), argv
    units = [u for _, u, _ in iter_units(out.read_bytes())]
    assert any(u.nnr_unit_type == NNR_AGG for u in units)
    run(capsys, "encode", path, "-o", out, "--block")
    blocks = [u for _, u, _ in iter_units(out.read_bytes())
              if u.nnr_unit_type == NNR_NDU and u.ndu.nnr_compressed_data_unit_payload_type == NNR_PT_BLOCK]
    assert [u.names for u in blocks] == [["layer1.weight", "layer1.bias"], ["layer2.weight", "layer2.bias"]]
    run(capsys, "encode", path, "-o", out, "--max-unit-bytes", "200")
    assert all(u.nnr_unit_size <= 200 for _, u, _ in iter_units(out.read_bytes()))


def test_encode_npz_and_exact_summary(capsys, tmp_path):
    path = tmp_path / "ints.npz"
    modelio.save(str(path), {"a": np.arange(12, dtype=np.int32).reshape(3, 4)})
    status, stdout, _ = run(capsys, "encode", path, "-o", tmp_path / "ints.nnc")
    assert status == 0 and "exact (integer tensors only)" in stdout
    grid = {"w": (np.arange(-20, 20, dtype=np.float32).reshape(5, 8) * nnc_edge.encoder.quantize.step_size(-32, 2))}
    modelio.save(str(path), grid)
    status, stdout, _ = run(capsys, "encode", path, "-o", tmp_path / "grid.nnc", "--no-dq")
    assert status == 0 and ", exact, " in stdout  # values on the quantization grid come back exactly


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal(capsys, model_file, tmp_path, monkeypatch):
    path, _ = model_file
    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    status = cli.main(["encode", str(path), "-o", str(tmp_path / "p.nnc")])
    assert status == 0
    text = fake.getvalue()
    assert text.startswith("\r[") and "100% model.safetensors" in text and text.endswith("\n")
    fake.truncate(0)
    cli.main(["encode", str(path), "-o", str(tmp_path / "p.nnc"), "-q"])
    assert fake.getvalue() == ""


def test_error_stats_against_decoded():
    tensors = [("w", np.array([1.0, -2.0], np.float32)), ("i", np.array([3], np.int64))]
    psnr, max_error, floats = encode_cli.error_stats(tensors, {"w": np.array([1.5, -2.0], np.float32),
                                                               "i": np.array([3], np.int32)})
    assert floats == 2 and max_error == 0.5
    assert psnr == pytest.approx(10 * math.log10(4.0 / (0.25 / 2)))
    with pytest.raises(cli.CommandError):
        encode_cli.error_stats(tensors, {"w": tensors[0][1], "i": np.array([4], np.int32)})


def test_encode_exit_statuses(capsys, model_file, tmp_path):
    path, _ = model_file
    out = tmp_path / "x.nnc"
    status, _, err = run(capsys, "encode", path)
    assert status == 2 and "-o/--output is required" in err
    status, _, err = run(capsys, "encode", tmp_path / "missing.safetensors", "-o", out)
    assert status == 1 and "cannot read" in err
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    status, _, err = run(capsys, "encode", bad, "-o", out)
    assert status == 2 and "unsupported model file suffix" in err
    status, _, err = run(capsys, "encode", path, "-o", out, "--qp", "-500")
    assert status == 2 and "qp" in err
    status, _, err = run(capsys, "encode", path, "-o", out, "--nonweight-qp", "fine")
    assert status == 2 and "--nonweight-qp" in err
    status, _, err = run(capsys, "encode", path, "-o", out, "--max-unit-bytes", "20")
    assert status == 2 and "too small" in err
    status, _, err = run(capsys, "encode", path, "-o", tmp_path / "no" / "dir" / "x.nnc")
    assert status == 1 and "cannot write" in err
    assert not out.exists()


def test_encode_help_and_registration():
    proc = subprocess.run([sys.executable, "-m", "nnc_edge", "encode", "--help"], cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for option in ("--qp", "--qp-density", "--nonweight-qp", "--dq", "--no-dq", "--codebook", "--bitdepth",
                   "--scan-order", "--max-unit-bytes", "--profile", "--aggregate", "--block"):
        assert option in proc.stdout
    assert "encode" in cli.COMMANDS


def test_encoder_defaults_match_the_command(capsys, model_file, tmp_path):
    path, tensors = model_file
    run(capsys, "encode", path, "-o", tmp_path / "d.nnc")
    assert (tmp_path / "d.nnc").read_bytes() == Encoder().encode(str(path))
