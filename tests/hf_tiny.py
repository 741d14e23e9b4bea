"""Tiny Hugging Face models with random weights (no downloads), for integration tests.

``tiny_model(family, **overrides)`` builds a ``*ForCausalLM`` in float32, eval mode, with
weights from ``torch.manual_seed(seed)`` so every rank of a distributed test builds
the same model, and no end-of-sequence token in its generation config. Sizes follow the test budget: hidden 64, 2 layers.
"""

from __future__ import annotations

import torch

__all__ = ["tiny_config", "tiny_model", "float64_copy"]


def tiny_config(family: str, **overrides):
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, initializer_range=0.1,
                  tie_word_embeddings=False)
    if family == "llama":
        cfg = tf.LlamaConfig(**{**common, **overrides})
    elif family == "mistral":
        cfg = tf.MistralConfig(**{**common, "num_key_value_heads": 1, "sliding_window": None, **overrides})
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**{**common, "num_key_value_heads": 4, **overrides})
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**{**common, "head_dim": 16, **overrides})
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**{**common, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
                                   "moe_intermediate_size": 32, "decoder_sparse_step": 1, "norm_topk_prob": True,
                                   **overrides})
    elif family == "mixtral":
        cfg = tf.MixtralConfig(**{**common, "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
                                  **overrides})
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, bos_token_id=0, eos_token_id=0,
                            **overrides)
    else:
        raise ValueError(f"unknown family {family!r}")
    return cfg


def tiny_model(family: str, seed: int = 0, **overrides):
    import transformers as tf

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # No end-of-sequence token: greedy generation runs its full length and never
    # suppresses a token (with min_new_tokens, transformers masks the EOS logit, which a
    # plain argmax loop such as ExFlowModel.generate_greedy does not).
    model.generation_config.eos_token_id = None
    return model.eval()


def float64_copy(model):
    """The same model in float64: the oracle of float32 comparisons."""
    import copy

    m = copy.deepcopy(model).to(torch.float64)
    if any(hasattr(mod, "gate_up_proj") for mod in m.modules()):  # torch's grouped_mm has no float64
        m.set_experts_implementation("eager")
    return m
