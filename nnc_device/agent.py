"""The device agent: keeps a model current over MQTT, on a microcontroller (MicroPython) or CPython.

    from umqtt.simple import MQTTClient
    from nnc_device.agent import Agent, client_id
    client = MQTTClient(client_id("board-7"), "broker.local", keepalive=60)
    Agent(client, "kws", "/flash/model", "board-7", trusted_keys=[open("pub.pem").read()]).run()

It speaks the protocol of ``nnc-edge receive`` (``transports.mqtt``; the formats are
``transports.envelope``): it subscribes to the retained status ``P/M/status`` and to the one data
topic ``P/M/seq/T/+`` of the version T it needs next (the one after its own, or the last full model
when its version is not on the announced chain); puts each publication's messages back in order,
dropping duplicates; writes it through the device store (``nnc_device.store``: full models, updates
and their TCA/HDSP chain state), which commits a new generation atomically only when the whole
publication decoded and its digest (and an update's record) checked out. The store's index keeps
the MQTT version it holds (``meta``: model, seq, digest, kind), so a restart knows it.

With ``trusted_keys`` every publication must carry in its envelope extension an Ed25519 signature
(``nnc_edge.signing``'s format: ``b"NS" 1 key_id[8] signature[64]`` over the statement of model,
version, parent digest and bitstream digest) by one of those keys, and a version above the device's
(replay); it is checked on the first message, before any byte of the publication is used, exactly
as ``nnc-edge receive --trusted-key`` does. Refusals are remembered (a bounded list), never move the
device to another version, and are reported with their reason.

The client is anything with micropython-lib ``umqtt.simple``'s ``MQTTClient`` API: ``set_callback``,
``set_last_will``, ``connect``, ``subscribe``, ``publish``, ``check_msg`` (``ping`` when its
``keepalive`` is set). The agent calls ``check_msg`` once per ``step()``; umqtt also delivers
messages from inside ``subscribe``, which the agent only calls from ``step()``. Reports go out at
QoS 0: umqtt.simple waits for a QoS 1 acknowledgement by reading (and delivering) messages, which
would re-enter the agent.

Work is cut into ``step()`` calls that each handle at most one message or one piece of a signature
check: a loop (``run()``) or a caller that must get back to other work between them (the
WebAssembly port, whose GC runs only between calls from JavaScript) drives it. Memory: one message
(plus ``max_buffered`` bytes of messages that came early; 0 by default: those are dropped and the
retained copies fetched again in order), the decoder's fixed state (nnc_device.store), and the
signature check's few KB.

The device report (``transports.report``) goes to ``P/M/devices/ID`` retained on every change; the
last will marks the device offline. A staged rollout in the status limits the device to the
versions of its wave (a publication under way of a later version does not stream in either);
outside it the device stays at its version and reports ``waiting``.

A full model that restores the version the device has (``nnc-edge rollback --to``; the envelope's
parent) is taken without a download: the store's index is committed again as a new generation
naming the same files, with the new version in its meta and without the update chain's decoder state
(``nnc_device.store.relabel``: the host starts a new chain at a restored version, as for a device
that downloads it).
The agent keeps no previous model (no A/B, no health check): a restore of any other version is
downloaded as a full model.
"""

import binascii
import hashlib
import struct
import time

from decoder_core.errors import NNCError
from transports import envelope, report
from transports.envelope import FULL, UPDATE, Assembly, digest_hex

from .store import StoreSession, read_index, relabel

try:
    from time import ticks_add, ticks_diff, ticks_ms
except ImportError:  # CPython
    def ticks_ms():
        return int(time.monotonic() * 1000)

    def ticks_add(a, b):
        return a + b

    def ticks_diff(a, b):
        return a - b

client_id = report.client_id
DEFAULT_PREFIX = "nnc"
DEFAULT_GAP_TIMEOUT = 30.0
MAX_REMEMBERED = 16  # refused publications; each costs a tuple of ~100 bytes
# nnc_edge.signing's statement and envelope extension (its docstring is the specification).
_DOMAIN = b"nnc-edge signed bitstream v1\x00"
_EXT_MAGIC = b"NS"
_EXT_VERSION = 1
_KEY_ID_BYTES = 8
_EXT_BYTES = 3 + _KEY_ID_BYTES + 64
_SPKI_PREFIX = b"\x30\x2a\x30\x05\x06\x03\x2b\x65\x70\x03\x21\x00"  # RFC 8410 Ed25519 SubjectPublicKeyInfo


