"""Loading quantized checkpoints: inferops' own (self-describing) and GPTQ / AWQ.

* :func:`load_quantized` ``(model, state_dict_or_path)``: a float model + a state dict (or a
  ``torch.save`` file, a safetensors file or a ``save_pretrained`` directory) written from an
  inferops-quantized model. Each quantized layer carries a ``quant_config`` buffer (format,
  group size, symmetry, Hadamard flag, packing version, act order, dtype:
  :data:`inferops.quant.CONFIG_FIELDS`), so the right :class:`QuantLinear` layers are rebuilt
  before the weights are loaded.
* :func:`load_pretrained` ``(path)``: a Hugging Face model directory (``config.json`` + one or
  more safetensors shards) holding an inferops, GPTQ or AWQ 4-bit checkpoint. The model is
  built on the ``meta`` device (no memory, no random init), each quantized layer is converted
  from its own tensors only (:mod:`inferops.quant.checkpoints`) and the remaining float
  tensors (embeddings, norms, head) are loaded as they are: full-precision weights of the
  quantized layers are never materialized.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .checkpoints import int4_from_awq, int4_from_gptq
from .hf import register as register_transformers
from .linear import QuantLinear, decode_config, set_hf_quantization_config

__all__ = ["load_pretrained", "load_quantized"]

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_FILES = ("model.safetensors", "pytorch_model.bin")


class _Tensors:
    """Name -> tensor over a dict, a file or a checkpoint directory; reads one tensor at a time."""

    def __init__(self, source) -> None:
        self._dict, self._where, self._open = None, {}, {}
        if isinstance(source, dict):
            self._dict = source
            return
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"expected a state dict, a file or a directory for `state_dict_or_path`, "
                            f"got {type(source).__name__}")
        path = Path(source)
        if path.is_dir():
            if (path / _SAFETENSORS_INDEX).is_file():
                weight_map = json.loads((path / _SAFETENSORS_INDEX).read_text())["weight_map"]
                self._where = {k: path / f for k, f in weight_map.items()}
                return
            files = [path / f for f in _FILES if (path / f).is_file()]
            if not files:
                raise FileNotFoundError(f"expected {_SAFETENSORS_INDEX} or one of {_FILES} in {path}, found none")
            path = files[0]
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file {path}")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                self._where = {k: path for k in f.keys()}
        else:
            self._dict = torch.load(path, map_location="cpu", weights_only=True)

    def keys(self) -> list[str]:
        return list(self._dict) if self._dict is not None else list(self._where)

    def get(self, key: str) -> torch.Tensor:
        if self._dict is not None:
            return self._dict[key]
        f = self._where[key]
        if f not in self._open:
            from safetensors import safe_open

            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(key)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _inferops_layer(tensors: _Tensors, keys: set, name: str, linear: nn.Module | None, device) -> QuantLinear:
    prefix = name + "." if name else ""
    cfg = decode_config(tensors.get(prefix + "quant_config"))
    cfg["bias"] = prefix + "bias" in keys
    if linear is not None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"cannot load quantized layer `{name or '<root>'}` into a {type(linear).__name__} "
                            "(expected nn.Linear or QuantLinear)")
        if (linear.in_features, linear.out_features) != (cfg["in_features"], cfg["out_features"]):
            raise ValueError(f"cannot load quantized layer `{name or '<root>'}`: the checkpoint's layer is "
                             f"{cfg['in_features']}->{cfg['out_features']}, the model's "
                             f"{linear.in_features}->{linear.out_features}")
    return QuantLinear.empty(cfg, device)


def load_quantized(model: nn.Module, state_dict_or_path, *, strict: bool = True) -> nn.Module:
    """Load an inferops-quantized checkpoint into ``model`` (float or already quantized).

    Every ``nn.Linear`` whose checkpoint entry has a ``quant_config`` is replaced (in place) by
    a :class:`QuantLinear` of the recorded format, then the whole state dict is loaded with
    ``model.load_state_dict(..., strict=strict)``. Layers that already are :class:`QuantLinear`
    are kept, and their ``quant_config`` must match the checkpoint's (else a ``ValueError``
    names the layer and the difference).

    Args:
        model: the model the checkpoint was saved from, in float (as built from its config) or
            quantized; parameters on the ``meta`` device are loaded with ``assign=True``.
        state_dict_or_path: a state dict, a ``torch.save`` file, a ``.safetensors`` file, or a
            directory written by ``save_pretrained`` (``model.safetensors``, sharded
            safetensors with their index, or ``pytorch_model.bin``).
        strict: as ``nn.Module.load_state_dict``.

    Returns:
        ``model`` (the same object; a new :class:`QuantLinear` when ``model`` itself is the
        ``nn.Linear`` being replaced).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module for `model`, got {type(model).__name__}")
    tensors = _Tensors(state_dict_or_path)
    keys = set(tensors.keys())
    names = sorted(k[: -len("quant_config")].rstrip(".") for k in keys
                   if k == "quant_config" or k.endswith(".quant_config"))
    if not names:
        raise ValueError("expected `quant_config` entries in the checkpoint (saved from an inferops-quantized "
                         "model), found none: for GPTQ / AWQ directories use inferops.quant.load_pretrained")
    meta = any(t.is_meta for t in model.state_dict().values())
    for name in names:
        try:
            mod = model.get_submodule(name) if name else model
        except AttributeError:
            if strict:
                raise ValueError(f"the checkpoint has quantized layer `{name}`, the model has no such module") from None
            continue
        if isinstance(mod, QuantLinear):
            continue  # load_state_dict checks its quant_config against the checkpoint's
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"cannot load quantized layer `{name or '<root>'}` into a {type(mod).__name__} "
                            "(expected nn.Linear or QuantLinear)")
        dev = None if mod.weight.is_meta else mod.weight.device
        q = _inferops_layer(tensors, keys, name, mod, dev if dev is not None else "meta")
        if not name:
            model = q
        else:
            _set_module(model, name, q)
    state = {k: tensors.get(k) for k in keys}
    model.load_state_dict(state, strict=strict, assign=meta)
    set_hf_quantization_config(model)
    if "transformers" in sys.modules:
        register_transformers()
    return model


