"""RowParallelLinear: a row-parallel ``nn.Linear`` whose GEMM and reduce-scatter are fused.

Row parallelism splits the input features over the ``W`` ranks of a group: rank r
holds ``weight[:, r * in/W : (r + 1) * in/W]`` and the matching slice of the
activations; the full output is the sum over ranks. With sequence parallelism
(as in PyTorch async-TP and Megatron) that sum is reduce-scattered along the
tokens, so each rank ends with ``tokens / W`` complete rows: exactly
:func:`inferops.tp.gemm_reduce_scatter`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .gemm_rs import GemmReduceScatter

__all__ = ["RowParallelLinear"]


class RowParallelLinear(nn.Module):
    """Drop-in row-parallel linear layer (attention output / MLP down projection).

    Args:
        in_features: full input features (all ranks); must divide by the world size.
        out_features: output features.
        group: ``torch.distributed`` process group (None: the default group, or a
            single rank without torch.distributed).
        bias: add a bias ``[out_features]`` (once, after the reduction).
        max_tokens: most tokens (rows, all ranks together) per call; sizes the buffers.
        dtype, device: of the parameters and the activations.
        engine: an existing :class:`GemmReduceScatter` to share between layers with the
            same ``out_features``; its world size must equal the group's.

    ``forward(x)``: ``x`` ``[tokens, in_features / W]`` (or ``[..., in_features / W]``,
    flattened to rows), ``tokens % W == 0``; returns ``[tokens / W, out_features]``:
    this rank's rows of ``x_full @ weight_full^T + bias``. ``path`` says which
    implementation runs ("symm_mem", "local", "fallback", "reference"), and
    ``fallback_reason`` why the fused path is off. Inference only: the fused paths
    have no backward.
    """

    def __init__(self, in_features: int, out_features: int, group=None, *, bias: bool = True,
                 max_tokens: int = 8192, dtype: torch.dtype = torch.bfloat16, device=None,
                 engine: GemmReduceScatter | None = None) -> None:
        super().__init__()
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        world = dist.get_world_size(group) if group is not None else 1
        if in_features % world:
            raise ValueError(f"expected in_features ({in_features}) divisible by the world size ({world})")
        self.in_features, self.out_features, self.group, self.world_size = in_features, out_features, group, world
        self.in_local = in_features // world
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
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local, dtype=dtype, device=dev))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=dev)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

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
        rank = dist.get_rank(self.group) if self.group is not None else 0
        with torch.no_grad():
            self.weight.copy_(weight[:, rank * self.in_local:(rank + 1) * self.in_local])
            if self.bias is not None and bias is not None:
                self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_local:
            raise ValueError(f"expected `x` [..., {self.in_local}] (in_features / world size), got {list(x.shape)}")
        y = self.engine(x.reshape(-1, self.in_local), self.weight.t())
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, world_size={self.world_size}, "
                f"bias={self.bias is not None}, path={self.path!r}")
