"""Decoding of NNR compressed data unit payloads (clause 7.3) into tensors.

A tensor is returned as (name, dims, values, levels): values an array('f') or array('i') in
row-major order, levels the integer QuantParam array (None for NNR_PT_RAW_FLOAT).
"""

from .compat import from_raw
from . import backend
from .deepcabac import ArithmeticDecoder, TensorCoding, check_codable, decode_tensor_values
from .errors import NNCError
from .limits import DEFAULT_MAX_BINS_PER_TENSOR
from .reconstruction import level_values, reconstruct, step_size  # noqa: F401 (reconstruct: re-exported)
from .tables import (
    NNR_CPT_BI, NNR_CPT_BN, NNR_CPT_DC, NNR_CPT_LS, NNR_PT_BLOCK, NNR_PT_FLOAT, NNR_PT_INT,
    NNR_PT_RAW_FLOAT,
)

class PayloadContext:
    """What payload decoding needs from the decoder state."""

    def __init__(self, profile, qp_density, quantization_parameter):
        self.profile = profile
        self.qp_density = qp_density
        self.quantization_parameter = quantization_parameter
        self.bases = None      # name -> previous integer tensor, for TCA (6.6)
        self.history = None    # name -> bytearray, for HDSP (6.7)
        self.chain = None      # slice decoding (incremental.py): the chain state read and written per slice
        self.slice_buffers = None  # slice decoding: where slices are decoded into (SliceBuffers)
        # CPython hooks (nnc_edge): ``output.levels(name, count)`` gives the int32 buffer a tensor is
        # decoded into (float32 values then overwrite it in place) and ``output.values(buffer,
        # typecode)`` what is returned for it; ``runner`` decodes block rows concurrently.
        self.output = None
        self.runner = None
        self.max_bins = DEFAULT_MAX_BINS_PER_TENSOR  # Limits.max_bins_per_tensor


def _block_roles(cpt):
    """7.3.5: the tensors of an NNR_PT_BLOCK in decoding order of their names."""
    roles = ["G", "H"] if cpt & NNR_CPT_DC else ["W"]
    if cpt & NNR_CPT_LS:
        roles.append("LS")
    if cpt & NNR_CPT_BN:
        roles += ["beta", "gamma", "mean", "var"]
    if cpt & NNR_CPT_BI:
        roles.append("BI")
    return roles


def decoded_elements(ndu):
    """How many tensor elements decoding this NDU's payload produces (0 when its dimensions are unknown)."""
    dims = ndu.get("TensorDimensions")
    if dims is None:
        return 0
    if ndu.nnr_compressed_data_unit_payload_type != NNR_PT_BLOCK:
        return _prod(dims)
    cpt = ndu.compressed_parameter_types
    count = 0
    for role in _block_roles(cpt):
        if role == "W":
            count += _prod(dims)
        elif role in ("G", "H"):
            count += _prod(ndu.get("TensorDimensions" + role))
        else:
            count += dims[0]
    return count


def decode_ndu_payload(ndu, names, data, start, end, ctx):
    """7.3: decode the payload in data[start:end] of an NDU whose header is ``ndu``."""
    pt = ndu.nnr_compressed_data_unit_payload_type
    dims = ndu.get("TensorDimensions")
    if dims is None:
        raise NNCError("tensor dimensions are neither in the NDU header nor given out of band", start,
                       "tensor_dimensions")
    if pt == NNR_PT_RAW_FLOAT:
        count = _prod(dims)
        if end - start != 4 * count:
            raise NNCError("NNR_PT_RAW_FLOAT payload has %d bytes, %d expected" % (end - start, 4 * count), start,
                           "raw_float32_parameter")
        values = from_raw("f", bytes(data[start:end]))
        return _split(ndu, names, dims, values, None, start)
    unary = ndu.get("cabac_unary_length_minus1")
    if unary is None:
        raise NNCError("cabac_unary_length_minus1 is not in the NDU header", start, "cabac_unary_length_minus1")
    engine = ArithmeticDecoder(data, start, end)
    if pt == NNR_PT_BLOCK:
        out = _decode_block(ndu, names, engine, ctx, dims, unary)
    else:
        name = names[0] if len(names) == 1 else "|".join(names)
        codebook = ndu.Codebook if ndu.codebook_present_flag else None
        zero = ndu.get("CbZeroOffset", 0)
        if ndu.get("decomposed_part") == "H" and ndu.codebook_present_flag:
            codebook, zero = ndu.get("CodebookDC", codebook), ndu.get("CbZeroOffsetDC", zero)
        values, levels = _decode_one(engine, ctx, ndu, name, dims, unary, pt, codebook, zero,
                                     _entry_points(ndu, 0), start, ctx.output if len(names) == 1 else None)
        out = _split(ndu, names, dims, values, levels, start)
    engine.terminate_cabac()
    return out


