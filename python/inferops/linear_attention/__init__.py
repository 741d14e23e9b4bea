"""Linear attention (SLAB): simplified linear attention for vision, causal
chunkwise linear attention for LLMs, and its recurrent decode step.

Kernels: csrc/linear_attention/. References: inferops.reference.linear_attention.
"""

from .causal import causal_linear_attention, linear_attention_step
from .sla import SimplifiedLinearAttention, simplified_linear_attention

__all__ = [
    "simplified_linear_attention",
    "SimplifiedLinearAttention",
    "causal_linear_attention",
    "linear_attention_step",
]
