"""Offline batch generation with BatchLLM's global prefix sharing (``inferops.batch``).

:func:`generate` runs a Hugging Face ``transformers`` causal LM over a whole batch of
prompts: it plans the batch's shared prefixes (:class:`~inferops.attention.PrefixPlan`),
prefills each shared prefix once and each request's own suffix against it, then decodes
all requests together with ``prefix_shared_decode`` over a paged KV cache. Only attention
and the KV cache are inferops'; the rest is the model's own code, reached through
transformers' ``AttentionInterface`` (:mod:`inferops.batch.hf`). Needs ``transformers``
(``pip install inferops[batch]``). See docs/attention.md.
"""

from .engine import BatchResult, generate

__all__ = ["generate", "BatchResult"]
