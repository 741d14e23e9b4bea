"""tp.parallelize on one rank with the fused kernel: a tiny bf16 Llama whose o_proj and
down_proj run ``gemm_reduce_scatter``'s kernel ("local" path; on the CPU the SIMT
executor runs the same CUDA source), against the unsharded model's logits."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from inferops import tp
from inferops.testing import max_abs_error

pytest.importorskip("transformers")


@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_parallelize_one_rank_runs_the_fused_kernel(kernel_device, one_rank_group, gen):
    from tests.hf_tiny import float64_copy, tiny_model

    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    base = tiny_model("llama", seed=seed)
    ids = torch.randint(0, 128, (2, 5), generator=gen).to(kernel_device)
    with torch.no_grad():
        ref64 = float64_copy(base).to(kernel_device)(ids).logits
        bf = copy.deepcopy(base).to(kernel_device, torch.bfloat16)
        ref_bf = bf(ids).logits
        model = tp.parallelize(bf, one_rank_group, max_tokens=16)
        got = model(ids).logits
    assert model.inferops_tp["engine_path"] == "local", model.inferops_tp
    err, err_bf = max_abs_error(got, ref64), max_abs_error(ref_bf, ref64)
    bound = 2 * err_bf + 1e-2 * float(ref64.abs().max())
    assert err <= bound, f"logit error {err:.3e} > {bound:.3e} (bf16 model's own error {err_bf:.3e})"
