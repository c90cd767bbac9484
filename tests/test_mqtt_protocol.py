"""The MQTT delivery protocol without a broker: envelopes, the status, cutting bitstreams into
messages, reassembly, and the receiver's decisions (transports.envelope, transports.mqtt)."""

import asyncio
import hashlib
import json
import logging
import os
import random
import struct

import numpy as np
import pytest

import nnc_edge
from decoder_core import NNCError
from decoder_core.tables import NNR_NDU
from decoder_core.units import ParserState, parse_unit
from nnc_edge import modelio
from nnc_edge.encoder import unitwriter
from nnc_edge.encoder.encoding import encode
from transports import envelope, mqtt
from transports.envelope import FULL, UPDATE, Assembly

MODEL = "kws"


def _digest(data):
    return hashlib.sha256(data).digest()


def _units(data, state=None):
    """(offset, unit) of every top-level unit; parsing proves each is whole."""
    state = state or ParserState()
    offset, out = 0, []
    while offset < len(data):
        unit = parse_unit(data, offset, len(data), state)
        out.append((offset, unit))
        offset += unit.nnr_unit_size
    return out


def _same_tensors(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert np.array_equal(got[name].view(np.uint8), want[name].view(np.uint8)), name


# --- envelope -------------------------------------------------------------------------------------
def test_envelope_round_trip():
    bodies = [b"\x00\x05abc", b"\x00\x03d", b"\x00\x04ef"]
    parent = _digest(b"parent")
    digest, payloads = envelope.messages("kws-ü", UPDATE, 7, bodies, 6, parent)
    assert digest == _digest(b"".join(bodies))
    offset = 0
    for i, payload in enumerate(payloads):
        env = envelope.parse(payload)
        assert (env.model, env.kind, env.seq, env.parent_seq, env.index, env.count) == ("kws-ü", UPDATE, 7, 6, i, 3)
        assert (env.offset, env.total, env.digest, env.parent_digest) == (offset, 12, digest, parent)
        assert bytes(env.body) == bodies[i] and env.ext == b""
        assert len(payload) == envelope.header_bytes("kws-ü") + len(bodies[i])
        offset += len(bodies[i])
    full = envelope.parse(envelope.messages(MODEL, FULL, 1, [b"xy"])[1][0])
    assert (full.kind, full.parent_seq, full.parent_digest) == (FULL, 0, envelope.NO_DIGEST)


def _patched(payload, offset, fmt, value):
    b = bytearray(payload)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize("edit, element", [
    (lambda p: p[:50], "envelope header"),
    (lambda p: b"XX" + p[2:], "envelope magic"),
    (lambda p: _patched(p, 2, ">B", 2), "envelope version"),
    (lambda p: _patched(p, 3, ">B", 0x81), "envelope flags"),
    (lambda p: _patched(p, 4, ">I", 0), "envelope seq"),
    (lambda p: _patched(p, 8, ">I", 9), "envelope parent_seq"),
    (lambda p: _patched(p, 12, ">H", 2), "envelope index"),
    (lambda p: _patched(p, 14, ">H", 0), "envelope index"),
    (lambda p: _patched(p, 16, ">I", 5), "envelope offset"),
    (lambda p: _patched(p, 20, ">I", 3), "envelope offset"),
    (lambda p: _patched(p, 88, ">B", 200), "envelope model_len"),
    (lambda p: _patched(p, 91, ">B", 0xFF), "envelope model"),
])
def test_envelope_rejects_malformed_headers(edit, element):
    payload = envelope.messages(MODEL, UPDATE, 5, [b"0123456789"], 4, _digest(b"p"))[1][0]
    with pytest.raises(NNCError) as info:
        envelope.parse(edit(payload))
    assert info.value.element == element


def test_full_model_envelope_with_a_parent_is_refused():
    payload = envelope.messages(MODEL, FULL, 5, [b"0123"])[1][0]
    with pytest.raises(NNCError) as info:
        envelope.parse(_patched(payload, 8, ">I", 4))
    assert info.value.element == "envelope parent_seq"
    with pytest.raises(ValueError):
        envelope.messages(MODEL, UPDATE, 5, [b"0123"], 5, _digest(b"p"))
    with pytest.raises(ValueError):
        envelope.messages("a/b", FULL, 5, [b"0123"])


def test_status_round_trip_and_rejects():
    st = envelope.Status(MODEL, 7, _digest(b"v7"), 5, [3, 1, 1], (8, _digest(b"v8"), 2))
    got = envelope.parse_status(st.payload(), MODEL)
    assert (got.seq, got.digest, got.full_seq, got.counts, got.pending) == (7, st.digest, 5, [3, 1, 1], st.pending)
    assert got.chain() == [(5, 3), (6, 1), (7, 1)]
    empty = envelope.parse_status(envelope.Status(MODEL).payload(), MODEL)
    assert (empty.seq, empty.digest, empty.chain()) == (0, None, [])
    good = json.loads(st.payload())
    for change, element in [({"v": 2}, "status v"), ({"model": "other"}, "status model"),
                            ({"seq": -1}, "status seq"), ({"digest": "zz"}, "status digest"),
                            ({"full_seq": 8}, "status full_seq"), ({"counts": [3, 1]}, "status counts"),
                            ({"counts": [3, 0, 1]}, "status counts"), ({"pending": 5}, "status pending")]:
        bad = dict(good, **change)
        with pytest.raises(NNCError) as info:
            envelope.parse_status(json.dumps(bad).encode(), MODEL)
        assert info.value.element == element, change
    with pytest.raises(NNCError):
        envelope.parse_status(b"\xff{", MODEL)


# --- cutting bitstreams into messages ---------------------------------------------------------------
@pytest.mark.parametrize("name, limit", [("p1_real_silero_vad", 4096), ("p1_real_silero_vad", 1000),
                                         ("p0_entrypoints_scan2", 600), ("p1_model_dict", 300)])
def test_split_keeps_units_whole_and_decodes_the_same(conformance_dir, name, limit):
    data = (conformance_dir / (name + ".nnc")).read_bytes()
    bodies = mqtt.split_bitstream(data, limit)
    assert all(len(b) <= limit for b in bodies)
    state = ParserState()  # what the decoder keeps from one unit to the next
    for body in bodies:
        _units(body, state)  # every body is whole units
    joined = b"".join(bodies)
    _same_tensors(nnc_edge.decode(joined), nnc_edge.decode(data))
    big = [u for _, u in _units(data) if u.nnr_unit_size > limit]
    if big:
        parts = [u for _, u in _units(joined) if u.nnr_unit_type == NNR_NDU and u.partial_data_counter]
        assert parts and all(u.nnr_unit_size <= limit for u in parts)
    else:
        assert joined == data


def test_split_resplits_an_oversized_partial_sequence(conformance_dir):
    data = (conformance_dir / "p1_real_silero_vad.nnc").read_bytes()
    once = b"".join(mqtt.split_bitstream(data, 20000))   # partial units of up to 20000 bytes
    bodies = mqtt.split_bitstream(once, 3000)
    assert all(len(b) <= 3000 for b in bodies)
    _same_tensors(nnc_edge.decode(b"".join(bodies)), nnc_edge.decode(data))
    assert b"".join(mqtt.split_bitstream(once, 30000)) == once  # parts that fit are kept as they are


def test_split_refuses_what_cannot_fit(conformance_dir):
    data = (conformance_dir / "p1_real_silero_vad.nnc").read_bytes()
    with pytest.raises(ValueError, match="255") as info:
        mqtt.split_bitstream(data, 200)
    least = info.value.min_body_bytes  # 58364-byte NDU: 255 parts of at least 229 bytes
    with pytest.raises(mqtt.MessageTooSmall):
        mqtt.split_bitstream(data, least - 1)
    assert max(map(len, mqtt.split_bitstream(data, least))) <= least
    with pytest.raises(ValueError, match="only NDUs"):
        mqtt.split_bitstream(unitwriter.start_unit(1) + unitwriter.nnr_unit(40, b"", b"\x00" * 100), 40)
    with pytest.raises(NNCError):
        mqtt.split_bitstream(data[:-10], 4096)
    cut = b"".join(mqtt.split_bitstream(data, 20000))
    o, u = [(o, u) for o, u in _units(cut) if u.partial_data_counter][1]
    with pytest.raises(NNCError) as info:  # a partial unit left out of its sequence
        mqtt.split_bitstream(cut[:o] + cut[o + u.nnr_unit_size:], 20000)
    assert info.value.element == "partial_data_counter"
    with pytest.raises(ValueError):
        mqtt.Publisher(mqtt.BrokerSettings("mqtt://127.0.0.1:1"), MODEL, max_message_bytes=100)


def test_broker_urls():
    s = mqtt.BrokerSettings("mqtts://dev%40x:p%3Aw@127.0.0.1")
    assert (s.tls, s.host, s.port, s.username, s.password) == (True, "127.0.0.1", 8883, "dev@x", "p:w")
    s = mqtt.BrokerSettings("localhost:1999", cafile="ca.crt")
    assert (s.tls, s.host, s.port) == (True, "localhost", 1999)
    assert mqtt.BrokerSettings("mqtt://h").port == 1883
    for bad in ("http://h", "mqtt://", "mqtt://h/topic", "mqtt://h:99999"):
        with pytest.raises(ValueError):
            mqtt.BrokerSettings(bad)
    with pytest.raises(ValueError):
        mqtt.BrokerSettings("mqtt://h", cert="c.pem")


# --- reassembly -----------------------------------------------------------------------------------
def _publication(data, limit=500, kind=FULL, seq=1, parent=(0, envelope.NO_DIGEST), model=MODEL):
    bodies = mqtt.split_bitstream(data, limit - envelope.header_bytes(model))
    digest, payloads = envelope.messages(model, kind, seq, bodies, parent[0], parent[1])
    return digest, [envelope.parse(p) for p in payloads], payloads


def test_assembly_puts_messages_in_order_once(conformance_dir):
    data = (conformance_dir / "p1_model_dict.nnc").read_bytes()
    _, envs, _ = _publication(data)
    assert len(envs) > 5
    order = list(range(len(envs)))
    random.Random(1).shuffle(order)
    order += order[:4]  # and some duplicates
    a = Assembly(envs[0])
    out = []
    for i in order:
        out.extend(a.add(envs[i]))
    assert a.complete and a.duplicates == 4 and b"".join(out) == b"".join(bytes(e.body) for e in envs)
    a.check()


def test_assembly_refuses_corruption(conformance_dir):
    data = (conformance_dir / "p1_model_dict.nnc").read_bytes()
    _, envs, payloads = _publication(data)
    a = Assembly(envs[0])
    bad = bytearray(payloads[1])
    bad[-1] ^= 1
    for i, env in enumerate(envs):
        a.add(envelope.parse(bytes(bad)) if i == 1 else env)
    with pytest.raises(NNCError) as info:
        a.check()
    assert info.value.element == "envelope digest"
    other = _publication(data, seq=2)[1]
    with pytest.raises(NNCError):
        Assembly(envs[0]).add(other[1])
    small = Assembly(envs[0], max_buffered=envelope.held_size(envs[2]) + envelope.held_size(envs[3]) - 1)
    small.add(envs[2])
    with pytest.raises(NNCError) as info:
        small.add(envs[3])
    assert info.value.element == "envelope index" and small.missing() == list(range(0, 2)) + list(range(3, len(envs)))


# --- the receiver's decisions, messages handed in directly ----------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _model(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"conv.weight": (scale * rng.normal(size=(16, 8, 3))).astype(np.float32),
            "fc.weight": (scale * rng.normal(size=(300, 40))).astype(np.float32),
            "fc.bias": (scale * rng.normal(size=40)).astype(np.float32)}


