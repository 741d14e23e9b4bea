"""What a first real-model trial of the attention family found (issue 15): the documented
PrefixSharedAttention order, foreign pages read past a sequence's end, opcheck of every
attention op on uninitialised caches, the cache's default device, the decode_lens error."""

from __future__ import annotations

import pytest
import torch

from inferops._core.ops import REGISTRY
from inferops.attention import (
    PagedKVCache,
    PrefixPlan,
    PrefixSharedAttention,
    append_kv,
    paged_decode,
    prefix_shared_decode,
)
from inferops.attention.paged import default_device
from inferops.reference import attention as ref
from inferops.testing import assert_close


def _poisoned_batch(gen, dtype=torch.bfloat16):
    """Two requests; every slot they do not own (page 0 included, which the reference
    gathered for positions past a sequence's end) holds +inf / NaN."""
    ps, hkv, d = 4, 2, 64
    cache = PagedKVCache(12, ps, hkv, d, dtype, "cpu")
    cache.k.fill_(float("inf"))
    cache.v.fill_(float("nan"))
    bt = torch.tensor([[3, 5, 7], [9, 1, -1]], dtype=torch.int32)
    sl = torch.tensor([9, 6], dtype=torch.int32)
    for i, L in enumerate(sl.tolist()):  # fill exactly the owned slots
        n = L
        k = torch.randn(n, hkv, d, generator=gen).to(dtype)
        v = torch.randn(n, hkv, d, generator=gen).to(dtype)
        append_kv(cache.k, cache.v, k, v, bt, torch.full((n,), i, dtype=torch.int32),
                  torch.arange(n, dtype=torch.int32))
    q = torch.randn(2, 8, d, generator=gen).to(dtype)
    return cache, q, bt, sl


def _expected(cache, q, bt, sl):
    """float64 attention over exactly the owned tokens (no paging involved)."""
    ps = cache.page_size
    outs, lses = [], []
    for i, L in enumerate(sl.tolist()):
        pos = torch.arange(L)
        pages = bt[i].long()[pos // ps]
        k = cache.k[pages, pos % ps].double()  # [L, Hkv, D]
        v = cache.v[pages, pos % ps].double()
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        s = torch.einsum("hd,thd->ht", q[i].double(), k) * q.shape[-1] ** -0.5
        lses.append(torch.logsumexp(s, -1))
        outs.append(torch.einsum("ht,thd->hd", torch.softmax(s, -1), v))
    return torch.stack(outs), torch.stack(lses)


def test_reference_ignores_poisoned_foreign_pages(gen):
    cache, q, bt, sl = _poisoned_batch(gen)
    eo, el = _expected(cache, q, bt, sl)
    for out, lse in (ref.paged_decode(q, cache.k, cache.v, bt, sl),
                     paged_decode(q, cache.k, cache.v, bt, sl)):
        assert torch.isfinite(out).all()
        assert_close(out, eo, torch.bfloat16)
        assert_close(lse, el, torch.float32)


def test_multi_token_reference_ignores_poisoned_pages(gen):
    cache, q, bt, sl = _poisoned_batch(gen)
    q3 = torch.randn(3, 8, 64, generator=gen).bfloat16()
    qo = torch.tensor([0, 2, 3], dtype=torch.int32)  # two query tokens for sequence 0
    out, lse = paged_decode(q3, cache.k, cache.v, bt, sl, qo_indptr=qo)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    eo, _ = _expected(cache, q3[[1, 2]], bt, sl)  # the last query token of each sequence
    assert_close(out[[1, 2]], eo, torch.bfloat16)


def _attention_op_args(gen):
    """Arguments of every attention op, built on an uninitialised PagedKVCache (whatever
    torch.empty left there, possibly inf/NaN, in the pages nobody owns)."""
    ps, hkv, d = 16, 2, 64
    prompts = [[1] * 32 + [2, 3], [1] * 32 + [4], [9, 9, 9]]
    plan = PrefixPlan.build(prompts, ps)
    cache = PagedKVCache(16, ps, hkv, d, torch.bfloat16, "cpu")
    cache.k.view(-1)[::7] = float("inf")  # poison some slots, owned or not
    cache.v[0] = float("nan")
    foreign = cache.allocate(1)  # page 0: another batch's page, which the batch never writes
    assert foreign.tolist() == [0]
    lay = plan.materialize(cache)
    n = int(plan.prompt_len.sum())
    seq = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.from_numpy(plan.prompt_len).long())
    pos = torch.cat([torch.arange(int(L), dtype=torch.int32) for L in plan.prompt_len])
    k = torch.randn(n, hkv, d, generator=gen).bfloat16()
    v = torch.randn(n, hkv, d, generator=gen).bfloat16()
    append_kv(cache.k, cache.v, k, v, lay.block_tables, seq, pos)  # owned slots now finite
    q = torch.randn(3, 4, d, generator=gen).bfloat16()
    va, vb = torch.randn(2, 5, 4, 64, generator=gen).bfloat16()
    la, lb = torch.randn(2, 5, 4, generator=gen)
    return {
        "merge_states": (va, la, vb, lb),
        "merge_states_": (va.clone(), la.clone(), vb, lb),
        "append_kv": (cache.k.clone(), cache.v.clone(), k[:2], v[:2], lay.block_tables,
                      torch.tensor([0, 2], dtype=torch.int32), torch.tensor([34, 3], dtype=torch.int32)),
        "paged_decode": (q, cache.k, cache.v, lay.block_tables, lay.seq_lens, 0.125, 0),
        "prefix_shared_decode": (q, cache.k, cache.v, lay.block_tables, lay.seq_lens, lay.shared_lens,
                                 lay.group_indptr, lay.group_page_indptr, lay.group_pages,
                                 lay.work_items(2), 0.125, 1, 1, 16),
    }


