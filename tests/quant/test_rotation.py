"""fuse_rotation: folding orthogonal rotations and channel scales into nn.Linear weights."""

from __future__ import annotations

import pytest
import torch
from inferops.quant import (
    fuse_rotation,
    hadamard_matrix,
    hadamard_quantize,
    hadamard_transform,
    quantize_per_token,
    quantize_weight_per_channel,
    random_hadamard_matrix,
    rotate_input,
    w8a8_matmul,
)
from inferops.testing import assert_close
from torch import nn


def _orthogonal(n, g):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _linear(i, o, g, bias=True):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    return nn.Linear(i, o, bias=bias).double()


def test_input_side_with_scales_is_exact_in_float64(gen):
    lin = _linear(48, 20, gen)
    ref = _linear(48, 20, gen)
    ref.load_state_dict(lin.state_dict())
    r = _orthogonal(48, gen)
    s = torch.rand(48, generator=gen, dtype=torch.float64) + 0.5
    fuse_rotation(lin, r, s, side="input")
    x = torch.randn(7, 48, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert_close(lin(rotate_input(x, r, s)), ref(x), torch.float64)


def test_output_side_with_scales_is_exact_in_float64(gen):
    lin = _linear(24, 40, gen)
    ref = _linear(24, 40, gen)
    ref.load_state_dict(lin.state_dict())
    r = _orthogonal(40, gen)
    s = torch.rand(40, generator=gen, dtype=torch.float64) + 0.5
    fuse_rotation(lin, r, s, side="output")
    x = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert_close(lin(x), rotate_input(ref(x), r, s), torch.float64)


def test_rotated_model_equals_original_float64(gen):
    """A residual-stream rotation (QuaRot/OstQuant style) folded into a small MLP block:
    up-projection reads the rotated stream, down-projection writes it, and the online
    Hadamard sits in front of down_proj. The rotated-and-fused model equals the original."""
    d, hidden = 64, 5 * 32  # hidden = 160 = 20 * 8: a Paley-factor Hadamard size
    up, down = _linear(d, hidden, gen), _linear(hidden, d, gen)
    up0, down0 = _linear(d, hidden, gen), _linear(hidden, d, gen)
    up0.load_state_dict(up.state_dict())
    down0.load_state_dict(down.state_dict())

    def original(x):
        return x + down0(torch.nn.functional.silu(up0(x)))

    q = random_hadamard_matrix(d, torch.Generator().manual_seed(int(torch.randint(0, 99, (1,), generator=gen))))
    fuse_rotation(up, q, side="input")       # reads x @ Q
    fuse_rotation(down, q, side="output")    # writes (.) @ Q
    had = hadamard_matrix(hidden, normalized=True)
    fuse_rotation(down, had, side="input")   # its input gets the online Hadamard

    def rotated(xr):
        a = torch.nn.functional.silu(up(xr))
        return xr + down(rotate_input(a, had))

    x = torch.randn(9, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert_close(rotated(x @ q) @ q.t(), original(x), torch.float64)


def test_down_proj_recipe_with_kernels_close_to_float(gen):
    """The deployment recipe on the public ops (CPU fallback here): fused weights quantized
    per channel, activations rotated + quantized per token, W8A8 matmul; error stays at the
    quantization level of the unrotated layer."""
    n, d = 1024, 96
    down = _linear(n, d, gen, bias=False).float()
    x = torch.randn(32, n, generator=gen)
    x[:, 5] *= 40  # an outlier channel: what the rotation is for
    exact = x.double() @ down.weight.detach().double().t()
    fused = _linear(n, d, gen, bias=False).float()
    fused.load_state_dict(down.state_dict())
    fuse_rotation(fused, hadamard_matrix(n, normalized=True), side="input")
    w_q, ws = quantize_weight_per_channel(fused.weight)
    xq, xs = hadamard_quantize(x.bfloat16(), torch.int8)
    y = w8a8_matmul(xq, xs, w_q, ws, torch.bfloat16)
    rot_err = float((y.double() - exact).norm() / exact.norm())
    w_q0, ws0 = quantize_weight_per_channel(down.weight)
    xq0, xs0 = quantize_per_token(x.bfloat16(), torch.int8)
    plain_err = float((w8a8_matmul(xq0, xs0, w_q0, ws0, torch.bfloat16).double() - exact).norm() / exact.norm())
    assert rot_err < 0.03 and rot_err < plain_err, (rot_err, plain_err)
    xb = x.bfloat16()
    assert_close(hadamard_transform(xb), xb.double() @ hadamard_matrix(n, normalized=True), torch.bfloat16)


def test_rotations_compose(gen):
    lin = _linear(16, 8, gen)
    ref = _linear(16, 8, gen)
    ref.load_state_dict(lin.state_dict())
    r1, r2 = _orthogonal(16, gen), _orthogonal(16, gen)
    fuse_rotation(lin, r1)
    fuse_rotation(lin, r2)
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert_close(lin(x @ r1 @ r2), ref(x), torch.float64)


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"rotation": torch.eye(8, dtype=torch.float64)}, ValueError, r"shape \[16, 16\] for `rotation`"),
        ({"rotation": 2 * torch.eye(16, dtype=torch.float64)}, ValueError, r"orthogonal `rotation`"),
        ({"rotation": torch.eye(16), "scales": torch.ones(8)}, ValueError, r"shape \[16\] for `scales`"),
        ({"rotation": torch.eye(16), "scales": torch.zeros(16)}, ValueError, r"non-zero `scales`"),
        ({"rotation": torch.eye(16), "side": "left"}, ValueError, r"'input' or 'output'"),
    ],
)
def test_bad_input(kwargs, exc, pattern, gen):
    with pytest.raises(exc, match=pattern):
        fuse_rotation(_linear(16, 8, gen), **kwargs)
    with pytest.raises(TypeError, match="nn.Linear for `linear`"):
        fuse_rotation(nn.Conv1d(1, 1, 1), torch.eye(1))


def test_random_hadamard_is_orthogonal(gen):
    r = random_hadamard_matrix(5120 // 32, gen)
    assert torch.allclose(r @ r.t(), torch.eye(160, dtype=torch.float64), atol=1e-12)
