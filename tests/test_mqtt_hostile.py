"""The device service against hostile and mistaken messages, without a broker (issue #16, findings
1-5): nothing one message does may end the service, what it remembers of refused messages is
bounded, and a refused update never moves the device to an older model or rewrites its file.

Messages are handed to ``Receiver.handle`` directly, with the clock of test_mqtt_protocol.py."""

import asyncio
import json
import logging
import os
import tracemalloc

import numpy as np
import pytest

import nnc_edge
from decoder_core import NNCError
from nnc_edge import modelio
from nnc_edge.encoder.encoding import encode
from nnc_edge.updates import ChainState, encode_update, model_digest
from transports import envelope, mqtt
from transports.envelope import FULL, UPDATE

from test_mqtt_protocol import MODEL, Clock, Host, _deliver, _file_bytes, _model, _receiver

GAP = 5.0  # _receiver's gap_timeout


def _handle(rx, topic, payload):
    asyncio.run(rx.handle(topic, payload))


def _status(**fields):
    status = {"v": 1, "model": MODEL, "seq": 0, "digest": None, "full_seq": 0, "counts": [], "pending": None}
    status.update(fields)
    return json.dumps(status).encode()


# --- finding 1: no message ends the service ---------------------------------------------------------
@pytest.mark.parametrize("tail", ["1/\u00b2", "\u00b2/0", "1/0\u00b2", "\u0661/0", "9" * 5000 + "/0", "1/" + "9" * 5000,
                                  "01/0", "1/00", "1/-1", " 1/0", "1/0 ", "1_0/0", "4294967296/0", "1/65535", "1"])
def test_a_data_topic_the_publisher_would_not_write_is_ignored(tmp_path, tail):
    host = Host()
    rx = _receiver(tmp_path)
    _, payloads = host.full(_model(1))
    rx.on_status(host.status())
    topic = "nnc/kws/seq/" + tail
    assert rx.topics.parse_data(topic) is None
    _handle(rx, topic, payloads[0])
    assert rx.assembly is None and rx.store.version is None
    assert rx.topics.parse_data("nnc/kws/seq/4294967295/65534") == (4294967295, 65534)


@pytest.mark.parametrize("payload", [b"[" * 100000, b"{" * 100000, _status()[:-1] + b', "x": ' + b"[" * 50000 + b"}",
                                     b'{"v": 1, "model": "' + b"[" * 60000 + b'"]'])
def test_a_deeply_nested_status_is_refused_not_a_crash(tmp_path, payload):
    rx = _receiver(tmp_path)
    with pytest.raises(NNCError) as info:
        envelope.parse_status(payload, MODEL)
    assert info.value.element == "status"
    _handle(rx, rx.topics.status, payload)
    assert rx.status is None and rx.events[-1].startswith("ignored status of model kws: status ")
    # Brackets inside strings are no nesting.
    tricky = '[[[[[[{{{{{{"\\[[\\'
    assert envelope.parse_status(_status(model=tricky), None).model == tricky


def test_whatever_a_message_triggers_is_logged_and_the_service_goes_on(tmp_path, caplog, monkeypatch):
    host = Host()
    clock = Clock()
    rx = _receiver(tmp_path, clock)
    seq, payloads = host.full(_model(1))
    rx.on_status(host.status())

    def bug(env):
        raise TypeError("a bug the tests did not foresee")
    monkeypatch.setattr(rx.store, "begin", bug)
    with caplog.at_level(logging.ERROR, logger="nnc_edge.mqtt"):
        _deliver(rx, seq, payloads)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors and "the message on nnc/kws/seq/1/0 raised TypeError: a bug" in errors[0].getMessage()
    assert errors[0].exc_info is not None  # the traceback is in the log
    assert rx.assembly is None and rx.store.version is None
    # The service goes on: once the pause is over, the publication is fetched again and applied.
    monkeypatch.undo()
    clock.now += GAP
    rx.tick()
    assert rx.resubscribe
    _deliver(rx, seq, payloads)
    assert rx.store.version == host.version