def add_decoded(base, update):
    """The apply rule these tests plug in: the update's tensors decoded and added."""
    diff = nnc_edge.decode(update)
    return {k: (v + diff[k]).astype(np.float32) if k in diff else v for k, v in base.items()}


class Host:
    """Builds publications and the device's expected model, as the publisher numbers them."""

    def __init__(self, limit=2000):
        self.limit = limit
        self.version = (0, envelope.NO_DIGEST)
        self.expected = None
        self.full_seq = 0
        self.counts = []

    def full(self, tensors):
        data = encode(tensors)
        self.expected = nnc_edge.decode(data)
        return self._publish(data, FULL)

    def update(self, diff):
        data = encode(diff)
        self.expected = add_decoded(self.expected, data)
        return self._publish(data, UPDATE)

    def _publish(self, data, kind):
        seq = self.version[0] + 1
        parent = self.version if kind == UPDATE else (0, envelope.NO_DIGEST)
        digest, envs, payloads = _publication(data, self.limit, kind, seq, parent)
        self.version = (seq, digest)
        if kind == FULL:
            self.full_seq, self.counts = seq, []
        self.counts.append(len(payloads))
        return seq, payloads

    def status(self):
        return envelope.Status(MODEL, self.version[0], self.version[1], self.full_seq, self.counts).payload()


