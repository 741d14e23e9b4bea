"""prefix_shared_decode and PrefixSharedAttention: equal to plain paged decode on the same data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import inferops
from inferops.attention import (
    PagedKVCache,
    PrefixPlan,
    PrefixSharedAttention,
    paged_decode,
    prefix_shared_decode,
)
from inferops.attention.paged import LSE_TOLERANCE
from inferops.attention.prefix_shared import shared_work
from inferops.reference import attention as ref
from inferops.testing import (
    assert_close,
    is_simulated,
    kernel_backend_for,
    kernel_module,
    poison_,
    stream_handle,
    synchronize,
)


def build_batch(g, *, groups, members, prefix, suffix, page_size, hq, hkv, d, device="cpu",
                dtype=torch.bfloat16, loners=0, empty_suffix=False):
    """Random prompts: `groups` shared prefixes x `members` requests, plus `loners`
    requests sharing nothing; caches filled with random K/V."""
    prompts = []
    for _ in range(groups):
        pre = torch.randint(0, 1000, (prefix,), generator=g).tolist()
        for i in range(members):
            n = 0 if (empty_suffix and i == 0) else suffix + i
            prompts.append(pre + torch.randint(1000, 2000, (n,), generator=g).tolist())
    for i in range(loners):
        prompts.append(torch.randint(2000, 3000, (suffix + 3 * i + 1,), generator=g).tolist())
    plan = PrefixPlan.build(prompts, page_size)
    need = plan.num_shared_pages + sum(-(-(p - s + 1) // page_size) for p, s in
                                       zip(plan.prompt_len, plan.shared_len))
    cache = PagedKVCache(need + 4, page_size, hkv, d, dtype, device)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g).to(dtype))
    layout = plan.materialize(cache)
    q = torch.randn(plan.num_requests, hq, d, generator=g).to(device, dtype)
    return plan, cache, layout, q


def test_shared_work_items():
    plan = PrefixPlan.build([[1] * 40 + [i] for i in range(20)] + [[7, 8, 9]], 16)
    w = shared_work(plan.group_indptr, plan.group_page_indptr, 4)  # 20 x 4 = 80 rows: 2 tiles
    assert w.tolist() == [[0, 0], [0, 64]]
    assert shared_work(plan.group_indptr, plan.group_page_indptr, 1).tolist() == [[0, 0]]


@pytest.mark.parametrize("page_size,hq,hkv,d", [(1, 4, 4, 64), (16, 8, 2, 64), (64, 16, 2, 128)])
def test_cpu_equals_paged_decode(page_size, hq, hkv, d, gen):
    plan, cache, lay, q = build_batch(gen, groups=2, members=3, prefix=70, suffix=5, page_size=page_size,
                                      hq=hq, hkv=hkv, d=d, loners=2, empty_suffix=True)
    out, lse = prefix_shared_decode(q, cache.k, cache.v, lay)
    eo, el = ref.paged_decode(q.double(), cache.k.double(), cache.v.double(), lay.block_tables,
                              lay.seq_lens, compute_dtype=torch.float64)
    assert_close(out, eo, torch.bfloat16)
    assert_close(lse, el, LSE_TOLERANCE)


def test_validation(gen):
    plan, cache, lay, q = build_batch(gen, groups=1, members=2, prefix=32, suffix=3, page_size=16,
                                      hq=4, hkv=2, d=64)
    with pytest.raises(ValueError, match=r"expected 2 rows in `q`"):
        prefix_shared_decode(q[:1], cache.k, cache.v, lay)
    short = lay.seq_lens.clone()
    short[0] = 5
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 5 is shorter than its shared prefix \(32 tokens\)"):
        prefix_shared_decode(q, cache.k, cache.v, lay, seq_lens=short)
    with pytest.raises(TypeError, match="PrefixLayout for `layout`"):
        prefix_shared_decode(q, cache.k, cache.v, lay.block_tables)
    with pytest.raises(TypeError, match=r"int32 for `seq_lens`"):
        prefix_shared_decode(q, cache.k, cache.v, lay, seq_lens=lay.seq_lens.long())
    too_long = lay.seq_lens.clone()
    too_long[1] = 10_000
    with pytest.raises(ValueError, match="exceeds what its block table row holds"):
        prefix_shared_decode(q, cache.k, cache.v, lay, seq_lens=too_long)


def test_helper_end_to_end_cpu(gen):
    hq, hkv, d, ps = 8, 2, 64, 4
    attn = PrefixSharedAttention(64, ps, hkv, d, torch.bfloat16, device="cpu")
    system = torch.randint(0, 50, (11,), generator=gen).tolist()
    prompts = [system + [60 + i] * (i + 1) for i in range(3)] + [[90, 91]]
    plan = attn.start(prompts, decode_lens=[3, 3, 3, 3])
    emb_k = torch.randn(100, hkv, d, generator=gen).bfloat16()
    emb_v = torch.randn(100, hkv, d, generator=gen).bfloat16()
    ordered = [prompts[i] for i in plan.order]
    toks = torch.tensor([t for p in ordered for t in p])
    attn.write_prompts(emb_k[toks], emb_v[toks])
    history = [list(p) for p in ordered]
    for step in range(3):
        new = torch.randint(0, 100, (plan.num_requests,), generator=gen)
        attn.append(emb_k[new], emb_v[new])
        for i in range(plan.num_requests):
            history[i].append(int(new[i]))
        q = torch.randn(plan.num_requests, hq, d, generator=gen).bfloat16()
        out, lse = attn.decode(q)
        for i, h in enumerate(history):
            k = emb_k[h].double().repeat_interleave(hq // hkv, 1)
            v = emb_v[h].double().repeat_interleave(hq // hkv, 1)
            s = torch.einsum("hd,thd->ht", q[i].double(), k) / d**0.5
            assert_close(out[i], torch.einsum("ht,thd->hd", torch.softmax(s, -1), v), torch.bfloat16)
            assert_close(lse[i], torch.logsumexp(s, -1), LSE_TOLERANCE)
    attn.finish()
    assert attn.cache.num_free_pages == 64
    with pytest.raises(RuntimeError, match="call start"):
        attn.decode(q)


# --- the kernels (on a GPU, or on the CPU SIMT executor: kernel_device) ----------------------

GPU_CASES = [
    dict(groups=2, members=3, prefix=70, suffix=5, page_size=1, hq=4, hkv=4, d=64, loners=2),
    dict(groups=3, members=1, prefix=40, suffix=9, page_size=16, hq=8, hkv=2, d=128, loners=1),
    dict(groups=2, members=5, prefix=200, suffix=30, page_size=64, hq=32, hkv=4, d=128, loners=0),
    # On the executor (simulated threads, tensor-core tiles included, are slow) the two large
    # cases run smaller, keeping what they test at the same GQA ratio (G = 4; fewer kv heads
    # only mean fewer blocks): groups of more than 64 kernel rows (several work items per group,
    # the last one partial) over a prefix whose last key tile is partial; a long prefix split
    # several ways (8 on the executor's 132 modelled SMs) next to a loner.
    dict(groups=8, members=64, prefix=300, suffix=20, page_size=16, hq=32, hkv=8, d=128, loners=0,
         simt=dict(groups=2, members=17, prefix=100, hq=8, hkv=2)),
    dict(groups=1, members=4, prefix=32768, suffix=100, page_size=16, hq=32, hkv=8, d=128, loners=1,
         simt=dict(prefix=1100, hq=8, hkv=2)),
    dict(groups=2, members=7, prefix=129, suffix=0, page_size=16, hq=56, hkv=8, d=64, loners=3),
    # odd page size (shared pages straddle key tiles), G = 3
    dict(groups=2, members=4, prefix=77, suffix=3, page_size=5, hq=6, hkv=2, d=64, loners=1),
]


def sized_for(case, device):
    """`case` without its `simt` entry, with that entry's sizes applied on the SIMT executor."""
    case = dict(case)
    small = case.pop("simt", {})
    return {**case, **small} if is_simulated(device) else case


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "g{groups}m{members}-pre{prefix}-p{page_size}-G{hq}_{hkv}-d{d}".format(**c))
def test_cuda_equals_reference_and_paged_decode(case, dtype, gen, kernel_device):
    plan, cache, lay, q = build_batch(gen, **sized_for(case, kernel_device), device=kernel_device,
                                      dtype=dtype, empty_suffix=True)
    out, lse = prefix_shared_decode(q, cache.k, cache.v, lay)
    assert inferops._core.ops.kernel_backend("prefix_shared_decode", q.device) == kernel_backend_for(q.device)
    eo, el = ref.paged_decode(q.double(), cache.k.double(), cache.v.double(), lay.block_tables,
                              lay.seq_lens, compute_dtype=torch.float64)
    assert_close(out, eo, dtype)
    assert_close(lse, el, LSE_TOLERANCE)
    po, pl = paged_decode(q, cache.k, cache.v, lay.block_tables, lay.seq_lens)
    assert_close(out, po.double(), Tolerance2(dtype))
    assert_close(lse, pl.double(), LSE_TOLERANCE)


