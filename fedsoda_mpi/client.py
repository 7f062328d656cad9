"""Client side: local training of the adapter LoRA on the (NF4) sub-LLM with a proximal term (eq. 9-10).

Algorithm 2 lines 15-18: starting from the global adapter LoRA w^(t-1), run H local epochs (or
`fed.local_steps` steps) of AdamW on F_k(w) + mu/2 ||w - w^(t-1)||^2, then upload w_k^(t) and n_k.

The sub-emulator (with its aligned LoRA) is frozen between re-alignments, so its output for a
local example never changes: `EmulatorCache` keeps it per example and local steps run only the
adapter layers (plus the LM head at label positions). Re-alignment invalidates the cache.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from . import models
from .data import pad_batch
from .methods import Plan


FILL_BATCH = 16  # examples per emulator pass when a client's cache is filled


class EmulatorCache:
    """Per-example output of the frozen sub-emulator (the adapter's input), unpadded [len, D]."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.store: dict[tuple[int, int], torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0  # wall time in `hidden` (emulator passes + assembling cached rows), for /timing

    def invalidate(self) -> None:
        """Called when re-alignment changes the emulator LoRA (Algorithm 2 line 13)."""
        self.store.clear()

    def keep(self, clients: set[int]) -> None:
        """Drop the entries of every client not in `clients` (the ones placed on this rank this round)."""
        for key in [key for key in self.store if key[0] not in clients]:
            del self.store[key]

    @torch.no_grad()
    def fill(self, model, plan: Plan, client: int, examples: list[dict], pad_id: int) -> None:
        """Compute the emulator output E*(x) of every example of `client` not cached yet (all of them or none:
        entries are only ever dropped per client), in right-padded batches of FILL_BATCH examples sorted by
        (length, index). The batches depend only on the client's examples, never on the local schedule, so a
        resumed run (empty cache) refills every value bit for bit; sorting by length keeps padding small."""
        if not self.enabled:
            return
        t0 = time.perf_counter()
        missing = sorted((len(e["input_ids"]), j) for j, e in enumerate(examples) if (client, j) not in self.store)
        device = next(model.parameters()).device
        for start in range(0, len(missing), FILL_BATCH):
            chunk = missing[start:start + FILL_BATCH]
            batch = pad_batch([examples[j] for _, j in chunk], pad_id)
            h = _emulator(model, plan, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for row, (n, j) in enumerate(chunk):
                self.store[(client, j)] = h[row, :n].to("cpu", copy=True)
        self.misses += len(missing)
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def hidden(self, model, plan: Plan, client: int, idx: list[int], batch: dict) -> torch.Tensor:
        """Adapter input for a padded batch: the cached rows (after `fill`), or one emulator pass without a cache.

        The cache lives in host memory (on GPU runs a batch is copied to the device per step)."""
        t0 = time.perf_counter()
        try:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if not self.enabled:
                return _emulator(model, plan, ids, mask)
            self.hits += len(idx)
            out = torch.zeros(ids.shape[0], ids.shape[1], self._dim(model), dtype=self.store[(client, idx[0])].dtype)
            for i, (j, n) in enumerate(zip(idx, mask.sum(1).tolist())):
                out[i, :n] = self.store[(client, j)]
            return out.to(ids.device)
        finally:
            self.seconds += time.perf_counter() - t0

    @staticmethod
    def _dim(model) -> int:
        return models.base_model(model).config.hidden_size


def _emulator(model, plan: Plan, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward of the frozen sub-emulator E* (eval mode: no dropout), giving the adapter's input."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        h = models.hidden_before_layer(model, ids, mask, plan.train_start)
    model.train(was_training)
    return h


def proximal(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """mu/2 ||w_k - w^(t-1)||^2, the proximal term of eq. 9 (its gradient is eq. 10's second term)."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


def batch_schedule(n: int, batch_size: int, steps: int, epochs: int, rng: np.random.Generator) -> list[list[int]]:
    """Example indices per local step: `steps` batches (reshuffling each pass), or `epochs` full passes."""
    per_epoch = math.ceil(n / batch_size)
    total = steps if steps > 0 else epochs * per_epoch
    order: list[int] = []
    while len(order) < total * batch_size:
        order += rng.permutation(n).tolist()
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(total)]


def local_train(model, plan: Plan, params: list[torch.nn.Parameter], examples: list[dict], pad_id: int,
                cache: EmulatorCache, client: int, steps: int, epochs: int, batch_size: int, lr: float, mu: float,
                rng: np.random.Generator) -> tuple[float, int]:
    """Algorithm 2 line 16: local AdamW (betas 0.9, 0.95) on the adapter LoRA; returns (mean task loss, steps).

    `params` must hold the global adapter LoRA on entry (the proximal anchor w^(t-1))."""
    anchor = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    model.train()
    losses = []
    device = next(model.parameters()).device
    cache.fill(model, plan, client, examples, pad_id)
    for idx in batch_schedule(len(examples), batch_size, steps, epochs, rng):
        batch = {k: v.to(device) for k, v in pad_batch([examples[i] for i in idx], pad_id).items()}
        h = cache.hidden(model, plan, client, idx, batch)
        final = models.forward_from_layer(model, h, batch["attention_mask"], plan.train_start)
        loss = models.label_loss(model, final, batch["labels"])
        total = loss + proximal(params, anchor, mu) if mu > 0 else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(loss.item())
    return (float(np.mean(losses)) if losses else float("nan")), len(losses)
