"""Performance model of fused vs sequential GEMM + reduce-scatter, for machines we
cannot run here (TP 2/4/8 on NVLink), from a measured single-GPU GEMM rate.

Per rank, for ``[M, K] x [K, N]`` partials in bf16 (2 bytes), world size ``W``:

* GEMM: 128 x 128 tiles in waves over the SMs; a tile takes
  ``2 * 128 * 128 * K / (rate / SMs)``; the GEMM takes ``max(waves * tile,
  bytes / HBM) + launch`` with bytes = A + B + C (memory floor at small M).
* communication: each rank sends ``(W - 1) / W * M * N * 2`` bytes over its link at
  ``link_gbps * link_efficiency`` (NVLink 4: 450 GB/s per direction per GPU on
  H100 SXM).
* sequential (matmul, then NCCL reduce-scatter): ``gemm + nccl_latency + comm``.
* fused (T3, csrc/tp/gemm_rs.cu): pushes start after the first tile wave and the
  last one leaves after the last tile. The owner's reduction (``R``: reading
  ``W`` partial blocks of ``M / W x N`` and writing one, ``(1 + 1/W) * M * N * 2``
  bytes at HBM speed) runs in the epilogues of its own tiles, which come last
  in its order: the last ``1/W`` of the GEMM takes ``max(gemm / W, R)``. When the
  link is the bottleneck the peers' partials arrive late and the reduction of
  the last peer's share (``R / W``) trails the last arrival. So
  ``fused = max(gemm (W-1)/W + max(gemm/W, R), tile + comm + R/W) + flag latency``.
* hidden fraction: ``1 - (fused - gemm) / (sequential - gemm)``, the share of the
  sequential communication time the fused kernel removes.

Not modelled: the GEMM slowing down while its epilogue stores cross the link,
link contention from other traffic, NCCL's protocol choice by size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["MachineModel", "Prediction", "llama70b_shapes", "model_table", "predict"]


@dataclass(frozen=True)
class MachineModel:
    gemm_tflops: float = 600.0  # dense bf16 GEMM rate of one GPU (measure it: torch.matmul, 8192^3)
    hbm_gbps: float = 3000.0  # device copy bandwidth (read + write), measured
    link_gbps: float = 450.0  # per direction per GPU (NVLink 4, H100 SXM)
    link_efficiency: float = 0.8  # achieved share of the link for bulk transfers (both paths)
    nccl_latency_us: float = 15.0  # fixed cost of one NCCL reduce-scatter (launch + protocol)
    flag_latency_us: float = 2.0  # last tile's flag across NVLink and the owner's acquire
    launch_us: float = 4.0  # one kernel launch
    num_sms: int = 132
    elem_bytes: int = 2  # bf16 / fp16 partials

    def assumptions(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


@dataclass(frozen=True)
class Prediction:
    tp: int
    m: int
    k: int
    n: int
    gemm_us: float
    comm_us: float
    tile_us: float
    reduce_us: float
    sequential_us: float
    fused_us: float

    @property
    def hidden_fraction(self) -> float:
        exposed_seq = self.sequential_us - self.gemm_us
        return 1.0 - (self.fused_us - self.gemm_us) / exposed_seq if exposed_seq > 0 else 1.0

    @property
    def bound_us(self) -> float:
        """No schedule beats max(GEMM, communication): where the link is slower than the
        GEMM (TP8 o_proj) communication cannot be fully hidden by any overlap."""
        return max(self.gemm_us, self.comm_us)

    @property
    def speedup(self) -> float:
        return self.sequential_us / self.fused_us


def predict(m: int, k: int, n: int, tp: int, machine: MachineModel = MachineModel()) -> Prediction:
    """Per-rank times (us) for ``[M, K] x [K, N]`` with K the per-rank slice, at world size ``tp``.
    M is padded to a multiple of ``tp`` (the op needs ``M % W == 0``)."""
    if tp < 1 or m < 1 or k < 1 or n < 1:
        raise ValueError(f"expected positive sizes and tp, got m={m}, k={k}, n={n}, tp={tp}")
    mc = machine
    m = math.ceil(m / tp) * tp
    e = mc.elem_bytes
    per_sm_flops = mc.gemm_tflops * 1e12 / mc.num_sms
    tile_us = 2 * 128 * 128 * k / per_sm_flops * 1e6
    waves = math.ceil(math.ceil(m / 128) * math.ceil(n / 128) / mc.num_sms)
    gemm_bytes = e * (m * k + k * n + m * n)
    gemm_us = max(waves * tile_us, gemm_bytes / (mc.hbm_gbps * 1e9) * 1e6) + mc.launch_us
    if tp == 1:
        return Prediction(tp, m, k, n, gemm_us, 0.0, tile_us, 0.0, gemm_us, gemm_us)
    comm_bytes = (tp - 1) / tp * m * n * e
    comm_us = comm_bytes / (mc.link_gbps * mc.link_efficiency * 1e9) * 1e6
    reduce_us = (1 + 1 / tp) * m * n * e / (mc.hbm_gbps * 1e9) * 1e6
    sequential = gemm_us + mc.nccl_latency_us + comm_us
    compute_bound = gemm_us * (tp - 1) / tp + max(gemm_us / tp, reduce_us)
    link_bound = tile_us + comm_us + reduce_us / tp
    fused = max(compute_bound, link_bound) + mc.flag_latency_us
    return Prediction(tp, m, k, n, gemm_us, comm_us, tile_us, reduce_us, sequential, fused)


HIDDEN = 8192  # Llama-70B hidden size
INTERMEDIATE = 28672  # Llama-70B MLP intermediate size
TOKENS = (1, 16, 128, 512, 1024, 2048, 4096, 8192)


def llama70b_shapes(tp: int) -> list[tuple[str, int, int]]:
    """Row-parallel linears of Llama-70B at ``tp``: (name, K per rank, N)."""
    return [("o_proj", HIDDEN // tp, HIDDEN), ("down_proj", INTERMEDIATE // tp, HIDDEN)]


def model_table(machine: MachineModel = MachineModel(), tps=(2, 4, 8), tokens=TOKENS) -> list[Prediction]:
    return [predict(m, k, n, tp, machine) for tp in tps for _, k, n in llama70b_shapes(tp) for m in tokens]
