"""Quantized matmul (OstQuant): W4A16, W8A8 (INT8 / FP8), online Hadamard + quantization.

Hopper has no INT4 tensor cores: 4-bit weights are dequantized in registers and
the math runs on FP16/BF16 tensor cores (W4A16); W8A8 runs on INT8 / FP8 tensor
cores with per-token x per-channel scales in the epilogue. See docs/quant.md.
"""

from .int4 import Int4Weight, dequantize, pack_int4, pack_int4_quantized, unpack
from .w4a16 import w4a16_matmul

__all__: list[str] = []

__all__ += ["Int4Weight", "dequantize", "pack_int4", "pack_int4_quantized", "unpack", "w4a16_matmul"]
