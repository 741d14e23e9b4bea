"""w4a16_matmul and int4_dequantize: CPU fallback against the float64 reference of the
dequantized weights, validation in Python and in C++, split-K choice, torch.compile; GPU
kernels (both paths) against float64 on the issue's shapes with poisoned outputs."""

from __future__ import annotations

import pytest
import torch
from inferops._core import ops
from inferops._core.extension import extension
from inferops.quant import (
    Int4Weight,
    dequantize,
    pack_int4,
    pack_int4_quantized,
    w4a16_matmul,
)
from inferops.quant import w4a16 as w4a16_mod
from inferops.reference import quant_w4a16 as ref
from inferops.testing import (
    TOLERANCES,
    assert_close,
    is_simulated,
    kernel_backend_for,
    kernel_module,
    poison_,
    stream_handle,
    synchronize,
)


REL_MEAN_ERR = 1e-3  # issue 5: W4A16 relative mean error bound


def _weight(g, N, K, group, symmetric, dtype, device="cpu"):
    """Random int4 weight with scales ~ 1 / sqrt(K) (outputs of order 1)."""
    G = 1 if group == -1 else K // group
    lo, hi = (-8, 7) if symmetric else (0, 15)
    q = torch.randint(lo, hi + 1, (N, K), generator=g, dtype=torch.int8)
    s = ((torch.rand(G, N, generator=g) + 0.5) * (0.5 / K**0.5)).to(dtype)
    z = None if symmetric else torch.randint(0, 16, (G, N), generator=g, dtype=torch.int32)
    return pack_int4_quantized(q, s, z, group_size=group).to(device)


def _ref64(x, w, bias):
    return ref.w4a16_matmul(x, w.qweight, w.scales, w.zeros, bias, w.group_len, compute_dtype=torch.float64,
                            out_dtype=torch.float64)


def _check(out, x, w, bias, what="", cublas=False):
    """Max error: elementwise dtype tolerance against float64. Relative mean error against the
    float64 result rounded to the output dtype (what an exact kernel returns), so the bound
    measures the kernel, not the output format's own rounding (bf16's alone is ~1.4e-3).

    ``cublas``: the output came from the dequantize + cuBLAS path, whose split-K may reduce
    in bf16/fp16 (torch's allow_*_reduced_precision_reduction defaults); its own error is
    cuBLAS's, so it must equal F.linear on the dequantized weight bit for bit instead.
    """
    expect = _ref64(x, w, bias)
    assert_close(out, expect, TOLERANCES[out.dtype], name=f"w4a16_matmul {what}")
    if cublas:
        same = torch.nn.functional.linear(x.reshape(-1, w.in_features), dequantize(w), bias)
        assert torch.equal(out.reshape(same.shape), same), f"{what}: differs from dequantize + F.linear"
        return
    rounded = expect.to(out.dtype).double()
    o = out.double().cpu()
    r = rounded.cpu()
    rel = ((o - r).abs().mean() / r.abs().mean().clamp(min=1e-30)).item()
    assert rel < REL_MEAN_ERR, f"{what}: relative mean error {rel:.2e} >= {REL_MEAN_ERR}"


# --- CPU: the reference path behind the public API -------------------------------------------

CPU_CASES = [  # M, K, N, group, symmetric
    (1, 128, 128, 128, True),
    (3, 448, 192, 64, False),  # odd multiples of the 16 x 64 tile
    (16, 4096, 128, 128, True),
    (17, 128, 4096, -1, False),
    (64, 384, 320, 128, True),
    (4096, 128, 128, -1, True),
]


