"""Offline folding of orthogonal rotations and channel scales into ``nn.Linear`` weights.

The OstQuant / QuaRot deployment recipe needs only three pieces at run time:
weights that already contain the learned rotations and scales, an online
Hadamard on the inputs of the layers whose input cannot be rotated offline
(down_proj: its input comes out of a nonlinearity), and dynamic per-token
quantization. This module does the offline part:

* ``fuse_rotation(linear, R, scales, side="input")``: afterwards the layer expects
  ``x' = (x / scales) @ R`` and returns the original ``x W^T + b``. Weight becomes
  ``W' = (W * scales[None, :]) @ R``  (since ``x' W'^T = x diag(1/s) R R^T diag(s) W^T``).
* ``fuse_rotation(linear, R, scales, side="output")``: afterwards the layer returns
  ``y' = (y / scales) @ R`` for ``y = x W^T + b``:
  ``W' = R^T (W / scales[:, None])``, ``b' = (b / scales) @ R``.

``R`` must be orthogonal (checked: ``R R^T = I`` to 1e-4 relative in float64 unless
``check=False``). Rotations compose: fusing ``R1`` then ``R2`` on the same side gives
``R1 R2``. Fusion runs in float64 and casts back to the weight's dtype, so fuse
before quantizing. Example (down_proj with the online Hadamard):

    fuse_rotation(mlp.down_proj, hadamard_matrix(n, normalized=True), side="input")
    y = mlp.down_proj(hadamard_transform(act))        # == the original down_proj(act)
"""

from __future__ import annotations

import torch
from torch import nn

from ..validation import check_tensor
from .hadamard import hadamard_matrix

__all__ = ["check_orthogonal", "fuse_rotation", "random_hadamard_matrix", "rotate_input"]


def check_orthogonal(name: str, r: torch.Tensor, atol: float = 1e-4) -> None:
    """ValueError unless ``r`` is square and ``r r^T = I`` within ``atol`` (float64)."""
    check_tensor(name, r)
    if r.dim() != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"expected a square matrix for `{name}`, got shape {list(r.shape)}")
    r64 = r.detach().to(torch.float64)
    err = float((r64 @ r64.t() - torch.eye(r.shape[0], dtype=torch.float64, device=r.device)).abs().max())
    if err > atol:
        raise ValueError(f"expected an orthogonal `{name}` (R R^T = I), got max |R R^T - I| = {err:.3e}")


def _scales64(scales, n, name, device):
    if scales is None:
        return None
    check_tensor(name, scales)
    if tuple(scales.shape) != (n,):
        raise ValueError(f"expected shape [{n}] for `{name}`, got {list(scales.shape)}")
    s = scales.detach().to(device=device, dtype=torch.float64)
    if not bool((s != 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError(f"expected finite non-zero `{name}`")
    return s


@torch.no_grad()
def fuse_rotation(linear: nn.Linear, rotation: torch.Tensor, scales: torch.Tensor | None = None,
                  *, side: str = "input", check: bool = True) -> nn.Linear:
    """Fold ``rotation`` (``[d, d]`` orthogonal) and optional ``scales`` (``[d]``) into ``linear``
    in place and return it.

    ``side="input"``: ``d = in_features``; the fused layer takes ``(x / scales) @ rotation``.
    ``side="output"``: ``d = out_features``; the fused layer returns ``(y / scales) @ rotation``.
    See the module docstring for the algebra.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear for `linear`, got {type(linear).__name__}")
    if side not in ("input", "output"):
        raise ValueError(f"expected `side` 'input' or 'output', got {side!r}")
    d = linear.in_features if side == "input" else linear.out_features
    check_tensor("rotation", rotation)
    if tuple(rotation.shape) != (d, d):
        raise ValueError(f"expected shape [{d}, {d}] for `rotation` ({side} side of a "
                         f"{linear.in_features}->{linear.out_features} Linear), got {list(rotation.shape)}")
    if check:
        check_orthogonal("rotation", rotation)
    w = linear.weight
    dev = w.device
    r = rotation.detach().to(device=dev, dtype=torch.float64)
    s = _scales64(scales, d, "scales", dev)
    w64 = w.detach().to(torch.float64)
    if side == "input":
        if s is not None:
            w64 = w64 * s[None, :]
        w64 = w64 @ r
    else:
        if s is not None:
            w64 = w64 / s[:, None]
        w64 = r.t() @ w64
        if linear.bias is not None:
            b64 = linear.bias.detach().to(torch.float64)
            if s is not None:
                b64 = b64 / s
            linear.bias.copy_((b64 @ r).to(linear.bias.dtype))
    w.copy_(w64.to(w.dtype))
    return linear


def rotate_input(x: torch.Tensor, rotation: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """``(x / scales) @ rotation`` in x's dtype (computed in fp32, or fp64 for fp64 ``x``): what a
    layer fused with ``side="input"`` expects. For a Hadamard rotation prefer
    :func:`inferops.quant.hadamard_transform` (the fast kernel)."""
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cd)
    if scales is not None:
        y = y / scales.to(device=x.device, dtype=cd)
    return (y @ rotation.to(device=x.device, dtype=cd)).to(x.dtype)


def random_hadamard_matrix(n: int, generator: torch.Generator | None = None,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """QuaRot's randomized Hadamard: ``diag(signs) @ H_n / sqrt(n)`` with random +-1 signs.

    Orthogonal; folding it offline into both sides of a residual stream (one layer's
    ``side="output"``, the next ``side="input"``) leaves the model's function unchanged."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1
    return signs[:, None] * hadamard_matrix(n, dtype=dtype, normalized=True)
