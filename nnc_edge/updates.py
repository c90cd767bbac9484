"""Incremental model updates: code what changed on the host, apply it safely on the device.

An *update* is an ordinary profile-1 NNR bitstream (``mps_parent_signalling_enabled_flag`` 1, one NDU
per changed tensor, all-zero tensors omitted, supplement 5.7 / 6.2 / 6.3) whose tensors are
**differences**: the device adds each decoded tensor to the tensor of the same name in the model it
runs. Tensors that did not change are not in the stream at all.

The NDUs name their tensors by index (``topology_elem_id_index``; MPS ``topology_carriage_flag`` 0,
``mps_topology_indexed_reference_flag`` 1, 6.4.3.7) into an out-of-band NNR_TPL_REFLIST that the
device already has: ``update_topology(base)``, every tensor of the base model in the order of the
names' UTF-8 bytes (the model digest's order; the record's ``parent`` pins that model down). An
index is one byte where a name costs its UTF-8 bytes plus one in every NDU: for MiniLM's names
(about 40 bytes each) that is a fifth of a small update. Decoding an update outside ``apply_update``
needs ``topology=update_topology(base)`` for the names (without it the indexes name the tensors).
With ``nncodec_compatible=True`` the NDUs carry the names, as NNCodec's decoder needs.

Update identity
---------------
Every update carries an *update record* that says which model it applies to, where it stands in its
chain and which model it produces, so that a device refuses an update for a model it does not have
and notices a missing or repeated update:

* ``parent``: the model digest (below) of the model the update applies to;
* ``result``: the model digest of the model after applying it (checked after decoding: a corrupted
  update, or one decoded with the wrong decoder state, is refused even when it decodes);
* ``sequence``: 1 for the first update of a chain, +1 per update;
* ``root``: the model digest of the chain's first base (32 zero bytes when unknown);
* ``flags`` bit 0, ``continues_state``: the update's NDUs use the decoder state its predecessor left
  (temporal context adaptation bases, HDSP history; supplement 6.6 / 6.7), so the device must have
  applied the previous update of the chain *with its state kept*.

The record travels inside the NNR bitstream, so any transport that moves the bitstream moves it too:

* an NNR unit of the unspecified type ``UPDATE_INFO_UNIT_TYPE`` (40; Table 3 leaves 32..63 to
  applications and conforming decoders skip them), right after NNR_STR (the stream then has no
  NNR_TPL: NNCodec's decoder, which needs it, refuses unspecified units anyway), with
  ``independently_decodable_flag`` 1, no partial-data counter, and as payload the 106 bytes
  ``"NNCU" u8(version = 1) u8(flags) u32(sequence) root[32] parent[32] result[32]`` (big-endian);
* with ``nncodec_compatible=True`` (NNCodec's decoder refuses unspecified unit types) the same record as
  text in the profile-1 MPS ``base_model_id`` (supplement 6.2), which names the base model:
  ``nnc-edge-update/1;seq=N;flags=F;root=HEX;parent=HEX;result=HEX``.

``read_update_info(update)`` returns the record (an ``UpdateInfo``) from either place; it parses only
the units before the first NDU.

The model digest is SHA-256 over the parameters in a canonical order, independent of the file
format and of the order tensors are stored in: the bytes ``"nnc-edge model sha256 v1\\0"``, u32
number of tensors, then for every tensor in the order of its name's UTF-8 bytes: u32 length and
the UTF-8 name, u8 length and the numpy dtype string in little-endian form (``"<f4"``, ``"|u1"``),
u8 number of dimensions, u64 each dimension, u64 byte count and the raw bytes in row-major order.
These integers and the tensor data are little-endian. ``model_digest(tensors)`` computes it.

Applying (the device)
---------------------
``apply_update(base, updates, output)`` reads the model, computes its digest and, *before decoding
anything*, checks the record: the parent must be this model (else ``WrongBaseError``; a record whose
result is this model is ``RepeatedUpdateError``; a sequence number past the next one is
``MissingUpdateError``); an update that continues the decoder state needs that state
(``MissingStateError``); an update without a record is refused (``AnonymousUpdateError``) unless
``allow_anonymous``. It then decodes the update while it streams in, in slices of at most 256 Ki
elements (``decoder_core.StreamDecoder(slice_elements=...)``), and adds each decoded difference ``d``
to its float32 tensor ``w``: ``w[i] + d[i]`` (IEEE 754 binary32 addition, round to nearest even,
numpy's float32 add) where ``d[i] != 0``, and ``w[i]`` bit for bit where ``d[i] == 0``. The result's
digest must equal the record's ``result`` (else ``CorruptUpdateError``). Only float32 tensors change;
an update may not add, remove or reshape tensors.

The output is written only after every update given has been checked and applied: the new decoder
state first (``MODEL.<digest prefix>.nncstate``, see below), then the model file, each into a
temporary file in the target's directory, fsynced and renamed into place (nnc_edge.atomicfile). On
any error nothing is written: the old model file stays exactly as it was. A call that is killed
leaves the old model or the new one, and temporary files, which the next call removes; an empty
bitstream is refused (NNCError), never applied as an update that changes nothing.

Chain state
-----------
Temporal context adaptation codes a tensor against the integer tensor its previous update of the
chain decoded (6.6), and HDSP against the history of all of them (6.7). That *decoder state* has to
survive between updates that arrive days apart, on both sides:

* the device keeps it in a file beside the model, ``MODEL.<first 16 hex digits of the model's
  digest>.nncstate``. Because its name contains the model's digest, a crash between writing it and
  replacing the model leaves the old model with its own state file; stale state files are removed
  after the next update. With an output file, ``apply_update`` reads the old state file and writes
  the new one a slice at a time while the update decodes (tensors the update leaves alone are
  copied at the end), so the state is never in memory;
* the host keeps a ``ChainState`` (``--residual STATE`` on the command line) in memory while it
  encodes: the same position and decoder state, plus the encoder's state (``put_node_depth`` and
  ``parameter_id`` per parameter) and the residual for error feedback, saved in the same format.

A state file (version 2) holds raw arrays, so that saving it costs less than decoding the update it
records (an earlier zlib-compressed .npz cost more; version 1 files are refused: apply the full
model again). All integers are little-endian:

* ``"NNCSTATE"``, u32 version (2), u64 header offset, u64 header length (28 bytes);
* per tensor, its last integer tensor (int32, row-major) directly followed by its history (one
  byte per element): 5 bytes per element, no padding;
* on the host, the residual (float32) per tensor;
* the header, UTF-8 JSON, last: the device writes tensors while the update decodes, before it knows
  which the update holds. ``{"version": 2, "sequence", "root", "model" (hex digests),
  "encoder_depths", "parameter_ids", "tensors": [{"name", "count", "offset", "crc": [CRC-32 of the
  levels, of the history]}], "residual": [{"name", "shape", "offset", "crc"}]}``; the header ends
  the file. A file that is truncated, damaged (CRC-32, checked as the data is read) or of another
  version raises ``StateFileError`` (an NNCError) and changes nothing.

Encoding (the host)
-------------------
``encode_update(base, new)`` codes ``new - base`` (float32) for the tensors that changed. ``base`` is
the model the device has. Options: ``sparsity`` (the fraction of each tensor's difference, smallest
magnitudes first, set to zero), ``row_sparsity`` (the fraction of each tensor's rows, by smallest
L2 norm of the difference, set to zero, so that row skipping removes them whole), ``tca``,
``qp``/``dq``. With ``residual`` (a ``ChainState`` or the path of its file, created from ``base`` when
missing) updates form a chain: the sequence number and the decoder/encoder state carry over, and with
error feedback (the default) each update codes ``new - base + residual`` and keeps what quantization
and sparsification left out, ``residual' = (new - base + residual) - decoded``, for the next one: the
device model plus the residual is always the last target, so the chain does not drift.

The host's view of the updated model is ``base`` plus the update decoded by our own decoder with the
chain's decoder state, added by the rule above, so host and device agree bit for bit; its digest is
the record's ``result``. ``encode_update(..., return_model=True)`` returns it with the bytes.
"""

import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import sys
import zlib

import numpy as np

import decoder_core
from decoder_core import NNCError
from decoder_core.compat import from_raw, zeros
from decoder_core.tables import NNR_AGG, NNR_MPS, NNR_NDU
from decoder_core.units import ParserState, nnr_unit_size, parse_unit

from . import modelio
from .atomicfile import clear_stale, commit, discard, remove, temp_beside
from .decoding import empty_bitstream
from .encoder.unitwriter import nnr_unit
from .sinks import open_sink
from .streaming import DEFAULT_CHUNK_SIZE

__all__ = [
    "UPDATE_INFO_UNIT_TYPE", "UpdateInfo", "ChainState", "model_digest", "update_topology", "read_update_info",
    "unit_record", "remove_stale_states",
    "apply_update",
    "encode_update", "state_path", "file_digest", "UpdateError", "WrongBaseError", "MissingUpdateError",
    "RepeatedUpdateError", "AnonymousUpdateError", "MissingStateError", "CorruptUpdateError", "StateFileError",
]

