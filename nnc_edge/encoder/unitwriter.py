"""NNR unit writer: the syntax structures of clause 6.3 as bytes, the mirror of decoder_core.units.

Syntax elements are given by the standard's names, as a dict or any object with those attributes
(a decoder_core.units.Syntax from the parser works, so a parsed unit can be written back).
Elements that follow from others (counts, sizes, present flags, codebook deltas, entry points) are
computed; when they are given anyway they are checked. Anything that does not fit its descriptor or
contradicts the syntax raises ValueError.

Two layers:

* ``nnr_*`` functions mirror one syntax structure each and write into a BitWriter, taking the
  same context the parser takes (``general_profile_idc``, the active MPS / LPS fields);
* ``*_unit`` functions return complete NNR units (nnr_unit_size, header and payload) as bytes,
  ``partial_data_units`` splits an NDU payload over several units (6.4.3.1).

Profile-1 (second edition) elements follow ../shared/spec/deepcabac-supplement.md sections 6.2/6.3.
"""

import operator
import struct
import zlib

from decoder_core.bitreader import MAX_STRING_BYTES
from decoder_core.tables import (
    NNR_AGG, NNR_AGG_GEN, NNR_CPT_DC, NNR_DFL, NNR_LPS, NNR_MPS, NNR_NDU, NNR_PT_BLOCK, NNR_PT_FLOAT,
    NNR_PT_INT, NNR_PT_RAW, NNR_PT_RAW_FLOAT, NNR_QCB, NNR_QNT, NNR_QSU, NNR_STR, NNR_TPL, NNR_TPL_BMSK,
    NNR_TPL_DICT, NNR_TPL_PRUN, NNR_TPL_REFLIST,
)

from .bitwriter import BitWriter

# 6.3.2: a 15-bit nnr_unit_size, or 31 bits with nnr_unit_size_flag.
MAX_SHORT_UNIT_SIZE = (1 << 15) - 1
MAX_UNIT_SIZE = (1 << 31) - 1
MAX_PARTIAL_UNITS = 255  # partial_data_counter is u(8) and counts down to 1


# --- field access ---------------------------------------------------------------------------------
def _get(fields, name, default=None):
    if fields is None:
        return default
    if isinstance(fields, dict):
        value = fields.get(name)
    else:
        value = getattr(fields, name, None)
    return default if value is None else value


def _merge(fields, extra):
    """One dict from a fields object (dict or attributes) and keyword overrides."""
    out = {}
    if fields is not None:
        source = fields if isinstance(fields, dict) else getattr(fields, "__dict__", {})
        for key, value in source.items():
            out[key] = value
    out.update(extra)
    return out


def _int(value, name):
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError("%s must be an integer, not %r" % (name, value))


def _present_flag(fields, flag_name, present):
    """A flag that says whether an element is present: derived, or checked when given."""
    flag = _get(fields, flag_name)
    if flag is None:
        return 1 if present else 0
    flag = _int(flag, flag_name)
    if flag not in (0, 1):
        raise ValueError("%s must be 0 or 1, not %d" % (flag_name, flag))
    if flag != (1 if present else 0):
        raise ValueError("%s = %d contradicts the elements given" % (flag_name, flag))
    return flag


def _check_given(fields, name, value):
    given = _get(fields, name)
    if given is not None and given != value:
        raise ValueError("%s = %r, but the elements given make it %r" % (name, given, value))


def _flag(fields, name, default=0):
    value = _int(_get(fields, name, default), name)
    if value not in (0, 1):
        raise ValueError("%s must be 0 or 1, not %d" % (name, value))
    return value


# --- descriptors with the element name in the error -------------------------------------------------
def _u(w, n, value, name):
    value = _int(value, name)
    if value < 0 or value >> n:
        raise ValueError("%s = %d does not fit u(%d)" % (name, value, n))
    w.u(n, value)


def _i(w, n, value, name):
    value = _int(value, name)
    if not -(1 << (n - 1)) <= value < (1 << (n - 1)):
        raise ValueError("%s = %d does not fit i(%d)" % (name, value, n))
    w.i(n, value)


def _ue(w, k, value, name):
    value = _int(value, name)
    if value < 0:
        raise ValueError("%s = %d is negative, ue(%d) is unsigned" % (name, value, k))
    w.ue(k, value)


def _ie(w, k, value, name):
    w.ie(k, _int(value, name))


def _flt32(w, value, name):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError("%s must be a number, not %r" % (name, value))
    try:
        struct.pack("<f", value)
    except OverflowError:
        raise ValueError("%s = %r does not fit flt(32)" % (name, value))
    w.flt(32, value)


def _st(w, text, name):
    if not isinstance(text, (str, bytes, bytearray)):
        raise ValueError("%s must be a string, not %r" % (name, text))
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if b"\x00" in raw:
        raise ValueError("%s contains a zero byte, which st(v) cannot hold" % name)
    if len(raw) > MAX_STRING_BYTES:
        raise ValueError("%s is %d bytes, the decoder accepts at most %d" % (name, len(raw), MAX_STRING_BYTES))
    if isinstance(text, (bytes, bytearray)):
        try:
            raw.decode("utf-8")
        except UnicodeError:
            raise ValueError("%s is not valid UTF-8" % name)
    if not w.byte_aligned():
        raise ValueError("%s: st(v) must start byte-aligned" % name)
    w.st(raw)


def _bytes(value, name):
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError("%s must be bytes, not %s" % (name, type(value).__name__))
    return bytes(value)


def _list(value, name):
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray)):
        raise ValueError("%s must be a list, not %r" % (name, value))
    try:
        return list(value)
    except TypeError:
        raise ValueError("%s must be a list, not %r" % (name, value))


def _prod(values):
    p = 1
    for v in values:
        p *= v
    return p


# --- 6.3.2 / 6.3.3.1: the unit frame ---------------------------------------------------------------
def _size_field_bytes(body_len, nnr_unit_size_flag):
    if nnr_unit_size_flag is None:
        nnr_unit_size_flag = 0 if body_len + 2 <= MAX_SHORT_UNIT_SIZE else 1
    if nnr_unit_size_flag not in (0, 1):
        raise ValueError("nnr_unit_size_flag must be 0 or 1")
    size_bytes = 4 if nnr_unit_size_flag else 2
    limit = MAX_UNIT_SIZE if nnr_unit_size_flag else MAX_SHORT_UNIT_SIZE
    if body_len + size_bytes > limit:
        raise ValueError("NNR unit of %d bytes does not fit nnr_unit_size with nnr_unit_size_flag %d"
                         % (body_len + size_bytes, nnr_unit_size_flag))
    return size_bytes


