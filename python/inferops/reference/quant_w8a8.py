"""References for W8A8 matmul, per-token quantization and the online Hadamard rotation.

Quantization convention (shared with the kernels, which reproduce it bit for bit
for ``quantize_per_token``):

* symmetric, per row: ``scale = max(amax / qmax, SCALE_MIN)`` in fp32 with
  ``qmax = 127`` (int8) or ``448`` (fp8 e4m3, its largest finite value);
* ``amax / qmax`` and ``x / scale`` are IEEE fp32 divisions on every device (a
  Python-scalar divisor would make CUDA multiply by its reciprocal instead);
* ``q = round_half_even(x / scale)``, clamped to
  ``[-qmax, qmax]``; fp8 rounds to nearest even on the cast;
* the clamp ``SCALE_MIN`` keeps all-zero rows at scale 1e-10 (not 0), so no NaN or
  inf appears and they dequantize to exact zeros.

``w8a8_matmul`` dequantizes and multiplies: ``y = (x_q * x_scale[:, None]) @
(w_q * w_scale[:, None])^T + bias``, computed in ``compute_dtype`` (float32 for the
CPU fallback, float64 in tests), cast to ``out_dtype``. The kernel computes the
same value as ``(x_q @ w_q^T) * x_scale[m] * w_scale[n] + bias`` (exact integer
or fp32 accumulation, then the scales).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SCALE_MIN",
    "dequantize_per_token",
    "hadamard_quantize",
    "hadamard_rotate",
    "hadamard_transform",
    "qmax",
    "quantize_per_token",
    "w8a8_matmul",
]

SCALE_MIN = 1e-10
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def qmax(dtype: torch.dtype) -> float:
    return _QMAX[dtype]


def _quantize_rows(xf: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """xf: [M, K] float32; returns (q [M, K] dtype, scale [M] float32)."""
    qm = _QMAX[dtype]
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] > 0 else xf.new_zeros(xf.shape[:-1])
    # Divide by a tensor, not the Python float: on CUDA, `tensor / scalar` is computed as
    # `tensor * (1 / scalar)` (ATen's div_true_kernel_cuda), which differs from the IEEE
    # quotient by one ulp for ~5% (127) / ~50% (448) of amax values; the kernels divide.
    scale = torch.clamp(amax / torch.full_like(amax, qm), min=SCALE_MIN)
    y = xf / scale[:, None]
    if dtype == torch.int8:
        q = torch.round(y).clamp(-qm, qm).to(torch.int8)
    else:
        q = y.clamp(-qm, qm).to(torch.float8_e4m3fn)
    return q, scale


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` float -> (``[M, K]`` int8 / fp8 e4m3, ``[M]`` fp32 scale)."""
    return _quantize_rows(x.float(), dtype)


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[..., None]


def w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype, bias=None, *, compute_dtype=torch.float32):
    """``[M, K] x [N, K] -> [M, N]`` from the dequantized operands."""
    x = x_q.to(compute_dtype) * x_scale.to(compute_dtype)[:, None]
    w = w_q.to(compute_dtype) * w_scale.to(compute_dtype)[:, None]
    y = x @ w.t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(out_dtype)


def _fwht_last(y: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform (Sylvester order) over the last dim (a power of two)."""
    p = y.shape[-1]
    h = 1
    while h < p:
        y = y.reshape(*y.shape[:-1], p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2).reshape(*y.shape[:-3], p)
        h *= 2
    return y


def hadamard_rotate(x: torch.Tensor, *, compute_dtype=torch.float32, transpose: bool = False) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` over the last dim in ``compute_dtype`` through the factorization
    ``H_n = kron(H_m, H_{2^k})``: the row as ``X [m, 2^k]`` becomes ``H_m^T X H_{2^k}``
    (O(n (log n + m)) work, no ``[n, n]`` matrix). ``transpose``: ``x @ (H_n / sqrt(n))^T``
    (``H_m X H_{2^k}``, the Sylvester factor is symmetric): the rotation's adjoint, i.e. its
    backward."""
    from ..quant.hadamard import (  # lazy: avoids an import cycle
        dense_factor,
        hadamard_factorization,
    )

    n = x.shape[-1]
    m, p = hadamard_factorization(int(n))
    y = _fwht_last(x.to(compute_dtype).reshape(*x.shape[:-1], m, p))
    if m > 1:
        hm = dense_factor(m).to(device=x.device, dtype=compute_dtype)
        y = (hm if transpose else hm.t()) @ y  # [m, m] x [..., m, p]: Y[c, d] = sum_a H_m[a, c] X[a, d]
    return y.reshape(x.shape) / math.sqrt(n)


def hadamard_transform(x: torch.Tensor, *, compute_dtype=torch.float32) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` over the last dim, returned in x's dtype."""
    return hadamard_rotate(x, compute_dtype=compute_dtype).to(x.dtype)


def hadamard_quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate (fp32, unrounded) then quantize per token: ``[M, n]`` -> (q ``[M, n]``, scale ``[M]``)."""
    n = x.shape[-1]
    return _quantize_rows(hadamard_rotate(x).reshape(-1, n), dtype)
