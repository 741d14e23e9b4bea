"""routing_layout, permute and unpermute: the single-GPU kernels of MoE dispatch.

Kernels: csrc/moe/layout.cu, csrc/moe/permute.cu. References: inferops.reference.moe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from ..reference import moe as ref
from ..validation import check_dtype, check_same_device, check_shape, check_tensor, read_flags

__all__ = ["RoutingLayout", "routing_layout", "permute", "unpermute", "default_placement"]

_LAYOUT_FIELDS = ("tokens_per_expert", "expert_offsets", "dst_index", "src_index", "tokens_per_rank",
                  "send_index", "send_offsets", "errors")


@dataclass(frozen=True)
class RoutingLayout:
    """Where every (token, top-k slot) goes; all int32 tensors on the ids' device.

    ``tokens_per_expert [E]``; ``expert_offsets [E + 1]``: expert e's rows of the
    expert-major buffer start at ``expert_offsets[e]`` (a multiple of ``align``);
    ``dst_index [T, k]``: the row of each assignment, -1 if dropped;
    ``src_index [capacity]``: the token of each row, -1 for padding;
    ``tokens_per_rank [R]``: tokens sent to each rank (once per token, however many
    of its experts are there); ``send_index [T, R]``: position in rank r's send
    block, -1 if not sent; ``send_offsets [R + 1]``; ``errors [2]``: (assignments
    with an expert id out of range, assignments beyond ``capacity``), dropped.
    ``tokens_per_expert``/``expert_offsets`` still count capacity-dropped
    assignments: after an overflow, clamp the rows read to ``capacity``.
    Within an expert rows follow (token, slot) order; within a send block, token
    order.
    """

    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    dst_index: torch.Tensor
    src_index: torch.Tensor
    tokens_per_rank: torch.Tensor
    send_index: torch.Tensor
    send_offsets: torch.Tensor
    errors: torch.Tensor
    capacity: int
    align: int

    def check(self) -> None:
        """Raise ValueError if any assignment was dropped (one device sync; under torch.compile
        or CUDA-graph capture a device-side assertion instead, ``validation.read_flags``)."""
        bad_ids, over = read_flags(self.errors != 0, (
            f"expected every top-k expert id in [0, {self.tokens_per_expert.shape[0]}) (placed on a valid rank)",
            f"expected at most capacity = {self.capacity} rows (align {self.align}): assignments were dropped"))
        if bad_ids or over:
            bad_ids, over = self.errors.tolist()
        if bad_ids:
            raise ValueError(f"{bad_ids} top-k assignment(s) name an expert id out of range "
                             f"[0, {self.tokens_per_expert.numel()}) (or an expert placed on no valid rank)")
        if over:
            raise ValueError(f"{over} assignment(s) exceed the capacity of {self.capacity} rows "
                             f"(align {self.align}); they were dropped")


def default_placement(num_experts: int, world_size: int, device=None) -> torch.Tensor:
    """Experts in contiguous blocks: expert e on rank e * world_size // num_experts."""
    return (torch.arange(num_experts, device=device) * world_size // num_experts).to(torch.int32)


def _layout_cuda(topk_ids, placement, world_size, align, capacity):
    T, k = topk_ids.shape
    E = placement.numel()
    dev = topk_ids.device
    empty = lambda *s: torch.empty(s, dtype=torch.int32, device=dev)  # noqa: E731
    outs = (empty(E), empty(E + 1), empty(T, k), empty(capacity), empty(world_size), empty(T, world_size),
            empty(world_size + 1), empty(2))
    ops.ext().routing_layout(ops.dlpack(topk_ids), ops.dlpack(placement), *(ops.dlpack(o) for o in outs),
                             align, ops.cuda_stream(dev))
    return outs


def _layout_fake(topk_ids, placement, world_size, align, capacity):
    T, k = topk_ids.shape
    E = placement.shape[0]
    n = lambda *s: topk_ids.new_empty(s, dtype=torch.int32)  # noqa: E731
    return (n(E), n(E + 1), n(T, k), n(capacity), n(world_size), n(T, world_size), n(world_size + 1), n(2))


@ops.register_op("routing_layout", family="moe", fake=_layout_fake, cuda_impl=_layout_cuda)
def _layout_op(topk_ids: torch.Tensor, placement: torch.Tensor, world_size: int, align: int,
               capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor, torch.Tensor, torch.Tensor]:
    return ref.routing_layout(topk_ids, placement, world_size, align, capacity)


def routing_layout(topk_ids: torch.Tensor, num_experts: int, *, placement: torch.Tensor | None = None,
                   world_size: int = 1, align: int = 1, capacity: int | None = None,
                   validate: bool = True) -> RoutingLayout:
    """Compute the dispatch layout of ``topk_ids`` on its device, without host sync.

    Args:
        topk_ids: ``[T, k]`` int32 or int64 expert ids (the router's top-k).
        num_experts: E (1..1024).
        placement: ``[E]`` int32, expert -> rank; default :func:`default_placement`.
        world_size: R (1..64).
        align: pad each expert's rows to a multiple of this (8/16/64/128 for grouped GEMM).
        capacity: rows of the expert-major buffer (static, for CUDA graphs); default
            ``T * k + E * (align - 1)``, which never overflows. With a smaller capacity,
            assignments past it are **dropped** (``dst_index = -1``) and counted in
            ``errors[1]``: never written out of bounds.
        validate: call :meth:`RoutingLayout.check` (one sync); pass False in graph capture
            and call ``check()`` later.
    """
    check_tensor("topk_ids", topk_ids)
    check_dtype("topk_ids", topk_ids, (torch.int32, torch.int64))
    if topk_ids.dim() != 2:
        raise ValueError(f"expected `topk_ids` of shape [T, k], got {list(topk_ids.shape)}")
    if not 1 <= num_experts <= 1024:
        raise ValueError(f"expected 1 <= num_experts <= 1024, got {num_experts}")
    if not 1 <= world_size <= 64:
        raise ValueError(f"expected 1 <= world_size <= 64, got {world_size}")
    if not 1 <= align <= 1024:
        raise ValueError(f"expected 1 <= align <= 1024, got {align}")
    T, k = topk_ids.shape
    if placement is None:
        placement = default_placement(num_experts, world_size, topk_ids.device)
    check_tensor("placement", placement)
    check_dtype("placement", placement, (torch.int32,))
    check_shape("placement", placement, (num_experts,))
    check_same_device({"topk_ids": topk_ids, "placement": placement})
    if capacity is None:
        capacity = T * k + num_experts * (align - 1)
    if capacity < 0:
        raise ValueError(f"expected capacity >= 0, got {capacity}")
    outs = torch.ops.inferops.routing_layout(topk_ids.contiguous(), placement.contiguous(), world_size,
                                             align, capacity)
    layout = RoutingLayout(*outs, capacity=capacity, align=align)
    if validate:
        layout.check()
    return layout


# --- permute / unpermute -----------------------------------------------------------------------


def _permute_cuda(x, src_index, dst_index):
    out = torch.empty((src_index.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
    ops.ext().permute(ops.dlpack(x), ops.dlpack(src_index), ops.dlpack(dst_index), ops.dlpack(out),
                      ops.cuda_stream(x.device))
    return out


# dst_index (the layout's [T, k] slots) lets the kernel read each token once and write its k
# rows; the result is defined by src_index alone (ref.permute), whatever dst_index holds.
@ops.register_op("permute", family="moe", cuda_impl=_permute_cuda,
                 fake=lambda x, src, dst: x.new_empty((src.shape[0], x.shape[1])))
def _permute_op(x: torch.Tensor, src_index: torch.Tensor, dst_index: torch.Tensor) -> torch.Tensor:
    return ref.permute(x, src_index)


def _unpermute_cuda(y, dst_index, topk_weights):
    out = torch.empty((dst_index.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)
    ops.ext().unpermute(ops.dlpack(y), ops.dlpack(dst_index), ops.dlpack(topk_weights), ops.dlpack(out),
                        ops.cuda_stream(y.device))
    return out


@ops.register_op("unpermute", family="moe", cuda_impl=_unpermute_cuda,
                 fake=lambda y, dst, w: y.new_empty((dst.shape[0], y.shape[1])))
def _unpermute_op(y: torch.Tensor, dst_index: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    return ref.unpermute(y, dst_index, topk_weights)


def _check_rows(name, t, op):
    check_tensor(name, t)
    # fp32 runs the reference (CPU, e.g. gloo tests); the kernels (on a GPU, or on the SIMT
    # executor for CPU tensors) take fp16/bf16
    kernel = t.is_cuda or ops.kernel_backend(op, t.device) == "simt"
    check_dtype(name, t, (torch.float16, torch.bfloat16) if kernel else (torch.float16, torch.bfloat16, torch.float32))
    if t.dim() != 2:
        raise ValueError(f"expected `{name}` of shape [rows, hidden], got {list(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"expected `{name}` contiguous in its last dimension")


def permute(x: torch.Tensor, layout: RoutingLayout) -> torch.Tensor:
    """``x [T, hidden]`` (fp16/bf16) -> expert-major ``[layout.capacity, hidden]``: row r is
    ``x[layout.src_index[r]]``; padding rows are zeros (safe to feed a grouped GEMM)."""
    _check_rows("x", x, "permute")
    if x.shape[0] != layout.dst_index.shape[0]:
        raise ValueError(f"expected {layout.dst_index.shape[0]} rows in `x` (the layout's tokens), got {x.shape[0]}")
    check_same_device({"x": x, "layout": layout.src_index})
    return torch.ops.inferops.permute(x, layout.src_index, layout.dst_index)


def unpermute(y: torch.Tensor, layout: RoutingLayout, topk_weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs ``y [layout.capacity, hidden]`` -> ``[T, hidden]``:
    ``out[t] = sum_j topk_weights[t, j] * y[dst_index[t, j]]``, accumulated in fp32;
    dropped slots contribute nothing. ``topk_weights``: ``[T, k]`` fp32/fp16/bf16."""
    _check_rows("y", y, "unpermute")
    if y.shape[0] != layout.capacity:
        raise ValueError(f"expected {layout.capacity} rows in `y` (the layout's capacity), got {y.shape[0]}")
    check_tensor("topk_weights", topk_weights)
    check_dtype("topk_weights", topk_weights, (torch.float32, torch.float16, torch.bfloat16))
    check_shape("topk_weights", topk_weights, tuple(layout.dst_index.shape))
    check_same_device({"y": y, "topk_weights": topk_weights, "layout": layout.dst_index})
    return torch.ops.inferops.unpermute(y, layout.dst_index, topk_weights.contiguous())


# --- main-job demos -----------------------------------------------------------------------------


def _demo_shape(device):
    return (4096, 8, 256, 7168) if device.type == "cuda" else (64, 2, 8, 256)


def _demo_ids(device, g):
    T, k, E, _ = _demo_shape(device)
    return torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(device, torch.int32)


def _layout_tuple(lay: RoutingLayout):
    return tuple(getattr(lay, f).double() for f in _LAYOUT_FIELDS)


register_demo(Demo(
    op="routing_layout",
    sizes=lambda d: "T={} k={} E={} R=8".format(*_demo_shape(d)[:3]),
    make_inputs=lambda d, g: (_demo_ids(d, g), _demo_shape(d)[2]),
    run=lambda ids, E: _layout_tuple(routing_layout(ids, E, world_size=8, align=16, validate=False)),
    baseline=lambda ids, E: ref.routing_layout(ids, default_placement(E, 8, ids.device), 8, 16,
                                               ids.shape[0] * ids.shape[1] + E * 15),
    reference64=lambda ids, E: tuple(t.double() for t in ref.routing_layout(
        ids, default_placement(E, 8, ids.device), 8, 16, ids.shape[0] * ids.shape[1] + E * 15)),
    dtype=torch.float64,
))


def _perm_inputs(device, g):
    T, k, E, hidden = _demo_shape(device)
    ids = _demo_ids(device, g)
    lay = routing_layout(ids, E, align=16)
    x = torch.randn(T, hidden, generator=g).to(device, torch.bfloat16)
    w = torch.rand(T, k, generator=g).to(device)
    return x, lay, w


register_demo(Demo(
    op="permute",
    sizes=lambda d: "T={} k={} E={} hidden={}".format(*_demo_shape(d)),
    make_inputs=_perm_inputs,
    run=lambda x, lay, w: permute(x, lay),
    baseline=lambda x, lay, w: ref.permute(x, lay.src_index),
    reference64=lambda x, lay, w: ref.permute(x.double(), lay.src_index),
    dtype=torch.float64,
))

register_demo(Demo(
    op="unpermute",
    sizes=lambda d: "T={} k={} E={} hidden={}".format(*_demo_shape(d)),
    make_inputs=lambda d, g: (lambda x, lay, w: (ref.permute(x, lay.src_index), lay, w))(*_perm_inputs(d, g)),
    run=lambda y, lay, w: unpermute(y, lay, w),
    baseline=lambda y, lay, w: ref.unpermute(y, lay.dst_index, w),
    reference64=lambda y, lay, w: ref.unpermute(y.double(), lay.dst_index, w.double(), torch.float64),
    dtype=torch.bfloat16,
))
