"""Expert placement by inter-layer affinity (ExFlow), traces, and the affinity report.

A token routed to expert e at layer l tends to go to some e' at layer l + 1.
If e and e' live on the same GPU, the token stays where it is in the
single-all-to-all mode; otherwise it crosses. ``place_experts`` chooses, per
layer, which experts each GPU holds (equal numbers per GPU) to minimise the
expected cross-GPU transitions of a routing trace, as an integer program:

    x[l, e, g] in {0, 1}     expert e of layer l on GPU g
    sum_g x[l, e, g] = 1     every expert placed once
    sum_e x[l, e, g] = E/G   balanced
    d[l, e, e'] >= x[l, e, g] - x[l+1, e', g]  for all g   (d = 1 iff different GPUs)
    minimise sum c[l, e, e'] d[l, e, e']

where c counts the trace's transitions (top-k: each of the k x k slot pairs of a
token weighs 1 / k^2). Solved with scipy's HiGHS (``scipy.optimize.milp``) under
a time limit; many GPUs are handled by recursive bisection (the same program
with G = 2 on each half). The program's LP relaxation is weak (x = 1/G makes
every d zero), so exact solves are attempted only for small programs; larger
ones, a missing solver, or a solve that times out without a better incumbent
fall back to a greedy chain-following assignment refined by pairwise swaps.
``Placement.method`` and ``notes`` say which path produced the result.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "exchange_rows",
    "Placement",
    "transition_counts",
    "place_experts",
    "round_robin_placement",
    "cross_gpu_routes",
    "synthetic_trace",
    "RoutingRecorder",
    "affinity_report",
]


@dataclass(frozen=True)
class Placement:
    """``gpu_of [layers, experts]`` (int64 numpy) and how it was obtained."""

    gpu_of: np.ndarray
    method: str  # "milp", "milp+bisection", "greedy+swap", "trivial"
    objective: float  # expected cross-GPU transitions of the trace
    solve_seconds: float
    notes: list = field(default_factory=list)

    def tensor(self, layer: int, device=None) -> torch.Tensor:
        """Expert -> rank for one layer, int32, as ``routing_layout`` takes it."""
        return torch.as_tensor(self.gpu_of[layer], dtype=torch.int32, device=device)


def _check_trace(trace) -> np.ndarray:
    t = np.asarray(torch.as_tensor(trace).cpu(), dtype=np.int64)
    if t.ndim == 2:
        t = t[:, :, None]
    if t.ndim != 3:
        raise ValueError(f"expected a trace of shape [tokens, layers, k] (or [tokens, layers]), got {list(t.shape)}")
    return t


def transition_counts(trace, num_experts: int) -> np.ndarray:
    """``c [layers - 1, E, E]``: weighted count of tokens going e (layer l) -> e' (layer l + 1)."""
    t = _check_trace(trace)
    T, L, k = t.shape
    if t.size and (t.min() < 0 or t.max() >= num_experts):
        raise ValueError(f"trace holds expert ids outside [0, {num_experts})")
    c = np.zeros((max(L - 1, 0), num_experts, num_experts))
    for layer in range(L - 1):
        for j in range(k):
            for j2 in range(k):
                np.add.at(c[layer], (t[:, layer, j], t[:, layer + 1, j2]), 1.0 / (k * k))
    return c


def _objective(c: np.ndarray, gpu_of: np.ndarray) -> float:
    total = 0.0
    for layer in range(c.shape[0]):
        diff = gpu_of[layer][:, None] != gpu_of[layer + 1][None, :]
        total += float((c[layer] * diff).sum())
    return total


def cross_gpu_routes(trace, placement) -> float:
    """Expected cross-GPU transitions of ``trace`` under ``placement`` (Placement or array)."""
    gpu_of = placement.gpu_of if isinstance(placement, Placement) else np.asarray(placement)
    return _objective(transition_counts(trace, gpu_of.shape[1]), gpu_of)


