"""Expected tensors exported by tests/test_micropython.py, checked on MicroPython (decoded tensors,
or the files of a device store).

An expectation file NAME.json holds {"name", "chain", "nnc", "tensors": [{"name", "type" ("f" float32 or
"i" int32), "shape", "bytes", "crc32", "raw"}]}; "raw" names a file with the tensor's little-endian bytes.
"""

import binascii
import json


def load(path):
    with open(path) as f:
        return json.load(f)


def _kind(values):
    # MicroPython arrays have no .typecode: the item type tells float32 from int32.
    if not len(values):
        return None
    return "f" if isinstance(values[0], float) else "i"


def mismatch(expected, name, shape, values, raw=None):
    """None if (name, shape, values) is the expected tensor bit for bit, else what differs.

    Compares the CRC-32 of the tensor's bytes and, when ``raw`` (the expected bytes) is given, the
    bytes themselves.
    """
    if name != expected["name"]:
        return "tensor %r where %r was expected" % (name, expected["name"])
    if list(shape) != expected["shape"]:
        return "%s: shape %r, expected %r" % (name, list(shape), expected["shape"])
    kind = _kind(values)
    if kind is not None and kind != expected["type"]:
        return "%s: element type %s, expected %s" % (name, kind, expected["type"])
    if 4 * len(values) != expected["bytes"]:
        return "%s: %d elements, expected %d" % (name, len(values), expected["bytes"] // 4)
    crc = binascii.crc32(values) & 0xFFFFFFFF
    if crc != expected["crc32"]:
        return "%s: CRC-32 %08x, expected %08x" % (name, crc, expected["crc32"])
    if raw is not None and bytes(values) != raw:
        return "%s: bytes differ from the expected tensor" % name
    return None


def file_mismatches(path, expected, buf):
    """What differs between a file holding the expected tensors' bytes one after the other and the
    expectation: a list of messages, empty when each tensor's bytes are the expected ones.
    ``buf``: a bytearray the file is read through."""
    errors = []
    with open(path, "rb") as f:
        for e in expected["tensors"]:
            if _crc(f, buf, e["bytes"]) != (e["bytes"], e["crc32"]):
                errors.append("%s: its bytes in %s differ from the expected tensor" % (e["name"], path))
        if f.readinto(buf):
            errors.append("%s goes on after the expected tensors" % path)
    return errors


def _crc(f, buf, limit=None):
    """(size, CRC-32) of what ``f`` holds from here, up to ``limit`` bytes."""
    crc = size = 0
    view = memoryview(buf)
    while limit is None or size < limit:
        want = len(buf) if limit is None or limit - size > len(buf) else limit - size
        n = f.readinto(view[:want])
        if not n:
            break
        crc = binascii.crc32(view[:n], crc)
        size += n
    return size, crc & 0xFFFFFFFF


def store_mismatches(index, expected, directory, buf):
    """What differs between the tensors of a device store (its index, nnc_device.store) and an
    expectation: a list of messages, empty when every file is the expected tensor bit for bit.
    ``buf``: a bytearray the files are read through."""
    errors = []
    got = [t["name"] for t in index["tensors"]]
    want = [e["name"] for e in expected["tensors"]]
    if got != want:
        errors.append("tensors %r, expected %r" % (got, want))
    for t, e in zip(index["tensors"], expected["tensors"]):
        with open(directory + "/" + t["file"], "rb") as f:
            size, crc = _crc(f, buf)
        if t["dtype"] != "<%s4" % e["type"] or t["shape"] != e["shape"] or size != e["bytes"] \
                or crc != e["crc32"]:
            errors.append("%s: the stored file differs from the expected tensor" % t["name"])
    return errors
