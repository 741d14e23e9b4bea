"""GPTQ and AWQ 4-bit checkpoint tensors -> :class:`Int4Weight` (exact: same dequantized weights).

The two formats, as their public definitions state them (``K`` = in_features, ``N`` =
out_features, ``G`` groups, nibble ``i`` = bits ``4 i .. 4 i + 3`` of an int32):

GPTQ (AutoGPTQ / GPTQModel / optimum, ``quant_method = "gptq"``)
    ``qweight`` int32 ``[K / 8, N]``: nibble ``i`` of row ``r`` holds ``q[k = 8 r + i, n]``.
    ``qzeros`` int32 ``[G, N / 8]``: nibble ``i`` of column ``c`` holds the stored zero of
    ``n = 8 c + i``. ``scales`` ``[G, N]`` fp16. ``g_idx`` int32 ``[K]``: the group of each
    input channel (``k // group_size`` unless the checkpoint was quantized with act-order,
    ``desc_act``, where groups follow the order of decreasing Hessian diagonal).
    ``W[n, k] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]``, where the zero
    ``z`` is the stored value + 1 in the original format (``checkpoint_format = "gptq"``,
    "v1": the packers subtract 1 before storing) and the stored value itself in
    ``"gptq_v2"``. Symmetric checkpoints store ``z = 8`` everywhere.

AWQ (AutoAWQ GEMM kernels, ``quant_method = "awq"``, ``version = "gemm"``)
    ``qweight`` int32 ``[K, N / 8]`` and ``qzeros`` int32 ``[G, N / 8]`` packed along N in
    the interleaved order ``[0, 2, 4, 6, 1, 3, 5, 7]``: nibble ``i`` of column ``c`` holds
    ``n = 8 c + order[i]``. ``scales`` ``[G, N]`` fp16, groups of ``group_size`` consecutive
    k. ``W[n, k] = scales[g, n] * (q[k, n] - z[g, n])``, ``g = k // group_size``.

Both formats compute the product in fp16 (one rounding of an exact ``(q - z) * s``), which is
what ``int4_dequantize`` computes, so the conversion is bit-exact.

Act-order: the groups of an act-order GPTQ checkpoint are scattered over k. As Marlin-based
loaders do, the input channels are permuted once at load (``perm = argsort(g_idx)``, so the
groups become contiguous); the layer gathers ``x[..., perm]`` before the matmul (one extra
read and write of the activations per layer; the weights are not touched at run time).
"""

from __future__ import annotations

import torch

from ..reference import quant_w4a16 as ref
from ..validation import check_dtype, check_tensor
from .int4 import Int4Weight, _check_features

__all__ = ["AWQ_ORDER", "int4_from_awq", "int4_from_gptq", "unpack_int32_nibbles"]

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8 c + AWQ_ORDER[i]
_GPTQ_FORMATS = ("gptq", "gptq_v2")


def unpack_int32_nibbles(t: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 ``t`` -> uint8 nibbles, eight per word, nibble ``i`` (bits ``4 i ..``) at index
    ``8 j + i`` along ``dim`` (the other dims unchanged)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=t.device)
    v = (t.to(torch.int32).unsqueeze(-1) >> shifts) & 15  # [..., 8]; arithmetic shift, then mask
    v = v.movedim(dim, -2) if dim not in (-1, t.dim() - 1) else v
    v = v.reshape(*v.shape[:-2], v.shape[-2] * 8)
    if dim not in (-1, t.dim() - 1):
        v = v.movedim(-1, dim)
    return v.to(torch.uint8)


def _check_int32(name, t, shape):
    check_tensor(name, t)
    check_dtype(name, t, (torch.int32,))
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"expected `{name}` of shape {list(shape)}, got {list(t.shape)}")


def _check_scales(scales, N):
    check_tensor("scales", scales)
    check_dtype("scales", scales, (torch.float16, torch.bfloat16))
    if scales.dim() != 2 or scales.shape[1] != N or scales.shape[0] == 0:
        raise ValueError(f"expected `scales` of shape [G, {N}], got {list(scales.shape)}")
    return scales.shape[0]


