"""Similarity group pruning (SGP, paper Sec. 4.2, Algorithm 1, eq. 5) and the uniform layer drop of
the FedOT / FedBiOT baselines.

Layer-index convention: x^l is the OUTPUT of decoder layer l, i.e. HF `hidden_states[l + 1]`
(`hidden_states[0]` is the embedding output and, in Llama-style models, the last element is taken
after the final norm). The emulator is layers 0..L_E-1 of the full model and the adapter holds at
least one layer, so every x^l used here (l <= L_E - 1 <= L - 2) is an un-normed layer output.

A group (t, t+n) keeps layer t and removes layers t+1..t+n; d(x^t, x^{t+n}) measures what is lost.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import models
from .host import to_host, to_numpy

TOKEN_MODES = ("last", "all")


def _unit(x: Tensor) -> Tensor:
    """x / ||x|| along the last dim in float32 (a zero vector stays zero)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _unit_angle(ua: Tensor, ub: Tensor) -> Tensor:
    """Angle between unit vectors over pi: 2 * atan2(|ua - ub|, |ua + ub|) / pi, clamped to [0, 1]."""
    angle = 2 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1))
    return (angle / math.pi).clamp(0.0, 1.0)


def angular_distance(a: Tensor, b: Tensor) -> Tensor:
    """Eq. 5: d(a, b) = arccos(cos(a, b)) / pi along the last dim, in float32, within [0, 1].

    Computed as 2 * atan2(|a^ - b^|, |a^ + b^|) / pi on the unit vectors a^, b^, which equals the
    clamped arccos form but stays exact near 0 (arccos of a rounded cosine of identical vectors gives
    ~1e-4, the size of the smallest distances SGP has to rank). A zero vector gives 0.5 (cos = 0).
    """
    return _unit_angle(_unit(a), _unit(b))


def _token_mask(attention_mask: Tensor, token: str) -> Tensor:
    """Boolean [B, S] mask of the tokens that enter the average: each row's last non-pad token or all non-pad."""
    mask = attention_mask.bool()
    if token == "all":
        return mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    return positions == last.unsqueeze(1)


def _batch_distance_sums(hidden: Tensor, select: Tensor, n_max: int) -> Tensor:
    """Sum over selected tokens of d(x^l, x^{l+n}) for one batch: float64 [n_max, L_E], NaN-free (0 where l+n >= L_E).

    hidden is [B, S, L_E, H] (x^0..x^{L_E-1}); select is a boolean [B, S] token mask.
    """
    units = _unit(hidden[select])  # [T, L_E, H]
    num_layers = units.shape[1]
    sums = torch.zeros(n_max, num_layers, dtype=torch.float64)
    for n in range(1, n_max + 1):
        d = _unit_angle(units[:, :-n], units[:, n:])  # [T, L_E - n], eq. 5
        sums[n - 1, : num_layers - n] = to_host(d.double().sum(dim=0))
    return sums


def _check_profile_args(n_max: int, num_emulator_layers: int, token: str) -> None:
    if token not in TOKEN_MODES:
        raise ValueError(f"token must be one of {TOKEN_MODES}, got {token!r}")
    if num_emulator_layers < 2:
        raise ValueError(f"num_emulator_layers must be >= 2, got {num_emulator_layers}")
    if not 1 <= n_max <= num_emulator_layers - 1:
        raise ValueError(f"n_max must be in [1, {num_emulator_layers - 1}], got {n_max}")


