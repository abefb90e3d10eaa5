"""Numbering and sizes from the GGUF specification (ggml docs/gguf.md)."""

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32


class VType:
    """Metadata value types."""
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


VTYPE_NAMES = {v: k for k, v in vars(VType).items() if not k.startswith("_")}

# struct format character and numpy dtype of each fixed-size scalar type.
SCALAR_FORMATS = {
    VType.UINT8: ("B", "<u1"),
    VType.INT8: ("b", "<i1"),
    VType.UINT16: ("H", "<u2"),
    VType.INT16: ("h", "<i2"),
    VType.UINT32: ("I", "<u4"),
    VType.INT32: ("i", "<i4"),
    VType.FLOAT32: ("f", "<f4"),
    VType.BOOL: ("?", "<u1"),
    VType.UINT64: ("Q", "<u8"),
    VType.INT64: ("q", "<i8"),
    VType.FLOAT64: ("d", "<f8"),
}


class GGMLType:
    """Tensor types (only the ones with a block layout known here are listed
    in TYPE_INFO; the reader still accepts the others)."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30


GGML_TYPE_NAMES = {v: k for k, v in vars(GGMLType).items() if not k.startswith("_")}

QK_K = 256

# type -> (elements per block, bytes per block)
TYPE_INFO = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 2 + 2 + 32),
    GGMLType.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    GGMLType.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    GGMLType.Q8_K: (QK_K, 4 + QK_K + QK_K // 16 * 2),
}


def type_from_name(name):
    """'Q4_K' / 'q4_k' / 'BF16' -> the numeric ggml type."""
    key = name.upper()
    for num, nm in GGML_TYPE_NAMES.items():
        if nm == key:
            return num
    raise ValueError("unknown ggml type name %r" % (name,))


def type_name(t):
    return GGML_TYPE_NAMES.get(t, "type%d" % t)


def block_size(t):
    return TYPE_INFO[t][0]


def type_size(t):
    return TYPE_INFO[t][1]


def tensor_nbytes(t, n_elements):
    """Bytes of @n_elements of type @t (must be a whole number of blocks)."""
    if t not in TYPE_INFO:
        raise ValueError("no block layout known for %s" % type_name(t))
    bs, ts = TYPE_INFO[t]
    if n_elements % bs:
        raise ValueError("%d elements is not a multiple of the %s block size %d"
                         % (n_elements, type_name(t), bs))
    return n_elements // bs * ts
