"""The shared test helpers must be able to fail: a tolerance check that always passes is a defect."""

from __future__ import annotations

import pytest
import torch

from inferops.testing import (
    TOLERANCES,
    assert_close,
    fresh_generator,
    max_abs_error,
    poison_,
    poisoned_empty,
)


def test_assert_close_passes_within_tolerance():
    ref = torch.linspace(-3, 3, 101, dtype=torch.float64)
    assert_close(ref.to(torch.float16), ref, torch.float16)
    assert_close(ref.to(torch.bfloat16), ref, torch.bfloat16)


def test_assert_close_fails_outside_tolerance():
    ref = torch.ones(10, dtype=torch.float64)
    out = ref.clone().float()
    out[7] += 1e-3
    with pytest.raises(AssertionError, match=r"1 of 10 elements.*first at \(7,\)"):
        assert_close(out, ref, torch.float32)


def test_assert_close_rejects_poison_nan_and_inf_mismatch():
    ref = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(AssertionError):
        assert_close(poisoned_empty((4,), torch.float32, "cpu"), ref)
    out = torch.zeros(4)
    out[2] = float("inf")
    with pytest.raises(AssertionError):
        assert_close(out, ref)
    ref_inf = torch.tensor([float("-inf"), 1.0], dtype=torch.float64)
    assert_close(torch.tensor([float("-inf"), 1.0]), ref_inf)  # matching inf passes
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([float("inf"), 1.0]), ref_inf)


def test_assert_close_shape_mismatch():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(3), torch.zeros(4, dtype=torch.float64))


def test_max_abs_error():
    assert max_abs_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])) == 0.5
    assert max_abs_error(torch.tensor([float("nan")]), torch.tensor([0.0])) == float("inf")


def test_poison_values():
    assert torch.isnan(poison_(torch.zeros(3))).all()
    assert (poison_(torch.zeros(3, dtype=torch.int32)) == torch.iinfo(torch.int32).min).all()


def test_fresh_generator_differs_between_calls(monkeypatch):
    monkeypatch.delenv("INFEROPS_TEST_SEED", raising=False)
    (_, s1), (_, s2) = fresh_generator(), fresh_generator()
    assert s1 != s2
    monkeypatch.setenv("INFEROPS_TEST_SEED", "1234")
    g, s = fresh_generator()
    assert s == 1234


def test_tolerance_table_covers_kernel_dtypes():
    for d in (torch.float32, torch.float16, torch.bfloat16):
        assert TOLERANCES[d].atol > 0 and TOLERANCES[d].rtol > 0
