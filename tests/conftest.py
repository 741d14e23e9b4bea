"""pytest configuration shared by every family.

* ``@pytest.mark.gpu`` tests run the kernels. With a GPU (CUDA build + driver +
  device) they run there. Without one, a gpu test that takes the
  ``kernel_device`` fixture runs on the CPU SIMT executor (``inferops._simt``:
  the same kernel sources compiled for the CPU, docs/developer.md) and is marked
  ``simt`` (``pytest -m simt`` selects them: CI runs those again under
  AddressSanitizer); the others (CUDA graphs, streams, > 2^31 elements, ...)
  are skipped with the reason.
* ``gen`` gives a generator seeded from the OS (fresh inputs every run) and
  prints its seed when a test fails; INFEROPS_TEST_SEED=<seed> replays it.
"""

from __future__ import annotations

import pytest
import torch

import inferops
from inferops.testing import backend, fresh_generator, simt_available


def pytest_collection_modifyitems(config, items):
    reason = inferops.cuda_unavailable_reason()
    if reason is None:
        return
    executor = simt_available()
    skip = pytest.mark.skip(reason=f"needs CUDA: {reason}")
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if executor and "kernel_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.simt)
        else:
            item.add_marker(skip)


@pytest.fixture
def gen(request):
    g, seed = fresh_generator("cpu")
    yield g
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"\n[inferops] {request.node.nodeid} used seed {seed}: "
              f"rerun with INFEROPS_TEST_SEED={seed}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep


@pytest.fixture
def cuda_device():
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture
def kernel_device():
    """Where a gpu test runs its kernels: the CUDA device when there is one, else the CPU
    with ops routed to the SIMT executor for the test's duration."""
    if inferops.cuda_available():
        yield torch.device("cuda", torch.cuda.current_device())
        return
    with backend("simt"):
        yield torch.device("cpu")
