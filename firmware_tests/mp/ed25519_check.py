# MicroPython: transports/ed25519.py on the cases tests/test_ed25519.py (or
# benchmarks/ed25519_speed.py) writes.
#
#   ed25519_check.py CASES.json              check everything
#   ed25519_check.py CASES.json bench N      time N verifications or more first, then check
#   ed25519_check.py CASES.json pieces       only verification() piece by piece (WebAssembly port)
#
# CASES.json: {"sha512": [[data hex, digest hex], ...],
#              "cases": [{"name", "public_key", "message", "signature" (hex), "expect"}, ...]}
# The check: the portable SHA-512 (this port's hashlib has none, so verify uses it), each case's
# answer, and that arguments of the wrong type or length give False.
# bench: rounds of verifications of the valid cases; prints the best round's time per
# verification, the average, and the time of the base point's table, which the first builds.
# pieces: each case through ed25519.verification(), returning to JavaScript between two pieces, where
# this port collects garbage; prints the most a piece allocated, and fails if the heap had to grow
# (run it in a small heap, with few cases: each await keeps ~29 bytes in this port).
# Prints "ed25519_check: ok, ..." and exits 0, or each failure and exits 1.
import binascii
import gc
import hashlib
import json
import sys
import time

from transports import ed25519

unhex = binascii.unhexlify
with open(sys.argv[1]) as f:
    spec = json.load(f)
mode = sys.argv[2] if len(sys.argv) > 2 else "check"
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
        print("FAIL " + what)


cases = [(c["name"], unhex(c["public_key"]), unhex(c["message"]), unhex(c["signature"]), c["expect"])
         for c in spec["cases"]]
sha512_cases = spec["sha512"]
spec = None  # the hex strings

if mode == "bench":
    count = int(sys.argv[3])
    valid = [c for c in cases if c[4]]
    t0 = time.ticks_us()
    ed25519._run(ed25519._base_table())
    print("bench: base table %d us" % time.ticks_diff(time.ticks_us(), t0))
    done = total = 0
    best = None
    while done < count:
        # Rounds over the valid cases: the best is what a machine busy with other work disturbs least.
        t0 = time.ticks_us()
        for name, public_key, message, signature, _ in valid:
            check(ed25519.verify(public_key, message, signature), "bench " + name)
        us = time.ticks_diff(time.ticks_us(), t0)
        total += us
        done += len(valid)
        best = us if best is None or us < best else best
    print("bench: %d verifications, %d us each in the best round, %d on average, %s"
          % (done, best // len(valid), total // done, sys.version))

if mode == "pieces":
    import js

    heap = gc.mem_alloc() + gc.mem_free()
    largest = pieces = 0
    for name, public_key, message, signature, expect in cases:
        await js.Promise.resolve(None)  # noqa: F704 (run.mjs runs the script with top-level await)
        gc.collect()
        before = gc.mem_alloc()
        for answer in ed25519.verification(public_key, message, signature):
            largest = max(largest, gc.mem_alloc() - before)
            pieces += 1
            await js.Promise.resolve(None)  # noqa: F704
            gc.collect()
            before = gc.mem_alloc()
        check(answer is expect, "%s in pieces: expected %s" % (name, expect))
    check(gc.mem_alloc() + gc.mem_free() == heap, "the heap grew")
    print("pieces: %d, at most %d bytes allocated in one" % (pieces, largest))
else:
    check(not hasattr(hashlib, "sha512") or ed25519._HASHLIB_SHA512 is not None, "the portable SHA-512 is not used")
    for data, digest in sha512_cases:
        check(ed25519.sha512(unhex(data)) == unhex(digest), "sha512 of %d bytes" % (len(data) // 2))

    for name, public_key, message, signature, expect in cases:
        check(ed25519.verify(public_key, message, signature) is expect, "%s: expected %s" % (name, expect))

    name, public_key, message, signature, _ = [c for c in cases if c[4]][0]
    for args in ((None, message, signature), (public_key, "text", signature), (public_key, message, 64),
                 (list(public_key), message, signature), (public_key[:31], message, signature),
                 (public_key + b"\0", message, signature), (public_key, message, signature[:63]),
                 (public_key, message, signature + b"\0"), (b"", b"", b"")):
        check(ed25519.verify(*args) is False, "bad arguments %r" % ([type(a).__name__ for a in args],))
    check(ed25519.verify(bytearray(public_key), memoryview(message), bytearray(signature)) is True,
          "bytearray / memoryview arguments")

if failures:
    print("ed25519_check: %d failures" % len(failures))
    sys.exit(1)
print("ed25519_check: ok, %d cases, %s, hashlib.sha512 %s"
      % (len(cases), mode, "present" if hasattr(hashlib, "sha512") else "absent"))
