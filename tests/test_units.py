"""NNR units of clause 6.3 (and the profile-1 additions): nnc_edge.encoder.unitwriter builds them,
decoder_core.units.parse_unit and decoder_core.decode read them.

Key fields are also checked against bits assembled by hand from the syntax tables (the U/UE/IE/F32/ST
helpers below follow 6.1.3 directly), so a bug shared by the writer and the parser cannot hide.
"""

import struct
import tracemalloc
import zlib

import numpy as np
import pytest

import decoder_core
from decoder_core import NNCError
from decoder_core.tables import (
    NNR_AGG, NNR_AGG_SLF, NNR_CPT_BI, NNR_CPT_DC, NNR_CPT_LS, NNR_LPS, NNR_MPS, NNR_NDU, NNR_PT_BLOCK,
    NNR_PT_FLOAT, NNR_PT_INT, NNR_PT_RAW_FLOAT, NNR_QCB, NNR_QNT, NNR_QSU, NNR_STR, NNR_TPL, NNR_TPL_DICT,
    NNR_TPL_PRUN, NNR_TPL_REFLIST,
)
from decoder_core.units import MAX_AGG_NESTING, ParserState, parse_unit, parse_units
from nnc_edge.encoder import unitwriter as uw
from nnc_edge.decoding import to_numpy


# --- hand assembly of bits (6.1.3), independent of nnc_edge.encoder.bitwriter --------------------------------------
def U(n, v):
    assert 0 <= v < (1 << n)
    return format(v, "0%db" % n) if n else ""


def I(n, v):
    return U(n, v & ((1 << n) - 1))


def UE(k, v):
    # Prefix: one zero per completed group of 2^k, 2^(k+1), ... values, then a one, then k+zeros bits.
    zeros = 0
    base = 0
    while v >= base + (1 << (k + zeros)):
        base += 1 << (k + zeros)
        zeros += 1
    return "0" * zeros + "1" + U(k + zeros, v - base)


def IE(k, v):
    return UE(k, 2 * v - 1 if v > 0 else -2 * v)


def F32(x):
    return "".join(format(b, "08b") for b in struct.pack("<f", x))


def ST(s):
    return "".join(format(b, "08b") for b in s.encode("utf-8") + b"\x00")


def ALIGN(s):
    """s followed by byte_alignment() (6.3.5)."""
    return s + "1" + "0" * (-(len(s) + 1) % 8)


def B(s):
    assert len(s) % 8 == 0, len(s)
    return bytes(int(s[i:i + 8], 2) for i in range(0, len(s), 8))


def unit_bytes(nnr_unit_type, body, partial_data_counter=None, independently_decodable_flag=1):
    """A whole unit from hand: nnr_unit_size (15 bit), nnr_unit_header common part, then body bytes."""
    head = U(6, nnr_unit_type) + U(1, independently_decodable_flag) + U(1, partial_data_counter is not None)
    if partial_data_counter is not None:
        head += U(8, partial_data_counter)
    size = 2 + len(head) // 8 + len(body)
    return B("0" + U(15, size) + head) + body


# --- streams ----------------------------------------------------------------------------------------------
def parse_all(data, state=None):
    units = list(parse_units(data, state))
    assert sum(unit.nnr_unit_size for unit in units) == len(data)
    return units


def flatten(units):
    for u in units:
        yield u
        if u.nnr_unit_type == NNR_AGG:
            yield from flatten(u.units)


def head(profile=0, **mps):
    return uw.start_unit(profile) + uw.model_parameter_set_unit(mps, general_profile_idc=profile)


def raw_ndu(name, arr, profile=0, mps=None, **fields):
    arr = np.asarray(arr, dtype=np.float32)
    ndu = dict(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, tensor_dimensions=list(arr.shape))
    if name is not None:
        ndu["topology_elem_id"] = name
    ndu.update(fields)
    return uw.compressed_data_unit(ndu, arr.astype("<f4").tobytes(), general_profile_idc=profile, mps=mps)


def decode(data, topology=None):
    return {name: to_numpy(dims, values) for name, dims, values in decoder_core.decode(data, topology)}


def arange(*shape):
    return (np.arange(int(np.prod(shape)), dtype=np.float32) * 0.25 - 3).reshape(shape)


# Supplement appendix D.1: a profile-1 stream written by NNCodec 2.1.3.
D1_STREAM = bytes.fromhex("00040201" "0008068100400080" "00060e000000"
                          "001f16093000d041c120e0c2a080" "e8122004782b2fc5a86001618521483930")
D1_SEGMENT = D1_STREAM[-17:]
D1_VALUES = np.array([[0.5, -0.25, 0], [0, 0, 0], [1.5, 0.125, -2.0]], dtype=np.float32)
D1_NDU = dict(nnr_compressed_data_unit_payload_type=NNR_PT_FLOAT, topology_elem_id="0", device_id=0,
              parameter_id=0, put_node_depth=0, dq_flag=1, tensor_dimensions=[3, 3], cabac_unary_length_minus1=10)
D1_MPS = dict(topology_carriage_flag=1, mps_qp_density=2, mps_quantization_parameter=0)


# --- nnr_unit_size, nnr_unit_header ------------------------------------------------------------------------
def test_start_unit_bytes_and_fields():
    assert uw.start_unit(1) == bytes.fromhex("00040201")
    assert uw.start_unit(0) == unit_bytes(NNR_STR, B(U(8, 0)))
    (u,) = parse_all(uw.start_unit(1))
    assert (u.nnr_unit_size, u.nnr_unit_type, u.type_name, u.general_profile_idc) == (4, NNR_STR, "NNR_STR", 1)
    assert (u.independently_decodable_flag, u.partial_data_counter_present_flag, u.partial_data_counter) == (1, 0, 0)


def test_appendix_d1_stream_reproduced_and_decoded():
    built = (uw.start_unit(1) + uw.model_parameter_set_unit(D1_MPS, general_profile_idc=1)
             + uw.topology_unit(topology_data=b"\x00")
             + uw.compressed_data_unit(D1_NDU, D1_SEGMENT, general_profile_idc=1, mps=D1_MPS))
    assert built == D1_STREAM
    assert uw.compressed_data_unit_header(D1_NDU, 1, D1_MPS) == bytes.fromhex("093000d041c120e0c2a080")
    units = parse_all(D1_STREAM)
    assert [u.type_name for u in units] == ["NNR_STR", "NNR_MPS", "NNR_TPL", "NNR_NDU"]
    mps = units[1].mps
    assert (mps.topology_carriage_flag, mps.mps_quantization_method_flags, mps.mps_qp_density,
            mps.mps_quantization_parameter) == (1, NNR_QSU, 2, 0)
    ndu = units[3].ndu
    assert (ndu.node_id_present_flag, ndu.device_id, ndu.parameter_id, ndu.put_node_depth) == (1, 0, 0, 0)
    assert (ndu.dq_flag, ndu.tensor_dimensions, ndu.cabac_unary_length_minus1, ndu.scan_order) == (1, [3, 3], 10, 0)
    assert (units[3].payload_start, units[3].payload_end) == (32, 49)
    out = decode(D1_STREAM)
    assert list(out) == ["0"]
    np.testing.assert_array_equal(out["0"], D1_VALUES)


def test_appendix_d2_entry_point_header():
    ndu = dict(nnr_compressed_data_unit_payload_type=NNR_PT_FLOAT, topology_elem_id="w", tensor_dimensions=[10, 3],
               cabac_unary_length_minus1=10, scan_order=1, cabac_offset_list=[64], BitOffsetList=[178])
    segment = bytes.fromhex("e7eec133cd03fc8a89cb1d2492d5599707fa3829f114ad5ebe2d7bc9c0e38a90ab6a41950fc1e8d2bf7043944e"
                            "af83e440")
    data = head(0, **D1_MPS) + uw.compressed_data_unit(ndu, segment)
    assert data.hex() == ("00040200" "0008068100400080" "003f160977003048a830a1408b28" + segment.hex())
    (unit,) = [u for u in parse_all(data) if u.nnr_unit_type == NNR_NDU]
    assert (unit.ndu.NumBlockRowsMinus1, unit.ndu.cabac_offset_list, unit.ndu.BitOffsetList) == (1, [64], [178])
    expected = ((np.arange(30, dtype=np.float32) - 14.5) / 8).reshape(10, 3)
    np.testing.assert_array_equal(decode(data)["w"], expected)


