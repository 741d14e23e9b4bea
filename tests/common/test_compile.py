"""Every public op traces under torch.compile(fullgraph=True) (CPU, eager backend) with its
default arguments, validation included (value checks become device-side assertions while
compiling: validation.read_flags): no graph breaks, so the ops drop into compiled models."""

from __future__ import annotations

import pytest
import torch

from inferops.attention import append_kv, paged_decode
from inferops.moe import routing_layout
from inferops.linear_attention import causal_linear_attention, linear_attention_step, simplified_linear_attention
from inferops.testing import assert_close
from tests.attention.test_paged import make_case
from tests.common.every_op import chain, clone_inputs, make_inputs


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="eager")


def test_paged_ops_compile(gen):
    q, kc, vc, bt, sl = make_case(gen, batch=2, hq=8, hkv=2, d=64, page_size=4, seq_lens=[5, 8])
    eager = paged_decode(q, kc, vc, bt, sl)
    out, lse = _compiled(lambda *a: paged_decode(*a, validate=False))(q, kc, vc, bt, sl)
    assert torch.equal(out, eager[0]) and torch.equal(lse, eager[1])
    qo = torch.tensor([0, 1, 3], dtype=torch.int32)
    q2 = torch.randn(3, 8, 64, generator=gen).bfloat16()
    eager = paged_decode(q2, kc, vc, bt, sl, qo_indptr=qo)
    got = _compiled(lambda *a: paged_decode(*a, qo_indptr=qo, validate=False))(q2, kc, vc, bt, sl)
    assert torch.equal(got[0], eager[0])
    k = torch.randn(2, 2, 64, generator=gen).bfloat16()
    kc2, vc2 = kc.clone(), vc.clone()
    _compiled(lambda *a: append_kv(*a, validate=False))(kc2, vc2, k, k, bt, torch.tensor([0, 1], dtype=torch.int32),
                                                        torch.tensor([5, 8 - 1], dtype=torch.int32))
    assert torch.equal(kc2[bt[0, 1], 1], k[0])


def test_linear_attention_ops_compile(gen):
    q, k, v = (torch.randn(1, 70, 2, 32, generator=gen).bfloat16() for _ in range(3))
    o, s = _compiled(lambda *a: causal_linear_attention(*a, output_final_state=True))(q, k, v)
    eo, es = causal_linear_attention(q, k, v, output_final_state=True)
    assert torch.equal(o, eo) and all(torch.equal(a, b) for a, b in zip(s, es))
    state = tuple(t.clone() for t in es)
    o1, _ = _compiled(linear_attention_step)(q[:, 0], k[:, 0], v[:, 0], state)
    state2 = tuple(t.clone() for t in es)
    o2, _ = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state2)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(state, state2))
    qs, ks, vs = (torch.randn(1, 2, 9, 32, generator=gen) for _ in range(3))
    w, b = torch.randn(32, 1, 5, 5, generator=gen), torch.randn(32, generator=gen)
    got = _compiled(lambda *a: simplified_linear_attention(*a, (3, 3)))(qs, ks, vs, w, b)
    assert_close(got, simplified_linear_attention(qs, ks, vs, w, b, (3, 3)).double(), torch.float32)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_every_op_chained_compiles_with_defaults(dynamic, gen):
    """The issue's trial: one function calling every family's public ops with their default
    arguments (validate=True included) compiles with fullgraph=True and gives the eager
    answer exactly (same reference code on the CPU)."""
    x = make_inputs(gen, "cpu")
    eager = chain(clone_inputs(x))
    torch._dynamo.reset()
    got = torch.compile(chain, fullgraph=True, backend="eager", dynamic=dynamic)(clone_inputs(x))
    assert len(got) == len(eager)
    for i, (a, b) in enumerate(zip(got, eager)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i} differs"


