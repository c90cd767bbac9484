"""Constants of the standard: unit and payload type identifiers and the DeepCABAC tables."""

# Table 3: nnr_unit_type
NNR_STR = 0
NNR_MPS = 1
NNR_LPS = 2
NNR_TPL = 3
NNR_QNT = 4
NNR_NDU = 5
NNR_AGG = 6
UNIT_TYPE_NAMES = ("NNR_STR", "NNR_MPS", "NNR_LPS", "NNR_TPL", "NNR_QNT", "NNR_NDU", "NNR_AGG")


def unit_type_name(nnr_unit_type):
    if nnr_unit_type < len(UNIT_TYPE_NAMES):
        return UNIT_TYPE_NAMES[nnr_unit_type]
    return "NNR_RSVD" if nnr_unit_type < 32 else "NNR_UNSP"


# Table 14: nnr_compressed_data_unit_payload_type
NNR_PT_INT = 0
NNR_PT_FLOAT = 1
NNR_PT_RAW_FLOAT = 2
NNR_PT_BLOCK = 3
PAYLOAD_TYPE_NAMES = ("NNR_PT_INT", "NNR_PT_FLOAT", "NNR_PT_RAW_FLOAT", "NNR_PT_BLOCK")

# Table 8: compressed_parameter_types bits
NNR_CPT_DC = 0x01
NNR_CPT_LS = 0x02
NNR_CPT_BN = 0x04
NNR_CPT_BI = 0x08

# Table 10: quantization method flags
NNR_QSU = 0x01
NNR_QCB = 0x02

# Table 4: topology_storage_format
NNR_TPL_UNREC = 0
NNR_TPL_PRUN = 5
NNR_TPL_REFLIST = 6
# Table 12: nnr_rep_type
NNR_TPL_BMSK = 0
NNR_TPL_DICT = 1
# Tables 5 and 7: compression formats
NNR_PT_RAW = 0
NNR_DFL = 1
# Table 9: nnr_aggregate_unit_type
NNR_AGG_GEN = 0
NNR_AGG_SLF = 1

# Table 13 (and the values NNCodec lists beyond it): nnr_decompressed_data_format
TENSOR_INT = 0
TENSOR_FLOAT = 1

# 10.3.2.2: CtxParameterList[setId] = shift0, shift1, pStateIdx0, pStateIdx1
CtxParameterList = (
    (1, 4, 0, 0), (1, 4, -41, -654), (1, 4, 95, 1519), (0, 5, 0, 0), (2, 6, 30, 482),
    (2, 6, 95, 1519), (2, 6, -21, -337), (3, 5, 0, 0), (3, 5, 30, 482),
)

# 10.2.1.4
StateTransTab = ((0, 2), (7, 5), (1, 3), (6, 4), (2, 0), (5, 7), (3, 1), (4, 6))

# Supplement B.1: estimator step sizes, indexed 16 + (state >> 3) or 16 + (state >> 7).
CurveTab = (
    2512, 2288, 2064, 1840, 1616, 1392, 1168, 944, 720, 560, 464, 368, 272, 208, 144, 80,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 0,
)

# Supplement appendix A: rangeTabLps flattened as [(IvlCurrRange & 0xE0) + pIdx], a row of 32 (pIdx 0..31)
# in two lines per IvlCurrRange >> 5 = 8..15. A bytes constant: a quarter of a tuple's memory on
# MicroPython, where a module's constants stay in memory while any of its functions does.
RangeTabLps = (
    b"\x80\x70\x61\x54\x4a\x41\x39\x32\x2d\x27\x22\x1e\x1b\x17\x14\x12"
    b"\x0f\x0e\x0c\x0b\x0a\x09\x07\x07\x05\x05\x04\x04\x03\x03\x02\x02"
    b"\x8e\x7d\x6c\x5d\x52\x48\x3f\x38\x32\x2b\x26\x21\x1e\x1a\x16\x14"
    b"\x11\x10\x0d\x0c\x0b\x0a\x08\x08\x06\x06\x05\x05\x03\x03\x02\x02"
    b"\x9c\x89\x77\x67\x5a\x4f\x46\x3d\x37\x30\x2a\x25\x21\x1c\x18\x16"
    b"\x13\x11\x0f\x0d\x0c\x0b\x09\x09\x06\x06\x05\x05\x04\x04\x02\x02"
    b"\xab\x96\x82\x70\x63\x57\x4c\x43\x3c\x34\x2e\x28\x24\x1f\x1b\x18"
    b"\x15\x13\x10\x0f\x0d\x0c\x0a\x0a\x07\x07\x06\x06\x04\x04\x03\x03"
    b"\xb9\xa2\x8d\x79\x6b\x5e\x52\x49\x41\x38\x32\x2b\x27\x22\x1d\x1a"
    b"\x16\x15\x11\x10\x0e\x0d\x0b\x0b\x08\x08\x06\x06\x04\x04\x03\x03"
    b"\xc7\xaf\x98\x83\x73\x65\x59\x4e\x46\x3d\x36\x2f\x2a\x24\x1f\x1c"
    b"\x18\x16\x13\x11\x0f\x0e\x0c\x0c\x08\x08\x07\x07\x05\x05\x03\x03"
    b"\xd5\xbb\xa3\x8c\x7b\x6c\x5f\x54\x4b\x41\x3a\x32\x2d\x27\x21\x1e"
    b"\x1a\x18\x14\x12\x10\x0f\x0d\x0d\x09\x09\x07\x07\x05\x05\x03\x03"
    b"\xe4\xc8\xae\x96\x84\x74\x66\x5a\x50\x46\x3e\x36\x30\x2a\x24\x20"
    b"\x1c\x1a\x16\x14\x12\x10\x0e\x0e\x0a\x0a\x08\x08\x06\x06\x04\x04")
