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
    "host_sync_allowed",
    "read_flags",
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


# --- value checks (they read tensor values) ----------------------------------------------------


def host_sync_allowed(*tensors: torch.Tensor) -> bool:
    """Whether a check may read tensor values on the host now: not while ``torch.compile``
    traces (a ``.tolist()`` breaks the graph) and not while the current CUDA stream is
    being captured into a graph (a device->host copy is illegal there)."""
    if torch.compiler.is_compiling():
        return False
    return not any(t.is_cuda for t in tensors) or not torch.cuda.is_current_stream_capturing()


def read_flags(flags: torch.Tensor, messages: Sequence[str]) -> list[bool]:
    """Read boolean error flags computed on the device, for a value check.

    ``flags``: 1-d bool tensor, one entry per failure mode (True = the input is bad),
    ``messages[i]`` saying what ``flags[i]`` means. Eagerly this syncs once and returns the
    flags: the caller then raises its detailed ``ValueError`` (with the offending index
    and value). While compiling or capturing a CUDA graph (:func:`host_sync_allowed`) it
    reads nothing: each flag becomes a device-side assertion (``torch._assert_async``,
    traced into the graph and captured with it) carrying its message, and all-False is
    returned. A failed assertion raises ``RuntimeError(message)`` on the CPU when the op
    runs; on CUDA it is a device-side assert, reported at the next synchronisation (and,
    as every device assert, it leaves the CUDA context unusable): the check still happens,
    without a host sync.
    """
    if host_sync_allowed(flags):
        return [bool(f) for f in flags.tolist()]
    for i, msg in enumerate(messages):
        torch._assert_async(~flags[i], msg)
    return [False] * len(messages)
