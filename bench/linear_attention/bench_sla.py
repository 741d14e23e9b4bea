"""Benchmark simplified_linear_attention (SLAB) against the PyTorch reference, eager and
compiled, in the same run. Shapes: Swin stage 1 (N=3136, C=96 / 128, heads 3 / 4, d=32)
and DeiT (N=196, C=384, heads 6, d=64), batch 64, bf16. Target (issue #4): >= 3x eager
PyTorch at the Swin stage-1 shapes.

    python bench/linear_attention/bench_sla.py [--quick] [--compile-baseline]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import Run  # noqa: E402

from inferops._core.ops import kernel_backend  # noqa: E402
from inferops.benchmark import inputs_to_exceed_l2, time_fn  # noqa: E402
from inferops.linear_attention import simplified_linear_attention  # noqa: E402
from inferops.reference import linear_attention as ref  # noqa: E402

# (name, batch, heads, h, w, d)
CASES = [("swin-s1 C=96", 64, 3, 56, 56, 32), ("swin-s1 C=128", 64, 4, 56, 56, 32),
         ("deit C=384", 64, 6, 14, 14, 64)]
QUICK = [("tiny", 2, 2, 7, 7, 32)]


def main(argv=None) -> int:
    run = Run(__doc__, argv)
    args, dev, results, copy_gbps, g = run.args, run.device, run.results, run.copy_gbps, run.gen
    iters = 10 if args.quick else 100
    compiled = torch.compile(ref.simplified_linear_attention) if args.compile_baseline else None
    print(f"simplified_linear_attention on {results.device}: backend "
          f"{kernel_backend('simplified_linear_attention', dev)}")
    for name, B, H, hh, ww, d in (QUICK if args.quick else CASES):
        N = hh * ww
        nbytes = 4 * B * H * N * d * 2  # q, k, v read once, out written (the conv re-reads v from cache)

        def make():
            r = lambda *s: torch.randn(*s, generator=g).to(dev)  # noqa: E731
            return (r(B, H, N, d).bfloat16(), r(B, H, N, d).bfloat16(), r(B, H, N, d).bfloat16(),
                    r(d, 1, 5, 5) * 0.2, r(d) * 0.1, (hh, ww))

        sets = [make() for _ in range(inputs_to_exceed_l2(nbytes, dev))]
        t = time_fn(simplified_linear_attention, sets, iters=iters)
        gbps = nbytes / (t.median_us * 1e-6) / 1e9
        pct = 100 * gbps / copy_gbps if copy_gbps else None
        is_target = dev.type == "cuda" and name.startswith("swin")
        baselines = {"torch_reference (eager)": ref.simplified_linear_attention}
        if compiled is not None:
            baselines["torch_reference (torch.compile)"] = compiled
        for bname, fn in baselines.items():
            tb = time_fn(fn, sets, iters=max(5, iters // 4))
            speed = tb.median_us / t.median_us
            results.add(family="linear_attention", op="simplified_linear_attention",
                        backend=kernel_backend("simplified_linear_attention", dev),
                        sizes=f"{name}: B={B} heads={H} N={hh}x{ww} d={d}", dtype="bfloat16", bytes=nbytes,
                        time_us=t.median_us, timing=t.method, gbps=gbps, pct_of_ceiling=pct,
                        ceiling="copy_gbps", baseline=bname, baseline_time_us=tb.median_us,
                        speedup_vs_baseline=speed,
                        target=">= 3x eager" if is_target and "eager" in bname else None,
                        met=(speed >= 3) if is_target and "eager" in bname else None)
            print(f"  {name:14s} B={B} N={N} d={d}: {t.median_us:9.1f} us ({gbps:7.1f} GB/s"
                  + (f", {pct:5.1f}% of copy" if pct else "") + f") | {bname} {tb.median_us:9.1f} us -> x{speed:.2f}")
        del sets
    return 0


if __name__ == "__main__":
    sys.exit(main())
