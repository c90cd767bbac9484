"""NNR unit parser: one function per syntax structure of clause 6.3.

Each function reads from a BitReader and returns a plain Syntax object whose attributes carry the
standard's names. Profile-1 (second edition, as NNCodec writes it) additions follow
../shared/spec/deepcabac-supplement.md section 6. Arithmetic-coded NDU payloads are not decoded here;
the NDU object records where its payload lies.
"""

from .bitreader import BitReader
from .errors import NNCError
from .limits import (
    DEFAULT_MAX_AGG_NESTING, DEFAULT_MAX_TENSOR_ELEMENTS, MAX_LIST_ENTRIES, MAX_TENSOR_DIMENSIONS, exceeded, resolve,
)
from .tables import (
    NNR_AGG, NNR_CPT_DC, NNR_LPS, NNR_MPS, NNR_NDU, NNR_PT_BLOCK, NNR_PT_FLOAT, NNR_PT_INT,
    NNR_PT_RAW_FLOAT, NNR_QCB, NNR_QNT, NNR_QSU, NNR_STR, NNR_TPL, NNR_TPL_BMSK, NNR_TPL_DICT,
    NNR_TPL_PRUN, NNR_TPL_REFLIST, unit_type_name,
)

# Hostile-header limits, checked before anything is allocated: the defaults of decoder_core.limits
# (a ParserState checks its own Limits).
MAX_TENSOR_ELEMENTS = DEFAULT_MAX_TENSOR_ELEMENTS
MAX_AGG_NESTING = DEFAULT_MAX_AGG_NESTING


class Syntax:
    """A parsed syntax structure; attributes are the standard's syntax element names."""

    def __init__(self, **fields):
        # MicroPython's instance __dict__ is read-only: set the attributes one by one.
        for key in fields:
            setattr(self, key, fields[key])

    def get(self, name, default=None):
        # Not self.__dict__.get: MicroPython's __dict__ is a new dict, a copy of the instance's
        # table, at every access (some hundred bytes of garbage per NDU header element looked up).
        return getattr(self, name, default)

    def as_dict(self):
        out = {}
        for key, value in self.__dict__.items():
            if key.startswith("_"):
                continue
            if isinstance(value, Syntax):
                value = value.as_dict()
            elif isinstance(value, list):
                value = [v.as_dict() if isinstance(v, Syntax) else v for v in value]
            elif isinstance(value, (bytes, bytearray, memoryview)):
                value = {"bytes": len(value)}
            out[key] = value
        return out

    def __repr__(self):
        return "Syntax(%s)" % ", ".join("%s=%r" % kv for kv in sorted(self.__dict__.items()))


class ParserState:
    """What the parsing of later units depends on: the profile and the active parameter sets.

    ``topology`` is the out-of-band topology (topology_carriage_flag 0, 6.4.3.5): a dict tensor name ->
    dimensions, or a list of (name, dimensions) pairs whose order also gives the indexes that
    topology_elem_id_index refers to (an out-of-band NNR_TPL_REFLIST); an NNR_TPL_REFLIST in the stream
    takes precedence. ``limits`` (decoder_core.Limits, default the defaults) bounds what headers may claim.
    """

    def __init__(self, topology=None, limits=None):
        self.external_reflist = None
        if isinstance(topology, (list, tuple)):
            self.external_reflist = [name for name, _ in topology]
            topology = dict(topology)
        self._init(topology, limits)

    def _init(self, topology, limits):
        self.topology = topology
        self.limits = resolve(limits)
        self.general_profile_idc = None
        self.mps = None
        self.lps = None
        # Set after an NDU (not NNR_PT_BLOCK) carrying decomposed tensor G: the next one carries H.
        self.expect_decomposed_h = False
        self.reflist = self.external_reflist

    @property
    def profile(self):
        return self.general_profile_idc or 0

    def mps_flag(self, name):
        return self.mps.get(name, 0) if self.mps is not None else 0

    def lps_flag(self, name):
        return self.lps.get(name, 0) if self.lps is not None else 0


def _check_count(count, limit, reader, element):
    if count > limit:
        raise NNCError("%s = %d exceeds the limit %d" % (element, count, limit), reader.byte_offset(), element)


# --- 6.3.2 / 6.3.3.1 ------------------------------------------------------------------------------
def nnr_unit_size(data, offset, end=None):
    """Return (nnr_unit_size, bytes used by nnr_unit_size()) for the unit starting at offset."""
    end = len(data) if end is None else end
    if offset >= end:
        raise NNCError("no data for nnr_unit_size()", offset, "nnr_unit_size")
    flag = data[offset] >> 7
    nbytes = 4 if flag else 2
    if offset + nbytes > end:
        raise NNCError("data ends inside nnr_unit_size()", offset, "nnr_unit_size")
    size = data[offset] & 0x7F
    for j in range(1, nbytes):
        size = (size << 8) | data[offset + j]
    if size < nbytes + 1:
        raise NNCError("nnr_unit_size %d is smaller than its own header" % size, offset, "nnr_unit_size")
    return size, nbytes


