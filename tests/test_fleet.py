"""Device reports and the fleet view (issue #17) through a real mosquitto: the states a device reports
through a full model and an update, a refusal, a local failure, the last will of a killed device, ``nnc-edge fleet``
(table, --json, --wait-for) and hostile reports."""

import asyncio
import json
import logging
import signal
import subprocess
import sys

import pytest

from decoder_core import NNCError
from nnc_edge import cli
from transports import report
from transports.envelope import UPDATE
from transports import mqtt
from transports.mqtt import Publisher, fleet

from mqtt_broker import Mosquitto
from test_mqtt import pytestmark  # noqa: F401 (skipped without mosquitto, as test_mqtt.py)
from test_mqtt import WAIT, Device, cached_chain, run, settings_for


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


class ReportLog:
    """Every report published on a model's report topics while it runs, in order."""

    def __init__(self, settings, model):
        self.settings = settings
        self.filter = "nnc/%s/devices/+" % model
        self.reports = []
        self.ready = asyncio.Event()
        self.task = asyncio.ensure_future(self._collect())

    async def _collect(self):
        async with self.settings.client("log") as client:
            await client.subscribe(self.filter, qos=1)
            self.ready.set()
            async for message in client.messages:
                if message.payload:
                    self.reports.append(report.parse_report(message.payload))

    def states(self, device_id):
        """The device's states in order, repeats of the same state merged."""
        out = []
        for r in self.reports:
            if r["id"] == device_id and (not out or out[-1] != r["state"]):
                out.append(r["state"])
        return out

    async def close(self):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def refuse_everything(env):
    raise NNCError("no trusted key signed it", None, "signature")


def test_reports_through_a_full_model_and_an_update(broker, tmp_path):
    steps = cached_chain(1, seed=21)
    settings = settings_for(broker)

    async def scenario():
        log = ReportLog(settings, "reports")
        await asyncio.wait_for(log.ready.wait(), WAIT)
        publisher = Publisher(settings, "reports", max_message_bytes=1024)
        status = await publisher.publish(steps[0][1])
        devices = [Device(settings, tmp_path / d, "reports", device_id=d) for d in ("dev-a", "dev-b")]
        refusing = Device(settings, tmp_path / "dev-c", "reports", device_id="dev-c", verify=refuse_everything)
        for device in devices:
            await device.at(status)
        await refusing.until(lambda: refusing.rx.failure is not None, "a refusal")
        view = await fleet.wait_for(settings, "nnc", "reports", 1, WAIT)
        assert not view[0]  # dev-c never gets there
        assert [r["id"] for r in view[1].laggards(1)] == ["dev-c"]

        status = await publisher.publish(steps[1][1], UPDATE)
        reached, view = await fleet.wait_for(settings, "nnc", "reports", 2, 3.0)
        assert not reached
        await refusing.close()
        async with settings.client("cleanup") as client:  # dev-c leaves the fleet: its report goes
            await client.publish(report.report_topic("nnc", "reports", "dev-c"), b"", qos=1, retain=True)
        reached, view = await fleet.wait_for(settings, "nnc", "reports", 2, WAIT)
        assert reached and sorted(view.devices) == ["dev-a", "dev-b"]
        for device in devices:
            await device.close()
        await log.close()

        full, update = steps[0][1], steps[1][1]
        for device_id in ("dev-a", "dev-b"):
            assert log.states(device_id) == ["current", "downloading", "applying", "current", "downloading",
                                             "applying", "current"], log.reports
            last = [r for r in log.reports if r["id"] == device_id][-1]
            assert last["seq"] == 2 and last["digest"] == status.digest.hex() and last["target"] is None
            assert last["error"] is None and last["applied"]["kind"] == "update"
            # The bytes published: the publisher may add an update record and re-cut large units.
            assert last["applied"]["bytes"] >= len(update) and last["applied"]["seq"] == 2
            assert last["applied"]["seconds"] >= 0
            downloading = [r for r in log.reports if r["id"] == device_id and r["state"] == "downloading"]
            assert downloading[0]["target"] == 1 and downloading[0]["seq"] == 0
            applied = [r for r in log.reports if r["id"] == device_id and r["applied"]]
            assert applied[0]["applied"]["bytes"] >= len(full) and applied[0]["applied"]["kind"] == "full"
        rejected = [r for r in log.reports if r["id"] == "dev-c" and r["state"] == "rejected"]
        assert rejected and "no trusted key signed it" in rejected[0]["error"] and rejected[0]["seq"] == 0
    run(scenario())


