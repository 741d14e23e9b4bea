"""quantize_per_token and w8a8_matmul (INT8 and FP8 e4m3)."""

from __future__ import annotations

import pytest
import torch
import inferops
from inferops._core.extension import extension
from inferops.quant import quantize_per_token, quantize_weight_per_channel, w8a8_matmul
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
QDTYPES = [torch.int8, FP8]
QMAX = {torch.int8: 127.0, FP8: 448.0}


def _quantized(g, M, K, N, qdtype, device="cpu", zero_rows=()):
    x = randn((M, K), torch.float32, device, g)
    for r in zero_rows:
        x[r] = 0
    w = randn((N, K), torch.float32, device, g, 0.05)
    x_q, xs = ref.quantize_per_token(x, qdtype)
    w_q, ws = ref.quantize_per_token(w, qdtype)
    return x_q, xs, w_q, ws


def _ref64(x_q, xs, w_q, ws, bias=None):
    return ref.w8a8_matmul(x_q, xs, w_q, ws, torch.float64, bias, compute_dtype=torch.float64)


def _mm_tol(ref64: torch.Tensor, out_dtype) -> Tolerance:
    # Exact int32 / fp32 accumulation, scales applied in fp32, one rounding to out_dtype.
    return Tolerance(atol=1e-5 * float(ref64.abs().max()) + 1e-6,
                     rtol={torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[out_dtype])


# --- quantize_per_token (CPU) -------------------------------------------------------------


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_reference_quantization_formula(qdtype, gen):
    """Independent element-by-element check of the documented rule in float64."""
    x = randn((5, 37), torch.float32, "cpu", gen)
    x[2] = 0
    q, s = ref.quantize_per_token(x, qdtype)
    for i in range(5):
        amax = float(x[i].abs().max())
        assert s[i].item() == pytest.approx(max(amax / QMAX[qdtype], ref.SCALE_MIN), rel=1e-6)
        for j in range(37):
            v = x[i, j].item() / s[i].item()
            if qdtype == torch.int8:
                assert abs(q[i, j].item() - v) <= 0.5 + 1e-6
            else:  # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 (normals)
                assert abs(float(q[i, j].float()) - v) <= abs(v) * 2**-4 + 2**-9
    assert bool((q[2].float() == 0).all()) and s[2].item() == pytest.approx(ref.SCALE_MIN)
    assert float(q.float().abs().max()) <= QMAX[qdtype]


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_public_cpu(dtype, qdtype, gen):
    x = randn((2, 3, 40), dtype, "cpu", gen, 3.0)
    x[1, 2] = 0
    q, s = quantize_per_token(x, qdtype)
    assert q.shape == (2, 3, 40) and q.dtype == qdtype and s.shape == (2, 3) and s.dtype == torch.float32
    assert torch.isfinite(s).all() and torch.isfinite(q.float()).all()
    deq = ref.dequantize_per_token(q, s, torch.float64)
    sc = s.double()[..., None]
    bound = sc * 0.5 if qdtype == torch.int8 else x.double().abs() * 2**-4 + sc * 2**-9
    # + qmax fp32 ulps of x / scale (the quotient is rounded to fp32 before rounding to the grid)
    assert bool(((deq - x.double()).abs() <= bound + sc * QMAX[qdtype] * 2**-23).all())
    # amax element maps to +-qmax exactly
    assert bool((q.float().abs().amax(-1)[s > ref.SCALE_MIN] == QMAX[qdtype]).all())


@pytest.mark.parametrize("qdtype", QDTYPES)
def test_reference_scale_is_the_ieee_quotient(qdtype, gen):
    """scale = fl32(amax / qmax), correctly rounded (the kernels divide). float64 division
    of two fp32 values rounded once to fp32 is the correctly rounded fp32 quotient."""
    x = randn((4096, 3), torch.float32, "cpu", gen, 5.0)
    _, s = ref.quantize_per_token(x, qdtype)
    exact = (x.abs().amax(-1).double() / QMAX[qdtype]).float()
    assert torch.equal(s, exact)
    # The reciprocal product (what CUDA computes for `tensor / python_float`) differs:
    recip = x.abs().amax(-1) * (torch.tensor(1.0) / QMAX[qdtype])
    assert not torch.equal(recip, exact)


def test_quantize_weight_per_channel(gen):
    w = randn((6, 32), torch.float32, "cpu", gen)
    q, s = quantize_weight_per_channel(w)
    q2, s2 = ref.quantize_per_token(w, torch.int8)
    assert torch.equal(q, q2) and torch.equal(s, s2)


# --- w8a8_matmul (CPU) --------------------------------------------------------------------


def test_int8_exact_integer_product(gen):
    """Unit scales and small integers: the result is the exact integer matmul."""
    # |sum| <= 48 * 36 = 1728: every integer up to 2048 is exact in fp16.
    x_q = torch.randint(-6, 7, (7, 48), generator=gen, dtype=torch.int8)
    w_q = torch.randint(-6, 7, (5, 48), generator=gen, dtype=torch.int8)
    y = w8a8_matmul(x_q, torch.ones(7), w_q, torch.ones(5), torch.float16)
    exact = (x_q.long() @ w_q.long().t()).double()
    assert torch.equal(y.double(), exact)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mkn", [(1, 16, 1), (3, 48, 17), (17, 128, 33)])
def test_matmul_public_cpu(mkn, out_dtype, qdtype, bias, gen):
    M, K, N = mkn
    x_q, xs, w_q, ws = _quantized(gen, M, K, N, qdtype)
    b = randn((N,), torch.float32, "cpu", gen) if bias else None
    y = w8a8_matmul(x_q, xs, w_q, ws, out_dtype, b)
    assert y.shape == (M, N) and y.dtype == out_dtype and y.is_contiguous()
    r = _ref64(x_q, xs, w_q, ws, b)
    assert_close(y, r, _mm_tol(r, out_dtype))


def test_matmul_leading_dims_and_quantized_linear_close_to_float(gen):
    """The W8A8 pipeline approximates the float Linear (quantization error only)."""
    x = randn((2, 5, 64), torch.float32, "cpu", gen)
    w = randn((24, 64), torch.float32, "cpu", gen, 0.1)
    for qdtype in QDTYPES:
        x_q, xs = quantize_per_token(x, qdtype)
        w_q, ws = quantize_weight_per_channel(w, qdtype)
        y = w8a8_matmul(x_q, xs, w_q, ws, torch.float16)
        assert y.shape == (2, 5, 24)
        exact = x.double() @ w.double().t()
        rel = float((y.double() - exact).norm() / exact.norm())
        assert rel < (0.02 if qdtype == torch.int8 else 0.08), rel


def test_empty_k(gen):
    """K = 0 (allowed: 0 % 16 == 0): zero codes with scale 1e-10, and y = bias."""
    q, s = quantize_per_token(torch.zeros(2, 3, 0), torch.int8)
    assert q.shape == (2, 3, 0) and torch.equal(s, torch.full((2, 3), ref.SCALE_MIN))
    b = randn((5,), torch.float32, "cpu", gen)
    y = w8a8_matmul(torch.zeros(2, 3, 0, dtype=torch.int8), torch.ones(2, 3), torch.zeros(5, 0, dtype=torch.int8),
                    torch.ones(5), torch.float16, b)
    assert y.shape == (2, 3, 5) and torch.equal(y, b.half().expand(2, 3, 5))


def _good(g):
    x_q, xs, w_q, ws = _quantized(g, 4, 32, 8, torch.int8)
    return [x_q, xs, w_q, ws, torch.bfloat16, torch.zeros(8)]


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a: [a[0][:, :24], a[1], a[2][:, :24], *a[3:]], ValueError, r"multiple of 16 .* got K = 24"),
        (lambda a: [a[0].float(), *a[1:]], TypeError, r"int8 or float8_e4m3fn for `x_q`, got float32"),
        (lambda a: [a[0], a[1], a[2].to(FP8), *a[3:]], TypeError, r"int8 for `w_q`, got float8_e4m3fn"),
        (lambda a: [a[0], a[1].half(), *a[2:]], TypeError, r"float32 for `x_scale`, got float16"),
        (lambda a: [a[0], a[1][:3], *a[2:]], ValueError, r"shape \[4\] for `x_scale`"),
        (lambda a: [*a[:3], a[3][:7], *a[4:]], ValueError, r"shape \[8\] for `w_scale`"),
        (lambda a: [a[0], a[1], a[2][:, :16], *a[3:]], ValueError, r"shape \[8, 32\] for `w_q`"),
        (lambda a: [*a[:4], torch.float32, a[5]], TypeError, r"`out_dtype` torch.float16 or torch.bfloat16"),
        (lambda a: [*a[:5], torch.zeros(7)], ValueError, r"shape \[8\] for `bias`"),
        (lambda a: [a[0], a[1], a[2].to("meta"), *a[3:]], ValueError, r"`w_q` on the device of `x_q`"),
        (lambda a: [a[0].numpy(), *a[1:]], TypeError, r"torch.Tensor for `x_q`"),
    ],
)
def test_matmul_bad_input(mutate, exc, pattern, gen):
    with pytest.raises(exc, match=pattern):
        w8a8_matmul(*mutate(_good(gen)))


