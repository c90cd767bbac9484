"""Decoder-state rules: reserved units, configurable limits, out-of-band tensor dimensions, deflate."""

import zlib

import numpy as np
import pytest

import decoder_core
from decoder_core import NNCError
from decoder_core.tables import NNR_PT_RAW_FLOAT, NNR_QNT, NNR_TPL, NNR_TPL_REFLIST, NNR_TPL_UNREC
from decoder_core.units import _inflate, parse_units
from nnc_edge.encoder import unitwriter as uw
from nnc_edge.decoding import to_numpy


def head(**mps):
    return uw.start_unit(0) + uw.model_parameter_set_unit(mps, general_profile_idc=0)


def raw_ndu(arr, mps=None, **fields):
    arr = np.asarray(arr, dtype=np.float32)
    ndu = dict(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, **fields)
    return uw.compressed_data_unit(ndu, arr.astype("<f4").tobytes(), general_profile_idc=0, mps=mps)


def decode(data, **kw):
    return {name: to_numpy(dims, values) for name, dims, values in decoder_core.Decoder(**kw).decode(data)}


def test_reserved_and_unspecified_units_with_a_partial_counter_are_ignored():
    tensor = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = (head() + uw.nnr_unit(17, b"\x01\x02", b"xyz", partial_data_counter=3)
            + uw.nnr_unit(40, b"", b"\x00" * 5, partial_data_counter=1)
            + raw_ndu(tensor, topology_elem_id="w", tensor_dimensions=[2, 3]))
    out = decode(data)
    assert list(out) == ["w"]
    np.testing.assert_array_equal(out["w"], tensor)


def test_reserved_unit_interrupting_a_partial_sequence_is_an_error():
    tensor = np.arange(64, dtype=np.float32)
    parts = uw.partial_data_units(dict(nnr_compressed_data_unit_payload_type=NNR_PT_RAW_FLOAT, topology_elem_id="w",
                                       tensor_dimensions=[64]), tensor.astype("<f4").tobytes(), max_payload_bytes=100)
    assert len(parts) == 3
    data = head() + parts[0] + uw.nnr_unit(20, b"", b"") + b"".join(parts[1:])
    with pytest.raises(NNCError, match="interrupted by a NNR_RSVD unit"):
        decode(data)


def test_max_tensor_elements_refuses_large_claims_before_decoding():
    tensor = np.zeros((10, 10), dtype=np.float32)
    data = head() + raw_ndu(tensor, topology_elem_id="w", tensor_dimensions=[10, 10])
    assert decode(data, max_tensor_elements=100)["w"].shape == (10, 10)
    with pytest.raises(NNCError, match="exceeds the limit of 99") as info:
        decode(data, max_tensor_elements=99)
    assert info.value.element == "tensor_dimensions"
    # The limit survives the reset a second NNR_STR makes.
    with pytest.raises(NNCError, match="limit of 99"):
        decode(head() + head() + raw_ndu(tensor, topology_elem_id="w", tensor_dimensions=[10, 10]),
               max_tensor_elements=99)


def test_out_of_band_dimensions_by_name_and_through_the_reflist():
    tensor = np.arange(12, dtype=np.float32).reshape(3, 4)
    by_name = head() + raw_ndu(tensor, topology_elem_id="fc.w", input_parameters_present_flag=0, tensor_dimensions=[3, 4])
    np.testing.assert_array_equal(decode(by_name, topology={"fc.w": [3, 4]})["fc.w"], tensor)
    mps = dict(mps_topology_indexed_reference_flag=1)
    tpl = uw.topology_unit(topology_storage_format=NNR_TPL_REFLIST, topology_elements_ids_list=["a", "fc.w"])
    indexed = head(**mps) + tpl + raw_ndu(tensor, mps=mps, topology_elem_id_index=1, input_parameters_present_flag=0,
                                       tensor_dimensions=[3, 4])
    np.testing.assert_array_equal(decode(indexed, topology={"fc.w": [3, 4]})["fc.w"], tensor)
    # Without the topology, a 2-D tensor's scan_order (present only for count_tensor_dimensions > 1)
    # is not expected, so the header cannot be parsed.
    with pytest.raises(NNCError):
        decode(indexed)


@pytest.mark.parametrize("unit_type", [NNR_TPL, NNR_QNT])
def test_deflate_payloads_inflate_and_bad_ones_are_refused(unit_type):
    text = b"conv1: 3x3, 16 channels\n" * 40
    if unit_type == NNR_TPL:
        unit = uw.topology_unit(topology_storage_format=NNR_TPL_UNREC, topology_compression_format=1,
                                topology_data=text)
    else:
        unit = uw.quantization_unit(quantization_storage_format=0, quantization_compression_format=1,
                                    quantization_data=text)
    data = head() + unit
    units = list(parse_units(data))
    inflated = units[2].tpl.topology_data if unit_type == NNR_TPL else units[2].quantization_data
    assert inflated == text
    # format 0 (unrecognized), compression 1 (deflate), then data that is not a zlib stream
    bad = uw.nnr_unit(unit_type, bytes([0, 1]), b"\x78\x9c\x01\x02\x03")
    with pytest.raises(NNCError, match="deflate"):
        decoder_core.decode(head() + bad)
    with pytest.raises(NNCError, match="truncated or followed"):
        decoder_core.decode(head() + uw.nnr_unit(unit_type, bytes([0, 1]), zlib.compress(text)[:-2]))


def test_inflate_bounds_its_output():
    bomb = zlib.compress(b"\x00" * (1 << 20))
    assert len(_inflate(bomb, 1 << 20)) == 1 << 20
    with pytest.raises(NNCError, match="expands past"):
        _inflate(bomb, (1 << 20) - 1)
