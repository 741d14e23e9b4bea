"""PrefixPlan: BatchLLM's global prefix sharing for a batch, and its page layout.

``PrefixPlan.build(prompts, page_size)`` finds the page-aligned prefixes the
batch shares (a prefix tree flattened to one level: each request shares with
at most one group), orders the requests so each group runs together and long
decodes start first, and reports what sharing saves. ``plan.materialize(cache)``
allocates pages from a :class:`PagedKVCache` (each shared page once, held by a
reference per request that uses it) and returns the flat int32 metadata the
kernels read. The planner is C++ (csrc/attention/prefix_plan.cpp); a pure-Python
version (``inferops.reference.attention.build_prefix_plan``) is its oracle and
its fallback when the extension is missing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .._core.extension import extension
from ..reference import attention as ref
from .paged import PagedKVCache

__all__ = ["PrefixPlan", "PrefixLayout", "shared_work"]

# Query rows per block of the shared-prefix kernel (csrc: kSharedRows). The work list
# lives here, beside the layout that caches it, so that this module does not import
# prefix_shared (which imports it).
SHARED_ROWS = 64


# GQA ratios (query heads per KV head) whose work items materialize() builds up front.
PRECOMPUTED_RATIOS = 16


def shared_work(group_indptr: np.ndarray, group_page_indptr: np.ndarray, group_size: int) -> np.ndarray:
    """[W, 2] int32 work items (group, first query row) of the shared-prefix kernel.

    ``group_indptr`` counts query rows per group before the GQA expansion (one per
    request, or per query token with multi-token queries): a group of m of them
    has m * group_size kernel rows (row = member * G + head-in-group), cut into
    tiles of 64; groups without shared pages get none.
    """
    sizes = np.diff(group_indptr)
    pages = np.diff(group_page_indptr)
    items = [(g, r0) for g in np.nonzero(pages > 0)[0]
             for r0 in range(0, int(sizes[g]) * group_size, SHARED_ROWS)]
    return np.asarray(items, dtype=np.int32).reshape(-1, 2)


def _positive_int(name: str, val) -> int:
    try:
        n = operator.index(val)
    except TypeError:
        n = 0
    if isinstance(val, bool) or n < 1:
        raise ValueError(f"expected an int >= 1 for `{name}`, got {val!r}")
    return n


def _flatten(prompts) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32, offsets int64) from a list of sequences or a (tokens, offsets) pair."""
    if isinstance(prompts, tuple) and len(prompts) == 2:
        tokens = np.ascontiguousarray(torch.as_tensor(prompts[0]).cpu().numpy(), dtype=np.int32)
        offsets = np.ascontiguousarray(torch.as_tensor(prompts[1]).cpu().numpy(), dtype=np.int64)
        return tokens, offsets
    arrays = [np.asarray(p.cpu() if isinstance(p, torch.Tensor) else p, dtype=np.int64).reshape(-1)
              for p in prompts]
    lens = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if flat.size and (flat.min() < -(2**31) or flat.max() >= 2**31):
        raise ValueError("token ids must fit in int32")
    return flat.astype(np.int32), offsets


