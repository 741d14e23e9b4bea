"""Benchmark the MoE kernels in the same run as a PyTorch baseline.

routing_layout at T=4096, k=8, 256 experts, 8 ranks (target < 20 us) against the
reference (bincount + stable sort + scatter); permute / unpermute at hidden 2048
and 7168, bf16, against argsort + index_select / index_add and against the copy
bandwidth (target >= 70%).

    python bench/moe/bench_moe_kernels.py [--quick]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import Run  # noqa: E402

from inferops._core.ops import kernel_backend  # noqa: E402
from inferops.benchmark import inputs_to_exceed_l2, time_fn  # noqa: E402
from inferops.moe import default_placement, permute, routing_layout, unpermute  # noqa: E402
from inferops.reference import moe as ref  # noqa: E402


def _torch_permute(x, ids):
    """What a PyTorch user writes: argsort by expert, index_select."""
    order = torch.argsort(ids.reshape(-1), stable=True)
    return x.index_select(0, torch.div(order, ids.shape[1], rounding_mode="floor"))


def _torch_unpermute(y, ids, w):
    order = torch.argsort(ids.reshape(-1), stable=True)
    tok = torch.div(order, ids.shape[1], rounding_mode="floor")
    out = torch.zeros(ids.shape[0], y.shape[1], dtype=torch.float32, device=y.device)
    out.index_add_(0, tok, y.float() * w.reshape(-1)[order, None])
    return out.to(y.dtype)


def main(argv=None) -> int:
    run = Run(__doc__, argv)
    args, dev, results, copy_gbps, g = run.args, run.device, run.results, run.copy_gbps, run.gen
    iters = 10 if args.quick else 200
    T, k, E, R = (64, 2, 8, 2) if args.quick else (4096, 8, 256, 8)
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.to(dev, torch.int32)
    placement = default_placement(E, R, dev)
    cap = T * k + E * 15
    t = time_fn(lambda i: routing_layout(i, E, placement=placement, world_size=R, align=16, validate=False),
                [(ids,)], iters=iters)
    tb = time_fn(lambda i: ref.routing_layout(i, placement, R, 16, cap), [(ids,)], iters=max(5, iters // 10))
    target = dev.type == "cuda"
    results.add(family="moe", op="routing_layout", backend=kernel_backend("routing_layout", dev),
                sizes=f"T={T} k={k} E={E} R={R} align=16", dtype="int32", time_us=t.median_us, timing=t.method,
                baseline="torch_reference", baseline_time_us=tb.median_us,
                speedup_vs_baseline=tb.median_us / t.median_us,
                target="< 20 us" if target else None, met=(t.median_us < 20) if target else None)
    print(f"  routing_layout T={T} k={k} E={E}: {t.median_us:.2f} us | reference {tb.median_us:.1f} us")
    lay = routing_layout(ids, E, align=16)
    w = torch.rand(T, k, generator=g).to(dev)
    for hidden in ((256,) if args.quick else (2048, 7168)):
        x = torch.randn(T, hidden, generator=g).to(dev, torch.bfloat16)
        # The bytes each op must move (its ideal, as simt-report defines it): permute reads every
        # token once and writes every capacity row (padding included); unpermute reads each
        # kept assignment's row once and writes T rows.
        cap_rows = lay.src_index.numel()
        kept = int((lay.dst_index >= 0).sum())
        op_bytes = {"permute": (T + cap_rows) * hidden * 2, "unpermute": (kept + T) * hidden * 2}
        nbytes = op_bytes["permute"]
        n_sets = inputs_to_exceed_l2(nbytes, dev)
        xs = [(x if i == 0 else torch.randn(T, hidden, generator=g).to(dev, torch.bfloat16),) for i in range(n_sets)]
        tp = time_fn(lambda xx: permute(xx, lay), xs, iters=iters)
        tpb = time_fn(lambda xx: _torch_permute(xx, ids), xs, iters=iters)
        y = permute(x, lay)
        tu = time_fn(lambda yy: unpermute(yy, lay, w), [(y,)], iters=iters)
        tub = time_fn(lambda yy: _torch_unpermute(yy, ids, w), [(_torch_permute(x, ids),)], iters=iters)
        for op, tt, tbb in (("permute", tp, tpb), ("unpermute", tu, tub)):
            nbytes = op_bytes[op]
            gbps = nbytes / (tt.median_us * 1e-6) / 1e9
            pct = 100 * gbps / copy_gbps if copy_gbps else None
            results.add(family="moe", op=op, backend=kernel_backend(op, dev), sizes=f"T={T} k={k} hidden={hidden}",
                        dtype="bfloat16", bytes=nbytes, time_us=tt.median_us, timing=tt.method, gbps=gbps,
                        pct_of_ceiling=pct, ceiling="copy_gbps", baseline="torch argsort + index_select/index_add",
                        baseline_time_us=tbb.median_us, speedup_vs_baseline=tbb.median_us / tt.median_us,
                        target=">= 70% copy" if target else None,
                        met=(pct is not None and pct >= 70) if target else None)
            print(f"  {op} hidden={hidden}: {tt.median_us:.2f} us ({gbps:.0f} GB/s"
                  + (f", {pct:.1f}% of copy" if pct else "") + f") | torch {tbb.median_us:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
