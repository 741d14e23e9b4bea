"""w4a16_matmul: ``y = x W^T (+ bias)`` with W an :class:`~inferops.quant.int4.Int4Weight`.

Kernel: csrc/quant/w4a16.cu. Reference (CPU fallback): inferops.reference.quant_w4a16.

Two GPU paths, both correct for every M:

* ``"fused"`` (decode, the default for ``M < DEQUANT_MIN_M``): weights streamed once,
  dequantized in registers into mma fragments, split-K over ``choose_splits`` CTAs
  (one thread-block cluster) per 64-column block so every SM streams weights at M = 1;
* ``"dequant"``: the int4_dequantize kernel writes W ``[N, K]`` in x's dtype, then
  ``torch.nn.functional.linear`` (cuBLAS). Above M ~ 64 the GEMM is compute bound
  and cuBLAS's wgmma kernels win over an mma.sync kernel; the crossover has not
  been measured yet: bench/quant/bench_w4a16.py times both at M = 64, 256, 4096
  so a GPU run can set :data:`DEQUANT_MIN_M`.
"""

from __future__ import annotations

import functools
import math

import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from ..reference import quant_w4a16 as ref
from ..validation import check_dtype, check_same_device, check_shape, check_tensor
from .int4 import Int4Weight, _check_weight, pack_int4

__all__ = ["DEQUANT_MIN_M", "PATHS", "choose_splits", "w4a16_matmul"]

# Default crossover (M >= this: dequantize + cuBLAS). A documented guess until a
# GPU run measures it (bench/quant/bench_w4a16.py prints both paths).
DEQUANT_MIN_M = 65
PATHS = ("auto", "fused", "dequant")
MAX_SPLITS = 8  # csrc/quant/quant_w4a16.h kW4MaxSplits: the split CTAs form one cluster
_WARPS = 4  # kW4Warps
# Resident CTAs per SM of the 16 / 32 / 64-row kernels, from the 64K-register file:
# 128 / 164 (allocated 168) / 220 (allocated 224) registers x 128 threads = 16K / 21K / 28K
# registers -> 4 / 3 / 2 CTAs (shared memory, 18 / 37 / 74 KB each, allows as many).
_CTAS_PER_SM = {16: 4, 32: 3, 64: 2}


