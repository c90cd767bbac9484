"""Fleet operations on the device (issue #17) through a real mosquitto: health-check rollback (the
previous model back byte for byte, reported rolled-back, never fetched again, also after a restart),
the health check's environment, restore publications (taken locally by devices that hold the
version, downloaded by the others), the staged-rollout wave (waiting, halted), a late joiner, crash
recovery between the A/B renames, and many devices in one process (client ids, log lines, one
executor)."""

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nnc_edge import modelio
from transports import envelope, mqtt, report
from transports.envelope import FULL, UPDATE
from transports.mqtt import Publisher
from transports.mqtt.device import Receiver
from transports.mqtt.health import HealthCheck
from transports.mqtt.model_store import ModelStore

from test_mqtt import pytestmark  # noqa: F401 (skipped without mosquitto, as test_mqtt.py)
from test_mqtt import WAIT, Device, assert_model, cached_chain, file_bytes, run, settings_for
from mqtt_broker import Mosquitto


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


def check_script(tmp_path, fail_seqs=()):
    """A health check command: appends its NNC_EDGE_* environment as a JSON line to calls.jsonl and
    exits 3 for the versions in fail_seqs (read from fail.json at each call)."""
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        env = {k: v for k, v in os.environ.items() if k.startswith("NNC_EDGE_")}
        with open(sys.argv[1], "a") as f:
            f.write(json.dumps(env) + "\\n")
        with open(sys.argv[2]) as f:
            fail = json.load(f)
        sys.exit(3 if int(env["NNC_EDGE_SEQ"]) in fail else 0)
    """))
    (tmp_path / "fail.json").write_text(json.dumps(list(fail_seqs)))
    calls = tmp_path / "calls.jsonl"
    return '"%s" "%s" "%s" "%s"' % (sys.executable, script, calls, tmp_path / "fail.json"), calls


def read_calls(calls):
    if not calls.exists():
        return []
    return [json.loads(line) for line in calls.read_text().splitlines()]


class Counted:
    """Records the writer kind of every publication a store begins (RestoreWriter: no download)."""

    def __init__(self, store):
        self.kinds = []
        begin = store.begin

        def counting(env, source=None):
            writer = begin(env, source)
            self.kinds.append((env.seq, type(writer).__name__))
            return writer
        store.begin = counting


async def raw_publish(client, model, seq, kind, data, parent=(0, envelope.NO_DIGEST), status=None, rollout=None,
                      count=None):
    """Publish a bitstream by hand as version ``seq`` (the status first announcing it as pending,
    beside ``status``, the previous Status), only its first ``count`` messages if given; returns the
    new Status (None when cut short)."""
    topics = mqtt.topics("nnc", model)
    bodies = mqtt.split_bitstream(data, 1024 - envelope.header_bytes(model))
    digest, payloads = envelope.messages(model, kind, seq, bodies, *parent)
    before = status or envelope.Status(model)
    pending = envelope.Status(model, before.seq, before.digest, before.full_seq, before.counts,
                              (seq, digest, len(payloads)), rollout)
    await client.publish(topics.status, pending.payload(), qos=1, retain=True)
    for i, payload in enumerate(payloads[:count]):
        await client.publish(topics.data(seq, i), payload, qos=1, retain=True)
    if count is not None and count < len(payloads):
        return None
    if kind == FULL:
        new = envelope.Status(model, seq, digest, seq, [len(payloads)], None, rollout)
    else:
        new = envelope.Status(model, seq, digest, before.full_seq, before.counts + [len(payloads)], None, rollout)
    await client.publish(topics.status, new.payload(), qos=1, retain=True)
    return new


async def reported(settings, model, device_id, check, what):
    from transports.mqtt import fleet
    got = None
    for _ in range(int(WAIT / 0.3)):
        got = (await fleet.read_fleet(settings, "nnc", model, quiet=0.3)).devices.get(device_id)
        if got is not None and check(got):
            return got
    raise AssertionError("%s never reported %s: %s" % (device_id, what, got))


def test_failed_health_check_puts_the_previous_model_back_and_never_fetches_it_again(broker, tmp_path):
    steps = cached_chain(2, seed=31)
    settings = settings_for(broker)
    command, calls = check_script(tmp_path, fail_seqs=[2])
    model = "health"

    async def scenario():
        publisher = Publisher(settings, model, max_message_bytes=1024)
        status1 = await publisher.publish(steps[0][1])
        dev = Device(settings, tmp_path / "dev", model, device_id="h1",
                     health_check=HealthCheck(command, timeout=WAIT))
        await dev.at(status1)
        await publisher.publish(steps[1][1], UPDATE)  # version 2: an update, with chain state
        status2 = await publisher.publish(steps[2][1], UPDATE)
        # Version 2 fails its check: the device goes back to version 1 and stays there (3 needs 2).
        got = await reported(settings, model, "h1", lambda r: r["state"] == "rolled-back", "rolled-back")
        assert got["seq"] == 1 and got["target"] == 2 and got["error"] == "health check exited 3"
        assert dev.store.version == (status1.seq, status1.digest)
        await asyncio.sleep(1.0)
        assert [a[:2] for a in dev.rx.applied] == [(1, FULL)]
        await dev.close()
        return status1, status2

    before = {}

    def snapshot(directory):
        return {n: file_bytes(directory / n) for n in sorted(os.listdir(directory))
                if n.startswith("model.safetensors")}

    # The model at version 1, before the update that fails: its bytes are what comes back.
    status1, status2 = run(scenario())
    directory = tmp_path / "dev"
    assert_model(directory / "model.safetensors", steps[0][2])
    seqs = [int(c["NNC_EDGE_SEQ"]) for c in read_calls(calls)]
    assert seqs == [1, 2]
    record = json.loads((directory / "rolled-back.json").read_text())
    assert [(v["seq"], v["reason"]) for v in record["versions"]] == [(2, "health check exited 3")]
    before = snapshot(directory)
    # previous.safetensors is the model version 2 replaced: the same bytes.
    assert file_bytes(directory / "previous.safetensors") == before["model.safetensors"]

    # Restarted: it still never fetches version 2, and says why.
    async def restarted():
        dev = Device(settings, directory, model, device_id="h1", health_check=HealthCheck(command, timeout=WAIT))
        counted = Counted(dev.store)
        got = await reported(settings, model, "h1", lambda r: r["state"] == "rolled-back" and r["time"],
                             "rolled-back after a restart")
        assert got["target"] == 2 and "health check exited 3" in got["error"]
        await asyncio.sleep(1.0)
        assert counted.kinds == [] and dev.rx.target is None and dev.rx.hold == "rolled-back"
        await dev.close()
    run(restarted())
    assert snapshot(directory) == before
    assert [int(c["NNC_EDGE_SEQ"]) for c in read_calls(calls)] == [1, 2]


def test_the_health_check_sees_its_environment_and_a_timeout_fails_it(broker, tmp_path):
    steps = cached_chain(1, seed=32)
    settings = settings_for(broker)
    command, calls = check_script(tmp_path)
    model = "healthenv"

    async def scenario():
        publisher = Publisher(settings, model)
        status1 = await publisher.publish(steps[0][1])
        dev = Device(settings, tmp_path / "dev", model, device_id="e1", health_check=HealthCheck(command, WAIT))
        await dev.at(status1)
        status2 = await publisher.publish(steps[1][1], UPDATE)
        await dev.at(status2)
        await dev.close()
        return status1, status2
    status1, status2 = run(scenario())
    got = read_calls(calls)
    directory = tmp_path / "dev"
    assert got[0] == {"NNC_EDGE_MODEL": str(directory / "model.safetensors"), "NNC_EDGE_PREVIOUS": "",
                      "NNC_EDGE_SEQ": "1", "NNC_EDGE_DIGEST": status1.digest.hex(), "NNC_EDGE_KIND": "full",
                      "NNC_EDGE_PREVIOUS_SEQ": "", "NNC_EDGE_MODEL_NAME": model, "NNC_EDGE_DEVICE": "e1"}
    assert got[1]["NNC_EDGE_PREVIOUS"] == str(directory / "previous.safetensors")
    assert (got[1]["NNC_EDGE_SEQ"], got[1]["NNC_EDGE_PREVIOUS_SEQ"], got[1]["NNC_EDGE_KIND"]) == ("2", "1", "update")
    assert_model(directory / "model.safetensors", steps[1][2])
    assert_model(directory / "previous.safetensors", steps[0][2])

    # A check that hangs is killed after the timeout, and counts as failed.
    async def hanging():
        store = ModelStore(tmp_path / "dev", model)
        check = HealthCheck("sleep 30", timeout=0.5)
        env = envelope.parse(envelope.messages(model, FULL, 9, [b"x"])[1][0])
        loop = asyncio.get_running_loop()
        start = loop.time()
        reason = await check.run(store, env, "full")
        assert loop.time() - start < 5
        return reason
    assert run(hanging()) == "health check timed out after 0.5 s"


def test_a_restore_is_taken_locally_by_devices_that_hold_the_version(broker, tmp_path, caplog):
    steps = cached_chain(1, seed=33)
    settings = settings_for(broker)
    model = "restore"

    async def scenario():
        async with settings.client("host") as client:
            status1 = await raw_publish(client, model, 1, FULL, steps[0][1])
            holds_current = Device(settings, tmp_path / "cur", model, device_id="r-cur")
            holds_previous = Device(settings, tmp_path / "prev", model, device_id="r-prev")
            for dev in (holds_current, holds_previous):
                await dev.at(status1)
            await holds_current.close()  # stays at version 1
            status2 = await raw_publish(client, model, 2, UPDATE, steps[1][1], (1, status1.digest), status1)
            await holds_previous.at(status2)  # version 1 is now its previous model
            prev_bytes = file_bytes(tmp_path / "prev" / "model.safetensors")
            # Version 3 restores version 1 (the host's `nnc-edge rollback --to 1`).
            status3 = await raw_publish(client, model, 3, FULL, steps[0][1], (1, status1.digest), status2)
            await holds_previous.at(status3)
            holds_current = Device(settings, tmp_path / "cur", model, device_id="r-cur")
            counted_cur = Counted(holds_current.store)
            newcomer = Device(settings, tmp_path / "new", model, device_id="r-new")
            counted_new = Counted(newcomer.store)
            for dev in (holds_current, newcomer):
                await dev.at(status3)
            for dev in (holds_current, holds_previous, newcomer):
                await dev.close()
            return status1, status3, prev_bytes, holds_previous, holds_current, newcomer, counted_cur, counted_new

    with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"):
        status1, status3, prev_bytes, previous, current, newcomer, counted_cur, counted_new = run(scenario())
    assert counted_cur.kinds == [(3, "RestoreWriter")] and counted_new.kinds == [(3, "FullModelWriter")]
    assert previous.rx.applied[-1][:3] == (3, "restore", 0) and current.rx.applied[-1][:3] == (3, "restore", 0)
    assert newcomer.rx.applied[-1][:2] == (3, FULL) and newcomer.rx.applied[-1][2] > 0
    for name in ("cur", "prev", "new"):
        assert_model(tmp_path / name / "model.safetensors", steps[0][2])
        meta = ModelStore(tmp_path / name, model)
        assert meta.version == (3, status3.digest)
    # The device that held version 1 as its previous model swapped: version 2 is its previous now.
    assert file_bytes(tmp_path / "prev" / "previous.safetensors") == prev_bytes
    assert ModelStore(tmp_path / "prev", model).previous_version[0] == 2
    assert "switching to it without downloading" in caplog.text
    assert "device r-prev: model restore: applied full model 3" in caplog.text


def test_outside_the_wave_a_device_waits_and_a_halted_wave_stops_a_download(broker, tmp_path, caplog):
    steps = cached_chain(1, seed=34)
    settings = settings_for(broker)
    model = "wave"
    inside, outside = "w-in", "w-out"

    async def scenario():
        async with settings.client("host") as client:
            status1 = await raw_publish(client, model, 1, FULL, steps[0][1])
            devs = {d: Device(settings, tmp_path / d, model, device_id=d) for d in (inside, outside)}
            for dev in devs.values():
                await dev.at(status1)
            wave = report.rollout_field(2, devices=[inside])
            # Version 2 for the wave only, cut short after its first message.
            assert await raw_publish(client, model, 2, UPDATE, steps[1][1], (1, status1.digest), status1, wave,
                                     count=1) is None
            await devs[inside].until(lambda: devs[inside].rx.assembly is not None, "the download started")
            await asyncio.sleep(0.5)
            assert devs[outside].rx.assembly is None and devs[outside].rx.target is None  # not subscribed
            # Halted: the device in the wave drops the download.
            halt = report.rollout_field(2, devices=[inside], halted=True)
            halted = envelope.Status(model, 1, status1.digest, 1, status1.counts, None, halt)
            await client.publish("nnc/%s/status" % model, halted.payload(), qos=1, retain=True)
            await devs[inside].until(lambda: devs[inside].rx.assembly is None, "the download dropped")
            assert devs[inside].rx.target is None and devs[inside].rx.hold == "wave"
            # Version 2 published whole while halted: no device takes it, both report waiting.
            status2 = await raw_publish(client, model, 2, UPDATE, steps[1][1], (1, status1.digest), status1, halt)
            for d in (inside, outside):
                got = await reported(settings, model, d, lambda r: r["state"] == "waiting", "waiting")
                assert got["seq"] == 1 and got["target"] is None
            # The wave resumed: only the device in it takes version 2.
            resumed = envelope.Status(model, 2, status2.digest, 1, status2.counts, None, wave)
            await client.publish("nnc/%s/status" % model, resumed.payload(), qos=1, retain=True)
            await devs[inside].at(status2)
            await asyncio.sleep(0.5)
            got = await reported(settings, model, outside, lambda r: r["state"] == "waiting", "still waiting")
            assert devs[outside].store.version == (1, status1.digest) and devs[outside].rx.settled
            for dev in devs.values():
                await dev.close()
            return devs
    with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"):
        devs = run(scenario())
    assert "the staged rollout of versions from 2 on is halted" in caplog.text
    assert [a[:2] for a in devs[outside].rx.applied] == [(1, FULL)]
    assert_model(tmp_path / inside / "model.safetensors", steps[1][2])
    assert_model(tmp_path / outside / "model.safetensors", steps[0][2])


def test_a_late_joiner_reaches_the_current_version_bit_exact(broker, tmp_path):
    steps = cached_chain(3, seed=35)
    settings = settings_for(broker)

    async def scenario():
        publisher = Publisher(settings, "late", max_message_bytes=2048)
        for kind, data, _ in steps:
            status = await publisher.publish(data, kind)
        dev = Device(settings, tmp_path / "late", "late", device_id="late-1")
        await dev.at(status)
        await dev.close()
        return dev
    dev = run(scenario())
    assert [a[:2] for a in dev.rx.applied] == [(1, FULL), (2, UPDATE), (3, UPDATE), (4, UPDATE)]
    assert_model(tmp_path / "late" / "model.safetensors", steps[3][2])
    assert_model(tmp_path / "late" / "previous.safetensors", steps[2][2])


def test_gateway_devices_in_one_process_have_their_own_client_ids_logs_and_share_an_executor(broker, tmp_path,
                                                                                             caplog):
    steps = cached_chain(1, seed=36)
    settings = settings_for(broker, client_id="one-for-all")  # shared, with a client id of its own
    identifiers = []
    client = settings.client

    def recording(role="client", **kw):
        identifiers.append(kw.get("identifier"))
        return client(role, **kw)
    settings.client = recording

    class CountingExecutor(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args, **kw):
            CountingExecutor.submitted += 1
            return ThreadPoolExecutor.submit(self, *args, **kw)

    async def scenario(executor):
        publisher = Publisher(settings_for(broker), "gateway", max_message_bytes=1024)
        status = await publisher.publish(steps[0][1])
        stop = asyncio.Event()
        receivers = [Receiver(ModelStore(tmp_path / d, "gateway", executor=executor), gap_timeout=2.0, device_id=d)
                     for d in ("gw-1", "gw-2")]
        tasks = [asyncio.ensure_future(mqtt.run_receiver(settings, rx, stop, tick=0.1)) for rx in receivers]
        for _ in range(int(WAIT / 0.05)):
            if all(rx.store.version == (status.seq, status.digest) for rx in receivers):
                break
            await asyncio.sleep(0.05)
        status = await publisher.publish(steps[1][1], UPDATE)
        for _ in range(int(WAIT / 0.05)):
            if all(rx.store.version == (status.seq, status.digest) for rx in receivers):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        return receivers

    with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"), CountingExecutor(max_workers=2) as executor:
        receivers = run(scenario(executor))
    assert sorted(set(identifiers)) == ["nnc-edge-gw-1", "nnc-edge-gw-2"]
    for rx in receivers:
        assert [a[:2] for a in rx.applied] == [(1, FULL), (2, UPDATE)]
    assert CountingExecutor.submitted >= 4  # feeds and commits of both devices
    lines = [r.getMessage() for r in caplog.records if r.name == "nnc_edge.mqtt"]
    for d in ("gw-1", "gw-2"):
        mine = [line for line in lines if line.startswith("device %s: " % d)]
        assert any("applied full model 1" in line for line in mine) and any("connected" in line for line in mine)
    device_lines = [r for r in caplog.records if getattr(r, "device_id", None) is not None]
    assert all(r.getMessage().startswith("device %s: " % r.device_id) for r in device_lines)
    assert not [line for line in lines if "applied" in line and not line.startswith("device ")]


# --- without a broker: crash points of the A/B switch ------------------------------------------------
def _apply(rx, seq, kind, data, parent=(0, envelope.NO_DIGEST), full_seq=None):
    digest, payloads = envelope.messages(rx.model, kind, seq, [data], *parent)
    rx.on_status(envelope.Status(rx.model, seq, digest, full_seq or seq, [1] * (seq - (full_seq or seq) + 1))
                 .payload())

    async def deliver():
        for i, payload in enumerate(payloads):
            await rx.handle(rx.topics.data(seq, i), payload)
    asyncio.run(deliver())
    return digest


def test_a_crash_between_the_ab_renames_is_finished_or_undone_on_start(tmp_path, monkeypatch):
    steps = cached_chain(2, seed=37)
    directory = tmp_path / "dev"
    rx = Receiver(ModelStore(directory, "ab"))
    d1 = _apply(rx, 1, FULL, steps[0][1])
    d2 = _apply(rx, 2, UPDATE, steps[1][1], (1, d1), 1)
    assert rx.store.version == (2, d2) and rx.store.previous_version == (1, d1)
    previous = file_bytes(directory / "previous.safetensors")

    # Killed after the new model's rename, before the staged previous one's: finished on start.
    real_replace = os.replace

    def dies_on_the_previous(src, dst, *a, **kw):
        if os.fspath(dst).endswith("previous.safetensors"):
            raise KeyboardInterrupt("power loss")
        return real_replace(src, dst, *a, **kw)
    monkeypatch.setattr(os, "replace", dies_on_the_previous)
    with pytest.raises(KeyboardInterrupt):
        _apply(rx, 3, UPDATE, steps[2][1], (2, d2), 1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.path.exists(directory / ModelStore.STAGED)
    store = ModelStore(directory, "ab")
    assert store.version[0] == 3 and store.previous_version == (2, d2)
    assert not os.path.exists(directory / ModelStore.STAGED)
    assert_model(directory / "model.safetensors", steps[2][2])
    assert_model(directory / "previous.safetensors", steps[1][2])
    assert ModelStore(directory, "ab").previous_version == (2, d2)

    # Killed after the current model was staged, before the new one's rename: undone on start.
    rx = Receiver(ModelStore(directory, "ab"))
    current, previous = file_bytes(directory / "model.safetensors"), file_bytes(directory / "previous.safetensors")
    monkeypatch.setattr(ModelStore, "_unstage", lambda self: None)  # no cleanup: the process is gone
    monkeypatch.setattr(mqtt.FullModelWriter, "commit", lambda self: (_ for _ in ()).throw(OSError(5, "I/O error")))
    _apply(rx, 4, FULL, steps[0][1])
    assert os.path.exists(directory / ModelStore.STAGED)
    store = ModelStore(directory, "ab")
    assert store.version[0] == 3 and store.previous_version == (2, d2)
    assert file_bytes(directory / "model.safetensors") == current
    assert file_bytes(directory / "previous.safetensors") == previous
    assert not os.path.exists(directory / ModelStore.STAGED)


def test_a_crash_before_the_rollback_is_finished_on_start(tmp_path, monkeypatch):
    steps = cached_chain(1, seed=38)
    directory = tmp_path / "dev"

    class Failing:
        async def run(self, store, env, kind, device_id=None):
            return None if env.seq == 1 else "health check exited 1"

    rx = Receiver(ModelStore(directory, "crash"), health_check=Failing())
    d1 = _apply(rx, 1, FULL, steps[0][1])
    before = {n: file_bytes(directory / n) for n in os.listdir(directory)}
    monkeypatch.setattr(ModelStore, "restore_previous", lambda self: (_ for _ in ()).throw(OSError(5, "I/O error")))
    d2 = _apply(rx, 2, UPDATE, steps[1][1], (1, d1), 1)
    assert rx.report_state() == "failed" and rx.store.version == (2, d2)
    monkeypatch.undo()
    store = ModelStore(directory, "crash")  # the record says version 2 failed: version 1 goes back
    assert store.version == (1, d1)
    assert file_bytes(directory / "model.safetensors") == before["model.safetensors"]
    assert list(store.rolled_back) == [(2, d2)]
    rx = Receiver(store, health_check=Failing())
    asyncio.run(rx.recover())  # the check's record names version 2, which is no longer current: dropped
    assert not os.path.exists(directory / ModelStore.CHECKING) and rx.store.version == (1, d1)

    # A first model that fails its check: there is no previous one, so the device has none again.
    rx = Receiver(ModelStore(tmp_path / "first", "crash"), health_check=Failing())
    _apply(rx, 2, FULL, steps[0][1])
    assert rx.store.version is None and not os.path.exists(tmp_path / "first" / "model.safetensors")
    assert rx.report_state() == "rolled-back" and rx.target is None

    with pytest.raises(ValueError, match="needs the previous model"):
        Receiver(ModelStore(tmp_path / "nab", "crash", keep_previous=False), health_check=Failing())


def test_the_readme_gateway_example_runs(broker, tmp_path):
    """The README's gateway of 8 devices, as a program of its own against the test's mosquitto."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(repo, "README.md"), encoding="utf-8").read()
    body = readme.split("\n### Rollback and health checks\n", 1)[1].split("\n### ", 1)[0]
    code = body.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert '"mqtt://localhost"' in code
    (tmp_path / "gateway.py").write_text(code.replace('"mqtt://localhost"', repr(broker.url)))
    steps = cached_chain(0, seed=39)
    status = run(Publisher(settings_for(broker), "kws").publish(steps[0][1]))
    environ = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "gateway.py"], cwd=str(tmp_path), env=environ,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    files = [tmp_path / "gateway" / ("sensor-%d" % i) / "model.safetensors" for i in range(8)]
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if all(f.exists() and modelio.load_metadata(f)["nnc_edge.seq"] == str(status.seq) for f in files):
                    break
            except (OSError, ValueError, KeyError):
                pass  # being written
            time.sleep(0.1)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=WAIT)
    for f in files:
        assert f.exists(), err.decode(errors="replace")[-2000:]
        assert_model(f, steps[0][2])


