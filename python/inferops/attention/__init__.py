"""Attention family (BatchLLM prefix-shared paged attention and its building blocks).

Ops so far: :func:`merge_states` and :func:`merge_states_` (LSE merge of two
partial attention results, natural-log LSE).
"""

from .merge_states import merge_states, merge_states_

__all__ = ["merge_states", "merge_states_"]
