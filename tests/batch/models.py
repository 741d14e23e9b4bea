"""Tiny Hugging Face causal LMs with random weights (no downloads), one per family the
batch engine supports, and the batch workload the tests share."""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              initializer_range=0.1)


def _configs(head_dim: int | None):
    hd = {} if head_dim is None else {"head_dim": head_dim}
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, **hd)),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, sliding_window=None, **hd)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(COMMON, use_sliding_window=False, **hd)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, head_dim=head_dim or 16)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(COMMON, head_dim=head_dim or 16, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, decoder_sparse_step=1)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                    dict(COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **hd)),
    }


FAMILIES = list(_configs(None))


def tiny_model(family: str = "llama", *, seed: int = 0, dtype=torch.float32, device="cpu",
               head_dim: int | None = None, **overrides):
    cfg_name, model_name, kw = _configs(head_dim)[family]
    cfg = getattr(transformers, cfg_name)(**dict(kw, **overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    return model.to(device=device, dtype=dtype).eval()


def workload(g: torch.Generator, page_size: int = 4) -> list[list[int]]:
    """Deep shared prefixes, shallow ones, prefixes ending mid-page, identical prompts
    (one made only of whole shared pages: empty suffix) and a prompt sharing nothing."""
    def rand(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    deep = rand(3 * page_size + 1)  # 3 whole pages + 1 token: the shared prefix ends mid-page
    whole = rand(2 * page_size)  # a prompt of whole pages only
    return [
        deep + rand(3),
        deep + rand(1),
        deep[:page_size + 2] + rand(2),  # shallow: one page with the deep ones
        deep + rand(page_size + 1),
        whole,
        whole,  # identical prompts
        rand(5),  # shares nothing
        rand(page_size - 1),  # shorter than a page
    ]
