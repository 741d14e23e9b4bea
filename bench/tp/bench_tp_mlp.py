"""Per-layer time of the tensor-parallel MLP (gate/up column-parallel, down row-parallel):
the fused ``gemm_reduce_scatter`` (RowParallelLinear) vs ``torch.matmul`` followed by
``dist.reduce_scatter_tensor``, same weights, same run. The fused output is checked
against the unfused one before timing. Target: at least as fast as the unfused
baseline at world 1 (GPU). On the CPU both run matmul + gloo's reduce-scatter (the
engine's "fallback" path), so CPU numbers are a smoke test, not a comparison.

    python bench/tp/bench_tp_mlp.py [--quick] [--worlds 1,2]          # CPU: gloo processes
    python bench/tp/bench_tp_mlp.py --device cuda                       # one GPU: world 1
    torchrun --nproc-per-node 4 bench/tp/bench_tp_mlp.py                # GPUs: NCCL, one world
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import open_results, parser  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, group, iters):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier(group)
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    med = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX, group=group)  # the slowest rank sets the layer's time
    return float(med) * 1e6


def run(rank, world, args, device):
    from inferops import tp

    group = dist.group.WORLD
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    H, I = (256, 512) if args.quick or device.type == "cpu" else (8192, 28672)
    token_counts = (64, 130) if args.quick or device.type == "cpu" else (2048, 4096, 8192)
    g = torch.Generator().manual_seed(0)  # the same full weights on every rank
    gate = torch.nn.Linear(H, I, bias=False).to(dtype)
    up = torch.nn.Linear(H, I, bias=False).to(dtype)
    down = torch.nn.Linear(I, H, bias=False).to(dtype)
    with torch.no_grad():
        for lin in (gate, up, down):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * lin.in_features ** -0.5)
    gate, up, down = gate.to(device), up.to(device), down.to(device)
    col_g, col_u = tp.ColumnParallelLinear.from_linear(gate, group), tp.ColumnParallelLinear.from_linear(up, group)
    row = tp.RowParallelLinear.from_linear(down, group, output="sequence", max_tokens=max(token_counts) + world)
    results = open_results(args) if rank == 0 else None
    for M in token_counts:
        x = torch.randn(M, H, generator=g).to(dtype).to(device)
        P = tp.padded_tokens(M, world)

        def fused():
            return row(F.silu(col_g(x)) * col_u(x))

        def unfused():
            h = F.silu(col_g(x)) * col_u(x)
            y = h @ row.weight.t()
            if P != M:
                y = torch.cat([y, y.new_zeros(P - M, H)])
            out = y.new_empty((P // world, H))
            dist.reduce_scatter_tensor(out, y.contiguous(), group=group)
            return out

        with torch.no_grad():
            a, b = fused(), unfused()
            err = float((a.float() - b.float()).abs().max())
            scale = float(b.float().abs().max()) + 1e-6
            if err > (1e-4 if dtype == torch.float32 else 3e-2) * scale:
                raise RuntimeError(f"fused and unfused MLP disagree: max error {err:.3e} (scale {scale:.3e})")
            iters = 5 if args.quick else 50
            t_fused = _median_time(fused, device, group, iters)
            t_base = _median_time(unfused, device, group, iters)
        if rank == 0:
            flops = 2 * M * H * I * 3 / world
            results.add(family="tp", op="tp_mlp", backend=row.path, sizes=f"M={M} H={H} I={I} W={world}",
                        dtype=str(dtype).replace("torch.", ""), time_us=t_fused, tflops=flops / t_fused / 1e6,
                        baseline="matmul + reduce_scatter_tensor", baseline_time_us=t_base,
                        speedup_vs_baseline=t_base / t_fused,
                        target=">= 1x at W = 1" if world == 1 else None,
                        met=(t_base / t_fused >= 1.0) if world == 1 and device.type == "cuda" else None)
            print(f"  W={world} M={M:5d} H={H} I={I} {row.path:9s}: fused {t_fused:9.1f} us, "
                  f"matmul + reduce_scatter {t_base:9.1f} us ({t_base / t_fused:4.2f}x)")


# bench/run_all.py runs this file as a script: its spawned gloo ranks import it by name.
RUN_AS_SCRIPT = True


def _spawned(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        run(rank, world, args, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--worlds", default="1,2", help="world sizes to spawn as gloo processes (CPU)")
    args = p.parse_args(argv)
    if "RANK" in os.environ:  # torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            run(dist.get_rank(), dist.get_world_size(), args, device)
        finally:
            dist.destroy_process_group()
        return 0
    if torch.device(args.device).type == "cuda":  # one GPU, no torchrun: world 1 (the fused kernel's "local" path)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        device = torch.device(args.device)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=0, world_size=1)
        try:
            run(0, 1, args, device)
        finally:
            dist.destroy_process_group()
        return 0
    for world in (int(w) for w in args.worlds.split(",")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(world, port, args), nprocs=world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
