"""Ed25519 signature verification (RFC 8032) in plain Python, for devices: MicroPython and CPython.

    from transports.ed25519 import verify
    verify(public_key, message, signature)  # True or False

    for answer in verification(public_key, message, signature):  # the same, in pieces
        ...  # between two pieces, other work (None is yielded); the last value is the answer

``public_key`` is the raw 32-byte key, ``signature`` the 64 bytes R || S, ``message`` the signed
bytes (for nnc-edge, ``nnc_edge.signing.statement(...)``: the MQTT envelope's model, version, parent
digest and bitstream digest). All three may be bytes, bytearray or memoryview; anything else, a
wrong length, or any invalid key or signature gives False, never an exception.

The check is RFC 8032 section 5.1.7 without the cofactor: with k = SHA-512(R || A || M) mod L, the
signature is valid when [S]B - [k]A is the point R. As R is decoded strictly (below), that accepts
exactly what comparing the encoding of [S]B - [k]A (section 5.1.2) with the 32 bytes of R accepts,
which is what libsodium and OpenSSL (the ``cryptography`` package, which ``nnc_edge.signing`` signs
with) do: the encoding of a point is unique once y >= p and x = 0 with the sign bit set are refused.
So a signature from the host's signer verifies here, and a forgery does not. Before the equation,
and stricter than OpenSSL, it refuses:

* S >= L (section 5.1.7 step 1), so a signature has exactly one valid S;
* a public key A or an R whose encoded y is >= p, or that is not the encoding of a curve point
  (x^2 has no square root, or x = 0 with the sign bit set): section 5.1.3's decoding fails;
* an A or an R of small order, one of the 8 points P with [8]P the identity: a small-order key
  lets anyone make "signatures" that pass the equation for any message, and a small-order R is
  what such forgeries are made of (libsodium refuses both too).

Only verification is here; signing stays on the host (``nnc_edge.signing``).

MicroPython's ``hashlib`` has SHA-256 but no SHA-512, so this module carries one (``sha512``) and
uses ``hashlib.sha512`` only where it exists. Field elements are plain Python integers (MicroPython
has arbitrary-precision ones): products are folded at 2**255 (2**255 = 19 mod p) instead of taken
modulo p, which MicroPython's long division makes more than twice as slow; the square root is an
exponentiation by an addition chain for the same reason (its ``pow(a, e, p)`` divides), and the
final comparison needs no inversion. Points use the extended coordinates and formulas of section
5.1.4; [S]B - [k]A is one chain of doublings with width-w non-adjacent forms of S and k (Straus),
adding odd multiples of B from a table built on first use and kept (16 points and their
negations: 80 integers) and of -A from one built per verification (8 points).

Every integer operation allocates, so one verification allocates about 2 MB on a 32-bit
MicroPython, nearly all of it garbage right away; what it holds at any time is a few KB. A board's GC
collects as it goes. Where the GC only runs between calls into Python (the WebAssembly port runs
it in JavaScript), ``verification`` lets the caller return there between pieces.
"""

import hashlib
import struct

P = (1 << 255) - 19
L = (1 << 252) + 27742317777372353535851937790883648493
_FOLD = (1 << 255) - 1
# d = -121665 / 121666, sqrt(-1) = 2^((p - 1) / 4) and the base point B (section 5.1).
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_D2 = 2 * _D % P
_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
# Window widths of the scalars' non-adjacent forms (tables of 2^(w - 1) entries, half of them
# negations). B's table is built once, so a wider window pays there; for A, w = 5 minimizes table
# building plus additions.
_B_WINDOW = 6
_A_WINDOW = 5
_DOUBLE = (None,)
_TIMES_8 = (None, None, None)
_BYTES = (bytes, bytearray, memoryview)


def verify(public_key, message, signature):
    """True when ``signature`` (64 bytes) is a valid Ed25519 signature of ``message`` by
    ``public_key`` (32 bytes), refusing what the module docstring lists; False otherwise."""
    return _run(_verification(public_key, message, signature))


