"""causal_linear_attention and linear_attention_step against the quadratic float64 oracle."""

from __future__ import annotations

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import inferops
from inferops._core.extension import extension
from inferops.linear_attention import causal_linear_attention, linear_attention_step
from inferops.reference import linear_attention as ref
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

STATE_TOL = Tolerance(atol=2e-3, rtol=2e-3)


def _qkv(g, B, T, H, K, V, dtype=torch.bfloat16, device="cpu", scale=0.5):
    return (randn((B, T, H, K), dtype, device, g, scale), randn((B, T, H, K), dtype, device, g, scale),
            randn((B, T, H, V), dtype, device, g, scale))


def _fla(packed, normalize=True):
    """The ops' packed state ``[N, H, K, V + 1]`` (last column: key sum) -> fla's structure the
    public wrappers take and return: ``(kv [N, H, K, V], z [N, 1, H, K])``."""
    if not normalize:
        return packed
    return packed[..., :-1].contiguous(), packed[..., -1].unsqueeze(1).contiguous()


def _packed(state):
    """fla's state structure -> the packed form the oracles use."""
    if isinstance(state, torch.Tensor):
        return state
    kv, z = state
    return torch.cat([kv, z.squeeze(1).unsqueeze(-1)], dim=-1)


def _oracle(q, k, v, **kw):
    return ref.causal_linear_attention_quadratic(q, k, v, compute_dtype=torch.float64, **kw)


def _out_tol(dtype, T):
    # The state enters the MMA in q's dtype (as fla does): error grows with its size.
    base = {torch.bfloat16: Tolerance(2e-2, 2e-2), torch.float16: Tolerance(4e-3, 4e-3)}[dtype]
    return base if T <= 512 else Tolerance(base.atol * 4, base.rtol * 4)


@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.filterwarnings("ignore:causal_linear_attention. `q` .* has T = 1 < H")  # T = 1: fla's layout heuristic
def test_cpu_matches_quadratic_oracle(T, normalize, gen):
    q, k, v = _qkv(gen, 2, T, 3, 32, 16)
    s0 = torch.rand(2, 3, 32, 17 if normalize else 16, generator=gen)
    o, s = causal_linear_attention(q, k, v, initial_state=_fla(s0, normalize), output_final_state=True,
                                   normalize=normalize, use_relu=normalize)
    eo, es = _oracle(q, k, v, initial_state=s0, normalize=normalize, use_relu=normalize)
    assert_close(o, eo, _out_tol(torch.bfloat16, T))
    assert_close(_packed(s), es, STATE_TOL)


def test_cpu_long_sequence(gen):
    q, k, v = _qkv(gen, 1, 4096, 2, 64, 64, scale=0.3)
    o, s = causal_linear_attention(q, k, v, output_final_state=True, normalize=False)
    eo, es = _oracle(q, k, v)
    assert_close(o, eo, _out_tol(torch.bfloat16, 4096))
    assert_close(s, es, Tolerance(1e-2, 1e-3))


def test_state_carried_equals_concatenation(gen):
    q, k, v = _qkv(gen, 2, 150, 2, 32, 32)
    whole, s_whole = causal_linear_attention(q, k, v, output_final_state=True, normalize=True, use_relu=True)
    a, s_a = causal_linear_attention(q[:, :70], k[:, :70], v[:, :70], output_final_state=True,
                                     normalize=True, use_relu=True)
    b, s_b = causal_linear_attention(q[:, 70:], k[:, 70:], v[:, 70:], initial_state=s_a,
                                     output_final_state=True, normalize=True, use_relu=True)
    assert_close(torch.cat([a, b], 1), whole.double(), Tolerance(1e-2, 1e-2))
    assert_close(_packed(s_b), _packed(s_whole).double(), STATE_TOL)


