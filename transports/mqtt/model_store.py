"""The device's model in a directory (CPython): ``ModelStore`` keeps the current model and, for
rollbacks, the previous one beside it (A/B), each with its version in the file's metadata and its
update chain's decoder state; ``FullModelWriter``, ``UpdateWriter`` and ``RestoreWriter`` write a
publication into it (``transports.mqtt.device.Receiver`` drives them). Every change is atomic: see
``ModelStore``.
"""

import json
import os
import shutil
from collections import OrderedDict

from .. import envelope
from ..envelope import FULL, digest_hex
from .settings import log

class ModelStore:
    """The device's current model: ``DIR/model.safetensors``, its version in the file's metadata
    (``nnc_edge.seq``, ``nnc_edge.digest``, ``nnc_edge.kind``), always replaced atomically.

    Updates are applied with ``nnc_edge.updates.apply_update``, which checks the update record
    inside the bitstream against the model's own digest and keeps the decoder state of an update
    chain in a file beside the model. ``allow_anonymous`` (default True) also applies updates
    without a record (e.g. written by NNCodec): the envelope's parent version already ties them to
    this model. ``apply_update(base_tensors, update_bytes) -> new_tensors`` replaces the rule.

    A/B (``keep_previous``, default True): each apply keeps the model it replaces as
    ``DIR/previous.safetensors``, with its version metadata and its update-chain state files
    (``previous.safetensors.<digest>.nncstate``), for a health-check rollback
    (``restore_previous``) and for restore publications (``holding``). Both are hard links where the
    file system has them (no copy; else a copy). The switch: the current model is linked as
    ``.previous.safetensors.staged``, the new model renamed over ``model.safetensors``, then the
    staged file renamed over ``previous.safetensors``; a crash in between is finished (or undone) by
    the next ``ModelStore`` of the directory, which compares the staged file's version with the
    current one. Costs the disk space of a second model (none while both are the same file).

    Versions a health check failed (``rolled_back``: (seq, digest) -> reason) are kept in
    ``DIR/rolled-back.json`` (the last MAX_ROLLED_BACK) and never fetched again. The blocking work
    (decoding, writing, copying) runs on ``executor`` (a concurrent.futures executor; None: the event
    loop's default one): a gateway with many devices in one process passes one to all its stores.
    """

    FILENAME = "model.safetensors"
    PREVIOUS = "previous.safetensors"
    STAGED = ".previous.safetensors.staged"
    ROLLED_BACK = "rolled-back.json"
    CHECKING = "health-check.json"
    MAX_ROLLED_BACK = 64

    def __init__(self, directory, model, apply_update=None, threads=None, allow_anonymous=True, keep_previous=True,
                 executor=None, logger=None):
        self.directory = os.fspath(directory)
        self.model = model
        self.path = os.path.join(self.directory, self.FILENAME)
        self.previous_path = os.path.join(self.directory, self.PREVIOUS)
        self.apply_update = apply_update
        self.allow_anonymous = allow_anonymous
        self.threads = threads
        self.keep_previous = keep_previous
        self.executor = executor
        self.log = logger or log
        self._staged = None  # (version, state file names) of the model being kept as previous
        os.makedirs(self.directory, exist_ok=True)
        self.rolled_back = self._load_rolled_back()
        self.version = self._read_version(self.path, warn=True)
        self.previous_version = None
        if keep_previous:
            self._recover()

    # --- versions --------------------------------------------------------------------------------
    def _read_version(self, path, warn=False):
        from nnc_edge import modelio
        if not os.path.exists(path):
            return None
        try:
            meta = modelio.load_metadata(path)
            if meta.get("nnc_edge.model") == self.model:
                return int(meta["nnc_edge.seq"]), envelope.digest_from_hex(meta["nnc_edge.digest"])
        except (KeyError, ValueError, OSError) as exc:  # ModelFormatError and NNCError are ValueErrors
            if warn:
                self.log.warning("%s: no usable version in its metadata (%s); fetching the full model", path, exc)
        return None

    def describe(self, version=False):
        v = self.version if version is False else version
        if v is None:
            return "no model"
        return "version %d (%s)" % (v[0], digest_hex(v[1])[:12])

    def metadata(self, env, kind=None):
        return {"nnc_edge.model": self.model, "nnc_edge.seq": str(env.seq), "nnc_edge.digest": digest_hex(env.digest),
                "nnc_edge.kind": kind or env.kind}

    def kind(self):
        """How the current model came (its ``nnc_edge.kind``: full, update or restore), or None."""
        from nnc_edge import modelio
        try:
            return modelio.load_metadata(self.path).get("nnc_edge.kind")
        except (OSError, ValueError):
            return None

    def holding(self, seq, digest):
        """The file holding version (seq, digest), the current or the previous model, or None."""
        if (seq, digest) == self.version and os.path.exists(self.path):
            return self.path
        if self.keep_previous and (seq, digest) == self.previous_version and os.path.exists(self.previous_path):
            return self.previous_path
        return None

    def begin(self, env, source=None):
        """The writer of a publication; ``source``: the file (``holding``) a restore copies locally."""
        if source is not None:
            return RestoreWriter(self, env, source)
        return FullModelWriter(self, env) if env.kind == FULL else UpdateWriter(self, env)

    def commit(self, writer, take_version=True):
        """``writer.commit()`` with the A/B switch around it (blocking: run it on the executor). With
        ``take_version=False`` the caller sets ``version = writer.version`` itself (the receiver does,
        on the event loop's thread, so that its state and the version change in one step)."""
        self._stage()
        try:
            writer.commit()
        except BaseException:
            self._unstage()
            raise
        self._finish()
        if take_version:
            self.version = writer.version

    # --- A/B ---------------------------------------------------------------------------------------
    def _state_files(self, model_path):
        """{16 hex digits: path} of the update-chain state files beside ``model_path``."""
        from nnc_edge.updates import STATE_SUFFIX
        head = os.path.basename(model_path) + "."
        out = {}
        for name in os.listdir(self.directory):
            if name.startswith(head) and name.endswith(STATE_SUFFIX):
                key = name[len(head):-len(STATE_SUFFIX)]
                if len(key) == 16 and all(c in "0123456789abcdef" for c in key):
                    out[key] = os.path.join(self.directory, name)
        return out

    def _state_name(self, model_path, key):
        from nnc_edge.updates import STATE_SUFFIX
        return "%s.%s%s" % (model_path, key, STATE_SUFFIX)

    def _put_states(self, source, target, keys=None):
        """Put the state files of model file ``source`` (those of ``keys``: all by default) beside
        ``target`` under its names (same digests). Returns their keys."""
        states = self._state_files(source)
        keys = set(states) if keys is None else set(keys) & set(states)
        for key in keys:
            _atomicfile().place(states[key], self._state_name(target, key))
        return keys

    def _prune_states(self, target, keys):
        """Remove the state files of model file ``target`` but those of ``keys``."""
        for key, path in self._state_files(target).items():
            if key not in keys:
                _atomicfile().remove(path)

    def _stage(self):
        self._staged = None
        if not self.keep_previous or self.version is None or not os.path.exists(self.path):
            return
        staged = os.path.join(self.directory, self.STAGED)
        _atomicfile().remove(staged)
        # The state files first, under the previous model's names (by digest: extra ones do no harm).
        keys = self._put_states(self.path, self.previous_path)
        _atomicfile().place(self.path, staged)
        self._staged = (self.version, keys)

    def _unstage(self):
        if self._staged is not None:
            _atomicfile().remove(os.path.join(self.directory, self.STAGED))
            self._staged = None

    def _finish(self):
        staged, self._staged = self._staged, None
        if staged is None:
            return
        os.replace(os.path.join(self.directory, self.STAGED), self.previous_path)
        _atomicfile().sync_directory(self.directory)
        self.previous_version = staged[0]
        self._prune_states(self.previous_path, staged[1])

    def _recover(self):
        """Finish what a crash interrupted: a staged previous model, and a rollback."""
        staged = os.path.join(self.directory, self.STAGED)
        if os.path.exists(staged):
            version = self._read_version(staged)
            if version is not None and version != self.version and self.version is not None:
                os.replace(staged, self.previous_path)
                _atomicfile().sync_directory(self.directory)
                self.log.info("%s: the previous model's switch was interrupted; finished it (%s)",
                              self.previous_path, self.describe(version))
            else:
                _atomicfile().remove(staged)
        _atomicfile().clear_stale(self.previous_path)
        self.previous_version = self._read_version(self.previous_path)
        if self.version is not None and self.version in self.rolled_back:
            # Killed between recording the failed health check and putting the previous model back.
            self.log.warning("%s: %s failed its health check (%s); putting the previous model back",
                             self.path, self.describe(), self.rolled_back[self.version])
            self.restore_previous()

    def restore_previous(self):
        """Put the previous model (and its chain state) back as the current one, atomically: the
        previous file stays as it is. Without one, the current model is removed (the device had
        none before). Returns the version now current."""
        if self.previous_version is None or not os.path.exists(self.previous_path):
            for path in [self.path] + list(self._state_files(self.path).values()):
                _atomicfile().remove(path)
            _atomicfile().sync_directory(self.directory)
            self.version = None
            return None
        keys = self._put_states(self.previous_path, self.path)
        _atomicfile().place(self.previous_path, self.path)
        self.version = self.previous_version
        self._prune_states(self.path, keys)
        return self.version

    # --- versions a health check failed ------------------------------------------------------------
    def _load_rolled_back(self):
        out = OrderedDict()
        path = os.path.join(self.directory, self.ROLLED_BACK)
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(1 << 20).decode("utf-8"))
            for item in data["versions"]:
                out[(int(item["seq"]), envelope.digest_from_hex(item["digest"]))] = str(item.get("reason"))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.log.warning("%s: unreadable (%s); the versions it named may be fetched again", path, exc)
        return out

    def begin_check(self, seq, digest):
        """Record (fsynced) that version (seq, digest) is about to be committed and checked, before it
        is: a restart that finds it current has not seen its check end (``pending_check``)."""
        pending = self.pending_check()
        # Counted when a restart checks the current model again; a new version starts at 1.
        again = pending is not None and pending[:2] == (seq, digest) == self.version
        attempts = pending[2] + 1 if again else 1
        _atomicfile().write_file(os.path.join(self.directory, self.CHECKING), json.dumps(
            {"v": 1, "seq": seq, "digest": digest_hex(digest), "attempts": attempts}).encode("utf-8"))

    def end_check(self):
        _atomicfile().remove(os.path.join(self.directory, self.CHECKING))

    def pending_check(self):
        """(seq, digest, attempts) of the health check a restart interrupted, or None."""
        try:
            with open(os.path.join(self.directory, self.CHECKING), "rb") as f:
                data = json.loads(f.read(4096).decode("utf-8"))
            return int(data["seq"]), envelope.digest_from_hex(data["digest"]), int(data["attempts"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def remember_rolled_back(self, seq, digest, reason):
        """Record (fsynced) that version (seq, digest) failed its health check: never fetched again."""
        self.rolled_back[(seq, digest)] = reason
        while len(self.rolled_back) > self.MAX_ROLLED_BACK:
            self.rolled_back.popitem(last=False)
        versions = [{"seq": s, "digest": digest_hex(d), "reason": r} for (s, d), r in self.rolled_back.items()]
        data = {"v": 1, "model": self.model, "versions": versions}
        _atomicfile().write_file(os.path.join(self.directory, self.ROLLED_BACK),
                              json.dumps(data, indent=1).encode("utf-8"))


def _atomicfile():
    from nnc_edge import atomicfile  # on first use: `import transports.mqtt` stays light
    return atomicfile


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
        self.version = (self.env.seq, self.env.digest)  # the store takes it once the A/B switch is done

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
        self.version = (self.env.seq, self.env.digest)  # the store takes it once the A/B switch is done

    def abort(self):
        self.data = bytearray()


class RestoreWriter:
    """A restore publication (a full model naming the version it restores) of a version the device
    holds, as its current or its previous model: that file copied with the new version's metadata,
    its tensors byte for byte. Nothing is downloaded. The update-chain state is not carried: a device
    that downloads the restore has none, and the host starts a new chain at it (a rollback, a
    compaction: ``nnc-edge publish --compact-at``), which both must decode alike; an old chain's HDSP
    history would make the new chain's later updates decode differently."""

    def __init__(self, store, env, source):
        self.store = store
        self.env = env
        self.source = source
        self.tensors = 0

    def feed(self, body):
        pass  # nothing of the publication is used but its first envelope

    def commit(self):
        from nnc_edge import modelio
        store = self.store
        with open(self.source, "rb") as src:
            entries, _, start = modelio.read_safetensors_layout(src, self.source)
            header = modelio.safetensors_header([(name, dtype, shape) for _, _, name, dtype, shape in entries],
                                                store.metadata(self.env, "restore"))
            # Before the model is replaced: a crash in between leaves the old version without its chain
            # state, which the restore (taken again after a restart) does not need.
            store._prune_states(store.path, ())
            with _atomicfile().replacing(store.path) as out:
                out.write(header)
                src.seek(start)
                shutil.copyfileobj(src, out, 1 << 20)
        self.tensors = len(entries)
        self.version = (self.env.seq, self.env.digest)  # the store takes it once the A/B switch is done

    def abort(self):
        pass
