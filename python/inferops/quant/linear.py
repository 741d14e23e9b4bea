"""QuantLinear (drop-in quantized nn.Linear) and quantize_model_ (swap a model's Linears).

The OstQuant deployment recipe on top of the family's ops:

1. offline: fold rotations / scales into the weights (:func:`fuse_rotation`); with
   ``hadamard=True`` :meth:`QuantLinear.from_linear` folds ``H_n / sqrt(n)`` into the
   weight itself (``W' = W H / sqrt(n)``) and rotates the input online;
2. quantize the weights: int4 RTN (``w4a16``, group ``group_size`` or per-channel) or
   8-bit per-channel (``w8a8-int8`` / ``w8a8-fp8``);
3. run: ``w4a16_matmul`` on the (rotated) activations, or per-token quantization of the
   (rotated) activations (fused with the Hadamard in ``hadamard_quantize``) followed by
   ``w8a8_matmul``.

Every path runs on CPU through the ops' PyTorch references (slow but exact to the
kernels' semantics), so a quantized model can be checked anywhere.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from .hadamard import hadamard_factorization, hadamard_matrix, hadamard_quantize, prepare_hadamard
from .int4 import Int4Weight, pack_int4
from .w4a16 import w4a16_matmul
from .w8a8 import quantize_per_token, quantize_weight_per_channel, w8a8_matmul

__all__ = ["FORMATS", "QuantLinear", "quantize_model_"]

FORMATS = ("w4a16", "w8a8-int8", "w8a8-fp8")
_W8_DTYPES = {"w8a8-int8": torch.int8, "w8a8-fp8": torch.float8_e4m3fn}
_ACT_DTYPES = (torch.float16, torch.bfloat16)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"expected `format` one of {FORMATS}, got {fmt!r}")


class QuantLinear(nn.Module):
    """Drop-in ``nn.Linear`` with quantized weights; ``y = x W^T + b`` for ``x [..., in_features]``.

    Build it with :meth:`from_linear` (or :func:`quantize_model_`). Activations are fp16
    or bf16 (``dtype``, the dtype the layer was built for); the output has the same
    dtype. Buffers (``state_dict``): ``w4a16``: ``qweight`` (int32, kernel layout),
    ``scales``, optional ``zeros``, ``meta``; ``w8a8-*``: ``weight_q`` ``[N, K]`` int8 /
    fp8 e4m3 and ``weight_scale`` ``[N]`` fp32; ``bias`` in the activation dtype.

    Attributes: ``format``, ``group_size``, ``hadamard`` (the input is rotated online by
    ``H_n / sqrt(n)``, folded into the weight offline), ``in_features``, ``out_features``.
    """

    def __init__(self, in_features: int, out_features: int, *, format: str, dtype: torch.dtype,
                 group_size: int = 128, hadamard: bool = False) -> None:
        super().__init__()
        _check_format(format)
        if dtype not in _ACT_DTYPES:
            raise TypeError(f"expected `dtype` torch.float16 or torch.bfloat16, got {dtype}")
        if hadamard:
            hadamard_factorization(in_features)  # raises for unsupported sizes, listing them
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.format, self.group_size, self.hadamard, self.dtype = format, group_size, bool(hadamard), dtype
        self.register_buffer("bias", None)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, format: str = "w4a16", group_size: int = 128, hadamard: bool = False,
                    *, symmetric: bool = True, dtype: torch.dtype | None = None) -> QuantLinear:
        """Quantize ``linear`` (round to nearest) into a new module on the same device.

        Args:
            linear: the layer to replace (its weight is read, not modified).
            format: ``"w4a16"`` (int4 weights, fp16/bf16 activations), ``"w8a8-int8"`` or
                ``"w8a8-fp8"`` (per-channel 8-bit weights, per-token 8-bit activations).
            group_size: w4a16 only: input channels per scale (128, 64, ...) or -1 for
                per-channel; ``in_features`` must be a multiple of it.
            hadamard: fold ``H_n / sqrt(n)`` into the weight and rotate the input online
                (OstQuant/QuaRot down_proj); ``in_features`` must be a supported Hadamard size.
            symmetric: w4a16 only: symmetric int4 (else zero points).
            dtype: activation dtype; default the weight's dtype if fp16/bf16, else bf16.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear for `linear`, got {type(linear).__name__}")
        _check_format(format)
        w = linear.weight.detach()
        if dtype is None:
            dtype = w.dtype if w.dtype in _ACT_DTYPES else torch.bfloat16
        m = cls(linear.in_features, linear.out_features, format=format, dtype=dtype, group_size=group_size,
                hadamard=hadamard)
        w64 = w.to(torch.float64)
        if hadamard:  # x W^T = (x H/sqrt(n)) (W H/sqrt(n))^T since H H^T = n I
            w64 = w64 @ hadamard_matrix(linear.in_features, normalized=True).to(w.device)
            prepare_hadamard(linear.in_features, w.device)  # so a first call may be graph-captured
        if format == "w4a16":
            m._set_int4(pack_int4(w64.to(torch.float32), group_size, symmetric, dtype=dtype))
        else:
            q, s = quantize_weight_per_channel(w64.to(torch.float32), _W8_DTYPES[format])
            m.register_buffer("weight_q", q.contiguous())
            m.register_buffer("weight_scale", s.to(torch.float32).contiguous())
        if linear.bias is not None:
            m.register_buffer("bias", linear.bias.detach().to(dtype).clone())
        return m

    def _set_int4(self, w: Int4Weight) -> None:
        self.register_buffer("zeros", None)
        for name, t in w.state_dict().items():
            self.register_buffer(name, t)
        # The `meta` buffer (layout version, N, K, group) travels in state dicts; forward
        # uses this host copy, so it never reads `meta` back from the GPU (a sync per call).
        self._int4_meta = (w.layout_version, w.out_features, w.in_features, w.group_size)
        self.register_load_state_dict_post_hook(QuantLinear._reload_int4_meta)

    @staticmethod
    def _reload_int4_meta(module, incompatible_keys) -> None:
        version, N, K, group = (int(v) for v in module.meta.tolist())  # once per load
        module._int4_meta = (version, N, K, group)
        module._int4()  # validates: another layout version or shapes raise here, not in forward

    def _int4(self) -> Int4Weight:
        version, N, K, group = self._int4_meta
        return Int4Weight(self.qweight, self.scales, self.zeros, K, N, group, version)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"expected `x` in {self.dtype} (the dtype this QuantLinear was built for), got {x.dtype}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"expected `x` of shape [..., {self.in_features}], got {list(x.shape)}")
        if self.format == "w4a16":
            if self.hadamard:
                x = hadamard_quantize(x, None)[0]
            return w4a16_matmul(x, self._int4(), self.bias)
        qdtype = _W8_DTYPES[self.format]
        x_q, x_scale = hadamard_quantize(x, qdtype) if self.hadamard else quantize_per_token(x, qdtype)
        return w8a8_matmul(x_q, x_scale, self.weight_q, self.weight_scale, self.dtype, self.bias)

    def extra_repr(self) -> str:
        g = "" if self.format != "w4a16" else (", per-channel" if self.group_size == -1 else
                                                 f", group_size={self.group_size}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{g}, "
                f"hadamard={self.hadamard}, bias={self.bias is not None}, dtype={self.dtype}")