def test_unit_size_flag_for_units_over_32767_bytes():
    data = bytes(range(256)) * 160  # 40960 bytes
    unit = uw.quantization_unit(quantization_data=data)
    size = len(unit)
    assert size == 4 + 1 + 2 + len(data)
    assert unit[:4] == B("1" + U(31, size)) and unit[4] == (NNR_QNT << 2) | 2
    (u,) = parse_all(uw.start_unit(0) + unit)[1:]
    assert u.nnr_unit_size == size and u.quantization_data == data
    # Exactly at the 15-bit limit the short form is still used.
    unit = uw.quantization_unit(quantization_data=bytes(32767 - 5))
    assert len(unit) == 32767 and unit[0] == 0x7F
    # The long form may also be chosen for small units.
    small = uw.start_unit(1, nnr_unit_size_flag=1)
    assert small == bytes.fromhex("80000006" "0201")
    assert parse_all(small)[0].general_profile_idc == 1


def test_unit_size_errors():
    with pytest.raises(NNCError, match="nnr_unit_size"):
        parse_unit(b"\x00\x02\x02\x01", 0, 4, ParserState())  # smaller than its own header
    with pytest.raises(NNCError, match="past the end"):
        parse_unit(b"\x00\x09\x02\x01", 0, 4, ParserState())
    with pytest.raises(NNCError, match="inside nnr_unit_size"):
        parse_unit(b"\x80\x00\x00", 0, 3, ParserState())
    with pytest.raises(NNCError, match="no data"):
        parse_unit(b"", 0, 0, ParserState())
    # A unit too short for its partial_data_counter.
    with pytest.raises(NNCError, match="partial_data_counter"):
        parse_all(uw.start_unit(0) + B("0" + U(15, 3) + U(6, 7) + "01"))


def test_stream_order_errors():
    with pytest.raises(NNCError, match="before any NNR_STR"):
        parse_all(uw.model_parameter_set_unit({}))
    with pytest.raises(NNCError, match="before the NNR_MPS"):
        parse_all(uw.start_unit(0) + raw_ndu("w", [1.0]))
    with pytest.raises(NNCError, match="general_profile_idc"):
        parse_all(uw.start_unit(2))


# --- NNR_MPS ------------------------------------------------------------------------------------------------
def test_mps_profile0_hand_assembled():
    payload = "1" "0" "0" "0" "0" "001" "0" "0000000" + "011" + I(13, -5)
    expected = unit_bytes(NNR_MPS, B(ALIGN(payload)))
    assert expected == bytes.fromhex("00080681007ffb80")
    built = uw.model_parameter_set_unit(topology_carriage_flag=1, mps_qp_density=3, mps_quantization_parameter=-5)
    assert built == expected
    mps = parse_all(uw.start_unit(0) + expected)[1].mps
    assert (mps.topology_carriage_flag, mps.mps_quantization_method_flags, mps.mps_qp_density,
            mps.mps_quantization_parameter, mps.mps_topology_indexed_reference_flag) == (1, 1, 3, -5, 0)
    # Without NNR_QSU / NNR_QCB there are no quantization parameters.
    mps = parse_all(head(0, mps_topology_indexed_reference_flag=1))[1].mps
    assert mps.mps_topology_indexed_reference_flag == 1 and mps.get("mps_qp_density") is None


PERFORMANCE_MPS = dict(
    mps_quantization_method_flags=NNR_QSU | NNR_QCB, mps_qp_density=0, mps_quantization_parameter=1,
    sparsification_performance_map=dict(entries=[dict(
        sparsification_threshold=0.5, non_zero_ratio=0.25, spm_nn_accuracy=0.75, spm_class_bitmask=3,
        spm_nn_class_accuracy=[0.5, 1.0])]),
    pruning_performance_map=dict(entries=[dict(pruning_ratio=0.125, ppm_nn_accuracy=0.875, ppm_nn_class_accuracy=[])]),
    unification_performance_map=dict(entries=[dict(
        reshaped_tensor_dimensions=[4, 8], super_block_dimensions=[16], block_dimensions=[],
        unification_threshold=0.0625, upm_nn_accuracy=0.5, upm_class_bitmask=1, upm_nn_class_accuracy=[0.25])]),
    decomposition_performance_map=dict(entries=[dict(
        mse_threshold=0.015625, dpm_nn_accuracy=0.5, nn_reduction_ratio=0.75, dpm_nn_class_accuracy=[0.5])]),
)


def _performance_maps_bits(start):
    s = start
    # sparsification_performance_map()
    s += U(8, 2) + F32(0.5) + F32(0.25) + F32(0.75) + U(8, 2) + UE(7, 3) + F32(0.5) + F32(1.0)
    # pruning_performance_map()
    s += U(8, 2) + F32(0.125) + F32(0.875) + U(8, 0) + UE(7, 0)
    # unification_performance_map(): byte_alignment() after the reshaped dimensions
    s += U(8, 2) + UE(1, 3) + UE(7, 4) + UE(7, 8)
    s = ALIGN(s)
    s += U(8, 2) + U(8, 16) + U(8, 1) + F32(0.0625) + F32(0.5) + U(8, 1) + UE(7, 1) + F32(0.25)
    # decomposition_performance_map(): 16-bit class count, no bitmask
    s += U(8, 2) + F32(0.015625) + F32(0.5) + F32(0.75) + U(16, 1) + F32(0.5)
    return s


def test_mps_performance_maps_hand_assembled_and_parsed():
    start = "0" "1" "1" "1" "1" "011" "0" "0000000" + "000" + I(13, 1)
    expected = unit_bytes(NNR_MPS, B(ALIGN(_performance_maps_bits(start))))
    assert uw.model_parameter_set_unit(PERFORMANCE_MPS) == expected
    mps = parse_all(uw.start_unit(0) + expected)[1].mps
    assert (mps.mps_sparsification_flag, mps.mps_pruning_flag, mps.mps_unification_flag,
            mps.mps_decomposition_performance_map_flag) == (1, 1, 1, 1)
    assert mps.mps_quantization_method_flags == 3 and mps.mps_quantization_parameter == 1
    spm = mps.sparsification_performance_map
    assert spm.spm_count_thresholds == 2 and len(spm.entries) == 1
    e = spm.entries[0]
    assert (e.sparsification_threshold, e.non_zero_ratio, e.spm_nn_accuracy, e.spm_count_classes,
            e.spm_class_bitmask, e.spm_nn_class_accuracy) == (0.5, 0.25, 0.75, 2, 3, [0.5, 1.0])
    e = mps.pruning_performance_map.entries[0]
    assert (e.pruning_ratio, e.ppm_nn_accuracy, e.ppm_count_classes, e.ppm_nn_class_accuracy) == (0.125, 0.875, 0, [])
    e = mps.unification_performance_map.entries[0]
    assert (e.reshaped_tensor_dimensions, e.super_block_dimensions, e.block_dimensions) == ([4, 8], [16], [])
    assert (e.unification_threshold, e.upm_nn_accuracy, e.upm_count_classes, e.upm_class_bitmask,
            e.upm_nn_class_accuracy) == (0.0625, 0.5, 1, 1, [0.25])
    e = mps.decomposition_performance_map.entries[0]
    assert (e.mse_threshold, e.dpm_nn_accuracy, e.nn_reduction_ratio, e.dpm_count_classes,
            e.dpm_nn_class_accuracy) == (0.015625, 0.5, 0.75, 1, [0.5])
    # Written back from the parsed object, the unit is the same.
    assert uw.model_parameter_set_unit(mps) == expected


def test_mps_profile1_fields_hand_assembled():
    mps = dict(topology_carriage_flag=1, base_model_id="base", validation_set_performance=0.5,
               performance_metric_type="top1", mps_parent_signalling_enabled_flag=1, nnr_pre_flag=1,
               mps_qp_density=2, mps_quantization_parameter=-3)
    bits = ("1" "0000" "001" "0" + "1" "1" "0" "1" "1" "00" + ST("base") + ST("top1") + "010" + I(13, -3)
            + F32(0.5))
    expected = unit_bytes(NNR_MPS, B(ALIGN(bits)))
    assert uw.model_parameter_set_unit(mps, general_profile_idc=1) == expected
    p = parse_all(uw.start_unit(1) + expected)[1].mps
    assert (p.base_model_id_present_flag, p.validation_set_performance_present_flag,
            p.metric_type_performance_map_valid_flag, p.mps_parent_signalling_enabled_flag, p.nnr_pre_flag) == (
        1, 1, 0, 1, 1)
    assert (p.base_model_id, p.performance_metric_type, p.validation_set_performance) == ("base", "top1", 0.5)
    assert (p.mps_qp_density, p.mps_quantization_parameter) == (2, -3)
    # metric_type_performance_map_valid_flag alone also carries performance_metric_type.
    p = parse_all(head(1, metric_type_performance_map_valid_flag=1, performance_metric_type="mAP"))[1].mps
    assert p.metric_type_performance_map_valid_flag == 1 and p.performance_metric_type == "mAP"
    # The same fields in profile 0 are not part of the syntax.
    with pytest.raises(ValueError):
        uw.model_parameter_set_unit(mps, general_profile_idc=0)


