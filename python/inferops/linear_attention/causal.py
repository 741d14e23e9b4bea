"""causal_linear_attention (chunkwise, fla's layout) and linear_attention_step.

Kernels: csrc/linear_attention/causal.cu. References:
inferops.reference.linear_attention (chunkwise form = CPU fallback; the masked
quadratic form is the test oracle).

Feature maps are the caller's business (apply yours to q and k first), except
ReLU, which ``use_relu=True`` applies inside the kernel. ``scale`` multiplies
q (default ``K ** -0.5``, as fla). State: ``[num_seqs, H, K, V]`` fp32; with
``normalize=True`` it has ``V + 1`` columns, the last holding the key sum, and
``o_t = (scale q_t . S_t[:, :V]) / (scale q_t . z_t + 1e-6)`` (the scale stays in the
denominator, so it sets the weight of the eps), so normalised attention
continues exactly across calls (prefill in pieces, then decode steps).
"""

from __future__ import annotations

import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from ..reference import linear_attention as ref
from ..testing import Tolerance
from ..validation import check_dtype, check_last_dim_contiguous, check_same_device, check_shape, check_tensor

__all__ = ["causal_linear_attention", "linear_attention_step"]

KERNEL_KEY_DIMS = (32, 64, 128)


def _state_cols(V: int, normalize: bool) -> int:
    return V + 1 if normalize else V


def _causal_cuda(q, k, v, initial_state, cu_seqlens, scale, normalize, use_relu):
    B, T, H, K = q.shape
    V = v.shape[-1]
    n = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = torch.empty((B, T, H, V), dtype=q.dtype, device=q.device)
    final = torch.empty((n, H, K, _state_cols(V, normalize)), dtype=torch.float32, device=q.device)
    d = ops.dlpack
    ops.ext().causal_linear_attention(
        d(q), d(k), d(v), d(o), None if initial_state is None else d(initial_state), d(final),
        None if cu_seqlens is None else d(cu_seqlens), scale, normalize, use_relu, ops.cuda_stream(q.device))
    return o, final


def _causal_fake(q, k, v, initial_state, cu_seqlens, scale, normalize, use_relu):
    B, T, H, K = q.shape
    n = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (q.new_empty((B, T, H, v.shape[-1])),
            q.new_empty((n, H, K, _state_cols(v.shape[-1], normalize)), dtype=torch.float32))


@ops.register_op("causal_linear_attention", family="linear_attention", fake=_causal_fake,
                 cuda_impl=_causal_cuda)
def _causal_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None,
               cu_seqlens: torch.Tensor | None, scale: float, normalize: bool,
               use_relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    o, final = ref.causal_linear_attention(q, k, v, scale=scale, initial_state=initial_state,
                                           normalize=normalize, use_relu=use_relu, cu_seqlens=cu_seqlens)
    return o.contiguous(), final.contiguous()


