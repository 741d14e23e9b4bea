"""merge_states: log-sum-exp merge of two partial attention results.

Kernel: csrc/attention/merge_states.cu. Reference: inferops.reference.attention.
"""

from __future__ import annotations

import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from ..reference import attention as ref
from ..validation import (
    check_dtype,
    check_last_dim_contiguous,
    check_same_device,
    check_shape,
    check_tensor,
)

__all__ = ["merge_states", "merge_states_"]

_V_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate(v_a, lse_a, v_b, lse_b) -> None:
    for name, t in (("v_a", v_a), ("lse_a", lse_a), ("v_b", v_b), ("lse_b", lse_b)):
        check_tensor(name, t)
    check_dtype("v_a", v_a, _V_DTYPES)
    check_dtype("v_b", v_b, (v_a.dtype,))
    check_dtype("lse_a", lse_a, (torch.float32,))
    check_dtype("lse_b", lse_b, (torch.float32,))
    if v_a.dim() != 3:
        raise ValueError(
            f"expected `v_a` of shape [num_tokens, num_heads, head_dim], got {list(v_a.shape)}"
        )
    check_shape("v_b", v_b, tuple(v_a.shape))
    check_shape("lse_a", lse_a, tuple(v_a.shape[:2]))
    check_shape("lse_b", lse_b, tuple(v_a.shape[:2]))
    check_same_device({"v_a": v_a, "lse_a": lse_a, "v_b": v_b, "lse_b": lse_b})
    check_last_dim_contiguous("v_a", v_a)
    check_last_dim_contiguous("v_b", v_b)


def _launch(v_a, lse_a, v_b, lse_b, v_out, lse_out) -> None:
    ops.ext().merge_states(
        ops.dlpack(v_a),
        ops.dlpack(lse_a),
        ops.dlpack(v_b),
        ops.dlpack(lse_b),
        ops.dlpack(v_out),
        ops.dlpack(lse_out),
        ops.cuda_stream(v_a.device),
    )


# --- out of place --------------------------------------------------------------


def _merge_states_cuda(v_a, lse_a, v_b, lse_b):
    v_out = torch.empty(v_a.shape, dtype=v_a.dtype, device=v_a.device)
    lse_out = torch.empty(lse_a.shape, dtype=torch.float32, device=v_a.device)
    _launch(v_a, lse_a, v_b, lse_b, v_out, lse_out)
    return v_out, lse_out


def _merge_states_fake(v_a, lse_a, v_b, lse_b):
    return torch.empty_like(v_a, memory_format=torch.contiguous_format), torch.empty(
        lse_a.shape, dtype=torch.float32, device=lse_a.device
    )


