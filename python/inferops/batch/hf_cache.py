"""``model.generate()`` on inferops' paged KV cache: :class:`PagedCache`, a transformers ``Cache``.

Plain paged attention, no prefix sharing (``generate()`` prefills one padded batch in
one pass, so nothing can plan and prefill shared prefixes once; use
:func:`inferops.batch.generate` for that):

    from inferops.batch.hf import register
    from inferops.batch.hf_cache import PagedCache

    model.set_attn_implementation(register())            # "inferops_paged"
    cache = PagedCache(model, batch_size=B, max_cache_len=prompt_width + max_new_tokens)
    out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=...)

How: the cache's layers (``CacheLayerMixin``) only count tokens and name the cache as
the one the next attention call writes to; the attention function (``inferops_attention``)
then appends the real (non-padding) tokens' K/V to each row's pages, compacted (row ``b``'s
``i``-th real token at position ``i``, as its ``position_ids`` say), and runs
``paged_decode`` with multi-token queries over them. The padding mask reaches the
attention function through a mask function registered with transformers'
``AttentionMaskInterface`` that hands over the 2-D padding mask unchanged. Supported:
greedy and sampling, one sequence per row (no beam search, no assisted decoding).
"""

from __future__ import annotations

import contextvars
import functools

import torch

from ..attention.paged import PagedKVCache, append_kv, paged_decode

__all__ = ["PagedCache"]

_WRITING: contextvars.ContextVar["PagedCache | None"] = contextvars.ContextVar("inferops_cache", default=None)


@functools.lru_cache(maxsize=None)
def _classes():
    """(layer class, cache class), built once on first use (transformers is imported lazily)."""
    from transformers import Cache
    from transformers.cache_utils import CacheLayerMixin

    class PagedLayer(CacheLayerMixin):
        """One attention layer of a :class:`PagedCache`: counts tokens (padding included, as
        transformers' masks do); the pages live in the owning cache."""

        def __init__(self, owner: "PagedCache", idx: int):
            super().__init__()
            self.owner, self.idx, self.seen = owner, idx, 0
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            self.seen += key_states.shape[-2]
            _WRITING.set(self.owner)
            self.owner._pending = self.idx  # the attention call that follows consumes it
            return key_states, value_states

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.seen + query_length, 0

        def get_seq_length(self) -> int:
            return self.seen

        def get_max_length(self) -> int:
            return self.owner.max_cache_len

        def reset(self) -> None:
            self.seen = 0

        def reorder_cache(self, beam_idx) -> None:
            raise NotImplementedError("PagedCache: beam search is not supported")

    class PagedGenerationCache(Cache):
        """What :class:`PagedCache` returns: a transformers ``Cache`` over paged K/V pools."""

    return PagedLayer, PagedGenerationCache


def _padding_mask(*args, attention_mask=None, **kwargs):
    """Mask function of ``"inferops_paged"``: the 2-D padding mask ``[batch, kv_len]`` as given
    (None without padding); causality comes from the cache's lengths, not from a mask."""
    return attention_mask