@pytest.mark.parametrize(
    "args,exc,pattern",
    [
        ((torch.zeros(2, 4, dtype=torch.int32), torch.int8), TypeError, r"`x`, got int32"),
        ((torch.zeros(2, 4), torch.float16), TypeError, r"`dtype` torch.int8 or torch.float8_e4m3fn"),
        ((torch.tensor(1.0), torch.int8), ValueError, r"at least 1 dim"),
    ],
)
def test_quantize_bad_input(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        quantize_per_token(*args)


@pytest.mark.skipif(extension() is None, reason="inferops._C not importable")
def test_binding_rejects_bad_k_before_launch(gen):
    x_q, xs, w_q, ws = _quantized(gen, 4, 32, 8, torch.int8)
    out = torch.empty(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 16, got K = 24"):
        extension().w8a8_matmul(to_dlpack(x_q[:, :24].contiguous()), to_dlpack(xs),
                                to_dlpack(w_q[:, :24].contiguous()), to_dlpack(ws), None, to_dlpack(out), 0)
    with pytest.raises(TypeError, match="int8 for `w_q`, got float8_e4m3fn"):
        extension().w8a8_matmul(to_dlpack(x_q), to_dlpack(xs), to_dlpack(w_q.to(FP8)), to_dlpack(ws), None,
                                to_dlpack(out), 0)


def test_opcheck_cpu(gen):
    # int8 operands: opcheck's schema test does arithmetic that torch lacks for fp8 on the CPU.
    x_q, xs, w_q, ws = _quantized(gen, 3, 32, 5, torch.int8)
    torch.library.opcheck(torch.ops.inferops.w8a8_matmul.default, (x_q, xs, w_q, ws, torch.randn(5), "bfloat16", "mma"))
    torch.library.opcheck(torch.ops.inferops.quantize_per_token.default, (torch.randn(3, 40), "int8"))


def test_compile_fullgraph(gen):
    x = randn((6, 32), torch.bfloat16, "cpu", gen)
    w_q, ws = quantize_weight_per_channel(randn((8, 32), torch.float32, "cpu", gen))

    def f(x):
        x_q, xs = quantize_per_token(x, torch.int8)
        return w8a8_matmul(x_q, xs, w_q, ws, torch.bfloat16)

    got = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert torch.equal(got, f(x))


# --- the kernels (on a GPU, or on the CPU SIMT executor: kernel_device) ----------------------

GPU_SHAPES = [  # (M, K, N): issue sizes, hostile M, odd multiples of the 128 x 128 x 64 tile, tails
    (1, 4096, 4096), (3, 4096, 11008), (16, 11008, 4096), (17, 4096, 14336), (64, 14336, 4096),
    (4096, 4096, 4096), (4096, 128, 128), (200, 192, 384), (129, 208, 100), (1, 16, 1),
]
# The executor (simulated threads) runs the small ones of those plus shapes that keep every
# hostile case: M = 1, partial M / N tiles, odd N, a K tail of 16 / 48 bytes in the last
# k tile, more k tiles than pipeline stages (K = 1040: 17 tiles, the 4-stage ring wraps
# four times), several block rows and columns.
SIM_SHAPES = [(1, 16, 1), (129, 208, 100), (200, 192, 384), (4096, 128, 128), (1, 1040, 72), (3, 560, 131),
              (257, 336, 260)]
_SIM_SHAPES = set(SIM_SHAPES)


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
@pytest.mark.parametrize("mkn", sorted(set(GPU_SHAPES) | _SIM_SHAPES), ids=lambda s: "x".join(map(str, s)))
def test_cuda_matmul_matches_float64(mkn, qdtype, gen, kernel_device):
    M, K, N = mkn
    if is_simulated(kernel_device) and mkn not in _SIM_SHAPES:
        pytest.skip("a GPU-sized shape: the executor runs SIM_SHAPES")
    x_q, xs, w_q, ws = _quantized(gen, M, K, N, qdtype, kernel_device, zero_rows=(0,) if M > 2 else ())
    for out_dtype, bias in ((torch.bfloat16, None), (torch.float16, randn((N,), torch.float32, kernel_device, gen))):
        y = w8a8_matmul(x_q, xs, w_q, ws, out_dtype, bias)
        assert inferops._core.ops.kernel_backend("w8a8_matmul", y.device) == kernel_backend_for(y.device)
        r = _ref64(x_q, xs, w_q, ws, bias)
        assert_close(y, r, _mm_tol(r, out_dtype))
        mean_rel = float((y.double() - r).abs().mean() / r.abs().mean())
        assert mean_rel < 1e-3 if out_dtype == torch.float16 else mean_rel < 5e-3, mean_rel


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
def test_cuda_matmul_writes_every_output(qdtype, gen, kernel_device):
    M, K, N = 131, 320, 259  # partial tiles in M and N, odd N (scalar tail stores)
    x_q, xs, w_q, ws = _quantized(gen, M, K, N, qdtype, kernel_device)
    out = poison_(torch.empty(M, N, dtype=torch.bfloat16, device=kernel_device))
    kernel_module(kernel_device).w8a8_matmul(to_dlpack(x_q), to_dlpack(xs), to_dlpack(w_q), to_dlpack(ws), None,
                                             to_dlpack(out), stream_handle(kernel_device))
    synchronize(kernel_device)
    r = _ref64(x_q, xs, w_q, ws)
    assert_close(out, r, _mm_tol(r, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
def test_cuda_matmul_strided_and_misaligned_inputs(qdtype, gen, kernel_device):
    """Row strides larger than K (column slices of wider buffers, stride a multiple of 16)
    go to the kernel as they are (ldx / ldw); views whose base is not 16-byte aligned are
    rejected by the binding and copied by the public op."""
    M, K, N = 67, 208, 90
    x_q, xs, w_q, ws = _quantized(gen, M, K + 48, N, qdtype, kernel_device)
    xv, wv = x_q[:, 16:16 + K], w_q[:, :K]  # strides K + 48 = 256 bytes, base +16 / +0 bytes
    assert not xv.is_contiguous() and xv.stride(0) == K + 48
    out = poison_(torch.empty(M, N, dtype=torch.float16, device=kernel_device))
    kernel_module(kernel_device).w8a8_matmul(to_dlpack(xv), to_dlpack(xs), to_dlpack(wv), to_dlpack(ws), None,
                                             to_dlpack(out), stream_handle(kernel_device))
    synchronize(kernel_device)
    r = _ref64(xv, xs, wv, ws)
    assert_close(out, r, _mm_tol(r, torch.float16))
    xm = x_q[:, 1:1 + K]  # base 1 byte past alignment
    with pytest.raises(ValueError, match="16-byte aligned base"):
        kernel_module(kernel_device).w8a8_matmul(to_dlpack(xm), to_dlpack(xs), to_dlpack(wv), to_dlpack(ws),
                                                 None, to_dlpack(out), stream_handle(kernel_device))
    buf = torch.empty(M * K + 3, dtype=qdtype, device=kernel_device)
    xo = buf[3:].view(M, K)  # contiguous, 3 bytes off
    xo.copy_(xv)
    y = w8a8_matmul(xo, xs, wv, ws, torch.bfloat16)
    assert_close(y, r, _mm_tol(r, torch.bfloat16))


@pytest.mark.gpu
def test_cuda_matmul_out_at_odd_element_offset(gen, kernel_device):
    """A contiguous `out` view 2 bytes past an aligned base with even N: the kernel must
    fall back to scalar stores (paired 4-byte stores would fault as misaligned)."""
    M, K, N = 5, 64, 40
    x_q, xs, w_q, ws = _quantized(gen, M, K, N, torch.int8, kernel_device)
    buf = torch.zeros(M * N + 1, dtype=torch.bfloat16, device=kernel_device)
    out = buf[1:].view(M, N)
    kernel_module(kernel_device).w8a8_matmul(to_dlpack(x_q), to_dlpack(xs), to_dlpack(w_q), to_dlpack(ws), None,
                                             to_dlpack(out), stream_handle(kernel_device))
    synchronize(kernel_device)
    r = _ref64(x_q, xs, w_q, ws)
    assert_close(out, r, _mm_tol(r, torch.bfloat16))
    assert buf[0].item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mk", [(1, 4096), (37, 11008), (300, 14336), (5, 100), (3, 7)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_cuda_quantize_bit_exact(mk, dtype, qdtype, gen, kernel_device):
    M, K = mk
    if is_simulated(kernel_device):
        M = min(M, 9)  # one block per row: a few rows of each width cover every path
    x = randn((M, K), dtype, kernel_device, gen, 4.0)
    x[0] = 0  # zero row: finite scale, zero output
    q_ref, s_ref = ref.quantize_per_token(x, qdtype)
    q, s = quantize_per_token(x, qdtype)
    assert inferops._core.ops.kernel_backend("quantize_per_token", q.device) == kernel_backend_for(q.device)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert s[0].item() == pytest.approx(ref.SCALE_MIN)


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
def test_cuda_reference_equals_cpu_reference(qdtype, gen, cuda_device):
    """The reference itself must not depend on the device (CUDA turns `t / python_float`
    into a reciprocal multiply), or the bit-exact kernel tests compare against the wrong value."""
    x = randn((512, 64), torch.float32, cuda_device, gen, 4.0)
    q_gpu, s_gpu = ref.quantize_per_token(x, qdtype)
    q_cpu, s_cpu = ref.quantize_per_token(x.cpu(), qdtype)
    assert torch.equal(s_gpu.cpu(), s_cpu)
    assert torch.equal(q_gpu.cpu().view(torch.uint8), q_cpu.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
def test_cuda_quantize_nan_inf_rows_like_reference(qdtype, gen, kernel_device):
    """A NaN in a row gives a NaN scale (torch.amax / clamp propagate NaN; fmaxf would drop
    it and quantize the NaN to -qmax); an inf gives scale inf. Other rows stay bit-exact."""
    x = randn((6, 520), torch.float32, kernel_device, gen, 4.0)
    x[1, 7] = float("nan")
    x[3, 300] = float("inf")
    x[4, 11] = float("-inf")
    q_ref, s_ref = ref.quantize_per_token(x, qdtype)
    q, s = quantize_per_token(x, qdtype)
    assert torch.isnan(s[1]) and torch.isnan(s_ref[1])
    assert torch.isinf(s[3]) and torch.equal(s[3], s_ref[3])
    assert torch.isinf(s[4]) and s[4] > 0 and torch.equal(s[4], s_ref[4])
    good = [0, 2, 5]
    assert torch.equal(s[good], s_ref[good])
    assert torch.equal(q[good].view(torch.uint8), q_ref[good].view(torch.uint8))
    if qdtype == FP8:
        assert torch.isnan(q[1].float()).all() and torch.isnan(q[3, 300].float()) and torch.isnan(q[4, 11].float())
        others = torch.ones(520, dtype=torch.bool, device=kernel_device)
        others[300] = False
        assert bool((q[3].float()[others] == 0).all())


@pytest.mark.gpu
def test_cuda_quantize_writes_every_output(gen, kernel_device):
    x = randn((9, 4104), torch.bfloat16, kernel_device, gen)
    q = poison_(torch.empty(9, 4104, dtype=torch.int8, device=kernel_device))
    s = poison_(torch.empty(9, device=kernel_device))
    kernel_module(kernel_device).quantize_per_token(to_dlpack(x), to_dlpack(q), to_dlpack(s),
                                                    stream_handle(kernel_device))
    synchronize(kernel_device)
    q_ref, s_ref = ref.quantize_per_token(x, torch.int8)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.gpu
def test_cuda_graph_capture(gen, cuda_device):
    x = randn((64, 512), torch.bfloat16, cuda_device, gen)
    w_q, ws = quantize_weight_per_channel(randn((256, 512), torch.float32, cuda_device, gen), FP8)

    def f():
        x_q, xs = quantize_per_token(x, FP8)
        return w8a8_matmul(x_q, xs, w_q, ws, torch.bfloat16)

    eager = f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.skipif(extension() is None, reason="inferops._C not importable")
@pytest.mark.parametrize("qdtype", QDTYPES, ids=["int8", "fp8"])
def test_binding_accepts_valid_arguments(qdtype, gen):
    """Valid arguments pass every C++ argument check and stop only at the device check."""
    x_q, xs, w_q, ws = _quantized(gen, 3, 48, 5, qdtype)
    out = torch.empty(3, 5, dtype=torch.float16)
    with pytest.raises(ValueError, match="expected a CUDA tensor for `x_q`"):
        extension().w8a8_matmul(to_dlpack(x_q), to_dlpack(xs), to_dlpack(w_q), to_dlpack(ws),
                                to_dlpack(torch.zeros(5)), to_dlpack(out), 0)
    with pytest.raises(ValueError, match="expected a CUDA tensor for `x_q`"):  # K = 0: row stride 1
        extension().w8a8_matmul(to_dlpack(x_q[:, :0].contiguous()), to_dlpack(xs), to_dlpack(w_q[:, :0].contiguous()),
                                to_dlpack(ws), None, to_dlpack(out), 0)
    x = torch.zeros(3, 40)
    with pytest.raises(ValueError, match="expected a CUDA tensor for `x`"):
        extension().quantize_per_token(to_dlpack(x), to_dlpack(torch.empty(3, 40, dtype=qdtype)),
                                       to_dlpack(torch.empty(3)), 0)


# --- CPU emulation of the GEMM's index math (csrc/quant/w8a8.cu) ------------------------------
# Mirrors load_tile (cp.async chunk -> swizzled smem), the ldmatrix_x4 lane addresses and the
# PTX m16n8k32 8-bit fragment layouts (A: reg r = rows gid + 8 (r & 1), k = 4 tig + 16 (r >> 1)
# + byte; B: reg r = k 4 tig + 16 r + byte, col gid; C: c_e at row gid + 8 (e >> 1), col
# 2 tig + (e & 1)) and checks the whole block tile against x_q @ w_q^T, plus bank conflicts.

_BM = _BN = 128
_BK = 64


def _swz(row, chunk):
    return row * _BK + ((chunk ^ ((row >> 1) & 3)) << 4)


def _load_tile_emu(src, r0, k0, rows_valid, K, writes=None):
    """load_tile for one operand: 256 threads x 2 chunks of 16 B, zero-filled out of range."""
    smem = bytearray(_BM * _BK)
    for i in range(2):
        for tid in range(256):
            idx = tid + i * 256
            row, chunk = idx >> 2, idx & 3
            k = k0 + chunk * 16
            ok = k < K and r0 + row < rows_valid
            data = bytes(src[r0 + row, k:k + 16].tolist()) if ok else bytes(16)
            dst = _swz(row, chunk)
            smem[dst:dst + 16] = data
            if writes is not None:
                writes.append((i, tid, dst))
    return smem


def _ldmatrix_x4_emu(smem, addrs, lds=None):
    """addrs[lane]: byte address of row (lane & 7) of matrix (lane >> 3). Returns regs[lane][j]
    as 4-byte lists: lane l gets row l >> 2 of matrix j, bytes 4 (l & 3) .. + 3."""
    if lds is not None:
        lds.append(addrs)
    return [[smem[addrs[8 * j + (l >> 2)] + 4 * (l & 3):][:4] for j in range(4)] for l in range(32)]


def _banks16(addr):
    return {((addr >> 2) + b) % 32 for b in range(4)}


def _emulate_gemm_block(xq, wq, m0, n0):
    M, K = xq.shape
    N = wq.shape[0]
    xs = xq.to(torch.int16) & 0xFF  # raw bytes
    ws = wq.to(torch.int16) & 0xFF
    acc = torch.zeros(_BM, _BN, dtype=torch.int64)
    writes, lds = [], []
    to_s8 = lambda b: b - 256 if b > 127 else b
    for kt in range((K + _BK - 1) // _BK):
        sa = _load_tile_emu(xs, m0, kt * _BK, M, K, writes)
        sb = _load_tile_emu(ws, n0, kt * _BK, N, K)
        for warp in range(8):
            wm, wn = (warp >> 2) * 64, (warp & 3) * 32
            for ks in range(_BK // 32):
                a = [_ldmatrix_x4_emu(sa, [_swz(wm + mi * 16 + (l & 15), ks * 2 + (l >> 4)) for l in range(32)], lds)
                     for mi in range(4)]
                b = [None] * 4
                for nj in range(2):
                    r = _ldmatrix_x4_emu(sb, [_swz(wn + nj * 16 + (l & 7) + ((l >> 4) << 3), ks * 2 + ((l >> 3) & 1))
                                              for l in range(32)], lds)
                    b[nj * 2] = [[r[l][0], r[l][1]] for l in range(32)]
                    b[nj * 2 + 1] = [[r[l][2], r[l][3]] for l in range(32)]
                for mi in range(4):
                    for ni in range(4):
                        A = [[0] * 32 for _ in range(16)]
                        B = [[0] * 8 for _ in range(32)]
                        for l in range(32):
                            g, t = l >> 2, l & 3
                            for rr in range(4):
                                for by in range(4):
                                    A[g + 8 * (rr & 1)][4 * t + 16 * (rr >> 1) + by] = to_s8(a[mi][l][rr][by])
                            for rr in range(2):
                                for by in range(4):
                                    B[4 * t + 16 * rr + by][g] = to_s8(b[ni][l][rr][by])
                        C = torch.tensor(A, dtype=torch.int64) @ torch.tensor(B, dtype=torch.int64)
                        for l in range(32):  # accumulate through the C fragment ownership
                            g, t = l >> 2, l & 3
                            for e in range(4):
                                row, col = g + 8 * (e >> 1), 2 * t + (e & 1)
                                acc[wm + mi * 16 + row, wn + ni * 8 + col] += C[row, col]
    return acc, writes, lds


def test_gemm_fragment_mapping_emulated(gen):
    M, K, N = 70, 80, 100  # one partial block tile, two k tiles (the second half empty: K tail)
    xq = torch.randint(-127, 128, (M, K), generator=gen, dtype=torch.int8)
    wq = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
    acc, writes, lds = _emulate_gemm_block(xq, wq, 0, 0)
    exact = xq.long() @ wq.long().t()
    assert torch.equal(acc[:M, :N], exact)
    assert bool((acc[M:] == 0).all()) and bool((acc[:, N:] == 0).all())  # zero-filled rows
    # ldmatrix: each 8-lane phase (one 8 x 16 B matrix) touches 32 distinct banks.
    for addrs in lds:
        for j in range(4):
            banks = [_banks16(addrs[8 * j + r]) for r in range(8)]
            assert len(set().union(*banks)) == 32, (j, addrs[8 * j:8 * j + 8])
    # cp.async writes: each quarter warp (8 x 16 B) covers 32 distinct banks.
    by_instr = {}
    for i, tid, dst in writes[:512]:
        by_instr.setdefault((i, tid >> 3), []).append(dst)
    for dsts in by_instr.values():
        assert len(set().union(*(_banks16(d) for d in dsts))) == 32