def _entry_points(ndu, first):
    if ndu.scan_order == 0 or ndu.NumBlockRowsMinus1 == 0:
        return None
    return ndu.cabac_offset_list, ndu.dq_state_list, ndu.BitOffsetList, first


def _decode_one(engine, ctx, ndu, name, dims, unary, pt, codebook, zero_offset, entry_points, where, output=None):
    """7.3.6 for one tensor: quant_param(), shift_parameter_ids(), quant_tensor(), reconstruction.

    With ``output`` (PayloadContext.output) the tensor is decoded into the buffer it provides and no
    levels are returned for float tensors (their buffer now holds the values).
    """
    qp_value = None
    if pt != NNR_PT_INT:
        if ctx.qp_density is None:
            raise NNCError("no qp density: neither the MPS nor an active LPS signals quantization parameters",
                           where, "QpDensity")
        qp_value = engine.iae(6 + ctx.qp_density)
    base = None
    if ndu.get("temporal_context_modeling_flag") and ctx.profile == 1:
        base = ctx.bases.get(name) if ctx.bases is not None else None
        if base is None:
            raise NNCError("temporal context adaptation for '%s' needs its previously decoded tensor" % name,
                           where, "temporal_context_modeling_flag")
        if len(base) != _prod(dims):
            raise NNCError("temporal context base for '%s' has %d elements, the tensor %d"
                           % (name, len(base), _prod(dims)), where, "temporal_context_modeling_flag")
    history = ctx.history.get(name) if ctx.history is not None else None
    if history is not None and len(history) != _prod(dims):
        history = None
    coding = TensorCoding(
        dims, ndu.dq_flag, unary, ndu.scan_order, ctx.profile,
        len(codebook) if codebook is not None else 0, zero_offset, entry_points, base, history,
        ndu.get("parent_node_id_present_flag", 0))
    coding.runner = ctx.runner
    coding.max_bins = ctx.max_bins
    check_codable(engine, coding)
    out = output.levels(name, _prod(dims)) if output is not None else None
    if out is None and ctx.bases is None and pt != NNR_PT_INT and codebook is None and backend.name() == "python":
        # Without output buffers (MicroPython) nothing needs the levels after reconstruction: decoding
        # the values directly halves the tensor's memory (one float32 block, not an int32 one as well).
        qp = qp_value + ctx.quantization_parameter
        return decode_tensor_values(engine, coding, level_values(step_size(qp, ctx.qp_density))), None
    levels = backend.decode_tensor_levels(engine, coding, out)
    if ctx.bases is not None:
        # In-place reconstruction overwrites the buffer: keep a copy as the TCA base.
        keep = out is None or pt == NNR_PT_INT
        # The previous base is read for the last time: free it before the copy (a tensor less at the peak).
        coding.tca_base = base = None
        ctx.bases.pop(name, None)
        ctx.bases[name] = levels if keep else from_raw("i", memoryview(levels).cast("B"))
        if history is None:
            history = bytearray(_prod(dims))
            ctx.history[name] = history
        backend.update_history(levels, history)
    if pt == NNR_PT_INT:
        return (levels if out is None else output.values(levels, "i")), levels
    qp = qp_value + ctx.quantization_parameter
    if out is not None:
        backend.reconstruct(levels, qp, ctx.qp_density, codebook, zero_offset, where, True)
        return output.values(levels, "f"), None
    return backend.reconstruct(levels, qp, ctx.qp_density, codebook, zero_offset, where), levels


