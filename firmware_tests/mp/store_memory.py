# MicroPython: bitstreams streamed into the device store, or into one file, inside a fixed GC heap.
#
#   node run.mjs --heap HEAP --loop step store_memory.py HEAP NAME.json... [--chunk BYTES] [--slice N] [--file]
#                [--whole-import]
#
# run.mjs calls step() once per chunk, as a device's main loop calls into Python per event: this
# port collects garbage only between calls (an allocation inside one never collects; heap.py), and
# each await would keep ~29 bytes for good (run.mjs). Each step starts with gc.collect(): the heap
# holds what lives between chunks plus everything one chunk allocates, garbage included.
#
# The first steps measure what importing the decoder (decoder_core.stream), then the store
# (nnc_device.store), add to gc.mem_alloc(), before anything else is imported (earlier imports
# shift the figure by a few KB: qstr pools, sys.modules). They import one module a step, in the
# order of decoder_core.MODULES, as a device with a small heap does (README "MicroPython"): the
# garbage one module's loading leaves is collected before the next loads into its place. With
# --whole-import the decoder and the store are imported in one step each
# (import decoder_core.stream): their loading's garbage then lies between what they keep, holes
# that a later allocation larger than them cannot use. This script is kept small: its code
# lies in the heap too. Then each NAME.nnc (several: an update chain's steps, in order) is read
# in chunks into one buffer and pushed into StoreSession(slice_elements=N); in a step of its own,
# the stored files are checked against NAME.json (expect.py, loaded only then). With --file (one
# bitstream) the store is not imported: the slices of StreamDecoder(slice_elements=N).iter_feed()
# are written one after the other into one file, /out.bin, checked tensor by tensor. The heap must
# never grow beyond HEAP. Prints the sizes, the largest live state between chunks, the peak and the
# gc.mem_free() low-water mark; exits with status 1 on any failure.
import gc
import sys

TOTAL = gc.mem_alloc() + gc.mem_free()  # for heap.Meter: the heap may already grow in the imports


def parse_args(argv):
    opts = {"heap": int(argv[1]), "json": [], "chunk": 256, "slice": 2048, "file": False, "whole-import": False}
    i = 2
    while i < len(argv):
        if argv[i] in ("--file", "--whole-import"):
            opts[argv[i][2:]] = True
            i += 1
        elif argv[i] in ("--chunk", "--slice"):
            opts[argv[i][2:]] = int(argv[i + 1])
            i += 2
        else:
            opts["json"].append(argv[i])
            i += 1
    return opts


opts = parse_args(sys.argv)
# phase, before, decoder import, imports, script, live, live at, stream index, peak, error
S = [0, 0, 0, 0, 0, 0, None, -1, 0, None]
R = {}  # meter, session (a StoreSession or, with --file, a StreamDecoder), file, out, buffer, stored index
IMPORTS = []  # modules still to import, one a step


def step():
    gc.collect()
    if IMPORTS:
        __import__(IMPORTS.pop(0))
        return True
    phase = S[0]
    S[0] = phase + 1
    whole = opts["whole-import"]
    if phase == 0:
        S[1] = gc.mem_alloc()
        if whole:
            IMPORTS.append("decoder_core.stream")
        else:
            import decoder_core  # the package alone (MicroPython), then its modules

            for name in decoder_core.MODULES:
                IMPORTS.append("decoder_core." + name)
    elif phase == 1:
        S[2] = gc.mem_alloc() - S[1]
        if not opts["file"]:
            IMPORTS.append("nnc_device.store")
            if not whole:
                IMPORTS.insert(0, "nnc_device.record")
    elif phase == 2:
        S[3] = gc.mem_alloc() - S[1]
        import heap  # noqa: F401  (the harness, after the measurement)
    elif phase == 3:
        return start()
    elif "index" in R:
        return check()
    else:
        S[0] = phase
        return chunk()
    return True


def start():
    from heap import Meter
    S[4] = gc.mem_alloc() - S[1] - S[3]
    print("store memory: imports: decoder %d bytes, store %d bytes more, %d in all; heap %d bytes; "
          "before them %d bytes; this script's own modules and objects %d bytes"
          % (S[2], S[3] - S[2], S[3], opts["heap"], S[1], S[4]))
    R["meter"] = Meter(opts["heap"], TOTAL)
    R["buf"] = bytearray(opts["chunk"])
    if not measure("the imports"):
        return False
    return next_stream()


def next_stream():
    S[7] += 1
    if S[7] >= len(opts["json"]):
        return finish()
    R["file"] = open(opts["json"][S[7]][:-len(".json")] + ".nnc", "rb")
    if opts["file"]:
        from decoder_core.stream import StreamDecoder
        R["out"] = open("/out.bin", "wb")
        R["session"] = StreamDecoder(slice_elements=opts["slice"])
        return True
    from nnc_device.store import StoreSession
    R["session"] = StoreSession("/store", slice_elements=opts["slice"])
    return True


def measure(where):
    from heap import HeapTooSmall
    try:
        R["meter"].check(where)
    except HeapTooSmall as e:
        return fail(str(e))
    return True


def chunk():
    live = gc.mem_alloc() - S[1] - S[3] - S[4]
    f = R["file"]
    if live > S[5]:
        S[5] = live
        S[6] = f.tell()
    buf = R["buf"]
    n = f.readinto(buf)
    if opts["file"]:
        out = R["out"]
        if n:
            # reuse: one array for every slice, each written away before the next is decoded
            for _, _, _, values in R["session"].iter_feed(memoryview(buf)[:n], True):
                out.write(values)
        else:
            R["session"].close()
            out.close()
            R["index"] = "/out.bin"
    elif n:
        R["session"].feed(memoryview(buf)[:n])
    else:
        R["index"] = R["session"].close()
    peak = gc.mem_alloc() - S[1] - S[3] - S[4]
    if peak > S[8]:
        S[8] = peak
    if not measure(f.tell()):  # an int: no string formatted per chunk
        return False
    if n:
        return True
    R["session"] = None
    f.close()
    return True


def check():
    """The stored files against the expectation, while the decoder's memory is free."""
    from expect import file_mismatches, load, store_mismatches
    path = opts["json"][S[7]]
    if opts["file"]:
        R.pop("out")
        errors = file_mismatches(R.pop("index"), load(path), R["buf"])
    else:
        errors = store_mismatches(R.pop("index"), load(path), "/store", R["buf"])
    del sys.modules["expect"]  # the next stream of a chain runs without it
    if errors:
        return fail("%s: %s" % (path, "; ".join(errors)))
    return next_stream()


def fail(message):
    S[9] = message
    return finish()


def finish():
    m = R["meter"]
    if S[9] is not None:
        print("store memory: FAIL %s" % S[9])
    print("store memory: %s %s: chunks of %d bytes, slices of %d elements; largest live state between chunks "
          "%d bytes beyond imports and script (at byte %s); peak %d bytes beyond them; gc.mem_free() "
          "low-water %d bytes (at %s); peak gc.mem_alloc() %d bytes"
          % (",".join(opts["json"]), "stored bit-exact" if S[9] is None else "FAILED", opts["chunk"],
             opts["slice"], S[5], S[6], S[8], m.low, m.where, m.peak))
    if S[9] is not None:
        raise SystemExit(1)
    return False