def _receiver(tmp_path, clock=None, **kw):
    store = mqtt.ModelStore(tmp_path / "device", MODEL, apply_update=add_decoded, threads=1)
    return mqtt.Receiver(store, gap_timeout=5.0, clock=clock or Clock(), **kw)


def _deliver(rx, seq, payloads, order=None):
    async def go():
        for i in (order if order is not None else range(len(payloads))):
            await rx.handle(rx.topics.data(seq, i), payloads[i])
    asyncio.run(go())


def test_receiver_applies_shuffled_and_duplicated_messages_once(tmp_path, caplog):
    host = Host()
    rx = _receiver(tmp_path)
    assert rx.subscription() is None  # no model, no status yet: nothing to ask for
    seq, payloads = host.full(_model(1))
    rx.on_status(host.status())
    assert rx.subscription() == "nnc/kws/seq/1/+"
    order = list(range(len(payloads))) * 2
    random.Random(2).shuffle(order)
    with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"):
        _deliver(rx, seq, payloads, order)
    assert [a[:2] for a in rx.applied] == [(1, FULL)]
    assert "duplicates dropped" in caplog.text
    _same_tensors(modelio.load(rx.store.path), host.expected)
    assert rx.subscription() == "nnc/kws/seq/2/+" and rx.up_to_date
    for k in range(2, 5):
        seq, payloads = host.update(_model(k, 0.01))
        _deliver(rx, seq, payloads, reversed(range(len(payloads))))  # out of order
        _deliver(rx, seq, payloads)                       # and everything again (QoS 1 redelivery)
        _same_tensors(modelio.load(rx.store.path), host.expected)
    assert [a[:2] for a in rx.applied] == [(1, FULL), (2, UPDATE), (3, UPDATE), (4, UPDATE)]
    # A restarted device reads its version back from the model file.
    again = mqtt.ModelStore(tmp_path / "device", MODEL)
    assert again.version == host.version


