"""Hugging Face ``transformers`` integration: an attention implementation registered with
transformers' public ``AttentionInterface`` under the name ``"inferops_paged"``.

A model switched to it (``model.set_attn_implementation("inferops_paged")``, which
:func:`inferops.batch.generate` does for the duration of a call and undoes after) runs
its own embeddings, norms, rotary embeddings, MLPs / MoE blocks and LM head; each
attention layer's call lands in :func:`inferops_attention`, which writes the layer's
new K/V into the paged cache (``append_kv``) and then runs inferops' attention over the
cache (``paged_decode`` with multi-token queries for prefill, ``prefix_shared_decode``
or ``paged_decode`` for decode). What to write where and which op to run comes from the
active :class:`AttentionStep`, set by the engine around each forward pass (a context
variable, so no model code or class is patched and no extra argument needs to travel
through the model's forward).

The same attention function also serves ``model.generate()`` with a
:class:`~inferops.batch.hf_cache.PagedCache` (padded batches, no sharing; see that module).

In the engine, tokens travel packed: a forward pass has batch size 1 and ``T`` tokens from many
requests, with per-token ``position_ids`` (the model's rotary embeddings use them);
the mask function registered for this implementation returns the 2-D padding mask
as given (None in the engine), so no 4-D mask is ever built; the step's block tables
and lengths say which keys each query sees.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

from ..attention.paged import append_kv, paged_decode
from ..attention.prefix_plan import PrefixLayout
from ..attention.prefix_shared import prefix_shared_decode

__all__ = ["ATTENTION_NAME", "register", "inferops_attention", "AttentionStep", "KVLayers"]

ATTENTION_NAME = "inferops_paged"

_STEP: contextvars.ContextVar["AttentionStep | None"] = contextvars.ContextVar("inferops_step", default=None)


@dataclass
class KVLayers:
    """One K and one V page pool per attention layer, all with the same page ids (the
    layout is planned once, on layer 0's :class:`~inferops.attention.PagedKVCache`).

    ``k[l]``, ``v[l]``: ``[num_pages, page_size, num_kv_heads, head_dim]``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


@dataclass
class AttentionStep:
    """What every attention layer does in one forward pass (all tensors int32, on the
    cache's device).

    Writes: token ``t`` of the pass goes to block-table row ``seq_ids[t]`` of
    ``write_tables``, position ``positions[t]``.
    Reads (one of):
      * ``layout`` set: one query per row of the layout (plan order),
        :func:`prefix_shared_decode` over ``seq_lens``;
      * else :func:`paged_decode` over ``read_tables`` / ``seq_lens``, with
        ``qo_indptr`` (multi-token queries, causal among a row's new tokens) if set.
    """

    kv: KVLayers
    write_tables: torch.Tensor
    seq_ids: torch.Tensor
    positions: torch.Tensor
    read_tables: torch.Tensor | None
    seq_lens: torch.Tensor
    qo_indptr: torch.Tensor | None = None
    layout: PrefixLayout | None = None
    validate: bool = True
    layers_called: set = field(default_factory=set)

    @contextlib.contextmanager
    def active(self):
        token = _STEP.set(self)
        try:
            yield self
        finally:
            _STEP.reset(token)


def inferops_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs):
    """transformers attention function (the ``AttentionInterface`` signature).

    ``query``: ``[1, num_q_heads, T, head_dim]``; ``key``/``value``: ``[1, num_kv_heads, T,
    head_dim]`` (after the model's rotary embedding); returns ``([1, T, num_q_heads,
    head_dim], None)`` in the query's dtype. ``attention_mask`` is ignored: the active
    step's block tables and lengths define what each token sees.
    """
    step = _STEP.get()
    if step is None:
        from .hf_cache import paged_attention, writing_cache

        cache = writing_cache(getattr(module, "layer_idx", None))
        if cache is not None:  # model.generate() with a PagedCache
            return paged_attention(cache, module.layer_idx, query, key, value, attention_mask, scaling), None
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} runs only inside inferops.batch.generate "
            "or model.generate(..., past_key_values=PagedCache(...)) (it needs a paged KV cache)")
    if query.shape[0] != 1:
        raise ValueError(f"expected packed tokens (batch 1) in `query`, got shape {list(query.shape)}")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{type(module).__name__}: attention logit soft-capping and sinks "
                                  "are not supported by inferops' paged attention")
    layer = getattr(module, "layer_idx", None)
    if layer is None or not 0 <= layer < len(step.kv.k):
        raise RuntimeError(f"{type(module).__name__} has no usable `layer_idx` ({layer!r}); "
                           f"the cache has {len(step.kv.k)} layers")
    step.layers_called.add(layer)
    kc, vc = step.kv.k[layer], step.kv.v[layer]
    dt = kc.dtype
    q = query[0].transpose(0, 1).to(dt)  # [T, Hq, D]
    k = key[0].transpose(0, 1).to(dt)  # [T, Hkv, D]
    v = value[0].transpose(0, 1).to(dt)
    # The new tokens' K/V go in first: each token attends to itself.
    append_kv(kc, vc, k, v, step.write_tables, step.seq_ids, step.positions, validate=step.validate)
    if step.layout is not None:
        out, _ = prefix_shared_decode(q, kc, vc, step.layout, seq_lens=step.seq_lens, scale=scaling,
                                      validate=step.validate)
    else:
        out, _ = paged_decode(q, kc, vc, step.read_tables, step.seq_lens, scale=scaling,
                              qo_indptr=step.qo_indptr, validate=step.validate)
    return out.to(query.dtype)[None], None


def register() -> str:
    """Register :func:`inferops_attention` with transformers' ``AttentionInterface`` (idempotent)
    and return its name, for ``model.set_attn_implementation(name)``."""
    from transformers import AttentionInterface

    from .hf_cache import register_mask

    AttentionInterface.register(ATTENTION_NAME, inferops_attention)
    register_mask()  # hands the padding mask to the attention function (model.generate + PagedCache)
    return ATTENTION_NAME
