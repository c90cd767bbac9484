"""The host encoder's public API: tensors in, an NNR bitstream out (the mirror of nnc_edge.decoding).

``encode(tensors, qp=-32, dq=True, ...)`` codes a model in one call; ``Encoder`` keeps state across
calls for update chains (parent signalling, temporal context adaptation, HDSP history) exactly as
``nnc_edge.Decoder`` keeps it, so a chain of ``Encoder.encode()`` outputs decodes through one Decoder.

The stream is what NNCodec writes (supplement 7.1 / 7.2), so NNCodec decodes it too: NNR_STR,
NNR_MPS (qp density, quantization parameter 0), NNR_TPL (NNR_TPL_UNREC with an empty st(v) string),
then one NNR_NDU per tensor in dict order (or one NNR_PT_BLOCK NDU per block group). Where coding
choices are the encoder's, the smaller NDU wins:

* row skipping (profile 1) is signalled for a tensor only where it has all-zero rows and saves bytes;
* ``codebook=2`` keeps the codebook only where it makes the NDU smaller (NNCodec's codebook_mode 2);
* a float tensor is sent as NNR_PT_RAW_FLOAT (exact) where coding it does not make it smaller;
* with an update chain and ``hdsp``, the segment is coded with and without HDSP (supplement 5.6).

Quantization is nnc_edge.encoder.quantize (NNCodec's levels with the default options), entropy
coding nnc_edge.encoder.cabac_encoder (byte-identical with NNCodec for the same levels), units
nnc_edge.encoder.unitwriter.
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from decoder_core.deepcabac import TensorCoding
from decoder_core.tables import (
    NNR_CPT_BI, NNR_CPT_BN, NNR_CPT_LS, NNR_PT_BLOCK, NNR_PT_INT, NNR_PT_RAW_FLOAT, NNR_TPL_UNREC,
)

from .. import modelio
from ..parallel import check_threads
from .cabac_encoder import SegmentTensor, block_roles, encode_segment
from .quantize import DEFAULT_QP, DEFAULT_QP_DENSITY, DEFAULT_UNARY_LENGTH_MINUS1, quantize_tensor
from .unitwriter import (
    MAX_PARTIAL_UNITS, MAX_SHORT_UNIT_SIZE, MAX_UNIT_SIZE, aggregate_unit, compressed_data_unit,
    compressed_data_unit_header, model_parameter_set_unit, partial_data_units, start_unit, topology_unit,
)

__all__ = ["encode", "Encoder", "TensorReport", "load_tensors", "BLOCK_ROLES"]

# Roles of an NNR_PT_BLOCK group (7.3.5): the weight, its bias, local scaling and batch norm.
BLOCK_ROLES = ("W", "LS", "BI", "beta", "gamma", "mean", "var")
_BN_ROLES = ("beta", "gamma", "mean", "var")

# Options of Encoder.encode() and their defaults.
_OPTIONS = {
    "qp": DEFAULT_QP,
    "qp_density": DEFAULT_QP_DENSITY,
    "nonweight_qp": "default",
    "qp_per_tensor": None,
    "dq": True,
    "codebook": 0,
    "bitdepth": None,
    "scan_order": 0,
    "row_skip": True,
    "lambda_scale": 0.0,
    "param_opt": True,
    "cabac_unary_length_minus1": DEFAULT_UNARY_LENGTH_MINUS1,
    "raw_float": True,
    "max_unit_bytes": None,
    "aggregate": False,
    "block": False,
}


class TensorReport:
    """How one tensor was coded (``Encoder.report`` after each encode()).

    ``payload_type`` is the NDU's nnr_compressed_data_unit_payload_type (NNR_PT_BLOCK for every member
    of a block), None when the tensor was omitted (all zero in an update, supplement 5.7). ``qp`` is
    None for NNR_PT_INT and NNR_PT_RAW_FLOAT. ``unit_bytes`` is the size of the whole NDU (shared by
    the members of a block) before any splitting into partial units. ``quantized`` is the
    QuantizedTensor whose reconstruct() the decoder returns, kept with ``Encoder(keep_quantized=True)``
    (None otherwise, and for NNR_PT_RAW_FLOAT).
    """

    def __init__(self, name, shape, payload_type, qp=None, dq_flag=0, codebook_size=0, scan_order=0,
                 row_skip=0, hdsp=0, tca=0, unit_bytes=0, quantized=None):
        self.name = name
        self.shape = shape
        self.payload_type = payload_type
        self.qp = qp
        self.dq_flag = dq_flag
        self.codebook_size = codebook_size
        self.scan_order = scan_order
        self.row_skip = row_skip
        self.hdsp = hdsp
        self.tca = tca
        self.unit_bytes = unit_bytes
        self.quantized = quantized

    @property
    def omitted(self):
        return self.payload_type is None

    def __repr__(self):
        return "TensorReport(%r, %s, payload_type=%s, qp=%s, unit_bytes=%d)" % (
            self.name, list(self.shape), self.payload_type, self.qp, self.unit_bytes)


# --- input ---------------------------------------------------------------------------------------------
def _to_numpy(name, value):
    """A numpy array from an array-like or a PyTorch tensor (without importing torch)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) in ("torch.bfloat16", "torch.float16"):
            value = value.float()  # numpy has no bfloat16; float16 values are exact in float32
        value = value.numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "iubf":
        raise TypeError("tensor %r has dtype %s; only integer, boolean and float tensors can be coded"
                        % (name, array.dtype))
    if 0 in array.shape:
        raise ValueError("tensor %r has shape %s: tensor_dimensions must be positive (6.4.3.7)"
                         % (name, list(array.shape)))
    if array.ndim == 0:
        array = array.reshape(1)  # tensor_dimension_list() has at least one dimension
    return array