def test_varlen_with_empty_sequence(gen):
    lens = [5, 0, 70, 1]
    T = sum(lens)
    q, k, v = _qkv(gen, 1, T, 2, 32, 8)
    cu = torch.tensor([0, 5, 5, 75, 76], dtype=torch.int32)
    s0 = torch.rand(4, 2, 32, 8, generator=gen)
    o, s = causal_linear_attention(q, k, v, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                                   normalize=False)
    for i, (t0, t1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        eo, es = _oracle(q[:, t0:t1], k[:, t0:t1], v[:, t0:t1], initial_state=s0[i:i + 1])
        assert_close(o[:, t0:t1], eo, _out_tol(torch.bfloat16, t1 - t0))
        assert_close(s[i:i + 1], es, STATE_TOL)
    assert torch.equal(s[1], s0[1])  # empty sequence: state unchanged


def test_decode_steps_equal_chunked(gen):
    B, T, H, K, V = 2, 20, 2, 32, 16
    q, k, v = _qkv(gen, B, T, H, K, V)
    full, _ = causal_linear_attention(q, k, v, normalize=True, use_relu=True)
    prefix = 12
    _, state = causal_linear_attention(q[:, :prefix], k[:, :prefix], v[:, :prefix], output_final_state=True,
                                       normalize=True, use_relu=True)
    for t in range(prefix, T):
        o, state2 = linear_attention_step(q[:, t], k[:, t], v[:, t], state, normalize=True, use_relu=True)
        assert state2 is state  # in place
        assert_close(o, full[:, t].double(), Tolerance(1e-2, 1e-2))


def test_step_matches_recurrence(gen):
    q, k, v = (randn((3, 2, 16), torch.float32, "cpu", gen) for _ in range(3))
    s = randn((3, 2, 16, 16), torch.float32, "cpu", gen)
    expect_s = s.double() + k.double()[..., None] * v.double()[..., None, :]
    expect_o = torch.einsum("bhk,bhkv->bhv", q.double() * 16**-0.5, expect_s)
    o, _ = linear_attention_step(q, k, v, s)
    assert_close(o, expect_o, torch.float32)
    assert_close(s, expect_s, torch.float32)


@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        (lambda q, k, v: causal_linear_attention(q.float(), k, v), TypeError, r"`q`, got float32"),
        (lambda q, k, v: causal_linear_attention(q, k.half(), v), TypeError, r"bfloat16 for `k`, got float16"),
        (lambda q, k, v: causal_linear_attention(q, k[:, :5], v), ValueError, r"shape .* for `k`"),
        (lambda q, k, v: causal_linear_attention(q, k, v, cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)),
         ValueError, r"batch 1 for `q` with cu_seqlens"),
        (lambda q, k, v: causal_linear_attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 3, 9], dtype=torch.int32)),
         ValueError, r"non-decreasing `cu_seqlens` from 0 to T = 10"),
        (lambda q, k, v: causal_linear_attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 3, 11])),
         ValueError, r"non-decreasing `cu_seqlens` from 0 to T = 10"),
        (lambda q, k, v: causal_linear_attention(q, k, v, initial_state=torch.zeros(2, 2, 32, 9)),
         ValueError, r"shape \[2, 2, 32, 8\] for `initial_state`"),
        (lambda q, k, v: causal_linear_attention(q, k, v, initial_state=torch.zeros(2, 2, 32, 9), normalize=True),
         ValueError, r"shape \[2, 2, 32, 8\] for `initial_state`"),
        (lambda q, k, v: linear_attention_step(q[:, 0], k[:, 0], v[:, 0], torch.zeros(2, 2, 32, 9)),
         ValueError, r"shape \[2, 2, 32, 8\] for `state`"),
        (lambda q, k, v: linear_attention_step(q[:, 0], k[:, 0], v[:, 0], torch.zeros(2, 2, 32, 8).double()),
         TypeError, r"float32 for `state`, got float64"),
    ],
)
def test_bad_input(call, exc, pattern, gen):
    q, k, v = _qkv(gen, 2, 10, 2, 32, 8)
    with pytest.raises(exc, match=pattern):
        call(q, k, v)


@pytest.mark.skipif(extension() is None, reason="inferops._C not importable")
def test_binding_rejects_more_sequences_than_grid_z_holds():
    # One grid.z slice per sequence (limit 65535), also without cu_seqlens (stride-0 inputs: no memory).
    B = 65536
    q = torch.empty(1, 1, 1, 32, dtype=torch.bfloat16).expand(B, 1, 1, 32)
    v = torch.empty(1, 1, 1, 1, dtype=torch.bfloat16).expand(B, 1, 1, 1)
    o = torch.empty(B, 1, 1, 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="expected at most 65535 sequences"):
        extension().causal_linear_attention(to_dlpack(q), to_dlpack(q), to_dlpack(v), to_dlpack(o), None, None,
                                            None, 1.0, False, False, 0)


