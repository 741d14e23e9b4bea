"""Paged KV cache, append_kv and paged_decode.

Kernels: csrc/attention/append_kv.cu, csrc/attention/paged_decode.cu.
References: inferops.reference.attention.append_kv / paged_decode.

Cache layout: K and V are two tensors of shape
``[num_pages, page_size, num_kv_heads, head_dim]`` (fp16 or bf16, contiguous).
Token ``pos`` of a sequence is in page ``block_tables[seq, pos // page_size]``,
slot ``pos % page_size``. Block tables and all index tensors are int32.
"""

from __future__ import annotations

import functools
import math
import operator

import numpy as np
import torch

from .._core import ops
from .._core.demos import Demo, register_demo
from .._core.extension import simt_extension
from ..reference import attention as ref
from ..testing import Tolerance
from ..validation import check_dtype, check_same_device, check_shape, check_tensor, read_flags

__all__ = ["PagedKVCache", "append_kv", "paged_decode", "check_block_tables", "default_device"]

_KV_DTYPES = (torch.float16, torch.bfloat16)

# LSE of a decode over bf16/fp16 K: fp32 dot products and exp2 in a different
# order than the reference; scores of magnitude ~10 carry ~1e-5 absolute error.
LSE_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-4)


# --- index validation (one device->host sync; skipped with validate=False) --------


def check_block_tables(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, num_pages: int, page_size: int
) -> None:
    """Raise ValueError unless every sequence's pages are valid cache pages.

    ``seq_lens[i]`` must be in ``[0, max_pages * page_size]`` and the first
    ``ceil(seq_lens[i] / page_size)`` entries of ``block_tables[i]`` in
    ``[0, num_pages)``; entries past them are ignored (padding such as -1 is fine).
    Reads the values, so it synchronizes with the device once; under torch.compile or
    CUDA-graph capture the checks run on the device instead (``validation.read_flags``).
    """
    max_pages = block_tables.shape[1]
    sl = seq_lens.long()
    used = (sl + page_size - 1) // page_size
    mask = torch.arange(max_pages, device=block_tables.device)[None, :] < used[:, None]
    bad_page = mask & ((block_tables < 0) | (block_tables >= num_pages))
    flags = torch.stack([(sl < 0).any(), (sl > max_pages * page_size).any(), bad_page.any()])
    neg, too_long, page = read_flags(flags, (
        "expected `seq_lens` >= 0",
        f"expected `seq_lens` <= max_pages * page_size = {max_pages * page_size}",
        f"expected the used entries of `block_tables` in [0, {num_pages}) (cache pages)"))
    if neg:
        i = int((sl < 0).nonzero()[0])
        raise ValueError(f"expected `seq_lens` >= 0, got {int(sl[i])} for sequence {i}")
    if too_long:
        i = int((sl > max_pages * page_size).nonzero()[0])
        raise ValueError(
            f"seq_len {int(sl[i])} of sequence {i} exceeds what its block table row holds "
            f"({max_pages} pages x page_size {page_size} = {max_pages * page_size} tokens)"
        )
    if page:
        i, j = (int(x) for x in bad_page.nonzero()[0])
        raise ValueError(
            f"page id {int(block_tables[i, j])} at block_tables[{i}, {j}] is out of range "
            f"[0, {num_pages}) (sequence {i} needs {int(used[i])} pages)"
        )


def _check_cache(k_cache, v_cache) -> None:
    check_tensor("k_cache", k_cache)
    check_tensor("v_cache", v_cache)
    # float32: CPU caches read by the reference (the kernels take 16-bit K/V).
    fp32_ok = k_cache.device.type == "cpu" and (torch.compiler.is_compiling()
                                                 or ops.cpu_backend() == "reference")
    check_dtype("k_cache", k_cache, _KV_DTYPES + ((torch.float32,) if fp32_ok else ()))
    check_dtype("v_cache", v_cache, (k_cache.dtype,))
    if k_cache.dim() != 4:
        raise ValueError(
            "expected `k_cache` of shape [num_pages, page_size, num_kv_heads, head_dim], "
            f"got {list(k_cache.shape)}"
        )
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not t.is_contiguous():
            raise ValueError(f"expected a contiguous `{name}`")


