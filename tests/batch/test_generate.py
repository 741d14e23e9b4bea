"""inferops.batch.generate against Hugging Face's own generate/forward on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inferops.attention import PrefixPlan
from inferops.batch import generate

from .models import FAMILIES, tiny_model, workload


def hf_greedy(model, prompt, max_new_tokens, **kw):
    out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_new_tokens,
                         do_sample=False, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hugging_face_exactly(family, gen):
    model = tiny_model(family)
    prompts = workload(gen)
    res = generate(model, prompts, 5, page_size=4)
    assert res.stats["groups"] >= 2 and res.stats["prefill_tokens"] < res.stats["prefill_tokens_without_sharing"]
    for i, p in enumerate(prompts):
        assert res.tokens[i] == hf_greedy(model, p, 5), f"prompt {i}"
    assert model.config._attn_implementation != "inferops_paged"  # restored


@pytest.mark.parametrize("page_size", [1, 16])
def test_sharing_off_and_page_sizes_give_the_same_tokens(page_size, gen):
    model = tiny_model("llama", seed=1)
    prompts = workload(gen, page_size=4)
    shared = generate(model, prompts, 4, page_size=page_size)
    plain = generate(model, prompts, 4, page_size=page_size, sharing=False)
    assert shared.tokens == plain.tokens
    assert plain.stats["groups"] == 0
    assert plain.stats["prefill_tokens"] == plain.stats["prefill_tokens_without_sharing"]
    assert plain.stats["kv_bytes_read"] == plain.stats["kv_bytes_read_without_sharing"]
    for i in (0, 4, 6):
        assert shared.tokens[i] == hf_greedy(model, prompts[i], 4)
    # prefill in many small packed passes (a prompt longer than the chunk runs alone)
    assert generate(model, prompts, 4, page_size=page_size, prefill_chunk_tokens=5).tokens == shared.tokens
    one = generate(model, prompts, 1, page_size=page_size)
    assert one.tokens == [t[:1] for t in shared.tokens] and one.stats["decode_steps"] == 0


def test_stats_are_exact(gen):
    """Prefill tokens and KV bytes recomputed from an independently built plan."""
    model = tiny_model("llama", seed=2)
    prompts = workload(gen)
    M, ps = 4, 4
    res = generate(model, prompts, M, page_size=ps, eos_token_id=[])
    plan = PrefixPlan.build(prompts, ps, decode_lens=[M - 1] * len(prompts))
    firsts = plan.group_indptr[:-1]
    shared_once = int(plan.shared_len[firsts].sum())
    L = plan.prompt_len.astype(np.int64)
    S = plan.shared_len.astype(np.int64)
    assert res.stats["prefill_tokens"] == shared_once + int((L - S).sum())
    assert res.stats["prefill_tokens_without_sharing"] == int(L.sum())
    per_tok = 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x head_dim x float32
    assert res.stats["kv_bytes_per_token"] == per_tok
    steps = range(1, M)  # decode steps: the token at position L + t - 1 reads L + t keys
    assert res.stats["kv_bytes_read_without_sharing"] == per_tok * sum(int((L + t).sum()) for t in steps)
    assert res.stats["kv_bytes_read"] == per_tok * sum(shared_once + int((L - S + t).sum()) for t in steps)
    assert res.stats["decode_steps"] == M - 1 and res.stats["generated_tokens"] == M * len(prompts)
    assert res.stats["pages_used"] == plan.num_shared_pages + int(((L - S + M - 1 + ps - 1) // ps).sum())


def test_stop_tokens_finish_requests_early(gen):
    model = tiny_model("qwen3", seed=3)
    prompts = workload(gen)
    free = generate(model, prompts, 6, page_size=4, eos_token_id=[])
    stop = free.tokens[0][2]  # the third token of prompt 0 becomes a stop token
    res = generate(model, prompts, 6, page_size=4, eos_token_id=stop)
    for i, p in enumerate(prompts):
        full = free.tokens[i]
        expect = full[:full.index(stop) + 1] if stop in full else full
        assert res.tokens[i] == expect
        assert res.tokens[i] == hf_greedy(model, p, 6, eos_token_id=stop)
    assert res.stats["kv_bytes_read"] < free.stats["kv_bytes_read"]  # finished rows read nothing
    more = generate(model, prompts, 6, page_size=4, eos_token_id=[], stop_token_ids=[stop])
    assert more.tokens == res.tokens


def test_bf16_logits_within_bf16_tolerance_of_hugging_face(gen):
    """Teacher-forced on our tokens: |ours - fp32| <= 2 |HF bf16 - fp32| + atol, per prompt."""
    model = tiny_model("llama", seed=4, dtype=torch.bfloat16)
    ref_model = tiny_model("llama", seed=4, dtype=torch.bfloat16).float()  # the same bf16 weights
    prompts = workload(gen)
    res = generate(model, prompts, 4, page_size=4, output_logits=True, eos_token_id=[])
    for i, p in enumerate(prompts):
        seq = torch.tensor([p + res.tokens[i][:-1]])
        with torch.no_grad():
            ref = ref_model(seq).logits[0, len(p) - 1:].float()
            hf = model(seq).logits[0, len(p) - 1:].float()
        ours = res.logits[i]
        assert ours.shape == ref.shape
        bound = 2 * (hf - ref).abs().max() + 2e-2
        assert (ours - ref).abs().max() <= bound, f"prompt {i}"


def test_sampling_is_seeded_and_top_k_1_is_greedy(gen):
    model = tiny_model("mistral", seed=5)
    prompts = workload(gen)
    a = generate(model, prompts, 4, page_size=4, do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    b = generate(model, prompts, 4, page_size=4, do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    assert a.tokens == b.tokens
    greedy = generate(model, prompts, 4, page_size=4)
    k1 = generate(model, prompts, 4, page_size=4, do_sample=True, top_k=1, seed=3)
    assert k1.tokens == greedy.tokens
    # a tiny nucleus keeps only the most likely token
    p0 = generate(model, prompts, 4, page_size=4, do_sample=True, top_p=1e-6, seed=3)
    assert p0.tokens == greedy.tokens


def test_tokenizer_strings_and_progress(gen, capsys):
    model = tiny_model("llama", seed=6)

    def tokenizer(text):
        return {"input_ids": [3 + (ord(c) % 100) for c in text]}

    texts = ["You are helpful. Say hi", "You are helpful. Say bye", "other"]
    res = generate(model, texts, 3, tokenizer=tokenizer, page_size=4, progress=True)
    for t, toks in zip(texts, res.tokens):
        assert toks == hf_greedy(model, tokenizer(t)["input_ids"], 3)
    assert "decode" in capsys.readouterr().err


def test_cache_budget(gen):
    model = tiny_model("llama", seed=7)
    prompts = workload(gen)
    need = generate(model, prompts, 3, page_size=4).stats["pages_used"]
    assert generate(model, prompts, 3, page_size=4, num_pages=need).stats["pages_used"] == need
    with pytest.raises(ValueError, match=rf"needs {need} KV pages .* `num_pages` is {need - 1}"):
        generate(model, prompts, 3, page_size=4, num_pages=need - 1)


class _Calls:
    def __init__(self, model):
        self.n = 0
        model.register_forward_pre_hook(self)

    def __call__(self, *a):
        self.n += 1


@pytest.mark.parametrize("bad,exc,pattern", [
    (dict(prompts=[]), ValueError, r"at least one prompt in `prompts`"),
    (dict(prompts=[[1, 2], []]), ValueError, r"non-empty prompt, got an empty one at prompts\[1\]"),
    (dict(prompts=[[1] * 127]), ValueError, r"prompts\[0\] has 127 tokens: .*needs 129 positions.*max_position_embeddings=128"),
    (dict(prompts=[[1, 200]]), ValueError, r"token id 200, out of range \[0, 128\)"),
    (dict(max_new_tokens=0), ValueError, r"int >= 1 for `max_new_tokens`, got 0"),
    (dict(num_pages=1), ValueError, r"`num_pages` is 1"),
    (dict(prompts=["text"]), TypeError, r"pass `tokenizer=`"),
    (dict(do_sample=True, temperature=0.0), ValueError, r"`temperature` > 0"),
])
def test_bad_input_raises_before_any_work(bad, exc, pattern):
    model = tiny_model("llama")
    calls = _Calls(model)
    args = dict(prompts=[[5, 6, 7], [5, 6, 8]], max_new_tokens=3)
    args.update(bad)
    with pytest.raises(exc, match=pattern):
        generate(model, args.pop("prompts"), args.pop("max_new_tokens"), **args)
    assert calls.n == 0
    assert model.config._attn_implementation != "inferops_paged"


def test_model_without_attention_interface_is_rejected():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
    model = transformers.BloomForCausalLM(cfg).eval()
    with pytest.raises(TypeError, match="BloomForCausalLM: its attention does not go through"):
        generate(model, [[1, 2, 3]], 2)
    with pytest.raises(TypeError, match="expected a Hugging Face transformers causal LM for `model`, got Linear"):
        generate(torch.nn.Linear(2, 2), [[1, 2, 3]], 2)


@pytest.mark.gpu
def test_kernels_logits_within_tolerance(gen, kernel_device):
    """The same batch through the CUDA kernels (on a GPU, or the CPU SIMT executor):
    prefill via paged_decode multi-token queries, decode via prefix_shared_decode; bf16
    logits teacher-forced against the model in fp32, with HF's own bf16 error as the yardstick."""
    model = tiny_model("llama", seed=8, dtype=torch.bfloat16, device=kernel_device, head_dim=64,
                       num_hidden_layers=1)
    ref_model = tiny_model("llama", seed=8, dtype=torch.bfloat16, head_dim=64, num_hidden_layers=1).float()
    prompts = workload(gen)[:4] + workload(gen)[6:7]
    res = generate(model, prompts, 2, page_size=4, output_logits=True, eos_token_id=[])
    assert res.stats["groups"] >= 1
    for i, p in enumerate(prompts):
        seq = torch.tensor([p + res.tokens[i][:-1]])
        with torch.no_grad():
            ref = ref_model(seq).logits[0, len(p) - 1:].float()
            hf = ref_model.bfloat16()(seq).logits[0, len(p) - 1:].float()
            ref_model.float()
        bound = 2 * (hf - ref).abs().max() + 2e-2
        assert (res.logits[i] - ref).abs().max() <= bound, f"prompt {i}"


