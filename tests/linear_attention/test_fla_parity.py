"""causal_linear_attention / linear_attention_step against fla's own pure-PyTorch reference
(``fla/ops/linear_attn/naive.py`` of fla-core): same call, same answer.

fla's package ``__init__`` imports triton (absent on CPU machines), so the naive module
is loaded by file path; it needs only torch and einops. fla's naive reference has no
``cu_seqlens``: varlen is checked against it sequence by sequence (what varlen means).
"""

from __future__ import annotations

import importlib.util
import itertools
import warnings

import pytest
import torch

from inferops.linear_attention import causal_linear_attention, linear_attention_step
from inferops.testing import Tolerance, assert_close


def _load_fla_naive():
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core is not installed (pip install fla-core)")
    path = f"{spec.submodule_search_locations[0]}/ops/linear_attn/naive.py"
    mod_spec = importlib.util.spec_from_file_location("fla_linear_attn_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fla_naive():
    return _load_fla_naive()


# bf16 outputs from fp32 math on both sides (fla's naive casts to fp32 too): output rounding
# plus summation-order differences; states are fp32.
OUT_TOL = Tolerance(atol=2e-2, rtol=2e-2)
STATE_TOL = Tolerance(atol=1e-4, rtol=1e-4)


def _inputs(g, B, T, H, K, V):
    # positive features (as after a feature map such as SLAB's ReLU or elu + 1): the normaliser
    # q . z stays away from zero, so normalised outputs are well conditioned on both sides
    q, k = (torch.rand(B, T, H, K, generator=g).bfloat16() for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g).bfloat16()
    return q, k, v


def _initial(g, N, H, K, V, normalize):
    kv = torch.randn(N, H, K, V, generator=g) * 0.5
    return (kv, torch.rand(N, 1, H, K, generator=g) * 4) if normalize else kv


def _fla_varlen(fla_naive, q, k, v, cu, initial_state, normalize, scale):
    """fla's naive reference run per sequence of ``cu`` (its states stacked as fla's varlen API
    returns them: ``[N, ...]``)."""
    outs, kvs, zs = [], [], []
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    for i, (t0, t1) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        init = None
        if initial_state is not None:
            init = (initial_state[0][i:i + 1], initial_state[1][i:i + 1]) if normalize else initial_state[i:i + 1]
        if t1 == t0:  # fla's naive loop cannot take T = 0: the state passes through
            kv0 = torch.zeros(1, H, K, V) if init is None else (init[0] if normalize else init)
            kvs.append(kv0)
            zs.append(torch.zeros(1, 1, H, K) if init is None else (init[1] if normalize else None))
            continue
        o, st = fla_naive.naive_recurrent_linear_attn(q[:, t0:t1], k[:, t0:t1], v[:, t0:t1], scale=scale,
                                                      initial_state=init, output_final_state=True,
                                                      normalize=normalize)
        outs.append(o)
        kvs.append(st[0] if normalize else st)
        zs.append(st[1] if normalize else None)
    o = torch.cat(outs, dim=1)
    kv = torch.cat(kvs)
    return o, ((kv, torch.cat(zs)) if normalize else kv)


def _check_state(got, want, normalize):
    if normalize:
        assert isinstance(got, tuple) and len(got) == 2
        assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
        assert_close(got[0], want[0].double(), STATE_TOL)
        assert_close(got[1], want[1].double(), STATE_TOL)
    else:
        assert isinstance(got, torch.Tensor) and got.shape == want.shape
        assert_close(got, want.double(), STATE_TOL)


def test_defaults_are_fla_defaults(fla_naive, gen):
    """The trial's call: no keyword arguments. fla normalises by default; so do we."""
    q, k, v = _inputs(gen, 2, 70, 3, 32, 16)
    o, state = causal_linear_attention(q, k, v)
    want, _ = fla_naive.naive_recurrent_linear_attn(q, k, v, normalize=True)
    assert state is None
    assert_close(o, want.double(), OUT_TOL)


# every argument combination, in both layouts: [B, T, H, K] (fla's) and a [B, H, T, K] tensor
# passed by mistake, which both sides read with dim 1 as time (we also warn)
@pytest.mark.parametrize("normalize,with_init,final,scale",
                         list(itertools.product([True, False], [False, True], [False, True], [None, 0.3])))
@pytest.mark.parametrize("layout", ["BTHK", "BHTK"])
def test_batched_matches_fla(layout, normalize, with_init, final, scale, fla_naive, gen):
    B, T, H, K, V = 2, 67, 3, 32, 16
    q, k, v = _inputs(gen, B, T, H, K, V)
    if layout == "BHTK":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        T, H = H, T  # what both implementations read
    init = _initial(gen, B, H, K, V, normalize) if with_init else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o, st = causal_linear_attention(q, k, v, scale=scale, initial_state=init, output_final_state=final,
                                        normalize=normalize)
    assert [str(w.message) for w in caught if "T = 3 < H = 67" in str(w.message)] != [] if layout == "BHTK" \
        else not caught
    want_o, want_st = fla_naive.naive_recurrent_linear_attn(q, k, v, scale=scale, initial_state=init,
                                                            output_final_state=final, normalize=normalize)
    assert o.dtype == q.dtype and o.shape == want_o.shape
    assert_close(o, want_o.double(), OUT_TOL)
    if final:
        _check_state(st, want_st, normalize)
    else:
        assert st is None and want_st is None


# every argument combination, varlen (int32 and int64 offsets, an empty sequence)
@pytest.mark.parametrize("normalize,with_init,scale", list(itertools.product([True, False], [False, True], [None, 0.7])))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_varlen_matches_fla(normalize, with_init, scale, index_dtype, fla_naive, gen):
    lens = [5, 0, 70, 1, 33]
    H, K, V = 2, 32, 8
    q, k, v = _inputs(gen, 1, sum(lens), H, K, V)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=index_dtype)
    init = _initial(gen, len(lens), H, K, V, normalize) if with_init else None
    o, st = causal_linear_attention(q, k, v, scale=scale, initial_state=init, output_final_state=True,
                                    normalize=normalize, cu_seqlens=cu)
    want_o, want_st = _fla_varlen(fla_naive, q, k, v, cu, init, normalize, scale)
    assert_close(o, want_o.double(), OUT_TOL)
    _check_state(st, want_st, normalize)


