"""``parallelize``: Megatron-style tensor parallelism of a Hugging Face Llama-family model.

What happens to each decoder layer (``W`` ranks of ``group``, rank ``r``):

* attention: ``q_proj`` is column-parallel over heads (rank r: query heads
  ``r * H/W : (r + 1) * H/W``); ``k_proj``/``v_proj`` are column-parallel over KV heads
  when ``W`` divides their count, else (when their count divides ``W``) each rank holds
  the one KV head its query heads use (replicated KV heads); ``o_proj`` is row-parallel
  over the same heads through :func:`inferops.tp.gemm_reduce_scatter`. The model's own
  attention module runs unchanged on the local heads (its ``num_key_value_groups`` is set
  to the local ratio).
* MLP: ``gate_proj``/``up_proj`` column-parallel over the intermediate features,
  ``down_proj`` row-parallel (fused GEMM + reduce-scatter).
* ``sequence_parallel=True`` (default): between the row-parallel output and the next
  column-parallel input the residual stream is split by tokens (Megatron sequence
  parallelism). The reduce-scatter of ``o_proj``/``down_proj`` (the fused kernel) hands
  each rank its block of rows, the residual add and the next RMSNorm run on that block
  only, and one all-gather after the norm gives q/k/v (or gate/up) the full sequence:
  per layer two reduce-scatters + two all-gathers, the bytes of two all-reduces, with the
  norms and residual adds divided by W. The first layer's input is split and the last
  layer's output gathered by forward hooks, so the rest of the model (embeddings,
  rotary embedding, final norm, ``lm_head``) runs replicated and unchanged.
  ``sequence_parallel=False``: ``o_proj``/``down_proj`` return replicated outputs
  (reduce-scatter, then all-gather) and nothing else changes.
* Tokens: ``batch * seq`` need not divide by W; rows are zero-padded to a multiple of W
  inside (padding rows never reach the model's output).

Everything else (embeddings, norms, rotary, ``lm_head``) is replicated. Inference only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .gemm_rs import GemmReduceScatter
from .linear import ColumnParallelLinear, RowParallelLinear, padded_tokens, sequence_gather, sequence_shard

__all__ = ["SUPPORTED_MODEL_TYPES", "agree_across_ranks", "head_plan", "parallelize"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def agree_across_ranks(group, what: dict, context: str) -> None:
    """Collective: raise ``ValueError`` on every rank of ``group`` unless all ranks passed
    equal ``what`` (a dict of picklable values). The message names the keys and the
    values of each rank that differ."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    gathered = [None] * world
    dist.all_gather_object(gathered, what, group=group)
    keys = sorted({k for d in gathered for k in d}, key=str)
    bad = [k for k in keys if any(d.get(k) != gathered[0].get(k) for d in gathered)]
    if bad:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {i} {d.get(k)!r}" for i, d in enumerate(gathered))
                           for k in bad)
        raise ValueError(f"{context}: expected every rank to pass the same configuration, got differences in "
                         f"{detail}")


