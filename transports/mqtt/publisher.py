"""The host side: ``Publisher`` numbers and publishes bitstreams as retained messages (see the
protocol in ``transports.mqtt``), ``split_bitstream`` cuts a bitstream into message bodies of whole
NNR units, and ``read_status`` reads a model's retained status.

Publisher (``Publisher.publish``): reads the retained status, numbers the bitstream ``seq + 1``
(an update names the current version as its parent), announces it as ``pending`` in the status,
publishes its messages, then the status with the new version. Interrupted by a lost connection
(noticed at once, not after the acknowledgement timeout), it reconnects with exponential backoff
and publishes the whole publication again (retained messages are simply overwritten, receivers
drop duplicates). With the host's own record of the chain (``transports.chain_record``) it never
numbers a version below what it published before, refuses an update that does not continue the
chain, and publishes the chain again when the broker has lost it.

Every status the publisher writes keeps the staged-rollout wave (``rollout``, see
``transports.report``) of the status it read, unless the publication starts a new wave
(``publish(..., rollout={"percent": P, "devices": [...]})``: versions from this one on go to that
wave only; when the status has a wave already, from that wave's first version on, so that versions
of the old wave, a halted one's too, stay out of reach of the devices outside the new one) or
restores an older version (``publish(..., restores=(seq, digest))``, ``nnc-edge rollback``), which
is for every device and ends the wave. The ``pending`` status names the new wave already.

Chain compaction (``Publisher(compact_at=F)``, ``nnc-edge publish --compact-at PERCENT``): a device that
joins late downloads the last full model and every update after it. After publishing update N, when
the bitstreams of the updates since the last full model add up to more than F times that full model's
bitstream, the publisher also publishes version N + 1: a full model restoring N (``restores=(N,
digest)``; the bitstream decodes to exactly N's model, ``transports.mqtt.rollout.full_model_of``), if
it is smaller than the full model and the updates together (exact coding sends the tensors the updates
moved off the quantization grid as float32 values). The retained chain then starts at N + 1, so late
joiners download only it, and devices at N switch to it without downloading. Not while the status names
a staged-rollout wave (the restore would end it).
The old chain ends there: devices that joined at N + 1 have none of its decoder state (TCA, HDSP), so
an update that continues it is refused (``_check_continues``); the next update starts a new chain
from N's model. ``chain_state``: the host's ChainState file (``nnc-edge update --residual``), restarted
at N's model on compaction (``nnc_edge.updates.ChainState.restart``, the error-feedback residual kept).
"""

import asyncio
import hashlib
import time
import uuid

from decoder_core import NNCError
from decoder_core.tables import NNR_NDU
from decoder_core.units import ParserState, nnr_unit_size, parse_unit

from .. import envelope, report
from ..envelope import FULL, NO_DIGEST, UPDATE, Status, digest_hex
from .connection import _forget_disconnect, _quiet_socket_races, backoff_delays, is_mqtt_error
from .settings import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PREFIX, MIN_MESSAGE_BYTES, _ranges, log, topics


