"""Damaged conformance vectors: truncations and single-bit flips.

decoder_core.decode must either succeed or raise NNCError, never another exception. Truncations are
exact: a prefix that ends on a unit boundary decodes to the tensors of the complete units before it,
any other prefix raises NNCError (every prefix of small vectors, a sample of the others). Flips are a
deterministic sample (seeded by the vector name), half of them in the first bytes where the STR / MPS /
TPL / NDU headers are; every header bit of two small vectors and every bit of the supplement's appendix D
streams is flipped too. Flips run on every decoder backend. Vectors over 20 kB are damaged in a stream
of their small NDUs. Chain steps are decoded after their clean predecessors so that temporal context
adaptation is exercised rather than refused.
"""

import copy
import random
import zlib

import pytest

import decoder_core
from decoder_core import NNCError
from decoder_core.tables import NNR_NDU
from decoder_core.units import parse_units

EVERY_PREFIX_MAX_BYTES = 3000   # longer vectors get a sample of prefixes
PREFIX_SAMPLES = 48
FLIPS_PER_VECTOR = 8
HEADER_BYTES = 64               # where the flips that hit headers go
SMALL_STREAM_BYTES = 20000      # larger vectors are flipped in a stream of their small NDUs only
EXHAUSTIVE_HEADER_FLIPS = ("p1_int_3d", "p0_bias_1d")

# Supplement appendix D: D.1 (profile 1, DQ, row skipping) and D.2 (profile 0, scan_order 1 with one
# entry point), small enough to flip every bit.
APPENDIX_D = {
    "D.1": bytes.fromhex("00040201" "0008068100400080" "00060e000000" "001f16093000d041c120e0c2a080"
                         "e8122004782b2fc5a86001618521483930"),
    "D.2": bytes.fromhex("00040200" "0008068100400080" "00060e000000" "003f160977003048a830a1408b28"
                         "e7eec133cd03fc8a89cb1d2492d5599707fa3829f114ad5ebe2d7bc9c0e38a90ab6a41950fc1e8d2bf70"
                         "43944eaf83e440"),
}


def units_of(data):
    """[(offset, size, nnr_unit_type, names, payload_start)] of the top-level units."""
    out = []
    for u in parse_units(data):
        out.append((u.offset, u.nnr_unit_size, u.nnr_unit_type, u.get("names") or [], u.get("payload_start")))
    return out


def read(conformance_dir, name):
    with open(conformance_dir / (name + ".nnc"), "rb") as f:
        return f.read()


def rng_for(name, salt):
    return random.Random(zlib.crc32(("%s/%s" % (name, salt)).encode()))


def predecessors(vector, conformance_dir):
    """The clean streams a chain step is decoded after (empty for a single vector)."""
    if "chain" not in vector:
        return []
    return [read(conformance_dir, "%s_%d" % (vector["chain"], s)) for s in range(vector["step"])]


def decoder_after(prelude):
    """A function decoding a stream with a decoder that has first decoded the clean ``prelude`` streams."""
    primed = decoder_core.Decoder()
    for clean in prelude:
        primed.decode(clean)
    return lambda data: copy.deepcopy(primed).decode(data)


# --- truncations -------------------------------------------------------------------------------------------
def prefix_lengths(name, data, units):
    if len(data) <= EVERY_PREFIX_MAX_BYTES:
        return list(range(len(data)))
    cuts = set(range(HEADER_BYTES))
    for offset, size, _, _, _ in units:
        cuts.update(c for c in range(offset - 2, offset + 3) if 0 <= c < len(data))
        cuts.add(offset + size - 1)
    rng = rng_for(name, "prefix")
    cuts.update(rng.randrange(len(data)) for _ in range(PREFIX_SAMPLES))
    return sorted(c for c in cuts if c < len(data))


def test_truncations(conformance_vector, conformance_dir):
    name = conformance_vector["name"]
    data = read(conformance_dir, name)
    units = units_of(data)
    if len(data) > SMALL_STREAM_BYTES:
        data = small_stream(data, units)
        units = units_of(data)
    decode = decoder_after(predecessors(conformance_vector, conformance_dir))
    names_before = {}
    decoded = []
    for offset, size, unit_type, names, _ in units:
        names_before[offset] = list(decoded)
        if unit_type == NNR_NDU:
            decoded.extend(names)
    for cut in prefix_lengths(name, data, units):
        if cut in names_before:
            out = decode(data[:cut])
            assert [t[0] for t in out] == names_before[cut], cut
        else:
            with pytest.raises(NNCError):
                decode(data[:cut])


# --- bit flips ---------------------------------------------------------------------------------------------------
def flip(data, bit):
    damaged = bytearray(data)
    damaged[bit >> 3] ^= 0x80 >> (bit & 7)
    return bytes(damaged)


def small_stream(data, units):
    """The vector without its NDUs larger than 2 KB: still a valid stream, and quick to decode."""
    return b"".join(data[o:o + s] for o, s, t, _, _ in units if t != NNR_NDU or s <= 2048)




def test_bit_flips(conformance_vector, conformance_dir, backend):
    name = conformance_vector["name"]
    data = read(conformance_dir, name)
    if len(data) > SMALL_STREAM_BYTES:
        data = small_stream(data, units_of(data))
        assert decoder_core.decode(data)  # the reduced stream is valid
    decode = decoder_after(predecessors(conformance_vector, conformance_dir))
    rng = rng_for(name, "flip")
    nbits = 8 * len(data)
    header_bits = 8 * min(HEADER_BYTES, len(data))
    bits = [rng.randrange(header_bits) if k % 2 else rng.randrange(nbits) for k in range(FLIPS_PER_VECTOR)]
    for bit in bits:
        try:
            decode(flip(data, bit))
        except NNCError:
            pass


def _count_outcomes(data, bits):
    outcomes = {"ok": 0, "error": 0}
    for bit in bits:
        try:
            decoder_core.decode(flip(data, bit))
            outcomes["ok"] += 1
        except NNCError:
            outcomes["error"] += 1
    return outcomes


@pytest.mark.parametrize("name", EXHAUSTIVE_HEADER_FLIPS)
def test_every_header_bit_flip(name, conformance_dir, backend):
    data = read(conformance_dir, name)
    header_end = units_of(data)[3][4]  # every bit before the first NDU's payload
    outcomes = _count_outcomes(data, range(8 * header_end))
    # Most header bits matter: flipping them must be noticed, not decoded as if nothing happened.
    assert outcomes["error"] > outcomes["ok"]


@pytest.mark.parametrize("name", sorted(APPENDIX_D))
def test_every_bit_flip_of_appendix_d(name, backend):
    data = APPENDIX_D[name]
    assert decoder_core.decode(data)
    outcomes = _count_outcomes(data, range(8 * len(data)))
    assert outcomes["error"] > 0 and outcomes["ok"] > 0
