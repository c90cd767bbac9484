"""Rate-distortion and speed of our encoder against NNCodec 2.1.3's, on the same tensors, same run.

For silero-vad 6.2.3 (309,633 parameters, the weights the conformance vector p1_real_silero_vad was
coded from, from the package's wheel) and
all-MiniLM-L6-v2 (22.7 M parameters, benchmarks/_minilm.py) at qp -38, -32 and -26 with dependent
quantization: the bitstream size, MSE and PSNR of the decoded tensors against the input (both streams
decoded by nnc_edge), and the encode time of each encoder (wall clock; NNCodec's without its import,
in the reference venv, a subprocess). "vs ref" is our size against NNCodec's ("same": identical
bytes); the last line of each model is the Bjontegaard delta rate of our curve against NNCodec's
(negative: ours is smaller at equal PSNR).

    python benchmarks/encode_rd.py [--models silero,minilm] [--qps -38,-32,-26] [--no-dq]
                                   [--lambda-scale X] [--reference-venv DIR] [--threads N]

MiniLM's tensors are prepared as _minilm.py prepares them for NNCodec (float32, integer tensors as
int32, tensors with a unit dimension flattened); both encoders get the same dict. Without the
reference venv only our side is measured.
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import nnc_edge  # noqa: E402
from nnc_edge import modelio  # noqa: E402
from nnc_edge.encoder.cabac_encoder import encoder_backend  # noqa: E402
from nnc_edge.parallel import check_threads  # noqa: E402
from nnc_edge.encoder.quantize import trellis_backend  # noqa: E402

import _minilm  # noqa: E402

CONFORMANCE = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "conformance", "nncodec-2.1.3")

# Runs in the reference venv: nnc.compress of an .npz at each qp; prints "qp seconds" per run.
_REFERENCE = r"""
import sys, time
import numpy as np
from nncodec import nnc
src, out, dq = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
with np.load(src) as f:
    params = {k: f[k] for k in f.files}
for qp in [int(q) for q in sys.argv[4:]]:
    start = time.perf_counter()
    stream = nnc.compress(params, bitstream_path=None, return_bitstream=True, qp=qp, use_dq=dq, verbose=False)
    took = time.perf_counter() - start
    with open("%s_%d.nnc" % (out, qp), "wb") as f:
        f.write(stream)
    print(qp, took, flush=True)
