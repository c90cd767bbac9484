"""Authenticated updates: Ed25519 signatures that travel beside NNR bitstreams, never inside them.

The publisher signs each bitstream with its private key; a device holds the publisher's public
key(s) and refuses, before decoding or applying anything, a bitstream that is unsigned, signed by
another key, changed after signing, meant for another model or another place in its chain, or not
newer than what it has already applied (replay).

What is signed
--------------
Not the bitstream itself but a *statement* about it (all integers big-endian)::

    "nnc-edge signed bitstream v1\\0"   domain separation: these signatures mean nothing elsewhere
    u8   length of the model name, then the name in UTF-8
    u64  sequence   the publisher's number for this bitstream in the model's history (an update's
                    sequence number, an MQTT version); a device accepts only numbers above the
                    last one it applied
    32 bytes parent the digest of what the bitstream applies to (32 zero bytes for a full model):
                    for files, the model digest of nnc_edge.updates (the update record's parent);
                    over MQTT, the envelope's parent_digest (the digest of the parent publication)
    32 bytes        SHA-256 of the whole bitstream

The signature is 64 bytes (RFC 8032 Ed25519) over that statement. A ``Signature`` carries it with
the statement's fields and the signing key's id (the first 8 bytes of SHA-256 of the raw 32-byte
public key), in two forms:

* a detached ``.sig`` file next to the bitstream (``nnc-edge sign`` writes ``UPDATE.sig``): text,
  one ``name value`` per line::

      nnc-edge signature v1
      model kws
      sequence 3
      parent <64 hex digits>
      sha256 <64 hex digits>
      key <16 hex digits>
      signature <128 hex digits>

* in the MQTT envelope's extension field (``transports.envelope``), whose header already holds the
  model name, the version (sequence), the parent digest and the bitstream's SHA-256: only
  ``b"NS" u8(1) key_id[8] signature[64]`` (75 bytes, ``pack_ext`` / ``unpack_ext``), so a device
  checks the signature on the first message it receives, before it decodes any.

Keys are PEM files: the private key PKCS#8 (file mode 0600), the public key SubjectPublicKeyInfo
(``nnc-edge keygen -o KEY`` writes ``KEY`` and ``KEY.pub``; ``openssl pkey`` reads both).

The device keeps the last applied sequence number per model in a ``SequenceStore`` (a JSON file
replaced atomically) when updates are applied from files; over MQTT the version in the model
file's metadata plays that part.

Signing needs the ``cryptography`` package (imported on first use, so ``import nnc_edge`` stays light).
Verifying uses it when it is importable, else the plain-Python ``transports.ed25519``: a device with no
``cryptography`` wheel (armhf) verifies without building it.
"""

import binascii
import hashlib
import json
import os
import stat
import struct

from decoder_core import NNCError

from .atomicfile import clear_stale, write_file

DOMAIN = b"nnc-edge signed bitstream v1\x00"
NO_DIGEST = bytes(32)
SIGNATURE_BYTES = 64
KEY_ID_BYTES = 8
EXT_MAGIC = b"NS"
EXT_VERSION = 1
EXT_BYTES = len(EXT_MAGIC) + 1 + KEY_ID_BYTES + SIGNATURE_BYTES
SIG_SUFFIX = ".sig"
TEXT_HEADER = "nnc-edge signature v1"
MAX_MODEL_NAME_BYTES = 255
MAX_SIGNATURE_FILE_BYTES = 4096


class SignatureError(NNCError):
    """A bitstream refused because its signature is missing, malformed, untrusted or wrong."""


class ReplayError(SignatureError):
    """A correctly signed bitstream that is not newer than what the device already applied."""


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise SignatureError("Ed25519 signatures need the 'cryptography' package (pip install cryptography)")
    return ed25519


def _serialization():
    from cryptography.hazmat.primitives import serialization
    return serialization


def _has_cryptography():
    try:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
    except ImportError:
        return False
    return True


# RFC 8410: an Ed25519 SubjectPublicKeyInfo is this DER prefix, then the 32-byte key.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


