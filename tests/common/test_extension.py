"""The compiled extension: build info, lazy loading, CUDA requirement in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import inferops
from inferops._core import ops


def test_build_info_keys():
    info = inferops.build_info()
    for key in ("version", "extension_loaded", "cuda", "cuda_version", "cuda_archs", "cuda_ops"):
        assert key in info, key
    assert info["extension_loaded"], info.get("error")
    assert info["version"] == inferops.__version__


def test_cuda_build_when_nvcc_present():
    """CI sets INFEROPS_REQUIRE_CUDA_BUILD=1: a host-only build must not pass unnoticed."""
    if os.environ.get("INFEROPS_REQUIRE_CUDA_BUILD", "") in ("", "0"):
        if shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
            pytest.skip("no nvcc here and INFEROPS_REQUIRE_CUDA_BUILD unset")
    info = inferops.build_info()
    assert info["cuda"], f"inferops._C was built without CUDA although nvcc is present: {info}"
    assert "90a" in info["cuda_archs"].split(","), info["cuda_archs"]
    # Every op that has a CUDA path must have its kernel compiled.
    for name, op in ops.REGISTRY.items():
        if op.cuda_kernel is not None:
            assert op.cuda_kernel in info["cuda_ops"], (name, info["cuda_ops"])


def test_simt_build_when_cuda_headers_present():
    """CI (INFEROPS_REQUIRE_CUDA_BUILD=1) must also get the executor build: without it every
    executor test would skip and the kernels would go untested."""
    if os.environ.get("INFEROPS_REQUIRE_CUDA_BUILD", "") in ("", "0"):
        pytest.skip("INFEROPS_REQUIRE_CUDA_BUILD unset")
    simt = inferops.build_info()["simt"]
    assert simt["available"], simt["error"]
    assert set(simt["ops"]) == set(inferops.build_info()["cuda_ops"])


def test_runtime_info_never_raises():
    rt = inferops.build_info()["runtime"]
    assert set(rt) == {"driver_version", "device_count", "error"}
    if not inferops.cuda_available():
        assert isinstance(inferops.cuda_unavailable_reason(), str)


def test_import_without_extension_falls_back_to_reference():
    """`import inferops` must work when _C cannot be loaded; ops then run their references."""
    code = (
        "import sys; sys.modules['inferops._C'] = None\n"
        "import torch, inferops\n"
        "assert not inferops.cuda_available()\n"
        "assert 'could not be imported' in inferops.cuda_unavailable_reason()\n"
        "assert inferops.build_info()['extension_loaded'] is False\n"
        "v = torch.randn(3, 2, 8); l = torch.randn(3, 2)\n"
        "out, lse = inferops.attention.merge_states(v, l, v, l)\n"
        "assert torch.allclose(out, v, atol=1e-6) and torch.allclose(lse, l + 0.6931471805599453)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_force_reference_env():
    code = (
        "import inferops\n"
        "from inferops._core.ops import kernel_backend\n"
        "assert kernel_backend('merge_states', 'cuda') == 'reference'\n"
        "assert 'INFEROPS_FORCE_REFERENCE' in inferops.cuda_unavailable_reason()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, INFEROPS_FORCE_REFERENCE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_every_op_is_registered_with_torch_library():
    import torch

    assert ops.REGISTRY, "no ops registered"
    for name, op in ops.REGISTRY.items():
        assert hasattr(torch.ops.inferops, name), name
        assert op.family


def test_every_op_has_a_main_job_demo():
    from inferops._core.demos import DEMOS

    assert set(ops.REGISTRY) <= {d.op for d in DEMOS}


def test_op_check_runs_and_checks():  # python -m inferops check (the main job is generate: tests/batch)
    r = subprocess.run([sys.executable, "-m", "inferops", "check", "--iters", "3"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "merge_states" in r.stdout and " ok " in r.stdout and "FAIL" not in r.stdout
