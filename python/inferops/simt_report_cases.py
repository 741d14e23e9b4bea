"""The cases ``python -m inferops simt-report`` runs: every kernel op at its family's
headline shape, scaled down for the CPU SIMT executor, with each op's ideal global traffic.

The executor runs one CUDA thread per fiber, so some headline shapes (a 4096 x 4096 GEMM,
32 sequences of 4K tokens) take minutes. Where the full shape runs in a few seconds the
report case *is* the headline (merge_states, append_kv, routing_layout, the step,
int4/w4a16, quantize_per_token). Otherwise the case keeps the headline's **per-block
work** -- the same tile counts per block, page size, head dim, hidden size per row, split
factor -- and runs fewer blocks (fewer sequences, heads, rows or output tiles).
Per-block traffic is what the bytes-moved / ideal ratio mostly depends on (re-reads inside
a block, uncoalesced or partial-sector accesses); what shrinking the grid changes (e.g.
how often a GEMM re-reads A and B across output tiles) is said in the case's
``headline``.

``ideal(inputs)`` is the fewest global bytes the op must move: each input byte it needs read
once, each output byte written once (element sizes of the actual dtypes; only the parts of
an input the op needs, e.g. the K/V of tokens below ``seq_len``). Scratch buffers and
launch metadata the wrapper builds (split-K partials, the Hadamard factor) are not part of
the ideal: moving them is overhead the report should show.

``CASES["ci"]`` are tiny (each < ~3 s on the executor) and are checked against the
reference backend by tests/common/test_simt_report_cases.py; ``CASES["report"]`` are the
scaled headline shapes (each < ~15 s on the executor without instrumentation on the 2-core
build machine; measured times are in the comments next to each case).

This module only builds inputs and calls public ops: it imports nothing from the metrics
instrumentation (``inferops.testing.simt_metrics``), which the report wraps around ``run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Case", "CASES", "all_cases"]


@dataclass(frozen=True)
class Case:
    op: str  # registered kernel name (as `python -m inferops check` lists it)
    label: str  # the sizes run
    headline: str  # the headline shape it scales down from, and what per-block work is kept
    memory_bound: bool  # True: judged against HBM bandwidth; False: tensor-core / compute bound
    make: Callable[[torch.Generator], dict]  # fresh random CPU inputs
    run: Callable[[dict], Any]  # the public op on those inputs (caller picks the backend)
    ideal: Callable[[dict], tuple[int, int]]  # (ideal global bytes read, ideal bytes written)
    ideal_doc: str  # how the ideal is defined


# --- helpers -----------------------------------------------------------------------------------

BF16 = torch.bfloat16
SM_COUNT = 132  # the H100 the executor models (inferops._core.ops.kernel_device_info)


def _nbytes(*ts) -> int:
    """Bytes of the given tensors (None ignored)."""
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _randn(g: torch.Generator, *shape, scale: float = 1.0, dtype=BF16) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _kv_ideal(k_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> tuple[int, int]:
    """(unique K+V bytes, unique page count) of the tokens below each row's seq_len.

    A page reached from several rows (a shared prefix) counts once, with the most tokens
    any row uses from it; rows past their last page are not read. Pure host arithmetic
    over the block tables: no kernel, no sharing assumption.
    """
    ps = k_cache.shape[1]
    tok_bytes = k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()  # one token, all kv heads
    used: dict[int, int] = {}
    bt = block_tables.tolist()
    for row, n in zip(bt, seq_lens.tolist()):
        for j in range(-(-int(n) // ps)):
            page = int(row[j])
            used[page] = max(used.get(page, 0), min(ps, int(n) - j * ps))
    return 2 * tok_bytes * sum(used.values()), len(used)


# --- attention ---------------------------------------------------------------------------------


def _merge_make(T, H, D):
    def make(g):
        return {"v_a": _randn(g, T, H, D), "lse_a": _randn(g, T, H, scale=4.0, dtype=torch.float32),
                "v_b": _randn(g, T, H, D), "lse_b": _randn(g, T, H, scale=4.0, dtype=torch.float32)}
    return make


def _merge_run(x):
    from inferops.attention import merge_states
    return merge_states(x["v_a"], x["lse_a"], x["v_b"], x["lse_b"])


def _merge_ideal(x):
    # out v in v_a's dtype, out lse float32 (as merge_states returns them)
    return _nbytes(x["v_a"], x["lse_a"], x["v_b"], x["lse_b"]), _nbytes(x["v_a"]) + x["lse_a"].numel() * 4


_MERGE_DOC = ("reads v_a, lse_a, v_b, lse_b once; writes v (v_a's dtype) and lse (fp32) once")


def _merge_case(T, H, D, headline):
    return Case("merge_states", f"T={T} H={H} D={D} bf16", headline, True, _merge_make(T, H, D),
                _merge_run, _merge_ideal, _MERGE_DOC)


def _append_make(n, Hkv, D, ps, P):
    def make(g):
        # decode style: one new token per sequence at a random position of its pages
        max_pages = P // n
        bt = torch.randperm(P, generator=g)[: n * max_pages].view(n, max_pages).to(torch.int32)
        return {"k_cache": torch.zeros(P, ps, Hkv, D, dtype=BF16), "v_cache": torch.zeros(P, ps, Hkv, D, dtype=BF16),
                "k": _randn(g, n, Hkv, D), "v": _randn(g, n, Hkv, D), "block_tables": bt,
                "seq_ids": torch.arange(n, dtype=torch.int32),
                "positions": torch.randint(0, max_pages * ps, (n,), generator=g, dtype=torch.int32)}
    return make


def _append_run(x):
    """append_kv mutates the caches: run on copies so one input set can be run twice
    (simt, then reference) and return what the op wrote (the caches)."""
    from inferops.attention import append_kv
    kc, vc = x["k_cache"].clone(), x["v_cache"].clone()
    append_kv(kc, vc, x["k"], x["v"], x["block_tables"], x["seq_ids"], x["positions"], validate=False)
    return kc, vc


def _append_ideal(x):
    n = x["k"].shape[0]
    # k, v, seq_ids, positions, and one block-table entry (int32) per token
    return _nbytes(x["k"], x["v"], x["seq_ids"], x["positions"]) + 4 * n, _nbytes(x["k"], x["v"])


_APPEND_DOC = ("reads k, v, seq_ids, positions and one int32 block-table entry per token; writes each token's "
               "K and V slot once (the rest of the caches is untouched, not counted)")


def _append_case(n, Hkv, D, ps, P, headline):
    return Case("append_kv", f"tokens={n} Hkv={Hkv} D={D} page={ps} pages={P} bf16", headline, True,
                _append_make(n, Hkv, D, ps, P), _append_run, _append_ideal, _APPEND_DOC)


def _decode_make(B, Hq, Hkv, D, L, ps, full: bool):
    def make(g):
        pages_per_seq = -(-L // ps)
        num_pages = B * pages_per_seq + 3
        bt = torch.randperm(num_pages, generator=g)[: B * pages_per_seq].view(B, pages_per_seq).to(torch.int32)
        if full:  # the bench's shape: every sequence L tokens
            seq_lens = torch.full((B,), L, dtype=torch.int32)
        else:  # ragged, as the demo: one sequence at L, the rest shorter
            seq_lens = torch.randint(1, L + 1, (B,), generator=g, dtype=torch.int32)
            seq_lens[0] = L
        return {"q": _randn(g, B, Hq, D), "k_cache": _randn(g, num_pages, ps, Hkv, D),
                "v_cache": _randn(g, num_pages, ps, Hkv, D), "block_tables": bt, "seq_lens": seq_lens}
    return make


def _decode_run(num_splits):
    def run(x):
        from inferops.attention import paged_decode
        return paged_decode(x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"],
                            num_splits=num_splits, validate=False)
    return run


def _decode_ideal(x):
    kv, pages = _kv_ideal(x["k_cache"], x["block_tables"], x["seq_lens"])
    q = x["q"]
    # out like q, lse fp32 [B, Hq] (paged_decode always returns it)
    return _nbytes(q, x["seq_lens"]) + kv + 4 * pages, _nbytes(q) + q.shape[0] * q.shape[1] * 4


_DECODE_DOC = ("reads q, seq_lens, the K and V of every token < seq_len (all kv heads, whole head_dim) and the "
               "int32 block-table entry of each page those tokens are on; writes out (q's dtype) and lse (fp32) once; "
               "split-KV partials are scratch, not counted")


def _decode_case(B, Hq, Hkv, D, L, ps, headline, num_splits=None, full=False):
    splits = "" if num_splits is None else f" splits={num_splits}"
    return Case("paged_decode", f"B={B} Hq={Hq} Hkv={Hkv} D={D} L{'=' if full else '<='}{L} page={ps}{splits} bf16",
                headline, True, _decode_make(B, Hq, Hkv, D, L, ps, full), _decode_run(num_splits), _decode_ideal,
                _DECODE_DOC)


def _prefix_make(groups, m, prefix, suffix, Hq, Hkv, D, ps):
    def make(g):
        from inferops.attention import PagedKVCache, PrefixPlan
        prompts = []
        for _ in range(groups):
            pre = torch.randint(0, 30000, (prefix,), generator=g).tolist()
            prompts += [pre + torch.randint(0, 30000, (suffix,), generator=g).tolist() for _ in range(m)]
        plan = PrefixPlan.build(prompts, ps)
        pages = plan.num_shared_pages + sum(-(-(p - s + 1) // ps) for p, s in zip(plan.prompt_len, plan.shared_len))
        cache = PagedKVCache(pages + 1, ps, Hkv, D, BF16, "cpu")
        cache.k.copy_(_randn(g, *cache.k.shape))
        cache.v.copy_(_randn(g, *cache.v.shape))
        layout = plan.materialize(cache)
        return {"q": _randn(g, plan.num_requests, Hq, D), "k_cache": cache.k, "v_cache": cache.v, "layout": layout}
    return make


def _prefix_run(x):
    from inferops.attention import prefix_shared_decode
    return prefix_shared_decode(x["q"], x["k_cache"], x["v_cache"], x["layout"], validate=False)


def _prefix_ideal(x):
    lay, q = x["layout"], x["q"]
    kv, pages = _kv_ideal(x["k_cache"], lay.block_tables, lay.seq_lens)
    return _nbytes(q, lay.seq_lens) + kv + 4 * pages, _nbytes(q) + q.shape[0] * q.shape[1] * 4


_PREFIX_DOC = ("reads q, seq_lens, the K and V of every *distinct* cached token a request attends to (a group's "
               "shared prefix once for the whole group, each suffix once) and one int32 page id per distinct page; "
               "writes out (q's dtype) and lse (fp32) once; the layout's other metadata and the split partials are "
               "not counted")


def _prefix_case(groups, m, prefix, suffix, Hq, Hkv, D, ps, headline):
    return Case("prefix_shared_decode",
                f"req={m}x{groups} prefix={prefix} suffix={suffix} Hq={Hq} Hkv={Hkv} D={D} page={ps} bf16", headline,
                False, _prefix_make(groups, m, prefix, suffix, Hq, Hkv, D, ps), _prefix_run, _prefix_ideal,
                _PREFIX_DOC)


# --- linear attention --------------------------------------------------------------------------


def _sla_make(B, H, hh, ww, d):
    def make(g):
        N = hh * ww
        return {"q": _randn(g, B, H, N, d), "k": _randn(g, B, H, N, d), "v": _randn(g, B, H, N, d),
                "w": _randn(g, d, 1, 5, 5, scale=0.2, dtype=torch.float32),
                "b": _randn(g, d, scale=0.1, dtype=torch.float32), "hw": (hh, ww)}
    return make


def _sla_run(x):
    from inferops.linear_attention import simplified_linear_attention
    return simplified_linear_attention(x["q"], x["k"], x["v"], x["w"], x["b"], x["hw"])


def _sla_ideal(x):
    return _nbytes(x["q"], x["k"], x["v"], x["w"], x["b"]), _nbytes(x["q"])


_SLA_DOC = ("reads q, k, v, the 5x5 depthwise-conv weight and bias once; writes out [B, H, N, d] in q's dtype once "
            "(the conv's re-read of v and the per-head phi(K)^T V state are not counted)")


def _sla_case(B, H, hh, ww, d, headline):
    return Case("simplified_linear_attention", f"B={B} heads={H} grid={hh}x{ww} d={d} bf16", headline, False,
                _sla_make(B, H, hh, ww, d), _sla_run, _sla_ideal, _SLA_DOC)


def _causal_make(B, T, H, K):
    def make(g):
        return {"q": _randn(g, B, T, H, K, scale=0.3), "k": _randn(g, B, T, H, K, scale=0.3),
                "v": _randn(g, B, T, H, K, scale=0.3)}
    return make


def _causal_run(x):
    """normalize=False as the benchmark and the demo run it (the public default normalize=True
    divides by phi(q) . sum phi(k), ill-conditioned for signed random features without
    use_relu); otherwise the defaults: no initial state, no final state."""
    from inferops.linear_attention import causal_linear_attention
    return causal_linear_attention(x["q"], x["k"], x["v"], normalize=False)


def _causal_ideal(x):
    return _nbytes(x["q"], x["k"], x["v"]), _nbytes(x["v"])


_CAUSAL_DOC = ("normalize=False (as the bench), no initial or final state: reads q, k, v once; writes o "
               "[B, T, H, V] in q's dtype once; the running state stays on chip, not counted")


def _causal_case(B, T, H, K, headline):
    return Case("causal_linear_attention", f"B={B} T={T} H={H} K=V={K} bf16", headline, False,
                _causal_make(B, T, H, K), _causal_run, _causal_ideal, _CAUSAL_DOC)


def _step_make(B, H, K):
    def make(g):
        return {"q": _randn(g, B, H, K, scale=0.5), "k": _randn(g, B, H, K, scale=0.5),
                "v": _randn(g, B, H, K, scale=0.5), "state": _randn(g, B, H, K, K, dtype=torch.float32)}
    return make


def _step_run(x):
    """The tensor-state form (normalize=False), as the decode benchmark runs it; the state is
    updated in place, so run on a copy and return (o, new state)."""
    from inferops.linear_attention import linear_attention_step
    state = x["state"].clone()
    o, _ = linear_attention_step(x["q"], x["k"], x["v"], state)
    return o, state


def _step_ideal(x):
    return _nbytes(x["q"], x["k"], x["v"], x["state"]), _nbytes(x["v"], x["state"])


_STEP_DOC = ("tensor state (normalize=False): reads q, k, v and the fp32 state [B, H, K, V] once; writes o "
             "[B, H, V] and the updated state once (in place)")


def _step_case(B, H, K, headline):
    return Case("linear_attention_step", f"B={B} H={H} K=V={K} bf16, fp32 state", headline, True,
                _step_make(B, H, K), _step_run, _step_ideal, _STEP_DOC)


# --- MoE ---------------------------------------------------------------------------------------


def _ids(g, T, k, E):
    return torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(torch.int32)


def _routing_make(T, k, E, R):
    def make(g):
        from inferops.moe import default_placement
        return {"topk_ids": _ids(g, T, k, E), "E": E, "R": R, "placement": default_placement(E, R, "cpu")}
    return make


_LAYOUT_FIELDS = ("tokens_per_expert", "expert_offsets", "dst_index", "src_index", "tokens_per_rank",
                  "send_index", "send_offsets", "errors")


def _routing_run(x):
    from inferops.moe import routing_layout
    lay = routing_layout(x["topk_ids"], x["E"], placement=x["placement"], world_size=x["R"], align=16,
                         validate=False)
    return tuple(getattr(lay, f) for f in _LAYOUT_FIELDS)


def _routing_ideal(x):
    T, k = x["topk_ids"].shape
    E, R = x["E"], x["R"]
    cap = T * k + E * 15  # default capacity at align 16
    # int32 fields: tokens_per_expert [E], expert_offsets [E+1], dst_index [T,k], src_index [cap],
    # tokens_per_rank [R], send_index [T,R], send_offsets [R+1], errors [2]
    written = 4 * (E + (E + 1) + T * k + cap + R + T * R + (R + 1) + 2)
    return _nbytes(x["topk_ids"], x["placement"]), written


_ROUTING_DOC = ("align=16, default capacity T*k + 15E: reads topk_ids and the placement [E] once; writes every "
                "int32 field of the RoutingLayout once (src_index has capacity rows, padding included)")


def _routing_case(T, k, E, R, headline):
    # Not held to the memory-bound targets: one block computes the whole layout (serial
    # scans over experts and ranks, a few hundred KiB of indices): latency, not bandwidth,
    # decides its time (docs/developer.md, "Memory-access metrics").
    return Case("routing_layout", f"T={T} k={k} E={E} R={R} align=16", headline, False, _routing_make(T, k, E, R),
                _routing_run, _routing_ideal, _ROUTING_DOC)


def _perm_make(T, k, E, hidden, unpermute: bool):
    def make(g):
        from inferops.moe import routing_layout
        lay = routing_layout(_ids(g, T, k, E), E, align=16)
        if not unpermute:
            return {"x": _randn(g, T, hidden), "layout": lay}
        # unpermute's input: the expert-major buffer (what a grouped GEMM writes), and the router weights
        return {"y": _randn(g, lay.capacity, hidden), "layout": lay, "w": torch.rand(T, k, generator=g)}
    return make


def _permute_run(x):
    from inferops.moe import permute
    return permute(x["x"], x["layout"])


def _permute_ideal(x):
    lay, xx = x["layout"], x["x"]
    routed = int((lay.dst_index >= 0).any(dim=1).sum())  # tokens with at least one kept assignment
    row = xx.shape[1] * xx.element_size()
    return routed * row + _nbytes(lay.src_index, lay.dst_index), lay.capacity * row


_PERMUTE_DOC = ("reads each routed token's row of x once (not once per top-k copy), src_index [capacity] and "
                "dst_index [T, k] (the slots a token is written to); "
                "writes all capacity rows of the expert-major output once (padding rows are zeros, still written)")


def _unpermute_run(x):
    from inferops.moe import unpermute
    return unpermute(x["y"], x["layout"], x["w"])


def _unpermute_ideal(x):
    lay, y = x["layout"], x["y"]
    kept = int((lay.dst_index >= 0).sum())
    row = y.shape[1] * y.element_size()
    return kept * row + _nbytes(lay.dst_index, x["w"]), lay.dst_index.shape[0] * row


_UNPERMUTE_DOC = ("reads the y row of each kept assignment once (padding rows are never read), dst_index [T, k] and "
                  "topk_weights [T, k]; writes out [T, hidden] once")


def _perm_cases(T, k, E, hidden, headline):
    label = f"T={T} k={k} E={E} hidden={hidden} align=16 bf16"
    return [Case("permute", label, headline, True, _perm_make(T, k, E, hidden, False), _permute_run, _permute_ideal,
                 _PERMUTE_DOC),
            Case("unpermute", label, headline, True, _perm_make(T, k, E, hidden, True), _unpermute_run,
                 _unpermute_ideal, _UNPERMUTE_DOC)]


# --- quant -------------------------------------------------------------------------------------


def _w4_make(M, K, N, symmetric: bool, with_x: bool):
    def make(g):
        from inferops.quant import pack_int4
        w = pack_int4(torch.randn(N, K, generator=g) * 0.02, 128, symmetric=symmetric, dtype=BF16)
        d = {"w": w}
        if with_x:
            d["x"] = _randn(g, M, K)
            d["bias"] = _randn(g, N, scale=0.1)
        return d
    return make


def _w4a16_run(x):
    from inferops.quant import w4a16_matmul
    return w4a16_matmul(x["x"], x["w"], x["bias"])


def _w4a16_ideal(x):
    w = x["w"]
    M, N = x["x"].shape[0], w.out_features
    return _nbytes(x["x"], w.qweight, w.scales, w.zeros, x["bias"]), M * N * x["x"].element_size()


_W4A16_DOC = ("reads x, the packed int4 weight, its group scales (and zeros if any) and bias once; writes y [M, N] "
              "once (split-K partials are reduced on chip, not counted)")


def _w4a16_case(M, K, N, headline):
    return Case("w4a16_matmul", f"M={M} K={K} N={N} g128 sym bf16", headline, False, _w4_make(M, K, N, True, True),
                _w4a16_run, _w4a16_ideal, _W4A16_DOC)


def _dequant_run(x):
    from inferops.quant import dequantize
    return dequantize(x["w"])


def _dequant_ideal(x):
    w = x["w"]
    return _nbytes(w.qweight, w.scales, w.zeros), w.out_features * w.in_features * w.scales.element_size()


_DEQUANT_DOC = ("reads the packed int4 weight, scales and zero points once; writes W [N, K] in the scales' dtype once")


def _dequant_case(N, K, headline):
    return Case("int4_dequantize", f"N={N} K={K} g128 zero points, bf16 out", headline, True,
                _w4_make(0, K, N, False, False), _dequant_run, _dequant_ideal, _DEQUANT_DOC)


def _w8_make(M, K, N):
    def make(g):
        from inferops.reference import quant_w8a8 as ref
        x_q, xs = ref.quantize_per_token(torch.randn(M, K, generator=g), torch.float8_e4m3fn)
        w_q, ws = ref.quantize_per_token(torch.randn(N, K, generator=g) * 0.05, torch.float8_e4m3fn)
        # fp32 bias: the kernel's own type, so the wrapper adds no conversion pass
        return {"x_q": x_q, "x_scale": xs, "w_q": w_q, "w_scale": ws, "bias": _randn(g, N, scale=0.1,
                                                                                       dtype=torch.float32)}
    return make


def _w8a8_run(x, path="auto"):
    from inferops.quant import w8a8_matmul
    return w8a8_matmul(x["x_q"], x["x_scale"], x["w_q"], x["w_scale"], BF16, x["bias"], path=path)


def _w8a8_ideal(x):
    M, N = x["x_q"].shape[0], x["w_q"].shape[0]
    return _nbytes(x["x_q"], x["x_scale"], x["w_q"], x["w_scale"], x["bias"]), M * N * 2


_W8A8_DOC = ("fp8 e4m3, path auto (mma): reads x_q, x_scale, w_q, w_scale and the fp32 bias once; writes y [M, N] "
             "bf16 once")


def _w8a8_case(M, K, N, headline, path="auto"):
    # path="wgmma": the opt-in FP8 warpgroup kernel (w8a8_wgmma.cu), whose operand reads go
    # through shared-memory matrix descriptors (the metrics' wgmma core-matrix model).
    label = f"fp8 M={M} K={K} N={N} bf16 out" + (", wgmma path" if path == "wgmma" else "")
    return Case("w8a8_matmul", label, headline, False, _w8_make(M, K, N),
                lambda x: _w8a8_run(x, path), _w8a8_ideal, _W8A8_DOC)


def _qpt_make(M, K):
    def make(g):
        return {"x": _randn(g, M, K)}
    return make


def _qpt_run(x):
    from inferops.quant import quantize_per_token
    return quantize_per_token(x["x"], torch.int8)


def _qpt_ideal(x):
    M, K = x["x"].shape
    return _nbytes(x["x"]), M * K * 1 + M * 4


_QPT_DOC = "int8: reads x once; writes x_q (1 B/element) and the fp32 per-row scale once"


def _qpt_case(M, K, headline):
    return Case("quantize_per_token", f"int8 M={M} K={K} bf16 in", headline, True, _qpt_make(M, K), _qpt_run,
                _qpt_ideal, _QPT_DOC)


def _had_run(x):
    from inferops.quant import hadamard_quantize
    return hadamard_quantize(x["x"], torch.int8)


_HAD_DOC = ("int8: reads x once; writes the rotated int8 codes (1 B/element) and the fp32 per-row scale once (the "
            "dense Hadamard factor the kernel reads is a constant table, not counted)")


def _had_case(M, n, headline):
    return Case("hadamard_quantize", f"M={M} n={n} -> int8, bf16 in", headline, True, _qpt_make(M, n), _had_run,
                _qpt_ideal, _HAD_DOC)


# --- tensor parallel ---------------------------------------------------------------------------


def _grs_make(W, M, K, N):
    def make(g):
        a = _randn(g, W, M, K, scale=K ** -0.5)
        w = _randn(g, W, N, K)
        return {"a": a, "b": w.transpose(1, 2)}  # b = weight^T, as RowParallelLinear passes it
    return make


def _grs_run(x):
    from inferops.tp import virtual_gemm_reduce_scatter
    return virtual_gemm_reduce_scatter(x["a"], x["b"])


def _grs_ideal(x):
    W, M, _ = x["a"].shape
    N = x["b"].shape[-1]
    return _nbytes(x["a"], x["b"]), W * (M // W) * N * x["a"].element_size()


_GRS_DOC = ("virtual ranks on one device: reads every rank's a [M, K] and b [K, N] once; writes each rank's "
            "[M/W, N] slice of the sum once (exchanging partial tiles between ranks is protocol traffic, not counted)")


def _grs_case(W, M, K, N, headline):
    return Case("gemm_reduce_scatter", f"W={W} M={M} K={K} N={N} bf16", headline, False, _grs_make(W, M, K, N),
                _grs_run, _grs_ideal, _GRS_DOC)


# --- the tables --------------------------------------------------------------------------------


def _paged_headline_splits() -> int:
    from inferops.attention.paged import choose_num_splits
    return choose_num_splits(32, 8, 4096, SM_COUNT)


def _ci_cases() -> list[Case]:
    tiny = "tiny correctness case (CI); the report case scales the headline"
    # The memory-bound ops are a little larger than tiny: their metrics are held to the targets
    # in CI (tests/simt/test_kernel_metrics.py), and at a handful of tokens the 32-byte sectors
    # of the 4-byte index reads alone are more than 10% of the bytes.
    small = "small CI case, large enough for the memory-bound targets; the report case scales the headline"
    return [
        _merge_case(8, 4, 128, tiny),
        _append_case(64, 2, 128, 16, 64, small),
        _decode_case(2, 8, 2, 128, 512, 16, small, num_splits=2),  # the split + merge path, as the report
        _prefix_case(1, 2, 32, 9, 4, 1, 64, 16, tiny),
        _sla_case(1, 1, 4, 4, 32, tiny),
        _causal_case(1, 70, 1, 32, tiny),
        _step_case(1, 2, 32, tiny),
        _routing_case(16, 2, 8, 2, tiny),
        *_perm_cases(64, 4, 16, 7168, small),
        _w4a16_case(2, 1024, 64, tiny),  # K=1024: split-K 4 (a cluster), as the report's 8
        _dequant_case(64, 128, tiny),
        _w8a8_case(16, 64, 32, tiny),
        _w8a8_case(64, 128, 128, tiny, path="wgmma"),
        _qpt_case(2, 256, tiny),
        _had_case(2, 256, tiny),
        _grs_case(1, 16, 32, 16, tiny),
    ]


def _report_cases() -> list[Case]:
    # Seconds: one run of `run` on the executor on the 2-core CPU build machine, without the
    # memory-access instrumentation (expect it to be slower with simt_metrics on).
    splits = _paged_headline_splits()
    return [
        # 1.3 s. The headline itself: 16 rows of 16 16-byte vectors per block.
        _merge_case(2048, 32, 128, "T=2048 H=32 D=128 (bench/demo, 8M elements): run at the full shape"),
        # 0.1 s. The demo's shape: one token (all kv heads) per block.
        _append_case(256, 8, 128, 16, 4096, "tokens=256 Hkv=8 D=128 page=16 pages=4096: run at the full shape"),
        # 2.8 s.
        _decode_case(4, 32, 8, 128, 4096, 16,
                     f"B=32 Hq=32 Hkv=8 D=128 L=4096 page=16 (FA3's 'paged decode at 4K'): the split heuristic picks "
                     f"{splits} splits there, so each block reads {4096 // splits} tokens of one kv head for GQA 4 "
                     "query heads; kept by passing that split count; 4 sequences instead of 32",
                     num_splits=splits, full=True),
        # 14 s (the full headline, 64 req x 1 group, takes 54 s).
        _prefix_case(1, 16, 4096, 256, 32, 8, 128, 16,
                     "64 req x 1 group, prefix 4096, suffix 256, Hq=32 Hkv=8 D=128 page=16 (bench target '>= 10x "
                     "paged_decode'): keeps the prefix, 64 query rows (16 req x GQA 4) per shared-prefix block and "
                     "256 tokens x GQA 4 per suffix block; 16 requests instead of 64, so the split heuristic cuts "
                     "the prefix into 17 splits (~4 key tiles of 64 per block) instead of 5 (~13 tiles)"),
        # 0.75 s.
        _sla_case(16, 3, 56, 56, 32,
                  "swin-s1 C=96: B=64 heads=3 56x56 d=32: each reduce block covers one head's 3136 tokens, each "
                  "output block a 32-token tile, as there; 16 images instead of 64"),
        # 5.5 s.
        _causal_case(1, 4096, 1, 128,
                     "B=8 T=4096 H=32 K=V=128: each block walks one head's whole 4096-token sequence in 64-token "
                     "chunks for 64 value columns, as there; 1 sequence x 1 head"),
        # 0.02 s.
        _step_case(8, 32, 128, "B=8 H=32 K=V=128, tensor state (bench decode step): run at the full shape"),
        # 0.04 s. One block for the whole layout: only the full shape keeps its work.
        _routing_case(4096, 8, 256, 8, "T=4096 k=8 E=256 R=8 align=16: run at the full shape (one block)"),
        # 0.3 s each (building the random inputs takes longer).
        *_perm_cases(2048, 8, 256, 7168,
                     "T=4096 k=8 E=256 hidden=7168: same k, E, hidden (one 7168-wide row per block pass); "
                     "T=2048 (padding rows E*15 are 19% of the buffer instead of 10%)"),
        # 1.4 s.
        _w4a16_case(16, 4096, 4096, "M=16 K=4096 N=4096 g128 (demo; bench target at M<=16): run at the full shape"),
        # 0.7 s.
        _dequant_case(4096, 4096, "N=4096 K=4096 g128 zero points (demo): run at the full shape"),
        # 2.0 s.
        _w8a8_case(512, 4096, 512,
                   "fp8 M=K=N=4096 (demo): each block one 128x128 output tile over the full K=4096, as there; 4x4 "
                   "tiles instead of 32x32, so A and B are re-read (from L2) 4 times instead of 32"),
        _w8a8_case(512, 4096, 512,
                   "fp8 M=K=N=4096 (demo): each block one 128x128 output tile over the full K=4096, as there; 4x4 "
                   "tiles instead of 32x32, so A and B are re-read (from L2) 4 times instead of 32", path="wgmma"),
        # 0.6 s.
        _qpt_case(4096, 4096, "int8 M=4096 K=4096 (demo): run at the full shape"),
        # 1.3 s.
        _had_case(256, 14336,
                  "M=4096 n=14336 (28*512, OstQuant's down_proj) -> int8: one row per block, same n; 256 rows"),
        # 2.5 s.
        _grs_case(1, 512, 4096, 512,
                  "W=1 M=K=N=4096 (demo): each block one 128x128 output tile over the full K=4096, as there; 4x4 "
                  "tiles instead of 32x32 (A and B re-read 4 times instead of 32)"),
    ]


# Built at import: only closures and labels, no tensors (inputs come from `make`).
CASES: dict[str, list[Case]] = {"ci": _ci_cases(), "report": _report_cases()}


def all_cases() -> list[Case]:
    """Every case, CI ones first."""
    return CASES["ci"] + CASES["report"]