def _check_index(name: str, t, ndim: int) -> None:
    check_tensor(name, t)
    check_dtype(name, t, (torch.int32,))
    if t.dim() != ndim:
        raise ValueError(f"expected a {ndim}-d `{name}`, got shape {list(t.shape)}")


# --- append_kv ------------------------------------------------------------------------


def _append_kv_cuda(k_cache, v_cache, k, v, block_tables, seq_ids, positions):
    ops.ext().append_kv(
        ops.dlpack(k_cache), ops.dlpack(v_cache), ops.dlpack(k), ops.dlpack(v),
        ops.dlpack(block_tables), ops.dlpack(seq_ids), ops.dlpack(positions),
        ops.cuda_stream(k_cache.device),
    )


@ops.register_op(
    "append_kv",
    family="attention",
    mutates_args=("k_cache", "v_cache"),
    fake=lambda k_cache, v_cache, k, v, block_tables, seq_ids, positions: None,
    cuda_impl=_append_kv_cuda,
)
def _append_kv_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    ref.append_kv(k_cache, v_cache, k, v, block_tables, seq_ids, positions)


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    validate: bool = True,
) -> None:
    """Write new tokens' K and V into their cache slots (one launch for the batch).

    Args:
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, fp16 or bf16,
            contiguous; written in place.
        k, v: ``[num_tokens, num_kv_heads, head_dim]``, the caches' dtype, contiguous in
            the last two dims.
        block_tables: ``[batch, max_pages]`` int32, page ids per sequence.
        seq_ids: ``[num_tokens]`` int32, the block-table row of each token.
        positions: ``[num_tokens]`` int32, each token's position in its sequence; it goes
            to page ``block_tables[seq, pos // page_size]``, slot ``pos % page_size``.
        validate: check ``seq_ids``, ``positions`` and the page ids they reach (one
            device sync). Pass False inside CUDA-graph capture; the kernel then skips
            tokens whose indices are out of range instead of writing outside the cache.

    Two tokens that name the same slot in one call race (one of them wins).
    """
    _check_cache(k_cache, v_cache)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t)
        check_dtype(name, t, (k_cache.dtype,))
    if k.dim() != 3:
        raise ValueError(f"expected `k` of shape [num_tokens, num_kv_heads, head_dim], got {list(k.shape)}")
    n = k.shape[0]
    check_shape("k", k, (n, *k_cache.shape[2:]))
    check_shape("v", v, (n, *k_cache.shape[2:]))
    _check_index("block_tables", block_tables, 2)
    _check_index("seq_ids", seq_ids, 1)
    _check_index("positions", positions, 1)
    check_shape("seq_ids", seq_ids, (n,))
    check_shape("positions", positions, (n,))
    check_same_device({"k_cache": k_cache, "v_cache": v_cache, "k": k, "v": v,
                       "block_tables": block_tables, "seq_ids": seq_ids, "positions": positions})
    if validate and n > 0:
        _check_append_indices(block_tables, seq_ids, positions, k_cache.shape[0], k_cache.shape[1])
    torch.ops.inferops.append_kv(k_cache, v_cache, k.contiguous(), v.contiguous(),
                                 block_tables, seq_ids, positions)


