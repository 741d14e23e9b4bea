"""Attention family (BatchLLM prefix-shared paged attention and its building blocks).

Ops so far: :func:`merge_states` and :func:`merge_states_` (LSE merge of two
partial attention results, natural-log LSE); :class:`PagedKVCache` with
:func:`append_kv` and :func:`paged_decode` (per-request paged decode, split-KV);
:class:`PrefixPlan` (BatchLLM's global prefix sharing, host side),
:func:`prefix_shared_decode` (each shared prefix read once per group, tensor
cores) and the :class:`PrefixSharedAttention` helper.
"""

from .merge_states import merge_states, merge_states_
from .paged import PagedKVCache, append_kv, check_block_tables, paged_decode
from .prefix_plan import PrefixLayout, PrefixPlan
from .prefix_shared import PrefixSharedAttention, prefix_shared_decode

__all__ = [
    "merge_states",
    "merge_states_",
    "PagedKVCache",
    "append_kv",
    "paged_decode",
    "check_block_tables",
    "PrefixPlan",
    "PrefixLayout",
    "prefix_shared_decode",
    "PrefixSharedAttention",
]
