"""Reconstruction of parameter values from quantization levels (7.3.6, supplement 4.1 and 4.3).

The pure-Python reference of what decoder_core._deepcabac.reconstruct does in C; backend.py and
payload.py both use it, and it imports neither (no import cycle).
"""

from array import array

from .compat import from_raw, zeros
from .errors import NNCError

# Levels -R..R whose reconstructed value level_values() keeps (2R + 1 slots, at most 16 bytes of
# float each on MicroPython: about 5 KB). Measured on silero-vad: 5 % of the levels lie outside 127.
_LEVEL_TABLE_RADIUS = 127
# Integers of at most 24 bits are exact in float32.
_EXACT = 1 << 24


def _f32(x):
    a = array("f", [0.0])
    a[0] = x
    return a[0]


def step_size(qp, qp_density):
    """7.3.6 as corrected in supplement 4.1."""
    mul = (1 << qp_density) + (qp & ((1 << qp_density) - 1))
    exponent = (qp >> qp_density) - qp_density
    if exponent > 1000:
        return float("inf")
    if exponent < -1100:
        return 0.0
    return mul * 2.0 ** exponent


def reconstruct(levels, qp, qp_density, codebook=None, zero_offset=0, where=0, in_place=False, out=None):
    """recParam = QuantParam (or Codebook[QuantParam + CbZeroOffset]) * stepSize, as float32.

    NNCodec multiplies float32(QuantParam) by float32(stepSize) in float32 (uniform and DQ) and
    Codebook values by stepSize in float64 (supplement 4.3); both are reproduced exactly here.
    With ``in_place`` (CPython only) the float32 values overwrite the int32 ``levels`` buffer,
    which is returned; with ``out`` (an array('f') as long as ``levels``) they go there.
    """
    step = step_size(qp, qp_density)
    if in_place:
        return _reconstruct_in_place(levels, step, codebook, zero_offset, where)
    n = len(levels)
    if codebook is not None:
        return _codebook_values(levels, zeros("f", n) if out is None else out, codebook, step, zero_offset, where)
    if out is None:
        values = array("f", levels)  # float32(QuantParam)
        if _f32(step) == 1.0:
            return values
    else:
        values = out
    value_of = level_values(step)
    for i in range(n):
        values[i] = value_of(levels[i])
    return values


def level_values(step, keep=1024):
    """value_of(QuantParam) = float32(QuantParam) * float32(stepSize), rounded once to float32: the
    uniform reconstruction, for reconstruct() and for decoding straight into values
    (deepcabac.decode_tensor_values).

    Each level's product (exact double product of two float32, rounded once on store) is formed
    once: MicroPython boxes every float it computes, so multiplying per element would allocate for
    every parameter. Levels cluster around 0: a table holds |level| <= _LEVEL_TABLE_RADIUS, and up to
    ``keep`` other levels are kept in a dict. A whole tensor decoded in one call wants them kept (its
    garbage is not collected before it ends); slice decoding, collected between chunks, keeps none.
    """
    s32 = _f32(step)
    one = array("f", [0.0])
    radius = _LEVEL_TABLE_RADIUS
    table = [None] * (2 * radius + 1)
    rare = {}

    def value_of(level):
        if -radius <= level <= radius:
            v = table[level + radius]
            if v is None:
                v = table[level + radius] = level * s32
            return v
        v = rare.get(level) if keep else None
        if v is None:
            if -_EXACT <= level <= _EXACT:
                v = level * s32  # one boxed float: below 2**24 a level is its own float32
            else:
                one[0] = level  # float32(QuantParam) rounds
                v = one[0] * s32
            if len(rare) < keep:
                rare[level] = v
        return v
    return value_of


_ONE = array("f", [0.0])  # LevelHalves: float32(level) for levels beyond 2**24


class LevelHalves:
    """level_values() without a float object, for MicroPython with uctypes (slice decoding,
    incremental.py): a float there is a 16-byte heap object, a table of them some KB, and every
    product is one more.

    fill() turns the int32 levels at the start of an array('f') (read through ``ints``, a uctypes
    INT32 view of the same memory) into their values, written through ``halves`` (a UINT16 view).
    A value is float32(level * step), rounded once, as level_values() computes it, here in small
    integers (_product_halves). Levels up to ``radius`` keep theirs in a table of 16-bit halves.
    """

    def __init__(self, step, radius=_LEVEL_TABLE_RADIUS):
        s32 = self.s32 = _f32(step)
        self.radius = radius
        # The low and high half of each level's value; a high half of 0 (+0.0 or a tiny positive
        # subnormal) is computed anew each time.
        self.table = array("H", range(4 * radius + 2))  # sized from len(): no temporary
        for j in range(1, 4 * radius + 2, 2):
            self.table[j] = 0
        # s32 = m * 2**e (m < 2**24); m None: s32 is infinite
        _ONE[0] = s32
        bits = from_raw("I", bytes(_ONE))[0]
        biased = (bits >> 23) & 0xFF
        self.m = None if biased == 0xFF else ((bits & 0x7FFFFF) | (0x800000 if biased else 0))
        self.e = (biased if biased else 1) - 150

    def fill(self, out, ints, halves, n):
        table = self.table
        r = self.radius
        top = 2 * r
        m = self.m
        e = self.e
        for i in range(n):
            k = ints[i]
            if k:  # a zero level stays 0.0, as in the decoder's loop (it writes no zeros)
                j = k + r
                if 0 <= j <= top:
                    j += j
                    h = table[j + 1]
                    if h == 0:
                        _product_halves(k, m, e, table, j)
                        h = table[j + 1]
                    halves[2 * i] = table[j]
                    halves[2 * i + 1] = h
                elif -_EXACT <= k <= _EXACT:
                    _product_halves(k, m, e, halves, 2 * i)
                else:
                    one = _ONE
                    one[0] = k  # float32(QuantParam) rounds
                    out[i] = one[0] * self.s32


