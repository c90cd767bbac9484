"""decoder_core.bitreader: every descriptor of 6.1.3, read from hand-assembled bits.

Expected values come from the standard's definitions (the ue(k) / ie(k) pseudo-code, ISO/IEC 60559
little-endian floats, NUL-terminated UTF-8 strings, 6.3.5 byte_alignment()); round trips through
nnc_edge.encoder.bitwriter.BitWriter then check that the writer is the reader's mirror.
"""

import random
import struct

import pytest

from decoder_core import NNCError
from decoder_core.bitreader import MAX_STRING_BYTES, BitReader
from nnc_edge.encoder.bitwriter import BitWriter


def reader(raw, start=0, end=None):
    return BitReader(raw, start, end)


# --- u(n), f(n), i(n) ----------------------------------------------------------------------------
def test_u_reads_msb_first_across_byte_boundaries(bits):
    r = reader(bits("101 10010 1100 0011 1010 0101"))
    assert r.u(3) == 0b101
    assert r.u(5) == 0b10010
    assert r.u(12) == 0b110000111010
    assert r.u(4) == 0b0101
    assert not r.more_data_in_nnr_unit()


def test_u0_returns_zero_without_advancing(bits):
    r = reader(bits("11111111"))
    assert r.u(0) == 0
    assert r.get_bit_pointer() == 0
    assert r.i(0) == 0
    assert r.get_bit_pointer() == 0


def test_f_is_read_bits(bits):
    r = reader(bits("1 0000000 10100101"))
    assert r.f(1) == 1
    assert r.f(7) == 0
    assert r.f(8) == 0xA5


def test_wide_fields_u32_u34_u256(bits):
    raw = bytes(range(1, 42))
    r = reader(raw)
    assert r.u(32) == 0x01020304
    assert r.u(34) == int.from_bytes(raw[4:9], "big") >> 6
    r.u(6)
    assert r.u(256) == int.from_bytes(raw[9:41], "big")


@pytest.mark.parametrize("pattern, n, value", [
    ("1111", 4, -1), ("1000", 4, -8), ("0111", 4, 7), ("0000", 4, 0),
    ("1111111111011", 13, -5), ("0111111111111", 13, 4095), ("1000000000000", 13, -4096),
])
def test_i_is_twos_complement(bits, pattern, n, value):
    r = reader(bits(pattern + "0" * (-n % 8)))
    assert r.i(n) == value


# --- ue(k), ie(k) -------------------------------------------------------------------------------------
# (k, bit string, value): from the 6.1.3 pseudo-code, x = sum of (1 << k'') for each leading zero,
# then k + (number of zeros) suffix bits.
UE_TABLE = [
    (0, "1", 0), (0, "010", 1), (0, "011", 2), (0, "00100", 3), (0, "00111", 6), (0, "0001000", 7),
    (1, "10", 0), (1, "11", 1), (1, "0100", 2), (1, "0111", 5), (1, "001000", 6), (1, "001111", 13),
    (2, "100", 0), (2, "111", 3), (2, "01000", 4), (2, "0011111", 27),
    (7, "1" + "0000011", 3), (7, "1" + "1111111", 127), (7, "01" + "00000000", 128),
    (11, "1" + "00010110010", 178),
]


@pytest.mark.parametrize("k, pattern, value", UE_TABLE)
def test_ue_table(bits, k, pattern, value):
    pad = "1" + "0" * (-(len(pattern) + 1) % 8)
    r = reader(bits(pattern + pad))
    assert r.ue(k) == value
    assert r.get_bit_pointer() == len(pattern)
    w = BitWriter().ue(k, value)
    assert len(w) == len(pattern)


@pytest.mark.parametrize("k, pattern, value", [
    (0, "1", 0), (0, "010", 1), (0, "011", -1), (0, "00100", 2), (0, "00101", -2),
    (7, "1" + "0000000", 0), (7, "1" + "0000001", 1), (7, "1" + "0000010", -1), (7, "1" + "0000100", -2),
    (2, "101", 1), (2, "110", -1),
])
def test_ie_table(bits, k, pattern, value):
    pad = "1" + "0" * (-(len(pattern) + 1) % 8)
    r = reader(bits(pattern + pad))
    assert r.ie(k) == value
    assert r.get_bit_pointer() == len(pattern)


def test_ue_prefix_longer_than_64_bits_is_an_error():
    r = reader(bytes(16))
    with pytest.raises(NNCError) as exc:
        r.ue(0, "count_ids")
    assert "count_ids" in str(exc.value)


def test_ue_truncated_suffix_is_an_error(bits):
    r = reader(bits("0001 0000"))  # prefix of 3 zeros needs 3 suffix bits for k=0... then runs out
    r.u(4)
    with pytest.raises(NNCError):
        r.ue(7, "tensor_dimensions")


