"""One way for every family to expose an op to PyTorch.

``register_op`` turns a PyTorch reference implementation into a
``torch.library`` custom op named ``inferops::<name>``:

* the reference is the default kernel, so CPU tensors (and any device without
  a CUDA kernel) run it: it is the CPU fallback;
* ``cuda_impl`` is registered for the CUDA dispatch key; it runs when the
  extension has a compiled kernel for the op, otherwise the reference runs on
  the GPU tensors (e.g. a host-only build on a GPU machine);
* ``fake`` is the meta implementation used by ``torch.compile`` and export.

The dispatcher therefore does the device routing; the public wrapper in
``inferops/<family>/`` only validates and calls ``torch.ops.inferops.<name>``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.dlpack import to_dlpack

from .extension import extension, has_cuda_op

__all__ = ["OpInfo", "REGISTRY", "register_op", "dlpack", "cuda_stream", "kernel_backend"]


@dataclass(frozen=True)
class OpInfo:
    """A registered op: its family, the custom op object and the reference."""

    name: str
    family: str
    op: Callable
    reference: Callable
    cuda_kernel: str | None  # compiled kernel the CUDA path needs; None: reference only


REGISTRY: dict[str, OpInfo] = {}


def _force_reference() -> bool:
    return os.environ.get("INFEROPS_FORCE_REFERENCE", "") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _cuda_kernel_enabled(name: str) -> bool:
    return not _force_reference() and has_cuda_op(name)


def kernel_backend(name: str, device: torch.device | str) -> str:
    """Which implementation op ``name`` runs for tensors on ``device``: "cuda" or "reference"."""
    info = REGISTRY[name]
    if (
        torch.device(device).type == "cuda"
        and info.cuda_kernel is not None
        and _cuda_kernel_enabled(info.cuda_kernel)
    ):
        return "cuda"
    return "reference"


def register_op(
    name: str,
    *,
    family: str,
    mutates_args: Sequence[str] = (),
    fake: Callable | None = None,
    cuda_impl: Callable | None = None,
    cuda_kernel: str | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: register the decorated reference as custom op ``inferops::<name>``.

    The decorated function must carry full type annotations (torch infers the
    op schema from them) and, for mutating ops, return None. ``cuda_kernel``
    names the compiled kernel (as listed in ``build_info()["cuda_ops"]``) that
    ``cuda_impl`` needs; it defaults to ``name`` (variants such as an in-place
    form share their kernel).
    """
    kernel = name if cuda_kernel is None else cuda_kernel

    def decorate(reference: Callable) -> Callable:
        op = torch.library.custom_op(f"inferops::{name}", mutates_args=tuple(mutates_args))(
            reference
        )
        if fake is not None:
            op.register_fake(fake)
        if cuda_impl is not None:

            @functools.wraps(cuda_impl)
            def cuda_route(*args, **kwargs):
                if _cuda_kernel_enabled(kernel):
                    return cuda_impl(*args, **kwargs)
                return reference(*args, **kwargs)

            op.register_kernel("cuda", cuda_route)
        if name in REGISTRY:
            raise RuntimeError(f"inferops op {name!r} registered twice")
        REGISTRY[name] = OpInfo(name, family, op, reference, kernel if cuda_impl else None)
        return op

    return decorate


def dlpack(t: torch.Tensor):
    """Borrowed DLPack capsule of ``t`` for one call into ``inferops._C``."""
    return to_dlpack(t)


def cuda_stream(device: torch.device) -> int:
    """Raw handle of the current CUDA stream on ``device`` (what kernels launch on)."""
    return torch.cuda.current_stream(device).cuda_stream


def ext():
    """The compiled module; only called on paths where ``_cuda_kernel_enabled`` held."""
    return extension()
