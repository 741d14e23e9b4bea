"""Benchmark causal_linear_attention and linear_attention_step in the same run against
fla's chunk_linear_attn (if the fla-core wheel is installed), softmax attention through
SDPA, and the PyTorch reference. Shapes: B=8, H=32, K=V=128, T=4K and 16K, bf16,
normalize=False for both linear-attention kernels. Targets (issue #4): causal forward at
least as fast as fla at T=4K and 16K; decode step >= 70% of copy bandwidth on the state
bytes (read + write).

    python bench/linear_attention/bench_causal.py [--quick]
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import Run  # noqa: E402

from inferops._core.ops import kernel_backend  # noqa: E402
from inferops.benchmark import inputs_to_exceed_l2, time_fn  # noqa: E402
from inferops.linear_attention import causal_linear_attention, linear_attention_step  # noqa: E402
from inferops.reference import linear_attention as ref  # noqa: E402


def _fla():
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as e:  # not shipped, or triton missing
        print(f"  fla not available ({type(e).__name__}: {e}); skipping that baseline")
        return None
    return chunk_linear_attn


def main(argv=None) -> int:
    run = Run(__doc__, argv)
    args, dev, results, copy_gbps, g = run.args, run.device, run.results, run.copy_gbps, run.gen
    iters = 5 if args.quick else 30
    B, H, K = (1, 2, 64) if args.quick else (8, 32, 128)
    fla = _fla() if dev.type == "cuda" else None
    backend = kernel_backend("causal_linear_attention", dev)
    print(f"causal_linear_attention on {results.device}: backend {backend}")
    for T in ((130,) if args.quick else (4096, 16384)):
        r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dev, torch.bfloat16)  # noqa: E731
        q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, K)
        flops = B * H * T * (2 * 64 * (K + K) + 4 * K * K)  # chunk 64: intra-chunk + state terms
        t = time_fn(lambda: causal_linear_attention(q, k, v, normalize=False), None, device=dev, iters=iters)
        tflops = flops / (t.median_us * 1e-6) / 1e12
        sizes = f"B={B} T={T} H={H} K=V={K}"
        base_fns = {}
        if fla is not None:
            base_fns["fla chunk_linear_attn"] = lambda: fla(q, k, v, normalize=False)
        if dev.type == "cuda":
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            base_fns["SDPA softmax attention (causal)"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        if T <= 4096:
            base_fns["torch_reference (chunked, eager)"] = lambda: ref.causal_linear_attention(q, k, v)
        for bname, fn in base_fns.items():
            try:
                tb = time_fn(fn, None, device=dev, iters=max(3, iters // 3))
            except Exception as e:
                print(f"  {bname} failed: {type(e).__name__}: {e}")
                continue
            speed = tb.median_us / t.median_us
            is_target = bname.startswith("fla")
            results.add(family="linear_attention", op="causal_linear_attention", backend=backend, sizes=sizes,
                        dtype="bfloat16", time_us=t.median_us, timing=t.method, tflops=tflops, baseline=bname,
                        baseline_time_us=tb.median_us, speedup_vs_baseline=speed,
                        target=">= 1x fla" if is_target else None, met=(speed >= 1.0) if is_target else None)
            print(f"  {sizes}: {t.median_us:9.1f} us ({tflops:6.1f} TFLOP/s) | {bname} {tb.median_us:9.1f} us -> x{speed:.2f}")
        if not base_fns:
            results.add(family="linear_attention", op="causal_linear_attention", backend=backend, sizes=sizes,
                        dtype="bfloat16", time_us=t.median_us, timing=t.method, tflops=tflops)
            print(f"  {sizes}: {t.median_us:9.1f} us")
        del q, k, v

    # Decode step: memory bound on the fp32 state (read + write).
    for Bd in ((2,) if args.quick else (8, 64)):
        state_bytes = 2 * Bd * H * K * K * 4
        n_sets = inputs_to_exceed_l2(state_bytes, dev)
        sets = []
        for _ in range(n_sets):
            r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dev, torch.bfloat16)  # noqa: E731
            sets.append((r(Bd, H, K), r(Bd, H, K), r(Bd, H, K), torch.zeros(Bd, H, K, K, device=dev)))
        t = time_fn(linear_attention_step, sets, iters=iters * 3)
        gbps = state_bytes / (t.median_us * 1e-6) / 1e9
        pct = 100 * gbps / copy_gbps if copy_gbps else None
        tb = time_fn(lambda q, k, v, s: ref.linear_attention_step(q, k, v, s), sets, iters=iters * 3)
        is_target = dev.type == "cuda"
        results.add(family="linear_attention", op="linear_attention_step",
                    backend=kernel_backend("linear_attention_step", dev), sizes=f"B={Bd} H={H} K=V={K}",
                    dtype="bfloat16 (fp32 state)", bytes=state_bytes, time_us=t.median_us, timing=t.method,
                    gbps=gbps, pct_of_ceiling=pct, ceiling="copy_gbps", baseline="torch_reference",
                    baseline_time_us=tb.median_us, speedup_vs_baseline=tb.median_us / t.median_us,
                    target=">= 70% copy" if is_target else None,
                    met=(pct is not None and pct >= 70) if is_target else None)
        print(f"  step B={Bd}: {t.median_us:8.2f} us ({gbps:7.1f} GB/s" + (f", {pct:5.1f}% of copy" if pct else "")
              + f") | reference {tb.median_us:8.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
