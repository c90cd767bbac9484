"""Every conformance vector parses unit by unit (decoder_core.units.parse_unit, a fresh ParserState)
to the expected unit sequence, profile, tensor names and shapes (the .npz keys and shapes, in order),
and nnc_edge.encoder.unitwriter writes every parsed unit back to the same bytes.
"""

import numpy as np

from decoder_core.tables import NNR_MPS, NNR_NDU, NNR_PT_FLOAT, NNR_PT_INT, NNR_STR, NNR_TPL
from decoder_core.units import parse_units
from nnc_edge.encoder import unitwriter as uw


def walk(data):
    units = list(parse_units(data))
    assert sum(unit.nnr_unit_size for unit in units) == len(data)
    return units


def load(conformance_dir, name):
    with open(conformance_dir / (name + ".nnc"), "rb") as f:
        data = f.read()
    with np.load(conformance_dir / (name + ".npz")) as z:
        expected = [(key, z[key].shape, z[key].dtype) for key in z.files]
    return data, expected


def test_unit_sequence_names_and_shapes(conformance_vector, conformance_dir):
    name = conformance_vector["name"]
    data, expected = load(conformance_dir, name)
    assert len(data) == conformance_vector["bytes"]
    units = walk(data)
    assert [u.type_name for u in units] == ["NNR_STR", "NNR_MPS", "NNR_TPL"] + ["NNR_NDU"] * len(expected)
    profile = conformance_vector["profile"]
    assert units[0].general_profile_idc == profile == int(name[1])
    ndus = units[3:]
    assert [u.general_profile_idc for u in ndus] == [profile] * len(ndus)
    assert [n for u in ndus for n in u.names] == [key for key, _, _ in expected]
    assert [tuple(u.ndu.TensorDimensions) for u in ndus] == [shape for _, shape, _ in expected]
    assert [tuple(u.ndu.tensor_dimensions) for u in ndus] == [shape for _, shape, _ in expected]
    # Integer tensors are NNR_PT_INT, float tensors NNR_PT_FLOAT (supplement 7.1, 7.2).
    assert [u.ndu.nnr_compressed_data_unit_payload_type for u in ndus] == [
        NNR_PT_INT if dtype == np.int32 else NNR_PT_FLOAT for _, _, dtype in expected]
    # The manifest agrees with the .npz.
    assert [(k, v[0], tuple(v[1])) for k, v in conformance_vector["tensors"].items()] == [
        (key, str(dtype), shape) for key, shape, dtype in expected]
    for u in ndus:
        assert u.partial_data_counter == 0 and u.independently_decodable_flag == 1
        assert u.offset + 3 <= u.payload_start < u.payload_end == u.offset + u.nnr_unit_size
        if u.ndu.scan_order:
            assert len(u.ndu.BitOffsetList) == u.ndu.NumBlockRowsMinus1
    if name.startswith("p0_entrypoints") or name.startswith("p1_entrypoints"):
        (ndu,) = ndus
        assert ndu.ndu.scan_order == int(name[-1]) and ndu.ndu.NumBlockRowsMinus1 > 0
    if conformance_vector.get("chain") == "p1_diff" or conformance_vector.get("chain") == "p1_tca":
        assert units[1].mps.mps_parent_signalling_enabled_flag == 1
        assert all(u.ndu.parent_node_id_present_flag == 1 for u in ndus)


def rewrite(unit, data, profile, mps):
    """The unit written back from what the parser read."""
    size_flag = data[unit.offset] >> 7
    t = unit.nnr_unit_type
    if t == NNR_STR:
        return uw.start_unit(unit.general_profile_idc, nnr_unit_size_flag=size_flag)
    if t == NNR_MPS:
        return uw.model_parameter_set_unit(unit.mps, general_profile_idc=profile, nnr_unit_size_flag=size_flag)
    if t == NNR_TPL:
        return uw.topology_unit(unit.tpl, topology_storage_format=unit.topology_storage_format,
                                topology_compression_format=unit.topology_compression_format,
                                nnr_unit_size_flag=size_flag)
    assert t == NNR_NDU
    counter = unit.partial_data_counter if unit.partial_data_counter_present_flag else None
    return uw.compressed_data_unit(unit.ndu, data[unit.payload_start:unit.payload_end], general_profile_idc=profile,
                                   mps=mps, partial_data_counter=counter,
                                   independently_decodable_flag=unit.independently_decodable_flag,
                                   nnr_unit_size_flag=size_flag)


def test_writer_reproduces_every_unit(conformance_vector, conformance_dir):
    data, _ = load(conformance_dir, conformance_vector["name"])
    units = walk(data)
    profile = units[0].general_profile_idc
    mps = units[1].mps
    for unit in units:
        original = data[unit.offset:unit.offset + unit.nnr_unit_size]
        assert rewrite(unit, data, profile, mps) == original, unit.type_name