# --- NNR_LPS and its activation (6.2.3, 6.4.4.4) ------------------------------------------------------------
def test_lps_hand_assembled():
    expected = unit_bytes(NNR_LPS, B("1" "0000000") + B(ALIGN("0" "0" "0" "0" "001" "0" + "001" + I(13, 7))))
    assert expected == bytes.fromhex("00080a8002200780")
    assert uw.layer_parameter_set_unit(lps_qp_density=1, lps_quantization_parameter=7) == expected
    u = parse_all(head(0) + expected)[2]
    assert u.lps_self_contained_flag == 1
    assert (u.lps.lps_quantization_method_flags, u.lps.lps_qp_density, u.lps.lps_quantization_parameter) == (1, 1, 7)


def test_lps_with_performance_maps():
    lps = dict(lps_self_contained_flag=0, lps_quantization_method_flags=NNR_QCB, lps_qp_density=0,
               lps_quantization_parameter=1,
               sparsification_performance_map=PERFORMANCE_MPS["sparsification_performance_map"],
               pruning_performance_map=PERFORMANCE_MPS["pruning_performance_map"],
               unification_performance_map=PERFORMANCE_MPS["unification_performance_map"])
    bits = _performance_maps_bits("0" "1" "1" "1" "010" "0" + "000" + I(13, 1))
    bits = bits[:bits.rindex(U(8, 2) + F32(0.015625))]  # the LPS has no decomposition map
    expected = unit_bytes(NNR_LPS, B("0" "0000000") + B(ALIGN(bits)))
    assert uw.layer_parameter_set_unit(lps) == expected
    u = parse_all(head(0) + expected)[2]
    assert u.lps_self_contained_flag == 0
    assert (u.lps.lps_sparsification_flag, u.lps.lps_pruning_flag, u.lps.lps_unification_flag) == (1, 1, 1)
    assert u.lps.unification_performance_map.entries[0].super_block_dimensions == [16]
    assert uw.layer_parameter_set_unit(u.lps, lps_self_contained_flag=0) == expected


def _ndu_d1(**fields):
    ndu = dict(D1_NDU)
    ndu.update(fields)
    return uw.compressed_data_unit(ndu, D1_SEGMENT, general_profile_idc=1, mps=D1_MPS)


def _bound_qp(units):
    return [(u.QpDensity, u.QuantizationParameter) for u in flatten(units) if u.nnr_unit_type == NNR_NDU]


def test_lps_activation_rules():
    lps_qp = uw.layer_parameter_set_unit(lps_qp_density=2, lps_quantization_parameter=4)
    lps_none = uw.layer_parameter_set_unit(lps_sparsification_flag=0)
    a, b, c, d = (_ndu_d1(topology_elem_id=n) for n in "abcd")
    data = (uw.start_unit(1) + uw.model_parameter_set_unit(D1_MPS, general_profile_idc=1)
            + a  # MPS only
            + lps_qp + b  # the LPS's parameters
            + lps_none + c  # the next LPS replaces it; it has none: back to the MPS
            + lps_qp + uw.aggregate_unit([d, _ndu_d1(topology_elem_id="e")])  # inactive inside the aggregate
            + _ndu_d1(topology_elem_id="f")  # and after it
            + uw.aggregate_unit([lps_qp, _ndu_d1(topology_elem_id="g")])  # active inside its own aggregate
            + _ndu_d1(topology_elem_id="h"))  # but not after it
    assert _bound_qp(parse_all(data)) == [(2, 0), (2, 4), (2, 0), (2, 0), (2, 0), (2, 0), (2, 4), (2, 0)]
    # Decoded: qp = qp_value + QuantizationParameter, so the LPS doubles the step size (4.1).
    out = decode(data)
    for name in "acdefh":
        np.testing.assert_array_equal(out[name], D1_VALUES)
    for name in "bg":
        np.testing.assert_array_equal(out[name], D1_VALUES * 2)


# --- NNR_TPL ------------------------------------------------------------------------------------------------
def test_topology_data_raw_and_deflate():
    text = b'{"layers": ["conv1", "fc"]}' * 10
    raw = uw.topology_unit(topology_data=text)
    assert raw == unit_bytes(NNR_TPL, B(U(8, 0) + U(8, 0)) + text)
    dfl = uw.topology_unit(topology_storage_format=1, topology_compression_format=1, topology_data=text)
    assert dfl[5:] == zlib.compress(text) and dfl[3:5] == b"\x01\x01"
    for unit in (raw, dfl):
        u = parse_all(head(0) + unit)[2]
        assert u.tpl.topology_data == text
    # A deflate stream from elsewhere (a different compression level) inflates the same.
    other = unit_bytes(NNR_TPL, b"\x00\x01" + zlib.compress(text, 1))
    assert parse_all(head(0) + other)[2].tpl.topology_data == text
    with pytest.raises(NNCError, match="deflate"):
        parse_all(head(0) + unit_bytes(NNR_TPL, b"\x00\x01" + b"not deflate"))
    with pytest.raises(NNCError, match="reserved"):
        parse_all(head(0) + unit_bytes(NNR_TPL, b"\x00\x02" + text))


def test_pruning_container_bit_masks_hand_assembled():
    prune = [1, 0, 1, 1, 0, 0, 0, 0, 1]
    body = B(U(8, NNR_TPL_PRUN) + U(8, 0)) + bytes.fromhex("28" "00000009" "b0c0" "00000002" "60")
    expected = unit_bytes(NNR_TPL, body)
    built = uw.topology_unit(topology_storage_format=NNR_TPL_PRUN,
                             nnr_pruning_topology_container=dict(prune_bit_mask=prune, sparse_bit_mask=[0, 1]))
    assert built == expected
    c = parse_all(head(0) + expected)[2].tpl.nnr_pruning_topology_container
    assert (c.nnr_rep_type, c.prune_flag, c.order_flag, c.sparse_flag) == (0, 1, 0, 1)
    assert (c.prune_bit_mask.count_bits, c.prune_bit_mask.bit_mask_value) == (9, bytes([0b10110000, 0b10000000]))
    assert (c.sparse_bit_mask.count_bits, c.sparse_bit_mask.bit_mask_value) == (2, bytes([0b01000000]))
    # The packed form the parser returns writes back to the same unit.
    assert uw.topology_unit(topology_storage_format=NNR_TPL_PRUN, nnr_pruning_topology_container=c) == expected


def test_pruning_container_dictionary_hand_assembled():
    bits = ("01" "1" "1" "0" "000" + UE(7, 2)) + ALIGN("") + ST("a") + ST("bc")
    bits += UE(1, 2) + UE(7, 3) + UE(7, 4) + UE(1, 1) + UE(7, 5)
    expected = unit_bytes(NNR_TPL, B(U(8, NNR_TPL_PRUN) + U(8, 0) + ALIGN(bits)))
    container = dict(nnr_rep_type=NNR_TPL_DICT, order_flag=1, element_id=["a", "bc"], dim=[[3, 4], [5]])
    assert uw.topology_unit(topology_storage_format=NNR_TPL_PRUN, nnr_pruning_topology_container=container) == expected
    c = parse_all(head(0) + expected)[2].tpl.nnr_pruning_topology_container
    assert (c.nnr_rep_type, c.prune_flag, c.order_flag, c.sparse_flag) == (NNR_TPL_DICT, 1, 1, 0)
    assert (c.count_ids, c.element_id, c.count_dims, c.dim) == (2, ["a", "bc"], [2, 1], [[3, 4], [5]])


