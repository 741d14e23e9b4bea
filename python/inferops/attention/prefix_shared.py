"""prefix_shared_decode and the PrefixSharedAttention helper (BatchLLM).

Kernels: csrc/attention/prefix_shared.cu (each group's queries against its
shared prefix, once, on tensor cores), the suffix decode of
csrc/attention/paged_decode.cu from ``kv_start = shared_len``, and one merge
of all partial states. Reference: plain paged decode over each request's full
block table (shared chain + own pages), which is the same function.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from ..reference import attention as ref
from ..validation import check_dtype, check_shape, check_tensor, read_flags
from .paged import (
    LSE_TOLERANCE,
    PagedKVCache,
    _misaligned,
    append_kv,
    check_block_tables,
    check_decode_query,
    check_qo_indptr,
    choose_num_splits,
    decode_outputs_like,
    expand_queries,
    sm_count,
)
from .prefix_plan import SHARED_ROWS, PrefixLayout, PrefixPlan, shared_work  # noqa: F401 (re-exported)

__all__ = ["prefix_shared_decode", "PrefixSharedAttention", "shared_work"]

SHARED_KEYS = 64  # keys per shared-prefix tile
DECODE_TILE = 16  # csrc: kDecodeTileTokens


def _prefix_shared_cuda(q, k_cache, v_cache, block_tables, seq_lens, shared_lens, group_indptr,
                        group_page_indptr, group_pages, work, scale, shared_splits, suffix_splits,
                        suffix_tokens_per_split):
    B, Hq, D = q.shape
    dev = q.device
    total = shared_splits + suffix_splits
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=dev)
    partial_out = torch.empty((total, B, Hq, D), dtype=torch.float32, device=dev)
    partial_lse = torch.empty((total, B, Hq), dtype=torch.float32, device=dev)
    partial_lse[:shared_splits].fill_(float("-inf"))  # rows with no shared prefix stay empty
    d = ops.dlpack
    ops.ext().prefix_shared_decode(
        d(q), d(k_cache), d(v_cache), d(block_tables), d(seq_lens), d(shared_lens), d(group_indptr),
        d(group_page_indptr), d(group_pages), d(work), d(out), d(lse), d(partial_out),
        d(partial_lse), shared_splits, suffix_splits, suffix_tokens_per_split, scale,
        ops.cuda_stream(dev),
    )
    return out, lse


@ops.register_op("prefix_shared_decode", family="attention", fake=decode_outputs_like,
                 cuda_impl=_prefix_shared_cuda)
def _prefix_shared_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    shared_lens: torch.Tensor,
    group_indptr: torch.Tensor,
    group_page_indptr: torch.Tensor,
    group_pages: torch.Tensor,
    work: torch.Tensor,
    scale: float,
    shared_splits: int,
    suffix_splits: int,
    suffix_tokens_per_split: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = ref.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale=scale)
    return out.contiguous(), lse.contiguous()


def prefix_shared_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: PrefixLayout,
    *,
    seq_lens: torch.Tensor | None = None,
    qo_lens=None,
    scale: float | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention where each group's shared prefix is read once for all its requests.

    Args:
        q: ``[num_requests, num_q_heads, head_dim]`` in **plan order** (row i is
            ``layout.plan.order[i]``), fp16/bf16 like the cache, head_dim 64 or 128 on the GPU.
        k_cache, v_cache: the cache the layout was materialized from,
            ``[num_pages, page_size, num_kv_heads, head_dim]``.
        layout: from ``PrefixPlan.materialize``.
        seq_lens: ``[num_requests]`` int32 current KV lengths (plan order); default
            ``layout.seq_lens``. Each must be >= its shared length.
        qo_lens: multi-token queries: a host sequence of ``num_requests`` ints (plan
            order), the new tokens per request; ``q`` is then
            ``[sum(qo_lens), num_q_heads, head_dim]``, request by request. The new
            tokens' K/V must be in the cache already (``seq_lens`` counts them) and
            they attend causally among themselves; all of them share the group's
            prefix read (each suffix is read per query token), so each request's
            first query token must be at position >= its shared length - 1.
        scale: softmax scale, default ``head_dim ** -0.5``.
        validate: check lengths and page ids (one device sync); pass False in
            CUDA-graph capture (the split factors depend only on the layout).

    Returns:
        ``(out, lse)`` exactly as :func:`paged_decode` over ``layout.block_tables``
        would (same math; the shared part is computed once per group).
    """
    if not isinstance(layout, PrefixLayout):
        raise TypeError(f"expected a PrefixLayout for `layout`, got {type(layout).__name__}")
    B, Hq, D = check_decode_query("prefix_shared_decode", q, k_cache, v_cache)
    num_pages, page_size, Hkv, _ = k_cache.shape
    N = layout.plan.num_requests
    if qo_lens is None:
        if B != N:
            raise ValueError(f"expected {N} rows in `q` (the plan's requests), got {B}")
    else:
        qo = np.asarray(torch.as_tensor(qo_lens).cpu(), dtype=np.int64).reshape(-1)
        if qo.shape != (N,) or (qo < 0).any():
            raise ValueError(f"expected `qo_lens` of {N} non-negative ints, got {qo_lens!r}")
        if int(qo.sum()) != B:
            raise ValueError(f"expected sum(qo_lens) = {int(qo.sum())} rows in `q`, got {B}")
    if page_size != layout.plan.page_size:
        raise ValueError(f"expected a cache with page_size {layout.plan.page_size}, got {page_size}")
    if layout.block_tables.device != q.device or k_cache.device != q.device:
        raise ValueError(f"expected `q`, the caches and `layout` on one device, got {q.device}, "
                         f"{k_cache.device} and {layout.block_tables.device}")
    seq_lens = layout.seq_lens if seq_lens is None else seq_lens
    check_tensor("seq_lens", seq_lens)
    check_dtype("seq_lens", seq_lens, (torch.int32,))
    check_shape("seq_lens", seq_lens, (N,))
    if seq_lens.device != q.device:
        raise ValueError(f"expected `seq_lens` on the device of `q` ({q.device}), got {seq_lens.device}")
    if validate and B > 0:
        check_block_tables(layout.block_tables, seq_lens, num_pages, page_size)
        short = seq_lens < layout.shared_lens
        if read_flags(short.any()[None], ("expected every `seq_lens` >= its shared prefix length",))[0]:
            i = int(short.nonzero()[0])
            raise ValueError(f"seq_lens[{i}] = {int(seq_lens[i])} is shorter than its shared "
                             f"prefix ({int(layout.shared_lens[i])} tokens)")
    if _misaligned(q):
        q = q.contiguous()
    G = Hq // Hkv
    block_tables, shared_lens, group_indptr = layout.block_tables, layout.shared_lens, layout.group_indptr
    if qo_lens is None:
        work = layout.work_items(G)
    else:  # one kernel row per query token: expand the per-request metadata
        qo_indptr, rows, group_indptr, work = layout.query_items(qo, G)
        if validate:
            check_qo_indptr(qo_indptr, seq_lens, B)
        _, seq_lens = expand_queries(qo_indptr, seq_lens, B)
        block_tables = block_tables.index_select(0, rows)
        shared_lens = shared_lens.index_select(0, rows)
        if validate and B > 0:
            # The shared kernel gives every query row of a group the whole shared
            # prefix (no per-row causal limit): a query token whose causal length is
            # shorter than the prefix would silently see later prefix tokens.
            inside = seq_lens < shared_lens
            if read_flags(inside.any()[None], ("expected multi-token queries to start at or after position "
                                               "shared_len - 1 of their request",))[0]:
                j = int(inside.nonzero()[0])
                raise ValueError(
                    f"query row {j} (request {int(rows[j])}) is at position {int(seq_lens[j]) - 1}, "
                    f"inside its shared prefix ({int(shared_lens[j])} tokens): multi-token queries "
                    "must start at or after position shared_len - 1")
    sms = sm_count(q.device)
    shared_tiles = layout.max_shared_pages * page_size // SHARED_KEYS
    shared_splits = max(1, min(math.ceil(sms / max(1, work.shape[0] * Hkv)), max(1, shared_tiles // 2), 64))
    suffix_len = layout.max_own_tokens
    suffix_splits = choose_num_splits(B, Hkv, suffix_len, sms)
    tiles = max(1, -(-suffix_len // DECODE_TILE))
    tokens_per_split = -(-tiles // suffix_splits) * DECODE_TILE
    scale = D**-0.5 if scale is None else float(scale)
    return torch.ops.inferops.prefix_shared_decode(
        q, k_cache, v_cache, block_tables, seq_lens, shared_lens, group_indptr,
        layout.group_page_indptr, layout.group_pages, work, scale, shared_splits, suffix_splits,
        tokens_per_split,
    )


class PrefixSharedAttention:
    """Owns a paged cache and the current batch's prefix plan, for users who do
    not want to manage block tables (one attention layer; use one per layer, or
    pass the same plan to several caches).

        attn = PrefixSharedAttention(num_pages=4096, num_kv_heads=8, head_dim=128)
        plan = attn.start(prompts, decode_lens)      # plan order: plan.order
        attn.write_prompts(k, v)                     # prompt K/V, plan order, concatenated
        # each decode step, per layer: the new token's K/V first, then its attention
        attn.append(k_new, v_new)                    # one new token per request
        out, lse = attn.decode(q)                    # q in plan order; sees the new token
        attn.finish()                                # pages back to the pool

    The order matters: a new token attends to itself, so its K/V must be in the
    cache before :meth:`decode` (decoding first silently drops that key).
    ``decode_lens`` (default 1 per request) reserves the pages appends may fill;
    appending past it raises.
    """

    def __init__(self, num_pages: int, page_size: int = 16, num_kv_heads: int = 8,
                 head_dim: int = 128, dtype: torch.dtype = torch.bfloat16, device=None) -> None:
        self.cache = PagedKVCache(num_pages, page_size, num_kv_heads, head_dim, dtype, device)
        self.layout: PrefixLayout | None = None
        self.seq_lens: torch.Tensor | None = None

    def start(self, prompts, decode_lens=None, *, min_shared_pages: int = 1) -> PrefixPlan:
        """Plan a new batch (releasing the previous one) and allocate its pages."""
        if self.layout is not None:
            self.finish()
        plan = PrefixPlan.build(prompts, self.cache.page_size, decode_lens=decode_lens,
                                min_shared_pages=min_shared_pages)
        self.layout = plan.materialize(self.cache)
        self.seq_lens = self.layout.seq_lens.clone()
        return plan

    def _need_layout(self) -> PrefixLayout:
        if self.layout is None:
            raise RuntimeError("no batch: call start(prompts) first")
        return self.layout

    def write_prompts(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the prompts' K/V: ``[sum(prompt_len), num_kv_heads, head_dim]``, the
        prompts of ``plan.order`` back to back. Each shared page is written once (by
        the first member of its group)."""
        lay = self._need_layout()
        plan = lay.plan
        lens = plan.prompt_len.astype(np.int64)
        if k.shape[0] != int(lens.sum()):
            raise ValueError(f"expected {int(lens.sum())} prompt tokens in `k`, got {k.shape[0]}")
        seq = np.repeat(np.arange(plan.num_requests, dtype=np.int32), lens)
        pos = (np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)).astype(np.int32)
        first_member = np.zeros(plan.num_requests, dtype=bool)
        first_member[plan.group_indptr[:-1]] = True
        skip = (pos < np.repeat(plan.shared_len, lens)) & ~np.repeat(first_member, lens)
        keep = torch.from_numpy(np.nonzero(~skip)[0]).to(k.device)
        dev = self.cache.k.device
        append_kv(self.cache.k, self.cache.v, k.index_select(0, keep), v.index_select(0, keep),
                  lay.block_tables, torch.from_numpy(seq[~skip]).to(dev),
                  torch.from_numpy(pos[~skip]).to(dev))

    def append(self, k: torch.Tensor, v: torch.Tensor, *, validate: bool = True) -> None:
        """Append one token per request (``[num_requests, num_kv_heads, head_dim]``, plan
        order) at each request's current length, then advance the lengths."""
        lay = self._need_layout()
        n = lay.plan.num_requests
        if validate and n > 0:
            # Each request's own pages hold prompt_len - shared_len + decode_len tokens: the
            # reserved decode_lens bound the appends (past them the block table has no page).
            cap = torch.from_numpy((lay.plan.prompt_len.astype(np.int64) + lay.plan.decode_len))
            over = self.seq_lens.cpu().long() >= cap
            if bool(over.any()):
                i = int(over.nonzero()[0])
                raise ValueError(
                    f"request {int(lay.plan.order[i])} (plan position {i}) already holds "
                    f"{int(self.seq_lens[i]) - int(lay.plan.prompt_len[i])} appended tokens, all that "
                    f"`decode_lens` reserved for it ({int(lay.plan.decode_len[i])}): pass larger "
                    "`decode_lens` to start()")
        append_kv(self.cache.k, self.cache.v, k, v, lay.block_tables,
                  torch.arange(n, dtype=torch.int32, device=self.cache.k.device), self.seq_lens,
                  validate=validate)
        self.seq_lens += 1

    def decode(self, q: torch.Tensor, **kwargs):
        """:func:`prefix_shared_decode` of ``q`` (plan order) over the current lengths: call it
        after :meth:`append` of the same step, so each new token attends to itself."""
        lay = self._need_layout()
        return prefix_shared_decode(q, self.cache.k, self.cache.v, lay, seq_lens=self.seq_lens,
                                    **kwargs)

    def finish(self) -> None:
        """Release the batch's pages."""
        if self.layout is not None:
            self.layout.release(self.cache)
        self.layout = None
        self.seq_lens = None


# --- main-job demo ---------------------------------------------------------------------------


def _demo_shape(device: torch.device):
    # (groups, members, prefix, suffix, Hq, Hkv, D, page)
    return (4, 16, 2048, 128, 32, 8, 128, 16) if device.type == "cuda" else (2, 3, 40, 9, 8, 2, 64, 16)


def _demo_inputs(device: torch.device, g: torch.Generator):
    n_g, m, pre, suf, Hq, Hkv, D, ps = _demo_shape(device)
    prompts = []
    for gi in range(n_g):
        prefix = torch.randint(0, 30000, (pre,), generator=g).tolist()
        prompts += [prefix + torch.randint(0, 30000, (suf,), generator=g).tolist() for _ in range(m)]
    plan = PrefixPlan.build(prompts, ps)
    cache = PagedKVCache(n_g * (pre // ps + 1) + len(prompts) * (suf // ps + 2) + 8, ps, Hkv, D,
                         torch.bfloat16, device)
    cache.k.normal_()
    cache.v.normal_()
    layout = plan.materialize(cache)
    q = torch.randn(len(prompts), Hq, D, generator=g).to(device, torch.bfloat16)
    return q, cache.k, cache.v, layout


register_demo(
    Demo(
        op="prefix_shared_decode",
        sizes=lambda d: "groups={} x {} req, prefix={} suffix={} Hq={} Hkv={} D={} page={}".format(*_demo_shape(d)),
        make_inputs=_demo_inputs,
        run=lambda q, k, v, lay: prefix_shared_decode(q, k, v, lay, validate=False),
        baseline=lambda q, k, v, lay: ref.paged_decode(q, k, v, lay.block_tables, lay.seq_lens),
        reference64=lambda q, k, v, lay: ref.paged_decode(q.double(), k.double(), v.double(), lay.block_tables,
                                                          lay.seq_lens, compute_dtype=torch.float64),
        dtype=torch.bfloat16,
        aux_tolerance=LSE_TOLERANCE,
    )
)