# --- cutting a bitstream into messages -----------------------------------------------------------
def split_bitstream(data, max_body_bytes):
    """The NNR units of ``data`` grouped into message bodies of at most ``max_body_bytes``.

    Units are kept whole. An NDU (or a partial-data sequence with a part) larger than a body is
    re-coded as partial-data units (6.4.3.1) whose payloads fit. The decoded tensors are the same.
    Raises NNCError for a malformed bitstream (an empty one included: no device may take it for an
    empty model) and ValueError for a unit that cannot be made to fit (a large non-NDU unit, or an
    NDU needing more than 255 partial units).
    """
    from nnc_edge.encoder import unitwriter  # CPython only (host side)
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
                 record=None, compact_at=None, chain_state=None):
        """``sign(model, seq, parent_digest, digest) -> bytes`` makes the envelopes' extension field
        (e.g. a signature over the publication), for which ``ext_bytes`` are kept free in each message.
        ``compact_at`` (a share > 0, e.g. 0.5; None: never) and ``chain_state`` (a ChainState file):
        chain compaction, see the module docstring; it needs the ``record``."""
        if compact_at is not None and (record is None or not compact_at > 0):
            raise ValueError("compact_at is a share above 0 (e.g. 0.5), and compaction needs the publisher's record")
        self.compact_at = compact_at
        self.chain_state = chain_state
        self.compaction = None  # the Compaction the last publish() made, or None
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

    async def publish(self, bitstream, kind=FULL, seq=None, rollout=None, restores=None):
        """Publish one bitstream as the model's next version; returns the new Status.

        ``kind`` is FULL or UPDATE (an update applies to the current version). ``seq`` defaults to
        the current version + 1; a given one must be larger (and exactly that for an update).
        ``rollout``: None keeps the status's staged-rollout wave as it is; a dict with ``percent``
        (0 .. 100) and/or ``devices`` (ids) starts a wave at this version (transports.report).
        ``restores`` = (seq, bitstream digest) of an older version: a full model whose model is that
        version's (its envelope names it as parent, so devices that hold it switch without
        downloading); it ends any wave. With a record, that version must be on the record's chain.
        Raises PublishError for a publication that cannot be made, aiomqtt.MqttError when the
        broker stays out of reach (a lost connection fails the attempt at once; ``retries`` more
        are made after a backoff).
        """
        if kind not in (FULL, UPDATE):
            raise ValueError("kind must be %r or %r" % (FULL, UPDATE))
        if restores is not None and (kind != FULL or rollout is not None):
            raise ValueError("a restoring publication is a full model, for every device (no rollout)")
        if rollout is not None:
            rollout = dict(rollout)
            unknown = set(rollout) - {"percent", "devices"}
            if unknown or not rollout:
                raise ValueError("rollout takes percent and/or devices, not %s" % ", ".join(sorted(unknown)))
            for device in rollout.get("devices") or ():
                report.check_device_id(device)
            try:
                report.rollout_field(1, rollout.get("percent"), rollout.get("devices"))
            except NNCError as exc:
                raise ValueError(str(exc))
        job = _Job(self.bodies(bitstream), kind, seq)
        job.rollout = rollout
        job.restores = restores
        self.compaction = None
        if self.record is None:
            return await self._publish(job)
        from .. import chain_record
        try:
            with self.record.locked():
                self.record.load()
                if kind == UPDATE:
                    job.info = _update_info(bitstream)
                status = await self._recorded(job)
                if kind == UPDATE and self.compact_at is not None:
                    status = await self._compact(status) or status
                return status
        except chain_record.RecordError as exc:
            raise PublishError(str(exc))

    async def _recorded(self, job):
        """Publish ``job`` and add it to the record (whose lock the caller holds); returns the Status."""
        from ..chain_record import Version
        status = await self._publish(job)
        self.record.rollout = status.rollout
        self.record.add(Version(status.seq, job.kind, status.digest, job.result, status.counts[-1], job.restores))
        return status

    # --- chain compaction ------------------------------------------------------------------------
    async def _compact(self, status):
        """After update ``status.seq``: the Status of its compacted full model, or None when the chain
        is not compacted (below the threshold, a wave, no copy of a version); see the module docstring."""
        rec = self.record
        full, updates = rec.versions[0], rec.versions[1:]
        if not updates:
            return None
        sizes = [rec.bitstream_bytes(v) for v in rec.versions]
        if None in sizes:
            log.info("model %s: the chain is not compacted: this host has no copy of version%s %s", self.model,
                     "s" if sizes.count(None) > 1 else "",
                     _ranges([v.seq for v, n in zip(rec.versions, sizes) if n is None]))
            return None
        c = Compaction(status, full.seq, sizes[0], sum(sizes[1:]))
        if c.share <= self.compact_at:
            return None
        from .rollout import RolloutError, describe_wave, full_model_of
        if status.rollout is not None:
            log.info("model %s: the chain is not compacted although %s: a staged rollout is in progress (%s), which "
                     "a full model for every device would end; compaction waits until the wave is at 100%% "
                     "(nnc-edge rollout --percent 100)",
                     self.model, c.reason(), describe_wave(status.rollout))
            return None
        try:
            bitstream, version, _ = full_model_of(rec, status.seq)
        except (RolloutError, NNCError) as exc:
            log.warning("model %s: the chain is not compacted although %s: %s", self.model, c.reason(), exc)
            return None
        job = _Job(self.bodies(bitstream), FULL, None)
        job.restores = (version.seq, version.digest)
        c.bytes = sum(map(len, job.bodies))  # as the record keeps it
        if c.bytes >= sum(sizes):
            # Exact coding sends tensors the updates moved off the quantization grid as float32 values.
            log.info("model %s: the chain is not compacted although %s: the full model of version %d would be %d "
                     "bytes, not less than the %d of the full model and the updates a device that joins now "
                     "downloads", self.model, c.reason(), status.seq, c.bytes, sum(sizes))
            return None
        try:
            new = await self._recorded(job)
        except PublishError as exc:  # update N is out and recorded: the next update tries again
            log.warning("model %s: the chain is not compacted although %s: %s", self.model, c.reason(), exc)
            return None
        c.seq = new.seq
        if self.chain_state is not None:
            c.state_restarted = self._restart_chain_state(c, job.result)
        self.compaction = c
        log.info("model %s: %s", self.model, c.describe())
        return new

    def _restart_chain_state(self, c, model):
        """Restart the host's chain state file at ``model`` (version c.restores's): True when done."""
        from nnc_edge.updates import ChainState
        path = self.chain_state
        try:
            state = ChainState.load(path)
            if state.model != model:
                log.warning("model %s: the chain state %s is at the model %s, not at the model of version %d (%s): "
                            "left as it is", self.model, path, digest_hex(state.model)[:12], c.restores,
                            digest_hex(model)[:12])
                return False
            state.restart().save(path)
        except (OSError, NNCError) as exc:
            log.warning("model %s: the chain state %s cannot be restarted: %s", self.model, path, exc)
            return False
        log.info("model %s: the chain state %s starts a new chain at the model of version %d", self.model, path,
                 c.restores)
        return True

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
            if self.record is not None and job.restores is not None:
                job.result = self._check_restores(job.restores)
            plan = job.plan = self._plan(status, job.bodies, job.kind, job.seq, job)
            if self.record is not None:
                if job.restores is None:
                    job.result = self._check_continues(plan, job)
                self.record.keep(plan.digest, b"".join(job.bodies))  # the bytes the digest is of
        elif (status.seq, status.digest) != (plan.parent_status.seq, plan.parent_status.digest):
            if plan.kind == FULL and status.seq < plan.seq:
                # E.g. a broker restarted without persistence: a full model needs no chain.
                plan = job.plan = self._plan(status, job.bodies, FULL, plan.seq, job)
            else:
                raise PublishError("the status changed while reconnecting (now version %d): the broker "
                                   "lost it, or another publisher is active" % status.seq)
        await self._send(client, plan)
        return plan.status

    def _plan(self, status, bodies, kind, seq, job=None):
        if job is None:
            job = _Job(bodies, kind, seq)
        if seq is None:
            seq = status.seq + 1
        if seq <= status.seq:
            raise PublishError("seq %d is not newer than the published version %d" % (seq, status.seq))
        if job.restores is not None:
            wave = None  # a restore is for every device
        elif job.rollout is not None:
            wave = report.rollout_field(_wave_start(status, seq), job.rollout.get("percent"),
                                        job.rollout.get("devices"))
        else:
            wave = status.rollout  # an existing wave carries on
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
            new = Status(self.model, seq, digest, status.full_seq, status.counts + [len(payloads)], rollout=wave)
        else:
            parent = job.restores or (0, NO_DIGEST)
            if parent[0] >= seq:
                raise PublishError("version %d cannot restore version %d, which is not older" % (seq, parent[0]))
            digest, payloads = self._messages(FULL, seq, bodies, *parent)
            new = Status(self.model, seq, digest, seq, [len(payloads)], rollout=wave)
        plan = _Plan(kind, seq, digest, payloads, status, new, job.restores[0] if job.restores else 0)
        # While it is published: a new wave already (devices that stream it in live must know it), a
        # restore's end of the wave not yet (the versions of the wave are still out there).
        plan.pending_rollout = status.rollout if job.restores is not None else wave
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
        parent = rec.versions[0].parent
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

    def _check_restores(self, restores):
        """The digest of the model the version ``restores`` names makes; PublishError unless it is on
        the record's chain with that bitstream digest."""
        rec = self.record
        v = rec.find(restores[0])
        if v is None or v.digest != restores[1]:
            raise PublishError("version %d (%s) is not in this host's record of model %s (it holds %s): it cannot "
                               "be restored" % (restores[0], digest_hex(restores[1])[:12], self.model,
                                                rec.describe_range()))
        return self._model_digest(v)

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
        base = rec.versions[0]
        if info.continues_state and base.restores is not None and info.root != self._model_digest(base):
            # Devices took the restoring full model without decoder state: those that downloaded it have
            # none, and those that switched locally dropped theirs (a chain cannot go on across it).
            raise PublishError("this update (record: update %d) continues the decoder state (TCA, HDSP) of a chain "
                               "that started before version %d, the full model %s version %d: devices that took it "
                               "do not have that state. Start a new chain from the model of version %d: nnc-edge "
                               "update with a new --residual state file (or the one nnc-edge publish --compact-at "
                               "--residual restarted)"
                               % (info.sequence, base.seq, "the chain was compacted into, of" if base.compacts
                                  else "that restores", base.restores[0], base.seq))
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
                         plan.parent_status.counts, (plan.seq, plan.digest, len(plan.payloads)),
                         plan.pending_rollout)
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


