"""Reuse: a run another study already made with identical resolved settings is copied (its summary under this run's
id), not run again; the study's `reuse` folders name where to look."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from .config import Config, load_config
from .study_expand import Run, Study, wanted
from .study_select import lr_for, write_selection
from .study_summaries import settings, summaries, write_json
from .summary import RunSummary


def reusable(run: Run, lr: float, source: dict[str, dict]) -> tuple[str, dict] | None:
    """A finished summary of another study (`source`: its summaries by id) whose run had the resolved settings of
    `run` at `lr`: the same method, task, model, split, seed and lr, the same overrides (eval.base aside: it only
    says whether that run also scored the base model) and the same resolved settings (from the job file through
    the overrides: rounds, clients, examples per client, the table's settings). (its id, its summary) or None."""
    own = sorted(o for o in run.overrides if not o.startswith("eval.base="))
    for sid, s in sorted(source.items(), key=lambda kv: (kv[0] != run.id, kv[0])):  # its own id first
        if s.get("status") != "ok" or s.get("lr") is None or not math.isclose(float(s["lr"]), lr, rel_tol=1e-9):
            continue
        if (s.get("method"), s.get("task"), s.get("model"), s.get("split"), s.get("seed")) != \
                (run.method, run.task, run.model, run.split, run.seed):
            continue
        if sorted(o for o in s.get("overrides", []) if not o.startswith("eval.base=")) != own:
            continue
        cfg = load_config(run.job, run.args(lr, Path("runs/_check"))[2:]).to_dict()
        want = settings(cfg)
        # a setting an older summary lacks is an option added since: it matches if this run leaves it at its
        # built-in default (the behaviour before the option existed)
        default = settings(Config().to_dict())
        have = {**{k: v for k, v in want.items() if v == default[k]}, **(s.get("settings") or {})}
        if want.get("sgp_auto"):  # (n, p) are what SGP chose at run time
            for k in ("sgp_n", "sgp_p"):
                want.pop(k, None), have.pop(k, None)
        if have != want:
            continue
        if (s.get("rounds"), s.get("clients"), s.get("examples_per_client"), s.get("pooled_clients"),
                s.get("eval_dtype"), s.get("model_name")) != \
                (cfg["fed"]["rounds"], cfg["fed"]["clients"], cfg["data"]["max_train_per_client"],
                 cfg["data"].get("pooled_clients", 0), cfg["eval"]["dtype"], cfg["model"]["name"]):
            continue
        return sid, s
    return None


def reuse_summary(study: Study, run: Run, lr: float, results: Path) -> str | None:
    """Copy an identical run's summary from the study's `reuse` folders under this run's id (with reused_from);
    the source's id, or None when no folder has one."""
    for folder in study.reuse:
        if not folder.is_dir():
            continue
        hit = reusable(run, lr, summaries(folder))
        if hit:
            sid, s = hit
            copy = replace(RunSummary.from_json(s, f"{folder}/{sid}.json"), study=study.name, run=run.id,
                           stage=run.stage, variant=run.variant, lr_from=list(run.key), lr_step=run.lr_step,
                           overrides=list(run.overrides), reused_from=f"{folder.name}/{sid}")
            write_json(results / f"{run.id}.json", copy.to_json())
            return f"{folder.name}/{sid}"
    return None


def reuse_all(study: Study, results: Path, stages=None, tasks=None, variants=None) -> dict[tuple, float]:
    """Copy every reusable summary whose run's lr is known now (a selected lr may become known as copies arrive,
    so until nothing more is copied); the selection afterwards."""
    chosen = write_selection(study, results)
    while study.reuse:
        copied = 0
        for run in study.runs:
            lr = lr_for(run, chosen)
            if lr is None or not wanted(run, stages, tasks, variants) or (results / f"{run.id}.json").exists():
                continue
            source = reuse_summary(study, run, lr, results)
            if source:
                copied += 1
                print(f"[study] {run.id}: identical to {source}; its summary is reused, not run again", flush=True)
        chosen = write_selection(study, results)
        if not copied:
            break
    return chosen
