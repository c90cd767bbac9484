"""The device's tensor store: an NNC bitstream streamed into files, committed atomically.

``store_stream(source, directory)`` reads a bitstream from any object with ``readinto`` or
``read`` (a file, a socket) and ``StoreSession(directory)`` takes it pushed in chunks
(``feed(chunk)``, then ``close()``; e.g. MQTT messages). Either way the result is, in
``directory``:

* one raw little-endian file per tensor (float32 or int32, row-major), ``t<G>_<K>.bin``;
* the update chain's decoder state per tensor, when the stream uses it (parent signalling): the
  last integer levels (int32, the TCA base, 6.6) ``l<G>_<K>.bin`` and the significance history
  (one byte per element, HDSP, 6.7) ``h<G>_<K>.bin``;
* the index ``index<G>.json``: ``{"format", "version", "generation", "digest", "sequence",
  "root", "tensors": [{"name", "dtype" ("<f4" or "<i4"), "shape", "file"}], "chain": [{"name",
  "count", "levels", "history"}], "meta"}``. ``read_index(directory)`` returns it. ``meta`` is
  whatever the caller passed to StoreSession (e.g. the MQTT version the generation holds), committed
  with the files it describes.

G is the generation. A run writes generation G + 1 beside G: its files, then ``index<G+1>.tmp``,
which it renames to ``index<G+1>.json``. That rename is the commit point, and it never replaces a
file, which FAT does not allow. The highest ``index<G>.json`` is the store; files it does not
name are leftovers, removed after the commit and at the start of every run, so a run that failed
(NNCError, removed at once) or was killed (removed by the next run) never changes what the index
names. Tensors an update does not touch keep their file.

A stream carrying an nnc-edge update record (nnc_device.record) is an update: its tensors are
differences, and the new tensor is ``float32(old + diff)`` where ``diff != 0``, else ``old`` bit for
bit (nnc_edge.updates). Before anything is decoded, the record's parent digest is checked against
the digest of the stored files; after decoding, the new model's digest against the record's
result. ``update=True`` applies a stream without a record unchecked.

Memory: one slice of at most ``slice_elements`` elements (decoder_core.StreamDecoder's slice
mode, whose contract allows whole block rows and whole tensors for some layouts, see
decoder_core.incremental), a 1 KiB buffer for the old values of an update, the open files and the
decoder's fixed state; never a whole tensor.
"""

import json
import os
import sys

from decoder_core.compat import zeros
from decoder_core.errors import NNCError
from decoder_core.stream import StreamDecoder

from .record import LeadingUnits, model_digest

try:
    import uctypes as _uctypes  # MicroPython: the float32 bits of a slice without float objects
except ImportError:
    _uctypes = None

FORMAT = "nnc-device-store"
VERSION = 1
DEFAULT_SLICE_ELEMENTS = 2048
DEFAULT_CHUNK_SIZE = 1024
_INDEX = "index"
_DATA_KINDS = "tlh"  # tensor values, TCA levels, HDSP history
_DTYPES = {"f": "<f4", "i": "<i4"}
_PIECE = 256  # elements of the old tensor read at a time while an update is added


class StoreError(NNCError):
    """The store refused a stream, or its files are damaged; nothing was changed."""


class WrongBaseError(StoreError):
    """The update applies to another model than the stored one."""


class AlreadyAppliedError(WrongBaseError):
    """The stored model is the one the update produces."""


class MissingStateError(StoreError):
    """The update continues decoder state (TCA, HDSP) that the store does not have."""


class CorruptUpdateError(StoreError):
    """The update decoded, but not to the model its record promises, or not to fit the stored model."""


# --- the directory ---------------------------------------------------------------------------------
def _kind(filename):
    """(kind, generation) of a file the store writes ("index", "tmp" or one of _DATA_KINDS), else None."""
    if filename.startswith(_INDEX):
        number, _, suffix = filename[len(_INDEX):].partition(".")
        kind = {"json": "index", "tmp": "tmp"}.get(suffix)
    elif filename[:1] in _DATA_KINDS and filename.endswith(".bin"):
        number, sep, k = filename[1:-4].partition("_")
        kind = filename[0] if sep and k.isdigit() else None
    else:
        return None
    if kind is None or not number.isdigit():
        return None
    return kind, int(number)