# --- Hugging Face directories ----------------------------------------------------------------


def _gptq_layer(tensors, keys, name, qc, device) -> QuantLinear:
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    g_idx = tensors.get(name + ".g_idx") if name + ".g_idx" in keys else None
    w, perm = int4_from_gptq(tensors.get(name + ".qweight").to(device), tensors.get(name + ".qzeros").to(device),
                             tensors.get(name + ".scales").to(device), None if g_idx is None else g_idx.to(device),
                             group_size=qc.get("group_size"), checkpoint_format=fmt,
                             sym=True if qc.get("sym") else None)
    bias = tensors.get(name + ".bias").to(device) if name + ".bias" in keys else None
    return QuantLinear.from_int4(w, bias, in_perm=perm)


def _awq_layer(tensors, keys, name, qc, device) -> QuantLinear:
    w = int4_from_awq(tensors.get(name + ".qweight").to(device), tensors.get(name + ".qzeros").to(device),
                      tensors.get(name + ".scales").to(device), group_size=qc.get("group_size"))
    bias = tensors.get(name + ".bias").to(device) if name + ".bias" in keys else None
    return QuantLinear.from_int4(w, bias)


def _check_quant_config(qc: dict) -> str | None:
    method = qc.get("quant_method")
    if method is None:
        return None
    method = str(method).lower()
    if method == "inferops":
        return None  # the layers describe themselves (quant_config buffers)
    if method not in ("gptq", "awq"):
        raise ValueError(f"expected quantization_config.quant_method 'gptq', 'awq' or 'inferops', "
                         f"got {method!r}")
    if int(qc.get("bits", 4)) != 4:
        raise ValueError(f"expected 4-bit {method.upper()} weights (quantization_config.bits), got {qc.get('bits')}")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"expected an AWQ checkpoint packed for the GEMM kernels (quantization_config.version "
                         f"'gemm'), got {qc.get('version')!r}")
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"expected GPTQ checkpoint_format 'gptq' or 'gptq_v2', got {fmt!r}")
    return method