UPDATE_INFO_UNIT_TYPE = 40   # Table 3: 32..63 are unspecified, skipped by conforming decoders
RECORD_MAGIC = b"NNCU"
RECORD_VERSION = 1
_RECORD = struct.Struct(">4sBBI32s32s32s")
FLAG_CONTINUES_STATE = 0x01
NO_DIGEST = bytes(32)
_TEXT_PREFIX = "nnc-edge-update/"
_TEXT = re.compile(r"^nnc-edge-update/(\d+);seq=(\d+);flags=(\d+);root=([0-9a-f]{64});parent=([0-9a-f]{64});"
                   r"result=([0-9a-f]{64})$")

_DIGEST_DOMAIN = b"nnc-edge model sha256 v1\x00"
# Units before the first NDU are read whole to find the record: bounded so a hostile size cannot
# make the reader buffer without limit.
MAX_LEADING_BYTES = 16 << 20
STATE_SUFFIX = ".nncstate"
_STATE_MAGIC = b"NNCSTATE"
_STATE_VERSION = 2
_STATE_PREAMBLE = struct.Struct("<8sIQQ")  # magic, version, header offset, header length
# Bounded so a damaged preamble cannot make the reader allocate without limit.
_MAX_STATE_HEADER = 64 << 20


# --- errors ---------------------------------------------------------------------------------------
class UpdateError(NNCError):
    """An update refused by ``apply_update`` (the model is left untouched)."""


class WrongBaseError(UpdateError):
    """The update applies to another model than the one given."""


class MissingUpdateError(WrongBaseError):
    """The update comes after one the model has not received (a gap in the chain)."""


class RepeatedUpdateError(WrongBaseError):
    """The update (or an earlier one of its chain) has already been applied to the model."""


class AnonymousUpdateError(UpdateError):
    """The update carries no update record, so the model it applies to cannot be checked."""


class MissingStateError(UpdateError):
    """The update continues the decoder state of its predecessor, which is not available."""


class StateFileError(NNCError):
    """A chain-state file that cannot be used: damaged, truncated or of another version (the model is
    left untouched)."""


class CorruptUpdateError(UpdateError):
    """The update is damaged: it decoded, but not to the model its record promises, or its tensors do
    not fit the model it claims to apply to."""


# --- the model digest -----------------------------------------------------------------------------
def _little(array):
    a = np.asarray(array)
    if a.dtype.hasobject:
        raise TypeError("cannot digest a tensor of Python objects")
    return np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")  # (ascontiguousarray makes 0-d 1-d)


def model_digest(tensors):
    """The SHA-256 model digest (32 bytes) of a dict name -> array (see the module docstring)."""
    specs = {}
    for name, array in tensors.items():
        a = np.asarray(array)
        specs[name] = (a.dtype.newbyteorder("<"), a.shape, a.nbytes)
    return _digest(specs, lambda name: (_little(tensors[name]).reshape(-1).view(np.uint8),))


def _digest(specs, data):
    """The model digest of the tensors ``specs`` describes (name -> (little-endian dtype, shape, byte
    count)); ``data(name)`` yields the tensor's raw bytes in pieces (so a file can be hashed a region
    at a time)."""
    h = hashlib.sha256(_DIGEST_DOMAIN)
    names = sorted(specs, key=lambda n: n.encode("utf-8"))
    h.update(struct.pack("<I", len(names)))
    for name in names:
        dtype, shape, nbytes = specs[name]
        raw_name = name.encode("utf-8")
        code = dtype.str.encode("ascii")
        h.update(struct.pack("<I", len(raw_name)) + raw_name + struct.pack("<B", len(code)) + code)
        h.update(struct.pack("<B%dQ" % len(shape), len(shape), *shape))
        h.update(struct.pack("<Q", nbytes))
        for piece in data(name):
            h.update(piece)
    return h.digest()


def update_topology(model):
    """The out-of-band topology of update streams for a model (a dict name -> array or shape): the
    (name, shape) pairs of all its tensors in the order of the names' UTF-8 bytes. An update's NDUs
    name their tensors by index into this list (see the module docstring)."""
    names = sorted(model, key=lambda n: n.encode("utf-8"))
    return [(name, tuple(int(d) for d in getattr(model[name], "shape", model[name]))) for name in names]


# --- the update record ----------------------------------------------------------------------------
class UpdateInfo:
    """The identity of an update (see the module docstring): ``sequence``, ``parent``, ``result``,
    ``root`` (32-byte digests) and ``continues_state``."""

    def __init__(self, sequence, parent, result, root=NO_DIGEST, continues_state=False, version=RECORD_VERSION):
        if not 0 <= sequence < (1 << 32):
            raise ValueError("sequence %d does not fit u32" % sequence)
        for label, digest in (("parent", parent), ("result", result), ("root", root)):
            if not isinstance(digest, (bytes, bytearray)) or len(digest) != 32:
                raise ValueError("%s must be a 32-byte digest" % label)
        self.sequence = sequence
        self.parent = bytes(parent)
        self.result = bytes(result)
        self.root = bytes(root)
        self.continues_state = bool(continues_state)
        self.version = version
        self.source = None  # "unit" or "base_model_id" when read from a bitstream

    @property
    def flags(self):
        return FLAG_CONTINUES_STATE if self.continues_state else 0

    def to_bytes(self):
        """The payload of the update record unit."""
        return _RECORD.pack(RECORD_MAGIC, self.version, self.flags, self.sequence, self.root, self.parent,
                            self.result)

    def unit(self):
        """The complete NNR unit (type UPDATE_INFO_UNIT_TYPE) carrying the record."""
        return nnr_unit(UPDATE_INFO_UNIT_TYPE, b"", self.to_bytes())

    def to_text(self):
        """The record as the text written into base_model_id."""
        return "%s%d;seq=%d;flags=%d;root=%s;parent=%s;result=%s" % (
            _TEXT_PREFIX, self.version, self.sequence, self.flags, self.root.hex(), self.parent.hex(),
            self.result.hex())

    @classmethod
    def from_bytes(cls, payload, offset=None):
        payload = bytes(payload)
        if len(payload) < 5 or payload[:4] != RECORD_MAGIC:
            raise UpdateError("unit of type %d is not an nnc-edge update record" % UPDATE_INFO_UNIT_TYPE, offset,
                              "update record")
        if payload[4] != RECORD_VERSION:
            raise UpdateError("update record version %d is not supported (1 is)" % payload[4], offset,
                              "update record")
        if len(payload) != _RECORD.size:
            raise UpdateError("update record has %d bytes, %d expected" % (len(payload), _RECORD.size), offset,
                              "update record")
        _, version, flags, sequence, root, parent, result = _RECORD.unpack(payload)
        if flags & ~FLAG_CONTINUES_STATE:
            raise UpdateError("update record flags 0x%02x has unknown bits" % flags, offset, "update record")
        return cls(sequence, parent, result, root, bool(flags & FLAG_CONTINUES_STATE), version)

    @classmethod
    def from_text(cls, text, offset=None):
        m = _TEXT.match(text)
        if m is None:
            raise UpdateError("base_model_id %r is not an nnc-edge update record" % text[:100], offset,
                              "base_model_id")
        version, sequence, flags = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if version != RECORD_VERSION:
            raise UpdateError("update record version %d is not supported (1 is)" % version, offset, "base_model_id")
        if flags & ~FLAG_CONTINUES_STATE or sequence >= 1 << 32:
            raise UpdateError("invalid update record %r" % text[:100], offset, "base_model_id")
        return cls(sequence, bytes.fromhex(m.group(5)), bytes.fromhex(m.group(6)), bytes.fromhex(m.group(4)),
                   bool(flags & FLAG_CONTINUES_STATE), version)

    def __eq__(self, other):
        return isinstance(other, UpdateInfo) and self.to_bytes() == other.to_bytes()

    def __repr__(self):
        return "UpdateInfo(sequence=%d, parent=%s, result=%s, root=%s, continues_state=%s)" % (
            self.sequence, self.parent.hex()[:16], self.result.hex()[:16], self.root.hex()[:16], self.continues_state)


def _open_update(update):
    """(binary file object, label, close?) for a path, bytes or an open binary file."""
    if isinstance(update, (str, os.PathLike)):
        try:
            return open(update, "rb"), os.fspath(update), True
        except OSError as exc:
            raise NNCError("cannot read %s: %s" % (update, exc.strerror or exc))
    if isinstance(update, (bytes, bytearray, memoryview)):
        return io.BytesIO(update), "<update>", True
    if hasattr(update, "read"):
        return update, getattr(update, "name", "<update>"), False
    raise TypeError("an update is a path, bytes or a binary file, not %s" % type(update).__name__)


