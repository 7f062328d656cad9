"""The aggregation strategy interface: what a client uploads, how the server aggregates, what every client downloads.

Algorithm 2 line 7 (download), 17 (upload) and 18 (aggregate). A strategy sees only adapter LoRA tensors: a
client's loss and example count travel beside its upload as their own fixed message (`FIT`, `fit_message`).
Every rank builds the strategy from the agreed adapter schema (strategies.py: `strategy_for`), so its message
schemas need no agreement. Implementations: `FedAvg` (aggregate.py), `FedSRD` / FedSRD-e (fedsrd.py); they
share the pure helpers below and nothing else.

Updates with NaN/Inf (or a weight that is not > 0) are rejected (`accepted`); if every update of a round is
rejected `aggregate` returns None and the protocol stops the run (the global LoRA cannot move).
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from .comm import Schema

State = dict[str, torch.Tensor]

FIT = Schema(("loss", "n_samples"), ((1,), (1,)), "float32")  # line 17: a client's loss and n_k, float32


@runtime_checkable
class Strategy(Protocol):
    """An aggregation strategy, built on every rank as `Strategy(schema, cfg)` from the agreed adapter schema.

    Byte schema: `up` (the upload's messages) and `download_schemas` (a round's download) are fixed Schemas that
    every rank derives alone; `steady_download_size` is what a round after the first downloads. `first` is the
    first round of this process (of the run, or of a resume: the clients then hold no global adapter LoRA)."""

    up: list[Schema]  # line 17: the messages one client uploads, in order (without its `FIT` message)

    def download_schemas(self, rnd: int, first: int) -> list[Schema]:
        """Line 7: the schemas of round `rnd`'s download."""

    def download(self, global_state: State, rnd: int, first: int) -> list[State]:
        """Line 7, server: the messages of round `rnd`'s download."""

    def receive(self, msgs: list[State], held: State | None, rnd: int, first: int) -> State:
        """Line 7, client: the global adapter LoRA after the download (`held`: the one of the previous round)."""

    def pack_upload(self, local: State, received: State) -> list[State]:
        """Line 17, client: the messages (of `up`) for the local adapter LoRA trained from `received`."""

    def unpack_upload(self, msgs: list[State], received: State) -> State:
        """Line 17, server: what `aggregate` takes from one client's messages (`received`: the global sent)."""

    def aggregate(self, updates: list[State], weights: list[float], global_state: State,
                  rnd: int) -> tuple[State | None, list[int]]:
        """Line 18: (the new global adapter LoRA or None if every update was rejected, indices rejected)."""

    def steady_download_size(self) -> tuple[float, float]:
        """(LoRA values, bytes) of a round's download after the first (a mean when rounds alternate)."""


def fit_message(loss: float, n: int) -> State:
    """Line 17, client: the `FIT` message beside a client's upload."""
    return {"loss": torch.tensor([loss], dtype=torch.float32),
            "n_samples": torch.tensor([float(n)], dtype=torch.float32)}


def fit_values(msg: State) -> tuple[float, float]:
    """Line 17, server: (loss, n_k) of a `FIT` message."""
    return float(msg["loss"]), float(msg["n_samples"])


def is_finite(update: State) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in update.values())


def accepted(updates: list[State], weights: list[float]) -> tuple[list[int], list[int]]:
    """Line 18: (indices kept, indices rejected): an update is rejected if it holds NaN/Inf or its weight is not > 0."""
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    rejected = [i for i, u in enumerate(updates) if not is_finite(u) or not weights[i] > 0]
    return [i for i in range(len(updates)) if i not in rejected], rejected


def payload(schemas: list[Schema]) -> tuple[int, int]:
    """(LoRA values, bytes) the messages of `schemas` carry; sparse positions (`<name>.pos`) count as bytes,
    not as values."""
    values = nbytes = 0
    for schema in schemas:
        for name, shape in zip(schema.names, schema.shapes):
            n = math.prod(shape)
            nbytes += n * schema.torch_dtype.itemsize
            values += 0 if name.endswith(".pos") else n
    return values, nbytes


def upload_size(strategy: Strategy) -> tuple[int, int]:
    """(LoRA values, bytes) of one client's upload (without its `FIT` message)."""
    return payload(strategy.up)


def download_size(strategy: Strategy, rnd: int, first: int) -> tuple[int, int]:
    """(LoRA values, bytes) of round `rnd`'s download to one client rank."""
    return payload(strategy.download_schemas(rnd, first))


def traffic(strategy: Strategy) -> tuple[float, float]:
    """(values, bytes) of adapter LoRA one client moves per round, upload + download."""
    (up, up_bytes), (down, down_bytes) = upload_size(strategy), strategy.steady_download_size()
    return up + down, up_bytes + down_bytes
