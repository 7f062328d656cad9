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
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import models

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
        sums[n - 1, : num_layers - n] = d.double().sum(dim=0).cpu()
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
    distance = (sums / count).float().numpy()
    l_idx, n_idx = np.meshgrid(np.arange(num_emulator_layers), np.arange(1, n_max + 1))
    distance[l_idx + n_idx >= num_emulator_layers] = np.nan
    return distance


def choose_groups(distance: np.ndarray, n: int, p: int) -> list[tuple[int, int]]:
    """Algorithm 1 line 6 (Find_Min_Distance), solved exactly by dynamic programming.

    Picks p groups (t, t+n) inside the emulator (t+n <= L_E-1, L_E = distance.shape[1]) whose closed
    intervals [t, t+n] are pairwise disjoint, minimizing the sum of distance[n-1, t]. Among optimal
    choices the lexicographically smallest list of starts wins (lowest t first). Returns sorted
    [(t_i, t_i + n)].
    """
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
    best = _suffix_optimum(cost, n, p)
    groups, t, k = [], 0, p
    while k > 0:
        if cost[t] + best[min(t + n + 1, len(cost))][k - 1] <= best[t + 1][k]:  # taking t ties -> take
            groups.append((t, t + n))
            t, k = t + n + 1, k - 1
        else:
            t += 1
    return groups


def _suffix_optimum(cost: list[float], n: int, p: int) -> list[list[float]]:
    """best[i][k] = minimal summed cost of k disjoint groups whose starts are >= i (inf if impossible)."""
    m = len(cost)
    best = [[0.0] + [math.inf] * p for _ in range(m + 1)]
    for i in range(m - 1, -1, -1):
        nxt = best[min(i + n + 1, m)]
        for k in range(1, p + 1):
            best[i][k] = min(best[i + 1][k], cost[i] + nxt[k - 1])
    return best


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
    """Outputs of Algorithm 1: the distance profile, chosen groups, kept full-model layers and I."""
    distance: np.ndarray
    groups: list[tuple[int, int]]
    kept: list[int]
    layer_map: list[tuple[int, int]]


def run_sgp(model, batches: Iterable[dict], n: int, p: int, num_emulator_layers: int, n_max: int | None = None,
            token: str = "last") -> SGPResult:
    """Algorithm 1 end to end on the full model (L layers). n_max defaults to the whole profile (L_E - 1)."""
    n_max = num_emulator_layers - 1 if n_max is None else n_max
    if n > n_max:
        raise ValueError(f"n={n} exceeds n_max={n_max}")
    distance = distance_profile(model, batches, n_max, num_emulator_layers, token)
    groups = choose_groups(distance, n, p)
    kept = kept_layers(model.config.num_hidden_layers, groups)
    return SGPResult(distance, groups, kept, layer_map(groups, kept))


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
