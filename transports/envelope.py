"""The MQTT delivery format: message envelopes, the retained status, and in-order reassembly.

Transport-neutral and pure Python that also runs on MicroPython (``struct``, ``hashlib``, ``json``
only), so a device with its own MQTT client (umqtt, ...) can use the same code as
``transports.mqtt``.

A *publication* is one NNR bitstream (a full model or an incremental update) cut into messages.
Each message is an envelope header followed by whole NNR units. The header (network byte order)::

    offset size  field
         0    2  magic           b"NM"
         2    1  version         1
         3    1  flags           bit 0: update (0: full model); other bits 0
         4    4  seq             the model version this publication produces (>= 1)
         8    4  parent_seq      the version an update applies to; for a full model 0, or the version
                                 whose model it restores (a rollback or a compaction, below)
        12    2  index           this message's number, 0 .. count - 1
        14    2  count           messages in the publication
        16    4  offset          where this message's units start in the bitstream
        20    4  total           bytes of the whole bitstream
        24   32  digest          SHA-256 of the whole bitstream (the units of all messages, in order)
        56   32  parent_digest   the digest of the publication that made version parent_seq (zeros when
                                 parent_seq is 0)
        88    1  model_len       bytes of the model name
        89    2  ext_len         bytes of the extension field
        91       model           the model name, UTF-8
                 ext             extension data (empty in version 1; room for a signature)
                 units           whole NNR units (clause 6.2), the bytes offset .. offset + len - 1

A model *version* is the pair (seq, digest): the sequence number and the digest of the bitstream
that produced it. An update names its parent version, so a device applies it only to exactly
that model. A full model that names a parent *restores* it: its model is the one version
parent_seq made (``nnc-edge rollback --to``, or a compaction of the chain into a full model). A
device that still holds version (parent_seq, parent_digest) takes the new version without
downloading it; the others download it as any full model. Signatures cover the parent digest.

The status of a model is a retained JSON object (see ``status_payload``)::

    {"v": 1, "model": "demo", "seq": 7, "digest": "<hex>", "full_seq": 5, "counts": [3, 1, 1],
     "pending": null}

``seq``/``digest`` is the current version, ``full_seq`` the last full model; the retained chain is
``full_seq`` .. ``seq`` and ``counts`` gives each one's number of messages. ``pending`` is
``{"seq", "digest", "count"}`` while a publication is under way (or was interrupted). An optional
``rollout`` (``{"from", "percent", "devices"}``) limits versions from ``from`` on to a staged-rollout
wave: its fields and the wave test are ``transports.report``'s (``parse_rollout``, ``in_wave``).

Everything here reads what anyone who may publish to the broker sends: sizes are checked before
anything is allocated, and text from a message goes into errors through ``excerpt`` only.
"""

import hashlib
import json
import struct

from decoder_core.errors import NNCError

MAGIC = b"NM"
VERSION = 1
FLAG_UPDATE = 0x01
FULL = "full"
UPDATE = "update"

DIGEST_BYTES = 32
NO_DIGEST = bytes(DIGEST_BYTES)
_FIXED = ">2sBBIIHHII32s32sBH"
HEADER_BYTES = struct.calcsize(_FIXED)  # 91, before the model name and the extension
MAX_COUNT = 0xFFFF
MAX_TOTAL = 0xFFFFFFFF
MAX_MODEL_NAME_BYTES = 64
# Out-of-order messages held while waiting for an earlier one (the rest arrives by redelivery).
DEFAULT_MAX_BUFFERED = 16 << 20
# What a held message costs beyond its bytes: the Envelope object and its fields (measured on
# CPython: about 400 bytes), so that even empty messages count against max_buffered.
HELD_OVERHEAD = 512
# A status lists one message count per publication since the last full model: 64 KiB is some
# 9,000 of them. It nests two levels ({"counts": [...], "pending": {...}}).
MAX_STATUS_BYTES = 64 << 10
MAX_STATUS_DEPTH = 4
EXCERPT_CHARS = 40
_HEX = "0123456789abcdefABCDEF"


