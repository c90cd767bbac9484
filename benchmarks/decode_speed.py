"""Decode speed of nnc-edge (pure Python, compiled 1 thread, compiled N threads) and, in the same run,
of NNCodec 2.1.3 from a reference venv, on the same bitstreams. Not a test: prints a table.

    python benchmarks/decode_speed.py [--reference-venv /tmp/refvenv] [--repeat 3] [--threads N]

Bitstreams: the conformance vector p1_real_silero_vad.nnc, and all-MiniLM-L6-v2 (22.7 M parameters)
encoded by NNCodec with qp -32 and dependent quantization, in raster scan and with scan_order 2
(benchmarks/_minilm.py makes and caches them; that needs the reference venv once). Each time is the
best of --repeat runs of the whole decode (bitstream in memory -> all tensors), imports excluded;
NNCodec runs in a subprocess of the venv's python and is timed there around nnc.decompress() only.
Before timing, nnc-edge's MiniLM output is checked bit for bit against NNCodec's.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import _minilm  # noqa: E402
import nnc_edge  # noqa: E402
from decoder_core import backend  # noqa: E402

CONFORMANCE = os.environ.get("NNC_CONFORMANCE_DIR") or os.path.join(os.path.dirname(REPO), "shared", "conformance",
                                                                    "nncodec-2.1.3")

# Runs in the reference venv: time nnc.decompress() on the stream; optionally save the result.
_NNCODEC = r"""
import json, sys, time
import numpy as np
from nncodec import nnc
path, repeat, save = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(path, "rb") as f:
    data = f.read()
times = []
for _ in range(repeat):
    t = time.perf_counter()
    out = nnc.decompress(bytearray(data))
    times.append(time.perf_counter() - t)
if save:
    np.savez(save, **{k: np.asarray(v) for k, v in out.items()})
print(json.dumps({"times": times, "params": int(sum(np.asarray(v).size for v in out.values()))}))
"""


def nncodec_decode(python, path, repeat, save=""):
    proc = subprocess.run([python, "-c", _NNCODEC, path, str(repeat), save], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError("NNCodec failed on %s:\n%s" % (path, proc.stderr[-2000:]))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return min(result["times"]), result["params"]


def ours(data, name, threads, repeat):
    """(best seconds, parameters, bins per run or None) for nnc_edge.decode on backend ``name``."""
    backend.use(name)
    counter = getattr(backend._compiled, "bins_decoded", None) if name == "cython" else None
    best = None
    bins = None
    for _ in range(repeat):
        before = counter() if counter else 0
        t = time.perf_counter()
        out = nnc_edge.decode(data, threads=threads)
        dt = time.perf_counter() - t
        if counter:
            bins = counter() - before
        best = dt if best is None else min(best, dt)
    return best, sum(v.size for v in out.values()), bins


def verify(data, reference_npz):
    """nnc-edge's output equals NNCodec's, bit for bit (float32; NNCodec's int tensors compared as int32)."""
    backend.use(backend.available()[0])
    got = nnc_edge.decode(data)
    with np.load(reference_npz) as ref:
        assert sorted(ref.files) == sorted(got), "tensor names differ"
        for key in ref.files:
            want = ref[key].astype(got[key].dtype).reshape(got[key].shape)
            assert np.array_equal(got[key].view(np.uint32), want.view(np.uint32)), key
    return len(got)


def fmt_rate(x):
    return "%8.2f M" % (x / 1e6)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-venv", default=_minilm.DEFAULT_VENV,
                        help="NNCodec 2.1.3 venv (default %(default)s, used if it exists)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads for the parallel runs")
    parser.add_argument("--python-minilm", action="store_true",
                        help="also time the pure-Python core on MiniLM (minutes); by default only on silero")
    args = parser.parse_args()

    ref_python = _minilm.reference_python(args.reference_venv)
    print("nnc-edge %s, backends available: %s; %d CPUs; reference: %s" % (
        nnc_edge.__version__, ", ".join(backend.available()), os.cpu_count() or 0,
        "NNCodec 2.1.3 in " + args.reference_venv if ref_python else "none"))
    if "cython" not in backend.available():
        print("the compiled backend is not built: only the pure-Python core is measured")

    streams = [("silero_vad p1", os.path.join(CONFORMANCE, "p1_real_silero_vad.nnc"), True)]
    for order in (0, 2):
        try:
            streams.append(("MiniLM scan %d" % order, _minilm.minilm_stream(order, args.reference_venv),
                            args.python_minilm))
        except RuntimeError as exc:
            print("skipping MiniLM scan_order %d: %s" % (order, exc))

    rows = []
    summary = {}
    for label, path, with_python in streams:
        with open(path, "rb") as f:
            data = f.read()
        if ref_python and label.startswith("MiniLM"):
            npz = path[:-4] + ".nncodec.npz"
            if not os.path.exists(npz):
                nncodec_decode(ref_python, path, 1, npz)
            print("%s: %d tensors identical to NNCodec's output" % (label, verify(data, npz)))
        runs = []
        if with_python:
            runs.append(("nnc-edge pure Python", "python", 1, 1))
        if "cython" in backend.available():
            runs.append(("nnc-edge Cython 1 thread", "cython", 1, args.repeat))
            runs.append(("nnc-edge Cython %d threads" % args.threads, "cython", args.threads, args.repeat))
        for name, which, threads, repeat in runs:
            seconds, params, bins = ours(data, which, threads, repeat)
            rows.append((label, name, params, seconds, bins))
            summary[(label, which, threads)] = params / seconds
        if ref_python:
            seconds, params = nncodec_decode(ref_python, path, args.repeat)
            rows.append((label, "NNCodec 2.1.3", params, seconds, None))
            summary[(label, "nncodec", 1)] = params / seconds
    backend.use(backend.available()[0])

    print()
    print("%-14s %-28s %11s %9s %12s %12s %10s" % ("stream", "decoder", "parameters", "seconds", "params/s",
                                                  "bins/s", "vs NNCodec"))
    for label, name, params, seconds, bins in rows:
        ref = summary.get((label, "nncodec", 1))
        print("%-14s %-28s %11d %9.3f %12s %12s %10s" % (
            label, name, params, seconds, fmt_rate(params / seconds), fmt_rate(bins / seconds) if bins else "",
            "%.2fx" % (params / seconds / ref) if ref else ""))

    print()
    n = args.threads
    checks = []
    ref0 = summary.get(("MiniLM scan 0", "nncodec", 1))
    one0 = summary.get(("MiniLM scan 0", "cython", 1))
    many0 = summary.get(("MiniLM scan 0", "cython", n))
    one2 = summary.get(("MiniLM scan 2", "cython", 1))
    many2 = summary.get(("MiniLM scan 2", "cython", n))
    if ref0 and one0:
        checks.append(("MiniLM, 1 thread vs NNCodec", one0 / ref0, 1.0))
    if ref0 and many0:
        checks.append(("MiniLM, %d threads vs NNCodec" % n, many0 / ref0, 1.8))
    if one2 and many2:
        checks.append(("MiniLM scan_order 2, %d threads vs our 1 thread" % n, many2 / one2, 1.7))
    for text, ratio, target in checks:
        print("%-50s %5.2fx  (target >= %.1fx: %s)" % (text, ratio, target, "met" if ratio >= target else "NOT met"))


if __name__ == "__main__":
    main()
