"""Orchestrated distillation alignment (ODA, paper Sec. 4.3, eq. 6-8; Algorithm 2 lines 3-5
pre-alignment and lines 9-14 re-alignment).

The full LLM M is the teacher, the sub-LLM M* the student; only the LoRA modules at the kept group
starts s_i train. Layer convention as in sgp.py: layer l's output is HF `hidden_states[l + 1]`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import Parameter
from tqdm import tqdm

from . import models
from .host import to_host
from .sgp import angular_distance


@dataclass
class AlignPairs:
    """Which layers eq. 6 compares.

    inter: (full_layer = t_i + n, sub_layer = s_i) pairs of L_inter;
    full_final: the full model's final emulator layer (L_E - 1);
    sub_final: the sub-model's final emulator layer (L_E* - 1).
    """
    inter: list[tuple[int, int]]
    full_final: int
    sub_final: int


def _layer_output(hidden_states: tuple[Tensor, ...], layer: int, which: str) -> Tensor:
    """x^layer = hidden_states[layer + 1]; refuses the last entry, which Llama-style models return normed."""
    if not 0 <= layer <= len(hidden_states) - 3:
        raise ValueError(f"{which} layer {layer} is not an un-normed emulator layer of a "
                         f"{len(hidden_states) - 1}-layer model")
    return hidden_states[layer + 1]


def _masked_mse(a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """||a - b||^2 / ||a||^2 per token (a = teacher), averaged over the tokens where mask is True.

    The relative form keeps L_rep O(1) whatever the scale of the hidden states: SmolLM2 and LLaMA-style
    models carry a few "massive activation" dimensions (|x| in the hundreds), where a plain per-element
    MSE is ~1e4 and drowns L_KL for any O(1) alpha/beta (measured: 24,000 vs KL 6.9 on SmolLM2)."""
    a, b = a.to(b.device).float()[mask], b.float()[mask]
    return ((a - b).pow(2).sum(dim=-1) / a.pow(2).sum(dim=-1).clamp_min(1e-12)).mean()


def _token_kl(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor) -> Tensor:
    """KL(teacher || student) of the next-token distributions at the tokens where mask is True: [T]."""
    mask = mask.bool()
    log_p = F.log_softmax(teacher_logits.to(student_logits.device)[mask].float(), dim=-1)
    log_q = F.log_softmax(student_logits[mask].float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def alignment_losses(full_out, sub_out, pairs: AlignPairs, attention_mask: Tensor, alpha: float,
                     beta: float) -> dict[str, Tensor]:
    """Eq. 6-8 for one batch.

    L_inter = sum_i ||H_{t_i+n} - H*_{s_i}||^2, L_final = ||H - H*||^2 between the final emulator
    layers, L_rep = L_inter + L_final (eq. 6); L_KL = KL(M || M*) per token (eq. 7); loss =
    alpha * L_rep + beta * L_KL (eq. 8). Normalisation: ||H - H*||^2 is divided by the teacher's
    ||H||^2 per token (a relative squared error) and every term is averaged over non-pad tokens, so
    alpha and beta stay O(1) across models and layers. The teacher (full_out) is detached.
    Both outputs need `hidden_states` and `logits`.
    """
    mask = attention_mask.bool()
    full_h, sub_h = full_out.hidden_states, sub_out.hidden_states
    zero = sub_out.logits.new_zeros((), dtype=torch.float32)
    loss_inter = sum((_masked_mse(_layer_output(full_h, f, "full").detach(), _layer_output(sub_h, s, "sub"), mask)
                      for f, s in pairs.inter), zero)
    loss_final = _masked_mse(_layer_output(full_h, pairs.full_final, "full").detach(),
                             _layer_output(sub_h, pairs.sub_final, "sub"), mask)
    loss_kl = _token_kl(full_out.logits.detach(), sub_out.logits, mask).mean()
    loss_rep = loss_inter + loss_final
    return {"loss": alpha * loss_rep + beta * loss_kl, "loss_rep": loss_rep, "loss_inter": loss_inter,
            "loss_final": loss_final, "loss_kl": loss_kl}


def _forward(model, batch: dict) -> tuple[object, Tensor]:
    """Forward with hidden states on the model's device; returns (output, attention_mask on that device)."""
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask, output_hidden_states=True,
                use_cache=False)
    return out, mask


