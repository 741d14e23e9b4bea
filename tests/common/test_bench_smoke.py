"""The benchmark scripts must keep running (on the CPU here, on the GPU machine for real)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inferops.benchmark import Results, load_jsonl, render_markdown, time_fn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_all_quick_writes_results(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "run_all.py"), "--quick", "--device", "cpu",
         "--results-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    recs = load_jsonl(str(tmp_path / "results.jsonl"))
    ops = [x for x in recs if x.get("op") == "merge_states"]
    assert ops, recs
    for x in ops:
        assert x["time_us"] > 0 and x["baseline_time_us"] > 0 and x["gbps"] > 0
        assert x["speedup_vs_baseline"] == pytest.approx(x["baseline_time_us"] / x["time_us"])
    summary = (tmp_path / "summary.md").read_text()
    assert "| attention | merge_states |" in summary


def test_results_render(tmp_path):
    res = Results(str(tmp_path / "r.jsonl"), "Fake GPU")
    res.add(kind="ceilings", copy_gbps=3000.0, bf16_tflops=800.0, copy_bytes=1, gemm_size=1)
    res.add(family="f", op="o", sizes="n=1", dtype="bf16", time_us=10.0, gbps=2400.0,
            pct_of_ceiling=80.0, baseline="torch", baseline_time_us=20.0,
            speedup_vs_baseline=2.0, target=">= 80%", met=False)
    md = render_markdown(load_jsonl(str(tmp_path / "r.jsonl")))
    assert "copy 3000 GB/s" in md and "| f | o | n=1 | bf16 | 10 | 2400 | 80 |" in md
    assert "**no**" in md  # a missed target is marked
    assert json.loads((tmp_path / "r.jsonl").read_text().splitlines()[1])["device"] == "Fake GPU"


def test_time_fn_cpu_rotates_inputs():
    seen = []
    t = time_fn(lambda x: seen.append(x), [(1,), (2,), (3,)], warmup=0, iters=6)
    assert t.iters == 6 and t.method == "perf_counter"
    assert seen[:3] == [1, 2, 3] and set(seen) == {1, 2, 3}
