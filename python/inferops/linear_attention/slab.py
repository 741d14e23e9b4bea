"""Drop-in SLAB attention modules: SLAB's constructors, forward signatures and parameter
names, running :func:`~inferops.linear_attention.simplified_linear_attention`.

SLAB (Guo et al., 2024) ships its simplified linear attention (SLA) inside four model
families, each with its own module signature; each class here takes that family's exact
arguments and ``state_dict`` keys, so a SLAB checkpoint loads with ``load_state_dict``
and the model's own block code calls it unchanged:

=====================================  ==================================================
SLAB (classification/models/...)       inferops
=====================================  ==================================================
``slab_swin.SimplifiedLinearAttention``  :class:`SimplifiedLinearAttention`
``(dim, window_size, num_heads, ...)``   ``forward(x, mask=None)``; ``mask`` is accepted and
                                         ignored, as SLAB does (linear attention has no
                                         shifted-window mask)
``slab_deit.Attention``                  :class:`SLABDeiTAttention`, ``forward(x)``
``(dim, num_heads, ...)``                14 x 14 token grid as SLAB; ``num_prefix_tokens``
                                         (keyword, ours) for class/distillation tokens
``slab_pvt.SimplifiedLinearAttention``   :class:`SLABPVTAttention`, ``forward(x, H, W)``;
``(dim, num_patches, num_heads, ...)``   ``sr_ratio > 1`` (reduced keys/values) supported
``slab_cswin.SimplifiedLinearAttention``  :class:`SLABCSwinAttention`, ``forward(qkv)``:
``(dim, resolution, idx, split_size, ...)``  stripe windows, plus CSWin's LePE (``get_v``)
=====================================  ==================================================

The math of every class is SLAB's: ``q, k, v`` from the projection(s), the learned
``positional_encoding`` added to ``k``, ReLU features, ``relu(q) (relu(k)^T v) /
(relu(q) . sum relu(k) + 1e-6)`` in fp32, plus the depthwise conv (``dwc``, shared by the
heads) of ``v`` on the token grid, then ``proj``. Arguments SLAB accepts but does not use
(``qk_scale``, ``focusing_factor``, ``attn_drop``) are accepted and stored the same way.

Where the kernel cannot do the whole op, the module composes (documented per class): a
``kernel_size`` other than 5 or a PVT ``sr_ratio > 1`` runs the attention in the kernel
with a zero conv and adds the conv with ``torch.nn.functional.conv2d``. Inference only
(the op has no backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.linear_attention import SLA_EPS
from .sla import simplified_linear_attention

__all__ = ["SimplifiedLinearAttention", "SLABDeiTAttention", "SLABPVTAttention", "SLABCSwinAttention"]


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, C]`` -> ``[B, heads, N, C / heads]`` (a view; channel = head * d + c, as SLAB's
    ``"b n (h c)"``)."""
    B, N, C = t.shape
    return t.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    B, H, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, H * d)


def _grid_conv(v: torch.Tensor, dwc: nn.Conv2d, hw) -> torch.Tensor:
    """SLAB's ``dwc`` of ``v`` ``[B, heads, N, d]`` on the ``h x w`` grid (row-major tokens), in
    fp32; returns ``[B, heads, N, d]``."""
    B, H, N, d = v.shape
    grid = v.float().reshape(B * H, hw[0], hw[1], d).permute(0, 3, 1, 2)
    bias = None if dwc.bias is None else dwc.bias.float()
    out = F.conv2d(grid, dwc.weight.float(), bias, padding=dwc.padding, groups=d)
    return out.permute(0, 2, 3, 1).reshape(B, H, N, d)


def _sla(q, k, v, dwc: nn.Conv2d, hw, conv_input=None) -> torch.Tensor:
    """The op with SLAB's conv: in the kernel when it is the 5 x 5 conv of ``v`` itself,
    else the kernel's attention (zero conv) plus the conv of ``conv_input`` in PyTorch."""
    if conv_input is None and tuple(dwc.kernel_size) == (5, 5):
        return simplified_linear_attention(q, k, v, dwc.weight, dwc.bias, hw)
    d = q.shape[-1]
    zero = torch.zeros(d, 1, 5, 5, device=q.device)
    att = simplified_linear_attention(q, k, v, zero, None, hw)
    conv = _grid_conv(v if conv_input is None else conv_input, dwc, hw)
    return (att.float() + conv).to(q.dtype)