def _file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_receiver_abandons_a_gap_after_the_timeout(tmp_path, caplog):
    host = Host(limit=600)
    clock = Clock()
    rx = _receiver(tmp_path, clock)
    seq, payloads = host.full(_model(1))
    rx.on_status(host.status())
    _deliver(rx, seq, payloads)
    before = _file_bytes(rx.store.path)
    seq, payloads = host.update(_model(2, 0.01))
    assert len(payloads) >= 3
    _deliver(rx, seq, payloads, [i for i in range(len(payloads)) if i != 1])  # message 1 never comes
    clock.now += 4.0
    rx.tick()
    assert rx.assembly is not None and not rx.resubscribe  # still waiting
    clock.now += 2.0
    rx.tick()  # first the retained copies are asked for again ...
    assert rx.assembly is not None and rx.resubscribe
    rx.resubscribe = False
    _deliver(rx, seq, payloads, [0, 2])  # ... which brings only duplicates
    clock.now += 5.5
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        rx.tick()  # ... then the update is given up
    assert rx.assembly is None and rx.resubscribe
    assert "messages 1 of %d missing" % len(payloads) in caplog.text and "stays at version 1" in caplog.text
    assert _file_bytes(rx.store.path) == before
    assert os.listdir(rx.store.directory) == ["model.safetensors"]  # no temporary file left behind
    # The retained messages come again on resubscribing, and this time all of them.
    _deliver(rx, seq, payloads)
    _same_tensors(modelio.load(rx.store.path), host.expected)


def _at_version_1(tmp_path):
    """(host, receiver): the device has the host's full model 1."""
    host = Host()
    rx = _receiver(tmp_path)
    seq, payloads = host.full(_model(1))
    rx.on_status(host.status())
    _deliver(rx, seq, payloads)
    return host, rx


def _damaged(payload, at):
    """A copy of a message whose body byte ``at`` (negative: from the end) changed: the same
    envelope, other bytes."""
    body = envelope.parse(payload).body
    bad = bytearray(payload)
    bad[len(payload) - len(body) + at if at >= 0 else len(payload) + at] ^= 0x40
    return bytes(bad)


