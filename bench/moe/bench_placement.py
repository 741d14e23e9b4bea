"""Expert placement quality and cost (CPU): cross-GPU routes under place_experts vs
round-robin for 2/4/8 GPUs, on synthetic traces with affinity and on a trace
recorded from a small random PyTorch MoE; solve time; and the modelled
per-layer communication of the single-all-to-all mode vs the two-all-to-all
mode (rows and bytes of hidden states crossing GPUs under each mode's rules,
``exchange_rows``; bf16, hidden 4096), for top-1 and top-2 traces.
Target (issue #7): >= 50% fewer cross-GPU routes than round-robin on traces
with affinity.

    python bench/moe/bench_placement.py [--quick]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import open_results, parser  # noqa: E402

from inferops.moe import (  # noqa: E402
    RoutingRecorder,
    cross_gpu_routes,
    exchange_rows,
    place_experts,
    round_robin_placement,
    synthetic_trace,
)


def recorded_trace(tokens: int, layers: int, experts: int) -> torch.Tensor:
    """Routing of a small random MoE whose gates see the residual stream (real hooks)."""
    torch.manual_seed(0)
    gates = torch.nn.ModuleList(torch.nn.Linear(64, experts) for _ in range(layers))
    mix = [torch.randn(64, 64) * 0.05 for _ in range(layers)]
    with RoutingRecorder(gates, k=1) as rec:
        h = torch.randn(tokens, 64)
        for gate, m in zip(gates, mix):
            gate(h)
            h = h + h @ m
    return rec.trace()


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    args.device = "cpu"
    results = open_results(args)
    tokens, layers, experts = (500, 3, 8) if args.quick else (20000, 8, 64)
    traces = {"synthetic affinity 0.8": synthetic_trace(tokens, layers, experts, affinity=0.8, seed=1),
              "synthetic affinity 0.5": synthetic_trace(tokens, layers, experts, affinity=0.5, seed=2),
              "top-2, slot 0 affinity 0.8": synthetic_trace(tokens, layers, experts, k=2, affinity=0.8, seed=3),
              "recorded (random MoE)": recorded_trace(tokens, layers, experts)}
    hidden_bytes = 4096 * 2
    for name, trace in traces.items():
        for G in (2, 4, 8):
            p = place_experts(trace, G, num_experts=experts, time_limit=5 if args.quick else 30)
            rr = cross_gpu_routes(trace, round_robin_placement(layers, experts, G))
            red = 1 - p.objective / rr if rr else 0.0
            rows = exchange_rows(trace, p.gpu_of)
            two = rows["two"] * hidden_bytes / layers
            single = rows["single"] * hidden_bytes / layers
            results.add(family="moe", op="place_experts", backend=p.method, sizes=f"{name}: tokens={tokens} "
                        f"layers={layers} E={experts} G={G}", dtype="-", time_us=p.solve_seconds * 1e6,
                        baseline="round-robin placement", cross_routes=p.objective, cross_routes_baseline=rr,
                        reduction=red, bytes_per_layer_single=single, rows_single=rows["single"], rows_two=rows["two"],
                        bytes_per_layer_two=two, target=">= 50% fewer routes" if name.startswith("synthetic") else None,
                        met=(red >= 0.5) if name.startswith("synthetic") else None)
            print(f"  {name:24s} G={G}: {p.method:14s} {p.objective:9.0f} vs round-robin {rr:9.0f} "
                  f"({100 * red:5.1f}% fewer) in {p.solve_seconds:6.2f} s | modelled bytes/layer single "
                  f"{single / 1e6:8.1f} MB vs two-a2a {two / 1e6:8.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