def verification(public_key, message, signature):
    """verify() in pieces, for a device loop that must get back to its other work (or, on the
    WebAssembly port, to JavaScript, where its GC runs) while a signature is checked: a generator
    that yields None after each piece, then the answer, True or False. A piece allocates at most
    about 20 KB on a 32-bit MicroPython (plus three copies of the message, in the piece that
    starts hashing it), all of it garbage once the next piece starts.

        for answer in verification(public_key, message, signature):
            await io_wait()  # or: return to the loop, and resume it on the next pass
    """
    yield (yield from _verification(public_key, message, signature))


def _run(pieces):
    """The value a generator of pieces returns, when run to its end."""
    try:
        while True:
            next(pieces)
    except StopIteration as end:
        return end.value


def _verification(public_key, message, signature):
    if not (isinstance(public_key, _BYTES) and isinstance(message, _BYTES) and isinstance(signature, _BYTES)):
        return False
    public_key = bytes(public_key)
    signature = bytes(signature)
    if len(public_key) != 32 or len(signature) != 64:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= L:
        return False
    a = yield from _decode(int.from_bytes(public_key, "little"))
    if a is None or (yield from _small_order(a)):
        return False
    r = yield from _decode(int.from_bytes(signature[:32], "little"))
    if r is None or (yield from _small_order(r)):
        return False
    digest = yield from _sha512(signature[:32] + public_key + bytes(message))
    k = int.from_bytes(digest, "little") % L
    a[0] = -a[0]  # [S]B = R + [k]A  <=>  [S]B + [k](-A) = R
    e, f, g, h = yield from _straus(s, k, a)
    # (E F : G H : F G) is the affine R = (x, y) when E F = x F G and G H = y F G.
    z = _mul(f, g)
    return (_mul(e, f) - _mul(r[0], z)) % P == 0 and (_mul(g, h) - _mul(r[3], z)) % P == 0


# --- SHA-512 (FIPS 180-4), for MicroPython --------------------------------------------------------
_K512 = (
    0x428a2f98d728ae22, 0x7137449123ef65cd, 0xb5c0fbcfec4d3b2f, 0xe9b5dba58189dbbc,
    0x3956c25bf348b538, 0x59f111f1b605d019, 0x923f82a4af194f9b, 0xab1c5ed5da6d8118,
    0xd807aa98a3030242, 0x12835b0145706fbe, 0x243185be4ee4b28c, 0x550c7dc3d5ffb4e2,
    0x72be5d74f27b896f, 0x80deb1fe3b1696b1, 0x9bdc06a725c71235, 0xc19bf174cf692694,
    0xe49b69c19ef14ad2, 0xefbe4786384f25e3, 0x0fc19dc68b8cd5b5, 0x240ca1cc77ac9c65,
    0x2de92c6f592b0275, 0x4a7484aa6ea6e483, 0x5cb0a9dcbd41fbd4, 0x76f988da831153b5,
    0x983e5152ee66dfab, 0xa831c66d2db43210, 0xb00327c898fb213f, 0xbf597fc7beef0ee4,
    0xc6e00bf33da88fc2, 0xd5a79147930aa725, 0x06ca6351e003826f, 0x142929670a0e6e70,
    0x27b70a8546d22ffc, 0x2e1b21385c26c926, 0x4d2c6dfc5ac42aed, 0x53380d139d95b3df,
    0x650a73548baf63de, 0x766a0abb3c77b2a8, 0x81c2c92e47edaee6, 0x92722c851482353b,
    0xa2bfe8a14cf10364, 0xa81a664bbc423001, 0xc24b8b70d0f89791, 0xc76c51a30654be30,
    0xd192e819d6ef5218, 0xd69906245565a910, 0xf40e35855771202a, 0x106aa07032bbd1b8,
    0x19a4c116b8d2d0c8, 0x1e376c085141ab53, 0x2748774cdf8eeb99, 0x34b0bcb5e19b48a8,
    0x391c0cb3c5c95a63, 0x4ed8aa4ae3418acb, 0x5b9cca4f7763e373, 0x682e6ff3d6b2b8a3,
    0x748f82ee5defb2fc, 0x78a5636f43172f60, 0x84c87814a1f0ab72, 0x8cc702081a6439ec,
    0x90befffa23631e28, 0xa4506cebde82bde9, 0xbef9a3f7b2c67915, 0xc67178f2e372532b,
    0xca273eceea26619c, 0xd186b8c721c0c207, 0xeada7dd6cde0eb1e, 0xf57d4f7fee6ed178,
    0x06f067aa72176fba, 0x0a637dc5a2c898a6, 0x113f9804bef90dae, 0x1b710b35131c471b,
    0x28db77f523047d84, 0x32caab7b40c72493, 0x3c9ebe0a15c9bebc, 0x431d67c49c100d4c,
    0x4cc5d4becb3e42b6, 0x597f299cfc657e2a, 0x5fcb6fab3ad6faec, 0x6c44198c4a475817,
)
_IV512 = (
    0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
    0x510e527fade682d1, 0x9b05688c2b3e6c1f, 0x1f83d9abfb41bd6b, 0x5be0cd19137e2179,
)
_M64 = (1 << 64) - 1
# x * _DUP is x beside itself (x << 64 | x), whose right shift by n holds the 64-bit rotation of x by
# n in its low 64 bits: one multiplication for all three rotations of a sigma function. The bits
# above 64 stay in where the value only goes on into a sum that is masked.
_DUP = (1 << 64) + 1


