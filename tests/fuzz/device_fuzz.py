"""Fuzzing of the device service (transports.mqtt.Receiver): random topics, statuses and envelopes
go through ``Receiver.handle`` as a broker would deliver them, with the clock moving and ``tick()``
called in between.

The inputs start from real publications (a small model's full model and an update chain, cut into
1 KiB messages as transports.mqtt publishes them) and change them: topics (other levels, Unicode and
overlong numbers, leading zeros), statuses (valid ones announcing any version, wrong types, huge
numbers and strings, deep nesting, oversized payloads, bytes that are no JSON), and envelopes
(header fields set to extreme values, extension fields of up to 65,535 bytes, message counts up to
65,535 with many messages held out of order, truncated or extended messages, bodies of other
publications). Two receivers take every input: one without and one with a ``verify`` hook.

The bound: no exception escapes ``handle`` or ``tick``, nothing is logged at ERROR (what the
service's boundary catches that no check foresaw), and the memory allocated (tracemalloc, after
each input) stays under MEMORY_LIMIT.

    python tests/fuzz/device_fuzz.py --seconds 600            # a long run, a seed from the clock
    python tests/fuzz/device_fuzz.py --inputs 20000 --seed 7  # reproducible

tests/fuzz/test_fuzz_device.py runs a few seconds of it in CI.
"""

import argparse
import asyncio
import json
import logging
import os
import random
import struct
import sys
import tempfile
import time
import traceback
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

from decoder_core import NNCError  # noqa: E402
from transports import envelope, mqtt  # noqa: E402
from transports.envelope import FULL, UPDATE  # noqa: E402

MODEL = "fuzz"
MESSAGE_BYTES = 1024
MAX_BUFFERED = 4 << 20   # the receivers' limit for held messages (the default is 16 MiB)
MEMORY_LIMIT = 48 << 20  # allocated after any input, both receivers together
SIGNED = b"ok"           # the extension the verifying receiver takes for a valid signature
GAP = 5.0
EXTREME = (0, 1, 2, 0x7F, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)
# Header fields (offset, struct format) of transports/envelope.py.
FIELDS = (("seq", 4, ">I"), ("parent_seq", 8, ">I"), ("index", 12, ">H"), ("count", 14, ">H"),
          ("offset", 16, ">I"), ("total", 20, ">I"), ("model_len", 88, ">B"), ("ext_len", 89, ">H"))


