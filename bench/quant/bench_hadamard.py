"""Benchmark hadamard_quantize (online Hadamard + per-token quantization) against a plain copy
of x (``x.clone()``) and the PyTorch reference, in the same run, at the hidden and
intermediate sizes of common models: n = 4096, 5120 (20*256), 8192, 11008 (344*32),
13824 (108*128), 14336 (28*512), 28672 (28*1024), plus 27648 (108*256); M = 1, 16 and
4096 tokens, bf16 input. Reported: time, GB/s against the measured copy ceiling, the ratio
to x.clone() timed in the same run, and for m = 108 / 344 the tensor-core FLOP/s of the
dense step (2 * m16 FLOP per element, m16 = m rounded up to 16).

Napkin math: the op reads 2n bytes and writes n (int8 / fp8) + 4 bytes per token, less
than the clone's 2n + 2n, so a memory-bound kernel would beat the copy; the FWHT costs
n log2(n) adds, the dense factor m * n FMAs per token on CUDA cores for m <= 28 and
2 * m16 * n FLOP on tensor cores (mma.sync) for m = 108 / 344 (11008, M = 4096: 31 GFLOP,
~50 us at 60% of the mma.sync peak vs ~60 us for the copy: see docs/quant.md).

Target (issue 5): within 1.3x of a plain copy of x.

    python bench/quant/bench_hadamard.py [--quick]
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from inferops._core.ops import kernel_backend
from inferops.benchmark import inputs_to_exceed_l2, time_fn
from inferops.quant import hadamard_quantize
from inferops.quant.hadamard import hadamard_factorization
from inferops.reference import quant_w8a8 as ref

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
Run = importlib.import_module("_common").Run  # bench/_common.py (not a package)

SIZES = [4096, 5120, 8192, 11008, 13824, 14336, 28672, 27648]
MS = [1, 16, 4096]
QUICK_SIZES = [4096, 11008]
QUICK_MS = [16]
FP8 = torch.float8_e4m3fn


def main(argv=None) -> int:
    run = Run(__doc__, argv)
    args, dev, results, copy_gbps, g = run.args, run.device, run.results, run.copy_gbps, run.gen
    iters = 10 if args.quick else 100
    print(f"hadamard_quantize on {results.device}: backend {kernel_backend('hadamard_quantize', dev)}")
    for n in (QUICK_SIZES if args.quick else SIZES):
        m, p = hadamard_factorization(n)
        for M in (QUICK_MS if args.quick else MS):
            n_sets = inputs_to_exceed_l2(3 * M * n, dev)
            sets = [(torch.randn(M, n, generator=g).to(dev, torch.bfloat16),) for _ in range(n_sets)]
            t_copy = time_fn(lambda x: x.clone(), sets, iters=iters)
            t_ref = time_fn(lambda x: ref.hadamard_quantize(x, torch.int8), sets, iters=max(5, iters // 4))
            for qd, qname in ((torch.int8, "int8"), (FP8, "fp8"), (None, "bf16")):
                t = time_fn(lambda x, qd=qd: hadamard_quantize(x, qd), sets, iters=iters)
                out_b = M * n * (1 if qd is not None else 2) + (4 * M if qd is not None else 0)
                nbytes = 2 * M * n + out_b
                gbps = nbytes / (t.median_us * 1e-6) / 1e9
                pct = 100 * gbps / copy_gbps if copy_gbps else None
                sizes = f"M={M} n={n} (m={m} x 2^{p.bit_length() - 1}) -> {qname}"
                tflops = 2 * ((m + 15) // 16 * 16) * M * n / (t.median_us * 1e-6) / 1e12 if m > 28 else None
                line = (f"  {sizes:40s}: {t.median_us:9.1f} us {gbps:7.1f} GB/s"
                        + (f" ({pct:5.1f}% of copy)" if pct else "")
                        + (f" {tflops:6.1f} TFLOP/s (mma)" if tflops else ""))
                bases = [("x.clone()", t_copy)] + ([("torch_reference (eager)", t_ref)] if qd == torch.int8 else [])
                for bname, tb in bases:
                    ratio = t.median_us / tb.median_us  # time relative to the baseline
                    target = met = None
                    if dev.type == "cuda" and bname == "x.clone()" and qd is not None and M == 4096:
                        target, met = "<= 1.3x copy time", ratio <= 1.3
                    results.add(family="quant", op="hadamard_quantize",
                                backend=kernel_backend("hadamard_quantize", dev), sizes=sizes, dtype="bfloat16",
                                bytes=nbytes, time_us=t.median_us, timing=t.method, gbps=gbps, pct_of_ceiling=pct,
                                ceiling="copy_gbps", tflops=tflops, baseline=bname, baseline_time_us=tb.median_us,
                                speedup_vs_baseline=tb.median_us / t.median_us, target=target, met=met)
                    line += f" | {bname.split(' ')[0]} {tb.median_us:8.1f} us (x{ratio:.2f} of its time)"
                print(line)
            del sets
    return 0


if __name__ == "__main__":
    sys.exit(main())
