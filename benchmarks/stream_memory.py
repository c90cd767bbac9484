"""Peak memory and time of ``nnc-edge decode --stream``: whole tensors against slices, and NNCodec.

    python benchmarks/stream_memory.py [--reference-venv /tmp/refvenv] [--chunk-size 65536] [--repeat 3]

Every measurement runs in a fresh process. The baseline is the process's RSS after ``import
nnc_edge``; the peak RSS is reset to it (Linux: /proc/self/clear_refs) and read back (VmHWM) after
the command, so "growth" is what the command added at its worst moment, including the modules the
command line imports (column "cli": the RSS they add before decoding starts). Measured, each
``--repeat`` times (the table shows the run with the least wall time; wall and CPU seconds are of
``nnc_edge.cli.main``, after the imports):

- ``nnc-edge decode IN -o OUT.safetensors --stream --slice-elements 0``: today's whole-unit path,
  each tensor whole once its NNR unit is complete;
- ``nnc-edge decode IN -o OUT.safetensors --stream``: slice mode (nnc_edge.streaming
  DEFAULT_SLICE_ELEMENTS per slice), each slice written straight into the sink;
- NNCodec 2.1.3 ``nnc.decompress(path)`` in the reference venv (its baseline: after its imports);

for two streams: MiniLM (benchmarks/_minilm.py, NNCodec qp -32 with DQ) and a synthetic MiniLM
whose word embeddings are [120000, 384], 4 x the largest tensor, by np.resize of the real table,
encoded by nnc_edge.encode (qp -32, DQ, no raw floats, so that NNCodec decodes it too).

Targets (issue 15): slice mode grows peak RSS by at most 24 MB over ``import nnc_edge`` for both
streams, and takes at most 10 % more time than the whole-unit path. The two paths' outputs are
checked to be byte-identical, and MiniLM's to equal nnc_edge.decode.

Recorded on the development machine (x86_64, CPython 3.11.7, Cython backend, 2 cores shared with
other jobs: wall times vary by a factor of 2, CPU times by about 10 %), ``--repeat 5``:

    MiniLM:    all-minilm-l6-v2_qp-32_dq_scan0_v2.nnc (13.4 MiB); largest tensor embeddings.word_embeddings.weight [30522, 384] float32, 44.7 MiB
    MiniLM 4x: minilm-embeddings-120000x384_qp-32_dq_v1.nnc (33.5 MiB); largest tensor embeddings.word_embeddings.weight [120000, 384] float32, 175.8 MiB
    targets: slice mode peak RSS growth <= 24 MB (22.9 MiB) over import nnc_edge; time <= 1.10 x whole tensors

    decoder                            model      tensors  baseline       cli       peak     growth     wall      cpu
    nnc-edge --stream, whole tensors   MiniLM         104  30.2 MiB  14.8 MiB   96.7 MiB   66.4 MiB   3.72 s   1.72 s
    nnc-edge --stream, slices          MiniLM         104  30.3 MiB  14.7 MiB   47.1 MiB   16.8 MiB   3.58 s   1.60 s
    NNCodec 2.1.3 decompress           MiniLM         104 411.2 MiB   0.0 MiB  599.4 MiB  188.2 MiB   5.03 s   2.16 s
    nnc-edge --stream, whole tensors   MiniLM 4x      104  30.3 MiB  14.8 MiB  247.8 MiB  217.5 MiB   8.86 s   4.39 s
    nnc-edge --stream, slices          MiniLM 4x      104  30.3 MiB  14.8 MiB   46.2 MiB   15.9 MiB   7.28 s   4.04 s
    NNCodec 2.1.3 decompress           MiniLM 4x      104 410.5 MiB   0.0 MiB  881.5 MiB  471.0 MiB   8.75 s   5.64 s

    MiniLM:    slice mode grows 16.8 MiB (14.7 MiB of it the command line's imports) -> within the target; time 0.96 x whole tensors (wall), 0.93 x (cpu) -> within
    MiniLM 4x: slice mode grows 15.9 MiB (14.8 MiB of it the command line's imports) -> within the target; time 0.82 x whole tensors (wall), 0.92 x (cpu) -> within
    import nnc_edge: RSS 30.2 MiB (bare interpreter 10.7 MiB)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import _minilm  # noqa: E402

MIB = float(1 << 20)

# Shared by both children (ours and NNCodec's): RSS from /proc and a reset of the peak.
_PROBE = r"""
def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False
"""

_OURS = _PROBE + r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import nnc_edge
base = _status("VmRSS")
reset = _reset_peak()
from nnc_edge import cli
cli.build_parser()  # imports every subcommand's module, as the command does first
imports = _status("VmRSS")
cpu = time.process_time()
start = time.perf_counter()
status = cli.main(sys.argv[2:])
elapsed = time.perf_counter() - start
cpu = time.process_time() - cpu
if status:
    raise SystemExit("nnc-edge %s exited with %d" % (" ".join(sys.argv[2:]), status))
print(json.dumps({"base": base, "imports": imports, "peak": _status("VmHWM"), "reset": reset, "seconds": elapsed,
                  "cpu": cpu}))
"""

