"""Linear attention (SLAB): simplified linear attention for vision (with drop-in modules
taking SLAB's Swin, DeiT and PVT signatures), causal
chunkwise linear attention for LLMs, and its recurrent decode step.

Kernels: csrc/linear_attention/. References: inferops.reference.linear_attention.
"""

from .causal import causal_linear_attention, linear_attention_step
from .sla import simplified_linear_attention
from .slab import SimplifiedLinearAttention, SLABDeiTAttention, SLABPVTAttention

__all__ = [
    "simplified_linear_attention",
    "SimplifiedLinearAttention",
    "SLABDeiTAttention",
    "SLABPVTAttention",
    "causal_linear_attention",
    "linear_attention_step",
]
