"""Int4 packing: exact round trips, the packed layout against the mma.m16n8k16 fragment
definition (PTX ISA), round-to-nearest quantization, dequantization, Int4Weight plumbing
and clear errors."""

from __future__ import annotations

import pytest
import torch
from inferops.quant import (
    Int4Weight,
    dequantize,
    pack_int4,
    pack_int4_quantized,
    unpack,
)
from inferops.quant.int4 import LAYOUT_VERSION
from inferops.reference import quant_w4a16 as ref

# (N, K, group_size): per-channel, groups of 64 / 128, odd multiples of the 64 x 16 tile.
SHAPES = [(64, 16, -1), (64, 128, 128), (192, 384, 128), (320, 112, -1), (128, 448, 64), (64, 11008, 128)]


def _rand_q(g, N, K, symmetric):
    lo, hi = (-8, 7) if symmetric else (0, 15)
    q = torch.randint(lo, hi + 1, (N, K), generator=g, dtype=torch.int8)
    q[0, 0], q[-1, -1] = lo, hi  # the extremes are always there
    return q


def _rand_scales(g, G, N, dtype):
    return (torch.rand(G, N, generator=g) * 0.05 + 1e-3).to(dtype)


@pytest.mark.parametrize("N,K,group", SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_unpack_round_trip_exact(N, K, group, symmetric, gen):
    G = 1 if group == -1 else K // group
    q = _rand_q(gen, N, K, symmetric)
    s = _rand_scales(gen, G, N, torch.float16)
    z = None if symmetric else torch.randint(0, 16, (G, N), generator=gen, dtype=torch.int32)
    w = pack_int4_quantized(q, s, z, group_size=group)
    assert w.qweight.dtype == torch.int32 and tuple(w.qweight.shape) == (K // 16, 2 * N)
    q2, s2, z2 = unpack(w)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    assert (z2 is None) == symmetric
    if not symmetric:
        assert torch.equal(z2.to(torch.int32), z)


def test_pack_nibbles_is_a_bijection_on_positions():
    # Every packed nibble position names a distinct (n, k): pack the position index's low
    # nibbles in 4 passes and recover the full index exactly.
    N, K = 128, 48
    idx = torch.arange(N * K, dtype=torch.int64).reshape(N, K)
    back = torch.zeros_like(idx)
    for d in range(4):
        digit = (idx >> (4 * d)) & 15
        back |= ref.unpack_nibbles(ref.pack_nibbles(digit)).to(torch.int64) << (4 * d)
    assert torch.equal(back, idx)


def _b_fragment_element(lane: int, e: int) -> tuple[int, int]:
    """(k, n) of element e (0..3) of lane's B fragment of mma.m16n8k16 (.col, 16-bit types),
    PTX ISA "Matrix Fragments for mma.m16n8k16": row = (lane % 4) * 2 + (e & 1) + 8 * (e >= 2),
    col = lane // 4."""
    return (lane % 4) * 2 + (e & 1) + (8 if e >= 2 else 0), lane // 4


def test_layout_matches_mma_b_fragments(gen):
    """Emulate what the kernel does with each lane's 16-byte load (csrc/quant/w4a16.cu:
    register (w >> 4 (2 b1 + b0)) & 0x000f000f is B register b0 of n-tile 2 w + b1) and
    check every nibble lands where the PTX fragment layout says that register element is."""
    N, K = 128, 32
    u = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    packed = ref.pack_nibbles(u)
    words = packed.view(K // 16, N // 64, 32, 4).to(torch.int64) & 0xFFFFFFFF
    checked = 0
    for kt in range(K // 16):
        for nb in range(N // 64):
            for lane in range(32):
                for w in range(4):
                    word = int(words[kt, nb, lane, w])
                    for b1 in range(2):
                        ntile = 2 * w + b1
                        for b0 in range(2):  # B register index
                            reg = (word >> (4 * (2 * b1 + b0))) & 0x000F000F
                            for half, val in ((0, reg & 0xF), (1, reg >> 16)):
                                k, n = _b_fragment_element(lane, 2 * b0 + half)
                                assert val == int(u[nb * 64 + ntile * 8 + n, kt * 16 + k])
                                checked += 1
    assert checked == N * K


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [128, -1, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pack_int4_is_round_to_nearest(symmetric, group, dtype, gen):
    N, K = 128, 256
    w = torch.randn(N, K, generator=gen) * 0.05
    w[3, :] = 0.0  # an all-zero row: scale must stay finite
    packed = pack_int4(w, group, symmetric, dtype=dtype)
    q, s, z = unpack(packed)
    gl = K if group == -1 else group
    G = K // gl
    wg = w.reshape(N, G, gl)
    # Scales: independent formula.
    if symmetric:
        s_exp = wg.abs().amax(-1) / 7
    else:
        s_exp = (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / 15
    s_exp = torch.where(s_exp > 0, s_exp, torch.ones_like(s_exp)).to(dtype).t()
    assert torch.equal(s, s_exp)
    # q: the nearest of the 16 representable levels (brute force), ties either way.
    sf = s.float().t().repeat_interleave(gl, 1)  # [N, K]
    zf = torch.full_like(sf, 0.0) if symmetric else z.float().t().repeat_interleave(gl, 1)
    codes = torch.arange(-8, 8) if symmetric else torch.arange(0, 16)
    levels = (codes.float()[None, None, :] - zf[..., None]) * sf[..., None]  # [N, K, 16]
    dist = (levels - w[..., None]).abs()
    best = dist.min(-1).values
    chosen = dist.gather(-1, (q.long() - codes[0])[..., None]).squeeze(-1)
    assert torch.all(chosen <= best + 1e-6 * sf), "a weight was not rounded to its nearest level"
    # Within half a step of the original, plus the rounding of (q - z) * s to the scales'
    # dtype (unit roundoff u = 2^-8 bf16, 2^-11 fp16), plus, where a group's extreme is
    # clamped, the range lost to rounding the scale itself (at most 15 s u).
    deq = dequantize(packed).float()
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert torch.all((deq - w).abs() <= 0.5 * sf + 16 * sf * unit + deq.abs() * unit + 1e-7)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_equals_float_reference(symmetric, dtype, gen):
    N, K, group = 192, 384, 128
    q = _rand_q(gen, N, K, symmetric)
    s = _rand_scales(gen, K // group, N, dtype)
    z = None if symmetric else torch.randint(0, 16, (K // group, N), generator=gen, dtype=torch.uint8)
    w = pack_int4_quantized(q, s, z, group_size=group)
    zf = torch.zeros(N, K, dtype=torch.float64) if symmetric else \
        z.double().t().repeat_interleave(group, 1)
    expect = ((q.double() - zf) * s.double().t().repeat_interleave(group, 1)).to(dtype)
    got = dequantize(w)
    assert got.dtype == dtype and torch.equal(got, expect)
    assert torch.equal(dequantize(w, torch.float32), expect.float())


def test_int4_weight_state_dict_to_and_repr(gen):
    w = pack_int4(torch.randn(128, 256, generator=gen), 128, symmetric=False, dtype=torch.float16)
    sd = w.state_dict()
    assert set(sd) == {"qweight", "scales", "zeros", "meta"}
    assert all(isinstance(t, torch.Tensor) for t in sd.values())
    w2 = Int4Weight.from_state_dict(sd)
    assert torch.equal(dequantize(w2), dequantize(w)) and w2.shape == (128, 256) and not w2.symmetric
    assert (w2.in_features, w2.out_features, w2.group_size) == (256, 128, 128)
    wb = w.to(dtype=torch.bfloat16)
    assert wb.scales.dtype == torch.bfloat16 and wb.zeros.dtype == torch.bfloat16
    assert torch.equal(wb.qweight, w.qweight)
    assert w.to("cpu").qweight.device.type == "cpu"
    assert "layout v1" in repr(w) and "zero points" in repr(w)
    assert w.nbytes == 128 * 256 // 2 + 2 * 2 * 128 * 2


def test_other_layout_version_is_rejected(gen):
    w = pack_int4(torch.randn(64, 128, generator=gen), -1)
    sd = w.state_dict()
    sd["meta"] = sd["meta"].clone()
    sd["meta"][0] = LAYOUT_VERSION + 1
    with pytest.raises(ValueError, match="layout version"):
        Int4Weight.from_state_dict(sd)
    with pytest.raises(ValueError, match="layout version"):
        Int4Weight(w.qweight, w.scales, None, 128, 64, -1, layout_version=0)
    w.layout_version = 7  # mutated after construction: ops re-check
    with pytest.raises(ValueError, match="layout version 1 for `w`, got 7"):
        dequantize(w)
    with pytest.raises(ValueError, match="layout version"):
        unpack(w)


def test_bad_input_raises_clear_errors(gen):
    w = torch.randn(128, 256, generator=gen)
    with pytest.raises(ValueError, match=r"in_features K = 256 to be a multiple of `group_size` 96"):
        pack_int4(w, 96)
    with pytest.raises(ValueError, match="multiple of `group_size` 512"):
        pack_int4(w, 512)
    with pytest.raises(ValueError, match="positive multiple of 16"):
        pack_int4(w, 40)
    with pytest.raises(ValueError, match="out_features .* multiple of 64, got 100"):
        pack_int4(torch.randn(100, 256), -1)
    with pytest.raises(ValueError, match="in_features .* multiple of 16, got 250"):
        pack_int4(torch.randn(128, 250), -1)
    with pytest.raises(TypeError, match="floating `w`"):
        pack_int4(torch.zeros(128, 256, dtype=torch.int8))
    with pytest.raises(TypeError, match="expected `dtype` float16 or bfloat16"):
        pack_int4(w, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"shape \[out_features, in_features\]"):
        pack_int4(torch.randn(2, 128, 256))
    q = torch.randint(-8, 8, (128, 256), generator=gen, dtype=torch.int8)
    s = torch.rand(2, 128).half()
    with pytest.raises(TypeError, match="expected dtype .* for `q`, got float32"):
        pack_int4_quantized(q.float(), s)
    with pytest.raises(TypeError, match="for `scales`, got float32"):
        pack_int4_quantized(q, s.float())
    with pytest.raises(ValueError, match=r"expected `scales` of shape \[2, 128\], got \[128, 2\]"):
        pack_int4_quantized(q, s.t().contiguous())
    with pytest.raises(ValueError, match=r"expected `q` in \[-8, 7\] .* got values in \[-8, 9\]"):
        pack_int4_quantized(torch.cat([q[:, :-1], torch.full((128, 1), 9, dtype=torch.int8)], 1), s)
    with pytest.raises(ValueError, match=r"expected `q` in \[0, 15\]"):
        pack_int4_quantized(q, s, torch.zeros(2, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expected `zeros` in \[0, 15\]"):
        pack_int4_quantized(q + 8, s, torch.full((2, 128), 16, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"expected `zeros` of shape"):
        pack_int4_quantized(q + 8, s, torch.zeros(1, 128, dtype=torch.int32))
    good = pack_int4_quantized(q, s)
    with pytest.raises(ValueError, match=r"expected `qweight` of shape \[16, 256\]"):
        Int4Weight(good.qweight[:, :128], good.scales, None, 256, 128, 128)
    with pytest.raises(TypeError, match="expected an Int4Weight for `w`"):
        dequantize(good.qweight)


def test_python_and_kernel_agree_on_the_layout_version():
    from inferops._core.extension import extension

    ext = extension()
    if ext is None:
        pytest.skip("inferops._C not built")
    assert ext.INT4_LAYOUT_VERSION == LAYOUT_VERSION == ref.LAYOUT_VERSION
