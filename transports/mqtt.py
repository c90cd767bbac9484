"""MQTT delivery of NNR bitstreams on aiomqtt: a host publishes full models and updates, devices
receive them and keep their model current.

Topics, for a model named M under the prefix P (default ``nnc``):

* ``P/M/status``: retained, QoS 1, JSON (``transports.envelope.status_payload``): the current
  version (seq, digest), the retained chain (the last full model ``full_seq`` and the updates
  after it, with their message counts) and the publication under way, if any.
* ``P/M/seq/S/I``: retained, QoS 1: message I of the publication that makes version S, an
  envelope (``transports.envelope``) followed by whole NNR units. NDUs too large for one message
  are re-coded as partial-data units (6.4.3.1), so no message exceeds ``max_message_bytes``.

The broker is the store: the last full model and every update since stay retained, so a device
that was offline catches up by itself. Publishing a new full model clears the older chain.

Publisher (``Publisher.publish``): reads the retained status, numbers the bitstream ``seq + 1``
(an update names the current version as its parent), announces it as ``pending`` in the status,
publishes its messages, then the status with the new version. Interrupted by a lost connection
(noticed at once, not after the acknowledgement timeout), it reconnects with exponential backoff
and publishes the whole publication again (retained messages are simply overwritten, receivers
drop duplicates). With the host's own record of the chain (``transports.chain_record``) it never
numbers a version below what it published before, refuses an update that does not continue the
chain, and publishes the chain again when the broker has lost it.

Receiver (``Receiver`` + ``run_receiver``): subscribes to the status and to exactly one data
topic, ``P/M/seq/T/+`` for the version T it needs next: the one after its own, or the last full
model when its version is not on the announced chain (never had a model, or was offline across a
new full model). Retained messages arrive at once on
subscribing, live ones as they are published (so a full model streams into the decoder while it
is being published). Messages are put back in order and applied once. After ``gap_timeout``
seconds without the missing message the data topic is subscribed again (the broker re-sends the
retained copies); after another ``gap_timeout`` the publication is abandoned. Only a complete
publication whose SHA-256 digest matches changes the model, atomically; anything else leaves the
previous model as it was and is logged (logger ``nnc_edge.mqtt``). A refusal never moves the
device to an older version (see ``Receiver``).
"""

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import random
import time
import uuid
from collections import OrderedDict, deque
from urllib.parse import unquote, urlsplit

from decoder_core import NNCError
from decoder_core.tables import NNR_NDU
from decoder_core.units import ParserState, nnr_unit_size, parse_unit

from . import envelope
from .envelope import FULL, NO_DIGEST, UPDATE, Assembly, Status, digest_hex

log = logging.getLogger("nnc_edge.mqtt")
# paho-mqtt's own messages (socket errors, ...): our warnings already say when a connection is lost.
paho_log = logging.getLogger("nnc_edge.mqtt.paho")

DEFAULT_PREFIX = "nnc"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 10
MIN_MESSAGE_BYTES = 256
DEFAULT_GAP_TIMEOUT = 30.0
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
# How many refused publications a device remembers, and how many events and applied publications
# it keeps for inspection: bounded, since each refusal may come from an attacker.
MAX_REMEMBERED = 256
MAX_EVENTS = 100
MAX_REASON_CHARS = 400


# --- connection settings ------------------------------------------------------------------------
class BrokerSettings:
    """Where and how to connect: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...``
    (TLS, port 8883 by default), with the options mosquitto_sub and aiomqtt use: ``username``,
    ``password``, ``cafile`` (CA certificates; implies TLS), ``cert``/``key`` (client certificate),
    ``insecure`` (no check of the server's host name), ``client_id``, ``keepalive``, ``timeout``
    (seconds for each MQTT operation)."""

    def __init__(self, url, username=None, password=None, cafile=None, cert=None, key=None, insecure=False,
                 client_id=None, keepalive=30, timeout=20.0):
        parts = urlsplit(url if "://" in url else "mqtt://" + url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError("broker URL %r: the scheme must be mqtt:// or mqtts://" % url)
        if not parts.hostname:
            raise ValueError("broker URL %r has no host" % url)
        if parts.path not in ("", "/"):
            raise ValueError("broker URL %r: no path expected after host:port" % url)
        if (cert is None) != (key is None):
            raise ValueError("--cert and --key go together")
        self.tls = parts.scheme in ("mqtts", "ssl") or cafile is not None or cert is not None
        self.host = parts.hostname
        try:
            self.port = parts.port or (DEFAULT_TLS_PORT if self.tls else DEFAULT_PORT)
        except ValueError:
            raise ValueError("broker URL %r has an invalid port" % url)
        self.username = username if username is not None else (unquote(parts.username) if parts.username else None)
        self.password = password if password is not None else (unquote(parts.password) if parts.password else None)
        if self.password is not None and self.username is None:
            raise ValueError("a password needs a username")
        self.cafile = cafile
        self.cert = cert
        self.key = key
        self.insecure = insecure
        self.client_id = client_id
        self.keepalive = keepalive
        self.timeout = timeout

    def __repr__(self):
        return "%s://%s:%d" % ("mqtts" if self.tls else "mqtt", self.host, self.port)

    def client(self, role="client", inflight=20):
        """A new aiomqtt.Client (``async with`` connects it) for up to ``inflight`` calls at once."""
        import aiomqtt  # on first use: `import transports.mqtt` stays light
        tls = None
        if self.tls:
            tls = aiomqtt.TLSParameters(ca_certs=self.cafile, certfile=self.cert, keyfile=self.key)
        identifier = self.client_id or "nnc-edge-%s-%s" % (role, uuid.uuid4().hex[:12])
        client = aiomqtt.Client(self.host, self.port, username=self.username, password=self.password,
                                identifier=identifier, clean_session=True, keepalive=self.keepalive, logger=paho_log,
                                timeout=self.timeout, tls_params=tls, tls_insecure=self.insecure if self.tls else None,
                                max_inflight_messages=inflight)
        client.pending_calls_threshold = inflight + 4  # aiomqtt warns above this many calls in flight
        return client


def topics(prefix, model):
    envelope.check_model_name(model)
    if not prefix or "+" in prefix or "#" in prefix:
        raise ValueError("invalid topic prefix %r" % prefix)
    return Topics(prefix, model)


class Topics:
    def __init__(self, prefix, model):
        self.base = "%s/%s" % (prefix, model)
        self.status = self.base + "/status"

    def data(self, seq, index):
        return "%s/seq/%d/%d" % (self.base, seq, index)

    def publication(self, seq):
        return "%s/seq/%d/+" % (self.base, seq)

    def parse_data(self, topic):
        """(seq, index) of a data topic, or None unless both are written as the publisher writes them."""
        head = self.base + "/seq/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 2:
            return None
        seq = _topic_number(parts[0], 0xFFFFFFFF)
        index = _topic_number(parts[1], envelope.MAX_COUNT - 1)
        if seq is None or index is None:
            return None
        return seq, index


def _topic_number(text, largest):
    """The number a topic level spells in ASCII digits without leading zeros, None for anything else
    (str.isdigit() also takes "²", which int() refuses, and int() takes " 7" and "7_0")."""
    if not text or len(text) > len(str(largest)) or (text[0] == "0" and text != "0"):
        return None
    for c in text:
        if not "0" <= c <= "9":
            return None
    value = int(text)
    return value if value <= largest else None


def backoff_delays(initial=1.0, maximum=60.0):
    """Exponential backoff with jitter: about initial, 2 initial, 4 initial, ... up to maximum."""
    delay = initial
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * 2, maximum)


