"""Aggregation strategies: what a client uploads, how the server aggregates, what every client downloads next.

Algorithm 2 line 7 (download), 17 (upload) and 18 (aggregate). A strategy is chosen once from `fed.aggregator`
(`strategy_for`) and built on every rank from the agreed adapter schema, so its message schemas need no
agreement. `FedAvg` lives here; `FedSRD` / FedSRD-e (sparse uploads and downloads) in fedsrd.py.

Updates with NaN/Inf (or a weight that is not > 0) are rejected and reported; if every update of a round is
rejected the strategy returns None and the protocol stops the run (the global LoRA cannot move).
"""
from __future__ import annotations

import math
from functools import partial

import torch

from .comm import Schema

State = dict[str, torch.Tensor]
TAIL = ("__loss", "__n_samples")  # the two scalars every upload carries after its LoRA tensors


def is_finite(update: State) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in update.values())


def accepted(updates: list[State], weights: list[float]) -> tuple[list[int], list[int]]:
    """(indices kept, indices rejected): an update is rejected if it holds NaN/Inf or its weight is not > 0."""
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    rejected = [i for i, u in enumerate(updates) if not is_finite(u) or not weights[i] > 0]
    return [i for i in range(len(updates)) if i not in rejected], rejected


def fedavg(updates: list[State], weights: list[float]) -> tuple[State | None, list[int]]:
    """Algorithm 2 line 18: sum_k (n_k / sum n) w_k over the finite updates, accumulated in float32.

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


def payload(schemas: list[Schema]) -> tuple[int, int]:
    """(LoRA values, bytes) the messages of `schemas` carry, without the upload's two scalars (TAIL); sparse
    positions (`<name>.pos`) count as bytes, not as values."""
    values = nbytes = 0
    for schema in schemas:
        for name, shape in zip(schema.names, schema.shapes):
            if name in TAIL:
                continue
            n = math.prod(shape)
            nbytes += n * schema.torch_dtype.itemsize
            values += 0 if name.endswith(".pos") else n
    return values, nbytes


def tail(loss: float, n: int) -> State:
    return {"__loss": torch.tensor([loss], dtype=torch.float32), "__n_samples": torch.tensor([float(n)], dtype=torch.float32)}


class FedAvg:
    """FedAvg: a sampled client uploads its local adapter LoRA (+ loss, n_k), the server averages the uploads
    weighted by n_k, and every client rank downloads the dense global adapter LoRA."""

    def __init__(self, schema: Schema, cfg):
        self.schema, self.cfg = schema, cfg
        self.shapes = dict(zip(schema.names, schema.shapes))
        self.up = [Schema(schema.names + TAIL, schema.shapes + ((1,), (1,)), schema.dtype)]

    # Algorithm 2 line 7: what round `rnd` downloads (`first`: the first round of this run or of this resume)
    def download_schemas(self, rnd: int, first: int) -> list[Schema]:
        return [self.schema]

    def download(self, global_state: State, rnd: int, first: int) -> list[State]:
        """Server: the messages of round `rnd`'s download."""
        return [global_state]

    def receive(self, msgs: list[State], held: State | None, rnd: int, first: int) -> State:
        """Client: the global adapter LoRA after the download (`held`: the one of the previous round)."""
        return msgs[0]

    # Algorithm 2 line 17
    def pack_upload(self, local: State, received: State, loss: float, n: int) -> list[State]:
        return [{**local, **tail(loss, n)}]

    def unpack_upload(self, msgs: list[State], received: State) -> tuple[State, float, float]:
        """(what `aggregate` takes from this client, its loss, n_k): for FedAvg the local LoRA itself."""
        last = msgs[-1]
        return {n: last[n].clone() for n in self.shapes}, float(last["__loss"]), float(last["__n_samples"])

    # Algorithm 2 line 18
    def aggregate(self, updates: list[State], weights: list[float], global_state: State,
                  rnd: int) -> tuple[State | None, list[int]]:
        """(the new global adapter LoRA or None if every update was rejected, indices of the rejected)."""
        return fedavg(updates, weights)

    # bytes, from the schemas
    def upload_size(self) -> tuple[int, int]:
        """(LoRA values, bytes) of one client's upload, without loss and n_k."""
        return payload(self.up)

    def download_size(self, rnd: int, first: int) -> tuple[int, int]:
        return payload(self.download_schemas(rnd, first))

    def steady_download_size(self) -> tuple[float, float]:
        """download_size of a round after the first (a mean when rounds alternate between messages)."""
        return self.download_size(2, 1)

    def traffic(self) -> tuple[float, float]:
        """(values, bytes) of adapter LoRA one client moves per round, upload + download."""
        (up, up_bytes), (down, down_bytes) = self.upload_size(), self.steady_download_size()
        return up + down, up_bytes + down_bytes


def strategy_for(cfg, schema: Schema) -> FedAvg:
    """The strategy named by fed.aggregator, built from the agreed dense adapter schema."""
    from .fedsrd import FedSRD

    strategies = {"fedavg": FedAvg, "fedsrd": partial(FedSRD, svd=True), "fedsrd-e": partial(FedSRD, svd=False)}
    return strategies[cfg.fed.aggregator](schema, cfg)