def excerpt(value, limit=EXCERPT_CHARS, quote=True):
    """``repr(value)`` (with ``quote=False``, a string itself) for a message, cut to about ``limit``
    characters: names, topics and values that came from the network can be megabytes long."""
    if isinstance(value, str):
        n, text, unit = len(value), value[:limit], "characters"
        if quote:
            text = repr(text)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        n, text, unit = len(value), repr(bytes(value[:limit])), "bytes"
    else:
        text = repr(value)
        n, text, unit = len(text), text[:limit], "characters"
    if n <= limit:
        return text
    return "%s... (%d %s)" % (text, n, unit)


def digest_hex(digest):
    return "".join("%02x" % b for b in digest)


def digest_from_hex(text, element="digest"):
    if not isinstance(text, str) or len(text) != 2 * DIGEST_BYTES:
        raise NNCError("%s must be %d hex digits, not %s" % (element, 2 * DIGEST_BYTES, excerpt(text)), None,
                       element)
    # Checked digit by digit: int(..., 16) also takes "+f", " f" and other Unicode digits.
    for c in text:
        if c not in _HEX:
            raise NNCError("%s is not hexadecimal: %s" % (element, excerpt(text)), None, element)
    return bytes(int(text[i:i + 2], 16) for i in range(0, len(text), 2))


def check_model_name(model):
    """The model name as UTF-8 bytes; ValueError unless it can be one MQTT topic level."""
    if not isinstance(model, str) or not model:
        raise ValueError("the model name must be a non-empty string")
    raw = model.encode("utf-8")
    if len(raw) > MAX_MODEL_NAME_BYTES:
        raise ValueError("the model name is %d bytes, at most %d allowed" % (len(raw), MAX_MODEL_NAME_BYTES))
    for c in "/+#\x00":
        if c in model:
            raise ValueError("the model name %s contains %r, which cannot be in an MQTT topic level"
                             % (excerpt(model), c))
    return raw


def header_bytes(model, ext=b""):
    """The envelope's size for this model name and extension (the units follow it)."""
    return HEADER_BYTES + len(check_model_name(model)) + len(ext)


class Envelope:
    """One message's header fields; ``body`` is the NNR unit bytes it carries."""

    def __init__(self, model, kind, seq, parent_seq, index, count, offset, total, digest, parent_digest,
                 body=b"", ext=b""):
        self.model = model
        self.kind = kind
        self.seq = seq
        self.parent_seq = parent_seq
        self.index = index
        self.count = count
        self.offset = offset
        self.total = total
        self.digest = digest
        self.parent_digest = parent_digest
        self.body = body
        self.ext = ext

    def pack(self):
        """The whole message: header, model name, extension, body."""
        name = check_model_name(self.model)
        return (struct.pack(_FIXED, MAGIC, VERSION, FLAG_UPDATE if self.kind == UPDATE else 0, self.seq,
                            self.parent_seq, self.index, self.count, self.offset, self.total, self.digest,
                            self.parent_digest, len(name), len(self.ext))
                + name + bytes(self.ext) + bytes(self.body))

    def same_publication(self, other):
        return (self.model == other.model and self.kind == other.kind and self.seq == other.seq
                and self.parent_seq == other.parent_seq and self.count == other.count and self.total == other.total
                and self.digest == other.digest and self.parent_digest == other.parent_digest
                and self.ext == other.ext)

    def describe(self):
        if self.kind == UPDATE:
            return "update %d (%s) of version %d" % (self.seq, digest_hex(self.digest)[:12], self.parent_seq)
        return "full model %d (%s)" % (self.seq, digest_hex(self.digest)[:12])


def _bad(message, offset, element):
    raise NNCError(message, offset, "envelope " + element)