@pytest.mark.skipif(extension() is None, reason="inferops._C not importable")
def test_binding_rejects_in_place_state():
    # Value-tile blocks read z from initial_state at their start while block 0 writes final_state's z.
    q = torch.zeros(1, 4, 1, 32, dtype=torch.bfloat16)
    v = torch.zeros(1, 4, 1, 8, dtype=torch.bfloat16)
    s = torch.zeros(1, 1, 32, 9)
    with pytest.raises(ValueError, match="not to alias `initial_state`"):
        extension().causal_linear_attention(to_dlpack(q), to_dlpack(q), to_dlpack(v), to_dlpack(torch.empty_like(v)),
                                            to_dlpack(s), to_dlpack(s), None, 1.0, True, False, 0)


def test_opcheck_cpu(gen):
    q, k, v = _qkv(gen, 1, 70, 2, 32, 8)
    torch.library.opcheck(torch.ops.inferops.causal_linear_attention.default,
                          (q, k, v, None, None, 0.2, False, False))
    s = torch.zeros(1, 2, 32, 8)
    torch.library.opcheck(torch.ops.inferops.linear_attention_step.default,
                          (q[:, 0], k[:, 0], v[:, 0], s, 0.2, False, False))


# --- the kernels (on a GPU, or on the CPU SIMT executor: kernel_device) ----------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 4096])
@pytest.mark.parametrize("K,V", [(32, 32), (64, 100), (128, 128)])
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_matches_oracle(T, K, V, normalize, dtype, gen, kernel_device):
    B, H = (1, 2) if T == 4096 else (2, 3)
    long = T == 4096
    if is_simulated(kernel_device):  # less simulated work (~45 ms a 64-token chunk of a block at K = 128)
        if long:
            T, H = 260, 1  # 4 full chunks and a partial one; the long-sequence tolerance kept
        else:
            B, H = (1, 2) if K == 128 else (2, 2)
    q, k, v = _qkv(gen, B, T, H, K, V, dtype, kernel_device, scale=0.25 if long else 0.5)
    s0 = torch.rand(B, H, K, V + normalize, generator=gen).to(kernel_device)
    o, s = causal_linear_attention(q, k, v, initial_state=_fla(s0, normalize), output_final_state=True,
                                   normalize=normalize, use_relu=normalize)
    s = _packed(s)
    assert inferops._core.ops.kernel_backend("causal_linear_attention", o.device) == kernel_backend_for(kernel_device)
    eo, es = _oracle(q, k, v, initial_state=s0, normalize=normalize, use_relu=normalize)
    assert_close(o, eo, _out_tol(dtype, 4096 if long else T))
    assert_close(s, es, Tolerance(1e-2, 1e-3) if long else STATE_TOL)


