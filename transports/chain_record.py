"""The host's own record of what it published (CPython, host side).

mosquitto saves retained messages only at autosave time, so a crash can lose the retained chain,
and a publisher that numbered versions from the broker's status alone would start again at
version 1: unsigned devices would go back, signed ones would refuse every later version as a
replay. The record keeps, per topic prefix and model, the chain the host published (the last full
model and every update after it): each version's number, bitstream digest, message count and,
when known, the digest of the model it makes (``nnc_edge.updates.model_digest``), and a copy of
each bitstream. ``transports.mqtt.Publisher(record=...)`` never numbers a version at or below it,
checks that an update continues it, and publishes the chain again when the broker has lost it.

Files in the state directory, for prefix P and model M (each escaped by ``_escape``)::

    P.M.json            the record, replaced atomically (a new file, fsync, rename); besides the
                        chain it keeps the staged-rollout wave last written to the status
                        (``rollout``, see transports.report), so a status published again
                        from the record keeps it
    P.M.<digest>.nnc    the bitstream of each version on the chain
    P.M.lock            locked while a publisher works on the model
"""

import contextlib
import json
import os

from .envelope import FULL, NO_DIGEST, UPDATE, Status, digest_from_hex, digest_hex, excerpt

try:
    import fcntl
except ImportError:  # not POSIX: no lock, one publisher at a time is up to the operator
    fcntl = None

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_VERSION = 1


class RecordError(Exception):
    """The record cannot be used (damaged, or locked by another publisher)."""


