"""PrefixPlan: C++ planner against the Python oracle, sharing semantics, optimality, layout."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from inferops.attention import PagedKVCache, PrefixPlan, append_kv, paged_decode
from inferops.attention.paged import LSE_TOLERANCE
from inferops.testing import assert_close

FIELDS = ["order", "group_indptr", "group_page_indptr", "group_pages", "shared_len", "prompt_len",
          "page_owner", "page_index", "page_refs"]


def nested_batch(rng, n, page_size):
    """Prompts with nested shared prefixes (lengths not multiples of the page size),
    exact duplicates, empty and one-token prompts."""
    vocab = 50
    roots = [list(rng.integers(0, vocab, size=int(rng.integers(0, 5 * page_size + 3)))) for _ in range(3)]
    mids = [[list(rng.integers(0, vocab, size=int(rng.integers(1, 3 * page_size + 2)))) for _ in range(3)]
            for _ in range(3)]
    prompts = []
    for _ in range(n):
        kind = rng.integers(0, 10)
        if kind == 0:
            prompts.append([])
        elif kind == 1:
            prompts.append([int(rng.integers(0, vocab))])
        elif kind == 2 and prompts:
            prompts.append(list(prompts[int(rng.integers(0, len(prompts)))]))  # duplicate
        else:
            r = int(rng.integers(0, 3))
            m = int(rng.integers(0, 3))
            tail = list(rng.integers(0, vocab, size=int(rng.integers(0, 2 * page_size + 1))))
            prompts.append(roots[r] + (mids[r][m] if kind > 4 else []) + tail)
    return [list(map(int, p)) for p in prompts]


def total_saving(plan: PrefixPlan) -> int:
    sizes = np.diff(plan.group_indptr)
    pages = np.diff(plan.group_page_indptr)
    return int(((sizes - 1) * pages).sum())


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("trial", range(4))
def test_cpp_equals_python_oracle(page_size, trial):
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    prompts = nested_batch(rng, 60, page_size)
    decode = rng.integers(0, 50, size=len(prompts))
    a = PrefixPlan.build(prompts, page_size, decode_lens=decode, backend="cpp")
    b = PrefixPlan.build(prompts, page_size, decode_lens=decode, backend="python")
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert a.num_tree_nodes == b.num_tree_nodes


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_plan_semantics(page_size):
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    prompts = nested_batch(rng, 80, page_size)
    decode = rng.integers(0, 100, size=len(prompts))
    plan = PrefixPlan.build(prompts, page_size, decode_lens=decode)
    n = len(prompts)
    assert sorted(plan.order.tolist()) == list(range(n))  # a permutation
    assert plan.group_indptr[0] == 0 and plan.group_indptr[-1] == n
    assert (np.diff(plan.group_indptr) >= 1).all()
    for g in range(plan.num_groups):
        members = plan.order[plan.group_indptr[g]:plan.group_indptr[g + 1]]
        pages = plan.group_pages[plan.group_page_indptr[g]:plan.group_page_indptr[g + 1]]
        shared = [t for k in pages for t in prompts[plan.page_owner[k]][
            plan.page_index[k] * page_size:(plan.page_index[k] + 1) * page_size]]
        assert [plan.page_index[k] for k in pages] == list(range(len(pages)))  # a root-first chain
        for pos in range(plan.group_indptr[g], plan.group_indptr[g + 1]):
            r = plan.order[pos]
            assert plan.shared_len[pos] == len(shared) and plan.prompt_len[pos] == len(prompts[r])
            assert prompts[r][:len(shared)] == shared  # members really share the pages' tokens
            assert plan.decode_len[pos] == decode[r]
        if len(pages):
            assert len(members) >= 2  # a shared prefix is only worth storing for two or more
        ratios = [decode[r] / max(1, len(prompts[r])) for r in members]
        assert ratios == sorted(ratios, reverse=True)  # larger decode/prompt first
    refs = np.zeros(plan.num_shared_pages, dtype=np.int64)
    for g in range(plan.num_groups):
        size = plan.group_indptr[g + 1] - plan.group_indptr[g]
        refs[plan.group_pages[plan.group_page_indptr[g]:plan.group_page_indptr[g + 1]]] += size
    np.testing.assert_array_equal(refs, plan.page_refs)
    st = plan.stats()
    assert st["read_tokens_shared"] == st["read_tokens_unshared"] - total_saving(plan) * page_size


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def _lcp_pages(prompts, block, ps):
    seqs = [prompts[i] for i in block]
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n // ps


@pytest.mark.parametrize("trial", range(25))
def test_flattening_is_optimal_on_small_batches(trial):
    """The plan's saved page reads equal the best over every partition of the batch."""
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    ps = int(rng.integers(1, 4))
    base = list(rng.integers(0, 3, size=8))
    prompts = []
    for _ in range(int(rng.integers(2, 8))):
        cut = int(rng.integers(0, 9))
        prompts.append(list(map(int, base[:cut])) + list(map(int, rng.integers(0, 3, size=int(rng.integers(0, 5))))))
    plan = PrefixPlan.build(prompts, ps)
    best = max(sum((len(b) - 1) * _lcp_pages(prompts, b, ps) for b in part if len(b) > 1)
               for part in _set_partitions(list(range(len(prompts)))))
    assert total_saving(plan) == best, (prompts, ps)


