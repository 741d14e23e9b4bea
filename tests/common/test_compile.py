"""Every public op traces under torch.compile(fullgraph=True) (CPU, eager backend):
no graph breaks from validation or wrappers, so the ops drop into compiled models."""

from __future__ import annotations

import torch

from inferops.attention import append_kv, paged_decode
from inferops.linear_attention import causal_linear_attention, linear_attention_step, simplified_linear_attention
from inferops.testing import assert_close
from tests.attention.test_paged import make_case


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, backend="eager")


def test_paged_ops_compile(gen):
    q, kc, vc, bt, sl = make_case(gen, batch=2, hq=8, hkv=2, d=64, page_size=4, seq_lens=[5, 8])
    eager = paged_decode(q, kc, vc, bt, sl)
    out, lse = _compiled(lambda *a: paged_decode(*a, validate=False))(q, kc, vc, bt, sl)
    assert torch.equal(out, eager[0]) and torch.equal(lse, eager[1])
    qo = torch.tensor([0, 1, 3], dtype=torch.int32)
    q2 = torch.randn(3, 8, 64, generator=gen).bfloat16()
    eager = paged_decode(q2, kc, vc, bt, sl, qo_indptr=qo)
    got = _compiled(lambda *a: paged_decode(*a, qo_indptr=qo, validate=False))(q2, kc, vc, bt, sl)
    assert torch.equal(got[0], eager[0])
    k = torch.randn(2, 2, 64, generator=gen).bfloat16()
    kc2, vc2 = kc.clone(), vc.clone()
    _compiled(lambda *a: append_kv(*a, validate=False))(kc2, vc2, k, k, bt, torch.tensor([0, 1], dtype=torch.int32),
                                                        torch.tensor([5, 8 - 1], dtype=torch.int32))
    assert torch.equal(kc2[bt[0, 1], 1], k[0])


def test_linear_attention_ops_compile(gen):
    q, k, v = (torch.randn(1, 70, 2, 32, generator=gen).bfloat16() for _ in range(3))
    o, s = _compiled(lambda *a: causal_linear_attention(*a, output_final_state=True))(q, k, v)
    eo, es = causal_linear_attention(q, k, v, output_final_state=True)
    assert torch.equal(o, eo) and torch.equal(s, es)
    state = es.clone()
    o1, _ = _compiled(linear_attention_step)(q[:, 0], k[:, 0], v[:, 0], state)
    o2, _ = linear_attention_step(q[:, 0], k[:, 0], v[:, 0], es.clone())
    assert torch.equal(o1, o2)
    qs, ks, vs = (torch.randn(1, 2, 9, 32, generator=gen) for _ in range(3))
    w, b = torch.randn(32, 1, 5, 5, generator=gen), torch.randn(32, generator=gen)
    got = _compiled(lambda *a: simplified_linear_attention(*a, (3, 3)))(qs, ks, vs, w, b)
    assert_close(got, simplified_linear_attention(qs, ks, vs, w, b, (3, 3)).double(), torch.float32)


def test_prefix_shared_decode_compiles_after_one_eager_call(gen):
    """The layout caches host-built metadata per GQA ratio on first use; after that
    the call is a pure tensor program (documented in docs/attention.md)."""
    from inferops.attention import prefix_shared_decode
    from tests.attention.test_prefix_shared import build_batch

    plan, cache, lay, q = build_batch(gen, groups=2, members=3, prefix=40, suffix=5, page_size=16, hq=8, hkv=2, d=64)
    eager = prefix_shared_decode(q, cache.k, cache.v, lay)
    got = _compiled(lambda q, k, v: prefix_shared_decode(q, k, v, lay, validate=False))(q, cache.k, cache.v)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