def test_pruning_container_dictionary_indexed_with_sparse_mask():
    mps = dict(mps_topology_indexed_reference_flag=1)
    bits = "01" "1" "0" "1" "000" + UE(7, 2) + UE(7, 0) + UE(7, 3) + UE(1, 1) + UE(7, 9) + UE(1, 0)
    bits = ALIGN(bits) + U(32, 3) + ALIGN("111")
    expected = unit_bytes(NNR_TPL, B(U(8, NNR_TPL_PRUN) + U(8, 0) + bits))
    container = dict(nnr_rep_type=NNR_TPL_DICT, element_id_index=[0, 3], dim=[[9], []], sparse_bit_mask=[1, 1, 1])
    built = uw.topology_unit(topology_storage_format=NNR_TPL_PRUN, nnr_pruning_topology_container=container, mps=mps)
    assert built == expected
    c = parse_all(head(0, **mps) + expected)[2].tpl.nnr_pruning_topology_container
    assert (c.element_id_index, c.count_dims, c.dim) == ([0, 3], [1, 0], [[9], []])
    assert (c.sparse_bit_mask.count_bits, c.sparse_bit_mask.bit_mask_value) == (3, b"\xe0")


def test_bit_mask_longer_than_the_unit_is_rejected_before_allocating():
    body = B(U(8, NNR_TPL_PRUN) + U(8, 0) + "00" "1" "0" "0" "000" + U(32, 0xFFFFFFF0)) + b"\xff" * 4
    with pytest.raises(NNCError, match="count_bits"):
        with _memory_limit():
            parse_all(head(0) + unit_bytes(NNR_TPL, body))


def test_reflist_and_indexed_references():
    names = ["conv.w", "conv.b", "fc.w"]
    tpl = uw.topology_unit(topology_storage_format=NNR_TPL_REFLIST, topology_elements_ids_list=names)
    bits = U(8, NNR_TPL_REFLIST) + U(8, 0) + ALIGN(UE(7, 1)) + "".join(ST(n) for n in names)
    assert tpl == unit_bytes(NNR_TPL, B(bits))
    mps = dict(mps_topology_indexed_reference_flag=1)
    fc = arange(2, 3)
    conv = arange(4, 3)
    ndu_fc = raw_ndu(None, fc, mps=mps, topology_elem_id_index=2)
    assert ndu_fc[3] == B(U(5, NNR_PT_RAW_FLOAT) + "0" "0" "1")[0]
    assert ndu_fc[4] == B(UE(7, 2))[0]
    # Two elements in one NDU, by index: conv.w is rows 0..2, conv.b row 3.
    both = np.concatenate([conv[:3], conv[3:]], axis=0)
    ndu_conv = raw_ndu(None, both, mps=mps, topology_elements_ids_list=[0, 1],
                       topology_tensor_dimension_mapping=dict(concatentation_axis_index=0, split_index=[3]))
    data = head(0, **mps) + tpl + ndu_fc + ndu_conv
    units = parse_all(data)
    assert units[2].tpl.topology_elements_ids_list == names
    assert units[3].ndu.topology_elem_id_index == 2 and units[3].names == ["fc.w"]
    assert units[4].ndu.topology_elements_ids_list == [0, 1] and units[4].names == ["conv.w", "conv.b"]
    out = decode(data)
    assert list(out) == ["fc.w", "conv.w", "conv.b"]
    np.testing.assert_array_equal(out["fc.w"], fc)
    np.testing.assert_array_equal(out["conv.w"], conv[:3])
    np.testing.assert_array_equal(out["conv.b"], conv[3:])
    # An index past the REFLIST names nothing.
    unknown = raw_ndu(None, fc, mps=mps, topology_elem_id_index=3)
    with pytest.raises(NNCError, match="topology_elem_id_index 3 is past the end of the NNR_TPL_REFLIST "
                                       r"\(3 entries\) \(topology_elem_id_index, at byte %d\)" % len(data)):
        decode(data + unknown)
    # Without any REFLIST the index itself names the tensor; an out-of-band topology given as (name,
    # dimensions) pairs is the REFLIST of a stream without one (topology_carriage_flag 0).
    bare = head(0, **mps) + ndu_fc + ndu_conv
    assert list(decode(bare)) == ["2", "0", "1"]
    external = [("A", [3, 3]), ("B", [1, 3]), ("C", [2, 3])]
    assert list(decode(bare, external)) == ["C", "A", "B"]
    assert list(decode(data, external)) == ["fc.w", "conv.w", "conv.b"]  # the stream's own REFLIST wins
    # ... and stays so for the next bitstream (a new NNR_STR resets the rest of the parser state).
    assert parse_all(bare + bare, ParserState(external))[-1].names == ["A", "B"]


# --- NNR_QNT ------------------------------------------------------------------------------------------------
def test_quantization_unit_raw_and_deflate():
    q = bytes(range(50)) * 3
    raw = uw.quantization_unit(quantization_storage_format=1, quantization_data=q)
    assert raw == unit_bytes(NNR_QNT, b"\x01\x00" + q)
    dfl = uw.quantization_unit(quantization_data=q, quantization_compression_format=1)
    assert dfl == unit_bytes(NNR_QNT, b"\x00\x01" + zlib.compress(q))
    units = parse_all(head(0) + raw + dfl)
    assert [(u.quantization_storage_format, u.quantization_compression_format, u.quantization_data)
            for u in units[2:]] == [(1, 0, q), (0, 1, q)]
    with pytest.raises(NNCError, match="deflate"):
        parse_all(head(0) + unit_bytes(NNR_QNT, b"\x00\x01\x78\x9c\x00"))


# --- NNR_NDU header -----------------------------------------------------------------------------------------
def test_ndu_header_entry_points_hand_assembled():
    """bit_offset_delta1 ue(11), then bit_offset_delta2 ie(7) as differences of BitOffsetList (supplement 1.11)."""
    for dq_flag in (0, 1):
        bits = U(5, NNR_PT_INT) + "0" "0" "1" + ST("x") + U(1, dq_flag) + "1" "0" "0000" + UE(1, 2) + UE(7, 20)
        bits += UE(7, 6) + U(4, 1)
        for j, (cabac, dq_state, offset, delta) in enumerate([(1, 3, 5, None), (2, 6, 3, -2)]):
            bits += U(8, cabac) + (U(3, dq_state) if dq_flag else "")
            bits += UE(11, offset) if j == 0 else IE(7, delta)
        header = B(ALIGN(bits))
        ndu = dict(nnr_compressed_data_unit_payload_type=NNR_PT_INT, topology_elem_id="x", dq_flag=dq_flag,
                   tensor_dimensions=[20, 6], scan_order=1, cabac_offset_list=[1, 2], BitOffsetList=[5, 3])
        if dq_flag:
            ndu["dq_state_list"] = [3, 6]
        assert uw.compressed_data_unit_header(ndu) == header
        p = parse_all(head(0) + uw.compressed_data_unit(ndu, b"\x00"))[2].ndu
        assert (p.scan_order, p.NumBlockRowsMinus1, p.cabac_offset_list, p.BitOffsetList) == (1, 2, [1, 2], [5, 3])
        assert p.dq_state_list == ([3, 6] if dq_flag else [])
    # BitOffsetList from the bit pointers at the block-row starts.
    assert uw.bit_offset_list([158, 336, 400, 500]) == [178, 64, 100]


def test_ndu_header_codebook_hand_assembled():
    bits = U(5, NNR_PT_FLOAT) + "0" "1" "0" + ST("cb") + "1"
    bits += U(4, 1) + UE(2, 5) + IE(2, 0) + IE(7, 0) + UE(1, 1) + UE(1, 2) + UE(1, 2) + UE(1, 0)
    bits += "1" + U(7, 1)  # dq_flag, nnr_decompressed_data_format
    ndu = dict(nnr_compressed_data_unit_payload_type=NNR_PT_FLOAT, topology_elem_id="cb", codebook_egk=1,
               Codebook=[-5, -2, 0, 3, 4], CbZeroOffset=2, dq_flag=1, nnr_decompressed_data_format=1)
    assert uw.compressed_data_unit_header(ndu) == B(ALIGN(bits))
    p = parse_all(head(0) + uw.compressed_data_unit(ndu, b""))[2].ndu
    assert (p.codebook_present_flag, p.codebook_egk, p.Codebook, p.CbZeroOffset) == (1, 1, [-5, -2, 0, 3, 4], 2)
    assert (p.dq_flag, p.nnr_decompressed_data_format_present_flag, p.nnr_decompressed_data_format) == (1, 1, 1)
    assert p.input_parameters_present_flag == 0 and p.get("TensorDimensions") is None
    # An off-centre zero and a one-entry codebook.
    for book, zero in (([1, 2, 3, 9], 0), ([-9, -8], 1), ([7], 0)):
        ndu.update(Codebook=book, CbZeroOffset=zero, codebook_egk=0)
        p = parse_all(head(0) + uw.compressed_data_unit(ndu, b""))[2].ndu
        assert (p.Codebook, p.CbZeroOffset) == (book, zero)