def default_state_dir():
    """$XDG_STATE_HOME/nnc-edge, else ~/.local/state/nnc-edge."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "nnc-edge")


def _escape(text):
    # File names from any topic prefix and model name: "." separates the parts and "." and ".."
    # cannot occur, since everything but letters, digits, "_" and "-" is written %XX.
    return "".join(c if c in _SAFE else "".join("%%%02X" % b for b in c.encode("utf-8")) for c in text)


def _write_atomically(path, data):
    """Replace ``path`` with ``data`` (nnc_edge.atomicfile.write_file: a new file beside it, created with
    O_EXCL, fsynced, renamed over it): after a crash the file is the old or the new one."""
    from nnc_edge.atomicfile import write_file
    write_file(path, data)


class Version:
    """One published version: ``seq``, ``kind``, ``digest`` (of the bitstream; None when only
    its number is known), ``model`` (digest of the model it makes, None until known), ``count``
    (messages) and, for a full model that restores an older version (``nnc-edge rollback``),
    ``restores`` = (seq, bitstream digest) of that version (the envelope's parent), else None."""

    def __init__(self, seq, kind, digest, model, count, restores=None):
        self.seq = seq
        self.kind = kind
        self.digest = digest
        self.model = model
        self.count = count
        self.restores = restores

    @property
    def compacts(self):
        """A full model that restores the version right before it: the chain compacted into a full model
        of the same model (``publish --compact-at``); a rollback restores an older one."""
        return self.restores is not None and self.restores[0] == self.seq - 1

    @property
    def parent(self):
        """(parent_seq, parent_digest) of the envelope of a full model: what it restores, or none."""
        return self.restores if self.restores is not None else (0, NO_DIGEST)

    def to_json(self):
        obj = {"seq": self.seq, "kind": self.kind, "digest": _hex(self.digest), "model": _hex(self.model),
               "count": self.count}
        if self.restores is not None:
            obj["restores"] = {"seq": self.restores[0], "digest": _hex(self.restores[1])}
        return obj

    @classmethod
    def from_json(cls, obj):
        if not isinstance(obj, dict) or obj.get("kind") not in (FULL, UPDATE):
            raise ValueError("a version must be an object with kind %r or %r" % (FULL, UPDATE))
        seq, count = obj.get("seq"), obj.get("count")
        if not isinstance(seq, int) or not 0 < seq <= 0xFFFFFFFF:
            raise ValueError("version seq %s is not in 1 .. 2**32 - 1" % excerpt(seq))
        if not isinstance(count, int) or count < 1:
            raise ValueError("version %d: count %s is not a positive integer" % (seq, excerpt(count)))
        restores = obj.get("restores")
        if restores is not None:
            if (obj["kind"] != FULL or not isinstance(restores, dict) or not isinstance(restores.get("seq"), int)
                    or not 0 < restores["seq"] < seq or not isinstance(restores.get("digest"), str)):
                raise ValueError("version %d: restores must name an older version" % seq)
            restores = (restores["seq"], _unhex(restores.get("digest")))
        return cls(seq, obj["kind"], _unhex(obj.get("digest")), _unhex(obj.get("model")), count, restores)


def _hex(digest):
    return None if digest is None else digest_hex(digest)


def _unhex(text):
    return None if text is None else digest_from_hex(text)


class ChainRecord:
    """The record of model ``model`` under topic prefix ``prefix`` in ``directory`` (see the module
    docstring). ``versions`` is the chain, the full model first; ``seq`` the last version."""

    def __init__(self, directory, prefix, model):
        self.directory = os.path.abspath(os.fspath(directory))
        self.prefix = prefix
        self.model = model
        self.base = os.path.join(self.directory, "%s.%s" % (_escape(prefix), _escape(model)))
        self.path = self.base + ".json"
        self.versions = []
        self.rollout = None  # the staged-rollout wave of the last status written (a dict), or None
        self._lock_file = None

    def __repr__(self):
        return self.path

    @property
    def seq(self):
        return self.versions[-1].seq if self.versions else 0

    @property
    def exists(self):
        return os.path.exists(self.path)

    @property
    def top(self):
        return self.versions[-1] if self.versions else None

    def find(self, seq):
        for v in self.versions:
            if v.seq == seq:
                return v
        return None

    # --- the file ------------------------------------------------------------------------------
    def load(self):
        """Read the record (none yet: an empty chain). RecordError when it is damaged."""
        try:
            with open(self.path, "rb") as f:
                obj = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            self.versions = []
            self.rollout = None
            return self
        except (OSError, ValueError) as exc:
            raise self._damaged(exc)
        try:
            if not isinstance(obj, dict) or obj.get("v") != _VERSION:
                raise ValueError("not a version %d record" % _VERSION)
            if obj.get("prefix") != self.prefix or obj.get("model") != self.model:
                raise ValueError("it is the record of %s/%s" % (excerpt(obj.get("prefix")), excerpt(obj.get("model"))))
            versions = [Version.from_json(v) for v in obj.get("versions") or []]
            _check_chain(versions)
            rollout = obj.get("rollout")
            if rollout is not None and not isinstance(rollout, dict):
                raise ValueError("rollout must be an object or null")
        except (ValueError, TypeError, AttributeError) as exc:
            raise self._damaged(exc)
        self.versions = versions
        self.rollout = rollout
        return self

    def _damaged(self, exc):
        return RecordError("the publisher's record %s cannot be read (%s): move it away to start a new record, "
                           "whose numbering continues from the broker's status" % (self.path, exc))

    def save(self):
        os.makedirs(self.directory, exist_ok=True)
        obj = {"v": _VERSION, "prefix": self.prefix, "model": self.model, "seq": self.seq,
               "versions": [v.to_json() for v in self.versions]}
        if self.rollout is not None:
            obj["rollout"] = self.rollout
        _write_atomically(self.path, json.dumps(obj, indent=1).encode("utf-8"))

    @contextlib.contextmanager
    def locked(self):
        """Hold the model's lock file: RecordError when another publisher holds it."""
        os.makedirs(self.directory, exist_ok=True)
        if fcntl is None:
            yield self
            return
        fd = os.open(self.base + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RecordError("another publisher of model %s is running (it holds %s.lock)"
                                  % (self.model, self.base))
            yield self
        finally:
            os.close(fd)  # releases the lock

    # --- bitstreams ----------------------------------------------------------------------------
    def _bitstream_path(self, digest):
        return "%s.%s.nnc" % (self.base, digest_hex(digest))

    def keep(self, digest, bitstream):
        """Store a bitstream before it is published: if the broker loses the chain, it is
        published again from here."""
        os.makedirs(self.directory, exist_ok=True)
        path = self._bitstream_path(digest)
        if not os.path.exists(path):
            _write_atomically(path, bytes(bitstream))

    def has_bitstream(self, digest):
        return digest is not None and os.path.exists(self._bitstream_path(digest))

    def bitstream_bytes(self, version):
        """The size of the kept bitstream of ``version``, None when there is no copy."""
        try:
            return os.path.getsize(self._bitstream_path(version.digest)) if version.digest is not None else None
        except OSError:
            return None

    def bitstream(self, version):
        with open(self._bitstream_path(version.digest), "rb") as f:
            return f.read()

    def _forget_bitstreams(self, keep):
        prefix = os.path.basename(self.base) + "."
        wanted = {os.path.basename(self._bitstream_path(v.digest)) for v in keep if v.digest is not None}
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and name.endswith(".nnc") and name not in wanted:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.directory, name))

    # --- changes -------------------------------------------------------------------------------
    def add(self, version):
        """Record a version published: a full model starts a new chain, an update continues it."""
        if version.seq <= self.seq:
            raise ValueError("version %d is not newer than the record's %d" % (version.seq, self.seq))
        self.versions = [version] if version.kind == FULL else self.versions + [version]
        self.save()
        self._forget_bitstreams(self.versions)

    def adopt(self, status):
        """Take the broker's chain, newer than the record, as the record (another publisher was here,
        or this one stopped before recording its last publication). Of the versions the record does
        not have, the broker tells the numbers, message counts and the last one's digest."""
        known = {}
        if self.versions and self.versions[0].seq == status.full_seq:  # the same chain, continued
            known = {v.seq: v for v in self.versions}
        versions = []
        for seq, count in status.chain():
            v = known.get(seq)
            if v is None:
                last = seq == status.seq
                v = Version(seq, FULL if seq == status.full_seq else UPDATE, status.digest if last else None, None,
                            count)
            v.count = count
            versions.append(v)
        self.versions = versions
        self.rollout = status.rollout
        self.save()

    def status(self):
        """The broker status this record describes (message counts as last published, and its wave)."""
        top = self.top
        if top is None:
            return Status(self.model)
        return Status(self.model, top.seq, top.digest, self.versions[0].seq, [v.count for v in self.versions],
                      rollout=self.rollout)

    def describe_range(self):
        """The versions the record holds, e.g. "5..8" ("nothing" when empty)."""
        if not self.versions:
            return "nothing"
        first, last = self.versions[0].seq, self.seq
        return "%d" % first if first == last else "%d..%d" % (first, last)

    def missing_bitstreams(self):
        """Versions of the chain that could not be published again."""
        return [v.seq for v in self.versions if not self.has_bitstream(v.digest)]


def _check_chain(versions):
    for i, v in enumerate(versions):
        if (v.kind == FULL) != (i == 0):
            raise ValueError("the chain must be one full model, then updates")
        if i and v.seq != versions[i - 1].seq + 1:
            raise ValueError("version %d does not follow version %d" % (v.seq, versions[i - 1].seq))