def _check_append_indices(block_tables, seq_ids, positions, num_pages, page_size):
    batch, max_pages = block_tables.shape
    s, p = seq_ids.long(), positions.long()
    bad_seq = (s < 0) | (s >= batch)
    bad_pos = (p < 0) | (p >= max_pages * page_size)
    ok = ~(bad_seq | bad_pos)
    if block_tables.numel() == 0:  # no row or no page: every token is out of range above
        pages = torch.zeros_like(s)
    else:
        pages = block_tables.long()[torch.where(ok, s, 0), torch.where(ok, p // page_size, 0)]
    bad_page = ok & ((pages < 0) | (pages >= num_pages))
    a, b, c = read_flags(torch.stack([bad_seq.any(), bad_pos.any(), bad_page.any()]), (
        f"expected `seq_ids` in [0, {batch}) (rows of `block_tables`)",
        f"expected `positions` in [0, {max_pages * page_size}) (block table width x page_size)",
        f"expected the `block_tables` entries that `seq_ids`/`positions` reach in [0, {num_pages}) (cache pages)"))
    if a:
        t = int(bad_seq.nonzero()[0])
        raise ValueError(f"seq_ids[{t}] = {int(s[t])} is out of range [0, {batch}) (rows of `block_tables`)")
    if b:
        t = int(bad_pos.nonzero()[0])
        raise ValueError(
            f"positions[{t}] = {int(p[t])} is out of range [0, {max_pages * page_size}) "
            f"(block table width {max_pages} x page_size {page_size})"
        )
    if c:
        t = int(bad_page.nonzero()[0])
        raise ValueError(
            f"token {t} (sequence {int(s[t])}, position {int(p[t])}) maps to page id "
            f"{int(pages[t])}, out of range [0, {num_pages})"
        )


# --- paged_decode ---------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device | str) -> int:
    """SMs of the device the kernels for tensors on ``device`` run on: the CUDA device's;
    on a CPU device the SIMT executor's modelled device (its ``device_info``), or 132 (an
    H100) without the executor (the split factors are then unused: the reference runs)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if torch.compiler.is_compiling():
        return 132  # the executor's modelled H100 (loading the module cannot be traced)
    return int(ops.kernel_device_info(device)["sm_count"]) if simt_extension() is not None else 132


def choose_num_splits(batch: int, num_kv_heads: int, max_len: int, sm_count: int) -> int:
    """Split-KV factor from shapes only (no data, so CUDA-graph safe).

    One block per (sequence, kv head, split); aim for >= 2 blocks per SM, with
    at least 256 tokens per split so the merge stays cheap.
    """
    blocks = max(1, batch * num_kv_heads)
    if blocks >= 2 * sm_count or max_len <= 512:
        return 1
    want = math.ceil(2 * sm_count / blocks)
    return max(1, min(want, max_len // 256, 64))


def _paged_decode_cuda(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits):
    B, Hq, D = q.shape
    dev = q.device
    if num_splits <= 0:
        num_splits = choose_num_splits(B, k_cache.shape[2], block_tables.shape[1] * k_cache.shape[1],
                                       sm_count(dev))
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=dev)
    lse = torch.empty((B, Hq), dtype=torch.float32, device=dev)
    if num_splits > 1:
        partial_out = torch.empty((num_splits, B, Hq, D), dtype=torch.float32, device=dev)
        partial_lse = torch.empty((num_splits, B, Hq), dtype=torch.float32, device=dev)
        po, pl = ops.dlpack(partial_out), ops.dlpack(partial_lse)
    else:
        po = pl = None
    ops.ext().paged_decode(
        ops.dlpack(q), ops.dlpack(k_cache), ops.dlpack(v_cache), ops.dlpack(block_tables),
        ops.dlpack(seq_lens), ops.dlpack(out), ops.dlpack(lse), po, pl, num_splits, scale,
        ops.cuda_stream(dev),
    )
    return out, lse


def decode_outputs_like(q: torch.Tensor, *_):
    """(out, lse) as every decode op returns them: fake implementation of the decode ops."""
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:2], dtype=torch.float32
    )


@ops.register_op("paged_decode", family="attention", fake=decode_outputs_like,
                 cuda_impl=_paged_decode_cuda)
def _paged_decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = ref.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale=scale)
    return out.contiguous(), lse.contiguous()


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    qo_indptr: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a paged KV cache: one query token per sequence, or
    several with a causal mask among them (``qo_indptr``).

    Args:
        q: ``[batch, num_q_heads, head_dim]``, fp16 or bf16 (the caches' dtype),
            head_dim 64 or 128 on the GPU; last dim contiguous.
        k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]``, contiguous;
            any page size >= 1. ``num_q_heads`` must be a multiple of ``num_kv_heads``
            (GQA: query head ``h`` reads kv head ``h // (num_q_heads // num_kv_heads)``).
        block_tables: ``[batch, max_pages]`` int32; entries past a sequence's last page
            are ignored.
        seq_lens: ``[batch]`` int32, tokens per sequence (0 allowed: output 0, lse -inf).
        scale: softmax scale, default ``head_dim ** -0.5``.
        num_splits: split-KV factor; default chosen from the shapes (never from data,
            so the call is CUDA-graph capturable with ``validate=False``).
        qo_indptr: multi-token queries (speculative-draft verification, chunked
            prefill against the cache): ``[batch + 1]`` int32 on q's device; ``q`` is
            then ``[total_query_tokens, num_q_heads, head_dim]`` with sequence ``i``'s
            queries at rows ``qo_indptr[i]:qo_indptr[i+1]``. Their K/V must already be
            in the cache as the sequence's last tokens (``seq_lens`` includes them);
            query ``j`` of ``n`` attends to tokens ``[0, seq_len - n + j]`` (causal
            among the new tokens). Each query token currently reads its KV on its own
            (no reuse across a sequence's new tokens), as its own row of the kernel's
            grid: on the GPU at most 65535 query rows in total (as for ``batch``).
        validate: check ``seq_lens``, ``qo_indptr`` and the page ids they need (one
            device sync).

    Returns:
        ``(out, lse)``: ``out`` ``[batch or total_query_tokens, num_q_heads, head_dim]``
        in q's dtype; ``lse`` ``[..., num_q_heads]`` float32, natural log of
        ``sum_j exp(scale * q . k_j)`` (feed it to :func:`merge_states`).
    """
    B, Hq, D = check_decode_query("paged_decode", q, k_cache, v_cache)
    num_pages, page_size, Hkv, _ = k_cache.shape
    _check_index("block_tables", block_tables, 2)
    _check_index("seq_lens", seq_lens, 1)
    batch = B if qo_indptr is None else block_tables.shape[0]
    check_shape("block_tables", block_tables, (batch, block_tables.shape[1]))
    check_shape("seq_lens", seq_lens, (batch,))
    check_same_device({"q": q, "k_cache": k_cache, "v_cache": v_cache,
                       "block_tables": block_tables, "seq_lens": seq_lens})
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"expected num_splits >= 1, got {num_splits}")
    if validate and batch > 0:
        check_block_tables(block_tables, seq_lens, num_pages, page_size)
    if qo_indptr is not None:
        _check_index("qo_indptr", qo_indptr, 1)
        check_shape("qo_indptr", qo_indptr, (batch + 1,))
        check_same_device({"q": q, "qo_indptr": qo_indptr})
        if validate:
            check_qo_indptr(qo_indptr, seq_lens, B)
        rows, seq_lens = expand_queries(qo_indptr, seq_lens, B)
        block_tables = block_tables.index_select(0, rows)
    if _misaligned(q):
        q = q.contiguous()
    scale = D**-0.5 if scale is None else float(scale)
    return torch.ops.inferops.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                           0 if num_splits is None else int(num_splits))


