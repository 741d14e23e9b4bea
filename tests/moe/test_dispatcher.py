"""MoEDispatcher on 2 and 4 gloo ranks equals a single-process MoE over 3 layers."""

from __future__ import annotations

import pytest
import torch

from inferops.moe import MoEDispatcher
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

L, E, H = 3, 8, 16
TOKENS = {2: [7, 0], 4: [5, 0, 9, 1]}  # one rank starts with no tokens


def _model():
    g = torch.Generator().manual_seed(1234)
    gates = [torch.randn(H, E, generator=g) for _ in range(L)]
    experts = [[torch.randn(H, H, generator=g) * 0.2 for _ in range(E)] for _ in range(L)]
    return gates, experts


def _inputs(world):
    g = torch.Generator().manual_seed(99)
    return [torch.randn(n, H, generator=g) for n in TOKENS[world]]


def _gate(h, w, k):
    probs = torch.softmax(h @ w, -1)
    vals, ids = probs.topk(k, -1)
    return ids, vals / vals.sum(-1, keepdim=True) if k > 1 else vals


def reference(x, k):
    gates, experts = _model()
    h = x.clone()
    for layer in range(L):
        ids, w = _gate(h, gates[layer], k)
        out = torch.zeros_like(h)
        for t in range(h.shape[0]):
            for j in range(k):
                out[t] += w[t, j] * (h[t] @ experts[layer][int(ids[t, j])])
        h = h + out
    return h


def _run_experts(disp, layer, expert_x, offsets, counts, experts):
    y = torch.zeros_like(expert_x)
    for i, e in enumerate(disp.local_experts(layer)):
        lo, n = int(offsets[i]), int(counts[i])
        y[lo:lo + n] = expert_x[lo:lo + n] @ experts[layer][e]
    return y


def _two_a2a(rank, world, k, placement):
    gates, experts = _model()
    x = _inputs(world)[rank]
    disp = MoEDispatcher(torch.distributed.group.WORLD, E, placement, max_tokens_per_rank=16, hidden=H,
                         dtype=torch.float32, align=4, num_layers=L)
    h = x.clone()
    for layer in range(L):
        ids, w = _gate(h, gates[layer], k)
        res = disp.dispatch(h, ids, w, layer)
        y = _run_experts(disp, layer, res.expert_x, res.expert_offsets, res.tokens_per_expert, experts)
        h = h + disp.combine(y, res.handle)
    return h


def _single_a2a(rank, world, placement):
    gates, experts = _model()
    x = _inputs(world)[rank]
    disp = MoEDispatcher(torch.distributed.group.WORLD, E, placement, max_tokens_per_rank=16, hidden=H,
                         dtype=torch.float32, num_layers=L)
    state = disp.start(x)
    for layer in range(L):
        ids, w = _gate(state.x, gates[layer], 1)  # the gate runs where the token is
        state = disp.route(state, ids, w, layer)
        lay = state.layout
        y = _run_experts(disp, layer, disp.expert_input(state), lay.expert_offsets, lay.tokens_per_expert, experts)
        state = disp.finish_layer(state, y)
    kv = disp.all_gather_kv(torch.full((2, 3), float(rank)))
    return disp.return_home(state), kv


def _placement(world, shuffled):
    if not shuffled:
        return None
    g = torch.Generator().manual_seed(5)
    return torch.stack([torch.randperm(E, generator=g) % world for _ in range(L)])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_dispatch_combine_equals_reference(world, k):
    outs = run_distributed(_two_a2a, world, args=(k, _placement(world, k == 2)))
    expect = reference(torch.cat(_inputs(world)), k)
    torch.testing.assert_close(torch.cat(outs), expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_single_all_to_all_equals_reference(world):
    res = run_distributed(_single_a2a, world, args=(_placement(world, True),))
    outs = [r[0] for r in res]
    expect = reference(torch.cat(_inputs(world)), 1)
    torch.testing.assert_close(torch.cat(outs), expect, rtol=1e-5, atol=1e-5)
    for _, kv in res:  # every rank holds every rank's new K/V
        assert torch.equal(kv, torch.arange(world).float().repeat_interleave(2)[:, None].expand(-1, 3))


def _route_topk2(rank, world):
    disp = MoEDispatcher(torch.distributed.group.WORLD, 4, None, max_tokens_per_rank=4, hidden=2,
                         dtype=torch.float32)
    state = disp.start(torch.zeros(2, 2))
    try:
        disp.route(state, torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2), 0)
    except NotImplementedError as e:
        return str(e)
    return "no error"


def _unbalanced(rank, world):
    try:
        MoEDispatcher(torch.distributed.group.WORLD, 4, torch.tensor([0, 0, 0, 1]), max_tokens_per_rank=4,
                      hidden=2, dtype=torch.float32)
    except ValueError as e:
        return str(e)
    return "no error"


def test_route_rejects_top_k_above_1():
    assert all("top-1" in m for m in run_distributed(_route_topk2, 2))


def test_unbalanced_placement_rejected():
    assert all("unbalanced" in m for m in run_distributed(_unbalanced, 2))


def _bad_ids_on_rank_1(rank, world):
    disp = MoEDispatcher(torch.distributed.group.WORLD, 4, None, max_tokens_per_rank=4, hidden=2,
                         dtype=torch.float32)
    ids = torch.tensor([[0], [7 if rank == 1 else 1]])
    try:
        disp.dispatch(torch.zeros(2, 2), ids, torch.ones(2, 1))
    except ValueError as e:
        return str(e)
    return "no error"


def test_invalid_expert_on_one_rank_raises_everywhere():
    msgs = run_distributed(_bad_ids_on_rank_1, 2, timeout_s=60)
    assert "another rank" in msgs[0] and "expert id out of range" in msgs[1]