class _PublicKey:
    """A trusted key's verifier: ``cryptography`` when importable, else ``transports.ed25519``."""

    def __init__(self, raw):
        self.raw = raw
        self.key = _ed25519().Ed25519PublicKey.from_public_bytes(raw) if _has_cryptography() else None

    def valid(self, signature, message):
        if self.key is None:
            from transports import ed25519
            return ed25519.verify(self.raw, message, signature)
        from cryptography.exceptions import InvalidSignature
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


def _pem_public_raw(pem):
    """The raw key of an Ed25519 public key PEM, read without ``cryptography``; ValueError otherwise."""
    text = pem.decode("ascii", "replace")
    begin, end = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"
    if begin not in text or end not in text:
        raise ValueError("no PEM public key")
    der = binascii.a2b_base64(text.split(begin, 1)[1].split(end, 1)[0])
    if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
        raise ValueError("not an Ed25519 SubjectPublicKeyInfo")
    return der[len(_SPKI_PREFIX):]


# --- what is signed -------------------------------------------------------------------------------
def _check_digest(value, name):
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ValueError("%s must be 32 bytes" % name)
    return bytes(value)


def statement(model, sequence, parent, digest):
    """The bytes an Ed25519 signature covers (see the module docstring)."""
    name = model.encode("utf-8") if isinstance(model, str) else b""
    if not name or len(name) > MAX_MODEL_NAME_BYTES:
        raise ValueError("the model name must be 1..%d bytes of UTF-8" % MAX_MODEL_NAME_BYTES)
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < 1 << 64:
        raise ValueError("the sequence number must be an integer in 0 .. 2**64 - 1")
    return (DOMAIN + struct.pack(">B", len(name)) + name + struct.pack(">Q", sequence)
            + _check_digest(parent, "parent") + _check_digest(digest, "digest"))


