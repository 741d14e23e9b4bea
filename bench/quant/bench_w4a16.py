"""Benchmark w4a16_matmul (int4 g128 symmetric weights, bf16 activations) in the same run
as cuBLAS BF16 (``torch.nn.functional.linear`` on the dequantized weight) and tinygemm
(``torch._weight_int4pack_mm``, torch's built-in W4A16), on the Llama-class shapes of
issue 5: (K, N) = 4096x4096, 4096x14336, 14336x4096, 8192x8192; M = 1, 16, 64, 256, 4096.

Napkin math: decode (M <= 16) is bound by the weight bytes, 0.5 B/weight + 2 B per 128
weights of scales = 0.516 B/weight vs 2 B for BF16: ideal speedup 3.88x. The achieved
bandwidth (weights + scales + x + y bytes / time) is reported against the copy ceiling
measured in this run. Above M ~ 64 the GEMM turns compute bound; both our paths
(``fused`` kernel, ``dequant`` = int4_dequantize + cuBLAS) are timed at M >= 64 so a GPU
run can set ``inferops.quant.w4a16.DEQUANT_MIN_M`` (the ``auto`` default) from data.

Targets (issue 5): >= 3.5x over BF16 at M <= 16 on 8192x8192 and 4096x14336; faster
than tinygemm at every M.

    python bench/quant/bench_w4a16.py [--quick]
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from inferops._core.ops import kernel_backend
from inferops.benchmark import inputs_to_exceed_l2, time_fn
from inferops.quant import pack_int4_quantized, unpack, w4a16_matmul
from inferops.quant import w4a16 as w4a16_mod

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
Run = importlib.import_module("_common").Run  # bench/_common.py (not a package)

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (K, N)
MS = [1, 16, 64, 256, 4096]
QUICK_SHAPES = [(256, 128)]
QUICK_MS = [1, 16]
GROUP = 128
TARGET_SHAPES = {(8192, 8192), (4096, 14336)}


def _tinygemm(w4, device):
    """torch's W4A16 (tinygemm) on the same int4 values, or (None, reason).

    Its packing API changed across versions: torch >= 2.5 takes uint8 [N, K/2] (two
    nibbles per byte, even k in the high nibble) and inner_k_tiles; scales and zeros
    go as one [K/group, N, 2] tensor with w = (u - 8) * s + zero. CUDA and bf16 only.
    """
    if device.type != "cuda":
        return None, "tinygemm: CUDA only"
    q, s, _ = unpack(w4)
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    packed = (u[:, ::2] << 4 | u[:, 1::2]).contiguous()
    sz = torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()
    errors = []
    for inner in (8, 4, 2):
        try:
            wp = torch._convert_weight_to_int4pack(packed, inner)

            def fn(x, wp=wp):
                return torch._weight_int4pack_mm(x, wp, GROUP, sz)

            fn(torch.zeros(1, w4.in_features, dtype=torch.bfloat16, device=device))
            return fn, None
        except (RuntimeError, TypeError, AttributeError) as e:  # unsupported tiles / API drift
            errors.append(f"inner_k_tiles={inner}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return None, "; ".join(errors)


def main(argv=None) -> int:
    run = Run(__doc__, argv)
    args, dev, results, copy_gbps, g = run.args, run.device, run.results, run.copy_gbps, run.gen
    iters = 10 if args.quick else 100
    print(f"w4a16_matmul on {results.device}: backend {kernel_backend('w4a16_matmul', dev)}, "
          f"auto path: fused for M < {w4a16_mod.DEQUANT_MIN_M}, else dequantize + cuBLAS")
    for K, N in (QUICK_SHAPES if args.quick else SHAPES):
        G = K // GROUP
        w_bytes = K * N // 2 + G * N * 2
        n_sets = inputs_to_exceed_l2(w_bytes, dev)
        sets_w = []
        for _ in range(n_sets):
            q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
            s = ((torch.rand(G, N, generator=g) + 0.5) * (0.5 / K**0.5)).to(torch.bfloat16)
            w4 = pack_int4_quantized(q.to(dev), s.to(dev), group_size=GROUP)
            sets_w.append((w4, w4.dequantize()))  # bf16 weight for cuBLAS: same values
        tiny, why_not = _tinygemm(sets_w[0][0], dev)
        tiny_sets = [_tinygemm(w4, dev)[0] for w4, _ in sets_w] if tiny is not None else None
        if tiny is None:
            print(f"  [{K}x{N}] tinygemm unavailable: {why_not}")
        for M in (QUICK_MS if args.quick else MS):
            xs = [torch.randn(M, K, generator=g).to(dev, torch.bfloat16) for _ in range(n_sets)]
            nbytes = w_bytes + M * K * 2 + M * N * 2
            flops = 2 * M * N * K
            paths = ["auto"] + (["fused", "dequant"] if M >= 64 else [])
            t_bf16 = time_fn(lambda x, wb: torch.nn.functional.linear(x, wb),
                             [(x, wb) for x, (_, wb) in zip(xs, sets_w)], iters=iters)
            t_tiny = None
            if tiny_sets is not None:
                t_tiny = time_fn(lambda x, f: f(x), list(zip(xs, tiny_sets)), iters=iters)
            sizes = f"M={M} K={K} N={N} g{GROUP} sym"
            for path in paths:
                t = time_fn(lambda x, w4, p=path: w4a16_matmul(x, w4, path=p),
                            [(x, w4) for x, (w4, _) in zip(xs, sets_w)], iters=iters)
                gbps = nbytes / (t.median_us * 1e-6) / 1e9
                tflops = flops / (t.median_us * 1e-6) / 1e12
                pct = 100 * gbps / copy_gbps if copy_gbps else None
                base = [("cuBLAS bf16 (F.linear)", t_bf16)]
                if t_tiny is not None:
                    base.append(("tinygemm (_weight_int4pack_mm)", t_tiny))
                line = (f"  {sizes:34s} {path:7s}: {t.median_us:8.1f} us {gbps:7.1f} GB/s {tflops:6.1f} TFLOP/s"
                        + (f" ({pct:5.1f}% of copy)" if pct else ""))
                for bname, tb in base:
                    speed = tb.median_us / t.median_us
                    target, met = None, None
                    if dev.type == "cuda" and path == "auto":
                        if bname.startswith("cuBLAS") and M <= 16 and (K, N) in TARGET_SHAPES:
                            target, met = ">= 3.5x bf16", speed >= 3.5
                        elif bname.startswith("tinygemm"):
                            target, met = "> tinygemm", speed > 1.0
                    results.add(family="quant", op="w4a16_matmul", backend=kernel_backend("w4a16_matmul", dev),
                                path=path, sizes=f"{sizes} {path}", dtype="bfloat16", bytes=nbytes, flops=flops,
                                time_us=t.median_us, timing=t.method, gbps=gbps, tflops=tflops,
                                pct_of_ceiling=pct, ceiling="copy_gbps", baseline=bname,
                                baseline_time_us=tb.median_us, speedup_vs_baseline=speed,
                                target=target, met=met)
                    line += f" | {bname.split(' ')[0]} {tb.median_us:8.1f} us x{speed:.2f}"
                print(line)
            del xs
        del sets_w, tiny_sets
    return 0


if __name__ == "__main__":
    sys.exit(main())
