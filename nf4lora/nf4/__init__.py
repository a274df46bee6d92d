"""NF4/FP4 blockwise quantization: the format, bit-exact with bitsandbytes, and its pure-PyTorch reference."""

from .codebook import BLOCKSIZES, QUANT_TYPES, dynamic_map, fp4_code, get_code, nf4_code
from .tensor import QuantizedTensor, QuantState, dequantize, quantize

__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "QuantState",
    "QuantizedTensor",
    "dequantize",
    "dynamic_map",
    "fp4_code",
    "get_code",
    "nf4_code",
    "quantize",
]