@pytest.mark.parametrize("stop", [KeyboardInterrupt, asyncio.CancelledError])
def test_stopping_the_service_is_not_swallowed(tmp_path, monkeypatch, stop):
    rx = _receiver(tmp_path)

    def interrupted(payload):
        raise stop()
    monkeypatch.setattr(rx, "on_status", interrupted)
    with pytest.raises(stop):
        _handle(rx, rx.topics.status, _status())


def test_a_failing_gap_check_is_logged_not_raised(tmp_path, caplog, monkeypatch):
    rx = _receiver(tmp_path)
    monkeypatch.setattr(rx, "_check_gap", lambda now: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="nnc_edge.mqtt"):
        rx.tick()
    assert "the gap check raised ZeroDivisionError" in caplog.text


# --- finding 2: held messages count every byte -----------------------------------------------------
def test_held_messages_count_their_header_and_extension(tmp_path):
    """Empty bodies with 64 KiB extensions: 2,000 of them held 115 MiB while max_buffered counted 0."""
    ext = os.urandom(0xFFFF)
    _, payloads = envelope.messages(MODEL, FULL, 1, [b""] * 40, ext=ext)
    envs = [envelope.parse(p) for p in payloads]
    a = envelope.Assembly(envs[0], max_buffered=1 << 20)
    with pytest.raises(NNCError) as info:
        for env in envs[1:]:  # message 0 never comes: all are held
            a.add(env)
    assert info.value.element == "envelope index"
    assert 0 < len(a.held) <= (1 << 20) // len(ext) and a.held_bytes <= 1 << 20
    # Even empty messages without extension are counted: each held one costs its header and more.
    _, payloads = envelope.messages(MODEL, FULL, 1, [b""] * 3000)
    a = envelope.Assembly(envelope.parse(payloads[0]), max_buffered=1 << 20)
    with pytest.raises(NNCError):
        for p in payloads[1:]:
            a.add(envelope.parse(p))
    assert len(a.held) < 3000 and a.held_bytes <= 1 << 20


# --- finding 3: memory does not grow with refusals --------------------------------------------------
def _refuse_everything(env):
    raise NNCError("not signed by a trusted key", 0, "envelope ext")


def _forged(seq, i, ext=b""):
    """Message 0 of a publication nobody made: a new digest each time."""
    return envelope.messages(MODEL, FULL, seq, [b"forged %d" % i], ext=ext)[1][0]


def _traced_growth(rx, message, rounds):
    """Bytes still allocated after handing ``rx`` ``rounds`` more messages ``message(i)`` (a topic
    and a payload) than after as many before (not logged: pytest keeps every log record of a test)."""
    async def feed(first):
        for i in range(first, first + rounds):
            await rx.handle(*message(i))

    async def measure():
        await feed(0)
        before = tracemalloc.get_traced_memory()[0]
        await feed(rounds)
        return tracemalloc.get_traced_memory()[0] - before
    logger = logging.getLogger("nnc_edge.mqtt")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    tracemalloc.start()
    try:
        return asyncio.run(measure())
    finally:
        tracemalloc.stop()
        logger.setLevel(level)


def test_forged_publications_leave_bounded_memory(tmp_path):
    rx = _receiver(tmp_path, verify=_refuse_everything)
    rx.on_status(_status())  # nothing published yet: version 1 is the target
    ext = bytes(4096)
    growth = _traced_growth(rx, lambda i: (rx.topics.data(1, 0), _forged(1, i, ext + b"%d" % i)), 1000)
    assert growth < 256 << 10, growth  # was 4 KiB and more per refusal
    assert len(rx.unverified) <= mqtt.MAX_REMEMBERED and len(rx.events) <= mqtt.MAX_EVENTS
    assert "not signed by a trusted key" in rx.events[-1] and rx.events[-3:][-1] == rx.events[-1]


def test_refused_publications_leave_bounded_memory(tmp_path):
    """Without signatures anyone can publish: each damaged full model is refused for good."""
    rx = _receiver(tmp_path)
    rx.on_status(_status())

    def damaged(i):
        payload = bytearray(_forged(1, i))
        payload[-1] ^= 0xFF  # the digest no longer matches
        return rx.topics.data(1, 0), bytes(payload)
    growth = _traced_growth(rx, damaged, 500)
    assert growth < 64 << 10, growth
    assert len(rx.refused) <= mqtt.MAX_REMEMBERED and len(rx.events) <= mqtt.MAX_EVENTS
    assert "abandoned full model 1" in rx.events[-1] and rx.store.version is None