@dataclass(frozen=True)
class PrefixPlan:
    """A batch's sharing structure, in *plan order* (the order requests should run).

    Fields (numpy int32 unless noted):
      ``order [N]``: original request index at each plan position.
      ``group_indptr [G + 1]``: group g is plan positions ``group_indptr[g]:group_indptr[g+1]``;
      a request sharing nothing is a group of one with no pages.
      ``group_page_indptr [G + 1]``, ``group_pages``: group g's shared prefix as logical
      shared-page ids, root first (``shared_len = pages * page_size`` tokens).
      ``shared_len [N]``, ``prompt_len [N]``, ``decode_len [N]``: per plan position.
      ``page_owner``, ``page_index``: logical shared page k holds tokens
      ``[page_index[k] * page_size, +page_size)`` of prompt ``page_owner[k]``.
      ``page_refs``: requests using each shared page.

    The partial last page of a shared prefix is not shared: its tokens are part
    of each request's own suffix. Sharing is one level deep (BatchLLM's
    flattening): a group shares exactly its root's prefix, and deeper common
    prefixes inside a group are read once per request.
    """

    page_size: int
    order: np.ndarray
    group_indptr: np.ndarray
    group_page_indptr: np.ndarray
    group_pages: np.ndarray
    shared_len: np.ndarray
    prompt_len: np.ndarray
    decode_len: np.ndarray
    page_owner: np.ndarray
    page_index: np.ndarray
    page_refs: np.ndarray
    num_tree_nodes: int

    @staticmethod
    def build(
        prompts,
        page_size: int = 16,
        *,
        decode_lens: Sequence[int] | None = None,
        min_shared_pages: int = 1,
        backend: str = "auto",
    ) -> "PrefixPlan":
        """Plan a batch.

        Args:
            prompts: a list of token-id sequences (lists, numpy arrays or 1-D tensors),
                or a pair ``(tokens, offsets)`` with all prompts back to back
                (int32-representable) and ``offsets`` ``[N + 1]``.
            page_size: the KV cache's page size (>= 1); only whole pages are shared.
            decode_lens: expected generated tokens per request (default 1 each); used
                for the order and to size each request's own pages.
            min_shared_pages: a group must save at least this many page reads per step.
            backend: ``"cpp"``, ``"python"`` or ``"auto"`` (C++ when the extension loads).
        """
        page_size = _positive_int("page_size", page_size)
        min_shared_pages = _positive_int("min_shared_pages", min_shared_pages)
        tokens, offsets = _flatten(prompts)
        n = offsets.size - 1
        if decode_lens is None:
            dec = np.ones(n, dtype=np.int32)
        else:
            dec = np.ascontiguousarray(np.asarray(decode_lens, dtype=np.int64))
            if dec.shape != (n,):
                raise ValueError(f"expected `decode_lens` of shape [{n}], got {list(dec.shape)}")
            if (dec < 0).any() or (dec >= 2**31).any():
                raise ValueError("expected 0 <= decode_lens < 2^31")
            dec = dec.astype(np.int32)
        if backend not in ("auto", "cpp", "python"):
            raise ValueError(f"expected backend 'auto', 'cpp' or 'python', got {backend!r}")
        ext = extension()
        if backend == "cpp" and ext is None:
            raise RuntimeError("backend='cpp' needs inferops._C, which could not be imported")
        if backend == "python" or (backend == "auto" and ext is None):
            raw = ref.build_prefix_plan(
                [tokens[offsets[i]:offsets[i + 1]] for i in range(n)], page_size, dec, min_shared_pages
            )
        else:
            raw = ext.build_prefix_plan(
                torch.from_numpy(tokens).__dlpack__(), torch.from_numpy(offsets).__dlpack__(),
                page_size, torch.from_numpy(dec).__dlpack__(), min_shared_pages,
            )
        raw = dict(raw)
        order = raw.pop("order")
        return PrefixPlan(page_size=page_size, order=order, decode_len=dec[order], **raw)

    # --- summary ------------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return int(self.order.size)

    @property
    def num_groups(self) -> int:
        return int(self.group_indptr.size - 1)

    @property
    def num_shared_pages(self) -> int:
        return int(self.page_owner.size)

    def stats(self) -> dict:
        """Token counts: what a decode step reads with and without this plan."""
        ps = self.page_size
        group_pages = np.diff(self.group_page_indptr)
        prompt = int(self.prompt_len.sum())
        suffix = int((self.prompt_len - self.shared_len).sum())
        read_shared = int(group_pages.sum()) * ps + suffix
        return {
            "requests": self.num_requests,
            "groups_with_sharing": int((group_pages > 0).sum()),
            "prompt_tokens": prompt,
            "stored_tokens": self.num_shared_pages * ps + suffix,
            "read_tokens_unshared": prompt,
            "read_tokens_shared": read_shared,
            "read_reduction": prompt / read_shared if read_shared else 1.0,
            "tree_nodes": self.num_tree_nodes,
        }

    # --- pages ---------------------------------------------------------------------------

    def materialize(self, cache: PagedKVCache, device=None) -> "PrefixLayout":
        """Allocate this plan's pages from ``cache`` and build the kernels' metadata.

        Shared pages are allocated once and hold one reference per request using
        them; each request gets its own pages for ``prompt_len - shared_len +
        decode_len`` tokens. Raises RuntimeError (and allocates nothing) when the
        cache has too few free pages.
        """
        if cache.page_size != self.page_size:
            raise ValueError(f"expected a cache with page_size {self.page_size}, got {cache.page_size}")
        ps = self.page_size
        own_tokens = self.prompt_len.astype(np.int64) - self.shared_len + self.decode_len
        own_pages = (own_tokens + ps - 1) // ps
        need = self.num_shared_pages + int(own_pages.sum())
        if need > cache.num_free_pages:
            raise RuntimeError(f"PrefixPlan needs {need} pages, the cache has {cache.num_free_pages} free")
        shared = cache.allocate(self.num_shared_pages).numpy()
        extra = np.repeat(shared, np.maximum(self.page_refs - 1, 0))
        if extra.size:
            cache.retain(extra)
        own = cache.allocate(int(own_pages.sum())).numpy()
        n = self.num_requests
        shared_pages_per_req = self.shared_len // ps
        width = int((shared_pages_per_req + own_pages).max()) if n else 1
        block_tables = np.full((n, max(width, 1)), -1, dtype=np.int32)
        group_of = np.repeat(np.arange(self.num_groups), np.diff(self.group_indptr))
        own_at = np.concatenate([[0], np.cumsum(own_pages)])
        for i in range(n):
            g = group_of[i]
            chain = shared[self.group_pages[self.group_page_indptr[g]:self.group_page_indptr[g + 1]]]
            k = chain.size
            block_tables[i, :k] = chain
            block_tables[i, k:k + own_pages[i]] = own[own_at[i]:own_at[i + 1]]
        dev = cache.k.device if device is None else torch.device(device)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(dev)  # noqa: E731
        # The shared-prefix kernel's work items for every GQA ratio up to PRECOMPUTED_RATIOS, in
        # one copy: prefix_shared_decode then builds nothing on the host for those ratios, so it
        # traces under torch.compile(fullgraph=True) and captures in CUDA graphs from the first call.
        items = [shared_work(self.group_indptr, self.group_page_indptr, r) for r in range(1, PRECOMPUTED_RATIOS + 1)]
        ends = np.cumsum([len(a) for a in items])
        # (numpy gives an empty array zero strides, which the kernels' contiguity check refuses)
        flat = t(np.concatenate(items)) if ends[-1] else torch.empty((0, 2), dtype=torch.int32, device=dev)
        work = {r: flat[e - len(a):e] for r, a, e in zip(range(1, PRECOMPUTED_RATIOS + 1), items, ends)}
        return PrefixLayout(
            plan=self,
            block_tables=t(block_tables),
            seq_lens=t(self.prompt_len),
            shared_lens=t(self.shared_len),
            group_indptr=t(self.group_indptr),
            group_page_indptr=t(self.group_page_indptr),
            group_pages=t(shared[self.group_pages] if self.group_pages.size else self.group_pages),
            shared_pages=shared,
            own_pages=own,
            max_own_tokens=int(own_pages.max(initial=0)) * ps,
            max_shared_pages=int(np.diff(self.group_page_indptr).max(initial=0)),
            _work=work,
        )