def exchange_rows(trace, placement) -> dict:
    """Rows of hidden states crossing GPUs for ``trace`` (``[tokens, layers, k]`` or
    ``[tokens, layers]``) under ``placement``, in both :class:`MoEDispatcher` modes, by the
    rules the dispatcher follows. Token ``t`` starts (and ends) on GPU ``t % G``.

    * ``two``: per layer, dispatch sends a token once to each GPU holding one of its
      experts other than its home, and combine sends one row back from each.
    * ``single``: per layer, ``route`` sends a token to each GPU of its experts other than
      the one it is on; ``finish_layer`` sends one partial row from each of those GPUs
      other than the token's anchor (the GPU holding most of its experts, ties to the
      earlier slot) and the token continues there; at the end it returns home (one row
      if it is elsewhere). For top-1 ``finish_layer`` sends nothing.

    Returns ``{"two": rows, "single": rows, "single_route": ..., "single_partial": ...,
    "single_return": ...}`` (totals over all tokens and layers), and ``"two_by_gpu"`` /
    ``"single_by_gpu"``: ``[G]`` int64 arrays of the rows each GPU sends (they sum to the
    totals).
    """
    t = _check_trace(trace)
    gpu_of = placement.gpu_of if isinstance(placement, Placement) else np.asarray(placement)
    T, L, k = t.shape
    G = int(gpu_of.max()) + 1 if gpu_of.size else 1
    rows = np.arange(T)
    home = rows % G
    where = home.copy()
    two = route = partial = 0
    two_by = np.zeros(G, dtype=np.int64)
    single_by = np.zeros(G, dtype=np.int64)
    for layer in range(L):
        ranks = gpu_of[layer][t[:, layer]]  # [T, k]
        present = np.zeros((T, G), dtype=bool)
        present[rows[:, None], ranks] = True
        n = present.sum(1)
        away_home = present & (np.arange(G)[None, :] != home[:, None])  # [T, G] expert GPUs but home
        two += 2 * int(away_home.sum())
        np.add.at(two_by, home, away_home.sum(1))  # dispatch: home sends one row to each
        two_by += away_home.sum(0)  # combine: each sends one row back home
        route += int((n - present[rows, where]).sum())
        np.add.at(single_by, where, n - present[rows, where])
        same = (ranks[:, :, None] == ranks[:, None, :]).sum(-1)
        anchor = ranks[rows, np.argmax(same * k - np.arange(k), axis=1)]
        partial += int((n - 1).sum())  # every expert GPU but the anchor sends one partial row
        single_by += (present & (np.arange(G)[None, :] != anchor[:, None])).sum(0)
        where = anchor
    back = int((where != home).sum())
    np.add.at(single_by, where, (where != home).astype(np.int64))
    return {"two": two, "single": route + partial + back, "single_route": route,
            "single_partial": partial, "single_return": back, "two_by_gpu": two_by, "single_by_gpu": single_by}


def round_robin_placement(num_layers: int, num_experts: int, num_gpus: int) -> np.ndarray:
    return np.tile(np.arange(num_experts) % num_gpus, (num_layers, 1))


def _greedy(c: np.ndarray, L: int, E: int, G: int) -> np.ndarray:
    per = E // G
    gpu_of = np.zeros((L, E), dtype=np.int64)
    gpu_of[0] = np.arange(E) // per
    for layer in range(1, L):
        # affinity of expert e' (this layer) to GPU g: transitions from the previous layer's experts on g
        score = np.zeros((E, G))
        for g in range(G):
            score[:, g] = c[layer - 1][gpu_of[layer - 1] == g].sum(0)
        free = np.full(G, per)
        assigned = np.full(E, -1)
        for flat in np.argsort(-score, axis=None, kind="stable"):
            e, g = divmod(int(flat), G)
            if assigned[e] < 0 and free[g] > 0:
                assigned[e], free[g] = g, free[g] - 1
        gpu_of[layer] = assigned
    return gpu_of


