"""The C++ microbenchmark binaries (bench/cpp, docs/bench.md), in their CPU SIMT executor build.

They are not part of the pip build: CI builds them (`.ci/run`: `-DINFEROPS_BUILD_SIMT_BENCH=ON`)
and points INFEROPS_BENCH_BIN_DIR at the build directory; locally, build/dev is tried
(`ninja -C build/dev bench_simt` after configuring it with that option). Skipped when absent.
Each binary must: print --help, pass --check on every op at its small check shapes, FAIL
--check when one output element is corrupted (--perturb-check: the check can fail), refuse
bad flags with exit status 2, and write one JSON object per case with --json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("attention", "linear_attention", "quant", "moe", "tp")
# One cheap op per family for the perturbation and JSON tests.
CHEAP = {"attention": "merge_states", "linear_attention": "step", "quant": "quantize_per_token",
         "moe": "routing_layout", "tp": "gemm_rs"}


def _binary(family: str) -> Path:
    dirs = [Path(os.environ["INFEROPS_BENCH_BIN_DIR"])] if os.environ.get("INFEROPS_BENCH_BIN_DIR") else []
    dirs.append(ROOT / "build" / "dev")
    for d in dirs:
        p = d / f"bench_{family}_simt"
        if p.is_file():
            return p
    pytest.skip(f"bench_{family}_simt not built (set INFEROPS_BENCH_BIN_DIR; docs/bench.md)")


def _run(*args, timeout=600):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("family", FAMILIES)
def test_help_names_every_flag(family):
    r = _run(_binary(family), "--help")
    assert r.returncode == 0, r.stderr
    for word in ("--check", "--perturb-check", "--json", "--iters", "--warmup", "--no-flush-l2"):
        assert word in r.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_check_passes_on_the_executor(family):
    r = _run(_binary(family), "all", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [x for x in r.stdout.splitlines() if not x.startswith("#")]
    assert lines and all("check ok" in x and "executor" in x for x in lines), r.stdout
    assert "% of" not in r.stdout  # no ceiling percentages from executor times


@pytest.mark.parametrize("family", FAMILIES)
def test_corrupted_output_fails_the_check(family):
    r = _run(_binary(family), CHEAP[family], "--check", "--perturb-check")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stderr and "check FAILED" in r.stdout


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_flags_exit_2(family):
    exe = _binary(family)
    for args in (["all", "--no-such-flag=1"], ["no_such_op"], [], [CHEAP[family], "--iters=x"],
                 [CHEAP[family], "--perturb-check"]):
        r = _run(exe, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.strip(), args


@pytest.mark.parametrize("family", FAMILIES)
def test_json_lines(family, tmp_path):
    out = tmp_path / "r.jsonl"
    r = _run(_binary(family), CHEAP[family], "--check", f"--json={out}")
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    cases = [x for x in r.stdout.splitlines() if not x.startswith("#")]
    assert len(recs) == len(cases) > 0
    for rec in recs:
        assert rec["op"] == CHEAP[family] and rec["simulated"] is True and rec["check"] == "ok"
        assert rec["median_us"] > 0 and rec["shape"]
        assert "pct_of_copy" not in rec and "pct_of_peak" not in rec


def test_inferops_bench_finds_the_binaries():
    """`inferops-bench` (python -m inferops.bench_cli) finds a binary through
    INFEROPS_BENCH_BIN_DIR and runs it with the remaining arguments."""
    exe = _binary("attention")
    env = os.environ | {"INFEROPS_BENCH_BIN_DIR": str(exe.parent)}
    r = subprocess.run([sys.executable, "-m", "inferops.bench_cli", "--list"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert str(exe) in r.stdout
    r = subprocess.run([sys.executable, "-m", "inferops.bench_cli", "attention", "merge_states", "--check"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "check ok" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "inferops.bench_cli", "no_such_family"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "expected a family" in r.stderr