class PagedCache:
    """Factory of a transformers ``Cache`` whose K/V live in inferops' paged pools.

    ``PagedCache(model, batch_size, max_cache_len, page_size=16, dtype=None, device=None)``:
    ``batch_size`` rows of ``ceil(max_cache_len / page_size)`` pages each, allocated up front
    (padding is not stored: ``max_cache_len`` = longest prompt + ``max_new_tokens`` suffices).
    ``dtype``: the model's if 16-bit; float32 models get a float32 cache on the CPU reference
    path, else bf16. Returns an instance of a ``transformers.Cache`` subclass (pass it as
    ``cache=``, ``past_key_values=`` in older transformers, to ``model.generate``). A cache
    serves one ``generate`` call (build a new one per call).
    """

    def __new__(cls, model, batch_size: int, max_cache_len: int, page_size: int = 16, dtype=None, device=None):
        from transformers import Cache

        from .engine import _kv_dtype

        layer_cls, cache_cls = _classes()

        for name, val in (("batch_size", batch_size), ("max_cache_len", max_cache_len), ("page_size", page_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"expected an int >= 1 for `{name}`, got {val!r}")
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers = int(text.num_hidden_layers)
        hkv = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        hd = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        param = next(model.parameters())
        device = param.device if device is None else torch.device(device)
        dtype = _kv_dtype(param.dtype, device) if dtype is None else dtype

        self = cache_cls.__new__(cache_cls)
        Cache.__init__(self, layers=[layer_cls(self, i) for i in range(layers)])
        per_row = -(-max_cache_len // page_size)
        alloc = PagedKVCache(batch_size * per_row, page_size, hkv, hd, dtype, device)
        self.max_cache_len = max_cache_len
        self.kv_k = [alloc.k] + [torch.empty_like(alloc.k) for _ in range(layers - 1)]
        self.kv_v = [alloc.v] + [torch.empty_like(alloc.v) for _ in range(layers - 1)]
        self.block_tables = alloc.allocate(batch_size * per_row).view(batch_size, per_row).to(device)
        self.paged_batch_size = batch_size
        self._pending = None
        return self


def register_mask() -> None:
    from transformers.masking_utils import AttentionMaskInterface

    from .hf import ATTENTION_NAME

    AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask)


def writing_cache(layer: int):
    """The :class:`PagedCache` whose layer ``layer`` was just updated, consuming that update
    (None when no paged cache is being written for this call)."""
    cache = _WRITING.get()
    if cache is None or cache._pending != layer:
        return None
    cache._pending = None
    return cache


def paged_attention(cache, layer, query, key, value, attention_mask, scaling):
    """The attention function's ``generate()`` path: ``query`` ``[B, Hq, T, D]``, ``key``/``value``
    ``[B, Hkv, T, D]`` (this step's tokens, padding included), ``attention_mask`` the 2-D
    padding mask ``[B, past + T]`` or None. Returns ``[B, T, Hq, D]`` (zeros at padding)."""
    B, Hq, T, D = query.shape
    if B != cache.paged_batch_size:
        raise ValueError(f"PagedCache was built for batch_size {cache.paged_batch_size}, the model got {B} rows")
    kc, vc = cache.kv_k[layer], cache.kv_v[layer]
    past = cache.layers[layer].seen - T
    dev = query.device
    if attention_mask is None:
        mask = torch.ones(B, past + T, dtype=torch.bool, device=dev)
    else:
        mask = attention_mask.to(dev, torch.bool)
        if mask.dim() != 2:
            raise ValueError(f"expected a 2-D padding mask, got shape {list(mask.shape)}")
        mask = mask[:, -(past + T):] if mask.shape[1] >= past + T else torch.nn.functional.pad(
            mask, (past + T - mask.shape[1], 0), value=False)
    new = mask[:, past:]  # [B, T] real tokens of this step
    before = mask[:, :past].sum(1)  # real tokens already stored per row
    counts = new.sum(1)
    b_idx, t_idx = new.nonzero(as_tuple=True)  # row-major: row by row, in order
    pos = (before[b_idx] + new.long().cumsum(1)[b_idx, t_idx] - 1).to(torch.int32)
    if int((before + counts).max()) > cache.max_cache_len:
        raise ValueError(f"PagedCache holds {cache.max_cache_len} tokens per row (max_cache_len), a row needs "
                         f"{int((before + counts).max())}")
    dt = kc.dtype
    q = query.permute(0, 2, 1, 3)[b_idx, t_idx].to(dt)  # [N, Hq, D]
    k = key.permute(0, 2, 1, 3)[b_idx, t_idx].to(dt)
    v = value.permute(0, 2, 1, 3)[b_idx, t_idx].to(dt)
    append_kv(kc, vc, k, v, cache.block_tables, b_idx.to(torch.int32), pos)
    qo = torch.zeros(B + 1, dtype=torch.int32, device=dev)
    qo[1:] = counts.cumsum(0)
    out, _ = paged_decode(q, kc, vc, cache.block_tables, (before + counts).to(torch.int32), scale=scaling,
                          qo_indptr=qo)
    full = query.new_zeros(B, T, Hq, D)
    full[b_idx, t_idx] = out.to(query.dtype)
    return full
