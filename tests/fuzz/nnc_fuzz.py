"""Mutation fuzzing of the decoder's entry points with the conformance vectors as seeds.

Every input is a conformance vector changed by one mutator (bit flips, byte edits, truncations, splices
of two vectors, unit reordering, nnr_unit_size edits, NDU / MPS / NNR_STR header fields re-encoded with
extreme values by nnc_edge.encoder.unitwriter, partial-data counters, aggregate units) and fed to one target:
``decoder_core.decode`` (a Decoder), ``decoder_core.StreamDecoder.feed`` in chunks of random sizes, or
``nnc_edge.decode`` / ``nnc_edge.StreamDecoder`` (numpy, one or two threads), each stream decoder also
in slice mode (``slice_elements`` one of SLICE_ELEMENTS), on the compiled backend or, for a share of
the inputs and only the vectors under SMALL_VECTOR_BYTES, the pure-Python one.

Each input must decode or raise NNCError; anything else is a *crash*. Each is timed (CPU time of the
process, all threads) and its memory measured: the tracemalloc peak above the level before it (on
the compiled backend; tracing makes the pure-Python decoder, which allocates an int per bin, some 15
times slower) and, where Linux allows resetting it (/proc/self/clear_refs), the growth of the
process's peak resident set over its size before the input, which also sees C allocations. Over
``TIME_LIMIT`` seconds or ``MEMORY_LIMIT`` bytes is an *offender*. Inputs are reproducible: input
``i`` of a run with ``seed`` is made by ``make_input(corpus, seed, i)``.

The decoders run with FUZZ_LIMITS (PYTHON_LIMITS on the pure-Python backend): smaller than the
defaults, which allow what a Raspberry Pi can hold (a 256 MiB tensor) and so more than a CI job
should allocate per input. What is checked is that the configured limits hold for any input.

Used by tests/fuzz/test_fuzz_quick.py (the CI run) and benchmarks/fuzz_long.py (long runs).
"""

import copy
import json
import os
import random
import time
import traceback
import tracemalloc

import decoder_core
from decoder_core import Limits, NNCError
from decoder_core import backend as core_backend
from decoder_core.stream import StreamDecoder as CoreStreamDecoder
from decoder_core.tables import (
    NNR_CPT_BI, NNR_CPT_DC, NNR_CPT_LS, NNR_MPS, NNR_NDU, NNR_PT_BLOCK, NNR_PT_FLOAT, NNR_PT_INT,
    NNR_PT_RAW_FLOAT, NNR_STR,
)
from decoder_core.units import ParserState, parse_unit

import nnc_edge
from nnc_edge.encoder import unitwriter as uw

FUZZ_LIMITS = Limits(max_tensor_elements=1 << 21, max_decoded_bytes=1 << 25, max_unit_size=1 << 20,
                     max_bins_per_tensor=1 << 22)
# The pure-Python backend decodes some 10^6 bins per second: fewer per tensor keep each input short.
PYTHON_LIMITS = FUZZ_LIMITS.replace(max_bins_per_tensor=1 << 19)
TIME_LIMIT = 2.0
MEMORY_LIMIT = 64 << 20
SMALL_VECTOR_BYTES = 20000   # larger vectors (silero_vad) run on the compiled backend only
HEADER_SPAN = 64             # bit flips aimed at headers land in a unit's first bytes
PYTHON_SHARE = 0.2
# Slice sizes of the slice-mode targets. Not 1 or 7 (tests/test_slices.py runs those on the clean
# vectors): a slice costs some microseconds on its own, and a header may announce 2^21 elements.
SLICE_ELEMENTS = (61, 1000, 4096, 1 << 16)

