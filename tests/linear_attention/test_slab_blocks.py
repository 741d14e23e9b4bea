"""SLAB's own block structures take our modules with their own arguments and give SLAB's answer.

The blocks (Swin with shifted windows and its attention mask, DeiT, PVT with spatial
reduction, CSWin with two stripe branches and LePE) and SLAB's attention are written here from SLAB's published architecture
(Guo et al., "SLAB: Efficient Transformers with Simplified Linear Attention and
Progressive Re-parameterized BatchNorm", ICML 2024, and its model definitions): each
block builds its attention exactly as SLAB's block code does (same positional and keyword
arguments, same forward call), once with the plain PyTorch SLA below, once with ours;
ours loads the SLAB block's state_dict (strict) and must match in float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inferops.linear_attention import SimplifiedLinearAttention, SLABCSwinAttention, SLABDeiTAttention, SLABPVTAttention
from inferops.testing import Tolerance, assert_close


# --- SLAB's attention, plain PyTorch (the oracle) --------------------------------------------


def _slab_math(q, k, v, num_heads, dwc, conv_v=None, grid=None):
    """ReLU features, the normalised linear attention in the quadratic form (an order of
    operations independent of the kernel's K^T V first), plus dwc on the token grid
    (square unless ``grid`` is given)."""
    B, N, C = q.shape
    split = lambda t: t.reshape(B, t.shape[1], num_heads, C // num_heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(F.relu(q)), split(F.relu(k)), split(v)
    scores = q @ k.transpose(-1, -2)                                   # [B, h, N, M]
    out = (scores @ v) / (q @ k.sum(2, keepdim=True).transpose(-1, -2) + 1e-6)
    cv = v if conv_v is None else split(conv_v)
    side = int(round(N ** 0.5))
    gh, gw = grid or (side, side)
    d = C // num_heads
    img = cv.reshape(B * num_heads, gh, gw, d).permute(0, 3, 1, 2)
    conv = dwc(img).permute(0, 2, 3, 1).reshape(B, num_heads, N, d)
    return (out + conv).transpose(1, 2).reshape(B, N, C)


class SlabSwinSLA(nn.Module):
    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0.,
                 focusing_factor=3, kernel_size=5):
        super().__init__()
        self.num_heads = num_heads
        d = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(attn_drop), nn.Linear(dim, dim), nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)
        self.positional_encoding = nn.Parameter(torch.zeros(1, window_size[0] * window_size[1], dim))

    def forward(self, x, mask=None):  # SLAB ignores the shifted-window mask
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj_drop(self.proj(_slab_math(q, k + self.positional_encoding, v, self.num_heads, self.dwc)))


class SlabDeiTSLA(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=False, attn_drop=0.1, proj_drop=0.1, focusing_factor=3):
        super().__init__()
        self.num_heads = num_heads
        d = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(attn_drop), nn.Linear(dim, dim), nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(d, d, 5, padding=2, groups=d)
        self.positional_encoding = nn.Parameter(torch.zeros(1, 14 * 14, dim))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj_drop(self.proj(_slab_math(q, k + self.positional_encoding, v, self.num_heads, self.dwc)))


class SlabPVTSLA(nn.Module):
    def __init__(self, dim, num_patches, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                 sr_ratio=1, focusing_factor=3, kernel_size=5, norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        d = dim // num_heads
        self.q, self.kv = nn.Linear(dim, dim, bias=qkv_bias), nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(attn_drop), nn.Linear(dim, dim), nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = norm_layer(dim)
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)
        self.positional_encoding = nn.Parameter(torch.zeros(1, num_patches // sr_ratio**2, dim))

    def forward(self, x, H, W):
        B, N, C = x.shape
        src = x
        if self.sr_ratio > 1:
            src = self.norm(self.sr(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2))
        k, v = self.kv(src).chunk(2, dim=-1)
        # reduced values are stretched back to N tokens (linear, along the token axis) for dwc
        conv_v = None if self.sr_ratio == 1 else F.interpolate(v.transpose(1, 2), size=N, mode="linear").transpose(1, 2)
        out = _slab_math(self.q(x), k + self.positional_encoding, v, self.num_heads, self.dwc, conv_v)
        return self.proj_drop(self.proj(out))


class SlabCSwinSLA(nn.Module):
    def __init__(self, dim, resolution, idx, split_size=7, dim_out=None, num_heads=8, attn_drop=0., proj_drop=0.,
                 qk_scale=None, focusing_factor=3, kernel_size=5):
        super().__init__()
        self.res, self.num_heads = resolution, num_heads
        self.hs, self.ws = {-1: (resolution, resolution), 0: (resolution, split_size), 1: (split_size, resolution)}[idx]
        d = dim // num_heads
        self.get_v = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # LePE
        self.attn_drop = nn.Dropout(attn_drop)
        self.dwc = nn.Conv2d(d, d, kernel_size, padding=kernel_size // 2, groups=d)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.hs * self.ws, dim))

    def forward(self, qkv):
        B, L, C = qkv.shape[1:]
        R, hs, ws = self.res, self.hs, self.ws

        def stripes(t):  # image tokens -> [B * windows, hs * ws, C], window-major
            return t.reshape(B, R // hs, hs, R // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, hs * ws, C)

        q, k, v = (stripes(t) for t in qkv)
        out = _slab_math(q, k + self.positional_encoding, v, self.num_heads, self.dwc, grid=(hs, ws))
        lepe = self.get_v(v.transpose(1, 2).reshape(-1, C, hs, ws)).flatten(2).transpose(1, 2)
        out = out + lepe
        return out.reshape(B, R // hs, R // ws, hs, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, L, C)


# --- the blocks, built as SLAB's model code builds them -----------------------------------------


class Mlp(nn.Sequential):
    def __init__(self, dim, ratio=4.0):
        super().__init__(nn.Linear(dim, int(dim * ratio)), nn.GELU(), nn.Linear(int(dim * ratio), dim))


def _windows(x, ws):  # [B, H, W, C] -> [B * nW, ws * ws, C]
    B, H, W, C = x.shape
    return x.reshape(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)


def _unwindows(w, ws, B, H, W):
    C = w.shape[-1]
    return w.reshape(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


class SwinBlock(nn.Module):
    def __init__(self, attn_cls, dim, input_resolution, num_heads, window_size=7, shift_size=0, qkv_bias=True,
                 qk_scale=None, drop=0., attn_drop=0., focusing_factor=3, kernel_size=5):
        super().__init__()
        self.res, self.ws, self.shift = input_resolution, window_size, shift_size
        self.norm1, self.norm2, self.mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), Mlp(dim)
        self.attn = attn_cls(dim, window_size=(window_size, window_size), num_heads=num_heads, qkv_bias=qkv_bias,
                             qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
                             focusing_factor=focusing_factor, kernel_size=kernel_size)
        mask = None
        if shift_size:
            H, W = input_resolution
            ids = torch.zeros(1, H, W, 1)
            cuts = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
            for n, (a, b) in enumerate((a, b) for a in cuts for b in cuts):
                ids[:, a, b] = n
            w = _windows(ids, window_size).squeeze(-1)
            mask = (w[:, None, :] != w[:, :, None]).float() * -100.0
        self.register_buffer("attn_mask", mask)

    def forward(self, x):
        H, W = self.res
        B, L, C = x.shape
        h = self.norm1(x).reshape(B, H, W, C)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), (1, 2))
        h = _unwindows(self.attn(_windows(h, self.ws), mask=self.attn_mask), self.ws, B, H, W)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), (1, 2))
        x = x + h.reshape(B, L, C)
        return x + self.mlp(self.norm2(x))


class DeiTBlock(nn.Module):
    def __init__(self, attn_cls, dim, num_heads, qkv_bias=False, drop=0., attn_drop=0., **extra):
        super().__init__()
        self.norm1, self.norm2, self.mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), Mlp(dim)
        self.attn = attn_cls(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, **extra)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PVTBlock(nn.Module):
    def __init__(self, attn_cls, dim, num_patches, num_heads, qkv_bias=True, qk_scale=None, drop=0., attn_drop=0.,
                 sr_ratio=1, focusing_factor=3, kernel_size=5):
        super().__init__()
        self.norm1, self.norm2, self.mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), Mlp(dim, 8.0)
        self.attn = attn_cls(dim, num_patches, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                             attn_drop=attn_drop, proj_drop=drop, sr_ratio=sr_ratio,
                             focusing_factor=focusing_factor, kernel_size=kernel_size, norm_layer=nn.LayerNorm)

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x))


class CSwinBlock(nn.Module):
    def __init__(self, attn_cls, dim, reso, num_heads, split_size=7, qkv_bias=False, qk_scale=None, drop=0.,
                 attn_drop=0., focusing_factor=3, kernel_size=5):
        super().__init__()
        self.reso = reso
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm1, self.norm2, self.mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), Mlp(dim)
        self.proj = nn.Linear(dim, dim)
        last = reso == split_size
        branches = [-1] if last else [0, 1]
        bdim, bheads = (dim, num_heads) if last else (dim // 2, num_heads // 2)
        self.attns = nn.ModuleList([
            attn_cls(bdim, resolution=reso, idx=i, split_size=split_size, num_heads=bheads, dim_out=bdim,
                     qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop, focusing_factor=focusing_factor,
                     kernel_size=kernel_size) for i in branches])

    def forward(self, x):
        B, L, C = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, L, 3, C).permute(2, 0, 1, 3)
        if len(self.attns) == 2:  # the channels split between the vertical and horizontal stripes
            att = torch.cat([self.attns[0](qkv[..., :C // 2]), self.attns[1](qkv[..., C // 2:])], dim=2)
        else:
            att = self.attns[0](qkv)
        x = x + self.proj(att)
        return x + self.mlp(self.norm2(x))


# --- tests -----------------------------------------------------------------------------------


def _randomize_(module, g):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # no zero positional encodings or biases


def _pair(g, block_cls, slab_attn, our_attn, *args, **kw):
    slab = block_cls(slab_attn, *args, **kw)
    _randomize_(slab, g)
    ours = block_cls(our_attn, *args, **kw)
    ours.load_state_dict(slab.state_dict(), strict=True)  # SLAB's keys, shapes and buffers
    return slab.eval(), ours.eval()


F32 = Tolerance(atol=1e-4, rtol=1e-4)  # fp32 sums over <= 196 tokens of O(1) terms


@pytest.mark.parametrize("shift,kernel_size", [(0, 5), (3, 5), (3, 3)], ids=["W-MSA", "SW-MSA", "kernel3"])
def test_swin_block(shift, kernel_size, gen):
    slab, ours = _pair(gen, SwinBlock, SlabSwinSLA, SimplifiedLinearAttention, 64, (14, 14), 2, window_size=7,
                       shift_size=shift, kernel_size=kernel_size)
    x = torch.randn(2, 14 * 14, 64, generator=gen)
    with torch.no_grad():
        assert_close(ours(x), slab.double()(x.double()), F32)


def test_deit_block(gen):
    slab, ours = _pair(gen, DeiTBlock, SlabDeiTSLA, SLABDeiTAttention, 128, 2)
    x = torch.randn(2, 196, 128, generator=gen)
    with torch.no_grad():
        assert_close(ours(x), slab.double()(x.double()), F32)


def test_deit_class_token(gen):
    """A ViT class token (the trial's 197 tokens): a clear error by default; with
    num_prefix_tokens=1 the grid rows are SLAB's and the class row reads the grid."""
    slab, ours = _pair(gen, DeiTBlock, SlabDeiTSLA, SLABDeiTAttention, 128, 2)
    x = torch.randn(2, 197, 128, generator=gen)
    with pytest.raises(ValueError, match="construct the module with num_prefix_tokens=1"):
        ours(x)
    ours = DeiTBlock(SLABDeiTAttention, 128, 2, num_prefix_tokens=1)
    ours.load_state_dict(slab.state_dict(), strict=True)
    ours.eval()
    with torch.no_grad():
        got = ours(x)
        slab64 = slab.double()
        assert_close(got[:, 1:], slab64(x[:, 1:].double()), F32)
        # class row: relu(q_c) sum_j relu(k_j) v_j / (relu(q_c) . sum_j relu(k_j) + 1e-6), then proj
        a = slab64.attn
        h = slab64.norm1(x.double())
        q, k, v = a.qkv(h).chunk(3, dim=-1)
        k = F.relu(k[:, 1:] + a.positional_encoding)
        qc = F.relu(q[:, :1])
        heads = []
        for i in range(2):
            s = slice(64 * i, 64 * (i + 1))
            num = torch.einsum("bk,bnk,bnc->bc", qc[:, 0, s], k[..., s], v[:, 1:, s])
            den = torch.einsum("bk,bnk->b", qc[:, 0, s], k[..., s]) + 1e-6
            heads.append(num / den[:, None])
        cls = x[:, 0].double() + a.proj(torch.cat(heads, -1))
        cls = cls + slab64.mlp(slab64.norm2(cls))
        assert_close(got[:, 0], cls, F32)


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_pvt_block(sr_ratio, gen):
    H = W = 8
    slab, ours = _pair(gen, PVTBlock, SlabPVTSLA, SLABPVTAttention, 64, H * W, 1, sr_ratio=sr_ratio)
    x = torch.randn(2, H * W, 64, generator=gen)
    with torch.no_grad():
        assert_close(ours(x, H, W), slab.double()(x.double(), H, W), F32)


@pytest.mark.parametrize("reso,split", [(14, 2), (7, 7)], ids=["stripes", "last-stage"])
def test_cswin_block(reso, split, gen):
    slab, ours = _pair(gen, CSwinBlock, SlabCSwinSLA, SLABCSwinAttention, 64, reso, 4, split_size=split)
    x = torch.randn(2, reso * reso, 64, generator=gen)
    with torch.no_grad():
        assert_close(ours(x), slab.double()(x.double()), F32)


def test_swin_wrong_window_tokens(gen):
    attn = SimplifiedLinearAttention(64, (7, 7), 2)
    with pytest.raises(ValueError, match=r"expected 49 tokens in `x` \(window 7 x 7\), got 50"):
        attn(torch.randn(1, 50, 64, generator=gen))


@pytest.mark.gpu
def test_blocks_on_kernels(gen, kernel_device):
    """The four blocks with the kernels (GPU, or the SIMT executor) against SLAB's math."""
    tol = Tolerance(atol=2e-3, rtol=2e-3)
    cases = [
        (_pair(gen, SwinBlock, SlabSwinSLA, SimplifiedLinearAttention, 64, (14, 14), 2, window_size=7, shift_size=3),
         (torch.randn(1, 196, 64, generator=gen),), ()),
        (_pair(gen, DeiTBlock, SlabDeiTSLA, SLABDeiTAttention, 128, 2), (torch.randn(1, 196, 128, generator=gen),), ()),
        (_pair(gen, PVTBlock, SlabPVTSLA, SLABPVTAttention, 64, 64, 1, sr_ratio=2),
         (torch.randn(1, 64, 64, generator=gen),), (8, 8)),
        (_pair(gen, CSwinBlock, SlabCSwinSLA, SLABCSwinAttention, 128, 14, 4, split_size=2),
         (torch.randn(1, 196, 128, generator=gen),), ()),
    ]
    with torch.no_grad():
        for (slab, ours), (x,), hw in cases:
            got = ours.to(kernel_device)(x.to(kernel_device), *hw)
            assert_close(got.cpu(), slab.double()(x.double(), *hw), tol)
