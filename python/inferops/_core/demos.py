"""Representative cases of every op, run by ``python -m inferops check``.

Each family registers one or more :class:`Demo` next to its op. The main job
runs the op on fresh random inputs, checks every output against the float64
reference with the shared tolerances, and times it against its baseline (the
PyTorch reference, what a user would otherwise run) in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Demo", "DEMOS", "register_demo"]


@dataclass(frozen=True)
class Demo:
    op: str  # registered op name (inferops._core.ops.REGISTRY)
    sizes: Callable[[torch.device], str]  # label of the sizes used on that device
    make_inputs: Callable[[torch.device, torch.Generator], tuple]
    run: Callable[..., Any]  # the public op, called as run(*inputs)
    baseline: Callable[..., Any]  # what a user would run instead (same inputs)
    reference64: Callable[..., Any]  # float64 oracle, same inputs
    dtype: torch.dtype  # dtype whose tolerance applies to the main output
    aux_tolerance: Any = None  # Tolerance for outputs after the first (default: their dtype's)
    tolerance: Any = None  # Tolerance for the main output (default: `dtype`'s), as the op's tests use


DEMOS: list[Demo] = []


def register_demo(demo: Demo) -> Demo:
    DEMOS.append(demo)
    return demo