def load_tensors(tensors):
    """(name, numpy array) pairs in order from a dict (numpy arrays, PyTorch tensors or a state dict), a
    list of pairs, or a .safetensors / .npz path."""
    if isinstance(tensors, (str, os.PathLike)):
        tensors = modelio.load(tensors)
    items = list(tensors.items()) if hasattr(tensors, "items") else list(tensors)
    out = []
    seen = set()
    for name, value in items:
        if not isinstance(name, str):
            raise TypeError("tensor names must be strings, not %r" % (name,))
        if name in seen:
            raise ValueError("tensor %r is given twice" % name)
        seen.add(name)
        out.append((name, _to_numpy(name, value)))
    return out


# --- the stream's first units --------------------------------------------------------------------------
def _mps_fields(profile, qp_density, parent_signalling, topology, indexed=False):
    fields = {"topology_carriage_flag": 1 if topology else 0, "mps_qp_density": qp_density,
              "mps_quantization_parameter": 0, "mps_topology_indexed_reference_flag": 1 if indexed else 0}
    if profile == 1:
        fields["mps_parent_signalling_enabled_flag"] = 1 if parent_signalling else 0
    return fields


def _head_units(profile, mps, topology):
    units = [start_unit(profile), model_parameter_set_unit(mps, general_profile_idc=profile)]
    if topology:
        # As NNCodec (supplement 7.1): NNR_TPL_UNREC; topology_data is an empty st(v), one zero byte.
        units.append(topology_unit(topology_storage_format=NNR_TPL_UNREC, topology_compression_format=0,
                                   topology_data=b"\x00", mps=mps))
    return units


# --- grouping --------------------------------------------------------------------------------------------
class _Group:
    """One NDU to code: a single tensor (roles None) or an NNR_PT_BLOCK group (role -> index)."""

    def __init__(self, first, members, roles=None):
        self.first = first      # position in the input, for the stream order
        self.members = members  # indices into the tensor list, in topology_elements_ids_list order
        self.roles = roles      # role names parallel to members, or None


def _block_cpt(roles):
    cpt = 0
    if "LS" in roles:
        cpt |= NNR_CPT_LS
    if "BI" in roles:
        cpt |= NNR_CPT_BI
    if any(r in roles for r in _BN_ROLES):
        if not all(r in roles for r in _BN_ROLES):
            raise ValueError("a batch-norm block needs all of beta, gamma, mean and var (NNR_CPT_BN)")
        cpt |= NNR_CPT_BN
    return cpt


def _groups(tensors, block):
    """The NDUs of the stream: block groups where asked, one NDU per remaining tensor, in input order."""
    index = {name: i for i, (name, _) in enumerate(tensors)}
    blocks = []
    if block is True:
        for name, array in tensors:
            if not name.endswith(".weight") or array.ndim < 2 or array.dtype.kind != "f":
                continue
            bias = name[:-len("weight")] + "bias"
            j = index.get(bias)
            if j is not None and tensors[j][1].dtype.kind == "f" and tensors[j][1].shape == (array.shape[0],):
                blocks.append({"W": name, "BI": bias})
    elif block:
        blocks = [dict(b) for b in block]
    groups = []
    used = set()
    for spec in blocks:
        unknown = set(spec) - set(BLOCK_ROLES)
        if unknown or "W" not in spec:
            raise ValueError("a block group maps roles %s to tensor names and needs 'W'; got %r"
                             % ("/".join(BLOCK_ROLES), sorted(spec)))
        if len(spec) < 2:
            raise ValueError("a block group needs the weight and at least one other tensor: %r" % (spec,))
        cpt = _block_cpt(spec)
        ids, _ = block_roles(cpt)
        members = []
        for role in ids:
            name = spec[role]
            if name not in index:
                raise ValueError("block group names %r, which is not among the tensors" % (name,))
            if name in used:
                raise ValueError("tensor %r is in two block groups" % (name,))
            used.add(name)
            members.append(index[name])
        weight = tensors[index[spec["W"]]][1]
        if weight.ndim < 2 or weight.dtype.kind != "f":
            raise ValueError("the weight %r of a block group must be a float tensor with 2 or more dimensions"
                             % spec["W"])
        for role, i in zip(ids, members):
            name, array = tensors[i]
            if role != "W" and (array.dtype.kind != "f" or array.shape != (weight.shape[0],)):
                raise ValueError("block member %r (%s) must be a float tensor of shape (%d,), the weight's first "
                                 "dimension" % (name, role, weight.shape[0]))
        groups.append(_Group(min(members), members, ids))
    for i, (name, _) in enumerate(tensors):
        if name not in used:
            groups.append(_Group(i, [i]))
    groups.sort(key=lambda g: g.first)
    return groups