def _check_tokens(x: torch.Tensor, dim: int, n_expected: int, what: str) -> None:
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"expected `x` of shape [batch, tokens, {dim}], got {list(x.shape)}")
    if x.shape[1] != n_expected:
        raise ValueError(f"expected {n_expected} tokens in `x` ({what}), got {x.shape[1]}")


class SimplifiedLinearAttention(nn.Module):
    """SLAB's Swin attention (``slab_swin.SimplifiedLinearAttention``), same constructor,
    forward and parameters: ``qkv``, ``proj``, ``dwc`` (``Conv2d(head_dim, head_dim,
    kernel_size, groups=head_dim)``), ``positional_encoding`` ``[1, Wh * Ww, dim]``.

    ``forward(x, mask=None)``: ``x`` ``[num_windows * B, Wh * Ww, dim]`` (any float dtype the
    op takes); ``mask`` (Swin's shifted-window mask) is accepted and ignored, as SLAB's
    module ignores it. Returns ``[num_windows * B, Wh * Ww, dim]``.
    """

    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0., proj_drop=0.,
                 focusing_factor=3, kernel_size=5):
        super().__init__()
        window_size = tuple(int(s) for s in window_size)
        if dim % num_heads:
            raise ValueError(f"expected `dim` ({dim}) divisible by `num_heads` ({num_heads})")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.focusing_factor = focusing_factor  # accepted, unused (as SLAB)
        self.qk_scale = qk_scale  # accepted, unused (as SLAB: SLA has no qk scale)
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, window_size[0] * window_size[1], dim))

    def forward(self, x, mask=None):
        _check_tokens(x, self.dim, self.window_size[0] * self.window_size[1],
                      f"window {self.window_size[0]} x {self.window_size[1]}")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.dim)).unbind(2)
        k = k + self.positional_encoding
        h = self.num_heads
        out = _sla(_heads(q, h), _heads(k, h), _heads(v, h), self.dwc, self.window_size)
        return self.proj_drop(self.proj(_merge(out).to(x.dtype)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"


class SLABDeiTAttention(nn.Module):
    """SLAB's DeiT attention (``slab_deit.Attention``), same constructor, forward and
    parameters (``qkv``, ``proj``, ``dwc`` 5 x 5, ``positional_encoding`` ``[1, 196, dim]``:
    SLAB fixes the 14 x 14 grid of a 224-pixel image in 16-pixel patches).

    ``forward(x)``: ``x`` ``[B, num_prefix_tokens + 196, dim]``. SLAB's DeiT has no class
    token (it pools the 196 tokens), so ``num_prefix_tokens`` defaults to 0; ours (keyword
    only) lets a ViT with class / distillation tokens first use the module: those tokens
    are queries only. Each reads the grid's keys and values through the same normalised
    linear attention (``relu(q_cls) KV / (relu(q_cls) . ksum + 1e-6)``, no conv, no
    positional encoding), and the grid tokens' outputs are exactly SLAB's (they do not
    attend to the prefix). The prefix rows are computed in PyTorch (one more ``K^T V``
    reduction), the grid in the kernel.
    """

    def __init__(self, dim, num_heads, qkv_bias=False, attn_drop=0.1, proj_drop=0.1, focusing_factor=3, *,
                 num_prefix_tokens: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"expected `dim` ({dim}) divisible by `num_heads` ({num_heads})")
        if num_prefix_tokens < 0:
            raise ValueError(f"expected num_prefix_tokens >= 0, got {num_prefix_tokens}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim = dim // num_heads
        self.focusing_factor = focusing_factor  # accepted, unused (as SLAB)
        self.num_prefix_tokens = num_prefix_tokens
        self.grid = (14, 14)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, 5, padding=2, groups=self.head_dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, 14 * 14, dim))

    def forward(self, x):
        p, n = self.num_prefix_tokens, self.grid[0] * self.grid[1]
        if x.dim() == 3 and x.shape[1] == n + 1 and p == 0:
            raise ValueError(f"expected {n} tokens in `x` (SLAB's 14 x 14 grid), got {n + 1}: for a class token "
                             "construct the module with num_prefix_tokens=1")
        _check_tokens(x, self.dim, p + n, f"{p} prefix + 14 x 14 grid tokens")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.dim)).unbind(2)
        h = self.num_heads
        qg, kg, vg = _heads(q[:, p:], h), _heads(k[:, p:] + self.positional_encoding, h), _heads(v[:, p:], h)
        grid = _sla(qg, kg, vg, self.dwc, self.grid)
        if p:
            kf, vf = F.relu(kg.float()), vg.float()
            kv = torch.einsum("bhnk,bhnc->bhkc", kf, vf)
            qp = F.relu(_heads(q[:, :p], h).float())
            den = torch.einsum("bhpk,bhk->bhp", qp, kf.sum(2)) + SLA_EPS
            prefix = torch.einsum("bhpk,bhkc->bhpc", qp, kv) / den[..., None]
            grid = torch.cat([prefix.to(grid.dtype), grid], dim=2)
        return self.proj_drop(self.proj(_merge(grid).to(x.dtype)))