def _common_header_bytes(partial_data_counter):
    return 1 if partial_data_counter is None else 2


def nnr_unit(nnr_unit_type, header=b"", payload=b"", partial_data_counter=None, independently_decodable_flag=1,
             nnr_unit_size_flag=None):
    """A complete NNR unit (6.3.1): nnr_unit_size(), nnr_unit_header(), nnr_unit_payload().

    ``header`` is the type-specific header (everything after partial_data_counter) and ``payload``
    the payload, both bytes. ``partial_data_counter`` None leaves the counter out.
    """
    nnr_unit_type = _int(nnr_unit_type, "nnr_unit_type")
    independently_decodable_flag = _int(independently_decodable_flag, "independently_decodable_flag")
    if not 0 <= nnr_unit_type < 64:
        raise ValueError("nnr_unit_type = %d does not fit u(6)" % nnr_unit_type)
    if independently_decodable_flag not in (0, 1):
        raise ValueError("independently_decodable_flag must be 0 or 1")
    if partial_data_counter is not None:
        partial_data_counter = _int(partial_data_counter, "partial_data_counter")
        if not 0 <= partial_data_counter <= 255:
            raise ValueError("partial_data_counter = %d does not fit u(8)" % partial_data_counter)
    # 6.4.3.1: a unit that is not independently decodable carries a counter greater than 0.
    if not independently_decodable_flag and not partial_data_counter:
        raise ValueError("independently_decodable_flag 0 needs a partial_data_counter greater than 0")
    header = _bytes(header, "header")
    payload = _bytes(payload, "payload")
    body_len = _common_header_bytes(partial_data_counter) + len(header) + len(payload)
    size_bytes = _size_field_bytes(body_len, nnr_unit_size_flag)
    size = size_bytes + body_len
    w = BitWriter()
    w.u(1, 1 if size_bytes == 4 else 0)
    w.u(8 * size_bytes - 1, size)
    w.u(6, nnr_unit_type)
    w.u(1, independently_decodable_flag)
    w.u(1, 0 if partial_data_counter is None else 1)
    if partial_data_counter is not None:
        w.u(8, partial_data_counter)
    w.bytes(header)
    w.bytes(payload)
    return w.getvalue()


def unit_size(unit):
    """nnr_unit_size of the unit at the start of ``unit`` (bytes)."""
    if len(unit) < 2:
        raise ValueError("an NNR unit has at least 2 bytes")
    if unit[0] & 0x80:
        if len(unit) < 4:
            raise ValueError("an NNR unit with nnr_unit_size_flag 1 has at least 4 bytes")
        return ((unit[0] & 0x7F) << 24) | (unit[1] << 16) | (unit[2] << 8) | unit[3]
    return ((unit[0] & 0x7F) << 8) | unit[1]


def unit_type(unit):
    """nnr_unit_type of a complete unit."""
    offset = 4 if unit[0] & 0x80 else 2
    if len(unit) <= offset:
        raise ValueError("NNR unit ends before its nnr_unit_header()")
    return unit[offset] >> 2


def _check_unit(unit, name):
    if not isinstance(unit, (bytes, bytearray, memoryview)):
        raise ValueError("%s must be the bytes of an NNR unit" % name)
    if unit_size(unit) != len(unit):
        raise ValueError("%s: nnr_unit_size %d but %d bytes given" % (name, unit_size(unit), len(unit)))
    unit_type(unit)


# --- 6.3.3.2 / 6.3.4.2: NNR_STR ----------------------------------------------------------------------
def start_unit(general_profile_idc=0, nnr_unit_size_flag=None):
    w = BitWriter()
    _u(w, 8, general_profile_idc, "general_profile_idc")
    return nnr_unit(NNR_STR, w.getvalue(), b"", nnr_unit_size_flag=nnr_unit_size_flag)


# --- 6.3.4.3: NNR_MPS ----------------------------------------------------------------------------------
def _quantization_parameters(ps, prefix):
    """mps/lps_quantization_method_flags and, with NNR_QSU or NNR_QCB, qp density and parameter."""
    density = _get(ps, prefix + "_qp_density")
    parameter = _get(ps, prefix + "_quantization_parameter")
    if (density is None) != (parameter is None):
        raise ValueError("%s_qp_density and %s_quantization_parameter go together" % (prefix, prefix))
    flags = _get(ps, prefix + "_quantization_method_flags")
    if flags is None:
        flags = NNR_QSU if density is not None else 0
    flags = _int(flags, prefix + "_quantization_method_flags")
    has_qp = bool(flags & (NNR_QSU | NNR_QCB))
    if has_qp != (density is not None):
        raise ValueError("%s_quantization_method_flags = %d %s quantization parameters"
                         % (prefix, flags, "needs" if has_qp else "has no place for"))
    return flags, density, parameter


def _write_quantization_parameters(w, prefix, density, parameter):
    if density is not None:
        _u(w, 3, density, prefix + "_qp_density")
        _i(w, 13, parameter, prefix + "_quantization_parameter")


def _performance_maps(w, sparsification, pruning, unification):
    """The maps both parameter sets carry when their flags are set (6.3.4.3, 6.3.4.4)."""
    if sparsification is not None:
        sparsification_performance_map(w, sparsification)
    if pruning is not None:
        pruning_performance_map(w, pruning)
    if unification is not None:
        unification_performance_map(w, unification)


