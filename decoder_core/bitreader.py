"""Bit reader with the descriptors of clause 6.1.3.

Positions are bit offsets from the start of the current NNR unit (get_bit_pointer()); the
reader never reads outside ``[unit_start, unit_end)`` of the underlying buffer.
"""

import struct

from .errors import Incomplete, NNCError
from .limits import DEFAULT_MAX_STRING_BYTES, LimitError

# An st(v) longer than this is treated as hostile (Limits.max_string_bytes; parse_unit sets it per reader).
MAX_STRING_BYTES = DEFAULT_MAX_STRING_BYTES


class BitReader:
    def __init__(self, data, start=0, end=None):
        self.data = data
        self.start = start
        self.end = len(data) if end is None else end
        if self.end > len(data) or start > self.end:
            raise NNCError("unit extends past the end of the data", start, "nnr_unit")
        self.pos = start * 8  # absolute bit position in data
        self.max_string_bytes = MAX_STRING_BYTES
        # True while ``end`` is only where the bytes that have arrived end (the unit goes on):
        # running out of them raises Incomplete instead of a truncation error.
        self.partial = False

    # --- positions -----------------------------------------------------------------------------
    def get_bit_pointer(self):
        return self.pos - self.start * 8

    def set_bit_pointer(self, pointer):
        if pointer < 0 or pointer > (self.end - self.start) * 8:
            raise NNCError("bit pointer %d outside the NNR unit" % pointer, self.start, "set_bit_pointer")
        self.pos = self.start * 8 + pointer

    def byte_offset(self):
        """Absolute byte offset of the next bit, for error messages."""
        return self.pos >> 3

    def byte_aligned(self):
        return (self.pos & 7) == 0

    def bits_left(self):
        return self.end * 8 - self.pos

    def more_data_in_nnr_unit(self):
        return self.pos < self.end * 8

    def _need(self, n, element):
        if self.pos + n > self.end * 8:
            self._ran_out(element)

    def _ran_out(self, element):
        if self.partial:
            raise Incomplete("more bytes of the NNR unit are needed", self.pos >> 3, element)
        raise NNCError("NNR unit ends inside a syntax element", self.pos >> 3, element)

    # --- fixed-length descriptors ------------------------------------------------------------------
    def read_bits(self, n, element="read_bits"):
        if n == 0:
            return 0
        self._need(n, element)
        data = self.data
        pos = self.pos
        value = 0
        # Take whole bytes where possible; n is at most 512 for any syntax element.
        while n > 0:
            byte = data[pos >> 3]
            avail = 8 - (pos & 7)
            take = avail if avail < n else n
            value = (value << take) | ((byte >> (avail - take)) & ((1 << take) - 1))
            pos += take
            n -= take
        self.pos = pos
        return value

    def u(self, n, element="u(n)"):
        return self.read_bits(n, element)

    def f(self, n, element="f(n)"):
        return self.read_bits(n, element)

    def i(self, n, element="i(n)"):
        value = self.read_bits(n, element)
        if n and value >= 1 << (n - 1):
            value -= 1 << n
        return value

    def flag(self, element="flag"):
        return self.read_bits(1, element)

    # --- Exp-Golomb ----------------------------------------------------------------------------
    def ue(self, k, element="ue(k)"):
        # 6.1.3: a prefix of zeros terminated by a one, then k + prefix suffix bits.
        x = 0
        while True:
            if self.read_bits(1, element):
                break
            x += 1 << k
            k += 1
            if k > 64:
                raise NNCError("Exp-Golomb prefix longer than 64 bits", self.pos >> 3, element)
        if k > 0:
            x += self.read_bits(k, element)
        return x

    def ie(self, k, element="ie(k)"):
        val = self.ue(k, element)
        if val & 1:
            return (val + 1) >> 1
        return -(val >> 1)

    # --- byte-oriented descriptors ------------------------------------------------------------
    def flt(self, n, element="flt(n)"):
        if n not in (32, 64):
            raise NNCError("flt(%d) is not supported" % n, self.pos >> 3, element)
        if not self.byte_aligned():
            # flt() need not be byte aligned: gather the bits into bytes first.
            raw = bytes(self.read_bits(8, element) for _ in range(n >> 3))
        else:
            self._need(n, element)
            start = self.pos >> 3
            raw = bytes(self.data[start:start + (n >> 3)])
            self.pos += n
        return struct.unpack("<f" if n == 32 else "<d", raw)[0]

    def st(self, element="st(v)"):
        if not self.byte_aligned():
            raise NNCError("st(v) must start byte-aligned", self.pos >> 3, element)
        start = self.pos >> 3
        data = self.data
        longest = self.max_string_bytes
        limit = min(self.end, start + longest + 1)
        j = start
        while j < limit and data[j] != 0:
            j += 1
        if j >= start + longest + 1:
            raise LimitError("string longer than the limit of %d bytes (max_string_bytes)" % longest, start, element,
                             "max_string_bytes")
        if j >= self.end:
            if self.partial:
                self._ran_out(element)
            raise NNCError("string has no terminating zero byte", start, element)
        raw = bytes(data[start:j])
        self.pos = (j + 1) * 8
        try:
            return raw.decode("utf-8")
        except UnicodeError:
            raise NNCError("string is not valid UTF-8", start, element)

    def bs(self, element="bs(v)"):
        if not self.byte_aligned():
            raise NNCError("bs(v) must start byte-aligned", self.pos >> 3, element)
        start = self.pos >> 3
        self.pos = self.end * 8
        return bytes(self.data[start:self.end])

    def byte_alignment(self, element="byte_alignment()"):
        # 6.3.5: a one bit, then zero bits up to the byte boundary.
        if self.read_bits(1, element) != 1:
            raise NNCError("alignment_bit_equal_to_one is 0", self.pos >> 3, element)
        while not self.byte_aligned():
            if self.read_bits(1, element) != 0:
                raise NNCError("alignment_bit_equal_to_zero is 1", self.pos >> 3, element)
