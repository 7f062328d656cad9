"""Server aggregation: FedAvg of the clients' adapter LoRA weighted by n_k (Algorithm 2 line 18).

Updates with NaN/Inf are rejected (reported to the caller) and the others aggregated; if every
update is rejected the caller keeps the previous global state and skips the round.
"""
from __future__ import annotations

import torch


def is_finite(update: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in update.values())


def accepted(updates: list[dict[str, torch.Tensor]], weights: list[float]) -> tuple[list[int], list[int]]:
    """(indices kept, indices rejected): an update is rejected if it holds NaN/Inf or its weight is not > 0."""
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    rejected = [i for i, u in enumerate(updates) if not is_finite(u) or not weights[i] > 0]
    return [i for i in range(len(updates)) if i not in rejected], rejected


def fedavg(updates: list[dict[str, torch.Tensor]], weights: list[float]) -> tuple[dict[str, torch.Tensor] | None, list[int]]:
    """sum_k (n_k / sum n) w_k over the finite updates, accumulated in float32.

    Returns (average or None if nothing was accepted, indices of rejected updates)."""
    keep, rejected = accepted(updates, weights)
    if not keep:
        return None, rejected
    total = float(sum(weights[i] for i in keep))
    out = {}
    for name in updates[keep[0]]:
        acc = torch.zeros_like(updates[keep[0]][name], dtype=torch.float32)
        for i in keep:
            acc += updates[i][name].float() * (weights[i] / total)
        out[name] = acc.to(updates[keep[0]][name].dtype)
    return out, rejected
