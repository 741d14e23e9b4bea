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
from .linear import ColumnParallelLinear, RowParallelLinear, padded_tokens, sequence_gather, sequence_shard
from .parallel import SUPPORTED_MODEL_TYPES, head_plan, parallelize

__all__ = [
    "ColumnParallelLinear",
    "GemmReduceScatter",
    "SUPPORTED_MODEL_TYPES",
    "head_plan",
    "padded_tokens",
    "parallelize",
    "sequence_gather",
    "sequence_shard",
    "RowParallelLinear",
    "buffer_bytes",
    "gemm_reduce_scatter",
    "perf_model",
    "symm_mem_status",
    "virtual_gemm_reduce_scatter",
]
