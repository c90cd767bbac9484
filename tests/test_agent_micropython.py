"""nnc_device.agent inside MicroPython (the WebAssembly port under Node), end to end with a real
mosquitto: run.mjs --mqtt connects a real MQTT client (npm package mqtt) and hands messages both
ways to the agent behind umqtt.simple's API (firmware_tests/mp/jsmqtt.py).

The host publishes with ``nnc-edge publish --signing-key``, in 4 KiB messages: silero-vad (the
conformance vector p1_real_silero_vad) as a full model, then 3 updates of a real chain
(nnc_edge.encode_update, TCA/HDSP state carried). The device's tensor files equal the host's view
bit for bit and its report says ``current``. A forged signature, a replay of an old signed version
and an update for another model are refused without touching a file. A power loss in the middle of
an update, then a restart, recovers (the last will says ``offline`` meanwhile). Every run of the
device has a heap of what its imports take plus HEADROOM, and fails if the heap would have to grow;
the modules are .mpy files when mpy-cross is installed, as on a board.

Skipped without Node, the npm packages or mosquitto, except with CI=true."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import nnc_edge
from nnc_edge import updates
from transports import envelope, report

from agent_support import drift
from mqtt_broker import Mosquitto, mosquitto_binary
from test_device_store import assert_same_bits, snapshot, stored

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "firmware_tests"))
import mphost  # noqa: E402

MODEL = "silero"
DEVICE = "board-1"
MESSAGE_BYTES = 4096
# The target, 64 KiB: this port needs the live state between steps plus the largest step, which it
# does not collect within (README "On a microcontroller": a peak of about 57 KiB beyond the imports).
HEADROOM = int(os.environ.get("NNC_AGENT_HEADROOM", 64 << 10))
TIMEOUT = 600


def _missing():
    reason = mphost.missing()
    if reason is None and not os.path.exists(os.path.join(mphost.HERE, "node_modules", "mqtt")):
        reason = "npm package mqtt is not installed (run: npm ci --prefix firmware_tests)"
    if reason is None and mosquitto_binary() is None:
        reason = "mosquitto is not installed"
    return reason


@pytest.fixture(scope="module")
def need_runner():
    reason = _missing()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " -- with CI=true this is an error")
        pytest.skip(reason)


class Reports:
    """The device's retained report, followed with paho-mqtt as an operator's tool would."""

    def __init__(self, url):
        import paho.mqtt.client as paho
        host, port = url.split("://")[1].split(":")
        self.latest = None
        self.history = []
        self.cond = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2)
        self.client.on_message = self._on_message
        self.client.connect(host, int(port))
        self.client.subscribe(report.report_topic("nnc", MODEL, DEVICE), 1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg):
        if not msg.payload:
            return
        with self.cond:
            self.latest = report.parse_report(msg.payload)
            self.history.append(self.latest)
            self.cond.notify_all()

    def wait(self, test, what, timeout=TIMEOUT, device=None):
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.latest is None or not test(self.latest):
                left = deadline - time.monotonic()
                if left <= 0 or (device is not None and device.poll() is not None):
                    raise AssertionError("waiting for %s; last report %s%s" % (
                        what, self.latest, "" if device is None else device.output()))
                self.cond.wait(min(left, 1.0))
            return self.latest

    def publish(self, topic, payload):
        self.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


class Device:
    """The agent in MicroPython (firmware_tests/mp/agent_device.py), its flash in ``flash``."""

    def __init__(self, env, heap, *extra):
        self.log = open(os.path.join(env["dir"], "device-%d.log" % time.monotonic_ns()), "w+")
        cmd = mphost.micropython_command(
            os.path.join(mphost.MP_SCRIPTS, "agent_device.py"), [str(heap), MODEL, DEVICE, "/key.pem"] + list(extra),
            heap=heap, copies=env["copies"], loop="step",
            options=["--mqtt", env["broker"].url, "--persist", "%s=/flash" % env["flash"]] + env.get("crash", []))
        self.proc = subprocess.Popen(cmd, cwd=mphost.HERE, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def poll(self):
        return self.proc.poll()

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return "\n--- device output ---\n" + self.log.read()[-6000:]

    def stop(self):
        """SIGTERM: the runner saves the flash and ends."""
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(60)
        text = self.output()
        assert "agent memory: FAIL" not in text, text
        return self.proc.returncode, text


def nnc_edge_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "nnc_edge"] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


@pytest.fixture(scope="module")
def env(need_runner, tmp_path_factory, conformance_dir):
    d = tmp_path_factory.mktemp("agent")
    broker = Mosquitto(d / "broker").start()
    nnc_edge_cli("keygen", "-o", str(d / "publisher.key"))
    full = (conformance_dir / "p1_real_silero_vad.nnc").read_bytes()
    (d / "full.nnc").write_bytes(full)
    model = nnc_edge.decode(full)
    views = [model]
    rng = np.random.default_rng(17)
    for k in range(1, 4):
        data, model = updates.encode_update(model, drift(model, rng, 0.01), residual=str(d / "chain.state"),
                                            return_model=True)
        (d / ("update%d.nnc" % k)).write_bytes(data)
        views.append(model)
    # An update made for another model (silero with other weights): signed by the trusted key all the same.
    other = drift(views[0], np.random.default_rng(3), 0.05)
    (d / "other.nnc").write_bytes(updates.encode_update(other, drift(other, rng, 0.01)))
    lib = d / "lib"
    transports = mphost.portable_transports(str(lib / "src" / "transports"))
    copies = [(str(d / "publisher.key.pub"), "/key.pem"),
              (os.path.join(mphost.MP_SCRIPTS, "jsmqtt.py"), "/lib/jsmqtt.py")]
    if mphost.mpy_cross_command() is not None:
        for package, directory in mphost.compile_device(str(lib / "mpy")).items():
            copies.append((directory, "/lib/" + package))
        failed = [name for name, proc in mphost.compile_mpy(str(lib / "mpy" / "transports"), transports)
                  if proc.returncode]
        assert not failed, failed
        transports = str(lib / "mpy" / "transports")
    copies.append((transports, "/lib/transports"))
    e = {"dir": str(d), "broker": broker, "copies": copies, "flash": str(d / "flash"), "views": views}
    yield e
    broker.stop()


def publish(env, name, state="host-state"):
    """nnc-edge publish, signed. ``state``: the host's record of the chain (another one: a second
    host with the same key that does not know which model the chain is at)."""
    d = env["dir"]
    return nnc_edge_cli("publish", os.path.join(d, name), "--model", MODEL, "--broker", env["broker"].url,
                        "--signing-key", os.path.join(d, "publisher.key"), "--max-message-bytes", str(MESSAGE_BYTES),
                        "--state-dir", os.path.join(d, state), "-q")


def measure_imports(env):
    proc = subprocess.run(mphost.micropython_command(
        os.path.join(mphost.MP_SCRIPTS, "agent_device.py"), ["0", MODEL, DEVICE, "/key.pem", "--measure"],
        heap=1 << 20, copies=env["copies"], loop="step", options=["--mqtt", env["broker"].url]),
        cwd=mphost.HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    line = [x for x in proc.stdout.splitlines() if x.startswith("agent memory:")][0]
    return int(line.split("in use after them ")[1].split()[0]), line


def assert_view(env, k):
    assert_same_bits(stored(env["flash"]), {n: np.asarray(v) for n, v in env["views"][k].items()}, k)


def is_current(seq):
    return lambda r: r["state"] == "current" and r.get("seq") == seq


def test_agent_on_micropython_with_a_real_broker(env):
    in_use, line = measure_imports(env)
    heap = in_use + HEADROOM
    print(line, "-> heap", heap)
    reports = Reports(env["broker"].url)
    try:
        # The full model, then a power loss two messages into the first update.
        env["crash"] = ["--crash-on", "/seq/2/:2"]
        device = Device(env, heap)
        reports.wait(lambda r: r["state"] == "current" and r["seq"] == 0, "the first report", device=device)
        publish(env, "full.nnc")
        reports.wait(is_current(1), "version 1", device=device)
        publish(env, "update1.nnc")
        assert device.proc.wait(TIMEOUT) == 137, device.output()
        reports.wait(lambda r: r["state"] == "offline", "the last will")
        assert any(r["state"] == "downloading" and r["target"] == 2 for r in reports.history)
        del env["crash"]
        # Restarted: the leftovers of the killed run go, the update is fetched again.
        device = Device(env, heap)
        reports.wait(is_current(2), "version 2 after the restart", device=device)
        publish(env, "update2.nnc")
        reports.wait(is_current(3), "version 3", device=device)
        publish(env, "update3.nnc")
        rep = reports.wait(is_current(4), "version 4", device=device)
        assert rep["applied"]["seq"] == 4 and rep["applied"]["kind"] == "update"
        status_4 = _retained_binary(env, "nnc/%s/status" % MODEL)
        code, text = device.stop()
        assert code == 0, text
        assert_view(env, 3)
        before = snapshot(env["flash"])

        device = Device(env, heap)
        reports.wait(is_current(4), "version 4 after a restart", device=device)
        # A forged signature: version 5 with the signature of another publication.
        forged = _forged(env, status_4)
        for i, payload in enumerate(forged):
            reports.publish("nnc/%s/seq/5/%d" % (MODEL, i), payload)
        rep = reports.wait(lambda r: r["state"] == "rejected", "the forged publication refused", device=device)
        assert "signature" in rep["error"], rep
        # A replay: the status of version 1 put back, whose signed messages are still retained.
        status = envelope.parse_status(status_4, MODEL)
        old = envelope.Status(MODEL, 1, _digest_of(env, 1), 1, status.counts[:1])
        reports.publish("nnc/%s/status" % MODEL, old.payload())
        rep = reports.wait(lambda r: r["state"] == "rejected" and "replay" in (r["error"] or ""), "the replay refused",
                           device=device)
        assert rep["seq"] == 4, rep
        reports.publish("nnc/%s/status" % MODEL, status_4)
        reports.wait(is_current(4), "current again with the genuine status", device=device)
        # An update for another model, genuinely signed (by a host whose record would have refused
        # it): the store's parent check refuses it.
        publish(env, "other.nnc", "other-host-state")
        rep = reports.wait(lambda r: r["state"] == "rejected" and "applies to the model" in (r["error"] or ""),
                           "the update for another model refused", device=device)
        assert rep["seq"] == 4
        code, text = device.stop()
        assert code == 0, text
        assert snapshot(env["flash"]) == before
        assert_view(env, 3)
        print([x for x in text.splitlines() if "agent memory" in x][-1])
    finally:
        reports.close()


def _digest_of(env, seq):
    first = _retained_binary(env, "nnc/%s/seq/%d/0" % (MODEL, seq))
    return envelope.parse(first).digest


def _retained_binary(env, topic):
    """The retained message of ``topic``."""
    import paho.mqtt.client as paho
    got = []
    done = threading.Event()
    host, port = env["broker"].url.split("://")[1].split(":")
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.on_message = lambda client, userdata, msg: (got.append(msg.payload), done.set())
    c.connect(host, int(port))
    c.subscribe(topic, 1)
    c.loop_start()
    try:
        assert done.wait(10), topic
    finally:
        c.loop_stop()
        c.disconnect()
    return got[0]


def _forged(env, status_4):
    """Version 5 messages carrying update 1's bytes under the signature of version 2."""
    status = envelope.parse_status(status_4, MODEL)
    genuine = [envelope.parse(_retained_binary(env, "nnc/%s/seq/2/%d" % (MODEL, i))) for i in range(status.counts[1])]
    return envelope.messages(MODEL, envelope.UPDATE, 5, [bytes(g.body) for g in genuine], 4, status.digest,
                             ext=genuine[0].ext)[1]
