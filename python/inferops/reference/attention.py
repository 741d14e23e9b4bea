"""References for the attention family."""

from __future__ import annotations

import torch

__all__ = ["merge_states", "append_kv", "paged_decode"]


def merge_states(
    v_a: torch.Tensor,
    lse_a: torch.Tensor,
    v_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of two partial attention states (natural-log LSE).

    ``v_*``: ``[num_tokens, num_heads, head_dim]``; ``lse_*``: ``[num_tokens, num_heads]``.
    Returns ``v`` in ``out_dtype`` (default ``v_a.dtype``) and ``lse`` in
    ``compute_dtype``. A partial with ``lse = -inf`` is empty and gets weight 0;
    when both are empty the result is ``v = 0``, ``lse = -inf``. NaN propagates.
    """
    out_dtype = v_a.dtype if out_dtype is None else out_dtype
    la = lse_a.to(compute_dtype)
    lb = lse_b.to(compute_dtype)
    both_empty = (la == float("-inf")) & (lb == float("-inf"))
    m = torch.maximum(la, lb)  # propagates NaN
    m = torch.where(both_empty, torch.zeros_like(m), m)  # avoid -inf - -inf
    e_a = torch.exp(la - m)
    e_b = torch.exp(lb - m)
    s = e_a + e_b
    w_a = torch.where(both_empty, torch.zeros_like(s), e_a / s)
    w_b = torch.where(both_empty, torch.zeros_like(s), e_b / s)
    v = w_a.unsqueeze(-1) * v_a.to(compute_dtype) + w_b.unsqueeze(-1) * v_b.to(compute_dtype)
    lse = torch.where(both_empty, torch.full_like(m, float("-inf")), m + torch.log(s))
    return v.to(out_dtype), lse


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write token ``t``'s K/V into page ``block_tables[seq_ids[t], positions[t] // page_size]``,
    slot ``positions[t] % page_size``, of ``k_cache``/``v_cache``
    (``[num_pages, page_size, num_kv_heads, head_dim]``). Indices must be valid."""
    page_size = k_cache.shape[1]
    seq = seq_ids.long()
    pos = positions.long()
    pages = block_tables.long()[seq, pos // page_size]
    slots = pos % page_size
    k_cache[pages, slots] = k.to(k_cache.dtype)
    v_cache[pages, slots] = v.to(v_cache.dtype)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query per sequence over its paged KV cache.

    ``q``: ``[batch, num_q_heads, head_dim]``; caches ``[num_pages, page_size,
    num_kv_heads, head_dim]``; ``block_tables`` ``[batch, max_pages]`` (entries
    past a sequence's last page are ignored); ``seq_lens`` ``[batch]``. Query head
    ``h`` reads kv head ``h // (num_q_heads // num_kv_heads)`` (GQA).
    Returns ``out`` (q's dtype) and ``lse`` = log(sum_j exp(scale * q.k_j))
    (natural log, ``compute_dtype``); an empty sequence gives 0 and -inf.
    """
    B, Hq, D = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    max_len = block_tables.shape[1] * page_size
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < seq_lens.long()[:, None]  # [B, max_len]
    pages = torch.where(valid, block_tables.long()[:, pos // page_size], 0)
    slots = (pos % page_size)[None, :].expand(B, -1)
    k = k_cache[pages, slots].to(compute_dtype)  # [B, max_len, Hkv, D]
    v = v_cache[pages, slots].to(compute_dtype)
    qg = q.to(compute_dtype).view(B, Hkv, G, D)
    s = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for empty sequences
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhgt,bthd->bhgd", p, v)
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)
