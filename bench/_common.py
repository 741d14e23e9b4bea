"""Command-line plumbing shared by the benchmark scripts under bench/.

The measuring itself lives in ``inferops.benchmark`` (installed with the
package, so the GPU machine has it); this module only parses the common
flags and opens the results file.
"""

from __future__ import annotations

import argparse
import os

import torch

from inferops.benchmark import Results, ceilings_record, device_name, measure_ceilings


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--results-dir", default=os.environ.get("INFEROPS_RESULTS_DIR", "bench/results/local"),
                   help="directory for results.jsonl (default: $INFEROPS_RESULTS_DIR or bench/results/local)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (smoke test)")
    p.add_argument("--compile-baseline", action="store_true",
                   help="also time torch.compile of the reference (slow to compile)")
    p.add_argument("--copy-gbps", type=float, default=None,
                   help="copy bandwidth already measured in this run (skips re-measuring)")
    return p


def open_results(args) -> Results:
    os.makedirs(args.results_dir, exist_ok=True)
    return Results(os.path.join(args.results_dir, "results.jsonl"), device_name(args.device))


def copy_ceiling(args, results: Results) -> float | None:
    """Measured copy bandwidth in GB/s (None on the CPU)."""
    if args.copy_gbps is not None:
        return args.copy_gbps
    if torch.device(args.device).type != "cuda":
        return None
    c = measure_ceilings(args.device, copy_mib=64 if args.quick else 1024,
                         gemm_size=1024 if args.quick else 8192)
    results.add(**ceilings_record(c))
    return c.copy_gbps


class Run:
    """What every benchmark starts with: parsed flags, device, results file, the copy
    ceiling measured in this run (None on the CPU) and a freshly seeded generator."""

    def __init__(self, doc: str, argv=None) -> None:
        self.args = parser(doc).parse_args(argv)
        self.device = torch.device(self.args.device)
        self.results = open_results(self.args)
        self.copy_gbps = copy_ceiling(self.args, self.results)
        self.gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