def causal_linear_attention(q, k, v, scale=None, initial_state=None, output_final_state=False,
                            normalize=False, cu_seqlens=None, *, use_relu=False, validate=True):
    """Causal linear attention, chunkwise parallel (chunks of 64 tokens, tensor cores).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; fp16 or bf16, last dim contiguous;
            ``K`` in {32, 64, 128} on the GPU, any ``V``.
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[num_seqs, H, K, V]`` fp32 (``V + 1`` columns when normalising).
        output_final_state: also return the state after the last token.
        normalize: divide by ``q_t . z_t`` (key-sum normaliser; see the module docstring).
        cu_seqlens: ``[num_seqs + 1]`` int32 on q's device, with ``B == 1``: sequence ``i``
            is tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` (empty sequences allowed).
        use_relu: apply ReLU to q and k inside the kernel (SLAB's feature map).
        validate: check ``cu_seqlens`` values (one device sync).

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in q's dtype; ``final_state`` as
        ``initial_state`` when ``output_final_state`` else None.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    check_dtype("q", q, (torch.float16, torch.bfloat16))
    check_dtype("k", k, (q.dtype,))
    check_dtype("v", v, (q.dtype,))
    if q.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q, k [B, T, H, K] and v [B, T, H, V], got {list(q.shape)} and {list(v.shape)}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    check_shape("k", k, (B, T, H, K))
    check_shape("v", v, (B, T, H, V))
    devs = {"q": q, "k": k, "v": v}
    n = B
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens)
        check_dtype("cu_seqlens", cu_seqlens, (torch.int32,))
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
            raise ValueError(f"expected a 1-d `cu_seqlens` of length num_seqs + 1, got {list(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"expected batch 1 for `q` with cu_seqlens (sequences packed along T), got {B}")
        n = cu_seqlens.shape[0] - 1
        devs["cu_seqlens"] = cu_seqlens
    if initial_state is not None:
        check_tensor("initial_state", initial_state)
        check_dtype("initial_state", initial_state, (torch.float32,))
        check_shape("initial_state", initial_state, (n, H, K, _state_cols(V, normalize)))
        devs["initial_state"] = initial_state
        initial_state = initial_state.contiguous()
    check_same_device(devs)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    # the kernel's limit wherever it runs: a GPU, or the SIMT executor on CPU tensors
    if ops.kernel_backend("causal_linear_attention", q.device) != "reference" and K not in KERNEL_KEY_DIMS:
        raise ValueError(f"expected key dim 32, 64 or 128 for `q` on the GPU, got {K}")
    if validate and cu_seqlens is not None:
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        first, last, neg = torch.stack([cu_seqlens[0], cu_seqlens[-1], (lens < 0).any().int()]).tolist()
        if first != 0 or last != T or neg:
            raise ValueError(f"expected non-decreasing `cu_seqlens` from 0 to T = {T}, "
                             f"got {cu_seqlens.tolist()}")
    scale = K**-0.5 if scale is None else float(scale)
    o, final = torch.ops.inferops.causal_linear_attention(q, k, v, initial_state, cu_seqlens, scale,
                                                          bool(normalize), bool(use_relu))
    return o, (final if output_final_state else None)


def _step_cuda(q, k, v, state, scale, normalize, use_relu):
    o = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    d = ops.dlpack
    ops.ext().linear_attention_step(d(q), d(k), d(v), d(state), d(o), scale, normalize, use_relu,
                                    ops.cuda_stream(q.device))
    return o


@ops.register_op("linear_attention_step", family="linear_attention", mutates_args=("state",),
                 fake=lambda q, k, v, state, *a: torch.empty(v.shape, dtype=q.dtype, device=q.device),
                 cuda_impl=_step_cuda)
def _step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, scale: float,
             normalize: bool, use_relu: bool) -> torch.Tensor:
    o, new = ref.linear_attention_step(q, k, v, state, scale=scale, normalize=normalize, use_relu=use_relu)
    state.copy_(new)
    return o


def linear_attention_step(q, k, v, state, scale=None, normalize=False, *, use_relu=False):
    """One new token per sequence; updates ``state`` in place (CUDA-graph capturable).

    ``q, k``: ``[B, H, K]``; ``v``: ``[B, H, V]`` (fp16 / bf16 / fp32); ``state``:
    ``[B, H, K, V]`` fp32 contiguous (``V + 1`` columns with ``normalize``), e.g. the
    ``final_state`` of :func:`causal_linear_attention`. Returns ``(o [B, H, V], state)``
    with ``o = scale q . (S + k^T v)`` (normalised if asked), as the chunked op gives
    for the same token.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("state", state)):
        check_tensor(name, t)
    check_dtype("q", q, (torch.float16, torch.bfloat16, torch.float32))
    check_dtype("k", k, (q.dtype,))
    check_dtype("v", v, (q.dtype,))
    check_dtype("state", state, (torch.float32,))
    if q.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q, k [B, H, K] and v [B, H, V], got {list(q.shape)} and {list(v.shape)}")
    B, H, K = q.shape
    V = v.shape[-1]
    check_shape("k", k, (B, H, K))
    check_shape("v", v, (B, H, V))
    check_shape("state", state, (B, H, K, _state_cols(V, normalize)))
    if not state.is_contiguous():
        raise ValueError("expected a contiguous `state` (it is updated in place)")
    check_same_device({"q": q, "k": k, "v": v, "state": state})
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    scale = K**-0.5 if scale is None else float(scale)
    o = torch.ops.inferops.linear_attention_step(q, k, v, state, scale, bool(normalize), bool(use_relu))
    return o, state


# --- main-job demos -------------------------------------------------------------------------


def _demo_shape(device):
    return (8, 4096, 32, 128) if device.type == "cuda" else (2, 130, 2, 64)


def _demo_inputs(device, g):
    B, T, H, K = _demo_shape(device)

    def rand(*s):
        return (torch.randn(*s, generator=g) * 0.5).to(device, torch.bfloat16)

    return rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, K)


def _demo_ref64(q, k, v):
    B, T, H, K = q.shape
    if q.is_cuda and T > 1024:  # the quadratic oracle's [T, T] is too big: use the chunked form in fp64
        return ref.causal_linear_attention(q.double(), k.double(), v.double(), compute_dtype=torch.float64)
    return ref.causal_linear_attention_quadratic(q, k, v)


register_demo(Demo(
    op="causal_linear_attention",
    sizes=lambda d: "B={} T={} H={} K=V={}".format(*_demo_shape(d)),
    make_inputs=_demo_inputs,
    run=lambda q, k, v: causal_linear_attention(q, k, v, output_final_state=True),
    baseline=lambda q, k, v: ref.causal_linear_attention(q, k, v),
    reference64=_demo_ref64,
    dtype=torch.bfloat16,
    # The kernel feeds the tensor cores bf16 operands (intra-chunk scores, the state), as fla
    # does: tests/linear_attention/test_causal.py checks bf16 outputs at 2e-2 as well.
    tolerance=Tolerance(atol=2e-2, rtol=2e-2),
    aux_tolerance=Tolerance(atol=2e-2, rtol=2e-2),
))


def _step_inputs(device, g):
    B, _, H, K = _demo_shape(device)

    def rand(*s):
        return (torch.randn(*s, generator=g) * 0.5).to(device, torch.bfloat16)

    state = torch.randn(B, H, K, K, generator=g).to(device)
    return rand(B, H, K), rand(B, H, K), rand(B, H, K), state


def _step_ref64(q, k, v, state):
    o, new = ref.linear_attention_step(q.double(), k.double(), v.double(), state.double())
    return o, new


register_demo(Demo(
    op="linear_attention_step",
    sizes=lambda d: "B={} H={} K=V={}".format(_demo_shape(d)[0], *_demo_shape(d)[2:]),
    make_inputs=_step_inputs,
    run=lambda q, k, v, s: linear_attention_step(q, k, v, s),
    baseline=lambda q, k, v, s: ref.linear_attention_step(q, k, v, s),
    reference64=_step_ref64,
    dtype=torch.bfloat16,
    aux_tolerance=Tolerance(atol=1e-4, rtol=1e-5),
))
