"""GPTQ / AWQ tensors -> Int4Weight: bit-exact dequantization against the formats' definitions
(tests/quant/_formats.py writes them), act-order permutation, bad input, and the converted
layer's forward on the kernels (GPU or the CPU executor)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from inferops._core.ops import kernel_backend
from inferops.quant import QuantLinear, dequantize, int4_from_awq, int4_from_gptq

from . import _formats as F

N, K = 128, 256


def _weights(gen, n=N, k=K):
    return torch.randn(n, k, generator=gen) * 0.05


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [64, -1])
def test_gptq_dequantizes_bit_exactly(checkpoint_format, sym, act_order, group, gen):
    w = _weights(gen)
    gl = K if group == -1 else group
    G = K // gl
    g_idx = F.act_order_g_idx(K, gl, gen) if act_order else (torch.arange(K) // gl).to(torch.int32)
    # v1 stores zero - 1: zeros of 0 are not representable there, as in the real format
    q, z, s = F.quantize_groups(w, g_idx, G, sym)
    if checkpoint_format == "gptq":
        z = z.clamp(min=1)
    t = F.gptq_tensors(q, z, s, g_idx, checkpoint_format)
    iw, perm = int4_from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], group_size=group,
                              checkpoint_format=checkpoint_format, sym=sym)
    expect = F.dequantize_definition(q, z, s, g_idx)  # [N, K]
    assert iw.symmetric == sym and iw.group_size == group
    if act_order and group != -1:
        assert perm is not None and torch.equal(g_idx[perm].long(), torch.arange(K) // gl)
        expect = expect[:, perm]
    else:
        assert perm is None
    assert torch.equal(dequantize(iw).view(torch.int16), expect.view(torch.int16))


def test_gptq_v1_zero_16_is_exact(gen):
    """v1 stores zero - 1, so a stored 15 means zero point 16 (outside [0, 15]): kept exact."""
    w = _weights(gen)
    g_idx = (torch.arange(K) // 128).to(torch.int32)
    q, z, s = F.quantize_groups(w, g_idx, 2, sym=False)
    z[0, :8] = 16
    t = F.gptq_tensors(q, z.clamp(min=1), s, g_idx, "gptq")
    iw, _ = int4_from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    expect = F.dequantize_definition(q, z.clamp(min=1), s, g_idx)
    assert torch.equal(dequantize(iw).view(torch.int16), expect.view(torch.int16))


@pytest.mark.parametrize("group", [128, -1])
def test_awq_dequantizes_bit_exactly(group, gen):
    w = _weights(gen)
    gl = K if group == -1 else group
    g_idx = (torch.arange(K) // gl).to(torch.int32)
    q, z, s = F.quantize_groups(w, g_idx, K // gl, sym=False)
    t = F.awq_tensors(q, z, s)
    iw = int4_from_awq(t["qweight"], t["qzeros"], t["scales"], group_size=group)
    expect = F.dequantize_definition(q, z, s, g_idx)
    assert not iw.symmetric
    assert torch.equal(dequantize(iw).view(torch.int16), expect.view(torch.int16))
    # the interleaved order matters: reading AWQ words in GPTQ's column order is wrong
    wrong = F.pack_cols(q)
    assert not torch.equal(dequantize(int4_from_awq(wrong, t["qzeros"], s)), expect)


def test_bad_checkpoint_tensors_raise(gen):
    w = _weights(gen)
    g_idx = (torch.arange(K) // 128).to(torch.int32)
    q, z, s = F.quantize_groups(w, g_idx, 2, sym=False)
    t = F.gptq_tensors(q, z.clamp(min=1), s, g_idx)
    with pytest.raises(ValueError, match="`checkpoint_format`"):
        int4_from_gptq(t["qweight"], t["qzeros"], s, checkpoint_format="marlin")
    with pytest.raises(TypeError, match="`qweight`"):
        int4_from_gptq(t["qweight"].float(), t["qzeros"], s)
    with pytest.raises(ValueError, match="`qzeros` of shape"):
        int4_from_gptq(t["qweight"], t["qzeros"][:, :4], s)
    with pytest.raises(ValueError, match="`group_size` 128"):
        int4_from_gptq(t["qweight"], t["qzeros"], s, group_size=64)
    with pytest.raises(ValueError, match="zero point = 8"):
        int4_from_gptq(t["qweight"], t["qzeros"], s, sym=True)
    bad = g_idx.clone()
    bad[:3] = 1  # group 1 gets 131 channels
    with pytest.raises(ValueError, match="exactly 128 input channels"):
        int4_from_gptq(t["qweight"], t["qzeros"], s, bad)
    with pytest.raises(ValueError, match=r"`scales` of shape \[G, 128\]"):
        int4_from_awq(F.pack_cols(q, F.AWQ_ORDER), F.pack_cols(z, F.AWQ_ORDER), s[:, :64])


def test_act_order_layer_equals_dequantized_float_layer(gen):
    """QuantLinear.from_int4(w, in_perm=perm) == x @ W^T with W in the checkpoint's own order."""
    w = _weights(gen)
    g_idx = F.act_order_g_idx(K, 64, gen)
    q, z, s = F.quantize_groups(w, g_idx, K // 64, sym=False)
    t = F.gptq_tensors(q, z.clamp(min=1), s, g_idx)
    iw, perm = int4_from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    bias = torch.randn(N, generator=gen).half()
    layer = QuantLinear.from_int4(iw, bias, in_perm=perm)
    x = torch.randn(3, 5, K, generator=gen)
    W = F.dequantize_definition(q, z.clamp(min=1), s, g_idx).double()
    expect = x.half().double() @ W.t() + bias.double()
    got = layer(x)  # fp32 in, fp16 math, fp32 out
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expect, rtol=2e-3, atol=2e-3 * float(expect.abs().mean()))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["gptq-act-order", "awq"])
def test_converted_layer_on_the_kernel(fmt, gen, kernel_device):
    """The converted weights (act-order GPTQ v1 with zero points up to 16; AWQ) through the w4a16
    kernel (fused path, M = 3) and the dequantize kernel (bit-exact)."""
    w = _weights(gen)
    if fmt == "awq":
        g_idx = (torch.arange(K) // 128).to(torch.int32)
        q, z, s = F.quantize_groups(w, g_idx, 2, sym=False)
        t = F.awq_tensors(q, z, s)
        layer = QuantLinear.from_int4(int4_from_awq(t["qweight"], t["qzeros"], t["scales"]))
    else:
        g_idx = F.act_order_g_idx(K, 128, gen)
        q, z, s = F.quantize_groups(w, g_idx, 2, sym=False)
        z = z.clamp(min=1)
        z[1, :16] = 16  # v1's stored 15: zero point 16, exact in the kernel's (magic + z) too
        t = F.gptq_tensors(q, z, s, g_idx)
        iw, perm = int4_from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
        layer = QuantLinear.from_int4(iw, in_perm=perm)
    expect_w = F.dequantize_definition(q, z, s, g_idx)
    assert kernel_backend("w4a16_matmul", kernel_device) in ("cuda", "simt")
    layer = layer.to(kernel_device)
    x = torch.randn(3, K, generator=gen).half().to(kernel_device)
    got = layer(x).cpu().double()
    expect = x.cpu().double() @ expect_w.double().t()
    torch.testing.assert_close(got, expect, rtol=1e-2, atol=1e-2 * float(expect.abs().mean()))
    w_dev = dequantize(layer._int4()).cpu()
    perm = layer.in_perm.cpu() if layer.in_perm is not None else torch.arange(K)
    assert torch.equal(w_dev.view(torch.int16), expect_w[:, perm].view(torch.int16))


def _autoawq_packing_utils():
    """AutoAWQ's packing helpers as an independent oracle (optional: `pip install autoawq
    --no-deps`). Its `awq/utils/packing_utils.py` imports only torch, but the `awq` package's
    `__init__` needs accelerate, datasets and triton, so the file is loaded on its own."""
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("AutoAWQ not installed (optional oracle: pip install autoawq --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "packing_utils.py"
    if not path.is_file():
        pytest.skip(f"AutoAWQ without {path.name}")
    mspec = importlib.util.spec_from_file_location("_autoawq_packing_utils", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


def test_awq_and_gptq_v1_match_autoawq(gen):
    """Oracle from a peer: AutoAWQ's dequantize_gemm reads our AWQ tensors to the same fp16
    weights as int4_from_awq, and its AWQ -> ExLlama (GPTQ v1 packing, zero - 1) conversion
    reads back through int4_from_gptq to the same weights."""
    awq = _autoawq_packing_utils()
    g_idx = (torch.arange(K) // 64).to(torch.int32)
    q, z, s = F.quantize_groups(_weights(gen), g_idx, K // 64, sym=False)
    z = z.clamp(min=1)  # AutoAWQ's v1 conversion subtracts 1 without a borrow guard
    t = F.awq_tensors(q, z, s)
    expect = awq.dequantize_gemm(t["qweight"], t["qzeros"], s, 4, 64).t()  # [N, K] fp16
    assert expect.dtype == torch.float16
    ours = dequantize(int4_from_awq(t["qweight"], t["qzeros"], s))
    assert torch.equal(ours.view(torch.int16), expect.contiguous().view(torch.int16))
    qw, qz = awq.unpack_reorder_pack(t["qweight"], t["qzeros"], 4)
    iw, perm = int4_from_gptq(qw.to(torch.int32), qz.to(torch.int32), s, checkpoint_format="gptq")
    assert perm is None
    assert torch.equal(dequantize(iw).view(torch.int16), expect.contiguous().view(torch.int16))
