"""Small helpers that behave the same on CPython and MicroPython."""

import sys
from array import array

_ITEMSIZE = {"b": 1, "B": 1, "h": 2, "H": 2, "i": 4, "I": 4, "f": 4, "d": 8}
_LITTLE = sys.byteorder == "little"


def _has_frombytes():
    return hasattr(array("b"), "frombytes")


_CPYTHON_ARRAY = _has_frombytes()


def zeros(typecode, n):
    """An array of n zeros without building an n-element list first."""
    if not _CPYTHON_ARRAY:
        # MicroPython sizes the array from the memoryview's length and fills it by iterating: a
        # temporary of n bytes instead of n * itemsize.
        return array(typecode, memoryview(bytearray(n)))
    raw = bytes(n * _ITEMSIZE[typecode])
    return from_raw(typecode, raw)


def from_raw(typecode, raw):
    """An array over little-endian raw bytes (copied)."""
    if _CPYTHON_ARRAY:
        a = array(typecode)
        a.frombytes(raw)
        if not _LITTLE and _ITEMSIZE[typecode] > 1:
            a.byteswap()
        return a
    # MicroPython builds an array from a buffer's raw bytes; its ports are little-endian.
    return array(typecode, raw)
