"""The CPU SIMT executor itself (csrc/simt/): intrinsic semantics, routing, and that each class of
kernel bug it promises to catch is caught, from small deliberately broken kernels
(csrc/simt/selftest.cpp). Out-of-bounds reads are only visible to AddressSanitizer: those
tests run in CI's sanitizer pass (the executor module built with INFEROPS_SIMT_SANITIZE) and
skip elsewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import inferops
from inferops._core import ops
from inferops._core.extension import simt_extension
from inferops.testing import backend, simt_available

pytestmark = [
    pytest.mark.simt,
    pytest.mark.skipif(not simt_available(), reason="inferops._simt (the SIMT executor) is not built"),
]


def _module():
    return simt_extension()


def _sanitized() -> bool:
    m = simt_extension()
    return m is not None and bool(m.build_info().get("sanitizer"))


def _racecheck() -> bool:
    """True for the race-detector build of inferops._simt (INFEROPS_SIMT_RACECHECK)."""
    m = simt_extension()
    return m is not None and bool(m.build_info().get("racecheck"))


def _race_pattern(kind: str, kernel: str) -> str:
    """The race detector's report: the kernel, both threads and both source lines."""
    return (
        rf"shared-memory race \({kind}\) in kernel .*{kernel}\(.*\): block \(\d+,0,0\) thread \(\d+,0,0\) "
        rf"(writes|reads) \d+ byte\(s\) at 0x[0-9a-f]+ \((dynamic shared memory offset \d+|static __shared__ variable)\) at csrc/[\w/]+\.\w+:\d+ .*"
        rf"and block \(\d+,0,0\) thread \(\d+,0,0\) (wrote|read) it at csrc/[\w/]+\.\w+:\d+"
    )


def _run_in_subprocess(name: str, n: int = 64) -> subprocess.CompletedProcess:
    """Runs self-test `name` in a fresh interpreter (for faults that end the process)."""
    code = (
        "import inferops\n"
        "m = inferops._core.extension.simt_extension()\n"
        f"out = m.simt_selftest({name!r}, [1.0] * {n})\n"
        "print('finished', out[0])\n"
    )
    env = dict(os.environ)
    # Sanitizer reports must reach stderr (CI may point ASan's log at files).
    env["ASAN_OPTIONS"] = "detect_leaks=0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


# --- build info and routing -------------------------------------------------------------------


def test_build_info_lists_executor_kernels():
    info = inferops.build_info()["simt"]
    assert info["available"] and info["error"] is None
    for op in ("merge_states", "paged_decode", "w8a8_matmul", "routing_layout", "gemm_reduce_scatter"):
        assert op in info["ops"]
    assert _module().build_info()["backend"] == "simt"


def test_backend_context_routes_cpu_ops(gen):
    from inferops.attention import merge_states

    assert ops.cpu_backend() == "reference" or os.environ.get("INFEROPS_BACKEND") == "simt"
    with backend("simt"):
        assert ops.kernel_backend("merge_states", "cpu") == "simt"
    with backend("reference"):
        assert ops.kernel_backend("merge_states", "cpu") == "reference"
    v = torch.randn(5, 3, 64, generator=gen)
    lse = torch.randn(5, 3, generator=gen)
    with backend("simt"):
        a = merge_states(v, lse, v * 2, lse + 1)
    with backend("reference"):
        b = merge_states(v, lse, v * 2, lse + 1)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="expected a backend"):
        with backend("gpu"):
            pass


# --- intrinsics behave like CUDA's ----------------------------------------------------------------


def test_block_reduction_with_shuffles_and_barrier():
    x = [float(i) for i in range(45)]
    assert _module().simt_selftest("block_sum", x) == [sum(x)] * 45


def test_votes_and_barrier_reductions():
    x = [1.0 if i % 3 else -1.0 for i in range(32)]
    out = _module().simt_selftest("votes", x)
    positives = sum(v > 0 for v in x)
    for t in range(32):
        count, all_, any_, ballot, match = out[5 * t : 5 * t + 5]
        assert (count, all_, any_, ballot) == (positives, 0.0, 1.0, positives)
        assert match == (positives if x[t] > 0 else 32 - positives)


def test_disjoint_masks_in_one_warp_and_shuffle_width():
    out = _module().simt_selftest("half_warp_shuffle", [float(i) for i in range(32)])
    assert out == [float((i & ~15) + ((i + 1) & 15)) for i in range(32)]