EXTREME_U32 = (0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


# --- the corpus ---------------------------------------------------------------------------------------
class Unit:
    """One top-level NNR unit of a vector, with the context its header was parsed in."""

    def __init__(self, offset, syntax, profile, mps):
        self.offset = offset
        self.size = syntax.nnr_unit_size
        self.end = offset + self.size
        self.syntax = syntax
        self.type = syntax.nnr_unit_type
        self.profile = profile
        self.mps = mps
        self.payload_start = syntax.get("payload_start") or syntax.get("header_end") or offset + 3


class Vector:
    def __init__(self, name, data, prelude):
        self.name = name
        self.data = data
        self.prelude = prelude  # clean streams of an update chain decoded before this one
        self.units = []
        state = ParserState()
        offset = 0
        while offset < len(data):
            syntax = parse_unit(data, offset, len(data), state)
            self.units.append(Unit(offset, syntax, state.profile, state.mps))
            offset += syntax.nnr_unit_size

    def unit_bytes(self, u):
        return self.data[u.offset:u.end]

    def ndus(self):
        return [u for u in self.units if u.type == NNR_NDU]


class Corpus:
    def __init__(self, directory):
        with open(os.path.join(directory, "manifest.json")) as f:
            manifest = json.load(f)["vectors"]
        self.vectors = []
        by_name = {}
        for v in manifest:
            with open(os.path.join(directory, v["name"] + ".nnc"), "rb") as f:
                by_name[v["name"]] = f.read()
        for v in manifest:
            prelude = []
            if "chain" in v:
                prelude = [by_name["%s_%d" % (v["chain"], s)] for s in range(v["step"])]
            self.vectors.append(Vector(v["name"], by_name[v["name"]], prelude))
        self.small = [v for v in self.vectors if len(v.data) < SMALL_VECTOR_BYTES]


# --- mutators: each returns (bytes, description) or None when it does not apply -------------------------
def m_flip(rng, vec, corpus):
    data = bytearray(vec.data)
    n = rng.choice((1, 1, 1, 2, 3, 4, 8))
    where = []
    for _ in range(n):
        if rng.random() < 0.5:
            u = rng.choice(vec.units)
            pos = u.offset + rng.randrange(min(HEADER_SPAN, u.size))
        else:
            pos = rng.randrange(len(data))
        bit = rng.randrange(8)
        data[pos] ^= 0x80 >> bit
        where.append("%d.%d" % (pos, bit))
    return bytes(data), "flip " + ",".join(where)


def m_bytes(rng, vec, corpus):
    data = bytearray(vec.data)
    where = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        u = rng.choice(vec.units)
        pos = u.offset + rng.randrange(min(HEADER_SPAN, u.size)) if rng.random() < 0.6 else rng.randrange(len(data))
        data[pos] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)))
        where.append("%d=%02x" % (pos, data[pos]))
    return bytes(data), "bytes " + ",".join(where)


def m_truncate(rng, vec, corpus):
    if rng.random() < 0.5:
        cut = rng.randrange(len(vec.data))
    else:
        u = rng.choice(vec.units)
        cut = max(0, min(len(vec.data) - 1, u.offset + rng.choice((-1, 0, 1, 2, 3, 4, u.size - 1))))
    return vec.data[:cut], "truncate %d" % cut


def m_splice(rng, vec, corpus):
    other = rng.choice(corpus.vectors if len(vec.data) >= SMALL_VECTOR_BYTES else corpus.small)
    if rng.random() < 0.5:
        i = rng.choice(vec.units).offset
        j = rng.choice(other.units).offset
    else:
        i = rng.randrange(len(vec.data) + 1)
        j = rng.randrange(len(other.data))
    return vec.data[:i] + other.data[j:], "splice %s[:%d] + %s[%d:]" % (vec.name, i, other.name, j)


def m_units(rng, vec, corpus):
    units = [vec.unit_bytes(u) for u in vec.units]
    kind = rng.choice(("drop", "repeat", "swap", "reverse"))
    i = rng.randrange(len(units))
    if kind == "drop":
        del units[i]
    elif kind == "repeat":
        units.insert(i, units[i])
    elif kind == "swap":
        j = rng.randrange(len(units))
        units[i], units[j] = units[j], units[i]
    else:
        units.reverse()
    return b"".join(units), "units %s %d" % (kind, i)