def test_receive_health_check_options_and_config(broker, tmp_path, capsys):
    from nnc_edge import cli
    steps = cached_chain(0, seed=40)
    run(Publisher(settings_for(broker), "clihealth").publish(steps[0][1]))
    command, calls = check_script(tmp_path, fail_seqs=[1])
    config = tmp_path / "device.toml"
    config.write_text('broker = "%s"\nmodel = "clihealth"\nout = "model"\nid = "ch-1"\nhealth-check = %s\n'
                      'health-timeout = 30\n' % (broker.url, json.dumps(command)))
    assert cli.main(["receive", "--config", str(config), "--once", "--timeout", str(WAIT), "-q"]) == 1
    err = capsys.readouterr().err
    assert "version 1 was rolled back (health check exited 3)" in err
    assert not (tmp_path / "model" / "model.safetensors").exists()  # its first model: none before it
    assert [c["NNC_EDGE_DEVICE"] for c in read_calls(calls)] == ["ch-1"]
    # Again: version 1 is not fetched (nor checked) again.
    assert cli.main(["receive", "--config", str(config), "--once", "--timeout", str(WAIT), "-q"]) == 1
    assert len(read_calls(calls)) == 1
    assert cli.main(["receive", "--config", str(config), "--no-previous", "--once"]) == 2
    assert "--health-check needs the previous model kept" in capsys.readouterr().err


