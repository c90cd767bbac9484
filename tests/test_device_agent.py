"""nnc_device.agent on CPython, against an in-process broker with umqtt.simple's client API
(tests/agent_support.py): a signed full model and a real update chain end bit-exact in the device
store; forged, replayed, unsigned and wrong-base publications are refused without touching a file;
a killed agent recovers; the rollout wave; reports and the last will. The same agent runs on
MicroPython against a real mosquitto in tests/test_agent_micropython.py."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import nnc_edge
from nnc_device.agent import Agent, client_id, public_key
from nnc_edge import signing
from transports import envelope, report

from agent_support import MODEL, Broker, Client, chain, publications
from test_device_store import assert_same_bits, small_model, snapshot, stored

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    key = signing.SigningKey.generate()
    steps = chain(nnc_edge.encode(small_model()), 3, tmp_path_factory.mktemp("host"))
    pubs = publications([s[0] for s in steps], key, 700)
    return key, steps, pubs


def run(agent, broker, limit=100000):
    """step() until the agent has nothing left to do."""
    for _ in range(limit):
        if not agent.step() and not agent.client.inbox:
            return
    raise AssertionError("the agent never went idle")


def device(broker, directory, key, device_id="board-1", **options):
    agent = Agent(Client(broker, client_id(device_id)), MODEL, str(directory), device_id,
                  trusted_keys=[key.public_pem()], log=None, **options)
    agent.start()
    return agent


def publish(broker, pub, before=None):
    """As transports.mqtt.Publisher does: the status announces the publication as pending (beside
    ``before``, the previous version's status), then its messages, then the new status."""
    status, payloads = pub
    pending = before or envelope.Status(MODEL)
    pending.pending = (status.seq, status.digest, len(payloads))
    broker.publish_status(pending)
    broker.publish_messages(status.seq, payloads)
    broker.publish_status(status)


@pytest.mark.parametrize("feed_bytes", [None, 64], ids=["whole-messages", "64-bytes-a-step"])
def test_signed_chain_applied_bit_exact_and_refusals_touch_nothing(setup, tmp_path, feed_bytes):
    key, steps, pubs = setup
    broker = Broker()
    agent = device(broker, tmp_path, key, feed_bytes=feed_bytes)
    assert broker.report("board-1")["state"] == "current" and broker.report("board-1")["seq"] == 0
    for k, (pub, (_, model)) in enumerate(zip(pubs, steps)):
        publish(broker, pub, envelope.parse_status(pubs[k - 1][0].payload()) if k else None)
        run(agent, broker)
        assert_same_bits(stored(tmp_path), {k: np.asarray(v) for k, v in model.items()}, pub[0].seq)
        rep = broker.report("board-1")
        assert (rep["state"], rep["seq"], rep["digest"]) == ("current", pub[0].seq, pub[0].digest.hex())
        assert rep["applied"]["seq"] == pub[0].seq and rep["applied"]["bytes"] > 0
    before = snapshot(tmp_path)

    # A forged signature on the next version (another publication's): refused on its first message.
    payloads = pubs[1][1]
    bad = envelope.messages(MODEL, envelope.UPDATE, 5, [envelope.parse(p).body for p in payloads], 4,
                            pubs[-1][0].digest, ext=envelope.parse(payloads[0]).ext)[1]
    broker.publish_messages(5, bad)
    run(agent, broker)
    assert broker.report("board-1")["state"] == "rejected"
    assert "signature" in broker.report("board-1")["error"]
    assert snapshot(tmp_path) == before

    # A replay: the status of version 1 put back; the device goes for the old full model and refuses it.
    current_status = broker.retained["nnc/kws/status"]
    broker.publish_status(pubs[0][0])
    run(agent, broker)
    rep = broker.report("board-1")
    assert rep["state"] == "rejected" and "replay" in rep["error"], rep
    assert snapshot(tmp_path) == before
    broker.publish("nnc/kws/status", current_status)
    run(agent, broker)
    assert broker.report("board-1")["state"] == "current"

    # An update for another model, genuinely signed: refused by the store's parent check.
    other = nnc_edge.decode(nnc_edge.encode(small_model(9)))
    from nnc_edge import updates
    data = updates.encode_update(other, {k: v + np.float32(0.5) if v.dtype == np.float32 else v
                                         for k, v in other.items()})
    sign = signing.envelope_signer(key)
    from transports.mqtt import split_bitstream
    d4 = pubs[-1][0].digest
    digest, payloads = envelope.messages(MODEL, envelope.UPDATE, 5, split_bitstream(data, 700), 4, d4,
                                         ext=lambda d: sign(MODEL, 5, d4, d))
    broker.publish_messages(5, payloads)
    broker.publish_status(envelope.Status(MODEL, 5, digest, 1, pubs[-1][0].counts + [len(payloads)]))
    run(agent, broker)
    rep = broker.report("board-1")
    assert rep["state"] == "rejected" and "applies to the model" in rep["error"], rep
    assert snapshot(tmp_path) == before


def test_unsigned_publication_refused(setup, tmp_path):
    key, steps, pubs = setup
    broker = Broker()
    agent = device(broker, tmp_path, key)
    status, payloads = pubs[0]
    unsigned = envelope.messages(MODEL, envelope.FULL, 1, [envelope.parse(p).body for p in payloads])[1]
    broker.publish_messages(1, unsigned)
    broker.publish_status(envelope.Status(MODEL, 1, status.digest, 1, [len(unsigned)]))
    run(agent, broker)
    rep = broker.report("board-1")
    assert rep["state"] == "rejected" and "not signed" in rep["error"]
    assert snapshot(tmp_path) == {}
    # The genuine publication of the same bytes is not ignored because of the unsigned copy.
    publish(broker, pubs[0])
    run(agent, broker)
    assert broker.report("board-1")["state"] == "current"


def test_an_unsigned_device_pauses_a_damaged_copy_and_refuses_a_bad_bitstream_for_good(setup, tmp_path):
    # Without trusted keys, as with them: content is refused for good only once the digest confirms
    # the bytes; a copy that is not what its envelope names (damaged on the way) only pauses its
    # digest, and the genuine publication of the same version is taken after the pause.
    import time

    key, steps, pubs = setup
    broker = Broker()
    agent = Agent(Client(broker, client_id("board-1")), MODEL, str(tmp_path), "board-1", log=None,
                  gap_timeout=0.05)
    agent.start()
    full = steps[0][0]
    pieces = [full[i:i + 500] for i in range(0, len(full), 500)]
    digest, payloads = envelope.messages(MODEL, envelope.FULL, 1, pieces)
    assert len(payloads) >= 3
    damaged = bytearray(payloads[0])
    damaged[-len(pieces[0])] ^= 0x40  # the first byte of its body: nnr_unit_size of the NNR_STR
    broker.publish_messages(1, [bytes(damaged)] + payloads[1:])
    broker.publish_status(envelope.Status(MODEL, 1, digest, 1, [len(payloads)]))
    run(agent, broker)
    rep = broker.report("board-1")
    assert rep["state"] == "failed" and "digest" in rep["error"], rep
    assert snapshot(tmp_path) == {}
    broker.publish_messages(1, payloads)  # the genuine copies now retained
    time.sleep(0.1)
    run(agent, broker)
    rep = broker.report("board-1")
    assert (rep["state"], rep["seq"]) == ("current", 1), rep
    assert_same_bits(stored(tmp_path), {k: np.asarray(v) for k, v in steps[0][1].items()}, 1)
    before = snapshot(tmp_path)

    # Version 2, a bitstream the decoder refuses in its first message (no NNR_STR), its digest its own:
    # the rest is still hashed, and then it is refused for good.
    bad = full[4:]
    bad_pieces = [bad[i:i + 500] for i in range(0, len(bad), 500)]
    digest2, payloads2 = envelope.messages(MODEL, envelope.FULL, 2, bad_pieces)
    broker.publish_messages(2, payloads2)
    broker.publish_status(envelope.Status(MODEL, 2, digest2, 2, [len(payloads2)]))
    run(agent, broker)
    rep = broker.report("board-1")
    assert rep["state"] == "rejected" and "before any NNR_STR" in rep["error"], rep
    time.sleep(0.1)
    run(agent, broker)
    rep = broker.report("board-1")
    assert (rep["state"], rep["seq"]) == ("rejected", 1), rep
    assert snapshot(tmp_path) == before


def test_killed_during_an_update_recovers(setup, tmp_path):
    key, steps, pubs = setup
    broker = Broker()
    agent = device(broker, tmp_path, key)
    publish(broker, pubs[0])
    run(agent, broker)
    publish(broker, pubs[1], envelope.parse_status(pubs[0][0].payload()))
    for _ in range(200):  # into the update, then the power goes
        agent.step()
        if agent.assembly is not None and agent.assembly.next >= 2:
            break
    assert agent.assembly is not None and not agent.assembly.complete
    broker.drop(agent.client)
    assert broker.report("board-1")["state"] == "offline"
    agent = device(broker, tmp_path, key)
    run(agent, broker)
    assert_same_bits(stored(tmp_path), {k: np.asarray(v) for k, v in steps[1][1].items()}, "after restart")
    assert broker.report("board-1")["state"] == "current"


def test_outside_the_wave_the_device_waits(setup, tmp_path):
    key, steps, pubs = setup
    ids = ["dev-%d" % i for i in range(40)]
    inside = [i for i in ids if report.bucket(i) < 3400]
    outside = [i for i in ids if i not in inside]
    broker = Broker()
    agents = {}
    for device_id in (inside[0], outside[0]):
        agents[device_id] = device(broker, tmp_path / device_id, key, device_id)
    publish(broker, pubs[0])
    status, payloads = pubs[1]
    broker.publish_messages(2, payloads)
    status.rollout = report.rollout_field(2, percent=34)
    broker.publish_status(status)
    for agent in agents.values():
        run(agent, broker)
    assert broker.report(inside[0])["state"] == "current" and broker.report(inside[0])["seq"] == 2
    assert broker.report(outside[0])["state"] == "waiting" and broker.report(outside[0])["seq"] == 1
    status.rollout = report.rollout_field(2, percent=34, devices=[outside[0]])
    broker.publish_status(status)
    run(agents[outside[0]], broker)
    assert broker.report(outside[0])["state"] == "current" and broker.report(outside[0])["seq"] == 2


def test_wave_and_report_definitions():
    assert report.bucket("board-1") == report.bucket("board-1")
    share = sum(report.in_wave("d%d" % i, {"from": 2, "percent": 34}) for i in range(2000)) / 2000
    assert 0.30 < share < 0.38
    # Widening keeps every device that was in.
    for i in range(200):
        if report.in_wave("d%d" % i, {"from": 2, "percent": 10}):
            assert report.in_wave("d%d" % i, {"from": 2, "percent": 50})
    # A receiver without a device id has no bucket: only a wave of every device takes it, unless halted.
    assert [report.highest_version(None, wave, 9) for wave in (
        None, {"from": 4, "percent": 99.9}, {"from": 4, "percent": 100}, {"from": 4, "percent": 100, "halted": True},
        {"from": 4, "devices": ["board-1"]})] == [9, 3, 9, 3, 3]
    assert client_id("board-1") == "nnc-edge-board-1"
    with pytest.raises(ValueError):
        client_id("a/b")
    with pytest.raises(ValueError):
        report.report_payload("x", "sleeping")
    assert report.parse_report(report.will_payload("x"))["state"] == "offline"
    with pytest.raises(Exception):
        report.parse_rollout({"from": 0})


def test_public_key_forms():
    key = signing.SigningKey.generate()
    assert public_key(key.public_pem()) == public_key(key.public_pem().decode()) == key.public_raw
    assert public_key(key.public_raw) == key.public_raw
    with pytest.raises(ValueError):
        public_key(key.private_pem())


def test_agent_imports_nothing_of_the_cpython_side():
    code = textwrap.dedent("""\
        import sys
        import nnc_device.agent, transports.report
        print(sorted(m for m in sys.modules
                     if m.split(".")[0] in ("nnc_edge", "numpy", "typing", "dataclasses", "asyncio", "logging")
                     or m.startswith("transports.mqtt")))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, check=True)
    assert proc.stdout.strip() == "[]"


class LossyClient(Client):
    """Loses the first delivery of one topic and delivers another twice."""

    def __init__(self, broker, client_id, lose, double):
        Client.__init__(self, broker, client_id)
        self.lose, self.double = lose, double

    def check_msg(self):
        if self.inbox and self.inbox[0][0] == self.lose:
            self.inbox.pop(0)
            self.lose = None
        elif self.inbox and self.inbox[0][0] == self.double:
            self.inbox.insert(1, self.inbox[0])
            self.double = None
        Client.check_msg(self)


def test_gap_refetched_and_duplicates_dropped(setup, tmp_path):
    import time
    key, steps, pubs = setup
    broker = Broker()
    client = LossyClient(broker, client_id("board-1"), "nnc/kws/seq/1/1", "nnc/kws/seq/1/2")
    agent = Agent(client, MODEL, str(tmp_path), "board-1", trusted_keys=[key.public_raw], gap_timeout=0.05,
                  log=None)
    agent.start()
    assert len(pubs[0][1]) > 3
    publish(broker, pubs[0])
    run(agent, broker)
    assert agent.assembly is not None and agent.assembly.missing()[0] == 1  # waiting for message 1
    deadline = time.monotonic() + 10
    while broker.report("board-1")["state"] != "current" and time.monotonic() < deadline:
        run(agent, broker)
        time.sleep(0.01)
    assert broker.report("board-1")["seq"] == 1
    assert_same_bits(stored(tmp_path), {k: np.asarray(v) for k, v in steps[0][1].items()}, "after the gap")


def test_a_restore_of_the_version_held_is_taken_without_a_download(setup, tmp_path):
    """A full model that restores version 1 (``nnc-edge rollback --to 1``): an agent at version 1
    commits its index again with the new version, its tensor files untouched; an agent without a
    model downloads it as any full model."""
    from nnc_device.store import read_index
    key, steps, pubs = setup
    broker = Broker()
    holder = device(broker, tmp_path / "holder", key, "holder")
    publish(broker, pubs[0])
    run(holder, broker)
    before = snapshot(tmp_path / "holder")
    status1 = pubs[0][0]
    sign = signing.envelope_signer(key)
    from transports.mqtt import split_bitstream
    digest, payloads = envelope.messages(MODEL, envelope.FULL, 3, split_bitstream(steps[0][0], 700), 1,
                                         status1.digest, ext=lambda d: sign(MODEL, 3, status1.digest, d))
    restore = (envelope.Status(MODEL, 3, digest, 3, [len(payloads)]), payloads)
    publish(broker, restore, envelope.parse_status(status1.payload()))
    fed = []
    original = holder._begin
    holder._begin = lambda env: (fed.append(env.seq), original(env))[1]
    run(holder, broker)
    rep = broker.report("holder")
    assert (rep["state"], rep["seq"], rep["digest"]) == ("current", 3, digest.hex())
    assert rep["applied"]["kind"] == "restore" and rep["applied"]["bytes"] == 0 and fed == []
    after = snapshot(tmp_path / "holder")
    index = read_index(str(tmp_path / "holder"))
    assert index["meta"] == {"model": MODEL, "seq": 3, "digest": digest.hex(), "kind": "restore"}
    # The same tensor files, byte for byte; only the index is new.
    assert {n: b for n, b in after.items() if not n.startswith("index")} == \
        {n: b for n, b in before.items() if not n.startswith("index")}
    assert [n for n in after if n.startswith("index")] == ["index%d.json" % index["generation"]]
    # A restarted agent knows its version.
    again = device(broker, tmp_path / "holder", key, "holder")
    assert again.version == (3, digest)

    newcomer = device(broker, tmp_path / "new", key, "newcomer")
    run(newcomer, broker)
    rep = broker.report("newcomer")
    assert (rep["state"], rep["seq"], rep["applied"]["kind"]) == ("current", 3, "full")
    assert rep["applied"]["bytes"] >= len(steps[0][0])  # large units re-cut into partial-data units
    assert_same_bits(stored(tmp_path / "new"), {k: np.asarray(v) for k, v in steps[0][1].items()}, 3)


def test_a_pending_version_outside_the_wave_does_not_stream_in(setup, tmp_path):
    key, steps, pubs = setup
    broker = Broker()
    outside = next(i for i in ("dev-%d" % n for n in range(40)) if report.bucket(i) >= 5000)
    agent = device(broker, tmp_path, key, outside)
    publish(broker, pubs[0])
    run(agent, broker)
    # Version 2 under way, for half the fleet: the agent at the newest version does not subscribe to it.
    pending = envelope.parse_status(pubs[0][0].payload())
    pending.pending = (2, pubs[1][0].digest, len(pubs[1][1]))
    pending.rollout = report.rollout_field(2, percent=50)
    broker.publish_status(pending)
    run(agent, broker)
    assert agent.target is None
    broker.publish_messages(2, pubs[1][1])
    run(agent, broker)
    assert agent.version[0] == 1 and agent.assembly is None