# --- cutting a bitstream into messages -----------------------------------------------------------
def split_bitstream(data, max_body_bytes):
    """The NNR units of ``data`` grouped into message bodies of at most ``max_body_bytes``.

    Units are kept whole. An NDU (or a partial-data sequence with a part) larger than a body is
    re-coded as partial-data units (6.4.3.1) whose payloads fit. The decoded tensors are the same.
    Raises NNCError for a malformed bitstream (an empty one included: no device may take it for an
    empty model) and ValueError for a unit that cannot be made to fit (a large non-NDU unit, or an
    NDU needing more than 255 partial units).
    """
    from nnc_edge import unitwriter  # CPython only (host side)
    from nnc_edge.decoding import empty_bitstream

    data = bytes(data)
    if not data:
        raise empty_bitstream()
    state = ParserState()
    units = []   # complete units (bytes) in stream order
    seq = None   # an open partial-data sequence: [header, [payload, ...], [unit bytes, ...], next counter]
    fit = None   # an NDU to re-cut: (header, payload, its original units)
    too_small = None
    offset = 0
    end = len(data)
    while offset < end:
        size = nnr_unit_size(data, offset, end)[0]
        if offset + size > end:
            raise NNCError("nnr_unit_size %d runs past the end of the data (%d bytes left)" % (size, end - offset),
                           offset, "nnr_unit_size")
        unit = parse_unit(data, offset, offset + size, state)
        raw = data[offset:offset + size]
        partial = unit.nnr_unit_type == NNR_NDU and unit.partial_data_counter > 0
        if seq is not None and (not partial or unit.partial_data_counter != seq[3]):
            raise NNCError("partial-data sequence interrupted (partial_data_counter %d where %d was expected)"
                           % (unit.partial_data_counter, seq[3]), offset, "partial_data_counter")
        if partial:
            counter_end = offset + (4 if data[offset] & 0x80 else 2) + 2
            if seq is None:
                seq = [data[counter_end:unit.payload_start], [], [], 0]
            seq[3] = unit.partial_data_counter - 1
            seq[1].append(data[unit.payload_start:unit.payload_end])
            seq[2].append(raw)
            if unit.partial_data_counter == 1:
                fit = (seq[0], b"".join(seq[1]), seq[2])
                seq = None
        elif unit.nnr_unit_type == NNR_NDU and size > max_body_bytes:
            header = data[offset + (4 if data[offset] & 0x80 else 2) + 1:unit.payload_start]
            fit = (header, data[unit.payload_start:unit.payload_end], [raw])
        else:
            if size > max_body_bytes:
                raise ValueError("%s unit of %d bytes at byte %d does not fit a %d-byte message body; only NDUs "
                                 "can be split" % (unit.type_name, size, offset, max_body_bytes))
            units.append(raw)
        if fit is not None:
            try:
                units.extend(_fit_ndu(fit[0], fit[1], fit[2], max_body_bytes, unitwriter))
            except MessageTooSmall as exc:  # go on: the error names the size every NDU fits
                too_small = exc if too_small is None or exc.min_body_bytes > too_small.min_body_bytes else too_small
            fit = None
        offset += size
    if seq is not None:
        raise NNCError("the bitstream ends inside a partial-data sequence", end, "partial_data_counter")
    if too_small is not None:
        raise too_small
    bodies = []
    body = []
    body_len = 0
    for raw in units:
        if body and body_len + len(raw) > max_body_bytes:
            bodies.append(b"".join(body))
            body = []
            body_len = 0
        body.append(raw)
        body_len += len(raw)
    if body:
        bodies.append(b"".join(body))
    return bodies


def _fit_ndu(header, payload, original, max_body_bytes, unitwriter):
    if all(len(u) <= max_body_bytes for u in original):
        return original
    size_field = 2 if max_body_bytes <= unitwriter.MAX_SHORT_UNIT_SIZE else 4
    chunk = max_body_bytes - size_field - 2 - len(header)  # 2: unit header byte and partial_data_counter
    if chunk < 1:
        raise ValueError("a %d-byte message body cannot hold an NDU header of %d bytes" % (max_body_bytes, len(header)))
    if (len(payload) + chunk - 1) // chunk > unitwriter.MAX_PARTIAL_UNITS:
        need = (len(payload) + unitwriter.MAX_PARTIAL_UNITS - 1) // unitwriter.MAX_PARTIAL_UNITS
        raise MessageTooSmall("an NDU of %d bytes needs more than %d partial-data units (partial_data_counter is "
                              "u(8)) in message bodies of %d bytes" % (len(payload), unitwriter.MAX_PARTIAL_UNITS,
                                                                       max_body_bytes),
                              need + (max_body_bytes - chunk))
    return unitwriter.split_units(NNR_NDU, header, payload, chunk)


class MessageTooSmall(ValueError):
    """split_bitstream: ``min_body_bytes`` would fit."""

    def __init__(self, message, min_body_bytes):
        ValueError.__init__(self, message)
        self.min_body_bytes = min_body_bytes


# --- publisher ------------------------------------------------------------------------------------
class PublishError(Exception):
    """A publication that cannot be made (no model to update, a conflicting publisher, ...)."""


