"""gemm_reduce_scatter kernel on the GPU (marked gpu): one rank equals matmul; virtual
ranks 2, 4 and 8 equal the reference for M not a multiple of the tile, M == world size,
bf16/fp16 and both weight layouts, bitwise repeatably; 100 repeated calls reuse the
flags; CUDA-graph capture and replay; a late peer (phase-2 reduction) gives the same
bits as the epilogue reduction; a peer that never arrives times out and is reported
instead of hanging; real ranks on 2+ GPUs through symmetric memory.

Without a GPU the tests taking ``kernel_device`` run on the CPU SIMT executor. Virtual
ranks run there as the engine runs them: the W grids run concurrently, as one pool of
fibers (``simt_concurrent_begin``/``end``, csrc/simt/concurrent.cpp) in a shuffled order
(INFEROPS_SIMT_SCHEDULE_SEED), each rank's owners spinning on the flags the other grids
set. The ranks also run *in turn* (``_run_in_turn``, on a GPU too): the ranks before the
last one time out (after pushing every partial; their rows become NaN), the last one
finds every peer's partial and reduces all its tiles in its GEMM epilogues (with one
block, since in a bigger grid a block's phase 2 would wait for a tile that a later block
computes and marks), then each timed-out rank is relaunched as the same call (state
rewound) and finds every flag up. The tests that need CUDA graphs, streams, a peer
arriving late or several GPUs stay on ``cuda_device``."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from inferops import tp
from inferops._core import ops
from inferops.reference import tp as ref
from inferops.testing import (
    assert_close,
    is_simulated,
    kernel_backend_for,
    kernel_module,
    poisoned_empty,
    stream_handle,
    synchronize,
)

from tests.distributed import run_distributed
from tests.tp.common import assert_gemm_rs_close

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


def _operands(gen, world, M, K, N, dtype, device, layout="nk"):
    """Stacked a [W, M, K] and b [W, K, N]; "nk": b is weight^T of a [W, N, K] weight."""
    a = (torch.randn(world, M, K, generator=gen) * K ** -0.5).to(device, dtype)
    if layout == "nk":
        b = torch.randn(world, N, K, generator=gen).to(device, dtype).transpose(1, 2)
    else:
        b = torch.randn(world, K, N, generator=gen).to(device, dtype)
    return a, b


def _virtual(world, max_m, n, dtype, device, timeout_s):
    """The virtual engine (on the executor too: its W grids run as one concurrent pool)."""
    eng = tp.GemmReduceScatter.virtual(world, max_m, n, dtype, device, timeout_s=timeout_s)
    assert eng.path == "virtual", eng.fallback_reason
    return eng


def _launch(eng, r, a, b, out, device, *, timeout_s=None, blocks=0):
    """Rank r's kernel through the raw binding, on eng's buffers."""
    kernel_module(device).gemm_reduce_scatter(
        ops.dlpack(a[r]), ops.dlpack(b[r]), ops.dlpack(out[r]), ops.dlpack(eng.peers), ops.dlpack(eng.state[r]),
        r, eng.world_size, eng.max_m, eng.n, eng.workspace.shape[1],
        eng.timeout_s if timeout_s is None else timeout_s, blocks, stream_handle(device))


def _run_in_turn(eng, a, b, out, device, order=None, wait_s=0.02):
    """One call of W virtual ranks with one grid running at a time (the SIMT executor's
    way; see the module doc). Every rank but the last of ``order`` first times out after
    ``wait_s``, with all its rows NaN; the last one runs with one block and must not wait.
    Returns out."""
    W = eng.world_size
    order = list(range(W)) if order is None else list(order)
    before = eng.state.clone()
    for i, r in enumerate(order):
        last = i == W - 1
        _launch(eng, r, a, b, out, device, timeout_s=None if last else wait_s, blocks=1 if last else 0)
    synchronize(device)
    st = eng.state.cpu()
    for r in order[:-1]:  # waited for ranks launched after it: timed out, rows NaN (never stale)
        # The source it gave up on: a later rank, or itself where, one block at a time, a block
        # waits for one of its own tiles that a later block of its grid computes.
        assert int(st[r, 2]) == 1 and int(st[r, 3]) in order[order.index(r):], (r, st[r].tolist())
        assert torch.isnan(out[r]).all(), r
    assert st[order[-1], 2] == 0, st[order[-1]].tolist()
    for r in order[:-1]:  # the same call again (epoch and error rewound): every partial is there
        eng.state[r].copy_(before[r])
        _launch(eng, r, a, b, out, device)
    synchronize(device)
    assert eng.state[:, 2].tolist() == [0] * W, eng.state.tolist()
    assert eng.state[:, 0].tolist() == (before[:, 0] + 1).tolist()  # one epoch per call on every rank
    assert eng.state[:, 1].tolist() == [0] * W
    return out


def _call(eng, a, b, device):
    """eng(a, b): concurrent ranks (GPU streams, or one concurrent pool on the executor)."""
    out = eng(a, b)
    synchronize(device)
    eng.check()
    return out


# On the executor: the same tails (M, N, K) with fewer tiles and k steps.
_SIMULATED_SHAPE = {(100, 1024, 1000): (100, 256, 1000), (2048, 256, 512): (520, 64, 264)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["nk", "kn"])
@pytest.mark.parametrize("M, K, N", [(1, 512, 384), (100, 1024, 1000), (2048, 256, 512), (333, 72, 136)])
def test_one_rank_equals_matmul(M, K, N, layout, dtype, gen, kernel_device):
    if is_simulated(kernel_device):
        M, K, N = _SIMULATED_SHAPE.get((M, K, N), (M, K, N))
    eng = tp.GemmReduceScatter(None, max_m=2048, n=1024, dtype=dtype, device=kernel_device)
    assert eng.path == "local"
    assert ops.kernel_backend("virtual_gemm_reduce_scatter", kernel_device) == kernel_backend_for(kernel_device)
    a, b = _operands(gen, 1, M, K, N, dtype, kernel_device, layout)
    out = poisoned_empty((M, N), dtype, kernel_device)
    eng(a[0], b[0], out=out)
    assert_close(out, a[0].double() @ b[0].double(), dtype)
    assert_close(tp.gemm_reduce_scatter(a[0], b[0]), a[0].double() @ b[0].double(), dtype)
    assert eng.state[0].tolist() == [1] + [0] * (tp.gemm_rs.STATE_WORDS - 1)  # ran once, no error


CASES = {  # name: M as a function of W
    "tile_tail": lambda w: 37 * w,  # M / W = 37: tiles straddle owners
    "m_eq_world": lambda w: w,
    "large": lambda w: 1040,  # 8 full row tiles + a tail, N tail too
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world", [2, 4, 8])
def test_virtual_ranks_equal_reference(world, case, dtype, gen, kernel_device):
    """Concurrent grids, as the engine launches them (the executor: one concurrent pool)."""
    M, K, N = CASES[case](world), 256, 264
    layouts = ("nk", "kn")
    if is_simulated(kernel_device):  # fewer k steps; each dtype with one layout (orthogonal paths)
        K, layouts = 64, ("kn",) if dtype == torch.bfloat16 else ("nk",)
    eng = _virtual(world, 1040, 264, dtype, kernel_device, timeout_s=10)
    for layout in layouts:
        a, b = _operands(gen, world, M, K, N, dtype, kernel_device, layout)
        out = poisoned_empty((world, M // world, N), dtype, kernel_device)
        eng(a, b, out=out)
        synchronize(kernel_device)
        eng.check()
        assert_gemm_rs_close(out, a, b, name=f"W={world} {case} {layout}")
        assert torch.equal(eng(a, b), out)  # deterministic: fixed summation order


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world", [2, 4, 8])
def test_ranks_in_turn_equal_reference(world, case, dtype, gen, kernel_device):
    """The virtual-rank cases with one grid at a time (``_run_in_turn``: how the executor
    runs them; on a GPU too)."""
    M, K, N = CASES[case](world), 256, 264
    layouts = ("nk", "kn")
    if is_simulated(kernel_device):  # fewer k steps; each dtype with one layout (orthogonal paths)
        K, layouts = 64, ("nk",) if dtype == torch.bfloat16 else ("kn",)
    eng = _virtual(world, 1040, 264, dtype, kernel_device, timeout_s=10)
    for layout in layouts:
        a, b = _operands(gen, world, M, K, N, dtype, kernel_device, layout)
        out = _run_in_turn(eng, a, b, poisoned_empty((world, M // world, N), dtype, kernel_device), kernel_device)
        assert_gemm_rs_close(out, a, b, name=f"W={world} {case} {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_summation_order_is_fixed_whichever_reduction_ran(dtype, gen, kernel_device):
    """Partials whose fp32 sum depends on the order: ranks 0 and 1 push exact negatives
    (scaled by 2^12), the others small ones (2^-12), so summing 0, 1, 2, 3 cancels the big
    ones exactly and keeps the small ones' bits, while any other order rounds them away
    (with partials of one magnitude every order gives the same bits, as fp32 holds the sum
    of a few bf16/fp16 values exactly). The ranks run in turn twice, the second time in
    reverse: rank 3, reduced in its GEMM epilogues the first time, is reduced in phase 2
    the second time (rank 0 the other way round); a GPU also runs them concurrently."""
    world, M, K, N = 4, 4 * 37, 64, 264
    a, b = _operands(gen, world, M, K, N, torch.float32, kernel_device)
    a[1] = -a[0]
    b[1] = b[0]
    a[:2] *= 2.0 ** 12
    a[2:] *= 2.0 ** -12
    a, b = a.to(dtype), b.to(dtype)
    eng = _virtual(world, M, N, dtype, kernel_device, timeout_s=10)
    out = _run_in_turn(eng, a, b, poisoned_empty((world, M // world, N), dtype, kernel_device), kernel_device)
    assert_gemm_rs_close(out, a, b)
    again = poisoned_empty((world, M // world, N), dtype, kernel_device)
    assert torch.equal(_run_in_turn(eng, a, b, again, kernel_device, order=reversed(range(world))), out)
    assert torch.equal(_call(eng, a, b, kernel_device), out)  # concurrently (executor: shuffled)


def test_buffer_n_not_multiple_of_8(gen, kernel_device):
    """Engine n = 1001 (slots of 34 x 1001 elements, not a multiple of 8) with N = 1000: the
    16-byte pushes into slots of source >= 1 and parity 1 must stay aligned (two calls: both
    parities)."""
    world, dtype = 3, torch.bfloat16
    eng = _virtual(world, 100, 1001, dtype, kernel_device, timeout_s=10)
    for i in range(2):
        a, b = _operands(gen, world, 99, 64, 1000, dtype, kernel_device)
        out = _call(eng, a, b, kernel_device)
        assert_gemm_rs_close(out, a, b, name=f"call {i}")


def test_hundred_repeated_calls_reuse_flags(gen, kernel_device):
    """100 calls (the executor: 6), then as many of one rank: flags and
    epochs carry over between calls with no host reset, in both parities, as the tiling
    changes."""
    world, dtype = 4, torch.bfloat16
    calls, K = (6, 64) if is_simulated(kernel_device) else (100, 128)
    eng = _virtual(world, 512, 256, dtype, kernel_device, timeout_s=10)
    for i in range(calls):
        M = 512 if i % 3 else 37 * world  # the tiling changes between calls too
        a, b = _operands(gen, world, M, K, 256, dtype, kernel_device)
        out = _call(eng, a, b, kernel_device)
        assert_gemm_rs_close(out, a, b, name=f"call {i}")
    eng.check()
    assert eng.state[:, 0].tolist() == [calls] * world  # one epoch per call, no host reset
    assert eng.state[:, 1].tolist() == [0] * world
    one = tp.GemmReduceScatter(None, 512, 256, dtype, kernel_device)  # one rank: the engine on the executor too
    for i in range(calls):
        a, b = _operands(gen, 1, 512 if i % 3 else 37, K, 256, dtype, kernel_device)
        assert_gemm_rs_close(one(a[0], b[0])[None], a, b, name=f"one rank, call {i}")
    one.check()
    assert one.state[0, :2].tolist() == [calls, 0]


def test_cuda_graph_capture_and_replay(gen, cuda_device):
    world, dtype, M, K, N = 2, torch.bfloat16, 256, 128, 384
    eng = tp.GemmReduceScatter.virtual(world, M, N, dtype, cuda_device, timeout_s=10)
    a, b = _operands(gen, world, M, K, N, dtype, cuda_device)
    out = torch.empty(world, M // world, N, dtype=dtype, device=cuda_device)
    eng(a, b, out=out)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eng(a, b, out=out)
    for i in range(3):
        a2, b2 = _operands(gen, world, M, K, N, dtype, cuda_device)
        a.copy_(a2)
        b.copy_(b2)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_gemm_rs_close(out, a, b, name=f"replay {i}")
    eng.check()
    assert eng.state[:, 0].tolist() == [4, 4]  # warm-up + 3 replays: epochs advance in the graph


def test_peer_that_never_arrives_times_out(gen, kernel_device):
    world, dtype, M, K, N = 2, torch.bfloat16, 256, 64, 128
    eng = _virtual(world, M, N, dtype, kernel_device, timeout_s=0.2)
    a, b = _operands(gen, world, M, K, N, dtype, kernel_device)
    out = torch.empty(world, M // world, N, dtype=dtype, device=kernel_device)
    t0 = time.monotonic()
    # Rank 0 alone: rank 1's kernel is never launched, so its tiles never arrive.
    _launch(eng, 0, a, b, out, kernel_device, blocks=1)
    synchronize(kernel_device)
    assert time.monotonic() - t0 < 30
    # Rank 0's rows it could not reduce are NaN, never silently stale (out was uninitialized).
    assert torch.isnan(out[0]).any()
    assert eng.state[0, 2:5].tolist() == [1, 1, 0]  # timeout, waiting for rank 1, on tile 0
    assert eng.state[0, :2].tolist() == [1, 0]  # the call still ended: the epoch moved on
    with pytest.raises(RuntimeError, match="rank 0 timed out after 0.2 s waiting for rank 1"):
        eng.check()
    eng.reset()
    eng.check()
    res = _call(eng, a, b, kernel_device)
    assert_gemm_rs_close(res, a, b, name="after reset")


_LATE_PEER_FINITE_PASSED: list[bool] = []  # appended to when the finite-timeout case passes


@pytest.mark.parametrize("timeout_s", [10, float("inf")])
def test_late_peer_takes_phase_two_with_the_same_bits(timeout_s, gen, cuda_device):
    """Rank 0 starts alone, so its own tiles find rank 1's partials missing and leave the
    reduction to phase 2 (which waits); rank 1 starts 50 ms later and reduces in its
    epilogues. Both outputs must equal, bit for bit, a run where both ranks start together.
    timeout_s = inf means no timeout (it used to become 0 ns: every wait gave up at once);
    run only once the finite case passed, so a protocol bug fails there instead of hanging."""
    if timeout_s == float("inf") and not _LATE_PEER_FINITE_PASSED:
        pytest.skip("the timeout_s = 10 case did not pass: an unbounded wait could hang")
    world, dtype, M, K, N = 2, torch.bfloat16, 512, 256, 384
    eng = tp.GemmReduceScatter.virtual(world, M, N, dtype, cuda_device, timeout_s=timeout_s)
    a, b = _operands(gen, world, M, K, N, dtype, cuda_device)
    together = eng(a, b)
    torch.cuda.synchronize()
    out = poisoned_empty((world, M // world, N), dtype, cuda_device)
    streams = [torch.cuda.Stream(cuda_device) for _ in range(world)]
    for r, s in enumerate(streams):
        s.wait_stream(torch.cuda.current_stream(cuda_device))
        if r == 1:
            time.sleep(0.05)  # rank 0 is past its GEMM tiles and waiting in phase 2 by now
        ops.ext().gemm_reduce_scatter(ops.dlpack(a[r]), ops.dlpack(b[r]), ops.dlpack(out[r]), ops.dlpack(eng.peers),
                                      ops.dlpack(eng.state[r]), r, world, M, N, eng.workspace.shape[1],
                                      eng.timeout_s, 8, s.cuda_stream)
    torch.cuda.synchronize()
    eng.check()
    assert torch.equal(out, together)
    assert_gemm_rs_close(out, a, b)
    if timeout_s != float("inf"):
        _LATE_PEER_FINITE_PASSED.append(True)


@pytest.mark.parametrize("world", [1, 3])
def test_fp32_engine_takes_the_reference_where_the_kernel_runs(world, gen, kernel_device):
    """fp32 has no kernel: path "reference". Its calls go through the op, whose kernel
    route (CUDA, or the executor for CPU tensors) used to launch the kernel anyway, which
    refuses fp32 (TypeError); it must run the reference."""
    eng = tp.GemmReduceScatter.virtual(world, 48, 40, torch.float32, kernel_device)
    assert eng.path == "reference" and eng.fallback_reason == "no kernel for dtype torch.float32"
    a, b = _operands(gen, world, 48, 16, 40, torch.float32, kernel_device)
    exact = ref.gemm_reduce_scatter_stacked(a.double(), b.double(), round_partials=False,
                                            compute_dtype=torch.float64)
    assert_close(eng(a, b), exact, torch.float32)
    layer = tp.RowParallelLinear(16, 40, None, dtype=torch.float32, device=kernel_device)  # one rank
    assert layer.path == "reference"
    want = torch.nn.functional.linear(a[0].double(), layer.weight.double(), layer.bias.double())
    assert_close(layer(a[0]), want, torch.float32)


def test_row_parallel_linear_one_rank(gen, kernel_device):
    layer = tp.RowParallelLinear(256, 384, None, max_tokens=512, dtype=torch.bfloat16, device=kernel_device)
    assert layer.path == "local"
    x = torch.randn(200, 256, generator=gen).to(kernel_device, torch.bfloat16)
    want = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert_close(layer(x), want, torch.bfloat16)


def _real_ranks(rank, world, a, b):
    torch.cuda.set_device(rank)
    group = dist.new_group(list(range(world)), backend="nccl")
    eng = tp.GemmReduceScatter(group, max_m=a.shape[1], n=b.shape[2], dtype=a.dtype,
                               device=torch.device("cuda", rank), timeout_s=10)
    outs = []
    for _ in range(3):
        outs.append(eng(a[rank].cuda(), b[rank].cuda()).cpu())
    torch.cuda.synchronize()
    eng.check()
    return eng.path, eng.fallback_reason, outs


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_real_ranks_through_symmetric_memory(gen):
    world = min(torch.cuda.device_count(), 4)
    a, b = _operands(gen, world, 64 * world + 8 * world, 256, 264, torch.bfloat16, "cpu")
    res = run_distributed(_real_ranks, world, args=(a, b.contiguous()), timeout_s=300)
    paths = {r[0] for r in res}
    assert paths <= {"symm_mem", "fallback"}, paths
    print("paths:", paths, "reasons:", {r[1] for r in res})
    for i in range(3):
        assert_gemm_rs_close(torch.stack([r[2][i] for r in res]), a, b, name=f"call {i}")


@pytest.mark.simt
def test_virtual_ranks_same_bits_under_every_schedule(gen, kernel_device, monkeypatch):
    """On the executor the W grids' fibers run in a shuffled order (INFEROPS_SIMT_SCHEDULE_SEED):
    whichever rank's tile arrives first, the reduction order is fixed, so every schedule gives
    the same bits (and the right values)."""
    if not is_simulated(kernel_device):
        pytest.skip("schedule seeds are the executor's")
    world, dtype = 4, torch.bfloat16
    eng = _virtual(world, 4 * 37, 264, dtype, kernel_device, timeout_s=10)
    a, b = _operands(gen, world, 4 * 37, 64, 264, dtype, kernel_device)
    outs = []
    for seed in (0, 1, 2, 3):
        monkeypatch.setenv("INFEROPS_SIMT_SCHEDULE_SEED", str(seed))
        outs.append(_call(eng, a, b, kernel_device))
    assert_gemm_rs_close(outs[0], a, b)
    for seed, o in enumerate(outs[1:], 1):
        assert torch.equal(o, outs[0]), seed