def parse_unit(data, offset, end, state, depth=0):
    """Parse the NNR unit at ``offset`` (6.3.1). ``end`` bounds the enclosing data."""
    size, size_bytes = nnr_unit_size(data, offset, end)
    if offset + size > end:
        raise NNCError("nnr_unit_size %d runs past the end of the data (%d bytes left)"
                       % (size, end - offset), offset, "nnr_unit_size")
    reader = BitReader(data, offset, offset + size)
    reader.max_string_bytes = state.limits.max_string_bytes
    reader.pos += size_bytes * 8
    unit = Syntax(offset=offset, nnr_unit_size=size)
    nnr_unit_header(reader, unit, state)
    nnr_unit_payload(reader, unit, state, depth)
    return unit


def parse_unit_header(data, offset, available, state):
    """Parse the nnr_unit_header() (6.3.2) of the unit at ``offset`` when only the bytes up to
    ``available`` have arrived; raises errors.Incomplete when the header goes on past them.

    For an NDU the result records its payload's bounds as parse_unit() does; streaming decodes the
    payload from there as its bytes arrive.
    """
    size, size_bytes = nnr_unit_size(data, offset, available)
    end = offset + size
    reader = BitReader(data, offset, available if available < end else end)
    reader.partial = available < end
    reader.max_string_bytes = state.limits.max_string_bytes
    reader.pos += size_bytes * 8
    unit = Syntax()  # no keyword arguments: their dict would be garbage per unit
    unit.offset = offset
    unit.nnr_unit_size = size
    nnr_unit_header(reader, unit, state)
    if unit.nnr_unit_type == NNR_NDU:
        _ndu_payload_bounds(unit, reader.byte_offset(), end)
        _advance_decomposition(unit.ndu, state)
    return unit


def nnr_unit_header(reader, unit, state):
    unit.nnr_unit_type = reader.u(6, "nnr_unit_type")
    unit.type_name = unit_type_name(unit.nnr_unit_type)
    unit.independently_decodable_flag = reader.u(1, "independently_decodable_flag")
    unit.partial_data_counter_present_flag = reader.u(1, "partial_data_counter_present_flag")
    unit.partial_data_counter = 0
    if unit.partial_data_counter_present_flag:
        unit.partial_data_counter = reader.u(8, "partial_data_counter")
    t = unit.nnr_unit_type
    if t == NNR_STR:
        if state.general_profile_idc is not None and state.mps is not None:
            # 7.1: a new NNR_STR resets the decoder state.
            state._init(state.topology, state.limits)
        unit.general_profile_idc = reader.u(8, "general_profile_idc")
        if unit.general_profile_idc > 1:
            raise NNCError("general_profile_idc %d is not supported (0 and 1 are)"
                           % unit.general_profile_idc, unit.offset, "general_profile_idc")
        state.general_profile_idc = unit.general_profile_idc
    elif state.general_profile_idc is None and t <= NNR_AGG:
        # 6.2.3 and 7.1: decoding starts with an NNR_STR.
        raise NNCError("%s before any NNR_STR" % unit.type_name, unit.offset, "nnr_unit_type")
    elif t == NNR_MPS:
        pass  # nnr_reserved_zero_0bit
    elif t == NNR_LPS:
        unit.lps_self_contained_flag = reader.u(1, "lps_self_contained_flag")
        reader.u(7, "nnr_reserved_zero_7bits")
    elif t == NNR_TPL:
        unit.topology_storage_format = reader.u(8, "topology_storage_format")
        unit.topology_compression_format = reader.u(8, "topology_compression_format")
    elif t == NNR_QNT:
        unit.quantization_storage_format = reader.u(8, "quantization_storage_format")
        unit.quantization_compression_format = reader.u(8, "quantization_compression_format")
    elif t == NNR_NDU:
        _require_mps(unit, state)
        unit.ndu = nnr_compressed_data_unit_header(reader, state)
        _bind_parameter_sets(unit, state)
    elif t == NNR_AGG:
        unit.agg = nnr_aggregate_unit_header(reader, state)
    unit.header_end = reader.byte_offset() if reader.byte_aligned() else None


def _bind_parameter_sets(unit, state):
    """Record what the NDU's payload decoding takes from the parameter sets active now."""
    ndu = unit.ndu
    unit.general_profile_idc = state.profile
    unit.names = ndu_names(ndu, state, unit.offset)
    # 6.4.4.4: QpDensity and QuantizationParameter come from the active LPS, else the MPS.
    if state.lps is not None and state.lps.get("lps_qp_density") is not None:
        unit.QpDensity = state.lps.lps_qp_density
        unit.QuantizationParameter = state.lps.lps_quantization_parameter
    else:
        unit.QpDensity = state.mps.get("mps_qp_density")
        unit.QuantizationParameter = state.mps.get("mps_quantization_parameter", 0)
    unit.parent_signalling = state.mps_flag("mps_parent_signalling_enabled_flag")


def ndu_names(ndu, state, offset=None):
    """Tensor names: topology_elem_id(s), or the REFLIST entries their indexes point to."""
    if ndu.nnr_multiple_topology_elements_present_flag:
        ids = ndu.topology_elements_ids_list
    elif ndu.get("topology_elem_id") is not None:
        ids = [ndu.topology_elem_id]
    else:
        ids = [ndu.topology_elem_id_index]
    names = []
    for i in ids:
        if isinstance(i, int):
            if state.reflist is None:
                i = str(i)  # no REFLIST known: the index itself names the tensor
            elif i < len(state.reflist):
                i = state.reflist[i]
            else:
                raise NNCError("topology_elem_id_index %d is past the end of the NNR_TPL_REFLIST (%d entries)"
                               % (i, len(state.reflist)), offset, "topology_elem_id_index")
        names.append(i)
    if ndu.get("decomposed_part") and ndu.nnr_compressed_data_unit_payload_type != NNR_PT_BLOCK:
        names = [n + "." + ndu.decomposed_part for n in names]
    return names


