"""Int4 weights in the W4A16 kernel's own layout: :class:`Int4Weight`, :func:`pack_int4`
(round-to-nearest), :func:`pack_int4_quantized` (bring your own quantizer: GPTQ,
OstQuant, ...), :func:`unpack` and :func:`dequantize`.

Layout and value conventions: inferops.reference.quant_w4a16 and docs/quant.md
("Weight packing and W4A16"). Kernel: csrc/quant/w4a16.cu (``int4_dequantize``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from ..reference import quant_w4a16 as ref
from ..validation import check_dtype, check_tensor

__all__ = ["LAYOUT_VERSION", "Int4Weight", "dequantize", "pack_int4", "pack_int4_quantized", "unpack"]

LAYOUT_VERSION = ref.LAYOUT_VERSION
SCALE_DTYPES = (torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_group_size(group_size, K: int) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"expected an int `group_size`, got {type(group_size).__name__}")
    if group_size == -1:
        return
    if group_size <= 0 or group_size % 16:
        raise ValueError(f"expected `group_size` -1 (per-channel) or a positive multiple of 16, got {group_size}")
    if K % group_size:
        raise ValueError(f"expected in_features K = {K} to be a multiple of `group_size` {group_size}")


def _check_features(name: str, N: int, K: int) -> None:
    if N % ref.TILE_N or N == 0:
        raise ValueError(f"expected out_features (dim 0 of `{name}`) a positive multiple of 64, got {N}")
    if K % ref.TILE_K or K == 0:
        raise ValueError(f"expected in_features (dim 1 of `{name}`) a positive multiple of 16, got {K}")


@dataclass(eq=False)
class Int4Weight:
    """An int4 weight ``W [out_features, in_features]`` packed for :func:`w4a16_matmul`.

    Attributes:
        qweight: int32 ``[K // 16, 2 * N]``, the kernel's fragment-order layout
            (``layout_version``; see docs/quant.md). Do not index it as a matrix.
        scales: ``[G, N]`` fp16 or bf16 (the activations' dtype), ``G = K // group_size``
            (1 for per-channel), natural column order.
        zeros: ``[G, N]`` in the scales' dtype holding integer zero points 0..15 (16 also
            works exactly: GPTQ v1 checkpoints store ``z - 1`` up to 15), or None for
            symmetric weights (``q in [-8, 7]``). ``W = (q_stored - z) * s``.
        in_features, out_features: K and N.
        group_size: k per scale group, or -1 for one group per output channel.
        layout_version: checked against :data:`LAYOUT_VERSION` at construction and by
            every op, so weights packed by another inferops version fail loudly.

    Plain tensors, so a module can register them as buffers
    (:meth:`state_dict` / :meth:`from_state_dict` round-trip everything).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    in_features: int
    out_features: int
    group_size: int
    layout_version: int = LAYOUT_VERSION

    def __post_init__(self) -> None:
        self.check()

    # -- properties -----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def group_len(self) -> int:
        """k rows per scale group (``in_features`` for per-channel)."""
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        z = 0 if self.zeros is None else self.zeros.numel() * self.zeros.element_size()
        return self.qweight.numel() * 4 + self.scales.numel() * self.scales.element_size() + z

    # -- checks ---------------------------------------------------------------------------
    def check(self) -> None:
        """Raise if the fields do not describe a valid packed weight of this layout version."""
        if self.layout_version != LAYOUT_VERSION:
            raise ValueError(f"expected int4 layout version {LAYOUT_VERSION} for `w`, got {self.layout_version} "
                             "(packed by another inferops version: re-pack the weight with pack_int4)")
        N, K = self.out_features, self.in_features
        _check_features("w", N, K)
        _check_group_size(self.group_size, K)
        check_tensor("qweight", self.qweight)
        check_dtype("qweight", self.qweight, (torch.int32,))
        if tuple(self.qweight.shape) != (K // 16, 2 * N):
            raise ValueError(f"expected `qweight` of shape {[K // 16, 2 * N]} for a [{N}, {K}] weight, "
                             f"got {list(self.qweight.shape)}")
        check_tensor("scales", self.scales)
        check_dtype("scales", self.scales, SCALE_DTYPES)
        G = K // self.group_len
        if tuple(self.scales.shape) != (G, N):
            raise ValueError(f"expected `scales` of shape {[G, N]}, got {list(self.scales.shape)}")
        if self.zeros is not None:
            check_tensor("zeros", self.zeros)
            check_dtype("zeros", self.zeros, (self.scales.dtype,))
            if tuple(self.zeros.shape) != (G, N):
                raise ValueError(f"expected `zeros` of shape {[G, N]}, got {list(self.zeros.shape)}")
        for name, t in (("scales", self.scales), ("zeros", self.zeros)):
            if t is not None and t.device != self.qweight.device:
                raise ValueError(f"expected `{name}` on the device of `qweight` ({self.qweight.device}), "
                                 f"got {t.device}")

    # -- conversions ----------------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Int4Weight:
        """A copy on ``device`` and / or with scales (and zeros) in ``dtype`` (fp16 / bf16)."""
        if dtype is not None and dtype not in SCALE_DTYPES:
            raise TypeError(f"expected dtype float16 or bfloat16 for the scales, got {dtype}")

        def move(t, cast):
            if t is None:
                return None
            t = t.to(device) if device is not None else t
            return t.to(dtype) if (cast and dtype is not None) else t

        return Int4Weight(move(self.qweight, False), move(self.scales, True), move(self.zeros, True),
                          self.in_features, self.out_features, self.group_size, self.layout_version)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (``meta`` = int64 [layout_version, out_features, in_features, group_size])."""
        d = {"qweight": self.qweight, "scales": self.scales,
             "meta": torch.tensor([self.layout_version, self.out_features, self.in_features, self.group_size],
                                  dtype=torch.int64)}
        if self.zeros is not None:
            d["zeros"] = self.zeros
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> Int4Weight:
        """Inverse of :meth:`state_dict`; raises on another layout version."""
        for key in ("qweight", "scales", "meta"):
            if key not in d:
                raise KeyError(f"expected key {key!r} in an Int4Weight state dict, got {sorted(d)}")
        version, N, K, group = (int(v) for v in d["meta"].tolist())
        return cls(d["qweight"], d["scales"], d.get("zeros"), K, N, group, version)

    def unpack(self):
        return unpack(self)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)

    def __repr__(self) -> str:
        kind = "symmetric" if self.symmetric else "zero points"
        g = "per-channel" if self.group_size == -1 else f"group {self.group_size}"
        return (f"Int4Weight([{self.out_features}, {self.in_features}], {g}, {kind}, "
                f"{str(self.dtype).replace('torch.', '')}, device={self.device}, layout v{self.layout_version})")


def pack_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True, *,
              dtype: torch.dtype | None = None) -> Int4Weight:
    """Quantize ``w`` (round to nearest) and pack it for :func:`w4a16_matmul`.

    Args:
        w: ``[N, K]`` floating weight (nn.Linear layout), any device; N a multiple
            of 64, K a multiple of 16 and of ``group_size``.
        group_size: k per scale group (a multiple of 16: 64 and 128 are the usual),
            or -1 for per-channel scales.
        symmetric: ``s = max|w| / 7``, ``q in [-8, 7]``; else min/max with a zero
            point per group (``q in [0, 15]``).
        dtype: the scales' dtype = the activations' dtype (fp16 or bf16); default
            ``w.dtype`` when it is one of those, else bfloat16.
    """
    check_tensor("w", w)
    if not w.is_floating_point():
        raise TypeError(f"expected a floating `w`, got {w.dtype} (integer weights: use pack_int4_quantized)")
    if w.dim() != 2:
        raise ValueError(f"expected `w` of shape [out_features, in_features], got {list(w.shape)}")
    N, K = w.shape
    _check_features("w", N, K)
    _check_group_size(group_size, K)
    if dtype is None:
        dtype = w.dtype if w.dtype in SCALE_DTYPES else torch.bfloat16
    if dtype not in SCALE_DTYPES:
        raise TypeError(f"expected `dtype` float16 or bfloat16 for the scales, got {dtype}")
    q, scales, zeros = ref.quantize_rtn(w, group_size, bool(symmetric), dtype)
    u = q + 8 if symmetric else q
    return Int4Weight(ref.pack_nibbles(u), scales, None if zeros is None else zeros.to(dtype), K, N, group_size)


def pack_int4_quantized(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None, *,
                        group_size: int = 128) -> Int4Weight:
    """Pack already-quantized weights (from GPTQ, OstQuant, ... : bring your own quantizer).

    Args:
        q: ``[N, K]`` integers: in [-8, 7] when ``zeros`` is None (symmetric,
            ``W = q * s``), else in [0, 15] (``W = (q - z) * s``). Checked (one sync).
        scales: ``[K // group_size, N]`` fp16 or bf16 (``[1, N]`` for group_size -1).
        zeros: ``[K // group_size, N]`` integers in [0, 15], or None.
        group_size: as :func:`pack_int4`.
    """
    check_tensor("q", q)
    check_dtype("q", q, _INT_DTYPES)
    if q.dim() != 2:
        raise ValueError(f"expected `q` of shape [out_features, in_features], got {list(q.shape)}")
    N, K = q.shape
    _check_features("q", N, K)
    _check_group_size(group_size, K)
    check_tensor("scales", scales)
    check_dtype("scales", scales, SCALE_DTYPES)
    G = K // (K if group_size == -1 else group_size)
    if tuple(scales.shape) != (G, N):
        raise ValueError(f"expected `scales` of shape {[G, N]}, got {list(scales.shape)}")
    lo, hi = (-8, 7) if zeros is None else (0, 15)
    qmin, qmax = (int(v) for v in torch.stack([q.min(), q.max()]).tolist())
    if qmin < lo or qmax > hi:
        kind = "symmetric (zeros=None)" if zeros is None else "with zero points"
        raise ValueError(f"expected `q` in [{lo}, {hi}] for {kind} int4 weights, got values in [{qmin}, {qmax}]")
    z = None
    if zeros is not None:
        check_tensor("zeros", zeros)
        check_dtype("zeros", zeros, _INT_DTYPES)
        if tuple(zeros.shape) != (G, N):
            raise ValueError(f"expected `zeros` of shape {[G, N]}, got {list(zeros.shape)}")
        zmin, zmax = (int(v) for v in torch.stack([zeros.min(), zeros.max()]).tolist())
        if zmin < 0 or zmax > 15:
            raise ValueError(f"expected `zeros` in [0, 15], got values in [{zmin}, {zmax}]")
        z = zeros.to(device=q.device, dtype=scales.dtype).contiguous()
    if scales.device != q.device:
        raise ValueError(f"expected `scales` on the device of `q` ({q.device}), got {scales.device}")
    u = q.to(torch.int16) + (8 if zeros is None else 0)
    return Int4Weight(ref.pack_nibbles(u), scales.contiguous(), z, K, N, group_size)


def unpack(w: Int4Weight):
    """``(q, scales, zeros)``: ``q`` int8 ``[N, K]`` (in [-8, 7] if symmetric, else
    [0, 15]), scales ``[G, N]``, zeros int8 ``[G, N]`` or None; exact inverse of packing."""
    _check_weight(w)
    u = ref.unpack_nibbles(w.qweight).to(torch.int8)
    if w.zeros is None:
        return u - 8, w.scales, None
    return u, w.scales, w.zeros.to(torch.int8)


def _check_weight(w) -> None:
    if not isinstance(w, Int4Weight):
        raise TypeError(f"expected an Int4Weight for `w` (see pack_int4), got {type(w).__name__}")
    w.check()


# --- int4_dequantize op --------------------------------------------------------------------


def _dequant_cuda(qweight, scales, zeros, group_size):
    N, K = scales.shape[1], qweight.shape[0] * 16
    out = torch.empty((N, K), dtype=scales.dtype, device=qweight.device)
    d = ops.dlpack
    ops.ext().int4_dequantize(d(qweight), d(scales), None if zeros is None else d(zeros), d(out), group_size,
                              ops.cuda_stream(qweight.device))
    return out


def _dequant_fake(qweight, scales, zeros, group_size):
    return scales.new_empty((scales.shape[1], qweight.shape[0] * 16))


@ops.register_op("int4_dequantize", family="quant", fake=_dequant_fake, cuda_impl=_dequant_cuda)
def _dequant_op(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int) -> torch.Tensor:
    return ref.dequantize(qweight, scales, zeros, group_size)


def dequantize(w: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W [N, K]`` in the scales' dtype (exactly the GEMM's B operand), optionally cast
    to ``dtype`` afterwards. GPU: one kernel; CPU: the reference."""
    _check_weight(w)
    out = torch.ops.inferops.int4_dequantize(w.qweight, w.scales, w.zeros, w.group_len)
    return out if dtype is None else out.to(dtype)


# --- main-job demo -------------------------------------------------------------------------


def _demo_shape(device):
    return (4096, 4096) if device.type == "cuda" else (256, 512)


def _demo_inputs(device, g):
    N, K = _demo_shape(device)
    w = (torch.randn(N, K, generator=g) * 0.02).to(device)
    return (pack_int4(w, 128, symmetric=False, dtype=torch.bfloat16),)


register_demo(Demo(
    op="int4_dequantize",
    sizes=lambda d: "N={} K={} g128 zero points".format(*_demo_shape(d)),
    make_inputs=_demo_inputs,
    run=lambda w: dequantize(w),
    baseline=lambda w: ref.dequantize(w.qweight, w.scales, w.zeros, w.group_len),
    reference64=lambda w: ref.dequantize(w.qweight, w.scales, w.zeros, w.group_len).double(),
    dtype=torch.bfloat16,
))