class Refused(NNCError):
    """A publication refused for what it is (signature, replay, wrong parent, content)."""


def public_key(key):
    """The raw 32-byte Ed25519 key of ``key``: 32 bytes, or a PEM public key (text or bytes, as
    ``nnc-edge keygen`` writes KEY.pub)."""
    if isinstance(key, (bytes, bytearray)) and len(key) == 32:
        return bytes(key)
    text = key.decode("ascii") if isinstance(key, (bytes, bytearray)) else key
    begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    if begin not in text or end not in text:
        raise ValueError("a trusted key is 32 raw bytes or a PEM public key")
    # bytes: MicroPython's a2b_base64 takes no str.
    der = binascii.a2b_base64(text.split(begin)[1].split(end)[0].replace("\n", "").replace("\r", "").encode())
    if len(der) != len(_SPKI_PREFIX) + 32 or der[:len(_SPKI_PREFIX)] != _SPKI_PREFIX:
        raise ValueError("not an Ed25519 public key")
    return bytes(der[len(_SPKI_PREFIX):])


def statement(env):
    """What the publisher signed for this envelope (nnc_edge.signing.statement)."""
    name = env.model.encode("utf-8")
    return _DOMAIN + bytes((len(name),)) + name + struct.pack(">Q", env.seq) + env.parent_digest + env.digest


def _identity(env):
    # As transports.mqtt's receiver: what the envelope says, its extension by digest, so that a
    # forged copy refused does not make the device ignore the genuine signed publication.
    return (env.kind, env.seq, env.parent_seq, env.parent_digest, env.count, env.total, env.digest,
            hashlib.sha256(bytes(env.ext)).digest())


def _reason(exc):
    return envelope.excerpt(str(exc), report.MAX_ERROR_CHARS, quote=False)