def _read_leading_units(f):
    """Read the units before the first NDU (or AGG) of a bitstream file: returns (bytes read, info).

    ``info`` is the UpdateInfo of the record unit, else of an nnc-edge record in the MPS
    base_model_id, else None. Every byte read is returned so that decoding can start with it.
    """
    buf = bytearray()
    state = ParserState()
    info = None
    while True:
        start = len(buf)
        head = f.read(2)
        buf += head
        if len(head) < 2:
            return bytes(buf), info  # end of the stream (the decoder reports a cut-off unit)
        if head[0] & 0x80:
            more = f.read(2)
            buf += more
            if len(more) < 2:
                return bytes(buf), info
        size = nnr_unit_size(buf, start)[0]
        if len(buf) + 1 > start + size:
            return bytes(buf), info  # the decoder reports a unit too small for its header
        buf += f.read(1)
        if len(buf) == start + (4 if head[0] & 0x80 else 2):
            return bytes(buf), info
        if (buf[-1] >> 2) in (NNR_NDU, NNR_AGG):
            return bytes(buf), info
        if start + size > MAX_LEADING_BYTES:
            raise NNCError("the units before the first NDU exceed %d bytes" % MAX_LEADING_BYTES, start,
                           "nnr_unit_size")
        rest = f.read(start + size - len(buf))
        buf += rest
        if len(buf) < start + size:
            return bytes(buf), info
        unit = parse_unit(buf, start, start + size, state)
        if unit.nnr_unit_type == UPDATE_INFO_UNIT_TYPE:
            if info is not None and info.source == "unit":
                raise UpdateError("more than one update record", start, "update record")
            if unit.partial_data_counter:
                raise UpdateError("the update record is split into partial units", start, "update record")
            info = unit_record(unit, buf)
        elif unit.nnr_unit_type == NNR_MPS and info is None:
            info = unit_record(unit, buf)


def unit_record(unit, data):
    """The UpdateInfo the NNR unit ``unit`` (parsed from ``data``) carries, or None: a unit of type
    UPDATE_INFO_UNIT_TYPE is the record (UpdateError when it is not a valid one), an MPS carries it
    when its base_model_id is the record's text."""
    if unit.nnr_unit_type == UPDATE_INFO_UNIT_TYPE:
        info = UpdateInfo.from_bytes(data[unit.header_end:unit.offset + unit.nnr_unit_size], unit.offset)
        info.source = "unit"
        return info
    text = unit.mps.get("base_model_id") if unit.nnr_unit_type == NNR_MPS else None
    if text is None or not text.startswith(_TEXT_PREFIX):
        return None
    info = UpdateInfo.from_text(text, unit.offset)
    info.source = "base_model_id"
    return info


def read_update_info(update):
    """The UpdateInfo of an update (path, bytes or binary file), or None when it carries none.

    Reads only the units before the first NDU; raises NNCError for a malformed record or unit.
    """
    f, _, close = _open_update(update)
    try:
        return _read_leading_units(f)[1]
    finally:
        if close:
            f.close()


# --- decoder and chain state ----------------------------------------------------------------------
def _read_first(attribute):
    """A ChainState property for a group of decoder state that may still be in its file."""
    def get(self):
        self._read_stored()
        return getattr(self, attribute)

    def set(self, value):
        self._read_stored()
        setattr(self, attribute, value)
    return property(get, set)


class ChainState:
    """Where a chain of updates stands, on the host or on the device.

    ``sequence`` (of the last update applied or produced; 0 for the base), ``root`` and ``model`` (the
    32-byte digests of the chain's first base and of the model this state belongs to), and the
    decoder state of the chain (``bases``: name -> int32 array, ``history``: name -> uint8 array).
    On the host also what the encoder keeps beyond that (``encoder_depths``: put_node_depth, and
    ``parameter_ids`` per tensor; its TCA bases and history are the decoder's) and the error
    feedback ``residual`` (name -> float32 array). ``save`` / ``load`` write and read a state file
    (see the module docstring). A state returned by a file-to-file ``apply_update`` reads ``bases``
    and ``history`` from its file on first use: the device never holds them.
    """

    def __init__(self, model, sequence=0, root=None):
        self.model = bytes(model)
        self.sequence = sequence
        self.root = bytes(root) if root is not None else bytes(model) if sequence == 0 else NO_DIGEST
        self._bases = {}
        self._history = {}
        self._stored = None  # the state file whose bases and history have not been read yet
        self.encoder_depths = {}
        self.parameter_ids = {}
        self.residual = {}

    bases = _read_first("_bases")
    history = _read_first("_history")

    def restart(self):
        """Start a new chain at this state's model (the host's side of a compaction, when the model is
        published again as a full model): sequence 0, the model as root, no decoder or encoder state;
        the error-feedback residual is kept. The next update is update 1 of the new chain: it uses no
        decoder state, so it applies to that model on any device."""
        self._read_stored()
        self.sequence = 0
        self.root = self.model
        self._bases = {}
        self._history = {}
        self.encoder_depths = {}
        self.parameter_ids = {}
        return self

    def _read_stored(self):
        if self._stored is not None:
            with _StateFile(self._stored) as stored:
                self._bases, self._history = stored.read_tensors()
            self._stored = None

    # -- the decoder state, to and from decoder_core.Decoder --
    def restore_decoder(self, core):
        """Give a decoder_core.Decoder this state's TCA bases and HDSP history (copies: the decoder
        changes the history in place)."""
        core.bases.clear()
        core.history.clear()
        for name, levels in self.bases.items():
            _restore(core, "bases", name, levels)
        for name, hist in self.history.items():
            _restore(core, "history", name, hist)

    def capture_decoder(self, core, copy=True):
        """Take the TCA bases and HDSP history a decoder_core.Decoder holds now: copies, or with
        ``copy=False`` numpy views of the decoder's own arrays, for a decoder that is done (it would
        change them with its next update)."""
        take = np.array if copy else np.asarray
        self.bases = {name: take(np.frombuffer(memoryview(v).cast("B"), dtype=np.int32))
                      for name, v in core.bases.items()}
        self.history = {name: take(np.frombuffer(v, dtype=np.uint8)) for name, v in core.history.items()}

    # -- files --
    def save(self, path):
        """Write the state to ``path`` atomically (the layout in the module docstring)."""
        self._write(_StateWriter(None, path), lambda writer: writer.save(path, self))

    def write(self, f, path):
        """Write the state file for ``path`` into the binary file ``f`` (open for reading and writing,
        e.g. an atomicfile.Batch's), which the caller completes."""
        self._write(_StateWriter(None, path, f), lambda writer: writer.finish(self))

    def _write(self, writer, complete):
        if set(self.history) - set(self.bases):
            raise ValueError("the chain state has a history but no integer tensor for %s"
                             % ", ".join(sorted(set(self.history) - set(self.bases))[:5]))
        try:
            for name, levels in self.bases.items():
                hist = self.history.get(name)
                writer.put(name, levels, np.zeros(np.size(levels), np.uint8) if hist is None else hist)
            complete(writer)
        finally:
            writer.close()

    @classmethod
    def load(cls, path):
        """Read a state file written by ``save`` or by ``apply_update``, whole (the host's encoder
        needs whole tensors); NNCError when it is not one or is damaged."""
        with _StateFile(path) as stored:
            state = stored.chain_state()
            state._bases, state._history = stored.read_tensors()
            state.residual = stored.read_residual()
        return state


