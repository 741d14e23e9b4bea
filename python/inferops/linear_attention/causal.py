"""causal_linear_attention (chunkwise, fla's layout) and linear_attention_step.

Kernels: csrc/linear_attention/causal.cu. References:
inferops.reference.linear_attention (chunkwise form = CPU fallback; the masked
quadratic form is the test oracle).

Feature maps are the caller's business (apply yours to q and k first), except
ReLU, which ``use_relu=True`` applies inside the kernel. The public call is fla's
``chunk_linear_attn`` (arguments, defaults incl. ``normalize=True``, state structure):
``scale`` multiplies q (default ``K ** -0.5``); with ``normalize``
``o_t = (scale q_t . S_t) / (scale q_t . z_t + 1e-10)``, ``z_t`` the running key sum, and
the state is fla's ``(kv_state [N, H, K, V], z_state [N, 1, H, K])``. The kernels keep it
packed as one fp32 ``[N, H, K, V + 1]`` tensor (the last column ``z``), so normalised
attention continues exactly across calls (prefill in pieces, then decode steps); the
wrappers convert between the two.
"""

from __future__ import annotations

import warnings

import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from ..reference import linear_attention as ref
from ..testing import Tolerance
from ..validation import (check_dtype, check_last_dim_contiguous, check_same_device, check_shape, check_tensor,
                          read_flags)

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


def _pack_state(name, state, n, H, K, V, normalize):
    """fla's state structure -> the kernels' fp32 ``[n, H, K, V (+1)]`` (the last column the key
    sum ``z`` when normalising). ``state``: a ``[n, H, K, V]`` tensor, or with ``normalize`` a
    ``(kv_state, z_state)`` tuple, ``z_state`` ``[n, 1, H, K]`` (either may be None: zeros).
    Returns None when there is no state at all."""
    if isinstance(state, (tuple, list)):
        if not normalize:
            raise TypeError(f"expected a tensor `{name}` with normalize=False (a (kv_state, z_state) "
                            f"tuple is the normalize=True state), got a {type(state).__name__}")
        if len(state) != 2:
            raise ValueError(f"expected `{name}` = (kv_state, z_state), got {len(state)} items")
        parts = ((f"{name}[0]", state[0], (n, H, K, V)), (f"{name}[1]", state[1], (n, 1, H, K)))
    else:
        parts = ((name, state, (n, H, K, V)), (None, None, None))
    for pname, t, shape in parts:
        if t is None:
            continue
        check_tensor(pname, t)
        if not t.is_floating_point():
            raise TypeError(f"expected a floating-point `{pname}`, got {str(t.dtype).replace('torch.', '')}")
        check_shape(pname, t, shape)
    kv, z = parts[0][1], parts[1][1]
    if kv is None and z is None:
        return None
    dev = (kv if kv is not None else z).device
    kv = kv.float() if kv is not None else torch.zeros(n, H, K, V, device=dev)
    if not normalize:
        return kv.contiguous()
    z = z.float().squeeze(1) if z is not None else torch.zeros(n, H, K, device=dev)
    if z.device != kv.device:
        raise ValueError(f"expected `{name}[1]` on the device of `{name}[0]` ({kv.device}), got {z.device}")
    return torch.cat([kv, z.unsqueeze(-1)], dim=-1).contiguous()


def _unpack_state(packed, V, normalize):
    """The kernels' packed state -> fla's structure: ``[n, H, K, V]``, or with ``normalize``
    ``(kv_state [n, H, K, V], z_state [n, 1, H, K])``, fp32."""
    if not normalize:
        return packed
    return packed[..., :V].contiguous(), packed[..., V].unsqueeze(1).contiguous()