def align(full_model, sub_model, batches: list[dict], pairs: AlignPairs, params: list[Parameter], epochs: int,
          lr: float, alpha: float = 1.0, beta: float = 1.0, betas: tuple[float, float] = (0.9, 0.95),
          progress: bool = False, log: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Algorithm 2 lines 3-5 (pre-alignment) and 10-12 (re-alignment): minimize eq. 8 over `params`.

    AdamW (torch defaults besides lr and betas) updates only `params` (the emulator LoRA at s_i; the
    caller sets requires_grad). The teacher runs in eval mode under no_grad, the student in train
    mode (its previous mode is restored afterwards). Returns one dict of floats per optimizer step
    (epoch, step, loss, loss_rep, loss_inter, loss_final, loss_kl); `log`, if given, gets each dict.
    Deterministic given the torch seed.
    """
    if not params or not all(p.requires_grad for p in params):
        raise ValueError("align needs a non-empty list of parameters with requires_grad=True")
    if epochs < 0 or lr <= 0:
        raise ValueError(f"align needs epochs >= 0 and lr > 0, got epochs={epochs}, lr={lr}")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas)
    with models.mode(full_model), models.mode(sub_model, training=True):
        history = _align_epochs(full_model, sub_model, batches, pairs, optimizer, epochs, alpha, beta, log, progress)
    optimizer.zero_grad(set_to_none=True)
    return history


def _align_epochs(full_model, sub_model, batches, pairs, optimizer, epochs, alpha, beta, log, progress) -> list[dict]:
    """The optimizer steps of `align` (teacher in eval mode, student in train mode)."""
    history: list[dict[str, float]] = []
    bar = tqdm(total=epochs * len(batches), desc="ODA align", disable=not progress)
    for epoch in range(epochs):
        for batch in batches:
            with torch.no_grad():
                full_out, _ = _forward(full_model, batch)
            sub_out, mask = _forward(sub_model, batch)
            losses = alignment_losses(full_out, sub_out, pairs, mask, alpha, beta)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            record = {"epoch": float(epoch), "step": float(len(history))}
            record.update({k: float(v.detach()) for k, v in losses.items()})
            history.append(record)
            if log is not None:
                log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
    bar.close()
    return history


@torch.no_grad()
def kl_divergence(full_model, sub_model, batches: list[dict]) -> float:
    """Mean token KL(M || M*) (eq. 7) over all non-pad tokens of `batches` (e.g. held-out public text).

    Both models run in eval mode; their previous modes are restored.
    """
    total, count = 0.0, 0
    with models.mode(full_model, sub_model):
        for batch in batches:
            full_out, _ = _forward(full_model, batch)
            sub_out, mask = _forward(sub_model, batch)
            kl = _token_kl(full_out.logits, sub_out.logits, mask)
            total += float(kl.double().sum())
            count += kl.numel()
    if count == 0:
        raise ValueError("kl_divergence got no non-pad tokens")
    return total / count


@torch.no_grad()
def adapter_inputs(full_model, sub_model, batch: dict, starts: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The hidden states of `batch` entering layer starts[0] of M and starts[1] of M* (each model's first layer whose
    LoRA changes between alignments: the adapter), for `adapter_kl`; eval mode, previous modes restored."""
    outs = []
    with models.mode(full_model, sub_model):
        for model, start in zip((full_model, sub_model), starts):
            device = next(model.parameters()).device
            outs.append(models.hidden_before_layer(model, batch["input_ids"].to(device),
                                                   batch["attention_mask"].to(device), start))
    return outs[0], outs[1]


@torch.no_grad()
def adapter_kl(full_model, sub_model, batch: dict, hidden: tuple[Tensor, Tensor], starts: tuple[int, int]) -> float:
    """Mean token KL(M || M*) (eq. 7) over the non-pad tokens of `batch`, as `kl_divergence(full, sub, [batch])`
    computes it, but running only each model's layers from `starts` on (the adapter, from the `adapter_inputs`
    computed once per alignment), the final norm and the LM head with the family's logit transforms: the emulators'
    forwards are not repeated while only the adapter LoRA changes. Eval mode; previous modes restored."""
    logits = []
    with models.mode(full_model, sub_model):
        for model, h, start in zip((full_model, sub_model), hidden, starts):
            mask = batch["attention_mask"].to(h.device)
            logits.append(models.head_logits(model, models.forward_from_layer(model, h, mask, start)))
    kl = _token_kl(logits[0], logits[1], batch["attention_mask"].to(logits[1].device))
    if kl.numel() == 0:
        raise ValueError("adapter_kl got no non-pad tokens")
    return float(kl.double().sum()) / kl.numel()


def drift_stops(pairs: list[tuple[int, int]]) -> tuple[int, int]:
    """How many layers of the full and of the sub-LLM the drift probe of `pairs` runs (deepest pair + 1)."""
    return max(f for f, _ in pairs) + 1, max(s for _, s in pairs) + 1


@torch.no_grad()
def aligned_drift(full_model, sub_model, batch: dict, pairs: list[tuple[int, int]]) -> Tensor:
    """Eq. 5's angular distance between full-LLM layer t_i + n and sub-LLM layer s_i (the L_inter pairs of eq. 6)
    at each row's last real token of `batch`, averaged over rows: how far the aligned emulator has drifted.

    Runs only the layers the pairs reach in each model (`models.layer_outputs`: no later layers, no LM head),
    in eval mode; both models' previous modes are restored. Each model runs on its own device; the distances
    are returned in host memory.
    """
    outs = []
    with models.mode(full_model, sub_model):
        for m, stop in zip((full_model, sub_model), drift_stops(pairs)):
            device = next(m.parameters()).device
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            last = mask.sum(1) - 1
            rows = torch.arange(len(last), device=device)
            outs.append(models.layer_outputs(m, ids, mask, stop)[rows, last])  # [B, stop, D]
    full, sub = outs[0].to(outs[1].device), outs[1]
    return to_host(torch.stack([angular_distance(full[:, f], sub[:, s]).mean() for f, s in pairs]))


def realign_due(rnd: int, last: int, probe: float, ref: float, tau: float, max_interval: int) -> bool:
    """Algorithm 2 line 9 with `oda.trigger=drift`: re-align at the start of round `rnd` when the drift probe
    measured after the previous round (`probe`) exceeds `tau` x its value just after the last alignment (`ref`),
    or when `max_interval` (> 0) rounds have passed since that alignment (round `last`; 0 = pre-alignment).
    A NaN probe (not measured) never triggers; only `max_interval` can then. An infinite probe (the sub-LLM's
    output diverged from the full LLM's) always does."""
    if max_interval and rnd - last >= max_interval:
        return True
    if probe == math.inf:
        return True
    return bool(math.isfinite(probe) and math.isfinite(ref) and probe > tau * ref)


def drift_schedule(after_round: Sequence[float], after_align: Sequence[float], tau: float,
                   max_interval: int) -> list[int]:
    """The rounds 1..T that re-align under `oda.trigger=drift` (`realign_due` round by round), given the probe
    after each round (`after_round[t - 1]`: after round t, T values) and the probe just after an alignment at round
    t (`after_align[t]`, T + 1 values; `after_align[0]`: after pre-alignment; read only where an alignment happens).
    Before round 1 the probe is the pre-alignment value itself, so only `max_interval` can re-align round 1."""
    last, ref, probe, rounds = 0, float(after_align[0]), float(after_align[0]), []
    for rnd in range(1, len(after_round) + 1):
        if realign_due(rnd, last, probe, ref, tau, max_interval):
            rounds.append(rnd)
            last, ref = rnd, float(after_align[rnd])
        probe = float(after_round[rnd - 1])
    return rounds
