"""CPU emulation of the device side of prefix_shared_decode, fed with the exact
arguments the Python layer passes to the op (work items, split factors, suffix
split size, expanded multi-token metadata).

``emulate_shared_kernel`` follows csrc/attention/prefix_shared.cu's index math
step by step: work item -> (group, 64-row tile), row -> (request, q head) for
GQA, even split of the group's 64-key tiles, page-by-page gather (zeros past
the prefix), per-tile masking of keys past the prefix, online softmax in the
exp2 domain with P rounded to the cache dtype, O rescaled then accumulated,
natural-log LSE; rows and splits it never writes keep -inf / NaN. The suffix
and the merge follow paged_decode.cu's kv_start range and MergeSplitsKernel
(skips -inf partials). Only the tensor-core arithmetic itself is not emulated
(fp32 matmuls stand in for WMMA), so a mismatch here is an index / masking /
split / softmax bug that the GPU run would show too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inferops.attention import PagedKVCache, PrefixPlan, prefix_shared_decode
from inferops.attention.paged import LSE_TOLERANCE
from inferops.reference import attention as ref
from inferops.testing import assert_close

ROWS, KEYS, LOG2E = 64, 64, 1.4426950408889634


def emulate_shared_kernel(q, k_cache, v_cache, group_indptr, group_page_indptr, group_pages, work,
                          scale, num_splits, partial_out, partial_lse):
    B, Hq, D = q.shape
    num_pages, ps, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    gi, gpi, gp = group_indptr.tolist(), group_page_indptr.tolist(), group_pages.tolist()
    for group, row0 in work.tolist():
        first = gi[group]
        rows = (gi[group + 1] - first) * G
        page0 = gpi[group]
        shared_len = (gpi[group + 1] - page0) * ps
        tiles_total = (shared_len + KEYS - 1) // KEYS
        tiles_per_split = (tiles_total + num_splits - 1) // num_splits
        r = torch.arange(ROWS)
        row = row0 + r
        live = row < rows
        b = first + torch.where(live, row, 0) // G
        for kv_head in range(Hkv):
            h = kv_head * G + torch.where(live, row, 0) % G
            qt = torch.where(live[:, None], q[b, h].float(), 0.0)  # [64, D], zero padding
            for split in range(num_splits):
                tile_begin = split * tiles_per_split
                num_tiles = max(0, min(tiles_total, tile_begin + tiles_per_split) - tile_begin)
                m = torch.full((ROWS,), -math.inf)
                l = torch.zeros(ROWS)
                o = torch.zeros(ROWS, D)
                for t in range(num_tiles):
                    key = (tile_begin + t) * KEYS + torch.arange(KEYS)
                    kt = torch.zeros(KEYS, D)
                    vt = torch.zeros(KEYS, D)
                    for j in range(KEYS):
                        k_ = int(key[j])
                        page = gp[page0 + k_ // ps] if k_ < shared_len else -1
                        if 0 <= page < num_pages:
                            kt[j] = k_cache[page, k_ % ps, kv_head].float()
                            vt[j] = v_cache[page, k_ % ps, kv_head].float()
                    valid = min(KEYS, shared_len - (tile_begin + t) * KEYS)
                    s = (qt @ kt.T) * (scale * LOG2E)
                    s[:, valid:] = -math.inf
                    m_new = torch.maximum(m, s.max(1).values)
                    alpha = torch.where(m == -math.inf, 0.0, torch.exp2(m - m_new))
                    p = torch.exp2(s - m_new[:, None])
                    l = l * alpha + p.sum(1)
                    m = m_new
                    o = o * alpha[:, None] + p.to(q.dtype).float() @ vt
                if num_tiles == 0:
                    continue
                for rr in range(ROWS):
                    if not live[rr]:
                        continue
                    out_row = (split, int(b[rr]), int(h[rr]))
                    empty = l[rr] == 0
                    partial_out[out_row] = 0.0 if empty else o[rr] / l[rr]
                    partial_lse[out_row] = -math.inf if empty else (m[rr] + torch.log2(l[rr])) * math.log(2)


def emulate_suffix_and_merge(q, k_cache, v_cache, block_tables, seq_lens, kv_start, scale, splits,
                             tokens_per_split, partial_out, partial_lse):
    B, Hq, D = q.shape
    shared = partial_out.shape[0] - splits
    max_len = block_tables.shape[1] * k_cache.shape[1]
    for bb in range(B):
        seq_len = min(max(int(seq_lens[bb]), 0), max_len)
        start = min(max(int(kv_start[bb]), 0), seq_len)
        for s in range(splits):
            begin = start + s * tokens_per_split
            end = min(seq_len, begin + tokens_per_split)
            if end <= begin:
                partial_out[shared + s, bb] = 0.0
                partial_lse[shared + s, bb] = -math.inf
                continue
            kk, vv = _gather(k_cache, v_cache, block_tables[bb], begin, end)  # tokens [begin, end)
            G = Hq // k_cache.shape[2]
            kk = kk.repeat_interleave(G, 1)
            vv = vv.repeat_interleave(G, 1)
            sc = torch.einsum("hd,thd->ht", q[bb].double(), kk) * scale
            partial_lse[shared + s, bb] = torch.logsumexp(sc, -1).float()
            partial_out[shared + s, bb] = torch.einsum("ht,thd->hd", torch.softmax(sc, -1), vv).float()
    lse = partial_lse.double()
    M = lse.max(0).values
    w = torch.where(lse == -math.inf, 0.0, torch.exp(lse - M))
    W = w.sum(0)
    acc = torch.zeros(B, Hq, D, dtype=torch.float64)
    for s in range(lse.shape[0]):
        live = lse[s] != -math.inf
        acc += torch.where(live[..., None], w[s][..., None] * partial_out[s].double(), 0.0)
    out = torch.where(W[..., None] == 0, 0.0, acc / W[..., None])
    return out, torch.where(W == 0, -math.inf, M + torch.log(W))


def _gather(k_cache, v_cache, bt_row, begin, end):
    ps = k_cache.shape[1]
    pos = torch.arange(begin, end)
    pages = bt_row.long()[pos // ps]
    return k_cache[pages, pos % ps].double(), v_cache[pages, pos % ps].double()


def run_emulated(monkeypatch, q, k_cache, v_cache, layout, **kw):
    """prefix_shared_decode with its op replaced by the emulation (same arguments)."""
    captured = {}

    def fake(q, k_cache, v_cache, block_tables, seq_lens, shared_lens, group_indptr, group_page_indptr,
             group_pages, work, scale, shared_splits, suffix_splits, tokens_per_split):
        B, Hq, D = q.shape
        total = shared_splits + suffix_splits
        po = torch.full((total, B, Hq, D), math.nan)
        pl = torch.full((total, B, Hq), math.nan)
        pl[:shared_splits] = -math.inf
        emulate_shared_kernel(q, k_cache, v_cache, group_indptr, group_page_indptr, group_pages, work,
                              scale, shared_splits, po, pl)
        captured.update(shared_splits=shared_splits, suffix_splits=suffix_splits, work=work)
        return emulate_suffix_and_merge(q, k_cache, v_cache, block_tables, seq_lens, shared_lens, scale,
                                        suffix_splits, tokens_per_split, po, pl)

    monkeypatch.setattr(torch.ops.inferops, "prefix_shared_decode", fake)
    out, lse = prefix_shared_decode(q, k_cache, v_cache, layout, **kw)
    return out, lse, captured


def _batch(g, prompts, page_size, hq, hkv, d, dtype=torch.float16):
    plan = PrefixPlan.build(prompts, page_size)
    need = plan.num_shared_pages + sum(-(-(p - s + 1) // page_size) for p, s in
                                       zip(plan.prompt_len, plan.shared_len))
    cache = PagedKVCache(need + 2, page_size, hkv, d, dtype, "cpu")
    cache.k.copy_(torch.randn(cache.k.shape, generator=g).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g).to(dtype))
    return plan, cache, plan.materialize(cache)


# (members per group, prefix tokens, suffix, page, Hq, Hkv, D): 21 kernel rows (not a multiple
# of 16), 2 row tiles (m * G > 64), prefix not a multiple of the 64-key tile, page 1 and 64,
# more splits than tiles for short prefixes.
CASES = [
    ((3, 2), 70, 5, 1, 7, 1, 64),
    ((20,), 100, 3, 16, 8, 2, 64),
    ((2, 5), 200, 9, 64, 4, 4, 128),
    ((4,), 1000, 1, 8, 8, 1, 64),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_emulated_kernel_equals_reference(case, gen, monkeypatch):
    members, prefix, suffix, ps, hq, hkv, d = case
    prompts = []
    for gsize in members:
        pre = torch.randint(0, 1000, (prefix,), generator=gen).tolist()
        prompts += [pre + torch.randint(1000, 2000, (suffix + i,), generator=gen).tolist()
                    for i in range(gsize)]
    prompts.append(torch.randint(2000, 3000, (suffix + 2,), generator=gen).tolist())
    plan, cache, lay = _batch(gen, prompts, ps, hq, hkv, d)
    q = torch.randn(plan.num_requests, hq, d, generator=gen).half()
    out, lse, cap = run_emulated(monkeypatch, q, cache.k, cache.v, lay)
    eo, el = ref.paged_decode(q.double(), cache.k.double(), cache.v.double(), lay.block_tables,
                              lay.seq_lens, compute_dtype=torch.float64)
    assert cap["work"].shape[0] >= 1
    assert_close(out, eo, torch.float16)
    assert_close(lse, el, LSE_TOLERANCE)


def _multi_token_expected(q, cache, lay, qo):
    rows = torch.repeat_interleave(torch.arange(len(qo)), torch.tensor(qo))
    lens = torch.cat([torch.arange(int(L) - n + 1, int(L) + 1, dtype=torch.int32)
                      for L, n in zip(lay.seq_lens, qo)])
    return ref.paged_decode(q.double(), cache.k.double(), cache.v.double(),
                            lay.block_tables.index_select(0, rows), lens, compute_dtype=torch.float64)


def test_emulated_multi_token(gen, monkeypatch):
    pre = torch.randint(0, 1000, (40,), generator=gen).tolist()
    prompts = [pre + torch.randint(1000, 2000, (6 + i,), generator=gen).tolist() for i in range(3)]
    plan, cache, lay = _batch(gen, prompts, 16, 8, 2, 64)
    qo = np.array([1, 3, 2])
    q = torch.randn(int(qo.sum()), 8, 64, generator=gen).half()
    out, lse, _ = run_emulated(monkeypatch, q, cache.k, cache.v, lay, qo_lens=qo)
    eo, el = _multi_token_expected(q, cache, lay, qo)
    assert_close(out, eo, torch.float16)
    assert_close(lse, el, LSE_TOLERANCE)



def test_multi_token_queries_inside_the_shared_prefix(gen, monkeypatch):
    """Query tokens at positions inside the shared prefix would see the whole prefix in
    the shared kernel (it has no per-row causal limit): the emulation shows the
    mismatch, and validation must refuse such calls."""
    pre = torch.randint(0, 1000, (32,), generator=gen).tolist()
    plan, cache, lay = _batch(gen, [pre, list(pre)], 16, 4, 2, 64)
    assert lay.shared_lens.tolist() == [32, 32]  # the whole prompt is shared
    qo = np.array([2, 1])  # request 0's first query token is position 30: sees 31 keys
    q = torch.randn(3, 4, 64, generator=gen).half()
    out, _, _ = run_emulated(monkeypatch, q, cache.k, cache.v, lay, qo_lens=qo, validate=False)
    eo, _ = _multi_token_expected(q, cache, lay, qo)
    assert not torch.allclose(out[0].double(), eo[0], atol=1e-2)  # device math is non-causal here
    with pytest.raises(ValueError, match="inside its shared prefix"):
        run_emulated(monkeypatch, q, cache.k, cache.v, lay, qo_lens=qo)