def check_decode_query(op: str, q, k_cache, v_cache) -> tuple[int, int, int]:
    """Checks shared by the decode ops: the caches, and ``q`` ``[rows, num_q_heads, head_dim]``
    against them (dtype, head dim, GQA divisibility, head dims with a kernel). Returns q's shape."""
    _check_cache(k_cache, v_cache)
    check_tensor("q", q)
    check_dtype("q", q, (k_cache.dtype,))
    if q.dim() != 3:
        raise ValueError(f"expected `q` of shape [rows, num_q_heads, head_dim], got {list(q.shape)}")
    rows, Hq, D = q.shape
    _, _, Hkv, Dc = k_cache.shape
    if D != Dc:
        raise ValueError(f"expected head_dim {Dc} (the cache's) for `q`, got {D}")
    if Hq % Hkv != 0:
        raise ValueError(f"expected num_q_heads ({Hq}) to be a multiple of num_kv_heads ({Hkv})")
    if ops.kernel_backend(op, q.device) != "reference" and D not in (64, 128):
        raise ValueError(f"expected head_dim 64 or 128 for `q` on the GPU, got {D}")
    return rows, Hq, D


def _misaligned(q: torch.Tensor) -> bool:
    """True when q's rows are not 16-byte aligned (the kernels load 16-byte vectors).

    Under torch.compile the data pointer is unknown at trace time: skip the fix-up
    there (the C++ layer still rejects misaligned rows with a clear error).
    """
    if torch.compiler.is_compiling():
        return q.stride(-1) != 1
    return q.stride(-1) != 1 or q.data_ptr() % 16 != 0 or any(s % 8 for s in q.stride()[:2])


