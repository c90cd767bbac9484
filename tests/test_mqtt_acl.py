"""The broker configuration of docs/mosquitto-acl.md: mosquitto with docs/mosquitto/nnc-edge.acl as it
is in the repository, password accounts for the publisher and two devices.

A device receives its own model (here signed, and checked against the publisher's key), is refused
another model's topics, and cannot change its own model's retained status. It writes its own report
(and the broker its last will) but no other device's report, nor one under another model."""

import asyncio
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import nnc_edge
from nnc_edge import modelio, signing
from nnc_edge.encoder.encoding import encode
from transports import mqtt, report
from transports.envelope import FULL
from transports.mqtt import fleet

from mqtt_broker import MosquittoProcess, mosquitto_binary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACL = os.path.join(REPO, "docs", "mosquitto", "nnc-edge.acl")
ACCOUNTS = {"publisher": "pub-secret", "kws-device-01": "kws-secret", "vad-device-01": "vad-secret"}
WAIT = 20.0
pytestmark = pytest.mark.skipif(mosquitto_binary() is None and os.environ.get("CI") != "true",
                                reason="mosquitto is not installed (apt-get install mosquitto)")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("mosquitto-acl"))
    passwd = os.path.join(directory, "passwd")
    for i, (user, password) in enumerate(ACCOUNTS.items()):
        subprocess.run(["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [passwd, user, password],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=60)
    b = MosquittoProcess(directory, ["allow_anonymous false", "password_file %s" % passwd, "acl_file %s" % ACL])
    b.start()
    yield b
    b.stop()


def settings(broker, user):
    return mqtt.BrokerSettings(broker.url, username=user, password=ACCOUNTS[user], timeout=3.0)


def model(seed):
    rng = np.random.default_rng(seed)
    return {"w": (0.1 * rng.normal(size=(24, 16))).astype(np.float32),
            "b": (0.1 * rng.normal(size=24)).astype(np.float32)}


async def first_message(client, timeout):
    try:
        return await asyncio.wait_for(client.messages.__aiter__().__anext__(), timeout)
    except asyncio.TimeoutError:
        return None


def test_device_reads_only_its_own_model(broker, tmp_path):
    key = signing.SigningKey.generate()
    trusted = signing.TrustedKeys([key.public_raw])
    kws, vad = encode(model(1)), encode(model(2))

    async def scenario():
        publisher = mqtt.Publisher(settings(broker, "publisher"), "kws", sign=signing.envelope_signer(key),
                                   ext_bytes=signing.EXT_BYTES)
        status = await publisher.publish(kws, FULL)
        await mqtt.Publisher(settings(broker, "publisher"), "vad").publish(vad, FULL)

        # Its own model: received, signature checked on the first message.
        store = mqtt.ModelStore(tmp_path / "kws", "kws", threads=1)
        rx = mqtt.Receiver(store, verify=signing.envelope_verifier(trusted, lambda: None))
        stop = asyncio.Event()
        rx.on_current = stop.set
        await asyncio.wait_for(mqtt.run_receiver(settings(broker, "kws-device-01"), rx, stop, tick=0.1), WAIT)
        assert store.version == (status.seq, status.digest)
        got = modelio.load(store.path)
        for name, array in nnc_edge.decode(kws).items():
            assert np.array_equal(got[name].view(np.uint8), array.view(np.uint8))

        # Another model: the subscription is refused and nothing of it arrives.
        other = mqtt.ModelStore(tmp_path / "vad", "vad", threads=1)
        rx = mqtt.Receiver(other)
        stop = asyncio.Event()
        task = asyncio.ensure_future(mqtt.run_receiver(settings(broker, "kws-device-01"), rx, stop, tick=0.1))
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.wait_for(task, WAIT)
        assert rx.status is None and other.version is None and not os.path.exists(other.path)
        async with settings(broker, "kws-device-01").client("probe") as client:
            # mosquitto 2.0 acknowledges the subscription but checks read access on every message.
            await client.subscribe("nnc/vad/#", qos=1)
            assert await first_message(client, 1.0) is None
            await client.subscribe("nnc/kws/status", qos=1)
            assert (await first_message(client, WAIT)).topic.value == "nnc/kws/status"

            # Its own model's status: readable, but a retained message it sends is dropped.
            await client.publish("nnc/kws/status", b'{"v": 1, "model": "kws", "seq": 0}', qos=1, retain=True)
        async with settings(broker, "publisher").client("check") as client:
            assert (await mqtt.read_status(client, mqtt.topics("nnc", "kws"), "kws")).digest == status.digest

    asyncio.run(asyncio.wait_for(scenario(), 4 * WAIT))


def test_device_writes_only_its_own_report(broker, tmp_path):
    async def reports(model):
        return (await fleet.read_fleet(settings(broker, "publisher"), "nnc", model, quiet=0.3)).devices

    async def scenario():
        status = await mqtt.Publisher(settings(broker, "publisher"), "kws").publish(encode(model(3)), FULL)
        store = mqtt.ModelStore(tmp_path / "kws", "kws", threads=1)
        rx = mqtt.Receiver(store, device_id="kws-device-01")
        stop = asyncio.Event()
        rx.on_current = stop.set
        await asyncio.wait_for(mqtt.run_receiver(settings(broker, "kws-device-01"), rx, stop, tick=0.1), WAIT)
        own = (await reports("kws"))["kws-device-01"]
        assert own["state"] == "current" and own["seq"] == status.seq

        forged = report.report_payload("kws-device-02", "failed", error="forged")
        async with settings(broker, "kws-device-01").client("probe") as client:
            await client.publish(report.report_topic("nnc", "kws", "kws-device-02"), forged, qos=1, retain=True)
            await client.publish(report.report_topic("nnc", "vad", "kws-device-01"), forged, qos=1, retain=True)
        assert list(await reports("kws")) == ["kws-device-01"]
        assert await reports("vad") == {}

    asyncio.run(asyncio.wait_for(scenario(), 4 * WAIT))

    # Killed, the device's last will reaches its report topic through the ACL.
    env = dict(os.environ, NNC_EDGE_MQTT_PASSWORD=ACCOUNTS["vad-device-01"])
    proc = subprocess.Popen([sys.executable, "-m", "nnc_edge", "receive", "--broker", broker.url, "-u", "vad-device-01",
                             "--model", "vad", "--out", str(tmp_path / "vad"), "--id", "vad-device-01"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        async def state():
            return (await reports("vad")).get("vad-device-01", {}).get("state")

        async def until(wanted):
            for _ in range(int(WAIT / 0.3)):
                if await state() == wanted:
                    return
            raise AssertionError("vad-device-01 never reported %s" % wanted)
        asyncio.run(until("current"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        asyncio.run(until("offline"))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(WAIT)
        proc.stderr.close()


def test_the_documented_acl_is_the_tested_one():
    with open(os.path.join(REPO, "docs", "mosquitto-acl.md")) as f:
        doc = f.read()
    with open(ACL) as f:
        acl = f.read()
    # Every rule the document shows is in the file the test runs with.
    rules = [line for line in acl.splitlines() if line.startswith(("user ", "topic "))]
    shown = [line for line in doc.splitlines() if line.startswith(("user ", "topic "))]
    assert "topic write nnc/kws/devices/kws-device-01" in shown
    assert shown and set(shown) <= set(rules)