@ops.register_op(
    "merge_states", family="attention", fake=_merge_states_fake, cuda_impl=_merge_states_cuda
)
def _merge_states_op(
    v_a: torch.Tensor, lse_a: torch.Tensor, v_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    v, lse = ref.merge_states(v_a, lse_a, v_b, lse_b)
    return v.contiguous(), lse.contiguous()


# --- in place --------------------------------------------------------------------


def _merge_states_inplace_cuda(v_a, lse_a, v_b, lse_b):
    _launch(v_a, lse_a, v_b, lse_b, v_a, lse_a)


@ops.register_op(
    "merge_states_",
    family="attention",
    mutates_args=("v_a", "lse_a"),
    fake=lambda v_a, lse_a, v_b, lse_b: None,
    cuda_impl=_merge_states_inplace_cuda,
    cuda_kernel="merge_states",
)
def _merge_states_inplace_op(
    v_a: torch.Tensor, lse_a: torch.Tensor, v_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    v, lse = ref.merge_states(v_a, lse_a, v_b, lse_b)
    v_a.copy_(v)
    lse_a.copy_(lse)


# --- public API --------------------------------------------------------------------


def merge_states(
    v_a: torch.Tensor, lse_a: torch.Tensor, v_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results over disjoint key sets.

    Args:
        v_a, v_b: ``[num_tokens, num_heads, head_dim]``, float16, bfloat16 or
            float32 (both the same), contiguous in the last dim; token and head
            strides are free.
        lse_a, lse_b: ``[num_tokens, num_heads]`` float32, the **natural-log**
            log-sum-exp of each partial's attention scores (FlashInfer uses base 2:
            multiply its LSE by ln 2 first). Any strides. ``-inf`` marks an empty
            partial (weight 0); if both are empty the output is ``v = 0``,
            ``lse = -inf``.

    Returns:
        ``(v, lse)``: ``v`` ``[num_tokens, num_heads, head_dim]`` in ``v_a.dtype``,
        contiguous; ``lse`` ``[num_tokens, num_heads]`` float32, contiguous.
        ``v = (w_a v_a + w_b v_b) / (w_a + w_b)`` with ``w = exp(lse - max(lse_a, lse_b))``,
        computed in float32.

    Raises:
        TypeError: a tensor has the wrong dtype (or is not a tensor).
        ValueError: shapes disagree, tensors are on different devices, or a
            ``v`` is not contiguous in its last dim.
    """
    _validate(v_a, lse_a, v_b, lse_b)
    return torch.ops.inferops.merge_states(v_a, lse_a, v_b, lse_b)


def merge_states_(
    v_a: torch.Tensor, lse_a: torch.Tensor, v_b: torch.Tensor, lse_b: torch.Tensor
) -> None:
    """In-place :func:`merge_states`: writes the merged state into ``v_a`` and ``lse_a``.

    Same shapes and dtypes as :func:`merge_states`; ``v_a`` and ``lse_a`` keep
    their strides (a strided ``lse_a`` view is updated through its strides).
    ``v_b``/``lse_b`` must not overlap ``v_a``/``lse_a``.
    """
    _validate(v_a, lse_a, v_b, lse_b)
    torch.ops.inferops.merge_states_(v_a, lse_a, v_b, lse_b)


# --- main-job demo ------------------------------------------------------------------


def _demo_shape(device: torch.device) -> tuple[int, int, int]:
    # GPU: 8M elements (the benchmark's target size); CPU: small enough to be quick.
    return (2048, 32, 128) if device.type == "cuda" else (256, 8, 128)


def _demo_inputs(device: torch.device, g: torch.Generator):
    T, H, D = _demo_shape(device)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    return (rand(T, H, D).bfloat16(), rand(T, H, scale=4.0), rand(T, H, D).bfloat16(),
            rand(T, H, scale=4.0))


def _demo_ref64(v_a, lse_a, v_b, lse_b):
    return ref.merge_states(v_a.double(), lse_a.double(), v_b.double(), lse_b.double(),
                            compute_dtype=torch.float64)


register_demo(
    Demo(
        op="merge_states",
        sizes=lambda d: "T={} H={} D={}".format(*_demo_shape(d)),
        make_inputs=_demo_inputs,
        run=merge_states,
        baseline=ref.merge_states,
        reference64=_demo_ref64,
        dtype=torch.bfloat16,
    )
)


def _merge_states_inplace_demo(v_a, lse_a, v_b, lse_b):
    merge_states_(v_a, lse_a, v_b, lse_b)
    return v_a, lse_a


def _merge_states_inplace_baseline(v_a, lse_a, v_b, lse_b):
    v, lse = ref.merge_states(v_a, lse_a, v_b, lse_b)
    v_a.copy_(v)
    lse_a.copy_(lse)
    return v_a, lse_a


register_demo(
    Demo(
        op="merge_states_",
        sizes=lambda d: "T={} H={} D={}".format(*_demo_shape(d)),
        make_inputs=_demo_inputs,
        run=_merge_states_inplace_demo,
        baseline=_merge_states_inplace_baseline,
        reference64=_demo_ref64,
        dtype=torch.bfloat16,
    )
)
