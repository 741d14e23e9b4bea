"""The fused vs sequential performance model (pure Python) is physically sane on the
Llama-70B row-parallel shapes: fused <= sequential, fused >= max(GEMM, communication),
every time monotone in M, and one rank is just the GEMM."""

from __future__ import annotations

import pytest
from inferops.tp import perf_model as pm

MACHINES = [pm.MachineModel(), pm.MachineModel(gemm_tflops=350.0, link_gbps=900.0),
            pm.MachineModel(gemm_tflops=900.0, link_gbps=100.0, nccl_latency_us=30.0)]


@pytest.mark.parametrize("machine", MACHINES, ids=["h100", "slow-gemm-fast-link", "fast-gemm-slow-link"])
def test_model_bounds_on_llama70b_shapes(machine):
    rows = pm.model_table(machine)
    assert len(rows) == 3 * 2 * len(pm.TOKENS)
    for p in rows:
        assert p.fused_us <= p.sequential_us + 1e-9, p
        assert p.fused_us >= max(p.gemm_us, p.comm_us) == p.bound_us, p
        assert p.sequential_us == pytest.approx(p.gemm_us + p.comm_us + machine.nccl_latency_us)
        assert 0.0 <= p.hidden_fraction <= 1.0, p


@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
def test_model_monotone_in_m(tp_size):
    for _, k, n in pm.llama70b_shapes(max(tp_size, 1)):
        prev = None
        for m in range(1, 8193, 97):
            p = pm.predict(m, k, n, tp_size)
            if prev is not None:
                for f in ("gemm_us", "comm_us", "sequential_us", "fused_us"):
                    assert getattr(p, f) >= getattr(prev, f) - 1e-9, (f, m, prev, p)
            prev = p


def test_one_rank_is_the_gemm_and_bad_sizes_raise():
    p = pm.predict(4096, 8192, 8192, 1)
    assert p.comm_us == 0 and p.fused_us == p.sequential_us == p.gemm_us
    # 2 * 4096 * 8192 * 8192 FLOP at 600 TFLOP/s = 916 us (4096 tiles on 132 SMs: 32 waves, 1% quantisation)
    assert 900 < p.gemm_us < 960
    with pytest.raises(ValueError, match="positive sizes"):
        pm.predict(0, 8, 8, 2)


def test_communication_volume():
    p = pm.predict(4096, 1024, 8192, 8, pm.MachineModel(link_efficiency=1.0))
    sent = 7 / 8 * 4096 * 8192 * 2  # bytes each rank sends
    assert p.comm_us == pytest.approx(sent / 450e9 * 1e6)
