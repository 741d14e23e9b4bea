"""Grouped expert GEMM: the local experts of an MoE layer over their expert-major rows.

One function, :func:`grouped_expert_mlp`, so a hand-written kernel can replace it later.
It uses ``torch._grouped_mm`` (one call per projection for all experts) where the
installed torch has it for the tensors' device and dtype, probed once per (device
type, dtype) with a small call checked against ``matmul``; otherwise a loop over the
experts (one matmul per non-empty expert). No hand-written kernel: none has been
shown to beat both (no GPU benchmark yet).
"""

from __future__ import annotations

import torch

__all__ = ["grouped_expert_mlp", "grouped_mm_available", "grouped_matmul"]

_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs (and agrees with matmul) for ``device``/``dtype``
    in this torch; probed once per (device type, dtype)."""
    key = (torch.device(device).type, dtype)
    if key not in _PROBED:
        ok = False
        fn = getattr(torch, "_grouped_mm", None)
        if fn is not None:
            try:
                a = torch.randn(48, 32, device=device).to(dtype)
                b = torch.randn(2, 64, 32, device=device).to(dtype)  # [G, N, K] weights, K-major like nn.Linear
                offs = torch.tensor([16, 48], dtype=torch.int32, device=device)
                y = fn(a, b.transpose(1, 2), offs=offs)
                want = torch.cat([a[:16].float() @ b[0].float().t(), a[16:].float() @ b[1].float().t()])
                ok = bool(torch.allclose(y.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                ok = False
        _PROBED[key] = ok
    return _PROBED[key]


def grouped_matmul(x: torch.Tensor, offsets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``y[rows of expert g] = x[rows of g] @ weight[g]^T``.

    Args:
        x: ``[rows, K]``, expert-major (expert g's rows are ``offsets[g] : offsets[g + 1]``).
        offsets: ``[G + 1]`` int (``RoutingLayout.expert_offsets``); rows past ``offsets[G]``
            (capacity padding) come out as zeros.
        weight: ``[G, N, K]`` (``nn.Linear`` layout per expert), x's dtype and device.
    Returns ``[rows, N]`` in x's dtype.
    """
    G, N, K = weight.shape
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"expected `x` of shape [rows, {K}], got {list(x.shape)}")
    if offsets.numel() != G + 1:
        raise ValueError(f"expected `offsets` with {G + 1} entries (experts + 1), got {offsets.numel()}")
    rows = x.shape[0]
    out = x.new_zeros((rows, N))
    end = int(offsets[-1]) if G else 0  # host sync: the row count of the grouped call
    if end == 0:
        return out
    if grouped_mm_available(x.device, x.dtype):
        ends = offsets[1:].to(device=x.device, dtype=torch.int32)
        out[:end] = torch._grouped_mm(x[:end].contiguous(), weight.transpose(1, 2), offs=ends)
        return out
    bounds = offsets.tolist()
    for g in range(G):
        lo, hi = bounds[g], bounds[g + 1]
        if hi > lo:
            out[lo:hi] = x[lo:hi] @ weight[g].t()
    return out


def grouped_expert_mlp(x: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                       act) -> torch.Tensor:
    """Gated MLP of each local expert (Qwen3-MoE / Mixtral experts):
    ``down_g(act(gate_g(x)) * up_g(x))`` over expert-major rows.

    Args:
        x: ``[rows, hidden]`` expert-major rows (``DispatchResult.expert_x``).
        offsets: ``[G + 1]`` expert row offsets (``DispatchResult.expert_offsets``).
        gate_up: ``[G, 2 * inter, hidden]`` (gate rows first, then up), x's dtype.
        down: ``[G, hidden, inter]``.
        act: the activation (the model's ``act_fn``).
    Returns ``[rows, hidden]``; padding rows are zero.
    """
    h = grouped_matmul(x, offsets, gate_up)
    gate, up = h.chunk(2, dim=-1)
    return grouped_matmul(act(gate) * up, offsets, down)
