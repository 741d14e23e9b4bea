"""References for the attention family."""

from __future__ import annotations

import torch

__all__ = ["merge_states"]


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
