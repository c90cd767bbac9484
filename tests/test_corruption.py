"""Damaged conformance vectors: truncations and single-bit flips.

decoder_core.decode must either succeed or raise NNCError, never another exception. Truncations are
exact: a prefix that ends on a unit boundary decodes to the tensors of the complete units before it,
any other prefix raises NNCError. Flips are a deterministic sample (seeded by the vector name), half of
them in the first bytes where the STR / MPS / TPL / NDU headers are, and every bit of the headers of a
few small vectors; each flip runs on every decoder backend. Chain steps are decoded after their clean
predecessors so that temporal context adaptation is exercised rather than refused.
"""

import random
import zlib

import pytest

import decoder_core
from decoder_core import NNCError
from decoder_core.tables import NNR_NDU
from decoder_core.units import ParserState, parse_unit

EVERY_PREFIX_MAX_BYTES = 4096   # longer vectors get a sample of prefixes
PREFIX_SAMPLES = 48
FLIPS_PER_VECTOR = 10
HEADER_BYTES = 64               # where the flips that hit headers go
SMALL_STREAM_BYTES = 20000      # larger vectors are flipped in a stream of their small NDUs only
EXHAUSTIVE_HEADER_FLIPS = ("p1_int_3d", "p0_bias_1d", "p1_codebook_2d", "p0_entrypoints_scan1")


def units_of(data):
    """[(offset, size, nnr_unit_type, names, payload_start)] of the top-level units."""
    state = ParserState()
    out = []
    offset = 0
    while offset < len(data):
        u = parse_unit(data, offset, len(data), state)
        out.append((offset, u.nnr_unit_size, u.nnr_unit_type, u.get("names") or [], u.get("payload_start")))
        offset += u.nnr_unit_size
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


def decode_after(prelude, data):
    """Decode ``data`` with a decoder that has first decoded the clean ``prelude`` streams."""
    decoder = decoder_core.Decoder()
    for clean in prelude:
        decoder.decode(clean)
    return decoder.decode(data)


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
    prelude = predecessors(conformance_vector, conformance_dir)
    names_before = {}
    decoded = []
    for offset, size, unit_type, names, _ in units:
        names_before[offset] = list(decoded)
        if unit_type == NNR_NDU:
            decoded.extend(names)
    for cut in prefix_lengths(name, data, units):
        if cut in names_before:
            out = decode_after(prelude, data[:cut])
            assert [t[0] for t in out] == names_before[cut], cut
        else:
            with pytest.raises(NNCError):
                decode_after(prelude, data[:cut])


# --- bit flips ---------------------------------------------------------------------------------------------------
def flip(data, bit):
    damaged = bytearray(data)
    damaged[bit >> 3] ^= 0x80 >> (bit & 7)
    return bytes(damaged)


def small_stream(data, units):
    """The vector without its NDUs larger than 2 KB: still a valid stream, and quick to decode."""
    return b"".join(data[o:o + s] for o, s, t, _, _ in units if t != NNR_NDU or s <= 2048)


def decode_or_nncerror(prelude, data):
    try:
        decode_after(prelude, data)
    except NNCError:
        pass


def test_bit_flips(conformance_vector, conformance_dir, backend):
    name = conformance_vector["name"]
    data = read(conformance_dir, name)
    if len(data) > SMALL_STREAM_BYTES:
        data = small_stream(data, units_of(data))
        assert decoder_core.decode(data)  # the reduced stream is valid
    prelude = predecessors(conformance_vector, conformance_dir)
    rng = rng_for(name, "flip")
    nbits = 8 * len(data)
    header_bits = 8 * min(HEADER_BYTES, len(data))
    bits = [rng.randrange(header_bits) if k % 2 else rng.randrange(nbits) for k in range(FLIPS_PER_VECTOR)]
    for bit in bits:
        decode_or_nncerror(prelude, flip(data, bit))


@pytest.mark.parametrize("name", EXHAUSTIVE_HEADER_FLIPS)
def test_every_header_bit_flip(name, conformance_dir, backend):
    data = read(conformance_dir, name)
    header_end = units_of(data)[3][4]  # every bit before the first NDU's payload
    outcomes = {"ok": 0, "error": 0}
    for bit in range(8 * header_end):
        try:
            decoder_core.decode(flip(data, bit))
            outcomes["ok"] += 1
        except NNCError:
            outcomes["error"] += 1
    # Most header bits matter: flipping them must be noticed, not decoded as if nothing happened.
    assert outcomes["error"] > outcomes["ok"]