def causal_linear_attention(q, k, v, scale=None, initial_state=None, output_final_state=False,
                            normalize=True, cu_seqlens=None, *, use_relu=False, validate=True):
    """Causal linear attention, chunkwise parallel (chunks of 64 tokens, tensor cores), with
    fla's ``chunk_linear_attn`` call: same arguments, defaults, state structure and results.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; fp16 or bf16, last dim contiguous;
            ``K`` in {32, 64, 128} on the GPU, any ``V``. Warns (as fla did) when
            ``T < H`` without ``cu_seqlens``: probably a ``[B, H, T, K]`` tensor.
        scale: multiplies q; default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``N`` = B, or the number of sequences with
            ``cu_seqlens``); with ``normalize`` also fla's tuple ``(kv_state, z_state)``,
            ``z_state`` ``[N, 1, H, K]`` the running key sum. Any float dtype (used in fp32).
        output_final_state: also return the state after the last token.
        normalize: divide by ``scale q_t . z_t + 1e-10``, ``z_t = z_0 + sum_{j<=t} k_j``
            (fla's key-sum normaliser; default True, as fla's chunk_linear_attn).
        cu_seqlens: ``[N + 1]`` int32 or int64 on q's device, with ``B == 1``: sequence
            ``i`` is tokens ``cu_seqlens[i]:cu_seqlens[i+1]`` (empty sequences allowed).
        use_relu: apply ReLU to q and k inside the kernel (SLAB's feature map).
        validate: check ``cu_seqlens`` values (eagerly one device sync; under torch.compile
            or CUDA-graph capture a device-side assertion, ``validation.read_flags``).

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in q's dtype; ``final_state`` None unless
        ``output_final_state``, then ``[N, H, K, V]`` fp32, or with ``normalize``
        ``(kv_state [N, H, K, V], z_state [N, 1, H, K])`` fp32.
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
        check_dtype("cu_seqlens", cu_seqlens, (torch.int32, torch.int64))
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
            raise ValueError(f"expected a 1-d `cu_seqlens` of length num_seqs + 1, got {list(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"expected batch 1 for `q` with cu_seqlens (sequences packed along T), got {B}")
        n = cu_seqlens.shape[0] - 1
        devs["cu_seqlens"] = cu_seqlens
    elif T < H:
        # fla's layout check: [B, T, H, K] with fewer tokens than heads is rare, a head-first
        # [B, H, T, K] tensor passed by mistake is not (it would run and be wrong).
        warnings.warn(f"causal_linear_attention: `q` {list(q.shape)} has T = {T} < H = {H}: inputs must be "
                      "[B, T, H, K] (time before heads); a [B, H, T, K] tensor gives wrong results",
                      stacklevel=2)
    if initial_state is not None:
        initial_state = _pack_state("initial_state", initial_state, n, H, K, V, normalize)
        if initial_state is not None:
            devs["initial_state"] = initial_state
    check_same_device(devs)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    # the kernel's limit wherever it runs: a GPU, or the SIMT executor on CPU tensors
    if ops.kernel_backend("causal_linear_attention", q.device) != "reference" and K not in KERNEL_KEY_DIMS:
        raise ValueError(f"expected key dim 32, 64 or 128 for `q` on the GPU, got {K}")
    if cu_seqlens is not None:
        if validate:
            lens = cu_seqlens[1:] - cu_seqlens[:-1]
            bad = read_flags(torch.stack([cu_seqlens[0] != 0, cu_seqlens[-1] != T, (lens < 0).any()]), (
                "expected cu_seqlens[0] == 0", f"expected cu_seqlens[-1] == T = {T}",
                "expected non-decreasing `cu_seqlens`"))
            if any(bad):
                raise ValueError(f"expected non-decreasing `cu_seqlens` from 0 to T = {T}, "
                                 f"got {cu_seqlens.tolist()}")
        # int64 offsets (what fla users pass) fit int32 whenever T does
        cu_seqlens = cu_seqlens.to(torch.int32)
    scale = K**-0.5 if scale is None else float(scale)
    o, final = torch.ops.inferops.causal_linear_attention(q, k, v, initial_state, cu_seqlens, scale,
                                                          bool(normalize), bool(use_relu))
    return o, (_unpack_state(final, V, normalize) if output_final_state else None)


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


def linear_attention_step(q, k, v, state, scale=None, normalize=None, *, use_relu=False):
    """One new token per sequence; updates ``state`` in place (CUDA-graph capturable).

    ``q, k``: ``[B, H, K]``; ``v``: ``[B, H, V]`` (fp16 / bf16 / fp32); ``state``: fla's
    structure as :func:`causal_linear_attention` returns it, fp32 contiguous: ``[B, H, K, V]``,
    or with ``normalize`` the tuple ``(kv_state [B, H, K, V], z_state [B, 1, H, K])``.
    ``normalize`` defaults to the structure (a tuple: True); an explicit value must agree.
    Returns ``(o [B, H, V], state)`` with ``o = scale q . (S + k^T v)`` (normalised as
    :func:`causal_linear_attention`), what the chunked op gives for the same token.
    The tuple form is packed into the kernel's ``[B, H, K, V + 1]`` and copied back (two
    extra passes over the state).
    """
    tup = isinstance(state, (tuple, list))
    if normalize is None:
        normalize = tup
    if bool(normalize) != tup:
        raise TypeError(f"expected `state` = (kv_state, z_state) with normalize=True and a tensor with "
                        f"normalize=False, got a {type(state).__name__} with normalize={normalize}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    check_dtype("q", q, (torch.float16, torch.bfloat16, torch.float32))
    check_dtype("k", k, (q.dtype,))
    check_dtype("v", v, (q.dtype,))
    if q.dim() != 3 or v.dim() != 3:
        raise ValueError(f"expected q, k [B, H, K] and v [B, H, V], got {list(q.shape)} and {list(v.shape)}")
    B, H, K = q.shape
    V = v.shape[-1]
    check_shape("k", k, (B, H, K))
    check_shape("v", v, (B, H, V))
    if tup and len(state) != 2:
        raise ValueError(f"expected `state` = (kv_state, z_state), got {len(state)} items")
    parts = (("state[0]", state[0]), ("state[1]", state[1])) if tup else (("state", state),)
    for name, t in parts:
        check_tensor(name, t)
        check_dtype(name, t, (torch.float32,))
        if not t.is_contiguous():
            raise ValueError(f"expected a contiguous `{name}` (it is updated in place)")
    check_shape(parts[0][0], parts[0][1], (B, H, K, V))
    if tup:
        check_shape("state[1]", state[1], (B, 1, H, K))
    check_same_device({"q": q, "k": k, "v": v, **dict(parts)})
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    scale = K**-0.5 if scale is None else float(scale)
    if not tup:
        o = torch.ops.inferops.linear_attention_step(q, k, v, state, scale, False, bool(use_relu))
        return o, state
    kv, z = state
    packed = torch.cat([kv, z.squeeze(1).unsqueeze(-1)], dim=-1)
    o = torch.ops.inferops.linear_attention_step(q, k, v, packed, scale, True, bool(use_relu))
    kv.copy_(packed[..., :V])
    z.copy_(packed[..., V].unsqueeze(1))
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
    run=lambda q, k, v: causal_linear_attention(q, k, v, output_final_state=True, normalize=False),
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
