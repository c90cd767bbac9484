"""Chain compaction (issue #17) through a real mosquitto: ``Publisher(compact_at=...)`` / ``nnc-edge publish
--compact-at`` publishes the current model again as a full model once the updates since the last full model
pass the threshold. Devices current at the compacted version (an ``nnc-edge receive`` receiver and an
nnc_device.agent on CPython over paho-mqtt) switch to it without downloading, devices that join later download
only it, and the next chain (``nnc-edge update --residual`` with the state file the publisher restarted)
applies on all of them bit for bit; signed throughout. Below the threshold, while a staged rollout is in
progress, and with ``--compact-at 0`` nothing is compacted; an update that continues the old chain's decoder
state is refused after a compaction."""

import asyncio
import os
import re
import shutil

import numpy as np
import pytest

import nnc_edge
from nnc_edge import cli, modelio, signing
from nnc_edge.encoder.encoding import encode
from nnc_edge.updates import ChainState, encode_update, model_digest, read_update_info
from transports.chain_record import ChainRecord
from transports.envelope import FULL, UPDATE
from transports.mqtt import Publisher, PublishError, Receiver
from transports.mqtt.model_store import ModelStore

from mqtt_broker import Mosquitto
from test_mqtt import pytestmark  # noqa: F401 (skipped without mosquitto, as test_mqtt.py)
from test_mqtt import assert_model, retained_topics, run, settings_for
from test_rollback import Counted
from test_rollout import (AgentDevice, ReceiverDevice, ThreadedDevice, base_args, current_status, publication,
                          reports_until)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


# --- the host's models: files, as nnc-edge update takes them ----------------------------------------
class Host:
    """A model in files and the host's chain state: ``step()`` fine-tunes the current model and makes the
    update with ``nnc-edge update --residual``; ``views[i]``: the model after version i + 1, bit for bit."""

    def __init__(self, directory, seed=0):
        self.dir = directory
        self.rng = np.random.default_rng(seed)
        model = {"enc.weight": (0.1 * self.rng.normal(size=(160, 96))).astype(np.float32),
                 "enc.bias": (0.1 * self.rng.normal(size=160)).astype(np.float32),
                 "head.weight": (0.1 * self.rng.normal(size=(12, 160))).astype(np.float32)}
        self.full = str(directory / "m1.nnc")
        with open(self.full, "wb") as f:
            f.write(encode(model))
        self.current = str(directory / "m1.safetensors")
        modelio.save(self.current, nnc_edge.decode(self.full))
        self.state = str(directory / "chain.state")
        self.n = 1

    def step(self, scale=0.02):
        """(the update's path, its record): the next update, made by the nnc-edge update command."""
        tuned = {k: (v + scale * self.rng.normal(size=v.shape)).astype(np.float32)
                 for k, v in modelio.load(self.current).items()}
        self.n += 1
        new = str(self.dir / ("t%d.safetensors" % self.n))
        modelio.save(new, tuned)
        out, result = str(self.dir / ("u%d.nnc" % self.n)), str(self.dir / ("m%d.safetensors" % self.n))
        assert cli.main(["update", "--base", self.current, "--new", new, "-o", out, "--residual", self.state,
                         "--result", result]) == 0
        self.current = result
        with open(out, "rb") as f:
            return out, read_update_info(f.read())

    def view(self):
        return modelio.load(self.current)


def read(path):
    with open(path, "rb") as f:
        return f.read()


class SignedReceiver(ReceiverDevice):
    """``nnc-edge receive --id ... --trusted-key``'s receiver with an event loop of its own; ``counted.kinds``
    lists the writer of every publication it began (RestoreWriter: taken without a download)."""

    def __init__(self, broker, directory, model, device_id, public):
        self.store = ModelStore(directory, model, threads=1)
        self.counted = Counted(self.store)
        verify = signing.envelope_verifier(signing.TrustedKeys([public]),
                                           lambda: self.store.version[0] if self.store.version else None)
        self.rx = Receiver(self.store, gap_timeout=2.0, device_id=device_id, verify=verify)
        self.settings = settings_for(broker)
        ThreadedDevice.__init__(self)  # ReceiverDevice's thread and event loop, this store and receiver