def nnr_model_parameter_set_unit_payload(w, mps, general_profile_idc=0):
    sparsification = _get(mps, "sparsification_performance_map")
    pruning = _get(mps, "pruning_performance_map")
    unification = _get(mps, "unification_performance_map")
    decomposition = _get(mps, "decomposition_performance_map")
    flags, density, parameter = _quantization_parameters(mps, "mps")
    _u(w, 1, _flag(mps, "topology_carriage_flag"), "topology_carriage_flag")
    w.u(1, _present_flag(mps, "mps_sparsification_flag", sparsification is not None))
    w.u(1, _present_flag(mps, "mps_pruning_flag", pruning is not None))
    w.u(1, _present_flag(mps, "mps_unification_flag", unification is not None))
    w.u(1, _present_flag(mps, "mps_decomposition_performance_map_flag", decomposition is not None))
    _u(w, 3, flags, "mps_quantization_method_flags")
    w.u(1, _flag(mps, "mps_topology_indexed_reference_flag"))
    base_model_id = _get(mps, "base_model_id")
    validation = _get(mps, "validation_set_performance")
    if general_profile_idc == 1:
        # Supplement 6.2 (second edition).
        w.u(1, _present_flag(mps, "base_model_id_present_flag", base_model_id is not None))
        w.u(1, _present_flag(mps, "validation_set_performance_present_flag", validation is not None))
        metric_valid = _flag(mps, "metric_type_performance_map_valid_flag")
        w.u(1, metric_valid)
        parent = _flag(mps, "mps_parent_signalling_enabled_flag")
        w.u(1, parent)
        pre = _flag(mps, "nnr_pre_flag")
        if pre and not parent:
            raise ValueError("nnr_pre_flag needs mps_parent_signalling_enabled_flag")
        w.u(1, pre)
        w.u(2, 0)  # nnr_reserved_zero_2bits
        if base_model_id is not None:
            _st(w, base_model_id, "base_model_id")
        metric = _get(mps, "performance_metric_type")
        if validation is not None or metric_valid:
            if metric is None:
                raise ValueError("validation_set_performance / metric_type_performance_map_valid_flag need "
                                 "performance_metric_type")
            _st(w, metric, "performance_metric_type")
        elif metric is not None:
            raise ValueError("performance_metric_type is present only with validation_set_performance or "
                             "metric_type_performance_map_valid_flag")
    else:
        for name in ("base_model_id", "validation_set_performance", "performance_metric_type",
                     "metric_type_performance_map_valid_flag", "mps_parent_signalling_enabled_flag",
                     "nnr_pre_flag"):
            value = _get(mps, name)
            if value if name.endswith("flag") else value is not None:
                raise ValueError("%s needs general_profile_idc 1" % name)
        w.u(7, 0)  # nnr_reserved_zero_7bits
    _write_quantization_parameters(w, "mps", density, parameter)
    _performance_maps(w, sparsification, pruning, unification)
    if decomposition is not None:
        decomposition_performance_map(w, decomposition)
    if general_profile_idc == 1 and validation is not None:
        _flt32(w, validation, "validation_set_performance")
    w.byte_alignment()
    return w


def model_parameter_set_unit(fields=None, general_profile_idc=0, nnr_unit_size_flag=None, **kw):
    """An NNR_MPS unit; ``general_profile_idc`` is that of the stream's NNR_STR."""
    mps = _merge(fields, kw)
    payload = nnr_model_parameter_set_unit_payload(BitWriter(), mps, general_profile_idc).getvalue()
    return nnr_unit(NNR_MPS, b"", payload, nnr_unit_size_flag=nnr_unit_size_flag)


# --- 6.3.4.3: performance maps ----------------------------------------------------------------------
def _map_entries(m, count_name, name):
    """The entries of a performance map (a list, or an object with ``entries``) and its count."""
    if isinstance(m, (list, tuple)):
        entries = list(m)
        count = None
    else:
        entries = _list(_get(m, "entries"), name + " entries")
        count = _get(m, count_name)
    if count is None:
        count = len(entries) + 1
    count = _int(count, count_name)
    if max(count - 1, 0) != len(entries):
        raise ValueError("%s = %d but %d entries given" % (count_name, count, len(entries)))
    return count, entries


def _accuracy_entries(w, m, count_name, prefix, fields, classes_bits, with_bitmask=True):
    """The common loop of the sparsification, pruning and decomposition maps (mirror of units.py)."""
    count, entries = _map_entries(m, count_name, prefix)
    _u(w, 8, count, count_name)
    for e in entries:
        for name in fields:
            _flt32(w, _get(e, name), name)
        accuracies = _list(_get(e, prefix + "_nn_class_accuracy"), prefix + "_nn_class_accuracy")
        _check_given(e, prefix + "_count_classes", len(accuracies))
        _u(w, classes_bits, len(accuracies), prefix + "_count_classes")
        if with_bitmask:
            _ue(w, 7, _get(e, prefix + "_class_bitmask", 0), prefix + "_class_bitmask")
        for a in accuracies:
            _flt32(w, a, prefix + "_nn_class_accuracy")


def sparsification_performance_map(w, m):
    _accuracy_entries(w, m, "spm_count_thresholds", "spm",
                      ("sparsification_threshold", "non_zero_ratio", "spm_nn_accuracy"), 8)


def pruning_performance_map(w, m):
    _accuracy_entries(w, m, "ppm_count_pruning_ratios", "ppm", ("pruning_ratio", "ppm_nn_accuracy"), 8)


def decomposition_performance_map(w, m):
    _accuracy_entries(w, m, "dpm_count_thresholds", "dpm",
                      ("mse_threshold", "dpm_nn_accuracy", "nn_reduction_ratio"), 16, False)


def unification_performance_map(w, m):
    count, entries = _map_entries(m, "upm_count_thresholds", "upm")
    _u(w, 8, count, "upm_count_thresholds")
    for e in entries:
        reshaped = _list(_get(e, "reshaped_tensor_dimensions"), "reshaped_tensor_dimensions")
        _ue(w, 1, len(reshaped) + 1, "count_reshaped_tensor_dimension")
        for d in reshaped:
            _ue(w, 7, d, "reshaped_tensor_dimensions")
        w.byte_alignment()
        for name in ("super_block_dimensions", "block_dimensions"):
            dims = _list(_get(e, name), name)
            _u(w, 8, len(dims) + 1, "count_" + name[:-1])
            for d in dims:
                _u(w, 8, d, name)
        _flt32(w, _get(e, "unification_threshold"), "unification_threshold")
        _flt32(w, _get(e, "upm_nn_accuracy"), "upm_nn_accuracy")
        accuracies = _list(_get(e, "upm_nn_class_accuracy"), "upm_nn_class_accuracy")
        _check_given(e, "upm_count_classes", len(accuracies))
        _u(w, 8, len(accuracies), "upm_count_classes")
        _ue(w, 7, _get(e, "upm_class_bitmask", 0), "upm_class_bitmask")
        for a in accuracies:
            _flt32(w, a, "upm_nn_class_accuracy")


# --- 6.3.3.4 / 6.3.4.4: NNR_LPS ---------------------------------------------------------------------
def nnr_layer_parameter_set_unit_payload(w, lps):
    sparsification = _get(lps, "sparsification_performance_map")
    pruning = _get(lps, "pruning_performance_map")
    unification = _get(lps, "unification_performance_map")
    flags, density, parameter = _quantization_parameters(lps, "lps")
    w.u(1, 0)  # nnr_reserved_zero_1bit
    w.u(1, _present_flag(lps, "lps_sparsification_flag", sparsification is not None))
    w.u(1, _present_flag(lps, "lps_pruning_flag", pruning is not None))
    w.u(1, _present_flag(lps, "lps_unification_flag", unification is not None))
    _u(w, 3, flags, "lps_quantization_method_flags")
    w.u(1, 0)  # nnr_reserved_zero_1bit
    _write_quantization_parameters(w, "lps", density, parameter)
    _performance_maps(w, sparsification, pruning, unification)
    w.byte_alignment()
    return w