"""


SILERO_WHEEL = "silero-vad==6.2.3"
SILERO_MEMBER = "silero_vad/data/silero_vad_16k.safetensors"


def silero_weights():
    """silero-vad 6.2.3's float32 weights, from its wheel (``pip download --no-deps``, cached like
    _minilm.py); None when the wheel cannot be had."""
    out = os.path.join(_minilm.cache_dir(), "silero_vad_16k.safetensors")
    if os.path.exists(out):
        return out
    wheel_dir = os.path.join(_minilm.cache_dir(), "silero_wheel")
    wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")] if os.path.isdir(wheel_dir) else []
    if not wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", SILERO_WHEEL,
                               "-d", wheel_dir], capture_output=True)
        wheels = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")] if proc.returncode == 0 else []
        if not wheels:
            return None
    with zipfile.ZipFile(os.path.join(wheel_dir, wheels[0])) as z, open(out + ".part", "wb") as f:
        f.write(z.read(SILERO_MEMBER))
    os.replace(out + ".part", out)
    return out


def silero():
    """The original weights (the conformance vector p1_real_silero_vad was coded from them); else
    the tensors decoded from that vector (already on its qp -30 grid, so finer qps are exact)."""
    path = silero_weights()
    if path is not None:
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in modelio.load(path).items()}
    print("(silero-vad wheel unavailable: using the tensors decoded from p1_real_silero_vad.nnc)")
    return dict(nnc_edge.decode(os.path.join(CONFORMANCE, "p1_real_silero_vad.nnc")))


def minilm():
    out = {}
    for name, v in modelio.load(_minilm.minilm_weights()).items():
        v = np.ascontiguousarray(v, dtype=np.float32 if v.dtype.kind == "f" else np.int32)
        if v.ndim > 1 and (v.shape[0] == 1 or v.size == v.shape[0]):
            v = v.reshape(-1)
        out[name] = v
    return out


def distortion(tensors, decoded):
    """(MSE, PSNR) of the float tensors; PSNR against the largest magnitude of the input."""
    squared = 0.0
    count = 0
    peak = 0.0
    for name, array in tensors.items():
        if array.dtype.kind != "f":
            continue
        diff = decoded[name].reshape(array.shape).astype(np.float64) - array
        squared += float(np.dot(diff.reshape(-1), diff.reshape(-1)))
        count += array.size
        peak = max(peak, float(np.abs(array).max()))
    mse = squared / count
    return mse, (10 * math.log10(peak * peak / mse) if mse else math.inf)


def bd_rate(ref, test):
    """Bjontegaard delta rate in percent: ``ref`` and ``test`` are [(bytes, PSNR)], cubic fits of
    log-rate over PSNR integrated over the common PSNR range."""
    if len(ref) != len(test):
        return None
    points = [(r, t) for r, t in zip(ref, test) if math.isfinite(r[1]) and math.isfinite(t[1])]
    if len(points) < 2:
        return None
    degree = min(3, len(points) - 1)
    rp = np.array([p[0][1] for p in points])
    tp = np.array([p[1][1] for p in points])
    rr = np.log([p[0][0] for p in points])
    tr = np.log([p[1][0] for p in points])
    lo, hi = max(rp.min(), tp.min()), min(rp.max(), tp.max())
    if hi <= lo:
        return None
    fr = np.polyint(np.polyfit(rp, rr, degree))
    ft = np.polyint(np.polyfit(tp, tr, degree))
    avg = ((np.polyval(ft, hi) - np.polyval(ft, lo)) - (np.polyval(fr, hi) - np.polyval(fr, lo))) / (hi - lo)
    return (math.exp(avg) - 1) * 100


def run_reference(python, tensors, qps, dq, tmp):
    src = os.path.join(tmp, "tensors.npz")
    np.savez(src, **tensors)
    out = os.path.join(tmp, "ref")
    proc = subprocess.run([python, "-c", _REFERENCE, src, out, "1" if dq else "0"] + [str(q) for q in qps],
                          capture_output=True, text=True, cwd=tmp)
    if proc.returncode:
        raise RuntimeError("NNCodec failed: %s" % proc.stderr[-2000:])
    times = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            times[int(parts[0])] = float(parts[1])
    streams = {}
    for qp in qps:
        with open("%s_%d.nnc" % (out, qp), "rb") as f:
            streams[qp] = f.read()
    return streams, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="silero,minilm")
    parser.add_argument("--qps", default="-38,-32,-26")
    parser.add_argument("--no-dq", dest="dq", action="store_false", default=True)
    parser.add_argument("--lambda-scale", type=float, default=0.0, help="our trellis' rate term (default 0)")
    parser.add_argument("--reference-venv", default=os.environ.get("NNC_REFERENCE_VENV", _minilm.DEFAULT_VENV))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    qps = [int(q) for q in args.qps.split(",")]
    python = _minilm.reference_python(args.reference_venv)
    print("encoders: nnc-edge %s (entropy coder: %s, trellis: %s, threads: %s)%s; dq=%s, lambda_scale=%g"
          % (nnc_edge.__version__, encoder_backend(), trellis_backend(), check_threads(args.threads),
             "; NNCodec 2.1.3 (%s)" % python if python else "; NNCodec: reference venv not found",
             args.dq, args.lambda_scale))
    header = "%-10s %4s  %-14s %12s %12s %9s %8s %8s" % ("model", "qp", "encoder", "bytes", "MSE", "PSNR dB",
                                                         "time s", "vs ref")
    loaders = {"silero": ("silero-vad", silero), "minilm": ("MiniLM-L6", minilm)}
    for key in args.models.split(","):
        label, load = loaders[key]
        tensors = load()
        params = sum(a.size for a in tensors.values())
        print("\n%s: %d tensors, %d parameters" % (label, len(tensors), params))
        print(header)
        ref_streams, ref_times = {}, {}
        if python:
            with tempfile.TemporaryDirectory() as tmp:
                ref_streams, ref_times = run_reference(python, tensors, qps, args.dq, tmp)
        ours_points, ref_points = [], []
        for qp in qps:
            start = time.perf_counter()
            ours = nnc_edge.encode(tensors, qp=qp, dq=args.dq, lambda_scale=args.lambda_scale,
                                   threads=args.threads)
            took = time.perf_counter() - start
            mse, psnr = distortion(tensors, nnc_edge.decode(ours))
            ours_points.append((len(ours), psnr))
            if qp in ref_streams:
                theirs = ref_streams[qp]
                rmse, rpsnr = distortion(tensors, nnc_edge.decode(theirs))
                ref_points.append((len(theirs), rpsnr))
                print(("%-10s %4d  %-14s %12d %12.4g %9.3f %8.2f" % (label, qp, "NNCodec 2.1.3", len(theirs), rmse,
                                                                    rpsnr, ref_times.get(qp, float("nan")))))
                versus = "same" if ours == theirs else "%+.3f%%" % (100.0 * (len(ours) - len(theirs)) / len(theirs))
            else:
                versus = "-"
            print("%-10s %4d  %-14s %12d %12.4g %9.3f %8.2f %8s" % (label, qp, "nnc-edge", len(ours), mse, psnr,
                                                                   took, versus))
        if ref_points:
            bd = bd_rate(ref_points, ours_points)
            print("%s: BD-rate of nnc-edge vs NNCodec: %s" % (label, "%+.3f%%" % bd if bd is not None else "n/a"))


if __name__ == "__main__":
    main()