def test_a_local_failure_is_reported_failed_then_cleared(broker, tmp_path):
    steps = cached_chain(1, seed=25)
    settings = settings_for(broker)
    broken = [True]

    def apply_update(base, update):
        if broken[0]:
            raise OSError(28, "No space left on device")
        from nnc_edge.updates import apply_update
        return apply_update(base, update)

    async def scenario():
        publisher = Publisher(settings, "failing")
        await publisher.publish(steps[0][1])
        store = mqtt.ModelStore(tmp_path / "f1", "failing", threads=1, apply_update=apply_update)
        rx = mqtt.Receiver(store, gap_timeout=1.0, device_id="f1")
        stop = asyncio.Event()
        task = asyncio.ensure_future(mqtt.run_receiver(settings, rx, stop, tick=0.1))
        assert (await fleet.wait_for(settings, "nnc", "failing", 1, WAIT))[0]
        await publisher.publish(steps[1][1], UPDATE)

        async def reported(state):
            for _ in range(int(WAIT / 0.3)):
                got = (await fleet.read_fleet(settings, "nnc", "failing", quiet=0.3)).devices["f1"]
                if got["state"] == state:
                    return got
            raise AssertionError("f1 never reported %s: %s" % (state, got))
        failed = await reported("failed")
        assert failed["seq"] == 1 and failed["target"] == 2 and "No space left on device" in failed["error"]
        broken[0] = False  # retried after gap_timeout
        done = await reported("current")
        assert done["seq"] == 2 and done["error"] is None
        stop.set()
        await asyncio.wait_for(task, WAIT)
    run(scenario())


def receiver_process(broker, model, out, device_id, env=None):
    """``nnc-edge receive --id`` as a process of its own, so that it can be killed without a goodbye."""
    command = [sys.executable, "-m", "nnc_edge", "receive", "--broker", broker.url, "--model", model,
               "--out", str(out), "--id", device_id, "--gap-timeout", "2"]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)


def test_killed_device_is_marked_offline_by_its_last_will(broker, tmp_path, capsys):
    steps = cached_chain(0, seed=22)
    settings = settings_for(broker)
    run(Publisher(settings, "will").publish(steps[0][1]))
    procs = [receiver_process(broker, "will", tmp_path / d, d) for d in ("w1", "w2")]
    try:
        # --wait-for knows only the devices that have reported: wait until both have, then ask it.
        async def both_current():
            for _ in range(int(WAIT / 0.2)):
                view = await fleet.read_fleet(settings, "nnc", "will", quiet=0.2)
                if sorted(d for d, r in view.devices.items() if r["state"] == "current") == ["w1", "w2"]:
                    return
            raise AssertionError("w1 and w2 are not both current: %s" % view.devices)
        run(both_current())
        assert cli.main(["fleet", "--broker", broker.url, "--model", "will", "--wait-for", "1",
                         "--timeout", str(WAIT)]) == 0
        table = capsys.readouterr().out
        assert "2 devices: 2 on v1; 0 failed" in table
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(WAIT)

        async def offline():
            for _ in range(int(WAIT / 0.2)):
                view = await fleet.read_fleet(settings, "nnc", "will", quiet=0.2)
                if view.devices["w1"]["state"] == "offline":
                    return view
                await asyncio.sleep(0.2)
            raise AssertionError("no last will of w1: %s" % view.devices)
        view = run(offline())
        assert view.devices["w1"] == {"v": 1, "id": "w1", "state": "offline"}
        assert view.devices["w2"]["state"] == "current"
        assert cli.main(["fleet", "--broker", broker.url, "--model", "will", "--wait-for", "1",
                         "--timeout", "1.5"]) == 1
        captured = capsys.readouterr()
        assert "1 device not current at version 1 or later: w1 (?, offline)" in captured.err
        assert "w1" in captured.out and "offline" in captured.out
        # Stopped with SIGTERM, a device disconnects: its last report stays.
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(WAIT) == 0, procs[1].stderr.read()
        assert run(fleet.read_fleet(settings, "nnc", "will", quiet=0.2)).devices["w2"]["state"] == "current"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(WAIT)
            proc.stderr.close()


