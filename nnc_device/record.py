"""An update's identity record and the model digest, for the device (MicroPython and CPython).

The format is nnc_edge.updates' (its docstring is the specification): an update stream carries
its record in an NNR unit of the unspecified type 40 right after NNR_STR, whose payload is the 106
bytes ``"NNCU" u8(version 1) u8(flags) u32(sequence) root[32] parent[32] result[32]`` (big-endian;
flags bit 0: the update continues its predecessor's decoder state), or, in NNCodec-compatible
streams, as the text ``nnc-edge-update/1;seq=N;flags=F;root=HEX;parent=HEX;result=HEX`` in the
MPS base_model_id. The model digest is SHA-256 over the tensors in the order of their names' UTF-8
bytes. This is a second, small implementation because the device cannot import nnc_edge (numpy);
tests/test_device_store.py checks both agree.
"""

import struct

from decoder_core.errors import NNCError
from decoder_core.tables import NNR_MPS, NNR_STR
from decoder_core.units import ParserState, nnr_unit_size, parse_unit

RECORD_UNIT_TYPE = 40
_MAGIC = b"NNCU"
_VERSION = 1
_SIZE = 106
_CONTINUES_STATE = 1
_TEXT_PREFIX = "nnc-edge-update/"
_TEXT_KEYS = ("seq", "flags", "root", "parent", "result")
_DIGEST_DOMAIN = b"nnc-edge model sha256 v1\x00"
# The record sits in the first units (NNR_STR, the record unit, NNR_MPS); more bytes than this
# before the first other unit is not an update this device takes.
MAX_LEADING_BYTES = 4096


class UpdateRecord:
    """``sequence``, ``parent``, ``result``, ``root`` (32-byte digests) and ``continues_state``."""

    def __init__(self, sequence, parent, result, root, continues_state):
        self.sequence = sequence
        self.parent = parent
        self.result = result
        self.root = root
        self.continues_state = continues_state


def parse_record(payload, offset=None):
    """The UpdateRecord in the payload of a record unit; NNCError if it is not a valid one."""
    if len(payload) != _SIZE or bytes(payload[0:4]) != _MAGIC:
        raise NNCError("unit of type %d is not an nnc-edge update record (%d bytes)" % (RECORD_UNIT_TYPE, len(payload)),
                       offset, "update record")
    if payload[4] != _VERSION:
        raise NNCError("update record version %d is not supported (1 is)" % payload[4], offset, "update record")
    flags = payload[5]
    if flags & ~_CONTINUES_STATE:
        raise NNCError("update record flags 0x%02x has unknown bits" % flags, offset, "update record")
    return UpdateRecord(struct.unpack(">I", payload[6:10])[0], bytes(payload[42:74]), bytes(payload[74:106]),
                        bytes(payload[10:42]), bool(flags & _CONTINUES_STATE))


def parse_record_text(text, offset=None):
    """The UpdateRecord written as text into an MPS base_model_id."""
    fields = text[len(_TEXT_PREFIX):].split(";")
    values = {}
    try:
        if fields[0] != str(_VERSION) or len(fields) != 1 + len(_TEXT_KEYS):
            raise ValueError("version or field count")
        for key, field in zip(_TEXT_KEYS, fields[1:]):
            name, _, value = field.partition("=")
            if name != key:
                raise ValueError(key)
            values[key] = value
        flags = int(values["flags"])
        digests = [bytes.fromhex(values[k]) for k in ("parent", "result", "root")]
        if flags & ~_CONTINUES_STATE or [len(d) for d in digests] != [32, 32, 32]:
            raise ValueError("flags or digest length")
        return UpdateRecord(int(values["seq"]), digests[0], digests[1], digests[2], bool(flags & _CONTINUES_STATE))
    except ValueError:
        raise NNCError("base_model_id %r is not a valid nnc-edge update record" % text[:100], offset, "base_model_id")


class LeadingUnits:
    """Finds the record in the first bytes of a stream as they arrive: ``push(chunk)`` keeps them in
    ``data`` until the first unit that is neither NNR_STR, NNR_MPS nor a record unit begins (or
    the stream ends: ``finish()``); then ``done`` is True and ``record`` the UpdateRecord or None.
    ``data`` is then the stream's beginning, to be decoded."""

    def __init__(self):
        self.data = bytearray()
        self.record = None
        self.done = False
        self._pos = 0  # start of the next unit in data
        self._state = ParserState()

    def push(self, chunk):
        self.data.extend(chunk)
        data = self.data
        while not self.done:
            pos = self._pos
            if len(data) - pos < 3:
                break
            nbytes = 4 if data[pos] & 0x80 else 2
            if len(data) - pos <= nbytes:
                break
            unit_type = data[pos + nbytes] >> 2
            if unit_type not in (NNR_STR, NNR_MPS, RECORD_UNIT_TYPE):
                self.done = True
                break
            end = pos + nnr_unit_size(data, pos)[0]
            if end > MAX_LEADING_BYTES:
                raise NNCError("the units before the first tensor exceed %d bytes" % MAX_LEADING_BYTES, pos,
                               "nnr_unit_size")
            if len(data) < end:
                break
            self._take(parse_unit(data, pos, end, self._state), pos, end)
            self._pos = end
        return self.done

    def _take(self, unit, pos, end):
        if unit.nnr_unit_type == RECORD_UNIT_TYPE:
            if self.record is not None:
                raise NNCError("more than one update record", pos, "update record")
            if unit.partial_data_counter:
                raise NNCError("the update record is split into partial units", pos, "update record")
            self.record = parse_record(self.data[unit.header_end:end], pos)
        elif unit.nnr_unit_type == NNR_MPS and self.record is None:
            text = unit.mps.get("base_model_id")
            if text is not None and text.startswith(_TEXT_PREFIX):
                self.record = parse_record_text(text, pos)

    def finish(self):
        """The stream ended while the leading units were read: what has arrived is all there is."""
        self.done = True


def model_digest(tensors, update):
    """The model digest (32 bytes) of ``tensors``, (name, dtype string such as "<f4", shape, byte
    count) tuples in any order; ``update(name, h)`` passes the tensor's raw little-endian bytes to
    ``h.update`` (a file a piece at a time). None where hashlib has no SHA-256 (a minimal port).
    The fields go through three reused buffers: a model of many tensors makes no garbage per tensor."""
    try:
        from hashlib import sha256
    except ImportError:
        return None
    h = sha256(_DIGEST_DOMAIN)
    u8, u32, u64 = bytearray(1), bytearray(4), bytearray(8)
    ordered = sorted(tensors, key=lambda t: t[0].encode("utf-8"))
    struct.pack_into("<I", u32, 0, len(ordered))
    h.update(u32)
    for name, dtype, shape, nbytes in ordered:
        raw = name.encode("utf-8")
        struct.pack_into("<I", u32, 0, len(raw))
        h.update(u32)
        h.update(raw)
        u8[0] = len(dtype)
        h.update(u8)
        h.update(dtype.encode("ascii"))
        u8[0] = len(shape)
        h.update(u8)
        for d in shape:
            struct.pack_into("<Q", u64, 0, d)
            h.update(u64)
        struct.pack_into("<Q", u64, 0, nbytes)
        h.update(u64)
        update(name, h)
    return h.digest()
