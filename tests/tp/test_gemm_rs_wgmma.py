"""INFEROPS_TP_GEMM=wgmma: the experimental wgmma main loop of gemm_reduce_scatter
(csrc/tp/gemm_rs.cu, wg_tile_to_staging; sm_90a, b = weight.t() only).

CPU: the env switch and its refusals; an emulation of the kernel's index math -- cp.async
chunks into the 128B-swizzled K-major stage, wgmma matrix descriptors decoded and read
through the PTX ISA canonical K-major 128B-swizzle layout (16-bit elements), the m64n128k16
fp32 accumulator fragment and its mapping into the epilogue's staging tile -- checked
against A @ B^T of one tile with M / N / K tails; the ring schedule. GPU (marked gpu; never
run on a GPU yet): the existing one-rank and virtual-rank correctness cases with the wgmma
loop. The CPU SIMT executor models wgmma (csrc/simt/wgmma.cpp): there the one-rank cases,
the virtual ranks (concurrent grids; the tail cases) and the repeated calls run at reduced
sizes, and the kernel's output is
compared exactly with the emulation.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch
from inferops._core import ops
from inferops.testing import is_simulated, kernel_module
from inferops.tp import gemm_rs as gemm_rs_mod

_SRC = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "tp" / "gemm_rs.cu"


def _const(name: str) -> int:
    m = re.search(rf"constexpr int {name} = (\d+);", _SRC.read_text())
    assert m, name
    return int(m.group(1))


BK, STAGES, THREADS = _const("kWgBK"), _const("kWgStages"), _const("kThreads")
TILE = 128  # kTileM = kTileN (tp.h)
AHEAD = STAGES - 2  # kWgAhead
TILE_BYTES = TILE * BK * 2  # kWgTileBytes
STAGE_BYTES = 2 * TILE_BYTES
C_STRIDE = TILE + 8  # kCStride


# --- the switch (CPU) -------------------------------------------------------------------------


def test_env_switch(monkeypatch):
    monkeypatch.delenv(gemm_rs_mod.GEMM_ENV, raising=False)
    assert gemm_rs_mod.gemm_main_loop() == "mma"
    monkeypatch.setenv(gemm_rs_mod.GEMM_ENV, "")
    assert gemm_rs_mod.gemm_main_loop() == "mma"
    monkeypatch.setenv(gemm_rs_mod.GEMM_ENV, "wgmma")
    assert gemm_rs_mod.gemm_main_loop() == "wgmma"
    monkeypatch.setenv(gemm_rs_mod.GEMM_ENV, "WGMMA")
    with pytest.raises(ValueError, match="INFEROPS_TP_GEMM .*'WGMMA'"):
        gemm_rs_mod.gemm_main_loop()


def test_refuses_builds_without_90a(monkeypatch):
    monkeypatch.setenv(gemm_rs_mod.GEMM_ENV, "wgmma")
    monkeypatch.setattr(gemm_rs_mod, "build_info", lambda: {"cuda_archs": "80,90"})
    with pytest.raises(ValueError, match="built for sm_90a .* got archs '80,90'"):
        gemm_rs_mod._check_gemm_main_loop(torch.device("cuda", 0))
    monkeypatch.setenv(gemm_rs_mod.GEMM_ENV, "mma")  # the default needs nothing
    gemm_rs_mod._check_gemm_main_loop(torch.device("cuda", 0))


def test_cpu_engine_ignores_switch(monkeypatch, gen):
    """The reference path (CPU tensors) launches nothing, so the switch does not apply."""
    monkeypatch.setenv(gemm_rs_mod.GEMM_ENV, "wgmma")
    eng = gemm_rs_mod.GemmReduceScatter(None, 64, 32, torch.float32, torch.device("cpu"))
    a, b = torch.randn(64, 16, generator=gen), torch.randn(16, 32, generator=gen)
    torch.testing.assert_close(eng(a, b), a @ b)


# --- emulation of the shared-memory / descriptor / fragment math (CPU) -----------------------


def _swz(row, chunk):  # wg_swz: byte offset of a 16-byte chunk in a [rows][128 B] tile
    return row * 128 + ((chunk ^ (row & 7)) << 4)


def _desc(saddr):  # wg_desc
    return ((saddr >> 4) & 0x3FFF) | (1 << 16) | ((1024 >> 4) << 32) | (1 << 62)


def _load_stage(smem, sa, a, b, m0, n0, kt):
    """wg_load_stage: 8-element chunks (element index = byte address / 2), zero-filled."""
    M, K = a.shape
    N = b.shape[0]
    for tid in range(THREADS):
        for i in range(TILE * 8 // THREADS):
            idx = tid + i * THREADS
            r, c = idx >> 3, idx & 7
            gk = kt * BK + c * 8
            for op, mat, lim, base in ((0, a, M, m0), (1, b, N, n0)):
                ok = gk < K and base + r < lim
                dst = (sa + op * TILE_BYTES + _swz(r, c)) // 2
                smem[dst:dst + 8] = mat[base + r, gk:gk + 8] if ok else 0.0


def _wgmma_read(smem, desc, rows):
    """[rows][16] 16-bit operand a wgmma reads through `desc` (PTX ISA: K-major, 128B swizzle:
    row r at (r % 8) * 128 + (r // 8) * SBO, element k at 2 k bytes; then bits [4:6] of the
    absolute address ^= bits [7:9])."""
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    assert (desc >> 62) == 1 and (desc >> 49) & 7 == 0 and sbo == 1024 and lbo == 16
    out = torch.empty(rows, 16, dtype=torch.float64)
    for r in range(rows):
        for k in range(16):
            addr = start + (r % 8) * 128 + (r // 8) * sbo + 2 * k
            out[r, k] = smem[(addr ^ (((addr >> 7) & 7) << 4)) // 2]
    return out


def _emulate_tile(a, b, m0, n0, dyn_base, align=True):
    """wg_tile_to_staging for one tile: returns the [128][C_STRIDE] staging tile (fp32 values)."""
    K = a.shape[1]
    ring = (dyn_base + 1023) & ~1023 if align else dyn_base
    smem = torch.full(((ring + STAGES * STAGE_BYTES) // 2 + 64,), float("nan"), dtype=torch.float64)
    k_tiles = -(-K // BK)
    acc = torch.zeros(2, 64, 128, dtype=torch.float64)  # per warpgroup, 64 x 128
    for kt in range(k_tiles):
        sa0 = ring + (kt % STAGES) * STAGE_BYTES
        _load_stage(smem, sa0, a, b, m0, n0, kt)
        for wg in range(2):
            sa, sb = sa0 + wg * 64 * 128, sa0 + TILE_BYTES
            for ks in range(BK // 16):
                fa = _wgmma_read(smem, _desc(sa + ks * 32), 64)
                fb = _wgmma_read(smem, _desc(sb + ks * 32), 128)
                acc[wg] += fa @ fb.T
    # PTX ISA m64nNk16 .f32 accumulator: warp w, lane l (g = l // 4, t = l % 4), register i.
    regs = torch.empty(2, 4, 32, 64, dtype=torch.float64)
    for w in range(4):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            for i in range(64):
                regs[:, w, lane, i] = acc[:, 16 * w + g + 8 * ((i // 2) % 2), 8 * (i // 4) + 2 * t + (i % 2)]
    staged = torch.full((TILE, C_STRIDE), float("nan"), dtype=torch.float64)
    writes = torch.zeros(TILE, C_STRIDE, dtype=torch.int64)
    for wg in range(2):  # the staging stores of wg_tile_to_staging
        for warp in range(4):
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for j in range(TILE // 8):
                    for h in range(2):
                        r, c = wg * 64 + warp * 16 + g + 8 * h, 8 * j + 2 * t
                        assert c % 2 == 0  # 4-byte aligned pair store
                        staged[r, c:c + 2] = regs[wg, warp, lane, 4 * j + 2 * h:4 * j + 2 * h + 2]
                        writes[r, c:c + 2] += 1
    assert torch.equal(writes[:, :TILE], torch.ones(TILE, TILE, dtype=torch.int64))  # every element once
    assert int(writes[:, TILE:].sum()) == 0  # padding untouched
    return staged


def _int_operands(gen, M, N, K):
    a = torch.randint(-4, 5, (M, K), generator=gen).double()
    b = torch.randint(-4, 5, (N, K), generator=gen).double()  # the [N, K] weight
    return a, b


def test_descriptor_fields():
    d = _desc(0x12400)
    assert d & 0x3FFF == 0x12400 >> 4
    assert (d >> 16) & 0x3FFF == 1 and (d >> 32) & 0x3FFF == 64 and (d >> 62) == 1 and (d >> 49) & 7 == 0


@pytest.mark.parametrize("dyn_base", [0x400, 0x410])  # the ring is aligned by hand either way
def test_wgmma_tile_emulated(dyn_base, gen):
    M, N, K = 200, 150, 136  # second row / column tile has tails; K: 2 full k tiles + 8
    a, b = _int_operands(gen, M, N, K)
    m0, n0 = 128, 128
    staged = _emulate_tile(a, b, m0, n0, dyn_base)
    want = torch.zeros(TILE, TILE, dtype=torch.float64)
    want[:M - m0, :N - n0] = a[m0:] @ b[n0:].T
    assert torch.equal(staged[:, :TILE], want)  # integers: exact in float64


def test_emulation_detects_a_misaligned_ring(gen):
    """Sanity of the emulation itself: without the kernel's 1024-byte alignment of the ring
    (here 16 bytes off the swizzle period) the descriptors read the wrong chunks, so the
    test above can fail."""
    a, b = _int_operands(gen, 128, 128, 64)
    staged = _emulate_tile(a, b, 0, 0, 0x410, align=False)
    assert not torch.equal(staged[:, :TILE], a @ b.T)


def test_ring_schedule():
    """A stage is refilled only after both warpgroups retired its wgmmas: at iteration kt the
    load goes to tile kt + AHEAD's stage, which must be neither tile kt's (being read) nor
    kt - 1's (its group may still be in flight after wait_group 1)."""
    assert 1 <= AHEAD <= STAGES - 2
    for kt in range(3 * STAGES):
        s = (kt + AHEAD) % STAGES
        assert s != kt % STAGES and s != (kt - 1) % STAGES
    assert STAGES * STAGE_BYTES + 1024 <= 227 * 1024  # fits Hopper's opt-in shared memory
    assert TILE * C_STRIDE * 2 <= STAGES * STAGE_BYTES  # staging tile reuses the ring


# --- GPU: the existing correctness cases with the wgmma main loop (never run on a GPU yet;
# the executor runs them at reduced sizes) ---------------------------------------------------


@pytest.fixture
def wgmma_loop(monkeypatch, kernel_device):
    if not is_simulated(kernel_device) and torch.cuda.get_device_capability(kernel_device) != (9, 0):
        pytest.skip("wgmma needs an sm_90 device")
    monkeypatch.setenv(gemm_rs_mod.GEMM_ENV, "wgmma")


# The executor: (640, 4096, 1024) becomes K = 640, 10 k tiles (the 5-stage ring wraps twice, so
# a stage refilled while its wgmmas are in flight is caught), with M and N tails.
_SIMULATED = {(640, 4096, 1024): (130, 640, 136)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nk", "kn"])  # "kn" keeps mma.sync: must still be right
@pytest.mark.parametrize("M, K, N", [(1, 512, 384), (100, 1024, 1000), (2048, 256, 512), (333, 72, 136),
                                     (640, 4096, 1024)])
def test_wgmma_one_rank_equals_matmul(M, K, N, layout, dtype, gen, kernel_device, wgmma_loop):
    from tests.tp import test_gemm_rs_gpu as g

    if is_simulated(kernel_device):
        M, K, N = _SIMULATED.get((M, K, N), (M, K, N))
    g.test_one_rank_equals_matmul(M, K, N, layout, dtype, gen, kernel_device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["tile_tail", "m_eq_world", "large"])
@pytest.mark.parametrize("world", [2, 4, 8])
def test_wgmma_virtual_ranks_equal_reference(world, case, dtype, gen, kernel_device, wgmma_loop):
    from tests.tp import test_gemm_rs_gpu as g

    if is_simulated(kernel_device) and case == "large":  # executor time: the tails are the other cases
        pytest.skip("the executor runs the tail cases (large: on a GPU)")
    g.test_virtual_ranks_equal_reference(world, case, dtype, gen, kernel_device)


@pytest.mark.gpu
def test_wgmma_repeated_calls_and_graph(gen, kernel_device, wgmma_loop):
    from tests.tp import test_gemm_rs_gpu as g

    g.test_hundred_repeated_calls_reuse_flags(gen, kernel_device)  # the executor: 6 calls, one concurrent pool each
    if not is_simulated(kernel_device):  # CUDA graphs need a GPU
        g.test_cuda_graph_capture_and_replay(gen, kernel_device)


@pytest.mark.gpu
def test_wgmma_executor_matches_the_emulation(gen, kernel_device, wgmma_loop):
    """On the executor: one rank through the engine with the wgmma loop equals the emulation of
    wg_tile_to_staging (written separately from the executor's wgmma model) on the tail
    tile, and A @ B^T everywhere, exactly (small integers: every sum exact in fp16)."""
    if not is_simulated(kernel_device):
        pytest.skip("compares the executor's wgmma model with the emulation (a GPU runs the matmul tests)")
    M, N, K = 200, 152, 136  # tails in M, N and K (2 full k tiles + 8)
    a = torch.randint(-2, 3, (M, K), generator=gen).double()
    b = torch.randint(-2, 3, (N, K), generator=gen).double()
    eng = gemm_rs_mod.GemmReduceScatter(None, M, N, torch.float16, kernel_device)
    assert eng.path == "local"
    out = eng(a.half(), b.half().t())
    staged = _emulate_tile(a, b, 128, 128, 0x400)
    assert torch.equal(out[128:, 128:].double(), staged[:M - 128, :N - 128])
    assert torch.equal(out.double(), a @ b.T)
    assert eng.state[0].tolist() == [1] + [0] * (gemm_rs_mod.STATE_WORDS - 1)


@pytest.mark.gpu
def test_wgmma_env_reaches_the_executor_launcher(gen, kernel_device, monkeypatch):
    """The C++ launcher reads INFEROPS_TP_GEMM itself (the raw binding too): a bad value is
    refused there, so the executor runs the loop the variable names."""
    if not is_simulated(kernel_device):
        pytest.skip("checks the executor build's launcher")
    monkeypatch.setenv(gemm_rs_mod.GEMM_ENV, "bogus")
    dt = torch.bfloat16
    eng = gemm_rs_mod.GemmReduceScatter(None, 128, 128, dt, kernel_device)
    a = torch.randn(128, 64, generator=gen).to(dt)
    w = torch.randn(128, 64, generator=gen).to(dt)
    out = torch.empty(128, 128, dtype=dt)
    with pytest.raises(ValueError, match='INFEROPS_TP_GEMM to be "mma" or "wgmma", got "bogus"'):
        kernel_module(kernel_device).gemm_reduce_scatter(
            ops.dlpack(a), ops.dlpack(w.t()), ops.dlpack(out), ops.dlpack(eng.peers), ops.dlpack(eng.state[0]),
            0, 1, 128, 128, 0, 1.0, 0, 0)
    assert eng.state[0].tolist() == [0] * gemm_rs_mod.STATE_WORDS  # nothing ran


@pytest.mark.gpu
def test_wgmma_refuses_non_sm90(gen, cuda_device, monkeypatch):
    if torch.cuda.get_device_capability(cuda_device) == (9, 0):
        pytest.skip("needs a non-sm_90 device")
    monkeypatch.setenv(gemm_rs_mod.GEMM_ENV, "wgmma")
    eng = gemm_rs_mod.GemmReduceScatter(None, 128, 128, torch.bfloat16, cuda_device)
    a = torch.randn(128, 64, device=cuda_device, dtype=torch.bfloat16)
    w = torch.randn(128, 64, device=cuda_device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="sm_90"):
        eng(a, w.t())