def all_at(settings, model, ids, seq):
    return run(reports_until(settings, model, lambda got: all(got.get(d, {}).get("seq") == seq
                                                             and got[d]["state"] == "current" for d in ids),
                             "%s at version %d" % (", ".join(ids), seq)))


def agent_model(directory):
    """The model an nnc_device.agent store holds, as arrays."""
    from nnc_device.store import read_index
    index = read_index(str(directory))
    out = {}
    for t in index["tensors"]:
        out[t["name"]] = np.fromfile(os.path.join(str(directory), t["file"]), dtype=t["dtype"]).reshape(t["shape"])
    return out


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.array_equal(np.ascontiguousarray(got[name]).view(np.uint8),
                              np.ascontiguousarray(want[name]).view(np.uint8)), name


class GatedPublisher(Publisher):
    """Waits for ``gate(status)`` before it may compact: devices reach the update first, as when they are
    current."""

    gate = None

    async def _compact(self, status):
        if self.gate is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.gate, status)
        return await Publisher._compact(self, status)


# --- the scenario ------------------------------------------------------------------------------------
def test_compaction_with_current_devices_and_late_joiners(broker, tmp_path):
    model = "compact"
    settings = settings_for(broker)
    host = Host(tmp_path, seed=41)
    key = signing.SigningKey.generate()
    public = key.public_raw
    record = ChainRecord(tmp_path / "record", "nnc", model)
    publisher = GatedPublisher(settings, model, max_message_bytes=2048, record=record, compact_at=0.5,
                               chain_state=host.state, sign=signing.envelope_signer(key),
                               ext_bytes=signing.EXT_BYTES)
    current = {"cur-r": SignedReceiver(broker, tmp_path / "cur-r", model, "cur-r", public),
               "cur-a": AgentDevice(broker, tmp_path / "cur-a", model, "cur-a", trusted_keys=[key.public_pem()])}
    late = {}
    try:
        status = run(publisher.publish(read(host.full)))
        assert publisher.compaction is None
        all_at(settings, model, current, 1)

        # Updates until they add up to more than 50% of the full model and the full model of the current
        # version (exact: the moved tensors as float32 values) is smaller than the full model and the updates.
        # Each time the devices reach the update before the publisher may compact.
        old_state = str(tmp_path / "old-chain.state")
        sizes = [record.bitstream_bytes(record.top)]  # as published (NDUs re-cut to fit the messages)

        def gate(status):
            sizes.append(record.bitstream_bytes(record.top))
            all_at(settings, model, current, status.seq)
        publisher.gate = gate
        for seq in range(2, 12):
            path, info = host.step()
            shutil.copy(host.state, old_state)  # the old chain's state, at the model of the update
            assert info.sequence == seq - 1 and info.continues_state == (seq > 2)
            status = run(publisher.publish(read(path), UPDATE))
            if publisher.compaction is not None:
                break
            assert (status.seq, status.full_seq) == (seq, 1)
        publisher.gate = None
        n = seq  # the update compacted, then version n + 1
        c = publisher.compaction
        assert c is not None and n > 2
        assert (status.seq, status.full_seq, len(status.counts), status.rollout) == (n + 1, n + 1, 1, None)
        assert (c.seq, c.restores, c.full_seq, c.update.seq, c.state_restarted) == (n + 1, n, 1, n, True)
        updates = sum(sizes[1:])
        assert (c.update_bytes, c.full_bytes) == (updates, sizes[0])
        assert updates > 0.5 * c.full_bytes and c.bytes < c.full_bytes + updates
        assert "compacted: version %d is the full model of version %d" % (n + 1, n) in c.describe()
        envs, data = run(publication(settings, model, n + 1))
        assert all(e.kind == FULL and e.parent_seq == n for e in envs) and len(data) == c.bytes
        signing.envelope_verifier(signing.TrustedKeys([public]))(envs[0])
        assert model_digest(nnc_edge.decode(data)) == model_digest(host.view())
        # The record and the broker's retained chain restart at version n + 1.
        rec = ChainRecord(tmp_path / "record", "nnc", model).load()
        assert [(v.seq, v.kind, v.restores[0], v.compacts) for v in rec.versions] == [(n + 1, FULL, n, True)]
        assert rec.versions[0].model == model_digest(host.view())
        retained = run(retained_topics(settings, "nnc/%s/seq" % model))
        assert retained and all(t.startswith("nnc/%s/seq/%d/" % (model, n + 1)) for t in retained)
        # The host's chain state starts a new chain at version n's model, its residual kept.
        state = ChainState.load(host.state)
        assert (state.sequence, state.root, state.model) == (0, model_digest(host.view()), state.root)
        assert not state.bases and state.residual

        # The current devices switch to version n + 1 without downloading it.
        got = all_at(settings, model, current, n + 1)
        for d in current:
            assert got[d]["applied"]["kind"] == "restore" and got[d]["applied"]["bytes"] == 0, got[d]
        assert current["cur-r"].counted.kinds[-1] == (n + 1, "RestoreWriter")
        assert_model(current["cur-r"].store.path, host.view())
        assert_same(agent_model(tmp_path / "cur-a"), host.view())

        # An update that continues the old chain's decoder state is refused: devices that join at version
        # n + 1 do not have it.
        old_update = encode_update(host.view(), {k: v + np.float32(0.01) for k, v in host.view().items()},
                                   residual=old_state)
        assert read_update_info(old_update).continues_state
        with pytest.raises(PublishError, match="continues the decoder state .* Start a new chain"):
            run(publisher.publish(old_update, UPDATE))

        # Late joiners download version n + 1 only.
        late = {"late-r": SignedReceiver(broker, tmp_path / "late-r", model, "late-r", public),
                "late-a": AgentDevice(broker, tmp_path / "late-a", model, "late-a", trusted_keys=[key.public_pem()])}
        got = all_at(settings, model, late, n + 1)
        assert late["late-r"].counted.kinds == [(n + 1, "FullModelWriter")]
        assert got["late-a"]["applied"]["kind"] == FULL and got["late-a"]["applied"]["seq"] == n + 1
        assert_model(late["late-r"].store.path, host.view())
        assert_same(agent_model(tmp_path / "late-a"), host.view())

        # The next chain starts at version n's model and applies everywhere, bit for bit: its first update uses
        # no decoder state, the ones after it continue the new chain's (TCA, HDSP).
        publisher.compact_at = 100.0
        devices = dict(current, **late)
        for i in range(1, 5):
            path, info = host.step()
            assert (info.sequence, info.root, info.continues_state) == (i, state.root, i > 1)
            status = run(publisher.publish(read(path), UPDATE))
            assert (status.seq, status.full_seq, publisher.compaction) == (n + 1 + i, n + 1, None)
            got = all_at(settings, model, devices, n + 1 + i)
        for d in ("cur-r", "late-r"):
            assert_model(devices[d].store.path, host.view())
            assert devices[d].counted.kinds[-1] == (n + 5, "UpdateWriter")
        for d in ("cur-a", "late-a"):
            assert_same(agent_model(tmp_path / d), host.view())
            assert got[d]["applied"]["kind"] == UPDATE
    finally:
        for device in list(current.values()) + list(late.values()):
            device.close()


