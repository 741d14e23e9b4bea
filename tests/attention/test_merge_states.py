"""merge_states: reference semantics, validation, and the CUDA kernel against float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.dlpack import to_dlpack

import inferops
from inferops.attention import merge_states, merge_states_
from inferops.reference import attention as ref
from inferops.testing import (
    assert_close,
    kernel_backend_for,
    kernel_module,
    poisoned_empty,
    randn,
    stream_handle,
    synchronize,
)

NEG_INF = float("-inf")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (num_tokens, num_heads, head_dim): hostile sizes on purpose.
SHAPES = [(1, 1, 1), (1, 1, 8), (19, 3, 64), (7, 5, 7), (33, 8, 128), (5, 4, 96), (3, 2, 512)]


def _shape_id(shape):
    return "x".join(map(str, shape))


def _inputs(shape, dtype, device, g, lse_scale=4.0):
    T, H, D = shape
    return (
        randn((T, H, D), dtype, device, g),
        randn((T, H), torch.float32, device, g, scale=lse_scale),
        randn((T, H, D), dtype, device, g),
        randn((T, H), torch.float32, device, g, scale=lse_scale),
    )


def _ref64(v_a, lse_a, v_b, lse_b):
    return ref.merge_states(v_a.double(), lse_a.double(), v_b.double(), lse_b.double(),
                            compute_dtype=torch.float64)


def _attention_with_lse(q, k, v):
    """Softmax attention of q [H, D] over k, v [N, H, D], natural-log LSE, float64."""
    s = torch.einsum("hd,nhd->hn", q, k) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hn,nhd->hd", p, v), lse


# --- semantics of the reference (CPU) ---------------------------------------------


def test_merge_equals_attention_over_union(gen):
    """Merging attention over two key sets equals attention over their union."""
    H, D, n_a, n_b = 4, 32, 37, 11
    q = randn((H, D), torch.float64, "cpu", gen)
    k = randn((n_a + n_b, H, D), torch.float64, "cpu", gen)
    v = randn((n_a + n_b, H, D), torch.float64, "cpu", gen)
    o_a, l_a = _attention_with_lse(q, k[:n_a], v[:n_a])
    o_b, l_b = _attention_with_lse(q, k[n_a:], v[n_a:])
    o, l = _attention_with_lse(q, k, v)
    got_v, got_l = ref.merge_states(o_a[None], l_a[None], o_b[None], l_b[None],
                                    compute_dtype=torch.float64)
    assert_close(got_v[0], o, torch.float64)
    assert_close(got_l[0], l, torch.float64)


def test_empty_partials_reference():
    v_a = torch.randn(3, 1, 4, dtype=torch.float64)
    v_b = torch.randn(3, 1, 4, dtype=torch.float64)
    lse_a = torch.tensor([[NEG_INF], [1.5], [NEG_INF]], dtype=torch.float64)
    lse_b = torch.tensor([[0.25], [NEG_INF], [NEG_INF]], dtype=torch.float64)
    v, lse = ref.merge_states(v_a, lse_a, v_b, lse_b, compute_dtype=torch.float64)
    assert torch.equal(v[0], v_b[0]) and lse[0, 0] == 0.25
    assert torch.equal(v[1], v_a[1]) and lse[1, 0] == 1.5
    assert torch.equal(v[2], torch.zeros_like(v[2])) and lse[2, 0] == NEG_INF
    assert not torch.isnan(v).any()


def test_nan_propagates_reference():
    v = torch.randn(1, 2, 4)
    lse_a = torch.tensor([[float("nan"), 0.0]])
    lse_b = torch.tensor([[NEG_INF, 0.0]])
    out, lse = ref.merge_states(v, lse_a, v, lse_b)
    assert torch.isnan(out[0, 0]).all() and torch.isnan(lse[0, 0])
    assert not torch.isnan(out[0, 1]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_public_op_cpu(shape, dtype, gen):
    v_a, lse_a, v_b, lse_b = _inputs(shape, dtype, "cpu", gen)
    v, lse = merge_states(v_a, lse_a, v_b, lse_b)
    rv, rl = _ref64(v_a, lse_a, v_b, lse_b)
    assert v.dtype == dtype and lse.dtype == torch.float32 and v.is_contiguous()
    assert_close(v, rv, dtype)
    assert_close(lse, rl, torch.float32)


def test_inplace_cpu_strided_lse(gen):
    T, H, D = 9, 4, 16
    v_a, _, v_b, lse_b = _inputs((T, H, D), torch.float16, "cpu", gen)
    lse_store = randn((H, T), torch.float32, "cpu", gen)  # lse_a as a transposed view
    lse_a = lse_store.t()
    rv, rl = _ref64(v_a, lse_a, v_b, lse_b)
    merge_states_(v_a, lse_a, v_b, lse_b)
    assert_close(v_a, rv, torch.float16)
    assert_close(lse_store.t(), rl, torch.float32)


def test_empty_batch_cpu():
    v = torch.empty(0, 4, 64, dtype=torch.bfloat16)
    lse = torch.empty(0, 4)
    out, out_lse = merge_states(v, lse, v, lse)
    assert out.shape == (0, 4, 64) and out_lse.shape == (0, 4)


# --- validation (Python layer; same errors on every device) -------------------------


def _ok():
    return (torch.randn(4, 2, 8, dtype=torch.float16), torch.randn(4, 2),
            torch.randn(4, 2, 8, dtype=torch.float16), torch.randn(4, 2))


@pytest.mark.parametrize(
    "mutate,exc,pattern",
    [
        (lambda a: (a[0].float(), *a[1:]), TypeError, r"expected dtype float32 for `v_b`, got float16"),
        (lambda a: (a[0].int(), *a[1:]), TypeError, r"`v_a`, got int32"),
        (lambda a: (a[0], a[1].half(), *a[2:]), TypeError, r"float32 for `lse_a`, got float16"),
        (lambda a: (*a[:3], a[3].double()), TypeError, r"float32 for `lse_b`, got float64"),
        (lambda a: (a[0], a[1], a[2][:3], a[3]), ValueError, r"shape \[4, 2, 8\] for `v_b`, got \[3, 2, 8\]"),
        (lambda a: (a[0], a[1][:, :1], *a[2:]), ValueError, r"shape \[4, 2\] for `lse_a`, got \[4, 1\]"),
        (lambda a: (a[0].reshape(8, 8), *a[1:]), ValueError, r"`v_a` of shape \[num_tokens, num_heads, head_dim\]"),
        (lambda a: (a[0], a[1], a[2], a[3].to("meta")), ValueError, r"`lse_b` on the device of `v_a` \(cpu\), got meta"),
        (lambda a: (a[0], a[1], torch.randn(4, 2, 16, dtype=torch.float16)[..., ::2], a[3]), ValueError, r"`v_b` contiguous in its last dimension"),
        (lambda a: (a[0].numpy(), *a[1:]), TypeError, r"torch.Tensor for `v_a`, got ndarray"),
    ],
)
def test_bad_input_raises(mutate, exc, pattern):
    args = mutate(_ok())
    with pytest.raises(exc, match=pattern):
        merge_states(*args)
    with pytest.raises(exc, match=pattern):
        merge_states_(*args)


# --- torch.library integration -------------------------------------------------------


def test_opcheck_cpu(gen):
    args = _inputs((5, 3, 16), torch.float16, "cpu", gen)
    torch.library.opcheck(torch.ops.inferops.merge_states.default, args)
    inplace_args = tuple(a.clone() for a in args)
    torch.library.opcheck(torch.ops.inferops.merge_states_.default, inplace_args)


def test_torch_compile_fullgraph_cpu(gen):
    args = _inputs((6, 2, 32), torch.bfloat16, "cpu", gen)

    @torch.compile(fullgraph=True, backend="eager")
    def f(v_a, lse_a, v_b, lse_b):
        v, lse = merge_states(v_a, lse_a, v_b, lse_b)
        return v * 2, lse

    v, lse = f(*args)
    rv, rl = _ref64(*args)
    assert_close(v, rv * 2, torch.bfloat16)
    assert_close(lse, rl, torch.float32)


# --- the kernel (on a GPU, or on the CPU SIMT executor: kernel_device) ------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(989, 32, 128), (4096, 8, 64)], ids=_shape_id)
def test_cuda_matches_float64(shape, dtype, gen, kernel_device):
    v_a, lse_a, v_b, lse_b = _inputs(shape, dtype, kernel_device, gen)
    # Some empty partials (one side, and both sides) in every run.
    lse_a[0, 0] = NEG_INF
    if shape[0] > 1:
        lse_b[1, 0] = NEG_INF
        lse_a[-1, -1] = NEG_INF
        lse_b[-1, -1] = NEG_INF
    v, lse = merge_states(v_a, lse_a, v_b, lse_b)
    rv, rl = _ref64(v_a, lse_a, v_b, lse_b)
    assert inferops._core.ops.kernel_backend("merge_states", v.device) == kernel_backend_for(v.device)
    assert_close(v, rv, dtype)
    assert_close(lse, rl, torch.float32)
    assert not torch.isnan(v).any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_writes_every_output_element(dtype, gen, kernel_device):
    """Raw binding with poisoned outputs, vector and scalar paths, strided outputs."""
    cuda_device = kernel_device
    ext = kernel_module(kernel_device)
    stream = stream_handle(kernel_device)
    for shape, offset in (((37, 3, 128), 0), ((37, 3, 128), 1), ((11, 5, 40), 0)):
        T, H, D = shape
        v_a, lse_a, v_b, lse_b = _inputs((T, H, D + offset), dtype, cuda_device, gen)
        v_a, v_b = v_a[..., offset:], v_b[..., offset:]  # offset 1: unaligned -> scalar path
        out_store = poisoned_empty((T, H + 2, D), dtype, cuda_device)
        v_out = out_store[:, 1:-1]  # strided output view
        lse_out_store = poisoned_empty((H, T), torch.float32, cuda_device)
        lse_out = lse_out_store.t()
        ext.merge_states(to_dlpack(v_a), to_dlpack(lse_a), to_dlpack(v_b), to_dlpack(lse_b),
                         to_dlpack(v_out), to_dlpack(lse_out), stream)
        synchronize(kernel_device)
        rv, rl = _ref64(v_a, lse_a, v_b, lse_b)
        assert_close(v_out, rv, dtype, name=f"v_out {shape} offset {offset}")
        assert_close(lse_out, rl, torch.float32, name="lse_out")
        # The padding heads around the view must still hold the poison.
        assert torch.isnan(out_store[:, 0]).all() and torch.isnan(out_store[:, -1]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_inplace_strided(dtype, gen, kernel_device):
    T, H, D = 301, 8, 128
    v_a, _, v_b, lse_b = _inputs((T, H, D), dtype, kernel_device, gen)
    lse_store = randn((H, T), torch.float32, kernel_device, gen, scale=4.0)
    lse_a = lse_store.t()
    rv, rl = _ref64(v_a, lse_a, v_b, lse_b)
    merge_states_(v_a, lse_a, v_b, lse_b)
    assert_close(v_a, rv, dtype)
    assert_close(lse_store.t(), rl, torch.float32)


@pytest.mark.gpu
def test_cuda_nan_propagates(kernel_device):
    v = torch.randn(2, 2, 64, device=kernel_device, dtype=torch.float16)
    lse_a = torch.tensor([[float("nan"), 0.0], [NEG_INF, NEG_INF]], device=kernel_device)
    lse_b = torch.tensor([[NEG_INF, 0.0], [NEG_INF, NEG_INF]], device=kernel_device)
    out, lse = merge_states(v, lse_a, v, lse_b)
    assert torch.isnan(out[0, 0]).all() and torch.isnan(lse[0, 0])
    assert not torch.isnan(out[0, 1]).any()
    assert (out[1] == 0).all() and (lse[1] == NEG_INF).all()


@pytest.mark.gpu
def test_cuda_nondefault_stream_and_graph(gen, cuda_device):
    """Runs on the caller's current stream and inside CUDA graph capture."""
    v_a, lse_a, v_b, lse_b = _inputs((64, 8, 128), torch.bfloat16, cuda_device, gen)
    rv, rl = _ref64(v_a, lse_a, v_b, lse_b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        v, lse = merge_states(v_a, lse_a, v_b, lse_b)
    torch.cuda.current_stream().wait_stream(s)
    assert_close(v, rv, torch.bfloat16)

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gv, gl = merge_states(v_a, lse_a, v_b, lse_b)
    gv.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert_close(gv, rv, torch.bfloat16)
    # New inputs in the same buffers: the replay must recompute.
    v_a.copy_(randn(v_a.shape, torch.bfloat16, cuda_device, gen))
    g.replay()
    torch.cuda.synchronize()
    assert_close(gv, _ref64(v_a, lse_a, v_b, lse_b)[0], torch.bfloat16)


@pytest.mark.gpu
def test_cuda_opcheck_and_compile(gen, kernel_device):
    args = _inputs((17, 4, 64), torch.float16, kernel_device, gen)
    torch.library.opcheck(torch.ops.inferops.merge_states.default, args)
    f = torch.compile(lambda *a: merge_states(*a)[0] + 1, fullgraph=True)
    assert_close(f(*args), _ref64(*args)[0] + 1, torch.float16)


@pytest.mark.gpu
def test_cuda_more_than_2_31_elements(gen, cuda_device):
    """64-bit offsets: 2^31 + 2^20 fp16 elements per v (4.3 GB each), checked on sampled rows."""
    H, D = 8, 128
    T = (2**31 + 2**20) // (H * D)
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * T * H * D * 2 + (1 << 30):
        pytest.skip("not enough GPU memory for a >2^31-element test")
    v_a = torch.empty(T, H, D, dtype=torch.float16, device=cuda_device).normal_()
    v_b = torch.empty_like(v_a).normal_()
    lse_a = torch.randn(T, H, device=cuda_device)
    lse_b = torch.randn(T, H, device=cuda_device)
    rows = torch.tensor([0, 1, T // 2, T - 2, T - 1], device=cuda_device)
    expect_v, expect_l = _ref64(v_a[rows], lse_a[rows], v_b[rows], lse_b[rows])
    merge_states_(v_a, lse_a, v_b, lse_b)
    assert_close(v_a[rows], expect_v, torch.float16)
    assert_close(lse_a[rows], expect_l, torch.float32)