def layer_parameter_set_unit(fields=None, nnr_unit_size_flag=None, **kw):
    lps = _merge(fields, kw)
    header = BitWriter()
    header.u(1, _flag(lps, "lps_self_contained_flag", 1))
    header.u(7, 0)  # nnr_reserved_zero_7bits
    payload = nnr_layer_parameter_set_unit_payload(BitWriter(), lps).getvalue()
    return nnr_unit(NNR_LPS, header.getvalue(), payload, nnr_unit_size_flag=nnr_unit_size_flag)


# --- 6.3.3.5 / 6.3.4.5: NNR_TPL ------------------------------------------------------------------------
def _compress(data, compression_format, name):
    data = bytes(data)
    if compression_format == NNR_PT_RAW:
        return data
    if compression_format == NNR_DFL:
        return zlib.compress(data)  # RFC 1950, as 6.4.3.5 asks
    raise ValueError("%s compression format %d is reserved" % (name, compression_format))


def bit_mask(w, mask):
    """6.3.4.5 bit_mask(): ``mask`` is a sequence of 0/1, or count_bits with packed bit_mask_value bytes."""
    count = _get(mask, "count_bits") if not isinstance(mask, (list, tuple, bytes, bytearray)) else None
    if count is not None:
        count = _int(count, "count_bits")
        packed = bytes(_get(mask, "bit_mask_value", b""))
        if len(packed) != (count + 7) >> 3:
            raise ValueError("count_bits %d needs %d packed bytes, %d given" % (count, (count + 7) >> 3, len(packed)))
        bits = [(packed[j >> 3] >> (7 - (j & 7))) & 1 for j in range(count)]
    else:
        bits = _list(mask, "bit_mask_value")
    _u(w, 32, len(bits), "count_bits")
    for b in bits:
        _u(w, 1, b, "bit_mask_value")
    w.byte_alignment()


def nnr_pruning_topology_container(w, c, mps_topology_indexed_reference_flag=0):
    nnr_rep_type = _int(_get(c, "nnr_rep_type", NNR_TPL_BMSK), "nnr_rep_type")
    if nnr_rep_type not in (NNR_TPL_BMSK, NNR_TPL_DICT):
        raise ValueError("nnr_rep_type %d is reserved" % nnr_rep_type)
    prune_mask = _get(c, "prune_bit_mask")
    ids = _get(c, "element_id_index" if mps_topology_indexed_reference_flag else "element_id")
    other = _get(c, "element_id" if mps_topology_indexed_reference_flag else "element_id_index")
    if other is not None:
        raise ValueError("%s does not match mps_topology_indexed_reference_flag %d"
                         % ("element_id" if mps_topology_indexed_reference_flag else "element_id_index",
                            mps_topology_indexed_reference_flag))
    sparse_mask = _get(c, "sparse_bit_mask")
    if nnr_rep_type == NNR_TPL_BMSK:
        prune = _present_flag(c, "prune_flag", prune_mask is not None)
        if ids is not None:
            raise ValueError("element ids go with nnr_rep_type NNR_TPL_DICT")
    else:
        prune = _present_flag(c, "prune_flag", ids is not None)
        if prune_mask is not None:
            raise ValueError("prune_bit_mask goes with nnr_rep_type NNR_TPL_BMSK")
    w.u(2, nnr_rep_type)
    w.u(1, prune)
    w.u(1, _flag(c, "order_flag"))
    w.u(1, _present_flag(c, "sparse_flag", sparse_mask is not None))
    w.u(3, 0)  # nnr_reserved_zero_3bits
    if prune and nnr_rep_type == NNR_TPL_BMSK:
        bit_mask(w, prune_mask)
    elif prune:
        ids = _list(ids, "element_id")
        dims = _list(_get(c, "dim"), "dim")
        if len(dims) != len(ids):
            raise ValueError("%d element ids but %d dim lists" % (len(ids), len(dims)))
        _check_given(c, "count_ids", len(ids))
        _ue(w, 7, len(ids), "count_ids")
        if not mps_topology_indexed_reference_flag:
            w.byte_alignment()
            for e in ids:
                _st(w, e, "element_id")
        else:
            for e in ids:
                _ue(w, 7, e, "element_id_index")
        for d in dims:
            d = _list(d, "dim")
            _ue(w, 1, len(d), "count_dims")
            for v in d:
                _ue(w, 7, v, "dim")
        w.byte_alignment()
    if sparse_mask is not None:
        bit_mask(w, sparse_mask)
    return w


def nnr_topology_unit_payload(w, tpl, mps_topology_indexed_reference_flag=0):
    fmt = _int(_get(tpl, "topology_storage_format", 0), "topology_storage_format")
    container = _get(tpl, "nnr_pruning_topology_container")
    reflist = _get(tpl, "topology_elements_ids_list")
    data = _get(tpl, "topology_data")
    given = [n for n, v in (("nnr_pruning_topology_container", container), ("topology_elements_ids_list", reflist),
                            ("topology_data", data)) if v is not None]
    wanted = {NNR_TPL_PRUN: "nnr_pruning_topology_container",
              NNR_TPL_REFLIST: "topology_elements_ids_list"}.get(fmt, "topology_data")
    if given not in ([], [wanted]) or (wanted != "topology_data" and not given):
        raise ValueError("topology_storage_format %d carries %s, not %s" % (fmt, wanted, ", ".join(given) or "nothing"))
    if fmt == NNR_TPL_PRUN:
        nnr_pruning_topology_container(w, container, mps_topology_indexed_reference_flag)
    elif fmt == NNR_TPL_REFLIST:
        topology_elements_ids_list(w, reflist, 0)
    else:
        compression = _int(_get(tpl, "topology_compression_format", 0), "topology_compression_format")
        w.bytes(_compress(data if data is not None else b"", compression, "topology_data"))
    return w