def _restore(core, group, name, array):
    """Put one tensor of decoder state into a decoder_core.Decoder in the types it decodes with
    (array('i') TCA bases, bytearray HDSP history): one copy, nothing else of the state."""
    if group == "bases":
        core.bases[name] = from_raw("i", memoryview(np.ascontiguousarray(array, dtype="<i4").reshape(-1)).cast("B"))
    else:
        core.history[name] = bytearray(memoryview(np.ascontiguousarray(array, dtype=np.uint8).reshape(-1)).cast("B"))


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _StateFile:
    """A state file open for reading (the layout in the module docstring): ``meta`` (its header),
    ``tensors`` (name -> (count, offset, CRC-32 of the levels, of the history)) and ``residual``
    (name -> (shape, offset, CRC-32)). Data is read on demand, a window at a time if need be."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.f = open(self.path, "rb")
        try:
            self._read_header()
        except BaseException:
            self.f.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.f.close()

    def _read_header(self):
        path = self.path
        size = os.fstat(self.f.fileno()).st_size
        raw = self.f.read(_STATE_PREAMBLE.size)
        if raw[:4] == b"PK\x03\x04":
            raise StateFileError("%s is a chain state of an earlier nnc-edge (an .npz, state version 1), which "
                                 "this version does not read: apply the full model again to start a new chain (on "
                                 "the host: start a new chain state)" % path)
        if len(raw) < _STATE_PREAMBLE.size or raw[:len(_STATE_MAGIC)] != _STATE_MAGIC:
            raise StateFileError("%s is not an nnc-edge chain state" % path)
        _, version, at, length = _STATE_PREAMBLE.unpack(raw)
        if version != _STATE_VERSION:
            raise StateFileError("%s: chain state version %d is not supported (%d is): apply the full model again "
                                 "to start a new chain" % (path, version, _STATE_VERSION))
        if not _STATE_PREAMBLE.size <= at <= size or length > _MAX_STATE_HEADER or at + length != size:
            raise StateFileError("%s: the chain state is truncated or damaged: its header should take bytes "
                                 "%d..%d, the file has %d bytes" % (path, at, at + length, size))
        self.f.seek(at)
        try:
            meta = json.loads(self.f.read(length).decode("utf-8"))
            self.meta = meta
            if meta["version"] != _STATE_VERSION:
                raise ValueError("header version %r" % (meta["version"],))
            self.tensors = {}
            for t in meta["tensors"]:
                count, offset, crc = t["count"], t["offset"], t["crc"]
                self._check_region(t["name"], count, offset, 5, at, self.tensors)
                if len(crc) != 2 or not all(_is_count(c) for c in crc):
                    raise ValueError("tensor %r: bad crc %r" % (t["name"], crc))
                self.tensors[t["name"]] = (count, offset, crc[0], crc[1])
            self.residual = {}
            for r in meta["residual"]:
                shape, offset = tuple(r["shape"]), r["offset"]
                if not all(_is_count(d) for d in shape) or not _is_count(r["crc"]):
                    raise ValueError("residual %r: bad shape %r or crc" % (r["name"], r["shape"]))
                self._check_region(r["name"], math.prod(shape), offset, 4, at, self.residual)
                self.residual[r["name"]] = (shape, offset, r["crc"])
            self.chain_state()  # checks the chain's position
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise StateFileError("%s is not a valid nnc-edge chain state: %s" % (path, exc))

    @staticmethod
    def _check_region(name, count, offset, item_bytes, end, seen):
        if not isinstance(name, str) or name in seen:
            raise ValueError("tensor name %r missing or repeated" % (name,))
        if not (_is_count(count) and _is_count(offset) and _STATE_PREAMBLE.size <= offset
                and offset + item_bytes * count <= end):
            raise ValueError("tensor %r: %r elements at byte %r lie outside the data" % (name, count, offset))

    def chain_state(self):
        """A ChainState with this file's position and encoder fields (its tensors not read)."""
        meta = self.meta
        sequence = meta["sequence"]
        if not _is_count(sequence) or sequence >= 1 << 32:
            raise ValueError("sequence %r" % (sequence,))
        model, root = bytes.fromhex(meta["model"]), bytes.fromhex(meta["root"])
        if len(model) != 32 or len(root) != 32:
            raise ValueError("the model and root digests must have 32 bytes")
        state = ChainState(model, sequence, root)
        state.encoder_depths = {str(k): int(v) for k, v in meta["encoder_depths"].items()}
        state.parameter_ids = {str(k): int(v) for k, v in meta["parameter_ids"].items()}
        return state

    def read(self, at, view):
        """Fill the writable bytes ``view`` from byte ``at``."""
        self.f.seek(at)
        got = self.f.readinto(view)
        if got != len(view):
            raise StateFileError("%s: the chain state ends inside its data (byte %d)"
                                 % (self.path, at + (got or 0)))

    def read_checked(self, name, what, at, array, crc):
        """Read a whole array (a numpy array or array.array) from byte ``at`` and check its CRC-32."""
        view = memoryview(array).cast("B")
        self.read(at, view)
        _check_crc(self.path, name, what, zlib.crc32(view), crc)
        return array

    def read_tensors(self):
        """(bases, history): name -> int32 / uint8 numpy arrays."""
        bases, history = {}, {}
        for name, (count, offset, crc_levels, crc_history) in self.tensors.items():
            bases[name] = self.read_checked(name, "levels", offset, np.empty(count, np.int32), crc_levels)
            history[name] = self.read_checked(name, "history", offset + 4 * count, np.empty(count, np.uint8),
                                              crc_history)
            if sys.byteorder != "little":
                bases[name].byteswap(inplace=True)
        return bases, history

    def read_residual(self):
        out = {}
        for name, (shape, offset, crc) in self.residual.items():
            out[name] = self.read_checked(name, "residual", offset, np.empty(shape, "<f4"), crc)
        return out

    def load_into(self, core):
        """Put the decoder state into a decoder_core.Decoder (array('i') and bytearray, as it decodes
        with), one tensor at a time: never two copies of the state."""
        core.bases.clear()
        core.history.clear()
        for name, (count, offset, crc_levels, crc_history) in self.tensors.items():
            levels = self.read_checked(name, "levels", offset, zeros("i", count), crc_levels)
            if sys.byteorder != "little":
                levels.byteswap()
            core.bases[name] = levels
            core.history[name] = self.read_checked(name, "history", offset + 4 * count, bytearray(count), crc_history)


def _check_crc(path, name, what, got, expected):
    if got != expected:
        raise StateFileError("%s: the chain state of %r is damaged (the CRC-32 of its %s does not match): apply "
                             "the full model again to start a new chain" % (path, name, what))


_PARTS = ("levels", "history")


def _crc_region(source, at, nbytes, copy=None):
    """The CRC-32 of bytes at..at+nbytes of ``source`` (with read(at, view)), read a region at a time;
    ``copy(done, view)`` is given each region too."""
    buffer = bytearray(min(_REGION_BYTES, nbytes) or 1)
    crc = 0
    for done in range(0, nbytes, len(buffer)):
        view = memoryview(buffer)[:min(len(buffer), nbytes - done)]
        source.read(at + done, view)
        crc = zlib.crc32(view, crc)
        if copy is not None:
            copy(done, view)
    return crc


def _le_bytes(array, dtype):
    """The little-endian bytes of an array (numpy or array.array), without a copy where they are."""
    return np.ascontiguousarray(array, dtype=dtype).reshape(-1).view(np.uint8)


