"""The server role (rank 0): Algorithm 2 lines 1-5 (SGP, sub-LLM, NF4 + LoRA, pre-alignment), 9-13
(re-alignment), 22 (plug-in) and the evaluation of the full LLM. No MPI here: the protocol that sequences
the ranks is federation.py, the transport comm.py; aggregation (line 18) is a strategy (aggregate.py).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, data, models, oda, sgp
from .config import Config
from .evaluate import evaluate
from .methods import Plan
from .paths import model_path
from .runlog import RunLog


def public_batches(cfg: Config, tokenizer, holdout: bool, limit: int, rng: np.random.Generator | None = None) -> list[dict]:
    """Batches of D_public (WikiText-2 or GSM8K train): the first `limit` texts, or a random sample."""
    texts = data.load_public(cfg.data.public, holdout=holdout)
    if rng is not None:
        texts = [texts[i] for i in rng.choice(len(texts), size=min(limit, len(texts)), replace=False)]
    else:
        texts = texts[:limit]
    return data.public_batches(tokenizer, texts, cfg.data.public_max_len, cfg.oda.batch_size)


class Server:
    """Holds the full LLM M (with the adapter LoRA plugged in) and the aligned sub-LLM M*."""

    def __init__(self, cfg: Config, log: RunLog, device: torch.device, full, tok, path: Path):
        """From a loaded full LLM M and its tokenizer (`Server.load` reads them and the data from disk)."""
        self.cfg, self.log, self.device, self.full, self.tok, self.path = cfg, log, device, full, tok, path
        data.ensure_pad_token(self.tok)
        self.L = len(models.get_layers(self.full))
        self.full_bytes = models.stored_bytes(self.full)  # as loaded, before any LoRA is attached
        self.public = public_batches(cfg, self.tok, holdout=False, limit=cfg.data.public_samples)
        self.heldout = public_batches(cfg, self.tok, holdout=True, limit=16)
        self.probe = self.heldout[:1]
        rows = data.load_rows(cfg.data.task, "train")
        self.n_train_file = len(rows)
        self.val_index = data.validation_index(rows, cfg.data.task, cfg.data.val_size) if cfg.data.val_size else \
            np.zeros(0, dtype=np.int64)  # /data/val_index (record_data)
        train, self.val_rows = data.split_train_val(rows, cfg.data.task, cfg.data.val_size)
        self.shot_rows = train if cfg.data.task == "gsm8k" else None  # GSM8K's k shots never show a validation row
        self._drift = None  # (LoRA tensors the last drift probe saw, its value)
        # oda.trigger=drift (Algorithm 2 line 9): the output drift probe after the latest round, its value just
        # after the latest alignment, and that alignment's round (0 = pre-alignment / set-up)
        self.drift_probe, self.drift_ref, self.last_aligned = float("nan"), float("nan"), 0
        self._probe_inputs = None  # (the emulator LoRA they were computed with, the adapters' inputs on the probe batch)

    @classmethod
    def load(cls, cfg: Config, log: RunLog, device: torch.device) -> "Server":
        """Load M (model.name) and build the server."""
        path = model_path(cfg.model.name)
        t0 = time.time()
        full, tok = models.load_causal_lm(path, cfg.model.dtype, str(device))
        log.log(f"loaded {path} ({len(models.get_layers(full))} layers) in {time.time() - t0:.1f}s")
        return cls(cfg, log, device, full, tok, path)

    def record_data(self, sizes: list[int], label_hist) -> None:
        """/data: the clients' sizes and label histograms, which training rows are the fixed validation set
        (indices into <task>/train.jsonl), the split."""
        cfg, log = self.cfg, self.log
        log.write("data/client_sizes", np.array(sizes, dtype=np.int64))
        log.write("data/client_label_hist", np.asarray(label_hist, dtype=np.int64))
        log.write("data/val_index", self.val_index.astype(np.int64))
        log.set_attrs("data", task=cfg.data.task, val_size=cfg.data.val_size, val_seed=data.VAL_SEED,
                      n_train_file=self.n_train_file, val_min_words=data.VAL_MIN_WORDS.get(cfg.data.task, 0),
                      split=cfg.data.split, dirichlet_beta=cfg.data.dirichlet_beta,
                      eval_rounds_on="val" if cfg.data.val_size else "test", test_max_examples=cfg.eval.max_examples)

    # Algorithm 1 / Algorithm 2 line 1
    def plan_layers(self) -> Plan:
        """SGP (eq. 5 profile + exact group choice) or, with sgp.enabled=false, a uniform layer drop."""
        cfg, L = self.cfg, self.L
        la, first = cfg.model.adapter_layers or L, cfg.model.adapter_first
        n, p = cfg.sgp.n, cfg.sgp.p
        aligned = cfg.oda.pre_align or cfg.oda.re_align
        if p == 0:
            plan = Plan(L, la, list(range(L)), [], [], first)
        elif cfg.sgp.enabled:
            L_E = L - la
            n_max = cfg.sgp.n_max or max(n, 4)
            t0 = time.time()
            res = sgp.run_sgp(self.full, self.public, n=n, p=p, num_emulator_layers=L_E, n_max=min(n_max, L_E - 1),
                              token=cfg.sgp.token)
            self.log.log(f"SGP: profile {res.distance.shape} in {time.time() - t0:.1f}s, groups {res.groups}")
            self.log.write("sgp/distance", res.distance.astype(np.float32))
            groups = [tuple(map(int, g)) for g in res.groups]
            kept = sgp.kept_layers(L, groups)
            lmap = [tuple(map(int, m)) for m in sgp.layer_map(groups, kept)]
            plan = Plan(L, la, kept, groups, lmap, first, sorted(s for _, s in lmap) if aligned else [])
        else:
            kept = sgp.uniform_drop(L, first, la, n * p, cfg.sgp.spacing)
            plan = Plan(L, la, kept, [], [], first)
            plan.emulator_lora = list(range(first, plan.emulator_end)) if aligned else []
            self.log.log(f"uniform drop ({cfg.sgp.spacing} spacing) of {n * p} emulator layers, kept {kept}")
        self._write_plan(plan)
        return plan

    def _write_plan(self, plan: Plan) -> None:
        self.log.write("sgp/groups", np.asarray(plan.groups, dtype=np.int32).reshape(-1, 2))
        self.log.write("sgp/kept_layers", np.asarray(plan.kept, dtype=np.int32))
        self.log.write("sgp/layer_map", np.asarray(plan.layer_map, dtype=np.int32).reshape(-1, 2))

    # Algorithm 2 line 2
    def build(self, plan: Plan) -> None:
        """Sub-LLM M* = [E*, A] (NF4 when quant.enabled) with LoRA on s_i and the adapter; LoRA on M's adapter."""
        cfg = self.cfg
        self.plan = plan
        t0 = time.time()
        sub = models.build_sub_model(self.full, plan.kept, cfg.quant.enabled, cfg.quant.compute_dtype,
                                     cfg.quant.double_quant)
        self.bundle = models.model_bundle(sub, self.tok)
        self.sub = models.add_lora(sub, plan.lora_sub, **cfg.lora.kwargs())
        self.full = models.add_lora(self.full, plan.adapter_full, **cfg.lora.kwargs())
        self.global_adapter = models.lora_state(self.sub, plan.adapter_sub)
        self.sync_full()
        self.log.log(f"sub-LLM: {plan.sub_layers}/{plan.num_layers} layers, quantized={cfg.quant.enabled}, "
                     f"{models.stored_bytes(models.decoder(sub)) / 2**20:.1f} MiB as stored, built in {time.time() - t0:.1f}s")

    def emulator_lora(self) -> dict[str, torch.Tensor]:
        return models.lora_state(self.sub, self.plan.emulator_lora_sub)

    def sync_full(self) -> None:
        """Algorithm 2 line 22: plug the global adapter LoRA (sub-LLM indices) into the full LLM."""
        models.load_lora_state(self.full, models.remap_layers(self.global_adapter, self.plan.sub_to_full))
        models.load_lora_state(self.sub, self.global_adapter)

    def _pairs(self) -> oda.AlignPairs:
        return oda.AlignPairs(inter=self.plan.align_pairs, full_final=self.plan.num_layers - self.plan.adapter_size - 1,
                              sub_final=self.plan.emulator_end - 1)

    def _align(self, batches: list[dict], epochs: int) -> list[dict]:
        params = models.set_trainable(self.sub, self.plan.emulator_lora_sub)
        models.set_trainable(self.full, [])
        c = self.cfg.oda
        return oda.align(self.full, self.sub, batches, self._pairs(), params, epochs, c.lr, c.alpha, c.beta,
                         progress=os.environ.get("FEDSODA_PROGRESS", "1") == "1")

    # Algorithm 2 lines 3-5
    def pre_align(self) -> None:
        if not (self.cfg.oda.pre_align and self.plan.emulator_lora_sub and self.cfg.oda.pre_epochs > 0):
            return
        kl_before = oda.kl_divergence(self.full, self.sub, self.heldout)
        t0 = time.time()
        steps = self._align(self.public, self.cfg.oda.pre_epochs)
        kl_after = oda.kl_divergence(self.full, self.sub, self.heldout)
        for key in ("loss", "loss_rep", "loss_kl"):
            self.log.write(f"oda/pre/{key}", np.array([s[key] for s in steps], dtype=np.float32))
        self.log.set_attrs("oda/pre", kl_before=kl_before, kl_after=kl_after, seconds=time.time() - t0)
        self.log.log(f"pre-alignment: {len(steps)} steps in {time.time() - t0:.1f}s, held-out KL(M||M*) "
                     f"{kl_before:.4f} -> {kl_after:.4f} ({100 * (1 - kl_after / kl_before):.1f}% lower)")

    # Algorithm 2 lines 9-12
    def re_align(self, rnd: int) -> None:
        """E_r epochs of ODA on a random sample of D_public, seeded by (seed, round) so that resume is exact."""
        rng = np.random.default_rng([self.cfg.seed, rnd, 7])
        torch.manual_seed(checkpoint.torch_seed(self.cfg.seed, rnd, checkpoint.REALIGN_STREAM))  # LoRA dropout
        batches = public_batches(self.cfg, self.tok, holdout=False, limit=self.cfg.oda.re_samples, rng=rng)
        steps = self._align(batches, self.cfg.oda.re_epochs)
        mean = {k: float(np.mean([s[k] for s in steps])) for k in ("loss", "loss_rep", "loss_kl")}
        self.log.append("oda/re", {"round": np.int32(rnd), **{k: np.float32(v) for k, v in mean.items()}})
        self.mark_aligned(rnd)
        self.log.log(f"round {rnd}: re-alignment {len(steps)} steps, loss {mean['loss']:.4f}, output drift probe "
                     f"{self.drift_ref:.4f}")

    # Algorithm 2 line 9 with oda.trigger=drift
    def output_drift(self) -> float:
        """The output drift probe: KL(M || M*) (eq. 7, as `oda.kl_divergence` computes it) on the fixed held-out probe
        batch, with the current global adapter LoRA plugged into both models; as float32 (what /rounds/drift_probe
        stores, so a decision made from memory equals one made from the run file after a resume). NaN when M* is M
        (FedPETuning).

        Why the output and not /drift (`drift`): FedSODA's adapter layers sit above every aligned layer and the
        emulator LoRA is frozen between re-alignments, so L_inter's angular distances cannot move until the next
        re-alignment and a trigger on them would never fire. What moves as the global adapter trains is how the
        adapter's layers respond to the emulator's output mismatch, seen at the logits: the L_KL term of eq. 8 that
        ODA corrects. Run once per round (every round's aggregation changes the adapter) and once after each
        alignment, on one batch of oda.batch_size held-out paragraphs: the hidden states entering M's and M*'s
        adapters are computed once per emulator LoRA (`_adapter_inputs`), so a round runs only the two adapters,
        the final norms and the LM heads (`oda.adapter_kl`)."""
        if self.sub_is_full:
            return float("nan")
        hidden, starts = self._adapter_inputs()
        return float(np.float32(oda.adapter_kl(self.full, self.sub, self.probe[0], hidden, starts)))

    def _adapter_inputs(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
        """The probe batch's hidden states entering M's and M*'s adapters (and those layers' indices), recomputed
        only when the emulator LoRA changed (an alignment, or a resume): nothing else below the adapters changes."""
        p = self.plan
        starts = (0 if p.adapter_first else p.num_layers - p.adapter_size, p.train_start)
        emulator = self.emulator_lora()
        if self._probe_inputs is None or emulator.keys() != self._probe_inputs[0].keys() or \
                not all(torch.equal(emulator[k], self._probe_inputs[0][k]) for k in emulator):
            self._probe_inputs = (emulator, oda.adapter_inputs(self.full, self.sub, self.probe[0], starts))
        return self._probe_inputs[1], starts

    def mark_aligned(self, rnd: int) -> None:
        """Lines 3-5 / 9-13 just done at round `rnd` (0: pre-alignment): the output drift probe now is the
        reference that oda.trigger=drift compares later probes with."""
        self.drift_ref = self.drift_probe = self.output_drift()
        self.last_aligned = rnd

    def probe_round(self) -> float:
        """After line 18: the output drift probe with the new global adapter (the next round's decision reads it)."""
        self.drift_probe = self.output_drift()
        return self.drift_probe

    def realign_due(self, rnd: int) -> bool:
        """Line 9 with oda.trigger=drift, decided on rank 0 (`oda.realign_due`): the probe after the previous round
        exceeds oda.drift_threshold x its value just after the last alignment, or oda.max_interval rounds passed."""
        c = self.cfg.oda
        return oda.realign_due(rnd, self.last_aligned, self.drift_probe, self.drift_ref, c.drift_threshold,
                               c.max_interval)

    def restore_drift(self) -> None:
        """Resume: the trigger's state from the run file (the checkpoint's copy): the last /rounds row's probe and
        reference, the last round with /rounds/realigned set (0 if none). A run file written before these columns
        existed gets NaN rows for its earlier rounds (only max_interval can then re-align)."""
        rounds, realigned = self.log.column("rounds", "round"), self.log.column("rounds", "realigned")
        if rounds is None or not len(rounds):
            return
        for key in ("drift_probe", "drift_ref"):
            if self.log.column("rounds", key) is None:
                for _ in rounds:
                    self.log.append("rounds", {key: np.float32("nan")})
        self.drift_probe = float(self.log.column("rounds", "drift_probe")[-1])
        self.drift_ref = float(self.log.column("rounds", "drift_ref")[-1])
        self.last_aligned = int(rounds[realigned == 1].max()) if (realigned == 1).any() else 0

    # Algorithm 2 line 18 (the strategy aggregates) and line 22
    def set_global(self, state: dict[str, torch.Tensor]) -> None:
        """The new global adapter LoRA, plugged into M and M*."""
        self.global_adapter = state
        self.sync_full()

    @torch.no_grad()
    def drift(self) -> np.ndarray:
        """Angular distance between sub-LLM layer s_i and full-LLM layer t_i + n on a fixed probe batch
        (`oda.aligned_drift`). Recomputed only when a LoRA tensor below the deepest probed layer changed (after a
        re-alignment, or every round when an adapter layer lies below an aligned one, as FedOT's first layer
        does); otherwise the previous value is returned: the same deterministic forward would give it again."""
        pairs = self.plan.align_pairs
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        inputs = [models.lora_state(m, range(stop)) for m, stop in zip((self.full, self.sub), oda.drift_stops(pairs))]
        same = self._drift is not None and all(
            a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(inputs, self._drift[0]))
        if not same:
            value = oda.aligned_drift(self.full, self.sub, self.probe[0], pairs).numpy().astype(np.float32)
            self._drift = (inputs, value)
        return self._drift[1].copy()

    def evaluate(self, which: str = "full", split: str = "test") -> dict:
        """Accuracy of the full LLM (with the plugged adapter) or the sub-LLM on the test split (its first
        eval.max_examples rows, 0 = all) or on the held-out validation rows (all of them; the test split
        when data.val_size = 0)."""
        c = self.cfg.eval
        model = self.full if which == "full" else self.sub
        if split == "val" and self.val_rows:
            rows, limit = self.val_rows, None
        else:
            rows, limit = None, c.max_examples or None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.dtype == "bfloat16"):
            return evaluate(model, self.tok, self.cfg.data.task, max_examples=limit, batch_size=c.batch_size,
                            k_shot=c.k_shot, max_new_tokens=c.max_new_tokens, seed=self.cfg.seed, rows=rows,
                            shot_rows=self.shot_rows)

    @property
    def sub_is_full(self) -> bool:
        """The sub-LLM is an unpruned, unquantized copy of M (FedPETuning): both give the same answers."""
        return self.plan.sub_layers == self.plan.num_layers and not self.cfg.quant.enabled

    def checkpoint(self, rnd: int) -> Path:
        """Checkpoint after round `rnd` (fedsoda_mpi/checkpoint.py: atomic, verified, newest kept)."""
        self.log.flush()
        return checkpoint.save(self.log.run_dir, rnd, self.global_adapter, self.emulator_lora(),
                               self.log.run_dir / "run.h5",
                               {"seed": self.cfg.seed, "plan": self.plan.to_dict(), "config": self.cfg.to_dict()},
                               keep=self.cfg.fed.keep_checkpoints)

    def restore(self, ck: checkpoint.Checkpoint) -> None:
        """Resume: put the checkpoint's global adapter and emulator LoRA into M* and M (after `build`), and the drift
        trigger's state (from the run file, which `checkpoint.resume_point` has replaced by the checkpoint's copy)."""
        for name, have, got in (("adapter", self.global_adapter, ck.adapter), ("emulator", self.emulator_lora(), ck.emulator)):
            if set(have) != set(got) or any(have[k].shape != got[k].shape for k in have):
                raise checkpoint.CheckpointError(f"{ck.path}: the {name} LoRA does not match this run's model and plan")
        models.load_lora_state(self.sub, ck.emulator)
        self.global_adapter = {k: v.clone() for k, v in ck.adapter.items()}
        self.sync_full()
        self.restore_drift()

    def export_adapter(self) -> Path:
        """run_dir/adapter: a standard PEFT adapter for the FULL model (full-model layer indices)."""
        out = self.log.run_dir / "adapter"
        c = self.cfg.lora
        models.export_peft_adapter(str(self.path), models.remap_layers(self.global_adapter, self.plan.sub_to_full),
                                   self.plan.adapter_full, c.r, c.alpha, c.dropout, list(c.target_modules), out)
        return out