def m_unit_size(rng, vec, corpus):
    u = rng.choice(vec.units)
    data = bytearray(vec.data)
    value = rng.choice(EXTREME_U32 + (u.size - 1, u.size + 1, u.size + 4, len(data) - u.offset,
                                      len(data) - u.offset + 1, rng.randrange(1 << 16)))
    head = data[:u.offset]
    rest = data[u.offset + (4 if data[u.offset] & 0x80 else 2):]
    if value < 0x8000 and rng.random() < 0.7:
        size_field = bytes(((value >> 8) & 0x7F, value & 0xFF))
    else:
        size_field = bytes((0x80 | ((value >> 24) & 0x7F), (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF))
    return bytes(head) + size_field + bytes(rest), "nnr_unit_size of the unit at %d = %d" % (u.offset, value)


def _refit_entry_points(rng, ndu, profile):
    """Entry-point lists of the length the (edited) header needs, from the old values or random ones."""
    dims = ndu.get("tensor_dimensions")
    scan = ndu.get("scan_order", 0)
    if dims is None or len(dims) < 2 or not scan:
        for name in ("cabac_offset_list", "dq_state_list", "BitOffsetList"):
            ndu.pop(name, None)
        return
    rows = uw._num_block_rows_minus1(ndu, dims, scan)
    if rows > 4096:
        raise ValueError("too many block rows to write")
    old = ndu.get("BitOffsetList") or [rng.randrange(1, 4096)]
    ndu["BitOffsetList"] = [old[j] if j < len(old) else rng.choice(old) for j in range(rows)]
    old = ndu.get("cabac_offset_list") or [rng.randrange(256)]
    ndu["cabac_offset_list"] = [old[j] if j < len(old) else rng.randrange(256) for j in range(rows)]
    if ndu.get("dq_flag"):
        old = ndu.get("dq_state_list") or [0]
        ndu["dq_state_list"] = [old[j] if j < len(old) else rng.randrange(8) for j in range(rows)]
    else:
        ndu.pop("dq_state_list", None)


def _edit_ndu_fields(rng, ndu, profile, mps):
    """Change one header field of a parsed NDU (a dict) to an extreme value; returns its description."""
    pt = ndu["nnr_compressed_data_unit_payload_type"]
    dims = list(ndu.get("tensor_dimensions") or [1])
    choice = rng.choice(("dims", "dims", "scan", "entry", "entry", "entry", "unary", "dq", "codebook",
                         "payload_type", "decomposition", "name", "no_input", "tca", "shift"))
    if choice == "dims":
        new = rng.choice(([1 << 31], [1, 1 << 20], [dims[0] * 1000] + dims[1:], [1] * 16, dims + [1], dims[:1],
                          list(reversed(dims)), [dims[0], dims[-1] * 64], [rng.randrange(1, 1 << rng.randrange(1, 24))
                                                                            for _ in range(rng.randrange(1, 5))],
                          [(1 << 32) + 5, 3], [65536, 65536]))
        ndu["tensor_dimensions"] = new
        ndu["tensor_dimensions_flag"] = 1
        ndu["input_parameters_present_flag"] = 1
        return "tensor_dimensions %r" % (new,)
    if choice == "scan":
        ndu["scan_order"] = rng.randrange(5)
        return "scan_order %d" % ndu["scan_order"]
    if choice == "entry":
        if not ndu.get("BitOffsetList"):
            ndu["scan_order"] = rng.randrange(1, 5)
            return "scan_order %d (entry points made up)" % ndu["scan_order"]
        lists = ndu["BitOffsetList"]
        j = rng.randrange(len(lists))
        kind = rng.choice(("rewind", "forward", "zero", "huge", "negative", "offset", "state", "all"))
        if kind == "rewind":
            lists[j] -= rng.choice((1, 7, 8, 9, 64, lists[j]))
        elif kind == "forward":
            lists[j] += rng.choice((1, 8, 1000))
        elif kind == "zero":
            lists[j] = 0
        elif kind == "huge":
            lists[j] = rng.choice((1 << 20, 1 << 33, 1 << 40))
        elif kind == "negative":
            lists[j] = -rng.choice((1, 9, 1 << 20))
        elif kind == "offset":
            ndu["cabac_offset_list"][j] = rng.randrange(256)
        elif kind == "state" and ndu.get("dq_state_list"):
            ndu["dq_state_list"][j] = rng.randrange(8)
        elif kind == "all":
            ndu["BitOffsetList"] = [rng.randrange(0, 2 * max(1, max(lists))) for _ in lists]
        return "entry points: %s at %d" % (kind, j)
    if choice == "unary":
        ndu["cabac_unary_length_minus1"] = rng.choice((0, 1, 255, rng.randrange(256)))
        ndu["cabac_unary_length_flag"] = 1
        ndu["input_parameters_present_flag"] = 1
        return "cabac_unary_length_minus1 %d" % ndu["cabac_unary_length_minus1"]
    if choice == "dq" and pt != NNR_PT_RAW_FLOAT:
        ndu["dq_flag"] = 1 - ndu.get("dq_flag", 0)
        return "dq_flag %d" % ndu["dq_flag"]
    if choice == "codebook" and pt in (NNR_PT_FLOAT, NNR_PT_BLOCK):
        size = rng.choice((1, 2, 3, 255, 4096, 40000))
        start = rng.choice((0, -size // 2, -size + 1, -64))
        ndu["Codebook"] = list(range(start, start + size))
        ndu["CbZeroOffset"] = rng.choice((0, size // 2, size - 1))
        ndu["codebook_egk"] = rng.choice((0, 3, 15))
        ndu.pop("codebook_present_flag", None)
        return "codebook of %d entries from %d, zero at %d" % (size, start, ndu["CbZeroOffset"])
    if choice == "payload_type":
        new = rng.choice((NNR_PT_INT, NNR_PT_FLOAT, NNR_PT_RAW_FLOAT))
        ndu["nnr_compressed_data_unit_payload_type"] = new
        if new != NNR_PT_FLOAT:
            for name in ("Codebook", "CbZeroOffset", "codebook_egk", "codebook_present_flag"):
                ndu.pop(name, None)
        if new == NNR_PT_RAW_FLOAT:
            ndu["dq_flag"] = 0
        return "payload type %d" % new
    if choice == "decomposition":
        ndu["compressed_parameter_types"] = NNR_CPT_DC | rng.choice((0, NNR_CPT_LS, NNR_CPT_BI))
        ndu["decomposition_rank"] = rng.choice((1, 2, 64, 1 << 20))
        ndu["g_number_of_rows"] = rng.choice((1, dims[0], 1 << 20))
        ndu["input_parameters_present_flag"] = 1
        return "decomposition rank %d rows %d" % (ndu["decomposition_rank"], ndu["g_number_of_rows"])
    if choice == "name" and ndu.get("topology_elem_id") is not None:
        ndu["topology_elem_id"] = rng.choice(("", "x" * 5000, "\u00e9" * 100, ndu["topology_elem_id"] + ".w"))
        return "topology_elem_id of %d characters" % len(ndu["topology_elem_id"])
    if choice == "no_input":
        for name in ("tensor_dimensions_flag", "cabac_unary_length_flag", "cabac_unary_length_minus1",
                     "compressed_parameter_types", "topology_tensor_dimension_mapping"):
            ndu.pop(name, None)
        ndu["input_parameters_present_flag"] = 0
        return "input_parameters_present_flag 0"
    if choice == "tca" and profile == 1 and mps is not None and mps.get("mps_parent_signalling_enabled_flag"):
        ndu["parent_node_id_present_flag"] = 1
        ndu.setdefault("parent_node_id_type", 0)
        ndu["temporal_context_modeling_flag"] = 1 - ndu.get("temporal_context_modeling_flag", 0)
        return "temporal_context_modeling_flag %d" % ndu["temporal_context_modeling_flag"]
    if choice == "shift" and profile == 1:
        ndu["first_tensor_dimension_shift"] = rng.choice((1, 5))
        return "first_tensor_dimension_shift %d" % ndu["first_tensor_dimension_shift"]
    ndu["scan_order"] = rng.randrange(5)
    return "scan_order %d" % ndu["scan_order"]


def m_ndu_header(rng, vec, corpus):
    ndus = vec.ndus()
    if not ndus:
        return None
    u = rng.choice(ndus)
    ndu = copy.deepcopy(dict(u.syntax.ndu.__dict__))
    for name in ("count_topology_elements_minus2", "NumBlockRowsMinus1", "TensorDimensions", "TensorDimensionsG",
                 "TensorDimensionsH", "partial_data_counter"):
        ndu.pop(name, None)
    what = _edit_ndu_fields(rng, ndu, u.profile, u.mps)
    if rng.random() < 0.3:
        what += "; " + _edit_ndu_fields(rng, ndu, u.profile, u.mps)
    try:
        _refit_entry_points(rng, ndu, u.profile)
        header = uw.compressed_data_unit_header(ndu, u.profile, u.mps)
    except (ValueError, OverflowError):
        return None  # not expressible in the syntax: bit flips cover the rest
    payload = vec.data[u.syntax.payload_start:u.end]
    counter = u.syntax.partial_data_counter if u.syntax.partial_data_counter_present_flag else None
    unit = uw.nnr_unit(NNR_NDU, header, payload, counter, u.syntax.independently_decodable_flag)
    return vec.data[:u.offset] + unit + vec.data[u.end:], "NDU at %d: %s" % (u.offset, what)


def m_mps(rng, vec, corpus):
    mpss = [u for u in vec.units if u.type == NNR_MPS]
    if not mpss:
        return None
    u = rng.choice(mpss)
    mps = copy.deepcopy(dict(u.syntax.mps.__dict__))
    choice = rng.choice(("qp", "qp", "density", "method", "indexed", "parent", "base_model_id"))
    if choice == "qp":
        mps["mps_quantization_parameter"] = rng.choice((-4096, 4095, 0, -1, 2000, -2000))
        mps.setdefault("mps_qp_density", 2)
    elif choice == "density":
        mps["mps_qp_density"] = rng.randrange(8)
    elif choice == "method":
        mps["mps_quantization_method_flags"] = rng.randrange(8)
        if mps["mps_quantization_method_flags"] & 3:
            mps.setdefault("mps_qp_density", 2)
            mps.setdefault("mps_quantization_parameter", -32)
        else:
            mps.pop("mps_qp_density", None)
            mps.pop("mps_quantization_parameter", None)
    elif choice == "indexed":
        mps["mps_topology_indexed_reference_flag"] = 1 - mps.get("mps_topology_indexed_reference_flag", 0)
    elif choice == "parent" and u.profile == 1:
        mps["mps_parent_signalling_enabled_flag"] = 1 - mps.get("mps_parent_signalling_enabled_flag", 0)
        mps.pop("nnr_pre_flag", None)
    elif choice == "base_model_id" and u.profile == 1:
        mps["base_model_id"] = rng.choice(("", "m" * 60000, "nnc-edge-update/1;seq=1"))
        mps.pop("base_model_id_present_flag", None)
    else:
        mps["mps_quantization_parameter"] = rng.choice((-4096, 4095))
    try:
        unit = uw.model_parameter_set_unit(mps, u.profile)
    except (ValueError, OverflowError):
        return None
    return vec.data[:u.offset] + unit + vec.data[u.end:], "MPS at %d: %s" % (u.offset, choice)


def m_start(rng, vec, corpus):
    u = vec.units[0]
    if u.type != NNR_STR:
        return None
    profile = rng.choice((0, 1, 2, 255))
    return uw.start_unit(profile) + vec.data[u.end:], "general_profile_idc %d" % profile


def m_partial(rng, vec, corpus):
    ndus = vec.ndus()
    if not ndus:
        return None
    u = rng.choice(ndus)
    s = u.syntax
    if s.partial_data_counter_present_flag:
        return None
    header = vec.data[s.offset + (4 if vec.data[s.offset] & 0x80 else 2) + 1:s.payload_start]
    payload = vec.data[s.payload_start:u.end]
    try:
        parts = uw.split_units(NNR_NDU, header, payload, max(1, len(payload) // rng.choice((2, 3, 7, 50))))
    except ValueError:
        return None
    kind = rng.choice(("drop", "repeat", "swap", "counter", "interrupt", "nothing"))
    i = rng.randrange(len(parts))
    if kind == "drop" and len(parts) > 1:
        del parts[i]
    elif kind == "repeat":
        parts.insert(i, parts[i])
    elif kind == "swap" and len(parts) > 1:
        j = rng.randrange(len(parts))
        parts[i], parts[j] = parts[j], parts[i]
    elif kind == "counter":
        part = bytearray(parts[i])
        part[(4 if part[0] & 0x80 else 2) + 1] = rng.choice((0, 1, 2, 255, rng.randrange(256)))
        parts[i] = bytes(part)
    elif kind == "interrupt":
        parts.insert(i, vec.unit_bytes(rng.choice(vec.units[:3])))
    return vec.data[:u.offset] + b"".join(parts) + vec.data[u.end:], "NDU at %d in %d partial units, %s %d" % (
        u.offset, len(parts), kind, i)


def m_aggregate(rng, vec, corpus):
    units = [vec.unit_bytes(u) for u in vec.units]
    if len(units) < 3:
        return None
    i = rng.randrange(1, len(units) - 1)
    j = rng.randrange(i + 1, len(units) + 1)
    inner = units[i:j]
    if len(inner) < 2:
        inner = inner + [uw.nnr_unit(40, b"", b"\x00")]
    depth = rng.choice((1, 1, 2, 4, 5, 8))
    mps = vec.units[1].syntax.get("mps") if len(vec.units) > 1 else None
    try:
        agg = uw.aggregate_unit(inner, mps=mps, entry_points_present_flag=rng.randrange(2))
        for _ in range(depth - 1):
            agg = uw.aggregate_unit([agg, uw.nnr_unit(40, b"", b"")], mps=mps)
    except ValueError:
        return None
    what = "units %d..%d in %d nested aggregate units" % (i, j - 1, depth)
    if rng.random() < 0.3:
        # num_of_nnr_units_minus2 (u(16) after the unit header byte, nnr_aggregate_unit_type and the flags)
        count = rng.choice((0, 1, 0xFFFF, len(inner) - 1, len(inner)))
        at = (4 if agg[0] & 0x80 else 2) + 3
        agg = agg[:at] + bytes((count >> 8, count & 0xFF)) + agg[at + 2:]
        what += ", num_of_nnr_units_minus2 %d" % count
    return b"".join(units[:i]) + agg + b"".join(units[j:]), what


MUTATORS = (
    (m_flip, 6), (m_bytes, 3), (m_truncate, 3), (m_splice, 2), (m_units, 1), (m_unit_size, 2), (m_ndu_header, 6),
    (m_mps, 2), (m_start, 1), (m_partial, 2), (m_aggregate, 1),
)
_WEIGHTED = [m for m, w in MUTATORS for _ in range(w)]


# --- inputs -------------------------------------------------------------------------------------------
class Input:
    """One fuzz input: the mutated bytes, where they came from, and how they are decoded."""

    def __init__(self, index, vector, data, mutation, target, backend, chunk_seed, slice_elements):
        self.index = index
        self.vector = vector
        self.data = data
        self.mutation = mutation
        self.target = target
        self.backend = backend
        self.chunk_seed = chunk_seed
        self.slice_elements = slice_elements if target.endswith("slices") else None

    def describe(self):
        via = self.target if self.slice_elements is None else "%s of %d" % (self.target, self.slice_elements)
        return "#%d %s [%s] via %s on %s (%d bytes)" % (self.index, self.vector.name, self.mutation, via,
                                                       self.backend, len(self.data))


TARGETS = ("core", "core", "stream", "slices", "numpy", "numpy-threads", "numpy-stream", "numpy-slices")


def make_input(corpus, seed, index, python_share=PYTHON_SHARE):
    """Input ``index`` of the run with ``seed`` (deterministic)."""
    rng = random.Random(seed * 1000003 + index)
    backend = "python" if rng.random() < python_share and "python" in core_backend.available() else "cython"
    if "cython" not in core_backend.available():
        backend = "python"
    vec = rng.choice(corpus.small if backend == "python" else corpus.vectors)
    out = None
    while out is None:
        out = rng.choice(_WEIGHTED)(rng, vec, corpus)
    data, mutation = out
    return Input(index, vec, data, mutation, rng.choice(TARGETS), backend, rng.randrange(1 << 30),
                 rng.choice(SLICE_ELEMENTS))


# --- targets ------------------------------------------------------------------------------------------
class Primed:
    """Decoders that have decoded the clean predecessors of chain vectors, copied for each input."""

    def __init__(self):
        self._cache = {}

    def core(self, vec, limits):
        key = (vec.name, repr(limits), core_backend.name())
        primed = self._cache.get(key)
        if primed is None:
            primed = decoder_core.Decoder(limits=limits)
            for clean in vec.prelude:
                primed.decode(clean)
            self._cache[key] = primed
        return copy.deepcopy(primed)


def _chunks(data, seed):
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 2, 3, 7, 64, 500, 4096, 1 << 16))
        yield data[pos:pos + n]
        pos += n


def run_target(inp, limits, primed):
    """Decode the input as its target says; returns the number of tensors (NNCError propagates)."""
    vec = inp.vector
    if inp.target == "core":
        return len(primed.core(vec, limits).decode(inp.data))
    if inp.target in ("stream", "slices"):
        dec = CoreStreamDecoder(decoder=primed.core(vec, limits), slice_elements=inp.slice_elements)
        n = 0
        for chunk in _chunks(inp.data, inp.chunk_seed):
            n += len(dec.feed(chunk))
        dec.close()
        return n
    threads = 2 if inp.target == "numpy-threads" else 1
    if inp.target in ("numpy-stream", "numpy-slices"):
        dec = nnc_edge.StreamDecoder(threads=threads, limits=limits, slice_elements=inp.slice_elements)
        for clean in vec.prelude:
            dec.feed(clean)
            dec.close()
        # Slices through the generator: each is dropped before the next decodes, as a sink would.
        feed = dec.feed if inp.slice_elements is None else dec.iter_feed
        n = 0
        for chunk in _chunks(inp.data, inp.chunk_seed):
            for _ in feed(chunk):
                n += 1
        dec.close()
        return n
    dec = nnc_edge.Decoder(threads=threads, limits=limits)
    for clean in vec.prelude:
        dec.decode(clean)
    return len(dec.decode(inp.data))


# --- the run ------------------------------------------------------------------------------------------
class ResidentPeak:
    """The process's peak resident set (VmHWM), reset before each input; unavailable off Linux."""

    def __init__(self):
        self.available = False
        try:
            self.reset()
            self.available = self.read() is not None
        except OSError:
            pass

    def reset(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set size

    def read(self):
        """(peak, current) resident bytes."""
        peak = current = None
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) << 10
                elif line.startswith("VmRSS:"):
                    current = int(line.split()[1]) << 10
        return None if peak is None or current is None else (peak, current)


class Report:
    def __init__(self):
        self.inputs = 0
        self.decoded = 0
        self.refused = 0
        self.crashes = []     # (input description, traceback text)
        self.slow = []        # (input description, cpu seconds, wall seconds)
        self.memory = []      # (input description, "tracemalloc" or "resident", bytes)
        self.max_cpu = 0.0
        self.max_cpu_input = None
        self.max_peak = 0
        self.max_rss = 0
        self.rss_measured = False
        self.by_backend = {}
        self.by_target = {}
        self.by_refusal = {}  # the element (or the limit) each NNCError named
        self.seconds = 0.0

    @property
    def offenders(self):
        return self.crashes or self.slow or self.memory

    def summary(self):
        lines = ["%d inputs in %.1f s: %d decoded, %d refused with NNCError, %d crashes, %d over %.1f s, %d over "
                 "%d MiB" % (self.inputs, self.seconds, self.decoded, self.refused, len(self.crashes), len(self.slow),
                             TIME_LIMIT, len(self.memory), MEMORY_LIMIT >> 20),
                 "backends %s; targets %s" % (_counts(self.by_backend), _counts(self.by_target)),
                 "%d kinds of refusal, the most frequent: %s" % (
                     len(self.by_refusal), ", ".join("%s %d" % kv for kv in sorted(
                         self.by_refusal.items(), key=lambda kv: -kv[1])[:12])),
                 "slowest input %.3f s CPU (%s); largest tracemalloc peak %.1f MiB; largest growth of the peak "
                 "resident set %s" % (self.max_cpu, self.max_cpu_input, self.max_peak / float(1 << 20),
                                      "%.1f MiB" % (self.max_rss / float(1 << 20)) if self.rss_measured
                                      else "not measured (no /proc/self/clear_refs)")]
        for what, tb in self.crashes[:20]:
            lines.append("CRASH %s\n%s" % (what, tb))
        for what, cpu, wall in self.slow[:20]:
            lines.append("SLOW %s: %.2f s CPU, %.2f s wall" % (what, cpu, wall))
        for what, how, peak in self.memory[:20]:
            lines.append("MEMORY %s: %s %.1f MiB" % (what, how, peak / float(1 << 20)))
        return "\n".join(lines)


def _counts(d):
    return ", ".join("%s %d" % kv for kv in sorted(d.items()))


def fuzz(corpus, count=None, seed=0, seconds=None, python_share=PYTHON_SHARE, trace_memory=True, progress=None,
         save_dir=None, start=0):
    """Run inputs start, start+1, ... until ``count`` inputs or ``seconds`` have passed; returns a Report.

    ``progress(report)`` is called every 1000 inputs; crashing and offending inputs are written to
    ``save_dir`` (when given) as NAME-INDEX.nnc.
    """
    report = Report()
    primed = Primed()
    resident = ResidentPeak()
    report.rss_measured = resident.available
    previous = core_backend.name()
    compiled = getattr(core_backend, "_compiled", None)
    min_count = getattr(compiled, "PARALLEL_MIN_COUNT", None)
    if min_count is not None:
        compiled.PARALLEL_MIN_COUNT = 256  # let small tensors exercise parallel block-row decoding
    began = time.monotonic()
    try:
        index = start
        while (count is None or report.inputs < count) and (seconds is None or time.monotonic() - began < seconds):
            inp = make_input(corpus, seed, index, python_share)
            index += 1
            _run_one(inp, report, primed, trace_memory and inp.backend == "cython", resident, save_dir)
            if progress is not None and report.inputs % 1000 == 0:
                report.seconds = time.monotonic() - began
                progress(report)
    finally:
        tracemalloc.stop()
        if min_count is not None:
            compiled.PARALLEL_MIN_COUNT = min_count
        core_backend.use(previous)
    report.seconds = time.monotonic() - began
    return report


def _run_one(inp, report, primed, trace_memory, resident, save_dir):
    core_backend.use(inp.backend)
    limits = PYTHON_LIMITS if inp.backend == "python" else FUZZ_LIMITS
    report.inputs += 1
    report.by_backend[inp.backend] = report.by_backend.get(inp.backend, 0) + 1
    report.by_target[inp.target] = report.by_target.get(inp.target, 0) + 1
    if trace_memory:
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
    elif tracemalloc.is_tracing():
        tracemalloc.stop()
    if resident.available:
        resident.reset()
        rss_before = resident.read()[1]
    cpu = time.process_time()
    wall = time.perf_counter()
    bad = None
    try:
        run_target(inp, limits, primed)
        report.decoded += 1
    except NNCError as exc:
        str(exc)  # the message must format
        report.refused += 1
        kind = getattr(exc, "limit", None) or exc.element or "?"
        report.by_refusal[kind] = report.by_refusal.get(kind, 0) + 1
    except Exception:
        bad = traceback.format_exc()
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    peak = tracemalloc.get_traced_memory()[1] - base if trace_memory else 0
    rss = resident.read()[0] - rss_before if resident.available else 0
    report.max_rss = max(report.max_rss, rss)
    if cpu > report.max_cpu:
        report.max_cpu = cpu
        report.max_cpu_input = inp.describe()
    report.max_peak = max(report.max_peak, peak)
    offending = False
    if bad is not None:
        report.crashes.append((inp.describe(), bad))
        offending = True
    if cpu > TIME_LIMIT:
        report.slow.append((inp.describe(), cpu, wall))
        offending = True
    for how, used in (("tracemalloc peak", peak), ("peak resident set growth", rss)):
        if used > MEMORY_LIMIT:
            report.memory.append((inp.describe(), how, used))
            offending = True
    if offending and save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        with open(os.path.join(save_dir, "%s-%d.nnc" % (inp.vector.name, inp.index)), "wb") as f:
            f.write(inp.data)