def _require_mps(unit, state):
    if state.mps is None:
        raise NNCError("%s before the NNR_MPS" % unit.type_name, unit.offset, "nnr_unit_type")


# --- 6.3.3.7 --------------------------------------------------------------------------------------
def nnr_compressed_data_unit_header(reader, state):
    ndu = Syntax()
    pt = ndu.nnr_compressed_data_unit_payload_type = reader.u(5, "nnr_compressed_data_unit_payload_type")
    if pt > NNR_PT_BLOCK:
        raise NNCError("nnr_compressed_data_unit_payload_type %d is reserved" % pt,
                       reader.byte_offset(), "nnr_compressed_data_unit_payload_type")
    multi = ndu.nnr_multiple_topology_elements_present_flag = reader.u(
        1, "nnr_multiple_topology_elements_present_flag")
    if pt == NNR_PT_BLOCK and not multi:
        # 6.4.3.7: an NNR_PT_BLOCK lists its tensors in topology_elements_ids_list().
        raise NNCError("NNR_PT_BLOCK with nnr_multiple_topology_elements_present_flag 0", reader.byte_offset(),
                       "nnr_multiple_topology_elements_present_flag")
    ndu.nnr_decompressed_data_format_present_flag = reader.u(1, "nnr_decompressed_data_format_present_flag")
    ndu.input_parameters_present_flag = reader.u(1, "input_parameters_present_flag")
    indexed = state.mps_flag("mps_topology_indexed_reference_flag")
    if multi:
        ndu.topology_elements_ids_list = topology_elements_ids_list(reader, indexed)
        ndu.count_topology_elements_minus2 = len(ndu.topology_elements_ids_list) - 2
    elif not indexed:
        ndu.topology_elem_id = reader.st("topology_elem_id")
    else:
        ndu.topology_elem_id_index = reader.ue(7, "topology_elem_id_index")
    if state.profile == 1:
        _profile1_node_ids(reader, ndu, state)
    ndu.codebook_present_flag = 0
    if pt in (NNR_PT_FLOAT, NNR_PT_BLOCK):
        ndu.codebook_present_flag = reader.u(1, "codebook_present_flag")
        if ndu.codebook_present_flag:
            ndu.CbZeroOffset, ndu.Codebook, ndu.codebook_egk = integer_codebook(reader)
    ndu.dq_flag = 0
    if pt in (NNR_PT_INT, NNR_PT_FLOAT, NNR_PT_BLOCK):
        ndu.dq_flag = reader.u(1, "dq_flag")
    if ndu.nnr_decompressed_data_format_present_flag:
        ndu.nnr_decompressed_data_format = reader.u(7, "nnr_decompressed_data_format")
    ndu.compressed_parameter_types = 0
    if ndu.input_parameters_present_flag:
        ndu.tensor_dimensions_flag = reader.u(1, "tensor_dimensions_flag")
        ndu.cabac_unary_length_flag = reader.u(1, "cabac_unary_length_flag")
        cpt = ndu.compressed_parameter_types = reader.u(4, "compressed_parameter_types")
        if cpt & NNR_CPT_DC:
            ndu.decomposition_rank = reader.ue(3, "decomposition_rank")
            ndu.g_number_of_rows = reader.ue(3, "g_number_of_rows")
        if ndu.tensor_dimensions_flag:
            ndu.tensor_dimensions = tensor_dimension_list(reader, state.limits.max_tensor_elements)
    if ndu.get("tensor_dimensions") is None and state.topology is not None and not multi:
        # 6.4.3.7: dimensions not in the bitstream come from the (out-of-band) topology, found by
        # the element's name (an indexed reference resolves through the NNR_TPL_REFLIST).
        dims = state.topology.get(ndu_names(ndu, state, reader.byte_offset())[0])
        if dims is not None:
            ndu.tensor_dimensions = list(dims)
            _check_elements(_prod(ndu.tensor_dimensions), reader, "tensor_dimensions", state.limits.max_tensor_elements)
    if ndu.input_parameters_present_flag:
        if pt != NNR_PT_BLOCK and multi:
            ndu.topology_tensor_dimension_mapping = topology_tensor_dimension_mapping(
                reader, ndu.count_topology_elements_minus2)
        if ndu.cabac_unary_length_flag:
            ndu.cabac_unary_length_minus1 = reader.u(8, "cabac_unary_length_minus1")
    if pt == NNR_PT_BLOCK and (ndu.compressed_parameter_types & NNR_CPT_DC) and ndu.codebook_present_flag:
        ndu.CbZeroOffsetDC, ndu.CodebookDC, ndu.codebook_egkDC = integer_codebook(reader)
    _derive_tensor_dimensions(reader, ndu, state)
    ndu.scan_order = 0
    ndu.NumBlockRowsMinus1 = 0
    dims = ndu.get("tensor_dimensions")
    if dims is not None and len(dims) > 1:
        if state.profile == 1:
            ndu.first_tensor_dimension_shift = reader.ue(1, "first_tensor_dimension_shift")
            if ndu.first_tensor_dimension_shift != 0:
                raise NNCError("first_tensor_dimension_shift %d is not supported"
                               % ndu.first_tensor_dimension_shift, reader.byte_offset(),
                               "first_tensor_dimension_shift")
        ndu.scan_order = reader.u(4, "scan_order")
        if ndu.scan_order > 4:
            raise NNCError("scan_order %d is reserved" % ndu.scan_order, reader.byte_offset(), "scan_order")
        if ndu.scan_order > 0:
            _entry_point_lists(reader, ndu)
    reader.byte_alignment("nnr_compressed_data_unit_header byte_alignment()")
    return ndu


