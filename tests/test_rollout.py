"""Staged rollout and rollback on the host (issue #17) through a real mosquitto: ``publish --rollout`` reaching
exactly the devices the hash puts in the wave (nnc_device.agent devices, on CPython over paho-mqtt), widening
that keeps them, narrowing refused, ``--max-failures`` halting the wave (devices simulated by their retained
reports) after which devices wait, and ``nnc-edge rollback --to`` a full and an update version (the bitstream,
the status, the record, signatures, a device that downloads the restored version)."""

import asyncio
import json
import logging
import os
import queue
import threading
import time

import pytest

import nnc_edge
from nnc_device.agent import Agent
from nnc_edge import cli, signing
from nnc_edge.updates import encode_update, model_digest
from transports import envelope, report
from transports.chain_record import ChainRecord
from transports.envelope import FULL, UPDATE
from transports.mqtt import Publisher, fleet, read_status, rollout, topics
from transports.mqtt.rollout import RolloutError, widen_wave

from mqtt_broker import LOOPBACK, Mosquitto
from test_mqtt import pytestmark  # noqa: F401 (skipped without mosquitto, as test_mqtt.py)
from test_mqtt import WAIT, Device, assert_model, cached_chain, retained_messages, retained_topics, run, settings_for


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


# --- devices: nnc_device.agent on paho-mqtt --------------------------------------------------------
class PahoClient:
    """micropython-lib umqtt.simple's MQTTClient API on paho-mqtt, so that nnc_device.agent runs on CPython
    against mosquitto: messages arrive on paho's thread and are handed to the agent one per check_msg()."""

    def __init__(self, client_id, port):
        import paho.mqtt.client as paho
        self.port = port
        self.keepalive = 0  # paho keeps the connection alive itself
        self.inbox = queue.Queue()
        self.cb = None
        self.paho = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        self.paho.on_message = lambda client, userdata, m: self.inbox.put((m.topic.encode(), m.payload))

    def set_callback(self, f):
        self.cb = f

    def set_last_will(self, topic, msg, retain=False, qos=0):
        self.paho.will_set(_text(topic), msg, qos, retain)

    def connect(self, clean_session=True):
        self.paho.connect(LOOPBACK, self.port, 60)
        self.paho.loop_start()

    def subscribe(self, topic, qos=0):
        self.paho.subscribe(_text(topic), qos)

    def publish(self, topic, msg, retain=False, qos=0):
        self.paho.publish(_text(topic), bytes(msg), qos, retain)

    def check_msg(self):
        try:
            topic, payload = self.inbox.get_nowait()
        except queue.Empty:
            return
        self.cb(topic, payload)

    def ping(self):
        pass

    def disconnect(self):
        self.paho.disconnect()
        self.paho.loop_stop()


def _text(topic):
    return topic.decode() if isinstance(topic, bytes) else topic


class ThreadedDevice:
    """A device running ``work()`` in a thread of its own until close(), which re-raises what it raised."""

    def __init__(self):
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.work()
        except Exception as exc:  # noqa: BLE001 -- reported by close()
            self.error = exc

    def close(self):
        self.stop.set()
        self.thread.join(WAIT)
        self.closed()
        if self.error is not None:
            raise self.error

    def closed(self):
        pass


class AgentDevice(ThreadedDevice):
    """An nnc_device.agent device, reporting as ``device_id``."""

    def __init__(self, broker, directory, model, device_id, trusted_keys=None):
        os.makedirs(directory, exist_ok=True)
        self.client = PahoClient(report.client_id(device_id), broker.port)
        self.agent = Agent(self.client, model, str(directory), device_id, trusted_keys=trusted_keys,
                           gap_timeout=2.0, log=None)
        ThreadedDevice.__init__(self)

    def work(self):
        self.agent.start()
        while not self.stop.is_set():
            if not self.agent.step():
                time.sleep(0.01)

    def closed(self):
        self.client.disconnect()


