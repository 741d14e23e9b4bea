"""References for the linear-attention family (SLAB).

``simplified_linear_attention``: SLAB's formula, written directly.
``causal_linear_attention``: the chunkwise form (CPU fallback, O(T C) memory);
``causal_linear_attention_quadratic``: the masked quadratic form, the test oracle.
``linear_attention_step``: the recurrence for one token.

State convention (all ops): ``S = S_0 + sum_j k_j^T v_j`` of shape ``[K, V]`` per
(sequence, head), fp32. With ``normalize=True`` the state carries one more value
column holding the key sum ``z = z_0 + sum_j k_j`` (shape ``[K, V + 1]``), so a
normalised attention can be continued across calls exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "simplified_linear_attention",
    "causal_linear_attention",
    "causal_linear_attention_quadratic",
    "linear_attention_step",
    "SimplifiedLinearAttentionReference",
]

SLA_EPS = 1e-6
NORM_EPS = 1e-10  # fla's linear-attention normaliser eps (causal ops)


def simplified_linear_attention(q, k, v, dwc_weight, dwc_bias, hw, *, compute_dtype=torch.float32):
    """SLAB's simplified linear attention (non-causal).

    ``q, k, v``: ``[B, heads, N, d]``; ``dwc_weight``: ``[d, 1, 5, 5]`` (depthwise, shared
    across heads); ``dwc_bias``: ``[d]`` or None; ``hw = (h, w)`` with ``h * w == N``.
    ``out = relu(q) (relu(k)^T v) / (relu(q) . sum_j relu(k_j) + 1e-6) + dwc(v)``,
    returned in q's dtype.
    """
    B, H, N, d = q.shape
    h, w = hw
    qf = F.relu(q.to(compute_dtype))
    kf = F.relu(k.to(compute_dtype))
    vf = v.to(compute_dtype)
    kv = torch.einsum("bhnk,bhnc->bhkc", kf, vf)
    z = 1.0 / (torch.einsum("bhnk,bhk->bhn", qf, kf.sum(dim=2)) + SLA_EPS)
    out = torch.einsum("bhnk,bhkc->bhnc", qf, kv) * z[..., None]
    grid = vf.reshape(B * H, h, w, d).permute(0, 3, 1, 2)
    bias = None if dwc_bias is None else dwc_bias.to(compute_dtype)
    conv = F.conv2d(grid, dwc_weight.to(compute_dtype), bias, padding=2, groups=d)
    out = out + conv.permute(0, 2, 3, 1).reshape(B, H, N, d)
    return out.to(q.dtype)


def _augment(v, normalize):
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if normalize else v


def _finish(o_aug, normalize, V):
    if not normalize:
        return o_aug
    return o_aug[..., :V] / (o_aug[..., V:] + NORM_EPS)


def causal_linear_attention_quadratic(q, k, v, *, scale=None, initial_state=None, normalize=False,
                                      use_relu=False, compute_dtype=torch.float64):
    """Oracle: ``o_t = scale q_t (S_0 + sum_{j<=t} k_j^T v_j)`` via the [T, T] masked form.
    Single sequence batch layout ``[B, T, H, K]`` / ``[B, T, H, V]``; returns ``(o, final_state)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    qf, kf = q.to(compute_dtype), k.to(compute_dtype)
    if use_relu:
        qf, kf = F.relu(qf), F.relu(kf)
    qf = qf * scale
    va = _augment(v.to(compute_dtype), normalize)
    a = torch.einsum("bthk,bshk->bhts", qf, kf)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    a = a.masked_fill(~mask, 0)
    o = torch.einsum("bhts,bshv->bthv", a, va)
    s0 = torch.zeros(B, H, K, va.shape[-1], dtype=compute_dtype, device=q.device) \
        if initial_state is None else initial_state.to(compute_dtype)
    o = o + torch.einsum("bthk,bhkv->bthv", qf, s0)
    final = s0 + torch.einsum("bthk,bthv->bhkv", kf, va)
    return _finish(o, normalize, V).to(q.dtype), final.float() if compute_dtype != torch.float64 else final