# --- coding one NDU --------------------------------------------------------------------------------------
class _Chain:
    """What an update chain knows before this stream: per tensor name the previous integer tensor (TCA
    base), the significance history (HDSP), put_node_depth and parameter_id."""

    def __init__(self):
        self.bases = {}      # name -> int32 vector (QuantParam n of the last coded NDU)
        self.history = {}    # name -> bool vector (cumulative nonzero positions, 6.7)
        self.depth = {}      # name -> put_node_depth of the last coded NDU


class _Coded:
    """The chosen NDU of a group: header fields, payload, unit bytes, and per member (name, levels,
    report)."""

    def __init__(self, fields, payload, unit, members, payload_type):
        self.fields = fields
        self.payload = payload
        self.unit = unit
        self.members = members        # [(name, levels or None, TensorReport)]
        self.payload_type = payload_type


def _has_zero_row(levels):
    if levels.ndim < 2:
        return False
    matrix = levels.reshape(levels.shape[0], -1)
    return matrix.shape[0] > 1 and matrix.shape[1] > 1 and bool((~matrix.any(axis=1)).any())


class _Job:
    """Codes one group into its NDU with the stream-wide settings."""

    def __init__(self, encoder, opts, mps, parent, chain_view):
        self.enc = encoder
        self.opts = opts
        self.mps = mps
        self.parent = parent          # this stream carries parent signalling
        self.chain = chain_view       # the _Chain before this stream (read only here)
        self.profile = encoder.profile

    # quantization
    def quantize(self, name, array, dq, method, row_skip):
        o = self.opts
        qp = o["qp"]
        per = o["qp_per_tensor"]
        nonweight = o["nonweight_qp"]
        if per and name in per:
            qp = nonweight = int(per[name])
        return quantize_tensor(array, qp=qp, qp_density=o["qp_density"], dq=dq, nonweight_qp=nonweight,
                               method=method, bitdepth=o["bitdepth"], scan_order=o["scan_order"],
                               row_skip=row_skip, lambda_scale=o["lambda_scale"],
                               cabac_unary_length_minus1=o["cabac_unary_length_minus1"], name=name)

    def int_tensor(self, array):
        qt = quantize_tensor(array)
        h, w = _matrix_hw(array.shape)
        if array.ndim > 1 and h > 1 and w > 1:
            qt.scan_order = self.opts["scan_order"]
        return qt

    # the NDU
    def element_fields(self, names, dims):
        """How the NDU names its tensors (6.4.3.7): by topology_elem_id, or by index into the out-of-band
        reference list."""
        index = self.enc.reference_index
        ids = list(names) if index is None else [index[n] for n in names]
        # The dimensions stay in the header even with a reflist: without them the rest of the header
        # (scan_order) cannot be parsed by a reader that lacks the out-of-band topology.
        fields = {"tensor_dimensions": list(dims)}
        if len(ids) > 1:
            fields["topology_elements_ids_list"] = ids
        else:
            fields["topology_elem_id" if index is None else "topology_elem_id_index"] = ids[0]
        return fields

    def node_fields(self, names, tca):
        if self.profile != 1:
            return {}
        chain = self.chain
        lead = names[0]
        fields = {"node_id_present_flag": 1, "device_id": self.enc.device_id,
                  "parameter_id": self.enc._parameter_ids[lead],
                  "put_node_depth": chain.depth.get(lead, 0) + 1 if self.parent else 0}
        if self.parent:
            fields.update(parent_node_id_present_flag=1, parent_node_id_type=0, parent_device_id=0,
                          temporal_context_modeling_flag=1 if tca else 0)
        return fields

    def coding(self, name, qt, dims, tca):
        count = math.prod(dims)
        base = self.chain.bases.get(name) if tca else None
        history = None
        if self.parent and self.enc.hdsp:
            history = self.chain.history.get(name)
            if history is not None and history.size != count:
                history = None
        return TensorCoding(list(dims), qt.dq_flag, self.opts["cabac_unary_length_minus1"], qt.scan_order,
                            self.profile, len(qt.codebook) if qt.codebook is not None else 0, qt.cb_zero_offset,
                            None, base, history, 1 if self.parent else 0)

    def segment_tensor(self, name, qt, dims, tca, row_skip_flag):
        coding = self.coding(name, qt, dims, tca)
        hdsp = None if coding.hdsp_history is not None else 0
        qp_value = None if qt.payload_type == NNR_PT_INT else qt.qp  # QuantizationParameter is 0
        return SegmentTensor(qt.levels, coding, qp_value, self.opts["qp_density"], row_skip_flag, hdsp,
                             1 if self.opts["param_opt"] else 0)

    def tca_for(self, names, counts):
        if not (self.parent and self.enc.tca):
            return False
        for name, count in zip(names, counts):
            base = self.chain.bases.get(name)
            if base is None or base.size != count:
                return False
        return True

    def ndu(self, names, payload_type, lead_qt, dims, segment_items, tca, cpt=0):
        """Entropy-code the segment and write the NDU; returns (fields, payload, unit, segment)."""
        segment = encode_segment(segment_items)
        fields = {"nnr_compressed_data_unit_payload_type": payload_type,
                  "cabac_unary_length_minus1": self.opts["cabac_unary_length_minus1"],
                  "dq_flag": lead_qt.dq_flag}
        if payload_type == NNR_PT_BLOCK:
            fields["compressed_parameter_types"] = cpt
        fields.update(self.element_fields(names, dims))
        fields.update(self.node_fields(names, tca))
        if lead_qt.codebook is not None:
            fields.update(Codebook=list(lead_qt.codebook), CbZeroOffset=lead_qt.cb_zero_offset,
                          codebook_egk=lead_qt.codebook_egk)
        if len(dims) > 1:
            fields["scan_order"] = lead_qt.scan_order
            if lead_qt.scan_order:
                fields.update(segment.header_fields(lead_qt.dq_flag))
        unit = compressed_data_unit(fields, segment.data, general_profile_idc=self.profile, mps=self.mps)
        return fields, segment.data, unit, segment

    def single(self, name, array, qt, row_skip_flag):
        dims = list(array.shape)
        count = math.prod(dims)
        tca = self.tca_for([name], [count])
        item = self.segment_tensor(name, qt, dims, tca, row_skip_flag)
        fields, payload, unit, segment = self.ndu([name], qt.payload_type, qt, dims, [item], tca)
        report = self.tensor_report(name, array, qt.payload_type, qt, segment.tensors[0], tca, unit)
        return _Coded(fields, payload, unit, [(name, qt.levels, report)], qt.payload_type)

    def tensor_report(self, name, array, payload_type, qt, coded, tca, unit):
        """The TensorReport of a tensor coded into ``unit`` (``coded``: its CodedTensor)."""
        return TensorReport(name, tuple(array.shape), payload_type, qt.qp, qt.dq_flag,
                            len(qt.codebook) if qt.codebook is not None else 0, qt.scan_order,
                            1 if coded.row_skip_flag is not None else 0, coded.hist_dep_sig_prob_enabled_flag,
                            1 if tca else 0, len(unit), qt if self.enc.keep_quantized else None)

    def row_skip_variants(self, name, array, qt, requantize):
        """The NDU of qt, and with row skipping where it has all-zero rows; the smaller one."""
        best = self.single(name, array, qt, 0)
        if self.profile == 1 and self.opts["row_skip"] and _has_zero_row(qt.levels) and not (
                qt.codebook is not None and len(qt.codebook) == 1):
            if requantize and qt.dq_flag and qt.scan_order:
                qt = requantize()  # 6.5: skipped rows move the DQ state w times; the trellis must know
            other = self.single(name, array, qt, 1)
            if len(other.unit) < len(best.unit):
                best = other
        return best

    def code_single(self, name, array):
        o = self.opts
        if array.dtype.kind in "iub":
            qt = self.int_tensor(array)
            return self.row_skip_variants(name, array, qt, None)
        candidates = []
        if o["codebook"] != 1:
            qt = self.quantize(name, array, o["dq"], "uniform", False)
            requant = (lambda: self.quantize(name, array, o["dq"], "uniform", True))
            candidates.append(self.row_skip_variants(name, array, qt, requant))
        if o["codebook"]:
            qt = self.quantize(name, array, o["dq"], "codebook", False)
            candidates.append(self.row_skip_variants(name, array, qt, None))
        return min(candidates, key=lambda c: len(c.unit))  # the first on a tie

    def raw(self, name, array):
        """NNR_PT_RAW_FLOAT (6.3.4.7): the float32 values themselves."""
        dims = list(array.shape)
        values = np.ascontiguousarray(array, dtype="<f4").reshape(-1)
        fields = {"nnr_compressed_data_unit_payload_type": NNR_PT_RAW_FLOAT}
        fields.update(self.element_fields([name], dims))
        fields.update(self.node_fields([name], False))
        if len(dims) > 1:
            fields["scan_order"] = 0
        payload = values.tobytes()
        unit = compressed_data_unit(fields, payload, general_profile_idc=self.profile, mps=self.mps)
        report = TensorReport(name, tuple(array.shape), NNR_PT_RAW_FLOAT, unit_bytes=len(unit))
        return _Coded(fields, payload, unit, [(name, None, report)], NNR_PT_RAW_FLOAT)

    def code_block(self, names, roles, arrays):
        o = self.opts
        variants = []
        if o["codebook"] != 1:
            variants.append(self.block_variant(names, roles, arrays, "uniform"))
        if o["codebook"]:
            variants.append(self.block_variant(names, roles, arrays, "codebook"))
        return min(variants, key=lambda c: len(c.unit))

    def block_variant(self, names, roles, arrays, method):
        o = self.opts
        w_index = roles.index("W")
        wname, warray = names[w_index], arrays[w_index]
        wqt = self.quantize(wname, warray, o["dq"], method, False)
        member_dq = bool(wqt.dq_flag)  # dq_flag is one for the whole block (7.3.5)
        qts = [wqt if r == "W" else self.quantize(n, a, member_dq, "uniform", False)
               for n, r, a in zip(names, roles, arrays)]
        best = self.block_ndu(names, roles, arrays, qts, 0)
        if self.profile == 1 and o["row_skip"] and _has_zero_row(wqt.levels):
            if wqt.dq_flag and wqt.scan_order:
                qts[w_index] = self.quantize(wname, warray, o["dq"], method, True)
            other = self.block_ndu(names, roles, arrays, qts, 1)
            if len(other.unit) < len(best.unit):
                best = other
        return best

    def block_ndu(self, names, roles, arrays, qts, row_skip_flag):
        cpt = _block_cpt(roles)
        _, payload_order = block_roles(cpt)
        w_index = roles.index("W")
        dims = list(arrays[w_index].shape)
        tca = self.tca_for(names, [a.size for a in arrays])
        by_role = dict(zip(roles, range(len(roles))))
        items = []
        for role in payload_order:
            i = by_role[role]
            member_dims = dims if role == "W" else [dims[0]]
            items.append(self.segment_tensor(names[i], qts[i], member_dims, tca, row_skip_flag if role == "W" else 0))
        fields, payload, unit, segment = self.ndu(names, NNR_PT_BLOCK, qts[w_index], dims, items, tca, cpt)
        coded = dict(zip(payload_order, segment.tensors))
        members = []
        for name, role, array, qt in zip(names, roles, arrays, qts):
            report = self.tensor_report(name, array, NNR_PT_BLOCK, qt, coded[role], tca, unit)
            members.append((name, qt.levels, report))
        return _Coded(fields, payload, unit, members, NNR_PT_BLOCK)

    def __call__(self, group, tensors):
        names = [tensors[i][0] for i in group.members]
        arrays = [tensors[i][1] for i in group.members]
        raw_float = self.opts["raw_float"]
        if (group.roles is None and not isinstance(raw_float, bool) and names[0] in raw_float
                and arrays[0].dtype.kind == "f"):
            return self.raw(names[0], arrays[0])  # asked for: the float32 values exactly
        if group.roles is None:
            coded = self.code_single(names[0], arrays[0])
        else:
            coded = self.code_block(names, group.roles, arrays)
        if self.parent and not any(levels.any() for _, levels, _ in coded.members):
            # 5.7: an update whose tensors are entirely zero is omitted
            coded.members = [(n, None, TensorReport(n, r.shape, None)) for n, _, r in coded.members]
            coded.unit = None
        elif (group.roles is None and arrays[0].dtype.kind == "f" and self.opts["raw_float"]
              and 4 * arrays[0].size < len(coded.unit)):
            raw = self.raw(names[0], arrays[0])
            if len(raw.unit) <= len(coded.unit):
                coded = raw
        return coded