def test_receiver_pauses_a_damaged_copy_and_keeps_the_model(tmp_path, caplog):
    # An unsigned device, as a signed one: a copy whose bytes are not those its envelope's digest
    # names may be a damaged copy of the genuine publication, so its digest is only paused.
    host, rx = _at_version_1(tmp_path)
    before = _file_bytes(rx.store.path)
    seq, payloads = host.update(_model(2, 0.01))
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        _deliver(rx, seq, payloads[:-1] + [_damaged(payloads[-1], -3)])  # the last message's body changed
    assert "digest" in caplog.text and _file_bytes(rx.store.path) == before
    assert rx.store.version[0] == 1 and rx.assembly is None and rx.failure[0] == "failed"
    _deliver(rx, seq, payloads)  # the genuine publication at once: its digest is paused
    assert rx.store.version[0] == 1 and _file_bytes(rx.store.path) == before
    rx.clock.now += rx.gap_timeout + 1
    _deliver(rx, seq, payloads)  # after the pause: applied
    assert rx.store.version == host.version
    _same_tensors(modelio.load(rx.store.path), host.expected)


def test_receiver_refuses_a_bad_bitstream_for_good_once_its_digest_is_confirmed(tmp_path, caplog):
    host, rx = _at_version_1(tmp_path)
    before = _file_bytes(rx.store.path)
    # A truncated NNR bitstream with a matching digest (the publisher's mistake): refused for good.
    seq = 2
    _, truncated = envelope.messages(MODEL, UPDATE, seq, [encode(_model(2, 0.01))[:-7]], *rx.store.version)
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        _deliver(rx, seq, truncated)
    assert "abandoned update 2" in caplog.text.splitlines()[-1]
    assert rx.store.version[0] == 1 and _file_bytes(rx.store.path) == before
    assert rx.failure[0] == "rejected"
    rx.clock.now += rx.gap_timeout + 1
    _deliver(rx, seq, truncated)  # not even after the pause
    assert rx.store.version[0] == 1 and rx.assembly is None


def test_receiver_hashes_a_full_model_to_its_end_after_its_decoder_refused_it(tmp_path, caplog):
    # The decoder refuses the bitstream in its first message (no NNR_STR); the rest is still
    # received and hashed: with the digest confirmed the publication is refused for good, with
    # another digest (a damaged copy of a genuine publication) it is paused, then the genuine applied.
    clock = Clock()
    rx = _receiver(tmp_path, clock)
    good = encode(_model(1))
    bad = good[4:]  # without its NNR_STR unit (4 bytes)
    for data, confirmed in ((bad, True), (good, False)):
        # In 500-byte pieces (split_bitstream would parse the bad bitstream's units).
        digest, payloads = envelope.messages(MODEL, FULL, 1, [data[i:i + 500] for i in range(0, len(data), 500)])
        assert len(payloads) >= 3
        rx.on_status(envelope.Status(MODEL, 1, digest, 1, [len(payloads)]).payload())
        sent = payloads if confirmed else [_damaged(payloads[0], 0)] + payloads[1:]
        with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
            _deliver(rx, 1, sent)
        assert rx.store.version is None and rx.assembly is None
        assert not os.path.exists(rx.store.path) and os.listdir(rx.store.directory) == []
        assert rx.failure[0] == ("rejected" if confirmed else "failed"), rx.failure
        assert ("before any NNR_STR" if confirmed else "does not match the envelope's digest") in rx.failure[1]
        clock.now += rx.gap_timeout + 1
        _deliver(rx, 1, payloads)
        assert (rx.store.version is None) == confirmed
    _same_tensors(modelio.load(rx.store.path), nnc_edge.decode(good))


def test_receiver_refuses_an_update_of_another_parent_and_keeps_its_model(tmp_path, caplog):
    host = Host()
    rx = _receiver(tmp_path)
    seq, payloads = host.full(_model(1))
    rx.on_status(host.status())
    _deliver(rx, seq, payloads)
    before = os.stat(rx.store.path)
    other = Host()
    other.full(_model(9))
    seq, payloads = other.update(_model(3, 0.01))  # update 2 of another history
    assert rx.subscription() == "nnc/kws/seq/2/+"
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        _deliver(rx, seq, payloads)
    assert "refused update 2" in caplog.text and rx.store.version[0] == 1
    # The device has the version the status announces: fetching its full model again would only
    # rewrite the same file. Another publication of version 2 is still taken.
    assert rx.subscription() == "nnc/kws/seq/2/+" and not rx.diverged
    seq, payloads = host.update(_model(3, 0.01))
    _deliver(rx, seq, payloads)
    assert rx.store.version == host.version and os.stat(rx.store.path).st_ino != before.st_ino


