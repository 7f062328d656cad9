"""FedAvg (McMahan et al. 2017) as an aggregation strategy (strategy.py's `Strategy`), and its pure average.

A sampled client uploads its local adapter LoRA, the server averages the uploads weighted by n_k, and every
client rank downloads the dense global adapter LoRA.
"""
from __future__ import annotations

import torch

from .comm import Schema
from .strategy import State, accepted, payload


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


class FedAvg:
    """FedAvg: dense local LoRA up, weighted average, dense global LoRA down (every round)."""

    def __init__(self, schema: Schema, cfg):
        self.schema, self.cfg = schema, cfg
        self.shapes = dict(zip(schema.names, schema.shapes))
        self.up = [schema]

    def download_schemas(self, rnd: int, first: int) -> list[Schema]:
        """Line 7: the dense global adapter LoRA."""
        return [self.schema]

    def download(self, global_state: State, rnd: int, first: int) -> list[State]:
        """Line 7, server: the dense global adapter LoRA."""
        return [global_state]

    def receive(self, msgs: list[State], held: State | None, rnd: int, first: int) -> State:
        """Line 7, client: the global adapter LoRA as received."""
        return msgs[0]

    def pack_upload(self, local: State, received: State) -> list[State]:
        """Line 17, client: the local adapter LoRA."""
        return [local]

    def unpack_upload(self, msgs: list[State], received: State) -> State:
        """Line 17, server: a copy of the client's local adapter LoRA (out of the receive buffer)."""
        return {n: msgs[0][n].clone() for n in self.shapes}

    def aggregate(self, updates: list[State], weights: list[float], global_state: State,
                  rnd: int) -> tuple[State | None, list[int]]:
        """Line 18: the n_k-weighted average of the accepted local LoRAs (`fedavg`)."""
        return fedavg(updates, weights)

    def steady_download_size(self) -> tuple[int, int]:
        """Every round downloads the dense global adapter LoRA."""
        return payload([self.schema])
