"""nnc_device.agent on MicroPython (the WebAssembly port), driven by micropython-lib's umqtt.simple
itself: the PyPI package micropython-umqtt.simple 1.3.4, taken from what ``pip download`` fetches
(it is an sdist without setup.py, so pip fails after fetching it; --no-clean keeps it unpacked),
over a socket that firmware_tests/mp/umqtt_agent.py provides (a broker speaking the MQTT wire
protocol with retained messages). The agent connects with its last will, catches up from the
retained status through a signed full model and a real update, and publishes its reports.
Skipped without Node, the npm package or the network (pip), except with CI=true."""

import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import nnc_edge
from nnc_edge import signing
from transports import report

from agent_support import MODEL, chain, data_topic, publications
from test_device_store import small_model

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "firmware_tests"))
import mphost  # noqa: E402

UMQTT = "micropython-umqtt.simple==1.3.4"
DEVICE = "board-9"


def _skip(reason):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " -- with CI=true this is an error")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def umqtt_simple(tmp_path_factory):
    """The directory holding umqtt/simple.py of the PyPI package."""
    tmp = tmp_path_factory.mktemp("pip")
    env = dict(os.environ, TMPDIR=str(tmp))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-clean", "--no-deps", "--no-build-isolation",
                    UMQTT, "-d", str(tmp / "dist")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                   timeout=300)
    found = glob.glob(str(tmp / "pip-*" / "*" / "umqtt" / "simple.py"))
    if not found:
        _skip("pip could not fetch %s" % UMQTT)
    return os.path.dirname(found[0])


def test_agent_with_umqtt_simple(umqtt_simple, tmp_path):
    reason = mphost.missing()
    if reason:
        _skip(reason)
    key = signing.SigningKey.generate()
    steps = chain(nnc_edge.encode(small_model()), 1, tmp_path)
    pubs = publications([s[0] for s in steps], key, 900)
    data = tmp_path / "data"
    data.mkdir()
    (data / "key.pem").write_bytes(key.public_pem())
    retained = [[report.status_topic("nnc", MODEL), "status"]]
    (data / "status").write_bytes(pubs[-1][0].payload())
    for status, payloads in pubs:
        for i, p in enumerate(payloads):
            name = "m%d_%d" % (status.seq, i)
            (data / name).write_bytes(p)
            retained.append([data_topic(MODEL, status.seq, i), name])
    (data / "retained.json").write_text(json.dumps(retained))
    proc = mphost.run_micropython(os.path.join(mphost.MP_SCRIPTS, "umqtt_agent.py"), ["/data", DEVICE],
                                  heap=4 << 20, copies=[(str(data), "/data"), (umqtt_simple, "/lib/umqtt"),
                                                        (mphost.portable_transports(str(tmp_path / "t")),
                                                         "/lib/transports")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    connect = json.loads([x for x in lines if x.startswith("CONNECT ")][0][8:])
    topic = report.report_topic("nnc", MODEL, DEVICE)
    # Clean session, will flag, will QoS 1, will retained; then client id, will topic and message.
    assert connect["flags"] == 0x02 | 0x04 | 0x08 | 0x20
    assert connect["fields"][:2] == [report.client_id(DEVICE), topic]
    assert report.parse_report(connect["fields"][2].encode()) == {"v": 1, "id": DEVICE, "state": "offline"}
    reports = [x.split(" ", 4) for x in lines if x.startswith("REPORT ")]
    assert all(r[1] == topic and r[2] in ("1", "True") and r[3] == "0" for r in reports), reports
    states = [json.loads(r[4]) for r in reports]
    assert [s["state"] for s in states][0] == "current" and states[0]["seq"] == 0
    assert {"downloading", "applying"} <= set(s["state"] for s in states)
    final = states[-1]
    assert (final["state"], final["seq"], final["digest"]) == ("current", 2, pubs[-1][0].digest.hex())
    assert final["applied"]["seq"] == 2 and final["applied"]["kind"] == "update"
    got = dict(x.split()[1:] for x in lines if x.startswith("TENSOR "))
    want = {k: hashlib.sha256(np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes()).hexdigest()
            for k, v in steps[-1][1].items()}
    assert got == want
    assert json.loads([x for x in lines if x.startswith("DONE ")][0][5:])["seq"] == 2
