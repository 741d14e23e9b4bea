"""Quantized matmul (OstQuant): W4A16, W8A8 (INT8 / FP8), online Hadamard + quantization.

Hopper has no INT4 tensor cores: 4-bit weights are dequantized in registers and
the math runs on FP16/BF16 tensor cores (W4A16); W8A8 runs on INT8 / FP8 tensor
cores with per-token x per-channel scales in the epilogue. See docs/quant.md.
"""

__all__: list[str] = []