def test_exp_golomb_round_trip_with_writer():
    rng = random.Random(3)
    values = [(k, rng.choice([0, 1, 2, rng.randrange(1 << 20), (1 << 40) + 5])) for k in (0, 1, 2, 3, 5, 7, 11)
              for _ in range(20)]
    w = BitWriter()
    for k, v in values:
        w.ue(k, v)
        w.ie(k, -v)
        w.ie(k, v)
    w.byte_alignment()
    r = reader(w.getvalue())
    for k, v in values:
        assert r.ue(k) == v
        assert r.ie(k) == -v
        assert r.ie(k) == v
    r.byte_alignment()
    assert not r.more_data_in_nnr_unit()


# --- flt(n) ----------------------------------------------------------------------------------------------
# ISO/IEC 60559 binary32 bit patterns, stored little-endian.
@pytest.mark.parametrize("le_hex, value", [
    ("0000003f", 0.5), ("000000c0", -2.0), ("00004940", 3.140625), ("01000000", 2.0 ** -149),
    ("0000807f", float("inf")), ("00000080", -0.0),
])
def test_flt32_little_endian_aligned_and_unaligned(bits, le_hex, value):
    raw = bytes.fromhex(le_hex)
    got = reader(raw).flt(32)
    assert got == value and struct.pack("<f", got) == raw  # the sign of -0.0 too
    # Shifted by 3 bits: "101" then the 32 float bits then 5 padding bits.
    stream = "101" + "".join(format(b, "08b") for b in raw) + "00000"
    r = reader(bits(stream))
    assert r.u(3) == 0b101
    assert r.flt(32) == value
    assert r.get_bit_pointer() == 35


def test_flt64(bits):
    raw = bytes.fromhex("000000000000f0bf")  # binary64 -1.0, little-endian
    assert reader(raw).flt(64) == -1.0
    r = reader(bits("1" + "".join(format(b, "08b") for b in raw) + "0000000"))
    r.u(1)
    assert r.flt(64) == -1.0


def test_flt_other_sizes_and_truncation_are_errors():
    with pytest.raises(NNCError):
        reader(bytes(16)).flt(128)
    with pytest.raises(NNCError):
        reader(bytes(3)).flt(32, "validation_set_performance")
    r = reader(bytes(4))
    r.u(1)
    with pytest.raises(NNCError):
        r.flt(32)


# --- st(v) ----------------------------------------------------------------------------------------------------
def test_st_reads_up_to_the_zero_byte():
    r = reader(b"conv1.weight\x00\x00tail\x00")
    assert r.st() == "conv1.weight"
    assert r.get_bit_pointer() == 13 * 8
    assert r.st() == ""
    assert r.st() == "tail"
    assert not r.more_data_in_nnr_unit()


def test_st_utf8():
    r = reader("gewicht_ä€\x00".encode("utf-8"))
    assert r.st() == "gewicht_ä€"


def test_st_without_terminator_is_an_error():
    with pytest.raises(NNCError) as exc:
        reader(b"abc").st("topology_elem_id")
    assert "topology_elem_id" in str(exc.value) and "terminat" in str(exc.value)
    # The terminator lies after the end of the NNR unit: still no terminator inside the unit.
    with pytest.raises(NNCError):
        reader(b"abc\x00", 0, 3).st()


def test_st_invalid_utf8_is_an_error():
    with pytest.raises(NNCError) as exc:
        reader(b"\xff\xfe\x00").st("element_id")
    assert "UTF-8" in str(exc.value)


def test_st_length_limit():
    ok = b"a" * MAX_STRING_BYTES + b"\x00"
    assert len(reader(ok).st()) == MAX_STRING_BYTES
    with pytest.raises(NNCError) as exc:
        reader(b"a" * (MAX_STRING_BYTES + 1) + b"\x00").st()
    assert "longer" in str(exc.value)


def test_st_must_be_byte_aligned():
    r = reader(b"\x80ab\x00")
    r.u(1)
    with pytest.raises(NNCError):
        r.st()


# --- bs(v) -----------------------------------------------------------------------------------------------------
def test_bs_reads_to_the_end_of_the_unit():
    data = b"\xff\xffhello world\xee"
    r = reader(data, 2, len(data) - 1)
    assert r.bs() == b"hello world"
    assert not r.more_data_in_nnr_unit()
    assert reader(b"").bs() == b""


def test_bs_must_be_byte_aligned():
    r = reader(b"\x00\x01")
    r.u(2)
    with pytest.raises(NNCError):
        r.bs()


