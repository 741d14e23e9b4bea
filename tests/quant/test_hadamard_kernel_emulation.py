"""Byte-level CPU emulation of HadamardQuantizeKernel (csrc/quant/hadamard.cu), one block.

Written independently of the CPU emulation in test_hadamard.py, from the PTX ISA definitions
rather than from the kernel's own comments:

* one shared-memory image with the kernel's byte offsets (fp32 row at 0, the fp16/bf16 row
  [m16][S] at 4 n, the sign words after it; sizes from ``kernel_smem_bytes``), filled with
  0xFF bytes first, a NaN in fp32, fp16 and bf16, so any read of a byte the kernel did not
  write (pad columns, stride padding, another region) turns up as NaN in the result;
* the sign words are read back from that image, and each A register is built bit for bit
  as ``ONE | ((word << s) & 0x80008000)`` and decoded as two fp16/bf16 halves (low half =
  lower-indexed element);
* ldmatrix.x4.trans: lane 8j + r gives the byte address of row r of matrix j (checked
  16-byte aligned and inside the fp16/bf16 row region); .trans = the 8x8 matrix loaded
  column-major, so thread l gets column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1;
* mma.m16n8k16 f16/bf16 fragments as tabulated in the PTX ISA (A: a0 a1 | a2 a3 | a4 a5 |
  a6 a7 at (gid, 2 tig) | (gid + 8, 2 tig) | (gid, 2 tig + 8) | (gid + 8, 2 tig + 8); B:
  (2 tig, gid), (2 tig + 8, gid); C: (gid, 2 tig), (gid + 8, 2 tig)), multiplied
  elementwise so a NaN only reaches the outputs that really consume it;
* the FWHT as the kernel's threads run it: 8 values per lane, register stages, __shfl_xor
  stages, shared-memory stages, then the dense factor (m <= 28) and 1/sqrt(n).
"""

from __future__ import annotations

import math

import pytest
import torch
from inferops.quant.hadamard import (
    dense_factor,
    dense_factor_fragments,
    hadamard_factorization,
    kernel_smem_bytes,
)
from inferops.reference import quant_w8a8 as ref

THREADS, BATCH, WARPS = 256, 4, 8
LANE = torch.arange(32)
GID, TIG = LANE >> 2, LANE & 3


def _tc_layout(m: int, p: int):
    m16 = (m + 15) // 16 * 16
    return m16, m16 // 16, (m16 // 16 + 3) // 4, p + (16 if p == 8 else 8)  # m16, row tiles, words, stride


