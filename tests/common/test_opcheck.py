"""torch.library.opcheck for every registered op (all of its default tests: schema, autograd
registration, fake tensor, AOT dispatch with dynamic shapes), on the CPU (the reference), on
the SIMT executor for ops with an executor kernel, and on the GPU when there is one.

The arguments are the ones the public wrappers pass with default arguments: ``every_op.chain``
runs under a dispatch mode that records each ``inferops::*`` call (inputs cloned before the
call, so in-place ops are checked on their real inputs).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import inferops
from inferops._core.extension import has_simt_op
from inferops._core.ops import REGISTRY
from inferops.testing import backend, simt_available
from tests.common.every_op import chain, make_inputs


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "inferops" and func._opname not in self.calls:
            clone = lambda t: t.clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            self.calls[func._opname] = (func, tree_map(clone, args), tree_map(clone, kwargs))
        return func(*args, **kwargs)


def _recorded_calls(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = make_inputs(g, device)
    chain(x)  # eager first: prefix_shared_decode caches its per-ratio metadata on first use
    rec = _Recorder()
    with rec:
        chain(make_inputs(g, device) | {"ps_layout": x["ps_layout"], "ps_k": x["ps_k"], "ps_v": x["ps_v"]})
    return rec.calls


@pytest.fixture(scope="module")
def cpu_calls():
    return _recorded_calls("cpu")


def test_every_registered_op_is_exercised(cpu_calls):
    """A new op must join every_op.chain (and so the compile and opcheck tests)."""
    assert sorted(cpu_calls) == sorted(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_opcheck_cpu(name, cpu_calls):
    func, args, kwargs = cpu_calls[name]
    torch.library.opcheck(func, args, kwargs)


def _executor_ops():
    return sorted(n for n, info in REGISTRY.items() if info.cuda_kernel is not None and has_simt_op(info.cuda_kernel))


@pytest.fixture(scope="module")
def executor_calls():
    # recorded on the executor: wrappers prepare backend-specific arguments (e.g. the
    # workspace of the virtual GEMM + reduce-scatter is empty for the reference)
    with backend("simt"):
        return _recorded_calls("cpu", seed=1)


@pytest.mark.simt  # the kernels on the executor: also in CI's AddressSanitizer run
@pytest.mark.skipif(not simt_available(), reason="the SIMT executor (inferops._simt) is not available")
@pytest.mark.parametrize("name", _executor_ops())
def test_opcheck_executor(name, executor_calls):
    func, args, kwargs = executor_calls[name]
    with backend("simt"):
        assert inferops._core.ops.kernel_backend(name, "cpu") == "simt"
        torch.library.opcheck(func, args, kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_opcheck_gpu(name, cuda_device):
    calls = _recorded_calls(cuda_device)
    func, args, kwargs = calls[name]
    torch.library.opcheck(func, args, kwargs)
