"""Linear attention (SLAB): simplified linear attention for vision (with drop-in modules
taking SLAB's Swin, DeiT, PVT and CSWin signatures), causal
chunkwise linear attention for LLMs, and its recurrent decode step.

Kernels: csrc/linear_attention/. References: inferops.reference.linear_attention.
"""

from .causal import causal_linear_attention, linear_attention_step
from .sla import simplified_linear_attention
from .slab import SimplifiedLinearAttention, SLABCSwinAttention, SLABDeiTAttention, SLABPVTAttention

__all__ = [
    "simplified_linear_attention",
    "SimplifiedLinearAttention",
    "SLABDeiTAttention",
    "SLABPVTAttention",
    "SLABCSwinAttention",
    "causal_linear_attention",
    "linear_attention_step",
]
