"""kvq_gguf: GGUF v3 reading and writing, and numpy block (de)quantization
for the tensor types kvqd computes with."""

from .constants import (DEFAULT_ALIGNMENT, GGML_TYPE_NAMES, GGUF_VERSION,
                        QK_K, TYPE_INFO, VTYPE_NAMES, GGMLType, VType,
                        block_size, tensor_nbytes, type_from_name, type_name,
                        type_size)
from .reader import GGUFError, GGUFReader, GGUFValue, TensorInfo
from .writer import GGUFWriter, encode_value
from .quants import (SUPPORTED_TYPES, bf16_bits_to_f32, dequantize, encode,
                     f32_to_bf16_bits, make_q4_0_block, make_q4_k_block,
                     make_q6_k_block, make_q8_0_block, quantize_q4_0,
                     quantize_q8_0, random_blocks)

__all__ = [
    "DEFAULT_ALIGNMENT", "GGML_TYPE_NAMES", "GGUF_VERSION", "QK_K",
    "TYPE_INFO", "VTYPE_NAMES", "GGMLType", "VType", "block_size",
    "tensor_nbytes", "type_from_name", "type_name", "type_size",
    "GGUFError", "GGUFReader", "GGUFValue", "TensorInfo", "GGUFWriter",
    "encode_value", "SUPPORTED_TYPES", "bf16_bits_to_f32", "dequantize",
    "encode", "f32_to_bf16_bits", "make_q4_0_block", "make_q4_k_block",
    "make_q6_k_block", "make_q8_0_block", "quantize_q4_0", "quantize_q8_0",
    "random_blocks",
]