def _profile1_node_ids(reader, ndu, state):
    # Supplement 6.3: node and parent identification (second edition).
    ndu.node_id_present_flag = reader.u(1, "node_id_present_flag")
    if ndu.node_id_present_flag:
        ndu.device_id = reader.ue(1, "device_id")
        ndu.parameter_id = reader.ue(5, "parameter_id")
        ndu.put_node_depth = reader.ue(4, "put_node_depth")
    ndu.parent_node_id_present_flag = 0
    ndu.temporal_context_modeling_flag = 0
    if state.mps_flag("mps_parent_signalling_enabled_flag"):
        ndu.parent_node_id_present_flag = reader.u(1, "parent_node_id_present_flag")
        if ndu.parent_node_id_present_flag:
            ndu.parent_node_id_type = reader.u(2, "parent_node_id_type")
            ndu.temporal_context_modeling_flag = reader.u(1, "temporal_context_modeling_flag")
            if ndu.parent_node_id_type == 0:
                ndu.parent_device_id = reader.ue(1, "parent_device_id")
                if not ndu.node_id_present_flag:
                    ndu.parameter_id = reader.ue(5, "parameter_id")
                    ndu.put_node_depth = reader.ue(4, "put_node_depth")
            elif ndu.parent_node_id_type == 1:
                ndu.parent_node_payload_sha256 = reader.u(256, "parent_node_payload_sha256")
            elif ndu.parent_node_id_type == 2:
                ndu.parent_node_payload_sha512 = reader.u(512, "parent_node_payload_sha512")
            else:
                raise NNCError("parent_node_id_type 3 is reserved", reader.byte_offset(), "parent_node_id_type")