def test_ndu_header_profile1_node_and_parent_blocks():
    mps = dict(mps_parent_signalling_enabled_flag=1)
    base = dict(nnr_compressed_data_unit_payload_type=NNR_PT_INT, topology_elem_id="p")
    # Parent by id, without a node id: parameter_id and put_node_depth sit in the parent block.
    ndu = dict(base, node_id_present_flag=0, parent_node_id_type=0, temporal_context_modeling_flag=1,
               parent_device_id=0, parameter_id=3, put_node_depth=2)
    bits = U(5, NNR_PT_INT) + "000" + ST("p") + "0" + "1" "00" "1" + UE(1, 0) + UE(5, 3) + UE(4, 2) + "0"
    assert uw.compressed_data_unit_header(ndu, 1, mps) == B(ALIGN(bits))
    p = parse_all(head(1, **mps) + uw.compressed_data_unit(ndu, b"", 1, mps))[2].ndu
    assert (p.node_id_present_flag, p.parent_node_id_present_flag, p.parent_node_id_type,
            p.temporal_context_modeling_flag, p.parent_device_id, p.parameter_id, p.put_node_depth) == (
        0, 1, 0, 1, 0, 3, 2)
    # Node id and parent payload hashes.
    sha256 = bytes(range(32))
    sha512 = bytes(range(64, 128))
    for parent_type, name, digest in ((1, "parent_node_payload_sha256", sha256),
                                      (2, "parent_node_payload_sha512", sha512)):
        ndu = dict(base, device_id=5, parameter_id=40, put_node_depth=1, parent_node_id_type=parent_type)
        ndu[name] = digest
        bits = U(5, NNR_PT_INT) + "000" + ST("p") + "1" + UE(1, 5) + UE(5, 40) + UE(4, 1) + "1" + U(2, parent_type)
        bits += "0" + "".join(format(b, "08b") for b in digest) + "0"
        assert uw.compressed_data_unit_header(ndu, 1, mps) == B(ALIGN(bits))
        p = parse_all(head(1, **mps) + uw.compressed_data_unit(ndu, b"", 1, mps))[2].ndu
        assert (p.device_id, p.parameter_id, p.put_node_depth, p.parent_node_id_type) == (5, 40, 1, parent_type)
        assert p.get(name) == int.from_bytes(digest, "big")
    # Without parent signalling in the MPS there is no parent block at all.
    ndu = dict(base, device_id=0)
    assert uw.compressed_data_unit_header(ndu, 1, {}) == B(ALIGN(U(5, 0) + "000" + ST("p") + "1" "10" "100000" "10000"
                                                                 + "0"))
    with pytest.raises(ValueError):
        uw.compressed_data_unit_header(dict(base, parent_node_id_type=0), 1, {})


def test_ndu_header_profile1_first_tensor_dimension_shift():
    ndu = dict(nnr_compressed_data_unit_payload_type=NNR_PT_INT, topology_elem_id="s", tensor_dimensions=[4, 4],
               first_tensor_dimension_shift=0)
    bits = U(5, 0) + "001" + ST("s") + "0" + "0" + "1" "0" "0000" + UE(1, 2) + UE(7, 4) + UE(7, 4) + UE(1, 0) + U(4, 0)
    assert uw.compressed_data_unit_header(ndu, 1, {}) == B(ALIGN(bits))
    p = parse_all(head(1) + uw.compressed_data_unit(ndu, b"", 1, {}))[2].ndu
    assert p.first_tensor_dimension_shift == 0 and p.scan_order == 0
    # Its meaning is unknown (supplement 9): nonzero values are rejected.
    with pytest.raises(NNCError, match="first_tensor_dimension_shift"):
        parse_all(head(1) + uw.compressed_data_unit(dict(ndu, first_tensor_dimension_shift=1), b"", 1, {}))


def test_ndu_header_block_with_decomposition_and_dc_codebook():
    ids = ["w.G", "w.H", "w.ls", "w.b"]
    ndu = dict(nnr_compressed_data_unit_payload_type=NNR_PT_BLOCK, topology_elements_ids_list=ids,
               Codebook=[-1, 0, 1], codebook_egk=0, dq_flag=0,
               compressed_parameter_types=NNR_CPT_DC | NNR_CPT_LS | NNR_CPT_BI,
               decomposition_rank=10, g_number_of_rows=20, tensor_dimensions=[20, 12], cabac_unary_length_minus1=10,
               CodebookDC=[-4, 2], CbZeroOffsetDC=1, codebook_egkDC=2, scan_order=1,
               cabac_offset_list=[9, 8, 7], BitOffsetList=[100, 120, 90])
    bits = U(5, NNR_PT_BLOCK) + "1" "0" "1" + ALIGN(UE(7, 2)) + "".join(ST(n) for n in ids)
    bits += "1" + U(4, 0) + UE(2, 3) + IE(2, 0) + IE(7, 0) + UE(0, 0) + UE(0, 0)  # codebook [-1, 0, 1]
    bits += "0" + "1" "1" + U(4, 11) + UE(3, 10) + UE(3, 20) + UE(1, 2) + UE(7, 20) + UE(7, 12) + U(8, 10)
    bits += U(4, 2) + UE(2, 2) + IE(2, 0) + IE(7, 2) + UE(2, 5)  # CodebookDC [-4, 2], zero at 1
    # NumBlockRowsMinus1 = ceil(20/8) + ceil(10/8) - 2 = 3 (6.4.3.7)
    bits += U(4, 1) + U(8, 9) + UE(11, 100) + U(8, 8) + IE(7, 20) + U(8, 7) + IE(7, -30)
    assert uw.compressed_data_unit_header(ndu) == B(ALIGN(bits))
    u = parse_all(head(0) + uw.compressed_data_unit(ndu, b"\x00"))[2]
    p = u.ndu
    assert (p.TensorDimensionsG, p.TensorDimensionsH, p.TensorDimensions) == ([20, 10], [10, 12], [20, 12])
    assert (p.CodebookDC, p.CbZeroOffsetDC, p.codebook_egkDC) == ([-4, 2], 1, 2)
    assert (p.NumBlockRowsMinus1, p.BitOffsetList) == (3, [100, 120, 90])
    assert u.names == ids  # NNR_PT_BLOCK names are not suffixed


def test_decomposed_tensor_g_then_h():
    w = dict(topology_elem_id="w", compressed_parameter_types=NNR_CPT_DC, decomposition_rank=2, g_number_of_rows=3,
             tensor_dimensions=[3, 4])
    g = arange(3, 2)
    h = arange(2, 4) + 1
    ndu_g = raw_ndu(None, g, **dict(w, tensor_dimensions=[3, 4]))
    ndu_h = raw_ndu(None, h, **dict(w, tensor_dimensions=[3, 4], decomposed_part="H"))
    data = head(0) + ndu_g + ndu_h + raw_ndu("x", [1.0])
    units = parse_all(data)
    assert [(u.names, u.ndu.TensorDimensions) for u in units[2:]] == [(["w.G"], [3, 2]), (["w.H"], [2, 4]),
                                                                      (["x"], [1])]
    out = decode(data)
    np.testing.assert_array_equal(out["w.G"], g)
    np.testing.assert_array_equal(out["w.H"], h)
    bad = U(5, NNR_PT_RAW_FLOAT) + "001" + ST("w") + "1" "0" + U(4, NNR_CPT_DC) + UE(3, 2) + UE(3, 5) + UE(1, 2)
    bad += UE(7, 3) + UE(7, 4) + U(4, 0)
    with pytest.raises(NNCError, match="g_number_of_rows"):
        parse_all(head(0) + unit_bytes(NNR_NDU, B(ALIGN(bad)) + bytes(40)))
    with pytest.raises(ValueError):
        raw_ndu(None, g, **dict(w, g_number_of_rows=5))