def check_qo_indptr(qo_indptr: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> None:
    """Raise ValueError unless ``qo_indptr`` is a valid CSR over ``num_tokens`` query
    rows whose tokens fit in their sequences (one device sync)."""
    counts = (qo_indptr[1:] - qo_indptr[:-1]).long()
    flags = read_flags(torch.stack([qo_indptr[0] != 0, qo_indptr[-1] != num_tokens, (counts < 0).any(),
                                    (counts > seq_lens.long()).any()]), (
        "expected qo_indptr[0] == 0", f"expected qo_indptr[-1] == {num_tokens} (rows of `q`)",
        "expected non-decreasing `qo_indptr`",
        "expected each sequence's query tokens (from `qo_indptr`) <= its `seq_lens` (append their K/V first)"))
    if flags[0] or flags[1]:
        raise ValueError(f"expected qo_indptr[0] == 0 and qo_indptr[-1] == {num_tokens} (rows of `q`), "
                         f"got {int(qo_indptr[0])} and {int(qo_indptr[-1])}")
    if flags[2]:
        i = int((counts < 0).nonzero()[0])
        raise ValueError(f"expected non-decreasing `qo_indptr`, got qo_indptr[{i + 1}] < qo_indptr[{i}]")
    if flags[3]:
        i = int((counts > seq_lens.long()).nonzero()[0])
        raise ValueError(f"sequence {i} has {int(counts[i])} query tokens but seq_len {int(seq_lens[i])}: "
                         "the new tokens' K/V must be in the cache (append them first)")


def expand_queries(qo_indptr: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int):
    """Per query row: its sequence and causal KV length (no host sync).

    Query ``j`` of the ``n`` new tokens of a sequence of length ``L`` sees ``L - n + j + 1``
    tokens; as its own row it runs the single-token kernel over that prefix.
    """
    batch = qo_indptr.shape[0] - 1
    counts = qo_indptr[1:] - qo_indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(batch, device=qo_indptr.device), counts.long(),
                                   output_size=num_tokens)
    local = torch.arange(num_tokens, device=qo_indptr.device) - qo_indptr.long()[rows]
    lens = seq_lens.long()[rows] - counts.long()[rows] + 1 + local
    return rows, lens.to(torch.int32)


# --- cache object -----------------------------------------------------------------------


def default_device() -> torch.device:
    """The current accelerator (e.g. ``cuda:0``) when torch has one, else the CPU."""
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if acc is None and torch.cuda.is_available():
        acc = torch.device("cuda")
    if acc is None:
        return torch.device("cpu")
    idx = torch.accelerator.current_device_index() if hasattr(torch, "accelerator") else None
    return torch.device(acc.type, idx) if idx is not None and idx >= 0 else torch.device(acc.type)