def _decoder(model: nn.Module):
    """The module holding ``layers`` (``model.model`` of a ``*ForCausalLM``, or the model)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model
    return None


def _config_summary(model: nn.Module, extra: dict) -> dict:
    cfg = getattr(model, "config", None)
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size")
    summary = {"class": type(model).__name__}
    summary.update({k: getattr(cfg, k, None) for k in keys})
    dtypes = {str(p.dtype) for p in model.parameters()}
    summary["dtype"] = ",".join(sorted(dtypes))
    summary.update(extra)
    return summary


def head_plan(num_heads: int, num_kv_heads: int, world: int, rank: int) -> dict:
    """How rank ``rank`` of ``world`` shards attention heads.

    Returns ``{"q": (first, count), "kv": (first, count), "kv_mode": "sharded" | "replicated"}``
    (heads, not features). Query heads must divide by ``world``; KV heads are sharded when
    ``world`` divides them, replicated (each rank holds the one KV head of its query heads)
    when they divide ``world``; anything else raises ``ValueError``."""
    if num_heads % world:
        raise ValueError(f"expected num_attention_heads ({num_heads}) divisible by the world size ({world}) "
                         "to shard the attention heads")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"expected num_key_value_heads ({num_kv_heads}) to divide num_attention_heads ({num_heads})")
    hq = num_heads // world
    if num_kv_heads % world == 0:
        per = num_kv_heads // world
        return {"q": (rank * hq, hq), "kv": (rank * per, per), "kv_mode": "sharded"}
    if world % num_kv_heads == 0:
        group_size = num_heads // num_kv_heads  # query heads per KV head; a multiple of hq here
        return {"q": (rank * hq, hq), "kv": (rank * hq // group_size, 1), "kv_mode": "replicated"}
    raise ValueError(f"expected num_key_value_heads ({num_kv_heads}) to be a multiple or a divisor of the world "
                     f"size ({world}) (sharded or replicated KV heads)")


class _SequenceContext:
    """Token count of the current forward (set when the first layer splits its input)."""

    tokens: int = 0
    shape: tuple = ()


class _GatherAfterNorm(nn.Module):
    """Sequence parallelism: the model's RMSNorm on this rank's rows, then an all-gather
    of the normalised rows so the column-parallel projections see the whole sequence."""

    def __init__(self, norm: nn.Module, ctx: _SequenceContext, group) -> None:
        super().__init__()
        self.norm, self.ctx, self.group = norm, ctx, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return sequence_gather(y, self.ctx.tokens, self.group).reshape(*self.ctx.shape, y.shape[-1])


def _split_hook(ctx: _SequenceContext, group):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        ctx.shape, ctx.tokens = tuple(x.shape[:-1]), x.shape[:-1].numel()
        shard = sequence_shard(x, group)[None]  # [1, P / W, hidden]: a sequence of this rank's rows
        if args:
            return (shard, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": shard}
    return hook


def _gather_hook(ctx: _SequenceContext, group):
    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        full = sequence_gather(x, ctx.tokens, group).reshape(*ctx.shape, x.shape[-1])
        return (full, *output[1:]) if isinstance(output, tuple) else full
    return hook


def parallelize(model: nn.Module, group=None, *, sequence_parallel: bool = True,
                max_tokens: int = 8192) -> nn.Module:
    """Shard a Llama, Mistral, Qwen2 or Qwen3 model (``*ForCausalLM`` or the base model)
    over the ranks of ``group`` in place and return it. Collective: every rank calls it
    with the same model configuration (checked; disagreement raises on every rank).

    Args:
        model: a ``transformers`` model whose ``config.model_type`` is in
            :data:`SUPPORTED_MODEL_TYPES`, loaded with the full weights on every rank.
        group: ``torch.distributed`` process group (None: the default group).
        sequence_parallel: split the residual stream by tokens between the row-parallel
            and the next column-parallel layer (see the module docstring).
        max_tokens: most tokens (``batch * seq`` of one forward, padded to a multiple of W)
            the reduce-scatter buffers hold.

    The model's ``forward``/``generate`` then run on every rank with the same inputs and
    give every rank the full logits. ``model.inferops_tp`` records the plan.
    """
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("expected an initialised torch.distributed process group for `group`, got None "
                             "and no default group")
        group = dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # Agree first, so a rank that would raise below (unsupported model, bad heads) raises
    # together with its peers instead of leaving them waiting in the next collective.
    agree_across_ranks(group, _config_summary(model, {"sequence_parallel": bool(sequence_parallel),
                                                      "max_tokens": int(max_tokens), "world": world}),
                       "inferops.tp.parallelize")
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    decoder = _decoder(model)
    if model_type not in SUPPORTED_MODEL_TYPES or decoder is None:
        raise TypeError(f"inferops.tp.parallelize supports Llama-family models ({', '.join(SUPPORTED_MODEL_TYPES)}), "
                        f"got {type(model).__name__} (model_type {model_type!r})")
    if hasattr(model, "inferops_tp"):
        raise ValueError(f"expected a model not yet parallelized, got a {type(model).__name__} that "
                         "inferops.tp.parallelize already sharded (call it once, on the full model)")
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    plan = head_plan(H, KV, world, rank)
    if cfg.intermediate_size % world:
        raise ValueError(f"expected intermediate_size ({cfg.intermediate_size}) divisible by the world size ({world})")
    params = list(model.parameters())
    dtype, device = params[0].dtype, params[0].device
    engine = GemmReduceScatter(group, padded_tokens(max_tokens, world), cfg.hidden_size, dtype, device)
    out = "sequence" if sequence_parallel else "replicated"
    q0, hq = plan["q"]
    k0, hk = plan["kv"]
    q_cols = (q0 * head_dim, (q0 + hq) * head_dim)
    kv_cols = (k0 * head_dim, (k0 + hk) * head_dim)
    ctx = _SequenceContext()
    layers = decoder.layers
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, group, out_slice=q_cols)
        attn.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, group, out_slice=kv_cols)
        attn.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, group, out_slice=kv_cols)
        attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, group, output=out, engine=engine, in_slice=q_cols)
        attn.num_key_value_groups = hq // hk
        mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, group)
        mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, group)
        mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, group, output=out, engine=engine)
        if sequence_parallel:
            layer.input_layernorm = _GatherAfterNorm(layer.input_layernorm, ctx, group)
            layer.post_attention_layernorm = _GatherAfterNorm(layer.post_attention_layernorm, ctx, group)
    if sequence_parallel and len(layers):
        layers[0].register_forward_pre_hook(_split_hook(ctx, group), with_kwargs=True)
        layers[-1].register_forward_hook(_gather_hook(ctx, group))
    model.inferops_tp = {"world": world, "rank": rank, "sequence_parallel": bool(sequence_parallel),
                         "q_heads": (q0, hq), "kv_heads": (k0, hk), "kv_mode": plan["kv_mode"],
                         "engine_path": engine.path, "fallback_reason": engine.fallback_reason}
    return model