class Compaction:
    """What a compaction did (``Publisher.compaction``): version ``seq`` (``bytes`` long) is the full
    model of version ``restores``, the update published (``update``: its Status); the updates since
    full model ``full_seq`` (``full_bytes``) were ``update_bytes``; ``state_restarted``: whether the
    host's chain state file was restarted (None: none given)."""

    def __init__(self, update, full_seq, full_bytes, update_bytes):
        self.update = update
        self.restores = update.seq
        self.full_seq = full_seq
        self.full_bytes = full_bytes
        self.update_bytes = update_bytes
        self.seq = None
        self.bytes = None
        self.state_restarted = None

    @property
    def share(self):
        return self.update_bytes / self.full_bytes if self.full_bytes else float("inf")

    def reason(self):
        return "the updates since version %d are %d bytes, %.0f%% of its %d" % (
            self.full_seq, self.update_bytes, 100 * self.share, self.full_bytes)

    def describe(self):
        text = "compacted: version %d is the full model of version %d (%d bytes); %s" % (
            self.seq, self.restores, self.bytes, self.reason().replace(" are ", " were ", 1))
        if not self.state_restarted:
            text += ("; the next update starts a new chain from that model (an update that continues the old "
                     "chain's decoder state is refused)")
        return text


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
        self.rollout = None   # a wave to start at this version (percent, devices), or None
        self.restores = None  # (seq, digest) of the version a full model restores, or None


