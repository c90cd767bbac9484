"""Time per Ed25519 verification of transports/ed25519.py on MicroPython (the WebAssembly port under
Node) and on CPython, from one run.

    python benchmarks/ed25519_speed.py [--count N] [--mp-count M]

Signs N (default 20) MQTT envelope statements with nnc_edge.signing, each with a fresh key, as
`nnc-edge publish --signing-key` does, then times verify() on them:
  - MicroPython 1.27, WebAssembly port (firmware_tests/mp/ed25519_check.py; its hashlib has no
    SHA-512, so the portable one runs, as on a board): rounds over the N signatures, at least M
    verifications (default 100); wall clock of the best round, and CPU time, which a machine busy
    with other work disturbs less: that of the Node process, minus that of a run with one round;
    the base point's table, which the first verification builds, timed on its own;
  - CPython: best of 5 rounds, with hashlib.sha512 and with the portable SHA-512, and
    `cryptography` (OpenSSL) for scale.
Milliseconds per verification. Not a test, though every answer is checked.
"""

import argparse
import json
import os
import platform
import re
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "firmware_tests"))

import mphost  # noqa: E402
from nnc_edge import signing  # noqa: E402
from transports import ed25519  # noqa: E402


def signed_statement(key, i):
    """(public key, statement, signature) of an envelope of version i + 1, as the publisher signs it."""
    digest = os.urandom(32)
    parent = os.urandom(32) if i else signing.NO_DIGEST
    ext = signing.envelope_signer(key)("kws", i + 1, parent, digest)
    sig = signing.unpack_ext(ext, "kws", i + 1, parent, digest)
    return key.public_raw, sig.statement(), sig.signature


def best_of(verify, signed, rounds=5):
    """(wall ms, CPU ms) per verification in the best round; ``verify(public_key, message,
    signature)`` must answer True."""
    best = None
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        for public_key, message, signature in signed:
            if not verify(public_key, message, signature):
                raise SystemExit("a host signature did not verify")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        best = (wall, cpu) if best is None else (min(best[0], wall), min(best[1], cpu))
    return best[0] * 1000 / len(signed), best[1] * 1000 / len(signed)


def openssl_verify(public_key, message, signature):
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def micropython_bench(path, count):
    """(verifications, best round's us each, CPU seconds, stdout) of the check script's bench."""
    copies = [(os.path.join(REPO, "transports", "__init__.py"), "/lib/transports/__init__.py"),
              (os.path.join(REPO, "transports", "ed25519.py"), "/lib/transports/ed25519.py"),
              (path, "/data/cases.json")]
    cpu = _children_cpu()
    proc = mphost.run_micropython(os.path.join(mphost.MP_SCRIPTS, "ed25519_check.py"),
                                  ["/data/cases.json", "bench", str(count)], copies=copies, timeout=3600)
    cpu = _children_cpu() - cpu
    each = re.search(r"bench: (\d+) verifications, (\d+) us each in the best round", proc.stdout)
    if proc.returncode or not each:
        raise SystemExit("MicroPython failed:\n%s\n%s" % (proc.stdout, proc.stderr))
    return int(each.group(1)), int(each.group(2)), cpu, proc.stdout


def micropython_ms(signed, count):
    """(wall ms of the best round, CPU ms, ms for the base table, version) per verification on the
    WebAssembly port."""
    spec = {"sha512": [], "cases": [{"name": "envelope %d" % i, "public_key": pk.hex(), "message": m.hex(),
                                     "signature": s.hex(), "expect": True} for i, (pk, m, s) in enumerate(signed)]}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cases.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        base_done, _, base_cpu, _ = micropython_bench(path, 1)
        done, us, cpu, out = micropython_bench(path, max(count, 2 * len(signed)))
    table = re.search(r"bench: base table (\d+) us", out)
    version = re.search(r"on average, .*MicroPython (v[^ ]+)", out)
    return us / 1000, (cpu - base_cpu) * 1000 / (done - base_done), int(table.group(1)) / 1000, version.group(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20, help="signatures made on the host")
    ap.add_argument("--mp-count", type=int, default=100, help="verifications timed on MicroPython")
    args = ap.parse_args()
    signed = [signed_statement(signing.SigningKey.generate(), i) for i in range(args.count)]

    rows = []
    reason = mphost.missing()
    if reason:
        print("MicroPython: not measured: " + reason)
    else:
        wall, cpu, table_ms, version = micropython_ms(signed, args.mp_count)
        rows.append(("MicroPython %s, WebAssembly port, portable SHA-512" % version, wall, cpu))
        rows.append(("  (the first verification also builds the base table: %.1f ms)" % table_ms, None, None))
    python = "CPython %s" % platform.python_version()
    rows.append(("%s, hashlib.sha512" % python,) + best_of(ed25519.verify, signed))
    saved = ed25519._HASHLIB_SHA512
    ed25519._HASHLIB_SHA512 = None
    try:
        rows.append(("%s, portable SHA-512" % python,) + best_of(ed25519.verify, signed))
    finally:
        ed25519._HASHLIB_SHA512 = saved
    rows.append(("%s, cryptography (OpenSSL), for scale" % python,) + best_of(openssl_verify, signed))

    print("transports/ed25519.py: verify() of %d signed envelope statements (%d bytes each), ms per verification"
          % (len(signed), len(signed[0][1])))
    print("%-58s %8s %8s" % ("", "wall", "CPU"))
    for label, wall, cpu in rows:
        print("%-58s %8s %8s" % (label, _ms(wall), _ms(cpu)))
    print("machine: %s, %d CPUs, load average %.1f" % (platform.machine(), os.cpu_count(), os.getloadavg()[0]))


def _ms(ms):
    return "" if ms is None else "%.3f" % ms if ms < 1 else "%.1f" % ms


if __name__ == "__main__":
    main()
