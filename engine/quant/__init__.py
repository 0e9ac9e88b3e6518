"""Quantized weights served without dequantizing: W4A16 (packed int4 + group scales/biases) and W8A16
(int8 / float8_e4m3fn + scales), converted at load from AWQ, GPTQ, FP8 and GGUF, with CPU and Triton kernels.
"""

from engine.quant.config import DEQUANTIZED, GGUFTensor, QuantConfig, gguf_quantization, quant_config_from_hf
from engine.quant.linear import QuantLinear
from engine.quant.weights import Int4Weight, Int8Weight

__all__ = [
    "DEQUANTIZED",
    "GGUFTensor",
    "Int4Weight",
    "Int8Weight",
    "QuantConfig",
    "QuantLinear",
    "gguf_quantization",
    "quant_config_from_hf",
]