class ReceiverDevice(ThreadedDevice):
    """``nnc-edge receive --id``'s receiver (transports.mqtt) with an event loop of its own."""

    def __init__(self, broker, directory, model, device_id):
        from transports import mqtt
        self.store = mqtt.ModelStore(directory, model, threads=1)
        self.rx = mqtt.Receiver(self.store, gap_timeout=2.0, device_id=device_id)
        self.settings = settings_for(broker)
        ThreadedDevice.__init__(self)

    def work(self):
        asyncio.run(self._main())

    async def _main(self):
        from transports import mqtt
        stop = asyncio.Event()
        task = asyncio.ensure_future(mqtt.run_receiver(self.settings, self.rx, stop, backoff=(0.1, 0.5), tick=0.1))
        while not self.stop.is_set() and not task.done():
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, WAIT)


DEVICE_KINDS = {"agent": AgentDevice, "receiver": ReceiverDevice}


def by_bucket(low, high, count):
    """``count`` device ids whose bucket is in low .. high - 1."""
    found = []
    i = 0
    while len(found) < count:
        d = "dev-%d" % i
        i += 1
        if low <= report.bucket(d) < high:
            found.append(d)
    return found


async def reports_until(settings, model, check, what):
    """The fleet once ``check(devices)`` holds (devices: id -> report)."""
    view = None
    for _ in range(int(WAIT / 0.3)):
        view = await fleet.read_fleet(settings, "nnc", model, quiet=0.3)
        if check(view.devices):
            return view.devices
    raise AssertionError("%s not reached: %s" % (what, view.devices if view else None))


async def current_status(settings, model):
    async with settings.client("probe") as client:
        return await read_status(client, topics("nnc", model), model)


def base_args(broker, model, state_dir):
    return ["--broker", broker.url, "--model", model, "--state-dir", str(state_dir)]


def write_chain(tmp_path, steps):
    paths = []
    for i, (_, data, _) in enumerate(steps):
        path = tmp_path / ("v%d.nnc" % (i + 1))
        path.write_bytes(data)
        paths.append(str(path))
    return paths


# --- the wave, without a broker ----------------------------------------------------------------------
def test_widen_wave_rules():
    wave = report.rollout_field(5, percent=34, devices=["a"])
    new, notes = widen_wave(wave, percent=50)
    assert new == {"from": 5, "percent": 50, "devices": ["a"]} and not notes
    assert widen_wave(wave, devices=["b", "a"])[0] == {"from": 5, "percent": 34, "devices": ["a", "b"]}
    with pytest.raises(RolloutError, match="only widens: it is at 34%"):
        widen_wave(wave, percent=20)
    with pytest.raises(RolloutError, match="leaves out a"):
        widen_wave(wave, devices=["b"])
    with pytest.raises(RolloutError, match="names no staged rollout"):
        widen_wave(None, percent=50)
    assert widen_wave(wave, percent=100)[0] is None
    assert widen_wave(wave, percent=100, keep=True)[0] == {"from": 5, "percent": 100, "devices": ["a"]}
    halted = report.rollout_field(5, percent=34, halted=True)
    new, notes = widen_wave(halted, percent=100)  # stays halted: not removed
    assert new == {"from": 5, "percent": 100, "halted": True} and "stays halted" in notes[0]
    new, notes = widen_wave(halted, resume=True)
    assert new == {"from": 5, "percent": 34} and "--resume lets it go on" in notes[0]