class _StateWriter:
    """A state file written beside ``beside`` (the model file it goes with): the chain-state
    interface of decoder_core.StreamDecoder(chain=...) over files.

    The decoder reads each tensor's previous state (from ``old``, a _StateFile, or none) and
    writes its new state a window at a time, so neither is ever whole in memory; the new state
    goes into a temporary file, which ``save`` completes (the tensors the updates left alone,
    copied from ``old``, then the header) and renames. ``close`` removes it unless saved. With
    ``file`` (a binary file open for reading and writing) the state goes there instead, and
    ``finish`` completes it; the caller owns that file.
    """

    def __init__(self, old, beside, file=None):
        self.old = old
        self.beside = os.fspath(beside)
        self.tensors = {}  # name -> (count, offset, CRC-32 levels, CRC-32 history) in this file
        self.file, self.tmp = file, None
        self.own = file is None
        self.end = _STATE_PREAMBLE.size
        self.decoding = None  # the _TensorState of the tensor being decoded

    def _allocate(self, nbytes):
        if self.file is None:
            self.file, self.tmp = temp_beside(self.beside, STATE_SUFFIX + ".tmp")
        at = self.end
        self.end += nbytes
        return at

    def write(self, at, data):
        f = self.file
        f.seek(at)
        try:
            f.write(data)
        except OSError as exc:
            raise self._failed(exc) from exc

    def _failed(self, exc):
        """An OSError of the temporary file as one that names the model file the state goes with."""
        return OSError(exc.errno, "%s (writing the chain state)" % (exc.strerror or exc), self.beside)

    # -- decoder_core's chain-state interface --
    def open(self, name, count):
        mine = self.tensors.get(name)
        if mine is not None:
            # Written by an earlier update of this call: read and overwritten in this file, window by window.
            source, label, entry = self, self.beside, mine
        elif self.old is not None and name in self.old.tensors:
            source, label, entry = self.old, self.old.path, self.old.tensors[name]
        else:
            source = label = entry = None
        in_place = mine is not None and mine[0] == count
        offset = mine[1] if in_place else self._allocate(5 * count)
        self.decoding = _TensorState(self, name, count, source, label, entry, offset, in_place)
        return self.decoding

    def read(self, at, view):
        self.file.seek(at)
        if self.file.readinto(view) != len(view):
            raise RuntimeError("the temporary chain state beside %s is shorter than written" % self.beside)

    def put(self, name, levels, history):
        """Add one tensor's whole state (the host's in-memory state being saved)."""
        levels = _le_bytes(levels, "<i4")
        history = _le_bytes(history, np.uint8)
        if 4 * history.size != levels.size:
            raise ValueError("tensor %r: %d levels but a history of %d" % (name, levels.size // 4, history.size))
        at = self._allocate(levels.size + history.size)
        self.write(at, levels)
        self.write(at + levels.size, history)
        self.tensors[name] = (history.size, at, zlib.crc32(levels), zlib.crc32(history))

    def save(self, path, state):
        """``finish``, then fsync the file and rename it to ``path``."""
        self.finish(state)
        try:
            commit(self.file, self.tmp, path)
        except OSError as exc:
            raise self._failed(exc) from exc
        self.file = self.tmp = None

    def finish(self, state):
        """Complete the file for the ChainState ``state`` (position, encoder fields and residual from
        it, decoder state from the updates and ``old``)."""
        if self.file is None:
            self._allocate(0)
        if self.old is not None:
            for name, entry in self.old.tensors.items():
                if name not in self.tensors:
                    self.tensors[name] = self._copy(name, entry)
            # Read for the last time: closed before the rename and the removal of stale state files
            # (some systems refuse to remove an open file).
            self.old.close()
            self.old = None
        residual = {}
        for name, array in state.residual.items():
            raw = _le_bytes(array, "<f4")
            at = self._allocate(raw.size)
            self.write(at, raw)
            residual[name] = {"name": name, "shape": list(np.shape(array)), "offset": at, "crc": zlib.crc32(raw)}
        header = json.dumps({
            "version": _STATE_VERSION, "sequence": state.sequence, "root": state.root.hex(), "model": state.model.hex(),
            "encoder_depths": state.encoder_depths, "parameter_ids": state.parameter_ids,
            "tensors": [{"name": name, "count": e[0], "offset": e[1], "crc": [e[2], e[3]]}
                        for name, e in self.tensors.items()],
            "residual": list(residual.values())}, sort_keys=True).encode("utf-8")
        self.write(self.end, header)
        self.write(0, _STATE_PREAMBLE.pack(_STATE_MAGIC, _STATE_VERSION, self.end, len(header)))

    def _copy(self, name, entry):
        """Copy a tensor the updates left alone from ``old``, checking its CRCs on the way."""
        count, offset, crc_levels, crc_history = entry
        at = self._allocate(5 * count)
        crcs = []
        for part, (first, nbytes) in enumerate(((0, 4 * count), (4 * count, count))):
            crcs.append(_crc_region(self.old, offset + first, nbytes,
                                    lambda done, view: self.write(at + first + done, view)))
            _check_crc(self.old.path, name, _PARTS[part], crcs[-1], entry[2 + part])
        return (count, at, crcs[0], crcs[1])

    def check_open(self):
        """After a decoding error: raise StateFileError if the previous state of the tensor being
        decoded is damaged (then that, not the update, is what failed)."""
        if self.decoding is not None:
            self.decoding.verify()

    def close(self):
        """Remove the temporary file unless saved; close ``old``."""
        if self.own:
            discard(self.file, self.tmp)
        self.file = self.tmp = None
        if self.old is not None:
            self.old.close()


class _TensorState:
    """One tensor's state while the decoder reads the previous one and writes the new one (the
    handle decoder_core's chain-state interface asks for; see _StateWriter)."""

    def __init__(self, writer, name, count, source, label, entry, offset, in_place):
        self.writer = writer
        self.name = name
        self.count = count
        self.source = source            # what holds the previous state (a _StateFile or the writer), or None
        self.label = label
        self.entry = entry              # its (count, offset, CRC-32 levels, CRC-32 history) there
        self.base_count = None if entry is None else entry[0]
        self.has_history = entry is not None and entry[0] == count
        self.offset = offset            # where the new state goes in the writer's file
        self.in_place = in_place        # ... over the previous one
        self.written = 0
        self.crcs = [0, 0]
        # Per part (levels, history): (positions read in order from 0, their CRC-32); None: read out of order.
        self.checked = [(0, 0), (0, 0)]

    def read_base(self, lo, hi):
        out = zeros("i", hi - lo)
        self._read(0, lo, hi, memoryview(out).cast("B"))
        if sys.byteorder != "little":
            out.byteswap()
        return out

    def read_history(self, lo, hi):
        out = bytearray(hi - lo)
        if self.has_history:
            self._read(1, lo, hi, out)
        return out

    def _read(self, part, lo, hi, view):
        if self.in_place and lo < self.written:
            raise RuntimeError("the decoder read positions %d..%d of the state of %r after writing them"
                               % (lo, hi, self.name))
        count, offset = self.entry[0], self.entry[1]
        self.source.read(offset + (4 * lo if part == 0 else 4 * count + lo), view)
        done = self.checked[part]
        self.checked[part] = (hi, zlib.crc32(view, done[1])) if done is not None and done[0] == lo else None

    def write(self, lo, levels, history):
        if lo != self.written:
            raise RuntimeError("the state of %r was written at %d, after %d positions" % (self.name, lo, self.written))
        raw = _le_bytes(levels, "<i4")
        self.writer.write(self.offset + 4 * lo, raw)
        self.writer.write(self.offset + 4 * self.count + lo, history)
        self.crcs = [zlib.crc32(raw, self.crcs[0]), zlib.crc32(history, self.crcs[1])]
        self.written = lo + len(history)

    def done(self):
        if self.written != self.count:
            raise RuntimeError("the state of %r is complete after %d of %d positions" % (self.name, self.written,
                                                                                         self.count))
        if self.entry is not None and not self.in_place:
            # What the decoder used of the previous state must be what was saved.
            if None in self.checked:
                self.verify()  # read out of order: check all of it
            for part, done in enumerate(self.checked):
                if done is not None and done[0] == self.entry[0]:
                    _check_crc(self.label, self.name, _PARTS[part], done[1], self.entry[2 + part])
        self.writer.tensors[self.name] = (self.count, self.offset, self.crcs[0], self.crcs[1])
        self.writer.decoding = None

    def verify(self):
        """Check the previous state whole against its CRCs (StateFileError if damaged)."""
        if self.entry is None or self.in_place:
            return  # nothing read, or this call's own data, partly overwritten
        count, offset = self.entry[0], self.entry[1]
        for part, (first, nbytes) in enumerate(((0, 4 * count), (4 * count, count))):
            _check_crc(self.label, self.name, _PARTS[part], _crc_region(self.source, offset + first, nbytes),
                       self.entry[2 + part])


def file_digest(path):
    """The model digest of the model file ``path`` (a .safetensors file is read a megabyte at a time)."""
    if modelio.format_of(path) != "safetensors":
        return model_digest(modelio.load(path))
    model = _FileModel(path, path)
    try:
        return model.digest()
    finally:
        model.close()


def state_path(model_path, digest):
    """The device's decoder-state file for the model file ``model_path`` whose digest is ``digest``."""
    return "%s.%s%s" % (os.fspath(model_path), digest.hex()[:16], STATE_SUFFIX)


def _state_files(model_path):
    """Existing decoder-state files of the model file ``model_path`` (any digest)."""
    path = os.path.abspath(os.fspath(model_path))
    directory, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.[0-9a-f]{16}" + re.escape(STATE_SUFFIX) + "$")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names if pattern.match(n)]


def _device_state(model_path, digest):
    """The state file kept beside the model file for the model with ``digest``, open (a _StateFile),
    or None."""
    path = state_path(model_path, digest)
    if not os.path.exists(path):
        return None
    stored = _StateFile(path)
    if bytes.fromhex(stored.meta["model"]) == digest:
        return stored
    stored.close()
    return None


# --- applying -------------------------------------------------------------------------------------
def add_difference(weights, difference, in_place=False):
    """The update rule: float32 ``weights + difference`` where the difference is nonzero, the weight
    itself (bit for bit) where it is zero. Returns a new array, or with ``in_place`` ``weights``
    itself (a writable float32 array), changed."""
    out = weights if in_place else np.array(weights, dtype=np.float32, copy=True)
    np.add(out, difference, out=out, where=difference != 0)
    return out


def _check_record(info, digest, state, label, allow_anonymous):
    """Refuse an update that does not apply to the model with ``digest`` (state: its ChainState or None)."""
    if info is None:
        if allow_anonymous:
            return
        raise AnonymousUpdateError("%s carries no nnc-edge update record, so the model it applies to is unknown"
                                   % label)
    known = state is not None and state.model == digest
    if not known and info.root == digest:
        state = ChainState(digest)  # the model is the chain's first base: at update 0
        known = True
    at = (" (the model is at update %d of its chain)" % state.sequence) if known else ""
    same_chain = known and info.root != NO_DIGEST and state.root == info.root
    if info.parent != digest:
        if info.result == digest:
            raise RepeatedUpdateError("%s: update %d has already been applied: the model is the one it produces%s"
                                      % (label, info.sequence, at))
        if same_chain:
            if info.sequence > state.sequence + 1:
                raise MissingUpdateError("%s: update %d needs the model after update %d, but the model is at "
                                         "update %d: update%s %s missing"
                                         % (label, info.sequence, info.sequence - 1, state.sequence,
                                            "s" if info.sequence - state.sequence > 2 else "",
                                            _span(state.sequence + 1, info.sequence - 1)))
            if info.sequence <= state.sequence:
                raise RepeatedUpdateError("%s: update %d is older than the model, which is at update %d of the "
                                          "same chain" % (label, info.sequence, state.sequence))
        raise WrongBaseError("%s: update %d applies to the model with digest %s, not to this one (%s)%s"
                             % (label, info.sequence, info.parent.hex()[:16], digest.hex()[:16], at))
    if same_chain and info.sequence != state.sequence + 1:
        raise (RepeatedUpdateError if info.sequence <= state.sequence else MissingUpdateError)(
            "%s: update %d applies to this model, but the model is at update %d of the same chain"
            % (label, info.sequence, state.sequence))
    if info.continues_state and not (known and state.root == info.root and state.sequence == info.sequence - 1):
        raise MissingStateError("%s: update %d continues the decoder state of update %d (temporal context "
                                "adaptation), which this device does not have: apply the chain with its state "
                                "file (%s) kept beside the model" % (label, info.sequence, info.sequence - 1,
                                                                     "MODEL.<digest>" + STATE_SUFFIX))


def _labelled(exc, label):
    """The NNCError ``exc``, its message prefixed with the update's label."""
    exc.args = ("%s: %s" % (label, exc.args[0]),)
    return exc


def _span(first, last):
    return "%d" % first if first == last else "%d..%d" % (first, last)


# What one read or write of a model file moves, and the slice size the update is decoded in: the
# file-to-file path's memory beyond the decoder's own.
_REGION_BYTES = 1 << 20


class _MemoryModel:
    """The model as a dict name -> array; a changed tensor is replaced by a new array. ``save``
    writes it to ``output`` (with ``metadata`` in a .safetensors file)."""

    def __init__(self, tensors, output=None, metadata=None):
        self.tensors = dict(tensors)
        self.output = output
        self.metadata = metadata

    def shapes(self):
        return {name: np.shape(array) for name, array in self.tensors.items()}

    def spec(self, name):
        array = self.tensors.get(name)
        return None if array is None else (array.shape, array.dtype)

    def digest(self):
        return model_digest(self.tensors)

    def add(self, name, start, diff):
        if start == 0:
            # A new array: the caller's dict keeps its own.
            self.tensors[name] = np.array(self.tensors[name], dtype=np.float32, copy=True)
        add_difference(self.tensors[name].reshape(-1)[start:start + diff.size], diff, in_place=True)

    def save(self, state, save_state, before_replace=None):
        """Write the model, and its decoder state ``state`` with ``save_state(path)``; returns the tensors."""
        _with_state(self.output, state, _model_writer(self.output, self.tensors, self.metadata), save_state,
                    before_replace)
        return self.tensors

    def close(self):
        pass


class _FileModel:
    """A .safetensors model updated in a copy beside the output file, a region of a tensor at a time:
    memory holds one region, never the model.

    The copy (the header write_model would write for these tensors and metadata, then the base's
    data) is made at the first change, so an update refused before decoding costs no copy.
    ``save()`` renames it onto the output; ``close()`` removes it unless saved. ``metadata``
    replaces the base's when not None.
    """

    def __init__(self, path, output, metadata=None):
        self.output = os.fspath(output)
        self._base = open(path, "rb")
        try:
            entries, base_metadata, self._start = modelio.read_safetensors_layout(self._base, os.fspath(path))
        except BaseException:
            self._base.close()
            raise
        self._order = [(name, np.dtype(dtype), shape) for _, _, name, dtype, shape in entries]  # data order
        self._layout = {name: (begin, end, np.dtype(dtype), shape) for begin, end, name, dtype, shape in entries}
        self.metadata = base_metadata if metadata is None else metadata
        self._file = self._base  # what is read: the base until the copy exists, then the copy
        self._copy = self._tmp = None
        self._buffer = np.empty(_REGION_BYTES, dtype=np.uint8)
        self._digest = None

    def shapes(self):
        return {name: shape for name, (_, _, _, shape) in self._layout.items()}

    def spec(self, name):
        entry = self._layout.get(name)
        return None if entry is None else (entry[3], entry[2])

    def digest(self):
        if self._digest is None:
            specs = {name: (dtype.newbyteorder("<"), shape, end - begin)
                     for name, (begin, end, dtype, shape) in self._layout.items()}
            self._digest = _digest(specs, lambda name: self._pieces(*self._layout[name][:2]))
        return self._digest

    def _pieces(self, begin, end):
        """Data bytes begin..end of the file, a region at a time (views of one buffer)."""
        view = memoryview(self._buffer)
        for at in range(begin, end, len(view)):
            piece = view[:min(len(view), end - at)]
            self._read(at, piece)
            yield piece

    def _read(self, at, view):
        self._file.seek(self._start + at)
        if self._file.readinto(view) != len(view):
            raise modelio.ModelFormatError("%s: the file ends inside the tensor data" % self._file.name)

    def add(self, name, start, diff):
        """Add the difference of the elements ``start ..`` of a tensor, region by region of the
        tensor (regions where it is all zero are neither read nor written)."""
        if self._copy is None:
            self._make_copy()
        begin = self._layout[name][0]
        step = len(self._buffer) // 4
        end = start + diff.size
        first = start
        while first < end:
            last = min(end, (first // step + 1) * step)
            d = diff[first - start:last - start]
            if d.any():
                raw = memoryview(self._buffer)[:4 * d.size]
                at = begin + 4 * first
                self._read(at, raw)
                add_difference(self._buffer[:4 * d.size].view("<f4"), d, in_place=True)
                self._copy.seek(self._start + at)
                self._copy.write(raw)
            first = last
        self._digest = None

    def _make_copy(self):
        header = modelio.safetensors_header(self._order, self.metadata)
        self._copy, self._tmp = temp_beside(self.output, ".tmp")
        self._copy.write(header)
        self._base.seek(self._start)
        shutil.copyfileobj(self._base, self._copy, _REGION_BYTES)
        self._file, self._start = self._copy, len(header)

    def save(self, state, save_state, before_replace=None):
        """Write the decoder state ``state`` (``save_state(path)``), then fsync the copy and rename it
        onto the output (made now if nothing changed: the output still gets the model and its
        metadata); returns the output's tensors as read-only memmaps."""
        _with_state(self.output, state, self._rename, save_state, before_replace)
        return self._arrays()

    def _rename(self):
        if self._copy is None:
            self._make_copy()
        self._base.close()  # before the rename: some systems refuse to replace an open file
        commit(self._copy, self._tmp, self.output)
        self._copy = self._tmp = None

    def close(self):
        self._base.close()
        discard(self._copy, self._tmp)
        self._copy = self._tmp = None

    def _arrays(self):
        """The output's tensors as read-only memmaps, in data order (after the rename)."""
        whole = np.memmap(self.output, dtype=np.uint8, mode="r")
        out = {}
        for name, dtype, shape in self._order:
            begin, end = self._layout[name][:2]
            out[name] = whole[self._start + begin:self._start + end].view(dtype.newbyteorder("<")).reshape(shape)
        return out


class _Applier:
    """Applies updates one after the other to a model (a _MemoryModel or _FileModel), with one decoder
    for the chain, which decodes each update in slices of at most _REGION_BYTES / 4 elements.

    The decoder state comes from ``state`` (a ChainState) or, without it, from the state file beside
    the model file ``state_beside`` (if given). With ``output`` and no ``state`` it stays in files:
    read from the old state file and written to the new one a slice at a time (_StateWriter);
    otherwise it is in memory.
    """

    def __init__(self, model, state, chunk_size, allow_anonymous, limits=None, state_beside=None, output=None):
        self.model = model
        self.digest = model.digest()
        self.chunk_size = chunk_size
        self.allow_anonymous = allow_anonymous
        self.writer = None
        given = state
        stored = None
        if given is None and state_beside is not None:
            stored = _device_state(state_beside, self.digest)
        try:
            if stored is not None:
                state = stored.chain_state()
            if output is not None and given is None:
                self.writer = _StateWriter(stored, output)  # which closes ``stored`` from now on
            self.decoder = decoder_core.StreamDecoder(update_topology(model.shapes()), limits=limits,
                                                      slice_elements=max(1, _REGION_BYTES // 4), chain=self.writer)
            if self.writer is None and stored is not None:
                stored.load_into(self.decoder.decoder)
            elif self.writer is None and state is not None and state.model == self.digest:
                state.restore_decoder(self.decoder.decoder)
        except BaseException:
            self.close()
            raise
        finally:
            if stored is not None and self.writer is None:
                stored.close()
        self.state = state if state is not None and state.model == self.digest else None
        # (the base model file, its digest) when this call may tidy the state files beside it.
        self.base_file = (state_beside, self.digest) if output is not None and state_beside is not None else None

    def apply(self, update):
        f, label, close = _open_update(update)
        try:
            prefix, info = _read_leading_units(f)
            if not prefix:
                raise _labelled(empty_bitstream(), label)
            try:
                _check_record(info, self.digest, self.state, label, self.allow_anonymous)
            except RepeatedUpdateError:
                if self.base_file is not None and self.base_file[1] == self.digest:
                    # A run killed after replacing the model may not have removed the state files
                    # of the models before: the one this model needs is the only one to keep.
                    remove_stale_states(*self.base_file)
                raise
            seen = set()
            try:
                for name, shape, start, values in self._slices(prefix, f):
                    if start == 0:
                        self._check(name, shape, values, seen, label)
                    self.model.add(name, start, np.frombuffer(values, dtype=np.float32))
                    values = None  # not held while the next slice decodes
            except NNCError as exc:
                if isinstance(exc, (UpdateError, StateFileError)):
                    raise
                if self.writer is not None:
                    self.writer.check_open()
                raise _labelled(exc, label)
        finally:
            if close:
                f.close()
        digest = self.model.digest()
        if info is not None and digest != info.result:
            raise CorruptUpdateError("%s: update %d decoded to a model with digest %s, but its record promises %s: "
                                     "the update is corrupted (or was decoded with another decoder state)"
                                     % (label, info.sequence, digest.hex()[:16], info.result.hex()[:16]))
        state = ChainState(digest, info.sequence if info is not None else 0,
                           info.root if info is not None else NO_DIGEST)
        if info is None and self.state is not None:
            state.sequence, state.root = self.state.sequence, self.state.root
        self.digest = digest
        self.state = state
        return info

    def _slices(self, prefix, f):
        """The update's slices (name, shape, start, values), each handed on before the next is decoded."""
        dec = self.decoder
        for item in dec.iter_feed(prefix):
            yield item
        while True:
            chunk = f.read(self.chunk_size)
            if not chunk:
                break
            for item in dec.iter_feed(chunk):
                yield item
        dec.close()

    def _check(self, name, shape, values, seen, label):
        """The checks on a tensor of the update, at its first slice."""
        if name in seen:
            raise CorruptUpdateError("%s: tensor %r occurs twice in the update" % (label, name))
        seen.add(name)
        spec = self.model.spec(name)
        if spec is None:
            raise CorruptUpdateError("%s: the update changes tensor %r, which the model does not have" % (label, name))
        model_shape, dtype = spec
        if tuple(model_shape) != tuple(shape):
            raise CorruptUpdateError("%s: the update's %r has shape %s, the model's %s"
                                     % (label, name, list(shape), list(model_shape)))
        if dtype != np.float32 or values.typecode != "f":
            raise CorruptUpdateError("%s: tensor %r: only float32 tensors can be updated (model %s, update %s)"
                                     % (label, name, dtype, "float32" if values.typecode == "f" else "int32"))

    def finish_state(self):
        """(the ChainState after the last update, the function that saves it to a path). In memory
        the state takes the decoder's own arrays (no copy; this decoder decodes nothing after)."""
        state = self.state if self.state is not None else ChainState(self.digest)
        if self.writer is None:
            state.capture_decoder(self.decoder.decoder, copy=False)
            return state, state.save

        def save(path):
            self.writer.save(path, state)
            state._stored = path  # read from there if ever asked for
        return state, save

    def close(self):
        if self.writer is not None:
            self.writer.close()


def apply_update(base, updates, output=None, *, state=None, allow_anonymous=False, chunk_size=DEFAULT_CHUNK_SIZE,
                 threads=None, limits=None, return_state=False, before_replace=None):
    """Apply one update, or a chain of them in order, to a model (the device side).

    ``base``: a model file (.safetensors / .npz; its decoder-state file beside it is used when present)
    or a dict name -> array (then ``state`` may give a ChainState to continue from). ``updates``: one
    update or a list (each a path, bytes or a binary file). ``output``: a model file to write the
    result to atomically, with its decoder-state file (may be ``base`` itself); None writes nothing.

    Each update's record is checked against the model before it is decoded, and its result after;
    any refusal raises an UpdateError subclass (see the module docstring), a bad bitstream NNCError.
    Nothing is written unless every update succeeds. ``allow_anonymous`` applies updates without a
    record (e.g. written by NNCodec) unchecked. ``limits`` (decoder_core.Limits) bounds what a hostile
    update may make the decoder allocate. ``threads`` is accepted for compatibility: updates are
    decoded in slices, on one thread.

    Updates are decoded in slices of at most 256 Ki elements, each added to the model as it comes.
    From a .safetensors file to a .safetensors file the model is never loaded: the base is copied
    beside ``output`` and each slice patched there, and with ``output`` (and no ``state``) the
    decoder state is read from the old state file and written to the new one a slice at a time, so
    memory holds neither the model nor a whole tensor. The result is then a dict of read-only
    arrays mapped from ``output``; otherwise a dict of arrays in memory. Returns the model, or
    (model, ChainState) with ``return_state``.

    ``before_replace(state)`` is called with the ChainState of the result after everything was
    applied and the decoder state written, right before ``output`` is replaced: what must be on
    disk before the new model is (a record of the sequence applied); if it raises, ``output`` is
    not replaced. Temporary files that killed calls left beside ``output`` are removed first; the
    state files of other models beside the model file go once it is replaced, or when the update
    turns out to be applied already (by a call killed before it removed them).
    """
    return _apply(base, updates, output, state=state, allow_anonymous=allow_anonymous, chunk_size=chunk_size,
                  threads=threads, limits=limits, return_state=return_state, before_replace=before_replace)


def _apply(base, updates, output, state=None, allow_anonymous=False, chunk_size=DEFAULT_CHUNK_SIZE, threads=None,
           limits=None, return_state=False, metadata=None, before_replace=None):
    """apply_update; ``metadata`` (a str -> str map) replaces the base's in a .safetensors output."""
    if isinstance(updates, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(updates, "read"):
        updates = [updates]
    state_beside = None
    if isinstance(base, (str, os.PathLike)):
        if output is not None and modelio.format_of(base) == modelio.format_of(output) == "safetensors":
            model = _FileModel(base, output, metadata)
        else:
            if metadata is None and modelio.format_of(base) == "safetensors":
                metadata = modelio.load_metadata(base) or None
            model = _MemoryModel(modelio.load(base), output, metadata)
        if state is None:
            state_beside = base
    elif isinstance(base, dict):
        model = _MemoryModel(base, output, metadata)
    else:
        raise TypeError("base is a model file path or a dict of arrays, not %s" % type(base).__name__)
    if output is not None:
        _clear_leftovers(output)
    applier = None
    try:
        applier = _Applier(model, state, chunk_size, allow_anonymous, limits, state_beside, output)
        for update in updates:
            applier.apply(update)
        new_state, save_state = applier.finish_state()
        tensors = model.tensors if output is None else model.save(new_state, save_state, before_replace)
    finally:
        if applier is not None:
            applier.close()
        model.close()
    if return_state:
        return tensors, new_state
    return tensors


def _model_writer(path, tensors, metadata):
    """A function that writes a model file atomically (see write_model)."""
    path = os.fspath(path)
    if metadata is not None and modelio.format_of(path) != "safetensors":
        metadata = None
    options = {"metadata": metadata} if metadata else {}

    def write():
        with open_sink(path, **options) as sink:
            for name, array in tensors.items():
                sink.write(name, array)
    return write


def write_model(path, tensors, state=None, metadata=None):
    """Write a model file atomically and, with ``state``, its decoder-state file first (see the module
    docstring), then remove the model's decoder-state files for other digests."""
    _with_state(path, state, _model_writer(path, tensors, metadata))


def _with_state(model_path, state, write, save_state=None, before_replace=None):
    """write() the model file model_path with its decoder-state file ``state`` (None: none) written
    first, by ``save_state(path)`` (default ``state.save``), and ``before_replace(state)`` called
    between the two. Then remove the state files beside it for other digests; if write() or
    before_replace fails, remove the state file just made instead (unless one for that digest was
    there before)."""
    if state is None:
        write()
        return
    keep = state_path(model_path, state.model)
    existed = os.path.exists(keep)
    (save_state or state.save)(keep)
    try:
        if before_replace is not None:
            before_replace(state)
        write()
    except BaseException:
        if not existed:
            remove(keep)
        raise
    remove_stale_states(model_path, state.model)


def remove_stale_states(model_path, digest):
    """Remove the state files beside the model file ``model_path`` but the one for ``digest`` (the
    model it holds): the ones of models it no longer holds, and one a killed apply wrote before
    its rename."""
    keep = os.path.abspath(state_path(model_path, digest))
    for stale in _state_files(model_path):
        if os.path.abspath(stale) != keep:
            remove(stale)


def _clear_leftovers(output):
    """Remove the temporary files that applies to ``output`` left when they were killed: the model
    copy and the state file being written."""
    for suffix in (".tmp", STATE_SUFFIX + ".tmp"):
        clear_stale(output, suffix)


# --- encoding (the host) --------------------------------------------------------------------------
def _model(tensors, what):
    if isinstance(tensors, (str, os.PathLike)):
        return modelio.load(tensors)
    if not hasattr(tensors, "items"):
        raise TypeError("%s is a model file path or a dict of arrays, not %s" % (what, type(tensors).__name__))
    return {name: np.asarray(array) for name, array in tensors.items()}


def _check_pair(base, new):
    """Refuse a pair of models an update cannot turn one into the other."""
    if list(sorted(base)) != list(sorted(new)):
        added = sorted(set(new) - set(base))
        removed = sorted(set(base) - set(new))
        raise ValueError("an update cannot add or remove tensors (added: %s; removed: %s)"
                         % (", ".join(added[:5]) or "none", ", ".join(removed[:5]) or "none"))
    for name, b in base.items():
        n = new[name]
        if b.shape != n.shape or b.dtype != n.dtype:
            raise ValueError("tensor %r is %s %s in the base and %s %s in the new model: an update cannot change "
                             "shapes or dtypes" % (name, b.dtype, list(b.shape), n.dtype, list(n.shape)))
        if b.dtype != np.float32 and not np.array_equal(b, n):
            raise ValueError("tensor %r (%s) differs: only float32 tensors can change in an update" % (name, b.dtype))


def sparsify(difference, sparsity=None, row_sparsity=None):
    """Zero the smallest parts of a difference tensor (a new array; the input is not changed).

    ``row_sparsity``: this fraction of the rows of the tensor's 2-D view (first dimension by the rest;
    tensors of 2 or more dimensions only), smallest L2 norm first, become all zero, so that row
    skipping (supplement 6.5) removes them whole. ``sparsity``: then at least this fraction of the
    elements are zero, the smallest magnitudes first (ties by position).
    """
    d = np.array(difference, dtype=np.float32, copy=True)
    if row_sparsity and d.ndim >= 2 and d.shape[0] > 1:
        rows = d.reshape(d.shape[0], -1)
        count = int(row_sparsity * rows.shape[0])
        if count:
            norms = np.sqrt(np.square(rows, dtype=np.float64).sum(axis=1))
            rows[np.argsort(norms, kind="stable")[:count]] = 0
    if sparsity:
        flat = d.reshape(-1)
        count = int(sparsity * flat.size)
        if count:
            flat[np.argsort(np.abs(flat), kind="stable")[:count]] = 0
    return d


def _encoder_for(state, tca, hdsp, threads, reflist):
    """An update-chain Encoder carrying the chain state (TCA bases, HDSP history, depths, ids)."""
    from .encoder.encoding import Encoder  # the host side only: devices import nnc_edge.updates without the encoder

    # NNCodec needs names and the (empty) NNR_TPL unit; our updates name tensors by index instead.
    enc = Encoder(profile=1, parent_signalling=True, tca=tca, hdsp=hdsp, threads=threads, topology=reflist is None,
                  reflist=reflist)
    if state is not None:
        # The encoder's chain (nnc_edge.encoder.encoding._Chain) mirrors the decoder state kept in the ChainState.
        chain = enc.chain
        for name, levels in state.bases.items():
            chain.bases[name] = np.ascontiguousarray(levels, dtype=np.int32).reshape(-1)
        for name, hist in state.history.items():
            chain.history[name] = np.asarray(hist).reshape(-1) != 0
        chain.depth.update(state.encoder_depths)
        enc.parameter_ids.update(state.parameter_ids)
    return enc


def _check_mirror(enc, state, names):
    """The encoder's chain state must be what our decoder keeps: else the next update would not decode."""
    for name in names:
        ours = enc.chain.bases.get(name)
        theirs = state.bases.get(name)
        if (ours is None) != (theirs is None) or (ours is not None and not np.array_equal(ours, theirs)):
            raise RuntimeError("encoder and decoder disagree on the chain state of %r" % name)


def _with_record(body, info, nncodec_compatible):
    """The encoder's stream with the update record: a unit right after NNR_STR, or the MPS base_model_id."""
    str_end = nnr_unit_size(body, 0)[0]
    if not nncodec_compatible:
        return body[:str_end] + info.unit() + body[str_end:]
    from .encoder.unitwriter import model_parameter_set_unit

    state = ParserState()
    parse_unit(body, 0, str_end, state)
    mps_end = str_end + nnr_unit_size(body, str_end)[0]
    mps = parse_unit(body, str_end, mps_end, state).mps.as_dict()
    mps.pop("base_model_id_present_flag", None)
    mps["base_model_id"] = info.to_text()
    return body[:str_end] + model_parameter_set_unit(mps, general_profile_idc=1) + body[mps_end:]


def encode_update(base, new, *, qp=-32, dq=True, sparsity=None, row_sparsity=None, tca=True, hdsp=None,
                  residual=None, error_feedback=True, sequence=None, nncodec_compatible=False, return_model=False,
                  threads=None, **options):
    """Code ``new - base`` as an update bitstream for a device that runs ``base`` (see the module docstring).

    ``base``, ``new``: model file paths or dicts name -> array with the same tensors, shapes and dtypes;
    only float32 tensors may differ. ``qp``, ``dq`` and any further ``options`` of
    nnc_edge.Encoder.encode (e.g. ``nonweight_qp``, ``scan_order``) choose the quantization;
    ``sparsity`` / ``row_sparsity`` zero the smallest differences (see ``sparsify``); ``tca`` / ``hdsp``
    use the previous update's integer tensors / the chain's significance history (with a chain state;
    HDSP per NDU only where it makes the NDU smaller, and by default not with ``nncodec_compatible``,
    since NNCodec decodes HDSP only when its application passes an HDSP tool). ``residual``: the chain
    state, a ChainState or the path of its file (created from ``base`` when missing, saved after);
    ``base`` must then be the model the previous update produced. ``error_feedback`` (with a chain
    state) adds the residual to this update and keeps the new one. ``sequence``: the sequence number
    of a stand-alone update (default 1); with a chain state it must be the next one if given.
    ``nncodec_compatible`` carries the record in the MPS base_model_id instead of its own unit.

    Returns the bitstream; with ``return_model`` (bitstream, the model after the update as the
    device will compute it, bit for bit; unchanged tensors are the base's own arrays).
    """
    base = _model(base, "base")
    new = _model(new, "new")
    _check_pair(base, new)
    for label, value in (("sparsity", sparsity), ("row_sparsity", row_sparsity)):
        if value is not None and not 0.0 <= value < 1.0:
            raise ValueError("%s must be in [0, 1), not %r" % (label, value))
    parent = model_digest(base)
    state_file = None
    state = residual
    if isinstance(residual, (str, os.PathLike)):
        state_file = residual
        state = ChainState.load(residual) if os.path.exists(residual) else ChainState(parent)
    elif residual is not None and not isinstance(residual, ChainState):
        raise TypeError("residual is a ChainState or the path of its file, not %s" % type(residual).__name__)
    if state is not None:
        if state.model != parent:
            raise ValueError("the base (digest %s) is not the model the chain's last update produced (%s, update %d)"
                             % (parent.hex()[:16], state.model.hex()[:16], state.sequence))
        if sequence is not None and sequence != state.sequence + 1:
            raise ValueError("the chain is at update %d: the next one is %d, not %d"
                             % (state.sequence, state.sequence + 1, sequence))
        sequence, root = state.sequence + 1, state.root
    else:
        sequence = 1 if sequence is None else sequence
        root = parent if sequence == 1 else NO_DIGEST
    if not 1 <= sequence < (1 << 32):
        raise ValueError("sequence must be in 1..2^32-1, not %r" % (sequence,))

    # The differences to code (the residual added), unchanged tensors left out.
    feedback = state is not None and error_feedback
    targets = {}
    diffs = {}
    for name, b in base.items():
        if b.dtype != np.float32:
            continue
        d = np.subtract(new[name], b, dtype=np.float32)
        if feedback and name in state.residual:
            d += state.residual[name].reshape(d.shape)
        if not np.isfinite(d).all():
            raise ValueError("tensor %r: the difference is not finite" % name)
        if not d.any():
            continue
        targets[name] = d
        if sparsity or row_sparsity:
            d = sparsify(d, sparsity, row_sparsity)
            if not d.any():
                continue
        diffs[name] = d

    if hdsp is None:
        hdsp = not nncodec_compatible
    topology = update_topology(base)
    enc = _encoder_for(state, tca, hdsp, threads, None if nncodec_compatible else [n for n, _ in topology])
    if state is None or not state.parameter_ids:
        # A tensor keeps its place in the model as parameter_id along the chain (as NNCodec numbers them).
        for i, name in enumerate(base):
            enc.parameter_ids.setdefault(name, i)
    body = enc.encode(diffs, qp=qp, dq=dq, **options)

    # The host's view: base + our own decoding of the update, with the chain's decoder state.
    from .decoding import Decoder

    decoder = Decoder(topology, threads=threads)
    if state is not None:
        state.restore_decoder(decoder._core)
    decoded = decoder.decode(body)
    model = dict(base)
    for name, d in decoded.items():
        model[name] = add_difference(base[name], d)
    result = model_digest(model)
    continues = any(r.tca or r.hdsp for r in enc.report)
    info = UpdateInfo(sequence, parent, result, root, continues)
    data = _with_record(body, info, nncodec_compatible)

    if state is not None:
        state.capture_decoder(decoder._core)
        _check_mirror(enc, state, diffs)
        state.encoder_depths = dict(enc.chain.depth)
        state.parameter_ids = dict(enc.parameter_ids)
        state.model = result
        state.sequence = sequence
        if feedback:
            kept = {}
            for name, target in targets.items():
                left = target - decoded[name] if name in decoded else target
                if left.any():
                    kept[name] = left
            state.residual = kept
        if state_file is not None:
            state.save(state_file)
    if return_model:
        return data, model
    return data
