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
from .w8a8_linear import w8a8_linear
from .w8a8 import quantize_weight_per_channel

__all__ = ["CONFIG_FIELDS", "FORMATS", "QuantLinear", "decode_config", "hf_quantization_config", "quantize_model_",
           "set_hf_quantization_config"]

FORMATS = ("w4a16", "w8a8-int8", "w8a8-fp8")
_W8_DTYPES = {"w8a8-int8": torch.int8, "w8a8-fp8": torch.float8_e4m3fn}
_ACT_DTYPES = (torch.float16, torch.bfloat16)

# `quant_config`: int64 [len(CONFIG_FIELDS)], one per layer, saved with the weights so a
# checkpoint says how it was quantized (format, group, symmetry, rotation, packing version,
# input permutation) and a mismatched layer fails at load instead of computing garbage.
CONFIG_VERSION = 1
CONFIG_FIELDS = ("config_version", "format", "group_size", "symmetric", "hadamard", "in_features",
                 "out_features", "layout_version", "act_order", "dtype")
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
# Buffers whose dtype is part of the quantized format: module casts (model.to(dtype),
# .half(), .float()) move them between devices but never change their dtype.
_QUANT_BUFFERS = ("qweight", "scales", "zeros", "weight_q", "weight_scale", "bias", "in_perm", "quant_config")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"expected `format` one of {FORMATS}, got {fmt!r}")


def decode_config(t: torch.Tensor) -> dict:
    """A ``quant_config`` buffer as a dict (format name, dtype, bools)."""
    v = [int(x) for x in t.tolist()]
    if len(v) != len(CONFIG_FIELDS) or v[0] != CONFIG_VERSION:
        raise ValueError(f"expected a quant_config of version {CONFIG_VERSION} with {len(CONFIG_FIELDS)} fields, "
                         f"got {v} (saved by another inferops version?)")
    d = dict(zip(CONFIG_FIELDS, v))
    if not 0 <= d["format"] < len(FORMATS) or d["dtype"] not in _CODE_DTYPES:
        raise ValueError(f"expected a valid quant_config, got {d}")
    d["format"], d["dtype"] = FORMATS[d["format"]], _CODE_DTYPES[d["dtype"]]
    for k in ("symmetric", "hadamard", "act_order"):
        d[k] = bool(d[k])
    return d