def _refine(c: np.ndarray, gpu_of: np.ndarray, deadline: float) -> np.ndarray:
    """Swap pairs of experts between GPUs within a layer while that lowers the objective
    (local search after the greedy or a time-limited solve). Balanced by construction."""
    gpu_of = gpu_of.copy()
    L, E = gpu_of.shape
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for layer in range(L):
            # affinity of each expert of this layer to each GPU, from both neighbouring layers
            G = int(gpu_of.max()) + 1
            aff = np.zeros((E, G))
            for g in range(G):
                if layer > 0:
                    aff[:, g] += c[layer - 1][gpu_of[layer - 1] == g].sum(0)
                if layer < L - 1:
                    aff[:, g] += c[layer][:, gpu_of[layer + 1] == g].sum(1)
            cur = aff[np.arange(E), gpu_of[layer]]
            # gain of swapping a and b = moving a to g_b and b to g_a
            ga = gpu_of[layer]
            gain = aff[:, ga].T + aff[:, ga] - cur[:, None] - cur[None, :]  # gain[a, b]
            gain[ga[:, None] == ga[None, :]] = 0
            a, b = np.unravel_index(np.argmax(gain), gain.shape)
            if gain[a, b] > 1e-9:
                gpu_of[layer, a], gpu_of[layer, b] = ga[b], ga[a]
                improved = True
    return gpu_of


