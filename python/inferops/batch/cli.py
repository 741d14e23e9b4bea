"""``python -m inferops generate`` (console script ``inferops-generate``): the batch engine
as a job.

With ``--model PATH`` it loads a local Hugging Face checkpoint directory (no network);
without it, a small Llama-shaped model built from a config with random weights (its
tokens are meaningless, and the output says so). The workload is synthetic unless
``--prompts FILE`` gives one: ``--requests`` requests, each one of ``--system-prompts``
shared system prompts of ``--system-len`` tokens plus its own ``--suffix-len`` tokens.
Prints the plan (groups, sharing), a progress bar, tokens/s and what sharing saved
(prefill tokens, decode KV bytes) against the no-sharing baseline; writes one JSON line
per request (``{"index", "prompt_len", "tokens"}``) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

_DESCRIPTION = __doc__.split("\n")[0]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inferops generate",
                                description="Offline batch generation with global prefix sharing "
                                            "(BatchLLM) for a Hugging Face causal LM.")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint directory (default: a small "
                                                 "random-weight Llama built from a config)")
    p.add_argument("--prompts", default=None,
                   help="JSONL file, one request per line: {\"input_ids\": [...]} or {\"prompt\": \"text\"} "
                        "(text needs the checkpoint's tokenizer); default: a synthetic workload")
    p.add_argument("--requests", type=int, default=32, help="synthetic workload: requests (default 32)")
    p.add_argument("--system-prompts", type=int, default=4, help="synthetic: shared system prompts (default 4)")
    p.add_argument("--system-len", type=int, default=64, help="synthetic: system prompt tokens (default 64)")
    p.add_argument("--suffix-len", type=int, default=12, help="synthetic: tokens of each request's own "
                                                              "part (default 12)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None, help="KV cache budget in pages per layer")
    p.add_argument("--no-sharing", action="store_true", help="the plain paged baseline only")
    p.add_argument("--compare", action="store_true",
                   help="also run sharing=False on the same prompts and report both throughputs")
    p.add_argument("--sample", action="store_true", help="sample (default greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="workload, random weights and sampling seed")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--out", default="inferops-generate.jsonl", help="where the generated tokens go (JSONL)")
    p.add_argument("--no-progress", action="store_true")
    return p


def tiny_model(device, dtype, seed: int):
    """The default model: Llama-shaped, random weights, small enough for a CPU in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=1024, initializer_range=0.1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def synthetic_prompts(n: int, systems: int, system_len: int, suffix_len: int, vocab: int, seed: int):
    """``n`` requests over ``systems`` shared system prompts; each request's own part is
    ``suffix_len`` tokens give or take a quarter (so lengths differ)."""
    g = torch.Generator().manual_seed(seed)
    lo = min(3, vocab - 1)  # keep clear of the usual special ids 0-2
    sys_prompts = [torch.randint(lo, vocab, (system_len,), generator=g).tolist() for _ in range(max(systems, 1))]
    out = []
    for i in range(n):
        k = max(1, suffix_len + int(torch.randint(-(suffix_len // 4), suffix_len // 4 + 1, (1,), generator=g)))
        out.append(sys_prompts[i % len(sys_prompts)] + torch.randint(lo, vocab, (k,), generator=g).tolist())
    return out


def _load_prompts(path: str, tokenizer):
    out = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if "input_ids" in rec:
                out.append([int(t) for t in rec["input_ids"]])
            elif "prompt" in rec:
                if tokenizer is None:
                    raise SystemExit(f"{path}:{ln}: a text prompt needs --model with a tokenizer")
                out.append(tokenizer(rec["prompt"])["input_ids"])
            else:
                raise SystemExit(f"{path}:{ln}: expected an \"input_ids\" or \"prompt\" field")
    return out


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("python -m inferops generate needs transformers (and tqdm for the progress bar): "
              "pip install 'inferops[batch]'; the op check runs without them: python -m inferops check",
              file=sys.stderr)
        return 2
    from inferops.attention import PrefixPlan
    from inferops.batch import generate

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    tokenizer = None
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, local_files_only=True)
        model = model.to(device).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        except Exception:  # a checkpoint without tokenizer files: token-id prompts only
            tokenizer = None
        print(f"model: {args.model} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters, {str(dtype).replace('torch.', '')}, {device})")
    else:
        model = tiny_model(device, dtype, args.seed)
        c = model.config
        print(f"model: a small Llama built from a config with RANDOM weights (no --model given): hidden "
              f"{c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads / "
              f"{c.num_key_value_heads} kv heads, vocab {c.vocab_size}; {str(dtype).replace('torch.', '')} on "
              f"{device}. Its tokens are meaningless; the job shows the engine, not a model.")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if args.prompts:
        prompts = _load_prompts(args.prompts, tokenizer)
        print(f"workload: {len(prompts)} requests from {args.prompts}")
    else:
        prompts = synthetic_prompts(args.requests, args.system_prompts, args.system_len, args.suffix_len,
                                    int(text.vocab_size), args.seed)
        print(f"workload: synthetic, {len(prompts)} requests sharing {args.system_prompts} system prompts of "
              f"{args.system_len} tokens, own parts ~{args.suffix_len} tokens, {args.max_new_tokens} new tokens each")
    if prompts:  # the plan as the engine will build it (bad input is reported by generate below)
        st = PrefixPlan.build(prompts, args.page_size, decode_lens=[args.max_new_tokens] * len(prompts)).stats()
        if args.no_sharing:
            print("plan: sharing off (--no-sharing): every prompt prefilled and read whole")
        else:
            print(f"plan: {st['groups_with_sharing']} groups share a prefix; {st['prompt_tokens']} prompt tokens "
                  f"stored as {st['stored_tokens']} ({st['prompt_tokens'] / max(st['stored_tokens'], 1):.2f}x); "
                  f"a decode step reads {st['read_reduction']:.2f}x fewer prompt KV tokens (page {args.page_size})")
    opts = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                seed=args.seed, page_size=args.page_size, num_pages=args.num_pages,
                progress=not args.no_progress)
    # warm-up (first-call costs: lazy imports, allocator, kernels' first launch) off the clock
    for sharing in ((True, False) if args.compare else (not args.no_sharing,)) if prompts else ():
        generate(model, prompts[:8], 2, sharing=sharing, **dict(opts, progress=False, num_pages=None))
    t0 = time.perf_counter()
    try:
        res = generate(model, prompts, args.max_new_tokens, sharing=not args.no_sharing, **opts)
    except (ValueError, TypeError, NotImplementedError) as e:  # bad input: say what, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    s = res.stats
    print(f"generated {s['generated_tokens']} tokens for {s['requests']} requests in {wall:.2f} s: prefill "
          f"{s['prefill_s']:.2f} s, decode {s['decode_s']:.2f} s ({s['decode_steps']} steps, "
          f"{s['decode_tokens_per_s']:.1f} tokens/s decode, {s['generated_tokens'] / wall:.1f} tokens/s overall)")
    saved_pf = s["prefill_tokens_without_sharing"] - s["prefill_tokens"]
    saved_kv = s["kv_bytes_read_without_sharing"] - s["kv_bytes_read"]
    print(f"prefill tokens: {s['prefill_tokens']} (without sharing {s['prefill_tokens_without_sharing']}: "
          f"{saved_pf} saved, {100 * saved_pf / max(s['prefill_tokens_without_sharing'], 1):.1f}%)")
    print(f"decode KV bytes read: {_fmt_bytes(s['kv_bytes_read'])} (without sharing "
          f"{_fmt_bytes(s['kv_bytes_read_without_sharing'])}: {_fmt_bytes(saved_kv)} saved, "
          f"{s['kv_bytes_read_without_sharing'] / max(s['kv_bytes_read'], 1):.2f}x less); "
          f"cache: {s['pages_used']} pages of {s['page_size']} tokens per layer, {s['kv_dtype']}")
    if args.compare and not args.no_sharing:
        base = generate(model, prompts, args.max_new_tokens, sharing=False, **opts)
        same = sum(a == b for a, b in zip(res.tokens, base.tokens))
        print(f"sharing=False baseline: {base.stats['decode_tokens_per_s']:.1f} tokens/s decode "
              f"(sharing: x{s['decode_tokens_per_s'] / max(base.stats['decode_tokens_per_s'], 1e-9):.2f}); "
              f"{same} of {len(prompts)} requests produced identical tokens"
              + ("" if device.type == "cuda" else " (CPU: the PyTorch reference, not a performance measurement)"))
    with open(args.out, "w") as f:
        for i, (p, toks) in enumerate(zip(prompts, res.tokens)):
            f.write(json.dumps({"index": i, "prompt_len": len(p), "tokens": toks}) + "\n")
    print(f"wrote {len(res.tokens)} requests' tokens to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