def Tolerance2(dtype):
    """Two kernels' outputs each within one tolerance of the reference: allow twice."""
    from inferops.testing import TOLERANCES, Tolerance

    t = TOLERANCES[dtype]
    return Tolerance(2 * t.atol, 2 * t.rtol)


@pytest.mark.gpu
def test_cuda_graph_capture(gen, cuda_device):
    """Stays on cuda_device: CUDA-graph capture and replay."""
    plan, cache, lay, q = build_batch(gen, groups=2, members=8, prefix=500, suffix=40, page_size=16,
                                      hq=32, hkv=8, d=128, device=cuda_device)
    prefix_shared_decode(q, cache.k, cache.v, lay, validate=False)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, lse = prefix_shared_decode(q, cache.k, cache.v, lay, validate=False)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    eo, _ = ref.paged_decode(q.double(), cache.k.double(), cache.v.double(), lay.block_tables,
                             lay.seq_lens, compute_dtype=torch.float64)
    assert_close(out, eo, torch.bfloat16)


def _multi_token_case(gen, device="cpu", dtype=torch.bfloat16, d=64):
    """Requests whose last qo_lens[i] tokens are new queries (already in the cache)."""
    plan, cache, lay, _ = build_batch(gen, groups=2, members=3, prefix=40, suffix=6, page_size=16,
                                      hq=8, hkv=2, d=d, device=device, dtype=dtype, loners=1)
    qo = np.array([1, 3, 0, 2, 4, 1, 2][: plan.num_requests])
    q = torch.randn(int(qo.sum()), 8, d, generator=gen).to(device, dtype)
    return plan, cache, lay, q, qo