def test_receiver_ignores_leftovers_of_another_publication(tmp_path, caplog):
    host = Host()
    rx = _receiver(tmp_path)
    seq, payloads = host.full(_model(1))
    rx.on_status(host.status())
    _deliver(rx, seq, payloads)
    interrupted = Host()
    interrupted.full(_model(1))
    _, stale = interrupted.update(_model(3, 0.01))  # an earlier try at version 2, never finished
    seq, payloads = host.update(_model(4, 0.01))
    rx.on_status(host.status())  # announces the real version 2
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        _deliver(rx, seq, stale[:1])
        assert rx.assembly is None and rx.store.version[0] == 1
        _deliver(rx, seq, payloads)
    assert caplog.text == "" and rx.store.version == host.version
    _same_tensors(modelio.load(rx.store.path), host.expected)


def test_receiver_targets_follow_the_status(tmp_path):
    rx = _receiver(tmp_path)
    d = [_digest(b"%d" % i) for i in range(10)]
    rx.on_status(envelope.Status(MODEL).payload())
    assert rx.target == 1  # nothing published yet: the first version will be 1
    rx.on_status(envelope.Status(MODEL, 7, d[7], 5, [1, 1, 1]).payload())
    assert rx.target == 5
    rx.store.version = (6, d[6])
    rx.on_status(envelope.Status(MODEL, 7, d[7], 5, [1, 1, 1]).payload())
    assert rx.target == 7 and not rx.up_to_date
    rx.store.version = (7, d[7])
    rx.on_status(envelope.Status(MODEL, 7, d[7], 5, [1, 1, 1]).payload())
    assert rx.target == 8 and rx.up_to_date
    rx.store.version = (8, d[8])  # applied while it was published, before the status said so
    rx.on_status(envelope.Status(MODEL, 7, d[7], 5, [1, 1, 1], (8, d[8], 1)).payload())
    assert rx.target == 9
    rx.store.version = (3, d[3])  # offline across a new full model
    rx.on_status(envelope.Status(MODEL, 7, d[7], 5, [1, 1, 1]).payload())
    assert rx.target == 5
    rx.diverged = False
    rx.store.version = (7, d[0])  # the right number, another history
    rx.on_status(envelope.Status(MODEL, 7, d[7], 5, [1, 1, 1]).payload())
    assert rx.target == 5 and rx.diverged
    rx.on_status(b"not json")
    assert rx.target == 5 and "ignored status" in rx.events[-1]


def test_receiver_retries_after_a_local_failure(tmp_path, caplog):
    host = Host()
    clock = Clock()
    rx = _receiver(tmp_path, clock)
    seq, payloads = host.full(_model(1))
    rx.on_status(host.status())
    _deliver(rx, seq, payloads)
    seq, payloads = host.update(_model(2, 0.01))
    calls = []

    def full_disk(base, update):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return add_decoded(base, update)
    rx.store.apply_update = full_disk
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        _deliver(rx, seq, payloads)
    assert "No space left on device" in caplog.text and "retrying in 5 s" in caplog.text
    assert rx.store.version[0] == 1 and not rx.resubscribe
    _deliver(rx, seq, payloads)  # redelivered at once: left alone during the pause
    assert len(calls) == 1
    clock.now += 5.0
    rx.tick()
    assert rx.resubscribe
    _deliver(rx, seq, payloads)
    assert rx.store.version == host.version and len(calls) == 2
    _same_tensors(modelio.load(rx.store.path), host.expected)


def test_receiver_without_its_model_file_fetches_the_full_model(tmp_path, caplog):
    host = Host()
    rx = _receiver(tmp_path)
    seq, payloads = host.full(_model(1))
    rx.on_status(host.status())
    _deliver(rx, seq, payloads)
    os.remove(rx.store.path)
    seq, payloads = host.update(_model(2, 0.01))
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        _deliver(rx, seq, payloads)
    assert "has gone: fetching the full model" in caplog.text
    assert rx.store.version is None and rx.subscription() == "nnc/kws/seq/1/+"