def test_cp_async_round_trip():
    x = [float(i) for i in range(256)]
    assert _module().simt_selftest("cp_async", x) == x


@pytest.mark.parametrize("trans_b", [False, True])
def test_ldmatrix_and_mma_compute_the_tile_product(trans_b, gen):
    # A 16x16 and B through ldmatrix (x4; x2 or x2.trans) into mma.sync m16n8k16: the two
    # executor models, written separately from the PTX ISA, must agree with a matmul.
    a = torch.randn(16, 16, generator=gen).half().float()
    bkn = torch.randn(16, 8, generator=gen).half().float()  # B as [k][n]
    b_in = bkn if trans_b else bkn.t().contiguous()  # [k][n] (trans) or [n][k]
    x = torch.cat([a.flatten(), b_in.flatten()]).tolist()
    name = "mma_16816_trans_b" if trans_b else "mma_16816"
    out = torch.tensor(_module().simt_selftest(name, x)[:128]).view(16, 8)
    torch.testing.assert_close(out, a @ bkn, rtol=1e-5, atol=1e-5)


def _wgmma_tile(gen, mode: int):
    """The wgmma_tile self-test (one m64n128k16 bf16 tile through 128B-swizzled descriptors,
    csrc/simt/selftest.cpp) with broken `mode`; returns (D [64, 128], A B^T in float64)."""
    a = torch.randn(64, 16, generator=gen).bfloat16().double()
    b = torch.randn(128, 16, generator=gen).bfloat16().double()  # [n][k]
    x = torch.cat([a.flatten(), b.flatten()]).tolist() + [float(mode)]
    out = torch.tensor(_module().simt_selftest("wgmma_tile", x)[:64 * 128], dtype=torch.float64).view(64, 128)
    return out, a @ b.t()


def test_wgmma_tile_through_descriptors_equals_matmul(gen):
    # Exact products summed in double, one rounding to fp32: the float32 rounding of the exact result.
    out, ref = _wgmma_tile(gen, 0)
    assert torch.equal(out, ref.float().double())


