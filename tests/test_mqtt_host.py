"""The publisher and the device service through a real mosquitto (issue #16): hostile retained
messages, the host's own record of the chain (transports/chain_record.py: no repeated or wrong-base
update, no version number going backwards when the broker loses its store), and a publisher that
fails at once when the broker drops it."""

import asyncio
import json
import logging
import os
import signal
import socket

import pytest

from nnc_edge import cli
from nnc_edge.updates import encode_update
from transports import chain_record, envelope, mqtt
from transports.envelope import FULL, UPDATE

from mqtt_broker import Mosquitto
from test_mqtt import pytestmark  # noqa: F401 (skipped without mosquitto, as test_mqtt.py)
from test_mqtt import WAIT, Device, assert_model, cached_chain, retained_topics, run, settings_for


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


async def broker_status(settings, model):
    async with settings.client("probe") as client:
        return await mqtt.read_status(client, mqtt.topics("nnc", model), model)


def _publisher(settings, model, state_dir, **kw):
    record = chain_record.ChainRecord(state_dir, "nnc", model)
    return mqtt.Publisher(settings, model, max_message_bytes=1024, record=record, **kw)


# --- finding 1, with a broker: retained hostile messages do not end the service ------------------
def test_hostile_retained_messages_do_not_end_the_service(broker, tmp_path, caplog):
    steps = cached_chain(1, seed=11)
    settings = settings_for(broker)
    topics = mqtt.topics("nnc", "hostile")

    async def retain(topic, payload):
        async with settings.client("attacker") as client:
            await client.publish(topic, payload, qos=1, retain=True)

    async def scenario():
        await retain(topics.status, b"[" * 60000)
        for seq in (1, 2):
            await retain("nnc/hostile/seq/%d/\u00b2" % seq, b"NM" + bytes(200))
        device = Device(settings, tmp_path / "dev", "hostile")
        await device.until(lambda: any("nests deeper" in e for e in device.rx.events), "the status refused")
        await retain(topics.status, envelope.Status("hostile").payload())  # nothing published yet
        await device.until(lambda: device.rx.subscribed == topics.publication(1), "subscribed to version 1")
        status = await mqtt.Publisher(settings, "hostile").publish(steps[0][1])
        await device.at(status)  # after the retained message on .../seq/1/\u00b2
        await device.close()
        device = Device(settings, tmp_path / "dev", "hostile")  # restarted: .../seq/2/\u00b2 comes first
        await device.until(lambda: device.rx.subscribed == topics.publication(2), "subscribed to version 2")
        status = await mqtt.Publisher(settings, "hostile").publish(steps[1][1], UPDATE)
        await device.at(status)
        assert_model(device.store.path, steps[1][2])
        await device.close()
    with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"):
        run(scenario())


# --- finding 4: the publisher refuses an update that does not continue its chain ------------------
def test_publisher_refuses_an_update_that_does_not_continue_the_chain(broker, tmp_path, capsys):
    steps = cached_chain(2, seed=12)
    other = cached_chain(1, seed=13)
    settings = settings_for(broker)
    state = tmp_path / "host"
    paths = {}
    for name, data in [("full", steps[0][1]), ("u2", steps[1][1]), ("u3", steps[2][1]), ("other", other[1][1])]:
        paths[name] = str(tmp_path / (name + ".nnc"))
        with open(paths[name], "wb") as f:
            f.write(data)

    def publish(name, *extra):
        return cli.main(["publish", paths[name], "--broker", broker.url, "--model", "chain4", "--state-dir",
                         str(state)] + list(extra))

    async def scenario():
        device = Device(settings, tmp_path / "dev", "chain4")
        assert await asyncio.to_thread(publish, "full") == 0
        assert await asyncio.to_thread(publish, "u2") == 0
        capsys.readouterr()
        # The same update a second time: devices rolled back to the full model.
        assert await asyncio.to_thread(publish, "u2") == 2
        assert "this update was published already, as version 2" in capsys.readouterr().err
        # An update of another model.
        assert await asyncio.to_thread(publish, "other") == 2
        assert "applies to a model this host has not published" in capsys.readouterr().err
        assert await asyncio.to_thread(publish, "u3") == 0
        status = await broker_status(settings, "chain4")
        await device.at(status)
        assert_model(device.store.path, steps[2][2])
        assert [a[:2] for a in device.rx.applied] == [(1, FULL), (2, UPDATE), (3, UPDATE)]
        await device.close()
        # An update made again from the model of version 2 (other bytes, the same record).
        publisher = _publisher(settings, "chain4", state)
        with pytest.raises(mqtt.PublishError, match="applies to the model of version 2 .*, not to the model of the "
                                                    "current version 3"):
            await publisher.publish(encode_update(steps[1][2], steps[2][2], qp=-30), UPDATE)
        with pytest.raises(mqtt.PublishError, match="published already, as version 3"):
            await publisher.publish(steps[2][1], UPDATE)
    run(scenario())