@dataclass(frozen=True)
class PrefixLayout:
    """Physical pages of a materialized plan (tensors on the cache's device, plan order).

    ``block_tables [N, max_pages]``: each request's shared chain then its own pages
    (-1 padding) -- what :func:`paged_decode` reads; ``seq_lens [N]``: prompt
    lengths (advance them as tokens are appended); ``shared_lens [N]``; ``group_indptr``,
    ``group_page_indptr``, ``group_pages`` (physical page ids): what the
    prefix-shared kernel reads.
    """

    plan: PrefixPlan
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    shared_lens: torch.Tensor
    group_indptr: torch.Tensor
    group_page_indptr: torch.Tensor
    group_pages: torch.Tensor
    shared_pages: np.ndarray
    own_pages: np.ndarray
    max_own_tokens: int  # longest suffix (own pages x page_size): bounds the suffix decode
    max_shared_pages: int  # longest shared prefix in pages: sizes the shared-prefix split
    _work: dict  # group size -> work items of the shared-prefix kernel, on the device

    def _device(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.block_tables.device)

    def work_items(self, group_size: int) -> torch.Tensor:
        """[W, 2] int32 (group, first row) for the shared-prefix kernel, cached per GQA
        ratio (host-built once, so later calls can be captured in a CUDA graph)."""
        if group_size not in self._work:
            self._work[group_size] = self._device(
                shared_work(self.plan.group_indptr, self.plan.group_page_indptr, group_size))
        return self._work[group_size]

    def query_items(self, qo_lens: np.ndarray, group_size: int):
        """Multi-token queries: (qo_indptr [N+1] int32, query row -> request [T] int64,
        group_indptr over query rows, work items), cached per (qo_lens, GQA ratio)."""
        key = ("qo", group_size, qo_lens.tobytes())
        if key not in self._work:
            qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
            rows = np.repeat(np.arange(qo_lens.size, dtype=np.int64), qo_lens)
            group_indptr = qo_indptr[self.plan.group_indptr]
            work = shared_work(group_indptr, self.plan.group_page_indptr, group_size)
            self._work[key] = (self._device(qo_indptr), self._device(rows),
                               self._device(group_indptr.astype(np.int32)), self._device(work))
        return self._work[key]

    def release(self, cache: PagedKVCache) -> None:
        """Drop every request's references: each page returns to the free list once unused."""
        refs = np.repeat(self.shared_pages, self.plan.page_refs)
        if refs.size:
            cache.release(refs)
        if self.own_pages.size:
            cache.release(self.own_pages)