class PagedKVCache:
    """K and V page pools with a reference-counted page allocator.

    ``k``, ``v``: ``[num_pages, page_size, num_kv_heads, head_dim]`` tensors
    (uninitialised until written), fp16 or bf16; float32 is accepted for a CPU
    cache, which only the PyTorch reference reads (exact float32 checks against a
    model's own attention). ``device`` defaults to the current accelerator, else
    the CPU. Pages are handed out by :meth:`allocate`
    with reference count 1; a request that shares a page (a common prefix)
    calls :meth:`retain`, and :meth:`release` frees a page only when its count
    reaches 0. The allocator is host-side and not thread-safe.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int = 16,
        num_kv_heads: int = 8,
        head_dim: int = 128,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        sizes = {}
        for name, val in (("num_pages", num_pages), ("page_size", page_size),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            try:
                sizes[name] = operator.index(val)  # int, numpy and torch integers
            except TypeError:
                sizes[name] = -1
            if isinstance(val, bool) or sizes[name] < 1:
                raise ValueError(f"expected a positive int for `{name}`, got {val!r}")
        num_pages, page_size, num_kv_heads, head_dim = sizes.values()
        if num_pages > 2**31 - 1:
            raise ValueError(f"expected num_pages < 2^31 (int32 page ids), got {num_pages}")
        device = default_device() if device is None else torch.device(device)
        if dtype not in _KV_DTYPES and not (dtype == torch.float32 and device.type == "cpu"):
            raise TypeError(f"expected dtype float16 or bfloat16 for `dtype` (float32 only for a "
                            f"CPU cache), got {dtype}")
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self._refcount = np.zeros(num_pages, dtype=np.int64)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def refcount(self, page: int) -> int:
        return int(self._refcount[page])

    def allocate(self, n: int) -> torch.Tensor:
        """``n`` free pages (int32, on the CPU), each with reference count 1."""
        if n < 0:
            raise ValueError(f"expected n >= 0, got {n}")
        if n > len(self._free):
            raise RuntimeError(
                f"PagedKVCache out of pages: asked for {n}, {len(self._free)} of {self.num_pages} free"
            )
        pages = [self._free.pop() for _ in range(n)]
        self._refcount[pages] = 1
        return torch.tensor(pages, dtype=torch.int32)

    def _counts(self, pages, what: str) -> np.ndarray:
        arr = np.asarray(torch.as_tensor(pages).cpu().reshape(-1), dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_pages):
            raise ValueError(f"page id out of range [0, {self.num_pages}) in `pages` to {what}")
        counts = np.bincount(arr, minlength=self.num_pages)
        if what == "retain":
            bad = (counts > 0) & (self._refcount == 0)  # only allocated pages can be shared
        else:
            bad = self._refcount < counts  # never drop below zero
        if bad.any():
            page = int(np.nonzero(bad)[0][0])
            raise ValueError(
                f"cannot {what} page {page}: reference count {int(self._refcount[page])}, "
                f"{what} {int(counts[page])} time(s) (pages must be allocated first)"
            )
        return counts

    def retain(self, pages) -> None:
        """Add one reference to each listed (allocated) page, e.g. a shared prefix page."""
        counts = self._counts(pages, "retain")
        self._refcount += counts

    def release(self, pages) -> None:
        """Drop one reference per listed page; pages reaching 0 return to the free list."""
        counts = self._counts(pages, "release")
        self._refcount -= counts
        freed = np.nonzero((counts > 0) & (self._refcount == 0))[0]
        self._free.extend(int(p) for p in freed[::-1])

    def append(self, k, v, block_tables, seq_ids, positions, *, validate: bool = True) -> None:
        """:func:`append_kv` into this cache."""
        append_kv(self.k, self.v, k, v, block_tables, seq_ids, positions, validate=validate)

    def decode(self, q, block_tables, seq_lens, **kwargs):
        """:func:`paged_decode` over this cache."""
        return paged_decode(q, self.k, self.v, block_tables, seq_lens, **kwargs)


# --- main-job demos ------------------------------------------------------------------------


def _demo_decode_shape(device: torch.device):
    # (batch, Hq, Hkv, D, seq_len, page_size)
    return (16, 32, 8, 128, 2048, 16) if device.type == "cuda" else (4, 8, 2, 128, 200, 16)


def _demo_decode_inputs(device: torch.device, g: torch.Generator):
    B, Hq, Hkv, D, L, ps = _demo_decode_shape(device)
    pages_per_seq = -(-L // ps)
    num_pages = B * pages_per_seq + 3
    perm = torch.randperm(num_pages, generator=g)[: B * pages_per_seq]  # scattered pages
    block_tables = perm.view(B, pages_per_seq).to(torch.int32)
    seq_lens = torch.randint(1, L + 1, (B,), generator=g, dtype=torch.int32)
    seq_lens[0] = L

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16)

    return (rand(B, Hq, D), rand(num_pages, ps, Hkv, D), rand(num_pages, ps, Hkv, D),
            block_tables.to(device), seq_lens.to(device))


def _demo_decode_ref64(q, k_cache, v_cache, block_tables, seq_lens):
    return ref.paged_decode(q.double(), k_cache.double(), v_cache.double(), block_tables, seq_lens,
                            compute_dtype=torch.float64)


register_demo(
    Demo(
        op="paged_decode",
        sizes=lambda d: "B={} Hq={} Hkv={} D={} L<={} page={}".format(*_demo_decode_shape(d)),
        make_inputs=_demo_decode_inputs,
        run=lambda *a: paged_decode(*a, validate=False),
        baseline=ref.paged_decode,
        reference64=_demo_decode_ref64,
        dtype=torch.bfloat16,
        aux_tolerance=LSE_TOLERANCE,
    )
)


def _demo_append_shape(device: torch.device):
    # (tokens, Hkv, D, page_size, num_pages)
    return (256, 8, 128, 16, 4096) if device.type == "cuda" else (32, 2, 64, 16, 64)


def _demo_append_inputs(device: torch.device, g: torch.Generator):
    n, Hkv, D, ps, P = _demo_append_shape(device)
    cache_k = torch.zeros(P, ps, Hkv, D, dtype=torch.bfloat16, device=device)
    cache_v = torch.zeros_like(cache_k)
    # one new token per sequence, decode style: sequence i at a random position
    max_pages = P // n
    block_tables = torch.randperm(P, generator=g)[: n * max_pages].view(n, max_pages).to(torch.int32)
    positions = torch.randint(0, max_pages * ps, (n,), generator=g, dtype=torch.int32)
    seq_ids = torch.arange(n, dtype=torch.int32)
    k = torch.randn(n, Hkv, D, generator=g).to(device, torch.bfloat16)
    v = torch.randn(n, Hkv, D, generator=g).to(device, torch.bfloat16)
    return (cache_k, cache_v, k, v, block_tables.to(device), seq_ids.to(device), positions.to(device))


def _gather_slots(k_cache, v_cache, block_tables, seq_ids, positions):
    ps = k_cache.shape[1]
    pages = block_tables.long()[seq_ids.long(), positions.long() // ps]
    slots = positions.long() % ps
    return k_cache[pages, slots], v_cache[pages, slots]


def _demo_append_run(k_cache, v_cache, k, v, block_tables, seq_ids, positions):
    append_kv(k_cache, v_cache, k, v, block_tables, seq_ids, positions, validate=False)
    return _gather_slots(k_cache, v_cache, block_tables, seq_ids, positions)


def _demo_append_baseline(k_cache, v_cache, k, v, block_tables, seq_ids, positions):
    ref.append_kv(k_cache, v_cache, k, v, block_tables, seq_ids, positions)
    return _gather_slots(k_cache, v_cache, block_tables, seq_ids, positions)


register_demo(
    Demo(
        op="append_kv",
        sizes=lambda d: "tokens={} Hkv={} D={} page={} pages={}".format(*_demo_append_shape(d)),
        make_inputs=_demo_append_inputs,
        run=_demo_append_run,
        baseline=_demo_append_baseline,
        reference64=lambda kc, vc, k, v, *rest: (k.double(), v.double()),
        dtype=torch.bfloat16,
    )
)