def causal_linear_attention(q, k, v, *, scale=None, initial_state=None, normalize=False, use_relu=False,
                            cu_seqlens=None, chunk_size=64, compute_dtype=torch.float32):
    """Chunkwise causal linear attention (the CPU fallback). Layout as fla:
    ``q, k`` ``[B, T, H, K]``, ``v`` ``[B, T, H, V]``; with ``cu_seqlens`` (``[N + 1]``),
    ``B == 1`` and sequence ``i`` is tokens ``cu_seqlens[i]:cu_seqlens[i+1]``.
    Returns ``(o [B, T, H, V] in q's dtype, final_state [N or B, H, K, V(+1)] fp32)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        cu = [int(x) for x in cu_seqlens.tolist()]
        seqs = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    Va = V + 1 if normalize else V
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    finals = []
    for i, (b, t0, t1) in enumerate(seqs):
        S = torch.zeros(H, K, Va, dtype=compute_dtype, device=q.device) if initial_state is None \
            else initial_state[i].to(compute_dtype).clone()
        for c0 in range(t0, t1, chunk_size):
            c1 = min(t1, c0 + chunk_size)
            qc = q[b, c0:c1].to(compute_dtype).transpose(0, 1)  # [H, C, K]
            kc = k[b, c0:c1].to(compute_dtype).transpose(0, 1)
            if use_relu:
                qc, kc = F.relu(qc), F.relu(kc)
            qc = qc * scale
            vc = _augment(v[b, c0:c1].to(compute_dtype), normalize).transpose(0, 1)  # [H, C, Va]
            a = (qc @ kc.transpose(1, 2)).tril()
            oc = qc @ S + a @ vc
            S = S + kc.transpose(1, 2) @ vc
            o[b, c0:c1] = _finish(oc, normalize, V).transpose(0, 1).to(q.dtype)
        finals.append(S)
    final = torch.stack(finals).float() if finals else torch.zeros(0, H, K, Va, device=q.device)
    return o, final


def linear_attention_step(q, k, v, state, *, scale=None, normalize=False, use_relu=False):
    """One token per sequence: ``q, k`` ``[B, H, K]``, ``v`` ``[B, H, V]``, ``state``
    ``[B, H, K, V(+1)]`` fp32. Returns ``(o [B, H, V], new_state)`` (not in place)."""
    K = q.shape[-1]
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    qf, kf = q.float(), k.float()
    if use_relu:
        qf, kf = F.relu(qf), F.relu(kf)
    va = _augment(v.float(), normalize)
    new = state.float() + kf[..., :, None] * va[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", qf * scale, new)
    return _finish(o, normalize, V).to(q.dtype), new


class SimplifiedLinearAttentionReference(torch.nn.Module):
    """Plain PyTorch SLAB attention block (the structure of SLAB's official module):
    ``qkv`` Linear, learned ``positional_encoding`` added to k, ReLU features,
    linear attention with the normaliser, ``dwc`` (5x5 depthwise conv of v, shared
    across heads), ``proj`` Linear. ``x``: ``[B, N, dim]`` with ``N = h * w``."""

    def __init__(self, dim: int, num_heads: int, resolution, qkv_bias: bool = True, kernel_size: int = 5):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.resolution = tuple(resolution)
        head_dim = dim // num_heads
        self.qkv = torch.nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = torch.nn.Linear(dim, dim)
        self.dwc = torch.nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.positional_encoding = torch.nn.Parameter(
            torch.zeros(1, self.resolution[0] * self.resolution[1], dim))

    def attention(self, q, k, v):
        return simplified_linear_attention(q, k, v, self.dwc.weight, self.dwc.bias, self.resolution)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)
        k = k + self.positional_encoding
        heads = self.num_heads

        def split(t):  # [B, N, C] -> [B, heads, N, C / heads]
            return t.reshape(B, N, heads, C // heads).transpose(1, 2)

        out = self.attention(split(q), split(k), split(v))
        return self.proj(out.transpose(1, 2).reshape(B, N, C))
