"""Offline batch generation for Hugging Face causal LMs with BatchLLM's global prefix sharing.

Algorithm (one call of :func:`generate`):

1. **Plan.** ``PrefixPlan.build`` over every prompt: the global prefix tree, the groups
   (each shares one page-aligned prefix), and the order (groups together). One
   ``PrefixLayout`` on layer 0's ``PagedKVCache`` gives every request its block-table row
   (shared chain, then own pages for its suffix and generated tokens); every layer uses
   the same page ids in its own K/V pools.
2. **Prefill the shared prefixes once.** Each group's prefix runs through the model once
   (packed with the other groups' prefixes, written through the group's first member's
   block-table row, i.e. into the shared pages).
3. **Prefill each suffix against the cached prefix.** The suffix tokens of every request
   run packed; their attention is ``paged_decode`` with multi-token queries over the
   request's full row (shared prefix + own pages), causal among the suffix tokens.
4. **Decode together.** Each step feeds every unfinished request's last token (packed,
   plan order); every layer appends its K/V, then runs ``prefix_shared_decode`` (each
   group's prefix read once per step) or, when nothing is shared, ``paged_decode``.
   Requests that finish (stop token, ``max_new_tokens``) leave the step's rows.

The model is the user's: its embeddings, norms, rotary embeddings, MLPs / MoE blocks and
LM head run as its code defines them; attention goes through transformers'
``AttentionInterface`` (see :mod:`inferops.batch.hf`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .._core import ops
from ..attention.paged import PagedKVCache
from ..attention.prefix_plan import PrefixLayout, PrefixPlan
from . import hf

__all__ = ["generate", "BatchResult"]

_NO_SHARING = 2**30  # min_shared_pages no prompt reaches: a plan without groups


@dataclass(frozen=True)
class BatchResult:
    """``tokens[i]``: the new tokens of prompt ``i`` (input order; a stop token that ended
    a request is included, as in ``model.generate``). ``stats``: see :func:`generate`.
    ``logits[i]`` (only with ``output_logits=True``): the float32 logits each new token of
    prompt ``i`` was chosen from, ``[len(tokens[i]), vocab_size]``, on the CPU."""

    tokens: list[list[int]]
    stats: dict = field(default_factory=dict)
    logits: list[torch.Tensor] | None = None


# --- input checks ---------------------------------------------------------------------------


def _prompts_to_ids(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise TypeError(f"expected a list of prompts for `prompts`, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("expected at least one prompt in `prompts`, got an empty list")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise TypeError(f"prompts[{i}] is a string: pass `tokenizer=` to encode it, or token ids")
            p = tokenizer(p)["input_ids"]
        if isinstance(p, torch.Tensor):
            if p.dim() != 1 or p.dtype.is_floating_point:
                raise TypeError(f"expected a 1-d integer tensor for prompts[{i}], got {p.dtype} {list(p.shape)}")
            p = p.tolist()
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"expected a non-empty prompt, got an empty one at prompts[{i}]")
        out.append(ids)
    return out


def _check_model(model) -> None:
    name = type(model).__name__
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"expected a Hugging Face transformers causal LM for `model`, got {name}")
    # transformers' flag for models whose attention layers call AttentionInterface; a
    # forward pass also checks that every layer really came through it.
    if not getattr(type(model), "_supports_attention_backend", False) or not hasattr(
            model, "set_attn_implementation"):
        raise TypeError(
            f"{name}: its attention does not go through transformers' AttentionInterface, so "
            "inferops cannot run it (supported: models such as Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"{name}: expected a decoder-only causal LM, got an encoder-decoder model")


def _kv_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if model_dtype in (torch.float16, torch.bfloat16):
        return model_dtype
    # float32 models: a float32 cache where the PyTorch reference runs (CPU), exact; the
    # kernels take 16-bit K/V.
    if device.type == "cpu" and ops.cpu_backend() == "reference":
        return torch.float32
    return torch.bfloat16


def _stop_set(model, eos_token_id, stop_token_ids) -> set[int]:
    if eos_token_id is None:
        gc = getattr(model, "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None) if gc is not None else None
    stops: set[int] = set()
    for x in (eos_token_id, stop_token_ids):
        if x is None:
            continue
        stops.update(int(t) for t in ([x] if isinstance(x, int) else x))
    return stops


# --- sampling ----------------------------------------------------------------------------------


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
            top_p: float | None, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of ``logits`` ``[rows, vocab]`` (float32): argmax, or sampling with
    temperature, then top-k, then top-p (nucleus) filtering."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the tokens before it already hold top_p of the mass
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1).to(logits.device)


# --- layout of the active rows ------------------------------------------------------------------


def _select_rows(layout: PrefixLayout, rows: np.ndarray) -> PrefixLayout:
    """The layout restricted to plan positions ``rows`` (ascending): same pages, group
    metadata of the groups that still have members. For reading only (release the full
    layout)."""
    plan = layout.plan
    G = plan.num_groups
    group_of = np.repeat(np.arange(G), np.diff(plan.group_indptr))[rows]
    keep = np.unique(group_of)
    members = np.bincount(group_of, minlength=G)[keep]
    npages = np.diff(plan.group_page_indptr)[keep]
    pages = [plan.group_pages[plan.group_page_indptr[g]:plan.group_page_indptr[g + 1]] for g in keep]
    logical = np.concatenate(pages).astype(np.int32) if pages else np.zeros(0, np.int32)
    i32 = lambda a: np.ascontiguousarray(a, dtype=np.int32)  # noqa: E731
    sub = dataclasses.replace(
        plan, order=plan.order[rows], group_indptr=i32(np.concatenate([[0], np.cumsum(members)])),
        group_page_indptr=i32(np.concatenate([[0], np.cumsum(npages)])), group_pages=logical,
        shared_len=plan.shared_len[rows], prompt_len=plan.prompt_len[rows], decode_len=plan.decode_len[rows])
    dev = layout.block_tables.device
    t = lambda a: torch.from_numpy(i32(a)).to(dev)  # noqa: E731
    r = torch.from_numpy(rows.astype(np.int64)).to(dev)
    return PrefixLayout(
        plan=sub, block_tables=layout.block_tables.index_select(0, r),
        seq_lens=layout.seq_lens.index_select(0, r), shared_lens=layout.shared_lens.index_select(0, r),
        group_indptr=t(sub.group_indptr), group_page_indptr=t(sub.group_page_indptr),
        group_pages=t(layout.shared_pages[logical]) if logical.size else t(logical),
        shared_pages=layout.shared_pages, own_pages=layout.own_pages,
        max_own_tokens=layout.max_own_tokens, max_shared_pages=int(npages.max(initial=0)), _work={})


# --- the engine ------------------------------------------------------------------------------------


def _forward(model, step: hf.AttentionStep, ids: np.ndarray, pos: np.ndarray, keep: np.ndarray,
             num_layers: int, device) -> torch.Tensor:
    """One packed forward pass: float32 logits ``[len(keep), vocab]`` of tokens ``keep``."""
    ids_t = torch.from_numpy(ids.astype(np.int64)).to(device)[None]
    pos_t = torch.from_numpy(pos.astype(np.int64)).to(device)[None]
    keep_t = torch.from_numpy(keep.astype(np.int64)).to(device) if keep.size else 1
    with step.active():
        out = model(input_ids=ids_t, position_ids=pos_t, use_cache=False, logits_to_keep=keep_t)
    if len(step.layers_called) != num_layers:
        raise TypeError(
            f"{type(model).__name__}: only {len(step.layers_called)} of {num_layers} attention layers "
            "went through transformers' AttentionInterface; inferops cannot run this model")
    return out.logits[0].float() if keep.size else out.logits[0, :0].float()


def _chunks(lengths: np.ndarray, budget: int):
    """Consecutive index ranges whose lengths sum to at most ``budget`` (one item at least)."""
    start, total = 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > budget:
            yield start, i
            start, total = i, 0
        total += int(n)
    if start < len(lengths):
        yield start, len(lengths)


@torch.inference_mode()
def generate(
    model,
    prompts,
    max_new_tokens: int,
    *,
    tokenizer=None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    stop_token_ids: list[int] | None = None,
    page_size: int = 16,
    num_pages: int | None = None,
    sharing: bool = True,
    min_shared_pages: int = 1,
    prefill_chunk_tokens: int = 8192,
    progress: bool = False,
    output_logits: bool = False,
) -> BatchResult:
    """Generate for a whole batch of prompts with one causal LM, sharing common prefixes.

    Args:
        model: a ``transformers`` decoder-only causal LM whose attention goes through
            ``AttentionInterface`` (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral, ...),
            on the device the work should run on, in float32, bfloat16 or float16. Its
            attention implementation is switched to ``"inferops_paged"`` for the call and
            restored afterwards.
        prompts: a list of token-id sequences (lists or 1-d integer tensors), or of strings
            with ``tokenizer``. Each prompt plus ``max_new_tokens - 1`` (the last new token is
            not fed back) must fit in the model's ``max_position_embeddings``.
        max_new_tokens: tokens to generate per prompt (>= 1), fewer when a stop token ends it.
        do_sample, temperature, top_k, top_p, seed: sampling (default greedy). With
            ``do_sample=True``: logits / temperature, then top-k, then top-p filtering;
            ``seed`` seeds a ``torch.Generator`` (same seed, same batch: same tokens).
        eos_token_id: stop token(s); default ``model.generation_config.eos_token_id``.
        stop_token_ids: more stop tokens. A request stops after emitting one (it is kept in
            its output) and leaves the decode batch.
        page_size: KV cache page size (tokens); only whole pages are shared.
        num_pages: cache budget in pages per layer; default: exactly what the plan needs.
            A batch that does not fit raises ``ValueError`` before any work.
        sharing: ``False`` runs the plain paged baseline (every prompt prefilled whole,
            ``paged_decode``), same cache and model path.
        min_shared_pages: a prefix must span at least this many pages to be shared.
        prefill_chunk_tokens: packed tokens per prefill forward pass (whole prompts per pass;
            a longer prompt runs alone).
        progress: a tqdm progress bar over decode steps (needs ``tqdm``).
        output_logits: also return each new token's logits (``BatchResult.logits``).

    Returns:
        :class:`BatchResult`. ``stats``: ``requests``, ``groups`` (groups sharing a
        prefix), ``shared_prefix_tokens``, ``prefill_tokens`` (tokens run through the
        model in prefill) and ``prefill_tokens_without_sharing`` (sum of prompt lengths),
        ``kv_bytes_read`` and ``kv_bytes_read_without_sharing`` (K and V bytes the decode
        attention reads over all steps and layers: with sharing, each group's prefix once
        per step; without, every request's whole context), ``pages_used`` (per layer),
        ``page_size``, ``kv_dtype``, ``kv_bytes_per_token``, ``decode_steps``,
        ``generated_tokens``, ``prefill_s``, ``decode_s``, ``decode_tokens_per_s``.
    """
    t_start = time.perf_counter()
    # -- checks, before any work --
    _check_model(model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"expected an int >= 1 for `max_new_tokens`, got {max_new_tokens!r}")
    ids = _prompts_to_ids(prompts, tokenizer)
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = int(text_cfg.vocab_size)
    max_pos = getattr(text_cfg, "max_position_embeddings", None)
    for i, p in enumerate(ids):
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab:
            raise ValueError(f"prompts[{i}] has token id {lo if lo < 0 else hi}, out of range [0, {vocab}) "
                             "(the model's vocab_size)")
        # the last new token is never fed back: positions 0 .. len + max_new_tokens - 2 run
        if max_pos is not None and len(p) + max_new_tokens - 1 > max_pos:
            raise ValueError(f"prompts[{i}] has {len(p)} tokens: with max_new_tokens={max_new_tokens} it "
                             f"needs {len(p) + max_new_tokens - 1} positions, the model has "
                             f"max_position_embeddings={max_pos}")
    longest = max(len(p) for p in ids) + max_new_tokens
    window = getattr(text_cfg, "sliding_window", None)
    if window is not None and getattr(text_cfg, "use_sliding_window", True) and longest > window:
        raise NotImplementedError(f"{type(model).__name__} uses sliding-window attention (window {window}) "
                                  f"and a sequence reaches {longest} tokens: not supported by inferops' paged attention")
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"expected `temperature` > 0 with do_sample=True, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"expected an int >= 1 or None for `top_k`, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"expected `top_p` in (0, 1], got {top_p!r}")
    if prefill_chunk_tokens < 1:
        raise ValueError(f"expected `prefill_chunk_tokens` >= 1, got {prefill_chunk_tokens!r}")
    stops = _stop_set(model, eos_token_id, stop_token_ids)
    n = len(ids)
    num_layers = int(text_cfg.num_hidden_layers)
    num_kv_heads = int(getattr(text_cfg, "num_key_value_heads", None) or text_cfg.num_attention_heads)
    head_dim = int(getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads)
    param = next(model.parameters())
    device = param.device
    kv_dtype = _kv_dtype(param.dtype, device)

    # -- plan and pages --
    plan = PrefixPlan.build(ids, page_size, decode_lens=[max_new_tokens - 1] * n,
                            min_shared_pages=min_shared_pages if sharing else _NO_SHARING)
    own_tokens = plan.prompt_len.astype(np.int64) - plan.shared_len + plan.decode_len
    need = plan.num_shared_pages + int(((own_tokens + page_size - 1) // page_size).sum())
    if num_pages is None:
        num_pages = max(need, 1)
    elif isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 1:
        raise ValueError(f"expected an int >= 1 for `num_pages`, got {num_pages!r}")
    if need > num_pages:
        raise ValueError(
            f"the batch needs {need} KV pages per layer (page_size {page_size}, "
            f"{'with' if sharing else 'without'} sharing), the cache budget `num_pages` is {num_pages}: "
            "raise num_pages, lower max_new_tokens or split the batch")
    if progress:
        from tqdm.auto import tqdm  # noqa: F401  (fail before any work when missing)
    alloc = PagedKVCache(num_pages, page_size, num_kv_heads, head_dim, kv_dtype, device)
    layout = plan.materialize(alloc)
    kv = hf.KVLayers(k=[alloc.k] + [torch.empty_like(alloc.k) for _ in range(num_layers - 1)],
                     v=[alloc.v] + [torch.empty_like(alloc.v) for _ in range(num_layers - 1)])
    name = hf.register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        result = _run(model, ids, plan, layout, kv, num_layers, device, max_new_tokens, stops, do_sample,
                      temperature, top_k, top_p, seed, prefill_chunk_tokens, progress, sharing,
                      output_logits)
    finally:
        model.set_attn_implementation(previous)
        layout.release(alloc)
    tokens, st, logits = result
    elem = torch.empty(0, dtype=kv_dtype).element_size()
    per_token = 2 * num_layers * num_kv_heads * head_dim * elem
    st.update(
        requests=n,
        groups=int((np.diff(plan.group_page_indptr) > 0).sum()),
        shared_prefix_tokens=int(np.diff(plan.group_page_indptr).sum()) * page_size,
        prefill_tokens_without_sharing=int(plan.prompt_len.sum()),
        kv_bytes_read=st.pop("kv_tokens_read") * per_token,
        kv_bytes_read_without_sharing=st.pop("kv_tokens_read_unshared") * per_token,
        kv_bytes_per_token=per_token,
        pages_used=need,
        page_size=page_size,
        kv_dtype=str(kv_dtype).replace("torch.", ""),
        total_s=time.perf_counter() - t_start,
    )
    return BatchResult(tokens=tokens, stats=st, logits=logits)


def _run(model, ids, plan, layout, kv, num_layers, device, max_new_tokens, stops, do_sample, temperature,
         top_k, top_p, seed, chunk, progress, sharing, output_logits):
    n = plan.num_requests
    i32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device)  # noqa: E731
    prompt_len = plan.prompt_len.astype(np.int64)
    shared_len = plan.shared_len.astype(np.int64)
    plan_ids = [ids[r] for r in plan.order]
    first_logits: list[torch.Tensor | None] = [None] * n
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    t0 = time.perf_counter()
    # -- 1. each group's shared prefix, once (through its first member's row) --
    G = plan.num_groups
    firsts = plan.group_indptr[:-1].astype(np.int64)
    glen = shared_len[firsts]
    groups = np.nonzero(glen > 0)[0]
    prefill_tokens = 0
    for a, b in _chunks(glen[groups], chunk):
        gs = groups[a:b]
        rows = firsts[gs]
        lens = glen[gs]
        tok = np.concatenate([plan_ids[r][:L] for r, L in zip(rows, lens)])
        pos = np.concatenate([np.arange(L) for L in lens])
        seq = np.repeat(np.arange(len(rows)), lens)
        ends = np.cumsum(lens) - 1
        # members whose whole prompt is the shared prefix take their first token from here
        need_logit = [g for g in gs if (prompt_len[plan.group_indptr[g]:plan.group_indptr[g + 1]]
                                        == glen[g]).any()]
        keep = np.asarray([ends[list(gs).index(g)] for g in need_logit], dtype=np.int64)
        sel = torch.from_numpy(rows).to(device)
        tables = layout.block_tables.index_select(0, sel)
        step = hf.AttentionStep(kv, tables, i32(seq), i32(pos), tables, i32(lens),
                                qo_indptr=i32(np.concatenate([[0], np.cumsum(lens)])))
        logits = _forward(model, step, tok, pos, keep, num_layers, device)
        prefill_tokens += int(lens.sum())
        for j, g in enumerate(need_logit):
            for r in range(plan.group_indptr[g], plan.group_indptr[g + 1]):
                if prompt_len[r] == glen[g]:
                    first_logits[r] = logits[j]
    # -- 2. every request's own suffix, against the cached prefix --
    slen = prompt_len - shared_len
    with_suffix = np.nonzero(slen > 0)[0]
    for a, b in _chunks(slen[with_suffix], chunk):
        rows = with_suffix[a:b]
        lens = slen[rows]
        tok = np.concatenate([plan_ids[r][shared_len[r]:] for r in rows])
        pos = np.concatenate([np.arange(shared_len[r], prompt_len[r]) for r in rows])
        seq = np.repeat(rows, lens)
        keep = np.cumsum(lens) - 1
        sel = torch.from_numpy(rows).to(device)
        step = hf.AttentionStep(kv, layout.block_tables, i32(seq), i32(pos),
                                layout.block_tables.index_select(0, sel), i32(prompt_len[rows]),
                                qo_indptr=i32(np.concatenate([[0], np.cumsum(lens)])))
        logits = _forward(model, step, tok, pos, keep, num_layers, device)
        prefill_tokens += int(lens.sum())
        for j, r in enumerate(rows):
            first_logits[r] = logits[j]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if do_sample and gen is None:
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    first = torch.stack(first_logits)
    nxt = _sample(first, do_sample, temperature, top_k, top_p, gen).cpu().numpy()
    kept = [[row] for row in first.cpu()] if output_logits else None
    sync()
    t1 = time.perf_counter()

    # -- 3. decode all requests together --
    out: list[list[int]] = [[int(t)] for t in nxt]
    cur = prompt_len.copy()  # tokens in the cache per row
    done = np.asarray([int(t) in stops or max_new_tokens == 1 for t in nxt])
    kv_read = kv_read_unshared = 0
    active_key, sub = None, None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_new_tokens - 1, desc="decode", unit="step")
    steps = 0
    any_shared = plan.num_shared_pages > 0
    group_of = np.repeat(np.arange(G), np.diff(plan.group_indptr))
    while not done.all():
        rows = np.nonzero(~done)[0]
        tok = np.asarray([out[r][-1] for r in rows])
        pos = cur[rows]
        seq_lens = i32(pos + 1)
        if any_shared:
            key = rows.tobytes()
            if key != active_key:  # the active set changed: restrict the layout once
                active_key, sub = key, _select_rows(layout, rows)
            step = hf.AttentionStep(kv, sub.block_tables, i32(np.arange(rows.size)), i32(pos), None, seq_lens,
                                    layout=sub, validate=steps == 0)
        else:
            tables = layout.block_tables.index_select(0, torch.from_numpy(rows).to(device))
            step = hf.AttentionStep(kv, tables, i32(np.arange(rows.size)), i32(pos), tables, seq_lens,
                                    validate=steps == 0)
        # what this step's attention reads, per layer, in tokens
        active_groups = np.unique(group_of[rows])
        kv_read += int(shared_len[plan.group_indptr[active_groups]].sum()) + int((pos + 1 - shared_len[rows]).sum())
        kv_read_unshared += int((pos + 1).sum())
        logits = _forward(model, step, tok, pos, np.arange(rows.size), num_layers, device)
        nxt = _sample(logits, do_sample, temperature, top_k, top_p, gen).cpu().numpy()
        cur[rows] += 1
        if kept is not None:
            for r, row in zip(rows, logits.cpu()):
                kept[r].append(row)
        for r, t in zip(rows, nxt):
            out[r].append(int(t))
            if int(t) in stops or len(out[r]) >= max_new_tokens:
                done[r] = True
        steps += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    sync()
    t2 = time.perf_counter()
    tokens: list[list[int]] = [None] * n  # type: ignore[list-item]
    logits_out = [None] * n if kept is not None else None
    for i, r in enumerate(plan.order):
        tokens[int(r)] = out[i]
        if kept is not None:
            logits_out[int(r)] = torch.stack(kept[i])
    generated = sum(len(t) for t in out)
    stats = dict(prefill_tokens=prefill_tokens, kv_tokens_read=kv_read, kv_tokens_read_unshared=kv_read_unshared,
                 decode_steps=steps, generated_tokens=generated, prefill_s=t1 - t0, decode_s=t2 - t1,
                 decode_tokens_per_s=(generated - n) / (t2 - t1) if t2 > t1 else 0.0, sharing=sharing)
    return tokens, stats, logits_out