def test_tensor_dimension_mapping_split_and_axis_swap():
    # One 2x5 tensor holds a (2x2) and b; b is stored with its axes swapped: shift_index 1 by 1 gives 3x2.
    a = arange(2, 2)
    b = arange(3, 2) + 10
    combined = np.concatenate([a, b.T], axis=1)
    mapping = dict(concatentation_axis_index=1, split_index=[2], shift_index=[[], [1]], shift_value=[[], [1]])
    ndu = raw_ndu(None, combined, topology_elements_ids_list=["a", "b"], topology_tensor_dimension_mapping=mapping)
    bits = U(5, NNR_PT_RAW_FLOAT) + "1" "0" "1" + ALIGN(UE(7, 0)) + ST("a") + ST("b")
    bits += "1" "0" "0000" + UE(1, 2) + UE(7, 2) + UE(7, 5)
    bits += U(8, 1) + UE(7, 2) + UE(1, 0) + UE(1, 1) + UE(7, 1) + UE(1, 1) + U(4, 0)
    assert ndu[3:3 + len(B(ALIGN(bits)))] == B(ALIGN(bits))
    p = parse_all(head(0) + ndu)[2].ndu
    m = p.topology_tensor_dimension_mapping
    assert (m.concatentation_axis_index, m.split_index, m.number_of_shifts, m.shift_index, m.shift_value) == (
        1, [2], [0, 1], [[], [1]], [[], [1]])
    out = decode(head(0) + ndu)
    np.testing.assert_array_equal(out["a"], a)
    np.testing.assert_array_equal(out["b"], b)


def test_dimensions_out_of_band():
    ndu = dict(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, topology_elem_id="w", tensor_dimensions=[2, 3],
               input_parameters_present_flag=0)
    header = uw.compressed_data_unit_header(ndu)
    # No input parameters; scan_order is still present because the topology gives two dimensions.
    assert header == B(ALIGN(U(5, NNR_PT_RAW_FLOAT) + "000" + ST("w") + U(4, 0)))
    values = arange(2, 3)
    data = head(0) + uw.compressed_data_unit(ndu, values.tobytes())
    p = parse_all(data, ParserState(topology={"w": [2, 3]}))[2].ndu
    assert p.input_parameters_present_flag == 0 and p.TensorDimensions == [2, 3]
    np.testing.assert_array_equal(decode(data, topology={"w": (2, 3)})["w"], values)
    with pytest.raises(NNCError):
        decode(data)  # without the topology the unit cannot be parsed to its end


def test_ndu_header_errors():
    def ndu_unit(bits, profile=0):
        return head(profile) + unit_bytes(NNR_NDU, B(bits))

    name = ST("t")
    cases = [
        (ALIGN(U(5, 4) + "000" + name), "payload_type"),  # payload type 4 is reserved
        (ALIGN(U(5, NNR_PT_BLOCK) + "000" + name), "nnr_multiple_topology_elements_present_flag"),
        (ALIGN(U(5, 0) + "001" + name + "0" + "1" "0" "0000" + UE(1, 0)), "count_tensor_dimensions"),
        (ALIGN(U(5, 0) + "001" + name + "0" + "1" "0" "0000" + UE(1, 17)), "count_tensor_dimensions"),
        (ALIGN(U(5, 0) + "001" + name + "0" + "1" "0" "0000" + UE(1, 2) + UE(7, 3) + UE(7, 0)), "dimension"),
        (ALIGN(U(5, 0) + "001" + name + "0" + "1" "0" "0000" + UE(1, 2) + UE(7, 3) + UE(7, 3) + U(4, 5)), "scan_order"),
        (ALIGN(U(5, 1) + "000" + name + "1" + U(4, 0) + UE(2, 2) + IE(2, 2)), "codebook"),  # zero offset 3 of 2
        (ALIGN(U(5, 1) + "000" + name + "1" + U(4, 0) + UE(2, 0) + IE(2, 0)), "codebook"),  # empty codebook
        (U(5, 0) + "000" + name + "0" + "0000000", "alignment"),  # byte_alignment() must start with a one
        (ALIGN(U(5, 0) + "100" + UE(7, 1 << 20)), "count_topology_elements_minus2"),
    ]
    for bits, element in cases:
        with pytest.raises(NNCError, match=element):
            parse_all(ndu_unit(bits))
    mps = dict(mps_parent_signalling_enabled_flag=1)
    bits = ALIGN(U(5, 0) + "000" + name + "0" + "1" + "11" + "0")
    with pytest.raises(NNCError, match="parent_node_id_type"):
        parse_all(head(1, **mps) + unit_bytes(NNR_NDU, B(bits)))


# --- hostile headers ----------------------------------------------------------------------------------------
class _memory_limit:
    """Fails the test if the block allocates more than ``limit`` bytes at its peak."""

    def __init__(self, limit=8 << 20):
        self.limit = limit

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < self.limit, "peak allocation %d bytes" % peak
        return False


def test_hostile_headers_fail_before_allocating():
    name = ST("h")
    huge_dims = ALIGN(U(5, NNR_PT_FLOAT) + "001" + name + "0" "0" + "1" "1" "0000" + UE(1, 2) + UE(7, 1 << 20)
                      + UE(7, 1 << 20) + U(8, 10) + U(4, 0))
    many_rows = ALIGN(U(5, NNR_PT_INT) + "001" + name + "0" + "1" "0" "0000" + UE(1, 2) + UE(7, 1 << 24) + UE(7, 1)
                      + U(4, 1))
    big_codebook = ALIGN(U(5, NNR_PT_FLOAT) + "000" + name + "1" + U(4, 0) + UE(2, 1 << 24))
    many_units = B(U(8, 0) + "0" + U(7, 0) + U(16, 0xFFFF)) + b"\x00" * 8
    cases = [
        (head(0) + unit_bytes(NNR_NDU, B(huge_dims)) + b"\x00" * 16, "exceeds the limit"),
        (head(0) + unit_bytes(NNR_NDU, B(many_rows)), "NumBlockRowsMinus1"),
        (head(0) + unit_bytes(NNR_NDU, B(big_codebook)), "codebook_size"),
        (head(0) + unit_bytes(NNR_AGG, many_units), "quant_bitdepth"),
        (head(0) + B("0" + U(15, 0x7FFF)) + b"\x14" + b"\x00" * 20, "nnr_unit_size"),
        (head(0) + B("1" + U(31, 1 << 30)) + b"\x14" + b"\x00" * 20, "nnr_unit_size"),
        (head(0) + unit_bytes(NNR_NDU, B(U(5, 1) + "000") + b"no terminator"), "topology_elem_id"),
    ]
    for data, message in cases:
        with pytest.raises(NNCError, match=message):
            with _memory_limit():
                decoder_core.decode(data)


def test_nnc_error_names_offset_and_element():
    data = head(0) + unit_bytes(NNR_NDU, B(U(5, 1) + "000") + b"abc")
    with pytest.raises(NNCError) as exc:
        decoder_core.decode(data)
    assert exc.value.element == "topology_elem_id"
    assert exc.value.offset == len(head(0)) + 4
    assert "topology_elem_id" in str(exc.value) and "at byte %d" % exc.value.offset in str(exc.value)


# --- NNR_AGG ------------------------------------------------------------------------------------------------
def _children():
    return [uw.layer_parameter_set_unit(lps_self_contained_flag=1), raw_ndu("a", arange(2, 2)),
            raw_ndu("b", arange(3))]


def _agg_header_by_hand(children, entry_points, nnr_aggregate_unit_type=0, bitdepths=None, count=None):
    count = len(children) if count is None else count
    bits = U(8, nnr_aggregate_unit_type) + U(1, entry_points is not None) + U(7, 0) + U(16, count - 2)
    if entry_points is not None:
        for child, ep in zip(children, entry_points):
            bits += U(6, child[2] >> 2) + U(34, ep)
    for j in range(count):
        bits += U(5, (bitdepths or [0] * count)[j]) + "000"
    return B(bits)


