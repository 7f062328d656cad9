"""The client role (ranks 1..W-1): local training of the adapter LoRA on the (NF4) sub-LLM with a proximal
term (eq. 9-10). No MPI here: federation.py moves what `Client.fit` returns.

Algorithm 2 lines 15-18: starting from the global adapter LoRA w^(t-1), run H local epochs (or
`fed.local_steps` steps) of AdamW on F_k(w) + mu/2 ||w - w^(t-1)||^2, then upload w_k^(t) and n_k.
A client rank hosts the virtual clients the schedule places on it each round (`Client.place`).

Local steps run only the adapter layers: the frozen sub-emulator's outputs come from `EmulatorCache`
(emulator_cache.py: host memory and an optional disk tier, dropped on re-alignment).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data, lengths, models
from .data import pad_batch
from .emulator_cache import EmulatorCache, disk_tier
from .methods import Plan
from .reaper import scratch, sweep_stale_copies
from .seeds import torch_seed
from .tasks import task_id


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


@contextlib.contextmanager
def oom_guard(rank: int, client: int, cfg):
    """Turn an out-of-memory in a client's local step into one actionable line (rank, client, batch size)."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as e:
        raise RuntimeError(f"out of memory on rank {rank} (client {client}) at fed.batch_size={cfg.fed.batch_size}, "
                           f"data.max_len={cfg.data.max_len}: lower fed.batch_size or data.max_len "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


class Faults:
    """debug.fail_*: one failure injected on rank debug.fail_rank in round debug.fail_round, for the tests of the
    abort path (`raise`, any rank, right after the download), the OOM message (`oom`, in local training) and
    the rejection of a diverged client (`nan`: the rank's first upload of that round is all NaN)."""

    def __init__(self, debug, rank: int):
        self.kind = debug.fail_kind if debug.fail_rank == rank else None
        self.round, self.rank, self.spent = debug.fail_round, rank, False

    def _now(self, rnd: int, kind: str) -> bool:
        return self.kind == kind and self.round == rnd

    def round_started(self, rnd: int) -> None:
        if self._now(rnd, "raise"):
            raise RuntimeError(f"debug.fail_rank={self.rank} debug.fail_round={rnd}: injected failure")

    def training(self, rnd: int) -> None:
        if self._now(rnd, "oom"):
            raise torch.OutOfMemoryError("debug.fail_kind=oom: simulated")

    def trained(self, rnd: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._now(rnd, "nan") and not self.spent:
            self.spent = True
            return {name: torch.full_like(t, float("nan")) for name, t in state.items()}
        return state


@dataclass
class Fit:
    """What `Client.fit` returns: the local adapter LoRA w_k^(t), the mean task loss, n_k, and its cost."""
    state: dict[str, torch.Tensor]
    loss: float
    n_samples: int
    steps: int
    seconds: float  # wall time of local training, emulator passes included
    emulator_seconds: float  # of which filling / reading the emulator cache


class Client:
    """A client rank: the shipped sub-LLM M* (NF4 when quant.enabled) with the emulator and adapter LoRA, the
    clients' training rows (tokenized when a client is first placed here) and the emulator cache of the
    clients placed here this round (in memory; earlier clients' on disk). Never holds the full LLM.
    `close` must run however the run ends (federation.run calls it in a `finally`)."""

    def __init__(self, cfg, rank: int, plan: Plan, files: dict[str, bytes], rows: list[list[dict]], device):
        """Algorithm 2 line 6 (receiving side): load M* from the shipped bundle (a temporary on-disk copy,
        removed at once), attach LoRA on the plan's layers (seeded), mark the adapter LoRA trainable."""
        self.cfg, self.rank, self.plan, self.rows = cfg, rank, plan, rows
        self.model_bytes = sum(len(v) for v in files.values())  # config + weights + tokenizer, as received
        self.weight_bytes = models.safetensors_tensor_bytes(files["model.safetensors"])
        sweep_stale_copies()
        with scratch(f"client{rank}") as tmp:  # removed even if this rank is SIGKILLed while loading it
            sub, self.tok = models.load_bundle(files, tmp, str(device))
        data.ensure_pad_token(self.tok)
        torch.manual_seed(cfg.seed)
        self.sub = models.add_lora(sub, plan.lora_sub, **cfg.lora.kwargs())
        self.examples: dict[int, list[dict]] = {}
        self.params = models.set_trainable(self.sub, plan.adapter_sub)
        self.cache = EmulatorCache(cfg.fed.emulator_cache, **disk_tier(cfg.fed, rank))
        self.faults = Faults(cfg.debug, rank)

    def examples_of(self, k: int) -> list[dict]:
        if k not in self.examples:
            c = self.cfg.data
            task = task_id(c)
            fitted, _ = lengths.fit_rows(self.tok, task, self.rows[k], c.max_len)  # counted by rank 0 (/truncated)
            self.examples[k] = [data.tokenize_sft(self.tok, *data.prompt_and_answer(task, r), c.max_len)
                                for r in fitted]
        return self.examples[k]

    def place(self, here: set[int]) -> None:
        """This round's clients on this rank: memory stays flat in fed.clients (only they keep data and cache in
        memory; the cache of the clients that leave goes to the disk tier)."""
        for k in set(self.examples) - here:
            del self.examples[k]
        self.cache.keep(here)

    def close(self) -> None:
        """End of the run, an exception or a stop request: remove the disk tier's folder."""
        self.cache.close()

    def set_emulator(self, state: dict[str, torch.Tensor]) -> None:
        """Algorithm 2 line 14: the (re-)aligned emulator LoRA; the cached emulator outputs are stale."""
        models.load_lora_state(self.sub, state)
        self.cache.invalidate()

    def fit(self, k: int, global_state: dict[str, torch.Tensor], rnd: int) -> Fit:
        """Algorithm 2 lines 15-16 for client k in round rnd: local training from the global adapter LoRA."""
        c = self.cfg.fed
        models.load_lora_state(self.sub, global_state)
        torch.manual_seed(torch_seed(self.cfg.seed, rnd, k))
        t0, emulator0 = time.perf_counter(), self.cache.seconds
        with oom_guard(self.rank, k, self.cfg):
            self.faults.training(rnd)
            loss, steps = local_train(self.sub, self.plan, self.params, self.examples_of(k), self.tok.pad_token_id,
                                      self.cache, k, c.local_steps, c.local_epochs, c.batch_size, c.lr, c.mu,
                                      np.random.default_rng([self.cfg.seed, rnd, k]))
        seconds = time.perf_counter() - t0
        state = self.faults.trained(rnd, models.lora_state(self.sub, self.plan.adapter_sub))
        return Fit(state, loss, len(self.examples[k]), steps, seconds, self.cache.seconds - emulator0)

    def holdings(self) -> dict:
        """What this rank holds and what it received. stored_bytes counts every tensor of the causal LM once (the
        decoder, an untied LM head, the LoRA), in the form kept (NF4 packed weights with their quantization
        state); received_weight_bytes is the tensor data of the shipped safetensors file: the two agree up to
        the LoRA (lora_bytes, which travels separately) and non-persistent buffers (rotary inv_freq)."""
        import bitsandbytes as bnb

        causal = models.causal_lm(self.sub)
        return {"rank": self.rank, "decoder_layers": len(models.get_layers(self.sub)),
                "linear4bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in self.sub.modules()),
                "stored_bytes": models.stored_bytes(causal), "received_model_bytes": self.model_bytes,
                "received_weight_bytes": self.weight_bytes,
                "lora_bytes": sum(p.numel() * p.element_size() for n, p in causal.named_parameters() if "lora_" in n),
                "lm_head_tied": bool(causal.get_output_embeddings().weight is causal.get_input_embeddings().weight),
                "trainable_params": sum(p.numel() for p in self.params),
                "parameter_names": sorted({n.split(".layers.")[0] for n, _ in self.sub.named_parameters()})}

    def write_holdings(self, run_dir: Path) -> None:
        """client_rank<R>.json: `holdings()` (checked by the tests: never the full LLM)."""
        (run_dir / f"client_rank{self.rank}.json").write_text(json.dumps(self.holdings(), indent=1))