def _m_block(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def choose_splits(m: int, n: int, k: int, sm_count: int) -> int:
    """Split-K factor of the fused kernel: enough CTAs to fill every SM once at the
    kernel's occupancy, but each warp keeps >= 4 k16 tiles (one unrolled batch of
    16-byte weight loads) and at most 8 splits (one portable thread-block cluster;
    the splits are summed through distributed shared memory, no workspace)."""
    mb = _m_block(max(m, 1))
    ctas = (n // 64) * math.ceil(max(m, 1) / mb)
    want = math.ceil(_CTAS_PER_SM[mb] * sm_count / max(ctas, 1))
    by_tiles = (k // 16) // (_WARPS * 4)
    return int(max(1, min(want, by_tiles, MAX_SPLITS)))


@functools.cache
def _sm_count(index: int) -> int:
    """SMs usable for split-K: split-K reduces through a thread-block cluster (sm_90+); on
    older GPUs this returns 0, which makes choose_splits pick 1 (no cluster)."""
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count if props.major >= 9 else 0


def _device_sm_count(device: torch.device) -> int:
    """_sm_count for the device the fused kernel runs on. A CPU tensor reaches the kernel only
    on the SIMT executor, which has no torch.cuda device: ask its module for the device it
    models (sm_90, 132 SMs)."""
    if device.type != "cuda":
        info = ops.kernel_device_info(device)
        return int(info["sm_count"]) if info["compute_capability"][0] >= 9 else 0
    return _sm_count(device.index if device.index is not None else 0)


def _use_dequant(m: int, path: str) -> bool:
    return path == "dequant" or (path == "auto" and m >= DEQUANT_MIN_M)


def _matmul_cuda(x, qweight, scales, zeros, bias, group_size, path):
    M, K = x.shape
    N = scales.shape[1]
    d = ops.dlpack
    stream = ops.cuda_stream(x.device)
    if _use_dequant(M, path):
        w = torch.empty((N, K), dtype=scales.dtype, device=x.device)
        ops.ext().int4_dequantize(d(qweight), d(scales), None if zeros is None else d(zeros), d(w), group_size,
                                  stream)
        return torch.nn.functional.linear(x, w, bias)
    x = x.contiguous()
    if x.data_ptr() % 16:  # a row-offset view: the kernel wants 16-byte aligned rows
        x = x.clone()
    bias = None if bias is None else bias.contiguous()
    splits = choose_splits(M, N, K, _device_sm_count(x.device))
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    ops.ext().w4a16_matmul(d(x), d(qweight), d(scales), None if zeros is None else d(zeros),
                           None if bias is None else d(bias), d(out), group_size, splits, stream)
    return out


def _matmul_fake(x, qweight, scales, zeros, bias, group_size, path):
    return x.new_empty((x.shape[0], scales.shape[1]))


@ops.register_op("w4a16_matmul", family="quant", fake=_matmul_fake, cuda_impl=_matmul_cuda)
def _matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               bias: torch.Tensor | None, group_size: int, path: str) -> torch.Tensor:
    # fp32 math for fp16 / bf16 (the kernels' accumulation); float64 inputs (gradcheck on the
    # op itself) stay in float64
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return ref.w4a16_matmul(x, qweight, scales, zeros, bias, group_size, compute_dtype=compute)


def _matmul_setup(ctx, inputs, output):
    x, qweight, scales, zeros, bias, group_size, path = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size = group_size
    ctx.bias_grad = bias is not None


def _matmul_backward(ctx, grad):
    """Gradients to ``x`` and ``bias`` only (the int4 weight is frozen): ``dx = dy @ W`` with
    W dequantized exactly as the forward uses it (one int4_dequantize kernel on the GPU)."""
    qweight, scales, zeros = ctx.saved_tensors
    w = torch.ops.inferops.int4_dequantize(qweight, scales, zeros, ctx.group_size)
    dx = grad @ w.to(grad.dtype)
    db = grad.sum(0) if ctx.bias_grad else None
    return dx, None, None, None, db, None, None


_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup)


def w4a16_matmul(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None = None, *,
                 path: str = "auto") -> torch.Tensor:
    """``y = x @ W^T (+ bias)`` with int4 weights, fp32 accumulation.

    Args:
        x: ``[..., K]`` fp16 or bf16 (the dtype of ``w.scales``); any strides (copied
            to a contiguous ``[M, K]`` if needed).
        w: :class:`Int4Weight` ``[N, K]`` from :func:`pack_int4` / :func:`pack_int4_quantized`,
            on x's device.
        bias: ``[N]`` in x's dtype, or None.
        path: ``"auto"`` (fused kernel for ``M < DEQUANT_MIN_M``, else dequantize +
            cuBLAS), ``"fused"`` or ``"dequant"`` to force one (benchmarks, tests).

    Returns:
        ``[..., N]`` in x's dtype.
    """
    _check_weight(w)
    check_tensor("x", x)
    check_dtype("x", x, (torch.float16, torch.bfloat16))
    if x.dtype != w.scales.dtype:
        raise TypeError(f"expected `x` in the dtype of w.scales ({str(w.scales.dtype).replace('torch.', '')}), "
                        f"got {str(x.dtype).replace('torch.', '')} (convert the weight with w.to(dtype=...))")
    if x.dim() < 1 or x.shape[-1] != w.in_features:
        raise ValueError(f"expected `x` of shape [..., {w.in_features}] (in_features of `w`), got {list(x.shape)}")
    devs = {"x": x, "w": w.qweight}
    if bias is not None:
        check_tensor("bias", bias)
        check_dtype("bias", bias, (x.dtype,))
        check_shape("bias", bias, (w.out_features,))
        devs["bias"] = bias
    check_same_device(devs)
    if path not in PATHS:
        raise ValueError(f"expected `path` one of {PATHS}, got {path!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.in_features)
    y = torch.ops.inferops.w4a16_matmul(x2, w.qweight, w.scales, w.zeros, bias, w.group_len, path)
    return y.reshape(*lead, w.out_features)


# --- main-job demo -------------------------------------------------------------------------


def _demo_shape(device):
    return (16, 4096, 4096) if device.type == "cuda" else (5, 512, 256)  # M, K, N


def _demo_inputs(device, g):
    M, K, N = _demo_shape(device)
    w = pack_int4((torch.randn(N, K, generator=g) * 0.02).to(device), 128, dtype=torch.bfloat16)
    x = torch.randn(M, K, generator=g).to(device, torch.bfloat16)
    bias = (torch.randn(N, generator=g) * 0.1).to(device, torch.bfloat16)
    return x, w, bias


def _demo_baseline(x, w, bias):  # what a user without the kernel runs: dequantize, then matmul
    return torch.nn.functional.linear(x, ref.dequantize(w.qweight, w.scales, w.zeros, w.group_len), bias)


def _ref64(x, w, bias):
    return ref.w4a16_matmul(x, w.qweight, w.scales, w.zeros, bias, w.group_len, compute_dtype=torch.float64,
                            out_dtype=torch.float64)


register_demo(Demo(
    op="w4a16_matmul",
    sizes=lambda d: "M={} K={} N={} g128 sym".format(*_demo_shape(d)),
    make_inputs=_demo_inputs,
    run=lambda x, w, b: w4a16_matmul(x, w, b),
    baseline=_demo_baseline,
    reference64=_ref64,
    dtype=torch.bfloat16,
))