def _materialize_rest(model: nn.Module, device) -> None:
    """Non-persistent buffers (rotary inv_freq, ...) built on the meta device: allocate them and
    let the model's own initializer (transformers' ``_init_weights``) compute their values."""
    init = getattr(model, "_init_weights", None)
    for mod in model.modules():
        metas = [n for n, b in mod._buffers.items() if b is not None and b.is_meta]
        if not metas:
            continue
        if init is None:
            raise ValueError(f"buffers {metas} of {type(mod).__name__} are not in the checkpoint and the model "
                             "has no _init_weights to compute them")
        for n in metas:
            mod._buffers[n] = torch.empty_like(mod._buffers[n], device=device)
        init(mod)


def load_pretrained(path, *, model_cls=None, dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
    """A Hugging Face model from a directory with an inferops, GPTQ or AWQ 4-bit checkpoint.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or sharded safetensors
            with ``model.safetensors.index.json``). ``config.json``'s ``quantization_config``
            selects the format: ``quant_method`` ``"gptq"`` (``bits`` 4, ``checkpoint_format``
            ``"gptq"`` / ``"gptq_v2"``, ``desc_act`` either) or ``"awq"`` (``bits`` 4,
            ``version`` ``"gemm"``); without one, the layers with an inferops ``quant_config``
            are loaded (a quantized model saved with ``save_pretrained``).
        model_cls: a ``transformers`` auto class or model class with ``from_config``
            (default ``AutoModelForCausalLM``).
        dtype: dtype of the float parts (embeddings, norms, head) and of activations between
            layers; default the config's. Quantized layers compute in their scales' dtype
            (fp16 for GPTQ / AWQ) and cast activations in and out.
        device: where the model is loaded.

    Returns the model in eval mode, quantized linear layers as :class:`QuantLinear`.
    """
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"expected a Hugging Face model directory with config.json, got {path}")
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    method = _check_quant_config(qc)
    config = transformers.AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the layers are built here, not by a transformers quantizer
    model_cls = model_cls or transformers.AutoModelForCausalLM
    kw = {} if dtype is None else {"dtype": dtype}
    with torch.device("meta"):
        model = model_cls.from_config(config, **kw)
    tensors = _Tensors(path)
    keys = set(tensors.keys())
    device = torch.device(device)
    quantized = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        if method == "gptq" and name + ".qweight" in keys:
            q = _gptq_layer(tensors, keys, name, qc, device)
        elif method == "awq" and name + ".qweight" in keys:
            q = _awq_layer(tensors, keys, name, qc, device)
        elif method is None and name + ".quant_config" in keys:
            q = _inferops_layer(tensors, keys, name, mod, device)
            prefix = name + "."
            q.load_state_dict({k[len(prefix):]: tensors.get(k) for k in keys if k.startswith(prefix)})
        else:
            continue
        if (q.in_features, q.out_features) != (mod.in_features, mod.out_features):
            raise ValueError(f"checkpoint layer `{name}` is {q.in_features}->{q.out_features}, the model's "
                             f"{mod.in_features}->{mod.out_features}")
        _set_module(model, name, q)
        quantized.append(name)
    if not quantized:
        raise ValueError(f"found no quantized layer in {path} ({method or 'inferops'} format)")
    done = tuple(n + "." for n in quantized)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith(done) or k not in keys:
            continue
        t = tensors.get(k)
        state[k] = t.to(device=device, dtype=v.dtype if v.is_floating_point() else t.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # lm_head shares the embedding when the config ties them
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the checkpoint in {path} lacks {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    _materialize_rest(model, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"the checkpoint in {path} lacks {left[:8]}")
    set_hf_quantization_config(model)  # save_pretrained now writes inferops' format
    register_transformers()  # and from_pretrained in this process reads it
    return model.eval()
