"""QuantLinear and quantize_model_: a random transformer block quantized on CPU (reference path)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferops.quant import (
    FORMATS,
    QuantLinear,
    dequantize,
    hadamard_matrix,
    quantize_model_,
)

D, HEADS, FF = 256, 4, 512


class Block(nn.Module):
    """Pre-norm attention + SwiGLU MLP (Llama-style names), random weights."""

    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(D, D, bias=True)
        self.gate_proj, self.up_proj = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False)
        self.down_proj = nn.Linear(FF, D, bias=True)
        self.lm_head = nn.Linear(D, 64, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(B, T, HEADS, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.o_proj(a)
        h = self.norm2(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.lm_head(x)


def _block(seed=0):
    torch.manual_seed(seed)
    return Block().eval()


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# Relative error of the block's logits against the fp32 model. Measured on this
# block (seeds 0-2): w4a16 0.024-0.028, int8 0.0046-0.0051, fp8 0.012-0.014; bf16
# alone 0.004. Bounds ~1.5x that.
BOUNDS = {"w4a16": 0.04, "w8a8-int8": 0.008, "w8a8-fp8": 0.02}


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hadamard", [False, True])
def test_quantized_block_close_to_float(fmt, hadamard):
    ref_model = _block()
    x = torch.randn(2, 9, D)
    expect = ref_model(x)
    q_model = copy.deepcopy(ref_model).to(torch.bfloat16)
    stream = io.StringIO()
    done = quantize_model_(q_model, fmt, 128, hadamard=(lambda n, m: n.endswith("down_proj")) if hadamard else False,
                           stream=stream)
    assert sorted(done) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert isinstance(q_model.down_proj, QuantLinear) and isinstance(q_model.lm_head, nn.Linear)
    assert q_model.down_proj.hadamard == hadamard and not q_model.up_proj.hadamard
    assert "7/7" in stream.getvalue()
    got = q_model(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    err = _rel(got, expect)
    assert err < BOUNDS[fmt], f"{fmt} hadamard={hadamard}: relative error {err:.4f}"
    # and it is really quantized: the float bf16 model is closer than the quantized one
    assert _rel(copy.deepcopy(ref_model).to(torch.bfloat16)(x.to(torch.bfloat16)), expect) < err


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_equals_its_definition(fmt, hadamard, bias):
    """Forward == the float64 product of the (rotated, quantized) input and the stored weight."""
    torch.manual_seed(1)
    lin = nn.Linear(256, 128, bias=bias)
    q = QuantLinear.from_linear(lin, fmt, group_size=64, hadamard=hadamard, dtype=torch.float16)
    x = torch.randn(5, 3, 256, dtype=torch.float16)
    y = q(x)
    assert y.shape == (5, 3, 128) and y.dtype == torch.float16
    x64 = x.double()
    if hadamard:
        x64 = x64 @ hadamard_matrix(256, normalized=True)
    if fmt == "w4a16":
        if hadamard:
            x64 = x64.half().double()  # the rotated activations are rounded to fp16 before the GEMM
        w = dequantize(q._int4(), torch.float32).double()
        expect = x64 @ w.T
    else:
        qmax = 127.0 if fmt == "w8a8-int8" else 448.0
        s = (x64.abs().amax(-1, keepdim=True).float() / qmax).clamp_min(1e-10).double()
        xq = (x64 / s).float()
        xq = xq.round() if fmt == "w8a8-int8" else xq.to(torch.float8_e4m3fn).float()
        w = q.weight_q.float().double() * q.weight_scale.double()[:, None]
        expect = (xq.double() * s) @ w.T
    if bias:
        expect = expect + lin.bias.detach().half().double()
    torch.testing.assert_close(y.double(), expect, rtol=2e-2, atol=2e-2 * float(expect.abs().mean()))


def test_state_dict_round_trip():
    a = _block().to(torch.bfloat16)
    quantize_model_(a, "w4a16", 128, progress=False)
    b = _block(seed=7).to(torch.bfloat16)  # other float weights: loading must overwrite them
    quantize_model_(b, "w4a16", 128, progress=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, D, dtype=torch.bfloat16)
    assert torch.equal(a(x), b(x))


def test_per_channel_and_zero_points():
    torch.manual_seed(2)
    lin = nn.Linear(256, 64)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    for kw in ({"group_size": -1}, {"symmetric": False}):
        q = QuantLinear.from_linear(lin, "w4a16", **kw)
        assert _rel(q(x), lin(x.float())) < 0.15
        assert "per-channel" in repr(q) or not kw.get("group_size")


def test_bad_input_raises():
    lin = nn.Linear(256, 128)
    q = QuantLinear.from_linear(lin, "w8a8-int8", dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="floating tensor for `x`"):
        q(torch.randint(0, 3, (2, 256)))
    with pytest.raises(ValueError, match=r"\[\.\.\., 256\]"):
        q(torch.randn(2, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="`format`"):
        QuantLinear.from_linear(lin, "w3a16")
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="group"):
        QuantLinear.from_linear(nn.Linear(192, 128), "w4a16", group_size=128)
    with pytest.raises(ValueError):  # 100 is not a supported Hadamard size
        QuantLinear.from_linear(nn.Linear(100, 128), "w8a8-int8", hadamard=True)


def test_quantize_model_rejects_unsupported_layer_before_changing_anything():
    m = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 40))  # 40 outputs: not a multiple of 64
    with pytest.raises(ValueError, match=r"`1` \(128->40\)"):
        quantize_model_(m, "w4a16", progress=False)
    assert all(isinstance(layer, nn.Linear) for layer in m)  # nothing was replaced
    done = quantize_model_(m, "w4a16", progress=False, include=lambda name, lin: lin.out_features % 64 == 0)
    assert list(done) == ["0"] and isinstance(m[1], nn.Linear)


def test_hadamard_tames_activation_outliers():
    """OstQuant/QuaRot's reason for the online rotation: a few huge input channels make
    per-token int8 coarse for all the others; rotating spreads them over every channel."""
    torch.manual_seed(3)
    lin = nn.Linear(512, 256, bias=False)
    x = torch.randn(64, 512)
    x[:, :4] *= 200.0  # outlier channels, as in down_proj inputs of real LLMs
    expect = lin(x)
    errs = {}
    for had in (False, True):
        q = QuantLinear.from_linear(lin, "w8a8-int8", hadamard=had, dtype=torch.bfloat16)
        errs[had] = _rel(q(x.to(torch.bfloat16)), expect)
    assert errs[True] < 0.5 * errs[False], errs


def test_load_rejects_other_int4_layout_version():
    """The layout version travels in the `quant_config` buffer and is checked when loading
    (forward reads only a host copy of it, never the buffer)."""
    a = QuantLinear.from_linear(nn.Linear(256, 128), "w4a16", dtype=torch.bfloat16)
    sd = a.state_dict()
    sd["quant_config"] = sd["quant_config"].clone()
    sd["quant_config"][7] += 1
    b = QuantLinear.from_linear(nn.Linear(256, 128), "w4a16", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="layout_version: checkpoint 2, layer 1"):
        b.load_state_dict(sd)
