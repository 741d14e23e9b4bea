"""Test-side writers of the GPTQ and AWQ 4-bit formats, from the formats' public definitions
(see inferops.quant.checkpoints for the definitions). Written independently of the library's
readers: explicit loops over the eight nibbles of each int32, sums in int64, wrapped to int32.
Also a tiny "quantizer" producing valid values for each format (RTN per group; real GPTQ
compensates errors, which changes the values, not the format)."""

from __future__ import annotations

import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    v = v.to(torch.int64) & 0xFFFFFFFF
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_rows(u: torch.Tensor) -> torch.Tensor:
    """[R, C] in [0, 15] -> int32 [R / 8, C]: word r holds rows 8 r + i at bits 4 i."""
    R, C = u.shape
    out = torch.zeros(R // 8, C, dtype=torch.int64)
    for i in range(8):
        out += u[i::8].to(torch.int64) << (4 * i)
    return _to_int32(out)


def pack_cols(u: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[R, C] in [0, 15] -> int32 [R, C / 8]: word c holds column 8 c + order[i] at bits 4 i."""
    R, C = u.shape
    out = torch.zeros(R, C // 8, dtype=torch.int64)
    for i in range(8):
        out += u[:, order[i]::8].to(torch.int64) << (4 * i)
    return _to_int32(out)


def quantize_groups(w: torch.Tensor, g_idx: torch.Tensor, G: int, sym: bool, *, max_zero: int = 15):
    """RTN per group of input channels (groups given by g_idx). w [N, K] float.
    Returns q [K, N] in [0, 15], zeros [G, N] integers (8 when sym), scales [G, N] fp16."""
    N, K = w.shape
    scales = torch.empty(G, N, dtype=torch.float16)
    zeros = torch.empty(G, N, dtype=torch.int64)
    for g in range(G):
        cols = w[:, g_idx == g].double()
        if sym:
            s = cols.abs().amax(1) / 7
            z = torch.full((N,), 8, dtype=torch.int64)
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            s = (hi - lo) / 15
            z = torch.round(-lo / s).clamp(0, max_zero).to(torch.int64)
        scales[g] = s.to(torch.float16)
        zeros[g] = z
    sk = scales.double()[g_idx].t()  # [N, K]
    q = torch.clamp(torch.round(w.double() / sk) + zeros[g_idx].t(), 0, 15).to(torch.int64)
    return q.t().contiguous(), zeros, scales


def act_order_g_idx(K: int, group: int, gen: torch.Generator) -> torch.Tensor:
    """GPTQ desc_act: channels quantized in a permuted order; the i-th of them is in group i // group."""
    order = torch.randperm(K, generator=gen)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[order] = (torch.arange(K) // group).to(torch.int32)
    return g_idx


def gptq_tensors(q_kn, zeros, scales, g_idx, checkpoint_format="gptq"):
    """The four GPTQ tensors; v1 ("gptq") stores zero - 1."""
    stored = zeros - 1 if checkpoint_format == "gptq" else zeros
    assert int(stored.min()) >= 0 and int(stored.max()) <= 15
    return {"qweight": pack_rows(q_kn), "qzeros": pack_cols(stored), "scales": scales,
            "g_idx": g_idx.to(torch.int32)}


def awq_tensors(q_kn, zeros, scales):
    return {"qweight": pack_cols(q_kn, AWQ_ORDER), "qzeros": pack_cols(zeros, AWQ_ORDER), "scales": scales}


def dequantize_definition(q_kn, zeros, scales, g_idx) -> torch.Tensor:
    """W [N, K] = s * (q - z), exact in float64, rounded once to fp16 (the formats' fp16 math)."""
    g = g_idx.long()
    w = (q_kn.double() - zeros[g].double()) * scales[g].double()  # [K, N]
    return w.t().to(scales.dtype)
