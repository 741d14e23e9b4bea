"""References for the MoE family: routing layout, permute, unpermute.

The layout is defined exactly (not just up to permutation): within an expert,
rows follow (token, top-k slot) order; within a destination rank's send
block, tokens follow token order. The CUDA kernels reproduce it bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["routing_layout", "permute", "unpermute"]


def routing_layout(topk_ids: torch.Tensor, placement: torch.Tensor, world_size: int, align: int,
                   capacity: int) -> tuple[torch.Tensor, ...]:
    """Returns (tokens_per_expert [E], expert_offsets [E+1], dst_index [T, k], src_index [capacity],
    tokens_per_rank [R], send_index [T, R], send_offsets [R+1], errors [2]), all int32.
    errors = (assignments with an expert id out of range, assignments over capacity)."""
    dev = topk_ids.device
    T, k = topk_ids.shape
    E, R = placement.numel(), world_size
    flat = topk_ids.reshape(-1).long()
    in_range = (flat >= 0) & (flat < E)
    rank_of = torch.where(in_range, placement.long()[flat.clamp(0, E - 1)], -1)
    valid = in_range & (rank_of >= 0) & (rank_of < R)
    e = torch.where(valid, flat, E)  # invalid ids sort last
    counts = torch.bincount(e[valid], minlength=E)[:E]
    padded = (counts + align - 1) // align * align
    offs = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), padded.cumsum(0)])
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), counts.cumsum(0)])
    order = torch.sort(e, stable=True).indices
    rank_in_expert = torch.empty_like(flat)
    rank_in_expert[order] = torch.arange(flat.numel(), device=dev) - torch.cat([starts, starts[-1:]])[e[order]]
    pos = torch.where(valid, offs[e.clamp(max=E - 1)] + rank_in_expert, -1)
    keep = valid & (pos < capacity)
    dst = torch.where(keep, pos, -1)
    src = torch.full((capacity,), -1, dtype=torch.long, device=dev)
    token_of = torch.arange(flat.numel(), device=dev) // k
    src[dst[keep]] = token_of[keep]
    in_rank = torch.zeros(T, R, dtype=torch.bool, device=dev)
    in_rank[token_of[valid], rank_of[valid]] = True
    per_rank = in_rank.sum(0)
    send_index = torch.where(in_rank, in_rank.long().cumsum(0) - 1, -1)
    send_offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), per_rank.cumsum(0)])
    errors = torch.stack([(~valid).sum(), (valid & ~keep).sum()])
    i32 = lambda t: t.to(torch.int32)  # noqa: E731
    return (i32(counts), i32(offs), i32(dst.view(T, k)), i32(src), i32(per_rank), i32(send_index),
            i32(send_offsets), i32(errors))


def permute(x: torch.Tensor, src_index: torch.Tensor) -> torch.Tensor:
    """Row r of the result is x[src_index[r]], or zeros where src_index is -1."""
    out = torch.zeros(src_index.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    rows = src_index >= 0
    out[rows] = x[src_index[rows].long()]
    return out


def unpermute(y: torch.Tensor, dst_index: torch.Tensor, topk_weights: torch.Tensor,
              compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * y[dst_index[t, j]] (slots with -1 skipped)."""
    T, k = dst_index.shape
    keep = dst_index >= 0
    gathered = y[dst_index.clamp(min=0).long()].to(compute_dtype)  # [T, k, hidden]
    # a dropped slot gathers row 0 (clamped): mask the row itself, not just its weight,
    # since 0 * inf/nan (e.g. an unwritten padding row 0) is nan; the kernel never reads it
    gathered = gathered.masked_fill(~keep[..., None], 0)
    w = torch.where(keep, topk_weights.to(compute_dtype), 0)
    return (gathered * w[..., None]).sum(1).to(y.dtype)