# --- finding 6: the host's record outlives the broker's store ---------------------------------------
def test_versions_never_go_backwards_after_the_broker_loses_its_store(tmp_path, caplog):
    steps = cached_chain(2, seed=14)
    fresh = cached_chain(0, seed=15)
    broker = Mosquitto(tmp_path / "mosquitto", persistence=False).start()
    state = tmp_path / "host"
    try:
        settings = settings_for(broker)

        async def scenario():
            device = Device(settings, tmp_path / "dev", "volatile6")
            for kind, data, _ in steps[:2]:
                status = await _publisher(settings, "volatile6", state).publish(data, kind)
            await device.at(status)
            await device.close()
            await asyncio.to_thread(broker.kill)  # the retained chain is gone
            await asyncio.to_thread(broker.start)
            device = Device(settings, tmp_path / "dev", "volatile6")
            status = await _publisher(settings, "volatile6", state).publish(steps[2][1], UPDATE)
            assert (status.seq, status.full_seq) == (3, 1)
            await device.at(status)
            assert_model(device.store.path, steps[2][2])
            await device.close()
            # A new device catches up through the chain published again.
            newcomer = Device(settings, tmp_path / "new", "volatile6")
            await newcomer.at(status)
            assert [a[:2] for a in newcomer.rx.applied] == [(1, FULL), (2, UPDATE), (3, UPDATE)]
            await newcomer.close()
            assert await retained_topics(settings, "nnc/volatile6") == sorted(
                ["nnc/volatile6/status"] + ["nnc/volatile6/seq/%d/%d" % (s, i) for s, c in status.chain()
                                            for i in range(c)])
            # Lost again: a full model is numbered after the record, and an explicit lower number refused.
            await asyncio.to_thread(broker.kill)
            await asyncio.to_thread(broker.start)
            with pytest.raises(mqtt.PublishError, match="seq 3 is not newer than the published version 3"):
                await _publisher(settings, "volatile6", state).publish(fresh[0][1], FULL, seq=3)
            status = await _publisher(settings, "volatile6", state).publish(fresh[0][1], FULL)
            assert (status.seq, status.full_seq) == (4, 4)
            return status
        with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
            status = run(scenario())
        assert "the broker has lost versions 1 .. 2: publishing versions 1 .. 2 again" in caplog.text
        names = sorted(os.listdir(state))
        assert names == ["nnc.volatile6.%s.nnc" % envelope.digest_hex(status.digest), "nnc.volatile6.json",
                         "nnc.volatile6.lock"]
        with open(state / "nnc.volatile6.json") as f:
            assert json.load(f)["seq"] == 4
    finally:
        broker.stop()


def test_a_publication_whose_record_was_not_written_is_taken_from_the_broker(broker, tmp_path, monkeypatch, caplog):
    steps = cached_chain(2, seed=16)
    settings = settings_for(broker)
    state = tmp_path / "host"

    async def scenario():
        await _publisher(settings, "crash6", state).publish(steps[0][1], FULL)
        # The host dies after the broker took update 2, before its record said so.
        monkeypatch.setattr(chain_record.ChainRecord, "add", lambda self, version: None)
        await _publisher(settings, "crash6", state).publish(steps[1][1], UPDATE)
        monkeypatch.undo()
        record = chain_record.ChainRecord(state, "nnc", "crash6").load()
        assert record.seq == 1
        publisher = _publisher(settings, "crash6", state)
        with pytest.raises(mqtt.PublishError, match="published already, as version 2"):
            await publisher.publish(steps[1][1], UPDATE)
        status = await publisher.publish(steps[2][1], UPDATE)
        assert status.seq == 3 and record.load().seq == 3
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        run(scenario())
    assert "newer than this host's record" in caplog.text and "cannot be checked" not in caplog.text


