"""Quantized matmul (OstQuant): W4A16, W8A8 (INT8 / FP8), online Hadamard + quantization.

Hopper has no INT4 tensor cores: 4-bit weights are dequantized in registers and
the math runs on FP16/BF16 tensor cores (W4A16); W8A8 runs on INT8 / FP8 tensor
cores with per-token x per-channel scales in the epilogue. See docs/quant.md.
"""

from .hadamard import (
    hadamard_matrix,
    hadamard_quantize,
    hadamard_transform,
    supported_hadamard_sizes,
)
from .rotation import fuse_rotation, random_hadamard_matrix, rotate_input
from .w8a8 import quantize_per_token, quantize_weight_per_channel, w8a8_matmul

__all__: list[str] = []

__all__ += ["fuse_rotation", "hadamard_matrix", "hadamard_quantize", "hadamard_transform", "quantize_per_token",
            "quantize_weight_per_channel", "random_hadamard_matrix", "rotate_input", "supported_hadamard_sizes",
            "w8a8_matmul"]
