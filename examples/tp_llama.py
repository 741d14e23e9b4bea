"""Tensor-parallel Llama-family model with inferops.tp (T3 fused GEMM + reduce-scatter).

GPUs (NCCL):   torchrun --nproc-per-node 4 examples/tp_llama.py [--model PATH_OR_NAME]
CPU (gloo):    python examples/tp_llama.py --cpu --world 2     (tiny random Llama, no download)

Every rank loads the full model, shards it in place and runs the same prompts; rank 0
prints the tokens and, with --check, compares with the unsharded model.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, initializer_range=0.1)
    torch.manual_seed(0)  # the same weights on every rank
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: decode the full length, never stop early
    return model


def main(rank: int, world: int, args) -> None:
    import inferops

    if args.cpu:
        model, device = tiny_llama(), torch.device("cpu")
    else:
        from transformers import AutoModelForCausalLM

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)
    reference = copy.deepcopy(model) if args.check else None

    inferops.tp.parallelize(model, dist.group.WORLD)  # <- the whole integration
    with torch.no_grad():
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)

    if rank == 0:
        print("plan:", model.inferops_tp)
        print("tokens:", tokens.tolist())
    if reference is not None:
        with torch.no_grad():
            want = reference.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        if rank == 0:
            print("same greedy tokens as the unsharded model:", torch.equal(tokens, want))


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
    p.add_argument("--model", default="meta-llama/Llama-3.2-1B")
    p.add_argument("--check", action="store_true", help="compare with the unsharded model")
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
