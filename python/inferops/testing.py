"""Test helpers shared by every family (and by ``python -m inferops check``).

* tolerances, defined once: :data:`TOLERANCES` and :func:`assert_close`;
* fresh random inputs: :func:`fresh_generator` seeds from the OS every call
  and the seed is reported in assertion messages so a failure can be replayed;
* poisoned outputs: :func:`poison_` fills a buffer with NaN (floats) or an
  out-of-range sentinel (integers) before a kernel runs, so an element the
  kernel failed to write cannot pass;
* kernel backends: :func:`backend` sends ops on CPU tensors to the CPU SIMT
  executor (``backend("simt")``: the real kernels, compiled for the CPU, see
  docs/developer.md); :func:`kernel_module`, :func:`stream_handle` and
  :func:`synchronize` let one test body drive the raw bindings on a GPU or on
  the executor.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import torch

from ._core import extension as _extension
from ._core import ops as _ops

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "tolerance",
    "assert_close",
    "max_abs_error",
    "fresh_generator",
    "randn",
    "poison_",
    "poisoned_empty",
    "backend",
    "simt_available",
    "is_simulated",
    "kernel_module",
    "stream_handle",
    "synchronize",
    "kernel_backend_for",
    "simt_metrics_available",
    "simt_metrics",
]


@dataclass(frozen=True)
class Tolerance:
    """``|out - ref| <= atol + rtol * |ref|`` elementwise, ``ref`` in float64/float32."""

    atol: float
    rtol: float


# Output-dtype tolerances for memory-bound elementwise ops computed in fp32:
# one final rounding to the storage type (fp16 eps 2^-11, bf16 eps 2^-8) plus
# a few fp32 ulps of arithmetic. Ops with reductions over long dims pass a
# looser per-op Tolerance explicitly.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-12, rtol=1e-10),
    torch.float32: Tolerance(atol=1e-5, rtol=1e-5),
    torch.float16: Tolerance(atol=1e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=8e-3, rtol=1.6e-2),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES[dtype]


def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| over finite reference entries, in float64 (inf where NaN disagrees)."""
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if o.numel() == 0:
        return 0.0
    both_nan = torch.isnan(o) & torch.isnan(r)
    same_inf = torch.isinf(r) & (o == r)
    diff = (o - r).abs()
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max())


def assert_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    tol: Tolerance | torch.dtype | None = None,
    *,
    name: str = "output",
    seed: int | None = None,
) -> None:
    """Elementwise check of ``out`` against a higher-precision ``ref``.

    NaN in ``out`` passes only where ``ref`` is NaN; ``±inf`` must match
    exactly. ``tol`` defaults to the tolerance of ``out.dtype``.
    """
    if tol is None:
        tol = out.dtype
    if isinstance(tol, torch.dtype):
        tol = TOLERANCES[tol]
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"{name}: shape {list(out.shape)} != reference {list(ref.shape)}")
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    nan_ok = torch.isnan(o) == torch.isnan(r)
    inf_ok = torch.where(torch.isinf(r) | torch.isinf(o), o == r, torch.ones_like(nan_ok))
    finite = torch.isfinite(r) & torch.isfinite(o)
    bound = tol.atol + tol.rtol * r.abs()
    val_ok = torch.where(finite, (o - r).abs() <= bound, torch.ones_like(nan_ok))
    ok = nan_ok & inf_ok & val_ok
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    first = tuple(bad[0].tolist())
    msg = (
        f"{name}: {bad.shape[0]} of {o.numel()} elements outside atol={tol.atol} rtol={tol.rtol}; "
        f"first at {first}: got {o[first].item()!r}, expected {r[first].item()!r}; "
        f"max abs error {max_abs_error(o, r):.3e}"
    )
    if seed is not None:
        msg += f" (seed {seed})"
    raise AssertionError(msg)