def sha512(data):
    """SHA-512 digest (64 bytes) of bytes-like ``data``, in plain Python."""
    return _run(_sha512_pieces(data))


def _sha512_pieces(data):
    data = bytes(data)
    n = len(data)
    # FIPS 180-4 5.1.2: 0x80, zeros, then the length in bits as 128 bits, to a multiple of 128 bytes.
    data += b"\x80" + bytes((111 - n) % 128) + (n << 3).to_bytes(16, "big")
    state = list(_IV512)
    w = [0] * 80
    for offset in range(0, len(data), 128):
        yield
        w[:16] = struct.unpack_from(">16Q", data, offset)
        yield from _compress(state, w)
    return struct.pack(">8Q", *state)


def _compress(state, w):
    """FIPS 180-4 section 6.4.2 on one block, whose 16 words are w[:16]."""
    m = _M64
    dup = _DUP
    for t in range(16, 80):
        x = w[t - 15]
        y = w[t - 2]
        xx = x * dup
        yy = y * dup
        w[t] = (w[t - 16] + ((xx >> 1) ^ (xx >> 8) ^ (x >> 7)) + w[t - 7]
                + ((yy >> 19) ^ (yy >> 61) ^ (y >> 6))) & m
        if t & 15 == 15:
            yield  # a piece: 16 words, or 16 rounds below, about 15 KB
    k = _K512
    a, b, c, d, e, f, g, h = state
    for t in range(80):
        x = e * dup
        t1 = h + ((x >> 14) ^ (x >> 18) ^ (x >> 41)) + (g ^ (e & (f ^ g))) + k[t] + w[t]
        x = a * dup
        t2 = ((x >> 28) ^ (x >> 34) ^ (x >> 39)) + ((a & b) | (c & (a | b)))
        h = g
        g = f
        f = e
        e = (d + t1) & m
        d = c
        c = b
        b = a
        a = (t1 + t2) & m
        if t & 15 == 15:
            yield
    rounds = (a, b, c, d, e, f, g, h)
    for i in range(8):
        state[i] = (state[i] + rounds[i]) & m


_HASHLIB_SHA512 = getattr(hashlib, "sha512", None)


def _sha512(data):
    if _HASHLIB_SHA512 is not None:
        return _HASHLIB_SHA512(data).digest()
    return (yield from _sha512_pieces(data))


