"""Run every family's benchmark into one results directory and render the table.

    python bench/run_all.py --results-dir DIR [--quick] [--compile-baseline]

Writes DIR/results.jsonl (one JSON object per measurement, ceilings first)
and DIR/summary.md (markdown table), and prints the table last.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import copy_ceiling, open_results, parser  # noqa: E402

from inferops.benchmark import load_jsonl, render_markdown  # noqa: E402

# One entry per family benchmark: (module path under bench/, callable name).
BENCHMARKS = [
    ("attention/bench_merge_states.py", "main"),
    ("attention/bench_paged_decode.py", "main"),
    ("attention/bench_prefix_plan.py", "main"),
    ("attention/bench_prefix_shared.py", "main"),
    ("linear_attention/bench_sla.py", "main"),
    ("linear_attention/bench_causal.py", "main"),
    ("moe/bench_moe_kernels.py", "main"),
    ("quant/bench_w4a16.py", "main"),
    ("tp/bench_gemm_rs.py", "main"),
    ("tp/bench_tp_mlp.py", "main"),
    ("quant/bench_w8a8.py", "main"),
    ("quant/bench_hadamard.py", "main"),
    ("quant/bench_quant_linear.py", "main"),
    ("attention/bench_batch_generate.py", "main"),  # last: a 1B model end to end (minutes on a GPU)
]


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    results = open_results(args)
    copy_gbps = copy_ceiling(args, results)
    forwarded = ["--results-dir", args.results_dir, "--device", args.device]
    if copy_gbps is not None:
        forwarded += ["--copy-gbps", str(copy_gbps)]
    if args.quick:
        forwarded.append("--quick")
    if args.compile_baseline:
        forwarded.append("--compile-baseline")
    failures = 0
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    for rel, fn_name in BENCHMARKS:
        spec = importlib.util.spec_from_file_location(rel.replace("/", "_")[:-3], os.path.join(here, rel))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        try:
            if getattr(mod, "RUN_AS_SCRIPT", False):
                # It spawns processes (gloo ranks): their workers must be importable by the
                # children, which a module loaded from a file path here is not.
                import subprocess

                rc = subprocess.run([sys.executable, os.path.join(here, rel), *forwarded]).returncode
            else:
                rc = getattr(mod, fn_name)(forwarded)
        except Exception as e:  # keep going: one broken family must not hide the others
            print(f"[run_all] {rel} failed: {type(e).__name__}: {e}")
            rc = 1
        failures += rc != 0
    table = render_markdown(load_jsonl(results.path))
    with open(os.path.join(args.results_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