def test_head_first_layout_warns_and_runs_as_fla(fla_naive, gen):
    """The other common layout, [B, H, T, K], passed by mistake: fla reads dim 1 as time and
    so do we (the call gives fla's answer), and we warn that the layout is probably wrong."""
    B, H, T, K = 1, 8, 40, 32
    q, k, v = _inputs(gen, B, T, H, K, K)
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, T, K]
    with pytest.warns(UserWarning, match=r"T = 8 < H = 40: inputs must be \[B, T, H, K\]"):
        o, _ = causal_linear_attention(qh, kh, vh)
    want, _ = fla_naive.naive_recurrent_linear_attn(qh, kh, vh, normalize=True)
    assert_close(o, want.double(), OUT_TOL)
    # the intended layout gives the other (right) answer, and no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        right, _ = causal_linear_attention(q, k, v)
    assert_close(right, fla_naive.naive_recurrent_linear_attn(q, k, v, normalize=True)[0].double(), OUT_TOL)
    assert not torch.allclose(o.transpose(1, 2).float(), right.float(), atol=0.1)


def test_kv_only_initial_state_with_normalize(fla_naive, gen):
    """fla: a tensor initial_state with normalize=True is the kv state, the key sum starts at 0."""
    q, k, v = _inputs(gen, 2, 40, 2, 32, 8)
    kv = torch.randn(2, 2, 32, 8, generator=gen)
    o, (kv1, z1) = causal_linear_attention(q, k, v, initial_state=kv, output_final_state=True)
    want_o, (want_kv, want_z) = fla_naive.naive_recurrent_linear_attn(q, k, v, initial_state=kv, normalize=True,
                                                                      output_final_state=True)
    assert_close(o, want_o.double(), OUT_TOL)
    assert_close(kv1, want_kv.double(), STATE_TOL)
    assert_close(z1, want_z.double(), STATE_TOL)