def _bad_append(k_cache, v_cache, k, bt, seq_ids, positions):
    append_kv(k_cache, v_cache, k, k, bt, seq_ids, positions)
    return k_cache


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_value_checks_still_run_when_compiled(backend, gen):
    """validate=True under compile: the index checks become device-side assertions that
    raise RuntimeError with the check's message (eagerly: ValueError with the index)."""
    q, kc, vc, bt, sl = make_case(gen, batch=2, hq=8, hkv=2, d=64, page_size=4, seq_lens=[5, 8])
    k = torch.randn(2, 2, 64, generator=gen).bfloat16()
    ids, good, bad = (torch.tensor(t, dtype=torch.int32) for t in ([0, 1], [4, 7], [4, 8]))
    torch._dynamo.reset()
    fn = torch.compile(_bad_append, fullgraph=True, backend=backend)
    fn(kc.clone(), vc.clone(), k, bt, ids, good)  # valid positions run
    with pytest.raises(ValueError, match=r"positions\[1\] = 8 is out of range \[0, 8\)"):
        _bad_append(kc.clone(), vc.clone(), k, bt, ids, bad)
    with pytest.raises(RuntimeError, match=r"expected `positions` in \[0, 8\)"):
        fn(kc.clone(), vc.clone(), k, bt, ids, bad)
    if backend != "inductor":  # one inductor compile is enough (C++ build on the CPU)
        decode = torch.compile(lambda *a: paged_decode(*a), fullgraph=True, backend=backend)
        with pytest.raises(RuntimeError, match=r"expected `seq_lens` <= max_pages \* page_size = 8"):
            decode(q, kc, vc, bt, torch.tensor([5, 9], dtype=torch.int32))
        layout = torch.compile(lambda ids: routing_layout(ids, 4).dst_index, fullgraph=True, backend=backend)
        with pytest.raises(RuntimeError, match=r"expected every top-k expert id in \[0, 4\)"):
            layout(torch.tensor([[0, 5]], dtype=torch.int32))
        cls = torch.compile(lambda q, cu: causal_linear_attention(q, q, q, cu_seqlens=cu)[0], fullgraph=True,
                            backend=backend)
        q1 = torch.randn(1, 10, 2, 32, generator=gen).bfloat16()
        with pytest.raises(RuntimeError, match=r"expected cu_seqlens\[-1\] == T = 10"):
            cls(q1, torch.tensor([0, 4, 9]))


def test_prefix_shared_decode_compiles_without_warm_up(gen):
    """materialize() builds the work items of GQA ratios up to 16, so the first call,
    compiled with default arguments, is a pure tensor program (docs/attention.md)."""
    from inferops.attention import prefix_shared_decode
    from tests.attention.test_prefix_shared import build_batch

    plan, cache, lay, q = build_batch(gen, groups=2, members=3, prefix=40, suffix=5, page_size=16, hq=8, hkv=2, d=64)
    got = _compiled(lambda q, k, v: prefix_shared_decode(q, k, v, lay))(q, cache.k, cache.v)
    eager = prefix_shared_decode(q, cache.k, cache.v, lay)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


def test_prefix_shared_work_items_match_for_every_precomputed_ratio(gen):
    from inferops.attention.prefix_plan import PRECOMPUTED_RATIOS, shared_work
    from tests.attention.test_prefix_shared import build_batch

    plan, cache, lay, q = build_batch(gen, groups=3, members=5, prefix=40, suffix=5, page_size=16, hq=8, hkv=2, d=64)
    for r in range(1, PRECOMPUTED_RATIOS + 1):
        want = shared_work(plan.group_indptr, plan.group_page_indptr, r)
        assert torch.equal(lay.work_items(r).cpu(), torch.from_numpy(want)), r


@pytest.mark.gpu
def test_default_validation_captures_in_cuda_graph(gen, cuda_device):
    """validate=True (the default) inside CUDA-graph capture: no host sync (the value checks
    become captured device-side assertions), and replay gives the eager results."""
    q, kc, vc, bt, sl = make_case(gen, batch=2, hq=8, hkv=2, d=64, page_size=4, seq_lens=[5, 8], device=cuda_device)
    k = torch.randn(2, 2, 64, generator=gen).bfloat16().to(cuda_device)
    ids = torch.tensor([0, 1], dtype=torch.int32, device=cuda_device)
    pos = torch.tensor([4, 7], dtype=torch.int32, device=cuda_device)
    topk = torch.rand(16, 8, generator=gen).topk(2, dim=1).indices.to(cuda_device, torch.int32)
    lq = torch.rand(1, 70, 2, 32, generator=gen).bfloat16().to(cuda_device)
    cu = torch.tensor([0, 30, 70], device=cuda_device)  # int64, as fla users pass

    def step(kc, vc):
        append_kv(kc, vc, k, k, bt, ids, pos)
        out, lse = paged_decode(q, kc, vc, bt, sl)
        lay = routing_layout(topk, 8)
        o, (kv, z) = causal_linear_attention(lq, lq, lq, cu_seqlens=cu, output_final_state=True)
        return out, lse, lay.dst_index, o, kv, z

    eager = step(kc.clone(), vc.clone())  # also warms every per-device cache
    kc2, vc2 = kc.clone(), vc.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(kc2, vc2)
    kc2.copy_(kc)
    vc2.copy_(vc)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)