def _milp(c: np.ndarray, L: int, E: int, G: int, time_limit: float, verbose: bool):
    """Exact program above; returns (gpu_of or None, status message)."""
    from scipy.optimize import LinearConstraint, milp
    from scipy.sparse import coo_matrix

    nx = L * E * G
    xi = lambda layer, e, g: (layer * E + e) * G + g  # noqa: E731
    pairs = [(layer, e, e2, c[layer, e, e2]) for layer in range(L - 1)
             for e, e2 in zip(*np.nonzero(c[layer]))]
    nv = nx + len(pairs)
    cost = np.zeros(nv)
    cost[nx:] = [w for *_, w in pairs]
    rows, cols, vals, lb, ub = [], [], [], [], []

    def add(row_entries, lo, hi):
        r = len(lb)
        for col, v in row_entries:
            rows.append(r)
            cols.append(col)
            vals.append(v)
        lb.append(lo)
        ub.append(hi)

    for layer in range(L):
        for e in range(E):
            add([(xi(layer, e, g), 1.0) for g in range(G)], 1, 1)
        for g in range(G):
            add([(xi(layer, e, g), 1.0) for e in range(E)], E // G, E // G)
    for p, (layer, e, e2, _) in enumerate(pairs):
        for g in range(G):  # d >= x[l, e, g] - x[l+1, e2, g]
            add([(nx + p, 1.0), (xi(layer, e, g), -1.0), (xi(layer + 1, e2, g), 1.0)], 0, np.inf)
    # Symmetry: GPUs are interchangeable, so pin expert 0 of layer 0 to GPU 0.
    add([(xi(0, 0, 0), 1.0)], 1, 1)
    A = coo_matrix((vals, (rows, cols)), shape=(len(lb), nv)).tocsr()
    integrality = np.concatenate([np.ones(nx), np.zeros(len(pairs))])
    bounds_lo, bounds_hi = np.zeros(nv), np.ones(nv)
    from scipy.optimize import Bounds

    res = milp(cost, integrality=integrality, bounds=Bounds(bounds_lo, bounds_hi),
               constraints=LinearConstraint(A, lb, ub), options={"time_limit": time_limit, "disp": verbose})
    if res.x is None:
        return None, f"milp: {res.message}"
    x = res.x[:nx].reshape(L, E, G)
    return x.argmax(-1).astype(np.int64), f"milp: {res.message}"


def place_experts(trace, num_gpus: int, *, num_experts: int | None = None, time_limit: float = 20.0,
                  verbose: bool = False) -> Placement:
    """Place each layer's experts on ``num_gpus`` GPUs to minimise cross-GPU transitions.

    Args:
        trace: ``[tokens, layers, k]`` (or ``[tokens, layers]``) expert ids, e.g. from
            :class:`RoutingRecorder` or :func:`synthetic_trace`.
        num_gpus: G; ``num_experts`` must be a multiple of it.
        num_experts: E, default ``trace.max() + 1``.
        time_limit: seconds for the whole solve (split among bisection steps).
        verbose: print solver progress (HiGHS log) and step summaries.
    Returns a :class:`Placement`; ``method`` says which path produced it.
    """
    t = _check_trace(trace)
    T, L, k = t.shape
    E = int(t.max()) + 1 if num_experts is None else int(num_experts)
    G = int(num_gpus)
    if G < 1 or E % G:
        raise ValueError(f"expected num_experts ({E}) to be a multiple of num_gpus ({G})")
    c = transition_counts(t, E)
    start = time.perf_counter()
    notes = []
    if G == 1:
        gpu_of = np.zeros((L, E), dtype=np.int64)
        return Placement(gpu_of, "trivial", 0.0, 0.0)
    try:
        import scipy.optimize  # noqa: F401
        have_scipy = True
    except ImportError:
        have_scipy = False
        notes.append("scipy not installed: greedy placement (pip install scipy for the ILP)")
    gpu_of, method = None, "greedy"
    pair_vars = int((c > 0).sum())
    if have_scipy and L * E * G <= 512 and pair_vars * G <= 20000:
        gpu_of, msg = _milp(c, L, E, G, time_limit, verbose)
        notes.append(msg)
        method = "milp"
    elif have_scipy and G & (G - 1) == 0 and pair_vars * 2 <= 20000:
        gpu_of = _bisect(c, L, E, G, time_limit, verbose, notes)
        method = "milp+bisection" if gpu_of is not None else "greedy"
    elif have_scipy:
        notes.append(f"program too large for an exact solve ({pair_vars} transition pairs, {G} GPUs): "
                     "greedy + local search")
    if gpu_of is None:
        gpu_of = _greedy(c, L, E, G)
        method = "greedy"
    greedy = _refine(c, _greedy(c, L, E, G), start + time_limit)
    if _objective(c, greedy) < _objective(c, gpu_of) - 1e-9:  # a time-limited solve can lose to greedy
        notes.append("greedy + local search beat the solver's incumbent; using it")
        gpu_of, method = greedy, "greedy+swap"
    elif method == "greedy":
        gpu_of, method = greedy, "greedy+swap"
    elapsed = time.perf_counter() - start
    if verbose:
        print(f"[place_experts] {method}: objective {_objective(c, gpu_of):.1f} in {elapsed:.2f} s")
    return Placement(gpu_of, method, _objective(c, gpu_of), elapsed, notes)


def _bisect(c, L, E, G, time_limit, verbose, notes):
    """Split the experts of every layer into two halves by the G = 2 program, recurse."""
    groups = [(np.tile(np.arange(E), (L, 1)), 0, G)]  # (experts per layer [L, m], first gpu, gpus)
    gpu_of = np.zeros((L, E), dtype=np.int64)
    steps = max(1, G - 1)
    while groups:
        members, g0, gpus = groups.pop()
        if gpus == 1:
            for layer in range(L):
                gpu_of[layer, members[layer]] = g0
            continue
        m = members.shape[1]
        sub = np.stack([c[layer][np.ix_(members[layer], members[layer + 1])] for layer in range(L - 1)]) \
            if L > 1 else np.zeros((0, m, m))
        side, msg = _milp(sub, L, m, 2, time_limit / steps, verbose)
        notes.append(f"bisection of {m} experts onto {gpus} GPUs: {msg}")
        if side is None:
            return None
        left = np.stack([members[layer][side[layer] == 0] for layer in range(L)])
        right = np.stack([members[layer][side[layer] == 1] for layer in range(L)])
        if verbose:
            print(f"[place_experts] split {m} experts x {L} layers onto GPUs {g0}..{g0 + gpus - 1}")
        groups.append((left, g0, gpus // 2))
        groups.append((right, g0 + gpus // 2, gpus // 2))
    return gpu_of


def synthetic_trace(num_tokens: int, num_layers: int, num_experts: int, *, k: int = 1,
                    affinity: float = 0.8, seed: int = 0) -> torch.Tensor:
    """``[tokens, layers, k]`` int64 trace with controllable inter-layer affinity.

    Each layer has a random successor map s_l (a permutation of the experts); a
    token at expert e in layer l goes to s_l(e) with probability ``affinity``,
    else to a uniformly random expert. With k > 1 the other slots are distinct
    random experts.
    """
    if not 0.0 <= affinity <= 1.0:
        raise ValueError(f"expected 0 <= affinity <= 1, got {affinity}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"expected 1 <= k <= num_experts, got {k}")
    g = torch.Generator().manual_seed(seed)
    succ = [torch.randperm(num_experts, generator=g) for _ in range(num_layers)]
    out = torch.empty(num_tokens, num_layers, k, dtype=torch.int64)
    first = torch.randint(0, num_experts, (num_tokens,), generator=g)
    for layer in range(num_layers):
        if layer == 0:
            top = first
        else:
            follow = torch.rand(num_tokens, generator=g) < affinity
            top = torch.where(follow, succ[layer][out[:, layer - 1, 0]],
                              torch.randint(0, num_experts, (num_tokens,), generator=g))
        out[:, layer, 0] = top
        if k > 1:
            scores = torch.rand(num_tokens, num_experts, generator=g)
            scores[torch.arange(num_tokens), top] = -1.0  # exclude the top expert
            out[:, layer, 1:] = scores.topk(k - 1, dim=1).indices
    return out


class RoutingRecorder:
    """Records the top-k routing of a PyTorch MoE model through forward hooks on its gates.

        gates = [layer.mlp.gate for layer in model.layers]   # modules producing router logits [.., E]
        with RoutingRecorder(gates, k=2) as rec:
            model(input_ids)
        trace = rec.trace()   # [tokens, layers, k]

    Each gate's output (logits, or a tuple whose first item is the logits) is
    reduced to its top-k ids per token; calls are concatenated over forwards.
    """

    def __init__(self, gates, k: int) -> None:
        self.gates = list(gates)
        self.k = k
        self._ids: list[list[torch.Tensor]] = [[] for _ in self.gates]
        self._hooks = []

    def __enter__(self) -> "RoutingRecorder":
        for i, gate in enumerate(self.gates):
            def hook(module, inputs, output, i=i):
                logits = output[0] if isinstance(output, (tuple, list)) else output
                self._ids[i].append(logits.detach().reshape(-1, logits.shape[-1]).topk(self.k, -1).indices.cpu())
            self._hooks.append(gate.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def trace(self) -> torch.Tensor:
        per_layer = [torch.cat(x) if x else torch.zeros(0, self.k, dtype=torch.int64) for x in self._ids]
        n = {t.shape[0] for t in per_layer}
        if len(n) != 1:
            raise RuntimeError(f"gates saw different token counts {sorted(n)}: cannot align the trace")
        return torch.stack(per_layer, dim=1)


def affinity_report(trace, placement=None, *, num_experts: int | None = None, png_path: str | None = None) -> dict:
    """Inter-layer routing statistics.

    Returns ``conditional`` ``[layers - 1, E, E]`` (P(expert e' at l+1 | e at l)),
    ``top_successor_share`` (mean over l, e of max_e' P), and with a placement
    ``local_fraction`` (share of transitions that stay on their GPU) and
    ``cross_gpu_routes``. With ``png_path``, plots the conditional matrices
    (needs matplotlib).
    """
    t = _check_trace(trace)
    E = int(t.max()) + 1 if num_experts is None else num_experts
    c = transition_counts(t, E)
    rows = c.sum(-1, keepdims=True)
    cond = np.divide(c, rows, out=np.zeros_like(c), where=rows > 0)
    report = {"conditional": cond,
              "top_successor_share": float(cond.max(-1)[rows[..., 0] > 0].mean()) if c.size else 0.0}
    if placement is not None:
        gpu_of = placement.gpu_of if isinstance(placement, Placement) else np.asarray(placement)
        cross = _objective(c, gpu_of)
        total = float(c.sum())
        report["cross_gpu_routes"] = cross
        report["local_fraction"] = 1.0 - cross / total if total else 1.0
    if png_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = max(1, cond.shape[0])
        cols = min(n, 4)
        fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(3 * cols, 3 * math.ceil(n / cols)),
                                 squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i < cond.shape[0]:
                ax.imshow(cond[i], vmin=0, vmax=1, cmap="viridis")
                ax.set_title(f"layer {i} -> {i + 1}", fontsize=8)
            ax.axis("off")
        fig.suptitle("P(expert at l+1 | expert at l)")
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
        report["png"] = png_path
    return report