def test_longest_prompt_that_fits():
    """126 prompt tokens + 3 new = positions 0..127: fits max_position_embeddings 128, as in HF."""
    model = tiny_model("llama", seed=9)
    p = torch.randint(3, 128, (126,)).tolist()
    assert generate(model, [p], 3).tokens[0] == hf_greedy(model, p, 3)


def test_attention_function_outside_the_engine_and_sliding_window():
    model = tiny_model("mistral", sliding_window=8)
    with pytest.raises(NotImplementedError, match="sliding-window attention \\(window 8\\)"):
        generate(model, [[5] * 10], 2)
    assert generate(model, [[5, 6, 7]], 2).tokens[0] == hf_greedy(model, [5, 6, 7], 2)  # inside the window
    from inferops.batch.hf import register

    model.set_attn_implementation(register())
    with pytest.raises(RuntimeError, match="runs only inside inferops.batch.generate"):
        model(torch.tensor([[1, 2, 3]]))


def _rows_case(gen, device):
    from inferops.attention import PagedKVCache

    ps = 4
    prompts = workload(gen, page_size=ps)
    plan = PrefixPlan.build(prompts, ps, decode_lens=[2] * len(prompts))
    cache = PagedKVCache(64, ps, 2, 64, torch.bfloat16, device)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen).bfloat16())
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen).bfloat16())
    layout = plan.materialize(cache)
    return plan, cache, layout