def test_aggregate_with_entry_points_hand_assembled():
    children = _children()
    header_len = 4 + 5 * 3 + 3
    eps = [2 + 1 + header_len]
    for c in children[:-1]:
        eps.append(eps[-1] + len(c))
    expected = unit_bytes(NNR_AGG, _agg_header_by_hand(children, eps, bitdepths=[0, 8, 31]) + b"".join(children))
    built = uw.aggregate_unit(children, quant_bitdepth=[0, 8, 31])
    assert built == expected
    data = head(0) + built
    agg = parse_all(data)[2]
    assert (agg.agg.nnr_aggregate_unit_type, agg.agg.entry_points_present_flag, agg.agg.num_of_nnr_units_minus2) == (
        0, 1, 1)
    assert agg.agg.nnr_unit_type == [NNR_LPS, NNR_NDU, NNR_NDU]
    assert agg.agg.nnr_unit_entry_point == eps and eps[0] == 25
    assert agg.agg.quant_bitdepth == [0, 8, 31] and agg.agg.ctu_scan_order == []
    assert uw.aggregate_unit(children, agg.agg) == built  # written back from the parsed header
    assert [u.type_name for u in agg.units] == ["NNR_LPS", "NNR_NDU", "NNR_NDU"]
    assert [u.offset for u in agg.units] == [agg.offset + e for e in eps]
    out = decode(data)
    np.testing.assert_array_equal(out["a"], arange(2, 2))
    np.testing.assert_array_equal(out["b"], arange(3))


def test_aggregate_without_entry_points_self_contained():
    children = _children()
    built = uw.aggregate_unit(children, nnr_aggregate_unit_type=NNR_AGG_SLF, entry_points_present_flag=0)
    assert built == unit_bytes(NNR_AGG, _agg_header_by_hand(children, None, NNR_AGG_SLF) + b"".join(children))
    agg = parse_all(head(0) + built)[2]
    assert (agg.agg.nnr_aggregate_unit_type, agg.agg.entry_points_present_flag) == (NNR_AGG_SLF, 0)
    assert agg.agg.nnr_unit_entry_point == [] and len(agg.units) == 3
    assert list(decode(head(0) + built)) == ["a", "b"]


def test_aggregate_ctu_scan_order_with_unification():
    children = _children()[1:]
    mps = dict(unification_performance_map=PERFORMANCE_MPS["unification_performance_map"])
    built = uw.aggregate_unit(children, mps=mps, quant_bitdepth=[4, 5], ctu_scan_order=[1, 0],
                              entry_points_present_flag=0)
    assert built[3:] == B(U(8, 0) + "0" + U(7, 0) + U(16, 0) + U(5, 4) + "1" "00" + U(5, 5) + "0" "00") + b"".join(
        children)
    agg = parse_all(head(0, **mps) + built)[2].agg
    assert (agg.quant_bitdepth, agg.ctu_scan_order) == ([4, 5], [1, 0])
    # lps_unification_flag of the active LPS has the same effect.
    lps = dict(unification_performance_map=PERFORMANCE_MPS["unification_performance_map"])
    built = uw.aggregate_unit(children, lps=lps, ctu_scan_order=[0, 1])
    data = head(0) + uw.layer_parameter_set_unit(lps) + built
    assert parse_all(data)[3].agg.ctu_scan_order == [0, 1]


def test_aggregate_entry_point_errors():
    children = _children()
    eps = [25, 25 + len(children[0]), 25 + len(children[0]) + len(children[1])]

    def agg(header, kids=children):
        return head(0) + unit_bytes(NNR_AGG, header + b"".join(kids))

    with pytest.raises(NNCError, match="nnr_unit_entry_point"):
        parse_all(agg(_agg_header_by_hand(children, [25, eps[1] + 1, eps[2]])))
    wrong_types = [children[0], children[0], children[2]]  # claims LPS where the NDU is
    with pytest.raises(NNCError, match="nnr_unit_type"):
        parse_all(agg(_agg_header_by_hand(wrong_types, eps)))
    # num_of_nnr_units_minus2 one too high: the payload holds 3 of 4 units.
    eps4 = [e + 6 for e in eps] + [eps[2] + 6 + len(children[2])]  # the header grows by 5 + 1 bytes
    four = _agg_header_by_hand(children + [children[0]], eps4)
    with pytest.raises(NNCError, match="3 of its 4"):
        parse_all(agg(four))
    # One too low: bytes are left over.
    with pytest.raises(NNCError, match="after its 2"):
        parse_all(agg(_agg_header_by_hand(children[:2], None), children))
    # A child unit that runs past the end of the aggregate.
    with pytest.raises(NNCError, match="nnr_unit_size"):
        parse_all(agg(_agg_header_by_hand(children, None), children[:2] + [children[2][:-1]]))


def test_nested_aggregates_limit():
    unit = raw_ndu("n", [1.0, 2.0])
    for _ in range(MAX_AGG_NESTING):
        unit = uw.aggregate_unit([unit, uw.nnr_unit(40, b"", b"skip")])
    np.testing.assert_array_equal(decode(head(0) + unit)["n"], [1.0, 2.0])
    too_deep = uw.aggregate_unit([unit, uw.nnr_unit(40, b"", b"")])
    with pytest.raises(NNCError, match="nested"):
        decode(head(0) + too_deep)


# --- reserved and unspecified unit types --------------------------------------------------------------------
def test_reserved_and_unspecified_units_are_skipped():
    skipped = [uw.nnr_unit(t, b"", bytes([t]) * t) for t in (7, 19, 31, 32, 50, 63)]
    skipped.append(uw.nnr_unit(33, b"", b"\xff" * 40000))  # long form of nnr_unit_size
    a = raw_ndu("a", arange(2, 3))
    data = skipped[0] + head(0) + skipped[1] + a + b"".join(skipped[2:]) + raw_ndu("b", [7.5])
    units = parse_all(data)
    assert [u.type_name for u in units] == ["NNR_RSVD", "NNR_STR", "NNR_MPS", "NNR_RSVD", "NNR_NDU", "NNR_RSVD",
                                            "NNR_UNSP", "NNR_UNSP", "NNR_UNSP", "NNR_UNSP", "NNR_NDU"]
    assert [u.nnr_unit_type for u in units if u.type_name != "NNR_NDU"][4:] == [31, 32, 50, 63, 33]
    out = decode(data)
    assert list(out) == ["a", "b"]
    np.testing.assert_array_equal(out["a"], arange(2, 3))
    # Inside an aggregate too.
    out = decode(head(0) + uw.aggregate_unit([skipped[2], a, skipped[3]]))
    assert list(out) == ["a"]


# --- partial_data_counter (6.4.3.1) -------------------------------------------------------------------------
def _partial(name, values, chunk, **kw):
    ndu = dict(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, topology_elem_id=name,
               tensor_dimensions=list(values.shape))
    return uw.partial_data_units(ndu, values.astype("<f4").tobytes(), chunk, **kw)


def test_partial_units_joined():
    values = arange(5, 7)
    parts = _partial("p", values, 16)
    assert len(parts) == 9  # 140 bytes in chunks of 16
    header = uw.compressed_data_unit_header(dict(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT,
                                                 topology_elem_id="p", tensor_dimensions=[5, 7]))
    raw = values.astype("<f4").tobytes()
    for k, unit in enumerate(parts):
        assert unit == unit_bytes(NNR_NDU, header + raw[16 * k:16 * k + 16], 9 - k, 0)
    units = parse_all(head(0) + b"".join(parts))[2:]
    assert [u.partial_data_counter for u in units] == list(range(9, 0, -1))
    assert all(u.independently_decodable_flag == 0 and u.names == ["p"] for u in units)
    data = head(0) + raw_ndu("first", [1.0]) + b"".join(parts) + raw_ndu("last", [2.0])
    out = decode(data)
    assert list(out) == ["first", "p", "last"]
    np.testing.assert_array_equal(out["p"], values)
    # A single unit with counter 1, and units with the long size form.
    np.testing.assert_array_equal(decode(head(0) + b"".join(_partial("p", values, 1000)))["p"], values)
    np.testing.assert_array_equal(decode(head(0) + b"".join(_partial("p", values, 50, nnr_unit_size_flag=1)))["p"],
                                  values)


def test_partial_units_inside_an_aggregate():
    values = arange(4, 4)
    data = head(0) + uw.aggregate_unit(_partial("q", values, 20))
    np.testing.assert_array_equal(decode(data)["q"], values)


@pytest.mark.parametrize("case", ["interrupted_by_ndu", "interrupted_by_tpl", "interrupted_by_reserved",
                                  "interrupted_by_agg", "different_header", "wrong_order", "counter_skips",
                                  "stream_ends", "wrong_size"])
