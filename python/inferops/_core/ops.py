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

The CPU SIMT executor (``inferops._simt``, csrc/simt/) runs the same kernels on the
CPU. With the backend set to ``"simt"`` (``INFEROPS_BACKEND=simt`` or
``inferops.testing.backend("simt")``), ops on CPU tensors run ``cuda_impl`` against
the executor module instead of the reference: ``ext()`` then returns that module
and ``cuda_stream`` returns 0. Simulated execution is slow (tests, not users).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.dlpack import to_dlpack

from .extension import extension, has_cuda_op, has_simt_op, simt_extension

__all__ = [
    "OpInfo",
    "REGISTRY",
    "register_op",
    "dlpack",
    "cuda_stream",
    "kernel_backend",
    "cpu_backend",
    "use_cpu_backend",
    "kernel_device_info",
]

_CPU_BACKENDS = ("reference", "simt")
# Set by use_cpu_backend(); None: INFEROPS_BACKEND decides.
_cpu_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("inferops_cpu_backend", default=None)
# The module cuda_impl talks to while it runs: inferops._C, or inferops._simt.
_active_module: contextvars.ContextVar = contextvars.ContextVar("inferops_active_module", default=None)


@functools.lru_cache(maxsize=None)
def _env_backend() -> str:  # read once per process, as INFEROPS_FORCE_REFERENCE is
    b = os.environ.get("INFEROPS_BACKEND", "") or "reference"
    if b not in _CPU_BACKENDS:
        raise ValueError(f"expected INFEROPS_BACKEND in {_CPU_BACKENDS}, got {b!r}")
    return b


def cpu_backend() -> str:
    """What ops on CPU tensors run: ``"reference"`` (default) or ``"simt"`` (the executor)."""
    b = _cpu_backend.get()
    return _env_backend() if b is None else b


@contextlib.contextmanager
def use_cpu_backend(name: str):
    """Within the block, ops on CPU tensors run ``name``: "reference" or "simt"."""
    if name not in _CPU_BACKENDS:
        raise ValueError(f"expected a backend in {_CPU_BACKENDS}, got {name!r}")
    if name == "simt" and simt_extension() is None:
        from .extension import simt_error

        raise RuntimeError(f"the SIMT executor is not available: {simt_error()}")
    token = _cpu_backend.set(name)
    try:
        yield
    finally:
        _cpu_backend.reset(token)


def _simt_kernel_enabled(name: str) -> bool:
    return cpu_backend() == "simt" and has_simt_op(name)


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
    """Which implementation op ``name`` runs for tensors on ``device``: "cuda", "simt" or "reference"."""
    info = REGISTRY[name]
    if (
        torch.device(device).type == "cpu"
        and info.cuda_kernel is not None
        # Under torch.compile the executor routing (a ContextVar) cannot be traced: wrappers
        # then skip their kernel-only checks, which the executor's binding repeats at run time.
        and not torch.compiler.is_compiling()
        and _simt_kernel_enabled(info.cuda_kernel)
    ):
        return "simt"
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

            @functools.wraps(cuda_impl)
            def cpu_route(*args, **kwargs):
                if _simt_kernel_enabled(kernel):
                    token = _active_module.set(simt_extension())
                    try:
                        return cuda_impl(*args, **kwargs)
                    finally:
                        _active_module.reset(token)
                return reference(*args, **kwargs)

            op.register_kernel("cpu", cpu_route)
        if name in REGISTRY:
            raise RuntimeError(f"inferops op {name!r} registered twice")
        REGISTRY[name] = OpInfo(name, family, op, reference, kernel if cuda_impl else None)
        return op

    return decorate


@functools.lru_cache(maxsize=None)
def _device_info(module, index: int) -> dict:
    return dict(module.device_info(index))


def kernel_device_info(device: torch.device | str) -> dict:
    """``device_info`` (SM count, compute capability, shared-memory limits) of the device that
    runs the kernels for tensors on ``device``: the CUDA device, or for CPU tensors the H100
    the SIMT executor models (it has no torch.cuda index). Cached per module and device."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _device_info(extension(), index)
    mod = simt_extension()
    if mod is None:
        from .extension import simt_error

        raise RuntimeError(f"the SIMT executor is not available: {simt_error()}")
    return _device_info(mod, 0)


def dlpack(t: torch.Tensor):
    """Borrowed DLPack capsule of ``t`` for one call into ``inferops._C``."""
    return to_dlpack(t)


def cuda_stream(device: torch.device) -> int:
    """Raw handle of the current CUDA stream on ``device`` (what kernels launch on); 0 on
    the CPU (the SIMT executor runs synchronously)."""
    if torch.device(device).type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream


def ext():
    """The module the running ``cuda_impl`` launches through: ``inferops._simt`` while an
    op runs on the SIMT executor, else ``inferops._C`` (only called where a kernel is
    enabled)."""
    mod = _active_module.get()
    return mod if mod is not None else extension()
