"""Benchmark w8a8_matmul (INT8 and FP8 e4m3, per-token x per-channel scales, bf16 output) in
the same run as cuBLAS BF16 (``torch.matmul``), ``torch._int_mm`` (INT8, int32 output, no
scales) and ``torch._scaled_mm`` (FP8 with row-wise scales: the same math as ours), on the
Llama-class shapes of issue 5: (K, N) = 4096x4096, 4096x14336, 14336x4096, 8192x8192;
M = 1, 16, 64, 256, 4096.

Napkin math: 2 M N K FLOPs; above M ~ 300 the GEMM is compute bound, where 8-bit tensor
cores have twice the BF16 rate (H100 SXM datasheet: 1979 vs 989 TFLOP/s dense), so the
ideal speedup over BF16 is 2x. Our kernel is mma.sync (no wgmma), so the percentage
reported is of the same-run cuBLAS 8-bit rate (``_scaled_mm`` / ``_int_mm``) at the same
shape, the measured ceiling for 8-bit GEMM on this GPU. Small M is bound by the weight
bytes (1 B/weight vs 2 for BF16).

Target (issue 5): FP8 >= 1.7x over BF16 at M = 4096.

FP8 is timed on both kernels in the same run: ``path="mma"`` (mma.sync, the default; on
sm_90a ptxas emulates its e4m3 MMA with fp16 HMMA) and ``path="wgmma"`` (experimental,
opt-in, native FP8 wgmma; dtype ``fp8-wgmma`` in the records). Before timing, the wgmma
result is checked against the mma one; a wgmma failure (error or mismatch) is printed and
recorded (``error`` field) and the rest of the benchmark goes on.

    python bench/quant/bench_w8a8.py [--quick]
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
from inferops._core.ops import kernel_backend
from inferops.benchmark import inputs_to_exceed_l2, time_fn
from inferops.quant import quantize_per_token, w8a8_matmul

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
Run = importlib.import_module("_common").Run  # bench/_common.py (not a package)

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (K, N)
MS = [1, 16, 64, 256, 4096]
QUICK_SHAPES = [(256, 128)]
QUICK_MS = [1, 64]
FP8 = torch.float8_e4m3fn


def _peer(fn, *args):
    """fn if it runs on these inputs, else (None, reason): API and shape limits vary by
    torch version and device (_int_mm needs M > 16 on CUDA; _scaled_mm needs sm_89+)."""
    try:
        fn(*args)
        return fn, None
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def _scaled_mm(x_q, xs, w_q, ws):
    return torch._scaled_mm(x_q, w_q.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.bfloat16)


def _wgmma_check(ours, args):
    """None if path='wgmma' runs and matches path='mma' (bf16 output, relative to the
    output's scale), else the reason. Guards the experimental kernel: a failure here is
    recorded and the benchmark goes on."""
    try:
        got = ours(*args).float()
        want = w8a8_matmul(*args, torch.bfloat16, path="mma").float()
        if got.is_cuda:
            torch.cuda.synchronize()  # surface asynchronous launch errors here
    except Exception as e:  # noqa: BLE001 - any failure of the new path is recorded, not fatal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if not err <= 2e-2:  # two bf16 roundings of the same fp32 sums apart; NaN fails too
        return f"mismatch vs path='mma': max |diff| / max |y| = {err:.3g}"
    return None


def _int_mm(x_q, xs, w_q, ws):
    return torch._int_mm(x_q, w_q.t())


def main(argv=None) -> int:
    run = Run(__doc__, argv)
    args, dev, results, copy_gbps, g = run.args, run.device, run.results, run.copy_gbps, run.gen
    iters = 10 if args.quick else 100
    print(f"w8a8_matmul on {results.device}: backend {kernel_backend('w8a8_matmul', dev)}")
    for K, N in (QUICK_SHAPES if args.quick else SHAPES):
        w = torch.randn(N, K, generator=g).to(dev) * K**-0.5
        w_bf16 = w.bfloat16()
        wq = {qd: quantize_per_token(w, qd) for qd in (torch.int8, FP8)}
        for M in (QUICK_MS if args.quick else MS):
            n_sets = inputs_to_exceed_l2(M * K + N * K + 2 * M * N, dev)
            xs = [torch.randn(M, K, generator=g).to(dev, torch.bfloat16) for _ in range(n_sets)]
            flops = 2 * M * N * K
            t_bf16 = time_fn(lambda x, wb: x @ wb.t(), [(x, w_bf16) for x in xs], iters=iters)
            for qd, qname, path in ((FP8, "fp8", "mma"), (FP8, "fp8-wgmma", "wgmma"), (torch.int8, "int8", "mma")):
                w_q, w_s = wq[qd]
                sets = [(*quantize_per_token(x, qd), w_q, w_s) for x in xs]

                def ours(a, b, c, d, path=path):
                    return w8a8_matmul(a, b, c, d, torch.bfloat16, path=path)

                if path == "wgmma":
                    why = _wgmma_check(ours, sets[0])
                    if why is not None:
                        print(f"  {qname} M={M} K={K} N={N}: path='wgmma' skipped: {why}")
                        results.add(family="quant", op="w8a8_matmul", backend=kernel_backend("w8a8_matmul", dev),
                                    sizes=f"{qname} M={M} K={K} N={N}", dtype=qname, error=why)
                        continue
                t = time_fn(ours, sets, iters=iters)
                tflops = flops / (t.median_us * 1e-6) / 1e12
                nbytes = M * K + N * K + 2 * M * N + 4 * (M + N)
                gbps = nbytes / (t.median_us * 1e-6) / 1e9
                peer_name = "torch._scaled_mm (rowwise)" if qd == FP8 else "torch._int_mm (no scales)"
                peer, why = _peer(_scaled_mm if qd == FP8 else _int_mm, *sets[0])
                t_peer = time_fn(peer, sets, iters=iters) if peer is not None else None
                pct = 100 * t_peer.median_us / t.median_us if t_peer is not None else None
                sizes = f"{qname} M={M} K={K} N={N}"
                line = (f"  {sizes:32s}: {t.median_us:9.1f} us {tflops:7.1f} TFLOP/s {gbps:7.1f} GB/s"
                        + (f" ({pct:5.1f}% of cuBLAS 8-bit)" if pct else f" [{peer_name}: {why}]"))
                bases = [("cuBLAS bf16 (torch.matmul)", t_bf16)] + ([(peer_name, t_peer)] if t_peer else [])
                for bname, tb in bases:
                    speed = tb.median_us / t.median_us
                    target = met = None
                    if dev.type == "cuda" and qd == FP8 and M == 4096 and bname.startswith("cuBLAS bf16"):
                        target, met = ">= 1.7x bf16", speed >= 1.7
                    results.add(family="quant", op="w8a8_matmul", backend=kernel_backend("w8a8_matmul", dev),
                                sizes=sizes, dtype=qname, bytes=nbytes, flops=flops, time_us=t.median_us,
                                timing=t.method, tflops=tflops, gbps=gbps, pct_of_ceiling=pct,
                                ceiling=f"{peer_name} same shape", baseline=bname,
                                baseline_time_us=tb.median_us, speedup_vs_baseline=speed, target=target, met=met)
                    line += f" | {bname.split(' ')[0]} {tb.median_us:8.1f} us x{speed:.2f}"
                print(line)
            del xs
    if copy_gbps:
        print(f"  (copy ceiling this run: {copy_gbps:.0f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
