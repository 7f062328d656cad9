"""Learning-rate selection on validation rows only (paper Sec. 5.1, "the best combination of hyperparameters"): per
(method, task, model, split) the grid lr with the highest mean validation accuracy over the select seeds, ties to
the smaller lr; selection.json; the lr of every run; a run's state against the selection."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .stats import best_lr
from .study_expand import GRID, Run, Study
from .study_summaries import summaries, write_json


def lr_step(lr: float, steps: int) -> float:
    """`lr` moved `steps` places along the ladder ..., 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, ... (the grids' half-decade
    steps); an lr off the ladder moves by 10 ** (steps / 2), to two significant digits."""
    if not steps:
        return lr
    e = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10 ** e
    if math.isclose(mantissa, 1, rel_tol=1e-6) or math.isclose(mantissa, 3, rel_tol=1e-6):
        e, odd = divmod(2 * e + (mantissa > 2) + steps, 2)
        return float(f"{3 if odd else 1}e{e}")
    return float(f"{lr * 10 ** (steps / 2):.2g}")


def select(study: Study, done: dict[str, dict]) -> dict[tuple, float]:
    """Selected lr per (method, task, model, split): the best mean validation accuracy over the select seeds,
    ties to the smaller lr; a key is absent until all of its grid runs have finished."""
    by_key: dict[tuple, dict[float, list[float]]] = {}
    for r in study.stage(GRID):
        by_key.setdefault(r.key, {}).setdefault(r.lr, [])
        if r.id in done:  # a failed run (no val_accuracy) counts as the worst possible score
            val = done[r.id].get("val_accuracy")
            by_key[r.key][r.lr].append(-math.inf if val is None else float(val))
    chosen = {}
    for key, per_lr in by_key.items():
        if all(len(v) == len(study.select_seeds) for v in per_lr.values()):
            means = {lr: float(np.mean(v)) for lr, v in per_lr.items()}
            best = best_lr(means)
            if np.isfinite(means[best]):  # every lr failed: nothing to select
                chosen[key] = best
    return chosen


def write_selection(study: Study, results: Path) -> dict[tuple, float]:
    """selection.json (with the validation accuracies behind each choice) and the grid summaries' variants."""
    done = summaries(results)
    chosen = select(study, done)
    rows = []
    for key, lr in sorted(chosen.items()):
        grid = [r for r in study.stage(GRID) if r.key == key]
        rows.append({"method": key[0], "task": key[1], "model": key[2], "split": key[3], "lr": lr,
                     "val_accuracy": {f"{r.lr:g}/s{r.seed}": done[r.id]["val_accuracy"] for r in grid}})
        for r in grid:
            variant = "main" if r.lr == lr else f"lr={r.lr:g}"
            if done[r.id].get("variant") != variant:
                write_json(results / f"{r.id}.json", {**done[r.id], "variant": variant})
    for r in study.stage(GRID):  # a key whose selection is pending (e.g. an lr added to the grid) has no "main" yet
        if r.key not in chosen and r.id in done and done[r.id].get("variant"):
            write_json(results / f"{r.id}.json", {**done[r.id], "variant": ""})
    write_json(results / "selection.json", {"study": study.name, "rule": "max mean val_accuracy over seeds "
                                             f"{study.select_seeds}; ties to the smaller lr", "selected": rows})
    return chosen


def lr_for(run: Run, chosen: dict[tuple, float]) -> float | None:
    lr = run.lr if run.lr is not None else chosen.get(run.key)
    return lr if lr is None or run.lr_step is None else lr_step(lr, run.lr_step)


def state(run: Run, lr: float | None, results: Path) -> str:
    """todo (no summary), done, failed (a failed summary: `study run` and `study args` run it again) or stale (a
    summary at another lr than `lr`, see `supersede`)."""
    path = results / f"{run.id}.json"
    if not path.exists():
        return "todo"
    summary = json.loads(path.read_text(encoding="utf-8"))
    old = summary.get("lr")
    if not (lr is None or old is None or math.isclose(float(old), lr, rel_tol=1e-9)):
        return "stale"
    return "failed" if summary.get("status") == "failed" else "done"


def supersede(run: Run, lr: float, results: Path, runs_root: Path) -> None:
    """A run at a selected lr whose selection changed (an lr added to the grid won): its summary moves to
    <results>/superseded/<id>.lr<old>.json (out of the report) and its run folder to <runs>/<id>.lr<old>, so
    that the run starts over at `lr` and nothing measured is deleted."""
    path = results / f"{run.id}.json"
    old = float(json.loads(path.read_text(encoding="utf-8"))["lr"])
    (results / "superseded").mkdir(exist_ok=True)
    os.replace(path, results / "superseded" / f"{run.id}.lr{old:g}.json")
    if (runs_root / run.id).exists():
        os.replace(runs_root / run.id, runs_root / f"{run.id}.lr{old:g}")
    print(f"[study] {run.id}: its summary is at lr {old:g} but the selected lr is now {lr:g}; moved it to "
          f"{results / 'superseded'} and the run starts over", flush=True)