def parse(payload):
    """The Envelope of a message; NNCError naming the field when the header is malformed."""
    n = len(payload)
    if n < HEADER_BYTES:
        _bad("message of %d bytes is shorter than the %d-byte envelope header" % (n, HEADER_BYTES), n, "header")
    (magic, version, flags, seq, parent_seq, index, count, offset, total, digest, parent_digest, model_len,
     ext_len) = struct.unpack(_FIXED, bytes(payload[:HEADER_BYTES]))
    if magic != MAGIC:
        _bad("not an nnc-edge message (magic %r)" % magic, 0, "magic")
    if version != VERSION:
        _bad("envelope version %d is not supported (only %d)" % (version, VERSION), 2, "version")
    if flags & ~FLAG_UPDATE:
        _bad("reserved flag bits 0x%02x are set" % (flags & ~FLAG_UPDATE), 3, "flags")
    kind = UPDATE if flags & FLAG_UPDATE else FULL
    if seq == 0:
        _bad("seq 0 is reserved (no model)", 4, "seq")
    if kind == UPDATE and not 0 < parent_seq < seq:
        _bad("update %d names parent %d, which is not an older version" % (seq, parent_seq), 8, "parent_seq")
    if kind == FULL and (parent_seq >= seq or (parent_seq == 0) != (parent_digest == NO_DIGEST)):
        _bad("full model %d restores version %d, which is not an older one with a digest" % (seq, parent_seq), 8,
             "parent_seq")
    if count == 0 or index >= count:
        _bad("message index %d of %d" % (index, count), 12, "index")
    body_start = HEADER_BYTES + model_len + ext_len
    if body_start > n:
        _bad("model name and extension (%d bytes) run past the end of the %d-byte message"
             % (model_len + ext_len, n), HEADER_BYTES, "model_len")
    if offset > total or n - body_start > total - offset:
        _bad("%d bytes at offset %d run past the bitstream's %d bytes" % (n - body_start, offset, total), 16,
             "offset")
    try:
        model = bytes(payload[HEADER_BYTES:HEADER_BYTES + model_len]).decode("utf-8")
    except UnicodeError:
        model = None
    if not model:
        _bad("the model name is empty or not UTF-8", HEADER_BYTES, "model")
    ext = bytes(payload[HEADER_BYTES + model_len:body_start])
    return Envelope(model, kind, seq, parent_seq, index, count, offset, total, digest, parent_digest,
                    payload[body_start:], ext)


def messages(model, kind, seq, bodies, parent_seq=0, parent_digest=NO_DIGEST, ext=b""):
    """The message payloads of one publication whose bitstream is the concatenation of ``bodies``.

    ``ext``: the extension field of every message, or a function of the bitstream's digest that
    returns it (e.g. a signature over the publication). Returns (digest, [payload, ...]).
    """
    if kind not in (FULL, UPDATE):
        raise ValueError("kind must be %r or %r" % (FULL, UPDATE))
    if kind == FULL and (parent_seq >= seq or (parent_seq == 0) != (parent_digest == NO_DIGEST)):
        raise ValueError("a full model restores no version (0 and no digest) or an older one with its digest")
    if kind == UPDATE and not 0 < parent_seq < seq:
        raise ValueError("update %d needs a parent version between 1 and %d" % (seq, seq - 1))
    if not 0 < seq <= 0xFFFFFFFF:
        raise ValueError("seq must be in 1 .. 2**32 - 1")
    if not 0 < len(bodies) <= MAX_COUNT:
        raise ValueError("a publication has 1 .. %d messages, not %d" % (MAX_COUNT, len(bodies)))
    h = hashlib.sha256()
    total = 0
    for body in bodies:
        h.update(body)
        total += len(body)
    if total > MAX_TOTAL:
        raise ValueError("a bitstream of %d bytes is too large for the envelope's 32-bit total" % total)
    digest = h.digest()
    if callable(ext):
        ext = ext(digest)
    if len(ext) > 0xFFFF:
        raise ValueError("the extension field holds at most 65535 bytes")
    out = []
    offset = 0
    for index, body in enumerate(bodies):
        out.append(Envelope(model, kind, seq, parent_seq, index, len(bodies), offset, total, digest,
                            parent_digest, body, ext).pack())
        offset += len(body)
    return digest, out


