"""How far the aligned sub-LLM M* has drifted from the full LLM M, and when that calls for a re-alignment
(Algorithm 2 line 9 with oda.trigger=drift).

    DriftMonitor  the trigger's state (the probe after the latest round, its value just after the latest alignment,
                  that alignment's round) and the decision; takes the probe as a function, so it runs without a model
    DriftProbes   the two probes on the fixed held-out probe batch, each recomputed only when its inputs changed:
                  the output probe (KL(M || M*) at the logits, eq. 7; what the trigger reads, /rounds/drift_probe)
                  and the L_inter probe (angular distances at the aligned layers, eq. 5/6; /drift)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import models, oda
from .host import to_numpy
from .methods import Plan
from .runlog import RunLog


class DriftMonitor:
    """Algorithm 2 line 9 with oda.trigger=drift: re-align when the output drift probe after a round exceeds
    `threshold` (tau) x its value just after the last alignment, or after `max_interval` rounds (0 = never)."""

    def __init__(self, threshold: float, max_interval: int, measure: Callable[[], float]):
        """`measure` returns the output drift probe of the models as they are now (`DriftProbes.output`)."""
        self.threshold, self.max_interval, self.measure = threshold, max_interval, measure
        self.probe, self.ref, self.last_aligned = float("nan"), float("nan"), 0

    def mark_aligned(self, rnd: int) -> None:
        """Lines 3-5 / 9-13 just done at round `rnd` (0: pre-alignment): the output drift probe now is the
        reference that later probes are compared with."""
        self.ref = self.probe = self.measure()
        self.last_aligned = rnd

    def after_round(self) -> float:
        """After line 18: the output drift probe with the new global adapter (the next round's decision reads it)."""
        self.probe = self.measure()
        return self.probe

    def realign_due(self, rnd: int) -> bool:
        """Line 9 for round `rnd` (`oda.realign_due`): the probe after the previous round exceeds tau x the
        reference, or max_interval rounds passed since the last alignment."""
        return oda.realign_due(rnd, self.last_aligned, self.probe, self.ref, self.threshold, self.max_interval)

    def restore(self, log: RunLog) -> None:
        """Resume: the state from the run file (the checkpoint's copy): the last /rounds row's probe and reference,
        the last round with /rounds/realigned set (0 if none). A run file without the probe columns gets NaN rows
        for its rounds (only max_interval can then re-align)."""
        rounds, realigned = log.column("rounds", "round"), log.column("rounds", "realigned")
        if rounds is None or not len(rounds):
            return
        for key in ("drift_probe", "drift_ref"):
            if log.column("rounds", key) is None:
                for _ in rounds:
                    log.append("rounds", {key: np.float32("nan")})
        self.probe = float(log.column("rounds", "drift_probe")[-1])
        self.ref = float(log.column("rounds", "drift_ref")[-1])
        self.last_aligned = int(rounds[realigned == 1].max()) if (realigned == 1).any() else 0


class DriftProbes:
    """The drift probes of M (with the adapter LoRA plugged in) and M* on one held-out batch."""

    def __init__(self, full, sub, plan: Plan, batch: dict, emulator_lora: Callable[[], dict[str, torch.Tensor]],
                 sub_is_full: bool):
        """`emulator_lora` returns M*'s emulator LoRA as it is now; `sub_is_full`: M* is M (FedPETuning)."""
        self.full, self.sub, self.plan, self.batch = full, sub, plan, batch
        self.emulator_lora, self.sub_is_full = emulator_lora, sub_is_full
        self._inter = None  # (LoRA tensors the last L_inter probe saw, its value)
        self._inputs = None  # (the emulator LoRA they were computed with, the adapters' inputs on the probe batch)

    def output(self) -> float:
        """The output drift probe: KL(M || M*) (eq. 7, as `oda.kl_divergence` computes it) on the probe batch, with
        the current global adapter LoRA plugged into both models; as float32 (what /rounds/drift_probe stores, so a
        decision made from memory equals one made from the run file after a resume). NaN when M* is M.

        Why the output and not the L_inter probe (`inter`): FedSODA's adapter layers sit above every aligned layer
        and the emulator LoRA is frozen between re-alignments, so L_inter's angular distances cannot move until the
        next re-alignment and a trigger on them would never fire. What moves as the global adapter trains is how
        the adapter's layers respond to the emulator's output mismatch, seen at the logits: the L_KL term of eq. 8
        that ODA corrects. Run once per round (every round's aggregation changes the adapter) and once after each
        alignment, on one batch of oda.batch_size held-out paragraphs: the hidden states entering M's and M*'s
        adapters are computed once per emulator LoRA (`adapter_inputs`), so a round runs only the two adapters,
        the final norms and the LM heads (`oda.adapter_kl`)."""
        if self.sub_is_full:
            return float("nan")
        hidden, starts = self.adapter_inputs()
        return float(np.float32(oda.adapter_kl(self.full, self.sub, self.batch, hidden, starts)))

    def adapter_inputs(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
        """The probe batch's hidden states entering M's and M*'s adapters (and those layers' indices), recomputed
        only when the emulator LoRA changed (an alignment, or a resume): nothing else below the adapters changes."""
        p = self.plan
        starts = (0 if p.adapter_first else p.num_layers - p.adapter_size, p.train_start)
        emulator = self.emulator_lora()
        if self._inputs is None or emulator.keys() != self._inputs[0].keys() or \
                not all(torch.equal(emulator[k], self._inputs[0][k]) for k in emulator):
            self._inputs = (emulator, oda.adapter_inputs(self.full, self.sub, self.batch, starts))
        return self._inputs[1], starts

    @torch.no_grad()
    def inter(self) -> np.ndarray:
        """Angular distance between sub-LLM layer s_i and full-LLM layer t_i + n on the probe batch
        (`oda.aligned_drift`). Recomputed only when a LoRA tensor below the deepest probed layer changed (after a
        re-alignment, or every round when an adapter layer lies below an aligned one, as FedOT's first layer
        does); otherwise the previous value is returned: the same deterministic forward would give it again."""
        pairs = self.plan.align_pairs
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        inputs = [models.lora_state(m, range(stop)) for m, stop in zip((self.full, self.sub), oda.drift_stops(pairs))]
        same = self._inter is not None and all(
            a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(inputs, self._inter[0]))
        if not same:
            value = to_numpy(oda.aligned_drift(self.full, self.sub, self.batch, pairs)).astype(np.float32)
            self._inter = (inputs, value)
        return self._inter[1].copy()