class Agent:
    """One model kept current in ``directory`` for device ``device_id`` (see the module docstring).
    ``trusted_keys``: public keys (raw or PEM) whose signatures are required; None accepts unsigned
    publications. ``log``: a function taking a line (None: silent)."""

    def __init__(self, client, model, directory, device_id, trusted_keys=None, prefix=DEFAULT_PREFIX,
                 gap_timeout=DEFAULT_GAP_TIMEOUT, max_buffered=0, slice_elements=None, feed_bytes=None, log=print):
        envelope.check_model_name(model)
        self.client = client
        self.model = model
        self.directory = directory
        self.device_id = device_id
        self.prefix = prefix
        self.report_topic = report.report_topic(prefix, model, device_id)
        self.status_topic = report.status_topic(prefix, model)
        self.data_head = "%s/%s/seq/" % (prefix, model)
        self.trusted = None
        if trusted_keys is not None:
            self.trusted = {}
            for key in trusted_keys:
                raw = public_key(key)
                self.trusted[hashlib.sha256(raw).digest()[:_KEY_ID_BYTES]] = raw
        self.gap_ms = int(gap_timeout * 1000)
        self.max_buffered = max_buffered
        self.store_options = {} if slice_elements is None else {"slice_elements": slice_elements}
        self.feed_bytes = feed_bytes
        self.bodies = []          # of the publication being assembled, in order, not yet decoded
        self.fed = 0              # bytes of bodies[0] decoded
        self.log = log
        self.version = None       # (seq, digest) of the stored model
        self.status = None
        self.rollout = None
        self.diverged = False     # the device's version is not on the announced chain
        self.target = None        # the version to fetch next
        self.subscribed = None    # the data filter last subscribed to
        self.refetch = False      # subscribe to the target again: the broker re-sends its retained messages
        self.refused = []         # identities refused for good, or whose signature failed (bounded)
        self.deferred = {}        # digest -> ticks: failed locally, retried after gap_timeout
        self.assembly = None
        self.session = None       # the store session; None with an assembly whose content failed
        self.content_error = None  # why, while the rest of the publication is hashed to confirm it is genuine
        self.verifying = None     # [pieces, envelope, payload] of a signature being checked
        self.accepted = None      # the envelope whose signature checked out, to be started next step
        self.committed = None     # with feed_bytes: the store session whose old generation goes next step
        self.started = 0
        self.state = report.CURRENT
        self.error = None
        self.applied = None
        self.last_report = None
        self.last_ping = ticks_ms()
        self._got = False
        self._load_version()
        self.target = self._next_target()

    # --- the connection ---------------------------------------------------------------------------
    def start(self):
        """Connect (the last will first), subscribe to the status, publish the report."""
        c = self.client
        c.set_callback(self._on_message)
        c.set_last_will(self.report_topic, report.will_payload(self.device_id), True, 1)
        c.connect()
        self.subscribed = None
        c.subscribe(self.status_topic, 1)
        self.last_report = None
        self._report()

    def run(self, idle_ms=20, retry_ms=2000):
        """start() and step() forever; on a lost connection (OSError) connect again after a pause."""
        while True:
            try:
                self.start()
                while True:
                    if not self.step():
                        _sleep_ms(idle_ms)
            except OSError as exc:
                self._say("connection lost (%s); reconnecting" % exc)
                _sleep_ms(retry_ms)

    def step(self):
        """One piece of work: a piece of a signature check, a subscription, or one message. Returns
        False when there was nothing to do."""
        if self.committed is not None:
            session, self.committed = self.committed, None
            session.remove_old()
            return True
        if self.verifying is not None:
            self._verify_piece()
            return True
        if self.accepted is not None:  # verified in the last step: now start writing it
            env, self.accepted = self.accepted, None
            self._begin(env)
            self._add(env)
            return True
        a = self.assembly
        if self.bodies or (a is not None and a.complete):
            self._feed()
            return True
        now = ticks_ms()
        self._tick(now)
        want = None if self.target is None else report.data_filter(self.prefix, self.model, self.target)
        if want is None:
            # Nothing to fetch (e.g. outside the wave): the next target, even the same filter again,
            # is subscribed anew so that the broker re-sends its retained messages.
            self.subscribed = None
        elif want != self.subscribed or self.refetch:
            self.subscribed = want
            self.refetch = False
            self.client.subscribe(want, 1)
            return True
        keepalive = getattr(self.client, "keepalive", 0)
        if keepalive and ticks_diff(now, self.last_ping) > keepalive * 500:
            self.last_ping = now
            self.client.ping()
        self._got = False
        self.client.check_msg()
        return self._got

    def _on_message(self, topic, payload):
        self._got = True
        try:
            topic = topic.decode("utf-8") if isinstance(topic, (bytes, bytearray)) else topic
            if topic == self.status_topic:
                self.on_status(payload)
            elif topic.startswith(self.data_head):
                where = topic[len(self.data_head):].split("/")
                if len(where) == 2 and where[0].isdigit() and where[1].isdigit():
                    self.on_data(int(where[0]), int(where[1]), payload)
        except Exception as exc:  # noqa: BLE001 -- no message may stop the device
            self._say("a message raised %s: %s" % (type(exc).__name__, _reason(exc)))
            self._abandon("%s: %s" % (type(exc).__name__, _reason(exc)), None)

    # --- the status and what to fetch ----------------------------------------------------------
    def on_status(self, payload):
        try:
            if payload:
                status = envelope.parse_status(payload, self.model)
                rollout = report.parse_rollout(status.rollout)
            else:
                status, rollout = envelope.Status(self.model), None
        except NNCError as exc:
            self._say("ignored status: %s" % _reason(exc))
            return
        self.status, self.rollout = status, rollout
        a = self.assembly
        if a is not None and status.supersedes(a.first):
            self._abandon("the status announces another publication of version %d" % a.first.seq, False)
        self._retarget()
        self._settle(True)

    def _next_target(self):
        cur, st = self.version, self.status
        if st is None:
            return cur[0] + 1 if cur else None
        if not st.seq:
            return cur[0] + 1 if cur else 1
        # The newest version the wave allows, whatever is announced: a publication under way (pending)
        # of a version outside the wave does not stream in either.
        top = report.highest_version(self.device_id, self.rollout, 0xFFFFFFFF)
        if cur is not None:
            k, d = cur
            if st.full_seq <= k <= st.seq and (k < st.seq or d == st.digest):
                self.diverged = False  # a status put back after a forged one
            elif st.pending is not None and cur == st.pending[:2]:
                return k + 1  # applied while it was published; the status follows
            elif not self.diverged:
                self._say("version %d is not on the published chain (%d .. %d): fetching the full model"
                          % (k, st.full_seq, st.seq))
                self.diverged = True
            if not self.diverged:
                # With the newest version, the next one streams in as it is published.
                return k + 1 if k < top else None
        return st.full_seq if st.full_seq <= top else None

    def _retarget(self):
        target = self._next_target()
        if target != self.target:
            if self._busy():
                self._abandon("now fetching version %s" % target, False)
            self.target = target

    def _busy(self):
        return self.assembly is not None or self.verifying is not None or self.accepted is not None

    def _settle(self, status=False):
        """The state when nothing is under way: current with the announced version, waiting when
        the wave keeps the device from it, else fetching (downloading). A failure stays reported
        until something applies or (``status``) a status announces the version the device has."""
        if self._busy():
            return
        st = self.status
        has = st is None or not st.seq or self.version == (st.seq, st.digest)
        if self.state in (report.FAILED, report.REJECTED) and not (status and has):
            pass
        elif has:
            self.state = report.CURRENT
        elif self.target is None:
            self.state = report.WAITING
        else:
            self.state = report.DOWNLOADING
        self._report()

    # --- publications ----------------------------------------------------------------------------
    def on_data(self, seq, index, payload):
        if not payload:
            return  # a retained message being deleted
        try:
            env = envelope.parse(memoryview(payload))
        except NNCError as exc:
            self._say("ignored message %d/%d: %s" % (seq, index, _reason(exc)))
            return
        if env.model != self.model or env.seq != seq or env.index != index or seq != self.target:
            return
        if self.verifying is not None or self.accepted is not None:
            self.refetch = True  # delivered inside subscribe(): the retained copy comes again
            return
        until = self.deferred.get(env.digest)
        if until is not None and ticks_diff(until, ticks_ms()) > 0:
            return
        if self.status is not None and self.status.supersedes(env):
            return  # left over from an earlier, interrupted publication of this version
        a = self.assembly
        if a is not None and not env.same_publication(a.first):
            self._abandon("superseded by another publication of version %d" % seq, False)
            a = None
        if a is None:
            if _identity(env) in self.refused:
                return
            if self.trusted is not None:
                self._begin_verification(env, payload)
                return
            if not self._acceptable(env) or self._restore(env):
                return
            self._begin(env)
        self._add(env)

    def _begin_verification(self, env, payload):
        from transports.ed25519 import verification
        ext = env.ext
        why = None
        if not ext:
            why = "the publication is not signed"
        elif len(ext) != _EXT_BYTES or ext[:2] != _EXT_MAGIC or ext[2] != _EXT_VERSION:
            why = "the envelope extension (%d bytes) is not an nnc-edge signature" % len(ext)
        else:
            key = self.trusted.get(ext[3:3 + _KEY_ID_BYTES])
            if key is None:
                why = "signed by key %s, which is not a trusted key" % digest_hex(ext[3:3 + _KEY_ID_BYTES])
        if why is not None:
            self._refuse(env, why)
            return
        self.verifying = [verification(key, statement(env), ext[3 + _KEY_ID_BYTES:]), env, payload]
        self._set_state(report.DOWNLOADING)

    def _verify_piece(self):
        pieces, env, payload = self.verifying
        answer = next(pieces)
        if answer is None:
            return
        self.verifying = None
        if not answer:
            self._refuse(env, "the signature of model %s, sequence %d does not match: the bitstream or its model, "
                              "sequence or parent differ from what the key signed" % (env.model, env.seq))
        elif self.version is not None and env.seq <= self.version[0]:
            self._refuse(env, "model %s, sequence %d is not newer than sequence %d, which this device has already "
                              "applied: refused as a replay" % (env.model, env.seq, self.version[0]))
        elif self._acceptable(env) and not self._restore(env):
            if self.feed_bytes is None:
                self._begin(env)
                self._add(env)
            else:
                self.accepted = env  # its message (env.body's buffer) stays until then
                return
        if self.assembly is None:
            self._settle()

    def _acceptable(self, env):
        if env.total == 0:
            self._refuse(env, "an empty bitstream is not a model")
            return False
        if env.kind == UPDATE and self.version != (env.parent_seq, env.parent_digest):
            self._refuse(env, "it applies to version %d (%s), the device has %s"
                         % (env.parent_seq, digest_hex(env.parent_digest)[:12], self._describe()))
            return False
        return True

    def _restore(self, env):
        """A full model that restores the version the device has (``nnc-edge rollback --to``): the
        store's index is committed again as a new generation naming the same files, with the new
        version in its ``meta``; nothing is downloaded and the rest of the publication is ignored.
        True when done so (a device that holds another version downloads it as any full model)."""
        if env.kind != FULL or not env.parent_seq or self.version != (env.parent_seq, env.parent_digest):
            return False
        started = ticks_ms()
        try:
            relabel(self.directory, {"model": self.model, "seq": env.seq, "digest": digest_hex(env.digest),
                                      "kind": "restore"})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._say("restoring %s locally failed (%s): downloading it" % (env.describe(), _reason(exc)))
            return False
        self._say("%s restores version %d, which the device has: switched without downloading"
                  % (env.describe(), env.parent_seq))
        self.version = (env.seq, env.digest)
        self.applied = (env.seq, "restore", 0, ticks_diff(ticks_ms(), started) / 1000)
        self.error = None
        self.state = report.CURRENT
        self.diverged = False
        self.target = env.seq + 1
        if self.status is not None and self.status.seq >= env.seq:
            self.target = self._next_target()
        self._settle()
        return True

    def _begin(self, env):
        self.assembly = Assembly(env, self.max_buffered)
        self.assembly.last_progress = self.started = ticks_ms()
        self.content_error = None
        meta = {"model": self.model, "seq": env.seq, "digest": digest_hex(env.digest), "kind": env.kind}
        try:
            self.session = StoreSession(self.directory, update=env.kind == UPDATE, meta=meta, **self.store_options)
        except (OSError, NNCError) as exc:
            self._abandon("cannot start writing: %s" % _reason(exc), None)
            return
        self._set_state(report.DOWNLOADING)

    def _add(self, env):
        a = self.assembly
        if a is None:
            return
        if env.index > a.next and a.held_bytes + envelope.held_size(env) > a.max_buffered:
            return  # came early: its retained copy is fetched again once the gap is noticed
        try:
            bodies = a.add(env)
        except NNCError as exc:
            # Messages that do not fit together: a damaged copy, maybe, of the genuine publication.
            self._abandon(_reason(exc), None)
            return
        if bodies:
            a.last_progress = ticks_ms()
            self.bodies.extend(bodies)
        if a.first.index < a.next:
            # Released: the first envelope stays to compare the others with; its message need not.
            a.first.body = b""
        if self.feed_bytes is None:
            self._feed()

    def _feed(self):
        """Decode up to ``feed_bytes`` of what has arrived in order (what a step may do where the
        GC runs between steps only); once a complete publication is decoded, commit it (with
        ``feed_bytes``, in a step of its own: the commit hashes the model and writes the index)."""
        budget = self.feed_bytes if self.feed_bytes is not None else 1 << 30
        bodies = self.bodies
        while bodies and budget > 0:
            body = bodies[0]
            n = min(budget, len(body) - self.fed)
            if self.session is not None:
                try:
                    self.session.feed(body[self.fed:self.fed + n] if n < len(body) else body)
                except NNCError as exc:
                    self._content_failed(exc)
                except (OSError, MemoryError) as exc:
                    self._abandon("%s: %s" % (type(exc).__name__, _reason(exc)), None)
                    return
            self.fed += n
            budget -= n
            if self.fed == len(body):
                bodies.pop(0)
                self.fed = 0
        a = self.assembly
        if bodies or a is None or not a.complete or (self.feed_bytes is not None and budget < self.feed_bytes):
            return
        confirmed = False
        try:
            a.check()
            confirmed = True
            if self.content_error is not None:
                raise self.content_error
            self._set_state(report.APPLYING)
            # With feed_bytes the old generation is removed in the next step: on a port that
            # collects between steps only, the commit's garbage and the removal's would add up.
            self.session.close(keep_old=self.feed_bytes is not None)
            if self.feed_bytes is not None:
                self.committed = self.session
        except NNCError as exc:
            # Unless the digest confirmed the bytes, a damaged or forged copy under a genuine envelope
            # (signed or not) may have failed: refusing would make the device ignore the real one, so
            # it is retried later.
            self._abandon(_reason(exc), True if confirmed else None)
            return
        except (OSError, MemoryError) as exc:
            self._abandon("%s: %s" % (type(exc).__name__, _reason(exc)), None)
            return
        self._done(a.first)

    def _content_failed(self, exc):
        """The store refused the bitstream (it removed what it wrote): the rest of the publication is
        still hashed, so that a refusal for good is of the signed bytes only."""
        self.session = None
        self.content_error = exc if isinstance(exc, NNCError) else NNCError(str(exc))

    def _done(self, env):
        seconds = ticks_diff(ticks_ms(), self.started) / 1000
        self.session = self.assembly = self.content_error = None
        self.version = (env.seq, env.digest)
        self.applied = (env.seq, env.kind, env.total, seconds)
        self.error = None
        self.state = report.CURRENT
        if env.kind == FULL:
            self.diverged = False
        self._say("applied %s: %d bytes in %d messages, %.2f s" % (env.describe(), env.total, env.count, seconds))
        # The next version, whatever the status says now (it follows the data), unless it already
        # names this one: then the chain and the wave decide.
        self.target = env.seq + 1
        if self.status is not None and self.status.seq >= env.seq:
            self.target = self._next_target()
        self._settle()

    # --- failures ---------------------------------------------------------------------------------
    def _refuse(self, env, reason):
        """Refused for good for what it is: not retried; the device stays at its version."""
        self.refused.append(_identity(env))
        if len(self.refused) > MAX_REMEMBERED:
            self.refused.pop(0)
        self._fail(report.REJECTED, "refused %s: %s" % (env.describe(), reason))

    def _abandon(self, reason, refuse):
        """Drop what is under way. ``refuse``: True for good, None to retry after gap_timeout (a local
        failure, or content not yet known to be the signed one), False to fetch it again at once."""
        v = self.verifying
        a = self.assembly
        first = a.first if a is not None else (v[1] if v is not None else self.accepted)
        self.verifying = self.assembly = self.accepted = None
        self.bodies = []
        self.fed = 0
        if self.session is not None:
            self.session.abort()
            self.session = None
        if first is None:
            return
        if refuse:
            self._refuse(first, reason)
            return
        if refuse is None:
            self.deferred[first.digest] = ticks_add(ticks_ms(), self.gap_ms)  # MicroPython's ticks wrap
            self._fail(report.FAILED, "abandoned %s: %s (retrying)" % (first.describe(), reason))
        else:
            self.refetch = True
            self._say("abandoned %s: %s" % (first.describe(), reason))
            self._settle()

    def _fail(self, state, reason):
        self._say("%s; %s" % (reason, self._describe()))
        self.error = reason
        self.state = state
        self._report()

    def _tick(self, now):
        for digest in [d for d, until in self.deferred.items() if ticks_diff(now, until) >= 0]:
            del self.deferred[digest]
            self.refetch = True
        a = self.assembly
        if a is None or ticks_diff(now, a.last_progress) <= self.gap_ms:
            return
        if not a.refetched:
            a.refetched = True
            a.last_progress = now
            self.refetch = True
        else:
            self._abandon("messages %s of %d missing" % (a.missing()[:8], a.first.count), False)

    # --- the store's version and the report -------------------------------------------------------
    def _load_version(self):
        index = read_index(self.directory)
        meta = index.get("meta") if index is not None else None
        if isinstance(meta, dict) and meta.get("model") == self.model:
            self.version = (meta["seq"], envelope.digest_from_hex(meta["digest"]))
            self.applied = None

    def _describe(self):
        if self.version is None:
            return "the device has no model"
        return "the device stays at version %d (%s)" % (self.version[0], digest_hex(self.version[1])[:12])

    def _set_state(self, state):
        self.state = state
        self._report()

    def _report(self):
        seq, digest = self.version if self.version is not None else (0, None)
        key = (self.state, seq, self.target, self.error)
        if key == self.last_report:
            return
        self.last_report = key
        now = time.time()
        payload = report.report_payload(self.device_id, self.state, seq, digest, self.target, self.error,
                                        int(now), self.applied)
        self.client.publish(self.report_topic, payload, True, 0)

    def _say(self, line):
        if self.log is not None:
            self.log("nnc-device %s/%s: %s" % (self.device_id, self.model, line))


def _sleep_ms(ms):
    sleep = getattr(time, "sleep_ms", None)
    if sleep is not None:
        sleep(ms)
    else:
        time.sleep(ms / 1000)