def test_opcheck_every_attention_op(gen):
    args = _attention_op_args(gen)
    ops = sorted(name for name, info in REGISTRY.items() if info.family == "attention")
    assert sorted(args) == ops, "an attention op has no opcheck case here"
    for name in ops:
        torch.library.opcheck(getattr(torch.ops.inferops, name).default, args[name])


def test_default_device_is_accelerator_or_cpu():
    cache = PagedKVCache(2, 4, 1, 64)
    assert cache.k.device == default_device()
    if not torch.cuda.is_available():
        assert cache.k.device.type == "cpu"
    attn = PrefixSharedAttention(num_pages=4, page_size=4, num_kv_heads=1, head_dim=64)
    assert attn.cache.k.device == default_device()


def test_float32_cache_only_on_cpu():
    cache = PagedKVCache(2, 4, 1, 64, torch.float32, "cpu")
    assert cache.k.dtype == torch.float32
    with pytest.raises(TypeError, match="`dtype`"):
        PagedKVCache(2, 4, 1, 64, torch.float64, "cpu")


def test_append_past_decode_lens_names_decode_lens(gen):
    attn = PrefixSharedAttention(num_pages=16, page_size=4, num_kv_heads=1, head_dim=64, device="cpu")
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13]]
    attn.start(prompts, decode_lens=[2, 1])
    kv = torch.randn(2, 1, 64, generator=gen).bfloat16()
    attn.append(kv, kv)
    with pytest.raises(ValueError, match="decode_lens"):
        attn.append(kv, kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_documented_usage_matches_hugging_face_attention(gen, dtype):
    """PrefixSharedAttention used as its docstring says (write prompts; per step append
    the new token's K/V, then decode) equals transformers' own sdpa attention over the
    whole sequence, causal, for every new token."""
    sdpa = pytest.importorskip("transformers.integrations.sdpa_attention").sdpa_attention_forward
    hq, hkv, d, steps = 4, 2, 64, 3
    prefix = torch.randint(0, 50, (20,), generator=gen).tolist()
    prompts = [prefix + [60 + i] * (i + 1) for i in range(3)] + [[99] * 5]
    attn = PrefixSharedAttention(num_pages=32, page_size=4, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                                 device="cpu")
    plan = attn.start(prompts, decode_lens=[steps] * len(prompts))
    assert plan.stats()["groups_with_sharing"] == 1
    total = [len(p) + steps for p in prompts]
    # Per request (input order) the K/V/Q of every position: the prefix's are identical.
    K, V, Q = [], [], []
    shared_k, shared_v = torch.randn(2, len(prefix), hkv, d, generator=gen)
    for p, L in zip(prompts, total):
        k, v = torch.randn(2, L, hkv, d, generator=gen)
        if p[:len(prefix)] == prefix:
            k[:len(prefix)], v[:len(prefix)] = shared_k, shared_v
        K.append(k.to(dtype)), V.append(v.to(dtype)), Q.append(torch.randn(L, hq, d, generator=gen).to(dtype))
    order = plan.order.tolist()
    attn.write_prompts(torch.cat([K[r][:len(prompts[r])] for r in order]),
                       torch.cat([V[r][:len(prompts[r])] for r in order]))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, hq // hkv
    for t in range(steps):
        pos = [len(prompts[r]) + t for r in order]
        attn.append(torch.stack([K[r][p] for r, p in zip(order, pos)]),
                    torch.stack([V[r][p] for r, p in zip(order, pos)]))
        out, _ = attn.decode(torch.stack([Q[r][p] for r, p in zip(order, pos)]))
        for i, (r, p) in enumerate(zip(order, pos)):
            hf, _ = sdpa(module, Q[r][:p + 1].transpose(0, 1)[None].float(),
                         K[r][:p + 1].transpose(0, 1)[None].float(),
                         V[r][:p + 1].transpose(0, 1)[None].float(), None, scaling=d**-0.5)
            assert_close(out[i], hf[0, -1].to(dtype), dtype, name=f"request {r} step {t}")
    attn.finish()
    assert attn.cache.num_free_pages == 32