def test_materialize_decode_matches_dense_and_release(gen):
    ps, hkv, hq, d = 4, 2, 4, 64
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    system = list(rng.integers(0, 30, size=10))
    prompts = [system + list(rng.integers(0, 30, size=k)) for k in (3, 0, 7)] + [[5, 6, 7]]
    plan = PrefixPlan.build(prompts, ps, decode_lens=[2, 2, 2, 2])
    assert plan.stats()["groups_with_sharing"] == 1
    cache = PagedKVCache(64, ps, hkv, d, dtype=torch.bfloat16, device="cpu")
    layout = plan.materialize(cache)
    for k, page in enumerate(layout.shared_pages):
        assert cache.refcount(int(page)) == plan.page_refs[k] == 3
    # Prefill: K/V of a token is a fixed random embedding of its id, so shared
    # pages receive identical data from every request that writes them.
    emb_k = torch.randn(30, hkv, d, generator=gen).bfloat16()
    emb_v = torch.randn(30, hkv, d, generator=gen).bfloat16()
    for pos in range(plan.num_requests):
        toks = torch.tensor(prompts[plan.order[pos]], dtype=torch.long)
        n = toks.numel()
        append_kv(cache.k, cache.v, emb_k[toks], emb_v[toks], layout.block_tables,
                  torch.full((n,), pos, dtype=torch.int32), torch.arange(n, dtype=torch.int32))
    q = torch.randn(plan.num_requests, hq, d, generator=gen).bfloat16()
    out, lse = paged_decode(q, cache.k, cache.v, layout.block_tables, layout.seq_lens)
    for pos in range(plan.num_requests):
        toks = torch.tensor(prompts[plan.order[pos]], dtype=torch.long)
        k = emb_k[toks].double().repeat_interleave(hq // hkv, 1)
        v = emb_v[toks].double().repeat_interleave(hq // hkv, 1)
        s = torch.einsum("hd,thd->ht", q[pos].double(), k) / d**0.5
        assert_close(out[pos], torch.einsum("ht,thd->hd", torch.softmax(s, -1), v), torch.bfloat16)
        assert_close(lse[pos], torch.logsumexp(s, -1), LSE_TOLERANCE)
    free_before = cache.num_free_pages
    layout.release(cache)
    assert cache.num_free_pages == 64 and free_before < 64
    with pytest.raises(RuntimeError, match="needs .* pages, the cache has 2 free"):
        plan.materialize(PagedKVCache(2, ps, hkv, d, device="cpu"))


def test_build_errors():
    with pytest.raises(ValueError, match="`page_size`"):
        PrefixPlan.build([[1, 2]], 0)
    with pytest.raises(ValueError, match=r"`decode_lens` of shape \[2\]"):
        PrefixPlan.build([[1], [2]], 4, decode_lens=[1])
    with pytest.raises(ValueError, match="non-decreasing `offsets`"):
        PrefixPlan.build((np.arange(4, dtype=np.int32), np.array([0, 3, 2, 4])), 2, backend="cpp")
    with pytest.raises(ValueError, match=r"offsets\[-1\] == 4"):
        PrefixPlan.build((np.arange(4, dtype=np.int32), np.array([0, 3])), 2, backend="cpp")
    with pytest.raises(ValueError, match="fit in int32"):
        PrefixPlan.build([[2**40]], 2)
    empty = PrefixPlan.build([], 16)
    assert empty.num_requests == 0 and empty.num_groups == 0


def test_build_is_fast():
    """2,000 prompts of 2,000 tokens: the full 10,000-prompt case is in bench/ (~0.2 s here)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "attention", "bench_prefix_plan.py")
    spec = importlib.util.spec_from_file_location("bench_prefix_plan", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tokens, offsets = mod.make_batch(2000, 2000, np.random.default_rng(0))
    t0 = time.perf_counter()
    plan = PrefixPlan.build((tokens, offsets), 16, backend="cpp")
    elapsed = time.perf_counter() - t0
    assert plan.stats()["groups_with_sharing"] > 0
    assert elapsed < 2.0, f"PrefixPlan.build took {elapsed:.2f} s for 2,000 x 2,000 tokens"