class SLABPVTAttention(nn.Module):
    """SLAB's PVT attention (``slab_pvt.SimplifiedLinearAttention``), same constructor,
    forward and parameters: ``q``, ``kv``, ``proj``, ``dwc``, ``positional_encoding``
    ``[1, num_patches / sr_ratio^2, dim]``, and with ``sr_ratio > 1`` ``sr`` (a strided
    ``Conv2d``) and ``norm`` (``norm_layer(dim)``) that reduce the keys and values.

    ``forward(x, H, W)``: ``x`` ``[B, H * W, dim]``. With ``sr_ratio == 1`` the whole op runs
    in the kernel. With ``sr_ratio > 1`` the keys/values are ``N / sr^2`` tokens: the kernel
    runs the attention with them zero-padded to N (``relu(0) = 0`` adds nothing to
    ``K^T V`` or the key sum, so the result is exact) and a zero conv, and the conv runs in
    PyTorch on ``v`` linearly interpolated to N tokens, as SLAB does.
    """

    def __init__(self, dim, num_patches, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                 sr_ratio=1, focusing_factor=3, kernel_size=5, norm_layer=nn.LayerNorm):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"expected `dim` ({dim}) divisible by `num_heads` ({num_heads})")
        self.dim, self.num_heads, self.sr_ratio = dim, num_heads, sr_ratio
        self.num_patches = num_patches
        self.focusing_factor = focusing_factor  # accepted, unused (as SLAB)
        self.qk_scale = qk_scale  # accepted, unused (as SLAB)
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = norm_layer(dim)
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.positional_encoding = nn.Parameter(torch.zeros(1, num_patches // (sr_ratio * sr_ratio), dim))

    def forward(self, x, H, W):
        _check_tokens(x, self.dim, int(H) * int(W), f"H x W = {H} x {W}")
        B, N, C = x.shape
        q = self.q(x)
        if self.sr_ratio > 1:
            red = self.sr(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
            kv = self.kv(self.norm(red))
        else:
            kv = self.kv(x)
        k, v = kv.unflatten(-1, (2, C)).unbind(2)
        k = k + self.positional_encoding
        h = self.num_heads
        if self.sr_ratio == 1:
            out = _sla(_heads(q, h), _heads(k, h), _heads(v, h), self.dwc, (H, W))
        else:
            m = k.shape[1]
            if m > N:
                raise ValueError(f"expected at most {N} reduced key tokens, got {m}")
            pad = x.new_zeros(B, N - m, C).to(k.dtype)
            kp, vp = torch.cat([k, pad], 1), torch.cat([v, pad], 1)
            v_up = F.interpolate(v.transpose(1, 2), size=N, mode="linear").transpose(1, 2)
            out = _sla(_heads(q, h), _heads(kp, h), _heads(vp, h), self.dwc, (H, W), conv_input=_heads(v_up, h))
        return self.proj_drop(self.proj(_merge(out).to(x.dtype)))


class SLABCSwinAttention(nn.Module):
    """SLAB's CSWin attention (``slab_cswin.SimplifiedLinearAttention``), same constructor,
    forward and parameters: ``get_v`` (CSWin's LePE, a 3 x 3 depthwise conv over all
    ``dim`` channels), ``dwc``, ``scale`` (declared by SLAB, unused) and
    ``positional_encoding`` ``[1, H_sp * W_sp, dim]``; no projection (CSWin's block owns
    ``qkv`` and ``proj`` and splits the channels between two stripe branches).

    ``idx`` picks the stripes of a ``resolution x resolution`` image: -1 the whole image,
    0 ``resolution x split_size`` (vertical), 1 ``split_size x resolution`` (horizontal).
    ``forward(qkv)``: ``qkv`` ``[3, B, resolution^2, dim]`` (q, k, v stacked, last dim
    contiguous, e.g. a channel slice of the block's projection); returns ``[B, L, dim]``:
    per stripe window, SLAB's attention with the ``dwc`` conv on the ``H_sp x W_sp`` window
    (in the kernel), plus the LePE of ``v`` (``F.conv2d`` in PyTorch).
    """

    def __init__(self, dim, resolution, idx, split_size=7, dim_out=None, num_heads=8, attn_drop=0., proj_drop=0.,
                 qk_scale=None, focusing_factor=3, kernel_size=5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"expected `dim` ({dim}) divisible by `num_heads` ({num_heads})")
        if idx == -1:
            h_sp, w_sp = resolution, resolution
        elif idx == 0:
            h_sp, w_sp = resolution, split_size
        elif idx == 1:
            h_sp, w_sp = split_size, resolution
        else:
            raise ValueError(f"expected `idx` -1, 0 or 1, got {idx!r}")
        if resolution % h_sp or resolution % w_sp:
            raise ValueError(f"expected `split_size` ({split_size}) to divide `resolution` ({resolution})")
        self.dim, self.dim_out, self.resolution = dim, dim_out or dim, resolution
        self.split_size, self.num_heads = split_size, num_heads
        self.H_sp, self.W_sp = h_sp, w_sp
        self.focusing_factor = focusing_factor  # accepted, unused (as SLAB)
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)
        self.attn_drop = nn.Dropout(attn_drop)
        head_dim = dim // num_heads
        self.dwc = nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))  # SLAB declares it and never reads it
        self.positional_encoding = nn.Parameter(torch.zeros(1, h_sp * w_sp, dim))

    def _windows(self, t):
        """``[B, H * W, C]`` (row-major image) -> ``[B * windows, H_sp * W_sp, C]``."""
        B, _, C = t.shape
        R, hs, ws = self.resolution, self.H_sp, self.W_sp
        return t.reshape(B, R // hs, hs, R // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, hs * ws, C)

    def _image(self, t, B):
        R, hs, ws = self.resolution, self.H_sp, self.W_sp
        C = t.shape[-1]
        return t.reshape(B, R // hs, R // ws, hs, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, R * R, C)

    def forward(self, qkv):
        if qkv.dim() != 4 or qkv.shape[0] != 3 or qkv.shape[-1] != self.dim:
            raise ValueError(f"expected `qkv` of shape [3, B, tokens, {self.dim}], got {list(qkv.shape)}")
        R = self.resolution
        if qkv.shape[2] != R * R:
            raise ValueError(f"expected {R * R} tokens in `qkv` (resolution {R} x {R}), got {qkv.shape[2]}")
        B = qkv.shape[1]
        q, k, v = (self._windows(t) for t in qkv.unbind(0))
        k = k + self.positional_encoding
        h = self.num_heads
        out = _merge(_sla(_heads(q, h), _heads(k, h), _heads(v, h), self.dwc, (self.H_sp, self.W_sp)))
        lepe = self.get_v(v.transpose(1, 2).reshape(v.shape[0], self.dim, self.H_sp, self.W_sp))
        out = out.to(lepe.dtype) + lepe.flatten(2).transpose(1, 2)
        return self._image(out, B)