@pytest.mark.parametrize("M,K,N,group,symmetric", CPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_matches_dequantized_float64(M, K, N, group, symmetric, dtype, with_bias, gen):
    w = _weight(gen, N, K, group, symmetric, dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = (torch.randn(N, generator=gen) * 0.5).to(dtype) if with_bias else None
    out = w4a16_matmul(x, w, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    _check(out, x, w, bias, f"cpu M={M} K={K} N={N}")


def test_cpu_leading_dims_and_strided_x(gen):
    w = _weight(gen, 128, 256, 128, True, torch.bfloat16)
    x = torch.randn(2, 3, 512, generator=gen).bfloat16()[..., ::2]  # not contiguous
    out = w4a16_matmul(x, w)
    assert out.shape == (2, 3, 128)
    _check(out.reshape(6, 128), x.reshape(6, 256), w, None, "leading dims")


def test_rtn_packed_linear_is_close_to_the_float_linear(gen):
    # End to end: quantize a float layer, the int4 layer approximates it (RTN g128 error).
    lin = torch.nn.Linear(512, 256, bias=True)
    w = pack_int4(lin.weight.detach(), 128, dtype=torch.float16)
    x = torch.randn(8, 512, generator=gen)
    out = w4a16_matmul(x.half(), w, lin.bias.detach().half()).float()
    expect = lin(x).detach()
    rel = ((out - expect).norm() / expect.norm()).item()
    assert rel < 0.15, rel  # int4 RTN on uniform-init weights: ~0.1


def test_bad_input_raises_clear_errors(gen):
    w = _weight(gen, 128, 256, 128, True, torch.bfloat16)
    x = torch.randn(4, 256, generator=gen).bfloat16()
    with pytest.raises(TypeError, match="expected an Int4Weight for `w`"):
        w4a16_matmul(x, w.qweight)
    with pytest.raises(TypeError, match="expected dtype float16 or bfloat16 for `x`, got float32"):
        w4a16_matmul(x.float(), w)
    with pytest.raises(TypeError, match=r"expected `x` in the dtype of w.scales \(bfloat16\), got float16"):
        w4a16_matmul(x.half(), w)
    with pytest.raises(ValueError, match=r"expected `x` of shape \[..., 256\]"):
        w4a16_matmul(x[:, :128], w)
    with pytest.raises(ValueError, match=r"expected shape \[128\] for `bias`"):
        w4a16_matmul(x, w, torch.zeros(64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="for `bias`, got float32"):
        w4a16_matmul(x, w, torch.zeros(128))
    with pytest.raises(ValueError, match="expected `path` one of"):
        w4a16_matmul(x, w, path="fast")
    w.layout_version = 0
    with pytest.raises(ValueError, match="layout version 1 for `w`, got 0"):
        w4a16_matmul(x, w)


@pytest.mark.skipif(extension() is None, reason="inferops._C not built")
def test_cpp_checks_run_before_any_launch(gen):
    """The host entries validate (and name the argument) in every build, CUDA or not."""
    ext = extension()
    d = ops.dlpack
    w = _weight(gen, 128, 256, 128, True, torch.bfloat16)
    x = torch.randn(4, 256, generator=gen).bfloat16()
    out = torch.empty(4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="group size that is a multiple of 16 and divides K = 256, got 96"):
        ext.w4a16_matmul(d(x), d(w.qweight), d(w.scales), None, None, d(out), 96, 1, 0)
    with pytest.raises(ValueError, match=r"splits <= min\(8, K/16 = 16\), got 9"):
        ext.w4a16_matmul(d(x), d(w.qweight), d(w.scales), None, None, d(out), 128, 9, 0)
    with pytest.raises(ValueError, match="got 0"):
        ext.w4a16_matmul(d(x), d(w.qweight), d(w.scales), None, None, d(out), 128, 0, 0)
    with pytest.raises(TypeError, match="`x`"):
        ext.w4a16_matmul(d(x.float()), d(w.qweight), d(w.scales), None, None, d(out), 128, 1, 0)
    with pytest.raises(ValueError, match="K = 256"):
        ext.w4a16_matmul(d(x[:, :128].contiguous()), d(w.qweight), d(w.scales), None, None, d(out), 128, 1, 0)
    with pytest.raises(ValueError, match="`scales`"):
        ext.int4_dequantize(d(w.qweight), d(w.scales[:1].contiguous()), None,
                            d(torch.empty(128, 256, dtype=torch.bfloat16)), 128, 0)
    buf = torch.empty(128 * 256 + 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="4-byte aligned `out`"):
        ext.int4_dequantize(d(w.qweight), d(w.scales), None, d(buf[1:].view(128, 256)), 128, 0)
    # Valid arguments on CPU tensors: the CUDA-device check (or the host-only build) raises.
    with pytest.raises((ValueError, RuntimeError), match="CUDA|cuda"):
        ext.w4a16_matmul(d(x), d(w.qweight), d(w.scales), None, None, d(out), 128, 1, 0)


def test_ops_are_registered_with_fake_impls(gen):
    w = _weight(gen, 128, 256, 128, False, torch.float16)
    x = torch.randn(5, 256, generator=gen).half()
    bias = torch.randn(128, generator=gen).half()
    torch.library.opcheck(torch.ops.inferops.w4a16_matmul.default,
                          (x, w.qweight, w.scales, w.zeros, bias, w.group_len, "auto"))
    torch.library.opcheck(torch.ops.inferops.int4_dequantize.default, (w.qweight, w.scales, w.zeros, w.group_len))


def test_compiles_fullgraph(gen):
    w = _weight(gen, 128, 256, 128, True, torch.bfloat16)
    x = torch.randn(3, 256, generator=gen).bfloat16()
    fn = torch.compile(lambda x: w4a16_matmul(x, w), fullgraph=True, backend="eager")
    assert torch.equal(fn(x), w4a16_matmul(x, w))
    dq = torch.compile(lambda: dequantize(w), fullgraph=True, backend="eager")
    assert torch.equal(dq(), dequantize(w))


@pytest.mark.parametrize("sms", [114, 132])
def test_split_k_fills_the_gpu(sms):
    for K, N in [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (128, 128), (11008, 4096)]:
        for M in (1, 3, 16, 17, 64, 4096):
            s = w4a16_mod.choose_splits(M, N, K, sms)
            assert 1 <= s <= min(8, K // 16)
            assert (K // 16) // (4 * s) >= 4 or s == 1  # every warp keeps a batch of 4 k-tiles
            mblock = 16 if M <= 16 else 32 if M <= 32 else 64
            ctas = (N // 64) * -(-M // mblock) * s
            if M == 1 and K >= 4096:
                assert ctas >= 2 * sms, (M, K, N, s)  # decode: every SM streams weights


# --- the kernels (on a GPU, or on the CPU SIMT executor: kernel_device) ------------------------
# The fused GEMM launches through cudaLaunchKernelEx, as thread-block clusters of `splits`
# blocks when splits > 1 (split-K reduced through distributed shared memory). The executor
# runs each cluster's blocks together (cluster.sync, map_shared_rank) and poisons a block's
# shared memory when it exits, so a missing final cluster.sync reads NaN there. On the
# executor the large shapes shrink (_sim_size): same group/per-channel layout and split-K
# choices, fewer weights (simulated threads are slow).

ISSUE_KN = [(128, 128), (4096, 4096), (4096, 11008), (11008, 4096), (14336, 4096), (4096, 14336),
            (16 * 7, 64 * 3), (128 * 5, 64 * 7)]
ISSUE_M = [1, 3, 16, 17, 33, 64, 65, 4096]


def _sim_size(device, M, K, N):
    """(M, K, N) to run: unchanged on a GPU; on the executor K / 8 and N / 16 for the large
    shapes (K stays a multiple of 16, N of 64; K % 128 picks group 128 or per-channel, as for
    the full shape: 11008 / 8 is per-channel) and M = 4096 -> 130 (three 64-row m-blocks, the
    last one partial)."""
    if not is_simulated(device):
        return M, K, N
    if K * N > 1024 * 1024:
        K, N = max(128, K // 8 // 16 * 16), max(64, N // 16 // 64 * 64)
    return (130 if M > 256 else M), K, N


def _cuda_fused(x, w, bias, splits):
    """The fused kernel called directly, output poisoned."""
    M, N = x.shape[0], w.out_features
    out = poison_(torch.empty(M, N, dtype=x.dtype, device=x.device))
    d = ops.dlpack
    kernel_module(x.device).w4a16_matmul(d(x), d(w.qweight), d(w.scales), None if w.zeros is None else d(w.zeros),
                                         None if bias is None else d(bias), d(out), w.group_len, splits,
                                         stream_handle(x.device))
    synchronize(x.device)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", ISSUE_KN, ids=lambda v: str(v))
@pytest.mark.parametrize("M", ISSUE_M)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fused_matches_float64(K, N, M, dtype, gen, kernel_device):
    M, K, N = _sim_size(kernel_device, M, K, N)
    group = 128 if K % 128 == 0 else -1
    symmetric = (M + K) % 2 == 0
    w = _weight(gen, N, K, group, symmetric, dtype, kernel_device)
    x = torch.randn(M, K, generator=gen).to(kernel_device, dtype)
    bias = (torch.randn(N, generator=gen) * 0.5).to(kernel_device, dtype) if M % 2 else None
    sms = kernel_module(kernel_device).device_info(kernel_device.index or 0)["sm_count"]
    splits = w4a16_mod.choose_splits(M, N, K, sms)
    _check(_cuda_fused(x, w, bias, splits), x, w, bias, f"fused M={M} K={K} N={N} splits={splits}")
    _check(w4a16_matmul(x, w, bias), x, w, bias, f"auto M={M} K={K} N={N}",
           cublas=M >= w4a16_mod.DEQUANT_MIN_M)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "dequant"])
@pytest.mark.parametrize("M", [1, 17, 64, 256, 4096])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [128, -1, 64])
def test_cuda_both_paths_every_m(M, symmetric, group, path, gen, kernel_device):
    K, N = 1024, 576
    M, _, _ = _sim_size(kernel_device, M, K, N)
    w = _weight(gen, N, K, group, symmetric, torch.bfloat16, kernel_device)
    x = torch.randn(M, K, generator=gen).to(kernel_device, torch.bfloat16)
    bias = torch.randn(N, generator=gen).to(kernel_device, torch.bfloat16)
    _check(w4a16_matmul(x, w, bias, path=path), x, w, bias, f"{path} M={M}", cublas=path == "dequant")
    assert ops.kernel_backend("w4a16_matmul", x.device) == kernel_backend_for(x.device)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 8])
@pytest.mark.parametrize("M", [5, 20, 40, 70])  # the 16 / 32 / 64-row kernels, two m-blocks
def test_cuda_split_counts_and_determinism(splits, M, gen, kernel_device):
    K, N = 1024, 256
    w = _weight(gen, N, K, 128, False, torch.float16, kernel_device)
    x = torch.randn(M, K, generator=gen).to(kernel_device, torch.float16)
    bias = torch.randn(N, generator=gen).to(kernel_device, torch.float16)
    a = _cuda_fused(x, w, bias, splits)
    _check(a, x, w, bias, f"splits={splits}")
    assert torch.equal(a, _cuda_fused(x, w, bias, splits)), "not deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K,N,group", [(4096, 4096, 128), (112, 192, -1), (11008, 320, 64)])
def test_cuda_dequantize_is_exact(dtype, symmetric, K, N, group, gen, kernel_device):
    if is_simulated(kernel_device) and (K, N) == (4096, 4096):
        K, N = 1024, 1024  # same group layout, 1/16 of the weight (simulated threads are slow)
    w = _weight(gen, N, K, group, symmetric, dtype, kernel_device)
    out = poison_(torch.empty(N, K, dtype=dtype, device=kernel_device))
    d = ops.dlpack
    kernel_module(kernel_device).int4_dequantize(d(w.qweight), d(w.scales), None if w.zeros is None else d(w.zeros),
                                                 d(out), w.group_len, stream_handle(kernel_device))
    synchronize(kernel_device)
    expect = ref.dequantize(w.qweight.cpu(), w.scales.cpu(), None if w.zeros is None else w.zeros.cpu(), w.group_len)
    assert torch.equal(out.cpu(), expect)
    assert torch.equal(dequantize(w).cpu(), expect)
    assert ops.kernel_backend("int4_dequantize", w.qweight.device) == kernel_backend_for(w.qweight.device)


@pytest.mark.gpu
def test_cuda_unaligned_x_and_packing_on_gpu(gen, kernel_device):
    # M = 7: the fused kernel's misaligned-x handling
    K, N, M = 256, 128, 7
    wf = torch.randn(N, K, generator=gen).to(kernel_device)
    w = pack_int4(wf, 128, dtype=torch.bfloat16)  # packing runs on the GPU too
    w_cpu = pack_int4(wf.cpu(), 128, dtype=torch.bfloat16)
    assert torch.equal(w.qweight.cpu(), w_cpu.qweight) and torch.equal(w.scales.cpu(), w_cpu.scales)
    buf = torch.randn(M * K + 1, generator=gen).to(kernel_device, torch.bfloat16)
    x = buf[1:].view(M, K)  # contiguous, 2 bytes off 16-byte alignment
    _check(w4a16_matmul(x, w), x, w, None, "unaligned x")


@pytest.mark.gpu
def test_cuda_graph_capture(gen, cuda_device):
    w = _weight(gen, 256, 512, 128, True, torch.bfloat16, cuda_device)
    x = torch.randn(2, 512, generator=gen).to(cuda_device, torch.bfloat16)
    expect = w4a16_matmul(x, w)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = w4a16_matmul(x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expect)


@pytest.mark.gpu
def test_cuda_int4_weight_moves_between_devices(gen, cuda_device):
    w = _weight(gen, 128, 256, 128, False, torch.float16)
    wc = w.to(cuda_device)
    assert isinstance(wc, Int4Weight) and wc.device.type == "cuda"
    x = torch.randn(3, 256, generator=gen).half()
    _check(w4a16_matmul(x.to(cuda_device), wc), x.to(cuda_device), wc, None, "moved")
    with pytest.raises(ValueError, match="expected `w` on the device of `x`"):
        w4a16_matmul(x, wc)


# --- CPU emulation of the kernels' index math (csrc/quant/w4a16.cu) ---------------------------
# Lane by lane, what W4A16GemmKernel and Int4DequantKernel load, compute and store: the packed
# 16-byte loads, the lop3 magic-number dequantization (bit for bit in fp16 / bf16), the A / B /
# C fragments placed by the PTX ISA's m16n8k16 definitions (independent of the packing code),
# the per-warp k-ranges and scale groups, the cross-warp and cluster (split-K) reductions.
# A wrong lane, half, shift, group or slice here gives O(1) errors, not rounding noise.

_MAGIC = {torch.float16: (0x6400, 1024.0), torch.bfloat16: (0x4300, 128.0)}


def _ptx_a(lane, reg, half):
    """(row, k) of A element i = 2 reg + half of mma.m16n8k16 (.row, 16-bit types)."""
    i = 2 * reg + half
    return lane // 4 + (8 if i % 4 >= 2 else 0), (lane % 4) * 2 + (i & 1) + (8 if i >= 4 else 0)


def _ptx_b(lane, reg, half):
    """(k, n) of B element i = 2 reg + half (.col)."""
    i = 2 * reg + half
    return (lane % 4) * 2 + (i & 1) + (8 if i >= 2 else 0), lane // 4


def _ptx_c(lane, i):
    """(row, n) of C element i (f32 accumulators)."""
    return lane // 4 + (8 if i >= 2 else 0), (lane % 4) * 2 + (i & 1)


def _emu_dequant_pair(word, z, s, dtype):
    """dequant_pair<T>: lop3 (w & 0x000f000f) | magic, then (v - (magic + z)) * s in T2
    arithmetic (each op rounds to T once). word: int64 [L]; z, s: [L] of T. -> [L, 2] T."""
    magic, magic_value = _MAGIC[dtype]
    v = (word & 0x000F000F) | (magic | (magic << 16))
    h = torch.stack([v & 0xFFFF, v >> 16], -1).to(torch.int16).view(dtype)
    zm = (z.float() + magic_value).to(dtype)  # from_float(kMagicValue + z)
    d = (h.float() - zm.float()[:, None]).to(dtype)  # __hsub2
    return (d.float() * s.float()[:, None]).to(dtype)  # __hmul2


def _emu_load_group(scales, zeros, g, col):
    """load_group: scale and zero point of columns col + 8 j (col = n0 + gid per lane)."""
    N = scales.shape[1]
    flat_s = scales.reshape(-1)
    s = torch.stack([flat_s[g * N + col + 8 * j] for j in range(8)], -1)  # [L, 8]
    if zeros is None:
        z = torch.full_like(s, 8)
    else:
        z = torch.stack([zeros.reshape(-1)[g * N + col + 8 * j] for j in range(8)], -1)
    return s, z


def _emu_gemm(x, qweight, scales, zeros, bias, group_size, splits):
    """W4A16GemmKernel + launch_gemm, in float64 before the final rounding."""
    M, K = x.shape
    N = scales.shape[1]
    dtype = x.dtype
    kMT = 1 if M <= 16 else 2 if M <= 32 else 4  # launch_w4a16_matmul
    kRows = 16 * kMT
    words = qweight.reshape(-1).to(torch.int64) & 0xFFFFFFFF  # uint4 v = words[4 v .. 4 v + 3]
    lane = torch.arange(32)
    gid, tig = lane // 4, lane % 4
    kt_total = K // 16
    slices = splits * 4
    w_row = N // 2
    out = torch.full((M, N), float("nan"), dtype=torch.float64)
    written = torch.zeros(M, N, dtype=torch.int64)
    for bz in range(-(-M // kRows)):
        m0 = bz * kRows
        rows = min(M - m0, kRows)
        for bx in range(N // 64):
            n0 = bx * 64
            cta_sum = []  # per rank: warp 0's slot after the CTA sum, [kRows, 64]
            for by in range(splits):
                red = torch.zeros(4, kRows, 64, dtype=torch.float64)
                for warp in range(4):
                    slice_ = by * 4 + warp
                    kt_begin = kt_total * slice_ // slices
                    kt_end = kt_total * (slice_ + 1) // slices
                    acc = torch.zeros(32, kMT, 8, 4, dtype=torch.float64)
                    for kt in range(kt_begin, kt_end):
                        vec = kt * w_row + n0 // 2 + lane  # wq + kt * w_row
                        q = torch.stack([words[4 * vec + e] for e in range(4)], -1)  # [32, 4]
                        g = kt * 16 // group_size
                        s, z = _emu_load_group(scales, zeros, g, n0 + gid)
                        kk = kt * 16
                        for mt in range(kMT):
                            A = torch.zeros(16, 16, dtype=torch.float64)
                            for reg in range(4):
                                h = reg % 2  # xrow[mt][h]: row gid + 8 h; regs 2, 3 at k + 8
                                r = m0 + mt * 16 + gid + 8 * h
                                kcol = kk + 2 * tig + (8 if reg >= 2 else 0)
                                for half in range(2):
                                    val = torch.where(r < M, x[r.clamp(max=M - 1), kcol + half].double(),
                                                      torch.zeros(32, dtype=torch.float64))
                                    for ln in range(32):
                                        ar, ak = _ptx_a(ln, reg, half)
                                        A[ar, ak] = val[ln]
                            for w in range(4):
                                for b1 in range(2):
                                    j = 2 * w + b1
                                    B = torch.zeros(16, 8, dtype=torch.float64)
                                    for reg, shift in ((0, 8 * b1), (1, 8 * b1 + 4)):
                                        pair = _emu_dequant_pair(q[:, w] >> shift, z[:, j], s[:, j], dtype)
                                        for half in range(2):
                                            for ln in range(32):
                                                bk, bn = _ptx_b(ln, reg, half)
                                                B[bk, bn] = pair[ln, half].double()
                                    C = A @ B
                                    for ln in range(32):
                                        for i in range(4):
                                            cr, cn = _ptx_c(ln, i)
                                            acc[ln, mt, j, i] += C[cr, cn]
                    # Stores into this warp's slot: row mt * 16 + gid (+ 8), column j * 8 + 2 tig (+ 1).
                    for ln in range(32):
                        for mt in range(kMT):
                            for j in range(8):
                                r, c = mt * 16 + ln // 4, j * 8 + 2 * (ln % 4)
                                red[warp, r, c:c + 2] = acc[ln, mt, j, 0:2]
                                red[warp, r + 8, c:c + 2] = acc[ln, mt, j, 2:4]
                cta = red[0].clone()
                for w in range(1, 4):
                    cta += red[w]
                cta_sum.append(cta)
            total = rows * 64
            per = -(-total // splits)
            for rank in range(splits):  # DSMEM reduction: rank's slice, splits summed in rank order
                for i in range(rank * per, min((rank + 1) * per, total)):
                    r, c = i // 64, i % 64
                    v = 0.0
                    for sp in range(splits):
                        v += float(cta_sum[sp][r, c])
                    if bias is not None:
                        v += float(bias[n0 + c])
                    out[m0 + r, n0 + c] = v
                    written[m0 + r, n0 + c] += 1
    assert torch.all(written == 1), "an output element is written twice or never"
    return out


def _emu_dequantize(qweight, scales, zeros, group_size):
    """Int4DequantKernel: one thread per packed uint4, bit for bit."""
    KT, N2 = qweight.shape
    N, K = N2 // 2, KT * 16
    dtype = scales.dtype
    nblocks = N // 64
    words = qweight.reshape(-1).to(torch.int64) & 0xFFFFFFFF
    out = torch.full((N, K), float("nan"), dtype=dtype)
    written = torch.zeros(N, K, dtype=torch.int64)
    i = torch.arange(KT * nblocks * 32)
    lane = i & 31
    tile = i >> 5
    kt, nb = tile // nblocks, tile % nblocks
    gid, tig = lane // 4, lane % 4
    q = torch.stack([words[4 * i + e] for e in range(4)], -1)
    n_lane = nb * 64 + gid
    g = kt * 16 // group_size
    s, z = _emu_load_group(scales, zeros, g, n_lane)
    k = kt * 16 + 2 * tig
    for w in range(4):
        for b1 in range(2):
            j = 2 * w + b1
            lo = _emu_dequant_pair(q[:, w] >> (8 * b1), z[:, j], s[:, j], dtype)
            hi = _emu_dequant_pair(q[:, w] >> (8 * b1 + 4), z[:, j], s[:, j], dtype)
            n = n_lane + 8 * j
            for col, vals in ((k, lo[:, 0]), (k + 1, lo[:, 1]), (k + 8, hi[:, 0]), (k + 9, hi[:, 1])):
                out[n, col] = vals
                written[n, col] += 1
    assert torch.all(written == 1), "an output element is written twice or never"
    return out


EMU_CASES = [  # M, K, N, group, symmetric, splits
    (20, 512, 128, 64, False, 3),  # 32-row kernel, warps' k-ranges cross 64-groups
    (5, 384, 192, -1, True, 7),  # per-channel; 28 warp slices for 24 k-tiles: empty warps
    (40, 256, 64, 128, False, 2),  # 64-row kernel, rows 40..63 of the block absent
    (3, 128, 64, 128, True, 1),  # no cluster
]


@pytest.mark.parametrize("M,K,N,group,symmetric,splits", EMU_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_emulation_matches_reference(M, K, N, group, symmetric, splits, dtype, gen):
    w = _weight(gen, N, K, group, symmetric, dtype)
    # Scales spanning fp16 subnormals / large magnitudes too: the product still rounds once.
    w.scales[0, :4] = torch.tensor([2.0**-20, 3.0**-9, 1000.0, 1.0]).to(dtype)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = (torch.randn(N, generator=gen) * 0.5).to(dtype) if M % 2 else None
    deq = _emu_dequantize(w.qweight, w.scales, w.zeros, w.group_len)
    assert torch.equal(deq, ref.dequantize(w.qweight, w.scales, w.zeros, w.group_len))
    got = _emu_gemm(x, w.qweight, w.scales, w.zeros, bias, w.group_len, splits)
    expect = _ref64(x, w, bias)
    assert torch.allclose(got, expect, rtol=1e-12, atol=1e-12 * expect.abs().max().item())


def test_no_split_k_before_sm90(monkeypatch):
    """Split-K reduces through a thread-block cluster (sm_90+): on an sm_80 GPU the fused
    kernel must be launched with splits = 1, never refused by the launcher."""
    import types

    for major, sms in ((8, 108), (9, 132)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i, major=major, sms=sms: types.SimpleNamespace(major=major,
                                                                                  multi_processor_count=sms))
        w4a16_mod._sm_count.cache_clear()
        splits = w4a16_mod.choose_splits(1, 4096, 4096, w4a16_mod._sm_count(0))
        assert (splits == 1) == (major < 9), (major, splits)
    w4a16_mod._sm_count.cache_clear()