def _check_groups(N, K, scales, qzeros, group_size):
    """(groups, group length) of a [N, K] 4-bit checkpoint layer, its scales and zeros checked."""
    _check_features("qweight (as [N, K])", N, K)
    G = _check_scales(scales, N)
    _check_int32("qzeros", qzeros, (G, N // 8))
    if K % G:
        raise ValueError(f"expected in_features {K} to be a multiple of the number of groups {G} (dim 0 of `scales`)")
    gl = K // G
    if group_size is not None and group_size not in ((gl, -1) if G == 1 else (gl,)):
        raise ValueError(f"expected `group_size` {gl} (= in_features / groups in `scales`), got {group_size}")
    return G, gl


def _to_int4(q_nk: torch.Tensor, zeros_gn: torch.Tensor, scales: torch.Tensor, group_size: int,
             symmetric: bool | None) -> Int4Weight:
    """q ``[N, K]`` uint8 in [0, 15], zeros ``[G, N]`` in [0, 16], scales ``[G, N]``."""
    N, K = q_nk.shape
    if symmetric is not False and bool((zeros_gn == 8).all()):
        zeros = None  # (q - 8) * s: the kernel's symmetric form, one tensor less to read
    else:
        if symmetric:
            raise ValueError("expected every zero point = 8 for a symmetric checkpoint (`sym` true), got others")
        zeros = zeros_gn.to(scales.dtype).contiguous()  # integers <= 16: exact in fp16 / bf16
    return Int4Weight(ref.pack_nibbles(q_nk), scales.contiguous(), zeros, K, N, group_size)


def int4_from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor | None = None, *, group_size: int | None = None,
                   checkpoint_format: str = "gptq", sym: bool | None = None,
                   ) -> tuple[Int4Weight, torch.Tensor | None]:
    """Convert one GPTQ 4-bit layer; returns ``(weight, perm)``.

    Args:
        qweight: int32 ``[K / 8, N]``; qzeros: int32 ``[G, N / 8]``; scales: ``[G, N]`` fp16
            (or bf16); g_idx: int ``[K]`` or None (``k // group_size``).
        group_size: k per group (-1: per-channel); default ``K / G``.
        checkpoint_format: ``"gptq"`` (v1: zero = stored + 1) or ``"gptq_v2"`` (zero = stored).
        sym: True requires every zero to be 8 (the checkpoint's ``sym``); None: detect.

    Returns:
        ``weight``: :class:`Int4Weight` ``[N, K]`` whose input channels are in the order
        ``perm`` (``W_int4[:, j] = W[:, perm[j]]``); ``perm``: int64 ``[K]``, or None when the
        groups are already contiguous (no act-order). Use both with
        :meth:`QuantLinear.from_int4` (``in_perm=perm``).
    """
    if checkpoint_format not in _GPTQ_FORMATS:
        raise ValueError(f"expected `checkpoint_format` one of {_GPTQ_FORMATS}, got {checkpoint_format!r}")
    check_tensor("qweight", qweight)
    check_dtype("qweight", qweight, (torch.int32,))
    if qweight.dim() != 2:
        raise ValueError(f"expected `qweight` of shape [in_features / 8, out_features], got {list(qweight.shape)}")
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    G, gl = _check_groups(N, K, scales, qzeros, group_size)
    q = unpack_int32_nibbles(qweight, 0)  # [K, N]
    z = unpack_int32_nibbles(qzeros, 1).to(torch.int16)  # [G, N]
    if checkpoint_format == "gptq":
        z = z + 1
    perm = None
    if g_idx is not None:
        check_tensor("g_idx", g_idx)
        if g_idx.dtype.is_floating_point or tuple(g_idx.shape) != (K,):
            raise ValueError(f"expected an integer `g_idx` of shape [{K}], got {g_idx.dtype} {list(g_idx.shape)}")
        g = g_idx.to(device=qweight.device, dtype=torch.int64)
        natural = torch.arange(K, device=g.device) // gl
        if not torch.equal(g, natural):
            order = torch.argsort(g, stable=True)
            if not torch.equal(g[order], natural):
                raise ValueError(f"expected `g_idx` to assign exactly {gl} input channels to each of the {G} groups, "
                                 "got another grouping (not a GPTQ act-order layout)")
            perm = order
            q = q[perm]
    w = _to_int4(q.t().contiguous(), z, scales, -1 if G == 1 else gl, sym)
    return w, perm


def int4_from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, *,
                  group_size: int | None = None) -> Int4Weight:
    """Convert one AWQ (GEMM packing) 4-bit layer.

    Args:
        qweight: int32 ``[K, N / 8]``; qzeros: int32 ``[G, N / 8]``; scales: ``[G, N]`` fp16
            (or bf16), all packed along N in :data:`AWQ_ORDER`.
        group_size: k per group; default ``K / G``.
    """
    check_tensor("qweight", qweight)
    check_dtype("qweight", qweight, (torch.int32,))
    if qweight.dim() != 2:
        raise ValueError(f"expected `qweight` of shape [in_features, out_features / 8], got {list(qweight.shape)}")
    K, N = qweight.shape[0], qweight.shape[1] * 8
    G, gl = _check_groups(N, K, scales, qzeros, group_size)
    # nibble i of word c is column 8 c + AWQ_ORDER[i]: unpack in nibble order, then put each
    # column where it belongs
    inv = torch.tensor([AWQ_ORDER.index(j) for j in range(8)], device=qweight.device)
    cols = (torch.arange(N // 8, device=qweight.device)[:, None] * 8 + inv[None, :]).reshape(N)
    q = unpack_int32_nibbles(qweight, 1)[:, cols]  # [K, N]
    z = unpack_int32_nibbles(qzeros, 1)[:, cols].to(torch.int16)  # [G, N]
    return _to_int4(q.t().contiguous(), z, scales, -1 if G == 1 else gl, False)
