"""CPU emulation of one k-stage of the gemm_reduce_scatter main loop (csrc/tp/gemm_rs.cu):
the swizzled shared-memory placement of load_stage, the ldmatrix(.trans) addresses of
compute_stage, the PTX fragment maps of ldmatrix.x4 and mma.m16n8k16 (row.col), and the
accumulator-to-staging map of the epilogue, for both weight layouts. The 128 x 128 tile
it assembles must equal A @ B, and every ldmatrix phase must hit 8 distinct 16-byte bank
groups (conflict-free), as the kernel's comments claim. The formulas below are copied
from the kernel; edit both together."""

from __future__ import annotations

import numpy as np
import pytest

TM = TN = 128
BK = 32
WARPS_N = 4


def swz32(r, c):
    return r * BK + ((c ^ ((r >> 1) & 3)) << 3)


def swz128(r, c):
    return r * TN + ((c ^ (r & 7)) << 3)


def load_stage(a, b, kn):
    """Shared memory of one stage as load_stage fills it (A [128][32], B [32][128] or [128][32])."""
    as_ = np.full(TM * BK, np.nan)
    bs = np.full(BK * TN, np.nan)
    for id_ in range(512):
        r, c = id_ >> 2, id_ & 3
        as_[swz32(r, c):swz32(r, c) + 8] = a[r, c * 8:c * 8 + 8]
    for id_ in range(512):
        if kn:
            r, c = id_ >> 4, id_ & 15
            bs[swz128(r, c):swz128(r, c) + 8] = b[r, c * 8:c * 8 + 8]
        else:
            r, c = id_ >> 2, id_ & 3  # row n of the [n][k] weight
            bs[swz32(r, c):swz32(r, c) + 8] = b[c * 8:c * 8 + 8, r]
    assert not np.isnan(as_).any() and not np.isnan(bs).any()
    return as_, bs


def ldmatrix_x4(smem, addrs, trans=False):
    """addrs[lane]: element offset of the 8-element row lane supplies (lanes 8i..8i+7: matrix i).
    Returns regs[lane][i] = (lo, hi) per the PTX fragment map."""
    banks = []
    for i in range(4):
        rows = [addrs[8 * i + j] for j in range(8)]
        assert all(x % 8 == 0 for x in rows)  # 16-byte aligned rows
        banks.append(len({(x * 2 // 16) % 8 for x in rows}))
    regs = [[None] * 4 for _ in range(32)]
    for i in range(4):
        m = np.array([smem[addrs[8 * i + j]:addrs[8 * i + j] + 8] for j in range(8)])  # [row][col]
        for t in range(32):
            if trans:
                regs[t][i] = (m[2 * (t % 4), t // 4], m[2 * (t % 4) + 1, t // 4])
            else:
                regs[t][i] = (m[t // 4, 2 * (t % 4)], m[t // 4, 2 * (t % 4) + 1])
    return regs, banks


def mma_16816(acc, af, bf):
    """acc[lane][4] += A (16x16, fragments af[lane][4]) x B (16x8, bf[lane][2]), PTX maps."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for t in range(32):
        g, q = t >> 2, t & 3
        for reg, (r, k) in enumerate([(g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8)]):
            A[r, k], A[r, k + 1] = af[t][reg]
        for reg, k in enumerate([2 * q, 2 * q + 8]):
            B[k, g], B[k + 1, g] = bf[t][reg]
    C = A @ B
    for t in range(32):
        g, q = t >> 2, t & 3
        acc[t] += [C[g, 2 * q], C[g, 2 * q + 1], C[g + 8, 2 * q], C[g + 8, 2 * q + 1]]


@pytest.mark.parametrize("kn", [True, False], ids=["b_kn", "b_nk"])
def test_stage_fragments_compute_a_times_b(kn):
    rng = np.random.default_rng(0)
    a = rng.integers(-4, 5, (TM, BK)).astype(float)
    b = rng.integers(-4, 5, (BK, TN)).astype(float)
    as_, bs = load_stage(a, b, kn)
    tile = np.full((TM, TN), np.nan)
    for warp in range(8):
        wm, wn = warp // WARPS_N, warp % WARPS_N
        acc = [[[np.zeros(4) for _ in range(32)] for _ in range(4)] for _ in range(4)]  # [mi][nj][lane]
        for ks in range(BK // 16):
            af = []
            for mi in range(4):
                addrs = [swz32(wm * 64 + mi * 16 + (ln & 15), ks * 2 + (ln >> 4)) for ln in range(32)]
                regs, banks = ldmatrix_x4(as_, addrs)
                assert banks == [8] * 4
                af.append(regs)
            bf = [None] * 4
            for nj2 in range(2):
                if kn:
                    addrs = [swz128(ks * 16 + ((ln >> 3) & 1) * 8 + (ln & 7), (wn * 32 + nj2 * 16) // 8 + (ln >> 4))
                             for ln in range(32)]
                    r4, banks = ldmatrix_x4(bs, addrs, trans=True)
                else:
                    addrs = [swz32(wn * 32 + nj2 * 16 + ((ln >> 4) << 3) + (ln & 7), ks * 2 + ((ln >> 3) & 1))
                             for ln in range(32)]
                    r4, banks = ldmatrix_x4(bs, addrs)
                assert banks == [8] * 4
                bf[2 * nj2] = [(r4[t][0], r4[t][1]) for t in range(32)]
                bf[2 * nj2 + 1] = [(r4[t][2], r4[t][3]) for t in range(32)]
            for mi in range(4):
                for nj in range(4):
                    mma_16816(acc[mi][nj], af[mi], bf[nj])
        for mi in range(4):  # epilogue: accumulators to the staging tile
            for nj in range(4):
                for ln in range(32):
                    r, c = wm * 64 + mi * 16 + (ln >> 2), wn * 32 + nj * 8 + (ln & 3) * 2
                    v = acc[mi][nj][ln]
                    tile[r, c:c + 2] = v[0:2]
                    tile[r + 8, c:c + 2] = v[2:4]
    np.testing.assert_array_equal(tile, a @ b)
