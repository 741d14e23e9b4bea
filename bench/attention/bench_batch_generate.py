"""Benchmark inferops.batch.generate (prefix sharing) against sharing=False and Hugging Face generate.

Same model, same prompts, greedy, every request runs exactly ``new`` tokens (no stop
tokens). Three runs:

* ``inferops sharing``: ``generate(model, prompts, new)``;
* ``inferops sharing=False``: the plain paged baseline (every prompt prefilled whole,
  ``paged_decode``);
* ``HF generate``: ``model.generate`` with sdpa attention on a left-padded batch
  (``--hf-batch`` requests per call, run one after another, so the padded prefill fits).

Decode throughput = generated tokens after the first / decode time. For our engine the
decode time is its own (``stats["decode_s"]``); for HF it is the time of ``new`` tokens
minus the time of 1 token (its prefill), per sub-batch. Full size (issue 15): a
Llama-shaped model of ~1B parameters (hidden 2048, 16 layers, 32 heads / 8 kv heads,
head_dim 64, MLP 8192, vocab 32000) with random weights in bf16; 256 requests sharing 8
system prompts of 2048 tokens, 128-token suffixes, 128 new tokens. Targets on the GPU:
>= 3x HF's decode tokens/s and >= 1.5x our own sharing=False. ``--quick``: a tiny
float32 model and workload (runs on the CPU in seconds; CPU numbers are not
performance claims).

    python bench/attention/bench_batch_generate.py [--quick] [--hf-batch 64]
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import open_results, parser  # noqa: E402

from inferops.batch import generate  # noqa: E402

FULL = dict(model=dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                       max_position_embeddings=4096),
            requests=256, systems=8, system_len=2048, suffix_len=128, new=128, dtype=torch.bfloat16)
QUICK = dict(model=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        max_position_embeddings=256),
             requests=8, systems=2, system_len=32, suffix_len=4, new=4, dtype=torch.float32)


def _model(cfg: dict, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(initializer_range=0.02, **cfg)).to(dtype).eval()
    model.generation_config.eos_token_id = None  # every request runs all its tokens
    model.generation_config.pad_token_id = 0
    return model


def _prompts(n, systems, system_len, suffix_len, vocab, g):
    sys_p = [torch.randint(3, vocab, (system_len,), generator=g).tolist() for _ in range(systems)]
    return [sys_p[i % systems] + torch.randint(3, vocab, (suffix_len,), generator=g).tolist() for i in range(n)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_generate(model, prompts, new, device):
    """Left-padded batch through model.generate (sdpa); returns (new tokens per prompt, seconds)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
    _sync(device)
    return out[:, width:].tolist(), time.perf_counter() - t0


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--hf-batch", type=int, default=64, help="requests per HF generate call (default 64)")
    p.add_argument("--skip-hf", action="store_true", help="only our two runs")
    args = p.parse_args(argv)
    results = open_results(args)
    dev = torch.device(args.device)
    case = QUICK if args.quick else FULL
    model = _model(case["model"], case["dtype"], dev)
    model.set_attn_implementation("sdpa")
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    prompts = _prompts(case["requests"], case["systems"], case["system_len"], case["suffix_len"],
                       case["model"]["vocab_size"], g)
    new = case["new"]
    params = sum(p.numel() for p in model.parameters())
    sizes = (f"{case['requests']} req, {case['systems']} system prompts x {case['system_len']}, suffix "
             f"{case['suffix_len']}, {new} new, Llama {params / 1e9:.2f}B random")
    dtype = str(case["dtype"]).replace("torch.", "")
    print(f"batch generate on {results.device}: {sizes}, {dtype}")
    # warm-up, off the clock
    generate(model, prompts[:4], 2)
    generate(model, prompts[:4], 2, sharing=False)

    runs = {}
    for name, sharing in (("inferops sharing", True), ("inferops sharing=False", False)):
        _sync(dev)
        t0 = time.perf_counter()
        res = generate(model, prompts, new, sharing=sharing, eos_token_id=[])
        _sync(dev)
        wall = time.perf_counter() - t0
        st = res.stats
        runs[name] = dict(tokens=res.tokens, decode_tps=(st["generated_tokens"] - st["requests"]) / st["decode_s"],
                          wall=wall, prefill_s=st["prefill_s"], stats=st)
        print(f"  {name:24s} decode {runs[name]['decode_tps']:10.1f} tok/s | prefill {st['prefill_s']:.2f} s "
              f"({st['prefill_tokens']} tokens) | total {wall:.2f} s | KV read {st['kv_bytes_read'] / 2**30:.2f} GiB")
    if not args.skip_hf:
        hf_tokens, t_decode, n_decode, t_total = [], 0.0, 0, 0.0
        _hf_generate(model, prompts[:2], 2, dev)  # warm-up
        for i in range(0, len(prompts), args.hf_batch):
            chunk = prompts[i:i + args.hf_batch]
            toks, t_new = _hf_generate(model, chunk, new, dev)
            _, t_one = _hf_generate(model, chunk, 1, dev)
            hf_tokens += toks
            t_decode += max(t_new - t_one, 1e-9)
            n_decode += len(chunk) * (new - 1)
            t_total += t_new
        runs["HF generate (sdpa, padded)"] = dict(tokens=hf_tokens, decode_tps=n_decode / t_decode, wall=t_total)
        print(f"  {'HF generate (sdpa)':24s} decode {n_decode / t_decode:10.1f} tok/s | total {t_total:.2f} s "
              f"({args.hf_batch} requests per call)")
    ours = runs["inferops sharing"]
    same = {k: sum(a == b for a, b in zip(ours["tokens"], r["tokens"])) for k, r in runs.items()}
    print("  identical token sequences vs sharing: "
          + ", ".join(f"{k} {v}/{len(prompts)}" for k, v in same.items() if k != "inferops sharing"))
    for name, r in runs.items():
        if name == "inferops sharing":
            continue
        speedup = ours["decode_tps"] / r["decode_tps"]
        want = 3.0 if name.startswith("HF") else 1.5
        on_gpu = dev.type == "cuda" and not args.quick
        results.add(family="attention", op="batch_generate", backend="cuda" if dev.type == "cuda" else "cpu",
                    sizes=sizes, dtype=dtype, decode_tokens_per_s=ours["decode_tps"],
                    time_us=ours["stats"]["decode_s"] * 1e6, baseline=name,
                    baseline_decode_tokens_per_s=r["decode_tps"], speedup_vs_baseline=speedup,
                    identical_sequences=same[name], requests=len(prompts),
                    target=f">= {want}x {name} decode tokens/s" if on_gpu else None,
                    met=speedup >= want if on_gpu else None)
        print(f"  sharing vs {name}: x{speedup:.2f} decode tokens/s"
              + (f" (target >= {want}x: {'met' if speedup >= want else 'NOT met'})" if on_gpu else
                 " (CPU / quick: not a performance measurement)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
