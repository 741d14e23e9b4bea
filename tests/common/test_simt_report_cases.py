"""The simt-report case table (inferops.simt_report_cases): every "ci" case runs on the
SIMT executor and matches the reference backend on the same inputs, and its ideal
traffic is positive and no more than the bytes of the op's inputs / outputs.

Tolerances are the ones each op's own tests use. Both sides round to the output dtype,
so where a test compares one output against a float64 oracle with a tolerance, two
outputs are compared here with twice that tolerance (as tests/attention/test_prefix_shared.py
does for two kernels).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inferops import testing
from inferops.testing import TOLERANCES, Tolerance, assert_close

pytestmark = pytest.mark.skipif(not testing.simt_available(),
                                reason="the SIMT executor (inferops._simt) is not available: no kernels to run")

from inferops.simt_report_cases import CASES, Case  # noqa: E402

LSE = Tolerance(atol=1e-4, rtol=1e-4)  # inferops.attention.paged.LSE_TOLERANCE


def _twice(t: Tolerance | torch.dtype) -> Tolerance:
    t = TOLERANCES[t] if isinstance(t, torch.dtype) else t
    return Tolerance(2 * t.atol, 2 * t.rtol)


BF16x2 = _twice(torch.bfloat16)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out if o is not None for t in _flat(o)]


def _close_all(tols):
    """Compare output i with tols[i] (a Tolerance, or "equal" for bit-exact outputs)."""
    def check(got, want, seed):
        assert len(got) == len(want) == len(tols)
        for i, (a, b, tol) in enumerate(zip(got, want, tols)):
            if tol == "equal":
                assert a.dtype == b.dtype and torch.equal(a, b), f"output {i} differs (seed {seed})"
            else:
                assert_close(a, b.double(), tol, name=f"output {i}", seed=seed)
    return check


def _mm_check(got, want, seed):
    # tests/quant/test_w8a8.py::_mm_tol: exact accumulation, scales in fp32, one rounding to bf16
    (a,), (b,) = got, want
    r = b.double()
    assert_close(a, r, _twice(Tolerance(atol=1e-5 * float(r.abs().max()) + 1e-6, rtol=1.6e-2)), seed=seed)


def _hadamard_check(got, want, seed):
    # tests/quant/test_hadamard.py: fp32 summation order differs, so scales agree to ~1e-5 and
    # codes differ by at most one step (only next to a rounding boundary: rarely)
    (q, s), (q_ref, s_ref) = got, want
    assert_close(s, s_ref.double(), Tolerance(atol=1e-12, rtol=1e-5), name="scale", seed=seed)
    diff = (q.double() - q_ref.double()).abs()
    assert float(diff.max()) <= 1, f"codes differ by more than one step (seed {seed})"
    assert float((diff != 0).double().mean()) < 1e-2, f"too many codes differ (seed {seed})"


CHECKS = {
    "merge_states": _close_all([BF16x2, LSE]),
    "append_kv": _close_all(["equal", "equal"]),  # a copy
    "paged_decode": _close_all([BF16x2, LSE]),
    "prefix_shared_decode": _close_all([BF16x2, LSE]),
    "simplified_linear_attention": _close_all([BF16x2]),
    # tests/linear_attention/test_causal.py: bf16 tensor-core operands, 2e-2 (x4 past T=512)
    "causal_linear_attention": _close_all([Tolerance(2e-2, 2e-2)]),
    "linear_attention_step": _close_all([BF16x2, Tolerance(1e-4, 1e-5)]),
    "routing_layout": _close_all(["equal"] * 8),
    "permute": _close_all(["equal"]),
    "unpermute": _close_all([BF16x2]),
    "w4a16_matmul": _close_all([BF16x2]),
    "int4_dequantize": _close_all([BF16x2]),
    "w8a8_matmul": _mm_check,
    "quantize_per_token": _close_all(["equal", "equal"]),  # bit-exact by contract
    "hadamard_quantize": _hadamard_check,
    "gemm_reduce_scatter": _close_all([BF16x2]),
}


def _tensors(x) -> list[torch.Tensor]:
    """Every tensor reachable from an inputs dict (dataclass fields included: layouts, Int4Weight)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [t for f in dataclasses.fields(x) for t in _tensors(getattr(x, f.name))]
    return []


def _nbytes(ts) -> int:
    seen, n = set(), 0
    for t in ts:
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:  # a tensor reachable twice counts once
            seen.add(key)
            n += t.numel() * t.element_size()
    return n


def test_table_covers_every_kernel_op():
    from inferops._core import ops

    kernels = {info.cuda_kernel for name, info in ops.REGISTRY.items()
               if info.cuda_kernel is not None and name not in ("merge_states_", "w8a8_linear")}
    for table in ("ci", "report"):
        assert {c.op for c in CASES[table]} == kernels == set(CHECKS), table
    for c in CASES["ci"] + CASES["report"]:
        assert c.label and c.headline and c.ideal_doc, c.op


@pytest.mark.parametrize("case", CASES["ci"], ids=lambda c: c.op)
def test_ci_case_matches_reference(case: Case):
    gen, seed = testing.fresh_generator()
    inputs = case.make(gen)
    with testing.backend("simt"):
        got = _flat(case.run(inputs))
    with testing.backend("reference"):
        want = _flat(case.run(inputs))
    CHECKS[case.op](got, want, seed)

    read, written = case.ideal(inputs)
    assert isinstance(read, int) and isinstance(written, int)
    # Sanity bound: the ideal never exceeds reading every input byte once / writing every
    # output byte once (outputs as `run` returns them: for in-place ops, the updated buffers).
    assert 0 < read <= _nbytes(_tensors(inputs)), (case.op, read)
    assert 0 < written <= _nbytes(want), (case.op, written)