class Publisher:
    """Publishes bitstreams of one model; see the module docstring for the protocol.

    With a ``record`` (transports.chain_record.ChainRecord: the host's own record of the chain it
    published), versions are numbered after both the record and the broker's status, never at or
    below what was published before; an update whose update record does not continue the chain
    (published already, or made from another model) is refused; and a chain the broker has lost
    is published again before the new version."""

    def __init__(self, settings, model, prefix=DEFAULT_PREFIX, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                 retries=5, window=16, status_timeout=5.0, backoff=(1.0, 30.0), sign=None, ext_bytes=0,
                 record=None):
        """``sign(model, seq, parent_digest, digest) -> bytes`` makes the envelopes' extension field
        (e.g. a signature over the publication), for which ``ext_bytes`` are kept free in each message."""
        self.settings = settings
        self.sign = sign
        self.ext_bytes = ext_bytes
        self.model = model
        self.topics = topics(prefix, model)
        if max_message_bytes < MIN_MESSAGE_BYTES:
            raise ValueError("max_message_bytes must be at least %d" % MIN_MESSAGE_BYTES)
        self.max_message_bytes = max_message_bytes
        self.retries = retries
        self.window = window
        self.status_timeout = status_timeout
        self.backoff = backoff
        self.record = record
        self.bytes_sent = 0  # payload bytes of every PUBLISH, retries included
        self.wire_bytes = 0  # the same PUBLISH packets whole (MQTT 3.1.1 framing, QoS 1)

    def bodies(self, bitstream):
        header = envelope.header_bytes(self.model) + self.ext_bytes
        try:
            return split_bitstream(bitstream, self.max_message_bytes - header)
        except MessageTooSmall as exc:
            raise MessageTooSmall("%s: use messages of at least %d bytes (--max-message-bytes)"
                                  % (exc, exc.min_body_bytes + header), exc.min_body_bytes)

    async def publish(self, bitstream, kind=FULL, seq=None):
        """Publish one bitstream as the model's next version; returns the new Status.

        ``kind`` is FULL or UPDATE (an update applies to the current version). ``seq`` defaults to
        the current version + 1; a given one must be larger (and exactly that for an update).
        Raises PublishError for a publication that cannot be made, aiomqtt.MqttError when the
        broker stays out of reach (a lost connection fails the attempt at once; ``retries`` more
        are made after a backoff).
        """
        if kind not in (FULL, UPDATE):
            raise ValueError("kind must be %r or %r" % (FULL, UPDATE))
        job = _Job(self.bodies(bitstream), kind, seq)
        if self.record is None:
            return await self._publish(job)
        from . import chain_record
        try:
            with self.record.locked():
                self.record.load()
                if kind == UPDATE:
                    job.info = _update_info(bitstream)
                status = await self._publish(job)
                self.record.add(chain_record.Version(status.seq, kind, status.digest, job.result, status.counts[-1]))
                return status
        except chain_record.RecordError as exc:
            raise PublishError(str(exc))

    async def _publish(self, job):
        delays = backoff_delays(*self.backoff)
        with _quiet_socket_races(asyncio.get_running_loop()):
            for attempt in range(self.retries + 1):
                client = None
                try:
                    async with self.settings.client("pub", self.window) as client:
                        return await _unless_disconnected(client, self._attempt(client, job))
                except Exception as exc:  # aiomqtt.MqttError, without importing aiomqtt at module level
                    _forget_disconnect(client)
                    if not is_mqtt_error(exc) or attempt == self.retries:
                        raise
                    delay = next(delays)
                    log.warning("publishing %s: %s; retrying in %.1f s", "model %s" % self.model, exc, delay)
                    await asyncio.sleep(delay)

    async def _attempt(self, client, job):
        status = await read_status(client, self.topics, self.model, self.status_timeout)
        plan = job.plan
        if plan is not None and (status.seq, status.digest) == (plan.seq, plan.digest):
            log.info("%s was published before the connection was lost", plan.describe())
            await self._clear(client, plan.stale)
            return plan.status
        if self.record is not None:
            status = await self._restore(client, status, job.kind)
        if plan is None:
            plan = job.plan = self._plan(status, job.bodies, job.kind, job.seq)
            if self.record is not None:
                job.result = self._check_continues(plan, job)
                self.record.keep(plan.digest, b"".join(job.bodies))  # the bytes the digest is of
        elif (status.seq, status.digest) != (plan.parent_status.seq, plan.parent_status.digest):
            if plan.kind == FULL and status.seq < plan.seq:
                # E.g. a broker restarted without persistence: a full model needs no chain.
                plan = job.plan = self._plan(status, job.bodies, FULL, plan.seq)
            else:
                raise PublishError("the status changed while reconnecting (now version %d): the broker "
                                   "lost it, or another publisher is active" % status.seq)
        await self._send(client, plan)
        return plan.status

    def _plan(self, status, bodies, kind, seq):
        if seq is None:
            seq = status.seq + 1
        if seq <= status.seq:
            raise PublishError("seq %d is not newer than the published version %d" % (seq, status.seq))
        if kind == UPDATE:
            if not status.seq:
                raise PublishError("model %s has no published version to update: publish a full model first"
                                   % self.model)
            if seq != status.seq + 1:
                raise PublishError("an update to version %d must be version %d, not %d"
                                   % (status.seq, status.seq + 1, seq))
            digest, payloads = self._messages(UPDATE, seq, bodies, status.seq, status.digest)
            if digest == status.digest:
                raise _published_already(status.seq)
            new = Status(self.model, seq, digest, status.full_seq, status.counts + [len(payloads)])
        else:
            digest, payloads = self._messages(FULL, seq, bodies)
            new = Status(self.model, seq, digest, seq, [len(payloads)])
        plan = _Plan(kind, seq, digest, payloads, status, new)
        # Retained messages nobody will need again: the old chain once a full model replaces it,
        # and what is left of an interrupted publication beyond this one's messages.
        stale = []
        if kind == FULL:
            stale.extend(self.topics.data(s, i) for s, c in status.chain() for i in range(c))
        if status.pending is not None and status.pending[0] > status.seq:
            first = len(payloads) if status.pending[0] == seq else 0
            stale.extend(self.topics.data(status.pending[0], i) for i in range(first, status.pending[2]))
        plan.stale = stale
        return plan

    def _messages(self, kind, seq, bodies, parent_seq=0, parent_digest=NO_DIGEST):
        """(digest, payloads) of a publication, with the extension ``sign`` makes."""
        digest, payloads = envelope.messages(self.model, kind, seq, bodies, parent_seq, parent_digest,
                                             self._ext(seq, parent_digest))
        if max(map(len, payloads)) > self.max_message_bytes:
            raise ValueError("the extension field is larger than the %d bytes kept for it" % self.ext_bytes)
        return digest, payloads

    def _ext(self, seq, parent_digest):
        if self.sign is None:
            return b""
        return lambda digest: self.sign(self.model, seq, parent_digest, digest)

    # --- the host's record ---------------------------------------------------------------------
    async def _restore(self, client, status, kind):
        """The status to publish after, given the broker's and the record's: the broker's when they
        agree, the record's (published again for an update to build on) when the broker lost it."""
        rec = self.record
        if status.seq > rec.seq:
            if rec.seq:
                log.warning("model %s: the broker announces version %d, newer than this host's record %s (version "
                            "%d): another publisher was here; continuing from the broker's version", self.model,
                            status.seq, rec, rec.seq)
            rec.adopt(status)
            return status
        mine = rec.find(status.seq) if status.seq else None
        if mine is not None and mine.digest not in (None, status.digest):
            raise PublishError("the broker announces version %d (%s), which is not the version %d this host "
                               "published (record %s): another publisher is active, or the record is not this "
                               "broker's" % (status.seq, digest_hex(status.digest)[:12], status.seq, rec))
        if status.seq == rec.seq:
            return status
        if kind == FULL:
            # A full model needs no chain: numbered after the record, it replaces the lost one.
            log.warning("model %s: the broker has lost versions %d .. %d (it announces %s)", self.model,
                        status.seq + 1, rec.seq, "version %d" % status.seq if status.seq else "nothing")
            return rec.status()
        return await self._republish(client, status)

    async def _republish(self, client, status):
        rec = self.record
        missing = rec.missing_bitstreams()
        if missing:
            raise PublishError("the broker has lost versions %d .. %d of model %s, and this host has no copy of "
                               "version%s %s to publish them again: publish a full model"
                               % (status.seq + 1, rec.seq, self.model, "s" if len(missing) > 1 else "",
                                  _ranges(missing)))
        log.warning("model %s: the broker has lost versions %d .. %d: publishing versions %d .. %d again from %s",
                    self.model, status.seq + 1, rec.seq, rec.versions[0].seq, rec.seq, rec.directory)
        parent = (0, NO_DIGEST)
        for v in rec.versions:
            data = rec.bitstream(v)
            if hashlib.sha256(data).digest() != v.digest:
                raise PublishError("the copy of version %d in %s is damaged: publish a full model"
                                   % (v.seq, rec.directory))
            digest, payloads = self._messages(v.kind, v.seq, self.bodies(data), *parent)
            if digest != v.digest:  # devices know each version by its digest: the units must stay as they were
                raise PublishError("version %d cannot be published again in messages of at most %d bytes: its NNR "
                                   "units were cut for larger ones (use the --max-message-bytes it was published "
                                   "with)" % (v.seq, self.max_message_bytes))
            await self._put_all(client, [(self.topics.data(v.seq, i), p) for i, p in enumerate(payloads)])
            v.count = len(payloads)
            parent = (v.seq, v.digest)
        restored = rec.status()
        await self._put(client, self.topics.status, restored.payload())
        return restored

    def _check_continues(self, plan, job):
        """For an update, the digest of the model it makes (from its update record; None without one).
        PublishError unless the record says it applies to the current version's model."""
        if plan.kind == FULL:
            return None
        rec = self.record
        for v in rec.versions:
            if v.digest == plan.digest:
                raise _published_already(v.seq)
        info = job.info
        if info is None:
            log.warning("model %s: the update carries no update record: whether it applies to version %d "
                        "cannot be checked", self.model, plan.parent_status.seq)
            return None
        current = self._model_digest(rec.top)
        if current is None:
            log.warning("model %s: the model of version %d is not known to this host (record %s): whether the "
                        "update applies to it cannot be checked", self.model, rec.seq, rec)
        elif info.result == current:
            raise _published_already(rec.seq, " (it makes that version's model)")
        elif info.parent != current:
            raise PublishError("this update (record: update %d) applies to %s, not to the model of the current "
                               "version %d (%s): make it from that model (nnc-edge update --base)"
                               % (info.sequence, self._describe_model(info.parent), rec.seq,
                                  digest_hex(current)[:12]))
        return info.result

    def _describe_model(self, digest):
        for v in self.record.versions:
            if v.model == digest:
                return "the model of version %d (%s)" % (v.seq, digest_hex(digest)[:12])
        return "a model this host has not published (%s)" % digest_hex(digest)[:12]

    def _model_digest(self, version):
        """The digest of the model a version makes: recorded, or read once from its kept bitstream
        (a full model decoded, an update's record) and recorded."""
        if version.model is None and self.record.has_bitstream(version.digest):
            data = self.record.bitstream(version)
            if version.kind == FULL:
                from nnc_edge import decode
                from nnc_edge.updates import model_digest
                version.model = model_digest(decode(data))
            else:
                info = _update_info(data)
                version.model = info.result if info is not None else None
            self.record.save()
        return version.model

    # --- sending -------------------------------------------------------------------------------
    async def _send(self, client, plan):
        pending = Status(self.model, plan.parent_status.seq, plan.parent_status.digest, plan.parent_status.full_seq,
                         plan.parent_status.counts, (plan.seq, plan.digest, len(plan.payloads)))
        await self._put(client, self.topics.status, pending.payload())
        await self._put_all(client, [(self.topics.data(plan.seq, i), p) for i, p in enumerate(plan.payloads)])
        await self._put(client, self.topics.status, plan.status.payload())
        log.info("published %s: %d bytes in %d message%s", plan.describe(), plan.total, len(plan.payloads),
                 "" if len(plan.payloads) == 1 else "s")
        await self._clear(client, plan.stale)

    async def _clear(self, client, stale):
        # A zero-length retained message deletes the retained one (MQTT 3.3.1.3).
        await self._put_all(client, [(topic, b"") for topic in stale])

    async def _put(self, client, topic, payload):
        self.bytes_sent += len(payload)
        self.wire_bytes += publish_packet_bytes(topic, payload)
        await client.publish(topic, payload, qos=1, retain=True)

    async def _put_all(self, client, items):
        # Up to `window` messages in flight; paho sends them in call order.
        inflight = []
        try:
            for topic, payload in items:
                if len(inflight) >= self.window:
                    await inflight.pop(0)
                inflight.append(asyncio.ensure_future(self._put(client, topic, payload)))
            while inflight:
                await inflight.pop(0)
        finally:
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)