def test_status_payloads_have_a_size_limit(tmp_path):
    rx = _receiver(tmp_path)
    growth = _traced_growth(rx, lambda i: (rx.topics.status, _status(model="m%d" % i * (1 << 20))), 5)
    assert growth < 64 << 10, growth  # each event kept the 1 MB name
    assert rx.status is None and "larger than the limit" in rx.events[-1]
    big = _status(padding="x" * envelope.MAX_STATUS_BYTES)
    with pytest.raises(NNCError, match="larger than the limit of %d" % envelope.MAX_STATUS_BYTES):
        envelope.parse_status(big, MODEL)


def test_strings_from_messages_are_cut_in_errors_and_logs(tmp_path, caplog):
    rx = _receiver(tmp_path)
    long_name = "m" * 60000
    with caplog.at_level(logging.INFO, logger="nnc_edge.mqtt"):
        _handle(rx, rx.topics.status, _status(model=long_name))
        _handle(rx, rx.topics.status, _status(seq=[[["x" * 50000]]]))
        _handle(rx, rx.topics.status, _status(seq=1, digest="\u00b2" * 64, full_seq=1, counts=[1]))
        other = _with_model_name(envelope.messages(MODEL, FULL, 1, [b"x"])[1][0], b"n" * 255)
        rx.on_status(_status())
        _handle(rx, rx.topics.data(1, 0), other)
    assert "status is for model 'mmmmm" in rx.events[0] and "(60000 characters)" in rx.events[0]
    assert "status seq must be an integer" in rx.events[1] and "(50008 characters)" in rx.events[1]
    assert "status digest is not hexadecimal" in rx.events[2]
    assert "its envelope says model 'nnnn" in rx.events[3] and "(255 characters)" in rx.events[3]
    assert max(len(e) for e in rx.events) < 400
    assert max(len(r.getMessage()) for r in caplog.records) < 400
    with pytest.raises(ValueError) as info:
        envelope.check_model_name("a/" * 100000)
    assert len(str(info.value)) < 200
    # Errors from deeper down (a decoder, a signature check) may quote what a message carried.

    def quoting(env):
        raise NNCError("no tensor named %r" % ("t" * 100000), 0, "topology_elem_id")
    rx = _receiver(tmp_path, verify=quoting)
    rx.on_status(_status())
    _handle(rx, rx.topics.data(1, 0), _forged(1, 0))
    assert "no tensor named 'tttt" in rx.events[-1] and len(rx.events[-1]) < 600


def _with_model_name(payload, name):
    """The message with another model name, even one no publisher may use."""
    start = envelope.HEADER_BYTES  # model_len is the byte at start - 3, then ext_len, then the name
    old_end = start + payload[start - 3]
    return payload[:start - 3] + bytes([len(name)]) + payload[start - 2:start] + name + payload[old_end:]


def test_excerpt():
    assert envelope.excerpt("kws") == "'kws'"
    assert envelope.excerpt("x" * 1000, 10) == "'xxxxxxxxxx'... (1000 characters)"
    assert envelope.excerpt(b"\x00" * 100, 2) == "b'\\x00\\x00'... (100 bytes)"
    assert envelope.excerpt([1] * 1000, 10) == "[1, 1, 1, ... (3000 characters)"
    assert envelope.excerpt("x" * 1000, 3, quote=False) == "xxx... (1000 characters)"
    assert envelope.excerpt(None) == "None"


# --- findings 4 and 5: a refusal never moves the device back ---------------------------------------
def _real_chain(seed, updates):
    """[(kind, bitstream)] of a full model and updates with records (nnc_edge.updates)."""
    rng = np.random.default_rng(seed)
    model = {"w": (0.1 * rng.normal(size=(40, 24))).astype(np.float32),
             "b": (0.1 * rng.normal(size=40)).astype(np.float32)}
    data = encode(model)
    view = nnc_edge.decode(data)
    out = [(FULL, data)]
    state = ChainState(model_digest(view))
    for _ in range(updates):
        model = {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in model.items()}
        data, view = encode_update(view, model, residual=state, return_model=True)
        out.append((UPDATE, data))
    return out