def test_wgmma_scale_d_zero_and_chained_accumulation(gen):
    # Accumulators preset to 1; wgmma scale-d 0 ignores them, the second (chained, pending) adds.
    out, ref = _wgmma_tile(gen, 4)
    torch.testing.assert_close(out, 2 * ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", [1, 2], ids=["swizzle_none", "stride_512"])
def test_wgmma_wrong_descriptor_gives_a_wrong_tile(gen, mode):
    out, ref = _wgmma_tile(gen, mode)
    assert (out - ref).abs().max() > 1.0  # the swizzle / stride really are decoded


def test_wgmma_accumulators_read_before_wait_are_nan(gen):
    out, _ = _wgmma_tile(gen, 3)
    assert bool(out.isnan().all())


@pytest.mark.parametrize(
    "mode, pattern",
    [
        (5, r"wgmma.mma_async on accumulators no pending wgmma writes, without a wgmma.fence"),
        (6, r"wgmma.wait_group: shared address 0x[0-9a-f]+, an operand of an in-flight wgmma.mma_async, changed"),
        (7, r"wgmma.mma_async: the threads of warps 0-3 disagree on its operands"),
        (8, r"wgmma.mma_async: lanes 0x[0-9a-f]+ of warp [23] have exited"),
        (9, r"deadlock in block \(0,0,0\).*threads 0-95 waiting in wgmma.mma_async \(warps 0-3, 96 threads "
            r"arrived\); threads 96-127 waiting at __syncthreads"),
    ],
    ids=["no_fence", "operand_overwritten_in_flight", "descriptor_mismatch", "warpgroup_exited", "deadlock"],
)
def test_wgmma_kernel_errors_are_reported(gen, mode, pattern):
    if mode == 6 and _racecheck():
        # The race detector sees the overwrite itself: thread 0 writes an operand byte that the
        # wgmma (issued by the warpgroup's last thread) read, with no barrier between them.
        pattern = _race_pattern("read/write", "WgmmaTileKernel")
    with pytest.raises(RuntimeError, match=pattern):
        _wgmma_tile(gen, mode)


# --- kernel bugs the executor catches ------------------------------------------------------------


def test_cp_async_wait_one_group_short_reads_poison():
    out = _module().simt_selftest("cp_async_wait_short", [float(i) for i in range(256)])
    assert all(v == v for v in out[:128])  # the waited group landed
    assert all(v != v for v in out[128:])  # the group still in flight reads as NaN


def test_missing_syncthreads_reads_poison():
    if _racecheck():  # the deliberately removed barrier, as the race detector reports it
        with pytest.raises(RuntimeError, match=_race_pattern("read/write", "MissingSyncKernel")):
            _module().simt_selftest("missing_sync", [float(i) for i in range(64)])
        return
    out = _module().simt_selftest("missing_sync", [float(i) for i in range(64)])
    assert all(v != v for v in out[:-1])


# --- shared-memory races: the race-check build reports each; the ordinary build shows its
# consequence where the executor's schedule exposes it (fibers switch only at barriers and
# collectives, so a thread runs ahead of the others up to its next synchronization) --------


def _nan_somewhere(out, ref):
    return any(v != v for v in out)


def _differs(out, ref):
    return any(not (abs(a - b) <= 1e-5 * max(1.0, abs(b))) for a, b in zip(out, ref))


def _shift(x, k, n):  # out[t] = x[k * n + (t + 1) % n]
    return [x[k * n + (t + 1) % n] for t in range(n)]


@pytest.mark.parametrize(
    "name, n, kind, kernel, expected, consequence",
    [
        # a warp exchanging values through shared memory without __syncwarp
        ("warp_exchange", 32, "read/write", "WarpExchangeKernel", lambda x: _shift(x, 0, 32), _nan_somewhere),
        # a tiled loop missing the barrier before the buffer is refilled
        ("two_tiles", 128, "read/write", "TwoTilesKernel",
         lambda x: [a + b for a, b in zip(_shift(x, 0, 64), _shift(x, 1, 64))], _differs),
        # a cp.async destination read before the issuing thread's wait
        ("cp_async_publish", 64, "read/write", "CpAsyncPublishKernel", lambda x: [x[t % 4] for t in range(64)],
         _nan_somewhere),
        # a static __shared__ array missing its barrier (not poisoned: only the race check sees it)
        ("static_shared_exchange", 64, "read/write", "StaticSharedExchangeKernel", lambda x: _shift(x, 0, 64), None),
        # distributed shared memory read before the owner's cluster.sync
        ("cluster_exchange", 64, "read/write", "ClusterExchangeKernel",
         lambda x: [x[32 * (1 - r) + t] for r in range(2) for t in range(32)], _nan_somewhere),
    ],
    ids=["warp_no_syncwarp", "tiled_loop_missing_second_barrier", "cp_async_read_before_wait",
         "static_shared_missing_barrier", "dsmem_missing_cluster_sync"],
)
def test_shared_memory_races(name, n, kind, kernel, expected, consequence):
    x = [float(i + 1) for i in range(n)]
    ref = expected(x)
    # The correct variant: no report (no false positive) and the right answer, in every build.
    correct = {"warp_exchange": "warp_exchange_syncwarp", "static_shared_exchange": "static_shared_exchange"}
    assert _module().simt_selftest(correct.get(name, name), x)[: len(ref)] == ref
    broken = "race_" + ("static_shared" if name == "static_shared_exchange" else name)
    if _racecheck():
        with pytest.raises(RuntimeError, match=_race_pattern(kind, kernel)):
            _module().simt_selftest(broken, x)
    elif consequence is None:
        pytest.skip("only the race-check build sees this race (CI runs it: INFEROPS_SIMT_RACECHECK)")
    else:
        assert consequence(_module().simt_selftest(broken, x)[: len(ref)], ref)


# A real kernel's barrier removed (INFEROPS_SIMT_SKIP_BARRIER makes the __syncthreads at that
# source line do nothing, race-check build only) must be reported, naming that kernel's lines.
_SLA_CALL = (
    "q, k, v = (torch.randn(1, 2, 64, 32, generator=g).bfloat16() for _ in range(3))\n"
    "w, b = torch.randn(32, 1, 5, 5, generator=g), torch.randn(32, generator=g)\n"
    "inferops.linear_attention.simplified_linear_attention(q, k, v, w, b, (8, 8))\n"
)
_PAGED_CALL = (
    "pages = torch.randperm(16, generator=g).to(torch.int32).view(1, 16)\n"
    "kc, vc = (torch.randn(16, 16, 2, 128, generator=g).bfloat16() for _ in range(2))\n"
    "q = torch.randn(1, 8, 128, generator=g).bfloat16()\n"
    "inferops.attention.paged_decode(q, kc, vc, pages, torch.tensor([250], dtype=torch.int32), num_splits=1)\n"
)


def _barrier_line(path: str, nth: int = 1, marker: str = "__syncthreads();") -> str:
    """"path:LINE" of the nth `__syncthreads();` in `path` (from the repository root) whose line
    also contains `marker`: found in the source, so edits above it do not break the test."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, path)) as f:
        hits = [i + 1 for i, line in enumerate(f) if "__syncthreads();" in line and marker in line]
    return f"{path}:{hits[nth - 1]}"


@pytest.mark.parametrize(
    "barrier, call",
    [
        (("csrc/linear_attention/sla.cu", 1), _SLA_CALL),  # tile loaded, then read by every thread
        (("csrc/linear_attention/sla.cu", 2), _SLA_CALL),  # every thread done before the next tile
        (("csrc/attention/paged_decode.cu", 1, "is reloaded"), _PAGED_CALL),  # a pipeline stage reloaded while read
    ],
    ids=["sla_load", "sla_reuse", "paged_decode_stage_reuse"],
)
def test_removed_barrier_in_a_real_kernel_is_reported(barrier, call):
    if not _racecheck():
        pytest.skip("needs the race-check build of inferops._simt (CI: INFEROPS_SIMT_RACECHECK)")
    barrier = _barrier_line(*barrier)
    code = (
        "import torch, inferops\n"
        "from inferops.testing import backend\n"
        "g = torch.Generator().manual_seed(0)\n"
        "with backend('simt'):\n" + "".join("    " + line + "\n" for line in call.splitlines())
        + "print('no report')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0 and "no report" in ok.stdout, ok.stderr[-3000:]  # intact: no report
    env["INFEROPS_SIMT_SKIP_BARRIER"] = barrier
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0, r.stdout[-2000:]
    file = barrier.split(":")[0]
    assert re.search(r"shared-memory race \((read/write|write/read|write/write)\) in kernel .*" + re.escape(file),
                     r.stderr), r.stderr[-3000:]


def test_shared_memory_atomics_are_not_races():
    x = [float(i % 7) for i in range(64)]
    out = _module().simt_selftest("shared_atomics", x)
    assert out[:64] == pytest.approx([sum(x)] * 64)
    assert out[64:128] == [63.0] * 64


def test_dynamic_smem_overread_reads_nan():
    # Plain build: the bytes past the launch size hold a NaN canary (ASan reports the read).
    if _sanitized():
        pytest.skip("the sanitizer build reports this read (test_asan_reports_dynamic_smem_overread)")
    v = _module().simt_selftest("dyn_smem_overread", [1.0] * 64)[0]
    assert v != v


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("dyn_smem_overwrite", r"wrote past the end of its 256 bytes of dynamic shared memory"),
        ("partial_warp_full_mask", r"mask 0xffffffff names lanes that do not exist"),
        ("shuffle_outside_mask", r"reads lane 16, which is outside the mask 0x0000ffff"),
        (
            "deadlock",
            r"deadlock in block \(0,0,0\).*threads 0-31 waiting at __syncthreads; "
            r"threads 32-47 waiting in __syncwarp",
        ),
        ("trap", r"__trap\(\) called in block \(1,0,0\) thread \(3,0,0\)"),
        ("misaligned_cp_async", r"misaligned address .* cp.async shared destination"),
        ("too_many_threads", r"cudaErrorInvalidConfiguration.*block \(2048,1,1\)"),
        ("grid_y_too_large", r"cudaErrorInvalidConfiguration.*grid \(1,70000,1\)"),
        ("smem_without_attribute", r"cudaErrorInvalidValue.*65536 bytes of dynamic shared memory"),
    ],
)
def test_kernel_errors_are_reported(name, pattern):
    if name == "dyn_smem_overwrite" and _sanitized():
        # AddressSanitizer reports the write itself (before the canary check could).
        r = _run_in_subprocess(name)
        assert r.returncode != 0 and "use-after-poison" in r.stderr, r.stderr[-3000:]
        assert "DynSmemOverwriteKernel" in r.stderr
        return
    with pytest.raises(RuntimeError, match=pattern):
        _module().simt_selftest(name, [1.0] * 64)


# --- thread-block clusters ----------------------------------------------------------------------------


def _cluster_expected(x):
    # grid (4, 2), clusters of (2, 2) blocks; block g = 4 y + x holds x[64 g : 64 g + 64].
    blocks = torch.tensor(x, dtype=torch.float64).view(2, 4, 64)  # [y][x][t]
    sums = torch.stack([blocks[:, 2 * c : 2 * c + 2].sum(dim=(0, 1)) for c in range(2)])  # [cluster][64]
    info = []
    for g in range(8):
        bx, by = g % 4, g // 4
        info += [float(bx % 2 + 2 * (by % 2)), 4.0, float(bx % 2), float(by % 2)]
    return sums.flatten(), torch.tensor(info, dtype=torch.float64)


@pytest.mark.parametrize("name", ["cluster_reduce", "cluster_reduce_ex"])
def test_cluster_dsmem_reduction(name, gen):
    # Typed launch (launch_kernel_cluster) and the raw runtime API (cudaLaunchKernelEx ->
    # cudaLaunchKernelExC with void** arguments) run the same clusters.
    x = torch.randn(512, generator=gen).tolist()
    out = torch.tensor(_module().simt_selftest(name, x), dtype=torch.float64)
    sums, info = _cluster_expected(x)
    torch.testing.assert_close(out[:128], sums, rtol=1e-5, atol=1e-5)
    assert out[256:288].tolist() == info.tolist()  # block_rank, num_blocks, block_index
    assert torch.isnan(out[128:256]).all() and torch.isnan(out[288:]).all()  # nothing else written


def test_cluster_missing_final_sync_reads_poison(gen):
    # Without the final cluster.sync, rank 0 exits first and the other ranks read its (now
    # poisoned) shared memory: their slices come out NaN; rank 0's own slice is still right.
    x = torch.randn(512, generator=gen).tolist()
    out = torch.tensor(_module().simt_selftest("cluster_missing_final_sync", x), dtype=torch.float64)
    sums, _ = _cluster_expected(x)
    for c in range(2):
        # fp32 sums on the device against float64 ones: fp32 tolerance (as test_cluster_dsmem_reduction;
        # the float64 default failed for some random seeds).
        torch.testing.assert_close(out[64 * c : 64 * c + 16], sums[64 * c : 64 * c + 16], rtol=1e-5, atol=1e-5)
        assert torch.isnan(out[64 * c + 16 : 64 * c + 64]).all()


def test_cluster_of_16_needs_the_nonportable_attribute():
    # 16 blocks per cluster: refused without cudaFuncAttributeNonPortableClusterSizeAllowed
    # (cluster_too_large below), run with it.
    out = _module().simt_selftest("cluster_16_nonportable", [0.0] * 64)
    assert out[:32] == [float(i % 16) for i in range(32)]
    assert out[32:64] == [16.0] * 32


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("cluster_rank_out_of_range", r"map_shared_rank\(.*, 4\): rank out of range \(the cluster has 4 blocks\)"),
        ("cluster_grid_not_divisible", r"cudaErrorInvalidClusterSize.*grid \(3,2,1\) is not a whole number of "
         r"clusters \(2,2,1\)"),
        ("cluster_too_large", r"cudaErrorInvalidClusterSize.*16 blocks, more than 8"),
        ("cluster_deadlock", r"deadlock in the cluster of blocks \(0,0,0\) \.\. \(1,0,0\).*block \(0,0,0\): "
         r"threads 0-31 waiting at cluster.sync;.*block \(1,0,0\): threads 0-15 waiting at cluster.sync; "
         r"threads 16-31 waiting at __syncthreads"),
        ("cluster_static_shared", r"static __shared__ variable in a cluster launch of 2 blocks"),
    ],
)
def test_cluster_errors_are_reported(name, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        _module().simt_selftest(name, [1.0] * 64)
    x = [float(i) for i in range(64)]
    assert _module().simt_selftest("block_sum", x) == [sum(x)] * 64  # usable afterwards


def test_executor_usable_after_a_kernel_error():
    with pytest.raises(RuntimeError):
        _module().simt_selftest("deadlock", [1.0] * 64)
    x = [float(i) for i in range(64)]
    assert _module().simt_selftest("block_sum", x) == [sum(x)] * 64


def test_stack_overflow_is_reported():
    r = _run_in_subprocess("stack_overflow", 32)
    assert r.returncode != 0 and "finished" not in r.stdout
    assert "stack overflow" in r.stderr or "stack-overflow" in r.stderr, r.stderr[-2000:]


# --- AddressSanitizer (CI's sanitizer pass) ----------------------------------------------------------


@pytest.mark.skipif(not _sanitized(), reason="needs the AddressSanitizer build of inferops._simt (CI)")
def test_asan_reports_out_of_bounds_global_read():
    r = _run_in_subprocess("oob_global_read", 16)
    assert r.returncode != 0 and "finished" not in r.stdout
    assert "heap-buffer-overflow" in r.stderr and "READ of size 4" in r.stderr, r.stderr[-3000:]
    assert "OobGlobalReadKernel" in r.stderr  # the report names the kernel


@pytest.mark.skipif(not _sanitized(), reason="needs the AddressSanitizer build of inferops._simt (CI)")
def test_asan_reports_dynamic_smem_overread():
    r = _run_in_subprocess("dyn_smem_overread", 64)
    assert r.returncode != 0 and "finished" not in r.stdout
    assert "use-after-poison" in r.stderr and "DynSmemOverreadKernel" in r.stderr, r.stderr[-3000:]


# --- concurrent grids (csrc/simt/concurrent.cpp) ------------------------------------------------------


def _run_with_env(name: str, n: int, **env_vars) -> subprocess.CompletedProcess:
    """Self-test `name` in a fresh interpreter with extra environment (read at launch or once)."""
    code = (
        "import inferops\n"
        "m = inferops._core.extension.simt_extension()\n"
        f"out = m.simt_selftest({name!r}, [float(i + 1) for i in range({n})])\n"
        "print('result', out)\n"
    )
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", **env_vars)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def schedule_seed(monkeypatch):
    """Sets INFEROPS_SIMT_SCHEDULE_SEED (read by every concurrent pool) for this test."""
    return lambda seed: monkeypatch.setenv("INFEROPS_SIMT_SCHEDULE_SEED", str(seed))


def test_flag_set_before_its_data_is_caught_under_some_schedule(schedule_seed):
    """A producer grid that publishes its flag BEFORE writing its data: under a shuffled
    schedule the consumer grid runs in between and reads the poisoned (NaN) data. Seeds are
    deterministic: seed 1 interleaves that way (and several of 0..15 do)."""
    x = [float(i + 1) for i in range(64)]
    wrong = []
    for seed in range(16):
        schedule_seed(seed)
        out = _module().simt_selftest("concurrent_flag_before_data", x)
        if out != x:
            assert any(v != v for v in out), out  # what it read is the poison, not other data
            wrong.append(seed)
    assert 1 in wrong and len(wrong) >= 2, wrong
    schedule_seed(1)
    assert _module().simt_selftest("concurrent_flag_before_data", x) != x  # reproducible from the seed


def test_flag_after_data_is_right_under_every_schedule(schedule_seed):
    x = [float(i + 1) for i in range(64)]
    for seed in range(16):
        schedule_seed(seed)
        assert _module().simt_selftest("concurrent_flag_after_data", x) == x, seed


def test_two_grids_that_progress_only_together(schedule_seed):
    """Block 0 of two grids pass a counter back and forth 100 times through flags (each waits
    for the other every round); every block sees its own grid's gridDim and blockDim."""
    for seed in (0, 7):
        schedule_seed(seed)
        out = _module().simt_selftest("concurrent_ping_pong", [0.0] * 8)
        assert out[:7] == [100.0, 100.0, 2064.0, 2064.0, 3032.0, 3032.0, 3032.0], (seed, out)


def test_waiting_for_a_flag_nobody_sets_is_a_livelock_naming_the_block():
    r = _run_with_env("concurrent_missing_producer", 32, INFEROPS_SIMT_SPIN_LIMIT_S="1",
                      INFEROPS_SIMT_SCHEDULE_SEED="5")
    assert r.returncode != 0, r.stdout
    assert "livelock in a concurrent pool of 3 blocks" in r.stderr, r.stderr[-3000:]
    # Only the consumer (grid 0) is left; the other grid's blocks finished.
    assert "still running: blocks (0,0,0) of grid 0 (" in r.stderr, r.stderr[-3000:]
    assert "schedule seed 5" in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("concurrent_static_shared", r"static __shared__ variable in a concurrent pool"),
        ("concurrent_pool_too_large", r"1024000 threads, more than 65536 \(INFEROPS_SIMT_MAX_POOL_THREADS"),
    ],
)
def test_concurrent_pool_refusals(name, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        _module().simt_selftest(name, [1.0] * 64)
    # The executor is usable afterwards (the queue and the pool were reset).
    assert _module().simt_selftest("concurrent_flag_after_data", [2.0] * 32) == [2.0] * 32