def _varlen_inputs(gen, device):
    lens = [5, 0, 200, 1, 64]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return lens, cu, _qkv(gen, 1, sum(lens), 4, 64, 64, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_writes_every_output_element(dtype, gen, kernel_device):
    """Raw binding, poisoned o and final_state (the key-sum column is written by the first
    value-tile block only), q / k / v strided views of one packed tensor, V = 100 (a
    partial second value tile), a partial last chunk, normalize with an initial state."""
    B, T, H, K, V = 2, 70, 2, 32, 100
    packed = randn((B, T, H, 2 * K + V + 8), dtype, kernel_device, gen, 0.5)
    q, k, v = packed[..., :K], packed[..., K + 4:2 * K + 4], packed[..., 2 * K + 8:]
    s0 = torch.rand(B, H, K, V + 1, generator=gen).to(kernel_device)
    o = poison_(torch.empty(B, T, H, V, dtype=dtype, device=kernel_device))
    final = poison_(torch.empty(B, H, K, V + 1, device=kernel_device))
    kernel_module(kernel_device).causal_linear_attention(
        to_dlpack(q), to_dlpack(k), to_dlpack(v), to_dlpack(o), to_dlpack(s0), to_dlpack(final), None, 0.3, True,
        True, stream_handle(kernel_device))
    synchronize(kernel_device)
    eo, es = _oracle(q, k, v, scale=0.3, initial_state=s0, normalize=True, use_relu=True)
    assert_close(o, eo, _out_tol(dtype, T))
    assert_close(final, es, STATE_TOL)


@pytest.mark.gpu
def test_cuda_varlen_and_steps(gen, kernel_device):
    """Packed sequences (an empty one, partial chunks), then decode steps that continue the
    chunked state exactly (raw binding: poisoned output, stream handle)."""
    lens, cu, (q, k, v) = _varlen_inputs(gen, kernel_device)
    o, s = causal_linear_attention(q, k, v, output_final_state=True, cu_seqlens=cu, normalize=True, use_relu=True)
    s = _packed(s)
    for i in range(len(lens)):
        t0, t1 = int(cu[i]), int(cu[i + 1])
        eo, es = _oracle(q[:, t0:t1], k[:, t0:t1], v[:, t0:t1], normalize=True, use_relu=True)
        assert_close(o[:, t0:t1], eo, _out_tol(torch.bfloat16, t1 - t0))
        assert_close(s[i:i + 1], es, STATE_TOL)
    qq, kk, vv = _qkv(gen, 5, 1, 4, 64, 64, device=kernel_device)
    qq, kk, vv = qq[:, 0], kk[:, 0], vv[:, 0]
    state = s.clone()
    expect_o, expect_s = ref.linear_attention_step(qq, kk, vv, state.double(), normalize=True, use_relu=True)
    out = poison_(torch.empty_like(vv))
    kernel_module(kernel_device).linear_attention_step(
        to_dlpack(qq), to_dlpack(kk), to_dlpack(vv), to_dlpack(state), to_dlpack(out), 64**-0.5, True, True,
        stream_handle(kernel_device))
    synchronize(kernel_device)
    assert_close(out, expect_o.double(), Tolerance(1e-2, 1e-2))
    assert_close(state, expect_s, Tolerance(1e-4, 1e-5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_step_matches_recurrence(dtype, normalize, gen, kernel_device):
    """linear_attention_step through the public op: strided q / k / v (last dim contiguous),
    V + 1 not a multiple of 32 (a partial warp), odd key dim, both feature maps."""
    B, H, K, V = 3, 2, 40, 70
    base = randn((B, H, 3 * K + V + 5), dtype, kernel_device, gen, 0.5)
    q, k, v = base[..., :K], base[..., K + 2:2 * K + 2], base[..., 2 * K + 5:2 * K + 5 + V]
    s = randn((B, H, K, V + normalize), torch.float32, kernel_device, gen)
    expect_o, expect_s = ref.linear_attention_step(q.double(), k.double(), v.double(), s.double(),
                                                   normalize=normalize, use_relu=normalize)
    st = _fla(s, normalize)
    o, s2 = linear_attention_step(q, k, v, st, normalize=normalize, use_relu=normalize)
    assert s2 is st
    s = _packed(st)
    assert inferops._core.ops.kernel_backend("linear_attention_step", o.device) == kernel_backend_for(kernel_device)
    assert_close(o, expect_o, dtype if dtype != torch.float32 else Tolerance(1e-4, 1e-4))
    assert_close(s, expect_s, Tolerance(1e-4, 1e-5))


@pytest.mark.gpu
def test_cuda_fp16_state_beyond_fp16_range(kernel_device):
    """Regression (#23): the fp32 state was rounded to fp16 for the Q S product, so once an
    entry passed 65504 it became inf and so did every later output. k = v = 30 and
    normalize: o = 30 for every token although |S| reaches 900 t (115200 after two chunks)."""
    B, T, H, K, V = 1, 192, 1, 64, 64
    g = torch.Generator().manual_seed(23)
    q = (0.5 + 0.5 * torch.rand(B, T, H, K, generator=g)).half().to(kernel_device)
    k = torch.full((B, T, H, K), 30.0, dtype=torch.float16, device=kernel_device)
    v = torch.full((B, T, H, V), 30.0, dtype=torch.float16, device=kernel_device)
    o, s = causal_linear_attention(q, k, v, scale=0.125, output_final_state=True, normalize=True)
    s = _packed(s)
    eo, es = _oracle(q, k, v, scale=0.125, normalize=True)
    assert torch.isfinite(o).all(), f"first non-finite token {int((~torch.isfinite(o)).nonzero()[0, 1])}"
    assert_close(o, torch.full_like(eo, 30.0, dtype=torch.float64), _out_tol(torch.float16, T))
    assert_close(s, es, STATE_TOL)


@pytest.mark.gpu
def test_cuda_fp16_continues_large_initial_state(gen, kernel_device):
    """Regression (#23): continuing from a finite fp32 state with entries around 7e4 (what a
    long prefill with positive-mean k v leaves) gave inf in fp16. Column groups of 16 alternate
    between large (scaled operand) and ordinary (unscaled) entries, V = 100 (two value tiles,
    a partial one), two full chunks and a partial one; float64 oracle, poisoned outputs."""
    B, T, H, K, V = 1, 130, 2, 64, 100
    q = (torch.rand(B, T, H, K, generator=gen) * 0.5).half().to(kernel_device)
    k = (torch.rand(B, T, H, K, generator=gen) * 0.5).half().to(kernel_device)
    v = randn((B, T, H, V), torch.float16, kernel_device, gen, 0.5)
    s0 = torch.randn(B, H, K, V + 1, generator=gen)
    big = (torch.arange(V) // 16) % 2 == 0
    s0[..., :V][..., big] = 7e4 * (0.5 + torch.rand(B, H, K, int(big.sum()), generator=gen))
    s0[..., V] = 1e5 * (0.5 + torch.rand(B, H, K, generator=gen))
    s0 = s0.to(kernel_device)
    o = poison_(torch.empty(B, T, H, V, dtype=torch.float16, device=kernel_device))
    final = poison_(torch.empty(B, H, K, V + 1, device=kernel_device))
    kernel_module(kernel_device).causal_linear_attention(
        to_dlpack(q), to_dlpack(k), to_dlpack(v), to_dlpack(o), to_dlpack(s0), to_dlpack(final), None, 0.125,
        True, False, stream_handle(kernel_device))
    synchronize(kernel_device)
    eo, es = _oracle(q, k, v, scale=0.125, initial_state=s0, normalize=True)
    assert torch.isfinite(o).all()
    assert_close(o, eo, _out_tol(torch.float16, T))
    assert_close(final, es, STATE_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_step_large_state(dtype, gen, kernel_device):
    """The decode step with state entries past fp16's range (#23 checked it: the step keeps
    S in fp32 on CUDA cores, only o is rounded); o finite and equal to the float64 step."""
    B, H, K, V = 2, 2, 64, 64
    q = (torch.rand(B, H, K, generator=gen) * 0.5).to(dtype).to(kernel_device)
    k = (torch.rand(B, H, K, generator=gen) * 0.5).to(dtype).to(kernel_device)
    v = randn((B, H, V), dtype, kernel_device, gen, 0.5)
    s = (7e4 * (0.5 + torch.rand(B, H, K, V + 1, generator=gen))).to(kernel_device)
    expect_o, expect_s = ref.linear_attention_step(q.double(), k.double(), v.double(), s.double(), normalize=True)
    st = _fla(s)
    o, _ = linear_attention_step(q, k, v, st, normalize=True)
    assert torch.isfinite(o).all()
    assert_close(o, expect_o, dtype)
    assert_close(_packed(st), expect_s, Tolerance(1e-4, 1e-5))


@pytest.mark.gpu
def test_cuda_rejects_unsupported_key_dim(gen, kernel_device):
    # the public op checks the kernel's key dims wherever the kernel runs (the simt route too)
    q, k, v = _qkv(gen, 1, 5, 1, 48, 8, device=kernel_device)
    with pytest.raises(ValueError, match="expected key dim 32, 64 or 128 for `q` on the GPU, got 48"):
        causal_linear_attention(q, k, v)


@pytest.mark.gpu
def test_cuda_steps_in_graph(gen, cuda_device):
    # CUDA graph capture: needs CUDA (the eager steps run on the executor above)
    lens, cu, (q, k, v) = _varlen_inputs(gen, cuda_device)
    _, s = causal_linear_attention(q, k, v, output_final_state=True, cu_seqlens=cu, normalize=True, use_relu=True)
    s = _packed(s)
    qq, kk, vv = _qkv(gen, 5, 1, 4, 64, 64, device=cuda_device)
    qq, kk, vv = qq[:, 0], kk[:, 0], vv[:, 0]
    state = s.clone()
    expect_o, expect_s = ref.linear_attention_step(qq, kk, vv, state.double(), normalize=True, use_relu=True)
    g = torch.cuda.CUDAGraph()
    warm = _fla(state.clone())
    linear_attention_step(qq, kk, vv, warm, normalize=True, use_relu=True)
    torch.cuda.synchronize()
    st = _fla(state)
    with torch.cuda.graph(g):
        out, _ = linear_attention_step(qq, kk, vv, st, normalize=True, use_relu=True)
    for dst, src in zip(st, _fla(s)):
        dst.copy_(src)
    g.replay()
    torch.cuda.synchronize()
    assert_close(out, expect_o.double(), Tolerance(1e-2, 1e-2))
    assert_close(_packed(st), expect_s, Tolerance(1e-4, 1e-5))