class RawHost(Host):
    """Publishes given bitstreams as the next versions (a publisher without any check)."""

    def publish(self, kind, data):
        return self._publish(data, kind)

    def send(self, rx, kind, data):
        """Publish, and hand the receiver the new status and then the messages."""
        seq, payloads = self.publish(kind, data)
        rx.on_status(self.status())
        _deliver(rx, seq, payloads)
        return seq, payloads


def _device(tmp_path, clock):
    store = mqtt.ModelStore(tmp_path / "device", MODEL, threads=1)  # updates checked by their records
    return mqtt.Receiver(store, gap_timeout=GAP, clock=clock)


def _file_identity(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, _file_bytes(path)


def _lag_reports(rx):
    return [e for e in rx.events if "the status announces version" in e]


def _wait_gaps(rx, clock, gaps):
    for _ in range(gaps):
        rx.tick()
        clock.now += GAP
        rx.tick()


def test_a_repeated_update_does_not_roll_the_device_back(tmp_path, caplog):
    """The same update published twice: the device refused the repeat, then went back to the full
    model 1 and ignored every later update."""
    steps = _real_chain(1, 1)
    host = RawHost()
    clock = Clock()
    rx = _device(tmp_path, clock)
    for kind, data in steps + [steps[1]]:  # update 2 published again as version 3
        host.send(rx, kind, data)
    assert rx.store.version[0] == 2 and [a[:2] for a in rx.applied] == [(1, FULL), (2, UPDATE)]
    assert "abandoned update 3" in rx.events[-1] and "has already been applied" in rx.events[-1]
    assert rx.subscription() == "nnc/kws/seq/3/+" and not rx.diverged
    before = _file_identity(rx.store.path)
    _deliver(rx, 1, host_full_payloads(steps))  # the full model's retained copies: not wanted
    assert rx.store.version[0] == 2 and _file_identity(rx.store.path) == before
    # Where it stands is in the log every gap timeout.
    _wait_gaps(rx, clock, 2)
    reports = _lag_reports(rx)
    assert len(reports) == 2 and "announces version 3, but the device stays at version 2" in reports[0]
    assert "version 3 was refused" in reports[0]
    # A new full model is newer: it is taken.
    host.send(rx, FULL, _real_chain(2, 0)[0][1])
    assert rx.store.version == host.version and rx.up_to_date
    _wait_gaps(rx, clock, 1)
    assert len(_lag_reports(rx)) == 2


def host_full_payloads(steps):
    return RawHost().publish(FULL, steps[0][1])[1]


def test_a_wrong_base_update_is_refused_without_rewriting_the_model(tmp_path):
    steps = _real_chain(3, 0)
    wrong = _real_chain(4, 1)[1][1]  # an update of another model
    host = RawHost()
    clock = Clock()
    rx = _device(tmp_path, clock)
    host.send(rx, FULL, steps[0][1])
    before = _file_identity(rx.store.path)
    seq, payloads = host.send(rx, UPDATE, wrong)
    assert "applies to the model with digest" in rx.events[-1]
    # The publisher goes on with updates that need version 2: the device cannot follow, and says so.
    host.send(rx, UPDATE, _real_chain(5, 1)[1][1])
    for restart in range(2):
        assert rx.store.version[0] == 1 and rx.subscription() == "nnc/kws/seq/2/+"
        _deliver(rx, 1, host_full_payloads(steps))
        assert _file_identity(rx.store.path) == before  # never rewritten
        _wait_gaps(rx, clock, 2)
        reports = _lag_reports(rx)
        assert len(reports) == 2 and "announces version 3, but the device stays at version 1" in reports[-1]
        # Restarted: the update is checked once more (and logged), the file is left alone.
        rx = _device(tmp_path, clock)
        rx.on_status(host.status())
        _deliver(rx, seq, payloads)
        assert "applies to the model with digest" in rx.events[-1]
    host.send(rx, FULL, _real_chain(6, 0)[0][1])
    assert rx.store.version == host.version and modelio.load_metadata(rx.store.path)["nnc_edge.seq"] == "4"