def _check_rows(gen, device):
    """prefix_shared_decode over the layout restricted to some rows (what the engine does
    when requests finish) equals paged_decode over those rows' block tables."""
    from inferops.attention import paged_decode, prefix_shared_decode
    from inferops.attention.paged import LSE_TOLERANCE
    from inferops.batch.engine import _select_rows
    from inferops.testing import assert_close

    plan, cache, layout = _rows_case(gen, device)
    n = plan.num_requests
    for rows in (np.arange(n), np.asarray([0, 2, n - 1]), np.asarray([1]), np.arange(1, n, 2)):
        sub = _select_rows(layout, rows)
        lens = layout.seq_lens.index_select(0, torch.from_numpy(rows).to(device)) + 1
        q = torch.randn(rows.size, 4, 64, generator=gen).to(device, torch.bfloat16)
        out, lse = prefix_shared_decode(q, cache.k, cache.v, sub, seq_lens=lens)
        eo, el = paged_decode(q, cache.k, cache.v, sub.block_tables, lens)
        assert_close(out, eo.float(), torch.bfloat16, name=f"rows {rows.tolist()}")
        assert_close(lse, el, LSE_TOLERANCE, name=f"lse, rows {rows.tolist()}")


def test_select_rows_reference(gen):
    _check_rows(gen, "cpu")


@pytest.mark.gpu
def test_select_rows_kernels(gen, kernel_device):
    _check_rows(gen, kernel_device)