def _wave_start(status, seq):
    """The first version of a wave started by version ``seq``: ``seq``, or the first version of the
    status's wave when there is one (halted or not): its versions stay out of reach of the devices
    outside the new wave."""
    try:
        old = report.parse_rollout(status.rollout)
    except NNCError:
        old = None
    return min(seq, old["from"]) if old is not None else seq


def _published_already(seq, how=""):
    return PublishError("this update was published already, as version %d%s: devices have applied it, and would "
                        "refuse it again" % (seq, how))


def _update_info(bitstream):
    from nnc_edge.updates import read_update_info
    return read_update_info(bytes(bitstream))


class _Plan:
    def __init__(self, kind, seq, digest, payloads, parent_status, status, parent_seq=0):
        self.parent_seq = parent_seq
        self.kind = kind
        self.seq = seq
        self.digest = digest
        self.payloads = payloads
        self.parent_status = parent_status
        self.status = status
        self.total = sum(len(p) for p in payloads)
        self.stale = []
        self.pending_rollout = status.rollout

    def describe(self):
        if self.kind == UPDATE:
            return "update %d on %d" % (self.seq, self.parent_status.seq)
        return "full model %d" % self.seq + (" (the model of version %d)" % self.parent_seq if self.parent_seq else "")


def publish_packet_bytes(topic, payload, qos=1):
    """Size of the MQTT 3.1.1 PUBLISH packet (3.3) carrying payload on topic."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + len(payload)
    length_bytes = 1
    while remaining >= 128 ** length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


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