def test_the_record_is_replaced_atomically(tmp_path, monkeypatch):
    record = chain_record.ChainRecord(tmp_path, "nnc/x", "..")
    assert os.path.dirname(record.path) == str(tmp_path) and os.path.basename(record.path) == "nnc%2Fx.%2E%2E.json"
    record.add(chain_record.Version(1, FULL, bytes(32), None, 3))
    with open(record.path, "rb") as f:
        before = f.read()

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        record.add(chain_record.Version(2, UPDATE, bytes(31) + b"\x01", None, 1))
    monkeypatch.undo()
    with open(record.path, "rb") as f:
        assert f.read() == before
    assert os.listdir(tmp_path) == [os.path.basename(record.path)]  # no temporary file left
    assert chain_record.ChainRecord(tmp_path, "nnc/x", "..").load().seq == 1
    with open(record.path, "w") as f:
        f.write('{"v": 1, "prefix": "nnc/x", "model": "..", "versions": [{"seq": 1, "kind": "update"}]}')
    with pytest.raises(chain_record.RecordError, match="cannot be read .*move it away"):
        record.load()


def test_one_publisher_per_model_and_state_directory(tmp_path):
    record = chain_record.ChainRecord(tmp_path, "nnc", "locked")
    with record.locked():
        with pytest.raises(chain_record.RecordError, match="another publisher of model locked is running"):
            with chain_record.ChainRecord(tmp_path, "nnc", "locked").locked():
                pass
    with chain_record.ChainRecord(tmp_path, "nnc", "locked").locked():
        pass


# --- finding 7: a lost connection fails the publication at once -----------------------------------
class DroppedPublisher(mqtt.Publisher):
    """The broker stops answering with message ``at`` in flight, then dies."""

    def __init__(self, *args, broker, at, **kw):
        mqtt.Publisher.__init__(self, *args, window=4, **kw)
        self.broker = broker
        self.at = at
        self.sent = 0

    async def _put(self, client, topic, payload):
        if "/seq/" in topic:
            self.sent += 1
            if self.sent == self.at:
                os.kill(self.broker.proc.pid, signal.SIGSTOP)  # no acknowledgement will come
                put = asyncio.ensure_future(mqtt.Publisher._put(self, client, topic, payload))
                await asyncio.sleep(0.05)
                self.broker.kill()
                return await put
        await mqtt.Publisher._put(self, client, topic, payload)


def test_a_publication_fails_at_once_when_the_broker_drops(tmp_path):
    """aiomqtt waits for the acknowledgement (here 1000 s), not for the disconnect."""
    steps = cached_chain(0, seed=17)
    broker = Mosquitto(tmp_path / "mosquitto", persistence=False).start()
    try:
        publisher = DroppedPublisher(mqtt.BrokerSettings(broker.url, timeout=1000.0), "dropped",
                                     max_message_bytes=1024, retries=0, broker=broker, at=5)

        async def scenario():
            with pytest.raises(Exception) as info:
                await asyncio.wait_for(publisher.publish(steps[0][1]), WAIT)
            assert mqtt.is_mqtt_error(info.value) and "connection to the broker was lost" in str(info.value)
        run(scenario())
    finally:
        broker.stop()


class RacingPublisher(mqtt.Publisher):
    """paho closes a socket that aiomqtt has just asked the event loop to watch (the race of a lost
    connection), once, in the middle of the publication."""

    async def _put(self, client, topic, payload):
        if topic.endswith("/seq/1/2"):
            sock = socket.socket()
            client._on_socket_register_write(client._client, None, sock)
            sock.close()
        await mqtt.Publisher._put(self, client, topic, payload)


def test_no_stray_asyncio_traceback_from_a_closed_socket(broker, caplog):
    steps = cached_chain(0, seed=18)
    publisher = RacingPublisher(settings_for(broker), "racing", max_message_bytes=1024)
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        status = run(publisher.publish(steps[0][1]))
    assert status.seq >= 1 and status.counts[0] > 3
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR], caplog.text
