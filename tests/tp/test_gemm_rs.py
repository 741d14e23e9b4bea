"""gemm_reduce_scatter on the CPU: the fallback path on 2 and 4 gloo ranks equals
matmul + reduce-scatter on one process, RowParallelLinear likewise, the virtual
rank mode's reference path, and every bad input raising before anything runs
(Python and C++ layers)."""

from __future__ import annotations

import inferops
import pytest
import torch
import torch.distributed as dist
from inferops import tp
from inferops.reference import tp as ref
from inferops.testing import assert_close

from tests.distributed import run_distributed
from tests.tp.common import assert_gemm_rs_close


def _single_process(a_ranks, b_ranks):
    """matmul on every rank, sum, split by rows: what reduce_scatter_tensor(a @ b) gives."""
    total = sum(a.double() @ b.double() for a, b in zip(a_ranks, b_ranks))
    return list(total.chunk(len(a_ranks), dim=0))


# --- gloo ranks: the fallback path -----------------------------------------------------------


def _fallback_rank(rank, world, a_ranks, b_ranks):
    a, b = a_ranks[rank], b_ranks[rank]
    out_fn = tp.gemm_reduce_scatter(a, b, dist.group.WORLD)
    eng = tp.GemmReduceScatter(dist.group.WORLD, max_m=a.shape[0], n=b.shape[1], dtype=a.dtype, device="cpu")
    out_buf = torch.empty(a.shape[0] // world, b.shape[1], dtype=a.dtype)
    got = eng(a, b, out=out_buf)
    assert got is out_buf
    return out_fn, got, eng.path, eng.fallback_reason


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fallback_on_gloo_equals_single_process(world, dtype, gen):
    M, K, N = 12 * world, 40, 24
    a_ranks = [torch.randn(M, K, generator=gen).to(dtype) for _ in range(world)]
    w_ranks = [torch.randn(N, K, generator=gen).to(dtype) for _ in range(world)]
    b_ranks = [w.t() for w in w_ranks]  # the weight^T layout RowParallelLinear passes
    res = run_distributed(_fallback_rank, world, args=(a_ranks, b_ranks))
    want = _single_process(a_ranks, b_ranks)
    for r, (out_fn, got, path, reason) in enumerate(res):
        assert path == "fallback" and "cpu" in reason
        assert out_fn.shape == (M // world, N) and out_fn.dtype == dtype
        assert torch.equal(out_fn, got)
        if dtype == torch.float32:
            assert_close(out_fn, want[r], torch.float32, name=f"rank {r}")
    if dtype != torch.float32:  # gloo sums bf16 in bf16: judged against the sequential error
        assert_gemm_rs_close(torch.stack([x[0] for x in res]), torch.stack(a_ranks), torch.stack(b_ranks))


def _row_parallel_rank(rank, world, x_full, w_full, bias):
    layer = tp.RowParallelLinear(x_full.shape[1], w_full.shape[0], dist.group.WORLD, dtype=torch.float32,
                                 device="cpu", max_tokens=x_full.shape[0])
    layer.load_full_weight(w_full, bias)
    k = x_full.shape[1] // world
    return layer(x_full[:, rank * k:(rank + 1) * k]), layer.path


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_row_parallel_linear_on_gloo_equals_linear(world, gen):
    T, IN, OUT = 8 * world, 16 * world, 20
    x, w, bias = torch.randn(T, IN, generator=gen), torch.randn(OUT, IN, generator=gen), torch.randn(OUT, generator=gen)
    res = run_distributed(_row_parallel_rank, world, args=(x, w, bias))
    want = torch.nn.functional.linear(x.double(), w.double(), bias.double()).chunk(world)
    for r, (y, path) in enumerate(res):
        assert path == "fallback"
        assert_close(y, want[r], torch.float32, name=f"rank {r}")


def _group_size_mismatch(rank, world):
    eng = tp.GemmReduceScatter(dist.group.WORLD, max_m=8, n=8, dtype=torch.float32, device="cpu")
    sub = dist.new_group([0])  # collective: every rank creates it
    if rank != 0:
        return []
    msgs = []
    for fn in (lambda: eng(torch.randn(8, 8), torch.randn(8, 8), group=sub),
               lambda: tp.RowParallelLinear(16, 8, sub, dtype=torch.float32, engine=eng),
               lambda: tp.RowParallelLinear(15, 8, dist.group.WORLD, dtype=torch.float32)):
        try:
            fn()
        except ValueError as e:
            msgs.append(str(e))
    return msgs


@pytest.mark.distributed
def test_group_size_must_match_buffers():
    msgs = run_distributed(_group_size_mismatch, 2)[0]
    assert len(msgs) == 3
    assert "group of size 2 (the buffers' world size), got a group of size 1" in msgs[0]
    assert "engine built for world size 1 (the group's), got one for 2" in msgs[1]
    assert "in_features (15) divisible by the world size (2)" in msgs[2]


# --- one process: reference path of the virtual mode, validation --------------------------------


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_virtual_reference_path_equals_single_process(world, gen):
    M, K, N = 3 * world, 16, 8
    a = torch.randn(world, M, K, generator=gen)
    b = torch.randn(world, K, N, generator=gen)
    eng = tp.GemmReduceScatter.virtual(world, M, N, torch.float32, "cpu")
    assert eng.path == "reference" and eng.world_size == world
    got = eng(a, b)
    want = torch.stack(_single_process(list(a), list(b)))
    assert_close(got, want, torch.float32)
    assert_close(tp.virtual_gemm_reduce_scatter(a, b), want, torch.float32)


def test_single_rank_without_group_is_matmul(gen):
    a, w = torch.randn(10, 16, generator=gen), torch.randn(24, 16, generator=gen)
    assert_close(tp.gemm_reduce_scatter(a, w.t()), (a.double() @ w.double().t()), torch.float32)
    layer = tp.RowParallelLinear(16, 24, None, dtype=torch.float32, device="cpu")
    assert layer.path == "reference" and layer.world_size == 1
    layer.load_full_weight(w, torch.ones(24))
    assert_close(layer(a), a.double() @ w.double().t() + 1, torch.float32)


@pytest.fixture
def spy(monkeypatch):
    """Counts reference runs (the op's CPU implementation): must stay 0 when validation fails."""
    calls = []
    real = ref.gemm_reduce_scatter_stacked
    monkeypatch.setattr(ref, "gemm_reduce_scatter_stacked", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("case, exc, match", [
    ("m_not_divisible", ValueError, "divisible by the world size 4"),
    ("k_mismatch", ValueError, "with K = 16"),
    ("world_vs_buffers", ValueError, "W = 4 .*got 2"),
    ("dtype_a_b", TypeError, "expected dtype bfloat16 for `b`, got float16"),
    ("dtype_vs_buffers", TypeError, "expected dtype bfloat16 for `a`, got float32"),
    ("m_too_large", ValueError, "M <= 64 and N <= 32"),
    ("n_too_large", ValueError, "M <= 64 and N <= 32"),
    ("out_shape", ValueError, "shape \\[4, 16, 32\\] for `out`"),
    ("rank3_expected", ValueError, "\\[W, M, K\\]"),
])
def test_bad_input_raises_before_any_kernel(case, exc, match, spy, gen):
    W, bf = 4, torch.bfloat16
    eng = tp.GemmReduceScatter.virtual(W, 64, 32, bf, "cpu")
    a = torch.randn(W, 64, 16, generator=gen).to(bf)
    b = torch.randn(W, 16, 32, generator=gen).to(bf)
    kw = {}
    if case == "m_not_divisible":
        a = a[:, :62]
    elif case == "k_mismatch":
        b = torch.randn(W, 24, 32).to(bf)
    elif case == "world_vs_buffers":
        a, b = a[:2], b[:2]
    elif case == "dtype_a_b":
        b = b.half()
    elif case == "dtype_vs_buffers":
        a, b = a.float(), b.float()
    elif case == "m_too_large":
        a = torch.randn(W, 128, 16).to(bf)
    elif case == "n_too_large":
        b = torch.randn(W, 16, 40).to(bf)
    elif case == "out_shape":
        kw["out"] = torch.empty(W, 16, 33, dtype=bf)
    elif case == "rank3_expected":
        a, b = a[0], b[0]
    with pytest.raises(exc, match=match):
        eng(a, b, **kw)
    assert spy == []
    eng(torch.randn(W, 64, 16).to(bf), torch.randn(W, 16, 32).to(bf))
    assert spy == [1]  # the spy does see a valid call


def test_constructor_arguments_checked():
    with pytest.raises(ValueError, match="world_size in 1..32"):
        tp.GemmReduceScatter.virtual(0, 8, 8, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="max_m >= 1"):
        tp.GemmReduceScatter.virtual(2, 0, 8, torch.bfloat16, "cpu")
    with pytest.raises(TypeError, match="dtype float16, bfloat16 or float32"):
        tp.GemmReduceScatter.virtual(2, 8, 8, torch.int32, "cpu")
    with pytest.raises(ValueError, match="timeout_s > 0"):
        tp.GemmReduceScatter.virtual(2, 8, 8, torch.bfloat16, "cpu", timeout_s=0)
    with pytest.raises(ValueError, match="engine built for world size 1"):
        tp.RowParallelLinear(16, 8, None, engine=tp.GemmReduceScatter.virtual(4, 8, 8, torch.bfloat16, "cpu"))


def test_virtual_op_traces_under_compile(gen):
    eng = tp.GemmReduceScatter.virtual(2, 16, 8, torch.float32, "cpu")
    a, b = torch.randn(2, 16, 8, generator=gen), torch.randn(2, 8, 8, generator=gen)
    got = torch.compile(lambda a, b: eng(a, b), fullgraph=True, backend="eager")(a, b)
    assert torch.equal(got, eng(a, b))


# --- the C++ layer validates the same way (CPU tensors reach every check but the last) ------------

_ext = inferops._core.extension.extension()
needs_ext = pytest.mark.skipif(_ext is None, reason="inferops._C not built")


def _cpp_call(a, b, out, *, world=2, rank=0, max_m=64, n=32, nbytes=None, peers=None, state=None):
    from inferops._core.ops import dlpack

    if nbytes is None:
        nbytes = tp.buffer_bytes(max_m, n, world, a.element_size())
    peers = torch.zeros(world, dtype=torch.int64) if peers is None else peers
    state = torch.zeros(8, dtype=torch.int32) if state is None else state
    _ext.gemm_reduce_scatter(dlpack(a), dlpack(b), dlpack(out), dlpack(peers), dlpack(state), rank, world,
                             max_m, n, nbytes, 1.0, 0, 0)


@needs_ext
def test_buffer_layout_mirrors_cpp():
    for args in [(8192, 8192, 8, 2), (100, 24, 3, 2), (7, 8, 1, 2), (4096, 28672, 4, 2), (100, 1001, 3, 2),
                 (37, 13, 2, 2)]:
        assert tp.buffer_bytes(*args) == _ext.gemm_rs_buffer_bytes(*args), args


def test_buffer_slots_are_16_byte_aligned():
    """The kernel pushes and reduces with 16-byte accesses at slot + row * N + col (N, col
    multiples of 8), so every [parity][source] slot must start 16-byte aligned, also for
    an engine whose `n` (the slot row capacity) is not a multiple of 8: max_m = 100, n = 1001,
    W = 3 gave slots of 34 * 1001 = 34034 elements (68068 bytes, 4 mod 16)."""
    for max_m, n, world in [(100, 1001, 3), (37, 13, 2), (9, 9, 8), (8192, 8192, 8)]:
        tiles = -(-max_m // 128) * -(-n // 128)
        data = tp.buffer_bytes(max_m, n, world, 2) - 2 * world * tiles * 4 - 2 * tiles * 4  # 128-rounded
        slot_bytes = -(-(-(-max_m // world) * n * 2) // 16) * 16  # m_local_max * n elements, 16-byte rounded
        assert data == -(-(2 * world * slot_bytes) // 128) * 128, (max_m, n, world)


@needs_ext
@pytest.mark.parametrize("case, exc, match", [
    ("m_not_divisible", ValueError, "divisible by the world size 2"),
    ("k_mismatch", ValueError, "with K = 16"),
    ("dtype", TypeError, "`b`"),
    ("too_large", ValueError, "exceeds the buffers"),
    ("small_buffer", ValueError, "smaller than the"),
    ("peers_vs_world", ValueError, "`peers`"),
    ("b_strides", ValueError, "one unit stride"),
    ("fp32", TypeError, "float16, bfloat16\\} for `a`, got float32"),
    ("cpu", ValueError, "CUDA"),
])
def test_cpp_validation(case, exc, match):
    bf = torch.bfloat16
    a, b, out = torch.randn(64, 16).to(bf), torch.randn(16, 32).to(bf), torch.empty(32, 32, dtype=bf)
    kw = {}
    if case == "m_not_divisible":
        a, out = torch.randn(63, 16).to(bf), torch.empty(31, 32, dtype=bf)
    elif case == "k_mismatch":
        b = torch.randn(24, 32).to(bf)
    elif case == "dtype":
        b = b.half()
    elif case == "too_large":
        kw["max_m"] = 32
    elif case == "small_buffer":
        kw["nbytes"] = 1024
    elif case == "peers_vs_world":
        kw["peers"] = torch.zeros(3, dtype=torch.int64)
    elif case == "b_strides":
        b = torch.randn(16, 64).to(bf)[:, ::2]  # no unit stride
    elif case == "fp32":
        a, b, out = a.float(), b.float(), out.float()
    with pytest.raises(exc, match=match):
        _cpp_call(a, b, out, **kw)