def key_id(public_raw):
    """The 8-byte id of a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(bytes(public_raw)).digest()[:KEY_ID_BYTES]


def bitstream_digest(data):
    return hashlib.sha256(bytes(data)).digest()


# --- keys -----------------------------------------------------------------------------------------
class SigningKey:
    """An Ed25519 private key: ``generate()``, ``load(path)``, ``save(path)`` (0600, and path.pub)."""

    def __init__(self, private):
        self._private = private
        serialization = _serialization()
        self.public_raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                            serialization.PublicFormat.Raw)
        self.key_id = key_id(self.public_raw)

    @classmethod
    def generate(cls):
        return cls(_ed25519().Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path):
        """Read a PEM PKCS#8 private key; SignatureError when it is not an Ed25519 key."""
        ed25519 = _ed25519()
        with open(path, "rb") as f:
            pem = f.read()
        try:
            private = _serialization().load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise SignatureError("%s is not an unencrypted PEM private key: %s" % (path, exc))
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise SignatureError("%s is not an Ed25519 key" % path)
        return cls(private)

    def private_pem(self):
        serialization = _serialization()
        return self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())

    def public_pem(self):
        return public_pem(self.public_raw)

    def save(self, path, overwrite=False):
        """Write the private key to ``path`` (created with mode 0600) and the public key to path.pub."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        fd = os.open(path, flags, 0o600)
        try:
            os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)  # also when an existing file is overwritten
            os.write(fd, self.private_pem())
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(path + ".pub", "wb") as f:
            f.write(self.public_pem())

    def sign(self, message):
        return self._private.sign(bytes(message))


def public_pem(public_raw):
    serialization = _serialization()
    key = _ed25519().Ed25519PublicKey.from_public_bytes(bytes(public_raw))
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class TrustedKeys:
    """The public keys a device accepts signatures from, by key id."""

    def __init__(self, public_raw_keys=()):
        self.keys = {}
        for raw in public_raw_keys:
            self.add(raw)

    def add(self, public_raw):
        raw = bytes(public_raw)
        if len(raw) != 32:
            raise ValueError("an Ed25519 public key has 32 bytes")
        self.keys[key_id(raw)] = _PublicKey(raw)

    @classmethod
    def load(cls, paths):
        """Read PEM public keys (a .pub written by keygen, or any Ed25519 SubjectPublicKeyInfo). A
        private key is refused: a device that holds it could sign updates for every other."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        python_only = not _has_cryptography()
        if not python_only:
            ed25519 = _ed25519()
            serialization = _serialization()
        trusted = cls()
        for path in paths:
            with open(path, "rb") as f:
                pem = f.read()
            try:
                if python_only:
                    trusted.add(_pem_public_raw(pem))
                    continue
                key = serialization.load_pem_public_key(pem)
            except (ValueError, TypeError) as exc:
                if b"PRIVATE KEY-----" in pem:
                    raise SignatureError("%s is a private key: a device trusts the public key (KEY.pub, which "
                                         "nnc-edge keygen writes beside it); keep the private key on the publishing "
                                         "host" % path)
                raise SignatureError("%s is not a PEM Ed25519 key: %s" % (path, exc))
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise SignatureError("%s is not an Ed25519 key" % path)
            trusted.add(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        return trusted

    def __len__(self):
        return len(self.keys)

    def verify(self, signature):
        """Raise SignatureError unless ``signature`` (a Signature) is valid under a trusted key."""
        key = self.keys.get(signature.key_id)
        if key is None:
            raise SignatureError("signed by key %s, which is not a trusted key (trusted: %s)"
                                 % (_hex(signature.key_id), ", ".join(sorted(_hex(k) for k in self.keys)) or "none"),
                                 None, "signature key")
        if not key.valid(signature.signature, signature.statement()):
            raise SignatureError("the signature of %s does not match: the bitstream or its model, sequence or "
                                 "parent differ from what key %s signed" % (signature.describe(),
                                                                           _hex(signature.key_id)),
                                 None, "signature")


# --- signatures -----------------------------------------------------------------------------------
class Signature:
    """A signature and the statement fields it covers (``model``, ``sequence``, ``parent``, ``digest``)."""

    def __init__(self, model, sequence, parent, digest, key_id, signature):
        self.model = model
        self.sequence = sequence
        self.parent = _check_digest(parent, "parent")
        self.digest = _check_digest(digest, "digest")
        if len(key_id) != KEY_ID_BYTES or len(signature) != SIGNATURE_BYTES:
            raise ValueError("a key id has %d bytes and a signature %d" % (KEY_ID_BYTES, SIGNATURE_BYTES))
        self.key_id = bytes(key_id)
        self.signature = bytes(signature)
        statement(model, sequence, self.parent, self.digest)  # checks the name and sequence

    def statement(self):
        return statement(self.model, self.sequence, self.parent, self.digest)

    def describe(self):
        return "model %s, sequence %d" % (self.model, self.sequence)

    # -- the detached .sig file --
    def to_text(self):
        return "\n".join((TEXT_HEADER, "model " + self.model, "sequence %d" % self.sequence,
                          "parent " + _hex(self.parent), "sha256 " + _hex(self.digest), "key " + _hex(self.key_id),
                          "signature " + _hex(self.signature))) + "\n"

    @classmethod
    def from_text(cls, text, where="signature"):
        if isinstance(text, (bytes, bytearray)):
            if len(text) > MAX_SIGNATURE_FILE_BYTES:
                raise SignatureError("%s: a signature file has at most %d bytes" % (where, MAX_SIGNATURE_FILE_BYTES))
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeError:
                raise SignatureError("%s is not UTF-8 text" % where, None, "signature")
        lines = text.splitlines()
        if not lines or lines[0].strip() != TEXT_HEADER:
            raise SignatureError("%s does not start with %r" % (where, TEXT_HEADER), None, "signature")
        fields = {}
        for line in lines[1:]:
            if not line.strip():
                continue
            name, _, value = line.partition(" ")
            if name in fields:
                raise SignatureError("%s: %s given twice" % (where, name), None, "signature")
            fields[name] = value
        expected = ("model", "sequence", "parent", "sha256", "key", "signature")
        if sorted(fields) != sorted(expected):
            raise SignatureError("%s must have exactly the fields %s" % (where, ", ".join(expected)), None, "signature")
        try:
            return cls(fields["model"], int(fields["sequence"]), _unhex(fields["parent"]), _unhex(fields["sha256"]),
                       _unhex(fields["key"]), _unhex(fields["signature"]))
        except ValueError as exc:
            raise SignatureError("%s: %s" % (where, exc), None, "signature")

    @classmethod
    def load(cls, path):
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_SIGNATURE_FILE_BYTES + 1)
        except FileNotFoundError:
            raise SignatureError("no signature: %s does not exist" % path, None, "signature")
        return cls.from_text(data, path)

    def save(self, path):
        write_file(path, self.to_text().encode("utf-8"))

    # -- the MQTT envelope's extension --
    def pack_ext(self):
        return EXT_MAGIC + struct.pack(">B", EXT_VERSION) + self.key_id + self.signature


