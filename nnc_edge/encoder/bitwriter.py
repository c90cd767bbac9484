"""Bit writer with the descriptors of clause 6.1.3: the mirror of decoder_core.bitreader."""

import struct


class BitWriter:
    def __init__(self):
        self._bytes = bytearray()
        self._acc = 0      # pending bits, MSB first
        self._nacc = 0     # number of pending bits (0..7)

    def __len__(self):
        """Number of bits written."""
        return 8 * len(self._bytes) + self._nacc

    def byte_aligned(self):
        return self._nacc == 0

    def u(self, n, value):
        if value < 0 or value >> n:
            raise ValueError("%d does not fit in u(%d)" % (value, n))
        acc = (self._acc << n) | value
        nacc = self._nacc + n
        while nacc >= 8:
            nacc -= 8
            self._bytes.append((acc >> nacc) & 0xFF)
        self._acc = acc & ((1 << nacc) - 1)
        self._nacc = nacc
        return self

    f = u

    def flag(self, value):
        return self.u(1, 1 if value else 0)

    def i(self, n, value):
        if not -(1 << (n - 1)) <= value < (1 << (n - 1)):
            raise ValueError("%d does not fit in i(%d)" % (value, n))
        return self.u(n, value & ((1 << n) - 1))

    def ue(self, k, value):
        """k-th order Exp-Golomb, the inverse of the ue(k) parsing process of 6.1.3."""
        if value < 0:
            raise ValueError("ue(k) takes non-negative values, not %d" % value)
        while value >= (1 << k):
            self.u(1, 0)
            value -= 1 << k
            k += 1
        self.u(1, 1)
        if k:
            self.u(k, value)
        return self

    def ie(self, k, value):
        return self.ue(k, 2 * value - 1 if value > 0 else -2 * value)

    def flt(self, n, value):
        self.bytes(struct.pack("<f" if n == 32 else "<d", value), aligned=False)
        return self

    def st(self, text):
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if b"\x00" in raw:
            raise ValueError("st(v) cannot hold a zero byte")
        return self.bytes(raw + b"\x00")

    def bytes(self, raw, aligned=True):
        if aligned and not self.byte_aligned():
            raise ValueError("byte sequence must start byte-aligned")
        if self.byte_aligned():
            self._bytes.extend(raw)
        else:
            for b in raw:
                self.u(8, b)
        return self

    bs = bytes

    def byte_alignment(self):
        """6.3.5: a one bit, then zeros to the byte boundary."""
        self.u(1, 1)
        while not self.byte_aligned():
            self.u(1, 0)
        return self

    def zero_pad(self):
        """Zero bits up to the byte boundary (no leading one bit)."""
        while not self.byte_aligned():
            self.u(1, 0)
        return self

    def getvalue(self):
        if self._nacc:
            raise ValueError("bit writer is not byte-aligned (%d pending bits)" % self._nacc)
        return bytes(self._bytes)
