"""pytest configuration shared by every family.

* ``@pytest.mark.gpu`` tests are skipped unless inferops' CUDA kernels can run
  (CUDA build + driver + device); the skip reason says which is missing.
* ``gen`` gives a generator seeded from the OS (fresh inputs every run) and
  prints its seed when a test fails; INFEROPS_TEST_SEED=<seed> replays it.
"""

from __future__ import annotations

import pytest
import torch

import inferops
from inferops.testing import fresh_generator


def pytest_collection_modifyitems(config, items):
    reason = inferops.cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs CUDA: {reason}")
    for item in items:
        if "gpu" in item.keywords:
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
