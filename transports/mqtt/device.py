"""The device side: ``Receiver`` acts on the messages of the status and data topics (independent of
the connection, which ``transports.mqtt.connection.run_receiver`` keeps); the model in a directory
is ``transports.mqtt.model_store``'s ``ModelStore``, the health check ``transports.mqtt.health``'s.

Receiver (``Receiver`` + ``run_receiver``): subscribes to the status and to exactly one data
topic, ``P/M/seq/T/+`` for the version T it needs next: the one after its own, or the last full
model when its version is not on the announced chain (never had a model, or was offline across a
new full model). Retained messages arrive at once on subscribing, live ones as they are published
(so a full model streams into the decoder while it is being published). Messages are put back in order and applied once. After ``gap_timeout``
seconds without the missing message the data topic is subscribed again (the broker re-sends the
retained copies); after another ``gap_timeout`` the publication is abandoned. Only a complete
publication whose SHA-256 digest matches changes the model, atomically; anything else leaves the
previous model as it was and is logged (logger ``nnc_edge.mqtt``). A refusal never moves the
device to an older version (see ``Receiver``).

With a device id, the receiver also reports (``transports.report``): ``run_receiver`` publishes
the report retained to ``P/M/devices/ID`` whenever it changes, connects with the client id made from
the id and leaves a last will that marks the device offline.

Fleet operations (as ``nnc_device.agent``): a staged rollout in the status caps what the device
fetches (``report.highest_version``): outside the wave, or once it is halted, it takes nothing from
version S on, drops a download of one, and reports ``waiting``. The store keeps the previous model
beside the current one (A/B, ``ModelStore``); a ``HealthCheck`` runs after each apply, and when it
fails the previous model is put back and the version is never fetched again (``rolled-back``). A
full model that restores a version the device holds, as its current or previous model, is switched
to locally (``RestoreWriter``) after its first message passed ``verify``; the rest of it is ignored.

Many devices in one process (a gateway): one ``Receiver`` + ``run_receiver`` task per device, all
sharing one ``BrokerSettings`` (each connects with its own client id) and one executor
(``ModelStore(executor=...)``); every log line of a receiver starts with "device ID: "
(``DeviceLog``).
"""

import asyncio
import functools
import hashlib
import logging
import os
import time
from collections import OrderedDict, deque

from decoder_core import NNCError

from .. import envelope, report
from ..envelope import FULL, UPDATE, Assembly, Status, digest_hex
from .settings import DEFAULT_GAP_TIMEOUT, DEFAULT_PREFIX, _ranges, log, topics

# How many refused publications a device remembers, and how many events and applied publications
# it keeps for inspection: bounded, since each refusal may come from an attacker.
MAX_REMEMBERED = 256
MAX_EVENTS = 100
MAX_REASON_CHARS = 400