def _bit_length(x):
    n = 0
    while x >> (n + 4):
        n += 4
    while x >> n:
        n += 1
    return n


def _product_halves(k, m, e, dest, at):
    """dest[at], dest[at + 1] = the low and high 16-bit halves of float32(k * m * 2**e), rounded
    once to nearest even, for 0 < |k| <= 2**24 and 0 <= m < 2**24 (m None: an infinite factor),
    with integers below 2**30 only (small ints on MicroPython: nothing allocated)."""
    sign = 0
    if k < 0:
        sign = 0x8000
        k = -k
    if m is None:
        dest[at] = 0
        dest[at + 1] = sign | 0x7F80
        return
    # The exact product P = c2 * 2**24 + c1 * 2**12 + c0 in limbs of 12 bits (c2 below 2**25).
    kh = k >> 12
    kl = k & 0xFFF
    mh = m >> 12
    ml = m & 0xFFF
    c0 = kl * ml
    c1 = kh * ml + kl * mh + (c0 >> 12)
    c0 &= 0xFFF
    c2 = kh * mh + (c1 >> 12)
    c1 &= 0xFFF
    if c2:
        size = _bit_length(c2) + 24
    elif c1:
        size = _bit_length(c1) + 12
    elif c0:
        size = _bit_length(c0)
    else:
        dest[at] = 0
        dest[at + 1] = sign
        return
    q = e + size - 24  # the exponent of the result's last significant bit
    if q < -149:
        q = -149  # subnormal
    s = q - e  # low bits of P dropped
    if s <= 0:
        mant = ((c1 << 12) | c0) << -s  # P < 2**24 here: exact
    elif s >= 50:
        mant = 0  # P < 2**49: below half of the smallest subnormal
    else:
        # The limbs' bits are disjoint: shifting each and or-ing them is P >> s.
        mant = (c2 << (24 - s) if s <= 24 else c2 >> (s - 24)) | (c1 << (12 - s) if s <= 12 else c1 >> (s - 12)) \
            | c0 >> s
        r = s - 1  # the rounding bit; below it the sticky bits
        if r >= 24:
            bit = (c2 >> (r - 24)) & 1
            sticky = c2 & ((1 << (r - 24)) - 1) or c1 or c0
        elif r >= 12:
            bit = (c1 >> (r - 12)) & 1
            sticky = c1 & ((1 << (r - 12)) - 1) or c0
        else:
            bit = (c0 >> r) & 1
            sticky = c0 & ((1 << r) - 1)
        if bit and (sticky or mant & 1):
            mant += 1
            if mant == 1 << 24:
                mant = 1 << 23
                q += 1
    if mant >= 1 << 23:
        biased = q + 150
        if biased >= 0xFF:
            dest[at] = 0
            dest[at + 1] = sign | 0x7F80
            return
        mant -= 1 << 23
        dest[at] = mant & 0xFFFF
        dest[at + 1] = sign | (biased << 7) | (mant >> 16)
        return
    dest[at] = mant & 0xFFFF
    dest[at + 1] = sign | (mant >> 16)


_last_codebook = [None]  # (codebook, step, values): slice decoding reconstructs a tensor in many calls


def _scaled_codebook(codebook, step):
    last = _last_codebook[0]
    if last is not None and last[0] is codebook and last[1] == step and len(last[2]) == len(codebook):
        return last[2]
    scaled = [v * step for v in codebook]
    _last_codebook[0] = (codebook, step, scaled)
    return scaled


def _codebook_values(levels, values, codebook, step, zero_offset, where):
    """values[i] = Codebook[levels[i] + CbZeroOffset] * stepSize (float64 product, one rounding);
    ``values`` may be a float32 view of the same memory as ``levels``."""
    size = len(codebook)
    scaled = _scaled_codebook(codebook, step)
    for i in range(len(levels)):
        k = levels[i] + zero_offset
        if k < 0 or k >= size:
            raise NNCError("level %d indexes outside a codebook of %d entries" % (levels[i], size), where,
                           "QuantParam")
        values[i] = scaled[k]
    return values


def _reconstruct_in_place(levels, step, codebook, zero_offset, where):
    raw = memoryview(levels).cast("B")
    ints = raw.cast("i")
    floats = raw.cast("f")
    if codebook is None:
        one = array("f", [0.0])
        s32 = _f32(step)
        for i in range(len(ints)):
            one[0] = ints[i]  # float32(QuantParam)
            floats[i] = one[0] * s32
        return levels
    _codebook_values(ints, floats, codebook, step, zero_offset, where)
    return levels
