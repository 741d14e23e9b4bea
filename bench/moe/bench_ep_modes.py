"""MoE layer time and bytes sent per rank: ExFlow's single-all-to-all mode vs the
two-all-to-all (dispatch/combine) mode, driven by a routing trace: one recorded from a
small random Qwen3-MoE (transformers, ``RoutingRecorder``) and synthetic traces with
inter-layer affinity (top-1 and top-2), under round-robin and ``place_experts``
placements. Every rank runs the dispatcher with the trace's routing for its tokens
(token t starts on rank t % W) and its local experts as one grouped GEMM; bytes are the
hidden-state rows it sends to other ranks (counted at ``all_to_all_single``, checked
against ``exchange_rows``). Target: single mode sends >= 50% fewer bytes than
two-all-to-all on an affinity placement. CPU (gloo) numbers are a smoke test for time.

    python bench/moe/bench_ep_modes.py [--quick] [--world 2]            # CPU: gloo processes
    torchrun --nproc-per-node 4 bench/moe/bench_ep_modes.py             # GPUs: NCCL
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import open_results, parser  # noqa: E402


class _Bytes:
    def __init__(self, rank, hidden):
        self.rank, self.hidden, self.rows, self._orig = rank, hidden, 0, dist.all_to_all_single

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if input.is_floating_point() and input.dim() == 2 and input.shape[1] == self.hidden:
            w = dist.get_world_size(group)
            splits = input_split_sizes or [input.shape[0] // w] * w
            self.rows += sum(splits) - splits[self.rank]
        return self._orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def recorded_trace(tokens: int):
    """Top-2 routing of a small random Qwen3-MoE (4 MoE layers, 16 experts) on random prompts."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from inferops.moe import RoutingRecorder, moe_gates

    cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=256, num_experts=16, num_experts_per_tok=2,
                         moe_intermediate_size=32, initializer_range=0.1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 256, (max(1, tokens // 32), 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), RoutingRecorder(moe_gates(model), k=2) as rec:
        model(ids)
    return rec.trace()


def run(rank, world, args, device, traces):
    from inferops import moe

    group = dist.group.WORLD
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    H, I = (64, 32) if args.quick or device.type == "cpu" else (4096, 1536)
    counter = _Bytes(rank, H)
    dist.all_to_all_single = counter
    results = open_results(args) if rank == 0 else None
    g = torch.Generator().manual_seed(rank)
    iters = 3 if args.quick else 20
    for name, trace in traces.items():
        T, L, k = trace.shape
        E = int(trace.max()) + 1
        E += (-E) % world
        placements = {"round-robin": moe.round_robin_placement(L, E, world)}
        solved = [moe.place_experts(trace, world, num_experts=E, time_limit=5 if args.quick else 30)
                  if rank == 0 else None]
        dist.broadcast_object_list(solved)
        placements["place_experts"] = solved[0].gpu_of
        mine = torch.arange(rank, T, world)  # token t starts on rank t % W
        n = mine.numel()
        x = torch.randn(n, H, generator=g).to(dtype).to(device)
        per = E // world
        gate_up = (torch.randn(per, 2 * I, H, generator=g) * H ** -0.5).to(dtype).to(device)
        down = (torch.randn(per, H, I, generator=g) * I ** -0.5).to(dtype).to(device)
        ids_all = trace.to(device)
        w_all = torch.full((T, k), 1.0 / k, device=device)
        act = torch.nn.functional.silu
        for pname, gpu_of in placements.items():
            disp = moe.MoEDispatcher(group, E, torch.as_tensor(gpu_of), max_tokens_per_rank=n + 1, hidden=H,
                                     dtype=dtype, num_layers=L)

            def two():
                h = x
                for layer in range(L):
                    res = disp.dispatch(h, ids_all[mine, layer], w_all[mine], layer=layer)
                    y = moe.grouped_expert_mlp(res.expert_x, res.expert_offsets, gate_up, down, act)
                    h = h + disp.combine(y, res.handle)
                return h

            def single():
                state = disp.start(x)
                for layer in range(L):
                    tid = state.token_ids
                    rows = (tid % disp.max_tokens) * world + torch.div(tid, disp.max_tokens, rounding_mode="floor")
                    state = disp.route(state, ids_all[rows, layer], w_all[rows], layer)
                    y = moe.grouped_expert_mlp(disp.expert_input(state), state.layout.expert_offsets, gate_up,
                                               down, act)
                    state = disp.finish_layer(state, y)
                return disp.return_home(state)

            pred = moe.exchange_rows(trace, gpu_of)
            stats = {}
            with torch.no_grad():
                a, b = two(), single()
                err = float((a.float() - b.float()).abs().max())
                if err > (1e-4 if dtype == torch.float32 else 5e-2) * (float(a.float().abs().max()) + 1e-6):
                    raise RuntimeError(f"single and two-all-to-all modes disagree: max error {err:.3e}")
                for mode, fn in (("two", two), ("single", single)):
                    counter.rows = 0
                    fn()
                    rows = counter.rows
                    if rows != int(pred[f"{mode}_by_gpu"][rank]):
                        raise RuntimeError(f"{mode}: rank {rank} sent {rows} rows, exchange_rows predicts "
                                           f"{int(pred[f'{mode}_by_gpu'][rank])}")
                    times = []
                    for _ in range(iters):
                        dist.barrier()
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        t0 = time.perf_counter()
                        fn()
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        times.append(time.perf_counter() - t0)
                    stats[mode] = (statistics.median(times) / L * 1e6, rows * H * x.element_size() / L)
            all_stats = [None] * world
            dist.all_gather_object(all_stats, stats)
            if rank == 0:
                elem = x.element_size()
                for mode in ("two", "single"):
                    t_layer = max(s[mode][0] for s in all_stats)
                    b_rank = [s[mode][1] for s in all_stats]
                    red = 1 - pred["single"] / pred["two"] if pred["two"] else 0.0
                    results.add(family="moe", op=f"ep_layer_{mode}", backend=device.type,
                                sizes=f"{name}: T={T} L={L} k={k} E={E} H={H} W={world} {pname}",
                                dtype=str(dtype).replace("torch.", ""), time_us=t_layer,
                                bytes_per_rank_per_layer=b_rank, rows_two=pred["two"], rows_single=pred["single"],
                                baseline="two all-to-alls" if mode == "single" else None,
                                reduction=red if mode == "single" else None,
                                target=">= 50% fewer bytes (affinity placement)" if mode == "single" and
                                pname == "place_experts" else None,
                                met=(red >= 0.5) if mode == "single" and pname == "place_experts" else None)
                two_b = sum(s["two"][1] for s in all_stats) / world
                one_b = sum(s["single"][1] for s in all_stats) / world
                print(f"  {name:28s} {pname:13s} W={world}: layer two {max(s['two'][0] for s in all_stats):8.1f} us"
                      f" / single {max(s['single'][0] for s in all_stats):8.1f} us; bytes/rank/layer two "
                      f"{two_b / 1e3:8.1f} kB, single {one_b / 1e3:8.1f} kB "
                      f"({100 * (1 - one_b / two_b) if two_b else 0:5.1f}% fewer; elem {elem} B)")


def _traces(args):
    from inferops.moe import synthetic_trace

    T = 256 if args.quick else 8192
    L, E = (3, 8) if args.quick else (8, 64)
    return {"recorded Qwen3-MoE (random)": recorded_trace(T),
            "synthetic top-1 affinity 0.9": synthetic_trace(T, L, E, k=1, affinity=0.9, seed=1),
            "synthetic top-2 affinity 0.9": synthetic_trace(T, L, E, k=2, affinity=0.9, seed=2)}


def _spawned(rank, world, port, args, traces):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        run(rank, world, args, torch.device("cpu"), traces)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--world", type=int, default=2, help="gloo processes to spawn (CPU)")
    args = p.parse_args(argv)
    traces = _traces(args)
    if "RANK" in os.environ:  # torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else \
            torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            run(dist.get_rank(), dist.get_world_size(), args, device, traces)
        finally:
            dist.destroy_process_group()
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.world, port, args, traces), nprocs=args.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
