"""MQTT delivery through a real broker: mosquitto on a free loopback port (tests/mqtt_broker.py),
started by the tests, with password authentication and with TLS from a CA made in the test.

Every scenario ends with the device's model file equal, bit for bit, to the host's view of the model
(or, when an update cannot be completed, with the previous model file untouched) and the reason in
the log. Waits are bounded (``WAIT`` seconds for anything to happen)."""

import asyncio
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import nnc_edge
from nnc_edge import cli, modelio
from nnc_edge.encoder.encoding import encode
from nnc_edge.updates import ChainState, encode_update, model_digest
from transports import envelope, mqtt
from transports.envelope import FULL, UPDATE

from mqtt_broker import Mosquitto, mosquitto_binary

WAIT = 20.0
pytestmark = pytest.mark.skipif(mosquitto_binary() is None and os.environ.get("CI") != "true",
                                reason="mosquitto is not installed (apt-get install mosquitto)")


# --- the host's models ----------------------------------------------------------------------------
def chain(updates, seed=0):
    """[(kind, bitstream, host's view of the device model after it)]: a full model, then updates."""
    rng = np.random.default_rng(seed)
    model = {"enc.weight": (0.1 * rng.normal(size=(160, 96))).astype(np.float32),
             "enc.bias": (0.1 * rng.normal(size=160)).astype(np.float32),
             "head.weight": (0.1 * rng.normal(size=(12, 160))).astype(np.float32)}
    data = encode(model)
    view = nnc_edge.decode(data)
    steps = [(FULL, data, view)]
    state = ChainState(model_digest(view))
    for _ in range(updates):
        model = {k: (v + 0.003 * rng.normal(size=v.shape)).astype(np.float32) for k, v in model.items()}
        data, view = encode_update(view, model, residual=state, return_model=True)
        steps.append((UPDATE, data, view))
    return steps


_CHAINS = {}


def cached_chain(updates, seed=0):
    if (updates, seed) not in _CHAINS:
        _CHAINS[updates, seed] = chain(updates, seed)
    return _CHAINS[updates, seed]


def assert_model(path, view):
    got = modelio.load(path)
    assert list(got) == list(view)
    for name, want in view.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert np.array_equal(got[name].view(np.uint8), want.view(np.uint8)), name


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# --- broker and device harness ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


class Device:
    """A receiver task with its model directory, connected through run_receiver."""

    def __init__(self, settings, directory, model, gap_timeout=2.0, **kw):
        self.store = mqtt.ModelStore(directory, model, threads=1)
        self.rx = mqtt.Receiver(self.store, gap_timeout=gap_timeout, **kw)
        self.stop = asyncio.Event()
        self.task = asyncio.ensure_future(mqtt.run_receiver(settings, self.rx, self.stop, backoff=(0.1, 0.5), tick=0.1))

    async def until(self, check, what):
        for _ in range(int(WAIT / 0.02)):
            if check():
                return
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.02)
        raise AssertionError("device: %s not reached in %g s; events: %s" % (what, WAIT, self.rx.events))

    async def at(self, status):
        await self.until(lambda: self.store.version == (status.seq, status.digest), "version %d" % status.seq)

    async def close(self):
        self.stop.set()
        await asyncio.wait_for(self.task, WAIT)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 4 * WAIT))


def settings_for(broker, **kw):
    return mqtt.BrokerSettings(broker.url, timeout=3.0, **kw)


async def retained_messages(settings, topic_filter):
    """(topic, payload) of every retained message the broker holds under ``topic_filter``: read until
    a marker published after subscribing comes back."""
    found = []
    async with settings.client("probe") as client:
        marker = "probe/%d" % os.getpid()
        await client.subscribe(topic_filter, qos=1)
        await client.subscribe(marker, qos=1)
        await client.publish(marker, b"x", qos=1)
        messages = client.messages.__aiter__()
        while True:
            message = await asyncio.wait_for(messages.__anext__(), WAIT)
            if message.topic.value == marker:
                return found
            if message.retain and message.payload:
                found.append((message.topic.value, bytes(message.payload)))


async def retained_topics(settings, prefix):
    """The topics under prefix the broker holds a retained message for."""
    return sorted(topic for topic, _ in await retained_messages(settings, prefix + "/#"))


