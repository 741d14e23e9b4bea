"""inferops.tp: ColumnParallelLinear / RowParallelLinear.from_linear with both outputs and
token counts that are not multiples of W, and ``parallelize`` on tiny Llama, Mistral,
Qwen2 and Qwen3 models (random weights) on 2 and 4 gloo ranks: logits within float32
rounding of the unsharded model's (judged against a float64 copy of it), greedy tokens
identical; with and without sequence parallelism; sharded and replicated KV heads.
Bad input (unsupported family, heads that cannot be sharded, ranks that disagree)
raises on every rank. One spawned run per world size keeps process start-up cheap."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from inferops import tp
from inferops.testing import max_abs_error

from tests.distributed import run_distributed

pytest.importorskip("transformers")

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATOL_REL = 1e-5  # of max |logit|: fp32 accumulation-order headroom when the fp32 model is exact by chance


def _bound(err_single: float, ref_max: float) -> float:
    return 2 * err_single + ATOL_REL * ref_max + 1e-7


def _errors(rank, world, seed):
    """Everything in one process start: layers, models, bad input."""
    from tests.hf_tiny import float64_copy, tiny_model

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(seed)
    out = {"layers": {}, "models": {}, "bad": {}}
    # layers: T = 7 tokens (not a multiple of 2 or 4), fresh shapes
    lin = torch.nn.Linear(24, 20 * world, bias=True)
    x = torch.randn(7, 24, generator=g)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
        want = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        col = tp.ColumnParallelLinear.from_linear(lin, output="sharded")
        colr = tp.ColumnParallelLinear.from_linear(lin, output="replicated")
        per = 20
        out["layers"]["col_sharded"] = (col(x), want[:, rank * per:(rank + 1) * per])
        out["layers"]["col_replicated"] = (colr(x[None])[0], want)
        row_lin = torch.nn.Linear(8 * world, 12, bias=True)
        row_lin.weight.copy_(torch.randn(row_lin.weight.shape, generator=g))
        row_lin.bias.copy_(torch.randn(row_lin.bias.shape, generator=g))
        xr = torch.randn(3, 7, 8 * world, generator=g)  # 21 tokens
        want_r = torch.nn.functional.linear(xr.double(), row_lin.weight.double(), row_lin.bias.double())
        k = 8
        row_seq = tp.RowParallelLinear.from_linear(row_lin, output="sequence", max_tokens=32)
        row_rep = tp.RowParallelLinear.from_linear(row_lin, output="replicated", max_tokens=32)
        xs = xr[..., rank * k:(rank + 1) * k]
        out["layers"]["row_sequence"] = (row_seq(xs), tp.sequence_shard(want_r, dist.group.WORLD),
                                         tp.sequence_gather(row_seq(xs), 21).reshape(3, 7, 12), want_r)
        out["layers"]["row_replicated"] = (row_rep(xs), want_r)

    prompt = torch.randint(0, 128, (2, 5), generator=g)  # 10 tokens: padded at W = 4
    for fam in FAMILIES:
        base = tiny_model(fam, seed=seed)
        with torch.no_grad():
            ref64 = float64_copy(base)(prompt).logits
            ref32 = base(prompt).logits
            greedy = base.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
            for sp in ((True, False) if fam == "llama" else (True,)):
                model = tp.parallelize(copy.deepcopy(base), dist.group.WORLD, sequence_parallel=sp)
                got = model(prompt).logits
                tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                        max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
                out["models"][(fam, sp)] = {
                    "err": max_abs_error(got, ref64), "err_single": max_abs_error(ref32, ref64),
                    "ref_max": float(ref64.abs().max()), "shape_ok": got.shape == ref32.shape,
                    "tokens_equal": torch.equal(tokens, greedy), "plan": model.inferops_tp}

    def catch(name, fn):
        try:
            fn()
            out["bad"][name] = None
        except Exception as e:  # noqa: BLE001  (the test checks type and message)
            out["bad"][name] = (type(e).__name__, str(e))

    catch("unsupported", lambda: tp.parallelize(tiny_model("gpt2"), dist.group.WORLD))
    catch("disagree", lambda: tp.parallelize(tiny_model("llama", intermediate_size=96 + 32 * rank),
                                             dist.group.WORLD))
    if world == 2:
        catch("heads", lambda: tp.parallelize(tiny_model("llama", hidden_size=48, num_attention_heads=3,
                                                         num_key_value_heads=3), dist.group.WORLD))
    else:
        catch("kv_heads", lambda: tp.parallelize(tiny_model("llama", hidden_size=96, num_attention_heads=12,
                                                            num_key_value_heads=3), dist.group.WORLD))
    twice = tp.parallelize(tiny_model("llama"), dist.group.WORLD)
    catch("twice", lambda: tp.parallelize(twice, dist.group.WORLD))
    # the group still works after every refusal (nobody left waiting in a collective)
    probe = torch.ones(1)
    dist.all_reduce(probe)
    out["alive"] = float(probe)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_parallelize_llama_family_matches_unsharded(world, gen):
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    res = run_distributed(_errors, world, args=(seed,), timeout_s=300)
    for rank, r in enumerate(res):
        L = r["layers"]
        got, want = L["col_sharded"]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        got, want = L["col_replicated"]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        got, want, gathered, want_full = L["row_sequence"]
        n = -(-21 // world)  # ceil(21 / W) rows per rank; rows past token 21 are padding (bias only)
        valid = max(0, min(n, 21 - rank * n))
        assert got.shape == (n, 12)
        torch.testing.assert_close(got[:valid].double(), want[:valid], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gathered.double(), want_full, rtol=1e-5, atol=1e-5)
        got, want = L["row_replicated"]
        assert got.shape == (3, 7, 12)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        for (fam, sp), m in r["models"].items():
            what = f"rank {rank} {fam} sequence_parallel={sp}"
            assert m["shape_ok"], what
            bound = _bound(m["err_single"], m["ref_max"])
            assert m["err"] <= bound, f"{what}: logit error {m['err']:.3e} > {bound:.3e}"
            assert m["tokens_equal"], f"{what}: greedy tokens differ from the unsharded model's"
            plan = m["plan"]
            assert plan["world"] == world and plan["q_heads"] == (rank * 4 // world, 4 // world)
        kv = {fam: r["models"][(fam, True)]["plan"]["kv_mode"] for fam in FAMILIES}
        # llama/qwen3: 2 KV heads (sharded at W = 2, replicated at W = 4); mistral 1 (replicated);
        # qwen2 4 (sharded)
        assert kv == {"llama": "sharded" if world == 2 else "replicated", "mistral": "replicated",
                      "qwen2": "sharded", "qwen3": "sharded" if world == 2 else "replicated"}
        bad = r["bad"]
        assert bad["unsupported"][0] == "TypeError" and "GPT2LMHeadModel" in bad["unsupported"][1]
        assert bad["disagree"][0] == "ValueError" and "intermediate_size" in bad["disagree"][1]
        assert "rank 0 96" in bad["disagree"][1] and "rank 1 128" in bad["disagree"][1]
        if world == 2:
            assert bad["heads"] == ("ValueError", "expected num_attention_heads (3) divisible by the world size (2) "
                                                  "to shard the attention heads")
        else:
            assert bad["kv_heads"][0] == "ValueError" and "num_key_value_heads (3)" in bad["kv_heads"][1]
        assert bad["twice"][0] == "ValueError" and "already sharded" in bad["twice"][1]
        assert r["alive"] == world


def test_head_plan_single_process():
    assert tp.head_plan(8, 8, 4, 1) == {"q": (2, 2), "kv": (2, 2), "kv_mode": "sharded"}
    assert tp.head_plan(8, 2, 4, 3) == {"q": (6, 2), "kv": (1, 1), "kv_mode": "replicated"}
    assert tp.head_plan(16, 2, 8, 5) == {"q": (10, 2), "kv": (1, 1), "kv_mode": "replicated"}
    with pytest.raises(ValueError, match="num_key_value_heads \\(3\\) to be a multiple or a divisor"):
        tp.head_plan(12, 3, 4, 0)
    with pytest.raises(ValueError, match="num_attention_heads \\(6\\) divisible by the world size \\(4\\)"):
        tp.head_plan(6, 2, 4, 0)


def test_layers_validate_arguments():
    lin = torch.nn.Linear(8, 6)
    with pytest.raises(ValueError, match="expected `output` in"):
        tp.ColumnParallelLinear.from_linear(lin, output="sequence")
    with pytest.raises(ValueError, match="expected `output` in"):
        tp.RowParallelLinear.from_linear(lin, output="sharded")
    with pytest.raises(TypeError, match="expected an nn.Linear for `linear`, got Conv1d"):
        tp.RowParallelLinear.from_linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="`out_slice` within \\[0, 6\\]"):
        tp.ColumnParallelLinear.from_linear(lin, out_slice=(4, 8))
    layer = tp.RowParallelLinear.from_linear(lin)  # one rank, no process group: plain linear
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), lin(x).detach())
    with pytest.raises(ValueError, match="expected `x` \\[..., 8\\]"):
        layer(torch.randn(5, 7))
