"""Argument checks shared by every family's public wrappers.

Each check raises with the argument's name, what was expected and what was
given: ``TypeError`` for a wrong type or dtype, ``ValueError`` for shapes,
devices, strides and index ranges.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = [
    "check_tensor",
    "check_dtype",
    "check_shape",
    "check_same_device",
    "check_last_dim_contiguous",
]


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor for `{name}`, got {type(t).__name__}")


def check_dtype(name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        want = " or ".join(_dtype_name(d) for d in allowed)
        raise TypeError(f"expected dtype {want} for `{name}`, got {_dtype_name(t.dtype)}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"expected shape {list(shape)} for `{name}`, got {list(t.shape)}")


def check_same_device(tensors: Mapping[str, torch.Tensor]) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"expected `{name}` on the device of `{first_name}` ({first.device}), "
                f"got {t.device}"
            )


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"expected `{name}` contiguous in its last dimension (stride 1), "
            f"got strides {list(t.stride())}"
        )
