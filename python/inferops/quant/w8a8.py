"""W8A8 matmul (INT8 and FP8 e4m3) with per-token x per-channel scales, and per-token quantization.

Kernels: csrc/quant/w8a8.cu (GEMM and quantize). Reference: inferops.reference.quant_w8a8.
"""

from __future__ import annotations

import os

import torch

from .._core import ops
from .._core.extension import build_info
from .._core.demos import Demo, register_demo
from ..reference import quant_w8a8 as ref
from ..validation import check_dtype, check_same_device, check_shape, check_tensor

__all__ = [
    "W8A8_DTYPES",
    "W8A8_K_ALIGN",
    "W8A8_PATHS",
    "quantize_per_token",
    "quantize_weight_per_channel",
    "w8a8_matmul",
]

W8A8_DTYPES = (torch.int8, torch.float8_e4m3fn)
W8A8_K_ALIGN = 16  # K % 16 == 0: whole 16-byte cp.async chunks of 8-bit rows
W8A8_MAX_K = 131072  # int8: K * 127 * 127 must stay below 2^31 in the int32 accumulator
_OUT_DTYPES = (torch.float16, torch.bfloat16)
_IN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_CODE = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}
_OUT_CODE = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_CODE_OUT = {v: k for k, v in _OUT_CODE.items()}
# GEMM kernel choice (CUDA only; the CPU fallback is the reference whatever the path):
# "mma" = mma.sync kernel (w8a8.cu, the default), "wgmma" = experimental FP8-only sm_90a
# kernel (w8a8_wgmma.cu, opt-in, not yet validated on a GPU), "auto" = "mma" unless the
# environment variable INFEROPS_W8A8_PATH names another path (for benchmarking).
W8A8_PATHS = ("auto", "mma", "wgmma")
W8A8_PATH_ENV = "INFEROPS_W8A8_PATH"


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous) with a 16-byte aligned base: the kernels load rows with 16-byte
    vectors. Called inside the CUDA implementations (data_ptr is not traceable)."""
    return t.clone() if t.data_ptr() % 16 else t


# --- quantize_per_token --------------------------------------------------------------------


def _quant_cuda(x: torch.Tensor, dtype: str):
    qdt = _CODE_DTYPE[dtype]
    x = _aligned16(x)
    q = torch.empty(x.shape, dtype=qdt, device=x.device)
    scale = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if x.numel() > 0:
        ops.ext().quantize_per_token(ops.dlpack(x), ops.dlpack(q), ops.dlpack(scale),
                                     ops.cuda_stream(x.device))
    elif x.shape[0] > 0:
        scale.fill_(ref.SCALE_MIN)
    return q, scale


def _quant_fake(x, dtype):
    return (torch.empty(x.shape, dtype=_CODE_DTYPE[dtype], device=x.device),
            torch.empty(x.shape[0], dtype=torch.float32, device=x.device))


@ops.register_op("quantize_per_token", family="quant", fake=_quant_fake, cuda_impl=_quant_cuda)
def _quant_op(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = ref.quantize_per_token(x, _CODE_DTYPE[dtype])
    return q.contiguous(), s.contiguous()


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype = torch.int8):
    """Symmetric dynamic per-token (per-row) quantization.

    Args:
        x: ``[..., K]`` fp16, bf16 or fp32.
        dtype: ``torch.int8`` (``qmax = 127``) or ``torch.float8_e4m3fn`` (``qmax = 448``).

    Returns:
        ``(x_q, scale)``: ``x_q`` ``[..., K]`` in ``dtype``, contiguous; ``scale`` ``[...]``
        fp32 with ``scale = max(amax(|row|) / qmax, 1e-10)`` and
        ``x_q = round_half_even(x / scale)`` (IEEE fp32 division; the CUDA kernel uses the
        same operations as the reference, so they agree bit for bit). All-zero rows get
        scale 1e-10 and zeros (no NaN/inf).
    """
    check_tensor("x", x)
    check_dtype("x", x, _IN_DTYPES)
    if dtype not in W8A8_DTYPES:
        raise TypeError(f"expected `dtype` torch.int8 or torch.float8_e4m3fn, got {dtype}")
    if x.dim() < 1:
        raise ValueError("expected `x` with at least 1 dim [..., K], got a 0-dim tensor")
    lead, k = x.shape[:-1], x.shape[-1]
    # lead.numel(), not -1: reshape(-1, 0) is ambiguous and raises for K = 0
    q, s = torch.ops.inferops.quantize_per_token(x.reshape(lead.numel(), k).contiguous(), _DTYPE_CODE[dtype])
    return q.reshape(*lead, k), s.reshape(lead)


def quantize_weight_per_channel(w: torch.Tensor, dtype: torch.dtype = torch.int8):
    """Offline symmetric per-output-channel weight quantization (RTN): ``w`` ``[N, K]`` ->
    (``[N, K]`` int8 / fp8, ``[N]`` fp32 scale). Same rule as :func:`quantize_per_token`
    applied to the rows of ``w`` (nn.Linear layout); runs through the reference on any device."""
    check_tensor("w", w)
    check_dtype("w", w, _IN_DTYPES + (torch.float64,))
    if dtype not in W8A8_DTYPES:
        raise TypeError(f"expected `dtype` torch.int8 or torch.float8_e4m3fn, got {dtype}")
    if w.dim() != 2:
        raise ValueError(f"expected `w` of shape [N, K], got {list(w.shape)}")
    return ref.quantize_per_token(w.detach(), dtype)


# --- w8a8_matmul ---------------------------------------------------------------------------


def _mm_cuda(x_q, x_scale, w_q, w_scale, bias, out_dtype, path):
    M, N = x_q.shape[0], w_q.shape[0]
    x_q, w_q = _aligned16(x_q), _aligned16(w_q)
    out = torch.empty((M, N), dtype=_CODE_OUT[out_dtype], device=x_q.device)
    if M > 0 and N > 0:
        ops.ext().w8a8_matmul(ops.dlpack(x_q), ops.dlpack(x_scale), ops.dlpack(w_q), ops.dlpack(w_scale),
                              None if bias is None else ops.dlpack(bias), ops.dlpack(out),
                              ops.cuda_stream(x_q.device), path)
    return out


def _mm_fake(x_q, x_scale, w_q, w_scale, bias, out_dtype, path):
    return torch.empty((x_q.shape[0], w_q.shape[0]), dtype=_CODE_OUT[out_dtype], device=x_q.device)


@ops.register_op("w8a8_matmul", family="quant", fake=_mm_fake, cuda_impl=_mm_cuda)
def _mm_op(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: str, path: str) -> torch.Tensor:
    return ref.w8a8_matmul(x_q, x_scale, w_q, w_scale, _CODE_OUT[out_dtype], bias).contiguous()


def _resolve_path(path, qdtype) -> str:
    """The concrete kernel path ("mma" or "wgmma") for `path` and the input dtype."""
    if path not in W8A8_PATHS:
        raise ValueError(f"expected `path` one of {W8A8_PATHS}, got {path!r}")
    if path == "auto":
        env = os.environ.get(W8A8_PATH_ENV, "") or "auto"
        if env not in W8A8_PATHS:
            raise ValueError(f"expected environment variable {W8A8_PATH_ENV} one of {W8A8_PATHS} or unset, "
                             f"got {env!r}")
        path = "wgmma" if env == "wgmma" and qdtype == torch.float8_e4m3fn else "mma"
    if path == "wgmma" and qdtype != torch.float8_e4m3fn:
        raise TypeError(f"expected `x_q` torch.float8_e4m3fn for path='wgmma' (FP8 only), got {qdtype}")
    return path


def w8a8_matmul(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16, bias: torch.Tensor | None = None,
                path: str = "auto") -> torch.Tensor:
    """``y = (x_q @ w_q^T) * x_scale[:, None] * w_scale[None, :] + bias`` on 8-bit tensor cores.

    Args:
        x_q: ``[..., K]`` int8 or fp8 e4m3 (``torch.float8_e4m3fn``), activations quantized per
            token (e.g. by :func:`quantize_per_token` or :func:`hadamard_quantize`).
        x_scale: ``[...]`` fp32, one scale per token.
        w_q: ``[N, K]`` same dtype as ``x_q`` (nn.Linear layout: K contiguous).
        w_scale: ``[N]`` fp32, one scale per output channel.
        out_dtype: ``torch.float16`` or ``torch.bfloat16``.
        bias: ``[N]`` (any float dtype, applied in fp32) or None.
        path: GEMM kernel on CUDA: ``"mma"`` (mma.sync, INT8 and FP8), ``"wgmma"``
            (experimental FP8-only kernel on Hopper's native FP8 tensor cores, sm_90a only,
            opt-in, not yet validated on a GPU) or ``"auto"`` (``"mma"``, unless the
            environment variable ``INFEROPS_W8A8_PATH`` is ``"mma"`` / ``"wgmma"``; an
            env ``"wgmma"`` applies to FP8 inputs only, INT8 stays on ``"mma"``). On the
            CPU every path is the reference; ``"wgmma"`` with int8 is a ``TypeError``
            everywhere.

    ``K`` must be a multiple of 16 (and at most 131072, so the int32 accumulator cannot
    overflow). Accumulation is exact in int32 (INT8) or fp32 (FP8); the scales and bias
    are applied in fp32 in the epilogue.

    Returns:
        ``[..., N]`` in ``out_dtype``, contiguous.
    """
    for name, t in (("x_q", x_q), ("x_scale", x_scale), ("w_q", w_q), ("w_scale", w_scale)):
        check_tensor(name, t)
    check_dtype("x_q", x_q, W8A8_DTYPES)
    check_dtype("w_q", w_q, (x_q.dtype,))
    check_dtype("x_scale", x_scale, (torch.float32,))
    check_dtype("w_scale", w_scale, (torch.float32,))
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"expected `out_dtype` torch.float16 or torch.bfloat16, got {out_dtype}")
    if x_q.dim() < 1:
        raise ValueError("expected `x_q` of shape [..., K], got a 0-dim tensor")
    if w_q.dim() != 2:
        raise ValueError(f"expected `w_q` of shape [N, K], got {list(w_q.shape)}")
    lead, K = x_q.shape[:-1], x_q.shape[-1]
    N = w_q.shape[0]
    check_shape("w_q", w_q, (N, K))
    check_shape("x_scale", x_scale, tuple(lead))
    check_shape("w_scale", w_scale, (N,))
    if K % W8A8_K_ALIGN:
        raise ValueError(f"expected K (last dim of `x_q` and `w_q`) a multiple of {W8A8_K_ALIGN} "
                         f"(16-byte rows of 8-bit values), got K = {K}")
    if K > W8A8_MAX_K:
        raise ValueError(f"expected K <= {W8A8_MAX_K} (int32 accumulation), got K = {K}")
    path = _resolve_path(path, x_q.dtype)
    if path == "wgmma" and x_q.is_cuda and ops.kernel_backend("w8a8_matmul", x_q.device) == "cuda":
        archs = str(build_info().get("cuda_archs", "")).replace(";", ",").split(",")
        if "90a" not in archs:  # without the arch-specific target the kernel body is compiled out
            raise ValueError(f"expected an extension built for sm_90a (INFEROPS_CUDA_ARCHS with 90a) for "
                             f"path='wgmma', got archs {build_info().get('cuda_archs')!r}")
    devs = {"x_q": x_q, "x_scale": x_scale, "w_q": w_q, "w_scale": w_scale}
    if bias is not None:
        check_tensor("bias", bias)
        check_dtype("bias", bias, _IN_DTYPES)
        check_shape("bias", bias, (N,))
        devs["bias"] = bias
    check_same_device(devs)
    b = None if bias is None else bias.detach().float().contiguous()
    y = torch.ops.inferops.w8a8_matmul(x_q.reshape(lead.numel(), K).contiguous(), x_scale.reshape(-1).contiguous(),
                                       w_q.contiguous(), w_scale.contiguous(), b, _OUT_CODE[out_dtype], path)
    return y.reshape(*lead, N)


# --- main-job demos -------------------------------------------------------------------------


def _demo_mkn(device):
    return (4096, 4096, 4096) if device.type == "cuda" else (64, 256, 128)


def _demo_mm_inputs(device, g):
    M, K, N = _demo_mkn(device)
    x = torch.randn(M, K, generator=g).to(device)
    w = torch.randn(N, K, generator=g).to(device) * 0.05
    x_q, xs = ref.quantize_per_token(x, torch.float8_e4m3fn)
    w_q, ws = ref.quantize_per_token(w, torch.float8_e4m3fn)
    return x_q, xs, w_q, ws, torch.bfloat16, (torch.randn(N, generator=g) * 0.1).to(device)


register_demo(Demo(
    op="w8a8_matmul",
    sizes=lambda d: "fp8 M={} K={} N={}".format(*_demo_mkn(d)),
    make_inputs=_demo_mm_inputs,
    run=w8a8_matmul,
    baseline=ref.w8a8_matmul,
    reference64=lambda xq, xs, wq, ws, od, b: ref.w8a8_matmul(xq, xs, wq, ws, torch.float64, b,
                                                              compute_dtype=torch.float64),
    dtype=torch.bfloat16,
))


def _demo_quant_inputs(device, g):
    M, K, _ = _demo_mkn(device)
    return (torch.randn(M, K, generator=g).to(device).bfloat16(), torch.int8)


register_demo(Demo(
    op="quantize_per_token",
    sizes=lambda d: "int8 M={} K={}".format(*_demo_mkn(d)[:2]),
    make_inputs=_demo_quant_inputs,
    run=quantize_per_token,
    baseline=ref.quantize_per_token,
    reference64=lambda x, dt: tuple(t.double() for t in ref.quantize_per_token(x, dt)),
    dtype=torch.float64,  # bit-exact: same IEEE operations as the reference
))