# --- the seeds: real publications -----------------------------------------------------------------
class Seeds:
    """A full model and two updates of a small model, published as versions 1, 2, 3 with the
    extension the verifying receiver accepts; ``final`` is one more full model, for the end."""

    def __init__(self):
        from nnc_edge.encoder.encoding import encode
        from nnc_edge.updates import ChainState, encode_update, model_digest
        import nnc_edge
        rng = np.random.default_rng(0)
        model = {"w": (0.1 * rng.normal(size=(48, 32))).astype(np.float32),
                 "b": (0.1 * rng.normal(size=48)).astype(np.float32)}
        data = encode(model)
        view = nnc_edge.decode(data)
        steps = [(FULL, data)]
        self.final = encode({k: v + 1 for k, v in model.items()})
        state = ChainState(model_digest(view))
        for _ in range(2):
            model = {k: (v + 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in model.items()}
            data, view = encode_update(view, model, residual=state, return_model=True)
            steps.append((UPDATE, data))
        self.publications = []  # (seq, digest, [payload, ...])
        parent = (0, envelope.NO_DIGEST)
        for seq, (kind, data) in enumerate(steps, 1):
            digest, payloads = publication(kind, seq, data, *parent)
            self.publications.append((seq, digest, payloads))
            parent = (seq, digest)

    def status(self, rng):
        """The status after a random number of the publications, sometimes with one pending."""
        n = rng.randrange(len(self.publications) + 1)
        if not n:
            return envelope.Status(MODEL)
        seq, digest, _ = self.publications[n - 1]
        counts = [len(p[2]) for p in self.publications[:n]]
        pending = None
        if n < len(self.publications) and rng.random() < 0.3:
            nseq, ndigest, npayloads = self.publications[n]
            pending = (nseq, ndigest, len(npayloads))
        return envelope.Status(MODEL, seq, digest, 1, counts, pending)


def publication(kind, seq, data, parent_seq=0, parent_digest=envelope.NO_DIGEST):
    bodies = mqtt.split_bitstream(data, MESSAGE_BYTES - envelope.header_bytes(MODEL) - len(SIGNED))
    if kind == FULL:
        parent_seq, parent_digest = 0, envelope.NO_DIGEST
    return envelope.messages(MODEL, kind, seq, bodies, parent_seq, parent_digest, SIGNED)


# --- inputs: each a list of (topic, payload) -------------------------------------------------------
def _random_bytes(rng, n):
    return rng.getrandbits(8 * n).to_bytes(n, "little")


def _topic_number(rng):
    return rng.choice(("0", "1", "2", "3", "01", "007", "\u00b2", "\u0661", "1\u00b2", "-1", " 1", "1 ", "1_0", "+1",
                       "", "9" * rng.choice((10, 11, 5000)), "4294967295", "4294967296", "65534", "65535",
                       str(rng.randrange(1 << 32))))


def random_topic(rng, topics):
    kind = rng.randrange(6)
    if kind == 0:
        return topics.data(rng.randrange(1, 5), rng.randrange(0, 40))
    if kind == 1:
        return "%s/seq/%s/%s" % (topics.base, _topic_number(rng), _topic_number(rng))
    if kind == 2:
        return "%s/seq/%s" % (topics.base, "/".join(_topic_number(rng) for _ in range(rng.randrange(0, 4))))
    if kind == 3:
        return topics.status + rng.choice(("", "/", "/x", "\u0000"))
    if kind == 4:
        return "%s/%s" % (topics.base, rng.choice(("sync/x", "seq", "seq/", "status/1", "")))
    return rng.choice(("nnc/other/status", "nnc/other/seq/1/0", "", "#", "x" * rng.choice((1, 1000, 70000))))


def _nested(rng, depth):
    return "[" * depth + "]" * (depth if rng.random() < 0.5 else 0)


def _json_value(rng):
    return rng.choice((None, True, -1, 0, 1, 2 ** 31, 2 ** 64, 1.5, "", "x" * rng.choice((1, 100, 70000)), [], {},
                       [1] * rng.choice((1, 3, 20000)), {"seq": 1}, "\u00b2" * 64, "a" * 64, "0" * 64))


def random_status(rng, seeds):
    kind = rng.randrange(7)
    if kind == 0:
        return seeds.status(rng).payload()
    if kind == 1:
        return b""
    obj = json.loads(seeds.status(rng).payload())
    if kind == 2:  # one field of another type or value
        obj[rng.choice(("v", "model", "seq", "digest", "full_seq", "counts", "pending", "extra"))] = _json_value(rng)
        return json.dumps(obj).encode()
    if kind == 3:  # pending of any shape
        obj["pending"] = {"seq": _json_value(rng), "digest": _json_value(rng), "count": _json_value(rng)}
        return json.dumps(obj).encode()
    if kind == 4:  # nesting, in the document or inside a field
        text = _nested(rng, rng.choice((3, 5, 100, 100000)))
        return (text if rng.random() < 0.5 else json.dumps(obj)[:-1] + ', "x": ' + text + "}").encode()
    if kind == 5:  # the whole text cut or extended
        raw = json.dumps(obj).encode()
        return raw[:rng.randrange(len(raw))] + _random_bytes(rng, rng.choice((0, 1, 10)))
    return _random_bytes(rng, rng.choice((1, 10, 1000, envelope.MAX_STATUS_BYTES + 1)))


def _pick_message(rng, seeds):
    seq, _, payloads = rng.choice(seeds.publications)
    return rng.randrange(len(payloads)), payloads[rng.randrange(len(payloads))]


def mutate_envelope(rng, payload, seeds):
    data = bytearray(payload)
    for _ in range(rng.choice((1, 1, 2, 3))):
        what = rng.randrange(7)
        if what == 0 and len(data) >= envelope.HEADER_BYTES:
            _, offset, fmt = rng.choice(FIELDS)
            limit = 1 << (8 * struct.calcsize(fmt))
            struct.pack_into(fmt, data, offset, rng.choice(EXTREME + (rng.randrange(limit),)) % limit)
        elif what == 1 and len(data) >= 88:
            offset = rng.choice((24, 56))  # digest, parent_digest
            data[offset:offset + 32] = rng.choice((bytes(32), _random_bytes(rng, 32), seeds.publications[0][1]))
        elif what == 2 and data:
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        elif what == 3:
            del data[rng.randrange(len(data) + 1):]
        elif what == 4:
            data += _random_bytes(rng, rng.choice((1, 100, 1000)))
        elif what == 5:
            data = bytearray(_with_ext(bytes(data), rng))
        elif len(data) > 3:
            data[3] = rng.choice((0, 1, 2, 0x80))  # flags
    return bytes(data)


def _with_ext(payload, rng):
    try:
        env = envelope.parse(payload)
    except NNCError:
        return payload
    env.ext = bytes(rng.choice((0, 1, 64, 4096, 0xFFFF)))
    try:
        return env.pack()
    except (ValueError, struct.error):
        return payload


def flood(rng, topics):
    """Many messages of one forged publication: a large count, indices out of order (held), an
    extension field of up to 64 KiB, empty or small bodies."""
    count = rng.choice((2, 100, 0xFFFF))
    ext = bytes(rng.choice((0, 4096, 0xFFFF)))
    seq = rng.randrange(1, 4)
    digest = _random_bytes(rng, 32)
    body = b"" if rng.random() < 0.5 else b"\x00\x05abc"
    total = len(body) * count
    out = []
    for _ in range(rng.choice((10, 50, 200))):
        index = rng.randrange(1, count)
        env = envelope.Envelope(MODEL, FULL, seq, 0, index, count, len(body) * index, total, digest,
                                envelope.NO_DIGEST, body, ext)
        out.append((topics.data(seq, index), env.pack()))
    return out


def make_input(rng, seeds, topics):
    """One input: a list of (topic, payload) delivered in order, and its description."""
    kind = rng.choice(("status", "status", "data", "data", "data", "valid", "topic", "flood"))
    if kind == "status":
        return [(topics.status, random_status(rng, seeds))], kind
    if kind == "valid":  # the real chain, after its status, shuffled: the receivers make progress too
        status = seeds.status(rng)
        out = [(topics.status, status.payload())]
        for seq, _, payloads in seeds.publications[:status.seq]:
            order = list(range(len(payloads)))
            rng.shuffle(order)
            out.extend((topics.data(seq, i), payloads[i]) for i in order)
        return out, kind
    if kind == "flood":
        return flood(rng, topics), kind
    index, payload = _pick_message(rng, seeds)
    if kind == "topic":
        return [(random_topic(rng, topics), payload)], kind
    try:
        env = envelope.parse(payload)
        topic = topics.data(env.seq, env.index)
    except NNCError:
        topic = random_topic(rng, topics)
    payload = mutate_envelope(rng, payload, seeds)
    try:
        env = envelope.parse(payload)  # usually on the topic its envelope names, as a publisher would
        if rng.random() < 0.8:
            topic = topics.data(env.seq, env.index)
    except NNCError:
        pass
    return [(topic, payload)], kind


# --- the run ---------------------------------------------------------------------------------------
class Errors(logging.Handler):
    """Counts what the receivers log at ERROR (exceptions their boundary caught)."""

    def __init__(self):
        logging.Handler.__init__(self, logging.ERROR)
        self.records = []

    def emit(self, record):
        if len(self.records) < 20:
            self.records.append(self.format(record))


class Report:
    def __init__(self, seed):
        self.seed = seed
        self.inputs = 0
        self.messages = 0
        self.by_kind = {}
        self.applied = 0
        self.live = 0      # receivers that applied a new full model at the end
        self.escaped = []  # (input index, traceback) of exceptions out of handle() or tick()
        self.errors = []   # ERROR log records
        self.memory = []   # (input index, bytes allocated after it)
        self.max_memory = 0
        self.seconds = 0.0

    @property
    def offenders(self):
        return self.escaped or self.errors or self.memory

    def summary(self):
        lines = ["%d inputs (%d messages) in %.1f s, seed %d: %s; %d publications applied; %d exceptions escaped, "
                 "%d errors logged; at most %.1f MiB allocated after an input (limit %d MiB); %d of 2 receivers "
                 "took a new full model at the end"
                 % (self.inputs, self.messages, self.seconds, self.seed,
                    ", ".join("%s %d" % kv for kv in sorted(self.by_kind.items())), self.applied, len(self.escaped),
                    len(self.errors), self.max_memory / float(1 << 20), MEMORY_LIMIT >> 20, self.live)]
        lines += ["ESCAPED input %d:\n%s" % item for item in self.escaped[:10]]
        lines += ["ERROR %s" % text for text in self.errors[:10]]
        lines += ["MEMORY input %d: %.1f MiB" % (i, n / float(1 << 20)) for i, n in self.memory[:10]]
        return "\n".join(lines)


def _receivers(directory, clock):
    def verify(env):
        if bytes(env.ext) != SIGNED:
            raise NNCError("the extension is not a valid signature", 0, "envelope ext")
    out = []
    for name, hook in (("plain", None), ("verifying", verify)):
        store = mqtt.ModelStore(os.path.join(directory, name), MODEL, threads=1)
        out.append(mqtt.Receiver(store, gap_timeout=GAP, max_buffered=MAX_BUFFERED, clock=clock, verify=hook))
    return out


def fuzz(count=None, seconds=None, seed=0, progress=None):
    """Run ``count`` inputs, or as many as fit in ``seconds``; returns a Report."""
    report = Report(seed)
    rng = random.Random(seed)
    seeds = Seeds()
    now = [1000.0]
    logger = logging.getLogger("nnc_edge.mqtt")
    errors = Errors()
    saved = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # millions of refusals: counted, not kept
    logger.addHandler(errors)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nnc-device-fuzz-") as directory:
        receivers = _receivers(directory, lambda: now[0])
        tracemalloc.start()
        try:
            asyncio.run(_run(receivers, seeds, rng, now, report, count, seconds, began, progress))
            report.live = asyncio.run(_final(receivers, seeds, report))
        finally:
            tracemalloc.stop()
            logger.removeHandler(errors)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]
        report.applied = sum(len(rx.applied) for rx in receivers)
    report.errors = errors.records
    report.seconds = time.monotonic() - began
    return report


