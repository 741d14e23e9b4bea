"""model.generate() itself on inferops' paged cache (PagedCache + the "inferops_paged" attention)."""

from __future__ import annotations

import pytest
import torch

from inferops.batch.hf import register
from inferops.batch.hf_cache import PagedCache

from .models import tiny_model, workload
from .test_generate import hf_greedy


def _padded(prompts, device="cpu"):
    W = max(map(len, prompts))
    ids = torch.zeros(len(prompts), W, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, W - len(p):] = torch.tensor(p)
        mask[i, W - len(p):] = 1
    return ids.to(device), mask.to(device), W


def _paged_generate(model, prompts, new, page_size=4, **kw):
    ids, mask, W = _padded(prompts, model.device)
    previous = model.config._attn_implementation
    model.set_attn_implementation(register())
    try:
        cache = PagedCache(model, batch_size=len(prompts), max_cache_len=W + new, page_size=page_size)
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, pad_token_id=0, **kw)
    finally:
        model.set_attn_implementation(previous)
    return out, W


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_generate_with_paged_cache_matches_unpadded_greedy(family, gen):
    model = tiny_model(family, seed=12)
    prompts = workload(gen)
    out, W = _paged_generate(model, prompts, 5, do_sample=False)
    for i, p in enumerate(prompts):
        ref = hf_greedy(model, p, 5)
        assert out[i, W:W + len(ref)].tolist() == ref, f"prompt {i}"


def test_no_padding_and_errors(gen):
    model = tiny_model("llama", seed=13)
    p = torch.randint(3, 128, (9,), generator=gen).tolist()
    model.set_attn_implementation(register())
    try:
        cache = PagedCache(model, batch_size=1, max_cache_len=12)
        out = model.generate(torch.tensor([p]), cache=cache, max_new_tokens=3, do_sample=False)
        with pytest.raises(ValueError, match="built for batch_size 1, the model got 2 rows"):
            model.generate(torch.tensor([p, p]), cache=PagedCache(model, batch_size=1, max_cache_len=12),
                           max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match=r"holds 8 tokens per row \(max_cache_len\), a row needs 9"):
            model.generate(torch.tensor([p]), cache=PagedCache(model, batch_size=1, max_cache_len=8),
                           max_new_tokens=3, do_sample=False)  # the 9-token prompt itself does not fit
        with pytest.raises(RuntimeError, match="needs a paged KV cache"):  # a DynamicCache: no pages
            model.generate(torch.tensor([p]), max_new_tokens=2, do_sample=False)
        with pytest.raises(ValueError, match="int >= 1 for `max_cache_len`"):
            PagedCache(model, batch_size=1, max_cache_len=0)
    finally:
        model.set_attn_implementation("sdpa")
    assert out[0, len(p):].tolist() == hf_greedy(model, p, 3)


@pytest.mark.gpu
def test_generate_with_paged_cache_kernels(gen, kernel_device):
    """bf16 through the kernels (GPU, or the CPU SIMT executor): each step's logits,
    teacher-forced on our tokens, within 2 |HF bf16 - fp32| + atol of the fp32 model."""
    model = tiny_model("llama", seed=14, dtype=torch.bfloat16, device=kernel_device, head_dim=64,
                       num_hidden_layers=1)
    ref_model = tiny_model("llama", seed=14, dtype=torch.bfloat16, head_dim=64, num_hidden_layers=1).float()
    prompts = workload(gen)[:3]
    out, W = _paged_generate(model, prompts, 2, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1).float().cpu()  # [B, steps, vocab]
    for i, p in enumerate(prompts):
        toks = out.sequences[i, W:].tolist()
        seq = torch.tensor([p + toks[:-1]])
        with torch.no_grad():
            ref = ref_model(seq).logits[0, len(p) - 1:].float()
            hf = ref_model.bfloat16()(seq).logits[0, len(p) - 1:].float()
            ref_model.float()
        assert (logits[i] - ref).abs().max() <= 2 * (hf - ref).abs().max() + 2e-2, f"prompt {i}"
