"""The server role (rank 0): Algorithm 2 lines 1-5 (SGP, sub-LLM, NF4 + LoRA, pre-alignment), 9-13
(re-alignment), 22 (plug-in) and the evaluation of the full LLM. No MPI here: the protocol that sequences
the ranks is federation.py, the transport comm.py; aggregation (line 18) is a strategy (aggregate.py).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, data, lengths, models, oda, sgp
from .config import Config
from .evaluate import evaluate
from .host import to_numpy
from .methods import Plan
from .reaper import sweep_stale_copies
from .paths import model_path, sha256_of
from .runlog import RunLog
from .signals import STOP_REQUESTED, StopRequested
from .tasks import is_generation, task_id, task_label


class AlignmentDiverged(RuntimeError):
    """ODA produced a non-finite loss or emulator LoRA (oda.lr too large)."""


HELDOUT_TEXTS = 16  # held-out public texts of KL(M || M*) and of the drift probe (its first batch)


def public_batches(cfg: Config, tokenizer, texts: list[str], limit: int,
                   rng: np.random.Generator | None = None) -> list[dict]:
    """Batches of D_public from its pool `texts`: the first `limit` texts, or a random sample of `limit`."""
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
        self.pool, self_heldout = self.public_texts()  # D_public: SGP, pre- and re-alignment draw from it
        self.public = public_batches(cfg, self.tok, self.pool, cfg.data.public_samples)
        for key, asked in (("data.public_samples", cfg.data.public_samples), ("oda.re_samples", cfg.oda.re_samples)):
            if asked > len(self.pool):
                log.log(f"{key}={asked} is more than the {len(self.pool)} texts of D_public ({cfg.data.public}); "
                        f"using all {len(self.pool)}")
        self.kl_on, kl_texts = self.kl_texts(self_heldout)
        self.heldout = public_batches(cfg, self.tok, kl_texts, HELDOUT_TEXTS)  # KL(M || M*) and the drift probe
        self.heldout_self = public_batches(cfg, self.tok, self_heldout, HELDOUT_TEXTS) if self_heldout else []
        self.held_texts = kl_texts + self_heldout  # every public text the run may tokenize: pool + these
        self.probe = self.heldout[:1]
        log.set_attrs("public", mode=cfg.data.public, n_public=min(len(self.pool), cfg.data.public_samples),
                      n_pool=len(self.pool), kl_on=self.kl_on)
        task = task_id(cfg.data)
        rows = data.load_rows(task, "train")
        self.n_train_file = len(rows)
        self.val_index = data.validation_index(rows, task, cfg.data.val_size) if cfg.data.val_size else \
            np.zeros(0, dtype=np.int64)  # /data/val_index (record_data)
        train, self.val_rows = data.split_train_val(rows, task, cfg.data.val_size)
        self.shot_rows = train if is_generation(task) else None  # GSM8K's k shots never show a validation row
        self._drift = None  # (LoRA tensors the last drift probe saw, its value)
        # oda.trigger=drift (Algorithm 2 line 9): the output drift probe after the latest round, its value just
        # after the latest alignment, and that alignment's round (0 = pre-alignment / set-up)
        self.drift_probe, self.drift_ref, self.last_aligned = float("nan"), float("nan"), 0
        self._probe_inputs = None  # (the emulator LoRA they were computed with, the adapters' inputs on the probe batch)

    def public_texts(self) -> tuple[list[str], list[str]]:
        """(pool of D_public, generated held-out texts): the public file's first 90% and no generated text, or with
        data.public=self the texts of `self_public` (the pool is then exactly the data.public_samples texts)."""
        if self.cfg.data.public != "self":
            return data.load_public(self.cfg.data.public, holdout=False), []
        return self.self_public()

    def self_public(self) -> tuple[list[str], list[str]]:
        """data.public=self: data.public_samples + data.SELF_HELDOUT texts sampled from the full LLM M (seeded by the
        run's seed; data.generate_public), generated once into <run>/public_self.jsonl and read back from there on
        every later start (resume), so re-alignment samples the same texts; settings and timing go to /public."""
        c, path = self.cfg.data, self.log.run_dir / data.SELF_FILE
        n_public, n_held = c.public_samples, data.SELF_HELDOUT
        settings = dict(temperature=c.self_temperature, max_new_tokens=c.self_max_new_tokens,
                        batch_size=c.self_batch_size, seed=self.cfg.seed, n_heldout=n_held, file=data.SELF_FILE,
                        prompts_json=json.dumps(list(data.SELF_PROMPTS)))
        if path.is_file():
            self.log.log(f"public=self: reusing the {n_public} + {n_held} generated texts of {path}")
        else:
            total, t0 = n_public + n_held, time.time()
            self.log.log(f"public=self: generating {total} texts with the full LLM (temperature {c.self_temperature:g}, "
                         f"up to {c.self_max_new_tokens} new tokens, batches of {c.self_batch_size})")

            def progress(done: int, count: int) -> None:
                self.log.log(f"public=self: {done}/{count} texts generated ({time.time() - t0:.1f}s)")

            rows = data.generate_public(self.full, self.tok, total, c.self_max_new_tokens, c.self_temperature,
                                        self.cfg.seed, c.self_batch_size, progress)
            data.write_self_public(path, rows, n_public)
            self.log.set_attrs("public", generate_s=time.time() - t0)
        digest, recorded = sha256_of(path), self.log.attrs("public").get("sha256")
        if recorded and digest != recorded:  # resume: the texts re-alignment samples must be the run's own
            raise data.DataError(f"{path}: its sha256 {digest[:12]}... is not the {recorded[:12]}... this run "
                                 "recorded (regenerated or edited texts would change the re-alignment samples); "
                                 "restore the file or start the run over without resume=auto")
        texts = data.read_self_public(path, n_public, n_held)  # a damaged file is named before anything is recorded
        self.log.set_attrs("public", sha256=digest, **settings)
        return texts

    def kl_texts(self, generated: list[str]) -> tuple[str, list[str]]:
        """Which held-out text KL(M || M*) and the drift probe use: the held-out 10% of the public file; with
        data.public=self still WikiText-2's held-out slice when that file exists, so the numbers stay comparable
        with runs on WikiText-2 (KL on the generated held-out texts is recorded beside it), else the generated
        held-out texts."""
        public = self.cfg.data.public
        if public != "self":
            return public, data.load_public(public, holdout=True)
        try:
            return "wikitext2", data.load_public("wikitext2", holdout=True)
        except data.DataError:
            return "self", generated

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
        log.set_attrs("data", task=task_label(cfg.data), val_size=cfg.data.val_size, val_seed=data.VAL_SEED,
                      n_train_file=self.n_train_file, val_min_words=data.VAL_MIN_WORDS.get(task_id(cfg.data), 0),
                      split=cfg.data.split, dirichlet_beta=cfg.data.dirichlet_beta,
                      eval_rounds_on="val" if cfg.data.val_size else "test", test_max_examples=cfg.eval.max_examples)

    def record_truncation(self, rows: list[list[dict]]) -> None:
        """/truncated: how many training rows this run cuts to data.max_len, validation and test rows and GSM8K shots
        to eval.max_len, public texts to data.public_max_len (`lengths.truncation_counts`), logged in one line."""
        c = self.cfg
        task = task_id(c.data)
        test = data.load_rows(task, "test")[:c.eval.max_examples or None]
        shots = data.gsm8k_shots(self.shot_rows, c.eval.k_shot, c.seed) if is_generation(task) else []
        limits = {"max_len": c.data.max_len, "eval_max_len": c.eval.max_len, "public_max_len": c.data.public_max_len}
        counts = lengths.truncation_counts(self.tok, task, limits, [r for part in rows for r in part],
                                           self.val_rows, test, shots, self.pool + self.held_texts)
        self.log.set_attrs("truncated", **limits, **counts)
        self.log.log(lengths.truncation_line(counts, limits))

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
        res = sgp.run_sgp(self.full, self.public, n=s.n, p=s.p, num_emulator_layers=L_E, n_max=n_max, token=s.token,
                          remove_layers=s.remove_layers if s.auto else 0, max_distance=s.max_distance,
                          progress=self.log.progress("SGP distance profile", len(self.public), "batches"))
        groups = [tuple(map(int, g)) for g in res.groups]
        rows = [(c.n, c.p, c.cost) for c in res.candidates]
        self.log.write("sgp/distance", res.distance.astype(np.float32))
        self.log.write("sgp/candidates", np.asarray(rows, dtype=np.float64).reshape(-1, 3))
        self.log.set_attrs("sgp", auto=bool(s.auto), n=int(res.n), p=int(res.p), removed=int(res.n * res.p),
                           remove_layers=int(asked), max_distance=float(s.max_distance),
                           criterion="min sum_i d(x^t_i, x^(t_i+n)) / (n p) over n * p = remove_layers")
        table = ", ".join(f"({n},{p}) {c / (n * p):.4f}" if n * p and np.isfinite(c) else f"({n},{p}) -"
                          for n, p, c in rows)
        what = f"auto, remove_layers={s.remove_layers}, candidates (n,p) distance/layer: {table}; chose " if s.auto else ""
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
        steps = self._align(self.public, self.cfg.oda.pre_epochs, "pre-alignment")
        seconds = time.time() - t0
        kl_after, self_after = self.held_out_kl()
        for key in ("loss", "loss_rep", "loss_kl"):
            self.log.write(f"oda/pre/{key}", np.array([s[key] for s in steps], dtype=np.float32))
        extra = dict(kl_before_self=self_before, kl_after_self=self_after) if self.heldout_self else {}
        self.log.set_attrs("oda/pre", kl_before=kl_before, kl_after=kl_after, kl_on=self.kl_on, seconds=seconds,
                           **extra)
        self.log.log(f"pre-alignment: {len(steps)} steps in {seconds:.1f}s, held-out KL(M||M*) on {self.kl_on} "
                     f"{kl_before:.4f} -> {kl_after:.4f} ({100 * (1 - kl_after / kl_before):.1f}% lower)"
                     + (f"; on generated text {self_before:.4f} -> {self_after:.4f}" if extra else ""))

    def held_out_kl(self) -> tuple[float, float]:
        """Eq. 7 KL(M || M*) on the held-out texts (`kl_texts`) and on the generated held-out texts (NaN unless
        data.public=self)."""
        kl = oda.kl_divergence(self.full, self.sub, self.heldout)
        return kl, oda.kl_divergence(self.full, self.sub, self.heldout_self) if self.heldout_self else float("nan")

    # Algorithm 2 lines 9-12
    def re_align(self, rnd: int) -> None:
        """E_r epochs of ODA on a random sample of D_public, seeded by (seed, round) so that resume is exact."""
        rng = np.random.default_rng([self.cfg.seed, rnd, 7])
        torch.manual_seed(checkpoint.torch_seed(self.cfg.seed, rnd, checkpoint.REALIGN_STREAM))  # LoRA dropout
        batches = public_batches(self.cfg, self.tok, self.pool, self.cfg.oda.re_samples, rng=rng)
        steps = self._align(batches, self.cfg.oda.re_epochs, f"round {rnd}: re-alignment")
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
            value = to_numpy(oda.aligned_drift(self.full, self.sub, self.probe[0], pairs)).astype(np.float32)
            self._drift = (inputs, value)
        return self._drift[1].copy()

    def evaluate(self, which: str = "full", split: str = "test", journal: str = "") -> dict:
        """Accuracy of the full LLM (with the plugged adapter) or the sub-LLM on the test split (its first
        eval.max_examples rows, 0 = all) or on the held-out validation rows (all of them; the test split
        when data.val_size = 0), with the "seconds" it took. `journal` names a GSM8K evaluation kept batch by batch
        in run_dir/eval/<name>.jsonl (resumable after a kill; progress in the log; SIGUSR1 stops it between two
        batches: `StopRequested`)."""
        c = self.cfg.eval
        model = self.full if which == "full" else self.sub
        if split == "val" and self.val_rows:
            rows, limit = self.val_rows, None
        else:
            rows, limit = None, c.max_examples or None
        kept = {"journal": self.log.run_dir / "eval" / f"{journal}.jsonl", "progress": self.eval_progress(journal)} \
            if journal else {}
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.dtype == "bfloat16"):
            res = evaluate(model, self.tok, task_id(self.cfg.data), max_examples=limit, batch_size=c.batch_size,
                           k_shot=c.k_shot, max_new_tokens=c.max_new_tokens, seed=self.cfg.seed, rows=rows,
                           shot_rows=self.shot_rows, max_len=c.max_len, **kept)
        return {"seconds": time.perf_counter() - t0, **res}  # GSM8K's own counts its journal's earlier attempts

    def eval_progress(self, name: str, every_s: float = 60.0):
        """The progress callback of a journaled evaluation: a log line after the first batch, then at most every
        `every_s` seconds (and at the end) with the rows done, the rate and the time left, after one line on what
        its journal already held; GSM8K's raises StopRequested once SIGUSR1 has come (its journal keeps the batches
        done; a label task's evaluation, minutes, runs to its end)."""
        t0, last = time.time(), [None]
        gsm8k = is_generation(task_id(self.cfg.data))  # GSM8K or a custom generation task
        unit, verb = ("questions", "generated question") if gsm8k else ("rows", "row")

        def progress(done: int, total: int, generated: int) -> None:
            now = time.time()
            if generated or done == total:  # the journal's batches come first: now all of them are counted
                if last[0] is None and done > generated:
                    self.log.log(f"eval {name}: {done - generated} of {total} questions taken from its journal "
                                 f"{self.log.run_dir / 'eval' / (name + '.jsonl')}")
                if last[0] is None or done == total or now - last[0] >= every_s:
                    rate = (now - t0) / max(generated, 1)
                    self.log.log(f"eval {name}: {done}/{total} {unit}, {rate:.{1 if gsm8k else 3}f} s per {verb}, "
                                 f"about {rate * (total - done) / 60:.0f} min left")
                    last[0] = now
            if gsm8k and STOP_REQUESTED[0] and done < total:
                raise StopRequested(f"eval {name} stopped at {done}/{total} questions (kept in its journal)")

        return progress

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
