"""One small call of every public op, with default arguments, shared by the compile and
opcheck tests: ``make_inputs`` builds fresh random inputs on a device and ``chain`` calls
each family's public wrappers on them (outputs feeding later ops where shapes allow).
``chain`` is a plain function of a dict, so ``torch.compile`` can trace it whole.
"""

from __future__ import annotations

import torch

from inferops.attention import PagedKVCache, PrefixPlan, append_kv, merge_states, merge_states_, paged_decode
from inferops.attention import prefix_shared_decode
from inferops.linear_attention import causal_linear_attention, linear_attention_step, simplified_linear_attention
from inferops.moe import permute, routing_layout, unpermute
from inferops.quant import hadamard_quantize, pack_int4, quantize_per_token, w4a16_matmul, w8a8_linear, w8a8_matmul
from inferops.quant.int4 import dequantize
from inferops.quant.w8a8 import quantize_weight_per_channel
from inferops.tp import virtual_gemm_reduce_scatter

HQ, HKV, D, PAGE = 8, 2, 64, 4


def make_inputs(g: torch.Generator, device) -> dict:
    """Fresh random inputs (bf16 unless an op needs otherwise) for :func:`chain`."""
    def rand(*s, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device, dtype)

    seq_lens = [5, 11]
    num_pages = 2 + 3 + 3
    perm = torch.randperm(num_pages, generator=g).to(torch.int32)
    # row 0 padded with -1 past its 2 pages, as block tables of unequal sequences are
    bt = torch.stack([torch.cat([perm[:2], torch.tensor([-1], dtype=torch.int32)]), perm[2:5]]).to(device)
    # a prefix-shared batch: two requests sharing a 9-token prefix
    pre = torch.randint(0, 100, (9,), generator=g).tolist()
    prompts = [pre + [200, 201], pre + [300, 301, 302]]
    plan = PrefixPlan.build(prompts, PAGE)
    cache = PagedKVCache(16, PAGE, HKV, D, torch.bfloat16, device)
    cache.k.copy_(rand(*cache.k.shape))
    cache.v.copy_(rand(*cache.v.shape))
    layout = plan.materialize(cache)
    w = torch.randn(64, 128, generator=g)
    w8, w8_scale = quantize_weight_per_channel(w.to(device))
    return {
        "q": rand(2, HQ, D), "k_cache": rand(num_pages, PAGE, HKV, D), "v_cache": rand(num_pages, PAGE, HKV, D),
        "block_tables": bt, "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "new_k": rand(2, HKV, D), "seq_ids": torch.tensor([0, 1], dtype=torch.int32, device=device),
        "positions": torch.tensor([seq_lens[0] - 1, seq_lens[1] - 1], dtype=torch.int32, device=device),
        "ps_q": rand(plan.num_requests, HQ, D), "ps_k": cache.k, "ps_v": cache.v, "ps_layout": layout,
        "la_q": rand(1, 70, 2, 32, scale=0.5), "la_k": rand(1, 70, 2, 32, scale=0.5),
        "la_v": rand(1, 70, 2, 32, scale=0.5),
        "sla_qkv": rand(1, 9, 3, 2, 32, dtype=torch.float32), "dwc_w": rand(32, 1, 5, 5, dtype=torch.float32),
        "dwc_b": rand(32, dtype=torch.float32),
        "topk_ids": torch.rand(16, 8, generator=g).topk(2, dim=1).indices.to(device, torch.int32),
        "topk_w": torch.rand(16, 2, generator=g).to(device), "tokens": rand(16, 128),
        "w8": w8, "w8_scale": w8_scale, "w4": pack_int4(w.to(device, torch.bfloat16)),
        "gemm_a": rand(2, 8, 16), "gemm_b": rand(2, 16, 32),
    }


def chain(x: dict):
    """Every public op with default arguments; returns their outputs (a flat tuple)."""
    out = []
    # attention: append the new token's K/V, decode over the cache, merge two states
    append_kv(x["k_cache"], x["v_cache"], x["new_k"], x["new_k"], x["block_tables"], x["seq_ids"], x["positions"])
    o, lse = paged_decode(x["q"], x["k_cache"], x["v_cache"], x["block_tables"], x["seq_lens"])
    mo, mlse = merge_states(o, lse, o * 0.5, lse - 1.0)
    va, lsea = mo.clone(), mlse.clone()
    merge_states_(va, lsea, o, lse)
    ps_o, ps_lse = prefix_shared_decode(x["ps_q"], x["ps_k"], x["ps_v"], x["ps_layout"])
    out += [x["k_cache"], o, lse, mo, mlse, va, lsea, ps_o, ps_lse]
    # linear attention: prefill (fla defaults: normalised) then one decode step, and SLAB's op
    la, state = causal_linear_attention(x["la_q"], x["la_k"], x["la_v"], output_final_state=True)
    step_o, state = linear_attention_step(x["la_q"][:, -1], x["la_k"][:, -1], x["la_v"][:, -1], state)
    qkv = x["sla_qkv"]
    sla = simplified_linear_attention(qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2),
                                      qkv[:, :, 2].transpose(1, 2), x["dwc_w"], x["dwc_b"], (3, 3))
    out += [la, step_o, *state, sla]
    # MoE: layout, permute, (expert = identity), unpermute
    lay = routing_layout(x["topk_ids"], 8)
    rows = permute(x["tokens"], lay)
    back = unpermute(rows, lay, x["topk_w"])
    out += [lay.dst_index, lay.src_index, lay.expert_offsets, rows, back]
    # quant: Hadamard-rotated INT8 activations into the W8A8 GEMM; per-token quant; W4A16
    xq, xs = hadamard_quantize(back, torch.int8)
    y8 = w8a8_matmul(xq, xs, x["w8"], x["w8_scale"])
    pq, ps = quantize_per_token(back)
    y4 = w4a16_matmul(back, x["w4"])
    wd = dequantize(x["w4"])
    yl = w8a8_linear(back, x["w8"], x["w8_scale"])  # quantize + GEMM in one differentiable op
    out += [xq, xs, y8, pq, ps, y4, wd, yl]
    # tp: fused GEMM + reduce-scatter over virtual ranks on one device
    out.append(virtual_gemm_reduce_scatter(x["gemm_a"], x["gemm_b"]))
    return tuple(out)


def clone_inputs(x: dict) -> dict:
    """A copy whose tensors can be mutated (append_kv writes the caches)."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
