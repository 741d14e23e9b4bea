"""Lazy loading of the compiled extension ``inferops._C``.

``import inferops`` never fails for lack of a GPU, a driver or compiled CUDA
code: the extension is imported on first use, and every question about it
(``cuda_available()``, ``build_info()``) has an answer even when it is missing.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

__all__ = [
    "extension",
    "extension_error",
    "simt_extension",
    "simt_error",
    "has_simt_op",
    "build_info",
    "cuda_available",
    "cuda_unavailable_reason",
    "has_cuda_op",
]


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("inferops._C"), None
    except ImportError as e:  # not built, or built for another Python
        return None, f"inferops._C could not be imported: {e}"


def extension() -> ModuleType | None:
    """The compiled module, or None when it cannot be imported."""
    return _load()[0]


def extension_error() -> str | None:
    """Why the compiled module could not be imported (None when it loaded)."""
    return _load()[1]


@functools.lru_cache(maxsize=None)
def _load_simt() -> tuple[ModuleType | None, str | None]:
    # INFEROPS_SIMT_MODULE=<path to a _simt*.so>: use that build of the executor module
    # (CI points it at the AddressSanitizer build, loaded with the ASan runtime preloaded).
    path = os.environ.get("INFEROPS_SIMT_MODULE", "")
    try:
        if path:

            spec = importlib.util.spec_from_file_location("inferops._simt", path)
            if spec is None or spec.loader is None:
                return None, f"INFEROPS_SIMT_MODULE={path!r} is not a loadable module"
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            sys.modules["inferops._simt"] = mod
            return mod, None
        return importlib.import_module("inferops._simt"), None
    except ImportError as e:  # built without the executor (INFEROPS_BUILD_SIMT=0, no CUDA headers)
        return None, f"inferops._simt could not be imported: {e}"


def simt_extension() -> ModuleType | None:
    """The CPU SIMT executor build of the kernels (``inferops._simt``), or None."""
    return _load_simt()[0]


def simt_error() -> str | None:
    """Why ``inferops._simt`` could not be imported (None when it loaded)."""
    return _load_simt()[1]


@functools.lru_cache(maxsize=None)
def has_simt_op(name: str) -> bool:
    """True when the executor build has op ``name``'s kernel."""
    mod = simt_extension()
    return mod is not None and name in mod.build_info()["cuda_ops"]


def _simt_info() -> dict[str, Any]:
    mod = simt_extension()
    if mod is None:
        return {"available": False, "ops": [], "sanitizer": None, "racecheck": False, "error": simt_error()}
    info = mod.build_info()
    return {
        "available": True,
        "ops": list(info["cuda_ops"]),
        "sanitizer": info.get("sanitizer"),
        "racecheck": bool(info.get("racecheck", False)),
        "error": None,
    }


def build_info() -> dict[str, Any]:
    """What the extension was built with.

    Keys: ``version``, ``extension_loaded``, ``cuda`` (kernels compiled),
    ``cuda_version``, ``cuda_archs`` (e.g. ``"90a"``), ``cuda_ops`` (ops with a
    compiled CUDA kernel), ``host_compiler``, ``debug``; plus ``runtime``
    (driver version and device count as the extension sees them now) when the
    extension loaded, and ``error`` when it did not. ``simt`` describes the CPU SIMT
    executor build (``inferops._simt``): ``available``, ``ops`` (kernels it runs),
    ``sanitizer`` (``"address,undefined"`` in the AddressSanitizer build), ``racecheck``
    (True in the shared-memory race-detector build) and ``error``.
    """
    ext = extension()
    if ext is None:
        return {
            "simt": _simt_info(),
            "version": None,
            "extension_loaded": False,
            "cuda": False,
            "cuda_version": None,
            "cuda_archs": "",
            "cuda_ops": [],
            "error": extension_error(),
        }
    info = dict(ext.build_info())
    info["simt"] = _simt_info()
    info["extension_loaded"] = True
    info["runtime"] = dict(ext.runtime_info())
    return info


def has_cuda_op(name: str) -> bool:
    """True when the extension has a compiled CUDA kernel for op ``name``."""
    ext = extension()
    return ext is not None and name in ext.build_info()["cuda_ops"]


@functools.lru_cache(maxsize=None)
def cuda_unavailable_reason() -> str | None:
    """None when CUDA kernels can run here, else a sentence saying why not."""
    if os.environ.get("INFEROPS_FORCE_REFERENCE", "") not in ("", "0"):
        return "INFEROPS_FORCE_REFERENCE is set: every op runs its PyTorch reference"
    ext = extension()
    if ext is None:
        return extension_error()
    if not ext.build_info()["cuda"]:
        return "inferops was built without CUDA (no nvcc at build time, or INFEROPS_NO_CUDA set)"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    rt = ext.runtime_info()
    if rt["error"] is not None:
        return f"the CUDA runtime in inferops._C reports {rt['error']}"
    return None


def cuda_available() -> bool:
    """True when inferops' CUDA kernels can run: a CUDA build, a driver, a device."""
    return cuda_unavailable_reason() is None
