"""Benchmark QuantLinear as a model uses it: forward (inference) and forward + backward to the
activations (adapter training on a frozen quantized base), next to a bf16 ``nn.Linear`` in the
same run; and the cost of act-order (GPTQ ``desc_act``: an input gather per call) on w4a16.

Layers (K, N) = 4096x4096 and 4096x14336 (Llama-class); M = 1, 16, 4096 (forward) and 4096
(backward). Rows: ``w4a16`` (g128), ``w4a16 act-order`` (the same weight with an input
permutation), ``w8a8-int8``, ``w8a8-fp8`` (op ``w8a8_linear``). The backward dequantizes the
weight once per call (``int4_dequantize`` or an elementwise product for 8-bit) and runs a
bf16 GEMM: expect it near the bf16 layer's backward plus one dequantize, not faster.

    python bench/quant/bench_quant_linear.py [--quick]
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from torch import nn

from inferops._core.ops import kernel_backend
from inferops.benchmark import time_fn
from inferops.quant import QuantLinear

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
Run = importlib.import_module("_common").Run  # bench/_common.py (not a package)

SHAPES = [(4096, 4096), (4096, 14336)]  # (K, N)
MS = [1, 16, 4096]
QUICK_SHAPES = [(256, 128)]
QUICK_MS = [1, 64]


def _layers(lin: nn.Linear, K: int, g: torch.Generator):
    w4 = QuantLinear.from_linear(lin, "w4a16", 128, dtype=torch.bfloat16)
    perm = torch.randperm(K, generator=g).to(lin.weight.device)
    return {
        "w4a16": w4,
        "w4a16 act-order": QuantLinear.from_int4(w4._int4(), in_perm=perm),
        "w8a8-int8": QuantLinear.from_linear(lin, "w8a8-int8", dtype=torch.bfloat16),
        "w8a8-fp8": QuantLinear.from_linear(lin, "w8a8-fp8", dtype=torch.bfloat16),
    }


def _fwd_bwd(layer):
    def step(x, gy):
        x = x.detach().requires_grad_(True)
        layer(x).backward(gy)
        return x.grad
    return step


def main(argv=None) -> int:
    run = Run(__doc__, argv)
    args, dev, results, g = run.args, run.device, run.results, run.gen
    iters = 5 if args.quick else 50
    print(f"QuantLinear on {results.device}: w4a16 backend {kernel_backend('w4a16_matmul', dev)}, "
          f"w8a8 backend {kernel_backend('w8a8_matmul', dev)}")
    for K, N in (QUICK_SHAPES if args.quick else SHAPES):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        lin = nn.Linear(K, N, bias=False).to(dev, torch.bfloat16)
        layers = _layers(lin, K, g)
        ms = QUICK_MS if args.quick else MS
        for M, mode in [(m, "forward") for m in ms] + [(ms[-1], "forward+backward")]:
            x = torch.randn(M, K, generator=g).to(dev, torch.bfloat16)
            gy = torch.randn(M, N, generator=g).to(dev, torch.bfloat16)
            if mode == "forward":
                sets = [(x,)]
                with torch.no_grad():
                    t_base = time_fn(lin, sets, iters=iters, cuda_graph=False)
            else:
                sets = [(x, gy)]
                t_base = time_fn(_fwd_bwd(lin), sets, iters=iters, cuda_graph=False)
            flops = 2 * M * N * K * (1 if mode == "forward" else 2)
            for name, layer in layers.items():
                if mode == "forward":
                    with torch.no_grad():
                        t = time_fn(layer, sets, iters=iters, cuda_graph=False)
                else:
                    t = time_fn(_fwd_bwd(layer), sets, iters=iters, cuda_graph=False)
                speed = t_base.median_us / t.median_us
                sizes = f"{name} {mode} M={M} K={K} N={N}"
                results.add(family="quant", op="QuantLinear", backend=kernel_backend("w4a16_matmul", dev),
                            sizes=sizes, dtype="bfloat16", flops=flops, time_us=t.median_us, timing=t.method,
                            tflops=flops / (t.median_us * 1e-6) / 1e12, baseline="nn.Linear bf16",
                            baseline_time_us=t_base.median_us, speedup_vs_baseline=speed)
                print(f"  {sizes:52s}: {t.median_us:9.1f} us | nn.Linear bf16 {t_base.median_us:9.1f} us x{speed:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