def test_fleet_json_and_wait_for(broker, tmp_path, capsys):
    steps = cached_chain(1, seed=23)
    settings = settings_for(broker)
    base = ["fleet", "--broker", broker.url, "--model", "json"]

    async def fleet_command(*options):
        # In a thread of its own: the command runs its own event loop while the devices run in this one.
        return await asyncio.to_thread(cli.main, base + list(options))

    async def scenario():
        publisher = Publisher(settings, "json")
        await publisher.publish(steps[0][1])
        devices = [Device(settings, tmp_path / d, "json", device_id=d) for d in ("j1", "j2", "j3")]
        reached, _ = await fleet.wait_for(settings, "nnc", "json", 1, WAIT)
        assert reached
        await devices[2].close()  # j3 stays at version 1
        status = await publisher.publish(steps[1][1], UPDATE)
        for device in devices[:2]:
            await device.at(status)
        capsys.readouterr()

        assert await fleet_command("--json") == 0
        got = json.loads(capsys.readouterr().out)
        assert [(r["id"], r["seq"], r["state"]) for r in got] == [("j1", 2, "current"), ("j2", 2, "current"),
                                                                   ("j3", 1, "current")]
        assert await fleet_command() == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["DEVICE", "VERSION", "STATE", "AGE", "ERROR"]
        assert table[1].split()[:3] == ["j1", "v2", "current"] and table[1].split()[4] == "-"
        assert table[-2:] == ["version 2 published (full model 1); no staged rollout (every device)",
                              "3 devices: 1 on v1, 2 on v2; 0 failed"]
        assert await fleet_command("--wait-for", "1", "--timeout", "5") == 0
        capsys.readouterr()
        assert await fleet_command("--wait-for", "2", "--timeout", "1") == 1
        err = capsys.readouterr().err
        assert "after 1 s, 1 device not current at version 2 or later: j3 (v1, current)" in err
        for device in devices[:2]:
            await device.close()
    run(scenario())
    assert cli.main(["fleet", "--broker", broker.url, "--model", "nobody", "--wait-for", "1", "--timeout", "1"]) == 1
    assert "no device reports on the model" in capsys.readouterr().err


def test_hostile_reports_are_skipped(broker, caplog, capsys):
    settings = settings_for(broker)
    good = report.report_payload("fine", "current", 3, bytes(32), time=1)
    hostile = {
        "huge": b'{"v": 1, "id": "huge", "state": "current", "error": "%s"}' % (b"x" * 100000),
        "deep": b"[" * 4000,  # within the size limit
        "notjson": b"\xff\xfe{",
        "types": b'{"v": 1, "id": "types", "state": "current", "seq": "7"}',
        "boolseq": b'{"v": 1, "id": "boolseq", "state": "current", "seq": true}',
        "state": b'{"v": 1, "id": "state", "state": "exploded"}',
        "other": report.report_payload("fine", "failed", 1, error="forged"),
        "list": b"[1, 2]",
    }

    async def scenario():
        async with settings.client("attacker") as client:
            await client.publish("nnc/hostile/devices/fine", good, qos=1, retain=True)
            # mosquitto refuses control characters in topics, not other unprintable ones.
            await client.publish("nnc/hostile/devices/esc\u202e", report.report_payload(
                "esc\u202e", "failed", 1, error="line\nbreak \x1b[31mred"), qos=1, retain=True)
            for name, payload in hostile.items():
                await client.publish("nnc/hostile/devices/" + name, payload, qos=1, retain=True)
        return await fleet.read_fleet(settings, "nnc", "hostile")
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        view = run(scenario())
    assert sorted(view.devices) == ["esc\u202e", "fine"] and view.devices["fine"]["seq"] == 3
    assert view.skipped == len(hostile)
    warnings = "\n".join(r.getMessage() for r in caplog.records)
    for expected in ("more than 4096", "nests deeper than 2", "not UTF-8", "seq has the wrong type",
                     "state 'exploded' is unknown", "names device 'fine'", "not a version 1 device report"):
        assert expected in warnings
    assert cli.main(["fleet", "--broker", broker.url, "--model", "hostile"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out
    assert "esc\\u202e" in out and "line\\nbreak \\x1b[31mred" in out
    assert out.splitlines()[-1] == "2 devices: 1 on v1, 1 on v3; 1 failed; 8 reports skipped"
    assert cli.main(["fleet", "--broker", broker.url, "--model", "hostile", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["esc\u202e", "fine"]


def test_receive_takes_its_id_from_a_config_file(broker, tmp_path, capsys):
    steps = cached_chain(0, seed=24)
    run(Publisher(settings_for(broker), "config").publish(steps[0][1]))
    config = tmp_path / "device.toml"
    config.write_text('broker = "%s"\nmodel = "config"\nout = "model"\nid = "cfg-7"\n' % broker.url)
    assert cli.main(["receive", "--config", str(config), "--once", "--timeout", str(WAIT), "-q"]) == 0
    assert (tmp_path / "model" / "model.safetensors").exists()
    got = run(fleet.read_fleet(settings_for(broker), "nnc", "config", quiet=0.2)).devices
    assert list(got) == ["cfg-7"] and got["cfg-7"]["state"] == "current" and got["cfg-7"]["seq"] == 1
    # Not a topic level: refused before connecting, saying which option.
    assert cli.main(["receive", "--config", str(config), "--id", "a/b", "--once", "--timeout", "1"]) == 2
    assert "--id: the device id 'a/b' contains '/'" in capsys.readouterr().err
