"""Decoding speed of the pure-Python core on p1_real_silero_vad.nnc (309,633 parameters).

    python benchmarks/decode_pure_python.py [FILE] [--repeat N]

Prints the best of N (default 3) timings of decoder_core.decode and the parameters per second.
NNC_EDGE_BACKEND=python is set before decoder_core is imported so that a compiled backend, where
decoder_core honours that variable, stays out of the measurement; the backend line shows what ran.

Recorded (issue 3) on the development machine, x86_64, CPython 3.11.7, 2 cores shared with other jobs:
    best of 3: 1.263 s, 245135 parameters/s
    best of 5: 1.377 s, 224851 parameters/s   (while other jobs loaded the machine)
"""

import argparse
import os
import platform
import sys
import time

os.environ["NNC_EDGE_BACKEND"] = "python"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import decoder_core  # noqa: E402  (after NNC_EDGE_BACKEND is set)

DEFAULT = os.path.join(os.environ.get("NNC_CONFORMANCE_DIR")
                       or os.path.join(os.path.dirname(REPO), "shared", "conformance", "nncodec-2.1.3"),
                       "p1_real_silero_vad.nnc")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", default=DEFAULT, help="NNR bitstream (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs, the best counts (default: 3)")
    args = parser.parse_args()
    with open(args.file, "rb") as f:
        data = f.read()
    best = None
    parameters = 0
    for _ in range(args.repeat):
        start = time.perf_counter()
        tensors = decoder_core.decode(data)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
        parameters = sum(len(values) for _, _, values in tensors)
    backend = decoder_core.backend_name() if hasattr(decoder_core, "backend_name") else "pure-python"
    print("file:       %s (%d bytes, %d tensors, %d parameters)"
          % (os.path.basename(args.file), len(data), len(tensors), parameters))
    print("backend:    %s (NNC_EDGE_BACKEND=python), %s %s on %s"
          % (backend, platform.python_implementation(), platform.python_version(), platform.machine()))
    print("best of %d: %.3f s, %.0f parameters/s" % (args.repeat, best, parameters / best))


if __name__ == "__main__":
    main()
