"""Quantized matmul (OstQuant): W4A16, W8A8 (INT8 / FP8), online Hadamard + quantization.

Hopper has no INT4 tensor cores: 4-bit weights are dequantized in registers and
the math runs on FP16/BF16 tensor cores (W4A16); W8A8 runs on INT8 / FP8 tensor
cores with per-token x per-channel scales in the epilogue. See docs/quant.md.
"""

__all__: list[str] = []

# W8A8, per-token quantization, online Hadamard, rotation fusion.
from .w8a8 import quantize_per_token, quantize_weight_per_channel, w8a8_matmul  # noqa: E402
from .hadamard import (  # noqa: E402
    hadamard_matrix,
    hadamard_quantize,
    hadamard_transform,
    supported_hadamard_sizes,
)
from .rotation import fuse_rotation, random_hadamard_matrix, rotate_input  # noqa: E402

__all__ += [
    "quantize_per_token",
    "quantize_weight_per_channel",
    "w8a8_matmul",
    "hadamard_matrix",
    "hadamard_quantize",
    "hadamard_transform",
    "supported_hadamard_sizes",
    "fuse_rotation",
    "random_hadamard_matrix",
    "rotate_input",
]
