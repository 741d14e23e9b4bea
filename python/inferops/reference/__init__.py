"""Pure-PyTorch references: the CPU fallback of every op and the oracle of every test.

Written for clarity, computed in float32 by default (``compute_dtype`` lets
tests run them in float64). One module per family, same names as the ops.
"""

from . import attention, linear_attention, moe, quant_w4a16, quant_w8a8, tp

__all__ = ["attention", "linear_attention", "moe", "quant_w4a16", "quant_w8a8", "tp"]