@pytest.mark.parametrize("normalize", [True, False])
def test_prefill_then_steps_continue_fla_state(normalize, fla_naive, gen):
    """Prefill returns fla's state structure; linear_attention_step takes it (normalize
    inferred from it), updates it in place and continues fla's recurrence token for token."""
    B, T, H, K, V, prefix = 2, 24, 2, 32, 16, 17
    q, k, v = _inputs(gen, B, T, H, K, V)
    want_o, want_st = fla_naive.naive_recurrent_linear_attn(q, k, v, output_final_state=True, normalize=normalize)
    _, st = causal_linear_attention(q[:, :prefix], k[:, :prefix], v[:, :prefix], output_final_state=True,
                                    normalize=normalize)
    for t in range(prefix, T):
        o, st2 = linear_attention_step(q[:, t], k[:, t], v[:, t], st)
        assert st2 is st
        assert_close(o, want_o[:, t].double(), OUT_TOL)
    _check_state(st, want_st, normalize)


@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        (lambda q, k, v: causal_linear_attention(q, k, v, initial_state=(torch.zeros(2, 2, 32, 8),) * 2,
                                                 normalize=False), TypeError, r"tensor `initial_state` with normalize=False"),
        (lambda q, k, v: causal_linear_attention(q, k, v, initial_state=(torch.zeros(2, 2, 32, 8), torch.zeros(2, 2, 32))),
         ValueError, r"shape \[2, 1, 2, 32\] for `initial_state\[1\]`"),
        (lambda q, k, v: causal_linear_attention(q, k, v, initial_state=torch.zeros(2, 2, 32, 9)),
         ValueError, r"shape \[2, 2, 32, 8\] for `initial_state`"),
        (lambda q, k, v: causal_linear_attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 3, 10.0])),
         TypeError, r"int32 or int64 for `cu_seqlens`, got float32"),
        (lambda q, k, v: linear_attention_step(q[:, 0], k[:, 0], v[:, 0], torch.zeros(2, 2, 32, 8), normalize=True),
         TypeError, r"\(kv_state, z_state\) with normalize=True"),
        (lambda q, k, v: linear_attention_step(q[:, 0], k[:, 0], v[:, 0], (torch.zeros(2, 2, 32, 8), torch.zeros(2, 2, 32))),
         ValueError, r"shape \[2, 1, 2, 32\] for `state\[1\]`"),
    ],
)
def test_bad_state_structures(call, exc, pattern, gen):
    q, k, v = _inputs(gen, 2, 10, 2, 32, 8)
    with pytest.raises(exc, match=pattern):
        call(q, k, v)


@pytest.mark.gpu
def test_kernel_matches_fla(fla_naive, gen, kernel_device):
    """The kernels (GPU, or the SIMT executor) on fla's call: normalised varlen with int64
    offsets and a tuple initial state, then decode steps on the tuple state."""
    lens = [3, 0, 66]
    H, K, V = 2, 32, 16
    q, k, v = _inputs(gen, 1, sum(lens), H, K, V)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int64)
    init = _initial(gen, len(lens), H, K, V, True)
    dev = kernel_device
    o, st = causal_linear_attention(q.to(dev), k.to(dev), v.to(dev), initial_state=tuple(t.to(dev) for t in init),
                                    output_final_state=True, cu_seqlens=cu.to(dev))
    want_o, want_st = _fla_varlen(fla_naive, q, k, v, cu, init, True, None)
    assert_close(o.cpu(), want_o.double(), OUT_TOL)
    # the kernel's state is accumulated from bf16 tensor-core products
    assert_close(st[0].cpu(), want_st[0].double(), Tolerance(2e-2, 2e-2))
    assert_close(st[1].cpu(), want_st[1].double(), STATE_TOL)
    qs, ks, vs = (_inputs(gen, len(lens), 1, H, K, V)[i][:, 0].to(dev) for i in range(3))
    o1, _ = linear_attention_step(qs, ks, vs, st)
    step_o, _ = fla_naive.naive_recurrent_linear_attn(qs[:, None].cpu(), ks[:, None].cpu(), vs[:, None].cpu(),
                                                      initial_state=tuple(t.cpu() for t in want_st), normalize=True)
    assert_close(o1.cpu(), step_o[:, 0].double(), OUT_TOL)
