"""The gloo multi-process helper used by the distributed families."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed


def _reduce_scatter_and_all_to_all(rank, world_size):
    x = torch.arange(world_size * 2, dtype=torch.float32) + rank
    out = torch.empty(2)
    dist.reduce_scatter_tensor(out, x)
    # uneven all_to_all_single: rank r sends r+1 elements to every peer
    send = torch.full((world_size * (rank + 1),), float(rank))
    recv = torch.empty(sum(r + 1 for r in range(world_size)))
    dist.all_to_all_single(recv, send, output_split_sizes=[r + 1 for r in range(world_size)],
                           input_split_sizes=[rank + 1] * world_size)
    return out, recv


def _fails_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_run_distributed_collectives():
    ws = 3
    results = run_distributed(_reduce_scatter_and_all_to_all, ws)
    for rank, (out, recv) in enumerate(results):
        base = torch.arange(ws * 2, dtype=torch.float32)[2 * rank: 2 * rank + 2]
        assert torch.equal(out, base * ws + sum(range(ws)))
        expect = torch.cat([torch.full((r + 1,), float(r)) for r in range(ws)])
        assert torch.equal(recv, expect)


def test_run_distributed_reports_rank_failure():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 failed:.*boom on rank 1"):
        run_distributed(_fails_on_rank_1, 2)