def publish_until_compacted(host, args, tries, scale=0.02):
    """Publish updates with ``args`` until one is compacted: (its version, the command's output, the log of
    the ones before)."""
    before = ""
    for _ in range(tries):
        path, _ = host.step(scale)
        assert cli.main(["publish", path] + args) == 0
        out = cli_output.get()
        if "compacted:" in out.out:
            return int(re.search(r" nnc/[^:]+: update (\d+),", out.out).group(1)), out, before
        before += out.err
    raise AssertionError("not compacted after %d updates" % tries)


def test_compaction_thresholds_waves_and_refusals_on_the_command_line(broker, tmp_path, capsys):
    model = "compact-cli"
    settings = settings_for(broker)
    host = Host(tmp_path, seed=42)
    args = base_args(broker, model, tmp_path / "record")
    cli_output.get = capsys.readouterr
    assert cli.main(["publish", host.full] + args) == 0
    full_bytes = os.path.getsize(host.full)

    # Below the threshold (default 50%): not compacted, nothing said.
    path, _ = host.step(0.003)
    assert cli.main(["publish", path] + args) == 0
    out = capsys.readouterr()
    assert os.path.getsize(path) < 0.5 * full_bytes and "compacted" not in out.out + out.err
    # --compact-at 0: never compacted, whatever the updates add up to.
    for _ in range(3):
        path, _ = host.step()
        assert cli.main(["publish", path] + args + ["--compact-at", "0"]) == 0
    assert "compacted" not in capsys.readouterr().err
    assert run(current_status(settings, model)).full_seq == 1

    # A staged rollout in progress: not compacted, and the log says why.
    path, _ = host.step()
    assert cli.main(["publish", path] + args + ["--rollout", "50"]) == 0
    out = capsys.readouterr()
    assert "not compacted" in out.err and "staged rollout is in progress" in out.err and "compacted:" not in out.out
    status = run(current_status(settings, model))
    assert (status.seq, status.full_seq) == (6, 1)
    assert cli.main(["rollout", "--percent", "100", "-q"] + args) == 0

    # Above the threshold, without --residual: compacted once the full model is the smaller download (the log
    # says why not before), and the next update must start a new chain.
    n, out, before = publish_until_compacted(host, args, 6)
    assert "compacted: version %d is the full model of version %d" % (n + 1, n) in out.out
    assert "the updates since version 1 were" in out.out and "the next update starts a new chain" in out.out
    status = run(current_status(settings, model))
    assert (status.seq, status.full_seq) == (n + 1, n + 1)
    sizes = sum(os.path.getsize(str(tmp_path / ("u%d.nnc" % i))) for i in range(2, n + 1))
    assert "%d bytes, %.0f%% of its %d" % (sizes, 100.0 * sizes / full_bytes, full_bytes) in out.out
    if n > 7:
        assert "not less than the" in before  # the updates before it did not make compaction worth it

    # The old chain's next update is refused (exit 2), with the way on.
    path, info = host.step()
    assert info.continues_state
    assert cli.main(["publish", path] + args) == 2
    err = capsys.readouterr().err
    assert "continues the decoder state (TCA, HDSP) of a chain that started before version %d" % (n + 1) in err
    assert "nnc-edge update with a new --residual state file" in err

    # A new chain from version n's model (a new state file) is taken; --residual restarts it at the next
    # compaction.
    host.current = str(tmp_path / ("m%d.safetensors" % n))
    host.state = str(tmp_path / "new-chain.state")
    path, info = host.step()
    assert (info.sequence, info.continues_state) == (1, False)
    assert cli.main(["publish", path] + args + ["--residual", host.state]) == 0
    capsys.readouterr()
    m, out, _ = publish_until_compacted(host, args + ["--residual", host.state, "--compact-at", "60"], 10)
    assert "compacted: version %d is the full model of version %d" % (m + 1, m) in out.out
    assert "the next update starts a new chain" not in out.out
    state = ChainState.load(host.state)
    assert (state.sequence, state.root) == (0, model_digest(host.view()))
    path, info = host.step()
    assert (info.sequence, info.root, info.continues_state) == (1, state.root, False)
    assert cli.main(["publish", path] + args + ["--residual", host.state, "-q"]) == 0
    status = run(current_status(settings, model))
    assert (status.seq, status.full_seq) == (m + 2, m + 1)

    # A device that joins now downloads the compacted full model and the new chain's update.
    async def joiner():
        from test_mqtt import Device
        device = Device(settings, tmp_path / "joiner", model)
        counted = Counted(device.store)
        await device.at(status)
        await device.close()
        return counted.kinds
    assert run(joiner()) == [(m + 1, "FullModelWriter"), (m + 2, "UpdateWriter")]
    assert_model(str(tmp_path / "joiner" / "model.safetensors"), host.view())


class cli_output:
    get = None
