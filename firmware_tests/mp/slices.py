# MicroPython: the conformance vectors through StreamDecoder's slice mode, every chunk size with
# every slice size, compared with the expectations (expect.py) by CRC-32.
#
#   slices.py ROOT [--chunks 1,7,4096,0] [--slices 1,7,4096] [--only NAME=CHUNK:SLICE,...;NAME=...]
#
# Chunk 0 feeds the whole file at once. --only limits a vector to the (chunk, slice) pairs listed
# (all pairs of the two large ones take minutes on this interpreter; not for a chain's steps, which
# need the steps before them). For every (chunk, slice) pair the
# vectors are decoded in index order, an update chain through one StreamDecoder(slice_elements=N)
# with close() after each bitstream, slices taken one at a time from iter_feed(). A tensor's slices
# must start at 0 and continue where the last one ended; the CRC-32 over them, the element count,
# the shape and the element type must be the expected tensor's. Prints one line per vector and
# pair, and a summary; exits with status 1 if anything differs.
import binascii
import sys
import time

from decoder_core.stream import StreamDecoder
from expect import load


def parse_args(argv):
    opts = {"root": None, "chunks": [1, 7, 4096, 0], "slices": [1, 7, 4096], "only": {}}
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("--chunks", "--slices"):
            opts[a[2:]] = [int(x) for x in argv[i + 1].split(",")]
            i += 2
        elif a == "--only":
            for item in argv[i + 1].split(";"):
                name, _, pairs = item.partition("=")
                opts["only"][name] = [tuple(int(x) for x in pair.split(":")) for pair in pairs.split(",")]
            i += 2
        else:
            opts["root"] = a
            i += 1
    if opts["root"] is None:
        raise SystemExit("usage: slices.py ROOT [--chunks C,...] [--slices N,...] [--only NAME=C:N,...;...]")
    return opts


class Checker:
    """Follows the slices of one bitstream against its expectation."""

    def __init__(self, exp):
        self.expected = exp["tensors"]
        self.k = -1          # index of the current tensor
        self.end = 0         # elements of it seen
        self.crc = 0
        self.errors = []

    def slice(self, name, shape, start, values):
        if start == 0:
            self.finish_tensor()
            self.k += 1
            self.end = 0
            self.crc = 0
            if self.k >= len(self.expected):
                self.errors.append("unexpected tensor %s" % name)
                return
            e = self.expected[self.k]
            if name != e["name"] or list(shape) != e["shape"]:
                self.errors.append("tensor %s %r where %s %r was expected" % (name, list(shape), e["name"], e["shape"]))
        if self.k < 0 or self.k >= len(self.expected):
            return
        e = self.expected[self.k]
        if name != e["name"] or start != self.end:
            self.errors.append("%s: slice at %d, expected %s at %d" % (name, start, e["name"], self.end))
            return
        if len(values) and ("f" if isinstance(values[0], float) else "i") != e["type"]:
            self.errors.append("%s: element type differs" % name)
        self.crc = binascii.crc32(values, self.crc)
        self.end += len(values)

    def finish_tensor(self):
        if 0 <= self.k < len(self.expected):
            e = self.expected[self.k]
            if 4 * self.end != e["bytes"]:
                self.errors.append("%s: %d elements, expected %d" % (e["name"], self.end, e["bytes"] // 4))
            elif self.crc & 0xFFFFFFFF != e["crc32"]:
                self.errors.append("%s: CRC-32 %08x, expected %08x" % (e["name"], self.crc & 0xFFFFFFFF, e["crc32"]))

    def finish(self):
        self.finish_tensor()
        if self.k + 1 != len(self.expected):
            self.errors.append("%d tensors, expected %d" % (self.k + 1, len(self.expected)))
        return self.errors


def decode(data, dec, chunk, check):
    mv = memoryview(data)
    step = chunk or len(data)
    for i in range(0, len(data), step):
        for name, shape, start, values in dec.iter_feed(mv[i:i + step]):
            check.slice(name, shape, start, values)
            values = None
    dec.close()


def run(opts):
    root = opts["root"]
    index = load(root + "/index.json")
    exps = [load(root + "/" + item["expect"]) for item in index["vectors"]]
    ok = total = 0
    for chunk in opts["chunks"]:
        for n in opts["slices"]:
            decoders = {}
            for exp in exps:
                only = opts["only"].get(exp["name"])
                if only is not None and (chunk, n) not in only:
                    continue
                dec = decoders.get(exp["chain"])
                if dec is None:
                    dec = decoders[exp["chain"]] = StreamDecoder(slice_elements=n)
                with open(root + "/" + exp["nnc"], "rb") as f:
                    data = f.read()
                check = Checker(exp)
                t0 = time.ticks_ms()
                try:
                    decode(data, dec, chunk, check)
                    errors = check.finish()
                except Exception as e:  # reported per vector; the summary makes the run fail
                    errors = ["%s: %s" % (type(e).__name__, e)]
                data = None
                ms = time.ticks_diff(time.ticks_ms(), t0)
                total += 1
                if errors:
                    print("FAIL chunk %d slice %d %s: %s" % (chunk, n, exp["name"], "; ".join(errors[:3])))
                else:
                    ok += 1
                    print("ok   chunk %d slice %d %s %d ms" % (chunk, n, exp["name"], ms))
    print("micropython slices: %d/%d" % (ok, total))
    return ok == total


if not run(parse_args(sys.argv)):
    sys.exit(1)
