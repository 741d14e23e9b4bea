"""PyTorch reference of int4 weight packing and W4A16: the CPU fallback and the test oracle.

Packed layout, version :data:`LAYOUT_VERSION` (the kernel's, csrc/quant/quant_w4a16.h;
drawn out in docs/quant.md): a weight ``[N, K]`` (nn.Linear layout) of unsigned
nibbles ``u`` in [0, 15] becomes int32 ``[K // 16, 2 * N]``; row ``kt`` holds the
k16 x n64 tiles ``nb = 0 .. N/64 - 1`` (128 int32 each); lane ``l`` of a tile owns
int32 ``4 l .. 4 l + 3``; nibble ``p = 4 hi + 2 b1 + b0`` (bits ``4p .. 4p+3``) of
word ``w`` holds ``k = 16 kt + 8 b0 + 2 (l % 4) + hi`` and
``n = 64 nb + 16 w + 8 b1 + l // 4``. The mapping is a pure axis permutation, so
:func:`pack_nibbles` / :func:`unpack_nibbles` are a reshape + permute each.

Values: ``w = (u - z) * s`` with ``z = 8`` (symmetric, ``q = u - 8`` in [-8, 7]) or
per-group zero points ``z`` in [0, 15]; scales / zeros ``[G, N]``, G = K / group.
"""

from __future__ import annotations

import sys

import torch

__all__ = [
    "LAYOUT_VERSION",
    "dequantize",
    "pack_nibbles",
    "quantize_rtn",
    "unpack_nibbles",
    "w4a16_matmul",
]

LAYOUT_VERSION = 1
TILE_K = 16
TILE_N = 64

# u [N, K] viewed as [NB, w, b1, gid, KT, b0, t, hi] -> [KT, NB, gid, t, w, hi, b1, b0]
# (tile row, tile, lane = 4 gid + t, word, nibble p = 4 hi + 2 b1 + b0).
_PACK_PERM = (4, 0, 3, 6, 1, 7, 2, 5)
_UNPACK_PERM = tuple(_PACK_PERM.index(i) for i in range(8))


def _check_little_endian() -> None:
    if sys.byteorder != "little":  # int32 views of the nibble bytes assume it
        raise RuntimeError("int4 packing assumes a little-endian host")


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """``u``: ``[N, K]`` integers in [0, 15], N % 64 == 0, K % 16 == 0 -> int32 ``[K/16, 2N]``."""
    _check_little_endian()
    N, K = u.shape
    v = u.to(torch.uint8).reshape(N // TILE_N, 4, 2, 8, K // TILE_K, 2, 4, 2)
    v = v.permute(_PACK_PERM).reshape(K // TILE_K, N // TILE_N, 32, 4, 8)
    # Two nibbles per byte (low nibble first), four bytes per little-endian int32.
    b = v[..., 0::2] | (v[..., 1::2] << 4)
    return b.contiguous().view(torch.int32).reshape(K // TILE_K, 2 * N)


def unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: int32 ``[K/16, 2N]`` -> uint8 ``[N, K]`` in [0, 15]."""
    _check_little_endian()
    KT, N2 = qweight.shape
    N, K = N2 // 2, KT * TILE_K
    b = qweight.contiguous().view(torch.uint8).reshape(KT, N // TILE_N, 32, 4, 4)
    v = torch.stack([b & 15, b >> 4], dim=-1).reshape(KT, N // TILE_N, 8, 4, 4, 2, 2, 2)
    return v.permute(_UNPACK_PERM).reshape(N, K).contiguous()


def _group_len(K: int, group_size: int) -> int:
    return K if group_size == -1 else group_size


def quantize_rtn(w: torch.Tensor, group_size: int, symmetric: bool, scale_dtype: torch.dtype):
    """Round-to-nearest int4 quantization of ``w`` ``[N, K]`` per group of ``group_size``
    consecutive k (``-1``: one group per output channel).

    Symmetric: ``s = max|w| / 7``, ``q = clamp(round(w / s), -8, 7)``. Asymmetric:
    ``s = (max - min) / 15``, ``z = clamp(round(-min / s), 0, 15)``,
    ``q = clamp(round(w / s) + z, 0, 15)``. The scale is rounded to ``scale_dtype``
    first and ``q`` computed with the rounded scale (the one the kernel uses). A group
    of zeros gets scale 1. Returns ``(q int8 [N, K], scales [G, N], zeros int8 [G, N] or None)``.
    """
    N, K = w.shape
    gl = _group_len(K, group_size)
    wg = w.to(torch.float32).reshape(N, K // gl, gl)
    if symmetric:
        s = wg.abs().amax(dim=-1) / 7
    else:
        lo = wg.amin(dim=-1).clamp(max=0)
        hi = wg.amax(dim=-1).clamp(min=0)
        s = (hi - lo) / 15
    s = torch.where(s > 0, s, torch.ones_like(s)).to(scale_dtype)
    sf = s.to(torch.float32)
    if symmetric:
        q = torch.clamp(torch.round(wg / sf[..., None]), -8, 7)
        z = None
    else:
        zf = torch.clamp(torch.round(-lo / sf), 0, 15)
        q = torch.clamp(torch.round(wg / sf[..., None]) + zf[..., None], 0, 15)
        z = zf.to(torch.int8).t().contiguous()
    return q.reshape(N, K).to(torch.int8), s.t().contiguous(), z


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W [N, K] = (u - z) * s``, rounded once to the scales' dtype (what the kernel's
    half2 arithmetic gives: ``u - z`` is exact and the product rounds once). With
    ``compute_dtype`` set the result stays in it, unrounded."""
    u = unpack_nibbles(qweight)
    K = u.shape[1]
    gl = _group_len(K, group_size)
    z = torch.full_like(scales, 8) if zeros is None else zeros
    zs = z.to(torch.float32).t().repeat_interleave(gl, dim=1)  # [N, K]
    ss = scales.to(torch.float32).t().repeat_interleave(gl, dim=1)
    w = (u.to(torch.float32) - zs) * ss  # exact in fp32 for fp16/bf16 scales
    if compute_dtype is not None:
        return w.to(compute_dtype)
    return w.to(scales.dtype)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, group_size: int,
                 compute_dtype: torch.dtype = torch.float32,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ W^T (+ bias)`` with W dequantized to the scales' dtype
    (the kernel's B operand), products and sums in ``compute_dtype``, cast to
    ``out_dtype`` (default x's dtype)."""
    w = dequantize(qweight, scales, zeros, group_size).to(compute_dtype)
    y = x.to(compute_dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype if out_dtype is None else out_dtype)
