"""Quantized matmul (OstQuant): W4A16, W8A8 (INT8 / FP8), online Hadamard + quantization.

Hopper has no INT4 tensor cores: 4-bit weights are dequantized in registers and
the math runs on FP16/BF16 tensor cores (W4A16); W8A8 runs on INT8 / FP8 tensor
cores with per-token x per-channel scales in the epilogue. See docs/quant.md.
"""

from .hadamard import (
    hadamard_factorization,
    hadamard_matrix,
    hadamard_quantize,
    hadamard_transform,
    prepare_hadamard,
    supported_hadamard_sizes,
)
from .checkpoints import int4_from_awq, int4_from_gptq
from .int4 import Int4Weight, dequantize, pack_int4, pack_int4_quantized, unpack
from .hf import register as register_transformers
from .loading import load_pretrained, load_quantized
from .linear import CONFIG_FIELDS, FORMATS, QuantLinear, decode_config, quantize_model_
from .rotation import fuse_rotation, random_hadamard_matrix, rotate_input
from .w4a16 import w4a16_matmul
from .w8a8 import quantize_per_token, quantize_weight_per_channel, w8a8_matmul
from .w8a8_linear import w8a8_linear

__all__ = [
    # int4 weights and W4A16
    "Int4Weight", "pack_int4", "pack_int4_quantized", "unpack", "dequantize", "w4a16_matmul",
    # W8A8
    "quantize_per_token", "quantize_weight_per_channel", "w8a8_matmul", "w8a8_linear",
    # Hadamard and rotations
    "hadamard_quantize", "hadamard_transform", "hadamard_matrix", "hadamard_factorization", "prepare_hadamard",
    "supported_hadamard_sizes", "fuse_rotation", "rotate_input", "random_hadamard_matrix",
    # checkpoints
    "int4_from_gptq", "int4_from_awq", "load_quantized", "load_pretrained", "register_transformers",
    # modules
    "CONFIG_FIELDS", "FORMATS", "QuantLinear", "decode_config", "quantize_model_",
]

import sys as _sys

if "transformers" in _sys.modules:  # else on first use, or register_transformers() (see .hf)
    register_transformers()