async def _run(receivers, seeds, rng, now, report, count, seconds, began, progress):
    topics = receivers[0].topics
    while (count is None or report.inputs < count) and (seconds is None or time.monotonic() - began < seconds):
        messages, kind = make_input(rng, seeds, topics)
        report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
        for rx in receivers:
            for topic, payload in messages:
                await _step(rx, topic, payload, report)
            if rng.random() < 0.3:
                now[0] += rng.choice((0.5, GAP / 2, GAP + 0.1, 10 * GAP))
                _tick(rx, report)
        report.messages += len(messages)
        used = tracemalloc.get_traced_memory()[0]
        report.max_memory = max(report.max_memory, used)
        if used > MEMORY_LIMIT:
            report.memory.append((report.inputs, used))
        report.inputs += 1
        if progress is not None and report.inputs % 1000 == 0:
            report.seconds = time.monotonic() - began
            progress(report)


async def _final(receivers, seeds, report):
    """After all that, a new full model numbered above every version the receivers have: both take it."""
    top = max(rx.store.version[0] if rx.store.version else 0 for rx in receivers)
    if top >= 0xFFFFFFFF:
        return len(receivers)  # a mutated seq took the last number: nothing can be newer
    digest, payloads = publication(FULL, top + 1, seeds.final)
    status = envelope.Status(MODEL, top + 1, digest, top + 1, [len(payloads)]).payload()
    for rx in receivers:
        await _step(rx, rx.topics.status, status, report)
        for i, payload in enumerate(payloads):
            await _step(rx, rx.topics.data(top + 1, i), payload, report)
    return sum(rx.store.version == (top + 1, digest) for rx in receivers)