# --- the field GF(p) ------------------------------------------------------------------------------
# An element is any integer congruent to it; products are kept below 2**256 (not below p) by folding
# the bits above 2**255 back in times 19, twice. Only comparisons reduce modulo p.
def _mul(a, b):
    c = a * b
    c = (c & _FOLD) + (c >> 255) * 19
    return (c & _FOLD) + (c >> 255) * 19


def _square_times(x, n):
    """x^(2^n)."""
    m = _FOLD
    for i in range(n):
        if not i & 15:
            yield  # a piece: up to 16 squarings (9 KB), and what runs up to the next call
        x = x * x
        x = (x & m) + (x >> 255) * 19
        x = (x & m) + (x >> 255) * 19
    return x


def _pow_p58(z):
    """z^((p - 5) / 8) = z^(2^252 - 3), for the square root of section 5.1.3: the addition chain of
    ref10, the implementation RFC 8032 builds on (252 squarings, 11 multiplications)."""
    z2 = _mul(z, z)
    z9 = _mul((yield from _square_times(z2, 2)), z)
    z11 = _mul(z9, z2)
    t5 = _mul(_mul(z11, z11), z9)
    t10 = _mul((yield from _square_times(t5, 5)), t5)
    t20 = _mul((yield from _square_times(t10, 10)), t10)
    t40 = _mul((yield from _square_times(t20, 20)), t20)
    t50 = _mul((yield from _square_times(t40, 10)), t10)
    t100 = _mul((yield from _square_times(t50, 50)), t50)
    t200 = _mul((yield from _square_times(t100, 100)), t100)
    t250 = _mul((yield from _square_times(t200, 50)), t50)
    return _mul((yield from _square_times(t250, 2)), z)


# --- points ---------------------------------------------------------------------------------------
# A point is a list [E, F, G, H]: the values both formulas of section 5.1.4 end with, from which
# the extended coordinates are (X : Y : Z : T) = (E F : G H : F G : E H). An affine (x, y) is
# [x, 1, 1, y]. An addition takes its other point "cached" (_cached): [Y + X, Y - X, 2 Z, 2 d T].
def _decode(n):
    """The point of a 32-byte encoding given as a little-endian integer (section 5.1.3), or None
    when y >= p, when there is no x, or when x = 0 has the sign bit set."""
    y = n & _FOLD
    if y >= P:
        return None
    yy = _mul(y, y)
    u = yy - 1
    v = _mul(_D, yy) + 1
    v3 = _mul(_mul(v, v), v)
    uv3 = _mul(u, v3)
    x = _mul(uv3, (yield from _pow_p58(_mul(uv3, _mul(v3, v)))))  # u v^3 (u v^7)^((p - 5) / 8)
    vxx = _mul(v, _mul(x, x))
    if (vxx - u) % P:
        if (vxx + u) % P:
            return None
        x = _mul(x, _SQRT_M1)
    x %= P
    if x & 1 != n >> 255:
        if not x:
            return None
        x = P - x
    return [x, 1, 1, y]


def _small_order(point):
    """Whether [8]point is the identity, the only point with x = 0 whose order is not 2."""
    q = list(point)
    yield from _walk(q, _TIMES_8)
    return q[0] % P == 0


def _cached(point):
    e, f, g, h = point
    x = _mul(e, f)
    y = _mul(g, h)
    z = _mul(f, g)
    return [y + x, y - x, z + z, _mul(_mul(e, h), _D2)]