class QuantLinear(nn.Module):
    """Drop-in ``nn.Linear`` with quantized weights; ``y = x W^T + b`` for ``x [..., in_features]``.

    Build it with :meth:`from_linear` (or :func:`quantize_model_`), :meth:`from_int4` /
    :meth:`from_8bit` (weights quantized elsewhere) or :func:`inferops.quant.load_quantized`.

    ``dtype`` (fp16 or bf16) is the dtype the layer computes in. Activations of any floating
    dtype are accepted: another dtype (fp32, say) is cast to ``dtype`` on the way in and the
    output is cast back to the input's dtype. Casting the module (``model.to(torch.float32)``,
    ``.half()``) moves its buffers between devices but never changes their dtype: the
    quantized weights, scales and bias keep the format's dtypes.

    Buffers (``state_dict``): ``w4a16``: ``qweight`` (int32, kernel layout), ``scales``,
    optional ``zeros``, optional ``in_perm`` (int64 ``[in_features]``, act-order checkpoints:
    the input channels are gathered ``x[..., in_perm]`` before the matmul); ``w8a8-*``:
    ``weight_q`` ``[N, K]`` int8 / fp8 e4m3 and ``weight_scale`` ``[N]`` fp32; ``bias`` in
    ``dtype``; ``quant_config`` (int64, :data:`CONFIG_FIELDS`), checked when a state dict is
    loaded: a checkpoint quantized another way raises, naming the layer and the difference.

    Gradients flow to the activations (and bias), never to the frozen quantized weights, so
    adapters can be trained on a quantized base (QLoRA style); w8a8 uses the straight-through
    estimator (gradient of the dequantized layer).

    Attributes: ``format``, ``group_size``, ``symmetric``, ``hadamard`` (the input is rotated
    online by ``H_n / sqrt(n)``, folded into the weight offline), ``in_features``,
    ``out_features``, ``dtype``.
    """

    def __init__(self, in_features: int, out_features: int, *, format: str, dtype: torch.dtype,
                 group_size: int = 128, hadamard: bool = False, symmetric: bool = True) -> None:
        super().__init__()
        _check_format(format)
        if dtype not in _ACT_DTYPES:
            raise TypeError(f"expected `dtype` torch.float16 or torch.bfloat16, got {dtype}")
        if hadamard:
            hadamard_factorization(in_features)  # raises for unsupported sizes, listing them
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.format, self.group_size, self.hadamard, self.dtype = format, group_size, bool(hadamard), dtype
        self.symmetric = bool(symmetric) if format == "w4a16" else True
        self._put("bias", None)
        self._put("in_perm", None)
        self._put("zeros", None)
        self._int4_meta = None
        self._set_config()

    def _config_codes(self) -> list[int]:
        layout = self._int4_meta[0] if self._int4_meta is not None else 0
        vals = {"config_version": CONFIG_VERSION, "format": FORMATS.index(self.format),
                "group_size": self.group_size if self.format == "w4a16" else 0, "symmetric": int(self.symmetric),
                "hadamard": int(self.hadamard), "in_features": self.in_features, "out_features": self.out_features,
                "layout_version": layout, "act_order": int(self.in_perm is not None),
                "dtype": _DTYPE_CODES[self.dtype]}
        return [vals[k] for k in CONFIG_FIELDS]

    def _set_config(self) -> None:
        old = self._buffers.get("quant_config")
        t = torch.tensor(self._config_codes(), dtype=torch.int64)
        self.register_buffer("quant_config", t if old is None else t.to(old.device))

    def _put(self, name: str, t: torch.Tensor | None) -> None:
        """Register ``t`` as buffer ``name``; an absent tensor (None) is a plain attribute, not a
        None buffer: torch.export miscounts the graph inputs of modules with None buffers."""
        if name in self._buffers or hasattr(self, name):
            delattr(self, name)
        if t is None:
            object.__setattr__(self, name, None)
        else:
            self.register_buffer(name, t)

    def config(self) -> dict:
        """This layer's quantization as a dict (what ``quant_config`` encodes; read from the
        layer's attributes, so it also works on the ``meta`` device and never syncs)."""
        return decode_config(torch.tensor(self._config_codes()))

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
            dtype: compute dtype; default the weight's dtype if fp16/bf16, else bf16.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear for `linear`, got {type(linear).__name__}")
        _check_format(format)
        w = linear.weight.detach()
        if dtype is None:
            dtype = w.dtype if w.dtype in _ACT_DTYPES else torch.bfloat16
        if dtype not in _ACT_DTYPES:
            raise TypeError(f"expected `dtype` torch.float16 or torch.bfloat16, got {dtype}")
        w64 = w.to(torch.float64)
        if hadamard:  # x W^T = (x H/sqrt(n)) (W H/sqrt(n))^T since H H^T = n I
            hadamard_factorization(linear.in_features)
            w64 = w64 @ hadamard_matrix(linear.in_features, normalized=True).to(w.device)
            prepare_hadamard(linear.in_features, w.device)  # so a first call may be graph-captured
        bias = linear.bias.detach() if linear.bias is not None else None
        if format == "w4a16":
            return cls.from_int4(pack_int4(w64.to(torch.float32), group_size, symmetric, dtype=dtype), bias,
                                 hadamard=hadamard)
        q, s = quantize_weight_per_channel(w64.to(torch.float32), _W8_DTYPES[format])
        return cls.from_8bit(q, s, bias, dtype=dtype, hadamard=hadamard)

    @classmethod
    def from_int4(cls, weight: Int4Weight, bias: torch.Tensor | None = None, *, hadamard: bool = False,
                  in_perm: torch.Tensor | None = None) -> QuantLinear:
        """A w4a16 layer around an existing :class:`Int4Weight` (from :func:`pack_int4`,
        :func:`pack_int4_quantized` or a GPTQ / AWQ conversion); the tensors are used, not copied.

        Args:
            weight: ``[N, K]`` packed int4; the layer computes in ``weight.dtype``.
            bias: ``[N]`` or None (cast to ``weight.dtype``).
            hadamard: ``weight`` already has ``H_K / sqrt(K)`` folded in; rotate the input online.
            in_perm: ``[K]`` integer permutation or None: the layer computes
                ``x[..., in_perm] @ W^T`` (act-order checkpoints store W with its input
                channels sorted by group; with ``hadamard`` the permutation applies to the
                rotated input).
        """
        if not isinstance(weight, Int4Weight):
            raise TypeError(f"expected an Int4Weight for `weight`, got {type(weight).__name__}")
        weight.check()
        m = cls(weight.in_features, weight.out_features, format="w4a16", dtype=weight.dtype,
                group_size=weight.group_size, hadamard=hadamard, symmetric=weight.symmetric)
        m._set_int4(weight)
        m._set_bias(bias, weight.device)
        if in_perm is not None:
            m._put("in_perm", _check_perm(in_perm, weight.in_features, weight.device))
        m._set_config()
        if hadamard:
            prepare_hadamard(weight.in_features, weight.device)
        return m

    @classmethod
    def from_8bit(cls, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                  dtype: torch.dtype = torch.bfloat16, hadamard: bool = False) -> QuantLinear:
        """A w8a8 layer around per-channel 8-bit weights quantized elsewhere.

        Args:
            weight_q: ``[N, K]`` int8 (``w8a8-int8``) or ``torch.float8_e4m3fn`` (``w8a8-fp8``).
            weight_scale: ``[N]`` float (stored as fp32): ``W[n] = weight_q[n] * weight_scale[n]``.
            bias: ``[N]`` or None (cast to ``dtype``).
            dtype: compute / output dtype, fp16 or bf16.
            hadamard: ``weight_q`` already has ``H_K / sqrt(K)`` folded in; rotate the input online.
        """
        for name, t in (("weight_q", weight_q), ("weight_scale", weight_scale)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"expected a tensor for `{name}`, got {type(t).__name__}")
        fmt = {v: k for k, v in _W8_DTYPES.items()}.get(weight_q.dtype)
        if fmt is None:
            raise TypeError(f"expected `weight_q` torch.int8 or torch.float8_e4m3fn, got {weight_q.dtype}")
        if weight_q.dim() != 2:
            raise ValueError(f"expected `weight_q` of shape [out_features, in_features], got {list(weight_q.shape)}")
        N, K = weight_q.shape
        if K % 16 or K == 0:
            raise ValueError(f"expected in_features (dim 1 of `weight_q`) a positive multiple of 16, got {K}")
        if not weight_scale.is_floating_point() or tuple(weight_scale.shape) != (N,):
            raise ValueError(f"expected a floating `weight_scale` of shape [{N}], got {weight_scale.dtype} "
                             f"{list(weight_scale.shape)}")
        if weight_scale.device != weight_q.device:
            raise ValueError(f"expected `weight_scale` on the device of `weight_q` ({weight_q.device}), "
                             f"got {weight_scale.device}")
        m = cls(K, N, format=fmt, dtype=dtype, hadamard=hadamard)
        m.register_buffer("weight_q", weight_q.detach().contiguous())
        m.register_buffer("weight_scale", weight_scale.detach().to(torch.float32).contiguous())
        m._set_bias(bias, weight_q.device)
        m._set_config()
        if hadamard:
            prepare_hadamard(K, weight_q.device)
        return m

    @classmethod
    def empty(cls, config: dict, device: torch.device | str | None = None) -> QuantLinear:
        """A layer with uninitialized buffers shaped for ``config`` (a :meth:`config` dict),
        ready for ``load_state_dict``; ``config["bias"]`` (bool) adds a bias buffer."""
        fmt, N, K, dt = config["format"], config["out_features"], config["in_features"], config["dtype"]
        m = cls(K, N, format=fmt, dtype=dt, group_size=config.get("group_size", 128),
                hadamard=config.get("hadamard", False), symmetric=config.get("symmetric", True))
        if fmt == "w4a16":
            gs = config["group_size"]
            G = 1 if gs == -1 else K // gs
            z = None if m.symmetric else torch.zeros(G, N, dtype=dt, device=device)
            m._set_int4(Int4Weight(torch.zeros(K // 16, 2 * N, dtype=torch.int32, device=device),
                                   torch.ones(G, N, dtype=dt, device=device), z, K, N, gs))
            if config.get("act_order"):
                m._put("in_perm", torch.arange(K, device=device))
        else:
            m.register_buffer("weight_q", torch.zeros(N, K, dtype=_W8_DTYPES[fmt], device=device))
            m.register_buffer("weight_scale", torch.ones(N, dtype=torch.float32, device=device))
        if config.get("bias"):
            m._put("bias", torch.zeros(N, dtype=dt, device=device))
        m._set_config()
        if device is not None:
            m.quant_config = m.quant_config.to(device)
        return m

    def _set_bias(self, bias, device) -> None:
        if bias is None:
            return
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"expected `bias` of shape [{self.out_features}] or None, got "
                             f"{list(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        self._put("bias", bias.detach().to(device=device, dtype=self.dtype).clone())

    def _set_int4(self, w: Int4Weight) -> None:
        self._put("zeros", w.zeros)
        self._put("qweight", w.qweight)
        self._put("scales", w.scales)  # w's `meta` is described by quant_config (a buffer named
        # `meta` breaks torch.export: it collides with GraphModule.meta)
        # forward uses this host copy of (layout version, N, K, group): it never reads a buffer
        # back from the GPU (a sync per call).
        self._int4_meta = (w.layout_version, w.out_features, w.in_features, w.group_size)

    def _int4(self) -> Int4Weight:
        version, N, K, group = self._int4_meta
        return Int4Weight(self.qweight, self.scales, self.zeros, K, N, group, version)

    # --- loading and casting ------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        layer = prefix[:-1] or "<root>"
        key = prefix + "quant_config"
        legacy = prefix + "meta"
        if key not in state_dict and legacy in state_dict and self.format == "w4a16":
            # saved before quant_config existed: w4a16 only, its `meta` holds (layout, N, K, group)
            v, N, K, g = (int(x) for x in state_dict.pop(legacy).tolist())
            mine = self.config()
            if (v, N, K, g) != (mine["layout_version"], mine["out_features"], mine["in_features"],
                                mine["group_size"]):
                kind = "int4 layout version" if v != mine["layout_version"] else "shape / group"
                raise ValueError(f"cannot load layer `{layer}`: the checkpoint's {kind} (layout version {v}, "
                                 f"[{N}, {K}], group {g}) differs from this layer's ({mine['layout_version']}, "
                                 f"[{mine['out_features']}, {mine['in_features']}], group {mine['group_size']})")
            state_dict[key] = self.quant_config.clone()
        if key in state_dict:
            got, mine = decode_config(state_dict[key]), self.config()
            diff = [f"{k}: checkpoint {got[k]!r}, layer {mine[k]!r}" for k in CONFIG_FIELDS if got[k] != mine[k]]
            if diff:
                raise ValueError(f"cannot load layer `{layer}`: the checkpoint was quantized differently ("
                                 + "; ".join(diff) + "); rebuild the model from the checkpoint with "
                                 "inferops.quant.load_quantized")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        # nn.Module.to / half / float / bfloat16 call fn on every buffer; fn may change the
        # dtype of floating ones (fp8 weights, scales). Quantized buffers take the device
        # (and memory format) of fn's result but keep their own dtype.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            out = fn(buf)
            if name in _QUANT_BUFFERS and out.dtype != buf.dtype:
                out = buf.to(device=out.device)
            self._buffers[name] = out
        return self

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"expected a floating tensor for `x`, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"expected `x` of shape [..., {self.in_features}], got {list(x.shape)}")
        out_dtype = x.dtype
        x = x.to(self.dtype)  # fp32 (or other) activations: cast in, cast the output back
        if self.format == "w4a16":
            if self.hadamard:
                x = hadamard_quantize(x, None)[0]
            if self.in_perm is not None:
                x = x.index_select(-1, self.in_perm)
            y = w4a16_matmul(x, self._int4(), self.bias)
        else:
            y = w8a8_linear(x, self.weight_q, self.weight_scale, self.bias, hadamard=self.hadamard,
                            out_dtype=self.dtype)
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        g = "" if self.format != "w4a16" else (", per-channel" if self.group_size == -1 else
                                                 f", group_size={self.group_size}")
        z = ", zero points" if self.format == "w4a16" and not self.symmetric else ""
        p = ", act_order" if self.in_perm is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}{g}{z}{p}, "
                f"hadamard={self.hadamard}, bias={self.bias is not None}, dtype={self.dtype}")