async def _step(rx, topic, payload, report):
    try:
        await rx.handle(topic, payload)
    except Exception:
        report.escaped.append((report.inputs, traceback.format_exc()))


def _tick(rx, report):
    try:
        rx.tick()
    except Exception:
        report.escaped.append((report.inputs, traceback.format_exc()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, help="number of inputs (default: until --seconds)")
    parser.add_argument("--seconds", type=float, help="stop after this long (default 600 without --inputs)")
    parser.add_argument("--seed", type=int, help="seed of the inputs (default: from the clock; printed)")
    args = parser.parse_args(argv)
    if args.inputs is None and args.seconds is None:
        args.seconds = 600.0
    seed = args.seed if args.seed is not None else int(time.time()) % 1000000
    print("fuzzing the device service, seed %d, %s" % (
        seed, "%d inputs" % args.inputs if args.inputs else "%g s" % args.seconds), flush=True)

    def progress(report):
        print("  %d inputs, %.0f s, %d escaped, %d errors, %.1f MiB at most" % (
            report.inputs, report.seconds, len(report.escaped), len(report.errors),
            report.max_memory / float(1 << 20)), flush=True)
    report = fuzz(args.inputs, args.seconds, seed, progress)
    print(report.summary())
    return 1 if report.offenders else 0


if __name__ == "__main__":
    sys.exit(main())