# --- the retained status --------------------------------------------------------------------------
def status_payload(model, seq, digest, full_seq, counts, pending=None, rollout=None):
    """The JSON status: current version (seq, digest), the retained chain full_seq .. seq with each
    publication's message count, ``pending`` = (seq, digest, count) of a publication under way, and
    the ``rollout`` wave (a dict, see transports.report; omitted when None)."""
    status = {"v": 1, "model": model, "seq": seq, "digest": digest_hex(digest) if seq else None,
              "full_seq": full_seq, "counts": list(counts), "pending": None}
    if pending is not None:
        status["pending"] = {"seq": pending[0], "digest": digest_hex(pending[1]), "count": pending[2]}
    if rollout is not None:
        status["rollout"] = rollout
    return json.dumps(status).encode("utf-8")


class Status:
    """A parsed status: ``seq``, ``digest`` (bytes or None), ``full_seq``, ``counts``, ``pending``
    (None or (seq, digest, count)), ``rollout`` (None or the wave's dict, unchecked: parsed by
    transports.report.parse_rollout where it is used)."""

    def __init__(self, model, seq=0, digest=None, full_seq=0, counts=(), pending=None, rollout=None):
        self.model = model
        self.seq = seq
        self.digest = digest
        self.full_seq = full_seq
        self.counts = list(counts)
        self.pending = pending
        self.rollout = rollout

    def chain(self):
        """(seq, message count) of every retained publication, the full model first."""
        if not self.seq:
            return []
        return [(self.full_seq + i, c) for i, c in enumerate(self.counts)]

    def announced(self, seq):
        """The digest this status names for version ``seq`` (the current one or the one pending), or
        None when it names none; a message of that version with another digest is left over from an
        interrupted publication."""
        if self.seq == seq:
            return self.digest
        if self.pending is not None and self.pending[0] == seq:
            return self.pending[1]
        return None

    def supersedes(self, env):
        """True when this status names another publication for ``env``'s version."""
        digest = self.announced(env.seq)
        return digest is not None and digest != env.digest

    def payload(self):
        return status_payload(self.model, self.seq, self.digest, self.full_seq, self.counts, self.pending,
                              self.rollout)


def _int_field(obj, name, low=0, high=0xFFFFFFFF):
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise NNCError("status %s must be an integer in %d .. %d, not %s" % (name, low, high, excerpt(value)), None,
                       "status " + name)
    return value


def _check_nesting(text, limit, what="status"):
    """NNCError when brackets outside strings nest deeper than ``limit``: json.loads recurses once
    per level, and b"[" * 100000 would exhaust the stack (RecursionError) before failing."""
    depth = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "[" or c == "{":
            depth += 1
            if depth > limit:
                raise NNCError("%s nests deeper than %d levels" % (what, limit), None, what)
        elif c == "]" or c == "}":
            depth -= 1


def _status_object(payload):
    if len(payload) > MAX_STATUS_BYTES:
        raise NNCError("status of %d bytes is larger than the limit of %d" % (len(payload), MAX_STATUS_BYTES),
                       None, "status")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeError:
        raise NNCError("status is not UTF-8", None, "status")
    _check_nesting(text, MAX_STATUS_DEPTH)
    try:
        obj = json.loads(text)
    except ValueError:
        raise NNCError("status is not JSON", None, "status")
    if not isinstance(obj, dict):
        raise NNCError("status is not a JSON object", None, "status")
    return obj


