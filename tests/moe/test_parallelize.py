"""inferops.moe.parallelize on tiny Qwen3-MoE (top-2 and top-1) and Mixtral models with
random weights, 2 and 4 gloo ranks, each rank serving its own prompts: logits within
float32 rounding of the single-process model's (judged against a float64 copy), greedy
tokens identical to the model's own ``generate``, in both modes, with round-robin and
affinity placements (``RoutingRecorder`` trace of the real model -> ``place_experts``);
the hidden-state rows each rank sends (counted by wrapping ``all_to_all_single``) equal
``exchange_rows``' prediction. Bad input raises on every rank. One spawned run per world
size; grouped GEMM checked on one process."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from inferops import moe
from inferops.testing import max_abs_error

from tests.distributed import run_distributed

pytest.importorskip("transformers")

ATOL_REL = 1e-5  # of max |logit|


class _RowCounter:
    """Counts rows of hidden states this rank sends to other ranks through all_to_all_single."""

    def __init__(self, rank, world, hidden):
        self.rank, self.world, self.hidden, self.rows = rank, world, hidden, 0
        self._orig = dist.all_to_all_single

    def __call__(self, output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if input.is_floating_point() and input.dim() == 2 and input.shape[1] == self.hidden:
            splits = input_split_sizes or [input.shape[0] // self.world] * self.world
            self.rows += sum(splits) - splits[self.rank]
        return self._orig(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def _run(rank, world, seed):
    from tests.hf_tiny import float64_copy, tiny_model

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    counter = _RowCounter(rank, world, 64)
    dist.all_to_all_single = counter
    out = {"models": {}, "bad": {}}
    cases = [("qwen3_moe", {}), ("mixtral", {})] + ([("qwen3_moe", {"num_experts_per_tok": 1})] if world == 2 else [])
    for fam, over in cases:
        name = fam + ("_top1" if over else "")
        base = tiny_model(fam, seed=seed, **over)
        prompts = torch.randint(0, 128, (world, 2, 5), generator=g)  # every rank its own 2 prompts
        mine = prompts[rank]
        k = base.config.num_experts_per_tok
        with torch.no_grad():
            ref64 = float64_copy(base)(mine).logits
            with moe.RoutingRecorder(moe.moe_gates(base), k=k) as rec:
                ref32 = base(mine).logits
            greedy = base.generate(mine, attention_mask=torch.ones_like(mine),
                                   max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        traces = [None] * world
        dist.all_gather_object(traces, rec.trace())
        # token i of rank r is token i * W + r of the global trace: exchange_rows' home t % W
        trace = torch.stack(traces, 1).reshape(-1, *traces[0].shape[1:])
        affinity = [None]
        if rank == 0:  # one solve, broadcast: a time-limited solver may differ between processes
            affinity[0] = moe.place_experts(trace, world, num_experts=8, time_limit=5)
        dist.broadcast_object_list(affinity)
        for pname, placement in (("round_robin", None), ("affinity", affinity[0])):
            gpu_of = moe.round_robin_placement(trace.shape[1], 8, world) if placement is None else placement.gpu_of
            predicted = moe.exchange_rows(trace, gpu_of)
            for mode in ("two", "single"):
                par = moe.parallelize(copy.deepcopy(base), dist.group.WORLD, placement, mode=mode)
                with torch.no_grad():
                    counter.rows = 0
                    got = par(mine).logits if mode == "two" else par(mine)
                    sent = counter.rows
                    if mode == "two":
                        tokens = par.generate(mine, attention_mask=torch.ones_like(mine),
                                              max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                              pad_token_id=0)
                    else:
                        tokens = par.generate_greedy(mine, 4)
                local = (par.model if mode == "single" else par).model.layers[0].mlp.experts.gate_up_proj.shape[0]
                out["models"][(name, pname, mode)] = {
                    "err": max_abs_error(got, ref64), "err_single": max_abs_error(ref32, ref64),
                    "ref_max": float(ref64.abs().max()), "tokens_equal": torch.equal(tokens, greedy),
                    "tokens": (tokens.tolist(), greedy.tolist()),
                    "sent": sent, "predicted": int(predicted[f"{mode}_by_gpu"][rank]),
                    "partial": predicted["single_partial"], "local_experts": local}

    if world == 2:  # single mode with ranks of different batch and length (rank 1: 1 x 3 tokens)
        base = tiny_model("mixtral", seed=seed + 1)
        mine = torch.randint(0, 128, (2, 5) if rank == 0 else (1, 3), generator=g)
        with torch.no_grad():
            ref64 = float64_copy(base)(mine).logits
            ref32 = base(mine).logits
            greedy = base.generate(mine, attention_mask=torch.ones_like(mine),
                                   max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
            par = moe.parallelize(copy.deepcopy(base), dist.group.WORLD, mode="single")
            got = par(mine)
            tokens = par.generate_greedy(mine, 4)
        out["models"][("mixtral_uneven", "round_robin", "single")] = {
            "err": max_abs_error(got, ref64), "err_single": max_abs_error(ref32, ref64),
            "ref_max": float(ref64.abs().max()), "tokens_equal": torch.equal(tokens, greedy),
            "tokens": (tokens.tolist(), greedy.tolist()), "sent": None, "predicted": None, "partial": None,
            "local_experts": par.model.model.layers[0].mlp.experts.gate_up_proj.shape[0]}

    def catch(name, fn):
        try:
            fn()
            out["bad"][name] = None
        except Exception as e:  # noqa: BLE001  (the test checks type and message)
            out["bad"][name] = (type(e).__name__, str(e))

    catch("unsupported", lambda: moe.parallelize(tiny_model("llama"), dist.group.WORLD))
    catch("shape", lambda: moe.parallelize(tiny_model("mixtral"), dist.group.WORLD,
                                           np.zeros((3, 8), dtype=np.int64)))
    rr = moe.round_robin_placement(2, 8, world)
    catch("disagree", lambda: moe.parallelize(tiny_model("mixtral"), dist.group.WORLD, (rr + rank) % world))
    unbalanced = rr.copy()
    unbalanced[1, :2] = 0
    catch("unbalanced", lambda: moe.parallelize(tiny_model("mixtral"), dist.group.WORLD, unbalanced))
    catch("experts", lambda: moe.parallelize(tiny_model("mixtral", num_local_experts=2 * world - 1),
                                             dist.group.WORLD))
    catch("mode", lambda: moe.parallelize(tiny_model("mixtral"), dist.group.WORLD, mode="three"))
    twice = moe.parallelize(tiny_model("mixtral"), dist.group.WORLD, mode="two")
    catch("twice", lambda: moe.parallelize(twice, dist.group.WORLD, mode="two"))
    probe = torch.ones(1)
    dist.all_reduce(probe)
    out["alive"] = float(probe)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_moe_parallelize_matches_single_process(world, gen):
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    res = run_distributed(_run, world, args=(seed,), timeout_s=400)
    for rank, r in enumerate(res):
        assert len(r["models"]) == (13 if world == 2 else 8)
        for (name, pname, mode), m in r["models"].items():
            what = f"rank {rank} {name} {pname} mode={mode}"
            bound = 2 * m["err_single"] + ATOL_REL * m["ref_max"] + 1e-7
            assert m["err"] <= bound, f"{what}: logit error {m['err']:.3e} > {bound:.3e}"
            assert m["tokens_equal"], f"{what}: greedy tokens differ from the model's own generate: {m['tokens']}"
            if name != "mixtral_uneven":  # exchange_rows assumes equal token counts per rank
                assert m["sent"] == m["predicted"], \
                    f"{what}: sent {m['sent']} rows, exchange_rows says {m['predicted']}"
            assert m["local_experts"] == 8 // world, what
            if name.endswith("top1"):
                assert m["partial"] == 0  # top-1: one exchange per layer in single mode
        bad = r["bad"]
        assert bad["unsupported"][0] == "TypeError" and "LlamaForCausalLM" in bad["unsupported"][1]
        assert bad["shape"] == ("ValueError", "expected a placement of shape [2, 8] (the model's MoE layers, "
                                              "experts), got [3, 8]")
        assert bad["disagree"][0] == "ValueError" and "placement" in bad["disagree"][1]
        assert bad["unbalanced"][0] == "ValueError"
        assert f"expected {8 // world} experts per rank" in bad["unbalanced"][1]
        assert bad["experts"] == ("ValueError", f"expected the model's experts ({2 * world - 1}) to be a multiple "
                                                f"of the world size ({world})")
        assert bad["mode"][0] == "ValueError" and "'three'" in bad["mode"][1]
        assert bad["twice"][0] == "ValueError" and "already sharded" in bad["twice"][1]
        assert r["alive"] == world
    # the ranks together sent what exchange_rows predicts in total
    for key in res[0]["models"]:
        if key[0] == "mixtral_uneven":
            continue
        assert sum(r["models"][key]["sent"] for r in res) == sum(r["models"][key]["predicted"] for r in res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_expert_mlp_equals_loop(dtype, gen):
    G, H, I = 3, 24, 16
    counts = [5, 0, 9]  # an empty expert in the middle
    offsets = torch.tensor([0, 5, 5, 14], dtype=torch.int32)
    x = torch.randn(16, H, generator=gen).to(dtype)  # 2 capacity-padding rows past offsets[-1]
    x[14:] = 0
    gate_up = torch.randn(G, 2 * I, H, generator=gen).to(dtype)
    down = torch.randn(G, H, I, generator=gen).to(dtype)
    act = torch.nn.functional.silu
    got = moe.grouped_expert_mlp(x, offsets, gate_up, down, act)
    want = torch.zeros(16, H, dtype=torch.float64)
    lo = 0
    for e, c in enumerate(counts):
        xe = x[lo:lo + c].double()
        gu = xe @ gate_up[e].double().t()
        want[lo:lo + c] = (act(gu[:, :I]) * gu[:, I:]) @ down[e].double().t()
        lo += c
    # the same computation rounded as the loop in the input dtype would be, against float64
    loop = torch.zeros(16, H, dtype=dtype)
    lo = 0
    for e, c in enumerate(counts):
        gu = x[lo:lo + c] @ gate_up[e].t()
        loop[lo:lo + c] = (act(gu[:, :I]) * gu[:, I:]) @ down[e].t()
        lo += c
    assert got.dtype == dtype and got.shape == (16, H)
    assert torch.equal(got[14:], torch.zeros(2, H, dtype=dtype))
    bound = 2 * max_abs_error(loop, want) + 1e-5 * float(want.abs().max())
    assert max_abs_error(got, want) <= bound


def test_grouped_matmul_validates():
    w = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="expected `x` of shape \\[rows, 8\\]"):
        moe.grouped_matmul(torch.randn(3, 7), torch.tensor([0, 1, 3]), w)
    with pytest.raises(ValueError, match="expected `offsets` with 3 entries"):
        moe.grouped_matmul(torch.randn(3, 8), torch.tensor([0, 3]), w)
    assert moe.grouped_matmul(torch.randn(0, 8), torch.tensor([0, 0, 0]), w).shape == (0, 4)
