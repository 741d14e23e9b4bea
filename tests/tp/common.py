"""Shared oracle check of the tp tests.

A rank's output is a sum over W ranks of partial products, each rounded to the
input dtype before the sum (by the fused kernel, and by matmul + reduce-scatter
alike), so errors against the exact product can exceed the output dtype's
elementwise tolerance where partials cancel. The check is FlashAttention-3's:
``max|out - exact| <= 2 * max|sequential same-precision - exact| + atol``, the
exact answer in float64 and the sequential one being matmul in the input dtype
(fp32 accumulation) followed by an fp32 sum in rank order.
"""

from __future__ import annotations

import torch
from inferops.reference import tp as ref
from inferops.testing import max_abs_error

ATOL_REL = 1e-3  # of max |exact|: headroom for fp32 accumulation-order differences


def assert_gemm_rs_close(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, name: str = "output") -> None:
    """``out`` ``[W, M / W, N]`` against stacked operands ``a`` ``[W, M, K]``, ``b`` ``[W, K, N]``."""
    a, b = a.detach().cpu(), b.detach().cpu()
    exact = ref.gemm_reduce_scatter_stacked(a.double(), b.double(), round_partials=False,
                                            compute_dtype=torch.float64)
    seq = ref.gemm_reduce_scatter_stacked(a, b)
    err_seq = max_abs_error(seq, exact)
    err = max_abs_error(out, exact)
    bound = 2 * err_seq + ATOL_REL * float(exact.abs().max()) + 1e-6
    assert tuple(out.shape) == tuple(exact.shape), (name, list(out.shape), list(exact.shape))
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (sequential error {err_seq:.3e})"
