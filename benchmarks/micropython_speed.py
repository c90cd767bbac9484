"""Decoding speed of decoder_core on MicroPython (the WebAssembly port under Node) next to CPython.

    python benchmarks/micropython_speed.py [FILE.nnc] [--repeat N] [--mp-repeat M]

Decodes FILE (default: the conformance vector p1_real_silero_vad.nnc, 309,633 parameters) held in
memory with decoder_core.decode():
  - MicroPython 1.27, WebAssembly port (firmware_tests/run.mjs, 16 MiB heap, decoder_core as source),
    best of M runs (default 1; one run takes several seconds);
  - CPython, pure-Python backend (decoder_core.backend "python", as NNC_EDGE_BACKEND=python selects);
  - CPython, compiled backend (decoder_core.backend "cython"), if it is built;
best of N runs each (default 3). Not a test: prints a table of parameters per second by wall-clock
time, and by CPU time, which a loaded machine disturbs less (MicroPython's CPU time is that of the
Node process minus a run that loads everything but decodes nothing). Checks that MicroPython's
output has the same CRC-32 as CPython's.
"""

import argparse
import os
import platform
import re
import resource
import subprocess
import sys
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "firmware_tests"))

import decoder_core  # noqa: E402
import mphost  # noqa: E402

try:
    from decoder_core import backend  # noqa: E402
except ImportError:  # a decoder_core without backend selection is pure Python
    backend = None


def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def micropython_speed(path, repeat):
    """(parameters, best wall seconds, CPU seconds per decode, crc32, version) under MicroPython."""
    script = os.path.join(mphost.MP_SCRIPTS, "speed.py")
    copies = [(path, "/data/bench.nnc")]

    def run(n):
        cpu = _children_cpu()
        proc = mphost.run_micropython(script, ["/data/bench.nnc", str(n)], heap=16 << 20, copies=copies,
                                    timeout=3600)
        cpu = _children_cpu() - cpu
        if proc.returncode:
            raise RuntimeError("MicroPython failed:\n%s\n%s" % (proc.stdout, proc.stderr))
        return proc.stdout, cpu

    _, base_cpu = run(0)
    out, cpu = run(repeat)
    m = re.search(r"speed: (\d+) parameters, best (\d+) us, crc32 ([0-9a-f]{8}), (.*)", out)
    if not m:
        raise RuntimeError("unexpected MicroPython output:\n" + out)
    return int(m.group(1)), int(m.group(2)) / 1e6, (cpu - base_cpu) / repeat, int(m.group(3), 16), m.group(4)


def cpython_speed(data, repeat):
    """(parameters, best wall seconds, best CPU seconds, crc32) of decoder_core.decode here."""
    best_wall = best_cpu = None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = decoder_core.decode(data)
        w, c = time.perf_counter() - w, time.process_time() - c
        best_wall = w if best_wall is None else min(best_wall, w)
        best_cpu = c if best_cpu is None else min(best_cpu, c)
    crc = 0
    params = 0
    for _, _, values in out:
        crc = zlib.crc32(memoryview(values).cast("B"), crc)
        params += len(values)
    return params, best_wall, best_cpu, crc


def main():
    default = os.path.join(mphost.CONFORMANCE, "p1_real_silero_vad.nnc")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file", nargs="?", default=default)
    ap.add_argument("--repeat", type=int, default=3, help="CPython runs (best is shown)")
    ap.add_argument("--mp-repeat", type=int, default=1, help="MicroPython runs (best is shown)")
    args = ap.parse_args()
    with open(args.file, "rb") as f:
        data = f.read()

    rows = []
    backends = backend.available() if backend is not None else ["python"]
    reference_crc = None
    for name in sorted(backends, key=lambda b: b != "python"):
        if backend is not None:
            backend.use(name)
        params, wall, cpu, crc = cpython_speed(data, args.repeat)
        reference_crc = crc if reference_crc is None else reference_crc
        if crc != reference_crc:
            raise SystemExit("CPython backends disagree (%08x, %08x)" % (reference_crc, crc))
        label = "CPython %s, %s backend" % (platform.python_version(), "pure-Python" if name == "python" else "compiled (Cython)")
        rows.append((label, params, wall, cpu))

    reason = mphost.missing()
    if reason:
        print("MicroPython: not measured: " + reason)
    else:
        params, wall, cpu, crc, version = micropython_speed(args.file, args.mp_repeat)
        if crc != reference_crc:
            raise SystemExit("MicroPython's output differs from CPython's (crc32 %08x, %08x)" % (crc, reference_crc))
        rows.insert(0, ("MicroPython %s, WebAssembly port (Node %s)"
                        % (version.split("MicroPython ")[-1].split(" on ")[0], _node_version()), params, wall, cpu))

    print("decoding %s (%d bytes, %d parameters); outputs identical (CRC-32 %08x)"
          % (os.path.basename(args.file), len(data), rows[0][1], reference_crc))
    print("%-55s %10s %14s %10s %14s" % ("", "wall s", "params/s", "CPU s", "params/s (CPU)"))
    for label, params, wall, cpu in rows:
        print("%-55s %10.3f %14.0f %10.3f %14.0f" % (label, wall, params / wall, cpu, params / cpu))
    print("machine: %s, %d CPUs, load average %.1f" % (platform.machine(), os.cpu_count(), os.getloadavg()[0]))


def _node_version():
    try:
        return subprocess.run([mphost.node(), "--version"], stdout=subprocess.PIPE, text=True).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
