"""routing_layout / permute / unpermute: exact semantics (brute force), kernels equal to the reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils.dlpack import to_dlpack

from inferops.moe import default_placement, permute, routing_layout, unpermute
from inferops.reference import moe as ref
import inferops
from inferops.testing import (
    assert_close,
    is_simulated,
    kernel_backend_for,
    kernel_module,
    poison_,
    stream_handle,
    synchronize,
)

FIELDS = ["tokens_per_expert", "expert_offsets", "dst_index", "src_index", "tokens_per_rank",
          "send_index", "send_offsets", "errors"]


def brute_force(ids, E, placement, R, align, capacity):
    """Loop-by-loop definition of the layout."""
    T, k = ids.shape
    counts = [0] * E
    bad = 0
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if 0 <= e < E and 0 <= int(placement[e]) < R:
                counts[e] += 1
            else:
                bad += 1
    offs = [0]
    for e in range(E):
        offs.append(offs[-1] + -(-counts[e] // align) * align)
    seen = [0] * E
    dst = [[-1] * k for _ in range(T)]
    src = [-1] * capacity
    over = 0
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if not (0 <= e < E and 0 <= int(placement[e]) < R):
                continue
            pos = offs[e] + seen[e]
            seen[e] += 1
            if pos < capacity:
                dst[t][j], src[pos] = pos, t
            else:
                over += 1
    per_rank = [0] * R
    send = [[-1] * R for _ in range(T)]
    for t in range(T):
        ranks = {int(placement[int(ids[t, j])]) for j in range(k)
                 if 0 <= int(ids[t, j]) < E and 0 <= int(placement[int(ids[t, j])]) < R}
        for r in sorted(ranks):
            send[t][r] = per_rank[r]
            per_rank[r] += 1
    send_offsets = [0]
    for r in range(R):
        send_offsets.append(send_offsets[-1] + per_rank[r])
    i = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    return dict(tokens_per_expert=i(counts), expert_offsets=i(offs), dst_index=i(dst).view(T, k),
                src_index=i(src), tokens_per_rank=i(per_rank), send_index=i(send).view(T, R),
                send_offsets=i(send_offsets), errors=i([bad, over]))


def _ids(g, T, k, E, device="cpu", dtype=torch.int32):
    return torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(device, dtype) if T else \
        torch.zeros(0, k, dtype=dtype, device=device)


def _assert_layout_equal(lay, expect):
    for f in FIELDS:
        got = getattr(lay, f).cpu() if hasattr(lay, f) else lay[f]
        assert torch.equal(got, expect[f].cpu()), (f, got, expect[f])


CASES = [
    dict(T=1, k=1, E=4, R=1, align=1),
    dict(T=17, k=2, E=8, R=2, align=8),
    dict(T=33, k=8, E=16, R=4, align=16),
    dict(T=100, k=4, E=64, R=8, align=1),
    dict(T=0, k=2, E=4, R=2, align=4),
]


@pytest.mark.parametrize("c", CASES, ids=lambda c: "T{T}k{k}E{E}R{R}a{align}".format(**c))
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_reference_equals_brute_force(c, ids_dtype, gen):
    ids = _ids(gen, c["T"], c["k"], c["E"], dtype=ids_dtype)
    placement = torch.randint(0, c["R"], (c["E"],), generator=gen, dtype=torch.int32)
    cap = c["T"] * c["k"] + c["E"] * (c["align"] - 1)
    lay = routing_layout(ids, c["E"], placement=placement, world_size=c["R"], align=c["align"])
    _assert_layout_equal(lay, brute_force(ids, c["E"], placement, c["R"], c["align"], cap))


def test_hostile_all_to_one_expert_and_empty_rank(gen):
    ids = torch.zeros(50, 2, dtype=torch.int32)
    ids[:, 1] = 3  # every token: experts 0 and 3, both on rank 0; rank 1 receives nothing
    placement = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    lay = routing_layout(ids, 4, placement=placement, world_size=2, align=16)
    assert lay.tokens_per_expert.tolist() == [50, 0, 0, 50]
    assert lay.tokens_per_rank.tolist() == [50, 0]  # deduplicated: each token sent once
    assert lay.expert_offsets.tolist() == [0, 64, 64, 64, 128]
    _assert_layout_equal(lay, brute_force(ids, 4, placement, 2, 16, lay.capacity))


def test_out_of_range_ids_reported_not_written(gen):
    ids = torch.tensor([[0, 5], [-1, 1], [2, 2]], dtype=torch.int64)
    with pytest.raises(ValueError, match="2 top-k assignment.*expert id out of range"):
        routing_layout(ids, 4)
    lay = routing_layout(ids, 4, validate=False)
    assert lay.dst_index.tolist() == [[0, -1], [-1, 1], [2, 3]]
    assert lay.errors.tolist() == [2, 0]


def test_capacity_overflow_drops_and_reports(gen):
    ids = torch.zeros(10, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="3 assignment.*exceed the capacity of 7 rows"):
        routing_layout(ids, 2, capacity=7)
    lay = routing_layout(ids, 2, capacity=7, validate=False)
    assert lay.dst_index[:, 0].tolist() == list(range(7)) + [-1] * 3
    x = torch.randn(10, 16).bfloat16()
    y = permute(x, lay)
    assert y.shape == (7, 16) and torch.equal(y, x[:7])


@pytest.mark.parametrize("k", [1, 8])
def test_permute_unpermute_roundtrip(k, gen):
    T, E, hidden = 37, 16, 64
    ids = _ids(gen, T, k, E)
    lay = routing_layout(ids, E, align=8)
    x = torch.randn(T, hidden, generator=gen).bfloat16()
    xp = permute(x, lay)
    assert xp.shape == (lay.capacity, hidden)
    rows = lay.src_index >= 0
    assert torch.equal(xp[rows], x[lay.src_index[rows].long()]) and (xp[~rows] == 0).all()
    w = torch.rand(T, k, generator=gen)
    out = unpermute(xp, lay, w)  # identity experts: out = x * sum_j w_j
    assert_close(out, x.double() * w.double().sum(1, keepdim=True), torch.bfloat16)


def test_unpermute_dropped_slot_ignores_nonfinite_row0():
    # dst = -1 (dropped / "elsewhere") must contribute nothing even when the row the
    # reference gathers for it (row 0, clamped) is nan: 0 * nan would leak a nan
    y = torch.randn(4, 8)
    y[0] = float("nan")  # e.g. an unwritten padding row
    dst = torch.tensor([[1, -1], [2, 3]], dtype=torch.int32)
    w = torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    out = ref.unpermute(y, dst, w)
    assert torch.equal(out, torch.stack([0.5 * y[1], 1.0 * y[2] + 2.0 * y[3]]))


def test_bad_input():
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="int32 or int64 for `topk_ids`, got float32"):
        routing_layout(ids.float(), 4)
    with pytest.raises(ValueError, match=r"shape \[T, k\]"):
        routing_layout(ids[0], 4)
    with pytest.raises(ValueError, match=r"shape \[4\] for `placement`"):
        routing_layout(ids, 4, placement=torch.zeros(3, dtype=torch.int32))
    lay = routing_layout(ids, 4)
    with pytest.raises(ValueError, match="expected 4 rows in `x`"):
        permute(torch.zeros(3, 8).half(), lay)
    with pytest.raises(ValueError, match=r"expected 8 rows in `y`"):
        unpermute(torch.zeros(9, 8).half(), lay, torch.ones(4, 2))
    with pytest.raises(TypeError, match="for `x`, got int32"):
        permute(torch.zeros(4, 8, dtype=torch.int32), lay)


def test_default_placement_balanced():
    p = default_placement(16, 4)
    assert p.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


# --- CPU emulation of RoutingLayoutKernel (csrc/moe/layout.cu) ----------------------------------


def emulate_layout_kernel(ids, placement, R, align, capacity, threads=1024):
    """The kernel's algorithm step by step: chunks of `threads` assignments, warps of 32
    lanes, __match_any_sync peers, per-warp counts and a running count per expert (pass
    2); per-token rank masks and ballots (pass 3). Shared memory is modelled by arrays."""
    T, k = ids.shape
    E = placement.numel()
    flat = ids.reshape(-1).long().clamp(-2**31, 2**31 - 1)  # load_id's int64 -> int clamp
    plc = placement.long()
    n = T * k
    warps = threads // 32

    def valid(e):
        ok = (e >= 0) & (e < E)
        r = torch.where(ok, plc[e.clamp(0, E - 1)], -1)
        return ok & (r >= 0) & (r < R)

    ok_all = valid(flat)
    counts = torch.bincount(flat[ok_all], minlength=E)[:E]
    err0 = int((~ok_all).sum())
    offs = [0]
    for e in range(E):
        offs.append(offs[-1] + (int(counts[e]) + align - 1) // align * align)
    offs = torch.tensor(offs)
    running = torch.zeros(E, dtype=torch.long)
    dst = torch.full((n,), -1, dtype=torch.long)
    src = torch.full((capacity,), -1, dtype=torch.long)
    err1 = 0
    lane = torch.arange(32)
    lt = lane[None, :] < lane[:, None]  # lt[l, m]: lane m is before lane l (lanemask_lt)
    for base in range(0, n, threads):
        i = base + torch.arange(threads)
        e = torch.where(i < n, flat[i.clamp(max=max(n - 1, 0))] if n else torch.full_like(i, -1), -1)
        ok = (i < n) & valid(e)
        key = torch.where(ok, e, -1).view(warps, 32)  # __match_any_sync value
        same = key[:, :, None] == key[:, None, :]  # [warp, lane, peer]
        in_warp = (same & lt[None]).sum(-1).view(-1)
        popc = same.sum(-1).view(-1)
        warp_cnt = torch.zeros(warps, E, dtype=torch.long)
        w_of = torch.arange(threads) // 32
        lead = ok & (in_warp == 0)
        warp_cnt[w_of[lead], e[lead]] = popc[lead]
        for tid in torch.nonzero(ok).flatten().tolist():
            ee, w = int(e[tid]), int(w_of[tid])
            pos = int(offs[ee]) + int(running[ee]) + int(warp_cnt[:w, ee].sum()) + int(in_warp[tid])
            if pos < capacity:
                dst[base + tid] = pos
                src[pos] = (base + tid) // k
            else:
                err1 += 1
        running.index_add_(0, e[lead], popc[lead])
    rank_run = torch.zeros(R, dtype=torch.long)
    send = torch.full((T, R), -1, dtype=torch.long)
    okv = ok_all.view(T, k) if n else torch.zeros(T, k, dtype=torch.bool)
    rank_of = torch.where(okv, plc[flat.clamp(0, E - 1).view(T, k)] if n else okv.long(), 0)
    for base in range(0, T, threads):
        t = base + torch.arange(threads)
        mask = torch.zeros(threads, R, dtype=torch.bool)
        live = t < T
        for j in range(k):
            tl = t[live]
            mask[torch.nonzero(live).flatten()[okv[tl, j]], rank_of[tl, j][okv[tl, j]]] = True
        bits = mask.view(warps, 32, R)
        warp_rcnt = bits.sum(1)  # [warp, R]: popc(ballot)
        before_lane = (bits[:, None, :, :] & lt[None, :, :, None]).sum(2).view(threads, R)
        before_warp = torch.cat([torch.zeros(1, R, dtype=torch.long), warp_rcnt.cumsum(0)[:-1]])
        pos = rank_run[None, :] + before_lane + before_warp.repeat_interleave(32, 0)
        pos = torch.where(mask, pos, -1)
        send[t[live]] = pos[live]
        rank_run += warp_rcnt.sum(0)
    send_offsets = torch.cat([torch.zeros(1, dtype=torch.long), rank_run.cumsum(0)])
    i32 = lambda x: x.to(torch.int32)  # noqa: E731
    return dict(tokens_per_expert=i32(counts), expert_offsets=i32(offs), dst_index=i32(dst).view(T, k),
                src_index=i32(src), tokens_per_rank=i32(rank_run), send_index=i32(send),
                send_offsets=i32(send_offsets), errors=torch.tensor([err0, err1], dtype=torch.int32))


EMU_CASES = CASES + [dict(T=4096, k=8, E=256, R=8, align=128), dict(T=3000, k=2, E=1024, R=64, align=1),
                     dict(T=1500, k=3, E=5, R=3, align=7)]


@pytest.mark.parametrize("c", EMU_CASES, ids=lambda c: "T{T}k{k}E{E}R{R}a{align}".format(**c))
def test_kernel_emulation_equals_reference(c, gen):
    ids = _ids(gen, c["T"], c["k"], c["E"], dtype=torch.int64)
    if c["T"]:
        ids[::7] = ids[0].clone()  # long runs of one expert across warps and chunks
        ids[5::11, 0] = -1  # 'elsewhere' slots of the dispatcher
        ids[3::13, -1] = c["E"] + 2**33  # out of range (and beyond int32)
    placement = torch.randint(0, c["R"], (c["E"],), generator=gen, dtype=torch.int32)
    placement[c["E"] // 2] = c["R"]  # an expert placed on no valid rank
    full = c["T"] * c["k"] + c["E"] * (c["align"] - 1)
    for cap in (full, full // 3):  # and with capacity overflow
        expect = dict(zip(FIELDS, ref.routing_layout(ids, placement, c["R"], c["align"], cap)))
        _assert_layout_equal(emulate_layout_kernel(ids, placement, c["R"], c["align"], cap), expect)


def test_kernel_shared_memory_fits():
    # launch_routing_layout's dynamic smem at the limits (E = 1024, R = 64), plus the static
    # err[2] (cuobjdump --dump-resource-usage reports SHARED:1040 with the 1 KiB reserve),
    # must fit the 227 KiB opt-in of sm_90
    # counts, running [E], offs [E + 1], warp_cnt [warps][E], rank_run [R], warp_rcnt [warps][R]
    E, R, warps = 1024, 64, 32
    smem = ((3 + warps) * E + 1 + (1 + warps) * R) * 4
    assert smem + 1040 <= 228 * 1024


# --- the kernels (on a GPU, or on the CPU SIMT executor: kernel_device) ---------------------

# On the executor (one 1024-thread block run fiber by fiber) T = 4096, k = 8 takes ~2 s:
# 1500 tokens keep many pass-2 chunks and two pass-3 token chunks.
GPU_CASES = CASES + [dict(T=4096, k=8, E=256, R=8, align=128), dict(T=3000, k=2, E=1024, R=64, align=1)]
SIM_CASES = GPU_CASES[:-2] + [dict(T=1500, k=8, E=256, R=8, align=128), GPU_CASES[-1]]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(GPU_CASES)), ids=lambda i: "T{T}k{k}E{E}R{R}a{align}".format(**GPU_CASES[i]))
def test_cuda_layout_equals_reference(case, gen, kernel_device):
    c = (SIM_CASES if is_simulated(kernel_device) else GPU_CASES)[case]
    ids = _ids(gen, c["T"], c["k"], c["E"])
    if c["T"]:  # (ids[0] of an empty T = 0 tensor raises IndexError)
        ids[::7] = ids[0].clone()  # many tokens on the same experts
    placement = torch.randint(0, c["R"], (c["E"],), generator=gen, dtype=torch.int32)
    cap = c["T"] * c["k"] + c["E"] * (c["align"] - 1)
    lay = routing_layout(ids.to(kernel_device), c["E"], placement=placement.to(kernel_device), world_size=c["R"],
                         align=c["align"])
    assert inferops._core.ops.kernel_backend("routing_layout", lay.src_index.device) == kernel_backend_for(kernel_device)
    expect = ref.routing_layout(ids, placement, c["R"], c["align"], cap)
    _assert_layout_equal(lay, dict(zip(FIELDS, expect)))


@pytest.mark.gpu
def test_cuda_layout_writes_every_output(gen, kernel_device):
    """Raw binding with every output poisoned: int64 ids (with -1, out of range, beyond
    int32), an expert on no valid rank, capacity drops, 1100 tokens (two pass-3 chunks)."""
    T, k, E, R, align = 1100, 3, 40, 5, 4
    ids = _ids(gen, T, k, E, dtype=torch.int64)
    ids[::9, 0] = -1
    ids[4::13, 2] = E + 2**33
    placement = torch.randint(0, R, (E,), generator=gen, dtype=torch.int32)
    placement[7] = -1
    cap = T * k // 2
    outs = [poison_(torch.empty(s, dtype=torch.int32, device=kernel_device))
            for s in ((E,), (E + 1,), (T, k), (cap,), (R,), (T, R), (R + 1,), (2,))]
    kernel_module(kernel_device).routing_layout(to_dlpack(ids.to(kernel_device)),
                                                to_dlpack(placement.to(kernel_device)),
                                                *(to_dlpack(o) for o in outs), align, stream_handle(kernel_device))
    synchronize(kernel_device)
    _assert_layout_equal(dict(zip(FIELDS, outs)),
                         dict(zip(FIELDS, ref.routing_layout(ids, placement, R, align, cap))))


@pytest.mark.gpu
def test_cuda_layout_errors_and_capacity(kernel_device):
    ids = torch.tensor([[0, 9], [-3, 1], [2, 2]] + [[0, 0]] * 20, dtype=torch.int64, device=kernel_device)
    ids[5, 1] = 2**33  # beyond int32: load_id clamps it, still out of range
    lay = routing_layout(ids, 4, capacity=10, validate=False)
    expect = ref.routing_layout(ids.cpu(), default_placement(4, 1), 1, 1, 10)
    _assert_layout_equal(lay, dict(zip(FIELDS, expect)))
    assert lay.errors.tolist()[0] == 3 and lay.errors.tolist()[1] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("E", [1, 3, 32, 33, 200, 1024])
@pytest.mark.parametrize("R", [1, 64])
def test_cuda_layout_shared_memory_across_expert_counts(E, R, gen, kernel_device):
    """Regression (#22): launch_routing_layout sized the dynamic shared memory one [E] int
    array short of what the kernel carves out (counts, running, offs [E + 1], warp_cnt
    [32 E], rank_run, warp_rcnt), so pass 3 wrote past the end. On the executor the
    smem guard (the canary, exact under ASan) fails such a launch; here every layout must
    also equal the reference, with an expert on no valid rank and capacity drops."""
    T, k = 70, min(4, E)
    ids = _ids(gen, T, k, E)
    ids[::5] = ids[0].clone()
    placement = torch.randint(0, R, (E,), generator=gen, dtype=torch.int32)
    if E > 1:
        placement[E // 2] = R  # an expert placed on no valid rank
    for cap in (T * k + E * 7, T * k // 2):
        lay = routing_layout(ids.to(kernel_device), E, placement=placement.to(kernel_device), world_size=R,
                             align=8, capacity=cap, validate=False)
        expect = ref.routing_layout(ids, placement, R, 8, cap)
        _assert_layout_equal(lay, dict(zip(FIELDS, expect)))


def _raw_layout(device, ids, placement, R, align, cap):
    outs = [poison_(torch.empty(s, dtype=torch.int32, device=device))
            for s in ((placement.numel(),), (placement.numel() + 1,), tuple(ids.shape), (cap,), (R,),
                      (ids.shape[0], R), (R + 1,), (2,))]
    kernel_module(device).routing_layout(to_dlpack(ids.to(device)), to_dlpack(placement.to(device)),
                                         *(to_dlpack(o) for o in outs), align, stream_handle(device))
    synchronize(device)
    return outs


@pytest.mark.gpu
def test_cuda_layout_shared_memory_limit(gen, kernel_device):
    """#22: the launcher sizes the shared memory from the kernel's own carve-up and checks it
    against the device's opt-in limit. Through the raw binding (the public op stops at
    E = 1024): the largest E that fits at R = 64 runs (an allocation up to the last bytes of
    the limit: the executor's guard and ASan see any use past it) and equals the reference;
    one more expert is an error that names E and R instead of a failed launch."""
    R, T, k, align = 64, 40, 2, 4
    limit = kernel_module(kernel_device).device_info(kernel_device.index or 0)["max_smem_per_block_optin"]
    e_max = (limit // 4 - 2 - 1 - 33 * R) // 35  # (3 + 32) E + 1 + 33 R ints, + err[2] static
    ids = _ids(gen, T, k, e_max)
    ids[:, 0] = e_max - 1 - torch.arange(T)  # the last experts: the top of counts / offs
    placement = default_placement(e_max, R)
    cap = T * k + e_max * (align - 1)
    outs = _raw_layout(kernel_device, ids, placement, R, align, cap)
    _assert_layout_equal(dict(zip(FIELDS, outs)), dict(zip(FIELDS, ref.routing_layout(ids, placement, R, align, cap))))
    E = e_max + 1
    need = ((3 + 32) * E + 1 + 33 * R) * 4
    with pytest.raises((ValueError, RuntimeError),
                       match=f"routing_layout: E = {E} experts and R = {R} ranks need {need} bytes of shared memory"):
        _raw_layout(kernel_device, _ids(gen, T, k, E), default_placement(E, R), R, align, T * k)


@pytest.mark.gpu
def test_cuda_layout_smaller_then_larger_shared_memory(gen, kernel_device):
    """Regression: set_dynamic_smem (csrc/common/launch.cpp) cached each exact size it had
    set, so a smaller size lowered the kernel's limit and a later launch of an already
    seen larger size skipped raising it again (cudaErrorInvalidValue). E = 1001 (> 48 KiB,
    a size no other test launches) with R = 64, then 2, then 64 again."""
    E, T, k = 1001, 40, 2
    ids = _ids(gen, T, k, E)
    for R in (64, 2, 64):
        placement = default_placement(E, R)
        lay = routing_layout(ids.to(kernel_device), E, placement=placement.to(kernel_device), world_size=R)
        _assert_layout_equal(lay, dict(zip(FIELDS, ref.routing_layout(ids, placement, R, 1, T * k))))


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [2048, 7168, 100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_permute_unpermute(hidden, dtype, gen, kernel_device):
    T, k, E = 333, 8, 64
    if is_simulated(kernel_device) and hidden == 7168:
        hidden = 2056  # still 257 vectors a row (> 2 x the block's 128 threads), at 2 s less
    ids = _ids(gen, T, k, E).to(kernel_device)
    lay = routing_layout(ids, E, align=16)
    x = torch.randn(T, hidden, generator=gen).to(kernel_device, dtype)
    xp = permute(x, lay)
    assert torch.equal(xp, ref.permute(x, lay.src_index))  # data movement: exact
    y = torch.randn(xp.shape, generator=gen).to(kernel_device, dtype)
    y[lay.src_index < 0] = float("nan")  # padding rows: unpermute must never read them
    w = torch.rand(T, k, generator=gen).to(kernel_device)
    out = unpermute(y, lay, w)
    assert_close(out, ref.unpermute(y.double(), lay.dst_index, w.double(), torch.float64), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [256, 100])  # 16-byte vectors, and the scalar path
def test_cuda_permute_any_indices_is_the_gather(hidden, gen, kernel_device):
    """The kernel reads each token once and writes its dst_index slots, then fills the rows no
    token wrote; whatever src_index and dst_index hold (out of range, dropped, duplicated, or
    not pointing back at each other), every row of the poisoned output is x[src_index[row]] or
    zeros (ref.permute's definition, with out-of-range entries as zeros)."""
    T, k, cap = 37, 3, 120
    ids = _ids(gen, T, k, 8).to(kernel_device)
    lay = routing_layout(ids, 8, align=4)
    x = torch.randn(T, hidden, generator=gen).to(kernel_device, torch.bfloat16)
    cases = [(lay.src_index, lay.dst_index)]  # consistent
    src = torch.randint(-3, T + 3, (cap,), generator=gen, dtype=torch.int32)
    dst = torch.randint(-3, cap + 3, (T, k), generator=gen, dtype=torch.int32)
    for r in range(0, cap, 3):  # a third of the rows point back consistently
        if 0 <= src[r] < T:
            dst[src[r], r % k] = r
    dst[5, :] = dst[5, 0]  # duplicated slots
    cases.append((src.to(kernel_device), dst.to(kernel_device)))
    ext, stream = kernel_module(kernel_device), stream_handle(kernel_device)
    for s, d in cases:
        out = poison_(torch.empty(s.numel(), hidden, dtype=x.dtype, device=kernel_device))
        ext.permute(to_dlpack(x), to_dlpack(s), to_dlpack(d), to_dlpack(out), stream)
        synchronize(kernel_device)
        valid = (s >= 0) & (s < T)  # out-of-range entries give zeros, as negative ones do
        expect = torch.where(valid[:, None], x[s.clamp(0, T - 1).long()], torch.zeros_like(x[:1]))
        assert torch.equal(out, expect)
        if s is lay.src_index:
            assert torch.equal(out, ref.permute(x, s))


@pytest.mark.gpu
def test_cuda_rejects_fp32_rows_and_compiles(gen, kernel_device):
    """The kernels take fp16/bf16 rows wherever they run (the simt route too: fp32 is only
    for the reference); routing_layout -> permute -> unpermute under torch.compile."""
    ids = _ids(gen, 9, 2, 8).to(kernel_device)
    lay = routing_layout(ids, 8, align=4)
    with pytest.raises(TypeError, match="expected dtype float16 or bfloat16 for `x`, got float32"):
        permute(torch.zeros(9, 16, device=kernel_device), lay)
    with pytest.raises(TypeError, match="expected dtype float16 or bfloat16 for `y`, got float32"):
        unpermute(torch.zeros(lay.capacity, 16, device=kernel_device), lay, torch.ones(9, 2, device=kernel_device))
    x = torch.randn(9, 16, generator=gen).to(kernel_device, torch.bfloat16)
    w = torch.rand(9, 2, generator=gen).to(kernel_device)

    @torch.compile(fullgraph=True, backend="eager")
    def moe_identity(x, ids, w):
        lay = routing_layout(ids, 8, align=4, validate=False)
        return unpermute(permute(x, lay), lay, w)

    assert_close(moe_identity(x, ids, w), x.double() * w.double().sum(1, keepdim=True), torch.bfloat16)


def test_opcheck_cpu(gen):
    ids = _ids(gen, 9, 2, 8)
    placement = default_placement(8, 2)
    torch.library.opcheck(torch.ops.inferops.routing_layout.default, (ids, placement, 2, 4, 9 * 2 + 8 * 3))
    lay = routing_layout(ids, 8, align=4)
    x = torch.randn(9, 16, generator=gen).bfloat16()
    torch.library.opcheck(torch.ops.inferops.permute.default, (x, lay.src_index, lay.dst_index))
    y = permute(x, lay)
    torch.library.opcheck(torch.ops.inferops.unpermute.default, (y, lay.dst_index, torch.rand(9, 2, generator=gen)))


def test_torch_compile_fullgraph(gen):
    ids = _ids(gen, 9, 2, 8)
    x = torch.randn(9, 16, generator=gen).bfloat16()
    w = torch.rand(9, 2, generator=gen)

    @torch.compile(fullgraph=True, backend="eager")
    def moe_identity(x, ids, w):
        lay = routing_layout(ids, 8, align=4, validate=False)
        return unpermute(permute(x, lay), lay, w)

    assert_close(moe_identity(x, ids, w), x.double() * w.double().sum(1, keepdim=True), torch.bfloat16)


def _unpermute_drops_strided(gen, device, hidden, wdtype, vec_aligned):
    """-1 ('elsewhere') ids and capacity drops, NaN padding rows, a strided x (vector path
    when vec_aligned, else a 2-byte offset: scalar path), fp32/fp16/bf16 weights."""
    T, k, E = 129, 4, 16
    ids = _ids(gen, T, k, E)
    ids[::5, 1] = -1
    lay = routing_layout(ids.to(device), E, align=8, capacity=T * k // 2, validate=False)
    assert lay.errors.tolist()[0] > 0 and lay.errors.tolist()[1] > 0
    base = torch.randn(T, hidden + 8, generator=gen).to(device, torch.bfloat16)
    x = base[:, 8:] if vec_aligned else base[:, 1:hidden + 1]
    xp = permute(x, lay)
    assert torch.equal(xp, ref.permute(x, lay.src_index))
    y = torch.randn(xp.shape, generator=gen).to(device, torch.bfloat16)
    y[lay.src_index < 0] = float("nan")  # never read: padding and capacity-dropped rows
    w = torch.rand(T, k, generator=gen).to(device, wdtype)
    out = unpermute(y, lay, w)
    assert_close(out, ref.unpermute(y.double(), lay.dst_index, w.double(), torch.float64), torch.bfloat16)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_unpermute_drops_strided_cpu(wdtype, gen):
    _unpermute_drops_strided(gen, "cpu", 40, wdtype, True)


@pytest.mark.gpu
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden,vec_aligned", [(2048, True), (4097, False)])
def test_cuda_unpermute_drops_strided(hidden, vec_aligned, wdtype, gen, kernel_device):
    _unpermute_drops_strided(gen, kernel_device, hidden, wdtype, vec_aligned)
