"""MoEDispatcher: expert-parallel dispatch/combine over torch.distributed, and
ExFlow's single-all-to-all routing.

Two-all-to-all mode (the baseline, any top-k):
    res = disp.dispatch(x, topk_ids, topk_weights)   # tokens -> ranks of their experts
    y = experts(res.expert_x, res.tokens_per_expert) # expert-major rows of this rank's experts
    out = disp.combine(y, res.handle)                # weighted sum back at each token's home
Host syncs: dispatch 1 (the send counts, which all_to_all_single needs as host
lists, read together with the routing error counters, which every rank agrees
on so that bad expert ids raise on all ranks instead of hanging), combine 0.

Single-all-to-all mode (ExFlow): a token's hidden state stays where its experts
processed it and the next layer runs there (attention on a context kept coherent
by :meth:`all_gather_kv`), instead of returning to a fixed home rank:
    state = disp.start(x)                                # tokens at home
    for each layer: attention + gate on state.x, where the tokens are, then
        state = disp.route(state, topk_ids, topk_weights, layer)
        y = experts(disp.expert_input(state), ...)       # expert-major rows of this rank
        state = disp.finish_layer(state, y)
    out = disp.return_home(state)                        # once, after the last layer
Top-1 (ExFlow's setting): one all-to-all of hidden states per layer (``route``);
``finish_layer`` is local. Top-k > 1: the next gate needs the sum of the k
partial outputs, so they must meet before it. Each token has an *anchor*, the
rank holding most of its k experts (ties: the earlier slot), where it continues;
``finish_layer`` sends the other ranks' partial sums there (at most k - 1 rows
per token, none for experts sharing the anchor's rank; the collective is skipped
when no rank has any), and the next ``route`` sends the token only to the ranks
of its experts other than the one it is on. That is two exchanges per layer, as
in dispatch/combine, but with an affinity placement most slots stay on the
token's rank and both carry far fewer rows. A single exchange for k > 1 would
need the next layer's routing before its input exists.
Host syncs: 1 per layer in both modes (``route`` reads the split counts of its
own exchange and of the partial exchange its ``finish_layer`` will do, together
with the routing error counters); ``expert_input``/``finish_layer`` have none.

Layout and data movement use the library's kernels (routing_layout, permute,
unpermute) on CUDA tensors and their references on CPU tensors (gloo tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .layout import RoutingLayout, permute, routing_layout, unpermute

__all__ = ["DispatchHandle", "DispatchResult", "MoEDispatcher", "RouteState"]


@dataclass(frozen=True)
class DispatchHandle:
    layout: RoutingLayout  # of this rank's tokens over ranks
    send_splits: list[int]
    recv_splits: list[int]
    local_layout: RoutingLayout  # of the received tokens over this rank's experts
    recv_weights: torch.Tensor  # [recv, k] fp32, 0 for slots whose expert is elsewhere
    num_tokens: int


@dataclass(frozen=True)
class DispatchResult:
    expert_x: torch.Tensor  # [capacity, hidden], expert-major rows of this rank's experts
    tokens_per_expert: torch.Tensor  # [local experts] int32
    expert_offsets: torch.Tensor  # [local experts + 1] int32
    handle: DispatchHandle


@dataclass(frozen=True)
class RouteState:
    """Tokens held by this rank in the single-all-to-all mode."""

    x: torch.Tensor  # [n, hidden] hidden states of the tokens here
    token_ids: torch.Tensor  # [n] int64 global ids (home rank * max_tokens_per_rank + index)
    layout: RoutingLayout | None = None  # of these tokens over this rank's experts (after route)
    weights: torch.Tensor | None = None  # [n, k] fp32, 0 for slots on other ranks (after route)
    anchor: torch.Tensor | None = None  # [n] int64 rank where each token continues (after route)
    partial_send: list[int] | None = None  # split counts of finish_layer's exchange (after route)
    partial_recv: list[int] | None = None
    partial_any: bool = False  # whether any rank sends partial sums in finish_layer


class MoEDispatcher:
    """Expert-parallel token exchange for one process group.

    Args:
        group: a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPU).
        num_experts: experts per layer (all ranks).
        placement: ``[layers, experts]`` expert -> rank (e.g. ``place_experts(...).gpu_of``),
            or None for contiguous blocks; each rank must hold the same number of experts.
        max_tokens_per_rank: the most tokens a rank starts with (bounds global token ids).
        hidden, dtype: token shape and dtype (fp16/bf16 on GPU; any float on CPU).
        align: pad each local expert's rows to this multiple (grouped GEMM).
    """

    def __init__(self, group, num_experts: int, placement=None, *, max_tokens_per_rank: int, hidden: int,
                 dtype: torch.dtype, align: int = 1, num_layers: int = 1) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.num_experts = num_experts
        if num_experts % self.world:
            raise ValueError(f"expected num_experts ({num_experts}) to be a multiple of the world size ({self.world})")
        if placement is None:
            placement = (torch.arange(num_experts) * self.world // num_experts).repeat(num_layers, 1)
        placement = torch.as_tensor(placement, dtype=torch.int64)
        if placement.dim() == 1:
            placement = placement[None]
        if placement.shape[1] != num_experts or placement.min() < 0 or placement.max() >= self.world:
            raise ValueError(f"expected placement [layers, {num_experts}] with ranks in [0, {self.world})")
        per = num_experts // self.world
        for layer, row in enumerate(placement):
            if not (torch.bincount(row, minlength=self.world) == per).all():
                raise ValueError(f"placement of layer {layer} is unbalanced: each rank must hold {per} experts")
        self.placement = placement
        self.max_tokens = max_tokens_per_rank
        self.hidden = hidden
        self.dtype = dtype
        self.align = align
        # local expert index of each global expert on its rank, per layer
        self.local_index = torch.zeros_like(placement)
        self._device_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer, row in enumerate(placement):
            for r in range(self.world):
                mine = (row == r).nonzero().flatten()
                self.local_index[layer, mine] = torch.arange(mine.numel())

    def local_experts(self, layer: int = 0) -> list[int]:
        """Global ids of this rank's experts in ``layer``, in local (expert-major) order."""
        return (self.placement[layer] == self.rank).nonzero().flatten().tolist()

    # --- helpers -------------------------------------------------------------------------------

    def _exchange(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=self.group)
        return recv

    def _counts(self, lay: RoutingLayout, extra: torch.Tensor | None = None):
        """Exchange per-rank counts: the one host sync of a dispatch/route, which also
        reads the layout's error counters (the layout itself is built unvalidated).

        Returns ``(send_splits, recv_splits)``; with ``extra`` (``[world, c]`` int64, row
        ``d`` for rank ``d``), also what every rank sent this one in ``extra``
        (``[world][c]``) and the global sum of ``extra``."""
        send = lay.tokens_per_rank.to(torch.int64)[:, None]
        if extra is not None:
            send = torch.cat([send, extra.to(torch.int64)], 1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)
        # Errors are agreed on by every rank, so all raise together instead of
        # the healthy ranks blocking in the next exchange.
        totals = torch.stack([lay.errors.to(torch.int64).sum(), send[:, 1:].sum()])
        dist.all_reduce(totals, group=self.group)
        host = torch.cat([send.flatten(), recv.flatten(), totals]).tolist()
        c, w = send.shape[1], self.world
        if host[-2]:
            lay.check()  # this rank's details, if the errors are here
            raise ValueError(f"another rank's routing named invalid experts or overflowed ({host[-2]} "
                             "assignments): see that rank's error")
        sent = [host[i * c:(i + 1) * c] for i in range(w)]
        got = [host[(w + i) * c:(w + i + 1) * c] for i in range(w)]
        splits = [r[0] for r in sent], [r[0] for r in got]
        if extra is None:
            return splits
        return (*splits, [r[1:] for r in got], host[-1])

    def _tables(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``placement`` (int64 and int32) and ``local_index`` on ``device``, copied once per
        device: a per-call host-to-device copy of pageable memory would block the host."""
        device = torch.device(device)
        tables = self._device_tables.get(device)
        if tables is None:
            tables = (self.placement.to(device), self.placement.to(device=device, dtype=torch.int32),
                      self.local_index.to(device))
            self._device_tables[device] = tables
        return tables

    def _placement(self, layer: int, device) -> torch.Tensor:
        return self._tables(device)[1][layer]

    # --- two-all-to-all mode ------------------------------------------------------------------

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 layer: int = 0) -> DispatchResult:
        """Send each token once to every rank holding one of its experts; return this rank's
        expert-major input rows."""
        T = topk_ids.shape[0]
        if x.shape != (T, self.hidden):
            raise ValueError(f"expected `x` of shape [{T}, {self.hidden}], got {list(x.shape)}")
        if T > self.max_tokens:
            raise ValueError(f"expected at most max_tokens_per_rank = {self.max_tokens} tokens, got {T}")
        dev = x.device
        lay = routing_layout(topk_ids, self.num_experts, placement=self._placement(layer, dev),
                             world_size=self.world, validate=False)
        send_splits, recv_splits = self._counts(lay)
        # rank-major send rows: (token, rank) pairs in send order
        t_idx, r_idx = (lay.send_index >= 0).nonzero(as_tuple=True)
        rows = lay.send_offsets.long()[r_idx] + lay.send_index[t_idx, r_idx].long()
        order = torch.empty_like(rows)
        order[rows] = torch.arange(rows.numel(), device=dev)
        t_send, r_send = t_idx[order], r_idx[order]
        ids = topk_ids.long()[t_send]  # [S, k]
        placement, _, local_index = self._tables(dev)
        on_dest = placement[layer][ids] == r_send[:, None]
        local_ids = torch.where(on_dest, local_index[layer][ids], -1)
        weights = torch.where(on_dest, topk_weights.float()[t_send], 0.0)
        recv_x = self._exchange(x[t_send], send_splits, recv_splits)
        recv_ids = self._exchange(local_ids, send_splits, recv_splits)
        recv_w = self._exchange(weights, send_splits, recv_splits)
        per = self.num_experts // self.world
        # slots whose expert lives elsewhere carry -1: routing_layout drops and counts them
        local = routing_layout(recv_ids, per, align=self.align, validate=False)
        expert_x = permute(recv_x, local) if recv_x.shape[0] else recv_x.new_zeros((local.capacity, self.hidden))
        handle = DispatchHandle(lay, send_splits, recv_splits, local, recv_w, T)
        return DispatchResult(expert_x, local.tokens_per_expert, local.expert_offsets, handle)

    def combine(self, y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Expert outputs (rows of ``dispatch``'s ``expert_x``) -> ``[T, hidden]``: the top-k
        weighted sum of each token's expert outputs, at the token's home rank."""
        partial = unpermute(y, handle.local_layout, handle.recv_weights) if y.shape[0] else \
            y.new_zeros((sum(handle.recv_splits), self.hidden))
        back = self._exchange(partial, handle.recv_splits, handle.send_splits)
        lay = handle.layout
        out = torch.zeros(handle.num_tokens, self.hidden, dtype=torch.float32, device=y.device)
        t_idx, r_idx = (lay.send_index >= 0).nonzero(as_tuple=True)
        rows = lay.send_offsets.long()[r_idx] + lay.send_index[t_idx, r_idx].long()
        out.index_add_(0, t_idx, back[rows].float())
        return out.to(y.dtype)

    # --- single-all-to-all mode (ExFlow) ----------------------------------------------------------

    def start(self, x: torch.Tensor) -> RouteState:
        """This rank's tokens at home, with global ids."""
        n = x.shape[0]
        if n > self.max_tokens:
            raise ValueError(f"expected at most max_tokens_per_rank = {self.max_tokens} tokens, got {n}")
        ids = self.rank * self.max_tokens + torch.arange(n, device=x.device)
        return RouteState(x, ids)

    def _anchor(self, topk_ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Rank where each token continues after ``layer``: the one holding most of its k
        experts, ties to the earlier slot (for k = 1, the rank of its expert)."""
        ranks = self._tables(topk_ids.device)[0][layer][topk_ids]  # [n, k]
        k = ranks.shape[1]
        same = (ranks[:, :, None] == ranks[:, None, :]).sum(-1)  # [n, k] slots on slot j's rank
        score = same * k - torch.arange(k, device=ranks.device)
        return ranks.gather(1, score.argmax(1, keepdim=True)).squeeze(1)

    def route(self, state: RouteState, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              layer: int) -> RouteState:
        """One all-to-all: every token moves from the rank it is on to the ranks of its
        layer-``layer`` experts (once per rank), arriving expert-major for their experts.
        ``topk_ids``/``topk_weights``: ``[n, k]`` for the ``n`` tokens of ``state`` (the gate
        ran here); any k >= 1."""
        n = state.x.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[0] != n:
            raise ValueError(f"expected `topk_ids` of shape [{n}, k] (a row per token of `state`), "
                             f"got {list(topk_ids.shape)}")
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(f"expected `topk_weights` of shape {list(topk_ids.shape)}, "
                             f"got {list(topk_weights.shape)}")
        dev = state.x.device
        lay = routing_layout(topk_ids, self.num_experts, placement=self._placement(layer, dev),
                             world_size=self.world, validate=False)
        # rank-major send rows: (token, rank) pairs in send order
        t_idx, r_idx = (lay.send_index >= 0).nonzero(as_tuple=True)
        rows = lay.send_offsets.long()[r_idx] + lay.send_index[t_idx, r_idx].long()
        order = torch.empty_like(rows)
        order[rows] = torch.arange(rows.numel(), device=dev)
        t_send, r_send = t_idx[order], r_idx[order]
        # out-of-range ids make _counts raise before anything below is exchanged or used
        safe = topk_ids.long().clamp(0, self.num_experts - 1)
        anchor = self._anchor(safe, layer)[t_send]
        # finish_layer's exchange: pairs[d, a] rows of tokens sent to d whose anchor is a != d.
        # Rank d needs row d (what it will send) and column d (what it will receive).
        pairs = torch.zeros(self.world, self.world, dtype=torch.int64, device=dev)
        moving = anchor != r_send
        pairs.index_put_((r_send[moving], anchor[moving]), torch.ones_like(anchor[moving]), accumulate=True)
        send_splits, recv_splits, got, n_partials = self._counts(lay, torch.cat([pairs, pairs.T], 1))
        partial_send = [sum(g[a] for g in got) for a in range(self.world)]
        partial_recv = [sum(g[self.world + r] for g in got) for r in range(self.world)]
        ids = safe[t_send]
        placement, _, local_index = self._tables(dev)
        on_dest = placement[layer][ids] == r_send[:, None]
        local_ids = torch.where(on_dest, local_index[layer][ids], -1)
        weights = torch.where(on_dest, topk_weights.float()[t_send], 0.0)
        recv_x = self._exchange(state.x[t_send], send_splits, recv_splits)
        meta = torch.cat([state.token_ids[t_send, None], anchor[:, None], local_ids], 1)
        recv_meta = self._exchange(meta, send_splits, recv_splits)
        recv_w = self._exchange(weights, send_splits, recv_splits)
        per = self.num_experts // self.world
        # slots whose expert lives elsewhere carry -1: routing_layout drops and counts them
        local = routing_layout(recv_meta[:, 2:], per, align=self.align, validate=False)
        return RouteState(recv_x, recv_meta[:, 0], local, recv_w, recv_meta[:, 1], partial_send,
                          partial_recv, n_partials > 0)

    def expert_input(self, state: RouteState) -> torch.Tensor:
        """Expert-major rows of the tokens on this rank (after :meth:`route`)."""
        return permute(state.x, state.layout) if state.x.shape[0] else \
            state.x.new_zeros((state.layout.capacity, self.hidden))

    def finish_layer(self, state: RouteState, y: torch.Tensor, residual: bool = True) -> RouteState:
        """Apply the layer at each token's anchor rank: ``x <- x + sum_j w_j expert_j(x)``
        (without ``x`` if not ``residual``), accumulated in fp32. ``y``: expert outputs, the
        rows of :meth:`expert_input`. Top-1: local. Top-k: the other ranks' partial sums go
        to the anchor in one all-to-all (skipped when no rank has any) and are added there
        in source-rank order (deterministic)."""
        if state.layout is None:
            raise ValueError("expected a `state` returned by route()")
        if y.shape != (state.layout.capacity, self.hidden):
            raise ValueError(f"expected `y` of shape [{state.layout.capacity}, {self.hidden}] "
                             f"(the rows of expert_input), got {list(y.shape)}")
        n = state.x.shape[0]
        part = unpermute(y, state.layout, state.weights) if n else state.x.new_zeros((0, self.hidden))
        acc = part.float() + state.x.float() if residual else part.float()
        if not state.partial_any:  # every token is on its anchor (always so for top-1)
            return RouteState(acc.to(state.x.dtype), state.token_ids)
        here = state.anchor == self.rank
        away = (~here).nonzero().flatten()
        away = away[torch.argsort(state.anchor[away], stable=True)]  # anchor-rank-major
        recv = self._exchange(part[away], state.partial_send, state.partial_recv)
        recv_ids = self._exchange(state.token_ids[away], state.partial_send, state.partial_recv)
        kept_ids = state.token_ids[here]
        out = acc[here]
        if recv_ids.numel():
            sorted_ids, perm = torch.sort(kept_ids)
            pos = perm[torch.searchsorted(sorted_ids, recv_ids)]
            lo = 0
            for count in state.partial_recv:  # a token appears at most once per source rank
                out[pos[lo:lo + count]] += recv[lo:lo + count].float()
                lo += count
        return RouteState(out.to(state.x.dtype), kept_ids)

    def return_home(self, state: RouteState) -> torch.Tensor:
        """After the last layer: every token back to its home rank, in its original order."""
        home = torch.div(state.token_ids, self.max_tokens, rounding_mode="floor")
        order = torch.argsort(home * self.max_tokens + state.token_ids % self.max_tokens)
        send = torch.bincount(home, minlength=self.world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        host = torch.cat([send, recv]).tolist()
        send_splits, recv_splits = host[:self.world], host[self.world:]
        x = self._exchange(state.x[order], send_splits, recv_splits)
        ids = self._exchange(state.token_ids[order], send_splits, recv_splits)
        out = torch.empty_like(x)
        out[ids - self.rank * self.max_tokens] = x
        return out

    def all_gather_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """Context coherence: every rank gets the new tokens' K/V of all ranks
        (``[n, ...]`` per rank, equal n) concatenated in rank order."""
        out = kv.new_empty((self.world * kv.shape[0], *kv.shape[1:]))
        dist.all_gather_into_tensor(out, kv.contiguous(), group=self.group)
        return out
