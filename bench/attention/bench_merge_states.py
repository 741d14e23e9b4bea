"""Benchmark merge_states against the PyTorch reference measured in the same run.

Memory bound: bytes = 2 reads + 1 write of v plus 3 LSE rows; the ceiling is
the device-to-device copy bandwidth measured in this run. Target (issue #2):
>= 80% of copy bandwidth at 8M elements.

    python bench/attention/bench_merge_states.py [--quick] [--compile-baseline]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import copy_ceiling, open_results, parser  # noqa: E402

from inferops._core.ops import kernel_backend  # noqa: E402
from inferops.attention import merge_states  # noqa: E402
from inferops.benchmark import inputs_to_exceed_l2, time_fn  # noqa: E402
from inferops.reference import attention as ref  # noqa: E402

# (num_tokens, num_heads, head_dim): decode batch; 8M elements (the target size); 64M.
SIZES = [(64, 32, 128), (2048, 32, 128), (16384, 32, 128)]
QUICK_SIZES = [(4, 2, 64), (32, 4, 128)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TARGET_ELEMENTS = 2048 * 32 * 128
TARGET_PCT = 80.0


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    dev = torch.device(args.device)
    results = open_results(args)
    copy_gbps = copy_ceiling(args, results)
    sizes = QUICK_SIZES if args.quick else SIZES
    iters = 10 if args.quick else 200
    compiled = torch.compile(ref.merge_states) if args.compile_baseline else None
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    backend = kernel_backend("merge_states", dev)
    print(f"merge_states on {results.device}: backend {backend}"
          + (f", copy ceiling {copy_gbps:.0f} GB/s" if copy_gbps else ""))
    for T, H, D in sizes:
        for dtype in DTYPES:
            es = torch.tensor([], dtype=dtype).element_size()
            nbytes = 3 * T * H * D * es + 3 * T * H * 4
            n_sets = inputs_to_exceed_l2(nbytes, dev)

            def make():
                return (
                    torch.randn(T, H, D, generator=g).to(dev, dtype),
                    (torch.randn(T, H, generator=g) * 4).to(dev),
                    torch.randn(T, H, D, generator=g).to(dev, dtype),
                    (torch.randn(T, H, generator=g) * 4).to(dev),
                )

            sets = [make() for _ in range(n_sets)]
            ours = time_fn(merge_states, sets, iters=iters)
            # What an eager caller sees, Python validation and launch included.
            eager = time_fn(merge_states, sets, iters=iters, cuda_graph=False)
            gbps = nbytes / (ours.median_us * 1e-6) / 1e9
            pct = 100 * gbps / copy_gbps if copy_gbps else None
            is_target = T * H * D == TARGET_ELEMENTS and dev.type == "cuda"
            baselines = {"torch_reference": ref.merge_states}
            if compiled is not None and T * H * D == TARGET_ELEMENTS:  # compiling costs GPU time
                baselines["torch_compile_reference"] = compiled
            for bname, bfn in baselines.items():
                base = time_fn(bfn, sets, iters=iters)
                rec = results.add(
                    family="attention", op="merge_states", backend=backend,
                    sizes=f"T={T} H={H} D={D}", dtype=str(dtype).replace("torch.", ""),
                    bytes=nbytes, time_us=ours.median_us, time_p10_us=ours.p10_us,
                    time_p90_us=ours.p90_us, timing=ours.method, eager_time_us=eager.median_us, gbps=gbps, pct_of_ceiling=pct,
                    ceiling="copy_gbps", baseline=bname, baseline_time_us=base.median_us,
                    speedup_vs_baseline=base.median_us / ours.median_us,
                    target=f">= {TARGET_PCT:.0f}% copy" if is_target else None,
                    met=(pct is not None and pct >= TARGET_PCT) if is_target else None,
                )
                print(f"  T={T:6d} H={H:3d} D={D:4d} {rec['dtype']:9s} {ours.median_us:9.2f} us "
                      f"{gbps:8.1f} GB/s" + (f" ({pct:5.1f}% of copy)" if pct else "")
                      + f" | {bname} {base.median_us:9.2f} us -> x{rec['speedup_vs_baseline']:.2f}")
            del sets
    return 0


if __name__ == "__main__":
    sys.exit(main())