def topology_unit(fields=None, mps=None, nnr_unit_size_flag=None, **kw):
    """An NNR_TPL unit. ``topology_data`` is given uncompressed; NNR_DFL deflates it here."""
    tpl = _merge(fields, kw)
    header = BitWriter()
    _u(header, 8, _get(tpl, "topology_storage_format", 0), "topology_storage_format")
    compression = _get(tpl, "topology_compression_format", 0)
    _u(header, 8, compression, "topology_compression_format")
    if compression and _get(tpl, "topology_storage_format", 0) in (NNR_TPL_PRUN, NNR_TPL_REFLIST):
        raise ValueError("topology_compression_format applies to topology_data only")
    indexed = _flag(mps, "mps_topology_indexed_reference_flag")
    payload = nnr_topology_unit_payload(BitWriter(), tpl, indexed).getvalue()
    return nnr_unit(NNR_TPL, header.getvalue(), payload, nnr_unit_size_flag=nnr_unit_size_flag)


# --- 6.3.3.6 / 6.3.4.6: NNR_QNT --------------------------------------------------------------------------
def quantization_unit(fields=None, nnr_unit_size_flag=None, **kw):
    """An NNR_QNT unit. ``quantization_data`` is given uncompressed; NNR_DFL deflates it here."""
    qnt = _merge(fields, kw)
    header = BitWriter()
    _u(header, 8, _get(qnt, "quantization_storage_format", 0), "quantization_storage_format")
    compression = _int(_get(qnt, "quantization_compression_format", 0), "quantization_compression_format")
    _u(header, 8, compression, "quantization_compression_format")
    payload = _compress(_get(qnt, "quantization_data", b""), compression, "quantization_data")
    return nnr_unit(NNR_QNT, header.getvalue(), payload, nnr_unit_size_flag=nnr_unit_size_flag)


# --- 6.3.3.7: NNR_NDU header -------------------------------------------------------------------------------
def integer_codebook(w, codebook, cb_zero_offset=None, codebook_egk=0):
    """integer_codebook(cbZeroOffset, integerCodebook): values strictly increasing."""
    book = [_int(v, "integerCodebook") for v in _list(codebook, "integerCodebook")]
    size = len(book)
    if size == 0:
        raise ValueError("integer_codebook() needs at least one entry")
    if cb_zero_offset is None:
        cb_zero_offset = size >> 1
    cb_zero_offset = _int(cb_zero_offset, "cbZeroOffset")
    if not 0 <= cb_zero_offset < size:
        raise ValueError("cbZeroOffset %d outside a codebook of %d entries" % (cb_zero_offset, size))
    for a, b in zip(book, book[1:]):
        if b <= a:
            raise ValueError("codebook values must increase strictly: %d then %d" % (a, b))
    _u(w, 4, codebook_egk, "codebook_egk")
    _ue(w, 2, size, "codebook_size")
    _ie(w, 2, cb_zero_offset - (size >> 1), "codebook_centre_offset")
    _ie(w, 7, book[cb_zero_offset], "codebook_zero_value")
    for j in range(cb_zero_offset - 1, -1, -1):
        _ue(w, codebook_egk, book[j + 1] - book[j] - 1, "codebook_delta_left")
    for j in range(cb_zero_offset + 1, size):
        _ue(w, codebook_egk, book[j] - book[j - 1] - 1, "codebook_delta_right")


def tensor_dimension_list(w, dims):
    dims = _list(dims, "tensor_dimensions")
    if not dims:
        raise ValueError("tensor_dimension_list() needs at least one dimension")
    _ue(w, 1, len(dims), "count_tensor_dimensions")
    for d in dims:
        if _int(d, "tensor_dimensions") <= 0:
            raise ValueError("tensor_dimensions must be positive, not %d" % d)
        _ue(w, 7, d, "tensor_dimensions")


def topology_elements_ids_list(w, ids, topology_indexed_flag):
    ids = _list(ids, "topology_elements_ids_list")
    if len(ids) < 2:
        raise ValueError("topology_elements_ids_list() lists at least 2 elements, not %d" % len(ids))
    _ue(w, 7, len(ids) - 2, "count_topology_elements_minus2")
    if not topology_indexed_flag:
        w.byte_alignment()
        for e in ids:
            _st(w, e, "topology_elem_id_list")
    else:
        for e in ids:
            _ue(w, 7, e, "topology_elem_id_index_list")
        w.byte_alignment()


def topology_tensor_dimension_mapping(w, m, count_topology_elements):
    _u(w, 8, _get(m, "concatentation_axis_index", 0), "concatentation_axis_index")
    split = _list(_get(m, "split_index"), "split_index")
    if len(split) != count_topology_elements - 1:
        raise ValueError("split_index has %d entries, %d expected" % (len(split), count_topology_elements - 1))
    for s in split:
        _ue(w, 7, s, "split_index")
    shift_index = _list(_get(m, "shift_index", [[]] * count_topology_elements), "shift_index")
    shift_value = _list(_get(m, "shift_value", [[]] * count_topology_elements), "shift_value")
    if len(shift_index) != count_topology_elements or len(shift_value) != count_topology_elements:
        raise ValueError("shift_index / shift_value need one list per topology element (%d)" % count_topology_elements)
    number = _list(_get(m, "number_of_shifts"), "number_of_shifts")
    for k in range(count_topology_elements):
        idx = _list(shift_index[k], "shift_index")
        val = _list(shift_value[k], "shift_value")
        if len(idx) != len(val) or (number and number[k] != len(idx)):
            raise ValueError("shift_index[%d] and shift_value[%d] differ in length" % (k, k))
        _ue(w, 1, len(idx), "number_of_shifts")
        for a, b in zip(idx, val):
            _ue(w, 7, a, "shift_index")
            _ue(w, 1, b, "shift_value")


