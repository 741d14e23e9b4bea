"""Tensor-parallel linear layers: ``RowParallelLinear`` (GEMM + reduce-scatter fused) and
``ColumnParallelLinear``.

Row parallelism splits the input features over the ``W`` ranks of a group: rank r
holds ``weight[:, r * in/W : (r + 1) * in/W]`` and the matching slice of the
activations; the full output is the sum over ranks. With sequence parallelism
(as in PyTorch async-TP and Megatron) that sum is reduce-scattered along the
tokens, so each rank ends with its block of complete rows: exactly
:func:`inferops.tp.gemm_reduce_scatter`. With a replicated output the rows are
all-gathered afterwards (reduce-scatter + all-gather moves the same bytes as an
all-reduce, and keeps the fused kernel).

Column parallelism splits the output features: rank r holds rows of ``weight``
(output features), takes the full (replicated) input and produces its slice of the
output features, with no communication (or an all-gather of the features when a
replicated output is asked for).

Token counts that are not multiples of ``W``: the row-parallel layer pads the rows
with zeros to ``P = ceil(T / W) * W`` inside; rank r's sequence-parallel output is
rows ``r * P/W : (r + 1) * P/W`` of the padded result (rows ``>= T`` are padding:
``bias`` only), see :func:`sequence_shard`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .gemm_rs import GemmReduceScatter

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "padded_tokens", "sequence_shard", "sequence_gather"]

_ROW_OUTPUTS = ("sequence", "replicated")
_COL_OUTPUTS = ("sharded", "replicated")


def _group_and_world(group):
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    return group, world, rank


def padded_tokens(tokens: int, world: int) -> int:
    """``P = ceil(tokens / world) * world``: rows after padding to a multiple of the world size."""
    return -(-tokens // world) * world


def sequence_shard(x: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's block of rows of ``x`` ``[..., d]`` (leading dims flattened to ``T`` rows,
    zero-padded to ``P = padded_tokens(T, W)``): ``[P / W, d]``, rows ``r * P/W`` onwards.
    The layout :class:`RowParallelLinear` with ``output="sequence"`` produces."""
    group, world, rank = _group_and_world(group)
    rows = x.reshape(-1, x.shape[-1])
    T = rows.shape[0]
    P = padded_tokens(T, world)
    if P != T:
        rows = torch.cat([rows, rows.new_zeros(P - T, rows.shape[1])])
    n = P // world
    return rows[rank * n:(rank + 1) * n]


def sequence_gather(x: torch.Tensor, tokens: int, group=None) -> torch.Tensor:
    """Inverse of :func:`sequence_shard`: ``x`` ``[P / W, d]`` on every rank -> ``[tokens, d]``
    (all-gather in rank order, padding rows dropped). Collective."""
    group, world, _ = _group_and_world(group)
    x = x.reshape(-1, x.shape[-1]).contiguous()
    if x.shape[0] * world != padded_tokens(tokens, world):
        raise ValueError(f"expected `x` with {padded_tokens(tokens, world) // world} rows (tokens = {tokens} "
                         f"padded over {world} ranks), got {x.shape[0]}")
    if world == 1:
        return x[:tokens]
    out = x.new_empty((x.shape[0] * world, x.shape[1]))
    dist.all_gather_into_tensor(out, x, group=group)
    return out[:tokens]


def _rank_slice(side: str, features: int, world: int, rank: int, given) -> tuple[int, int]:
    """This rank's [start, end) of the `side`_features dimension: the even split, or `given`."""
    if given is None:
        if features % world:
            raise ValueError(f"expected {side}_features ({features}) divisible by the world size ({world})")
        per = features // world
        return (rank * per, (rank + 1) * per)
    if not 0 <= given[0] <= given[1] <= features:
        raise ValueError(f"expected `{side}_slice` within [0, {features}], got {tuple(given)}")
    return (int(given[0]), int(given[1]))