def _check_perm(perm: torch.Tensor, K: int, device) -> torch.Tensor:
    if not isinstance(perm, torch.Tensor) or perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise TypeError(f"expected an integer tensor for `in_perm`, got "
                        f"{perm.dtype if isinstance(perm, torch.Tensor) else type(perm).__name__}")
    if tuple(perm.shape) != (K,):
        raise ValueError(f"expected `in_perm` of shape [{K}] (in_features), got {list(perm.shape)}")
    perm = perm.to(device=device, dtype=torch.int64)
    if not torch.equal(torch.sort(perm).values, torch.arange(K, device=device)):
        raise ValueError(f"expected `in_perm` a permutation of 0..{K - 1}")
    return perm.contiguous()


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

    A ``transformers`` model also gets ``config.quantization_config`` listing its quantized
    layers (quant method ``"inferops"``), so ``save_pretrained`` / ``from_pretrained`` round-trip it.

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
    set_hf_quantization_config(model)  # transformers models: save_pretrained records the layers
    return done


QUANT_METHOD = "inferops"  # config.quantization_config["quant_method"] (see inferops.quant.hf)


def hf_quantization_config(model: nn.Module) -> dict:
    """``{"quant_method": "inferops", "layers": {name: config}}`` for ``model``'s QuantLinear
    layers (JSON-ready: dtype as a name, plus ``bias``), what ``config.json`` records."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            c = m.config()
            c["dtype"] = str(c["dtype"]).replace("torch.", "")
            c["bias"] = m.bias is not None
            layers[name] = c
    return {"quant_method": QUANT_METHOD, "layers": layers}


def set_hf_quantization_config(model: nn.Module) -> None:
    """Record ``model``'s quantized layers in its transformers config (``model.config`` with
    ``to_dict``), so ``save_pretrained`` writes them to config.json; no-op for other models.
    Loading them back with ``from_pretrained`` needs :func:`inferops.quant.register_transformers`."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config.quantization_config = hf_quantization_config(model)


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