def unpack_ext(ext, model, sequence, parent, digest):
    """The Signature an envelope extension carries for the publication with these fields; SignatureError
    when the extension is empty (unsigned) or not a signature."""
    ext = bytes(ext)
    if not ext:
        raise SignatureError("the publication is not signed", None, "envelope ext")
    if len(ext) != EXT_BYTES or ext[:2] != EXT_MAGIC or ext[2] != EXT_VERSION:
        raise SignatureError("the envelope extension (%d bytes) is not an nnc-edge signature" % len(ext), None,
                             "envelope ext")
    return Signature(model, sequence, parent, digest, ext[3:3 + KEY_ID_BYTES], ext[3 + KEY_ID_BYTES:])


def envelope_signer(key):
    """The ``sign`` hook of transports.mqtt.Publisher: (model, seq, parent_digest, digest) -> the
    envelope extension (EXT_BYTES long; pass ``ext_bytes=EXT_BYTES``). ``key``: a SigningKey or path."""
    if not isinstance(key, SigningKey):
        key = SigningKey.load(key)

    def sign(model, seq, parent_digest, digest):
        return sign_bitstream(None, key, seq, model, parent_digest, digest).pack_ext()
    return sign


def envelope_verifier(trusted, current_sequence=None):
    """The ``verify`` hook of transports.mqtt.Receiver: checks, on the first message of a publication
    and before any of it is decoded, that its envelope extension is a valid signature by a trusted
    key over the envelope's model, version (seq), parent digest and bitstream digest, and that the
    version is newer than ``current_sequence()`` (the device's version, None when it has none).
    Raises SignatureError / ReplayError."""
    if not isinstance(trusted, TrustedKeys):
        trusted = TrustedKeys.load(trusted)

    def verify(env):
        sig = unpack_ext(env.ext, env.model, env.seq, env.parent_digest, env.digest)
        verify_bitstream(None, sig, trusted, digest=env.digest)
        if current_sequence is not None:
            check_newer(sig, current_sequence())
        return sig
    return verify


def sign_bitstream(data, key, sequence, model, parent=NO_DIGEST, digest=None):
    """Sign a bitstream (bytes): returns a Signature. ``key`` is a SigningKey or the path of one;
    ``digest`` (its SHA-256) may be given instead of being computed from ``data``."""
    if not isinstance(key, SigningKey):
        key = SigningKey.load(key)
    if digest is None:
        digest = bitstream_digest(data)
    message = statement(model, sequence, parent, digest)
    return Signature(model, sequence, parent, digest, key.key_id, key.sign(message))


def verify_bitstream(data, signature, trusted, model=None, sequence=None, parent=None, digest=None):
    """Check a bitstream against its Signature before anything is done with it; returns the Signature.

    ``trusted`` is a TrustedKeys (or a list of public key paths). The bitstream's SHA-256 must be the
    signed one, the signature valid under a trusted key, and ``model`` / ``sequence`` / ``parent``, when
    given, what the device expects. Raises SignatureError otherwise.
    """
    if signature is None:
        raise SignatureError("the bitstream is not signed, and this device accepts signed bitstreams only", None,
                             "signature")
    if not isinstance(trusted, TrustedKeys):
        trusted = TrustedKeys.load(trusted)
    if not len(trusted):
        raise SignatureError("no trusted public key to verify signatures with", None, "signature key")
    trusted.verify(signature)
    if digest is None:
        digest = bitstream_digest(data)
    if digest != signature.digest:
        raise SignatureError("the bitstream's SHA-256 %s is not the signed %s: it was changed after signing"
                             % (_hex(digest)[:16], _hex(signature.digest)[:16]), None, "signature sha256")
    if model is not None and signature.model != model:
        raise SignatureError("the signature is for model %r, not %r" % (signature.model, model), None,
                             "signature model")
    if sequence is not None and signature.sequence != sequence:
        raise SignatureError("the signature is for sequence %d, the bitstream says %d" % (signature.sequence, sequence),
                             None, "signature sequence")
    if parent is not None and signature.parent != parent:
        raise SignatureError("the signature is for parent %s, the bitstream applies to %s"
                             % (_hex(signature.parent)[:16], _hex(parent)[:16]), None, "signature parent")
    return signature