# --- scenarios ------------------------------------------------------------------------------------
def test_full_model_and_update_chain(broker, tmp_path):
    steps = cached_chain(3)
    settings = settings_for(broker)

    async def scenario():
        device = Device(settings, tmp_path / "dev", "chain")
        publisher = mqtt.Publisher(settings, "chain", max_message_bytes=4096)
        for kind, data, view in steps:
            status = await publisher.publish(data, kind)
            await device.at(status)
            assert_model(device.store.path, view)
        await device.close()
        assert [a[:2] for a in device.rx.applied] == [(1, FULL), (2, UPDATE), (3, UPDATE), (4, UPDATE)]
        assert status.counts[0] == len(mqtt.split_bitstream(steps[0][1], 4096 - envelope.header_bytes("chain")))
        assert await retained_topics(settings, "nnc/chain") == sorted(
            ["nnc/chain/status"] + ["nnc/chain/seq/%d/%d" % (s, i) for s, c in status.chain() for i in range(c)])
        assert modelio.load_metadata(device.store.path)["nnc_edge.seq"] == "4"
    run(scenario())


def test_duplicated_and_reordered_messages(broker, tmp_path, caplog):
    """Messages sent by hand while the device listens: every one twice, in shuffled order (the
    broker's retained copy would hide both); each is applied once."""
    steps = cached_chain(1)
    settings = settings_for(broker)
    topics = mqtt.topics("nnc", "shuffle")

    async def scenario():
        device = Device(settings, tmp_path / "dev", "shuffle")
        version = (0, envelope.NO_DIGEST)
        counts = []
        status = envelope.Status("shuffle")
        async with settings.client("raw") as client:
            for seq, (kind, data, view) in enumerate(steps, 1):
                bodies = mqtt.split_bitstream(data, 1024 - envelope.header_bytes("shuffle"))
                parent = version if kind == UPDATE else (0, envelope.NO_DIGEST)
                digest, payloads = envelope.messages("shuffle", kind, seq, bodies, *parent)
                pending = envelope.Status("shuffle", status.seq, status.digest, status.full_seq, counts,
                                          (seq, digest, len(payloads)))
                await client.publish(topics.status, pending.payload(), qos=1, retain=True)
                await device.until(lambda: device.rx.subscribed == topics.publication(seq), "subscribed")
                order = list(range(len(payloads))) * 2
                np.random.default_rng(seq).shuffle(order)
                for i in order:
                    await client.publish(topics.data(seq, i), payloads[i], qos=1, retain=True)
                version = (seq, digest)
                counts.append(len(payloads))
                status = envelope.Status("shuffle", seq, digest, 1, counts)
                await client.publish(topics.status, status.payload(), qos=1, retain=True)
                await device.at(status)
                assert_model(device.store.path, view)
        await device.close()
        assert [a[:2] for a in device.rx.applied] == [(1, FULL), (2, UPDATE)]
    with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"):
        run(scenario())
    assert "duplicates dropped" in caplog.text


class GatedPublisher(mqtt.Publisher):
    """Stops before the data message number ``after`` (counting from 0) until ``gate`` is set."""

    def __init__(self, *args, after=None, **kw):
        mqtt.Publisher.__init__(self, *args, window=1, **kw)
        self.after = after
        self.sent = 0
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def _put(self, client, topic, payload):
        if "/seq/" in topic and payload and self.after is not None:
            if self.sent == self.after:
                self.waiting.set()
                await self.gate.wait()
            self.sent += 1
        await mqtt.Publisher._put(self, client, topic, payload)


def test_broker_killed_and_restarted_mid_update(tmp_path, caplog):
    steps = cached_chain(1)
    broker = Mosquitto(tmp_path / "mosquitto").start()
    try:
        settings = settings_for(broker)

        async def scenario():
            device = Device(settings, tmp_path / "dev", "restart")
            publisher = mqtt.Publisher(settings, "restart", max_message_bytes=512)
            status = await publisher.publish(steps[0][1], FULL)
            await device.at(status)
            await asyncio.to_thread(broker.stop)  # a clean restart: the full model is saved
            await asyncio.to_thread(broker.start)
            gated = GatedPublisher(settings, "restart", max_message_bytes=512, after=3, backoff=(0.1, 0.5))
            publishing = asyncio.ensure_future(gated.publish(steps[1][1], UPDATE))
            await asyncio.wait_for(gated.waiting.wait(), WAIT)
            await device.until(lambda: device.rx.assembly is not None and device.rx.assembly.next == 3,
                               "3 messages of the update")
            await asyncio.to_thread(broker.kill)  # mid-update, without a goodbye
            await device.until(lambda: any("reconnecting" in r.message for r in caplog.records), "a lost connection")
            assert device.store.version == (status.seq, status.digest)  # nothing half-applied
            assert_model(device.store.path, steps[0][2])
            await asyncio.to_thread(broker.start)
            gated.gate.set()
            status = await asyncio.wait_for(publishing, WAIT)
            await device.at(status)
            assert_model(device.store.path, steps[1][2])
            await device.close()
            assert [a[:2] for a in device.rx.applied] == [(1, FULL), (2, UPDATE)]
        with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"):
            run(scenario())
        assert "retrying" in caplog.text  # the publisher reconnected and published again
    finally:
        broker.stop()