# --- byte_alignment(), byte_aligned() ----------------------------------------------------------------------------
def test_byte_alignment_after_partial_byte(bits):
    r = reader(bits("011 1 0000  10000000"))
    r.u(3)
    assert not r.byte_aligned()
    r.byte_alignment()
    assert r.byte_aligned() and r.get_bit_pointer() == 8
    # Already aligned: a whole byte 0x80 is read.
    r.byte_alignment()
    assert r.get_bit_pointer() == 16


def test_byte_alignment_needs_a_one_bit_first(bits):
    r = reader(bits("011 0 0000"))
    r.u(3)
    with pytest.raises(NNCError) as exc:
        r.byte_alignment("nnr_compressed_data_unit_header byte_alignment()")
    assert "alignment_bit_equal_to_one" in str(exc.value)


def test_byte_alignment_needs_zero_bits_after(bits):
    r = reader(bits("011 1 0100"))
    r.u(3)
    with pytest.raises(NNCError) as exc:
        r.byte_alignment()
    assert "alignment_bit_equal_to_zero" in str(exc.value)


def test_byte_alignment_past_the_end(bits):
    r = reader(bits("11111111"))
    r.u(8)
    with pytest.raises(NNCError):
        r.byte_alignment()


# --- bit pointer, more_data_in_nnr_unit() -------------------------------------------------------------------------
def test_bit_pointer_is_relative_to_the_unit_start():
    data = b"\x00\x00\x00\xa5\x5a\x0f"
    r = reader(data, 3, 6)
    assert r.get_bit_pointer() == 0
    assert r.u(4) == 0xA
    assert r.get_bit_pointer() == 4
    r.set_bit_pointer(12)
    assert r.u(8) == 0xA0
    r.set_bit_pointer(0)
    assert r.u(8) == 0xA5
    r.set_bit_pointer(24)
    assert not r.more_data_in_nnr_unit()
    with pytest.raises(NNCError):
        r.set_bit_pointer(25)
    with pytest.raises(NNCError):
        r.set_bit_pointer(-1)


def test_more_data_in_nnr_unit():
    r = reader(b"\x01\x02", 0, 1)
    assert r.more_data_in_nnr_unit()
    r.u(7)
    assert r.more_data_in_nnr_unit()
    r.u(1)
    assert not r.more_data_in_nnr_unit()


def test_reading_past_the_unit_end_names_offset_and_element():
    data = b"\x00\x00\x10\x20\x30\x40"
    r = reader(data, 2, 4)  # the unit is bytes 2..3; bytes 4.. belong to the next unit
    assert r.u(16) == 0x1020
    with pytest.raises(NNCError) as exc:
        r.u(1, "partial_data_counter")
    err = exc.value
    assert isinstance(err, ValueError)
    assert err.element == "partial_data_counter" and err.offset == 4
    assert "partial_data_counter" in str(err) and "at byte 4" in str(err)
    for read in (lambda: r.ue(0), lambda: r.i(3), lambda: r.flt(32), lambda: r.st()):
        with pytest.raises(NNCError):
            read()


def test_unit_past_the_end_of_the_data():
    with pytest.raises(NNCError):
        BitReader(b"\x00\x01", 0, 3)


def test_memoryview_and_bytearray_input():
    for data in (bytearray(b"\x81ab\x00"), memoryview(b"\x81ab\x00")):
        r = reader(data)
        assert r.u(8) == 0x81
        assert r.st() == "ab"


def test_descriptor_round_trip_with_writer():
    rng = random.Random(11)
    ops = []
    w = BitWriter()
    for _ in range(300):
        kind = rng.choice("uiefs")
        if kind == "u":
            n = rng.randrange(1, 40)
            v = rng.randrange(1 << n)
            w.u(n, v)
        elif kind == "i":
            n = rng.randrange(2, 20)
            v = rng.randrange(-(1 << (n - 1)), 1 << (n - 1))
            w.i(n, v)
        elif kind == "e":
            n = rng.randrange(0, 12)
            v = rng.randrange(-5000, 5000)
            w.ie(n, v)
        elif kind == "f":
            n = 32
            v = struct.unpack("<f", struct.pack("<f", rng.uniform(-1e6, 1e6)))[0]
            w.flt(32, v)
        else:
            n = None
            w.zero_pad()
            v = "n%d" % rng.randrange(1000)
            w.st(v)
        ops.append((kind, n, v))
    w.zero_pad()
    r = reader(w.getvalue())
    for kind, n, v in ops:
        if kind == "u":
            assert r.u(n) == v
        elif kind == "i":
            assert r.i(n) == v
        elif kind == "e":
            assert r.ie(n) == v
        elif kind == "f":
            assert r.flt(32) == v
        else:
            while not r.byte_aligned():
                assert r.u(1) == 0
            assert r.st() == v
