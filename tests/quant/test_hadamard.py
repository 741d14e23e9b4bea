"""Hadamard construction (Sylvester, Paley I over GF(p^k)) and hadamard_quantize."""

from __future__ import annotations

import math

import pytest
import torch
import inferops
from inferops._core.extension import extension
from inferops.quant import (
    hadamard_matrix,
    hadamard_quantize,
    hadamard_transform,
    supported_hadamard_sizes,
)
from inferops.quant.hadamard import (
    DENSE_ORDERS,
    _dense_factor_for_kernel,
    _tc_pad,
    _tc_stride,
    dense_factor,
    dense_factor_fragments,
    hadamard_factorization,
    kernel_smem_bytes,
    prepare_hadamard,
)
from inferops.reference import quant_w8a8 as ref
from inferops.testing import (
    Tolerance,
    assert_close,
    is_simulated,
    kernel_backend_for,
    kernel_module,
    poison_,
    randn,
    stream_handle,
    synchronize,
)
from torch.utils.dlpack import to_dlpack

FP8 = torch.float8_e4m3fn
MODEL_SIZES = [4096, 5120, 8192, 11008, 13824, 14336, 28672]
POW2 = [1 << k for k in range(1, 16)]
# Every m * 2^k combination the docs promise (2^k >= 1 up to the n <= 32768 limit).
COMBOS = sorted({m << k for m in DENSE_ORDERS for k in range(12) if (m << k) <= 32768})
ALL_SIZES = sorted(set(POW2) | set(COMBOS))
DENSE_CHECK_MAX = 2048  # H H^T = n I checked densely up to here (n^3 flops on the CPU)


def test_model_sizes_factor_as_documented():
    assert [hadamard_factorization(n) for n in MODEL_SIZES] == [
        (1, 4096), (20, 256), (1, 8192), (344, 32), (108, 128), (28, 512), (28, 1024)]


@pytest.mark.parametrize("m", (1, *DENSE_ORDERS))
def test_dense_factors_are_hadamard(m):
    h = dense_factor(m).long()
    assert set(h.unique().tolist()) <= {-1, 1}
    assert torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.long))


def test_dense_factors_are_deterministic():
    # A fixed fingerprint: the matrices must not change between runs or machines (weights
    # fused with one H are only valid with the same H at run time).
    fp = {m: int((dense_factor(m).long() * torch.arange(m * m).reshape(m, m)).sum()) for m in DENSE_ORDERS}
    fp2 = {m: int((dense_factor(m).long() * torch.arange(m * m).reshape(m, m)).sum()) for m in DENSE_ORDERS}
    assert fp == fp2
    h = hadamard_matrix(28, dtype=torch.int64)
    assert h[0].tolist() == [1] * 28 and h[:, 0].tolist() == [1] + [-1] * 27  # Paley I border