def _progress(i: int, n: int, name: str, t0: float, stream) -> None:
    width = 30
    done = width * i // max(n, 1)
    stream.write(f"\rquantize_model_ [{'#' * done}{'.' * (width - done)}] {i}/{n} "
                 f"{time.perf_counter() - t0:6.1f}s {name[-40:]:<40s}")
    if i == n:
        stream.write("\n")
    stream.flush()


@torch.no_grad()
def quantize_model_(model: nn.Module, format: str = "w4a16", group_size: int = 128, *,
                    hadamard: bool | Callable[[str, nn.Linear], bool] = False,
                    include: Callable[[str, nn.Linear], bool] | None = None,
                    skip: tuple[str, ...] = ("lm_head",), symmetric: bool = True,
                    dtype: torch.dtype | None = None, progress: bool = True, stream=None) -> dict[str, str]:
    """Replace ``model``'s ``nn.Linear`` layers by :class:`QuantLinear` in place.

    Args:
        format, group_size, symmetric, dtype: as :meth:`QuantLinear.from_linear`.
        hadamard: bool for every layer, or ``f(name, linear) -> bool`` (e.g. only the
            ``down_proj`` layers, as OstQuant/QuaRot do).
        include: ``f(name, linear) -> bool`` choosing the layers to quantize (default all);
            layers whose name ends with one of ``skip`` are kept in float.
        progress: a progress bar on ``stream`` (default stderr).

    Layers that cannot be quantized in this format (shape not supported: e.g. w4a16
    needs ``out_features % 64 == 0`` and ``in_features % group_size == 0``; w8a8
    ``in_features % 16 == 0``) raise before any layer is replaced, naming them.

    Returns ``{name: "format[, hadamard]"}`` for the replaced layers.
    """
    _check_format(format)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)
               and (include is None or include(name, mod))]
    plans = []
    for name, lin in targets:
        had = hadamard(name, lin) if callable(hadamard) else bool(hadamard)
        reason = _unsupported(lin, format, group_size, had)
        if reason:
            raise ValueError(f"cannot quantize `{name}` ({lin.in_features}->{lin.out_features}) as {format}: "
                             f"{reason} (exclude it with `include` or `skip`)")
        plans.append((name, lin, had))
    stream = sys.stderr if stream is None else stream
    t0 = time.perf_counter()
    done = {}
    for i, (name, lin, had) in enumerate(plans):
        q = QuantLinear.from_linear(lin, format, group_size, had, symmetric=symmetric, dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        done[name] = format + (", hadamard" if had else "")
        if progress:
            _progress(i + 1, len(plans), name, t0, stream)
    return done


def _unsupported(lin: nn.Linear, format: str, group_size: int, hadamard: bool) -> str | None:
    K, N = lin.in_features, lin.out_features
    if hadamard:
        try:
            hadamard_factorization(K)
        except ValueError as e:
            return str(e)
    if format == "w4a16":
        if N % 64 or K % 16:
            return "w4a16 needs out_features % 64 == 0 and in_features % 16 == 0"
        if group_size != -1 and K % group_size:
            return f"in_features is not a multiple of group_size = {group_size}"
        return None
    if K % 16:
        return "w8a8 needs in_features % 16 == 0"
    return None