def _multi_token_expected(q, cache, lay, qo):
    qo_indptr = torch.tensor(np.concatenate([[0], np.cumsum(qo)]), dtype=torch.int32)
    return ref.paged_decode(
        q.double().cpu(), cache.k.double().cpu(), cache.v.double().cpu(),
        lay.block_tables.cpu().index_select(0, torch.repeat_interleave(torch.arange(len(qo)), torch.tensor(qo))),
        torch.cat([torch.arange(int(L) - n + 1, int(L) + 1, dtype=torch.int32)
                   for L, n in zip(lay.seq_lens.cpu(), qo)]) if qo.sum() else torch.zeros(0, dtype=torch.int32),
        compute_dtype=torch.float64), qo_indptr


def test_multi_token_cpu(gen):
    plan, cache, lay, q, qo = _multi_token_case(gen)
    out, lse = prefix_shared_decode(q, cache.k, cache.v, lay, qo_lens=qo)
    (eo, el), qo_indptr = _multi_token_expected(q, cache, lay, qo)
    assert_close(out, eo, torch.bfloat16)
    assert_close(lse, el, LSE_TOLERANCE)
    po, pl = paged_decode(q, cache.k, cache.v, lay.block_tables, lay.seq_lens, qo_indptr=qo_indptr)
    assert_close(out, po.double(), Tolerance2(torch.bfloat16))
    with pytest.raises(ValueError, match=r"sum\(qo_lens\) = "):
        prefix_shared_decode(q[:-1], cache.k, cache.v, lay, qo_lens=qo)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_multi_token(d, gen, kernel_device):
    plan, cache, lay, q, qo = _multi_token_case(gen, device=kernel_device, d=d)
    out, lse = prefix_shared_decode(q, cache.k, cache.v, lay, qo_lens=qo)
    (eo, el), _ = _multi_token_expected(q, cache, lay, qo)
    assert_close(out, eo, torch.bfloat16)
    assert_close(lse, el, LSE_TOLERANCE)


def test_opcheck_cpu(gen):
    plan, cache, lay, q = build_batch(gen, groups=1, members=2, prefix=32, suffix=3, page_size=16,
                                      hq=4, hkv=2, d=64, loners=1)
    args = (q, cache.k, cache.v, lay.block_tables, lay.seq_lens, lay.shared_lens, lay.group_indptr,
            lay.group_page_indptr, lay.group_pages, lay.work_items(2), 0.125, 1, 1, 16)
    torch.library.opcheck(torch.ops.inferops.prefix_shared_decode.default, args)


@pytest.mark.gpu
def test_cuda_poisoned_outputs_and_partials(gen, kernel_device):
    """Raw binding: out/lse poisoned, partial_out all NaN (slots the shared kernel never
    writes must be skipped by the merge, not multiplied by zero)."""
    from torch.utils.dlpack import to_dlpack as dl

    hq, hkv = (8, 2) if is_simulated(kernel_device) else (32, 8)  # G = 4 either way
    plan, cache, lay, q = build_batch(gen, groups=2, members=5, prefix=300, suffix=20, page_size=16,
                                      hq=hq, hkv=hkv, d=128, device=kernel_device, loners=3, empty_suffix=True)
    shared, suffix, tps = 3, 2, 16 * 2
    B, Hq, D = q.shape
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(B, Hq, device=kernel_device))
    po = poison_(torch.empty(shared + suffix, B, Hq, D, device=kernel_device))
    pl = poison_(torch.empty(shared + suffix, B, Hq, device=kernel_device))
    pl[:shared].fill_(float("-inf"))
    kernel_module(kernel_device).prefix_shared_decode(
        dl(q), dl(cache.k), dl(cache.v), dl(lay.block_tables), dl(lay.seq_lens), dl(lay.shared_lens),
        dl(lay.group_indptr), dl(lay.group_page_indptr), dl(lay.group_pages), dl(lay.work_items(4)),
        dl(out), dl(lse), dl(po), dl(pl), shared, suffix, tps, D**-0.5,
        stream_handle(kernel_device))
    synchronize(kernel_device)
    eo, el = ref.paged_decode(q.double(), cache.k.double(), cache.v.double(), lay.block_tables,
                              lay.seq_lens, compute_dtype=torch.float64)
    assert_close(out, eo, torch.bfloat16)
    assert_close(lse, el, LSE_TOLERANCE)
