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


def _single_a2a(rank, world, k, placement):
    gates, experts = _model()
    x = _inputs(world)[rank]
    disp = MoEDispatcher(torch.distributed.group.WORLD, E, placement, max_tokens_per_rank=16, hidden=H,
                         dtype=torch.float32, num_layers=L)
    state = disp.start(x)
    partial_exchanges = 0
    for layer in range(L):
        ids, w = _gate(state.x, gates[layer], k)  # the gate runs where the token is
        state = disp.route(state, ids, w, layer)
        partial_exchanges += state.partial_any
        lay = state.layout
        y = _run_experts(disp, layer, disp.expert_input(state), lay.expert_offsets, lay.tokens_per_expert, experts)
        state = disp.finish_layer(state, y)
    kv = disp.all_gather_kv(torch.full((2, 3), float(rank)))
    return disp.return_home(state), kv, partial_exchanges


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
@pytest.mark.parametrize("k", [1, 2, 8])
def test_single_all_to_all_equals_reference(world, k):
    res = run_distributed(_single_a2a, world, args=(k, _placement(world, True)))
    outs = [r[0] for r in res]
    expect = reference(torch.cat(_inputs(world)), k)
    torch.testing.assert_close(torch.cat(outs), expect, rtol=1e-5, atol=1e-5)
    for _, kv, _ in res:  # every rank holds every rank's new K/V
        assert torch.equal(kv, torch.arange(world).float().repeat_interleave(2)[:, None].expand(-1, 3))
    partial = {r[2] for r in res}
    assert len(partial) == 1  # every rank agrees on whether the partial exchange runs
    if k == 1:  # ExFlow's case: route is the layer's only exchange
        assert partial == {0}
    else:  # shuffled placement, k >= 2: some partial sums cross ranks
        assert partial.pop() > 0


def _co_located(rank, world, k):
    """Every token's k experts on its own rank: nothing moves, finish_layer is local."""
    disp = MoEDispatcher(torch.distributed.group.WORLD, E, None, max_tokens_per_rank=16, hidden=H,
                         dtype=torch.float32)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(rank))
    per = E // world
    ids = torch.stack([torch.randperm(per)[:k] + per * rank for _ in range(3)])
    state = disp.route(disp.start(x), ids, torch.full((3, k), 1.0 / k), 0)
    out = disp.finish_layer(state, disp.expert_input(state) * 2.0)  # "expert" doubles its input
    return state.partial_any, state.x.shape[0], out.x, x


def test_co_located_experts_move_nothing():
    for partial_any, n, out, x in run_distributed(_co_located, 2, args=(2,)):
        assert not partial_any and n == 3
        torch.testing.assert_close(out, 3 * x)  # x + sum_j (1/k) * 2x


def _hostile_route(rank, world):
    """All tokens to one expert (rank 1's), top-2 with both slots equal; rank 0 has no tokens."""
    disp = MoEDispatcher(torch.distributed.group.WORLD, E, None, max_tokens_per_rank=16, hidden=H,
                         dtype=torch.float32)
    n = 0 if rank == 0 else 16
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(3))
    ids = torch.full((n, 2), E - 1, dtype=torch.int64)
    state = disp.route(disp.start(x), ids, torch.full((n, 2), 0.5), 0)
    state = disp.finish_layer(state, disp.expert_input(state) * 0 + 1.0)
    return disp.return_home(state), x


def test_single_all_to_all_hostile_routing():
    for out, x in run_distributed(_hostile_route, 2):
        torch.testing.assert_close(out, x + 1.0)  # weights 0.5 + 0.5 on an all-ones expert output


def _bad_route_ids(rank, world):
    disp = MoEDispatcher(torch.distributed.group.WORLD, 4, None, max_tokens_per_rank=4, hidden=2,
                         dtype=torch.float32)
    state = disp.start(torch.zeros(2, 2))
    msgs = []
    for ids, w in ((torch.tensor([[0, 9], [1, 2]]) if rank == 0 else torch.tensor([[0, 1], [1, 2]]),
                    torch.ones(2, 2)),
                   (torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2)),
                   (torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 1))):
        try:
            disp.route(state, ids, w, 0)
            msgs.append("no error")
        except ValueError as e:
            msgs.append(str(e))
    return msgs


def test_route_bad_input_raises_on_every_rank():
    for rank, msgs in enumerate(run_distributed(_bad_route_ids, 2, timeout_s=60)):
        assert ("expert id out of range" if rank == 0 else "another rank") in msgs[0]
        assert "topk_ids" in msgs[1] and "topk_weights" in msgs[2]


def _unbalanced(rank, world):
    try:
        MoEDispatcher(torch.distributed.group.WORLD, 4, torch.tensor([0, 0, 0, 1]), max_tokens_per_rank=4,
                      hidden=2, dtype=torch.float32)
    except ValueError as e:
        return str(e)
    return "no error"


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