# --- staged rollout through mosquitto ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["agent", "receiver"])
def test_rollout_reaches_exactly_the_hashed_devices(broker, tmp_path, capsys, kind):
    model = "wave-" + kind
    steps = cached_chain(2, seed=31)
    paths = write_chain(tmp_path, steps)
    settings = settings_for(broker)
    state = tmp_path / "state"
    args = base_args(broker, model, state)
    inside = by_bucket(0, 3400, 2)
    later = by_bucket(3400, 6000, 1)  # taken in at 60%
    outside = later + by_bucket(6000, 10000, 2)
    ids = inside + outside
    assert cli.main(["publish", paths[0]] + args + ["-q"]) == 0
    devices = [DEVICE_KINDS[kind](broker, tmp_path / d, model, d) for d in ids]
    try:
        run(reports_until(settings, model, lambda got: all(got.get(d, {}).get("seq") == 1 for d in ids),
                          "v1 everywhere"))

        assert cli.main(["publish", paths[1]] + args + ["--rollout", "34"]) == 0
        assert "update 2" in capsys.readouterr().out
        status = run(current_status(settings, model))
        assert status.seq == 2 and status.rollout == {"from": 2, "percent": 34}
        assert ChainRecord(state, "nnc", model).load().rollout == {"from": 2, "percent": 34}

        def wave_reached(got, members, seq, waiting_seq):
            return all(got.get(d, {}).get("state") == "current" and got[d].get("seq") == seq for d in members) and \
                all(got.get(d, {}).get("state") == "waiting" and got[d].get("seq") == waiting_seq
                    for d in ids if d not in members)
        got = run(reports_until(settings, model, lambda got: wave_reached(got, inside, 2, 1), "the 34% wave"))
        assert sorted(d for d in ids if got[d]["seq"] == 2) == sorted(inside)
        capsys.readouterr()
        assert cli.main(["fleet", "--broker", broker.url, "--model", model]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "5 devices: 3 on v1, 2 on v2; 0 failed; 3 waiting"

        # The next version goes to the same wave (no --rollout: the wave carries on).
        assert cli.main(["publish", paths[2]] + args + ["-q"]) == 0
        assert run(current_status(settings, model)).rollout == {"from": 2, "percent": 34}
        run(reports_until(settings, model, lambda got: wave_reached(got, inside, 3, 1), "v3 in the 34% wave"))

        # Narrowing is refused, in percent and in devices.
        capsys.readouterr()
        assert cli.main(["rollout"] + args + ["--percent", "20"]) == 2
        assert "the wave only widens: it is at 34%" in capsys.readouterr().err
        listed = outside[2]
        assert cli.main(["rollout"] + args + ["--devices", listed]) == 0
        capsys.readouterr()
        assert cli.main(["rollout"] + args + ["--devices", outside[1]]) == 2
        assert "leaves out %s" % listed in capsys.readouterr().err
        members = inside + [listed]
        run(reports_until(settings, model, lambda got: wave_reached(got, members, 3, 1), "the listed device"))

        # Widening to 60% keeps every device that was in, and watches the wave to the end.
        assert cli.main(["rollout"] + args + ["--percent", "60", "--devices", listed, "--max-failures", "1",
                                              "--timeout", str(WAIT)]) == 0
        captured = capsys.readouterr()
        assert "versions 2 on to 60% and 1 device (was versions 2 on to 34% and 1 device)" in captured.out
        assert "of the wave current" in captured.out and "version 3:" in captured.err
        members = inside + later + [listed]
        assert [d for d in ids if d not in members] == [outside[1]]
        got = run(reports_until(settings, model, lambda got: wave_reached(got, members, 3, 1), "the 60% wave"))
        assert all(got[d]["seq"] == 3 for d in inside)

        # 100%: the wave is removed and every device takes the newest version.
        assert cli.main(["rollout"] + args + ["--percent", "100", "-q"]) == 0
        assert run(current_status(settings, model)).rollout is None
        run(reports_until(settings, model, lambda got: wave_reached(got, ids, 3, None), "every device"))
        assert cli.main(["rollout"] + args + ["--percent", "100"]) == 2
        assert "names no staged rollout" in capsys.readouterr().err
    finally:
        for device in devices:
            device.close()


def test_too_many_failures_halt_the_wave(broker, tmp_path, capsys):
    model = "halting"
    steps = cached_chain(2, seed=32)
    paths = write_chain(tmp_path, steps)
    settings = settings_for(broker)
    state = tmp_path / "state"
    args = base_args(broker, model, state)
    inside, outside = by_bucket(0, 5000, 3), by_bucket(5000, 10000, 1)
    assert cli.main(["publish", paths[0]] + args + ["-q"]) == 0
    digest1 = run(current_status(settings, model)).digest

    async def put(device_id, state_name, **kw):
        async with settings.client("sim") as client:
            await client.publish(report.report_topic("nnc", model, device_id),
                                 report.report_payload(device_id, state_name, **kw), qos=1, retain=True)

    async def scenario():
        for d in inside + outside:
            await put(d, "current", seq=1, digest=digest1)
        # An old failure (a version before the wave) does not count.
        await put(inside[2], "failed", seq=1, digest=digest1, target=1, error="an old failure")
        command = asyncio.ensure_future(asyncio.to_thread(
            cli.main, ["publish", paths[1]] + args + ["--rollout", "50", "--max-failures", "2", "--timeout",
                                                      str(WAIT)]))
        status = None
        for _ in range(int(WAIT / 0.1)):
            status = await current_status(settings, model)
            if status.seq == 2:
                break
            await asyncio.sleep(0.1)
        assert status.rollout == {"from": 2, "percent": 50}
        await asyncio.sleep(1.0)
        assert not command.done()
        await put(inside[0], "failed", seq=1, digest=digest1, target=2, error="No space left on device")
        await put(outside[0], "failed", seq=1, digest=digest1, target=2, error="outside: not counted")
        await asyncio.sleep(1.0)
        assert not command.done()
        await put(inside[1], "rolled-back", seq=1, digest=digest1, target=2, error="health check failed")
        return await asyncio.wait_for(command, WAIT)
    assert run(scenario()) == 1
    captured = capsys.readouterr()
    assert "failed: %s: failed at v1 (target 2): No space left on device" % inside[0] in captured.err
    assert "failed: %s: rolled-back at v1 (target 2): health check failed" % inside[1] in captured.err
    assert "2 devices of the wave failed (--max-failures 2): the rollout of versions 2 and later is halted" \
        in captured.err
    assert "outside: not counted" not in captured.err and "an old failure" not in captured.err
    assert "failed of at most 2" in captured.err  # progress lines
    status = run(current_status(settings, model))
    assert status.seq == 2 and status.rollout == {"from": 2, "percent": 50, "halted": True}
    assert ChainRecord(state, "nnc", model).load().rollout["halted"] is True
    assert cli.main(["fleet", "--broker", broker.url, "--model", model]) == 0
    assert "version 2 published (full model 1); versions 2 on to 50% (halted)" in capsys.readouterr().out

    # Real devices of the wave now wait at version 1 (before the wave: they take it).
    real = {"agent": inside[2], "receiver": by_bucket(0, 5000, 4)[3]}
    devices = [DEVICE_KINDS[kind](broker, tmp_path / kind, model, real[kind]) for kind in sorted(real)]
    try:
        got = run(reports_until(settings, model, lambda got: all(
            got.get(d, {}).get("seq") == 1 and got[d]["state"] == "waiting" for d in real.values()),
            "waiting devices at v1"))
        assert all(got[d]["target"] is None for d in real.values())
    finally:
        for device in devices:
            device.close()
    # Widening without --resume keeps the wave halted and says so; a new publication warns.
    assert cli.main(["rollout"] + args + ["--percent", "60"]) == 0
    assert "stays halted" in capsys.readouterr().out
    assert run(current_status(settings, model)).rollout == {"from": 2, "percent": 60, "halted": True}
    # Resumed and watched: the simulated devices never get there, so the watch times out.
    assert cli.main(["rollout"] + args + ["--resume", "--max-failures", "9", "--timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert "--resume lets it go on" in captured.out
    assert "after 2 s," in captured.err and "not current at version 2 or later" in captured.err
    assert inside[0] in captured.err
    assert run(current_status(settings, model)).rollout == {"from": 2, "percent": 60}
    # A new wave keeps the first version of the old one: outside it, version 2 stays out of reach.
    halt = ["rollout"] + args + ["--max-failures", "1", "--timeout", str(WAIT), "--percent", "60"]
    assert cli.main(halt) == 1
    assert run(current_status(settings, model)).rollout["halted"] is True
    capsys.readouterr()
    assert cli.main(["publish", paths[2]] + args + ["--rollout", "50"]) == 0
    assert run(current_status(settings, model)).rollout == {"from": 2, "percent": 50}
    # Without --rollout a halted wave carries on, and publish warns that the version reaches no device.
    assert cli.main(halt[:-2] + ["--percent", "50"]) == 1
    assert "the rollout of versions 2 and later is halted" in capsys.readouterr().err
    assert cli.main(["publish", paths[2]] + args + ["--kind", "full", "-q"]) == 0
    assert "version 4 reaches no device" in capsys.readouterr().err
    status = run(current_status(settings, model))
    assert status.seq == 4 and status.rollout == {"from": 2, "percent": 50, "halted": True}


def test_max_failures_needs_a_wave(broker, tmp_path, capsys):
    steps = cached_chain(0, seed=33)
    path = write_chain(tmp_path, steps)[0]
    assert cli.main(["publish", path] + base_args(broker, "nowave", tmp_path) + ["--max-failures", "1"]) == 2
    assert "--max-failures watches a staged rollout" in capsys.readouterr().err
    for bad in (["--rollout", "120"], ["--devices", "a/b"], ["--devices", ","]):
        with pytest.raises(SystemExit) as exit:  # argparse: usage errors
            cli.main(["publish", path] + base_args(broker, "nowave", tmp_path) + bad)
        assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "must be a percentage in 0 .. 100, not 120" in err and "the device id 'a/b' contains '/'" in err
    assert cli.main(["rollout"] + base_args(broker, "nowave", tmp_path)) == 2
    assert "give --percent, --devices or --resume" in capsys.readouterr().err


# --- rollback ----------------------------------------------------------------------------------------
async def publication(settings, model, seq):
    """(envelopes, bitstream) of the retained publication of version ``seq``."""
    found = {}
    for _, payload in await retained_messages(settings, "nnc/%s/seq/%d/+" % (model, seq)):
        env = envelope.parse(payload)
        found[env.index] = env
    envs = [found[i] for i in sorted(found)]
    assert envs and len(envs) == envs[0].count
    return envs, b"".join(bytes(e.body) for e in envs)


def test_rollback_to_an_update_and_to_a_full_version(broker, tmp_path, capsys):
    model = "rollback"
    steps = cached_chain(3, seed=34)
    paths = write_chain(tmp_path, steps)
    settings = settings_for(broker)
    state = tmp_path / "state"
    key = tmp_path / "publisher.key"
    assert cli.main(["keygen", "-o", str(key)]) == 0
    pub = str(key) + ".pub"
    args = base_args(broker, model, state)
    signed = ["--signing-key", str(key), "--max-message-bytes", "2048"]
    for path in paths[:3]:
        assert cli.main(["publish", path] + args + signed + ["-q"]) == 0
    assert cli.main(["publish", paths[3]] + args + signed + ["-q", "--rollout", "10"]) == 0
    record = ChainRecord(state, "nnc", model).load()
    digests = {v.seq: v.digest for v in record.versions}
    capsys.readouterr()

    # Errors: a version not older than the current one, one not in the record, no record at all.
    assert cli.main(["rollback"] + args + ["--to", "4"]) == 2
    assert "version 4 is the current version" in capsys.readouterr().err
    assert cli.main(["rollback"] + args + ["--to", "7"]) == 2
    assert "version 7 is not older than the current version 4" in capsys.readouterr().err
    assert cli.main(["rollback"] + base_args(broker, model, tmp_path / "elsewhere") + ["--to", "2"]) == 2
    assert "no record of model rollback" in capsys.readouterr().err

    # Back to version 2, an update: decoded up to it and coded as a full model that decodes to exactly it.
    assert cli.main(["rollback"] + args + signed + ["--to", "2"]) == 0
    assert "version 5 restores version 2" in capsys.readouterr().out
    status = run(current_status(settings, model))
    assert (status.seq, status.full_seq, len(status.counts), status.rollout) == (5, 5, 1, None)
    envs, data = run(publication(settings, model, 5))
    assert all(e.kind == FULL and e.parent_seq == 2 and e.parent_digest == digests[2] for e in envs)
    assert envs[0].digest == status.digest
    verify = signing.envelope_verifier([pub])
    verify(envs[0])  # signed over the parent digest too
    want = steps[1][2]
    assert model_digest(nnc_edge.decode(data)) == model_digest(want)
    record = ChainRecord(state, "nnc", model).load()
    assert [(v.seq, v.kind, v.restores) for v in record.versions] == [(5, FULL, (2, digests[2]))]
    assert record.versions[0].model == model_digest(want) and record.rollout is None
    assert record.has_bitstream(status.digest)
    # The old chain is gone from the broker.
    retained = run(retained_topics(settings, "nnc/%s/seq" % model))
    assert retained and all(t.startswith("nnc/%s/seq/5/" % model) for t in retained)

    # A device without version 2 downloads it, checking the signature, and ends with exactly its model.
    async def fresh_device():
        device = Device(settings, tmp_path / "fresh", model,
                        verify=signing.envelope_verifier([pub], lambda: None))
        await device.at(status)
        await device.close()
        return device
    device = run(fresh_device())
    assert_model(device.store.path, want)

    # Now version 2 is no longer in the record.
    assert cli.main(["rollback"] + args + ["--to", "2"]) == 2
    assert "version 2 is no longer in the chain record (it holds 5)" in capsys.readouterr().err

    # Updates after it: not one made from another model, nor one that continues the decoder state of the
    # old chain (devices that took version 5 have none).
    assert cli.main(["publish", paths[1]] + args + signed + ["-q", "--kind", "update"]) == 2  # not on v5's model
    capsys.readouterr()
    assert cli.main(["publish", paths[2]] + args + signed + ["-q"]) == 2  # v2's model, but update 3 of the chain
    assert "continues the decoder state (TCA, HDSP) of a chain that started before version 5" in capsys.readouterr().err

    # A new chain from version 5's model goes on (v6); then back to version 5, a full version: its own bytes.
    new_chain = tmp_path / "new-chain.nnc"
    new_chain.write_bytes(encode_update(want, steps[3][2]))
    assert cli.main(["publish", str(new_chain)] + args + signed + ["-q"]) == 0
    assert cli.main(["rollback"] + args + signed + ["--to", "5"]) == 0
    status = run(current_status(settings, model))
    assert (status.seq, status.full_seq) == (7, 7)
    envs7, data7 = run(publication(settings, model, 7))
    assert data7 == data and envs7[0].parent_seq == 5 and envs7[0].parent_digest == envs[0].digest
    verify(envs7[0])
    record = ChainRecord(state, "nnc", model).load()
    assert [(v.seq, v.restores) for v in record.versions] == [(7, (5, envs[0].digest))]


def test_rollback_api_keeps_the_chain_when_the_broker_lost_it(broker, tmp_path):
    """Publisher.publish(restores=...) without the CLI, and a record whose restore is published again
    (with its parent) when the broker loses the status."""
    model = "restoreapi"
    steps = cached_chain(1, seed=35)
    settings = settings_for(broker)
    record = ChainRecord(tmp_path, "nnc", model)
    publisher = Publisher(settings, model, record=record)

    async def scenario():
        await publisher.publish(steps[0][1])
        await publisher.publish(steps[1][1], UPDATE)
        status = await rollout.rollback(publisher, 1)
        assert (status.seq, status.full_seq) == (3, 3)
        with pytest.raises(RolloutError, match="no longer in the chain record"):
            await rollout.rollback(publisher, 2)
        # The broker loses everything; the next update publishes the chain again, the restore with its parent.
        async with settings.client("wipe") as client:
            await client.publish("nnc/%s/status" % model, b"", qos=1, retain=True)
            await client.publish("nnc/%s/seq/3/0" % model, b"", qos=1, retain=True)
        await publisher.publish(steps[1][1], UPDATE)
        envs, data = await publication(settings, model, 3)
        assert envs[0].parent_seq == 1 and data == steps[0][1]
        return await current_status(settings, model)
    status = run(scenario())
    assert (status.seq, status.full_seq) == (4, 3)
    assert json.loads(status.payload())["counts"] == status.counts


def test_rollback_end_to_end_with_receivers(broker, tmp_path, caplog, capsys):
    """nnc-edge rollback with real receivers: one that keeps the version restored (its previous model, A/B)
    switches to it without downloading, one that never had it downloads it; both end with exactly its model."""
    model = "rollback-e2e"
    steps = cached_chain(2, seed=36)
    paths = write_chain(tmp_path, steps)
    settings = settings_for(broker)
    args = base_args(broker, model, tmp_path / "state")
    assert cli.main(["publish", paths[0]] + args + ["-q"]) == 0
    caplog.set_level(logging.INFO, logger="nnc_edge.mqtt")
    holder = ReceiverDevice(broker, tmp_path / "holder", model, "holder")
    try:
        for path, seq in ((paths[1], 2), (paths[2], 3)):
            run(reports_until(settings, model, lambda got: got.get("holder", {}).get("seq") == seq - 1, "holder"))
            assert cli.main(["publish", path] + args + ["-q"]) == 0
        run(reports_until(settings, model, lambda got: got.get("holder", {}).get("seq") == 3, "holder at v3"))
        assert cli.main(["rollback"] + args + ["--to", "2", "-q"]) == 0
        status = run(current_status(settings, model))
        got = run(reports_until(settings, model, lambda got: got.get("holder", {}).get("seq") == 4
                                and got["holder"]["state"] == "current", "holder at v4"))
        assert got["holder"]["digest"] == status.digest.hex()
    finally:
        holder.close()
    assert_model(holder.store.path, steps[1][2])
    # The device logs to the command's handler on stderr while a command runs, else to caplog's.
    log = caplog.text + capsys.readouterr().err
    switched = [line for line in log.splitlines() if "without downloading" in line]
    assert len(switched) == 1 and "device holder:" in switched[0] and "restores version 2" in switched[0], switched
    assert got["holder"]["applied"]["seq"] == 4

    late = ReceiverDevice(broker, tmp_path / "late", model, "late")
    try:
        run(reports_until(settings, model, lambda got: got.get("late", {}).get("seq") == 4
                          and got["late"]["state"] == "current", "late at v4"))
    finally:
        late.close()
    assert_model(late.store.path, steps[1][2])
    log = caplog.text
    assert "device late: model %s: applied full model 4" % model in log and "without downloading" not in log.replace(
        switched[0], "")


def test_a_wave_change_waits_for_a_publisher_of_this_host(broker, tmp_path):
    model = "locked"
    steps = cached_chain(0, seed=37)
    settings = settings_for(broker)
    record = ChainRecord(tmp_path, "nnc", model)
    run(Publisher(settings, model, record=record).publish(steps[0][1], rollout={"percent": 10}))
    held, release = threading.Event(), threading.Event()

    def publisher_at_work():
        with ChainRecord(tmp_path, "nnc", model).locked():
            held.set()
            release.wait(WAIT)
    thread = threading.Thread(target=publisher_at_work)
    thread.start()
    assert held.wait(WAIT)

    async def scenario():
        change = asyncio.ensure_future(rollout.change_wave(settings, "nnc", model, record, percent=20))
        await asyncio.sleep(1.0)
        assert not change.done()
        release.set()
        return await asyncio.wait_for(change, WAIT)
    try:
        old, status, notes = run(scenario())
    finally:
        release.set()
        thread.join(WAIT)
    assert old == {"from": 1, "percent": 10} and status.rollout == {"from": 1, "percent": 20} and not notes
    assert run(current_status(settings, model)).rollout == {"from": 1, "percent": 20}
    assert ChainRecord(tmp_path, "nnc", model).load().rollout == {"from": 1, "percent": 20}