def test_broker_without_persistence_killed_mid_full_model(tmp_path, caplog):
    """The broker forgets everything: a full model is published again from scratch, an update is refused."""
    steps = cached_chain(1, seed=5)
    other = cached_chain(0, seed=6)
    broker = Mosquitto(tmp_path / "mosquitto", persistence=False).start()
    try:
        settings = settings_for(broker)

        async def scenario():
            device = Device(settings, tmp_path / "dev", "volatile")
            status = await mqtt.Publisher(settings, "volatile", max_message_bytes=512).publish(steps[0][1])
            await device.at(status)
            gated = GatedPublisher(settings, "volatile", max_message_bytes=512, after=5, backoff=(0.1, 0.5))
            publishing = asyncio.ensure_future(gated.publish(other[0][1], FULL))
            await asyncio.wait_for(gated.waiting.wait(), WAIT)
            await asyncio.to_thread(broker.kill)
            await asyncio.to_thread(broker.start)
            gated.gate.set()
            status = await asyncio.wait_for(publishing, WAIT)
            assert (status.seq, status.full_seq, status.counts) == (2, 2, [status.counts[0]])
            await device.at(status)
            assert_model(device.store.path, other[0][2])
            await device.close()
            await asyncio.to_thread(broker.kill)
            await asyncio.to_thread(broker.start)
            with pytest.raises(mqtt.PublishError, match="no published version"):
                await mqtt.Publisher(settings, "volatile").publish(steps[1][1], UPDATE)
        with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"):
            run(scenario())
    finally:
        broker.stop()


def test_receiver_offline_catches_up(broker, tmp_path, caplog):
    steps = cached_chain(3, seed=1)
    settings = settings_for(broker)

    async def scenario():
        publisher = mqtt.Publisher(settings, "offline", max_message_bytes=2048)
        device = Device(settings, tmp_path / "dev", "offline")
        status = await publisher.publish(steps[0][1], FULL)
        await device.at(status)
        await device.close()
        for kind, data, _ in steps[1:3]:  # two updates while the device is off
            status = await publisher.publish(data, kind)
        device = Device(settings, tmp_path / "dev", "offline")
        await device.at(status)
        assert_model(device.store.path, steps[2][2])
        assert [a[:2] for a in device.rx.applied] == [(2, UPDATE), (3, UPDATE)]
        await device.close()
        # Off again while a new full model and an update after it are published: the device's
        # version is no longer on the chain, so it fetches the full model, then the update.
        other = cached_chain(1, seed=2)
        for kind, data, _ in other:
            status = await publisher.publish(data, kind)
        device = Device(settings, tmp_path / "dev", "offline")
        await device.at(status)
        assert_model(device.store.path, other[1][2])
        assert [a[:2] for a in device.rx.applied] == [(4, FULL), (5, UPDATE)]
        await device.close()
        # The chain before the new full model is gone from the broker.
        assert await retained_topics(settings, "nnc/offline") == sorted(
            ["nnc/offline/status"] + ["nnc/offline/seq/%d/%d" % (s, i) for s, c in status.chain() for i in range(c)])
    with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"):
        run(scenario())
    assert "version 4 is a full model published after the device's version 3" in caplog.text
    assert "is not on the published chain" not in caplog.text  # routine: not a warning


def test_truncated_update_is_abandoned_then_completed(broker, tmp_path, caplog):
    steps = cached_chain(1, seed=3)
    settings = settings_for(broker)

    async def scenario():
        device = Device(settings, tmp_path / "dev", "truncated", gap_timeout=0.5)
        status = await mqtt.Publisher(settings, "truncated", max_message_bytes=400).publish(steps[0][1], FULL)
        await device.at(status)
        before = file_bytes(device.store.path)
        dying = GatedPublisher(settings, "truncated", max_message_bytes=400, after=2)
        publishing = asyncio.ensure_future(dying.publish(steps[1][1], UPDATE))
        await asyncio.wait_for(dying.waiting.wait(), WAIT)
        publishing.cancel()  # the publisher dies after 2 of its messages
        await asyncio.gather(publishing, return_exceptions=True)
        await device.until(lambda: any("abandoned" in e for e in device.rx.events), "the update abandoned")
        assert device.store.version == (status.seq, status.digest)
        assert file_bytes(device.store.path) == before
        assert sorted(os.listdir(device.store.directory)) == ["model.safetensors"]
        # Publishing the same update again completes it.
        status = await mqtt.Publisher(settings, "truncated", max_message_bytes=400).publish(steps[1][1], UPDATE)
        await device.at(status)
        assert_model(device.store.path, steps[1][2])
        await device.close()
    with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"):
        run(scenario())
    assert "asking the broker for them again" in caplog.text
    assert "messages 2-" in caplog.text and "the model stays at version 1" in caplog.text


