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

# Supplement appendix A: rangeTabLps flattened as [(IvlCurrRange & 0xE0) + pIdx].
RangeTabLps = (
    128, 112, 97, 84, 74, 65, 57, 50, 45, 39, 34, 30, 27, 23, 20, 18, 15, 14, 12, 11, 10, 9, 7, 7, 5, 5, 4, 4, 3, 3, 2, 2,
    142, 125, 108, 93, 82, 72, 63, 56, 50, 43, 38, 33, 30, 26, 22, 20, 17, 16, 13, 12, 11, 10, 8, 8, 6, 6, 5, 5, 3, 3, 2, 2,
    156, 137, 119, 103, 90, 79, 70, 61, 55, 48, 42, 37, 33, 28, 24, 22, 19, 17, 15, 13, 12, 11, 9, 9, 6, 6, 5, 5, 4, 4, 2, 2,
    171, 150, 130, 112, 99, 87, 76, 67, 60, 52, 46, 40, 36, 31, 27, 24, 21, 19, 16, 15, 13, 12, 10, 10, 7, 7, 6, 6, 4, 4, 3, 3,
    185, 162, 141, 121, 107, 94, 82, 73, 65, 56, 50, 43, 39, 34, 29, 26, 22, 21, 17, 16, 14, 13, 11, 11, 8, 8, 6, 6, 4, 4, 3, 3,
    199, 175, 152, 131, 115, 101, 89, 78, 70, 61, 54, 47, 42, 36, 31, 28, 24, 22, 19, 17, 15, 14, 12, 12, 8, 8, 7, 7, 5, 5, 3, 3,
    213, 187, 163, 140, 123, 108, 95, 84, 75, 65, 58, 50, 45, 39, 33, 30, 26, 24, 20, 18, 16, 15, 13, 13, 9, 9, 7, 7, 5, 5, 3, 3,
    228, 200, 174, 150, 132, 116, 102, 90, 80, 70, 62, 54, 48, 42, 36, 32, 28, 26, 22, 20, 18, 16, 14, 14, 10, 10, 8, 8, 6, 6, 4, 4,)