def test_partial_sequence_errors(case):
    values = arange(3, 4)
    parts = _partial("p", values, 12)
    assert len(parts) == 4
    other = _partial("q", values, 12)
    if case == "interrupted_by_ndu":
        units = parts[:2] + [raw_ndu("x", [1.0])] + parts[2:]
    elif case == "interrupted_by_tpl":
        units = parts[:3] + [uw.topology_unit(topology_data=b"x")] + parts[3:]
    elif case == "interrupted_by_agg":
        units = parts[:2] + [uw.aggregate_unit([raw_ndu("x", [1.0]), raw_ndu("y", [2.0])])] + parts[2:]
    elif case == "interrupted_by_reserved":
        units = parts[:1] + [uw.nnr_unit(20, b"", b"")] + parts[1:]
    elif case == "different_header":
        units = parts[:2] + other[2:]
    elif case == "wrong_order":
        units = [parts[0], parts[2], parts[1], parts[3]]
    elif case == "counter_skips":
        units = parts[:1] + parts[2:]
    elif case == "stream_ends":
        units = parts[:3]
    else:
        units = parts[:3] + [uw.nnr_unit(NNR_NDU, uw.compressed_data_unit_header(
            dict(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, topology_elem_id="p",
                 tensor_dimensions=[3, 4])), parts[3][-12:-4], 1, 0)]
    with pytest.raises(NNCError) as exc:
        decoder_core.decode(head(0) + b"".join(units))
    assert exc.value.element in ("partial_data_counter", "nnr_compressed_data_unit_header", "raw_float32_parameter")


# --- NNR_PT_RAW_FLOAT ---------------------------------------------------------------------------------------
def test_raw_float_payload_is_exact_float32():
    special = np.frombuffer(struct.pack("<8I", 0x00000001, 0x80000000, 0x7F7FFFFF, 0xFF800000, 0x7FC00001,
                                        0x3EAAAAAB, 0x00800000, 0xC2F6E979), dtype="<f4").reshape(2, 4)
    cases = [special, arange(7), arange(2, 3, 4), arange(1, 1, 1, 5)]
    data = head(0) + b"".join(raw_ndu("t%d" % i, a) for i, a in enumerate(cases))
    out = decode(data)
    for i, a in enumerate(cases):
        assert out["t%d" % i].shape == a.shape and out["t%d" % i].dtype == np.float32
        assert out["t%d" % i].tobytes() == a.astype("<f4").tobytes()  # bit for bit, NaN payload included
    ndu = dict(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, topology_elem_id="t", tensor_dimensions=[2, 2])
    short = uw.nnr_unit(NNR_NDU, uw.compressed_data_unit_header(ndu), bytes(12))
    with pytest.raises(NNCError, match="raw_float32_parameter"):
        decoder_core.decode(head(0) + short)


# --- the writer's input checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: uw.nnr_unit(64),
    lambda: uw.nnr_unit(NNR_NDU, partial_data_counter=256),
    lambda: uw.nnr_unit(NNR_NDU, independently_decodable_flag=0),
    lambda: uw.nnr_unit(NNR_QNT, b"", bytes(40000), nnr_unit_size_flag=0),
    lambda: uw.start_unit(256),
    lambda: uw.model_parameter_set_unit(mps_qp_density=8, mps_quantization_parameter=0),
    lambda: uw.model_parameter_set_unit(mps_qp_density=1, mps_quantization_parameter=4096),
    lambda: uw.model_parameter_set_unit(mps_qp_density=1),
    lambda: uw.model_parameter_set_unit(mps_quantization_method_flags=NNR_QSU),
    lambda: uw.model_parameter_set_unit(mps_pruning_flag=1),
    lambda: uw.model_parameter_set_unit(
        mps_sparsification_flag=0, sparsification_performance_map=PERFORMANCE_MPS["sparsification_performance_map"]),
    lambda: uw.model_parameter_set_unit(dict(pruning_performance_map=dict(ppm_count_pruning_ratios=3, entries=[]))),
    lambda: uw.model_parameter_set_unit(general_profile_idc=1, validation_set_performance=0.5),
    lambda: uw.topology_unit(topology_storage_format=NNR_TPL_REFLIST, topology_elements_ids_list=["only"]),
    lambda: uw.topology_unit(topology_storage_format=NNR_TPL_PRUN, topology_data=b"x"),
    lambda: uw.topology_unit(topology_compression_format=2, topology_data=b"x"),
    lambda: uw.topology_unit(topology_storage_format=NNR_TPL_PRUN,
                             nnr_pruning_topology_container=dict(prune_bit_mask=[2])),
    lambda: uw.compressed_data_unit(topology_elem_id="x\x00y"),
    lambda: uw.compressed_data_unit(topology_elem_id=3),
    lambda: uw.compressed_data_unit(topology_elem_id_index=3),
    lambda: uw.compressed_data_unit(nnr_compressed_data_unit_payload_type=4, topology_elem_id="x"),
    lambda: uw.compressed_data_unit(nnr_compressed_data_unit_payload_type=NNR_PT_BLOCK, topology_elem_id="x"),
    lambda: uw.compressed_data_unit(nnr_compressed_data_unit_payload_type=NNR_PT_INT, topology_elem_id="x",
                                    Codebook=[0, 1]),
    lambda: uw.compressed_data_unit(topology_elem_id="x", Codebook=[0, 0]),
    lambda: uw.compressed_data_unit(topology_elem_id="x", Codebook=[0, 1], CbZeroOffset=2),
    lambda: uw.compressed_data_unit(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, topology_elem_id="x",
                                    dq_flag=1),
    lambda: uw.compressed_data_unit(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, topology_elem_id="x",
                                    tensor_dimensions=[2], payload=bytes(4)),
    lambda: uw.compressed_data_unit(topology_elem_id="x", tensor_dimensions=[0, 3]),
    lambda: uw.compressed_data_unit(topology_elem_id="x", tensor_dimensions=[3, 3], scan_order=5),
    lambda: uw.compressed_data_unit(topology_elem_id="x", tensor_dimensions=[30, 3], scan_order=1),
    lambda: uw.compressed_data_unit(topology_elem_id="x", tensor_dimensions=[30, 3], scan_order=1,
                                    cabac_offset_list=[1, 2], BitOffsetList=[1, 2]),
    lambda: uw.compressed_data_unit(topology_elem_id="x", tensor_dimensions=[30], scan_order=1),
    lambda: uw.compressed_data_unit(topology_elem_id="x", cabac_unary_length_minus1=256),
    lambda: uw.compressed_data_unit(topology_elements_ids_list=["a", "b"], tensor_dimensions=[2]),
    lambda: uw.compressed_data_unit(topology_elem_id="x", device_id=0),
    lambda: uw.compressed_data_unit(topology_elem_id="x", general_profile_idc=1, parent_node_id_type=3,
                                    mps=dict(mps_parent_signalling_enabled_flag=1)),
    lambda: uw.compressed_data_unit(topology_elem_id="x", compressed_parameter_types=NNR_CPT_DC),
    lambda: uw.partial_data_units(dict(topology_elem_id="x"), bytes(1000), 3),
    lambda: uw.partial_data_units(dict(topology_elem_id="x"), bytes(10), 0),
    lambda: uw.aggregate_unit([uw.start_unit(0)]),
    lambda: uw.aggregate_unit([uw.start_unit(0), uw.start_unit(0)[:-1]]),
    lambda: uw.aggregate_unit([uw.start_unit(0), uw.start_unit(0)], quant_bitdepth=[32, 0]),
    lambda: uw.aggregate_unit([uw.start_unit(0), uw.start_unit(0)], quant_bitdepth=[0]),
    lambda: uw.aggregate_unit([uw.start_unit(0), uw.start_unit(0)], ctu_scan_order=[0, 1]),
    lambda: uw.aggregate_unit([uw.start_unit(0), uw.start_unit(0)], nnr_unit_entry_point=[0, 1]),
    lambda: uw.aggregate_unit([uw.start_unit(0), uw.start_unit(0)], nnr_unit_type=[0, 1]),
    lambda: uw.aggregate_unit([uw.start_unit(0), uw.start_unit(0)], num_of_nnr_units_minus2=1),
    lambda: uw.nnr_unit(NNR_QNT, 5),
    lambda: uw.compressed_data_unit(topology_elem_id="x", tensor_dimensions=[2, 3], input_parameters_present_flag=0,
                                    tensor_dimensions_flag=1),
])
def test_writer_rejects_invalid_fields(build):
    with pytest.raises(ValueError):
        build()
