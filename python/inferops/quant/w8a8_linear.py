"""w8a8_linear: a W8A8 linear layer as one differentiable op.

``y = Q(x') @ (w_q * w_scale)^T + bias`` where ``x' = x`` or ``x @ H_n / sqrt(n)`` (online
Hadamard) and ``Q`` is symmetric per-token int8 / fp8 quantization. The forward runs the
family's kernels (``quantize_per_token`` or ``hadamard_quantize``, then ``w8a8_matmul``);
this op exists so the layer has a backward: the activation quantization has derivative zero
almost everywhere, so the gradient uses the straight-through estimator, the gradient of the
dequantized layer: ``dx = (dy @ (w_q * w_scale)) [(H_n / sqrt(n))^T]``, ``dbias = sum dy``.
The 8-bit weights are frozen (QLoRA-style adapter training on a quantized base).
"""

from __future__ import annotations

import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from ..reference import quant_w8a8 as ref
from ..validation import check_dtype, check_same_device, check_shape, check_tensor
from .hadamard import hadamard_factorization
from .w8a8 import W8A8_DTYPES, W8A8_K_ALIGN, _resolve_path

__all__ = ["w8a8_linear"]

_OUT_CODE = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_CODE_OUT = {v: k for k, v in _OUT_CODE.items()}
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _code(w_q: torch.Tensor) -> str:
    return "int8" if w_q.dtype == torch.int8 else "fp8"


def _fake(x, w_q, w_scale, bias, hadamard, out_dtype, path):
    return x.new_empty((x.shape[0], w_q.shape[0]), dtype=_CODE_OUT[out_dtype])


def _linear_kernels(x, w_q, w_scale, bias, hadamard, out_dtype, path):
    """GPU / executor: the family's kernels, one op each (each routes itself)."""
    if hadamard:
        x_q, s = torch.ops.inferops.hadamard_quantize(x, _code(w_q))
    else:
        x_q, s = torch.ops.inferops.quantize_per_token(x, _code(w_q))
    b = None if bias is None else bias.float().contiguous()
    return torch.ops.inferops.w8a8_matmul(x_q, s, w_q, w_scale, b, out_dtype, path)


@ops.register_op("w8a8_linear", family="quant", fake=_fake, cuda_impl=_linear_kernels, cuda_kernel="w8a8_matmul")
def _linear_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               hadamard: bool, out_dtype: str, path: str) -> torch.Tensor:
    # the reference (CPU fallback): the ops' PyTorch references composed
    if hadamard:
        x_q, s = ref.hadamard_quantize(x, w_q.dtype)
    else:
        x_q, s = ref.quantize_per_token(x, w_q.dtype)
    b = None if bias is None else bias.float()
    return ref.w8a8_matmul(x_q, s, w_q, w_scale, _CODE_OUT[out_dtype], b).contiguous()


def _setup(ctx, inputs, output):
    x, w_q, w_scale, bias, hadamard, out_dtype, path = inputs
    ctx.save_for_backward(w_q, w_scale)
    ctx.hadamard, ctx.x_dtype = hadamard, x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    w_q, w_scale = ctx.saved_tensors
    compute = torch.float64 if grad.dtype == torch.float64 else torch.float32
    w = w_q.to(compute) * w_scale.to(compute)[:, None]  # the dequantized weight [N, K]
    dx = grad.to(compute) @ w
    if ctx.hadamard:
        dx = ref.hadamard_rotate(dx, compute_dtype=compute, transpose=True)
    db = None if ctx.bias_dtype is None else grad.sum(0).to(ctx.bias_dtype)
    return dx.to(ctx.x_dtype), None, None, db, None, None, None


_linear_op.register_autograd(_backward, setup_context=_setup)


