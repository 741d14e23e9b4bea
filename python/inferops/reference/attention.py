"""References for the attention family."""

from __future__ import annotations

import torch

__all__ = ["merge_states", "append_kv", "paged_decode", "build_prefix_plan"]


def merge_states(
    v_a: torch.Tensor,
    lse_a: torch.Tensor,
    v_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge of two partial attention states (natural-log LSE).

    ``v_*``: ``[num_tokens, num_heads, head_dim]``; ``lse_*``: ``[num_tokens, num_heads]``.
    Returns ``v`` in ``out_dtype`` (default ``v_a.dtype``) and ``lse`` in
    ``compute_dtype``. A partial with ``lse = -inf`` is empty and gets weight 0;
    when both are empty the result is ``v = 0``, ``lse = -inf``. NaN propagates.
    """
    out_dtype = v_a.dtype if out_dtype is None else out_dtype
    la = lse_a.to(compute_dtype)
    lb = lse_b.to(compute_dtype)
    both_empty = (la == float("-inf")) & (lb == float("-inf"))
    m = torch.maximum(la, lb)  # propagates NaN
    m = torch.where(both_empty, torch.zeros_like(m), m)  # avoid -inf - -inf
    e_a = torch.exp(la - m)
    e_b = torch.exp(lb - m)
    s = e_a + e_b
    w_a = torch.where(both_empty, torch.zeros_like(s), e_a / s)
    w_b = torch.where(both_empty, torch.zeros_like(s), e_b / s)
    v = w_a.unsqueeze(-1) * v_a.to(compute_dtype) + w_b.unsqueeze(-1) * v_b.to(compute_dtype)
    lse = torch.where(both_empty, torch.full_like(m, float("-inf")), m + torch.log(s))
    return v.to(out_dtype), lse


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_tables: torch.Tensor,
    seq_ids: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Write token ``t``'s K/V into page ``block_tables[seq_ids[t], positions[t] // page_size]``,
    slot ``positions[t] % page_size``, of ``k_cache``/``v_cache``
    (``[num_pages, page_size, num_kv_heads, head_dim]``). Indices must be valid."""
    page_size = k_cache.shape[1]
    seq = seq_ids.long()
    pos = positions.long()
    pages = block_tables.long()[seq, pos // page_size]
    slots = pos % page_size
    k_cache[pages, slots] = k.to(k_cache.dtype)
    v_cache[pages, slots] = v.to(v_cache.dtype)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query per sequence over its paged KV cache.

    ``q``: ``[batch, num_q_heads, head_dim]``; caches ``[num_pages, page_size,
    num_kv_heads, head_dim]``; ``block_tables`` ``[batch, max_pages]`` (entries
    past a sequence's last page are ignored); ``seq_lens`` ``[batch]``. Query head
    ``h`` reads kv head ``h // (num_q_heads // num_kv_heads)`` (GQA).
    Returns ``out`` (q's dtype) and ``lse`` = log(sum_j exp(scale * q.k_j))
    (natural log, ``compute_dtype``); an empty sequence gives 0 and -inf.
    """
    B, Hq, D = q.shape
    _, page_size, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    max_len = block_tables.shape[1] * page_size
    pos = torch.arange(max_len, device=q.device)
    valid = pos[None, :] < seq_lens.long()[:, None]  # [B, max_len]
    pages = torch.where(valid, block_tables.long()[:, pos // page_size], 0)
    slots = (pos % page_size)[None, :].expand(B, -1)
    # Positions past a sequence's end read page 0, which may belong to another
    # request and hold anything (inf, NaN): zero them, or 0 * inf poisons the output.
    keep = valid[:, :, None, None]
    k = torch.where(keep, k_cache[pages, slots].to(compute_dtype), 0)  # [B, max_len, Hkv, D]
    v = torch.where(keep, v_cache[pages, slots].to(compute_dtype), 0)
    qg = q.to(compute_dtype).view(B, Hkv, G, D)
    s = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for empty sequences
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("bhgt,bthd->bhgd", p, v)
    return out.reshape(B, Hq, D).to(q.dtype), lse.reshape(B, Hq)


def build_prefix_plan(
    prompts, page_size: int, decode_lens=None, min_shared_pages: int = 1
) -> dict:
    """Pure-Python prefix plan (the oracle of the C++ planner; same outputs).

    ``prompts``: list of token-id sequences. Builds the page-level prefix trie
    with tuple keys, flattens it to one level of sharing by maximum saved page
    reads, and orders groups and requests by decode/prompt ratio. See
    ``csrc/attention/prefix_plan.h`` for the algorithm and the output fields.
    """
    import numpy as np

    n = len(prompts)
    prompts = [list(map(int, p)) for p in prompts]
    decode = [1] * n if decode_lens is None else [int(x) for x in decode_lens]
    parent, depth, count, owner = [-1], [0], [n], [-1]
    child: dict[tuple, int] = {}
    end_node = []
    for r, toks in enumerate(prompts):
        node = 0
        for p in range(len(toks) // page_size):
            key = (node, tuple(toks[p * page_size:(p + 1) * page_size]))
            if key not in child:
                child[key] = len(parent)
                parent.append(node)
                depth.append(depth[node] + 1)
                count.append(0)
                owner.append(r)
            node = child[key]
            count[node] += 1
        end_node.append(node)
    m = len(parent)
    # Flatten (same dynamic program as csrc/attention/prefix_plan.cpp, written
    # plainly): candidates are shared, deep enough, branching or terminal nodes.
    ending = [0] * m
    nchildren = [0] * m
    for e in end_node:
        ending[e] += 1
    for v in range(1, m):
        nchildren[parent[v]] += 1
    nearest = [0] * m
    cands, cparent, cdepth, cand_id = [], [], [], {}
    for v in range(m):
        is_cand = v == 0 or (count[v] >= 2 and depth[v] >= min_shared_pages
                             and (ending[v] > 0 or nchildren[v] != 1))
        up = -1 if v == 0 else nearest[parent[v]]
        if is_cand:
            cand_id[v] = len(cands)
            cands.append(v)
            cparent.append(-1 if up < 0 else cand_id[up])
            cdepth.append(0 if up < 0 else cdepth[cand_id[up]] + 1)
            nearest[v] = v
        else:
            nearest[v] = up
    C = len(cands)
    direct = [0] * C
    for e in end_node:
        direct[cand_id[nearest[e]]] += 1
    childsum = [[0] * (cdepth[w] + 1) for w in range(C)]
    opens = [None] * C
    for w in range(C - 1, 0, -1):
        d = depth[cands[w]]
        anc, a = [], cparent[w]
        while a >= 0:
            anc.append(depth[cands[a]])
            a = cparent[a]
        anc.reverse()  # anc[k]: depth of the k-th candidate ancestor
        open_val = childsum[w][cdepth[w]] + (direct[w] - 1) * d
        opens[w] = []
        for k in range(cdepth[w]):
            closed = childsum[w][k] + direct[w] * anc[k]
            opens[w].append(open_val > closed)
            childsum[cparent[w]][k] += open_val if opens[w][k] else closed
    pass_k = [0] * C
    open_anc = [-1] * C
    for w in range(1, C):
        k = pass_k[cparent[w]]
        pass_k[w] = cdepth[w] if opens[w][k] else k
        open_anc[w] = cands[w] if opens[w][k] else open_anc[cparent[w]]
    group_of_request = [open_anc[cand_id[nearest[e]]] for e in end_node]
    sizes: dict[int, int] = {}
    for g in group_of_request:
        if g >= 0:
            sizes[g] = sizes.get(g, 0) + 1
    group_of_request = [g if g >= 0 and sizes[g] >= 2 else -1 for g in group_of_request]

    def ratio(r):
        return decode[r] / max(1, len(prompts[r]))

    def by_ratio(r):
        return (-ratio(r), r)

    groups: dict[int, list[int]] = {}
    singles = []
    for r in range(n):
        g = group_of_request[r]
        (singles if g < 0 else groups.setdefault(g, [])).append(r)
    roots = list(groups)
    for g in roots:
        groups[g].sort(key=by_ratio)
    roots.sort(key=lambda g: (-ratio(groups[g][0]), groups[g][0]))
    singles.sort(key=by_ratio)

    out = {k: [] for k in ("order", "group_pages", "shared_len", "prompt_len", "page_owner",
                           "page_index", "page_refs")}
    group_indptr, group_page_indptr, logical = [0], [0], {}
    for g in roots:
        chain = []
        v = g
        while v > 0:
            chain.append(v)
            v = parent[v]
        for v in reversed(chain):
            if v not in logical:
                logical[v] = len(out["page_owner"])
                out["page_owner"].append(owner[v])
                out["page_index"].append(depth[v] - 1)
                out["page_refs"].append(0)
            out["page_refs"][logical[v]] += len(groups[g])
            out["group_pages"].append(logical[v])
        for r in groups[g]:
            out["order"].append(r)
            out["shared_len"].append(depth[g] * page_size)
            out["prompt_len"].append(len(prompts[r]))
        group_indptr.append(len(out["order"]))
        group_page_indptr.append(len(out["group_pages"]))
    for r in singles:
        out["order"].append(r)
        out["shared_len"].append(0)
        out["prompt_len"].append(len(prompts[r]))
        group_indptr.append(len(out["order"]))
        group_page_indptr.append(len(out["group_pages"]))
    res = {k: np.asarray(v, dtype=np.int32) for k, v in out.items()}
    res["group_indptr"] = np.asarray(group_indptr, dtype=np.int32)
    res["group_page_indptr"] = np.asarray(group_page_indptr, dtype=np.int32)
    res["num_tree_nodes"] = m
    return res