def parse_status(payload, model=None):
    """The Status in a retained status payload; NNCError when it is malformed, larger than
    MAX_STATUS_BYTES, or for another model."""
    obj = _status_object(payload)
    if obj.get("v") != 1:
        raise NNCError("status version %s is not supported" % excerpt(obj.get("v")), None, "status v")
    name = obj.get("model")
    if not isinstance(name, str) or (model is not None and name != model):
        raise NNCError("status is for model %s, not %s" % (excerpt(name), excerpt(model)), None, "status model")
    seq = _int_field(obj, "seq")
    status = Status(name, seq)
    if seq:
        status.digest = digest_from_hex(obj.get("digest"), "status digest")
        status.full_seq = _int_field(obj, "full_seq", 1, seq)
        counts = obj.get("counts")
        if not isinstance(counts, list) or len(counts) != seq - status.full_seq + 1:
            raise NNCError("status counts must list the %d publications %d .. %d"
                           % (seq - status.full_seq + 1, status.full_seq, seq), None, "status counts")
        for c in counts:
            if not isinstance(c, int) or isinstance(c, bool) or not 0 < c <= MAX_COUNT:
                raise NNCError("status counts must be integers in 1 .. %d" % MAX_COUNT, None, "status counts")
        status.counts = counts
    pending = obj.get("pending")
    if pending is not None:
        if not isinstance(pending, dict):
            raise NNCError("status pending must be an object or null", None, "status pending")
        status.pending = (_int_field(pending, "seq", 1),
                          digest_from_hex(pending.get("digest"), "status pending digest"),
                          _int_field(pending, "count", 1, MAX_COUNT))
    status.rollout = obj.get("rollout")
    return status


# --- reassembly -----------------------------------------------------------------------------------
def held_size(env):
    """The memory a message kept for later costs: all its bytes, and the object holding them."""
    return HEADER_BYTES + len(env.model) + len(env.ext) + len(env.body) + HELD_OVERHEAD


class Assembly:
    """Puts the messages of one publication back in order, each exactly once.

    ``add(envelope)`` returns the bodies that are now next in order (possibly none: a gap before
    it, or a duplicate); later messages are held until the gap is filled, up to ``max_buffered``
    bytes, counting each held message whole (header, model name, extension, body) plus
    HELD_OVERHEAD. When ``complete``, ``check()`` compares the digest of everything released with the
    envelope's. ``last_progress`` is set by the caller (a clock reading) when a message helped.
    """

    def __init__(self, first, max_buffered=DEFAULT_MAX_BUFFERED):
        self.first = first
        self.next = 0
        self.released = 0  # bytes handed out, in order
        self.held = {}     # index -> body of messages that came early
        self.held_bytes = 0
        self.max_buffered = max_buffered
        self.duplicates = 0
        self.last_progress = 0
        self.refetched = False  # the receiver asked for the retained copies again
        self._hash = hashlib.sha256()

    @property
    def complete(self):
        return self.next == self.first.count

    def missing(self):
        """Indices not yet received (for messages in the log)."""
        return [i for i in range(self.next, self.first.count) if i not in self.held]

    def add(self, env):
        if not env.same_publication(self.first):
            raise NNCError("message %d does not belong to %s" % (env.index, self.first.describe()), 0, "envelope")
        if env.index < self.next or env.index in self.held:
            self.duplicates += 1
            return []
        if env.index > self.next:
            size = held_size(env)
            if self.held_bytes + size > self.max_buffered:
                raise NNCError("more than %d bytes of messages after missing message %d"
                               % (self.max_buffered, self.next), env.offset, "envelope index")
            self.held[env.index] = env
            self.held_bytes += size
            return []
        out = [self._release(env)]
        while self.next in self.held:
            env = self.held.pop(self.next)
            self.held_bytes -= held_size(env)
            out.append(self._release(env))
        return out

    def _release(self, env):
        if env.offset != self.released:
            raise NNCError("message %d starts at byte %d, but %d bytes came before it"
                           % (env.index, env.offset, self.released), env.offset, "envelope offset")
        body = env.body
        self._hash.update(body)
        self.released += len(body)
        self.next += 1
        if self.next == self.first.count and self.released != self.first.total:
            raise NNCError("the messages carry %d bytes, the envelope says %d" % (self.released, self.first.total),
                           self.released, "envelope total")
        return body

    def check(self):
        """NNCError unless every message arrived and the bitstream's digest matches."""
        if not self.complete:
            raise NNCError("messages %r of %d missing" % (self.missing(), self.first.count), self.released,
                           "envelope index")
        if self._hash.digest() != self.first.digest:
            raise NNCError("%s: SHA-256 of the %d bytes received does not match the envelope's digest"
                           % (self.first.describe(), self.released), 0, "envelope digest")