_NNCODEC = _PROBE + r"""
import json, sys, time
from nncodec import nnc
base = _status("VmRSS")
reset = _reset_peak()
cpu = time.process_time()
start = time.perf_counter()
params = nnc.decompress(sys.argv[1])
elapsed = time.perf_counter() - start
cpu = time.process_time() - cpu
print(json.dumps({"base": base, "imports": base, "peak": _status("VmHWM"), "reset": reset, "seconds": elapsed,
                  "cpu": cpu, "tensors": len(params)}))
"""

_IMPORT = _PROBE + r"""
import json, sys
bare = _status("VmRSS")
sys.path.insert(0, sys.argv[1])
import nnc_edge
print(json.dumps({"bare": bare, "rss": _status("VmRSS"), "peak": _status("VmHWM")}))
"""

TARGET_GROWTH = 24e6   # bytes: "24 MB"
TARGET_SLOWDOWN = 1.10
LARGE_ROWS = 120000
EMBEDDINGS = "embeddings.word_embeddings.weight"


def run_child(python, code, *args):
    out = subprocess.run([python, "-c", code] + [str(a) for a in args], check=True, stdout=subprocess.PIPE,
                         universal_newlines=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def large_stream():
    """MiniLM with its word embeddings resized to [LARGE_ROWS, 384] (rows repeated), encoded by
    nnc_edge.encode with MiniLM's recipe (qp -32, DQ); raw floats off so that NNCodec 2.1.3 decodes
    it. Cached next to the MiniLM stream."""
    out = os.path.join(_minilm.cache_dir(), "minilm-embeddings-%dx384_qp%d_dq_v1.nnc" % (LARGE_ROWS, _minilm.QP))
    if os.path.exists(out):
        return out
    import numpy as np
    import nnc_edge
    from nnc_edge import modelio

    model = modelio.load(_minilm.minilm_weights())
    model[EMBEDDINGS] = np.resize(model[EMBEDDINGS], (LARGE_ROWS, model[EMBEDDINGS].shape[1]))
    data = nnc_edge.encode(model, qp=_minilm.QP, dq=True, raw_float=False)
    with open(out + ".part", "wb") as f:
        f.write(data)
    os.replace(out + ".part", out)
    return out


def mib(n):
    return n / MIB


def best(runs):
    """The run with the least wall time: the one least disturbed by other jobs on the machine."""
    return min(runs, key=lambda r: r["seconds"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-venv", default=_minilm.DEFAULT_VENV,
                        help="NNCodec 2.1.3 venv, for encoding the stream and for the comparison (default %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=1 << 16, help="bytes per read (default %(default)d)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each nnc-edge measurement (default %(default)d)")
    args = parser.parse_args()

    streams = [("MiniLM", _minilm.minilm_stream(0, args.reference_venv)), ("MiniLM 4x", large_stream())]
    reference = _minilm.reference_python(args.reference_venv)
    work = tempfile.mkdtemp(prefix="nnc-edge-stream-memory-")
    modes = (("whole tensors", ["--slice-elements", "0"]), ("slices", []))

    rows = []
    largest = {}
    for label, path in streams:
        measured = []
        for index, (mode, extra) in enumerate(modes):
            out = os.path.join(work, "%d.safetensors" % index)
            command = ["decode", path, "-o", out, "--stream", "-q", "--chunk-size", args.chunk_size] + extra
            runs = [run_child(sys.executable, _OURS, REPO, *command) for _ in range(args.repeat)]
            measured.append((mode, best(runs), out))
        largest[label], count = check_outputs(path, [out for _, _, out in measured], label == "MiniLM")
        for mode, r, out in measured:
            r["tensors"] = count
            rows.append(("nnc-edge --stream, " + mode, label, r))
            os.remove(out)
        if reference is not None:
            rows.append(("NNCodec 2.1.3 decompress", label, run_child(reference, _NNCODEC, path)))
    os.rmdir(work)
    imp = run_child(sys.executable, _IMPORT, REPO)

    for label, path in streams:
        name, shape, nbytes = largest[label]
        print("%-10s %s (%.1f MiB); largest tensor %s %s float32, %.1f MiB"
              % (label + ":", os.path.basename(path), mib(os.path.getsize(path)), name, shape, mib(nbytes)))
    print("targets: slice mode peak RSS growth <= 24 MB (%.1f MiB) over import nnc_edge; time <= %.2f x whole tensors"
          % (mib(TARGET_GROWTH), TARGET_SLOWDOWN))
    print()
    print("%-34s %-10s %7s %9s %9s %10s %10s %8s %8s" % ("decoder", "model", "tensors", "baseline", "cli", "peak",
                                                        "growth", "wall", "cpu"))
    for who, label, r in rows:
        print("%-34s %-10s %7d %5.1f MiB %5.1f MiB %6.1f MiB %6.1f MiB %6.2f s %6.2f s%s"
              % (who, label, r["tensors"], mib(r["base"]), mib(r["imports"] - r["base"]), mib(r["peak"]),
                 mib(r["peak"] - r["base"]), r["seconds"], r["cpu"],
                 "" if r["reset"] else "  (peak not reset: includes imports)"))
    if reference is None:
        print("(NNCodec not measured: no reference venv at %s)" % args.reference_venv)
    print()
    ours = {(who, label): r for who, label, r in rows if who.startswith("nnc-edge")}
    for label, _ in streams:
        whole = ours[("nnc-edge --stream, whole tensors", label)]
        sliced = ours[("nnc-edge --stream, slices", label)]
        growth = sliced["peak"] - sliced["base"]
        print("%-10s slice mode grows %.1f MiB (%.1f MiB of it the command line's imports) -> %s the target; "
              "time %.2f x whole tensors (wall), %.2f x (cpu) -> %s"
              % (label + ":", mib(growth), mib(sliced["imports"] - sliced["base"]),
                 "within" if growth <= TARGET_GROWTH else "OVER", sliced["seconds"] / whole["seconds"],
                 sliced["cpu"] / whole["cpu"],
                 "within" if sliced["seconds"] <= TARGET_SLOWDOWN * whole["seconds"] else "OVER"))
    print("import nnc_edge: RSS %.1f MiB (bare interpreter %.1f MiB)" % (mib(imp["rss"]), mib(imp["bare"])))


def check_outputs(stream, written, compare_decode):
    """Both paths wrote the same bytes, and (for MiniLM) what the whole-buffer decoder returns.
    Returns ((name, shape, bytes) of the largest tensor, number of tensors); not timed or measured."""
    import numpy as np
    import nnc_edge
    from nnc_edge import modelio

    first = _read(written[0])
    if any(_read(path) != first for path in written[1:]):
        raise SystemExit("%s: the slice mode wrote other bytes than the whole-unit path" % stream)
    shapes = modelio.tensor_shapes(written[0])
    name = max(shapes, key=lambda k: int(np.prod(shapes[k])))
    if compare_decode:
        want = nnc_edge.decode(stream)
        got = modelio.load(written[0])
        if list(got) != list(want) or not all(np.array_equal(got[k], want[k]) for k in want):
            raise SystemExit("streamed output differs from nnc_edge.decode")
    return (name, list(shapes[name]), 4 * int(np.prod(shapes[name]))), len(shapes)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


if __name__ == "__main__":
    main()
