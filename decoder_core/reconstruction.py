"""Reconstruction of parameter values from quantization levels (7.3.6, supplement 4.1 and 4.3).

The pure-Python reference of what decoder_core._deepcabac.reconstruct does in C; backend.py and
payload.py both use it, and it imports neither (no import cycle).
"""

from array import array

from .compat import zeros
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