def _walk(point, steps):
    """Apply ``steps`` to ``point`` in place: None doubles it, a cached point is added to it.

    This is the hot loop of verification, so its products are written out rather than calls to
    _mul. The formulas' own products fold once: their inputs are below 2**257 in size, so the sums
    and differences made of them stay below 2**265; the products of those (X, Y, Z, T) fold twice,
    back below 2**256.
    """
    e, f, g, h = point
    m = _FOLD
    i = 0
    for q in steps:
        i += 1
        if i & 3 == 0:
            yield  # a piece: 4 steps, about 15 KB
        c = e * f
        c = (c & m) + (c >> 255) * 19
        x = (c & m) + (c >> 255) * 19
        c = g * h
        c = (c & m) + (c >> 255) * 19
        y = (c & m) + (c >> 255) * 19
        c = f * g
        c = (c & m) + (c >> 255) * 19
        z = (c & m) + (c >> 255) * 19
        if q is None:
            # doubling (section 5.1.4), which needs no T
            c = x * x
            a = (c & m) + (c >> 255) * 19
            c = y * y
            b = (c & m) + (c >> 255) * 19
            c = z * z << 1
            zz2 = (c & m) + (c >> 255) * 19
            c = x * y << 1
            e = (c >> 255) * -19 - (c & m)  # E = H - (X + Y)^2 = -2 X Y
            h = a + b
            g = a - b
            f = zz2 + g
        else:
            # addition (section 5.1.4), the other point's factors precomputed
            ypx, ymx, z2, t2d = q
            c = e * h
            c = (c & m) + (c >> 255) * 19
            t = (c & m) + (c >> 255) * 19
            c = (y - x) * ymx
            a = (c & m) + (c >> 255) * 19
            c = (y + x) * ypx
            b = (c & m) + (c >> 255) * 19
            c = t * t2d
            tt = (c & m) + (c >> 255) * 19
            c = z * z2
            zz = (c & m) + (c >> 255) * 19
            e, h = b - a, b + a
            f, g = zz - tt, zz + tt
    point[0] = e
    point[1] = f
    point[2] = g
    point[3] = h


def _odd_multiples(point, w):
    """The cached [j]point for odd j with |j| < 2^(w - 1), at index j of a list of 2^w entries
    (negative j from its end, as Python indexes): a width-w NAF digit indexes it directly."""
    half = 1 << (w - 1)
    table = [None] * (half << 1)
    double = list(point)
    yield from _walk(double, _DOUBLE)
    step = [_cached(double)]
    multiple = list(point)
    for j in range(1, half, 2):
        if j > 1:
            yield from _walk(multiple, step)
        ypx, ymx, z2, t2d = table[j] = _cached(multiple)
        table[-j] = [ymx, ypx, z2, -t2d]  # -(x, y) = (-x, y)
        yield
    return table


_B_TABLE = []


def _base_table():
    if not _B_TABLE:
        table = yield from _odd_multiples([_BX, 1, 1, _BY], _B_WINDOW)
        if not _B_TABLE:  # another verification may have built it in the meantime
            _B_TABLE.extend(table)
    return _B_TABLE


def _naf(n, w):
    """The width-w non-adjacent form of 0 <= n < 2^255: digits[i] is 0 or odd with
    |digits[i]| < 2^(w - 1), n = sum of digits[i] 2^i, and a non-zero digit is followed by at
    least w - 1 zeros."""
    digits = [0] * 256
    full = 1 << w
    i = 0
    while n:
        if n & 1:
            d = n & (full - 1)
            if d >= full >> 1:
                d -= full
            digits[i] = d
            n = (n - d) >> w
            i += w
        else:
            n >>= 1
            i += 1
    return digits


def _straus(s, k, point):
    """[s]B + [k]point: one chain of doublings from the highest digit of either scalar down, adding
    the table entry of each non-zero digit on the way."""
    s_digits = _naf(s, _B_WINDOW)
    yield
    k_digits = _naf(k, _A_WINDOW)
    b_table = yield from _base_table()
    p_table = yield from _odd_multiples(point, _A_WINDOW)
    steps = []
    for i in range(255, -1, -1):
        if steps:
            steps.append(None)
        if s_digits[i]:
            steps.append(b_table[s_digits[i]])
        if k_digits[i]:
            steps.append(p_table[k_digits[i]])
    result = [0, 1, 1, 1]  # the identity
    yield from _walk(result, steps)
    return result