def test_a_health_check_a_restart_interrupted_runs_again_then_counts_as_failed(tmp_path):
    steps = cached_chain(1, seed=41)
    directory = tmp_path / "dev"
    seen = []

    class Check:
        def __init__(self, crash):
            self.crash = crash

        async def run(self, store, env, kind, device_id=None):
            seen.append((env.seq, kind))
            if self.crash and env.seq == 2:
                raise KeyboardInterrupt("power loss during the check")
            return None

    rx = Receiver(ModelStore(directory, "again"), health_check=Check(False))
    d1 = _apply(rx, 1, FULL, steps[0][1])
    assert not os.path.exists(directory / ModelStore.CHECKING)
    rx = Receiver(ModelStore(directory, "again"), health_check=Check(True))
    with pytest.raises(KeyboardInterrupt):
        d2 = _apply(rx, 2, UPDATE, steps[1][1], (1, d1), 1)
    assert ModelStore(directory, "again").pending_check()[2] == 1
    # Restarted: the check runs again (and passes).
    rx = Receiver(ModelStore(directory, "again"), health_check=Check(False))
    asyncio.run(rx.recover())
    assert seen[-1] == (2, "update") and rx.store.version[0] == 2
    assert not os.path.exists(directory / ModelStore.CHECKING)

    # The same twice over: the second restart does not run it a third time, it rolls back.
    d2 = rx.store.version[1]
    rx.store.begin_check(2, d2)
    rx = Receiver(ModelStore(directory, "again"), health_check=Check(True))
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(rx.recover())
    assert rx.store.pending_check()[2] == 2
    calls = len(seen)
    rx = Receiver(ModelStore(directory, "again"), health_check=Check(False))
    asyncio.run(rx.recover())
    assert len(seen) == calls and rx.store.version == (1, d1) and (2, d2) in rx.store.rolled_back
    assert "restarted during the health check 2 times" in rx.failure[1]
    assert not os.path.exists(directory / ModelStore.CHECKING)
