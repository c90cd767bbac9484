# MicroPython: decode the exported conformance vectors with decoder_core and compare bit for bit.
#
#   conformance.py ROOT [--chunk BYTES] [--no-stream NAME[,NAME...]]
#
# ROOT/index.json lists the vectors in order, each with its update chain and expectation file (see
# expect.py). Every vector is decoded twice: whole, with Decoder.decode() (one Decoder per chain),
# and streamed, with StreamDecoder.feed() on chunks read from the file into one reused buffer (one
# StreamDecoder per chain, close() after each bitstream). Prints one line per decode and a summary;
# exits with status 1 if anything differs.
import sys
import time

import decoder_core
from decoder_core.stream import StreamDecoder
from expect import load, mismatch


def parse_args(argv):
    root = None
    chunk = 4096
    no_stream = []
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--chunk":
            chunk = int(argv[i + 1])
            i += 2
        elif a == "--no-stream":
            no_stream = argv[i + 1].split(",")
            i += 2
        else:
            root = a
            i += 1
    if root is None:
        raise SystemExit("usage: conformance.py ROOT [--chunk BYTES] [--no-stream NAME,...]")
    return root, chunk, no_stream


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def compare(root, exp, got, whole):
    """Messages for every difference between the decoded tensors and the expectation."""
    errors = []
    if len(got) != len(exp["tensors"]):
        errors.append("%d tensors decoded, %d expected" % (len(got), len(exp["tensors"])))
    for t, e in zip(got, exp["tensors"]):
        raw = read_file(root + "/" + e["raw"]) if whole else None
        m = mismatch(e, t[0], t[1], t[2], raw)
        if m:
            errors.append(m)
    return errors


def decode_whole(root, exp, decoders):
    dec = decoders.get(exp["chain"])
    if dec is None:
        dec = decoders[exp["chain"]] = decoder_core.Decoder()
    return dec.decode(read_file(root + "/" + exp["nnc"]))


def decode_stream(root, exp, decoders, chunk):
    dec = decoders.get(exp["chain"])
    if dec is None:
        dec = decoders[exp["chain"]] = StreamDecoder()
    got = []
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(root + "/" + exp["nnc"], "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            got.extend(dec.feed(view[:n]))
    dec.close()
    return got


def run(root, chunk, no_stream):
    index = load(root + "/index.json")
    counts = {"whole": [0, 0], "stream": [0, 0]}
    whole_decoders = {}
    stream_decoders = {}
    for item in index["vectors"]:
        exp = load(root + "/" + item["expect"])
        modes = ["whole"] if exp["name"] in no_stream else ["whole", "stream"]
        for mode in modes:
            t0 = time.ticks_ms()
            try:
                if mode == "whole":
                    got = decode_whole(root, exp, whole_decoders)
                else:
                    got = decode_stream(root, exp, stream_decoders, chunk)
                errors = compare(root, exp, got, mode == "whole")
            except Exception as e:  # reported per vector; the summary makes the run fail
                errors = ["%s: %s" % (type(e).__name__, e)]
            ms = time.ticks_diff(time.ticks_ms(), t0)
            got = None
            counts[mode][1] += 1
            if errors:
                print("FAIL %-6s %s: %s" % (mode, exp["name"], "; ".join(errors)))
            else:
                counts[mode][0] += 1
                params = 0
                for e in exp["tensors"]:
                    params += e["bytes"] // 4
                print("ok   %-6s %-24s %7d parameters %6d ms" % (mode, exp["name"], params, ms))
    print("micropython conformance: whole %d/%d, stream %d/%d (chunk %d bytes), %s"
          % (counts["whole"][0], counts["whole"][1], counts["stream"][0], counts["stream"][1], chunk,
             sys.implementation._machine if hasattr(sys.implementation, "_machine") else sys.platform))
    return counts["whole"][0] == counts["whole"][1] and counts["stream"][0] == counts["stream"][1]


ROOT, CHUNK, NO_STREAM = parse_args(sys.argv)
if not run(ROOT, CHUNK, NO_STREAM):
    sys.exit(1)
