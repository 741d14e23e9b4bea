"""References for the tensor-parallel family: GEMM + reduce-scatter.

``gemm_reduce_scatter_stacked`` is the whole protocol on one process: ``W``
ranks' operands stacked on a leading dim, each rank's output the sum over
ranks of its row block of ``a_r @ b_r``. It is the CPU fallback of the
virtual-rank op and the oracle of the GPU tests (in float64).
``gemm_reduce_scatter_fallback`` is the distributed fallback path: matmul then
``reduce_scatter_tensor`` on a real process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gemm_reduce_scatter_fallback", "gemm_reduce_scatter_stacked"]


def gemm_reduce_scatter_stacked(a: torch.Tensor, b: torch.Tensor, *, round_partials: bool = True,
                                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a``: ``[W, M, K]``, ``b``: ``[W, K, N]`` -> ``[W, M / W, N]`` in a's dtype, with
    ``out[r] = sum_s (a[s] @ b[s])[r * M / W : (r + 1) * M / W]``.

    ``round_partials`` rounds each rank's product to a's dtype before the sum, as
    the fused kernel (which pushes partial tiles in the input dtype) and the
    sequential matmul + reduce-scatter both do; the sum runs in ``compute_dtype``
    in rank order. Pass ``round_partials=False, compute_dtype=torch.float64``
    for the exact oracle.
    """
    W, M, _ = a.shape
    part = torch.matmul(a.to(compute_dtype), b.to(compute_dtype))
    if round_partials:
        part = part.to(a.dtype).to(compute_dtype)
    total = part[0].clone()
    for s in range(1, W):
        total += part[s]
    out_dtype = a.dtype if compute_dtype != torch.float64 else torch.float64
    return total.reshape(W, M // W, -1).to(out_dtype)


def gemm_reduce_scatter_fallback(a: torch.Tensor, b: torch.Tensor, group=None, *,
                                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``reduce_scatter_tensor(a @ b)`` along rows on ``group`` (one matmul, one collective)."""
    world = dist.get_world_size(group)
    c = torch.matmul(a, b)
    if out is None:
        out = c.new_empty((c.shape[0] // world, c.shape[1]))
    if world == 1:
        out.copy_(c)
        return out
    dist.reduce_scatter_tensor(out, c.contiguous(), group=group)
    return out
