"""The server role (rank 0): Algorithm 2 lines 1-5 (SGP, sub-LLM, NF4 + LoRA, pre-alignment), 9-13
(re-alignment), 22 (plug-in) and the evaluation of the full LLM. No MPI here: the protocol that sequences
the ranks is federation.py, the transport comm.py; aggregation (line 18) is a strategy (aggregate.py).

The server's parts: `PublicTexts` (public_texts.py, D_public and the held-out texts), `DriftMonitor` and
`DriftProbes` (drift.py, line 9's trigger and its probes), `Evaluator` (evaluator.py, the evaluation rows).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, data, models, oda, sgp
from .config import Config
from .drift import DriftMonitor, DriftProbes
from .evaluator import Evaluator
from .methods import Plan
from .paths import model_path
from .public_texts import PublicTexts
from .reaper import sweep_stale_copies
from .runlog import RunLog


class AlignmentDiverged(RuntimeError):
    """ODA produced a non-finite loss or emulator LoRA (oda.lr too large)."""


class Server:
    """Holds the full LLM M (with the adapter LoRA plugged in) and the aligned sub-LLM M*."""

    def __init__(self, cfg: Config, log: RunLog, device: torch.device, full, tok, path: Path):
        """From a loaded full LLM M and its tokenizer (`Server.load` reads them and the data from disk)."""
        self.cfg, self.log, self.device, self.full, self.tok, self.path = cfg, log, device, full, tok, path
        data.ensure_pad_token(self.tok)
        self.L = len(models.get_layers(self.full))
        self.full_bytes = models.stored_bytes(self.full)  # as loaded, before any LoRA is attached
        self.texts = PublicTexts(cfg, log, self.full, self.tok)  # D_public: SGP, pre- and re-alignment draw from it
        self.evaluator = Evaluator(cfg, log, self.tok, device)
        # the drift probes (`build`: they need M*) and line 9's trigger with oda.trigger=drift
        self.probes = None
        self.monitor = DriftMonitor(cfg.oda.drift_threshold, cfg.oda.max_interval, lambda: self.probes.output())

    @classmethod
    def load(cls, cfg: Config, log: RunLog, device: torch.device) -> "Server":
        """Load M (model.name) and build the server."""
        path = model_path(cfg.model.name)
        t0 = time.time()
        full, tok = models.load_causal_lm(path, cfg.model.dtype, str(device))
        log.log(f"loaded {path} ({len(models.get_layers(full))} layers) in {time.time() - t0:.1f}s")
        return cls(cfg, log, device, full, tok, path)

    # Algorithm 1 / Algorithm 2 line 1
    def plan_layers(self) -> Plan:
        """SGP (eq. 5 profile + exact group choice; sgp.auto: (n, p) chosen too) or, with sgp.enabled=false, a
        uniform layer drop. The Plan carries the groups, hence the chosen n and p (Plan.n, Plan.p)."""
        cfg, L = self.cfg, self.L
        la, first = cfg.model.adapter_layers or L, cfg.model.adapter_first
        n, p = cfg.sgp.n, cfg.sgp.p
        aligned = cfg.oda.pre_align or cfg.oda.re_align
        if p == 0:
            plan = Plan(L, la, list(range(L)), [], [], first)
        elif cfg.sgp.enabled:
            groups = self.sgp_groups(L - la)
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

    def sgp_groups(self, L_E: int) -> list[tuple[int, int]]:
        """Algorithm 1 on D_public: the distance profile (n = 1..n_max; sgp.auto: up to sgp.n_max or L_E - 1, every
        candidate n) and the groups of the fixed or the chosen (n, p); records /sgp/distance, /sgp/candidates
        [C, 3] (n, p, summed distance; inf: no placement under sgp.max_distance) and the /sgp attributes."""
        s = self.cfg.sgp
        asked = s.remove_layers if s.auto else s.n * s.p  # emulator layers to remove
        n_max = min(s.n_max or (L_E - 1 if s.auto else max(s.n, 4)), L_E - 1)
        t0 = time.time()
        res = sgp.run_sgp(self.full, self.texts.public, n=s.n, p=s.p, num_emulator_layers=L_E, n_max=n_max,
                          token=s.token,
                          remove_layers=s.remove_layers if s.auto else 0, max_distance=s.max_distance,
                          progress=self.log.progress("SGP distance profile", len(self.texts.public), "batches"))
        groups = [tuple(map(int, g)) for g in res.groups]
        rows = [(c.n, c.p, c.cost) for c in res.candidates]
        self.log.write("sgp/distance", res.distance.astype(np.float32))
        self.log.write("sgp/candidates", np.asarray(rows, dtype=np.float64).reshape(-1, 3))
        self.log.set_attrs("sgp", auto=bool(s.auto), n=int(res.n), p=int(res.p), removed=int(res.n * res.p),
                           remove_layers=int(asked), max_distance=float(s.max_distance),
                           criterion="min sum_i d(x^t_i, x^(t_i+n)) / (n p) over n * p = remove_layers")
        table = ", ".join(f"({n},{p}) {c / (n * p):.4f}" if n * p and np.isfinite(c) else f"({n},{p}) -"
                          for n, p, c in rows)
        what = (f"auto, remove_layers={s.remove_layers}, candidates (n,p) distance/layer: {table}; chose "
                if s.auto else "")
        cap = f" (max_distance {s.max_distance:g})" if s.max_distance else ""
        self.log.log(f"SGP: profile {res.distance.shape} in {time.time() - t0:.1f}s; {what}n={res.n}, p={res.p}"
                     f"{cap}, groups {groups}")
        if not groups:  # a sub-LLM with every layer: the clients would hold the whole LLM, nothing to align
            rows = res.distance if s.auto else res.distance[s.n - 1:s.n]  # the group lengths that were allowed
            smallest = float(np.nanmin(rows))
            raise ValueError(f"sgp.max_distance={s.max_distance:g} leaves no group to prune (the smallest group "
                             f"distance is {smallest:.4f}), so the clients would receive the whole LLM; raise "
                             "sgp.max_distance or set it to 0")
        if res.n * res.p < asked:
            self.log.log(f"SGP: sgp.max_distance={s.max_distance:g} leaves {res.n * res.p} of the {asked} requested "
                         "layers to remove")
        return groups

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
        swept = sweep_stale_copies()  # a SIGKILLed earlier server's or client's copy of a sub-LLM in TMPDIR
        if swept:
            self.log.log(f"removed {len(swept)} stale temporary folder(s) of ended processes: {', '.join(swept)}")
        sub = models.build_sub_model(self.full, plan.kept, cfg.quant.enabled, cfg.quant.compute_dtype,
                                     cfg.quant.double_quant, device=str(self.device), embed_bits=cfg.quant.embed_bits)
        self.bundle = models.model_bundle(sub, self.tok)
        self.sub = models.add_lora(sub, plan.lora_sub, **cfg.lora.kwargs())
        self.full = models.add_lora(self.full, plan.adapter_full, **cfg.lora.kwargs())
        self.global_adapter = models.lora_state(self.sub, plan.adapter_sub)
        self.sync_full()
        self.probes = DriftProbes(self.full, self.sub, plan, self.texts.probe[0], self.emulator_lora, self.sub_is_full)
        self.log.log(f"sub-LLM: {plan.sub_layers}/{plan.num_layers} layers, quantized={cfg.quant.enabled}, "
                     f"{models.stored_bytes(sub) / 2**20:.1f} MiB as stored, built in {time.time() - t0:.1f}s")

    def release_bundle(self) -> dict[str, bytes]:
        """The bundle to ship (line 6), no longer held by the server (at 8B ~5 GB of host memory for the run)."""
        bundle, self.bundle = self.bundle, None
        return bundle

    def emulator_lora(self) -> dict[str, torch.Tensor]:
        return models.lora_state(self.sub, self.plan.emulator_lora_sub)

    def sync_full(self) -> None:
        """Algorithm 2 line 22: plug the global adapter LoRA (sub-LLM indices) into the full LLM."""
        models.load_lora_state(self.full, models.remap_layers(self.global_adapter, self.plan.sub_to_full))
        models.load_lora_state(self.sub, self.global_adapter)

    def _pairs(self) -> oda.AlignPairs:
        return oda.AlignPairs(inter=self.plan.align_pairs, full_final=self.plan.num_layers - self.plan.adapter_size - 1,
                              sub_final=self.plan.emulator_end - 1)

    def _align(self, batches: list[dict], epochs: int, what: str) -> list[dict]:
        """ODA (eq. 8) on `batches`; a diverged alignment (non-finite loss or emulator LoRA) stops the run here with
        one line naming oda.lr, before M* reaches the clients (their updates would all be rejected later)."""
        params = models.set_trainable(self.sub, self.plan.emulator_lora_sub)
        models.set_trainable(self.full, [])
        c = self.cfg.oda
        step = self.log.progress(what, epochs * len(batches))
        done = iter(range(1, epochs * len(batches) + 1))
        steps = oda.align(self.full, self.sub, batches, self._pairs(), params, epochs, c.lr, c.alpha, c.beta,
                          progress=os.environ.get("FEDSODA_PROGRESS", "1") == "1", log=lambda _: step(next(done)))
        bad = next((i for i, s in enumerate(steps) if not np.isfinite(s["loss"])), None)
        if bad is not None or not all(bool(torch.isfinite(p).all()) for p in params):
            where = f"loss {steps[bad]['loss']} at step {bad + 1} of {len(steps)}" if bad is not None else \
                "the emulator LoRA holds NaN/Inf"
            raise AlignmentDiverged(f"{what} diverged ({where}); lower oda.lr (now {c.lr:g}) and run again")
        return steps

    # Algorithm 2 lines 3-5
    def pre_align(self) -> None:
        if not (self.cfg.oda.pre_align and self.plan.emulator_lora_sub and self.cfg.oda.pre_epochs > 0):
            return
        kl_before, self_before = self.held_out_kl()
        t0 = time.time()
        steps = self._align(self.texts.public, self.cfg.oda.pre_epochs, "pre-alignment")
        seconds = time.time() - t0
        kl_after, self_after = self.held_out_kl()
        for key in ("loss", "loss_rep", "loss_kl"):
            self.log.write(f"oda/pre/{key}", np.array([s[key] for s in steps], dtype=np.float32))
        extra = dict(kl_before_self=self_before, kl_after_self=self_after) if self.texts.heldout_self else {}
        self.log.set_attrs("oda/pre", kl_before=kl_before, kl_after=kl_after, kl_on=self.texts.kl_on, seconds=seconds,
                           **extra)
        self.log.log(f"pre-alignment: {len(steps)} steps in {seconds:.1f}s, held-out KL(M||M*) on {self.texts.kl_on} "
                     f"{kl_before:.4f} -> {kl_after:.4f} ({100 * (1 - kl_after / kl_before):.1f}% lower)"
                     + (f"; on generated text {self_before:.4f} -> {self_after:.4f}" if extra else ""))

    def held_out_kl(self) -> tuple[float, float]:
        """Eq. 7 KL(M || M*) on the held-out texts (`kl_texts`) and on the generated held-out texts (NaN unless
        data.public=self)."""
        heldout, generated = self.texts.heldout, self.texts.heldout_self
        kl = oda.kl_divergence(self.full, self.sub, heldout)
        return kl, oda.kl_divergence(self.full, self.sub, generated) if generated else float("nan")

    # Algorithm 2 lines 9-12
    def re_align(self, rnd: int) -> None:
        """E_r epochs of ODA on a random sample of D_public, seeded by (seed, round) so that resume is exact."""
        torch.manual_seed(checkpoint.torch_seed(self.cfg.seed, rnd, checkpoint.REALIGN_STREAM))  # LoRA dropout
        steps = self._align(self.texts.sample(self.tok, rnd), self.cfg.oda.re_epochs, f"round {rnd}: re-alignment")
        mean = {k: float(np.mean([s[k] for s in steps])) for k in ("loss", "loss_rep", "loss_kl")}
        self.log.append("oda/re", {"round": np.int32(rnd), **{k: np.float32(v) for k, v in mean.items()}})
        self.monitor.mark_aligned(rnd)
        self.log.log(f"round {rnd}: re-alignment {len(steps)} steps, loss {mean['loss']:.4f}, output drift probe "
                     f"{self.monitor.ref:.4f}")

    # Algorithm 2 line 18 (the strategy aggregates) and line 22
    def set_global(self, state: dict[str, torch.Tensor]) -> None:
        """The new global adapter LoRA, plugged into M and M*."""
        self.global_adapter = state
        self.sync_full()

    def evaluate(self, which: str = "full", split: str = "test", journal: str = "") -> dict:
        """Accuracy of the full LLM (with the plugged adapter) or the sub-LLM (`Evaluator.evaluate`)."""
        return self.evaluator.evaluate(self.full if which == "full" else self.sub, split, journal)

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
        for name, have, got in (("adapter", self.global_adapter, ck.adapter),
                                ("emulator", self.emulator_lora(), ck.emulator)):
            if set(have) != set(got) or any(have[k].shape != got[k].shape for k in have):
                raise checkpoint.CheckpointError(f"{ck.path}: the {name} LoRA does not match this run's model and plan")
        models.load_lora_state(self.sub, ck.emulator)
        self.global_adapter = {k: v.clone() for k, v in ck.adapter.items()}
        self.sync_full()
        self.monitor.restore(self.log)

    def export_adapter(self) -> Path:
        """run_dir/adapter: a standard PEFT adapter for the FULL model (full-model layer indices)."""
        out = self.log.run_dir / "adapter"
        c = self.cfg.lora
        models.export_peft_adapter(str(self.path), models.remap_layers(self.global_adapter, self.plan.sub_to_full),
                                   self.plan.adapter_full, c.r, c.alpha, c.dropout, list(c.target_modules), out)
        return out