def _halves(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Low 16 bits of int64 patterns as fp16 / bf16 values (float64)."""
    return (bits & 0xFFFF).to(torch.int32).to(torch.int16).view(dtype).double()


def _stage_and_dense_tc(smem: torch.Tensor, x: torch.Tensor, m: int, p: int) -> None:
    """Steps 0 and 1 of the tensor-core path: staging, then Z = H_m^T X into the fp32 row."""
    n = x.numel()
    dtype = x.dtype
    m16, kct, kkw, s = _tc_layout(m, p)
    xb_off = 4 * n
    hw_off = xb_off + 2 * m16 * s
    assert xb_off % 16 == 0 and hw_off % 16 == 0 and hw_off + 4 * 32 * kct * kkw == smem.numel()
    xs, u16, hw = smem[: 4 * n].view(torch.float32), smem.view(torch.int16), smem[hw_off:].view(torch.int32)
    hw[:] = dense_factor_fragments(m).reshape(-1)
    gpr, log2p = p // 8, p.bit_length() - 1
    for i in range((m16 - m) * gpr):  # zero pad rows, 16-byte stores
        b = xb_off + 2 * ((m + i // gpr) * s + (i % gpr) * 8)
        assert b % 16 == 0 and b + 16 <= hw_off
        smem[b: b + 16] = 0
    xbits = x.view(torch.int16)
    for g in range(n // 8):  # the row, one 16-byte group per element group
        b = xb_off + 2 * ((g >> (log2p - 3)) * s + (g & (gpr - 1)) * 8)
        assert b % 16 == 0 and b + 16 <= hw_off
        u16[b // 2: b // 2 + 8] = xbits[8 * g: 8 * g + 8]

    one = 0x3C003C00 if dtype == torch.float16 else 0x3F803F80
    nt_total = p // 8
    npairs, nblocks = (2, nt_total // 4) if nt_total >= 4 else (1, 1)
    lane_addr = xb_off + ((LANE & 15) * s + (LANE >> 4) * 8) * 2
    written = torch.zeros(n, dtype=torch.int64)

    def ldmatrix_x4_trans(addr):
        assert bool((addr % 16 == 0).all()), "ldmatrix row address not 16-byte aligned"
        assert bool((addr >= xb_off).all() and (addr + 16 <= hw_off).all()), "ldmatrix row outside the staged row"
        rows = u16[(addr // 2)[:, None] + torch.arange(8)[None, :]].long()
        regs = torch.empty(32, 4, 2, dtype=torch.float64)
        for j in range(4):
            mat = _halves(rows[8 * j: 8 * j + 8], dtype)
            regs[:, j, 0], regs[:, j, 1] = mat[2 * TIG, GID], mat[2 * TIG + 1, GID]
        return regs

    for warp in range(WARPS):
        for blk in range(warp, kct * nblocks, WARPS):
            ct, nt0 = blk // nblocks, (blk % nblocks) * 4
            acc = torch.zeros(4, 16, 8, dtype=torch.float64)
            for kw in range(kkw):
                w = hw[ct * kkw * 32 + kw * 32 + LANE].long() & 0xFFFFFFFF
                for t in range(4):
                    if kw * 4 + t >= kct:
                        continue
                    kt = kw * 4 + t
                    a = torch.full((16, 16), float("nan"), dtype=torch.float64)
                    for i in range(4):
                        reg = one | ((w << (4 * t + i)) & 0x80008000)
                        r, c = GID + 8 * (i & 1), 2 * TIG + 8 * (i >> 1)
                        a[r, c], a[r, c + 1] = _halves(reg, dtype), _halves(reg >> 16, dtype)
                    assert not bool(a.isnan().any())
                    for pp in range(npairs):
                        regs = ldmatrix_x4_trans(lane_addr + (kt * 16 * s + (nt0 + 2 * pp) * 8) * 2)
                        for h in range(2):
                            b = torch.full((16, 8), float("nan"), dtype=torch.float64)
                            b[2 * TIG, GID], b[2 * TIG + 1, GID] = regs[:, 2 * h, 0], regs[:, 2 * h, 1]
                            b[2 * TIG + 8, GID], b[2 * TIG + 9, GID] = regs[:, 2 * h + 1, 0], regs[:, 2 * h + 1, 1]
                            acc[2 * pp + h] += (a[:, :, None] * b[None, :, :]).sum(1)
            for j in range(2 * npairs):
                if nt0 + j >= nt_total:
                    continue
                d = (nt0 + j) * 8 + 2 * TIG
                for row, (c0, c1) in ((ct * 16 + GID, (0, 1)), (ct * 16 + GID + 8, (2, 3))):
                    ok = row < m
                    idx, lr = (row * p + d)[ok], (row - ct * 16)[ok]
                    assert bool((idx % 2 == 0).all() and (idx + 2 <= n).all())  # float2 store
                    xs[idx], xs[idx + 1] = acc[j, lr, (2 * TIG)[ok]].float(), acc[j, lr, (2 * TIG + 1)[ok]].float()
                    written[idx] += 1
                    written[idx + 1] += 1
    assert bool((written == 1).all()), "every element of Z written exactly once"


def emulate_rotation(x: torch.Tensor) -> torch.Tensor:
    """The fp32 row y = x @ H_n / sqrt(n) as the kernel leaves it in shared memory."""
    n = x.numel()
    m, p = hadamard_factorization(n)
    tc = m > 28
    smem = torch.full((kernel_smem_bytes(n),), 0xFF, dtype=torch.uint8)
    xs = smem[: 4 * n].view(torch.float32)
    if tc:
        _stage_and_dense_tc(smem, x, m, p)
    groups, h_warp, xf = n // 8, min(p, 256), x.float()
    cols = torch.arange(8)[None, :]
    for warp in range(WARPS):  # registers + shuffles, warp by warp
        for g0 in range(warp * 32, groups, BATCH * THREADS):
            for u in range(BATCH):
                if g0 + u * THREADS >= groups:
                    break
                g = g0 + u * THREADS + LANE
                ok = g < groups
                v = torch.zeros(32, 8, dtype=torch.float32)
                v[ok] = (xs if tc else xf)[g[ok][:, None] * 8 + cols]
                for h in (1, 2, 4):
                    lo = [i for i in range(8) if not i & h]
                    a, b = v[:, lo].clone(), v[:, [i + h for i in lo]].clone()
                    v[:, lo], v[:, [i + h for i in lo]] = a + b, a - b
                h = 8
                while h < h_warp:
                    mask = h >> 3
                    o = v[LANE ^ mask]
                    v = torch.where(((LANE & mask) != 0)[:, None], o - v, v + o)
                    h <<= 1
                xs[g[ok][:, None] * 8 + cols] = v[ok]
    h = 256
    while h < p:  # shared-memory stages
        t = torch.arange(n // 2)
        i = (t // h) * 2 * h + t % h
        a, b = xs[i].clone(), xs[i + h].clone()
        xs[i], xs[i + h] = a + b, a - b
        h <<= 1
    inv = torch.tensor(1.0 / math.sqrt(n), dtype=torch.float32)
    if m == 1 or tc:
        return xs * inv
    return (dense_factor(m).float().t() @ xs.view(m, p)).reshape(n) * inv


# Tensor-core path: p = 8 (pad columns inside the stride, dropped n-tile), 16, 32 (11008), one
# pair per warp block and more; CUDA-core path: m = 1 with shared-memory stages, m = 12 / 20 / 28.
EMU_SIZES = [108 * 8, 108 * 16, 108 * 64, 344 * 8, 344 * 32, 96, 20 * 64, 4096, 28 * 512]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", EMU_SIZES)
def test_kernel_emulation_matches_float64(n, dtype, gen):
    x = (torch.randn(n, generator=gen) * 3).to(dtype)
    y = emulate_rotation(x)
    r = ref.hadamard_rotate(x[None], compute_dtype=torch.float64)[0]
    assert not bool(y.isnan().any()), "a byte the kernel never wrote reached the result"
    assert float((y.double() - r).abs().max()) <= 1e-6 * float(r.abs().max())


@pytest.mark.parametrize("n", [108 * 8, 344 * 32, 28 * 512])
def test_kernel_emulation_nan_spreads_over_the_row(n, gen):
    x = torch.randn(n, generator=gen).to(torch.bfloat16)
    x[5] = float("nan")
    assert bool(emulate_rotation(x).isnan().all())
