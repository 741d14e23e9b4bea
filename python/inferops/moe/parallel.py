"""``parallelize``: expert parallelism (ExFlow) for Hugging Face Qwen3-MoE and Mixtral models.

Every rank serves its own requests (data-parallel attention: each rank runs the
replicated attention and dense parts on its own batch) and holds only its experts
(``placement``: expert -> rank per MoE layer; round-robin when None). MoE layers route
their tokens through :class:`MoEDispatcher` and run the local experts as one grouped
GEMM (:func:`grouped_expert_mlp`).

* ``mode="two"``: each MoE block becomes an :class:`ExpertParallelMoE` (the model's own
  router, then dispatch -> grouped experts -> combine: two all-to-alls per layer). The
  model's ``forward``/``generate`` are unchanged.
* ``mode="single"`` (ExFlow): tokens stay on the rank of their expert between layers.
  The decoder-layer loop is driven by :class:`ExFlowModel`, which calls each layer's own
  modules (``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, the router)
  in the order of the pre-norm block, on the tokens currently on this rank:
  attention runs where a token is, against a context kept coherent on every rank (each
  layer all-gathers the new tokens' K/V; the attention function is registered through
  transformers' ``AttentionInterface``); the router runs there too; ``route`` sends the
  token's residual to the ranks of its experts (one exchange per layer for top-1), where
  ``post_attention_layernorm`` (per token, so it commutes with the move) feeds the
  experts, and ``finish_layer`` adds the weighted expert outputs to the residual at the
  token's anchor rank (top-k > 1: the other ranks' partial sums go there, the documented
  second exchange). After the last layer each token returns home once. It keeps its own
  K/V store (``reset()`` between batches); ``generate_greedy`` decodes with it.

Both modes are collective per forward: every rank calls the model the same number of
times (e.g. ``generate`` with ``min_new_tokens == max_new_tokens``). Inference only.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..tp.parallel import _decoder, agree_across_ranks
from .dispatcher import MoEDispatcher, RouteState
from .grouped import grouped_expert_mlp
from .placement import Placement, round_robin_placement

__all__ = ["SUPPORTED_MOE_MODEL_TYPES", "ExFlowModel", "ExpertParallelMoE", "LocalExperts", "moe_gates",
           "moe_layer_indices", "parallelize"]

SUPPORTED_MOE_MODEL_TYPES = ("qwen3_moe", "mixtral")
_ATTN_NAME = "inferops_exflow"


def _is_moe_block(mlp) -> bool:
    experts = getattr(mlp, "experts", None)
    return hasattr(mlp, "gate") and experts is not None and hasattr(experts, "gate_up_proj")


def moe_layer_indices(model: nn.Module) -> list[int]:
    """Decoder-layer indices whose ``mlp`` is a sparse MoE block (router + experts)."""
    dec = _decoder(model)
    if dec is None:
        return []
    return [i for i, layer in enumerate(dec.layers) if _is_moe_block(getattr(layer, "mlp", None))]


def moe_gates(model: nn.Module) -> list[nn.Module]:
    """The routers of the MoE layers, in order: what :class:`RoutingRecorder` hooks."""
    dec = _decoder(model)
    return [dec.layers[i].mlp.gate for i in moe_layer_indices(model)]


class LocalExperts(nn.Module):
    """This rank's experts of one layer: ``gate_up_proj [G, 2 * inter, hidden]`` and
    ``down_proj [G, hidden, inter]`` copied from the model's fused expert tensors,
    ``expert_ids`` their global ids in local (expert-major) order."""

    def __init__(self, experts: nn.Module, expert_ids: list[int]) -> None:
        super().__init__()
        ids = torch.as_tensor(expert_ids, dtype=torch.long)
        self.register_buffer("expert_ids", ids, persistent=False)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[ids].clone(), requires_grad=False)
        self.down_proj = nn.Parameter(experts.down_proj.detach()[ids].clone(), requires_grad=False)
        self.act_fn = experts.act_fn

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_expert_mlp(x, offsets, self.gate_up_proj, self.down_proj, self.act_fn)


class ExpertParallelMoE(nn.Module):
    """Two-all-to-all expert-parallel MoE block: the model's router on this rank's tokens,
    ``dispatch`` to the experts' ranks, the local experts as a grouped GEMM, ``combine``.

    ``forward(hidden_states)``: ``[batch, seq, hidden]`` -> same shape (the block's output,
    without the residual, as the replaced block returns)."""

    def __init__(self, block: nn.Module, dispatcher: MoEDispatcher, layer: int) -> None:
        super().__init__()
        self.gate = block.gate
        self.experts = LocalExperts(block.experts, dispatcher.local_experts(layer))
        self.dispatcher, self.layer = dispatcher, layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, ids = self.gate(x)
        res = self.dispatcher.dispatch(x, ids, weights, layer=self.layer)
        y = self.experts(res.expert_x, res.expert_offsets)
        return self.dispatcher.combine(y, res.handle).reshape(shape)


def _placement_array(placement, num_layers: int, num_experts: int, world: int) -> np.ndarray:
    if placement is None:
        return round_robin_placement(num_layers, num_experts, world)
    arr = placement.gpu_of if isinstance(placement, Placement) else np.asarray(
        placement.cpu() if isinstance(placement, torch.Tensor) else placement)
    arr = np.asarray(arr, dtype=np.int64)
    if arr.shape != (num_layers, num_experts):
        raise ValueError(f"expected a placement of shape [{num_layers}, {num_experts}] (the model's MoE layers, "
                         f"experts), got {list(arr.shape)}")
    if arr.min() < 0 or arr.max() >= world:
        raise ValueError(f"expected placement ranks in [0, {world}), got values in [{arr.min()}, {arr.max()}]")
    return arr


def parallelize(model: nn.Module, group=None, placement=None, *, mode: str = "single",
                max_tokens_per_rank: int = 8192):
    """Expert-parallel Qwen3-MoE or Mixtral over the ranks of ``group``. Collective: every
    rank calls it with the same model configuration, mode and placement (checked;
    disagreement raises ``ValueError`` on every rank).

    Args:
        model: a ``*ForCausalLM`` with ``config.model_type`` in
            :data:`SUPPORTED_MOE_MODEL_TYPES`, full weights on every rank (the other
            ranks' experts are dropped).
        group: ``torch.distributed`` process group (None: the default group).
        placement: ``[moe layers, experts]`` expert -> rank (:class:`Placement`, e.g.
            ``place_experts(trace, W)``, or an array); None: round-robin (expert e on
            rank ``e % W``). Each rank must hold ``experts / W`` experts per layer.
        mode: ``"two"`` (dispatch/combine in each MoE block; returns ``model``) or
            ``"single"`` (ExFlow; returns an :class:`ExFlowModel` driving ``model``).
        max_tokens_per_rank: most tokens one rank feeds to one forward.
    """
    if mode not in ("single", "two"):
        raise ValueError(f"expected mode 'single' or 'two', got {mode!r}")
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("expected an initialised torch.distributed process group for `group`, got None "
                             "and no default group")
        group = dist.group.WORLD
    world = dist.get_world_size(group)
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    layers_idx = moe_layer_indices(model)
    pl = placement.gpu_of if isinstance(placement, Placement) else placement
    pl_list = None if pl is None else np.asarray(pl.cpu() if isinstance(pl, torch.Tensor) else pl).tolist()
    summary = {"class": type(model).__name__, "model_type": model_type, "num_experts": num_experts,
               "top_k": getattr(cfg, "num_experts_per_tok", None), "hidden_size": getattr(cfg, "hidden_size", None),
               "num_hidden_layers": getattr(cfg, "num_hidden_layers", None), "moe_layers": layers_idx,
               "dtype": ",".join(sorted({str(p.dtype) for p in model.parameters()})), "mode": mode,
               "placement": pl_list, "max_tokens_per_rank": int(max_tokens_per_rank), "world": world}
    agree_across_ranks(group, summary, "inferops.moe.parallelize")
    if model_type not in SUPPORTED_MOE_MODEL_TYPES or _decoder(model) is None or not layers_idx:
        raise TypeError(f"inferops.moe.parallelize supports Qwen3-MoE and Mixtral models "
                        f"({', '.join(SUPPORTED_MOE_MODEL_TYPES)}), got {type(model).__name__} "
                        f"(model_type {model_type!r})")
    if hasattr(model, "inferops_ep"):
        raise ValueError(f"expected a model not yet parallelized, got a {type(model).__name__} that "
                         "inferops.moe.parallelize already sharded (call it once, on the full model)")
    if num_experts % world:
        raise ValueError(f"expected the model's experts ({num_experts}) to be a multiple of the world size ({world})")
    gpu_of = _placement_array(placement, len(layers_idx), num_experts, world)
    per = num_experts // world
    for m, row in enumerate(gpu_of):
        counts = np.bincount(row, minlength=world)
        if (counts != per).any():
            raise ValueError(f"expected {per} experts per rank in every MoE layer of the placement, got "
                             f"{counts.tolist()} in MoE layer {m}")
    if mode == "single" and (getattr(cfg, "use_sliding_window", False)
                             or (model_type == "mixtral" and getattr(cfg, "sliding_window", None))):
        raise ValueError("expected no sliding-window attention in mode='single' (its attention keeps the whole "
                         "context), got a config with a sliding window")
    dec = _decoder(model)
    params = list(model.parameters())
    disp = MoEDispatcher(group, num_experts, torch.as_tensor(gpu_of), max_tokens_per_rank=max_tokens_per_rank,
                         hidden=cfg.hidden_size, dtype=params[0].dtype, num_layers=len(layers_idx))
    for m, i in enumerate(layers_idx):
        dec.layers[i].mlp = ExpertParallelMoE(dec.layers[i].mlp, disp, m)
    model.inferops_ep = {"mode": mode, "world": world, "rank": dist.get_rank(group), "placement": gpu_of,
                         "moe_layers": layers_idx, "dispatcher": disp}
    if mode == "two":
        return model
    return ExFlowModel(model, disp)


# --- single-all-to-all mode ---------------------------------------------------------------------


class _Context:
    """What the registered attention function needs during an ExFlowModel forward."""

    active: "ExFlowModel | None" = None


def _exflow_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    runner = _Context.active
    if runner is None:
        raise RuntimeError("the inferops_exflow attention runs only inside ExFlowModel.forward")
    return runner._attend(module, query, key, value, scaling)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTN_NAME, _exflow_attention)


class ExFlowModel(nn.Module):
    """ExFlow's single-all-to-all schedule over a Qwen3-MoE / Mixtral model's own layers.

    ``forward(input_ids)``: ``[batch, seq]`` new tokens of this rank's requests (batch and
    seq may differ between ranks; the rank's requests continue from the previous call
    until :meth:`reset`) -> logits ``[batch, seq, vocab]`` float. Collective.
    ``generate_greedy(input_ids, max_new_tokens)`` -> ``[batch, seq + max_new_tokens]``.
    The wrapped model's attention is switched to ``"inferops_exflow"``, which runs only
    inside this wrapper's forward (calling the model directly raises ``RuntimeError``).
    """

    def __init__(self, model: nn.Module, dispatcher: MoEDispatcher) -> None:
        super().__init__()
        self.model, self.dispatcher = model, dispatcher
        self.decoder = _decoder(model)
        self.group, self.rank, self.world = dispatcher.group, dispatcher.rank, dispatcher.world
        _register_attention()
        model.set_attn_implementation(_ATTN_NAME)
        self.reset()

    def reset(self) -> None:
        """Forget every request's context (the K/V store) and positions."""
        self._kv: dict[int, tuple] = {}
        self._past: int = 0
        self._batch: int | None = None

    def _token_table(self, batch: int, seq: int, device) -> torch.Tensor:
        """``[W * max_tokens_per_rank, 2]`` int64 (request, position) of every token of this
        forward on every rank, indexed by the dispatcher's global token id (home rank *
        max_tokens_per_rank + index); request ids are home rank * max_tokens_per_rank + row."""
        every = [None] * self.world
        dist.all_gather_object(every, (batch, seq, self._past), group=self.group)
        maxn = self.dispatcher.max_tokens
        table = torch.full((self.world * maxn, 2), -1, dtype=torch.int64)
        for r, (b, s, past) in enumerate(every):
            n = b * s
            table[r * maxn:r * maxn + n, 0] = (r * maxn + torch.arange(b)).repeat_interleave(s)
            table[r * maxn:r * maxn + n, 1] = (past + torch.arange(s)).repeat(b)
        return table.to(device)

    def _gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """All ranks' rows of ``t`` ``[m, c]`` (m may differ per rank), concatenated in rank order."""
        sizes = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        every = [torch.zeros_like(sizes) for _ in range(self.world)]
        dist.all_gather(every, sizes, group=self.group)
        every = [int(c) for c in every]
        most = max(every)
        if most > t.shape[0]:
            t = torch.cat([t, t.new_zeros(most - t.shape[0], t.shape[1])])
        gathered = t.new_empty((most * self.world, t.shape[1]))
        dist.all_gather_into_tensor(gathered, t.contiguous(), group=self.group)
        return torch.cat([gathered[r * most:r * most + c] for r, c in enumerate(every)])

    def _share_kv(self, module, k: torch.Tensor, v: torch.Tensor):
        """Context coherence: all-gather the new tokens' K/V (``[m, Hkv * d]`` each, after
        RoPE) and their (request, position) from every rank, append them to this layer's
        store; returns the whole store ``(K, V, meta)``. Collective."""
        layer = module.layer_idx
        rows = self._gather_rows(torch.cat([k, v], 1))
        new_meta = self._gather_rows(self._cur_meta)
        new_k, new_v = rows[:, :k.shape[1]], rows[:, k.shape[1]:]
        if layer in self._kv:
            K, V, M = self._kv[layer]
            new_k, new_v, new_meta = torch.cat([K, new_k]), torch.cat([V, new_v]), torch.cat([M, new_meta])
        self._kv[layer] = (new_k, new_v, new_meta)
        return new_k, new_v, new_meta

    def _attend(self, module, query, key, value, scaling):
        """Context-coherent attention of the queries on this rank: gather the new K/V of
        every rank (in rank order), append to this layer's store, attend causally within
        each query's request. ``query`` ``[1, Hq, m, d]``, ``key``/``value`` ``[1, Hkv, m, d]``;
        returns ``[1, m, Hq, d]``."""
        k = key[0].transpose(0, 1)  # [m, Hkv, d]
        v = value[0].transpose(0, 1)
        new_k, new_v, new_meta = self._share_kv(module, k.reshape(k.shape[0], -1), v.reshape(v.shape[0], -1))
        new_k = new_k.reshape(-1, *k.shape[1:])
        new_v = new_v.reshape(-1, *v.shape[1:])
        meta = self._cur_meta
        q = query[0].float()  # [Hq, m, d]
        groups = q.shape[0] // new_k.shape[1]
        K = new_k.float().transpose(0, 1).repeat_interleave(groups, 0)  # [Hq, N, d]
        V = new_v.float().transpose(0, 1).repeat_interleave(groups, 0)
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        scores = q @ K.transpose(1, 2) * scale  # [Hq, m, N]
        allowed = (meta[:, None, 0] == new_meta[None, :, 0]) & (new_meta[None, :, 1] <= meta[:, None, 1])
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out = torch.softmax(scores, -1) @ V  # [Hq, m, d]
        return out.transpose(0, 1)[None].to(query.dtype), None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"expected `input_ids` of shape [batch, seq], got {list(input_ids.shape)}")
        b, s = input_ids.shape
        if self._batch is not None and b != self._batch:
            raise ValueError(f"expected batch {self._batch} (the requests in progress; reset() to start new ones), "
                             f"got {b}")
        dec, disp = self.decoder, self.dispatcher
        x = dec.embed_tokens(input_ids).reshape(b * s, -1)
        table = self._token_table(b, s, x.device)
        state = disp.start(x)
        moe = {i: m for m, i in enumerate(self.model.inferops_ep["moe_layers"])}
        _Context.active = self
        try:
            for i, layer in enumerate(dec.layers[:self.model.config.num_hidden_layers]):
                x, ids = state.x, state.token_ids
                self._cur_meta = table[ids]
                if x.shape[0]:
                    cos, sin = dec.rotary_emb(x[None], self._cur_meta[:, 1][None])
                    h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x)[None],
                                           position_embeddings=(cos, sin), attention_mask=None)
                    x = x + h[0]
                else:  # no token here at this layer: still take part in the K/V gather
                    self._share_kv(layer.self_attn, x.new_zeros((0, layer.self_attn.k_proj.out_features)),
                                   x.new_zeros((0, layer.self_attn.v_proj.out_features)))
                if i in moe:
                    block = layer.mlp
                    _, weights, topk = block.gate(layer.post_attention_layernorm(x))
                    state = disp.route(RouteState(x, ids), topk, weights, moe[i])
                    rows = layer.post_attention_layernorm(disp.expert_input(state))
                    y = block.experts(rows, state.layout.expert_offsets)
                    state = disp.finish_layer(state, y, residual=True)
                else:
                    state = RouteState(x + layer.mlp(layer.post_attention_layernorm(x)), ids)
        finally:
            _Context.active = None
        out = disp.return_home(state)
        self._past += s
        self._batch = b
        hidden = dec.norm(out).reshape(b, s, -1)
        return self.model.lm_head(hidden)

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding of this rank's prompts (``[batch, seq]``, no padding): prefill,
        then one token per step (a plain argmax: no end-of-sequence stop or suppression, so
        every rank takes the same number of steps); starts from a fresh context. Collective."""
        self.reset()
        tokens = input_ids
        step = input_ids
        for _ in range(max_new_tokens):
            nxt = self(step)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], 1)
            step = nxt
        return tokens