def _decode_block(ndu, names, engine, ctx, dims, unary):
    """7.3.5: LS, bias, batch-norm beta/gamma/mean/var, then the weight (or G then H)."""
    cpt = ndu.compressed_parameter_types
    roles = _block_roles(cpt)
    if len(names) != len(roles):
        raise NNCError("NNR_PT_BLOCK with compressed_parameter_types %d needs %d topology elements, the header lists %d"
                       % (cpt, len(roles), len(names)), engine.start, "topology_elements_ids_list")
    name_of = dict(zip(roles, names))
    one_d = [dims[0]]
    decoded = {}
    for role in ("LS", "BI", "beta", "gamma", "mean", "var"):
        if role in name_of:
            decoded[role] = _decode_one(engine, ctx, ndu, name_of[role], one_d, unary, NNR_PT_FLOAT, None, 0,
                                        None, engine.start, ctx.output)
    codebook = ndu.Codebook if ndu.codebook_present_flag else None
    zero = ndu.get("CbZeroOffset", 0)
    if cpt & NNR_CPT_DC:
        g_dims = ndu.TensorDimensionsG
        decoded["G"] = _decode_one(engine, ctx, ndu, name_of["G"], g_dims, unary, NNR_PT_BLOCK, codebook, zero,
                                   _entry_points(ndu, 0), engine.start, ctx.output)
        bs = 4 << ndu.scan_order
        h_first = ((g_dims[0] + bs - 1) >> (2 + ndu.scan_order)) - 1
        cb_dc = ndu.get("CodebookDC") if ndu.codebook_present_flag else None
        decoded["H"] = _decode_one(engine, ctx, ndu, name_of["H"], ndu.TensorDimensionsH, unary, NNR_PT_BLOCK,
                                   cb_dc, ndu.get("CbZeroOffsetDC", 0), _entry_points(ndu, h_first), engine.start,
                                   ctx.output)
        shapes = {"G": g_dims, "H": ndu.TensorDimensionsH}
    else:
        decoded["W"] = _decode_one(engine, ctx, ndu, name_of["W"], dims, unary, NNR_PT_BLOCK, codebook, zero,
                                   _entry_points(ndu, 0), engine.start, ctx.output)
        shapes = {"W": dims}
    out = []
    for role in roles:
        values, levels = decoded[role]
        out.append((name_of[role], list(shapes.get(role, one_d)), values, levels))
    return out


def _prod(values):
    p = 1
    for v in values:
        p *= v
    return p


def _split(ndu, names, dims, values, levels, where):
    """7.3.1: TensorSplit and AxisSwap for NDUs that combine several topology elements."""
    if len(names) == 1:
        return [(names[0], list(dims), values, levels)]
    mapping = ndu.get("topology_tensor_dimension_mapping")
    if mapping is None:
        raise NNCError("NDU combines %d topology elements but has no topology_tensor_dimension_mapping()"
                       % len(names), where, "topology_tensor_dimension_mapping")
    axis = mapping.concatentation_axis_index
    if axis >= len(dims):
        raise NNCError("concatentation_axis_index %d for a %d-D tensor" % (axis, len(dims)), where,
                       "concatentation_axis_index")
    bounds = [0] + list(mapping.split_index) + [dims[axis]]
    for a, b in zip(bounds, bounds[1:]):
        if b <= a:
            raise NNCError("split_index values %r are not increasing within 0..%d" % (mapping.split_index, dims[axis]),
                           where, "split_index")
    outer = _prod(dims[:axis])
    inner = _prod(dims[axis + 1:])
    full = dims[axis]
    out = []
    for k, name in enumerate(names):
        lo, hi = bounds[k], bounds[k + 1]
        sub_dims = list(dims)
        sub_dims[axis] = hi - lo
        sub_values = _take(values, outer, full, inner, lo, hi)
        sub_levels = _take(levels, outer, full, inner, lo, hi) if levels is not None else None
        perm = list(range(len(dims)))
        for idx, shift in zip(mapping.shift_index[k], mapping.shift_value[k]):
            # AxisSwap applied shift_value times: the axis at shift_index moves left by shift_value.
            if idx >= len(dims) or shift > idx:
                raise NNCError("shift_index %d / shift_value %d invalid for a %d-D tensor" % (idx, shift, len(dims)),
                               where, "shift_index")
            perm.insert(idx - shift, perm.pop(idx))
        if perm != list(range(len(dims))):
            sub_values = _permute(sub_values, sub_dims, perm)
            if sub_levels is not None:
                sub_levels = _permute(sub_levels, sub_dims, perm)
            sub_dims = [sub_dims[p] for p in perm]
        out.append((name, sub_dims, sub_values, sub_levels))
    return out


def _take(values, outer, full, inner, lo, hi):
    part = values[0:0]  # empty, same typecode (MicroPython arrays have no .typecode)
    for o in range(outer):
        base = o * full * inner
        part.extend(values[base + lo * inner:base + hi * inner])
    return part


def _permute(values, dims, perm):
    """Transpose a row-major tensor: output axis i is input axis perm[i]."""
    n = len(dims)
    strides = [1] * n
    for i in range(n - 2, -1, -1):
        strides[i] = strides[i + 1] * dims[i + 1]
    out_dims = [dims[p] for p in perm]
    out_strides = [strides[p] for p in perm]
    out = values[:]  # a copy of the same typecode
    index = [0] * n
    src = 0
    for i in range(len(values)):
        out[i] = values[src]
        for ax in range(n - 1, -1, -1):
            index[ax] += 1
            src += out_strides[ax]
            if index[ax] < out_dims[ax]:
                break
            src -= out_strides[ax] * out_dims[ax]
            index[ax] = 0
    return out