@pytest.mark.parametrize("n", [n for n in ALL_SIZES if n <= DENSE_CHECK_MAX])
def test_h_ht_is_n_identity(n):
    h = hadamard_matrix(n, dtype=torch.float64)
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", ALL_SIZES)
def test_every_supported_size_is_orthonormal_and_matches_kron(n, gen):
    """All sizes (the large ones without an n x n product): the fast transform preserves
    inner products of random vectors, equals x @ kron(H_m, H_p) / sqrt(n) on sampled columns,
    and is linear with the kron structure the kernel relies on."""
    m, p = hadamard_factorization(n)
    x = randn((6, n), torch.float64, "cpu", gen)
    y = ref.hadamard_rotate(x, compute_dtype=torch.float64)
    assert torch.allclose(y @ y.t(), x @ x.t(), rtol=1e-10, atol=1e-9 * n)
    cols = torch.randint(0, n, (min(n, 64),), generator=gen)
    h_m = dense_factor(m).double()
    # Sylvester entries in closed form: H_p[i, j] = (-1)^popcount(i & j)
    rows_p = torch.arange(p)[:, None] & (cols % p)[None, :]
    bits = torch.zeros_like(rows_p)
    for b in range(16):
        bits += (rows_p >> b) & 1
    h_p_cols = 1.0 - 2.0 * (bits % 2).double()  # [p, len(cols)]
    hcols = (h_m[:, cols // p].repeat_interleave(p, 0) * h_p_cols.repeat(m, 1)) / math.sqrt(n)
    assert torch.allclose(y[:, cols], x @ hcols, rtol=1e-10, atol=1e-10 * math.sqrt(n))


@pytest.mark.parametrize("n", [8, 12, 40, 96, 344, 1024, 4096, 5120])
def test_fast_transform_matches_dense_product(n, gen):
    x = randn((5, n), torch.float64, "cpu", gen)
    dense = x @ hadamard_matrix(n) / math.sqrt(n)
    assert_close(ref.hadamard_rotate(x, compute_dtype=torch.float64), dense, torch.float64)
    xb = x.bfloat16()
    assert_close(hadamard_transform(xb), xb.double() @ hadamard_matrix(n) / math.sqrt(n), torch.bfloat16)


def test_normalized_matrix_is_orthogonal():
    r = hadamard_matrix(20 * 8, normalized=True)
    assert torch.allclose(r @ r.t(), torch.eye(160, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
@pytest.mark.parametrize("n", [64, 5120, 14336])
def test_hadamard_quantize_cpu(n, qdtype, gen):
    x = randn((2, 3, n), torch.bfloat16, "cpu", gen)
    x[0, 1] = 0
    q, s = hadamard_quantize(x, qdtype)
    assert q.shape == x.shape and q.dtype == qdtype and s.shape == (2, 3) and s.dtype == torch.float32
    rot = ref.hadamard_rotate(x.reshape(-1, n), compute_dtype=torch.float64).reshape(x.shape)
    deq = ref.dequantize_per_token(q, s, torch.float64)
    sc = s.double()[..., None]
    bound = sc * 0.5 if qdtype == torch.int8 else rot.abs() * 2**-4 + sc * 2**-9
    assert bool(((deq - rot).abs() <= bound + sc * 1e-3).all())
    assert bool((q[0, 1].float() == 0).all()) and s[0, 1].item() == pytest.approx(ref.SCALE_MIN)
    y, none = hadamard_quantize(x, None)
    assert none is None and y.dtype == torch.bfloat16
    assert_close(y, rot, torch.bfloat16)


@pytest.mark.parametrize(
    "args,exc,pattern",
    [
        ((torch.zeros(2, 100, dtype=torch.bfloat16),), ValueError, r"Hadamard size `n` = .*; got 100"),
        ((torch.zeros(2, 9 * 1024, dtype=torch.bfloat16),), ValueError, r"got 9216"),
        ((torch.zeros(2, 65536, dtype=torch.bfloat16),), ValueError, r"got 65536"),
        ((torch.zeros(2, 64),), TypeError, r"float16 or bfloat16 for `x`, got float32"),
        ((torch.zeros(2, 64, dtype=torch.bfloat16), torch.float16), TypeError, r"`dtype` torch.int8"),
        ((torch.zeros((), dtype=torch.bfloat16),), ValueError, r"at least 1 dim"),
    ],
)
def test_bad_input(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        hadamard_quantize(*args)


def test_unsupported_size_message_lists_supported():
    with pytest.raises(ValueError) as e:
        hadamard_matrix(18944)
    assert "11008 = 344*32" in str(e.value) and supported_hadamard_sizes() in str(e.value)


@pytest.mark.skipif(extension() is None, reason="inferops._C not importable")
def test_binding_rejects_bad_order_before_launch():
    x = torch.zeros(2, 96, dtype=torch.bfloat16)
    out, s = torch.empty(2, 96, dtype=torch.int8), torch.empty(2)
    with pytest.raises(ValueError, match="dense Hadamard order m in"):
        extension().hadamard_quantize(to_dlpack(x), None, to_dlpack(out), to_dlpack(s), 3, 0)
    with pytest.raises(ValueError, match=r"\+-1 entries in `hm`, got 2"):
        extension().hadamard_quantize(to_dlpack(x), to_dlpack(torch.full((12, 12), 2, dtype=torch.int8)),
                                      to_dlpack(out), to_dlpack(s), 12, 0)
    with pytest.raises(ValueError, match=r"2\^k >= 8"):
        extension().hadamard_quantize(to_dlpack(x[:, :48].contiguous()), to_dlpack(torch.ones(12, 12, dtype=torch.int8)),
                                      to_dlpack(out[:, :48].contiguous()), to_dlpack(s), 12, 0)


@pytest.mark.skipif(extension() is None, reason="inferops._C not importable")
def test_binding_wants_fragment_words_for_large_orders():
    """m = 108 / 344 take the tensor-core sign words, not the int8 [m, m] matrix."""
    x = torch.zeros(2, 344 * 8, dtype=torch.bfloat16)
    out, s = torch.empty(2, 344 * 8, dtype=torch.int8), torch.empty(2)
    with pytest.raises((TypeError, ValueError), match="hm"):
        extension().hadamard_quantize(to_dlpack(x), to_dlpack(dense_factor(344)), to_dlpack(out), to_dlpack(s), 344, 0)
    words = dense_factor_fragments(344)
    with pytest.raises((TypeError, ValueError), match="hm"):
        extension().hadamard_quantize(to_dlpack(x), to_dlpack(words[:, :3].contiguous()), to_dlpack(out),
                                      to_dlpack(s), 344, 0)
    with pytest.raises(ValueError, match="expected a CUDA tensor for `x`"):  # right operand: past every check
        extension().hadamard_quantize(to_dlpack(x), to_dlpack(words), to_dlpack(out), to_dlpack(s), 344, 0)


def test_opcheck_and_compile_cpu(gen):
    x = randn((3, 40), torch.bfloat16, "cpu", gen)
    torch.library.opcheck(torch.ops.inferops.hadamard_quantize.default, (x, "none"))
    got = torch.compile(lambda t: hadamard_quantize(t, torch.int8), fullgraph=True, backend="eager")(x)
    eager = hadamard_quantize(x, torch.int8)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


# --- CPU emulation of the tensor-core dense step (m = 108, 344) ---------------------------

TC_SIZES = [m << k for m in (108, 344) for k in range(3, 12) if (m << k) <= 32768]


def _u32(words: torch.Tensor) -> torch.Tensor:
    return words.long() & 0xFFFFFFFF


def _emu_a_fragment(w: torch.Tensor, t: int) -> torch.Tensor:
    """Lane values of the A tile rebuilt as in dense_factor_tc: ``[32 lanes, 4 regs, 2 halves]``,
    from the 32 sign words ``w`` (uint32 as int64) of one (ct, kw)."""
    vals = torch.empty(32, 4, 2, dtype=torch.float64)
    for i in range(4):
        reg = (w << (4 * t + i)) & 0x80008000  # sign bits of (ONE | reg) at 15 and 31
        vals[:, i, 0] = 1.0 - 2.0 * ((reg >> 15) & 1).double()
        vals[:, i, 1] = 1.0 - 2.0 * ((reg >> 31) & 1).double()
    return vals


def _emu_ldmatrix_x4_trans(flat: torch.Tensor, elem: torch.Tensor) -> torch.Tensor:
    """ldmatrix.x4.trans: lane 8j + r gives the first element of row r of 8x8 matrix j; lane
    l receives in register j (M_j[2 (l % 4)][l // 4], M_j[2 (l % 4) + 1][l // 4])."""
    lane = torch.arange(32)
    regs = torch.empty(32, 4, 2, dtype=torch.float64)
    for j in range(4):
        rows = elem[8 * j: 8 * j + 8]  # [8] row start addresses (elements)
        mat = flat[rows[:, None] + torch.arange(8)[None, :]]  # [8, 8]
        regs[:, j, 0] = mat[2 * (lane % 4), lane // 4]
        regs[:, j, 1] = mat[2 * (lane % 4) + 1, lane // 4]
    return regs


def _emu_dense_tc(x_row: torch.Tensor, m: int) -> torch.Tensor:
    """Z [m, P] = H_m^T X computed the way dense_factor_tc does: the sign words from
    dense_factor_fragments, the staged row [m16][S] (pad rows zero, pad columns NaN),
    ldmatrix.x4.trans addresses, the m16n8k16 fragment layouts and the float2 stores."""
    n = x_row.numel()
    p = n // m
    m16, s_ = _tc_pad(m), _tc_stride(p)
    xb = torch.full((m16, s_), float("nan"), dtype=torch.float64)
    xb[:m, :p] = x_row.double().reshape(m, p)
    xb[m:, :p] = 0.0
    flat = xb.reshape(-1)
    words = _u32(dense_factor_fragments(m))
    n_ct, n_kw = words.shape[0], words.shape[1]
    nt_total = p // 8
    npairs = 2 if nt_total >= 4 else 1
    nblocks = nt_total // 4 if nt_total >= 4 else 1
    lane = torch.arange(32)
    g, q = lane // 4, lane % 4
    lane_elem = (lane & 15) * s_ + (lane >> 4) * 8
    zs = torch.full((m * p,), float("nan"), dtype=torch.float64)
    for blk in range(n_ct * nblocks):  # every warp's blocks (blk = warp + 8 i)
        ct, nt0 = blk // nblocks, (blk % nblocks) * 4
        acc = torch.zeros(4, 16, 8, dtype=torch.float64)  # C tiles of the 4 n-tiles
        for kw in range(n_kw):
            for t in range(4):
                kt = kw * 4 + t
                if kt >= n_ct:
                    continue
                av = _emu_a_fragment(words[ct, kw], t)
                a = torch.empty(16, 16, dtype=torch.float64)  # the A tile the lanes hold
                for i, (dr, dk) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
                    a[g + dr, 2 * q + dk] = av[:, i, 0]
                    a[g + dr, 2 * q + dk + 1] = av[:, i, 1]
                for pp in range(npairs):
                    b = _emu_ldmatrix_x4_trans(flat, lane_elem + kt * 16 * s_ + (nt0 + 2 * pp) * 8)
                    for half in range(2):  # n-tile 2 pp + half: (b0 b1, b2 b3) = regs (2 half, 2 half + 1)
                        bt = torch.empty(16, 8, dtype=torch.float64)
                        bt[2 * q, g], bt[2 * q + 1, g] = b[:, 2 * half, 0], b[:, 2 * half, 1]
                        bt[2 * q + 8, g], bt[2 * q + 9, g] = b[:, 2 * half + 1, 0], b[:, 2 * half + 1, 1]
                        acc[2 * pp + half] += a @ bt
        c0 = ct * 16 + g
        for j in range(4):
            nt = nt0 + j
            if j < 2 * npairs and nt < nt_total:
                d = nt * 8 + 2 * q
                for rows in (c0, c0 + 8):
                    ok = rows < m
                    r_acc = rows - ct * 16
                    zs[(rows * p + d)[ok]] = acc[j, r_acc[ok], (2 * q)[ok]]
                    zs[(rows * p + d + 1)[ok]] = acc[j, r_acc[ok], (2 * q + 1)[ok]]
    return zs.reshape(m, p)


def test_fragment_one_constants():
    # ONE | sign bit: the A operand values the kernel builds in fp16 and bf16.
    bits = torch.tensor([0x3C00, 0x3C00 | 0x8000 - 0x10000], dtype=torch.int16)
    assert bits.view(torch.float16).tolist() == [1.0, -1.0]
    bits = torch.tensor([0x3F80, 0x3F80 | 0x8000 - 0x10000], dtype=torch.int16)
    assert bits.view(torch.bfloat16).tolist() == [1.0, -1.0]


@pytest.mark.parametrize("m", (108, 344))
def test_fragment_words_rebuild_h_transpose(m):
    """Every (row tile, k-tile, lane, register) of the sign words decodes to H_m^T (+1 padded)."""
    words = _u32(dense_factor_fragments(m))
    m16 = _tc_pad(m)
    assert words.shape == (m16 // 16, (m16 // 16 + 3) // 4, 32)
    expect = torch.ones(m16, m16, dtype=torch.float64)
    expect[:m, :m] = dense_factor(m).double().t()
    got = torch.full((m16, m16), float("nan"), dtype=torch.float64)
    lane = torch.arange(32)
    g, q = lane // 4, lane % 4
    for ct in range(m16 // 16):
        for kt in range(m16 // 16):
            av = _emu_a_fragment(words[ct, kt // 4], kt % 4)
            for i, (dr, dk) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
                got[ct * 16 + g + dr, kt * 16 + 2 * q + dk] = av[:, i, 0]
                got[ct * 16 + g + dr, kt * 16 + 2 * q + dk + 1] = av[:, i, 1]
    assert torch.equal(got, expect)


@pytest.mark.parametrize("n", TC_SIZES)
def test_tensor_core_emulation_matches_reference(n, gen):
    """The dense step as the kernel lays it out (fragments, ldmatrix addresses with the padded
    row stride, warp blocks, C-fragment stores), then the FWHT and 1/sqrt(n): equals the
    float64 rotation; every element of Z is written, none of the NaN padding leaks in."""
    m, p = hadamard_factorization(n)
    x = randn((n,), torch.bfloat16, "cpu", gen)
    z = _emu_dense_tc(x, m)
    assert not bool(z.isnan().any())
    assert torch.equal(z, dense_factor(m).double().t() @ x.double().reshape(m, p))  # exact in float64
    y = ref._fwht_last(z).reshape(n) / math.sqrt(n)
    assert_close(y, ref.hadamard_rotate(x[None], compute_dtype=torch.float64)[0], torch.float64)
    assert kernel_smem_bytes(n) + 256 <= 227 * 1024  # fits an H100 (sm_90 opt-in 227 KiB)


# --- CUDA -----------------------------------------------------------------------------------

GPU_SIZES = sorted(set(MODEL_SIZES) | {8, 256, 512, 2048, 32768, 96, 160, 224, 20 * 64, 28 * 8, 108 * 8, 344 * 8,
                                       108 * 64, 12 * 256, 108 * 256, 344 * 64})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", GPU_SIZES)
def test_cuda_rotation_matches_float64(n, dtype, gen, kernel_device):
    x = randn((3 if is_simulated(kernel_device) else 37, n), dtype, kernel_device, gen)
    y, _ = hadamard_quantize(x, None)
    assert inferops._core.ops.kernel_backend("hadamard_quantize", y.device) == kernel_backend_for(y.device)
    assert_close(y, ref.hadamard_rotate(x, compute_dtype=torch.float64), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("n", MODEL_SIZES + [96, 344 * 8])
def test_cuda_quantized_matches_reference(n, qdtype, gen, kernel_device):
    x = randn((5 if is_simulated(kernel_device) else 65, n), torch.bfloat16, kernel_device, gen)
    x[3] = 0
    q, s = hadamard_quantize(x, qdtype)
    q_ref, s_ref = ref.hadamard_quantize(x, qdtype)
    # fp32 summation order differs from the reference: scales agree to a few ulps, codes
    # differ by at most one step where x / scale lands next to a rounding boundary.
    assert_close(s, s_ref.double(), Tolerance(atol=1e-12, rtol=1e-5))
    deq, deq_ref = ref.dequantize_per_token(q, s, torch.float64), ref.dequantize_per_token(q_ref, s_ref, torch.float64)
    step = s_ref.double()[:, None] * (1.0 if qdtype == torch.int8 else 32.0)  # one int8 step / one fp8 step at 448
    assert bool(((deq - deq_ref).abs() <= step * 1.001).all())
    assert float((q.float() != q_ref.float()).float().mean()) < 1e-3
    assert s[3].item() == pytest.approx(ref.SCALE_MIN) and bool((q[3].float() == 0).all())


def _check_against_float64(x, out, s, qdtype):
    """The precise acceptance rule for a kernel output against the float64 rotation r64.

    The kernel's fp32 rotation r32 is within delta = 1e-5 * amax(row) of r64 (fp32
    accumulation of m fp16/bf16 products plus log2(p) butterfly stages; typical errors are
    ~1e-6 * amax). So its scale is max(amax / qmax, 1e-10) to ~1e-5 relative, and every
    output must lie between the roundings of the interval [r64 - delta, r64 + delta]
    (divided by the kernel's own scale for quantized outputs): it may differ from the
    rounding of r64 by one level only where r64 sits within delta of a rounding boundary.
    """
    r64 = ref.hadamard_rotate(x, compute_dtype=torch.float64)
    amax = r64.abs().amax(-1)
    delta = 1e-5 * amax[:, None]
    if qdtype is None:
        assert out.dtype == x.dtype
        lo, hi = (r64 - delta).to(x.dtype).double(), (r64 + delta).to(x.dtype).double()
        y = out.double()
        assert bool(((lo <= y) & (y <= hi)).all()), float((y - r64).abs().max())
        return
    qm = ref.qmax(qdtype)
    assert_close(s, torch.clamp(amax / qm, min=ref.SCALE_MIN), Tolerance(atol=0.0, rtol=2e-5), name="scale")
    sd = s.double()[:, None]
    v_lo, v_hi = ((r64 - delta) / sd).clamp(-qm, qm), ((r64 + delta) / sd).clamp(-qm, qm)
    if qdtype == torch.int8:
        lo, hi = torch.round(v_lo), torch.round(v_hi)
    else:  # rounding to e4m3 is monotone: the fp32 value's rounding lies between these
        lo, hi = v_lo.float().to(qdtype).double(), v_hi.float().to(qdtype).double()
    qv = out.double()
    bad = ~((lo <= qv) & (qv <= hi))
    assert not bool(bad.any()), f"{int(bad.sum())} codes outside the rounding interval"


# Every model size plus every tensor-core size (m = 108, 344 with 2^k = 8 .. 32768 / m) and
# small-p shapes of the other paths.
POISON_SIZES = sorted(set(MODEL_SIZES) | set(TC_SIZES) | {96, 224, 160, 12 * 256, 8, 32768})
# On the executor: every factor class at its smallest n (m = 1, 12, 20, 28: p = 8; m = 108,
# 344: p = 8, where the second n-tile is dropped), the tensor-core n-tiling cases p = 16
# (one n-tile pair) and p = 32 (two pairs), shared-memory FWHT stages with and without a
# dense factor (4096, 28672 = 28 * 1024: also the largest kernel row but one; 32768 runs in
# test_cuda_rotation_matches_float64).
SIM_POISON_SIZES = {8, 96, 160, 224, 108 * 8, 108 * 16, 108 * 32, 344 * 8, 4096, 28672}


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", [torch.int8, FP8, None], ids=["int8", "fp8", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n", POISON_SIZES)
def test_cuda_poisoned_outputs_match_float64(n, dtype, qdtype, gen, kernel_device):
    """The kernel through the binding with NaN / INT_MIN-poisoned `out` and `scale`: every
    element and every scale is written and satisfies _check_against_float64 (zero row:
    scale 1e-10 and zero codes)."""
    m, _ = hadamard_factorization(n)
    rows, zero = 37, 5
    if is_simulated(kernel_device):
        if n not in SIM_POISON_SIZES:
            pytest.skip("the executor runs SIM_POISON_SIZES")
        rows, zero = 3, 1
    x = randn((rows, n), dtype, kernel_device, gen, scale=3.0)
    x[zero] = 0
    odt = dtype if qdtype is None else qdtype
    out = torch.empty(rows, n, dtype=odt, device=kernel_device)
    if qdtype == FP8:
        out.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
    else:
        poison_(out)
    s = poison_(torch.empty(rows if qdtype is not None else 0, device=kernel_device))
    hm = None if m == 1 else to_dlpack(_dense_factor_for_kernel(m, kernel_device))  # host tensor for m <= 28
    kernel_module(kernel_device).hadamard_quantize(to_dlpack(x), hm, to_dlpack(out), to_dlpack(s), m,
                                                   stream_handle(kernel_device))
    synchronize(kernel_device)
    _check_against_float64(x, out, s, qdtype)
    if qdtype is not None:
        assert s[zero].item() == pytest.approx(ref.SCALE_MIN) and bool((out[zero].float() == 0).all())
    # The public op (which may pick other launch paths) satisfies the same rule.
    got, got_s = hadamard_quantize(x, qdtype)
    _check_against_float64(x, got, got_s, qdtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [11008, 13824, 27648])
def test_cuda_tensor_core_path_many_tokens(n, gen, cuda_device):
    """A realistic token count (one block per token, several resident per SM) on the
    tensor-core path, fp8 and bf16 outputs."""
    x = randn((4096 + 3, n), torch.bfloat16, cuda_device, gen)
    for qdtype in (FP8, None):
        out, s = hadamard_quantize(x, qdtype)
        _check_against_float64(x, out, s, qdtype)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [224, 108 * 8, 4096])  # scalar dense factor, tensor cores, FWHT only
def test_cuda_misaligned_and_strided_input(n, gen, kernel_device):
    """A contiguous row block 2 bytes off 16-byte alignment and a column slice of a wider
    buffer (row stride > n) reach the kernel as aligned contiguous rows (the op copies)."""
    rows = 5
    buf = randn((rows * n + 1,), torch.bfloat16, kernel_device, gen, scale=2.0)
    x_off = buf[1:].view(rows, n)
    wide = randn((rows, n + 24), torch.bfloat16, kernel_device, gen, scale=2.0)
    x_str = wide[:, 8:8 + n]
    for x in (x_off, x_str):
        for qdtype in (torch.int8, None):
            out, s = hadamard_quantize(x, qdtype)
            _check_against_float64(x, out, s, qdtype)


@pytest.mark.gpu
def test_cuda_small_sizes_use_reference(gen, kernel_device):
    """2^k < 8 (n = 2, 4, 12, 24, ...) runs the reference on the GPU tensors."""
    for n in (2, 4, 12, 24, 40):
        x = randn((3, n), torch.bfloat16, kernel_device, gen)
        assert_close(hadamard_transform(x), ref.hadamard_rotate(x, compute_dtype=torch.float64), torch.bfloat16)


@pytest.mark.skipif(extension() is None, reason="inferops._C not importable")
@pytest.mark.parametrize("n", [n for n in ALL_SIZES if hadamard_factorization(n)[1] >= 8])
def test_binding_accepts_every_kernel_size(n):
    """The C++ checks agree with the Python size rules: with CPU tensors every size the
    wrapper sends to the kernel gets past all argument checks and stops at the device check."""
    m, _ = hadamard_factorization(n)
    x = torch.zeros(2, n, dtype=torch.bfloat16)
    out, s = torch.empty(2, n, dtype=torch.int8), torch.empty(2)
    hm = None if m == 1 else to_dlpack(_dense_factor_for_kernel(m, torch.device("cpu")))
    with pytest.raises(ValueError, match="expected a CUDA tensor for `x`"):
        extension().hadamard_quantize(to_dlpack(x), hm, to_dlpack(out), to_dlpack(s), m, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [14336, 11008])
def test_cuda_graph_capture(n, gen, cuda_device):
    """After one eager call (which caches H_m on the device for m = 344), the op captures
    into a CUDA graph and replays to the eager result."""
    x = randn((33, n), torch.bfloat16, cuda_device, gen)
    eager = hadamard_quantize(x, torch.int8)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = hadamard_quantize(x, torch.int8)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 14336, 11008])  # FWHT only, scalar dense factor, tensor-core factor
@pytest.mark.parametrize("qdtype", [torch.int8, FP8])
def test_cuda_nan_row_gives_nan_scale(n, qdtype, gen, kernel_device):
    """A NaN anywhere in a token spreads over its rotated row: its scale is NaN (as the
    reference's amax), never a finite scale with finite codes; other tokens are unaffected."""
    x = randn((3, n), torch.bfloat16, kernel_device, gen)
    x[1, 5] = float("nan")
    q, s = hadamard_quantize(x, qdtype)
    assert torch.isnan(s[1]) and torch.isfinite(s[[0, 2]]).all()
    q_ok, s_ok = hadamard_quantize(x[[0, 2]], qdtype)
    assert torch.equal(s[[0, 2]], s_ok) and torch.equal(q[[0, 2]].view(torch.uint8), q_ok.view(torch.uint8))
    if qdtype == FP8:
        assert torch.isnan(q[1].float()).all()


def test_prepare_hadamard_validates_and_is_a_noop_on_cpu():
    prepare_hadamard(11008, "cpu")
    with pytest.raises(ValueError, match="Hadamard size"):
        prepare_hadamard(100, "cpu")


@pytest.mark.gpu
def test_cuda_first_call_inside_graph_capture_after_prepare(gen, cuda_device):
    """prepare_hadamard copies the m = 344 sign words up front, so the very first
    hadamard_quantize call on the device can be captured (a host copy inside a capture fails)."""
    from inferops.quant import hadamard as hmod

    hmod._dense_factor_cached.cache_clear()
    prepare_hadamard(11008, cuda_device)
    x = randn((4, 11008), torch.bfloat16, cuda_device, gen)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        q, s = hadamard_quantize(x, torch.int8)
    g.replay()
    torch.cuda.synchronize()
    q_ref, s_ref = ref.hadamard_quantize(x, torch.int8)
    assert_close(s, s_ref.double(), Tolerance(atol=1e-12, rtol=1e-5))