def check_newer(signature, last):
    """ReplayError unless the signed sequence is above ``last`` (None: nothing applied yet)."""
    if last is not None and signature.sequence <= last:
        raise ReplayError("%s is not newer than sequence %d, which this device has already applied: refused as a "
                          "replay" % (signature.describe(), last), None, "signature sequence")


class SequenceStore:
    """The last applied sequence number per model, in a JSON file replaced atomically.

    Applying a signed update records it twice. Before the model file is replaced, ``begin``
    writes (and fsyncs) a pending record: the sequence being applied, the model file and the digest
    of the model the update produces. Until that file has that digest, the sequence before it
    counts, so after a kill between the two steps the next run still accepts the update; once the
    model is replaced, the update counts as applied, so a replay is refused even if ``record`` (the
    settled record, which spares the next run hashing the model) never ran.

    A store is its file's only writer: opening one removes the temporary files a killed writer left.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        clear_stale(self.path)

    def _read(self):
        try:
            with open(self.path, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, UnicodeError) as exc:
            raise SignatureError("%s is not a sequence file: %s" % (self.path, exc))
        if not isinstance(data, dict) or not all(_is_sequence(v) or _is_pending(v) for v in data.values()):
            raise SignatureError("%s is not a sequence file (model -> last sequence)" % self.path)
        return data

    def last(self, model):
        """The last sequence applied for ``model``, or None."""
        entry = self._read().get(model)
        return entry if not isinstance(entry, dict) else entry["applying"] if _done(entry) else entry["last"]

    def settle(self, model):
        """Settle the record of an apply that was interrupted (a pending record): returns (the model
        file, its digest) if the update got there, so that the caller can finish what that apply
        did not; else None."""
        entry = self._read().get(model)
        if not isinstance(entry, dict):
            return None
        done = _done(entry)
        self.record(model, entry["applying"] if done else entry["last"])
        return (entry["model"], bytes.fromhex(entry["result"])) if done else None

    def check(self, signature):
        check_newer(signature, self.last(signature.model))

    def begin(self, model, sequence, model_path, result):
        """Record that ``sequence`` is being applied to the model file ``model_path``, which will then
        hold the model with digest ``result``."""
        self._write(model, {"last": self.last(model), "applying": sequence, "model": os.path.abspath(model_path),
                            "result": _hex(result)})

    def record(self, model, sequence):
        self._write(model, sequence)

    def _write(self, model, entry):
        data = self._read()
        data[model] = entry
        write_file(self.path, (json.dumps(data, sort_keys=True, indent=1) + "\n").encode("utf-8"))


def _done(pending):
    """Whether the model file a pending record names holds the model it promises."""
    from .updates import file_digest
    try:
        return file_digest(pending["model"]) == bytes.fromhex(pending["result"])
    except (OSError, ValueError):  # no model file, or not one: the update did not get there
        return False


def _is_sequence(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pending(value):
    return (isinstance(value, dict) and set(value) == {"last", "applying", "model", "result"}
            and (value["last"] is None or _is_sequence(value["last"])) and _is_sequence(value["applying"])
            and isinstance(value["model"], str) and isinstance(value["result"], str))


def signature_path(bitstream_path):
    """Where the detached signature of a bitstream file is: ``PATH.sig``."""
    return os.fspath(bitstream_path) + SIG_SUFFIX


def _hex(raw):
    return binascii.hexlify(bytes(raw)).decode("ascii")


def _unhex(text):
    try:
        return binascii.unhexlify(text.strip())
    except (binascii.Error, ValueError):
        raise ValueError("%r is not hexadecimal" % text[:80])