def _listdir(directory):
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _current_generation(names):
    current = None
    for name in names:
        kind = _kind(name)
        if kind is not None and kind[0] == "index" and (current is None or kind[1] > current):
            current = kind[1]
    return current


def _join(directory, name):
    return directory + "/" + name


def read_index(directory):
    """The store's committed index in ``directory`` (see the module docstring), or None when it
    holds none. File names in it are relative to ``directory``."""
    directory = _normalize(directory)
    generation = _current_generation(_listdir(directory))
    if generation is None:
        return None
    path = _join(directory, "%s%d.json" % (_INDEX, generation))
    try:
        with open(path) as f:
            index = json.load(f)
    except ValueError:
        raise StoreError("%s is not a readable store index" % path)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise StoreError("%s is not a version %d %s index" % (path, VERSION, FORMAT))
    return index


def _normalize(directory):
    directory = str(directory)
    return directory.rstrip("/") or "/"


def _referenced(index):
    names = set()
    if index is not None:
        names.add("%s%d.json" % (_INDEX, index["generation"]))
        for t in index["tensors"]:
            names.add(t["file"])
        for c in index["chain"]:
            names.add(c["levels"])
            names.add(c["history"])
    return names


def _clear(directory, index):
    """Remove the store's files that ``index`` (the committed one) does not name."""
    keep = _referenced(index)
    for name in _listdir(directory):
        if name not in keep and _kind(name) is not None:
            try:
                os.remove(_join(directory, name))
            except OSError:
                pass  # gone already, or held open elsewhere: the next run tries again


def _sync(f):
    f.flush()
    if hasattr(os, "fsync"):  # CPython; MicroPython's close() writes the file through
        os.fsync(f.fileno())


def _sync_directory(directory):
    """Make the commit's rename durable. It has happened: a failure here must not undo the run."""
    try:
        if hasattr(os, "sync"):  # MicroPython boards (os.sync flushes every mounted filesystem)
            os.sync()
        elif hasattr(os, "O_DIRECTORY"):  # POSIX CPython
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError:
        pass


def _commit_index(directory, index):
    """Write ``index`` as index<G>.tmp, sync it and rename it to index<G>.json: the commit point, a
    new name, so no filesystem has to replace a file. The temporary file goes if that fails."""
    name = _join(directory, "%s%d" % (_INDEX, index["generation"]))
    try:
        f = open(name + ".tmp", "w")
        try:
            json.dump(index, f)
            _sync(f)
        finally:
            f.close()
        os.rename(name + ".tmp", name + ".json")
    except BaseException:
        try:
            os.remove(name + ".tmp")
        except OSError:
            pass
        raise
    _sync_directory(directory)


def relabel(directory, meta):
    """Commit the stored model again as the next generation with ``meta`` (a version the device
    takes without downloading it, e.g. one that restores the model it has): the same tensor files
    and no update-chain state (a restored version starts a new chain, as for a device that downloads
    it). The old index and chain-state files are removed after; a crash leaves them to the next
    session, which clears them first. Returns the new index; StoreError when there is no model."""
    directory = _normalize(directory)
    index = read_index(directory)
    if index is None:
        raise StoreError("%s holds no model" % directory)
    index["generation"] += 1
    index["meta"] = meta
    index["chain"] = []
    index["sequence"], index["root"] = 0, index["digest"]
    _commit_index(directory, index)
    _clear(directory, index)
    return index


def _read(f, buf, size, what, name):
    """Fill ``buf`` (``size`` bytes: an array, a view of one or a bytearray) from ``f``; the error
    names ``what % name`` (formatted only then: this runs for every slice)."""
    got = f.readinto(buf)
    if got != size:
        raise StoreError("%s ends early: %d bytes read, %d expected" % (what % name, got or 0, size))


def _dtype(values):
    """"<f4" or "<i4" for a slice (MicroPython's arrays have no typecode: the item type tells)."""
    code = getattr(values, "typecode", None)
    if code is None and len(values):
        code = "f" if isinstance(values[0], float) else "i"
    return _DTYPES.get(code)


