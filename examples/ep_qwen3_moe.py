"""Expert-parallel Qwen3-MoE (or Mixtral) with inferops.moe (ExFlow).

GPUs (NCCL):   torchrun --nproc-per-node 4 examples/ep_qwen3_moe.py [--model NAME] [--mode two]
CPU (gloo):    python examples/ep_qwen3_moe.py --cpu --world 2      (tiny random model, no download)

Each rank serves its own prompts. A routing trace is recorded from the real model on
calibration prompts, experts are placed by affinity (solved on rank 0, broadcast), and
the model runs in ExFlow's single-all-to-all mode (or the two-all-to-all baseline).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def tiny_qwen3_moe():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=128, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=32, initializer_range=0.1)
    torch.manual_seed(0)  # the same weights on every rank
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: decode the full length, never stop early
    return model


def main(rank: int, world: int, args) -> None:
    import inferops.moe as moe

    if args.cpu:
        model, device = tiny_qwen3_moe(), torch.device("cpu")
    else:
        from transformers import AutoModelForCausalLM

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(device).eval()
    vocab, k = model.config.vocab_size, model.config.num_experts_per_tok
    g = torch.Generator().manual_seed(100 + rank)
    prompts = torch.randint(0, vocab, (2, 6), generator=g).to(device)  # this rank's own requests
    reference = copy.deepcopy(model) if args.check else None
    if reference is not None:  # generate_greedy is a plain argmax loop: no EOS stop or suppression
        reference.generation_config.eos_token_id = None

    # 1. record the model's own routing on calibration prompts, 2. place experts by affinity
    with torch.no_grad(), moe.RoutingRecorder(moe.moe_gates(model), k=k) as rec:
        model(torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(7)).to(device))
    placement = [moe.place_experts(rec.trace(), world, time_limit=5) if rank == 0 else None]
    dist.broadcast_object_list(placement)

    # 3. the whole integration
    ep = moe.parallelize(model, dist.group.WORLD, placement[0], mode=args.mode)
    with torch.no_grad():
        if args.mode == "single":
            tokens = ep.generate_greedy(prompts, 8)
        else:
            tokens = ep.generate(prompts, attention_mask=torch.ones_like(prompts),
                                 max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"rank {rank}: placement {placement[0].method}, tokens {tokens.tolist()}")
    if reference is not None:
        with torch.no_grad():
            want = reference.generate(prompts, attention_mask=torch.ones_like(prompts),
                                      max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        print(f"rank {rank}: same greedy tokens as the single-process model: {torch.equal(tokens, want)}")


def _spawned(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        main(rank, world, args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="gloo processes on the CPU with a tiny random model")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--model", default="Qwen/Qwen3-30B-A3B")
    p.add_argument("--mode", choices=("single", "two"), default="single")
    p.add_argument("--check", action="store_true", help="compare with the single-process model")
    a = p.parse_args()
    if a.cpu:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(a.world, port, a), nprocs=a.world)
    else:
        dist.init_process_group("nccl")
        try:
            main(dist.get_rank(), dist.get_world_size(), a)
        finally:
            dist.destroy_process_group()
