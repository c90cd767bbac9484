"""The device side of MQTT delivery on a real MicroPython (the WebAssembly port under Node, as in
test_micropython.py): transports/envelope.py puts messages back in order and checks the digest,
decoder_core.StreamDecoder decodes them. The messages are what transports.mqtt publishes, in 1 KiB
messages (a microcontroller's size), shuffled and with duplicates, as a broker may deliver them.
Skipped without Node or the npm package, except with CI=true."""

import hashlib
import json
import os
import random
import sys

import pytest

import nnc_edge
from transports import envelope, mqtt

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "firmware_tests"))
import mphost  # noqa: E402

SCRIPT = r"""
import sys, json, hashlib
from transports.envelope import parse, parse_status, Assembly, digest_hex
from decoder_core.stream import StreamDecoder
from decoder_core import NNCError

d = sys.argv[1]
with open(d + "/order.json") as f:
    order = json.load(f)
with open(d + "/status.json", "rb") as f:
    status = parse_status(f.read(), "kws")
dec = StreamDecoder()
a = None
for i in order:
    with open("%s/%d.msg" % (d, i), "rb") as f:
        env = parse(f.read())
    if env.seq != status.seq or env.digest != status.digest:
        continue
    if a is None:
        a = Assembly(env)
    for body in a.add(env):
        for name, shape, values in dec.feed(body):
            print("TENSOR", name, list(shape), digest_hex(hashlib.sha256(bytes(values)).digest()))
a.check()
dec.close()
print("DONE", a.duplicates, a.released)
try:
    parse(b"NM\x02" + bytes(100))
except NNCError as exc:
    print("REFUSED", exc.element)
for hostile in (b"[" * 60000, b"{" * 70000):
    try:
        parse_status(hostile, "kws")
    except NNCError as exc:
        print("REFUSED", str(exc).split(" (")[0])
"""


def test_envelopes_reassembled_and_decoded_on_micropython(tmp_path, conformance_dir):
    reason = mphost.missing()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " -- with CI=true this is an error: .ci/run installs it")
        pytest.skip(reason)
    data = (conformance_dir / "p1_model_dict.nnc").read_bytes()
    bodies = mqtt.split_bitstream(data, 1024 - envelope.header_bytes("kws"))
    digest, payloads = envelope.messages("kws", envelope.FULL, 3, bodies)
    msgs = tmp_path / "msgs"
    msgs.mkdir()
    for i, p in enumerate(payloads):
        (msgs / ("%d.msg" % i)).write_bytes(p)
    order = list(range(len(payloads))) + [0, 2]
    random.Random(5).shuffle(order)
    (msgs / "order.json").write_text(json.dumps(order))
    (msgs / "status.json").write_bytes(envelope.Status("kws", 3, digest, 3, [len(payloads)]).payload())
    script = tmp_path / "device.py"
    script.write_text(SCRIPT)
    proc = mphost.run_micropython(str(script), ["/data"], heap=512 << 10,
                                  copies=[(str(msgs), "/data"), (os.path.join(REPO, "transports"), "/lib/transports")])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    want = ["TENSOR %s %s %s" % (name, list(a.shape), hashlib.sha256(a.tobytes()).hexdigest())
            for name, a in nnc_edge.decode(data).items()]
    assert [line for line in lines if line.startswith("TENSOR")] == want
    assert "DONE 2 %d" % sum(map(len, bodies)) in lines
    assert "REFUSED envelope version" in lines
    assert "REFUSED status nests deeper than 4 levels" in lines  # no recursion into the stack
    assert "REFUSED status of 70000 bytes is larger than the limit of 65536" in lines