def _count(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# --- the chain state in files ----------------------------------------------------------------------
class _FileChain:
    """decoder_core's update-chain state (StreamDecoder(chain=...), see
    decoder_core.incremental.MemoryChainState) in the store's files: the state a tensor had is read
    from the committed generation slice by slice, its new state written to the new one."""

    def __init__(self, session, entries):
        self.session = session
        self.entries = {e["name"]: e for e in entries}
        self.new = {}
        # One TCA base and one history buffer for every slice of the run (each slice's are used up
        # before the next is read): not an array and a bytearray per slice, which on a port that
        # collects only between calls is garbage of some KB per step of a sparse update.
        self._kept = {}

    def open(self, name, count):
        return _ChainTensor(self, name, count)

    def buffer(self, kind, n):
        """The kept array("i") (``kind`` "i") or bytearray ("B") of ``n`` items, or a view of one."""
        kept = self._kept.get(kind)
        if kept is None or len(kept) < n:
            kept = None
            self._kept[kind] = kept = zeros("i", n) if kind == "i" else bytearray(n)
        return kept if len(kept) == n else memoryview(kept)[:n]


class _ChainTensor:
    def __init__(self, chain, name, count):
        s = chain.session
        # A name decoded twice in one stream continues from its first decoding.
        old = chain.new.get(name) or chain.entries.get(name)
        self.chain = chain
        self.name = name
        self.base_count = None if old is None else old["count"]
        self.levels = None if old is None else s._open(old["levels"], "rb")
        self.history = None if old is None or old["count"] != count else s._open(old["history"], "rb")
        self.has_history = self.history is not None
        self.entry = {"name": name, "count": count}
        self.out = None
        self.end = 0

    def read_base(self, lo, hi):
        levels = self.chain.buffer("i", hi - lo)
        self.levels.seek(4 * lo)
        _read(self.levels, levels, 4 * (hi - lo), "the TCA base of %r", self.name)
        return levels

    def read_history(self, lo, hi):
        hist = self.chain.buffer("B", hi - lo)
        if self.history is not None:
            self.history.seek(lo)
            _read(self.history, hist, hi - lo, "the HDSP history of %r", self.name)
        else:
            for i in range(hi - lo):
                hist[i] = 0
        return hist

    def write(self, lo, levels, history):
        if self.out is None:
            self._create()
        if lo != self.end:
            raise StoreError("chain state of %r written at element %d, %d expected" % (self.name, lo, self.end))
        self.out[0].write(levels)
        self.out[1].write(history)
        self.end = lo + len(levels)

    def _create(self):
        s = self.chain.session
        k = s._number()
        self.entry["levels"], self.entry["history"] = s._name("l", k), s._name("h", k)
        self.out = (s._create(self.entry["levels"]), s._create(self.entry["history"]))

    def done(self):
        if self.out is None:  # an empty tensor
            self._create()
        s = self.chain.session
        for f in (self.levels, self.history):
            if f is not None:
                s._close(f)
        for f in self.out:
            s._close(f, True)
        self.levels = self.history = self.out = None
        self.chain.new[self.name] = self.entry


# --- a run ---------------------------------------------------------------------------------------
class StoreSession:
    """One bitstream pushed into the store in ``directory``: ``feed(chunk)`` as the bytes arrive,
    then ``close()``, which commits and returns the new index; on any error the session removes
    what it wrote and re-raises (``abort()`` does the same for a transfer given up). See the module
    docstring for ``update`` and ``meta``. ``slice_elements``, ``window`` and ``limits`` go to StreamDecoder.
    Starting a session clears what an interrupted one left behind."""

    def __init__(self, directory, update=None, slice_elements=DEFAULT_SLICE_ELEMENTS, window=None, limits=None,
                 meta=None):
        if sys.byteorder != "little":
            raise StoreError("the store writes its files in the host's byte order, which must be little-endian")
        self.directory = _normalize(directory)
        try:
            os.mkdir(self.directory)
        except OSError:
            pass  # it exists (or cannot be made: the first file created says why)
        self.base = read_index(self.directory)
        _clear(self.directory, self.base)
        self.generation = 1 if self.base is None else self.base["generation"] + 1
        self.update = update
        self.slice_elements = slice_elements
        self.window = window
        self.limits = limits
        self.meta = meta
        self.record = None
        # The tensors this run writes: name -> (dtype, shape, K: the file t<G>_<K>.bin), and their
        # names in stream order. The index's dicts and file names are made only to commit: a model
        # of many tensors keeps less meanwhile.
        self._written = {}
        self._order = []
        self._base_tensors = {}    # an update: name -> the base's index entry
        self._created = []         # files this run created (removed unless it commits); K: t<G>_<K>.bin
        self._files = []           # files open now
        self._leading = LeadingUnits()
        self._decoder = None
        self._chain = None
        self._finished = False
        self._next = 0
        self._tensor = None        # the tensor being written: [name, dtype, count, written, out file, old file]
        self._slot = [None] * 6    # the list _tensor is
        self._piece = None

    # -- files of this run --
    def _name(self, kind, k):
        return "%s%d_%d.bin" % (kind, self.generation, k)

    def _number(self):
        self._next += 1
        return self._next - 1

    def _create(self, name, mode="wb", number=None):
        """Create the file ``name``, or with ``number`` K the tensor file t<G>_<K>.bin."""
        if number is None:
            self._created.append(name)
            return self._open(name, mode)
        self._created.append(number)
        # The path in one string: a tensor's file makes less garbage.
        f = open("%s/t%d_%d.bin" % (self.directory, self.generation, number), mode)
        self._files.append(f)
        return f

    def _open(self, name, mode):
        f = open(_join(self.directory, name), mode)
        self._files.append(f)
        return f

    def _close(self, f, written=False):
        if written:
            _sync(f)
        f.close()
        self._files.remove(f)

    # -- input --
    def feed(self, chunk):
        """The next bytes of the stream (any size)."""
        if self._finished:
            raise ValueError("feed() after close() or abort()")
        try:
            if self._decoder is None:
                if self._leading.push(chunk):
                    self._begin()
            else:
                self._decode(chunk)
            if self._decoder is not None and self._decoder.at_boundary:
                # The stream may end here: the decoder's buffers are not kept through a commit.
                self._decoder.release()
        except BaseException:
            self.abort()
            raise

    def close(self, keep_old=False):
        """End of the stream: check it, commit the new generation and return its index. The old
        generation's files are removed after, or with ``keep_old`` by remove_old() (for a caller
        that works in small steps on a port that collects garbage between them only: the removal
        makes garbage per file, a commit of its own)."""
        if self._finished:
            raise ValueError("close() after close() or abort()")
        try:
            if self._decoder is None:
                self._leading.finish()
                self._begin()
            self._decoder.close()
            self._decoder = None  # its buffers are free while the digest is computed
            self._end_tensor()
            index = self._index()
            self._commit(index)
        except BaseException:
            self.abort()
            raise
        self._finished = True
        self.base = index
        if not keep_old:
            _clear(self.directory, index)
        return index

    def remove_old(self):
        """After close(keep_old=True): remove the files the committed index does not name (a run
        that never gets here leaves them to the next session, which clears them first)."""
        _clear(self.directory, self.base)

    def abort(self):
        """Give the stream up: close and remove every file this session wrote."""
        self._finished = True
        for f in self._files:
            try:
                f.close()
            except OSError:
                pass
        self._files = []
        for name in self._created:
            if not isinstance(name, str):
                name = self._name("t", name)
            try:
                os.remove(_join(self.directory, name))
            except OSError:
                pass
        self._created = []

    # -- decoding --
    def _begin(self):
        """The leading units are in: decide what the stream is, check its record, start decoding."""
        record = self._leading.record
        update = self.update
        if update is None:
            update = record is not None
        elif not update and record is not None:
            raise StoreError("the stream carries an update record: it is an update, not a model", None,
                             "update record")
        topology = None
        if update:
            if self.base is None:
                raise StoreError("an update needs a stored model: %s holds none" % self.directory)
            if record is not None:
                self._check(record, self._digest(self.base["tensors"]))
            # The update's NDUs name tensors by index into the base's names in UTF-8 byte order.
            topology = [(t["name"], tuple(t["shape"])) for t in self.base["tensors"]]
            topology.sort(key=lambda t: t[0].encode("utf-8"))
            for t in self.base["tensors"]:
                self._base_tensors[t["name"]] = t
            self._piece = zeros("f", min(_PIECE, self.slice_elements))
        self.update = update
        self.record = record
        self._chain = _FileChain(self, self.base["chain"] if self.base is not None else [])
        self._decoder = StreamDecoder(topology, slice_elements=self.slice_elements, chain=self._chain,
                                      window=self.window, limits=self.limits)
        data = self._leading.data
        self._leading = None
        self._decode(data)

    def _decode(self, chunk):
        # reuse: every slice is decoded into the same array; each is written away before the next.
        for name, shape, start, values in self._decoder.iter_feed(chunk, True):
            if start == 0:
                self._begin_tensor(name, shape, _dtype(values))
            self._put(name, start, values)
            values = None

    def _begin_tensor(self, name, shape, dtype):
        self._end_tensor()
        if name in self._written:
            raise StoreError("tensor %r occurs twice in the stream" % name, None, "tensor")
        old = None
        if self.update:
            base = self._base_tensors.get(name)
            if base is None:
                raise CorruptUpdateError("the update changes tensor %r, which the stored model does not have" % name)
            if list(shape) != base["shape"]:
                raise CorruptUpdateError("the update's %r has shape %s, the stored model's %s"
                                         % (name, list(shape), base["shape"]))
            if base["dtype"] != "<f4" or dtype not in (None, "<f4"):
                raise CorruptUpdateError("tensor %r: only float32 tensors can be updated (stored %s, update %s)"
                                         % (name, base["dtype"], dtype))
            old = self._open(base["file"], "rb")
        dtype = dtype or "<f4"
        k = self._number()
        self._written[name] = (dtype, shape, k)
        self._order.append(name)
        t = self._slot  # one list for the life of the session
        t[0] = name
        t[1] = dtype
        t[2] = _count(shape)
        t[3] = 0
        t[4] = self._create(None, "wb", k)
        t[5] = old
        self._tensor = t

    def _put(self, name, start, values):
        t = self._tensor
        current, dtype, count, written, out, old = t
        if name != current or start != written or written + len(values) > count:
            raise StoreError("slice of %r at elements %d..%d does not continue %r at element %d of %d"
                             % (name, start, start + len(values), current, written, count))
        if _dtype(values) not in (None, dtype):
            raise StoreError("tensor %r changes element type inside the stream" % name)
        if old is not None:
            self._add(values, old, out, name)
        else:
            out.write(values)
        t[3] = written + len(values)

    def _add(self, diff, old, out, name):
        """The update rule on one slice: the stored values are read a piece at a time and change only
        where the difference is nonzero, so the others are copied bit for bit."""
        buf = self._piece
        n = len(diff)
        # On MicroPython every float read from an array is a 16-byte heap object: zero differences
        # (most of an update) are found from the float32 bits instead (16-bit halves: small ints), so
        # only the changed elements make floats.
        bits = None
        if _uctypes is not None and n:
            bits = _uctypes.struct(_uctypes.addressof(diff), {"v": (_uctypes.ARRAY | 0, _uctypes.UINT16 | 2 * n)},
                                   _uctypes.LITTLE_ENDIAN).v
        for j in range(0, n, len(buf)):
            k = n - j if n - j < len(buf) else len(buf)
            piece = buf if k == len(buf) else memoryview(buf)[:k]
            _read(old, piece, 4 * k, "the stored tensor %r", name)
            if bits is not None:
                for i in range(k):
                    h = 2 * (j + i)
                    if bits[h] or bits[h + 1] & 0x7FFF:  # not +0.0 or -0.0
                        buf[i] = buf[i] + diff[j + i]
            else:
                for i in range(k):
                    d = diff[j + i]
                    if d != 0.0:
                        buf[i] = buf[i] + d
            out.write(piece)

    def _end_tensor(self):
        t = self._tensor
        if t is None:
            return
        name, _, count, written, out, old = t
        if written != count:
            raise StoreError("tensor %r ended after %d of its %d elements" % (name, written, count))
        self._close(out, True)
        if old is not None:
            self._close(old)
        t[4] = t[5] = None
        self._tensor = None

    # -- the new generation --
    def _tensors(self):
        """The new index's tensor entries: the base's, with new files for what an update changed;
        or those of the new model, in stream order."""
        written = self._written
        if self.update:
            out = []
            for t in self.base["tensors"]:
                new = written.get(t["name"])
                out.append(t if new is None else {"name": t["name"], "dtype": t["dtype"], "shape": t["shape"],
                                                  "file": self._name("t", new[2])})
            return out
        return [{"name": n, "dtype": written[n][0], "shape": list(written[n][1]),
                 "file": self._name("t", written[n][2])} for n in self._order]

    def _index(self):
        """The new generation's index, its digest checked against the update record."""
        tensors = self._tensors()
        entries = dict(self._chain.entries)
        entries.update(self._chain.new)
        if not self.update:
            # A new model: the state of tensors it does not have is of no use any more.
            entries = dict((n, e) for n, e in entries.items() if n in self._written)
        digest = self._digest(tensors)
        record = self.record
        sequence, root = 0, digest
        if record is not None:
            if digest != record.result:
                raise CorruptUpdateError(
                    "update %d decoded to a model with digest %s, but its record promises %s: the update is "
                    "corrupted (or was decoded with other decoder state)"
                    % (record.sequence, _hex(digest)[:16], _hex(record.result)[:16]))
            sequence, root = record.sequence, record.root
        elif self.update:
            sequence, root = self.base["sequence"], _unhex(self.base["root"])
        return {"format": FORMAT, "version": VERSION, "generation": self.generation, "digest": _hex(digest),
                "sequence": sequence, "root": _hex(root), "tensors": tensors,
                "chain": [entries[n] for n in sorted(entries)], "meta": self.meta}

    def _commit(self, index):
        _commit_index(self.directory, index)
        self._created = []

    def _digest(self, tensors):
        """The model digest of stored tensor files (``tensors``: index entries)."""
        files = {}
        for t in tensors:
            files[t["name"]] = t["file"]
        buf = bytearray(1024)

        def update(name, h):
            f = self._open(files[name], "rb")
            try:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    # The whole buffer when full: a view per piece would be garbage per KB of model.
                    h.update(buf if n == len(buf) else memoryview(buf)[:n])
            finally:
                self._close(f)

        return model_digest([(t["name"], t["dtype"], t["shape"], 4 * _count(t["shape"])) for t in tensors], update)

    def _check(self, record, digest):
        """Refuse an update that does not apply to the stored model (whose digest is ``digest``)."""
        base = self.base
        if digest is None:
            raise StoreError("this port's hashlib has no SHA-256: the update's parent cannot be checked")
        at = "the store is at update %d of its chain" % base["sequence"]
        if record.parent != digest:
            if record.result == digest:
                raise AlreadyAppliedError("update %d has already been applied: the stored model is the one it "
                                          "produces (%s)" % (record.sequence, at))
            raise WrongBaseError("update %d applies to the model with digest %s, not to the stored one (%s; %s)"
                                 % (record.sequence, _hex(record.parent)[:16], _hex(digest)[:16], at))
        if record.continues_state and (_unhex(base["root"]) != record.root
                                       or base["sequence"] != record.sequence - 1):
            raise MissingStateError("update %d continues the decoder state of update %d of its chain, which the "
                                    "store does not have (%s)" % (record.sequence, record.sequence - 1, at))


def _hex(digest):
    return None if digest is None else "".join("%02x" % b for b in digest)


def _unhex(text):
    return None if text is None else bytes.fromhex(text)


def store_stream(source, directory, chunk_size=DEFAULT_CHUNK_SIZE, **options):
    """Stream a bitstream from ``source`` (an object with ``readinto`` or ``read``) into the store
    in ``directory``; returns the new index. ``options``: those of StoreSession."""
    session = StoreSession(directory, **options)
    buf = bytearray(chunk_size) if hasattr(source, "readinto") else None
    view = memoryview(buf) if buf is not None else None
    try:
        while True:
            if buf is not None:
                n = source.readinto(buf)
                chunk = view[:n] if n else None
            else:
                chunk = source.read(chunk_size)
            if not chunk:
                break
            session.feed(chunk)
            chunk = None
    except BaseException:
        session.abort()
        raise
    return session.close()
