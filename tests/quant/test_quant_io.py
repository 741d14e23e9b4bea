"""QuantLinear around the model: self-describing state dicts (torch.save, safetensors),
load_quantized, from_int4 / from_8bit, module casts, fp32 activations, torch.export, and
gradients to the activations (gradcheck, torch.compile in grad mode, the executor).
Each "trial" test is a failure found when the layer was tried as a new user would."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferops.testing import backend
from inferops._core.ops import kernel_backend
from inferops.quant import (
    FORMATS,
    QuantLinear,
    dequantize,
    hadamard_matrix,
    load_quantized,
    pack_int4,
    quantize_model_,
    quantize_weight_per_channel,
    w4a16_matmul,
    w8a8_linear,
)

D, FF = 128, 256


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.gate = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=True)
        self.down = nn.Linear(FF, D, bias=True)
        self.head = nn.Linear(D, 64, bias=False)

    def forward(self, x):
        return self.head(x + self.down(F.silu(self.gate(x)) * self.up(x)))


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return MLP().to(dtype).eval()


def _quantized(fmt, hadamard=False, seed=0, dtype=torch.bfloat16):
    m = _mlp(seed)
    quantize_model_(m, fmt, 64, hadamard=(lambda n, _: n == "down") if hadamard else False, skip=("head",),
                    dtype=dtype, progress=False)
    return m


def _dequantized_weight(q: QuantLinear) -> torch.Tensor:
    """The float weight the layer multiplies its (rotated) input by, as [N, K] float64."""
    if q.format == "w4a16":
        w = dequantize(q._int4()).double()
        if q.in_perm is not None:
            w = w[:, torch.argsort(q.in_perm)]
    else:
        w = q.weight_q.double() * q.weight_scale.double()[:, None]
    if q.hadamard:
        w = w @ hadamard_matrix(q.in_features, normalized=True).t()
    return w


# --- self-describing saves ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("saver", ["torch.save", "safetensors"])
def test_load_quantized_rebuilds_layers_in_a_float_model(fmt, saver, tmp_path):
    src = _quantized(fmt, hadamard=True)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        expect = src(x)
    if saver == "torch.save":
        path = tmp_path / "q.pt"
        torch.save(src.state_dict(), path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "q.safetensors"
        save_file(src.state_dict(), str(path))
    dst = load_quantized(_mlp(seed=5), path)  # other float weights: loading must overwrite them
    assert isinstance(dst.down, QuantLinear) and dst.down.hadamard and not dst.up.hadamard
    assert dst.down.config() == src.down.config() and isinstance(dst.head, nn.Linear)
    with torch.no_grad():
        assert torch.equal(dst(x), expect)


def test_load_quantized_into_a_meta_model():
    """A model built on the meta device (no memory) is filled by assignment."""
    src = _quantized("w4a16", hadamard=True)
    with torch.device("meta"):
        m = MLP()
    m = load_quantized(m, src.state_dict())
    assert not any(t.is_meta for t in list(m.parameters()) + list(m.buffers()))
    x = torch.randn(2, D)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))


def test_load_quantized_from_a_state_dict_and_a_standalone_layer():
    a = QuantLinear.from_linear(nn.Linear(256, 128), "w4a16", 128, symmetric=False, dtype=torch.float16)
    b = load_quantized(nn.Linear(256, 128), a.state_dict())
    assert isinstance(b, QuantLinear) and not b.symmetric and b.dtype == torch.float16
    x = torch.randn(3, 256, dtype=torch.float16)
    assert torch.equal(a(x), b(x))
    with pytest.raises(ValueError, match="found none"):
        load_quantized(nn.Linear(256, 128), nn.Linear(256, 128).state_dict())
    with pytest.raises(ValueError, match=r"`<root>`.*256->128, the model's 256->64"):
        load_quantized(nn.Linear(256, 64), a.state_dict())
    with pytest.raises(TypeError, match=r"`<root>` into a Conv1d"):
        load_quantized(nn.Conv1d(256, 128, 1), a.state_dict())
    with pytest.raises(ValueError, match="no such module"):
        load_quantized(nn.Sequential(nn.Linear(256, 128)), {"x." + k: v for k, v in a.state_dict().items()})


@pytest.mark.parametrize("change", ["hadamard", "format", "group_size", "symmetric"])
def test_trial_mismatched_checkpoint_raises_naming_the_layer(change):
    """Trial: a state dict saved with another hadamard flag / format loaded silently (logit error 1.31)."""
    src = _quantized("w4a16", hadamard=False)
    kw = {"hadamard": dict(hadamard=True), "format": {}, "group_size": {}, "symmetric": {}}[change]
    dst = _mlp()
    if change == "format":
        quantize_model_(dst, "w8a8-int8", skip=("head",), progress=False)
    else:
        quantize_model_(dst, "w4a16", 128 if change == "group_size" else 64, skip=("head",), progress=False,
                        symmetric=change != "symmetric", **({"hadamard": lambda n, _: n == "down"} if kw else {}))
    field = {"hadamard": "hadamard", "format": "format", "group_size": "group_size", "symmetric": "symmetric"}
    with pytest.raises(ValueError, match=rf"layer `(down|up|gate)`.*{field[change]}: checkpoint"):
        dst.load_state_dict(src.state_dict(), strict=False)


def test_legacy_meta_state_dict_still_loads():
    """State dicts saved before `quant_config` (w4a16 with a `meta` buffer) load into a
    quantized model as before (their layout version and shape are still checked)."""
    a = QuantLinear.from_linear(nn.Linear(256, 128), "w4a16", dtype=torch.bfloat16)
    sd = a.state_dict()
    qc = a.config()
    del sd["quant_config"]
    sd["meta"] = torch.tensor([qc["layout_version"], 128, 256, 128])
    b = QuantLinear.from_linear(nn.Linear(256, 128), "w4a16", dtype=torch.bfloat16)
    b.load_state_dict(sd)
    assert torch.equal(b.qweight, a.qweight)
    sd["meta"] = torch.tensor([qc["layout_version"] + 1, 128, 256, 128])
    with pytest.raises(ValueError, match="int4 layout version"):
        b.load_state_dict(sd)


# --- from_int4 / from_8bit --------------------------------------------------------------------


def test_from_int4_and_from_8bit(gen):
    w = torch.randn(128, 256, generator=gen) * 0.05
    bias = torch.randn(128, generator=gen)
    iw = pack_int4(w, 64, symmetric=False, dtype=torch.float16)
    q = QuantLinear.from_int4(iw, bias)
    assert q.format == "w4a16" and q.dtype == torch.float16 and q.group_size == 64 and not q.symmetric
    assert q.qweight is iw.qweight  # wrapped, not copied
    x = torch.randn(4, 256, generator=gen, dtype=torch.float16)
    assert torch.equal(q(x), w4a16_matmul(x, iw, bias.half()))
    for qdt, fmt in ((torch.int8, "w8a8-int8"), (torch.float8_e4m3fn, "w8a8-fp8")):
        wq, ws = quantize_weight_per_channel(w, qdt)
        q8 = QuantLinear.from_8bit(wq, ws, bias, dtype=torch.bfloat16)
        ref = QuantLinear.from_linear(_linear(w, bias), fmt, dtype=torch.bfloat16)
        assert q8.format == fmt and q8.config() == ref.config()
        xb = x.bfloat16()
        assert torch.equal(q8(xb), ref(xb))
    with pytest.raises(TypeError, match="Int4Weight for `weight`"):
        QuantLinear.from_int4(w)
    with pytest.raises(ValueError, match=r"`bias` of shape \[128\]"):
        QuantLinear.from_int4(iw, torch.zeros(3))
    with pytest.raises(ValueError, match="permutation"):
        QuantLinear.from_int4(iw, in_perm=torch.zeros(256, dtype=torch.int64))
    with pytest.raises(TypeError, match="`weight_q` torch.int8 or torch.float8_e4m3fn"):
        QuantLinear.from_8bit(w, torch.ones(128))
    with pytest.raises(ValueError, match=r"`weight_scale` of shape \[128\]"):
        QuantLinear.from_8bit(wq, torch.ones(64))


def _linear(w, bias):
    lin = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
    return lin


# --- casts, fp32, export ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_trial_model_casts_never_touch_quantized_buffers(fmt):
    """Trial: model.to(torch.bfloat16) broke fp8 (w_q cast to bf16) and int8 (fp32 scales cast)."""
    m = _quantized(fmt, dtype=torch.float16)
    before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("head.")}
    x = torch.randn(3, D)
    layers = (m.up, m.gate)  # the float head's own weights are rounded by the casts, as they should be
    with torch.no_grad():
        y16 = [layer(x.half()) for layer in layers]
        for cast in (lambda t: t.to(torch.bfloat16), lambda t: t.float(), lambda t: t.half(), lambda t: t.double()):
            cast(m)
            for k, v in before.items():
                now = m.state_dict()[k]
                assert now.dtype == v.dtype and torch.equal(now.view(torch.uint8), v.view(torch.uint8)), k
        m.to(torch.float16)
        for layer, y in zip(layers, y16):
            assert torch.equal(layer(x.half()), y)
        m.to(torch.bfloat16)
        assert m(x.bfloat16()).dtype == torch.bfloat16  # bf16 in: cast to the layers' fp16 and back


@pytest.mark.parametrize("fmt", FORMATS)
def test_trial_fp32_model_and_activations(fmt):
    """Trial: an fp32 model / fp32 activations were rejected. They are cast to the layer's
    dtype on the way in and the output back to fp32."""
    m = _quantized(fmt, hadamard=True)  # quantized from an fp32 model, computing in bf16
    x = torch.randn(2, 3, D)
    with torch.no_grad():
        y = m.down(torch.randn(2, 3, FF))
        assert y.dtype == torch.float32
        xd = torch.randn(2, 3, FF)
        assert torch.equal(m.down(xd), m.down(xd.bfloat16()).float())
        out = m(x)
        ref = _mlp()(x)
    assert out.dtype == torch.float32
    assert float((out - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize("fmt", FORMATS)
def test_trial_torch_export_standalone_layer(fmt):
    """Trial: ep.module() raised KeyError "attribute 'meta' already exists" (a buffer named meta)."""
    q = QuantLinear.from_linear(nn.Linear(256, 128), fmt, 128, hadamard=True, dtype=torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    ep = torch.export.export(q, (x,))
    with torch.no_grad():
        assert torch.equal(ep.module()(x), q(x))


# --- gradients ---------------------------------------------------------------------------------


def test_gradcheck_w4a16_and_rotation_float64(gen):
    """The registered backward formulas against finite differences, float64, on the references."""
    iw = pack_int4(torch.randn(64, 128, generator=gen), 64, symmetric=False, dtype=torch.float16)
    x = torch.randn(3, 128, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(64, generator=gen, dtype=torch.float64, requires_grad=True)
    op = torch.ops.inferops.w4a16_matmul
    # fast_mode: checks random projections of the Jacobian (vJu) against finite differences
    assert torch.autograd.gradcheck(lambda x, b: op(x, iw.qweight, iw.scales, iw.zeros, b, 64, "auto"), (x, b),
                                    fast_mode=True)
    for n in (128, 12 * 16):  # Sylvester, and Paley x Sylvester (not symmetric)
        xr = torch.randn(2, n, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: torch.ops.inferops.hadamard_quantize(t, "none")[0], (xr,),
                                        fast_mode=True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("hadamard", [False, True])
def test_grad_equals_dequantized_layer(fmt, hadamard, gen):
    """dL/dx and dL/dbias of the quantized layer = those of the float layer holding the dequantized
    weight (w8a8: straight-through the activation quantization); the weights get no gradient."""
    lin = nn.Linear(256, 128)
    q = QuantLinear.from_linear(lin, fmt, 64, hadamard=hadamard, dtype=torch.float16)
    if fmt == "w4a16":  # also act-order: a permuted input
        perm = torch.randperm(256, generator=gen)
        iw = q._int4()
        q = QuantLinear.from_int4(iw, q.bias, hadamard=hadamard, in_perm=perm)
    q.bias.requires_grad_(True)
    x = torch.randn(5, 256, generator=gen, requires_grad=True)
    gy = torch.randn(5, 128, generator=gen)
    q(x).backward(gy)
    w = _dequantized_weight(q)
    expect = (gy.half().double() @ w)
    torch.testing.assert_close(x.grad.double(), expect, rtol=1e-2, atol=1e-2 * float(expect.abs().mean()))
    torch.testing.assert_close(q.bias.grad.double(), gy.half().double().sum(0), rtol=1e-2, atol=1e-2)


def test_grad_through_hadamard_quantize_quantized_output_raises():
    x = torch.randn(2, 128, dtype=torch.float16, requires_grad=True)
    out = torch.ops.inferops.hadamard_quantize(x, "fp8")[0]  # fp8 is floating: autograd tracks it
    with pytest.raises(RuntimeError, match="no gradient"):
        out.float().sum().backward()


@pytest.mark.parametrize("fmt", ["w4a16", "w8a8-int8"])
def test_trial_compile_in_grad_mode_trains_an_adapter(fmt, gen):
    """Trial: torch.compile in grad mode failed ("no autograd formula was registered"). A LoRA
    adapter on a frozen quantized base: compiled and eager gradients agree."""

    class LoRA(nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.a = nn.Linear(256, 8, bias=False)
            self.b = nn.Linear(8, 128, bias=False)

        def forward(self, x):
            return self.base(x) + self.b(self.a(x))

    base = QuantLinear.from_linear(nn.Linear(256, 128), fmt, 64, hadamard=True, dtype=torch.bfloat16)
    model = LoRA(base)
    x = torch.randn(4, 256, generator=gen)
    grads = []
    for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        fn(x).square().mean().backward()
        grads.append((model.a.weight.grad.clone(), model.b.weight.grad.clone()))
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager)
        assert eager.abs().sum() > 0


def test_w8a8_linear_validates():
    wq, ws = quantize_weight_per_channel(torch.randn(128, 256), torch.int8)
    with pytest.raises(ValueError, match=r"`x` of shape \[\.\.\., 256\]"):
        w8a8_linear(torch.randn(2, 128), wq, ws)
    with pytest.raises(TypeError, match="`weight_scale`"):
        w8a8_linear(torch.randn(2, 256), wq, ws.half())
    with pytest.raises(TypeError, match="`x`"):
        w8a8_linear(torch.randn(2, 256), wq, ws, hadamard=True)  # the rotation takes fp16 / bf16


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["w4a16", "w8a8-fp8"])
def test_grad_on_the_kernels(fmt, gen, kernel_device):
    """Forward and backward through the kernels (int4_dequantize in the w4a16 backward; the
    quantize and W8A8 GEMM kernels in w8a8_linear) equal the CPU reference run."""
    q = QuantLinear.from_linear(nn.Linear(256, 128), fmt, 64, hadamard=True, dtype=torch.bfloat16)
    x = torch.randn(3, 256, generator=gen)
    gy = torch.randn(3, 128, generator=gen)
    x_ref = x.clone().requires_grad_(True)
    with backend("reference"):
        y_ref = q(x_ref)
        y_ref.backward(gy)
    y_ref = y_ref.detach()
    qd = copy.deepcopy(q).to(kernel_device)
    xd = x.to(kernel_device).requires_grad_(True)
    assert kernel_backend("w4a16_matmul" if fmt == "w4a16" else "w8a8_matmul", kernel_device) in ("cuda", "simt")
    yd = qd(xd)
    yd.backward(gy.to(kernel_device))
    yd = yd.detach()
    torch.testing.assert_close(yd.cpu(), y_ref, rtol=2e-2, atol=2e-2 * float(y_ref.abs().mean()))
    torch.testing.assert_close(xd.grad.cpu(), x_ref.grad, rtol=2e-2, atol=2e-2 * float(x_ref.grad.abs().mean()))