def _matrix_hw(shape):
    if len(shape) == 0:
        return 1, 1
    h = int(shape[0])
    count = math.prod(shape)
    return h, count // h


# --- stream assembly -------------------------------------------------------------------------------------
def _split(coded, max_unit_bytes, profile, mps):
    """Partial-data units of at most max_unit_bytes bytes each (6.4.3.1)."""
    header = compressed_data_unit_header(coded.fields, profile, mps)
    size_bytes = 2 if max_unit_bytes <= MAX_SHORT_UNIT_SIZE else 4
    chunk = max_unit_bytes - size_bytes - 2 - len(header)  # nnr_unit_size, type byte, partial_data_counter
    name = coded.members[0][0]
    if chunk < 1:
        raise ValueError("max_unit_bytes %d is too small for the NDU of %r: its header alone takes %d bytes"
                         % (max_unit_bytes, name, max_unit_bytes - chunk))
    count = -(-len(coded.payload) // chunk)
    if count > MAX_PARTIAL_UNITS:
        raise ValueError("the NDU of %r (%d bytes) would need %d partial units of at most %d bytes; "
                         "partial_data_counter allows %d: raise max_unit_bytes"
                         % (name, len(coded.unit), count, max_unit_bytes, MAX_PARTIAL_UNITS))
    return partial_data_units(coded.fields, coded.payload, chunk, general_profile_idc=profile, mps=mps)


def _aggregate_size(sizes):
    body = 1 + 4 + 6 * len(sizes) + sum(sizes)  # header byte, aggregate header with entry points, units
    return body + (2 if body + 2 <= MAX_SHORT_UNIT_SIZE else 4)


def _aggregated(units, limit, per_unit):
    """Consecutive units packed into NNR_AGG units (6.3.3.8, with entry points) of at most ``limit``
    bytes and ``per_unit`` members; a run of one unit stays as it is."""
    out = []
    run = []

    def flush():
        if len(run) >= 2:
            out.append(aggregate_unit(run))
        else:
            out.extend(run)
        del run[:]

    for unit in units:
        if run and (len(run) >= per_unit or _aggregate_size([len(u) for u in run] + [len(unit)]) > limit):
            flush()
        run.append(unit)
    flush()
    return out


def _check_options(opts, profile):
    unknown = set(opts) - set(_OPTIONS)
    if unknown:
        raise TypeError("unknown encode option(s): %s" % ", ".join(sorted(unknown)))
    o = dict(_OPTIONS)
    o.update(opts)
    if o["codebook"] is True:
        o["codebook"] = 1
    if o["codebook"] in (False, None):
        o["codebook"] = 0
    if o["codebook"] not in (0, 1, 2):
        raise ValueError("codebook must be 0 (off), 1 (always) or 2 (where it is smaller), not %r" % (o["codebook"],))
    if not isinstance(o["scan_order"], int) or not 0 <= o["scan_order"] <= 4:
        raise ValueError("scan_order must be 0..4, not %r" % (o["scan_order"],))
    if not isinstance(o["qp_density"], int) or not 0 <= o["qp_density"] <= 7:
        raise ValueError("qp_density must be 0..7, not %r" % (o["qp_density"],))
    unary = o["cabac_unary_length_minus1"]
    if not isinstance(unary, int) or not 0 <= unary <= 255:
        raise ValueError("cabac_unary_length_minus1 must be 0..255, not %r" % (unary,))
    limit = o["max_unit_bytes"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 16):
        raise ValueError("max_unit_bytes must be an integer of at least 16, not %r" % (limit,))
    agg = o["aggregate"]
    if agg is not True and agg is not False and (not isinstance(agg, int) or agg < 2):
        raise ValueError("aggregate must be True, False or the largest number of units per NNR_AGG (>= 2)")
    if o["row_skip"] and profile == 0:
        o["row_skip"] = False  # row skipping is profile-1 syntax (6.4)
    return o


class Encoder:
    """Encodes tensors into NNR bitstreams, keeping encoder state across calls for update chains.

    The mirror of nnc_edge.Decoder. ``Encoder(profile=1)`` alone writes independent streams (as
    nnc_edge.encode does). For an update chain (stable interface, also used by the incremental-update
    code)::

        enc = nnc_edge.Encoder(parent_signalling=True, tca=True)
        stream0 = enc.encode(diff0, qp=-38)   # each call: one complete bitstream
        stream1 = enc.encode(diff1, qp=-38)
        dec = nnc_edge.Decoder()
        dec.decode(stream0); dec.decode(stream1)   # decodes in the same order

    Constructor arguments (fixed for the chain):

    * ``profile``: general_profile_idc, 1 (default, as NNCodec) or 0 (the 2022 syntax; no row skipping,
      no node or parent information).
    * ``parent_signalling``: write mps_parent_signalling_enabled_flag = 1 (profile 1): every stream is a
      differential update. Each NDU then carries parent_node_id_present_flag = 1, parent_node_id_type 0,
      parent_device_id 0 and put_node_depth 1, 2, ... per update of that tensor (supplement 6.3 / 7.1);
      NDUs whose quantized tensors are all zero are omitted (5.7), so the decoder returns no entry for
      them (their difference is zero) and their chain state stays as it was.
    * ``tca``: temporal context adaptation (6.6): temporal_context_modeling_flag = 1 for a tensor whose
      previous integer tensor (from an earlier call) exists with the same number of elements.
    * ``hdsp``: let each NDU use history-dependent significance probabilities (6.7) where its tensors
      have a history, when that makes it smaller (5.6). Off by default: NNCodec then decodes the chain
      without its HDSP tool.
    * ``device_id``: the NDUs' device_id (profile 1).
    * ``topology``: write the NNR_TPL unit (topology_carriage_flag 1) as NNCodec does; needed for
      NNCodec to decode the stream.
    * ``reflist``: a list of tensor names that the decoder knows out of band (with ``topology=False``):
      NDUs then name their tensors by index into it (mps_topology_indexed_reference_flag 1,
      topology_elem_id_index), so the decoder must be given the list as its ``topology`` (a list of
      (name, shape) pairs in this order) to know the names. Every tensor encoded must be in the list.
      Update streams use it (nnc_edge.updates).
    * ``threads``: NDUs coded at the same time (default: the number of CPUs); output is identical.
    * ``keep_quantized``: keep each tensor's QuantizedTensor in ``report`` (memory: its levels).
    * any option of encode() as a default for every call.

    ``encode(tensors, progress=None, **options) -> bytes``: ``tensors`` is a dict name -> array
    (numpy arrays, PyTorch tensors or a state dict; dict order is stream order), a list of (name,
    array) pairs, or a .safetensors / .npz path. ``progress(parameters_done, parameters_total, name)``
    is called after each NDU. Options (defaults as NNCodec's nncodec.tensor):

    * ``qp`` (-32), ``qp_density`` (2): the step size of weights (tensors of 2 or more dimensions);
      ``nonweight_qp``: 1-D tensors (biases, norms): "default" (NNCodec's -75 at qp_density 2), None
      (qp - 2^(qp_density + 1), a quarter of the step) or a qp; ``qp_per_tensor``: name -> qp,
      overriding both for that tensor.
    * ``dq`` (True): dependent quantization (trellis); ``lambda_scale`` (0): its rate term (see
      nnc_edge.encoder.quantize.quantize_dq); ``bitdepth``: integer-aligned bit depth (5.5).
    * ``codebook``: 0 off, 1 always, 2 where the NDU gets smaller (NNCodec's codebook_mode).
    * ``scan_order`` (0): block scan 1..4 with entry points for tensors of 2 or more dimensions.
    * ``row_skip`` (True): profile-1 row skipping, signalled per tensor where it has all-zero rows
      and saves bytes.
    * ``raw_float`` (True): NNR_PT_RAW_FLOAT where the coded NDU would not be smaller; or a set of
      tensor names: those always NNR_PT_RAW_FLOAT (their exact values), the others where smaller.
    * ``param_opt`` (True): choose shift_parameter_ids per context (supplement 5.3).
    * ``cabac_unary_length_minus1`` (10).
    * ``block``: True pairs "X.weight" with "X.bias" into NNR_PT_BLOCK NDUs; or a list of groups, each
      a dict role -> tensor name with roles "W" (required), "BI", "LS", and "beta", "gamma", "mean",
      "var" (all four or none).
    * ``max_unit_bytes``: no NDU unit larger than this; larger NDUs are split into partial-data units.
    * ``aggregate``: pack consecutive NDUs into NNR_AGG units with entry points (True: as many as fit
      max_unit_bytes; an integer: at most that many per NNR_AGG).

    After each call ``report`` lists a TensorReport per tensor, in input order.

    The chain state (what nnc_edge.Decoder holds after decoding the streams written so far) is public,
    for saving and restoring a chain across processes: ``chain.bases`` (name -> int32 vector, the last
    coded QuantParam tensor, the TCA base), ``chain.history`` (name -> bool vector, HDSP),
    ``chain.depth`` (name -> put_node_depth of the last coded NDU) and ``parameter_ids`` (name ->
    parameter_id, assigned at first sight: the tensor's index in that call's input unless taken).
    """

    def __init__(self, profile=1, parent_signalling=False, tca=False, hdsp=False, device_id=0, topology=True,
                 threads=None, keep_quantized=False, reflist=None, **defaults):
        if profile not in (0, 1):
            raise ValueError("profile must be 0 or 1, not %r" % (profile,))
        if (parent_signalling or tca or hdsp) and profile != 1:
            raise ValueError("parent signalling, TCA and HDSP are profile-1 tools")
        if (tca or hdsp) and not parent_signalling:
            raise ValueError("TCA and HDSP need parent_signalling=True (an update chain)")
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise ValueError("device_id must be a non-negative integer")
        self.profile = profile
        self.parent_signalling = bool(parent_signalling)
        self.tca = bool(tca)
        self.hdsp = bool(hdsp)
        self.device_id = device_id
        self.topology = bool(topology)
        self.reference_index = None
        if reflist is not None:
            if self.topology:
                raise ValueError("reflist is an out-of-band topology: it needs topology=False")
            self.reference_index = {}
            for name in reflist:
                if not isinstance(name, str) or name in self.reference_index:
                    raise ValueError("reflist must list distinct tensor names (%r)" % (name,))
                self.reference_index[name] = len(self.reference_index)
        self.threads = check_threads(threads)
        self.keep_quantized = keep_quantized
        _check_options(defaults, profile)
        self.defaults = defaults
        self.report = []
        self.chain = self._chain = _Chain()
        self.parameter_ids = self._parameter_ids = {}

    def encode(self, tensors, progress=None, **options):
        """One complete bitstream for ``tensors`` (see the class docstring for the options)."""
        merged = dict(self.defaults)
        merged.update(options)
        opts = _check_options(merged, self.profile)
        tensors = load_tensors(tensors)
        self._assign_parameter_ids(tensors)
        parent = self.parent_signalling
        mps = _mps_fields(self.profile, opts["qp_density"], parent, self.topology, self.reference_index is not None)
        if self.reference_index is not None:
            missing = [name for name, _ in tensors if name not in self.reference_index]
            if missing:
                raise ValueError("tensor %r is not in the reflist" % missing[0])
        groups = _groups(tensors, opts["block"])
        results = self._code(groups, _Job(self, opts, mps, parent, self._chain), tensors, progress)
        stream = self._assemble(results, opts, mps)
        self._update_chain(results)
        reports = {}
        for coded in results:
            for name, _, report in coded.members:
                reports[name] = report
        self.report = [reports[name] for name, _ in tensors]
        return stream

    def _code(self, groups, job, tensors, progress):
        """The _Coded NDU of each group, in stream order (coded on threads when there are several)."""
        total = sum(int(a.size) for _, a in tensors)
        done = 0
        results = []
        if self.threads > 1 and len(groups) > 1:
            with ThreadPoolExecutor(max_workers=min(self.threads, len(groups))) as pool:
                for group, coded in zip(groups, pool.map(lambda g: job(g, tensors), groups)):
                    results.append(coded)
                    done = self._progress(progress, group, tensors, done, total)
        else:
            for group in groups:
                results.append(job(group, tensors))
                done = self._progress(progress, group, tensors, done, total)
        return results

    def _progress(self, progress, group, tensors, done, total):
        done += sum(int(tensors[i][1].size) for i in group.members)
        if progress is not None:
            progress(done, total, tensors[group.members[0]][0])
        return done

    def _assign_parameter_ids(self, tensors):
        # NNCodec's parameter_id is the index in the model dict; a name keeps its id along a chain.
        ids = self._parameter_ids
        taken = set(ids.values())
        for i, (name, _) in enumerate(tensors):
            if name not in ids:
                pid = i
                while pid in taken:
                    pid += 1
                ids[name] = pid
                taken.add(pid)

    def _assemble(self, results, opts, mps):
        units = _head_units(self.profile, mps, self.topology)
        limit = opts["max_unit_bytes"]
        agg = opts["aggregate"]
        pending = []

        def flush():
            if agg:
                per_unit = 0xFFFF + 2 if agg is True else agg
                units.extend(_aggregated(pending, limit or MAX_UNIT_SIZE, per_unit))
            else:
                units.extend(pending)
            del pending[:]

        for coded in results:
            if coded.unit is None:
                continue
            if limit is not None and len(coded.unit) > limit:
                flush()  # a partial-data sequence must not be interrupted (6.4.3.1)
                units.extend(_split(coded, limit, self.profile, mps))
            else:
                pending.append(coded.unit)
        flush()
        return b"".join(units)

    def _update_chain(self, results):
        """The decoder's state after this stream (decoder_core.payload._decode_one), kept for the next call."""
        if not self.parent_signalling:
            return
        chain = self._chain
        for coded in results:
            if coded.unit is None or coded.payload_type == NNR_PT_RAW_FLOAT:
                continue  # omitted, or raw values: the decoder keeps no integer tensor for them
            put_node_depth = chain.depth.get(coded.members[0][0], 0) + 1  # as node_fields() wrote it
            for name, levels, _ in coded.members:
                chain.depth[name] = put_node_depth
                flat = np.ascontiguousarray(levels, dtype=np.int32).reshape(-1)
                chain.bases[name] = flat
                history = chain.history.get(name)
                if history is None or history.size != flat.size:
                    history = np.zeros(flat.size, dtype=bool)
                    chain.history[name] = history
                history |= flat != 0


def encode(tensors, qp=DEFAULT_QP, dq=True, profile=1, topology=True, threads=None, progress=None, **options):
    """Encode tensors into one NNR bitstream (bytes); see Encoder for ``tensors`` and the options.

    ``tensors``: a dict name -> array (numpy arrays, PyTorch tensors or a state dict), a list of (name,
    array) pairs, or a .safetensors / .npz path. Float tensors are quantized (qp -32 and dependent
    quantization by default, 1-D tensors with the finer nonweight_qp), integer tensors are sent exactly
    as NNR_PT_INT. Decode with nnc_edge.decode().
    """
    return Encoder(profile=profile, topology=topology, threads=threads).encode(
        tensors, progress=progress, qp=qp, dq=dq, **options)
