"""The executor's memory-access metrics (csrc/simt/metrics.cpp): each counter checked on a
self-test kernel whose access pattern has a known answer (csrc/simt/selftest.cpp,
``metrics_*``). Runs with the instrumented build (INFEROPS_SIMT_RACECHECK, CI's race-check
pass: ``pytest -m simt`` with that module loaded); skipped elsewhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inferops._core.extension import simt_extension
from inferops.testing import simt_metrics, simt_metrics_available

pytestmark = [
    pytest.mark.simt,
    pytest.mark.skipif(not simt_metrics_available(),
                       reason="needs the instrumented executor build (RACE=1 scripts/dev_build.sh _simt)"),
]


def _run(name: str, n: int) -> dict:
    with simt_metrics() as recs:
        simt_extension().simt_selftest(name, [float(i % 7) for i in range(n)])
    assert len(recs) == 1, recs
    return recs[0]


def test_coalesced_copy_reads_the_minimum_sectors():
    r = _run("metrics_copy", 1024)  # 16 blocks x 64 threads, out[i] = in[i]
    assert "MetricsCopyKernel" in r["kernel"]
    assert r["grid"] == [16, 1, 1] and r["block"] == [64, 1, 1]
    ld, st = r["global_load"], r["global_store"]
    assert ld["requests"] == 32 and ld["bytes"] == 4096  # the kernel parameters are not counted
    assert ld["sectors_min"] == 128 and st["sectors_min"] == 128
    # Each warp's 128 bytes are 4 sectors, or 5 when the host buffer is not 32-byte aligned.
    assert ld["sectors"] in (128, 160) and st["sectors"] in (128, 160)
    assert r["global_load_unique_bytes"] in (4096, 4096 + 32)
    assert r["shared_load"]["requests"] == 0 and r["barriers"] == 0 and r["collectives"] == {}


def test_strided_read_costs_twice_the_minimum_sectors():
    r = _run("metrics_copy_stride2", 1024)  # out[i] = in[2 i]: half of every sector is wasted
    ld = r["global_load"]
    assert ld["requests"] == 16 and ld["sectors_min"] == 64
    assert 128 <= ld["sectors"] <= 128 + 16
    worst = r["sites"][0]
    assert worst["kind"] == "global_load" and worst["where"].startswith("csrc/simt/selftest.cpp:")


def test_broadcast_read_is_one_sector():
    r = _run("metrics_broadcast", 256)  # every thread reads in[0]
    ld = r["global_load"]
    assert ld["requests"] == 8 and ld["sectors"] == 8 and ld["sectors_min"] == 8
    assert r["global_load_unique_bytes"] == 32


@pytest.mark.parametrize("stride, wavefronts", [(1, 1), (2, 2), (32, 32), (33, 1)])
def test_shared_bank_conflicts(stride, wavefronts):
    r = _run(f"metrics_shared_stride{stride}", 32)  # one warp, float index t * stride
    for kind in ("shared_store", "shared_load"):
        assert r[kind] == {"requests": 1, "bytes": 128, "wavefronts": wavefronts, "wavefronts_min": 1}, kind
    assert r["collectives"] == {"__syncwarp": 1}


@pytest.mark.parametrize("name, wavefronts", [("metrics_ldmatrix_conflicts", 32), ("metrics_ldmatrix_padded", 4)])
def test_ldmatrix_bank_conflicts(name, wavefronts):
    r = _run(name, 256)  # ldmatrix.x4, rows 128 bytes apart (8-way conflicts) or 144 (none)
    assert r["ldmatrix"] == {"requests": 1, "bytes": 512, "wavefronts": wavefronts, "wavefronts_min": 4}
    assert any(s["kind"] == "ldmatrix" and s["where"].startswith("csrc/common/mma.cuh:") for s in r["sites"])


def test_barriers_collectives_and_executor_state_are_not_memory():
    r = _run("block_sum", 64)  # 2 warps: 5 shuffles each, a __syncthreads, static __shared__ sums
    assert r["barriers"] == 1
    assert r["collectives"] == {"__shfl_xor_sync": 10}
    # Loads: in[t] only (the shuffles' results and threadIdx/blockDim are not memory accesses).
    assert r["global_load"]["bytes"] == 64 * 4 and r["global_store"]["bytes"] == 64 * 4
    assert r["shared_store"]["requests"] == 2 and r["shared_store"]["bytes"] == 8  # lane 0 of each warp
    assert r["shared_load"]["bytes"] == 64 * 2 * 4  # every thread reads both warp sums
    assert not [s for s in r["sites"] if s["where"].startswith("csrc/simt/simt.h")]


def test_a_failed_launch_writes_no_record():
    with simt_metrics() as recs:
        with pytest.raises(RuntimeError, match="__trap"):
            simt_extension().simt_selftest("trap", [1.0] * 64)
        simt_extension().simt_selftest("metrics_copy", [1.0] * 128)
    assert [("MetricsCopyKernel" in r["kernel"]) for r in recs] == [True]


def test_metrics_file_from_the_environment(tmp_path):
    path = tmp_path / "m.jsonl"
    code = (
        "import inferops\n"
        "m = inferops._core.extension.simt_extension()\n"
        "m.simt_selftest('metrics_copy', [1.0] * 256)\n"
        "m.simt_selftest('block_sum', [1.0] * 64)\n"
    )
    env = dict(os.environ, INFEROPS_SIMT_METRICS=str(path), PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert ["MetricsCopyKernel" in lines[0]["kernel"], "BlockSumKernel" in lines[1]["kernel"]] == [True, True]
    assert lines[0]["global_load"]["bytes"] == 256 * 4