def _derive_tensor_dimensions(reader, ndu, state):
    """6.4.3.7: TensorDimensions (G or H of a decomposed tensor, else tensor_dimensions)."""
    dims = ndu.get("tensor_dimensions")
    ndu.decomposed_part = None
    if dims is None:
        return
    if ndu.compressed_parameter_types & NNR_CPT_DC:
        rank = ndu.decomposition_rank
        rows = ndu.g_number_of_rows
        total = _prod(dims)
        if rows == 0 or rank == 0 or total % rows:
            raise NNCError("decomposition g_number_of_rows %d does not divide %d elements (rank %d)"
                           % (rows, total, rank), reader.byte_offset(), "g_number_of_rows")
        ndu.TensorDimensionsG = [rows, rank]
        ndu.TensorDimensionsH = [rank, total // rows]
        _check_elements(rows * rank, reader, "TensorDimensionsG", state.limits.max_tensor_elements)
        _check_elements(rank * (total // rows), reader, "TensorDimensionsH", state.limits.max_tensor_elements)
        if ndu.nnr_compressed_data_unit_payload_type != NNR_PT_BLOCK:
            if state.expect_decomposed_h:
                ndu.decomposed_part = "H"
                ndu.TensorDimensions = ndu.TensorDimensionsH
            else:
                ndu.decomposed_part = "G"
                ndu.TensorDimensions = ndu.TensorDimensionsG
            return
    ndu.TensorDimensions = dims


def _entry_point_lists(reader, ndu):
    # 6.3.3.7 and supplement 1.11: BitOffsetList entries are per-block-row lengths.
    shift = 2 + ndu.scan_order
    bs = 4 << ndu.scan_order
    if ndu.nnr_compressed_data_unit_payload_type == NNR_PT_BLOCK and ndu.compressed_parameter_types & NNR_CPT_DC:
        rows = ((ndu.TensorDimensionsG[0] + bs - 1) >> shift) + ((ndu.TensorDimensionsH[0] + bs - 1) >> shift) - 2
    else:
        rows = ((ndu.TensorDimensions[0] + bs - 1) >> shift) - 1
    _check_count(rows, MAX_LIST_ENTRIES, reader, "NumBlockRowsMinus1")
    ndu.NumBlockRowsMinus1 = rows
    # Lists of their final size: appending would leave the smaller ones behind as garbage per header.
    offsets = ndu.cabac_offset_list = [0] * rows
    states = ndu.dq_state_list = [0] * rows if ndu.dq_flag else []
    bits = ndu.BitOffsetList = [0] * rows
    for j in range(rows):
        offsets[j] = reader.u(8, "cabac_offset_list")
        if ndu.dq_flag:
            states[j] = reader.u(3, "dq_state_list")
        if j == 0:
            bits[j] = reader.ue(11, "bit_offset_delta1")
        else:
            bits[j] = bits[j - 1] + reader.ie(7, "bit_offset_delta2")


def _prod(values):
    p = 1
    for v in values:
        p *= v
    return p


def _check_elements(count, reader, element, limit=MAX_TENSOR_ELEMENTS):
    if count > limit:
        raise exceeded("max_tensor_elements", "tensor of %d elements" % count, limit, reader.byte_offset(), element)


def integer_codebook(reader):
    """6.3.3.7 integer_codebook(): returns (cbZeroOffset, integerCodebook, codebook_egk)."""
    egk = reader.u(4, "codebook_egk")
    size = reader.ue(2, "codebook_size")
    _check_count(size, MAX_LIST_ENTRIES, reader, "codebook_size")
    centre = reader.ie(2, "codebook_centre_offset")
    zero_offset = (size >> 1) + centre
    if size == 0 or zero_offset < 0 or zero_offset >= size:
        raise NNCError("codebook zero offset %d outside a codebook of %d entries" % (zero_offset, size),
                       reader.byte_offset(), "codebook_centre_offset")
    book = [0] * size
    book[zero_offset] = reader.ie(7, "codebook_zero_value")
    previous = book[zero_offset]
    for j in range(zero_offset - 1, -1, -1):
        book[j] = previous - reader.ue(egk, "codebook_delta_left") - 1
        previous = book[j]
    previous = book[zero_offset]
    for j in range(zero_offset + 1, size):
        book[j] = previous + reader.ue(egk, "codebook_delta_right") + 1
        previous = book[j]
    return zero_offset, book, egk


def tensor_dimension_list(reader, max_elements=MAX_TENSOR_ELEMENTS):
    count = reader.ue(1, "count_tensor_dimensions")
    _check_count(count, MAX_TENSOR_DIMENSIONS, reader, "count_tensor_dimensions")
    if count == 0:
        raise NNCError("count_tensor_dimensions is 0", reader.byte_offset(), "count_tensor_dimensions")
    dims = [reader.ue(7, "tensor_dimensions") for _ in range(count)]
    if 0 in dims:
        raise NNCError("a tensor dimension is 0", reader.byte_offset(), "tensor_dimensions")
    _check_elements(_prod(dims), reader, "tensor_dimensions", max_elements)
    return dims


def topology_elements_ids_list(reader, indexed):
    count = reader.ue(7, "count_topology_elements_minus2") + 2
    _check_count(count, MAX_LIST_ENTRIES, reader, "count_topology_elements_minus2")
    if not indexed:
        reader.byte_alignment("topology_elements_ids_list byte_alignment()")
        ids = [reader.st("topology_elem_id_list") for _ in range(count)]
    else:
        ids = [reader.ue(7, "topology_elem_id_index_list") for _ in range(count)]
        reader.byte_alignment("topology_elements_ids_list byte_alignment()")
    return ids


def topology_tensor_dimension_mapping(reader, count_minus2):
    m = Syntax()
    m.concatentation_axis_index = reader.u(8, "concatentation_axis_index")
    m.split_index = [reader.ue(7, "split_index") for _ in range(count_minus2 + 1)]
    m.number_of_shifts = []
    m.shift_index = []
    m.shift_value = []
    for _ in range(count_minus2 + 2):
        n = reader.ue(1, "number_of_shifts")
        _check_count(n, MAX_TENSOR_DIMENSIONS, reader, "number_of_shifts")
        m.number_of_shifts.append(n)
        idx = []
        val = []
        for _ in range(n):
            idx.append(reader.ue(7, "shift_index"))
            val.append(reader.ue(1, "shift_value"))
        m.shift_index.append(idx)
        m.shift_value.append(val)
    return m


# --- 6.3.3.8 --------------------------------------------------------------------------------------
def nnr_aggregate_unit_header(reader, state):
    agg = Syntax()
    agg.nnr_aggregate_unit_type = reader.u(8, "nnr_aggregate_unit_type")
    agg.entry_points_present_flag = reader.u(1, "entry_points_present_flag")
    reader.u(7, "nnr_reserved_zero_7bits")
    agg.num_of_nnr_units_minus2 = reader.u(16, "num_of_nnr_units_minus2")
    count = agg.num_of_nnr_units_minus2 + 2
    agg.nnr_unit_type = []
    agg.nnr_unit_entry_point = []
    if agg.entry_points_present_flag:
        for _ in range(count):
            agg.nnr_unit_type.append(reader.u(6, "nnr_unit_type"))
            agg.nnr_unit_entry_point.append(reader.u(34, "nnr_unit_entry_point"))
    agg.quant_bitdepth = []
    agg.ctu_scan_order = []
    unification = state.mps_flag("mps_unification_flag") or state.lps_flag("lps_unification_flag")
    for _ in range(count):
        agg.quant_bitdepth.append(reader.u(5, "quant_bitdepth"))
        if unification:
            agg.ctu_scan_order.append(reader.u(1, "ctu_scan_order"))
            reader.u(2, "nnr_reserved_zero_2bits")
        else:
            reader.u(3, "nnr_reserved_zero_3bits")
    return agg


# --- 6.3.4 ----------------------------------------------------------------------------------------
def nnr_unit_payload(reader, unit, state, depth):
    t = unit.nnr_unit_type
    if t == NNR_MPS:
        unit.mps = nnr_model_parameter_set_unit_payload(reader, state)
        state.mps = unit.mps
        state.lps = None
    elif t == NNR_LPS:
        unit.lps = nnr_layer_parameter_set_unit_payload(reader)
        state.lps = unit.lps
    elif t == NNR_TPL:
        unit.tpl = nnr_topology_unit_payload(reader, unit, state)
    elif t == NNR_QNT:
        unit.quantization_data = _maybe_inflate(reader.bs("quantization_data"), unit.quantization_compression_format,
                                                unit, "quantization_data")
    elif t == NNR_NDU:
        _ndu_payload_bounds(unit, reader.byte_offset(), reader.end)
        _advance_decomposition(unit.ndu, state)
    elif t == NNR_AGG:
        nnr_aggregate_unit_payload(reader, unit, state, depth)
    # NNR_STR has an empty payload; reserved and unspecified types are skipped by their size.


def _ndu_payload_bounds(unit, start, end):
    unit.payload_start = start
    unit.payload_end = end
    ndu = unit.ndu
    if ndu.nnr_compressed_data_unit_payload_type == NNR_PT_RAW_FLOAT and ndu.get("TensorDimensions"):
        need = 4 * _prod(ndu.TensorDimensions)
        if unit.partial_data_counter == 0 and end - start != need:
            raise NNCError("NNR_PT_RAW_FLOAT payload has %d bytes, %d expected" % (end - start, need), start,
                           "raw_float32_parameter")
    ndu.partial_data_counter = unit.partial_data_counter


def _advance_decomposition(ndu, state):
    if ndu.get("partial_data_counter", 0) > 1:
        return  # the header repeats in every partial unit; the tensor ends with counter 1
    if ndu.get("decomposed_part") == "G":
        state.expect_decomposed_h = True
    elif ndu.get("decomposed_part") == "H":
        state.expect_decomposed_h = False


def nnr_model_parameter_set_unit_payload(reader, state):
    mps = Syntax()
    mps.topology_carriage_flag = reader.u(1, "topology_carriage_flag")
    mps.mps_sparsification_flag = reader.u(1, "mps_sparsification_flag")
    mps.mps_pruning_flag = reader.u(1, "mps_pruning_flag")
    mps.mps_unification_flag = reader.u(1, "mps_unification_flag")
    mps.mps_decomposition_performance_map_flag = reader.u(1, "mps_decomposition_performance_map_flag")
    mps.mps_quantization_method_flags = reader.u(3, "mps_quantization_method_flags")
    mps.mps_topology_indexed_reference_flag = reader.u(1, "mps_topology_indexed_reference_flag")
    mps.mps_parent_signalling_enabled_flag = 0
    if state.profile == 1:
        # Supplement 6.2 (second edition).
        mps.base_model_id_present_flag = reader.u(1, "base_model_id_present_flag")
        mps.validation_set_performance_present_flag = reader.u(1, "validation_set_performance_present_flag")
        mps.metric_type_performance_map_valid_flag = reader.u(1, "metric_type_performance_map_valid_flag")
        mps.mps_parent_signalling_enabled_flag = reader.u(1, "mps_parent_signalling_enabled_flag")
        if mps.mps_parent_signalling_enabled_flag:
            mps.nnr_pre_flag = reader.u(1, "nnr_pre_flag")
        else:
            reader.u(1, "nnr_reserved_zero_1bit")
        reader.u(2, "nnr_reserved_zero_2bits")
        if mps.base_model_id_present_flag:
            mps.base_model_id = reader.st("base_model_id")
        if mps.validation_set_performance_present_flag or mps.metric_type_performance_map_valid_flag:
            mps.performance_metric_type = reader.st("performance_metric_type")
    else:
        reader.u(7, "nnr_reserved_zero_7bits")
    _quantization_parameters(reader, mps, "mps")
    if mps.mps_sparsification_flag:
        mps.sparsification_performance_map = sparsification_performance_map(reader)
    if mps.mps_pruning_flag:
        mps.pruning_performance_map = pruning_performance_map(reader)
    if mps.mps_unification_flag:
        mps.unification_performance_map = unification_performance_map(reader)
    if mps.mps_decomposition_performance_map_flag:
        mps.decomposition_performance_map = decomposition_performance_map(reader)
    if state.profile == 1 and mps.validation_set_performance_present_flag:
        mps.validation_set_performance = reader.flt(32, "validation_set_performance")
    reader.byte_alignment("nnr_model_parameter_set_unit_payload byte_alignment()")
    return mps


def _quantization_parameters(reader, ps, prefix):
    flags = ps.get(prefix + "_quantization_method_flags")
    if (flags & NNR_QSU) or (flags & NNR_QCB):
        setattr(ps, prefix + "_qp_density", reader.u(3, prefix + "_qp_density"))
        setattr(ps, prefix + "_quantization_parameter", reader.i(13, prefix + "_quantization_parameter"))


def nnr_layer_parameter_set_unit_payload(reader):
    lps = Syntax()
    reader.u(1, "nnr_reserved_zero_1bit")
    lps.lps_sparsification_flag = reader.u(1, "lps_sparsification_flag")
    lps.lps_pruning_flag = reader.u(1, "lps_pruning_flag")
    lps.lps_unification_flag = reader.u(1, "lps_unification_flag")
    lps.lps_quantization_method_flags = reader.u(3, "lps_quantization_method_flags")
    reader.u(1, "nnr_reserved_zero_1bit")
    _quantization_parameters(reader, lps, "lps")
    if lps.lps_sparsification_flag:
        lps.sparsification_performance_map = sparsification_performance_map(reader)
    if lps.lps_pruning_flag:
        lps.pruning_performance_map = pruning_performance_map(reader)
    if lps.lps_unification_flag:
        lps.unification_performance_map = unification_performance_map(reader)
    reader.byte_alignment("nnr_layer_parameter_set_unit_payload byte_alignment()")
    return lps


def _accuracy_entries(reader, count, prefix, fields, classes_bits, with_bitmask=True):
    """The common loop of the performance maps: count-1 entries of floats plus class accuracies."""
    entries = []
    _check_count(count, MAX_LIST_ENTRIES, reader, prefix + "_count")
    for _ in range(count - 1):
        e = Syntax()
        for name in fields:
            setattr(e, name, reader.flt(32, name))
        n = reader.u(classes_bits, prefix + "_count_classes")
        setattr(e, prefix + "_count_classes", n)
        if with_bitmask:
            setattr(e, prefix + "_class_bitmask", reader.ue(7, prefix + "_class_bitmask"))
        setattr(e, prefix + "_nn_class_accuracy", [reader.flt(32, prefix + "_nn_class_accuracy") for _ in range(n)])
        entries.append(e)
    return entries


def sparsification_performance_map(reader):
    m = Syntax(spm_count_thresholds=reader.u(8, "spm_count_thresholds"))
    m.entries = _accuracy_entries(reader, m.spm_count_thresholds, "spm",
                                  ("sparsification_threshold", "non_zero_ratio", "spm_nn_accuracy"), 8)
    return m


def pruning_performance_map(reader):
    m = Syntax(ppm_count_pruning_ratios=reader.u(8, "ppm_count_pruning_ratios"))
    m.entries = _accuracy_entries(reader, m.ppm_count_pruning_ratios, "ppm",
                                  ("pruning_ratio", "ppm_nn_accuracy"), 8)
    return m


def decomposition_performance_map(reader):
    m = Syntax(dpm_count_thresholds=reader.u(8, "dpm_count_thresholds"))
    m.entries = _accuracy_entries(reader, m.dpm_count_thresholds, "dpm",
                                  ("mse_threshold", "dpm_nn_accuracy", "nn_reduction_ratio"), 16, False)
    return m


def unification_performance_map(reader):
    m = Syntax(upm_count_thresholds=reader.u(8, "upm_count_thresholds"))
    m.entries = []
    for _ in range(m.upm_count_thresholds - 1):
        e = Syntax()
        n = reader.ue(1, "count_reshaped_tensor_dimension")
        _check_count(n, MAX_TENSOR_DIMENSIONS + 1, reader, "count_reshaped_tensor_dimension")
        e.reshaped_tensor_dimensions = [reader.ue(7, "reshaped_tensor_dimensions") for _ in range(n - 1)]
        reader.byte_alignment("unification_performance_map byte_alignment()")
        n = reader.u(8, "count_super_block_dimension")
        e.super_block_dimensions = [reader.u(8, "super_block_dimensions") for _ in range(n - 1)]
        n = reader.u(8, "count_block_dimension")
        e.block_dimensions = [reader.u(8, "block_dimensions") for _ in range(n - 1)]
        e.unification_threshold = reader.flt(32, "unification_threshold")
        e.upm_nn_accuracy = reader.flt(32, "upm_nn_accuracy")
        e.upm_count_classes = reader.u(8, "upm_count_classes")
        e.upm_class_bitmask = reader.ue(7, "upm_class_bitmask")
        e.upm_nn_class_accuracy = [reader.flt(32, "upm_nn_class_accuracy") for _ in range(e.upm_count_classes)]
        m.entries.append(e)
    return m


def nnr_topology_unit_payload(reader, unit, state):
    tpl = Syntax()
    fmt = unit.topology_storage_format
    if fmt == NNR_TPL_PRUN:
        tpl.nnr_pruning_topology_container = nnr_pruning_topology_container(reader, state)
    elif fmt == NNR_TPL_REFLIST:
        tpl.topology_elements_ids_list = topology_elements_ids_list(reader, 0)
        state.reflist = tpl.topology_elements_ids_list
    else:
        # NNCodec writes topology_data as st(v) (supplement 7.4); both are kept as raw bytes.
        tpl.topology_data = _maybe_inflate(reader.bs("topology_data"), unit.topology_compression_format,
                                           unit, "topology_data")
    return tpl


def _maybe_inflate(data, compression_format, unit, element):
    if compression_format == 0:
        return data
    if compression_format != 1:
        raise NNCError("compression format %d is reserved" % compression_format, unit.offset, element)
    try:
        return _inflate(data, 1 << 26)
    except NNCError as exc:
        raise NNCError(exc.args[0], unit.offset, element)
    except Exception as exc:
        raise NNCError("invalid deflate data: %s" % exc, unit.offset, element)


def _inflate(data, limit):
    """RFC 1950 (zlib) data as 6.4.3.5 says, bounded so a small unit cannot expand without limit."""
    try:
        import zlib
        decompressobj = zlib.decompressobj
    except (ImportError, AttributeError):
        decompressobj = None
    if decompressobj is None:
        # MicroPython 1.21+: the deflate module replaces zlib.
        try:
            import deflate
            import io
        except ImportError:
            raise NNCError("deflate-compressed data needs zlib or deflate, which this interpreter lacks")
        out = deflate.DeflateIO(io.BytesIO(data), deflate.ZLIB).read(limit + 1)
        if len(out) > limit:
            raise NNCError("deflated data expands past %d bytes" % limit)
        return out
    d = decompressobj()
    out = d.decompress(data, limit)
    if d.unconsumed_tail:
        raise NNCError("deflated data expands past %d bytes" % limit)
    # decompress() returns what it has for a cut-off stream: a complete one ends with its
    # Adler-32 check (eof) and nothing follows it in the unit.
    if not getattr(d, "eof", True) or getattr(d, "unused_data", b""):
        raise NNCError("invalid deflate data: the zlib stream is truncated or followed by other bytes")
    return out


def nnr_pruning_topology_container(reader, state):
    c = Syntax()
    c.nnr_rep_type = reader.u(2, "nnr_rep_type")
    c.prune_flag = reader.u(1, "prune_flag")
    c.order_flag = reader.u(1, "order_flag")
    c.sparse_flag = reader.u(1, "sparse_flag")
    reader.u(3, "nnr_reserved_zero_3bits")
    if c.prune_flag:
        if c.nnr_rep_type == NNR_TPL_BMSK:
            c.prune_bit_mask = bit_mask(reader)
        elif c.nnr_rep_type == NNR_TPL_DICT:
            count = c.count_ids = reader.ue(7, "count_ids")
            _check_count(count, MAX_LIST_ENTRIES, reader, "count_ids")
            if not state.mps_flag("mps_topology_indexed_reference_flag"):
                reader.byte_alignment("nnr_pruning_topology_container byte_alignment()")
                c.element_id = [reader.st("element_id") for _ in range(count)]
            else:
                c.element_id_index = [reader.ue(7, "element_id_index") for _ in range(count)]
            c.count_dims = []
            c.dim = []
            for _ in range(count):
                n = reader.ue(1, "count_dims")
                _check_count(n, MAX_TENSOR_DIMENSIONS, reader, "count_dims")
                c.count_dims.append(n)
                c.dim.append([reader.ue(7, "dim") for _ in range(n)])
            reader.byte_alignment("nnr_pruning_topology_container byte_alignment()")
        else:
            raise NNCError("nnr_rep_type %d is reserved" % c.nnr_rep_type, reader.byte_offset(), "nnr_rep_type")
    if c.sparse_flag:
        c.sparse_bit_mask = bit_mask(reader)
    return c


def bit_mask(reader):
    count = reader.u(32, "count_bits")
    if count > reader.bits_left():
        raise NNCError("bit_mask claims %d bits, %d left in the unit" % (count, reader.bits_left()),
                       reader.byte_offset(), "count_bits")
    # Kept packed (MSB first, as coded) rather than one object per bit.
    start = reader.get_bit_pointer()
    values = bytearray((count + 7) >> 3)
    for j in range(count):
        if reader.u(1, "bit_mask_value"):
            values[j >> 3] |= 0x80 >> (j & 7)
    reader.byte_alignment("bit_mask byte_alignment()")
    return Syntax(count_bits=count, bit_mask_value=bytes(values), _start=start)


def nnr_aggregate_unit_payload(reader, unit, state, depth):
    agg = unit.agg
    nesting = state.limits.max_agg_nesting
    if depth >= nesting:
        raise exceeded("max_agg_nesting", "aggregate units nested %d deep" % (depth + 1), nesting, unit.offset,
                       "nnr_aggregate_unit")
    if not reader.byte_aligned():
        raise NNCError("aggregate unit header does not end on a byte boundary", reader.byte_offset(),
                       "nnr_aggregate_unit_header")
    # 6.2.3: an LPS is active only up to an aggregate unit boundary.
    state.lps = None
    pos = reader.byte_offset()
    unit.units = []
    count = agg.num_of_nnr_units_minus2 + 2
    for i in range(count):
        if pos >= reader.end:
            raise NNCError("aggregate unit holds %d of its %d NNR units" % (i, count), pos, "nnr_aggregate_unit_payload")
        if agg.entry_points_present_flag:
            if agg.nnr_unit_entry_point[i] != pos - unit.offset:
                raise NNCError("nnr_unit_entry_point[%d] is %d but the unit starts at %d"
                               % (i, agg.nnr_unit_entry_point[i], pos - unit.offset), pos, "nnr_unit_entry_point")
        child = parse_unit(reader.data, pos, reader.end, state, depth + 1)
        if agg.entry_points_present_flag and child.nnr_unit_type != agg.nnr_unit_type[i]:
            raise NNCError("nnr_unit_type[%d] is %d but the unit has type %d"
                           % (i, agg.nnr_unit_type[i], child.nnr_unit_type), pos, "nnr_unit_type")
        unit.units.append(child)
        pos += child.nnr_unit_size
    if pos != reader.end:
        raise NNCError("aggregate unit has %d bytes after its %d NNR units" % (reader.end - pos, count), pos,
                       "nnr_aggregate_unit_payload")
    state.lps = None
    reader.pos = reader.end * 8


def parse_units(data, state=None):
    """Parse every top-level NNR unit of a whole buffer without decoding payloads, in stream order.

    ``state`` (a ParserState) lets the caller see the active profile and parameter sets as the
    units go by; units inside an aggregate unit are in its ``units``.
    """
    state = state if state is not None else ParserState()
    offset = 0
    end = len(data)
    while offset < end:
        unit = parse_unit(data, offset, end, state)
        yield unit
        offset += unit.nnr_unit_size
