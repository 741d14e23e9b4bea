"""Hugging Face ``transformers`` integration: ``from_pretrained`` of inferops-quantized models.

Through transformers' public extension points (``register_quantization_config`` and
``register_quantizer``), quant method ``"inferops"``: a model's ``config.quantization_config``
``{"quant_method": "inferops", "layers": {name: {format, group_size, ...}}}`` (written by
:func:`quantize_model_` / the loaders through ``linear.set_hf_quantization_config``, saved by
``save_pretrained``; writing it needs no transformers import) makes
``AutoModelForCausalLM.from_pretrained(dir)`` build those layers as :class:`QuantLinear`
before the weights are loaded. The quantizer only loads pre-quantized checkpoints; it does
not quantize.

Registration needs ``transformers`` imported (a multi-second import), so it is not done by
``import inferops.quant`` unless transformers is already imported; :func:`register` does it
explicitly (the loaders call it).
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import QUANT_METHOD, QuantLinear

__all__ = ["register"]

_registered = False


def register() -> None:
    """Register quant method ``"inferops"`` with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers.auto import (
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:  # registered by another copy of this module
        _registered = True
        return

    @register_quantization_config(QUANT_METHOD)
    class InferopsQuantConfig(QuantizationConfigMixin):
        """Pre-quantized inferops layers: ``layers`` maps module names to their configs."""

        def __init__(self, layers: dict | None = None, **kwargs) -> None:
            self.quant_method = QUANT_METHOD
            self.layers = dict(layers or {})

    @register_quantizer(QUANT_METHOD)
    class InferopsHfQuantizer(HfQuantizer):
        requires_calibration = True  # loads pre-quantized checkpoints only

        def validate_environment(self, *args, **kwargs) -> None:
            pass

        def _process_model_before_weight_loading(self, model, **kwargs) -> None:
            for name, entry in self.quantization_config.layers.items():
                cfg = dict(entry)
                dt = getattr(torch, str(cfg["dtype"]), None)
                if not isinstance(dt, torch.dtype):
                    raise ValueError(f"expected a torch dtype name for layer `{name}` in quantization_config, "
                                     f"got {cfg['dtype']!r}")
                cfg["dtype"] = dt
                try:
                    target = model.get_submodule(name)
                except AttributeError:
                    raise ValueError(f"quantization_config names layer `{name}`, "
                                     "the model has no such module") from None
                if not isinstance(target, nn.Linear):
                    raise TypeError(f"quantization_config names layer `{name}`, a {type(target).__name__}, "
                                    "expected nn.Linear")
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, QuantLinear.empty(cfg, "meta"))

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:  # adapters on a frozen base: gradients reach activations
            return True

    _registered = True