class RowParallelLinear(nn.Module):
    """Drop-in row-parallel linear layer (attention output / MLP down projection).

    Args:
        in_features: full input features (all ranks); must divide by the world size
            (unless ``in_slice`` is given).
        out_features: output features.
        group: ``torch.distributed`` process group (None: the default group, or a
            single rank without torch.distributed).
        bias: add a bias ``[out_features]`` (once, after the reduction).
        max_tokens: most tokens (rows, all ranks together, after padding to a multiple
            of W) per call; sizes the buffers.
        dtype, device: of the parameters and the activations.
        engine: an existing :class:`GemmReduceScatter` to share between layers with the
            same ``out_features``; its world size must equal the group's.
        output: ``"sequence"`` (default): ``forward`` returns this rank's block of rows
            (reduce-scatter, the fused kernel); ``"replicated"``: every rank gets all rows
            (reduce-scatter, then all-gather).
        in_slice: ``(start, stop)`` columns of the full weight this rank holds (default:
            the even split ``r * in/W : (r + 1) * in/W``).

    ``forward(x)``: ``x`` ``[..., in_local]`` (leading dims flattened to ``T`` rows, any
    ``T``: padded with zero rows to ``P = ceil(T / W) * W`` inside). Returns, for
    ``output="sequence"``, ``[P / W, out_features]``: rows ``r * P/W : (r + 1) * P/W`` of
    ``x_full @ weight_full^T + bias`` (rows ``>= T`` of the padded result are padding);
    for ``output="replicated"``, ``[..., out_features]`` with ``x``'s leading dims.
    ``path`` says which implementation runs ("symm_mem", "local", "fallback",
    "reference"), and ``fallback_reason`` why the fused path is off. Inference only:
    the fused paths have no backward.
    """

    def __init__(self, in_features: int, out_features: int, group=None, *, bias: bool = True,
                 max_tokens: int = 8192, dtype: torch.dtype = torch.bfloat16, device=None,
                 engine: GemmReduceScatter | None = None, output: str = "sequence",
                 in_slice: tuple[int, int] | None = None) -> None:
        super().__init__()
        group, world, rank = _group_and_world(group)
        if output not in _ROW_OUTPUTS:
            raise ValueError(f"expected `output` in {_ROW_OUTPUTS}, got {output!r}")
        in_slice = _rank_slice("in", in_features, world, rank, in_slice)
        self.in_features, self.out_features, self.group, self.world_size = in_features, out_features, group, world
        self.rank, self.output, self.in_slice = rank, output, (int(in_slice[0]), int(in_slice[1]))
        self.in_local = self.in_slice[1] - self.in_slice[0]
        if engine is None:
            engine = GemmReduceScatter(group, max_tokens, out_features, dtype, device)
        elif engine.world_size != world:
            raise ValueError(f"expected an engine built for world size {world} (the group's), got one for "
                             f"{engine.world_size}")
        elif engine.n < out_features or engine.dtype != dtype:
            raise ValueError(f"expected an engine with n >= {out_features} and dtype {dtype}, got n = {engine.n}, "
                             f"dtype {engine.dtype}")
        self.engine = engine
        dev = engine.device
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local, dtype=dtype, device=dev),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=dev), requires_grad=False) \
            if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, *, output: str = "sequence", max_tokens: int = 8192,
                    engine: GemmReduceScatter | None = None,
                    in_slice: tuple[int, int] | None = None) -> "RowParallelLinear":
        """This rank's shard of an existing ``nn.Linear`` (its input-feature columns
        ``in_slice``, default the even split); parameters on the linear's device and dtype.
        Collective when it builds an engine."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear for `linear`, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None,
                    max_tokens=max_tokens, dtype=w.dtype, device=w.device, engine=engine, output=output,
                    in_slice=in_slice)
        layer.load_full_weight(w, linear.bias)
        return layer

    @property
    def path(self) -> str:
        return self.engine.path

    @property
    def fallback_reason(self) -> str | None:
        return self.engine.fallback_reason

    def load_full_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Take this rank's column slice of a full ``[out_features, in_features]`` weight."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expected shape [{self.out_features}, {self.in_features}] for `weight`, got "
                             f"{list(weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(weight[:, self.in_slice[0]:self.in_slice[1]])
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_local:
            raise ValueError(f"expected `x` [..., {self.in_local}] (this rank's input features), got "
                             f"{list(x.shape)}")
        rows = x.reshape(-1, self.in_local)
        T = rows.shape[0]
        P = padded_tokens(T, self.world_size)
        if P != T:  # zero rows contribute nothing to the sum; they are dropped or marked as padding
            rows = torch.cat([rows, rows.new_zeros(P - T, self.in_local)])
        y = self.engine(rows.contiguous(), self.weight.t())
        if self.bias is not None:
            y = y + self.bias
        if self.output == "sequence":
            return y
        return sequence_gather(y, T, self.group).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, world_size={self.world_size}, "
                f"in_slice={self.in_slice}, bias={self.bias is not None}, output={self.output!r}, "
                f"path={self.path!r}")


class ColumnParallelLinear(nn.Module):
    """Column-parallel linear layer (q/k/v, MLP gate/up projections).

    Args:
        in_features: input features (the input is replicated: every rank has all of them).
        out_features: full output features (all ranks); must divide by the world size
            (unless ``out_slice`` is given).
        group: ``torch.distributed`` process group (None: the default group, or one rank).
        bias: a bias for this rank's output features.
        output: ``"sharded"`` (default): ``forward`` returns this rank's output features;
            ``"replicated"``: all ranks' features, all-gathered (needs the even split).
        out_slice: ``(start, stop)`` output features of the full weight this rank holds
            (default ``r * out/W : (r + 1) * out/W``); ranks may overlap (replicated KV heads).
        dtype, device: of the parameters.

    ``forward(x)``: ``x`` ``[..., in_features]`` -> ``[..., out_local]`` (``"sharded"``) or
    ``[..., out_features]`` (``"replicated"``), ``x``'s dtype. No communication when sharded.
    """

    def __init__(self, in_features: int, out_features: int, group=None, *, bias: bool = True,
                 output: str = "sharded", out_slice: tuple[int, int] | None = None,
                 dtype: torch.dtype = torch.bfloat16, device=None) -> None:
        super().__init__()
        group, world, rank = _group_and_world(group)
        if output not in _COL_OUTPUTS:
            raise ValueError(f"expected `output` in {_COL_OUTPUTS}, got {output!r}")
        if out_slice is not None and output == "replicated":
            raise ValueError("expected output='sharded' with an explicit `out_slice` (the all-gather of a "
                             "replicated output needs the even split)")
        out_slice = _rank_slice("out", out_features, world, rank, out_slice)
        self.in_features, self.out_features, self.group, self.world_size = in_features, out_features, group, world
        self.rank, self.output, self.out_slice = rank, output, (int(out_slice[0]), int(out_slice[1]))
        self.out_local = self.out_slice[1] - self.out_slice[0]
        self.weight = nn.Parameter(torch.empty(self.out_local, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_local, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, *, output: str = "sharded",
                    out_slice: tuple[int, int] | None = None) -> "ColumnParallelLinear":
        """This rank's shard of an existing ``nn.Linear`` (its output-feature rows
        ``out_slice``, default the even split), on the linear's device and dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear for `linear`, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, group, bias=linear.bias is not None, output=output,
                    out_slice=out_slice, dtype=w.dtype, device=w.device)
        layer.load_full_weight(w, linear.bias)
        return layer

    def load_full_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Take this rank's row slice of a full ``[out_features, in_features]`` weight."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expected shape [{self.out_features}, {self.in_features}] for `weight`, got "
                             f"{list(weight.shape)}")
        lo, hi = self.out_slice
        with torch.no_grad():
            self.weight.copy_(weight[lo:hi])
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias[lo:hi])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected `x` [..., {self.in_features}], got {list(x.shape)}")
        y = F.linear(x, self.weight, self.bias)
        if self.output == "sharded" or self.world_size == 1:
            return y
        flat = y.reshape(-1, self.out_local).contiguous()
        parts = flat.new_empty((self.world_size * flat.shape[0], flat.shape[1]))
        dist.all_gather_into_tensor(parts, flat, group=self.group)
        return parts.view(self.world_size, *flat.shape).permute(1, 0, 2).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, world_size={self.world_size}, "
                f"out_slice={self.out_slice}, bias={self.bias is not None}, output={self.output!r}")