def test_password_authentication(tmp_path):
    steps = cached_chain(0)
    with Mosquitto(tmp_path / "mosquitto", auth=("nnc-host", "s3cret pw")) as broker:
        async def scenario():
            wrong = mqtt.Publisher(settings_for(broker, username="nnc-host", password="wrong"), "auth", retries=0)
            with pytest.raises(Exception) as info:
                await wrong.publish(steps[0][1])
            assert mqtt.is_mqtt_error(info.value) and "authori" in str(info.value).lower()
            settings = settings_for(broker, username="nnc-host", password="s3cret pw")
            device = Device(settings, tmp_path / "dev", "auth")
            status = await mqtt.Publisher(settings, "auth").publish(steps[0][1])
            await device.at(status)
            assert_model(device.store.path, steps[0][2])
            await device.close()
        run(scenario())


def test_tls_with_a_test_ca(tmp_path):
    steps = cached_chain(0)
    with Mosquitto(tmp_path / "mosquitto", tls=True) as broker:
        assert broker.url.startswith("mqtts://127.0.0.1:")

        async def scenario():
            untrusted = mqtt.Publisher(settings_for(broker), "tls", retries=0)  # the system's CAs only
            with pytest.raises(Exception) as info:
                await untrusted.publish(steps[0][1])
            assert mqtt.is_mqtt_error(info.value) and "certificate" in str(info.value).lower()
            settings = settings_for(broker, cafile=broker.cafile)
            device = Device(settings, tmp_path / "dev", "tls")
            status = await mqtt.Publisher(settings, "tls").publish(steps[0][1])
            await device.at(status)
            assert_model(device.store.path, steps[0][2])
            await device.close()
        run(scenario())


# --- the command line -----------------------------------------------------------------------------
def test_publish_and_receive_commands(broker, tmp_path, capsys):
    steps = cached_chain(1, seed=4)
    paths = []
    for i, (_, data, _) in enumerate(steps):
        paths.append(tmp_path / ("step%d.nnc" % i))
        paths[-1].write_bytes(data)
    out = tmp_path / "device"
    host = ["--state-dir", str(tmp_path / "host")]
    assert cli.main(["publish", str(paths[0]), "--broker", broker.url, "--model", "cli",
                     "--max-message-bytes", "2048"] + host) == 0
    assert "full 1" in capsys.readouterr().out
    # An update: the bitstream has an update record.
    assert cli.main(["publish", str(paths[1]), "--broker", broker.url, "--model", "cli"] + host) == 0
    assert "update 2" in capsys.readouterr().out
    receive = [sys.executable, "-m", "nnc_edge", "receive", "--broker", broker.url, "--model", "cli", "--out", str(out),
               "--once", "--timeout", str(WAIT)]
    proc = subprocess.run(receive, capture_output=True, text=True, timeout=2 * WAIT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "applied full model 1" in proc.stderr and "applied update 2" in proc.stderr
    assert_model(out / "model.safetensors", steps[1][2])
    # Bad usage and a broker that refuses us.
    assert cli.main(["publish", str(paths[0]), "--broker", "mqtt://127.0.0.1:1", "--model", "cli",
                     "--retries", "0"] + host) == 1
    assert "broker mqtt://127.0.0.1:1" in capsys.readouterr().err
    assert cli.main(["publish", str(paths[0]), "--broker", broker.url, "--model", "a/b"] + host) == 2
    assert cli.main(["publish", str(paths[1]), "--broker", broker.url, "--model", "cli-new"] + host) == 2
    assert "publish a full model first" in capsys.readouterr().err


def test_demo_with_mosquitto(broker, capsys):
    assert cli.main(["demo", "--rounds", "3", "--broker", broker.url, "-q"]) == 0
    out = capsys.readouterr().out
    assert out.count("bit for bit") == 3 and "update 2" in out


def test_demo_with_its_own_broker(capsys):
    pytest.importorskip("amqtt")
    assert cli.main(["demo", "--rounds", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "embedded amqtt" in out and out.count("bit for bit") == 2


def test_publishing_a_model_file_encodes_it(tmp_path):
    # `nnc-edge publish model.safetensors` publishes the model's full bitstream, as `nnc-edge encode`
    # writes it.
    from nnc_edge.cli.mqtt import _publication
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7, "b": np.ones(3, dtype=np.float32)}
    path = str(tmp_path / "m.safetensors")
    modelio.save(path, tensors)
    data, kind = _publication(path, "auto")
    assert kind == "full" and bytes(data) == bytes(nnc_edge.encode(modelio.load(path)))