def fresh_generator(device: torch.device | str = "cpu") -> tuple[torch.Generator, int]:
    """A generator seeded from the OS (new inputs every run) and its seed.

    Set ``INFEROPS_TEST_SEED`` to replay a failing run.
    """
    env = os.environ.get("INFEROPS_TEST_SEED")
    seed = int(env) if env else int.from_bytes(os.urandom(6), "little")
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g, seed


def randn(shape, dtype: torch.dtype, device, generator: torch.Generator, scale: float = 1.0):
    """Normal random tensor drawn in float32 on ``generator``'s device, then moved and cast."""
    x = torch.randn(tuple(shape), generator=generator, device=generator.device) * scale
    return x.to(device=device, dtype=dtype)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (floating) or the dtype's minimum (integers); returns ``t``."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(torch.iinfo(t.dtype).min)


def poisoned_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return poison_(torch.empty(tuple(shape), dtype=dtype, device=device))


# --- kernel backends -------------------------------------------------------------------


@contextlib.contextmanager
def backend(name: str):
    """Within the block, ops on CPU tensors run ``name``: ``"simt"`` (the kernels on the
    CPU SIMT executor, ``inferops._simt``) or ``"reference"`` (the PyTorch reference).
    ``INFEROPS_BACKEND`` sets the default outside such a block."""
    with _ops.use_cpu_backend(name):
        yield


def simt_available() -> bool:
    """True when the executor build of the kernels (``inferops._simt``) can be used."""
    if os.environ.get("INFEROPS_FORCE_REFERENCE", "") not in ("", "0"):
        return False
    return _extension.simt_extension() is not None


def is_simulated(device: torch.device | str) -> bool:
    """True when kernels on ``device`` run on the SIMT executor (a CPU device): tests
    use smaller sizes there, simulated threads are slow."""
    return torch.device(device).type == "cpu"


def kernel_module(device: torch.device | str):
    """The compiled module whose raw bindings launch kernels on ``device``:
    ``inferops._C`` for CUDA devices, ``inferops._simt`` for the CPU executor."""
    if torch.device(device).type == "cuda":
        return _extension.extension()
    mod = _extension.simt_extension()
    if mod is None:
        raise RuntimeError(f"the SIMT executor is not available: {_extension.simt_error()}")
    return mod


def stream_handle(device: torch.device | str) -> int:
    """The stream argument of the raw bindings: the current CUDA stream, 0 on the CPU."""
    return _ops.cuda_stream(torch.device(device))


def synchronize(device: torch.device | str) -> None:
    """Wait for the kernels queued on ``device`` (the executor runs synchronously)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def kernel_backend_for(device: torch.device | str) -> str:
    """The backend a kernel test expects its op to report on ``device``
    (``inferops._core.ops.kernel_backend``): "cuda" on a GPU, "simt" on the CPU."""
    return "cuda" if torch.device(device).type == "cuda" else "simt"


def simt_metrics_available() -> bool:
    """True when the loaded executor build records memory-access metrics (the instrumented
    build, ``build_info()["simt"]["metrics"]``: ``RACE=1 scripts/dev_build.sh _simt``, loaded
    with ``INFEROPS_SIMT_MODULE``)."""
    mod = _extension.simt_extension() if simt_available() else None
    return mod is not None and bool(mod.build_info().get("metrics", False))


@contextlib.contextmanager
def simt_metrics():
    """Collects the executor's memory-access metrics of every kernel launched in the block
    (docs/developer.md, "Memory-access metrics"): yields a list that receives one dict per
    launch, in launch order, when the block exits. Kernels must run on the executor (CPU
    tensors with ``backend("simt")``); needs the instrumented build
    (:func:`simt_metrics_available`)."""
    if not simt_metrics_available():
        raise RuntimeError(
            "memory-access metrics need the instrumented executor build: build it with "
            "`RACE=1 scripts/dev_build.sh _simt` and load it with "
            "INFEROPS_SIMT_MODULE=build/dev-race/_simt*.so")
    mod = _extension.simt_extension()
    records: list[dict] = []
    mod.simt_metrics_begin()
    try:
        yield records
    finally:
        records.extend(json.loads(r) for r in mod.simt_metrics_end())
