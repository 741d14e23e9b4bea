"""bench/attention/bench_batch_generate.py runs at tiny size on the CPU and records its comparison."""

from __future__ import annotations

import importlib.util
import os

from inferops.benchmark import load_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_batch_generate_quick(tmp_path):
    path = os.path.join(ROOT, "bench", "attention", "bench_batch_generate.py")
    spec = importlib.util.spec_from_file_location("bench_batch_generate", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--device", "cpu", "--results-dir", str(tmp_path)]) == 0
    recs = [r for r in load_jsonl(str(tmp_path / "results.jsonl")) if r.get("op") == "batch_generate"]
    assert {r["baseline"] for r in recs} == {"inferops sharing=False", "HF generate (sdpa, padded)"}
    for r in recs:
        assert r["decode_tokens_per_s"] > 0 and r["baseline_decode_tokens_per_s"] > 0
        # float32 greedy: (nearly) the same tokens; exactness itself is test_generate's job (a
        # near-tie in a random model's logits may flip under a padded batch's numerics)
        assert r["requests"] == 8 and r["identical_sequences"] >= 6
        assert r["met"] is None  # no target claimed off the GPU