def test_signing_and_verifying_hooks(tmp_path, caplog, conformance_dir):
    """The publisher's ``sign`` fills the envelopes' extension field (room kept by ``ext_bytes``);
    the receiver's ``verify`` refuses a publication before any of it is used."""
    def sign(model, seq, parent_digest, digest):
        return b"SIG" + bytes([seq]) + hashlib.sha256(model.encode() + parent_digest + digest).digest()[:8]

    def verify(env):
        if env.ext != sign(env.model, env.seq, env.parent_digest, env.digest):
            raise NNCError("bad signature", 0, "envelope ext")
    data = (conformance_dir / "p1_real_silero_vad.nnc").read_bytes()  # re-cut NDUs fill whole messages
    publisher = mqtt.Publisher(mqtt.BrokerSettings("mqtt://127.0.0.1:1"), MODEL, max_message_bytes=4096,
                               sign=sign, ext_bytes=12)
    plan = publisher._plan(envelope.Status(MODEL), publisher.bodies(data), FULL, None)
    envs = [envelope.parse(p) for p in plan.payloads]
    assert max(map(len, plan.payloads)) == 4096 and all(e.ext == sign(MODEL, 1, envelope.NO_DIGEST, plan.digest)
                                                         for e in envs)
    unreserved = mqtt.Publisher(publisher.settings, MODEL, max_message_bytes=4096, sign=sign)
    with pytest.raises(ValueError, match="extension"):
        unreserved._plan(envelope.Status(MODEL), unreserved.bodies(data), FULL, None)
    rx = _receiver(tmp_path, verify=verify)
    rx.on_status(envelope.Status(MODEL).payload())
    forged = [envelope.parse(p) for p in plan.payloads]
    for e in forged:
        e.ext = b"SIG\x01" + bytes(8)
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        _deliver(rx, 1, [e.pack() for e in forged])
    assert "refused full model 1" in caplog.text and "bad signature" in caplog.text and rx.store.version is None
    rx.refused.clear()
    _deliver(rx, 1, plan.payloads)
    assert rx.store.version == (1, plan.digest)
    _same_tensors(modelio.load(rx.store.path), nnc_edge.decode(data))


def test_a_device_without_a_model_says_so(tmp_path, caplog, monkeypatch):
    """Issue 16, finding 11: not "the model stays at no model"."""
    host = Host()
    seq, payloads = host.full(_model(1))
    rx = _receiver(tmp_path)

    def full_disk(writer):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(mqtt.FullModelWriter, "commit", full_disk)
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        rx.on_status(host.status())
        _deliver(rx, seq, payloads)
        for _ in range(2):
            rx.clock.now += 6.0
            rx.tick()
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("model kws: abandoned full model 1 (") and line.endswith("; the device still has no model")
               for line in lines), lines
    assert any(line.startswith("model kws: the status announces version 1, but the device has no model: ")
               for line in lines), lines
    assert not any("stays at no model" in line for line in lines), lines


def test_an_empty_publication_is_refused_not_taken_for_an_empty_model(tmp_path, caplog):
    """Issue 16, finding 11: a 0-byte bitstream is an error, over MQTT too."""
    host, rx = _at_version_1(tmp_path)
    before = _file_bytes(rx.store.path)
    digest, empty = envelope.messages(MODEL, FULL, 2, [b""])
    rx.on_status(envelope.Status(MODEL, 2, digest, 2, [1]).payload())
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        _deliver(rx, 2, empty)
    assert "refused full model 2 (%s): the bitstream is empty (0 bytes); the model stays at version 1" \
        % digest.hex()[:12] in caplog.text
    assert rx.store.version[0] == 1 and _file_bytes(rx.store.path) == before


def test_store_with_a_damaged_model_file_has_no_version(tmp_path, caplog):
    directory = tmp_path / "device"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with caplog.at_level(logging.WARNING, logger="nnc_edge.mqtt"):
        store = mqtt.ModelStore(directory, MODEL)
    assert store.version is None and "fetching the full model" in caplog.text
    modelio.save(directory / "model.safetensors", _model(1), {"nnc_edge.model": "other", "nnc_edge.seq": "3"})
    assert mqtt.ModelStore(directory, MODEL).version is None  # another model's file