# --- the receiver: what the device does with each message ---------------------------------------
class Receiver:
    """The device's side of the protocol, independent of the MQTT connection (``run_receiver``
    drives it): feed it the messages of the status topic and of ``subscription()``.

    ``applied`` lists (seq, kind, bytes, seconds from first message to model written) of the last
    publications applied; ``events`` the last reasons for what was refused or abandoned.
    ``verify(envelope)`` (e.g. a signature check of the extension field) runs on the first message
    of each publication, before anything of it is used; an NNCError from it refuses the publication.
    ``health_check`` (a ``HealthCheck``, or any object with ``async run(store, envelope, kind,
    device_id)`` returning None or why it failed) runs after each apply; ``device_id`` makes it report
    and names it in every log line (``log``, a ``DeviceLog``).

    Anyone who can publish to the broker can send anything: whatever one message makes go wrong is
    logged and the message dropped (``handle``), and what is remembered about refused messages is
    bounded (MAX_REMEMBERED publications, MAX_EVENTS events). A refusal never moves the device to an
    older version: it keeps its model until a publication it can apply arrives (a new full model,
    or another publication of the next version), and says so every ``gap_timeout`` while the status
    announces a version it does not have. Content is refused for good only once the bytes received
    are known to be those the envelope's digest names (a bitstream the decoder refuses early is still
    received and hashed to its end); a copy that is not only pauses its digest for ``gap_timeout``,
    for it may be a damaged or forged copy of the genuine publication.
    """

    def __init__(self, store, prefix=DEFAULT_PREFIX, gap_timeout=DEFAULT_GAP_TIMEOUT,
                 max_buffered=envelope.DEFAULT_MAX_BUFFERED, max_update_bytes=256 << 20, clock=time.monotonic,
                 on_applied=None, on_current=None, verify=None, device_id=None, health_check=None):
        self.store = store
        self.device_id = device_id
        # Every log line of a device names it: many devices may share a process (a gateway).
        self.log = DeviceLog(device_id)
        store.log = self.log
        if health_check is not None and not store.keep_previous:
            raise ValueError("a health check needs the previous model kept (ModelStore(keep_previous=True))")
        self.health_check = health_check
        self.rollout = None       # the status's staged-rollout wave (transports.report), checked
        self.hold = None          # why target is None while the status announces more: "wave" or "rolled-back"
        self.rolled_back_seq = None  # the version the last failed health check was of (the report's target)
        self.checking = False     # a health check is running (the report says applying)
        self.report_topic = None if device_id is None else report.report_topic(prefix, store.model, device_id)
        self.failure = None       # (state, error) of the last publication that failed or was refused
        self.reported = None      # what the last report published said, but its time
        self.send_report = None   # async (payload) -> None, set by run_receiver while connected
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
        self.content_error = None  # the NNCError the bitstream being assembled was refused with
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

    @property
    def settled(self):
        """True when the device has all it may take: the announced version, or the newest its
        rollout wave allows, or it stays where a failed health check left it (``hold``)."""
        return self.up_to_date or (self.assembly is None and self.status is not None and self.target is None
                                   and self.hold is not None and self._lagging())

    def _check_current(self):
        if self.on_current is not None and self.settled:
            self.on_current()

    # --- what to subscribe to ------------------------------------------------------------------
    def subscription(self):
        """The data topic filter to be subscribed to now (None: only the status)."""
        return None if self.target is None else self.topics.publication(self.target)

    def _next_target(self):
        """The version to fetch next, capped by the staged-rollout wave (``report.highest_version``)
        and never one a health check rolled back; None (with ``hold`` saying why) for none."""
        self.hold = None
        target = self._chain_target()
        st = self.status
        if target is not None and st is not None and st.seq:
            # Also caps what streams in live after the newest version: a publication under way
            # (pending) of a version outside the wave is not fetched either.
            if target > report.highest_version(self.device_id, self.rollout, 0xFFFFFFFF):
                self.hold = "wave"
                return None
        if target is not None and self._rolled_back(target):
            self.hold = "rolled-back"
            self.rolled_back_seq = target
            return None
        return target

    def _rolled_back_reason(self):
        seq = self.rolled_back_seq
        reasons = [r for (s, _), r in self.store.rolled_back.items() if s == seq]
        return "version %s was rolled back: %s" % (seq, reasons[-1] if reasons else "its health check failed")

    def _rolled_back(self, seq):
        """True when a health check rolled back version ``seq`` (the one the status names for it,
        or any publication of it when the status names none)."""
        announced = self._announced(seq)
        return any(s == seq and (announced is None or announced == d) for s, d in self.store.rolled_back)

    def _chain_target(self):
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
        if k < st.full_seq:
            # The device missed a new full model (a new chain, a rollback, a compaction): routine.
            self.log.info("model %s: version %d is a full model published after the device's %s: fetching it",
                          self.model, st.full_seq, self.store.describe())
        else:
            self._event("warning", "model %s: the device's %s is not on the published chain (current version %d, "
                        "full model %d): fetching the full model" % (self.model, self.store.describe(), st.seq,
                                                                      st.full_seq))
        self.diverged = True
        return st.full_seq

    def _retarget(self, reason=None):
        target = self._next_target()
        if target != self.target:
            if self.assembly is not None and not self.checking:
                if target is None and self.hold == "wave":
                    wave = self.rollout
                    reason = ("the staged rollout of versions from %d on is halted" % wave["from"]
                              if wave.get("halted") else "the device is not in the staged rollout of versions "
                              "from %d on" % wave["from"])
                self._abandon(reason or "now fetching version %s" % target, refuse=False)
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
        self.log.error("model %s: %s raised %s: %s; ignored", self.model, what, type(exc).__name__, _reason(exc),
                  exc_info=exc)
        self.events.append("%s raised %s" % (what, type(exc).__name__))
        try:
            self._abandon("%s raised %s" % (what, type(exc).__name__), refuse=None)
        except Exception:  # the writer's cleanup failed too; the assembly is dropped all the same
            self.log.exception("model %s: dropping the publication being assembled failed", self.model)

    def on_status(self, payload):
        if not payload:
            self.status, self.rollout = Status(self.model), None
        else:
            try:
                status = envelope.parse_status(payload, self.model)
                rollout = report.parse_rollout(status.rollout)
            except NNCError as exc:
                self._event("warning", "ignored status of model %s: %s" % (self.model, _reason(exc)))
                return
            self.status, self.rollout = status, rollout
        a = self.assembly
        if a is not None:
            announced = self._announced(a.first.seq)
            if announced is not None and announced != a.first.digest:
                self._abandon("the status announces another publication of version %d" % a.first.seq, refuse=False)
        self._retarget()
        if not self._lagging():
            self.failure = None  # the failed publication is no longer the one the device is missing
        elif self.hold == "rolled-back" and self.failure is None:
            self.failure = (report.ROLLED_BACK, self._rolled_back_reason())
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
        if identity in self.refused or identity in self.unverified or (env.seq, env.digest) in self.store.rolled_back:
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
            self.content_error = None
            # A restore of a version the device holds: switched to locally, the rest of the
            # publication's messages ignored.
            source = self.store.holding(env.parent_seq, env.parent_digest) if env.kind == FULL and env.parent_seq \
                else None
            try:
                self.writer = self.store.begin(env) if source is None else self.store.begin(env, source)
            except (OSError, ValueError) as exc:
                self._abandon("cannot start writing %s: %s" % (self.store.path, _reason(exc)), refuse=None)
                return
            if source is not None:
                await self._restore(a, source)
                return
        confirmed = False  # the bytes received are those the digest names
        try:
            bodies = a.add(env)
            if bodies:
                a.last_progress = self.clock()
            for body in bodies:
                if self.content_error is not None:
                    break
                try:
                    await self._blocking(self.writer.feed, body)
                except NNCError as exc:
                    self._content_failed(exc)
            if a.complete:
                a.check()
                confirmed = True
                if self.content_error is not None:
                    raise self.content_error
                await self.flush_report()
                if self.health_check is not None:
                    await self._blocking(self.store.begin_check, env.seq, env.digest)
                await self._blocking(self.store.commit, self.writer, False)
                self.store.version = self.writer.version
        except NNCError as exc:
            # Bytes not yet known to be those the digest names may be a damaged or forged copy under a
            # genuine envelope (signed or not): refusing their digest would make the device ignore the
            # real publication. Not refused for good, then, but retried after a pause: the retained
            # copies that come again on resubscribing could be the same bad ones, which must not make
            # a busy loop.
            self._abandon(_reason(exc), refuse=True if confirmed else None)
            return
        except (OSError, ValueError) as exc:  # a full disk, an unreadable model file, ...
            self._abandon("%s: %s (retrying in %g s)" % (type(exc).__name__, _reason(exc), self.gap_timeout),
                          refuse=None)
            return
        if a.complete and await self._healthy(a):
            self._done(a)

    def _content_failed(self, exc):
        """The bitstream was refused (the writer removes what it wrote): the rest of the publication
        is still received and hashed, so that a refusal for good is of the published bytes only."""
        self.content_error = exc
        writer, self.writer = self.writer, None
        writer.abort()

    async def _blocking(self, fn, *args):
        """fn(*args) on the store's executor (None: the event loop's default one)."""
        return await asyncio.get_running_loop().run_in_executor(self.store.executor, functools.partial(fn, *args))

    async def _restore(self, a, source):
        """Take the restore publication ``a`` from the file ``source`` the device holds."""
        env = a.first
        self.checking = True  # reported as applying: nothing is downloaded
        try:
            self.log.info("model %s: %s restores %s, which the device holds (%s): switching to it without "
                          "downloading", self.model, env.describe(), self.store.describe((env.parent_seq,
                                                                                           env.parent_digest)),
                          os.path.basename(source))
            await self.flush_report()
            if self.health_check is not None:
                await self._blocking(self.store.begin_check, env.seq, env.digest)
            await self._blocking(self.store.commit, self.writer, False)
            self.store.version = self.writer.version
        except (OSError, ValueError) as exc:
            self.checking = False
            self._abandon("%s: %s (retrying in %g s)" % (type(exc).__name__, _reason(exc), self.gap_timeout),
                          refuse=None)
            return
        finally:
            self.checking = False
        if await self._healthy(a, "restore"):
            self._done(a, "restore", 0)

    async def _healthy(self, a, kind=None):
        """Run the health check (if any) on the model just committed; when it fails, put the previous
        model back, remember the version for good and report rolled-back. True when it passed."""
        if self.health_check is None:
            return True
        return await self._check(a.first, kind or a.first.kind)

    async def recover(self):
        """At start-up (``run_receiver`` calls it before connecting): a health check that a restart
        interrupted (a power loss, or a model that brought the device down) is run again; if the
        device restarted during it twice, the model counts as failed without a third try."""
        pending = await self._blocking(self.store.pending_check)
        if pending is None:
            return
        if self.health_check is None or self.store.version != pending[:2]:
            await self._blocking(self.store.end_check)  # its model was never committed, or no check now
            return
        version = _Version(*pending[:2])
        self.log.warning("model %s: the health check of %s did not end (the device restarted during it)%s",
                         self.model, version.describe(), "" if pending[2] < 2 else " twice")
        if pending[2] >= 2:
            await self._rolled_back_now(version, "the device restarted during the health check %d times"
                                        % pending[2])
            return
        await self._blocking(self.store.begin_check, *pending[:2])
        kind = self.store.kind() or FULL
        await self._check(version, kind)

    async def _check(self, env, kind):
        self.checking = True
        try:
            await self.flush_report()
            reason = await self.health_check.run(self.store, env, kind, self.device_id)
        finally:
            self.checking = False
        if reason is None:
            self.log.info("model %s: the health check of %s passed", self.model, env.describe())
            await self._blocking(self.store.end_check)
            return True
        await self._rolled_back_now(env, reason)
        return False

    async def _rolled_back_now(self, env, reason):
        self.assembly = self.writer = None
        try:
            await self._blocking(self.store.remember_rolled_back, env.seq, env.digest, reason)
            await self._blocking(self.store.restore_previous)
            await self._blocking(self.store.end_check)
        except OSError as exc:  # the record is written first: the next start puts the previous model back
            self.failure = (report.FAILED, "%s; putting the previous model back failed: %s" % (reason, _reason(exc)))
            self._event("error", "model %s: %s" % (self.model, self.failure[1]))
            return
        self.failure = (report.ROLLED_BACK, reason)
        self.rolled_back_seq = env.seq
        self.blocked = None
        self._event("warning", "model %s: %s of %s: rolled back, %s; it is not fetched again"
                    % (self.model, reason, env.describe(), self._standing("the model")))
        self.target = self._next_target()
        self._check_current()

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
                self.failure = (report.REJECTED, "refused %s: %s" % (env.describe(), _reason(exc)))
                self._event("warning", "model %s: %s; %s" % (self.model, self.failure[1], self._standing("the model")))
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
        self.failure = (report.REJECTED, "%s %s: %s" % (verb, env.describe(), reason))
        self._event("warning", "model %s: %s; %s" % (self.model, self.failure[1], self._standing("the model")))

    def _done(self, a, kind=None, size=None):
        env = a.first
        seconds = self.clock() - self.started
        tensors = self.writer.tensors
        self.assembly = self.writer = None
        self.blocked = self.failure = None
        if env.kind == FULL:
            self.diverged = False
        self.applied.append((env.seq, kind or env.kind, env.total if size is None else size, seconds))
        if kind == "restore":
            self.log.info("model %s: applied %s locally (no download), %.2f s -> %s (%d tensors)", self.model,
                          env.describe(), seconds, self.store.path, tensors)
        else:
            self.log.info("model %s: applied %s: %d bytes in %d message%s%s, %.2f s -> %s (%d tensors)", self.model,
                          env.describe(), env.total, env.count, "" if env.count == 1 else "s",
                          " (%d duplicates dropped)" % a.duplicates if a.duplicates else "",
                          seconds, self.store.path, tensors)
        # The next version, whatever the status says now: it may still announce the previous one
        # (the status follows the data); the next status message is checked against the chain. When
        # the status names this version or a later one, the chain, the wave and the rollbacks decide.
        self.target = env.seq + 1
        if self.status is not None and self.status.seq >= env.seq:
            self.target = self._next_target()
        if self.on_applied is not None:
            self.on_applied(env)
        self._check_current()

    # --- the report (transports.report) ----------------------------------------------------------
    def report_state(self):
        a = self.assembly
        if a is not None:
            return report.APPLYING if a.complete or self.checking else report.DOWNLOADING
        if self.failure is not None:
            return self.failure[0]
        if not self._lagging():
            return report.CURRENT
        if self.target is None and self.hold == "rolled-back":
            return report.ROLLED_BACK
        return report.WAITING if self.target is None and self.hold == "wave" else report.DOWNLOADING

    def report(self):
        """The report's payload when it says something the last one published did not, else None
        (also without a device id)."""
        if self.device_id is None:
            return None
        seq, digest = self.store.version or (0, None)
        state = self.report_state()
        target = None if state in (report.CURRENT, report.WAITING) else self.target
        if state == report.ROLLED_BACK:
            target = self.rolled_back_seq
        error = self.failure[1] if self.failure is not None else None
        applied = self.applied[-1] if self.applied else None
        key = (state, seq, digest, target, error, applied)
        if key == self.reported:
            return None
        self.reported = key
        return report.report_payload(self.device_id, state, seq, digest, target, error, int(time.time()), applied)

    async def flush_report(self):
        """Publish the report if it changed (through ``send_report``, while connected)."""
        if self.send_report is None:
            return
        payload = self.report()
        if payload is not None:
            await self.send_report(payload)

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
            self.log.info("model %s: %s: %s; asking the broker for them again", self.model, a.first.describe(), missing)
        else:
            self._abandon(missing, refuse=False)

    def _report_lag(self, now):
        """Every ``gap_timeout`` without progress while the status announces a version the device
        does not have: say which, and why it is not coming."""
        if self.assembly is not None or not self._lagging() or self.hold is not None:
            self.behind_since = None  # a device the wave or a rollback holds back says so in its report
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
        self.assembly = self.writer = self.content_error = None
        if writer is not None:
            writer.abort()
        if refuse:
            self._refuse(a.first, reason, "abandoned")
            return
        if refuse is None:
            self.deferred[a.first.digest] = self.clock() + self.gap_timeout
            self.failure = (report.FAILED, "abandoned %s: %s" % (a.first.describe(), reason))
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
        getattr(self.log, level)(message)


class _Version:
    """A version the store holds, for the health check of a restart (as an Envelope would say it)."""

    def __init__(self, seq, digest):
        self.seq = seq
        self.digest = digest

    def describe(self):
        return "version %d (%s)" % (self.seq, digest_hex(self.digest)[:12])


class DeviceLog(logging.LoggerAdapter):
    """The ``nnc_edge.mqtt`` logger for one device: its lines start with "device ID: " (none without
    an id), and records carry ``device_id`` for handlers that format it themselves."""

    def __init__(self, device_id, logger=log):
        logging.LoggerAdapter.__init__(self, logger, {"device_id": device_id})
        self.prefix = "" if device_id is None else "device %s: " % device_id

    def process(self, msg, kwargs):
        kwargs.setdefault("extra", {}).update(self.extra)
        return self.prefix + msg, kwargs


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
