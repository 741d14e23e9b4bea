"""Tensor parallelism (T3): fused GEMM + reduce-scatter, where each output tile is
pushed to the rank that owns its rows as soon as it is computed.

Kernel: csrc/tp/gemm_rs.cu. Reference: inferops.reference.tp. Docs: docs/tp.md.
"""

from . import perf_model
from .gemm_rs import (
    GemmReduceScatter,
    buffer_bytes,
    gemm_reduce_scatter,
    symm_mem_status,
    virtual_gemm_reduce_scatter,
)
from .linear import RowParallelLinear

__all__ = [
    "GemmReduceScatter",
    "RowParallelLinear",
    "buffer_bytes",
    "gemm_reduce_scatter",
    "perf_model",
    "symm_mem_status",
    "virtual_gemm_reduce_scatter",
]