def _profile_sums(model, batches: Iterable[dict], n_max: int, num_emulator_layers: int, token: str,
                  progress: Callable[[int], None] | None) -> tuple[torch.Tensor, int]:
    """Sums of eq. 5's distances over the selected tokens of every batch, and how many tokens were selected."""
    device = next(model.parameters()).device
    sums = torch.zeros(n_max, num_emulator_layers, dtype=torch.float64)
    count = 0
    for i, batch in enumerate(batches):
        mask = batch["attention_mask"].to(device)
        num_layers = len(models.get_layers(model))
        if num_emulator_layers > num_layers - 1:
            raise ValueError(f"num_emulator_layers={num_emulator_layers} leaves no adapter layer in a "
                             f"{num_layers}-layer model")
        # x^0..x^{L_E-1}: only the emulator's L_E layers run (no adapter layers, no LM head)
        hidden = models.layer_outputs(model, batch["input_ids"].to(device), mask, num_emulator_layers)
        select = _token_mask(mask, token)
        sums += _batch_distance_sums(hidden, select, n_max)
        count += int(select.sum())
        if progress is not None:
            progress(i + 1)
    return sums, count


@torch.no_grad()
def distance_profile(model, batches: Iterable[dict], n_max: int, num_emulator_layers: int, token: str = "last",
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Algorithm 1 lines 1-5 (eq. 5) for every n <= n_max at once, averaged over the public set.

    One pass per batch through the first L_E layers only. Returns float32 [n_max, L_E] with
    distance[n-1, l] = d(x^l, x^{l+n}) averaged over samples (token="last": each row's last non-pad
    token) or over all non-pad tokens, each token weighted equally (token="all"); NaN where l+n >= L_E.
    `progress`, if given, is called with the number of batches done after each batch.
    The model runs in eval mode (its modules' training flags are restored afterwards).
    """
    _check_profile_args(n_max, num_emulator_layers, token)
    with models.mode(model):
        sums, count = _profile_sums(model, batches, n_max, num_emulator_layers, token, progress)
    if count == 0:
        raise ValueError("distance_profile got no non-pad tokens")
    distance = to_numpy((sums / count).float())
    l_idx, n_idx = np.meshgrid(np.arange(num_emulator_layers), np.arange(1, n_max + 1))
    distance[l_idx + n_idx >= num_emulator_layers] = np.nan
    return distance


def _group_costs(distance: np.ndarray, n: int, p: int, max_distance: float = 0.0) -> list[float]:
    """Eq. 5 cost d(x^t, x^{t+n}) of every group start t = 0..L_E-n-1; inf where it exceeds max_distance (> 0).

    Raises ValueError for bad (n, p), groups that cannot fit, or a NaN inside the emulator."""
    num_emulator_layers = distance.shape[1]
    if n < 1 or p < 1:
        raise ValueError(f"n and p must be >= 1, got n={n}, p={p}")
    if n > distance.shape[0]:
        raise ValueError(f"n={n} exceeds the profile's n_max={distance.shape[0]}")
    if p * (n + 1) > num_emulator_layers:
        raise ValueError(f"p={p} groups of n={n} (+1 kept) layers do not fit in L_E={num_emulator_layers} layers")
    cost = [float(c) for c in distance[n - 1, : num_emulator_layers - n]]
    if any(math.isnan(c) for c in cost):
        raise ValueError(f"distance profile has NaN inside the emulator for n={n}")
    if max_distance > 0:
        cost = [c if c <= max_distance else math.inf for c in cost]
    return cost


def _trace_groups(cost: list[float], best: list[list[float]], n: int, p: int) -> list[tuple[int, int]]:
    """The groups of the optimum best[0][p] (finite), the lowest start first among ties."""
    groups, t, k = [], 0, p
    while k > 0:
        if cost[t] + best[min(t + n + 1, len(cost))][k - 1] <= best[t + 1][k]:  # taking t ties -> take
            groups.append((t, t + n))
            t, k = t + n + 1, k - 1
        else:
            t += 1
    return groups


def choose_groups(distance: np.ndarray, n: int, p: int, max_distance: float = 0.0) -> list[tuple[int, int]]:
    """Algorithm 1 line 6 (Find_Min_Distance), solved exactly by dynamic programming.

    Picks p groups (t, t+n) inside the emulator (t+n <= L_E-1, L_E = distance.shape[1]) whose closed
    intervals [t, t+n] are pairwise disjoint, minimizing the sum of distance[n-1, t]. Among optimal
    choices the lexicographically smallest list of starts wins (lowest t first). With max_distance > 0
    only groups with distance[n-1, t] <= max_distance may be chosen (ValueError if p of them cannot be
    placed; `cap_groups` shrinks p instead). Returns sorted [(t_i, t_i + n)].
    """
    cost = _group_costs(distance, n, p, max_distance)
    best = _suffix_optimum(cost, n, p)
    if math.isinf(best[0][p]):
        raise ValueError(f"no {p} disjoint groups of n={n} have d(x^t, x^(t+n)) <= max_distance={max_distance:g}")
    return _trace_groups(cost, best, n, p)


def cap_groups(distance: np.ndarray, n: int, p: int, max_distance: float) -> list[tuple[int, int]]:
    """sgp.max_distance with a fixed n: the optimal groups of the largest p' <= p for which p' disjoint groups
    with distance[n-1, t] <= max_distance exist (p' = 0: no group qualifies, []). Feasibility is monotone in
    p' (drop any group of a feasible set), so p' = max{k : best[0][k] < inf} of the same DP."""
    cost = _group_costs(distance, n, p, max_distance)
    best = _suffix_optimum(cost, n, p)
    k = max(k for k in range(p + 1) if math.isfinite(best[0][k]))
    return _trace_groups(cost, best, n, k)


def _suffix_optimum(cost: list[float], n: int, p: int) -> list[list[float]]:
    """best[i][k] = minimal summed cost of k disjoint groups whose starts are >= i (inf if impossible)."""
    m = len(cost)
    best = [[0.0] + [math.inf] * p for _ in range(m + 1)]
    for i in range(m - 1, -1, -1):
        nxt = best[min(i + n + 1, m)]
        for k in range(1, p + 1):
            best[i][k] = min(best[i + 1][k], cost[i] + nxt[k - 1])
    return best


# ---- automatic (n, p): sgp.auto --------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One (n, p) that auto considered: its optimal groups (choose_groups) and their summed eq. 5 cost
    sum_i d(x^{t_i}, x^{t_i + n}); cost = inf (groups = []) when max_distance leaves no placement."""
    n: int
    p: int
    cost: float
    groups: list[tuple[int, int]]

    @property
    def per_layer(self) -> float:
        """The selection criterion: summed group distance per removed layer, cost / (n p)."""
        return self.cost / (self.n * self.p) if self.n * self.p else math.nan


def auto_pairs(remove_layers: int, num_emulator_layers: int, n_max: int = 0) -> list[tuple[int, int]]:
    """Every (n, p) with n * p = remove_layers whose p groups of n + 1 layers fit the emulator
    (p (n + 1) <= L_E) and n <= n_max (0 = no cap), by increasing n."""
    return [(n, remove_layers // n) for n in range(1, remove_layers + 1)
            if remove_layers % n == 0 and (remove_layers // n) * (n + 1) <= num_emulator_layers
            and (n_max == 0 or n <= n_max)]


def _candidate(distance: np.ndarray, n: int, p: int, max_distance: float) -> Candidate:
    try:
        groups = choose_groups(distance, n, p, max_distance)
    except ValueError:
        if max_distance <= 0:
            raise
        return Candidate(n, p, math.inf, [])
    return Candidate(n, p, math.fsum(float(distance[n - 1, t]) for t, _ in groups), groups)


def choose_auto(distance: np.ndarray, remove_layers: int, n_max: int = 0,
                max_distance: float = 0.0) -> tuple[Candidate, list[Candidate]]:
    """sgp.auto: remove K = remove_layers emulator layers as p groups of n (n * p = K), (n, p) chosen.

    For every (n, p) of `auto_pairs` (n <= n_max, or up to the profile's n_max), the exact DP gives the best
    groups and their summed cost C(n, p) = sum_i d(x^{t_i}, x^{t_i + n}) (eq. 5). The chosen (n, p) has the
    lowest C / K, the angular distance lost per removed layer (ties: the smaller n, i.e. more, shorter groups).
    At a fixed K this is the lowest C; the per-layer form makes the rows of different K comparable.

    Why C: a group (t, t+n) hands x^t to layer t+n+1 where the full model hands it x^{t+n}, so d(x^t, x^{t+n}) is
    the error the group injects, and the sub-LLM's error is to first order the sum over its groups.
    Bias to know: the angular distance is a metric, so d(x^t, x^{t+n}) <= sum of the distances of any split of
    [t, t+n], and one long group usually costs less than several short ones (on SmolLM2 at K = 12 the argmin
    is n = 12, p = 1, one contiguous block as in Gromov et al. 2024). sgp.n_max caps n; max_distance bounds
    every group's distance, which also rules out long groups.

    max_distance > 0: a group may be chosen only if d(x^t, x^{t+n}) <= max_distance; an (n, p) with no such
    placement has C = inf. If no (n, p) of K has one, K is an upper bound: K - 1, K - 2, ... are tried until
    some (n, p) fits (K' = 0: nothing qualifies, the returned candidate has n = p = 0 and no groups).
    Returns (chosen, every candidate tried, K first). ValueError if K has no (n, p) that fits the emulator.
    """
    n_cap = min(n_max or distance.shape[0], distance.shape[0])
    if not auto_pairs(remove_layers, distance.shape[1], n_cap):
        raise ValueError(f"no n * p = {remove_layers} with n <= {n_cap} fits L_E={distance.shape[1]} layers")
    tried: list[Candidate] = []
    for k in range(remove_layers, 0, -1):
        found = [_candidate(distance, n, p, max_distance) for n, p in auto_pairs(k, distance.shape[1], n_cap)]
        tried += found
        feasible = [c for c in found if math.isfinite(c.cost)]
        if feasible:
            return min(feasible, key=lambda c: (c.per_layer, c.n)), tried
    return Candidate(0, 0, 0.0, []), tried


def kept_layers(num_layers: int, groups: Iterable[tuple[int, int]]) -> list[int]:
    """Algorithm 1 line 7: full-model layer indices that survive, i.e. all minus t+1..t+n of each group."""
    covered: set[int] = set()
    removed: set[int] = set()
    for t, end in groups:
        if not 0 <= t < end < num_layers:
            raise ValueError(f"group ({t}, {end}) is not inside a {num_layers}-layer model")
        span = set(range(t, end + 1))
        if span & covered:
            raise ValueError(f"group ({t}, {end}) overlaps another group")
        covered |= span
        removed |= span - {t}
    return [layer for layer in range(num_layers) if layer not in removed]


def layer_map(groups: Iterable[tuple[int, int]], kept: list[int]) -> list[tuple[int, int]]:
    """Sec. 4.3 mapping I_i = (t_i, s_i): s_i is the index of kept layer t_i in the sub-model."""
    position = {layer: i for i, layer in enumerate(kept)}
    result = []
    for t, _ in groups:
        if t not in position:
            raise ValueError(f"group start {t} is not a kept layer")
        result.append((t, position[t]))
    return result


@dataclass
class SGPResult:
    """Outputs of Algorithm 1: the distance profile, chosen groups, kept full-model layers and I; the (n, p) the
    groups have (auto or max_distance may change them) and the candidates that were compared."""
    distance: np.ndarray
    groups: list[tuple[int, int]]
    kept: list[int]
    layer_map: list[tuple[int, int]]
    n: int = 0
    p: int = 0
    candidates: list[Candidate] = field(default_factory=list)


def select_groups(distance: np.ndarray, n: int, p: int, remove_layers: int = 0, n_max: int = 0,
                  max_distance: float = 0.0) -> tuple[int, int, list[tuple[int, int]], list[Candidate]]:
    """Algorithm 1 line 6 for the three configurations: (n, p, groups, candidates).

    remove_layers = K > 0: `choose_auto` (n, p chosen, every candidate listed); else the fixed (n, p) with
    `choose_groups`, or with max_distance > 0 `cap_groups` (p shrinks to what fits under the cap). The fixed
    route lists its one (n, p) as the only candidate."""
    if remove_layers > 0:
        chosen, tried = choose_auto(distance, remove_layers, n_max, max_distance)
        return chosen.n, chosen.p, chosen.groups, tried
    groups = cap_groups(distance, n, p, max_distance) if max_distance > 0 else choose_groups(distance, n, p)
    cost = math.fsum(float(distance[n - 1, t]) for t, _ in groups)
    return n, len(groups), groups, [Candidate(n, len(groups), cost, groups)]


def run_sgp(model, batches: Iterable[dict], n: int, p: int, num_emulator_layers: int, n_max: int | None = None,
            token: str = "last", remove_layers: int = 0, max_distance: float = 0.0,
            progress: Callable[[int], None] | None = None) -> SGPResult:
    """Algorithm 1 end to end on the full model (L layers). n_max defaults to the whole profile (L_E - 1).

    remove_layers > 0: automatic (n, p) (`choose_auto`; n and p are ignored, n_max caps the group length);
    max_distance > 0: every chosen group has d(x^t, x^{t+n}) <= max_distance (`select_groups`)."""
    n_max = num_emulator_layers - 1 if n_max is None else n_max
    if remove_layers <= 0 and n > n_max:
        raise ValueError(f"n={n} exceeds n_max={n_max}")
    distance = distance_profile(model, batches, n_max, num_emulator_layers, token, progress)
    n, p, groups, candidates = select_groups(distance, n, p, remove_layers, n_max, max_distance)
    kept = kept_layers(model.config.num_hidden_layers, groups)
    return SGPResult(distance, groups, kept, layer_map(groups, kept), n, p, candidates)


def uniform_drop(num_layers: int, first_adapter: int, last_adapter: int, n_drop: int,
                 spacing: str = "round") -> list[int]:
    """Kept layers of the FedOT / FedBiOT uniform layer-drop emulator (the paper's baselines).

    The first `first_adapter` and last `last_adapter` layers form the adapter and are kept; of the
    m = num_layers - first_adapter - last_adapter middle layers, k = m - n_drop are kept at
    middle positions f(i * (m - 1) / (k - 1)), i = 0..k-1 (so the first and last middle layers stay):
      spacing="round": f = Python round (half to even), as mit-han-lab/offsite-tuning
                       `uniform_choose_layers` (offsite_tuning/utils.py), used by FedOT;
      spacing="int":   f = int (truncation), as alibaba/FederatedScope `model_drop_layer`
                       (federatedscope/llm/offsite_tuning/utils.py), used by FedBiOT.
    (FederatedScope also clamps its emulator to layers 1..L-2; here the adapter sizes are taken as
    given.) k = 1 keeps the first middle layer.
    """
    if spacing not in ("round", "int"):
        raise ValueError(f"spacing must be 'round' or 'int', got {spacing!r}")
    middle = num_layers - first_adapter - last_adapter
    if first_adapter < 0 or last_adapter < 0 or middle < 1:
        raise ValueError(f"adapter {first_adapter}+{last_adapter} leaves no middle layer in {num_layers} layers")
    keep = middle - n_drop
    if not 1 <= keep <= middle:
        raise ValueError(f"n_drop={n_drop} must be in [0, {middle - 1}] for {middle} middle layers")
    stride = (middle - 1) / (keep - 1) if keep > 1 else 0.0
    pick = round if spacing == "round" else int
    chosen = [first_adapter + pick(i * stride) for i in range(keep)]
    return list(range(first_adapter)) + chosen + list(range(num_layers - last_adapter, num_layers))