def w8a8_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None, *, hadamard: bool = False,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Quantize ``x`` per token (after the online Hadamard rotation if ``hadamard``) and
    multiply by per-channel 8-bit weights; differentiable in ``x`` and ``bias``.

    Args:
        x: ``[..., K]`` fp16, bf16 or fp32 (fp16 / bf16 with ``hadamard``).
        weight_q: ``[N, K]`` int8 or ``torch.float8_e4m3fn``; the activations are quantized
            to the same dtype.
        weight_scale: ``[N]`` fp32.
        bias: ``[N]`` floating or None (added in fp32).
        hadamard: rotate ``x`` by ``H_K / sqrt(K)`` first (``K`` a supported Hadamard size).
        out_dtype: fp16 or bf16; default x's dtype when it is one of those, else bf16.

    Returns ``[..., N]`` in ``out_dtype``. Backward: see the module docstring (straight-through).
    """
    for name, t in (("x", x), ("weight_q", weight_q), ("weight_scale", weight_scale)):
        check_tensor(name, t)
    check_dtype("x", x, (torch.float16, torch.bfloat16) if hadamard else _X_DTYPES)
    check_dtype("weight_q", weight_q, W8A8_DTYPES)
    check_dtype("weight_scale", weight_scale, (torch.float32,))
    if weight_q.dim() != 2:
        raise ValueError(f"expected `weight_q` of shape [N, K], got {list(weight_q.shape)}")
    N, K = weight_q.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"expected `x` of shape [..., {K}] (in_features of `weight_q`), got {list(x.shape)}")
    if K % W8A8_K_ALIGN:
        raise ValueError(f"expected K (dim 1 of `weight_q`) a multiple of {W8A8_K_ALIGN}, got {K}")
    check_shape("weight_scale", weight_scale, (N,))
    if hadamard:
        hadamard_factorization(int(K))
    if out_dtype is None:
        out_dtype = x.dtype if x.dtype in _OUT_CODE else torch.bfloat16
    if out_dtype not in _OUT_CODE:
        raise TypeError(f"expected `out_dtype` torch.float16 or torch.bfloat16, got {out_dtype}")
    devs = {"x": x, "weight_q": weight_q, "weight_scale": weight_scale}
    if bias is not None:
        check_tensor("bias", bias)
        if not bias.is_floating_point():
            raise TypeError(f"expected a floating `bias`, got {bias.dtype}")
        check_shape("bias", bias, (N,))
        devs["bias"] = bias
    check_same_device(devs)
    lead = x.shape[:-1]
    y = torch.ops.inferops.w8a8_linear(x.reshape(lead.numel(), K).contiguous(), weight_q.contiguous(),
                                       weight_scale.contiguous(), bias, bool(hadamard), _OUT_CODE[out_dtype],
                                       _resolve_path("auto", weight_q.dtype))
    return y.reshape(*lead, N)


# --- main-job demo -------------------------------------------------------------------------


def _demo_mkn(device):
    return (4096, 4096, 4096) if device.type == "cuda" else (64, 256, 128)


def _demo_inputs(device, g):
    M, K, N = _demo_mkn(device)
    x = torch.randn(M, K, generator=g).to(device, torch.bfloat16)
    w_q, ws = ref.quantize_per_token((torch.randn(N, K, generator=g) * 0.05).to(device), torch.int8)
    return x, w_q, ws, (torch.randn(N, generator=g) * 0.1).to(device, torch.bfloat16)


def _demo_baseline(x, w_q, ws, bias):  # what a user without the op runs: dequantize, then matmul
    return torch.nn.functional.linear(x, (w_q.float() * ws[:, None]).to(x.dtype), bias)


def _demo_ref64(x, w_q, ws, bias):
    x_q, s = ref.quantize_per_token(x, w_q.dtype)
    return ref.w8a8_matmul(x_q, s, w_q, ws, torch.float64, bias, compute_dtype=torch.float64)


register_demo(Demo(
    op="w8a8_linear",
    sizes=lambda d: "int8 M={} K={} N={}".format(*_demo_mkn(d)),
    make_inputs=_demo_inputs,
    run=w8a8_linear,
    baseline=_demo_baseline,
    reference64=_demo_ref64,
    dtype=torch.bfloat16,
))
