"""simplified_linear_attention (SLAB); the drop-in modules with SLAB's signatures are in slab.py.

Kernel: csrc/linear_attention/sla.cu. Reference:
inferops.reference.linear_attention.simplified_linear_attention.
"""

from __future__ import annotations

import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from ..reference import linear_attention as ref
from ..validation import check_dtype, check_last_dim_contiguous, check_same_device, check_shape, check_tensor

__all__ = ["simplified_linear_attention"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (32, 64, 128)


def _sla_cuda(q, k, v, dwc_weight, dwc_bias, h, w):
    B, H, N, d = q.shape
    out = torch.empty((B, H, N, d), dtype=q.dtype, device=q.device)
    kv = torch.empty((B * H, d, d), dtype=torch.float32, device=q.device)
    ksum = torch.empty((B * H, d), dtype=torch.float32, device=q.device)
    ops.ext().simplified_linear_attention(
        ops.dlpack(q), ops.dlpack(k), ops.dlpack(v), ops.dlpack(dwc_weight),
        None if dwc_bias is None else ops.dlpack(dwc_bias), ops.dlpack(out), ops.dlpack(kv),
        ops.dlpack(ksum), h, w, ops.cuda_stream(q.device))
    return out


@ops.register_op("simplified_linear_attention", family="linear_attention",
                 fake=lambda q, *a: torch.empty(q.shape, dtype=q.dtype, device=q.device),
                 cuda_impl=_sla_cuda)
def _sla_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dwc_weight: torch.Tensor,
            dwc_bias: torch.Tensor | None, h: int, w: int) -> torch.Tensor:
    return ref.simplified_linear_attention(q, k, v, dwc_weight, dwc_bias, (h, w)).contiguous()


def simplified_linear_attention(q, k, v, dwc_weight, dwc_bias, hw) -> torch.Tensor:
    """SLAB's simplified linear attention with its depthwise-conv branch.

    Args:
        q, k, v: ``[batch, heads, N, d]``, fp16 / bf16 / fp32 (all the same), last dim
            contiguous (other strides free, e.g. views of a qkv projection);
            ``d`` in {32, 64, 128} on the GPU. Features are ReLU'd inside (no
            ``1/sqrt(d)`` scale, as in SLAB).
        dwc_weight: ``[d, 1, 5, 5]``, the depthwise conv shared by all heads (an
            ``nn.Conv2d(d, d, 5, padding=2, groups=d)`` weight); dwc_bias: ``[d]`` or None.
        hw: ``(h, w)``, the token grid (row-major, ``h * w == N``; ``h != w`` allowed).

    Returns:
        ``[batch, heads, N, d]`` in q's dtype, contiguous:
        ``relu(q) (relu(k)^T v) / (relu(q) . sum_j relu(k_j) + 1e-6) + dwc(v)``,
        accumulated in fp32 (two kernels: the ``relu(K)^T V`` / key-sum reduction,
        then the output with the normaliser and the conv).
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("dwc_weight", dwc_weight)):
        check_tensor(name, t)
    check_dtype("q", q, _DTYPES)
    check_dtype("k", k, (q.dtype,))
    check_dtype("v", v, (q.dtype,))
    if q.dim() != 4:
        raise ValueError(f"expected `q` of shape [batch, heads, N, d], got {list(q.shape)}")
    B, H, N, d = q.shape
    check_shape("k", k, tuple(q.shape))
    check_shape("v", v, tuple(q.shape))
    check_shape("dwc_weight", dwc_weight, (d, 1, 5, 5))
    if dwc_bias is not None:
        check_tensor("dwc_bias", dwc_bias)
        check_shape("dwc_bias", dwc_bias, (d,))
    try:
        h, w = (int(x) for x in hw)
    except (TypeError, ValueError):
        raise ValueError(f"expected `hw` = (h, w), got {hw!r}") from None
    if h < 1 or w < 1 or h * w != N:
        raise ValueError(f"expected `hw` = (h, w) with h * w == N = {N}, got {hw!r}")
    devs = {"q": q, "k": k, "v": v, "dwc_weight": dwc_weight}
    if dwc_bias is not None:
        devs["dwc_bias"] = dwc_bias
    check_same_device(devs)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    # the kernel's limit wherever it runs: a GPU, or the SIMT executor on CPU tensors
    if ops.kernel_backend("simplified_linear_attention", q.device) != "reference" and d not in KERNEL_HEAD_DIMS:
        raise ValueError(f"expected head dim 32, 64 or 128 for `q` on the GPU, got {d}")
    weight = dwc_weight.detach().float().reshape(d, 1, 5, 5).contiguous()
    bias = None if dwc_bias is None else dwc_bias.detach().float().contiguous()
    return torch.ops.inferops.simplified_linear_attention(q, k, v, weight, bias, h, w)


# --- main-job demo ------------------------------------------------------------------------


def _demo_shape(device):
    return (8, 3, 56, 56, 32) if device.type == "cuda" else (2, 3, 14, 14, 32)  # Swin stage 1


def _demo_inputs(device, g):
    B, H, hh, ww, d = _demo_shape(device)
    N = hh * ww

    def rand(*s):
        return torch.randn(*s, generator=g).to(device)

    return (rand(B, H, N, d).bfloat16(), rand(B, H, N, d).bfloat16(), rand(B, H, N, d).bfloat16(),
            rand(d, 1, 5, 5) * 0.2, rand(d) * 0.1, (hh, ww))


register_demo(Demo(
    op="simplified_linear_attention",
    sizes=lambda dv: "B={} heads={} grid={}x{} d={}".format(*_demo_shape(dv)),
    make_inputs=_demo_inputs,
    run=simplified_linear_attention,
    baseline=ref.simplified_linear_attention,
    reference64=lambda q, k, v, w, b, hw: ref.simplified_linear_attention(
        q.double(), k.double(), v.double(), w.double(), b.double(), hw, compute_dtype=torch.float64),
    dtype=torch.bfloat16,
))