def _profile1_node_ids(w, ndu, mps_parent_signalling_enabled_flag):
    # Supplement 6.3: node and parent identification (second edition).
    node = _flag(ndu, "node_id_present_flag", 1 if _get(ndu, "device_id") is not None else 0)
    w.u(1, node)
    if node:
        _ue(w, 1, _get(ndu, "device_id", 0), "device_id")
        _ue(w, 5, _get(ndu, "parameter_id", 0), "parameter_id")
        _ue(w, 4, _get(ndu, "put_node_depth", 0), "put_node_depth")
    parent_type = _get(ndu, "parent_node_id_type")
    parent = _flag(ndu, "parent_node_id_present_flag", 1 if parent_type is not None else 0)
    if not mps_parent_signalling_enabled_flag:
        if parent or _get(ndu, "temporal_context_modeling_flag"):
            raise ValueError("parent node information needs mps_parent_signalling_enabled_flag")
        return
    w.u(1, parent)
    if not parent:
        if _get(ndu, "temporal_context_modeling_flag"):
            raise ValueError("temporal_context_modeling_flag needs parent_node_id_present_flag")
        return
    parent_type = _int(_get(ndu, "parent_node_id_type", 0), "parent_node_id_type")
    _u(w, 2, parent_type, "parent_node_id_type")
    w.u(1, _flag(ndu, "temporal_context_modeling_flag"))
    if parent_type == 0:
        _ue(w, 1, _get(ndu, "parent_device_id", 0), "parent_device_id")
        if not node:
            _ue(w, 5, _get(ndu, "parameter_id", 0), "parameter_id")
            _ue(w, 4, _get(ndu, "put_node_depth", 0), "put_node_depth")
    elif parent_type in (1, 2):
        bits = 256 if parent_type == 1 else 512
        name = "parent_node_payload_sha%d" % bits
        digest = _get(ndu, name)
        if digest is None:
            raise ValueError("parent_node_id_type %d needs %s" % (parent_type, name))
        if isinstance(digest, (bytes, bytearray)):
            if len(digest) != bits // 8:
                raise ValueError("%s must be %d bytes" % (name, bits // 8))
            digest = int.from_bytes(bytes(digest), "big")
        _u(w, bits, digest, name)
    else:
        raise ValueError("parent_node_id_type 3 is reserved")


def _decomposition(ndu, dims):
    """6.4.3.7: (TensorDimensionsG, TensorDimensionsH) of a decomposed tensor, else None."""
    if not _get(ndu, "compressed_parameter_types", 0) & NNR_CPT_DC:
        return None
    rank = _int(_get(ndu, "decomposition_rank", 0), "decomposition_rank")
    rows = _int(_get(ndu, "g_number_of_rows", 0), "g_number_of_rows")
    total = _prod(dims)
    if rank <= 0 or rows <= 0 or total % rows:
        raise ValueError("g_number_of_rows %d must divide the %d elements (decomposition_rank %d > 0)"
                         % (rows, total, rank))
    return [rows, rank], [rank, total // rows]


def _tensor_dimensions(ndu, dims):
    """TensorDimensions of a non-block NDU: G or H (``decomposed_part``, default "G") when decomposed."""
    gh = _decomposition(ndu, dims)
    if gh is None or _get(ndu, "nnr_compressed_data_unit_payload_type") == NNR_PT_BLOCK:
        return list(dims)
    part = _get(ndu, "decomposed_part", "G")
    if part not in ("G", "H"):
        raise ValueError("decomposed_part must be 'G' or 'H', not %r" % (part,))
    return gh[0] if part == "G" else gh[1]


def _num_block_rows_minus1(ndu, dims, scan_order):
    """6.4.3.7 NumBlockRowsMinus1 (mirror of units._entry_point_lists)."""
    shift = 2 + scan_order
    bs = 4 << scan_order
    gh = _decomposition(ndu, dims)
    if gh is not None and _get(ndu, "nnr_compressed_data_unit_payload_type") == NNR_PT_BLOCK:
        return ((gh[0][0] + bs - 1) >> shift) + ((gh[1][0] + bs - 1) >> shift) - 2
    return ((_tensor_dimensions(ndu, dims)[0] + bs - 1) >> shift) - 1


def _entry_point_lists(w, ndu, rows, dq_flag):
    cabac = _list(_get(ndu, "cabac_offset_list"), "cabac_offset_list")
    dq_states = _list(_get(ndu, "dq_state_list"), "dq_state_list")
    offsets = _list(_get(ndu, "BitOffsetList"), "BitOffsetList")
    if len(cabac) != rows or len(offsets) != rows or len(dq_states) != (rows if dq_flag else 0):
        raise ValueError("NumBlockRowsMinus1 is %d: cabac_offset_list, BitOffsetList%s need that many entries "
                         "(given %d, %d%s)" % (rows, " and dq_state_list" if dq_flag else "", len(cabac), len(offsets),
                                               ", %d" % len(dq_states) if dq_flag else ""))
    for j in range(rows):
        _u(w, 8, cabac[j], "cabac_offset_list")
        if dq_flag:
            _u(w, 3, dq_states[j], "dq_state_list")
        if j == 0:
            _ue(w, 11, offsets[0], "bit_offset_delta1")
        else:
            # Supplement 1.11: BitOffsetList holds per-row lengths; delta2 is their difference.
            _ie(w, 7, _int(offsets[j], "BitOffsetList") - _int(offsets[j - 1], "BitOffsetList"), "bit_offset_delta2")


def bit_offset_list(row_start_pointers):
    """BitOffsetList from the bit pointers at the start of block rows 0..NumBlockRowsMinus1.

    Supplement 1.11: entry j is the distance from the start of block row j to that of row j + 1.
    """
    p = [_int(x, "bit pointer") for x in row_start_pointers]
    out = [b - a for a, b in zip(p, p[1:])]
    if any(d < 0 for d in out):
        raise ValueError("block-row start pointers must not decrease: %r" % p)
    return out


def nnr_compressed_data_unit_header(w, ndu, general_profile_idc=0, mps=None):
    pt = _int(_get(ndu, "nnr_compressed_data_unit_payload_type", NNR_PT_FLOAT), "nnr_compressed_data_unit_payload_type")
    if pt > NNR_PT_BLOCK or pt < 0:
        raise ValueError("nnr_compressed_data_unit_payload_type %d is reserved" % pt)
    indexed = _flag(mps, "mps_topology_indexed_reference_flag")
    ids = _get(ndu, "topology_elements_ids_list")
    multi = _present_flag(ndu, "nnr_multiple_topology_elements_present_flag", ids is not None)
    if pt == NNR_PT_BLOCK and not multi:
        raise ValueError("NNR_PT_BLOCK lists its tensors in topology_elements_ids_list (6.4.3.7)")
    fmt = _get(ndu, "nnr_decompressed_data_format")
    dims = _get(ndu, "tensor_dimensions")
    cpt = _int(_get(ndu, "compressed_parameter_types", 0), "compressed_parameter_types")
    unary = _get(ndu, "cabac_unary_length_minus1")
    mapping = _get(ndu, "topology_tensor_dimension_mapping")
    # tensor_dimensions with tensor_dimensions_flag 0 (or without input parameters) are known out of
    # band: not written, but they still decide whether scan_order is present (as the parser's topology does).
    tdf = _flag(ndu, "tensor_dimensions_flag",
                1 if dims is not None and _get(ndu, "input_parameters_present_flag") != 0 else 0)
    if tdf and dims is None:
        raise ValueError("tensor_dimensions_flag 1 needs tensor_dimensions")
    input_present = _flag(ndu, "input_parameters_present_flag",
                          1 if (tdf or unary is not None or cpt or mapping is not None) else 0)
    w.u(5, pt)
    w.u(1, multi)
    w.u(1, _present_flag(ndu, "nnr_decompressed_data_format_present_flag", fmt is not None))
    w.u(1, input_present)
    if multi:
        if _get(ndu, "topology_elem_id") is not None or _get(ndu, "topology_elem_id_index") is not None:
            raise ValueError("give topology_elements_ids_list or topology_elem_id(_index), not both")
        topology_elements_ids_list(w, ids, indexed)
        _check_given(ndu, "count_topology_elements_minus2", len(ids) - 2)
    elif not indexed:
        if _get(ndu, "topology_elem_id") is None:
            raise ValueError("the NDU needs topology_elem_id (mps_topology_indexed_reference_flag is 0)")
        _st(w, _get(ndu, "topology_elem_id"), "topology_elem_id")
    else:
        if _get(ndu, "topology_elem_id_index") is None:
            raise ValueError("the NDU needs topology_elem_id_index (mps_topology_indexed_reference_flag is 1)")
        _ue(w, 7, _get(ndu, "topology_elem_id_index"), "topology_elem_id_index")
    if general_profile_idc == 1:
        _profile1_node_ids(w, ndu, _flag(mps, "mps_parent_signalling_enabled_flag"))
    else:
        for name in ("node_id_present_flag", "parent_node_id_present_flag", "temporal_context_modeling_flag",
                     "first_tensor_dimension_shift", "device_id", "parameter_id", "put_node_depth",
                     "parent_node_id_type", "parent_device_id"):
            value = _get(ndu, name)
            if value if name.endswith(("flag", "shift")) else value is not None:
                raise ValueError("%s needs general_profile_idc 1" % name)
    codebook = _get(ndu, "Codebook")
    codebook_dc = _get(ndu, "CodebookDC")
    codebook_present = _present_flag(ndu, "codebook_present_flag", codebook is not None)
    if pt in (NNR_PT_FLOAT, NNR_PT_BLOCK):
        w.u(1, codebook_present)
        if codebook_present:
            integer_codebook(w, codebook, _get(ndu, "CbZeroOffset"), _get(ndu, "codebook_egk", 0))
    elif codebook_present:
        raise ValueError("codebooks go with NNR_PT_FLOAT and NNR_PT_BLOCK only")
    dq_flag = _flag(ndu, "dq_flag")
    if pt in (NNR_PT_INT, NNR_PT_FLOAT, NNR_PT_BLOCK):
        w.u(1, dq_flag)
    elif dq_flag:
        raise ValueError("dq_flag does not apply to NNR_PT_RAW_FLOAT")
    if fmt is not None:
        _u(w, 7, fmt, "nnr_decompressed_data_format")
    if input_present:
        w.u(1, tdf)
        w.u(1, _present_flag(ndu, "cabac_unary_length_flag", unary is not None))
        _u(w, 4, cpt, "compressed_parameter_types")
        if cpt & NNR_CPT_DC:
            rank = _get(ndu, "decomposition_rank")
            rows = _get(ndu, "g_number_of_rows")
            if rank is None or rows is None:
                raise ValueError("NNR_CPT_DC needs decomposition_rank and g_number_of_rows")
            if dims is not None:
                _decomposition(ndu, dims)
            _ue(w, 3, rank, "decomposition_rank")
            _ue(w, 3, rows, "g_number_of_rows")
        if tdf:
            tensor_dimension_list(w, dims)
        if pt != NNR_PT_BLOCK and multi:
            if mapping is None:
                raise ValueError("several topology elements need topology_tensor_dimension_mapping")
            topology_tensor_dimension_mapping(w, mapping, len(ids))
        elif mapping is not None:
            raise ValueError("topology_tensor_dimension_mapping goes with several topology elements (not NNR_PT_BLOCK)")
        if unary is not None:
            _u(w, 8, unary, "cabac_unary_length_minus1")
    else:
        for name, value in (("tensor_dimensions_flag", tdf), ("compressed_parameter_types", cpt),
                            ("cabac_unary_length_minus1", unary is not None),
                            ("topology_tensor_dimension_mapping", mapping is not None)):
            if value:
                raise ValueError("%s needs input_parameters_present_flag" % name)
    if pt == NNR_PT_BLOCK and (cpt & NNR_CPT_DC) and codebook_present:
        if codebook_dc is None:
            raise ValueError("NNR_PT_BLOCK with NNR_CPT_DC and a codebook needs CodebookDC")
        integer_codebook(w, codebook_dc, _get(ndu, "CbZeroOffsetDC"), _get(ndu, "codebook_egkDC", 0))
    elif codebook_dc is not None:
        raise ValueError("CodebookDC goes with NNR_PT_BLOCK, NNR_CPT_DC and codebook_present_flag")
    scan_order = _int(_get(ndu, "scan_order", 0), "scan_order")
    if dims is not None and len(_list(dims, "tensor_dimensions")) > 1:
        if general_profile_idc == 1:
            _ue(w, 1, _get(ndu, "first_tensor_dimension_shift", 0), "first_tensor_dimension_shift")
        if not 0 <= scan_order <= 4:
            raise ValueError("scan_order %d is reserved" % scan_order)
        w.u(4, scan_order)
        if scan_order > 0:
            _entry_point_lists(w, ndu, _num_block_rows_minus1(ndu, dims, scan_order), dq_flag)
    elif scan_order or _get(ndu, "cabac_offset_list") or _get(ndu, "BitOffsetList"):
        raise ValueError("scan_order and entry points need more than one tensor dimension")
    w.byte_alignment()
    return w


def compressed_data_unit_header(fields=None, general_profile_idc=0, mps=None, **kw):
    """The bytes of nnr_compressed_data_unit_header()."""
    return nnr_compressed_data_unit_header(BitWriter(), _merge(fields, kw), general_profile_idc, mps).getvalue()


def compressed_data_unit(fields=None, payload=b"", general_profile_idc=0, mps=None, partial_data_counter=None,
                         independently_decodable_flag=1, nnr_unit_size_flag=None, **kw):
    """An NNR_NDU unit: the header from the fields, then ``payload`` (the coded tensor data).

    ``mps`` is the active NNR_MPS (its mps_topology_indexed_reference_flag and
    mps_parent_signalling_enabled_flag shape the header).
    """
    ndu = _merge(fields, kw)
    header = compressed_data_unit_header(ndu, general_profile_idc, mps)
    _check_raw_float(ndu, payload)
    return nnr_unit(NNR_NDU, header, payload, partial_data_counter, independently_decodable_flag, nnr_unit_size_flag)


def _check_raw_float(ndu, payload):
    dims = _get(ndu, "tensor_dimensions")
    if _get(ndu, "nnr_compressed_data_unit_payload_type") == NNR_PT_RAW_FLOAT and dims:
        need = 4 * _prod(_tensor_dimensions(ndu, dims))
        if len(payload) != need:
            raise ValueError("NNR_PT_RAW_FLOAT payload of %d bytes, %d expected" % (len(payload), need))


def raw_float_payload(values):
    """NNR_PT_RAW_FLOAT payload (6.3.4.7): flt(32) little-endian values in row-major order."""
    values = list(values)
    try:
        return struct.pack("<%df" % len(values), *values)
    except (struct.error, OverflowError, TypeError) as exc:
        raise ValueError("raw_float32_parameter: %s" % exc)


def partial_data_units(fields=None, payload=b"", max_payload_bytes=None, general_profile_idc=0, mps=None,
                       independently_decodable_flag=0, nnr_unit_size_flag=None, **kw):
    """One NDU split over units with partial_data_counter N, N-1, ..., 1 (6.4.3.1).

    Every unit repeats the NDU header; the payload is cut into chunks of at most
    ``max_payload_bytes``. Returns the list of unit bytes.
    """
    ndu = _merge(fields, kw)
    header = compressed_data_unit_header(ndu, general_profile_idc, mps)
    _check_raw_float(ndu, payload)
    return split_units(NNR_NDU, header, payload, max_payload_bytes, independently_decodable_flag, nnr_unit_size_flag)


def split_units(nnr_unit_type, header, payload, max_payload_bytes, independently_decodable_flag=0,
                nnr_unit_size_flag=None):
    """Units of any type carrying ``header`` and consecutive chunks of ``payload``, counter N..1."""
    max_payload_bytes = _int(max_payload_bytes, "max_payload_bytes")
    if max_payload_bytes <= 0:
        raise ValueError("max_payload_bytes must be positive")
    payload = bytes(payload)
    count = max(1, (len(payload) + max_payload_bytes - 1) // max_payload_bytes)
    if count > MAX_PARTIAL_UNITS:
        raise ValueError("%d bytes in chunks of %d need %d partial units; partial_data_counter allows %d"
                         % (len(payload), max_payload_bytes, count, MAX_PARTIAL_UNITS))
    units = []
    for k in range(count):
        chunk = payload[k * max_payload_bytes:(k + 1) * max_payload_bytes]
        units.append(nnr_unit(nnr_unit_type, header, chunk, count - k, independently_decodable_flag,
                              nnr_unit_size_flag))
    return units


# --- 6.3.3.8 / 6.3.4.8: NNR_AGG -----------------------------------------------------------------------------
def nnr_aggregate_unit_header(w, agg, units, entry_points, unification):
    count = len(units)
    _u(w, 8, _get(agg, "nnr_aggregate_unit_type", NNR_AGG_GEN), "nnr_aggregate_unit_type")
    w.u(1, 1 if entry_points is not None else 0)
    w.u(7, 0)  # nnr_reserved_zero_7bits
    _u(w, 16, count - 2, "num_of_nnr_units_minus2")
    if entry_points is not None:
        for i in range(count):
            w.u(6, unit_type(units[i]))
            _u(w, 34, entry_points[i], "nnr_unit_entry_point")
    bitdepth = _list(_get(agg, "quant_bitdepth", [0] * count), "quant_bitdepth")
    scan = _list(_get(agg, "ctu_scan_order"), "ctu_scan_order")
    if len(bitdepth) != count:
        raise ValueError("quant_bitdepth has %d entries for %d NNR units" % (len(bitdepth), count))
    if unification:
        scan = scan or [0] * count
        if len(scan) != count:
            raise ValueError("ctu_scan_order has %d entries for %d NNR units" % (len(scan), count))
    elif scan:
        raise ValueError("ctu_scan_order needs mps_unification_flag or lps_unification_flag")
    for i in range(count):
        _u(w, 5, bitdepth[i], "quant_bitdepth")
        if unification:
            _u(w, 1, scan[i], "ctu_scan_order")
            w.u(2, 0)  # nnr_reserved_zero_2bits
        else:
            w.u(3, 0)  # nnr_reserved_zero_3bits
    return w


def aggregate_unit(units, fields=None, mps=None, lps=None, partial_data_counter=None, independently_decodable_flag=1,
                   nnr_unit_size_flag=None, **kw):
    """An NNR_AGG unit holding the complete NNR units ``units`` (a list of bytes).

    ``entry_points_present_flag`` (default 1) adds nnr_unit_type[i] and nnr_unit_entry_point[i],
    computed from the unit sizes. ``mps`` / ``lps`` are the active parameter sets: their
    unification flags decide whether ctu_scan_order is present.
    """
    agg = _merge(fields, kw)
    units = [bytes(u) for u in units]
    for i, u in enumerate(units):
        _check_unit(u, "units[%d]" % i)
    count = len(units)
    if not 2 <= count <= 0xFFFF + 2:
        raise ValueError("an aggregate unit holds 2..65537 NNR units, not %d" % count)
    with_entry_points = _flag(agg, "entry_points_present_flag", 1)
    unification = (_get(mps, "mps_unification_flag") or _get(mps, "unification_performance_map") is not None
                   or _get(lps, "lps_unification_flag") or _get(lps, "unification_performance_map") is not None)
    header_len = 4 + (5 * count if with_entry_points else 0) + count
    payload = b"".join(units)
    body_len = _common_header_bytes(partial_data_counter) + header_len + len(payload)
    size_bytes = _size_field_bytes(body_len, nnr_unit_size_flag)
    entry_points = None
    if with_entry_points:
        # 6.4.3.8: byte offsets from the start of the aggregate unit.
        entry_points = []
        pos = size_bytes + _common_header_bytes(partial_data_counter) + header_len
        for u in units:
            entry_points.append(pos)
            pos += len(u)
        given = _get(agg, "nnr_unit_entry_point")
        if given and list(given) != entry_points:
            raise ValueError("nnr_unit_entry_point %r, but the units start at %r" % (list(given), entry_points))
        given = _get(agg, "nnr_unit_type")
        types = [unit_type(u) for u in units]
        if given and list(given) != types:
            raise ValueError("nnr_unit_type %r, but the units have types %r" % (list(given), types))
    _check_given(agg, "num_of_nnr_units_minus2", count - 2)
    header = nnr_aggregate_unit_header(BitWriter(), agg, units, entry_points, unification).getvalue()
    assert len(header) == header_len
    return nnr_unit(NNR_AGG, header, payload, partial_data_counter, independently_decodable_flag,
                    1 if size_bytes == 4 else 0)
