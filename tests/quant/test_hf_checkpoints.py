"""Real checkpoints into a real model: a small Hugging Face Llama (random weights, no download)
saved as GPTQ (act-order, v1 and v2), AWQ (sharded safetensors) and inferops' own format,
loaded with inferops.quant.load_pretrained / load_quantized; logits compared with the float
model that holds the same dequantized weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from inferops.quant import QuantLinear, load_pretrained, load_quantized, quantize_model_  # noqa: E402

from . import _formats as F  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _config(**kw):
    return transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    tie_word_embeddings=False, **kw)


def _model(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(_config()).eval()


def _targets(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in PROJ]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _write(path, tensors, qc, shards=1):
    """config.json (with quantization_config) + safetensors, in `shards` files with an index."""
    cfg = _config()
    cfg.save_pretrained(path)
    c = json.loads((path / "config.json").read_text())
    if qc is not None:
        c["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(c))
    keys = sorted(tensors)
    if shards == 1:
        safetensors_torch.save_file({k: tensors[k].contiguous() for k in keys}, str(path / "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        safetensors_torch.save_file({k: tensors[k].contiguous() for k in part}, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _quantized_checkpoint(fmt, gen, *, group=64, checkpoint_format="gptq", sym=False):
    """(float model with the dequantized weights, checkpoint tensors, quantization_config)."""
    model = _model(0)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, lin in _targets(model):
        K = lin.in_features
        if fmt == "gptq":
            g_idx = F.act_order_g_idx(K, group, gen)
        else:
            g_idx = (torch.arange(K) // group).to(torch.int32)
        q, z, s = F.quantize_groups(lin.weight.detach(), g_idx, K // group, sym)
        if fmt == "gptq" and checkpoint_format == "gptq":
            z = z.clamp(min=1)  # v1 cannot store zero point 0
        del tensors[name + ".weight"]
        t = F.gptq_tensors(q, z, s, g_idx, checkpoint_format) if fmt == "gptq" else F.awq_tensors(q, z, s)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        with torch.no_grad():
            lin.weight.copy_(F.dequantize_definition(q, z, s, g_idx).float())
    if fmt == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True, "sym": sym,
              "checkpoint_format": checkpoint_format}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    return model, tensors, qc


# Relative (norm) error of the logits, loaded model vs the float32 model with the same
# dequantized weights: the quantized layers compute in fp16 (the checkpoints' scale dtype),
# so the remaining difference is fp16 rounding of the activations. Measured ~4e-4
# (and ~1.3 when the act-order permutation is dropped).
LOGIT_TOL = 1e-3


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_act_order_checkpoint_into_llama(checkpoint_format, gen, tmp_path):
    ref, tensors, qc = _quantized_checkpoint("gptq", gen, checkpoint_format=checkpoint_format)
    _write(tmp_path, tensors, qc)
    model = load_pretrained(tmp_path, dtype=torch.float32)
    layers = [m for _, m in _targets(model)]
    assert not layers  # every projection was replaced
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.in_perm is not None and q.format == "w4a16" and q.group_size == 64
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.dtype == torch.float32
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    ids = torch.randint(0, 256, (2, 11), generator=gen)
    with torch.no_grad():
        got, expect = model(ids).logits, ref(ids).logits
    assert _rel(got, expect) < LOGIT_TOL


def test_gptq_symmetric_checkpoint_uses_symmetric_layers(gen, tmp_path):
    ref, tensors, qc = _quantized_checkpoint("gptq", gen, sym=True)
    _write(tmp_path, tensors, qc)
    model = load_pretrained(tmp_path, dtype=torch.float32)
    assert model.model.layers[1].mlp.down_proj.symmetric
    ids = torch.randint(0, 256, (1, 9), generator=gen)
    with torch.no_grad():
        assert _rel(model(ids).logits, ref(ids).logits) < LOGIT_TOL


def test_awq_sharded_checkpoint_into_llama(gen, tmp_path):
    ref, tensors, qc = _quantized_checkpoint("awq", gen, group=128)
    _write(tmp_path, tensors, qc, shards=3)
    model = load_pretrained(tmp_path, dtype=torch.float32)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, QuantLinear) and up.in_perm is None and not up.symmetric
    ids = torch.randint(0, 256, (2, 7), generator=gen)
    with torch.no_grad():
        assert _rel(model(ids).logits, ref(ids).logits) < LOGIT_TOL


def test_unsupported_quantization_configs_raise(gen, tmp_path):
    _, tensors, qc = _quantized_checkpoint("awq", gen, group=128)
    for bad, match in (({**qc, "version": "gemv"}, "'gemm'"), ({**qc, "bits": 3}, "4-bit"),
                       ({**qc, "quant_method": "bitsandbytes"}, "'gptq', 'awq' or 'inferops'")):
        _write(tmp_path, tensors, bad)
        with pytest.raises(ValueError, match=match):
            load_pretrained(tmp_path)
    del tensors["model.norm.weight"]
    _write(tmp_path, tensors, qc)
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("fmt", ["w4a16", "w8a8-int8", "w8a8-fp8"])
def test_save_pretrained_round_trip(fmt, gen, tmp_path):
    """Trial failure: save_pretrained + from_pretrained "loaded" random weights. The saved
    directory now describes itself (config.json's quantization_config, quant method
    "inferops", and each layer's quant_config): transformers' own from_pretrained,
    load_pretrained (meta init) and load_quantized (into a float model) rebuild the same
    layers and give the same logits."""
    model = _model(0)
    quantize_model_(model, fmt, 64, hadamard=lambda n, m: n.endswith("down_proj"), progress=False)
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "inferops" and len(qc["layers"]) == 14
    assert qc["layers"]["model.layers.1.mlp.down_proj"]["hadamard"] is True
    ids = torch.randint(0, 256, (2, 6), generator=gen)
    with torch.no_grad():
        expect = model(ids).logits
        a = load_pretrained(tmp_path, dtype=torch.float32)
        b = load_quantized(_model(1), tmp_path)
        c = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        for m in (a, b, c):
            assert m.model.layers[0].mlp.down_proj.hadamard and not m.model.layers[0].mlp.up_proj.hadamard
            assert torch.equal(m(ids).logits, expect)


def test_gptq_checkpoint_resaved_in_inferops_format(gen, tmp_path):
    """A loaded GPTQ model saves as an inferops checkpoint (converted once, act-order
    permutation included) that transformers' from_pretrained loads with the same logits."""
    _, tensors, qc = _quantized_checkpoint("gptq", gen)
    _write(tmp_path / "gptq", tensors, qc)
    model = load_pretrained(tmp_path / "gptq", dtype=torch.float32)
    model.save_pretrained(tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert again.model.layers[0].mlp.up_proj.in_perm is not None
    ids = torch.randint(0, 256, (1, 8), generator=gen)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_from_pretrained_in_a_fresh_process(tmp_path):
    """The documented recipe in a new process: import transformers, then inferops.quant
    (which registers quant method "inferops"), then from_pretrained."""
    model = _model(0)
    quantize_model_(model, "w4a16", 64, progress=False)
    model.save_pretrained(tmp_path)
    code = ("import transformers, inferops.quant\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
            "print(type(m.model.layers[1].mlp.down_proj).__name__)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "QuantLinear"


def test_load_pretrained_never_materializes_float_weights_of_quantized_layers(gen, tmp_path):
    """Every tensor created while loading is recorded (a dispatch mode sees each op's outputs):
    none is a floating tensor off the meta device shaped like a quantized projection's weight
    ([128, 256] down_proj, [128, 128] q/o_proj, [64, 128] k/v_proj; the embedding and the
    gate/up shape [256, 128] coincide, so that one is not checked)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta:
                    self.shapes.add(tuple(t.shape))
            return out

    _, tensors, qc = _quantized_checkpoint("gptq", gen)
    _write(tmp_path, tensors, qc)
    with Record() as rec:
        model = load_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert (128,) in rec.shapes  # the recorder sees the float tensors that are loaded (norms)
    assert not rec.shapes & {(128, 256), (128, 128), (64, 128)}, sorted(rec.shapes)
