"""PagedKVCache, append_kv and paged_decode: reference semantics, validation, CUDA kernels."""

from __future__ import annotations

import math

import pytest
import torch

import inferops
from inferops.attention import PagedKVCache, append_kv, merge_states, paged_decode
from inferops.attention.paged import LSE_TOLERANCE, choose_num_splits
from inferops.reference import attention as ref
from inferops.testing import (
    Tolerance,
    assert_close,
    is_simulated,
    kernel_backend_for,
    kernel_module,
    poison_,
    stream_handle,
    synchronize,
)

NEG_INF = float("-inf")


def make_case(g, *, batch, hq, hkv, d, page_size, seq_lens, dtype=torch.bfloat16, device="cpu",
              extra_pages=3, pad_value=-1):
    """Random caches with each sequence's pages scattered through the pool.

    Block-table entries past a sequence's last page hold `pad_value` (the ops
    must ignore them).
    """
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    need = [(-(-int(n) // page_size)) for n in seq_lens]
    max_pages = max(max(need), 1)
    num_pages = sum(need) + extra_pages
    perm = torch.randperm(num_pages, generator=g).tolist()
    bt = torch.full((batch, max_pages), pad_value, dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        bt[i, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    q = rand(batch, hq, d)
    k_cache = rand(num_pages, page_size, hkv, d)
    v_cache = rand(num_pages, page_size, hkv, d)
    return q, k_cache, v_cache, bt.to(device), seq_lens.to(device)


def dense_oracle(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """Independent float64 oracle: walk each sequence's pages token by token."""
    B, Hq, D = q.shape
    _, ps, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), NEG_INF, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        idx = [(int(block_tables[b, t // ps]), t % ps) for t in range(n)]
        k = torch.stack([k_cache[p, s] for p, s in idx]).double().cpu()  # [n, Hkv, D]
        v = torch.stack([v_cache[p, s] for p, s in idx]).double().cpu()
        for h in range(Hq):
            s = (k[:, h // G] @ q[b, h].double().cpu()) * scale
            lse[b, h] = torch.logsumexp(s, 0)
            out[b, h] = torch.softmax(s, 0) @ v[:, h // G]
    return out, lse


CASES = [
    # batch, hq, hkv, d, page_size, seq_lens
    dict(batch=3, hq=4, hkv=4, d=64, page_size=1, seq_lens=[1, 7, 20]),
    dict(batch=2, hq=8, hkv=2, d=128, page_size=16, seq_lens=[33, 16]),
    dict(batch=4, hq=16, hkv=2, d=64, page_size=64, seq_lens=[65, 1, 0, 130]),
    dict(batch=1, hq=32, hkv=8, d=128, page_size=16, seq_lens=[300]),
    dict(batch=2, hq=6, hkv=3, d=32, page_size=5, seq_lens=[11, 9]),  # CPU-only head_dim
]


def _case_id(c):
    return f"b{c['batch']}-g{c['hq'] // c['hkv']}-d{c['d']}-p{c['page_size']}"


# --- reference (CPU) -------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_reference_matches_dense_oracle(case, gen):
    q, kc, vc, bt, sl = make_case(gen, **case, dtype=torch.float64)
    out, lse = ref.paged_decode(q, kc, vc, bt, sl, compute_dtype=torch.float64)
    eo, el = dense_oracle(q, kc, vc, bt, sl)
    assert_close(out, eo, torch.float64)
    assert_close(lse, el, torch.float64)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_public_op_cpu(case, gen):
    q, kc, vc, bt, sl = make_case(gen, **case)
    out, lse = paged_decode(q, kc, vc, bt, sl)
    eo, el = dense_oracle(q, kc, vc, bt, sl)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, eo, torch.bfloat16)
    assert_close(lse, el, LSE_TOLERANCE)


def test_split_halves_merge_to_whole(gen):
    """Decode over two halves of a sequence, merged by LSE, equals decode over all of it."""
    q, kc, vc, bt, sl = make_case(gen, batch=2, hq=8, hkv=2, d=64, page_size=4,
                                  seq_lens=[32, 32], dtype=torch.float64)
    whole = ref.paged_decode(q, kc, vc, bt, sl, compute_dtype=torch.float64)
    first = ref.paged_decode(q, kc, vc, bt[:, :4].contiguous(), torch.tensor([16, 16]),
                             compute_dtype=torch.float64)
    second = ref.paged_decode(q, kc, vc, bt[:, 4:].contiguous(), torch.tensor([16, 16]),
                              compute_dtype=torch.float64)
    v, lse = ref.merge_states(first[0], first[1], second[0], second[1], compute_dtype=torch.float64)
    assert_close(v, whole[0], torch.float64)
    assert_close(lse, whole[1], torch.float64)
    # and through the public op, in fp32
    v2, lse2 = merge_states(first[0].float(), first[1].float(), second[0].float(), second[1].float())
    assert_close(v2, whole[0], torch.float32)


def test_append_kv_reference_and_op(gen):
    P, ps, H, D = 10, 4, 2, 8
    kc = poison_(torch.empty(P, ps, H, D, dtype=torch.float16))
    vc = poison_(torch.empty(P, ps, H, D, dtype=torch.float16))
    bt = torch.tensor([[3, 7, -1], [1, 0, 9]], dtype=torch.int32)
    seq_ids = torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32)
    pos = torch.tensor([0, 5, 2, 4, 11], dtype=torch.int32)
    k = torch.randn(5, H, D, generator=gen).half()
    v = torch.randn(5, H, D, generator=gen).half()
    append_kv(kc, vc, k, v, bt, seq_ids, pos)
    expect = [(3, 0), (7, 1), (1, 2), (0, 0), (9, 3)]
    for t, (page, slot) in enumerate(expect):
        assert torch.equal(kc[page, slot], k[t]) and torch.equal(vc[page, slot], v[t])
    written = torch.zeros(P, ps, dtype=torch.bool)
    for page, slot in expect:
        written[page, slot] = True
    assert torch.isnan(kc[~written]).all() and torch.isnan(vc[~written]).all()


# --- PagedKVCache allocator ---------------------------------------------------------------


def test_cache_allocate_retain_release():
    c = PagedKVCache(8, page_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float16, device="cpu")
    assert c.k.shape == (8, 16, 2, 64) and c.num_free_pages == 8
    prefix = c.allocate(3)
    assert prefix.dtype == torch.int32 and prefix.tolist() == [0, 1, 2]
    c.retain(prefix)  # a second request shares the prefix
    assert [c.refcount(p) for p in prefix.tolist()] == [2, 2, 2]
    c.release(prefix)  # first request done: still held
    assert c.num_free_pages == 5
    c.release(prefix)  # second request done: freed
    assert c.num_free_pages == 8 and c.refcount(0) == 0
    again = c.allocate(8)
    assert sorted(again.tolist()) == list(range(8))
    with pytest.raises(RuntimeError, match="out of pages: asked for 1, 0 of 8 free"):
        c.allocate(1)


def test_cache_allocator_errors():
    c = PagedKVCache(4, page_size=2, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="cannot release page 0: reference count 0"):
        c.release([0])
    with pytest.raises(ValueError, match="cannot retain page 1"):
        c.retain([1])
    p = c.allocate(1)
    with pytest.raises(ValueError, match="cannot release page 0: reference count 1, release 2"):
        c.release([0, 0])
    with pytest.raises(ValueError, match=r"out of range \[0, 4\)"):
        c.release([4])
    c.release(p)
    with pytest.raises(TypeError, match="float16 or bfloat16 for `dtype`"):
        PagedKVCache(4, dtype=torch.float32, device="meta")
    with pytest.raises(ValueError, match="positive int for `page_size`"):
        PagedKVCache(4, page_size=0, device="cpu")


def test_cache_append_then_decode_cpu(gen):
    c = PagedKVCache(16, page_size=4, num_kv_heads=2, head_dim=64, dtype=torch.float16, device="cpu")
    pages = c.allocate(3)
    bt = torch.full((1, 4), -1, dtype=torch.int32)
    bt[0, :3] = pages
    n = 10
    k = torch.randn(n, 2, 64, generator=gen).half()
    v = torch.randn(n, 2, 64, generator=gen).half()
    c.append(k, v, bt, torch.zeros(n, dtype=torch.int32), torch.arange(n, dtype=torch.int32))
    q = torch.randn(1, 8, 64, generator=gen).half()
    out, lse = c.decode(q, bt, torch.tensor([n], dtype=torch.int32))
    k_per_q = k.double().repeat_interleave(4, dim=1)  # GQA: 8 q heads over 2 kv heads
    v_per_q = v.double().repeat_interleave(4, dim=1)
    s = torch.einsum("hd,thd->ht", q[0].double(), k_per_q) / math.sqrt(64)
    assert_close(out[0], torch.einsum("ht,thd->hd", torch.softmax(s, -1), v_per_q), torch.float16)
    assert_close(lse[0], torch.logsumexp(s, -1), LSE_TOLERANCE)


# --- validation -------------------------------------------------------------------------------


def _valid(gen):
    return make_case(gen, batch=2, hq=8, hkv=2, d=64, page_size=4, seq_lens=[5, 8])


def test_decode_bad_page_id(gen):
    q, kc, vc, bt, sl = _valid(gen)
    bt[1, 1] = kc.shape[0]
    with pytest.raises(ValueError, match=r"page id \d+ at block_tables\[1, 1\] is out of range"):
        paged_decode(q, kc, vc, bt, sl)
    bt[1, 1] = -1
    with pytest.raises(ValueError, match=r"page id -1 at block_tables\[1, 1\]"):
        paged_decode(q, kc, vc, bt, sl)


def test_decode_seq_len_exceeds_block_table(gen):
    q, kc, vc, bt, sl = _valid(gen)
    sl[0] = bt.shape[1] * 4 + 1
    with pytest.raises(ValueError, match=r"seq_len 9 of sequence 0 exceeds what its block table row holds"):
        paged_decode(q, kc, vc, bt, sl)
    sl[0] = -2
    with pytest.raises(ValueError, match=r"`seq_lens` >= 0, got -2"):
        paged_decode(q, kc, vc, bt, sl)


def test_decode_padding_beyond_used_pages_is_ignored(gen):
    q, kc, vc, bt, sl = _valid(gen)
    bt[0, 1:] = 12345  # sequence 0 (5 tokens, page size 4) uses 2 pages: only bt[0, 2:] is padding
    with pytest.raises(ValueError):
        paged_decode(q, kc, vc, bt, sl)
    q, kc, vc, bt, sl = _valid(gen)
    bt[0, 2:] = 12345
    paged_decode(q, kc, vc, bt, sl)  # fine


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a: (a[0][:, :7], *a[1:]), ValueError, r"num_q_heads \(7\) to be a multiple of num_kv_heads \(2\)"),
        (lambda a: (a[0].half(), *a[1:]), TypeError, r"bfloat16 for `q`, got float16"),
        (lambda a: (a[0], a[1].half(), *a[2:]), TypeError, r"float16 for `v_cache`, got bfloat16"),
        (lambda a: (a[0], a[1], a[2].half(), *a[3:]), TypeError, r"bfloat16 for `v_cache`, got float16"),
        (lambda a: (a[0].double(), a[1].double(), a[2].double(), *a[3:]), TypeError, r"float16 or bfloat16.* for `k_cache`, got float64"),
        (lambda a: (*a[:3], a[3].long(), a[4]), TypeError, r"int32 for `block_tables`, got int64"),
        (lambda a: (*a[:4], a[4].long()), TypeError, r"int32 for `seq_lens`, got int64"),
        (lambda a: (*a[:4], a[4][:1]), ValueError, r"shape \[2\] for `seq_lens`, got \[1\]"),
        (lambda a: (*a[:3], a[3][:1], a[4]), ValueError, r"shape \[2, \d+\] for `block_tables`"),
        (lambda a: (a[0][..., :32], *a[1:]), ValueError, r"head_dim 64 \(the cache's\) for `q`, got 32"),
        (lambda a: (a[0], a[1].to("meta"), a[2].to("meta"), *a[3:]), ValueError, r"`k_cache` on the device of `q`"),
        (lambda a: (a[0], a[1][:, :, :1], *a[2:]), ValueError, r"shape .* for `v_cache`"),
    ],
)
def test_decode_bad_input(mutate, exc, pattern, gen):
    args = mutate(_valid(gen))
    with pytest.raises(exc, match=pattern):
        paged_decode(*args)


def test_append_bad_indices(gen):
    kc = torch.zeros(4, 2, 1, 8, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    bt = torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)
    k = torch.zeros(1, 1, 8, dtype=torch.float16)

    def call(seq, pos, **kw):
        append_kv(kc, vc, k, k, bt, torch.tensor([seq], dtype=torch.int32),
                  torch.tensor([pos], dtype=torch.int32), **kw)

    with pytest.raises(ValueError, match=r"seq_ids\[0\] = 2 is out of range \[0, 2\)"):
        call(2, 0)
    with pytest.raises(ValueError, match=r"positions\[0\] = 4 is out of range \[0, 4\)"):
        call(0, 4)
    with pytest.raises(ValueError, match=r"maps to page id 9, out of range \[0, 4\)"):
        call(1, 3)
    for empty in (bt[:0], bt[:, :0]):  # no rows / no pages: a ValueError, not an IndexError
        with pytest.raises(ValueError, match="out of range"):
            append_kv(kc, vc, k, k, empty, torch.tensor([0], dtype=torch.int32),
                      torch.tensor([0], dtype=torch.int32))
    with pytest.raises(TypeError, match=r"float16 for `k`, got float32"):
        append_kv(kc, vc, k.float(), k, bt, torch.tensor([0], dtype=torch.int32),
                  torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shape \[1, 1, 8\] for `v`"):
        append_kv(kc, vc, k, torch.zeros(1, 2, 8, dtype=torch.float16), bt,
                  torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))


def test_choose_num_splits_is_shape_only():
    assert choose_num_splits(64, 8, 4096, 132) == 1  # 512 blocks already fill the GPU
    assert choose_num_splits(1, 8, 32768, 132) == 33
    assert choose_num_splits(1, 8, 256, 132) == 1
    assert 1 <= choose_num_splits(4, 8, 2048, 132) <= 8


def test_opcheck_cpu(gen):
    q, kc, vc, bt, sl = _valid(gen)
    torch.library.opcheck(torch.ops.inferops.paged_decode.default, (q, kc, vc, bt, sl, 0.125, 0))
    k = torch.randn(2, 2, 64, generator=gen).bfloat16()
    torch.library.opcheck(torch.ops.inferops.append_kv.default,
                          (kc.clone(), vc.clone(), k, k.clone(), bt,
                           torch.tensor([0, 1], dtype=torch.int32), torch.tensor([4, 0], dtype=torch.int32)))


# --- the kernels (on a GPU, or on the CPU SIMT executor: kernel_device) ----------------------

GPU_CASES = [c for c in CASES if c["d"] in (64, 128)] + [
    # On the executor (simulated threads are slow) the two large cases run smaller, keeping what
    # they test: many sequences of mixed lengths; a long sequence next to an empty one, with the
    # default split factor well above 1.
    dict(batch=512, hq=32, hkv=8, d=128, page_size=16, seq_lens=[1 + (i * 37) % 300 for i in range(512)],
         simt=dict(batch=24, seq_lens=[1 + (i * 37) % 300 for i in range(24)])),
    dict(batch=3, hq=8, hkv=8, d=128, page_size=16, seq_lens=[32768, 0, 4097],
         simt=dict(seq_lens=[2100, 0, 517])),
    dict(batch=2, hq=56, hkv=8, d=128, page_size=16, seq_lens=[700, 1]),  # G = 7: partial warp
    # G = 3 at head_dim 64: 5 token rows (bdz) of 24 threads, a partial warp; odd page size
    dict(batch=3, hq=6, hkv=2, d=64, page_size=5, seq_lens=[37, 0, 16]),
]


def sized_for(case, device):
    """`case` without its `simt` entry, with that entry's sizes applied on the SIMT executor."""
    case = dict(case)
    small = case.pop("simt", {})
    return {**case, **small} if is_simulated(device) else case


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES, ids=_case_id)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_cuda_paged_decode(case, dtype, num_splits, gen, kernel_device):
    q, kc, vc, bt, sl = make_case(gen, **sized_for(case, kernel_device), dtype=dtype, device=kernel_device)
    out, lse = paged_decode(q, kc, vc, bt, sl, num_splits=num_splits)
    assert inferops._core.ops.kernel_backend("paged_decode", q.device) == kernel_backend_for(q.device)
    eo, el = ref.paged_decode(q.double(), kc.double(), vc.double(), bt, sl,
                              compute_dtype=torch.float64)
    assert_close(out, eo, dtype)
    assert_close(lse, el, LSE_TOLERANCE)
    empty = sl == 0
    assert (out[empty] == 0).all() and (lse[empty] == NEG_INF).all()


@pytest.mark.gpu
def test_cuda_paged_decode_strided_q(gen, kernel_device):
    """q a strided view (head stride 128, batch stride 40*128, 16-byte aligned): read in place."""
    q, kc, vc, bt, sl = make_case(gen, batch=3, hq=32, hkv=8, d=128, page_size=16,
                                  seq_lens=[100, 37, 250], device=kernel_device)
    q_store = torch.randn(3, 40, 128, generator=gen).bfloat16().to(kernel_device)
    q_store[:, 4:36] = q
    qv = q_store[:, 4:36]
    expect = ref.paged_decode(q.double(), kc.double(), vc.double(), bt, sl, compute_dtype=torch.float64)
    for num_splits in (1, 3):
        out, lse = paged_decode(qv, kc, vc, bt, sl, num_splits=num_splits)
        assert_close(out, expect[0], torch.bfloat16, name=f"out, {num_splits} splits")
        assert_close(lse, expect[1], LSE_TOLERANCE, name=f"lse, {num_splits} splits")


@pytest.mark.gpu
def test_cuda_paged_decode_graph_and_strided_q(gen, cuda_device):
    """Stays on cuda_device: CUDA-graph capture and replay (the strided q also runs on the
    executor, test_cuda_paged_decode_strided_q)."""
    q, kc, vc, bt, sl = make_case(gen, batch=8, hq=32, hkv=8, d=128, page_size=16,
                                  seq_lens=[100 * (i + 1) for i in range(8)], device=cuda_device)
    q_store = torch.randn(8, 40, 128, device=cuda_device).bfloat16()
    q_store[:, 4:36] = q
    qv = q_store[:, 4:36]  # strided (head stride 128, batch stride 40*128), aligned
    expect = ref.paged_decode(q.double(), kc.double(), vc.double(), bt, sl, compute_dtype=torch.float64)
    g = torch.cuda.CUDAGraph()
    paged_decode(qv, kc, vc, bt, sl, validate=False)  # warm up outside capture
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        out, lse = paged_decode(qv, kc, vc, bt, sl, validate=False)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert_close(out, expect[0], torch.bfloat16)
    assert_close(lse, expect[1], LSE_TOLERANCE)


@pytest.mark.gpu
def test_cuda_paged_decode_bad_page_unvalidated_stays_in_bounds(gen, kernel_device):
    """validate=False with a bad page id: no crash, no out-of-bounds access (run under memcheck
    on a GPU, under AddressSanitizer on the executor)."""
    q, kc, vc, bt, sl = make_case(gen, batch=2, hq=8, hkv=2, d=128, page_size=16,
                                  seq_lens=[40, 40], device=kernel_device)
    bt[0, 1] = 1 << 30
    out, lse = paged_decode(q, kc, vc, bt, sl, validate=False)
    synchronize(kernel_device)
    ok = ref.paged_decode(q[1:].double(), kc.double(), vc.double(), bt[1:], sl[1:], compute_dtype=torch.float64)
    assert_close(out[1:], ok[0], torch.bfloat16)  # the other sequence is untouched
    assert_close(lse[1:], ok[1], LSE_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size,hkv,d,misaligned", [
    (1, 1, 64, False), (16, 8, 128, False), (64, 2, 128, False), (16, 3, 40, False),
    (5, 3, 20, False),  # odd page size; a token's row (60 elements) is no multiple of 8: scalar copies
    (16, 2, 128, True),  # k and v 2 bytes off 16-byte alignment: scalar copies
])
def test_cuda_append_kv(dtype, page_size, hkv, d, misaligned, gen, kernel_device):
    B, n_per = 4, 9
    max_pages = math.ceil(40 / page_size)
    P = B * max_pages + 5  # distinct pages per sequence: no two tokens share a slot
    kc = poison_(torch.empty(P, page_size, hkv, d, dtype=dtype, device=kernel_device))
    vc = poison_(torch.empty_like(kc))
    bt = torch.randperm(P, generator=gen)[: B * max_pages].view(B, max_pages).to(torch.int32)
    seq_ids = torch.arange(B, dtype=torch.int32).repeat_interleave(n_per)
    positions = torch.cat([torch.randperm(max_pages * page_size, generator=gen)[:n_per] for _ in range(B)])
    positions = positions.to(torch.int32)
    k = torch.randn(B * n_per, hkv, d, generator=gen).to(dtype)
    v = torch.randn(B * n_per, hkv, d, generator=gen).to(dtype)
    k_dev, v_dev = k.to(kernel_device), v.to(kernel_device)
    if misaligned:  # same values, stored one element past an aligned base
        k_dev = torch.empty(k.numel() + 1, dtype=dtype, device=kernel_device)[1:].view(k.shape).copy_(k)
        v_dev = torch.empty(v.numel() + 1, dtype=dtype, device=kernel_device)[1:].view(v.shape).copy_(v)
        assert k_dev.data_ptr() % 16 != 0 and v_dev.data_ptr() % 16 != 0
    ek, ev = kc.to("cpu", copy=True), vc.to("cpu", copy=True)  # a copy also when kc is on the CPU
    ref.append_kv(ek, ev, k, v, bt, seq_ids, positions)
    append_kv(kc, vc, k_dev, v_dev, bt.to(kernel_device), seq_ids.to(kernel_device),
              positions.to(kernel_device))
    assert inferops._core.ops.kernel_backend("append_kv", kc.device) == kernel_backend_for(kc.device)
    exact = Tolerance(0.0, 0.0)
    assert_close(kc, ek, exact, name="k_cache")  # untouched slots must still be NaN
    assert_close(vc, ev, exact, name="v_cache")


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3])
def test_cuda_paged_decode_nan_propagates(num_splits, gen, kernel_device):
    """A NaN key makes exactly the query heads that read it NaN (out and lse); the other kv
    head and the other sequence stay finite, through the bdz and the split merges."""
    q, kc, vc, bt, sl = make_case(gen, batch=2, hq=6, hkv=2, d=64, page_size=5, seq_lens=[37, 23],
                                  device=kernel_device)
    kc[int(bt[0, 3]), 2, 1, 7] = float("nan")  # token 17 of sequence 0, kv head 1 (q heads 3..5)
    out, lse = paged_decode(q, kc, vc, bt, sl, num_splits=num_splits)
    eo, el = ref.paged_decode(q.double(), kc.double(), vc.double(), bt, sl, compute_dtype=torch.float64)
    assert torch.isnan(el[0, 3:]).all() and not torch.isnan(el[0, :3]).any()
    assert_close(out, eo, torch.bfloat16)  # NaN passes only where the reference is NaN
    assert_close(lse, el, LSE_TOLERANCE)


@pytest.mark.gpu
def test_cuda_head_dim_without_kernel_refused(gen, kernel_device):
    """head_dim 32 has no kernel: the same ValueError on a GPU and on the executor."""
    q, kc, vc, bt, sl = make_case(gen, batch=2, hq=6, hkv=3, d=32, page_size=5, seq_lens=[11, 9],
                                  device=kernel_device)
    with pytest.raises(ValueError, match="expected head_dim 64 or 128 for `q` on the GPU, got 32"):
        paged_decode(q, kc, vc, bt, sl)


# --- multi-token queries (causal among the new tokens) ------------------------------------


def causal_oracle(q, k_cache, v_cache, block_tables, seq_lens, qo_indptr):
    """float64: query j of n new tokens of sequence b attends to tokens [0, L - n + j]."""
    outs, lses = [], []
    for b in range(block_tables.shape[0]):
        lo, hi = int(qo_indptr[b]), int(qo_indptr[b + 1])
        n, L = hi - lo, int(seq_lens[b])
        for j in range(n):
            o, l = dense_oracle(q[lo + j:lo + j + 1], k_cache, v_cache, block_tables[b:b + 1],
                                torch.tensor([L - n + j + 1]))
            outs.append(o)
            lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _multi_case(gen, device="cpu", dtype=torch.bfloat16, d=64, page_size=4, counts=(1, 4, 0, 3)):
    seq_lens = [9, 17, 5, 3]
    _, kc, vc, bt, sl = make_case(gen, batch=4, hq=8, hkv=2, d=d, page_size=page_size,
                                  seq_lens=seq_lens, dtype=dtype, device=device)
    qo = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qo[-1]), 8, d, generator=gen).to(device, dtype)
    return q, kc, vc, bt, sl, qo.to(device)


def test_multi_token_queries_cpu(gen):
    q, kc, vc, bt, sl, qo = _multi_case(gen)
    out, lse = paged_decode(q, kc, vc, bt, sl, qo_indptr=qo)
    eo, el = causal_oracle(q, kc, vc, bt, sl, qo)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    assert_close(out, eo, torch.bfloat16)
    assert_close(lse, el, LSE_TOLERANCE)


def test_multi_token_queries_validation(gen):
    q, kc, vc, bt, sl, qo = _multi_case(gen)
    bad = qo.clone()
    bad[-1] += 1
    with pytest.raises(ValueError, match=r"qo_indptr\[-1\] == 8 \(rows of `q`\)"):
        paged_decode(q, kc, vc, bt, sl, qo_indptr=bad)
    bad = qo.clone()
    bad[2] = 0
    with pytest.raises(ValueError, match="non-decreasing `qo_indptr`"):
        paged_decode(q, kc, vc, bt, sl, qo_indptr=bad)
    short = sl.clone()
    short[3] = 2
    with pytest.raises(ValueError, match="sequence 3 has 3 query tokens but seq_len 2"):
        paged_decode(q, kc, vc, bt, short, qo_indptr=qo)
    with pytest.raises(ValueError, match=r"shape \[5\] for `qo_indptr`"):
        paged_decode(q, kc, vc, bt, sl, qo_indptr=qo[:-1])


@pytest.mark.gpu
@pytest.mark.parametrize("page_size,d", [(1, 64), (16, 128)])
def test_cuda_multi_token_queries(page_size, d, gen, kernel_device):
    q, kc, vc, bt, sl, qo = _multi_case(gen, device=kernel_device, d=d, page_size=page_size)
    out, lse = paged_decode(q, kc, vc, bt, sl, qo_indptr=qo)
    eo, el = causal_oracle(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl.cpu(), qo.cpu())
    assert_close(out, eo, torch.bfloat16)
    assert_close(lse, el, LSE_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_cuda_paged_decode_poisoned_outputs(num_splits, gen, kernel_device):
    """Raw binding, every output buffer poisoned: each element must be written (or, for the
    split partials, never read where unwritten)."""
    from torch.utils.dlpack import to_dlpack as dl

    q, kc, vc, bt, sl = make_case(gen, batch=5, hq=16, hkv=4, d=128, page_size=16,
                                  seq_lens=[0, 1, 200, 700, 33], device=kernel_device)
    out = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(q.shape[:2], device=kernel_device))
    po = poison_(torch.empty(num_splits, *q.shape, device=kernel_device))
    pl = poison_(torch.empty(num_splits, *q.shape[:2], device=kernel_device))
    kernel_module(kernel_device).paged_decode(
        dl(q), dl(kc), dl(vc), dl(bt), dl(sl), dl(out), dl(lse),
        dl(po) if num_splits > 1 else None, dl(pl) if num_splits > 1 else None,
        num_splits, 128**-0.5, stream_handle(kernel_device))
    synchronize(kernel_device)
    eo, el = ref.paged_decode(q.double(), kc.double(), vc.double(), bt, sl, compute_dtype=torch.float64)
    assert_close(out, eo, torch.bfloat16)
    assert_close(lse, el, LSE_TOLERANCE)


# --- emulation of the CUDA decode kernel's schedule (CPU) ---------------------------------


def emulate_cuda_paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits,
                              kv_start=None):
    """float32 model of PagedDecodeKernel + MergeSplitsKernel (csrc/attention/paged_decode.cu).

    Follows the kernel's schedule, not its threads: the host's tokens_per_split, the
    per-block split range [kv_start + s*t, ...), tiles of 16 tokens, each tz row's
    online softmax in the log2 domain (rescale only when the max grows), the merge
    of the bdz row states, the log2 -> ln LSE, and the LSE merge of the splits that
    skips empty (-inf) ones. Catches schedule/numerics mistakes (split/page/tile
    boundaries, empty splits, GQA mapping) without a GPU.
    """
    f32 = torch.float32
    B, Hq, D = q.shape
    _, ps, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    tile = 16
    kbdx = D // 8
    bdz = max(1, min(128 // (kbdx * G), tile))
    max_len = block_tables.shape[1] * ps
    tiles = -(-max_len // tile)
    tps = min(-(-tiles // num_splits) * tile, 2**31 - 1)
    log2e = torch.tensor(1.4426950408889634, dtype=f32)
    ln2 = torch.tensor(0.6931471805599453, dtype=f32)
    part_o = torch.zeros(num_splits, B, Hq, D, dtype=f32)
    part_l = torch.full((num_splits, B, Hq), NEG_INF, dtype=f32)
    for b in range(B):
        seq_len = min(max(int(seq_lens[b]), 0), max_len)
        start = 0 if kv_start is None else min(max(int(kv_start[b]), 0), seq_len)
        for split in range(num_splits):
            begin = start + split * tps
            end = min(seq_len, begin + tps)
            toks = list(range(begin, end))
            for kvh in range(Hkv):
                rows = [(int(block_tables[b, t // ps]), t % ps) for t in toks]
                for g in range(G):
                    h = kvh * G + g
                    qs = q[b, h].to(f32) * (torch.tensor(scale, dtype=f32) * log2e)
                    states = []
                    for tz in range(bdz):
                        m, l, acc = torch.tensor(NEG_INF), torch.tensor(0.0), torch.zeros(D, dtype=f32)
                        for i in range(tz, len(toks), 1):
                            if (i % tile) % bdz != tz:  # token j of a tile goes to tz = j % bdz
                                continue
                            page, slot = rows[i]
                            s = (qs * k_cache[page, slot, kvh].to(f32)).sum()
                            if s > m:
                                corr = torch.exp2(m - s)
                                l, acc, m = l * corr, acc * corr, s
                            p = torch.exp2(s - m)
                            l = l + p
                            acc = acc + p * v_cache[page, slot, kvh].to(f32)
                        states.append((torch.tensor(NEG_INF) if l == 0 else m, l, acc))
                    M = max(st[0] for st in states)
                    l = sum(((0.0 if st[0] == NEG_INF else torch.exp2(st[0] - M)) * st[1]
                             for st in states), torch.tensor(0.0))
                    acc = sum(((0.0 if st[0] == NEG_INF else torch.exp2(st[0] - M)) * st[2]
                               for st in states), torch.zeros(D, dtype=f32))
                    if l != 0:
                        part_o[split, b, h] = acc / l
                        part_l[split, b, h] = (M + torch.log2(l)) * ln2
    M = part_l.max(0).values
    w = torch.where(part_l == NEG_INF, 0.0, torch.exp(part_l - M))  # skipped splits
    W = w.sum(0)
    out = torch.where(W[..., None] == 0, 0.0,
                      (w[..., None] * part_o).sum(0) / torch.where(W == 0, 1.0, W)[..., None])
    lse = torch.where(W == 0, NEG_INF, M + torch.log(torch.where(W == 0, 1.0, W)))
    return out, lse


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize(
    "case",
    [
        dict(batch=3, hq=6, hkv=2, d=64, page_size=5, seq_lens=[37, 0, 16]),  # G 3: bdz 5, partial pages
        dict(batch=2, hq=7, hkv=1, d=128, page_size=16, seq_lens=[50, 17]),  # G 7: bdz 1
        dict(batch=1, hq=2, hkv=2, d=64, page_size=1, seq_lens=[33]),  # G 1: bdz 16
    ],
    ids=_case_id,
)
def test_emulated_cuda_schedule_matches_oracle(case, num_splits, gen):
    q, kc, vc, bt, sl = make_case(gen, **case, dtype=torch.float32)
    scale = case["d"] ** -0.5
    out, lse = emulate_cuda_paged_decode(q, kc, vc, bt, sl, scale, num_splits)
    eo, el = dense_oracle(q, kc, vc, bt, sl)
    assert_close(out, eo.float(), torch.float32)
    assert_close(lse, el.float(), LSE_TOLERANCE)
    empty = sl == 0
    assert (out[empty] == 0).all() and (lse[empty] == NEG_INF).all()
    # kv_start (suffix decode) equals decode over the suffix tokens only
    start = torch.tensor([min(7, int(n)) for n in sl], dtype=torch.int32)
    out_s, lse_s = emulate_cuda_paged_decode(q, kc, vc, bt, sl, scale, num_splits, kv_start=start)
    for b in range(case["batch"]):
        n, s0 = int(sl[b]), int(start[b])
        if n == s0:
            assert (out_s[b] == 0).all() and (lse_s[b] == NEG_INF).all()
            continue
        idx = [(int(bt[b, t // case["page_size"]]), t % case["page_size"]) for t in range(s0, n)]
        k = torch.stack([kc[p, s] for p, s in idx]).double()
        v = torch.stack([vc[p, s] for p, s in idx]).double()
        G = case["hq"] // case["hkv"]
        for h in range(case["hq"]):
            sc = (k[:, h // G] @ q[b, h].double()) * scale
            assert_close(out_s[b, h], (torch.softmax(sc, 0) @ v[:, h // G]).float(), torch.float32)
            assert_close(lse_s[b, h], torch.logsumexp(sc, 0).float(), LSE_TOLERANCE)