class _Job:
    """One call of Publisher.publish: the bitstream's message bodies, and, once known, its plan, its
    update record (``info``) and the digest of the model it makes (``result``)."""

    def __init__(self, bodies, kind, seq):
        self.bodies = bodies
        self.kind = kind
        self.seq = seq
        self.plan = None
        self.info = None
        self.result = None


def _published_already(seq, how=""):
    return PublishError("this update was published already, as version %d%s: devices have applied it, and would "
                        "refuse it again" % (seq, how))


def _update_info(bitstream):
    from nnc_edge.updates import read_update_info
    return read_update_info(bytes(bitstream))


class _Plan:
    def __init__(self, kind, seq, digest, payloads, parent_status, status):
        self.kind = kind
        self.seq = seq
        self.digest = digest
        self.payloads = payloads
        self.parent_status = parent_status
        self.status = status
        self.total = sum(len(p) for p in payloads)
        self.stale = []

    def describe(self):
        if self.kind == UPDATE:
            return "update %d on %d" % (self.seq, self.parent_status.seq)
        return "full model %d" % self.seq


def publish_packet_bytes(topic, payload, qos=1):
    """Size of the MQTT 3.1.1 PUBLISH packet (3.3) carrying payload on topic."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + len(payload)
    length_bytes = 1
    while remaining >= 128 ** length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


def _forget_disconnect(client):
    # aiomqtt keeps an unexpected disconnection as a future's exception, which nobody retrieves when
    # the error surfaced elsewhere (asyncio would log "exception was never retrieved").
    future = getattr(client, "_disconnected", None)
    if future is not None and future.done() and not future.cancelled():
        future.exception()


async def _unless_disconnected(client, coro):
    """Await ``coro``, but raise aiomqtt.MqttError as soon as the connection drops: aiomqtt's
    publish waits for the acknowledgement (``timeout``, 20 s by default), not for the disconnect,
    and devices whose gap timeout is shorter would give the publication up meanwhile."""
    import aiomqtt
    work = asyncio.ensure_future(coro)
    lost = client._disconnected  # aiomqtt's own iterator of messages races the same future
    try:
        await asyncio.wait((work, lost), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if not work.cancelled():
        return work.result()
    cause = lost.exception() if lost.done() and not lost.cancelled() else None
    raise aiomqtt.MqttError("the connection to the broker was lost%s" % (": %s" % cause if cause else "")) from cause


@contextlib.contextmanager
def _quiet_socket_races(loop):
    """Drop one harmless asyncio error while in the block: aiomqtt registers paho's socket with the
    event loop through call_soon_threadsafe, and when paho closed the socket in between (a lost
    connection), asyncio logs "Exception in callback ... add_writer(...)" with a traceback for
    "Bad file descriptor". Other errors go to the handler that was there before."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiet_socket_races", False):
        yield
        return

    def handler(loop, context):
        if _socket_race(context):
            log.debug("ignored: %s", context.get("message"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)
    handler.quiet_socket_races = True
    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        if loop.get_exception_handler() is handler:
            loop.set_exception_handler(previous)


def _socket_race(context):
    exc = context.get("exception")
    callback = getattr(context.get("handle"), "_callback", None)
    closed = (isinstance(exc, OSError) and exc.errno == errno.EBADF) or isinstance(exc, ValueError)  # fd -1
    return closed and getattr(callback, "__name__", None) in ("add_reader", "add_writer")


def is_mqtt_error(exc):
    import aiomqtt
    return isinstance(exc, aiomqtt.MqttError)


async def read_status(client, topics, model, timeout=5.0):
    """The retained status of the model (version 0 when there is none).

    A retained message is delivered right after the subscription; to know there is none without
    waiting out ``timeout``, a message to a private topic published after subscribing marks the
    point by which it would have arrived.
    """
    marker = "%s/sync/%s" % (topics.base, uuid.uuid4().hex)
    await client.subscribe(topics.status, qos=1)
    await client.subscribe(marker, qos=1)
    await client.publish(marker, b"", qos=1)
    status = Status(model)
    deadline = time.monotonic() + timeout
    messages = client.messages.__aiter__()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                message = await asyncio.wait_for(messages.__anext__(), left)
            except asyncio.TimeoutError:
                break
            topic = message.topic.value
            if topic == marker:
                break
            if topic == topics.status and message.payload:
                status = envelope.parse_status(message.payload, model)
    finally:
        await client.unsubscribe([topics.status, marker])
    return status


# --- device side: the model in a directory --------------------------------------------------------
class ModelStore:
    """The device's current model: ``DIR/model.safetensors``, its version in the file's metadata
    (``nnc_edge.seq``, ``nnc_edge.digest``, ``nnc_edge.kind``), always replaced atomically.

    Updates are applied with ``nnc_edge.updates.apply_update``, which checks the update record
    inside the bitstream against the model's own digest and keeps the decoder state of an update
    chain in a file beside the model. ``allow_anonymous`` (default True) also applies updates
    without a record (e.g. written by NNCodec): the envelope's parent version already ties them to
    this model. ``apply_update(base_tensors, update_bytes) -> new_tensors`` replaces the rule.
    """

    FILENAME = "model.safetensors"

    def __init__(self, directory, model, apply_update=None, threads=None, allow_anonymous=True):
        from nnc_edge import modelio
        self.directory = os.fspath(directory)
        self.model = model
        self.path = os.path.join(self.directory, self.FILENAME)
        self.apply_update = apply_update
        self.allow_anonymous = allow_anonymous
        self.threads = threads
        os.makedirs(self.directory, exist_ok=True)
        self.version = None
        if os.path.exists(self.path):
            try:
                meta = modelio.load_metadata(self.path)
                if meta.get("nnc_edge.model") == model:
                    self.version = (int(meta["nnc_edge.seq"]), envelope.digest_from_hex(meta["nnc_edge.digest"]))
            except (KeyError, ValueError, OSError) as exc:  # ModelFormatError and NNCError are ValueErrors
                log.warning("%s: no usable version in its metadata (%s); fetching the full model", self.path, exc)

    def describe(self):
        if self.version is None:
            return "no model"
        return "version %d (%s)" % (self.version[0], digest_hex(self.version[1])[:12])

    def metadata(self, env):
        return {"nnc_edge.model": self.model, "nnc_edge.seq": str(env.seq), "nnc_edge.digest": digest_hex(env.digest),
                "nnc_edge.kind": env.kind}

    def begin(self, env):
        return FullModelWriter(self, env) if env.kind == FULL else UpdateWriter(self, env)


class FullModelWriter:
    """A full model streaming into the store: each body is decoded as it comes (tensors go to a
    temporary file); ``commit()`` renames it onto the model once everything checked out."""

    def __init__(self, store, env):
        from nnc_edge.sinks import SafetensorsSink
        from nnc_edge.streaming import DEFAULT_SLICE_ELEMENTS, StreamDecoder
        self.store = store
        self.env = env
        # Slices: the writer's memory does not follow the model's largest tensor.
        self.decoder = StreamDecoder(slice_elements=DEFAULT_SLICE_ELEMENTS)
        self.sink = SafetensorsSink(store.path, metadata=store.metadata(env))
        self.tensors = 0

    def feed(self, body):
        for name, shape, start, array in self.decoder.iter_feed(body):
            self.sink.write_slice(name, shape, start, array)
            self.tensors += start == 0

    def commit(self):
        try:
            self.decoder.close()
            self.sink.close()
        finally:
            self.abort()
        self.store.version = (self.env.seq, self.env.digest)

    def abort(self):
        self.decoder.release_threads()
        self.sink.abort()


class UpdateWriter:
    """An update collected in memory (updates are small; the envelope's total is checked first),
    then applied to the current model and written atomically."""

    def __init__(self, store, env):
        self.store = store
        self.env = env
        self.data = bytearray()
        self.tensors = 0

    def feed(self, body):
        self.data += body

    def commit(self):
        from nnc_edge import modelio, updates
        path = self.store.path
        metadata = self.store.metadata(self.env)
        if self.store.apply_update is not None:
            new = self.store.apply_update(modelio.load(path), bytes(self.data))
            updates.write_model(path, new, None, metadata)
        else:
            # Patched in a copy of the model file, never loaded whole; the decoder state of an update
            # chain (temporal context adaptation) lives beside the model.
            new = updates._apply(path, bytes(self.data), path, threads=self.store.threads,
                                 allow_anonymous=self.store.allow_anonymous, metadata=metadata)
        self.tensors = len(new)
        self.store.version = (self.env.seq, self.env.digest)

    def abort(self):
        self.data = bytearray()


class Receiver:
    """The device's side of the protocol, independent of the MQTT connection (``run_receiver``
    drives it): feed it the messages of the status topic and of ``subscription()``.

    ``applied`` lists (seq, kind, bytes, seconds from first message to model written) of the last
    publications applied; ``events`` the last reasons for what was refused or abandoned.
    ``verify(envelope)`` (e.g. a signature check of the extension field) runs on the first message
    of each publication, before anything of it is used; an NNCError from it refuses the publication.

    Anyone who can publish to the broker can send anything: whatever one message makes go wrong is
    logged and the message dropped (``handle``), and what is remembered about refused messages is
    bounded (MAX_REMEMBERED publications, MAX_EVENTS events). A refusal never moves the device to an
    older version: it keeps its model until a publication it can apply arrives (a new full model,
    or another publication of the next version), and says so every ``gap_timeout`` while the status
    announces a version it does not have.
    """

    def __init__(self, store, prefix=DEFAULT_PREFIX, gap_timeout=DEFAULT_GAP_TIMEOUT,
                 max_buffered=envelope.DEFAULT_MAX_BUFFERED, max_update_bytes=256 << 20, clock=time.monotonic,
                 on_applied=None, on_current=None, verify=None):
        self.store = store
        self.verify = verify
        self.model = store.model
        self.topics = topics(prefix, store.model)
        self.gap_timeout = gap_timeout
        self.max_buffered = max_buffered
        self.max_update_bytes = max_update_bytes
        self.clock = clock
        self.on_applied = on_applied
        self.on_current = on_current
        self.status = None
        self.target = None
        self.diverged = False     # the status shows that the device's version is not on the publisher's chain
        self.resubscribe = False  # subscribe to the target again to have its retained messages re-sent
        self.subscribed = None    # the data topic filter run_receiver has subscribed to (acknowledged)
        self.connected = False    # run_receiver is connected and subscribed to the status
        self.refused = _Bounded(MAX_REMEMBERED)     # _identity() of publications refused for good
        # Those verify() refused: an unsigned or forged copy of a bitstream must not make the device
        # ignore the genuine signed publication of the same bytes (its extension differs).
        self.unverified = _Bounded(MAX_REMEMBERED)
        self.deferred = _Bounded(MAX_REMEMBERED)    # digest -> clock: failed here (disk, ...), left alone until
        self.blocked = None       # (seq, digest, reason) of the last publication refused
        self.behind_since = None  # clock reading: since then the device lags the status and nothing arrives
        self.assembly = None
        self.writer = None
        self.started = None
        self.applied = _Recent(maxlen=MAX_EVENTS)
        self.events = _Recent(maxlen=MAX_EVENTS)
        self.target = self._next_target()

    @property
    def up_to_date(self):
        """True when the device has the version the publisher's status announces."""
        st = self.status
        return (st is not None and st.seq > 0 and self.assembly is None
                and self.store.version == (st.seq, st.digest))

    def _check_current(self):
        if self.on_current is not None and self.up_to_date:
            self.on_current()

    # --- what to subscribe to ------------------------------------------------------------------
    def subscription(self):
        """The data topic filter to be subscribed to now (None: only the status)."""
        return None if self.target is None else self.topics.publication(self.target)

    def _next_target(self):
        cur = self.store.version
        st = self.status
        if st is None:
            return cur[0] + 1 if cur else None
        if not st.seq:
            return cur[0] + 1 if cur else 1
        if self.diverged or cur is None:
            return st.full_seq
        k, d = cur
        if st.full_seq <= k <= st.seq:
            # On the chain (an update's parent check proves the digest when it arrives).
            if k < st.seq or d == st.digest:
                return k + 1
        elif st.pending is not None and (k, d) == st.pending[:2]:
            return k + 1  # applied as it was published; the status follows
        self._event("warning", "model %s: the device's %s is not on the published chain (current version %d, "
                    "full model %d): fetching the full model" % (self.model, self.store.describe(), st.seq,
                                                                  st.full_seq))
        self.diverged = True
        return st.full_seq

    def _retarget(self, reason=None):
        target = self._next_target()
        if target != self.target:
            if self.assembly is not None:
                self._abandon(reason or "now fetching version %d" % target, refuse=False)
            self.target = target

    # --- input ---------------------------------------------------------------------------------
    async def handle(self, topic, payload):
        """Act on one message of the status or data topic. Whatever goes wrong is logged and the
        message dropped: no topic, status or envelope may end the service. (Cancellation and
        KeyboardInterrupt are not Exceptions: they still stop it.)"""
        try:
            if topic == self.topics.status:
                self.on_status(payload)
                return
            where = self.topics.parse_data(topic)
            if where is not None:
                await self.on_data(where[0], where[1], payload)
        except Exception as exc:
            self._unexpected("the message on %s" % envelope.excerpt(topic, 120, quote=False), exc)

    def tick(self):
        """Act on a gap: after ``gap_timeout`` seconds without progress, subscribe again so that the
        broker re-sends the retained messages; after another ``gap_timeout``, abandon. Retry
        publications that failed for a local reason once their pause is over, and report a
        device that cannot reach the announced version."""
        try:
            now = self.clock()
            self._retry_deferred(now)
            self._check_gap(now)
            self._report_lag(now)
        except Exception as exc:
            self._unexpected("the gap check", exc)

    def _unexpected(self, what, exc):
        # A bug, or an input nobody foresaw: the traceback is for the report; the publication being
        # assembled may be half-fed to its writer, so it is dropped (and retried after a pause).
        log.error("model %s: %s raised %s: %s; ignored", self.model, what, type(exc).__name__, _reason(exc),
                  exc_info=exc)
        self.events.append("%s raised %s" % (what, type(exc).__name__))
        try:
            self._abandon("%s raised %s" % (what, type(exc).__name__), refuse=None)
        except Exception:  # the writer's cleanup failed too; the assembly is dropped all the same
            log.exception("model %s: dropping the publication being assembled failed", self.model)

    def on_status(self, payload):
        if not payload:
            self.status = Status(self.model)
        else:
            try:
                self.status = envelope.parse_status(payload, self.model)
            except NNCError as exc:
                self._event("warning", "ignored status of model %s: %s" % (self.model, _reason(exc)))
                return
        a = self.assembly
        if a is not None:
            announced = self._announced(a.first.seq)
            if announced is not None and announced != a.first.digest:
                self._abandon("the status announces another publication of version %d" % a.first.seq, refuse=False)
        self._retarget()
        self._check_current()

    def _announced(self, seq):
        st = self.status
        if st is None:
            return None
        if st.seq == seq:
            return st.digest
        if st.pending is not None and st.pending[0] == seq:
            return st.pending[1]
        return None

    async def on_data(self, seq, index, payload):
        if not payload:
            return  # a retained message being deleted
        try:
            env = envelope.parse(payload)
        except NNCError as exc:
            self._event("warning", "ignored message %s: %s" % (self.topics.data(seq, index), _reason(exc)))
            return
        if env.model != self.model or env.seq != seq or env.index != index:
            self._event("warning", "ignored message %s: its envelope says model %s, version %d, message %d"
                        % (self.topics.data(seq, index), envelope.excerpt(env.model), env.seq, env.index))
            return
        if seq != self.target or self.clock() < self.deferred.get(env.digest, 0):
            return
        identity = _identity(env)
        if identity in self.refused or identity in self.unverified:
            return
        announced = self._announced(seq)
        if announced is not None and announced != env.digest:
            return  # left over from an earlier, interrupted publication of this version
        a = self.assembly
        if a is not None and not env.same_publication(a.first):
            self._abandon("superseded by another publication of version %d" % seq, refuse=False)
            a = None
        if a is None:
            if not self._acceptable(env):
                return
            a = self.assembly = Assembly(env, self.max_buffered)
            a.last_progress = self.started = self.clock()
            try:
                self.writer = self.store.begin(env)
            except (OSError, ValueError) as exc:
                self._abandon("cannot start writing %s: %s" % (self.store.path, _reason(exc)), refuse=None)
                return
        confirmed = False  # the bytes received are those the digest names
        try:
            bodies = a.add(env)
            if bodies:
                a.last_progress = self.clock()
            for body in bodies:
                await asyncio.to_thread(self.writer.feed, body)
            if a.complete:
                a.check()
                confirmed = True
                await asyncio.to_thread(self.writer.commit)
        except NNCError as exc:
            # With signatures, bytes not yet known to be the signed ones may be a forged copy under a
            # genuine envelope: refusing their digest would make the device ignore the real publication.
            # Not refused for good, then retried after a pause: the retained copies that come again on
            # resubscribing could be the same bad ones, which must not make a busy loop.
            self._abandon(_reason(exc), refuse=True if confirmed or self.verify is None else None)
            return
        except (OSError, ValueError) as exc:  # a full disk, an unreadable model file, ...
            self._abandon("%s: %s (retrying in %g s)" % (type(exc).__name__, _reason(exc), self.gap_timeout),
                          refuse=None)
            return
        if a.complete:
            self._done(a)

    def _acceptable(self, env):
        if env.total == 0:
            from nnc_edge.decoding import empty_bitstream
            self._refuse(env, str(empty_bitstream()))  # never taken for an empty model
            return False
        if self.verify is not None:
            try:
                self.verify(env)
            except NNCError as exc:
                self.unverified.add(_identity(env))
                self._event("warning", "model %s: refused %s: %s; %s"
                            % (self.model, env.describe(), _reason(exc), self._standing("the model")))
                return False
        if env.kind == UPDATE:
            if self.store.version is not None and not os.path.exists(self.store.path):
                self._event("warning", "model %s: %s has gone: fetching the full model" % (self.model, self.store.path))
                self.store.version = None
                self._retarget()
                return False
            cur = self.store.version
            if cur != (env.parent_seq, env.parent_digest):
                self._refuse(env, "it applies to version %d (%s), the device has %s"
                             % (env.parent_seq, digest_hex(env.parent_digest)[:12], self.store.describe()))
                return False
            if env.total > self.max_update_bytes:
                self._refuse(env, "%d bytes, more than the limit of %d" % (env.total, self.max_update_bytes))
                return False
        return True

    def _refuse(self, env, reason, verb="refused"):
        """Refuse a publication for good for what it is: it is not retried, and the device stays at
        its version (going to an older full model would be a step back)."""
        self.refused.add(_identity(env))
        self.blocked = (env.seq, env.digest, reason)
        self._event("warning", "model %s: %s %s: %s; %s"
                    % (self.model, verb, env.describe(), reason, self._standing("the model")))

    def _done(self, a):
        env = a.first
        seconds = self.clock() - self.started
        tensors = self.writer.tensors
        self.assembly = self.writer = None
        self.blocked = None
        if env.kind == FULL:
            self.diverged = False
        self.applied.append((env.seq, env.kind, env.total, seconds))
        log.info("model %s: applied %s: %d bytes in %d message%s%s, %.2f s -> %s (%d tensors)", self.model,
                 env.describe(), env.total, env.count, "" if env.count == 1 else "s",
                 " (%d duplicates dropped)" % a.duplicates if a.duplicates else "",
                 seconds, self.store.path, tensors)
        # The next version, whatever the status says now: it may still announce the previous one
        # (the status follows the data); the next status message is checked against the chain.
        self.target = env.seq + 1
        if self.on_applied is not None:
            self.on_applied(env)
        self._check_current()

    # --- the clock -----------------------------------------------------------------------------
    def _retry_deferred(self, now):
        for digest in [d for d, until in self.deferred.items() if now >= until]:
            del self.deferred[digest]
            self.resubscribe = True

    def _check_gap(self, now):
        a = self.assembly
        if a is None or now - a.last_progress <= self.gap_timeout:
            return
        missing = "messages %s of %d missing for %.1f s" % (_ranges(a.missing()), a.first.count,
                                                           now - a.last_progress)
        if not a.refetched:
            a.refetched = True
            a.last_progress = now
            self.resubscribe = True
            log.info("model %s: %s: %s; asking the broker for them again", self.model, a.first.describe(), missing)
        else:
            self._abandon(missing, refuse=False)

    def _report_lag(self, now):
        """Every ``gap_timeout`` without progress while the status announces a version the device
        does not have: say which, and why it is not coming."""
        if self.assembly is not None or not self._lagging():
            self.behind_since = None
            return
        if self.behind_since is None:
            self.behind_since = now
            return
        if now - self.behind_since < self.gap_timeout:
            return
        if self._blocked_on_target():
            why = "version %d was refused (%s); waiting for another publication of it or a new full model" \
                  % (self.blocked[0], self.blocked[2])
        else:
            why = "nothing usable of version %s has arrived for %.0f s" % (self.target, now - self.behind_since)
        self.behind_since = now
        self._event("warning", "model %s: the status announces version %d, but %s: %s"
                    % (self.model, self.status.seq, self._standing("the device", "the device has no model"), why))

    def _blocked_on_target(self):
        # A refused publication explains the lag unless the status names another one for its version.
        if self.blocked is None or self.blocked[0] != self.target:
            return False
        announced = self._announced(self.target)
        return announced is None or announced == self.blocked[1]

    def _lagging(self):
        st = self.status
        if st is None or not st.seq:
            return False
        cur = self.store.version
        return cur is None or cur[0] < st.seq or (cur[0] == st.seq and cur[1] != st.digest)

    # --- giving up -----------------------------------------------------------------------------
    def _abandon(self, reason, refuse):
        """Drop the publication being assembled. ``refuse``: True for good (its content is bad),
        None for ``gap_timeout`` seconds (a local failure), False not at all: its retained messages
        are asked for again at once."""
        a = self.assembly
        if a is None:
            return
        writer = self.writer
        self.assembly = self.writer = None
        if writer is not None:
            writer.abort()
        if refuse:
            self._refuse(a.first, reason, "abandoned")
            return
        if refuse is None:
            self.deferred[a.first.digest] = self.clock() + self.gap_timeout
        else:
            self.resubscribe = True
        self._event("warning", "model %s: abandoned %s: %s; %s"
                    % (self.model, a.first.describe(), reason, self._standing("the model")))

    def _standing(self, subject, none="the device still has no model"):
        """Where the device stays after a failure: "<subject> stays at version N (digest)", or ``none``."""
        if self.store.version is None:
            return none
        return "%s stays at %s" % (subject, self.store.describe())

    def _event(self, level, message):
        self.events.append(message)
        getattr(log, level)(message)


def _reason(exc):
    # Errors may quote what a message carried (a tensor name, a record): cut for the log.
    return envelope.excerpt(str(exc), MAX_REASON_CHARS, quote=False)


def _identity(env):
    """What Envelope.same_publication compares, the extension (up to 64 KiB) by its digest: a refusal
    is of what the envelope says, and a copy that says anything else (another parent, count, total or
    signature with the same bitstream digest) may be the genuine publication."""
    return (env.kind, env.seq, env.parent_seq, env.parent_digest, env.count, env.total, env.digest,
            hashlib.sha256(bytes(env.ext)).digest())


class _Recent(deque):
    """A ring buffer (deque with maxlen) that can also be sliced, like the list it replaces."""

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(self)[index]
        return deque.__getitem__(self, index)


class _Bounded(OrderedDict):
    """A dict (or, with ``add``, a set) of at most ``limit`` keys: adding to a full one forgets the
    oldest. Forgetting a refusal costs only checking that publication again."""

    def __init__(self, limit):
        OrderedDict.__init__(self)
        self.limit = limit

    def __setitem__(self, key, value):
        OrderedDict.__setitem__(self, key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)

    def add(self, key):
        self[key] = True


def _ranges(indices):
    out = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(str(a) if a == b else "%d-%d" % (a, b) for a, b in out) or "none"


async def run_receiver(settings, receiver, stop=None, backoff=(1.0, 60.0), tick=1.0):
    """Keep the receiver connected until ``stop`` (an asyncio.Event) is set: subscribe to the status
    and to the receiver's data topic, hand it every message, and reconnect after a lost connection
    with exponential backoff."""
    stop = stop or asyncio.Event()
    with _quiet_socket_races(asyncio.get_running_loop()):
        await _keep_connected(settings, receiver, stop, backoff, tick)


async def _keep_connected(settings, receiver, stop, backoff, tick):
    import aiomqtt
    delays = backoff_delays(*backoff)
    while not stop.is_set():
        client = None
        try:
            async with settings.client("dev") as client:
                log.info("model %s: connected to %r, the device has %s", receiver.model, settings,
                         receiver.store.describe())
                delays = backoff_delays(*backoff)
                await _serve(client, receiver, stop, tick)
        except aiomqtt.MqttError as exc:
            _forget_disconnect(client)
            if stop.is_set():
                break
            delay = next(delays)
            log.warning("model %s: connection to %r: %s; reconnecting in %.1f s", receiver.model, settings, exc, delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass


async def _serve(client, receiver, stop, tick):
    await client.subscribe(receiver.topics.status, qos=1)
    subscribed = None
    messages = client.messages.__aiter__()
    waiter = None
    stopper = asyncio.ensure_future(stop.wait())
    receiver.subscribed = None
    receiver.connected = True
    try:
        while not stop.is_set():
            want = receiver.subscription()
            if want != subscribed or receiver.resubscribe:
                if subscribed is not None:
                    await client.unsubscribe(subscribed)
                receiver.resubscribe = False
                subscribed = None
                if want is not None:
                    await client.subscribe(want, qos=1)
                    subscribed = want
                receiver.subscribed = subscribed
            # One pending read at a time, kept across ticks: cancelling it could lose a message.
            if waiter is None:
                waiter = asyncio.ensure_future(messages.__anext__())
            done, _ = await asyncio.wait((waiter, stopper), timeout=tick, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                message = waiter.result()
                waiter = None
                await receiver.handle(message.topic.value, message.payload)
            receiver.tick()
    finally:
        receiver.connected = False
        for task in (waiter, stopper):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in (waiter, stopper) if t is not None), return_exceptions=True)
