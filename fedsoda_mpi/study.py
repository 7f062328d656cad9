"""Studies: the paper's experimental protocol as data. A study file (studies/*.yaml) names the axes
(methods, tasks, models, splits, seeds, learning-rate grid) and the extra arrays (ablation, parameter
study, gap explanation); one expansion drives both routes.

    python -m fedsoda_mpi.study list studies/cpu_smollm2.yaml            # every run: stage, state, its lr
    python -m fedsoda_mpi.study run  studies/cpu_smollm2.yaml            # local route: runs in order under mpirun
    python -m fedsoda_mpi.study run  studies/cpu_smollm2.yaml --stage grid --max-runs 2
    python -m fedsoda_mpi.study run  studies/cpu_smollm2.yaml --variant no_re_align --variant r1
    bash slurm/submit_all.sh studies/paper.yaml                          # Slurm route: one array per stage

Protocol (paper Sec. 5.1: "the best combination of hyperparameters", "three different random seeds"):
1. stage `grid`: every method x task x model x split at every learning rate of the grid, at the
   `select_seeds` (default: the first seed);
2. `select`: per (method, task, model, split) the lr with the highest mean validation accuracy
   (`/final` val_accuracy: the fixed rows held out of the training file, data.val_size; never the test
   split); ties go to the smaller lr. Written to <results>/selection.json; grid summaries get their
   variant ("main" at the selected lr, "lr=<value>" otherwise);
3. stage `seeds`: the other seeds at the selected lr (variant "main");
   `grid.lr_extend` adds learning rates for one method (one whose best lr was the grid's edge); a run whose
   summary is at an lr the selection no longer picks is stale: `run` moves it aside and runs it again;
4. one stage per variant group (ablation, parameter study, gap explanation): its runs at the selected
   lr of (`lr_of` or its method, task, model, split).
Every finished run leaves a few-KB summary <results>/<run id>.json (`summarize`); analysis/report.py
builds docs/results.md from those alone. Run folders go to <runs>/<run id> and resume with resume=auto.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from .config import ROOT, Config, ConfigError, load_config
from .stats import bits
from .summary import RunSummary

GRID, SEEDS = "grid", "seeds"
DONE_EXIT = 3  # `study args`: the run's summary exists already (a re-submitted array task has nothing to do)


class StudyError(ValueError):
    """A bad study file; the message is the one line the user sees."""


@dataclass(frozen=True)
class Run:
    """One federated run of a study (a row of the expansion)."""

    id: str
    stage: str  # grid | seeds | a variant group
    variant: str  # "" for grid runs until selection; "main" for seeds; the variant's name otherwise
    method: str
    task: str
    model: str
    split: str  # iid | dirichlet-<beta>
    seed: int
    lr: float | None  # None: the selected lr of (lr_of, task, model, split)
    lr_of: str
    job: str
    overrides: tuple[str, ...] = ()
    np: int = 3
    threads: int = 1
    lr_split: str = ""  # the split whose selection gives the lr ("": this run's own; non-IID variants: iid)
    lr_task: str = ""  # the task whose selection gives the lr ("": this run's own)
    lr_step: int | None = None  # variants' lr_steps: this many steps from the (selected) lr on the 1-3-10 ladder

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The selection key: the lr is chosen per (method, task, model, split)."""
        return (self.lr_of, self.lr_task or self.task, self.model, self.lr_split or self.split)

    def args(self, lr: float, run_dir: Path) -> list[str]:
        """The arguments of `python -m fedsoda_mpi.main` for this run at learning rate `lr`."""
        split = ["data.split=iid"] if self.split == "iid" else \
            ["data.split=dirichlet", f"data.dirichlet_beta={self.split.split('-', 1)[1]}"]
        return ["--config", self.job, f"method={self.method}", f"data.task={self.task}", *split, f"seed={self.seed}",
                f"fed.lr={lr:g}", *self.overrides, f"output.dir={run_dir}", "resume=auto"]


@dataclass
class Study:
    name: str
    runs: list[Run]
    lr_grid: list[float]
    select_seeds: list[int]
    stages: list[str] = field(default_factory=list)
    reuse: list[Path] = field(default_factory=list)  # results folders whose identical runs are copied, not rerun
    tables: dict[str, dict] = field(default_factory=dict)  # the report's declared tables (`tables`)

    def stage(self, name: str) -> list[Run]:
        return [r for r in self.runs if r.stage == name]


def _list(spec: dict, key: str, default=None) -> list:
    value = spec.get(key, default)
    if value is None:
        raise StudyError(f"{key}: required")
    return value if isinstance(value, list) else [value]


RESERVED = ("method", "seed", "data.task", "data.split", "data.dirichlet_beta", "fed.lr", "resume", "output.")


def _overrides(spec: dict | None, where: str) -> tuple[str, ...]:
    """key=value strings of an overrides mapping; the keys the study itself sets per run are refused."""
    if spec is None:
        return ()
    if not isinstance(spec, dict):
        raise StudyError(f"{where}.overrides: expected a mapping of dotted keys to values")
    for k in spec:
        if str(k).startswith(RESERVED):
            raise StudyError(f"{where}.overrides: '{k}' is set by the study for each run (an axis: methods, seeds, "
                             "tasks, splits, lr; or the run folder); change the axis instead")
    return tuple(f"{k}={_text(v)}" for k, v in spec.items())


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _split_name(split) -> str:
    split = str(split)
    if split == "iid":
        return split
    if split.startswith("dirichlet-"):
        try:
            if float(split.split("-", 1)[1]) > 0:
                return split
        except ValueError:
            pass
    raise StudyError(f"splits: expected iid or dirichlet-<beta> (e.g. dirichlet-0.5), got '{split}'")


def _run_id(stage: str, method: str, task: str, model: str, split: str, seed: int, lr: float | None,
            step: int | None = None) -> str:
    lr_part = f"-lr{lr:g}" if lr is not None else ""
    step_part = f"-step{step:+d}" if step is not None else ""
    return f"{stage}-{method}-{task}-{model}-{split}{lr_part}{step_part}-s{seed}"


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


def expand(spec: dict) -> Study:
    """Expand a study mapping (see studies/*.yaml) into its runs, stage by stage, in execution order."""
    if not isinstance(spec, dict) or "name" not in spec or not isinstance(spec.get("grid"), dict):
        raise StudyError("a study file is a mapping with at least: name, grid (and usually job, overrides, variants)")
    for keys, have, where in ((STUDY_KEYS, spec, "study"), (GRID_KEYS, spec["grid"], "grid")):
        if set(have) - keys:
            raise StudyError(f"{where}: unknown key(s) {', '.join(sorted(set(have) - keys))}; "
                             f"expected some of {', '.join(sorted(keys))}")
    base = _overrides(spec.get("overrides"), "study")
    job = str(spec.get("job", "jobs/smollm2_sst2_iid.yaml"))
    g = spec.get("grid") or {}
    for key in ("methods", "tasks", "lr"):
        if not _list(g, key):
            raise StudyError(f"grid.{key}: must not be empty")
    methods, tasks = _axis(g, "methods", "grid", str), _axis(g, "tasks", "grid", str)
    models, splits = _axis(g, "models", "grid", str, ["smollm2"]), _axis(g, "splits", "grid", _split_name, ["iid"])
    seeds, lrs = _axis(g, "seeds", "grid", _seed, [0]), _axis(g, "lr", "grid", _lr)
    select_seeds = _axis(g, "select_seeds", "grid", _seed, seeds[:1])
    extend = _lr_extend(g.get("lr_extend"), methods, lrs)
    if not set(select_seeds) <= set(seeds):
        raise StudyError(f"grid.select_seeds {select_seeds} must be among grid.seeds {seeds}")
    np_, threads = _count(spec, "np", "study", 3, 2), _count(spec, "threads", "study", 1, 1)
    runs: list[Run] = []
    for task in tasks:  # task-major: a session that stops early leaves whole tables, not slices of all of them
        for model in models:
            for split in splits:
                for method in methods:
                    jf = job.format(model=model, task=task)
                    for seed in select_seeds:
                        for lr in lrs + extend.get(method, []):
                            runs.append(Run(_run_id(GRID, method, task, model, split, seed, lr), GRID, "", method,
                                            task, model, split, seed, lr, method, jf, base, np_, threads))
                    for seed in (s for s in seeds if s not in select_seeds):
                        runs.append(Run(_run_id(SEEDS, method, task, model, split, seed, None), SEEDS, "main",
                                        method, task, model, split, seed, None, method, jf, base, np_, threads))
    stages = [GRID, SEEDS]
    for v in spec.get("variants") or []:
        runs += _variant_runs(v, base, job, models, splits, seeds, np_, threads)
        stage = str(v.get("group", "variants"))
        if stage not in stages:
            stages.append(stage)
    if spec.get("base_eval", "every") == "once":  # the base model's test accuracy depends on neither seed nor method
        firsts: dict[tuple, str] = {}
        for r in runs:
            firsts.setdefault((r.task, r.model), r.id)
        runs = [replace(r, overrides=r.overrides + (f"eval.base={'true' if firsts[r.task, r.model] == r.id else 'false'}",))
                for r in runs]
    _check_unique(runs)
    _check_graph(runs, stages)
    reuse = [Path(x) if Path(x).is_absolute() else ROOT / x for x in _list(spec, "reuse", [])]
    return Study(str(spec["name"]), runs, lrs, select_seeds, stages, reuse, tables(spec))


def tables(spec: dict) -> dict[str, dict]:
    """The study's `tables`: the report's comparison tables, each {ref: <row>, rows: [[<row>, <label>], ...]} in
    display order (one label per label column), a row being a variant of this study or `main <method>` (the Table-2
    runs of a grid method), and optionally group: <variant group> (then every other variant of that group follows, labelled by its name); the
    Δ of every other row is paired by seed with the `ref` row. A row naming no variant or method is refused."""
    declared = spec.get("tables") or {}
    if not isinstance(declared, dict):
        raise StudyError(f"tables: expected a mapping of table name to {{ref, rows}}, got {declared!r}")
    known = {str(v.get("name")) for v in spec.get("variants") or [] if isinstance(v, dict)}
    known |= {f"main {m}" for m in _list(spec.get("grid") or {}, "methods", [])}
    groups = {str(v.get("group", "variants")) for v in spec.get("variants") or [] if isinstance(v, dict)}
    out = {}
    for name, table in declared.items():
        where = f"tables.{name}"
        if not isinstance(table, dict) or not {"ref", "rows"} <= set(table) <= TABLE_KEYS \
                or not isinstance(table["rows"], list):
            raise StudyError(f"{where}: expected the keys ref and rows (a list of [row, label]) and optionally "
                             f"group, got {table!r}")
        if "group" in table and table["group"] not in groups:
            raise StudyError(f"{where}.group: '{table['group']}' is not a variant group of this study")
        rows = []
        for row in table["rows"]:
            if not (isinstance(row, list) and len(row) >= 2 and all(isinstance(x, str) for x in row)):
                raise StudyError(f"{where}.rows: expected [row, label] (strings; one label per label column), "
                                 f"got {row!r}")
            if row[0] not in known:
                raise StudyError(f"{where}.rows: '{row[0]}' is neither a variant of this study nor 'main <method>' "
                                 "of a grid method")
            rows.append(tuple(row))
        if len({len(r) for r in rows}) > 1:
            raise StudyError(f"{where}.rows: every row has as many labels as the first")
        if table["ref"] not in [r[0] for r in rows]:
            raise StudyError(f"{where}.ref: '{table['ref']}' is not one of its rows")
        out[str(name)] = {"ref": table["ref"], "rows": rows, **({"group": table["group"]} if "group" in table else {})}
    return out


def read_tables(path: str | Path) -> dict[str, dict]:
    """The validated `tables` of a study file, without expanding or checking its runs (what the report needs)."""
    try:
        spec = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not a readable study file ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise StudyError(f"{path}: a study file is a mapping")
    return tables(spec)


def _axis(spec: dict, key: str, where: str, convert, default=None) -> list:
    """An axis of the study (methods, seeds, lr, ...): a list (or one value), each value converted (a ValueError
    or TypeError of `convert` names the value), no value twice; StudyError with one line otherwise."""
    values = []
    for raw in _list(spec, key, default):
        try:
            value = convert(raw)
        except StudyError:
            raise
        except (TypeError, ValueError) as e:
            raise StudyError(f"{where}.{key}: {e}, got {raw!r}") from None
        if value in values:
            raise StudyError(f"{where}.{key}: {raw!r} is given twice; give each value once")
        values.append(value)
    return values


def _seed(raw) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 2**32:
        raise ValueError("expected seeds, integers in [0, 2**32)")
    return raw


def _lr(raw) -> float:
    try:
        value = math.nan if isinstance(raw, bool) else float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError("expected learning rates, finite numbers > 0")
    return value


def _count(spec: dict, key: str, where: str, default: int, low: int) -> int:
    """np (MPI ranks per run: rank 0 and at least one client rank, so >= 2) or threads (>= 1)."""
    raw = spec.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < low:
        need = "the server rank plus at least one client rank" if key == "np" else "OpenMP threads per rank"
        raise StudyError(f"{where}.{key}: must be an integer >= {low} ({need}), got {raw!r}")
    return raw


def _lr_extend(spec, methods: list, lrs: list[float]) -> dict[str, list[float]]:
    """grid.lr_extend: {method: [lr, ...]}, learning rates added to the shared grid for one method (e.g. when its
    selected lr was the grid's edge: a best value at the edge is not a selected one)."""
    if spec is None:
        return {}
    if not isinstance(spec, dict) or set(map(str, spec)) - set(map(str, methods)):
        raise StudyError(f"grid.lr_extend: expected a mapping from methods of grid.methods ({', '.join(map(str, methods))})"
                         f" to lists of learning rates, got {spec!r}")
    out = {}
    for m, v in spec.items():
        try:
            extra = [float(x) for x in (v if isinstance(v, list) else [v])]
        except (TypeError, ValueError):
            raise StudyError(f"grid.lr_extend.{m}: expected learning rates, got {v!r}") from None
        if any(not (math.isfinite(x) and x > 0) or x in lrs for x in extra) or len(set(extra)) < len(extra):
            raise StudyError(f"grid.lr_extend.{m}: learning rates must be finite, > 0, distinct and not already in "
                             f"grid.lr, got {v!r}")
        out[str(m)] = extra
    return out


def _check_graph(runs: list[Run], stages: list[str]) -> None:
    """Every run at a selected lr has a grid to select it from; a stage (a Slurm array) has one rank count."""
    keys = {r.key for r in runs if r.stage == GRID}
    for r in runs:
        if r.lr is None and r.key not in keys:
            raise StudyError(f"run {r.id} takes the selected lr of {r.key}, which the grid does not run; "
                             "fix its lr_of / lr_task / lr_split or give it an lr")
    for stage in stages:
        shapes = {(r.np, r.threads) for r in runs if r.stage == stage}
        if len(shapes) > 1:
            raise StudyError(f"stage {stage}: its runs ask for different ranks/threads {sorted(shapes)}; one Slurm "
                             "array has one shape: put them in different groups")


VARIANT_KEYS = {"group", "name", "method", "methods", "tasks", "models", "splits", "seeds", "lr", "lr_of", "lr_task",
                "lr_split", "lr_steps", "np", "threads", "overrides"}
STUDY_KEYS = {"name", "job", "np", "threads", "base_eval", "overrides", "grid", "variants", "reuse", "tables"}
TABLE_KEYS = {"ref", "rows", "group"}  # group: optional
GRID_KEYS = {"methods", "tasks", "models", "splits", "seeds", "select_seeds", "lr", "lr_extend"}


def _variant_runs(v: dict, base: tuple, job: str, models, splits, seeds, np_: int, threads: int) -> list[Run]:
    """The runs of one variant (an ablation, a parameter-study point, a gap-explanation run)."""
    unknown = set(v) - VARIANT_KEYS if isinstance(v, dict) else set()
    if unknown:
        raise StudyError(f"variant {v.get('name')}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"expected some of {', '.join(sorted(VARIANT_KEYS))}")
    if not isinstance(v, dict) or "name" not in v or not ("method" in v or "methods" in v):
        raise StudyError(f"variants: each needs a name and a method (or methods), got {v!r}")
    name, group = str(v["name"]), str(v.get("group", "variants"))
    if group in (GRID, SEEDS):
        raise StudyError(f"variant {name}: group '{group}' is reserved")
    where = f"variants.{name}"
    try:
        lr = None if v.get("lr", "selected") == "selected" else _lr(v["lr"])
    except ValueError as e:
        raise StudyError(f"{where}.lr: {e} (or 'selected'), got {v['lr']!r}") from None
    over = base + _overrides(v.get("overrides"), where)
    lr_split = _split_name(v["lr_split"]) if "lr_split" in v else ""
    ranks, threads = _count(v, "np", where, np_, 2), _count(v, "threads", where, threads, 1)
    # lr_steps: the runs at each of these steps from the (selected) lr along the 1-3-10 ladder, e.g. [0, -1, 1]:
    # a 3-point grid around a selection that is not known yet (the report selects among them); run ids name the step
    steps = v.get("lr_steps")
    if steps is not None and (not isinstance(steps, list) or not steps or any(type(k) is not int for k in steps)
                              or len(set(steps)) < len(steps)):
        raise StudyError(f"variant {name}: lr_steps: expected a list of distinct integers (steps along the 1-3-10 lr "
                         f"ladder from the selected lr, e.g. [0, -1, 1]), got {steps!r}")
    methods = _axis(v, "methods", where, str, [v.get("method")])
    models, splits = _axis(v, "models", where, str, models), _axis(v, "splits", where, _split_name, splits)
    out = []
    for method in methods:
        for task in _axis(v, "tasks", where, str):
            for model in models:
                for split in splits:
                    for step in (steps if steps is not None else [None]):  # step-major: a cut keeps whole steps
                        for seed in _axis(v, "seeds", where, _seed, seeds):
                            rid = _run_id(f"{group}.{name}", method, task, model, split, seed, lr, step)
                            out.append(Run(rid, group, name, method, task, model, split, seed, lr,
                                           str(v.get("lr_of", method)), job.format(model=model, task=task), over,
                                           ranks, threads, lr_split, str(v.get("lr_task", "")), step))
    return out


def _check_unique(runs: list[Run]) -> None:
    seen = set()
    for r in runs:
        if r.id in seen:
            raise StudyError(f"run {r.id} appears twice; give the variants distinct names")
        seen.add(r.id)


def load(path: str | Path) -> Study:
    """Read and expand a study file; every run's config is validated now, before anything starts."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise StudyError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    study = expand(spec)
    for r in study.runs:
        try:
            cfg = load_config(r.job, r.args(r.lr or study.lr_grid[0], Path("runs/_check"))[2:])
        except ConfigError as e:
            raise StudyError(f"{path}: run {r.id}: {e}") from None
        if r.stage == GRID and not (cfg.data.val_size and cfg.eval.every and cfg.fed.rounds % cfg.eval.every == 0):
            raise StudyError(f"{path}: run {r.id}: the lr is selected on the last round's validation accuracy; set "
                             f"data.val_size > 0 and an eval.every that divides fed.rounds ({cfg.fed.rounds})")
    return study


# ---- learning-rate selection (on validation rows only) -------------------------------------------------------

def summaries(results: Path) -> dict[str, dict]:
    """Every run summary in `results` by run id."""
    out = {}
    for p in sorted(Path(results).glob("*.json")):
        if p.name != "selection.json":
            try:
                out[p.stem] = json.loads(p.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise StudyError(f"{p}: not a run summary ({e}); delete it to run that run again") from None
    return out


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
            best = min(per_lr, key=lambda lr: (-float(np.mean(per_lr[lr])), lr))
            if np.isfinite(np.mean(per_lr[best])):  # every lr failed: nothing to select
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
                _write_json(results / f"{r.id}.json", {**done[r.id], "variant": variant})
    for r in study.stage(GRID):  # a key whose selection is pending (e.g. an lr added to the grid) has no "main" yet
        if r.key not in chosen and r.id in done and done[r.id].get("variant"):
            _write_json(results / f"{r.id}.json", {**done[r.id], "variant": ""})
    _write_json(results / "selection.json", {"study": study.name, "rule": "max mean val_accuracy over seeds "
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


# ---- summaries ------------------------------------------------------------------------------------------------

def _write_json(path: Path, obj: dict) -> None:
    """Write atomically through a temporary file of its own (concurrent writers never share one)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _r(x, digits: int = 6):
    """A JSON-safe rounded float (None for NaN)."""
    x = float(x)
    return None if math.isnan(x) else round(x, digits)


def summarize(run: Run, run_dir: Path, lr: float, study: str) -> dict:
    """The few-KB record of a finished run that the report reads (never the run folder itself)."""
    import h5py

    with h5py.File(Path(run_dir) / "run.h5", "r") as f:
        if "final" not in f:
            raise StudyError(f"{run_dir}/run.h5 has no /final: the run did not finish")
        fin, rounds = dict(f["final"].attrs), f["rounds"]
        cfg = json.loads(f.attrs["config_json"])
        if not math.isclose(float(cfg["fed"]["lr"]), lr, rel_tol=1e-9):
            raise StudyError(f"{run_dir} ran at fed.lr={cfg['fed']['lr']:g}, not at the lr {lr:g} it is summarized for")
        pre = dict(f["oda/pre"].attrs) if "oda/pre" in f else {}
        base = dict(f["base"].attrs) if "base" in f else {}
        sgp = dict(f["sgp"].attrs) if "sgp" in f else {}
        public = dict(f["public"].attrs) if "public" in f else {}
        timing = dict(f["timing"].attrs) if "timing" in f else {}
        out = {"study": study, "run": run.id, "status": "ok", "stage": run.stage, "variant": run.variant,
               "method": run.method,
               "task": run.task, "model": run.model, "model_name": cfg["model"]["name"], "split": run.split,
               "seed": run.seed, "lr": lr, "lr_from": list(run.key),
               **({"lr_step": run.lr_step} if run.lr_step is not None else {}), "overrides": list(run.overrides),
               "rounds": int(cfg["fed"]["rounds"]), "clients": int(cfg["fed"]["clients"]),
               "examples_per_client": int(cfg["data"]["max_train_per_client"]),
               "pooled_clients": int(cfg["data"].get("pooled_clients", 0)), "settings": settings(cfg, sgp),
               "eval_rounds_on": "val" if cfg["data"].get("val_size") else "test",
               "accuracy": _r(fin["accuracy"]), "sub_accuracy": _r(fin["sub_accuracy"]),
               "base_accuracy": _r(base.get("accuracy", float("nan"))), "val_accuracy": _r(fin["val_accuracy"]),
               "n_eval": int(fin["n_eval"]), "n_val": int(fin["n_val"]), "eval_dtype": cfg["eval"]["dtype"],
               **{k: counts(fin.get(k)) for k in ("pred_counts", "sub_pred_counts", "label_counts")},
               **{k: bits(fin.get(k)) for k in ("correct", "sub_correct")},
               "base_pred_counts": counts(base.get("pred_counts")), "base_correct": bits(base.get("correct")),
               "eval_rounds": [int(x) for x in rounds["round"][:]],
               "eval_acc": [_r(x) for x in rounds["eval_acc"][:]],
               "train_loss": [_r(np.nanmean(x)) if np.isfinite(x).any() else None for x in rounds["train_loss"][:]],
               "realigned": [int(x) for x in rounds["realigned"][:]],
               "realignments": int(np.sum(rounds["realigned"][:])),
               "emulator_lora_bytes": int(fin["emulator_lora_bytes"]) if "emulator_lora_bytes" in fin else None,
               "drift_probe": [_r(x) for x in rounds["drift_probe"][:]] if "drift_probe" in rounds else [],
               "rejected_updates": int(rounds["rejected"][:].sum()) if "rejected" in rounds else 0,
               "comm_bytes_per_round": _r(fin["comm_bytes_per_round"], 1),
               "client_model_bytes": int(fin["client_model_bytes"]), "full_model_bytes": int(fin["full_model_bytes"]),
               "trainable_params": int(fin["trainable_params"]),
               "kl_before": _r(pre.get("kl_before", float("nan"))), "kl_after": _r(pre.get("kl_after", float("nan"))),
               "kl_on": str(pre.get("kl_on", cfg["data"]["public"])),
               "kl_before_self": _r(pre.get("kl_before_self", float("nan"))),
               "kl_after_self": _r(pre.get("kl_after_self", float("nan"))),
               "sgp_groups": f["sgp/groups"][:].tolist() if "sgp/groups" in f else [],
               "sgp_candidates": candidates(f["sgp/candidates"][:]) if "sgp/candidates" in f else [],
               "public_self": self_public(public),
               "wall_s": _r(float(np.sum(rounds["wall_s"][:])), 1), "world_size": int(f.attrs["world_size"]),
               "eval_s": _r(fin["eval_s"], 1) if "eval_s" in fin else None,
               "base_eval_s": _r(timing["base_eval_s"], 1) if "base_eval_s" in timing else None,
               "commit": str(f.attrs["git_commit"]),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((Path(run_dir) / "run.h5").stat().st_mtime))}
    return RunSummary(**out).to_json()


def failed_summary(run: Run, lr: float, study: str, code: int) -> dict:
    """The record of a run that ended without /final: selection ranks it last, the report lists it."""
    return RunSummary(study=study, run=run.id, status="failed", exit_code=code, stage=run.stage,
                      variant=run.variant if run.stage != GRID else "", method=run.method, task=run.task,
                      model=run.model, split=run.split, seed=run.seed, lr=lr, lr_from=list(run.key),
                      lr_step=run.lr_step, overrides=list(run.overrides), accuracy=None, val_accuracy=None,
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())).to_json()


def counts(x) -> list[int] | None:
    """A /final per-class count attribute (test predictions or labels) as a list; None where the run has none
    (GSM8K, or a run from before it was recorded)."""
    return None if x is None else [int(v) for v in np.atleast_1d(x)]


def candidates(rows) -> list[list]:
    """/sgp/candidates [C, 3] as [[n, p, summed distance (None: no placement under sgp.max_distance)]]."""
    return [[int(n), int(p), _r(c) if math.isfinite(c) else None] for n, p, c in rows]


def self_public(attrs: dict) -> dict:
    """The /public attributes of a data.public=self run (its generation settings and time); {} otherwise."""
    if attrs.get("mode") != "self":
        return {}
    keys = ("temperature", "max_new_tokens", "batch_size", "seed", "n_public", "n_heldout", "generate_s", "sha256")
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items() if k in keys}


def settings(cfg: dict, sgp: dict | None = None) -> dict:
    """The settings the tables vary, as fields (the job defaults included, not only the overrides). sgp_n and sgp_p
    are the (n, p) the run pruned with (the /sgp attributes `sgp`: sgp.auto and sgp.max_distance choose them),
    the config's values where SGP did not run (uniform drop, no pruning) or the run file predates them."""
    sgp, s = sgp or {}, cfg["sgp"]
    return {"sgp_n": int(sgp.get("n", s["n"])), "sgp_p": int(sgp.get("p", s["p"])), "sgp_enabled": s["enabled"],
            "sgp_auto": bool(s.get("auto", False)), "sgp_remove_layers": int(s.get("remove_layers", 0)),
            "sgp_max_distance": float(s.get("max_distance", 0.0)),
            "adapter_layers": cfg["model"]["adapter_layers"], "adapter_first": cfg["model"]["adapter_first"],
            "pre_align": cfg["oda"]["pre_align"], "pre_epochs": cfg["oda"]["pre_epochs"],
            "re_align": cfg["oda"]["re_align"], "realign_every": cfg["oda"]["every"],
            "trigger": cfg["oda"].get("trigger", "every"), "drift_threshold": cfg["oda"].get("drift_threshold"),
            "max_interval": cfg["oda"].get("max_interval", 0), "quant": cfg["quant"]["enabled"],
            "mu": cfg["fed"]["mu"], "aggregator": cfg["fed"]["aggregator"], "local_epochs": cfg["fed"]["local_epochs"],
            "local_steps": cfg["fed"]["local_steps"], "batch_size": cfg["fed"]["batch_size"],
            "public": cfg["data"]["public"], "val_size": cfg["data"].get("val_size", 0)}


# ---- reuse: a run another study already made with identical settings ------------------------------------------

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
            _write_json(results / f"{run.id}.json", copy.to_json())
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


# ---- routes ---------------------------------------------------------------------------------------------------

def mpirun_command(run: Run, lr: float, run_dir: Path) -> list[str]:
    """The local route's launch line: the mpirun next to this python (the MPI mpi4py is linked against)."""
    mpirun = Path(sys.executable).parent / "mpirun"
    return [str(mpirun if mpirun.exists() else "mpirun"), "-n", str(run.np), sys.executable, "-m", "mpi4py", "-m",
            "fedsoda_mpi.main", *run.args(lr, run_dir)]


MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
           "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "HDF5_USE_FILE_LOCKING": "FALSE",
           "OMP_WAIT_POLICY": "PASSIVE", "FEDSODA_PROGRESS": "0"}  # passive: idle OpenMP threads must not spin on shared cores


def wanted(run: Run, stages: list[str] | None = None, tasks: list[str] | None = None,
           variants: list[str] | None = None) -> bool:
    """`study run --stage/--task/--variant`: whether a run passes the filters (each empty filter passes all)."""
    return (not stages or run.stage in stages) and (not tasks or run.task in tasks) and \
        (not variants or run.variant in variants)


def check_filters(study: Study, stages: list[str] | None, tasks: list[str] | None,
                  variants: list[str] | None) -> None:
    """`study run --stage/--task/--variant`: every name given must name something of the study (a typo would
    otherwise select nothing and exit 0 as if all were done)."""
    for flag, given, have in (("--stage", stages, {r.stage for r in study.runs}),
                              ("--task", tasks, {r.task for r in study.runs}),
                              ("--variant", variants, {r.variant for r in study.runs})):
        unknown = sorted(set(given or ()) - have)
        if unknown:
            raise StudyError(f"{flag} {unknown[0]}: not a {flag[2:]} of {study.name} "
                             f"(its {flag[2:]}s: {', '.join(sorted(n for n in have if n))})")


def run_local(study: Study, results: Path, runs_root: Path, stages: list[str] | None, max_runs: int,
              tasks: list[str] | None = None, variants: list[str] | None = None) -> int:
    """Run every unfinished run in order (each under its own mpirun, resume=auto), summarize it, re-select.
    A run that fails leaves a failed summary (selection ranks it last until it succeeds; `list` shows it as failed)
    and the loop goes on; the next `study run` runs it again (resume=auto: from its checkpoint, else from the start,
    the failed attempt moved aside). SIGUSR1 / SIGTERM / Ctrl-C are passed to the run's mpirun and stop the loop
    (the same command continues)."""
    results.mkdir(parents=True, exist_ok=True)
    lock = open(results / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise StudyError(f"another `study run` is using {results}; wait for it or stop it first") from None
    failed, started = [], 0
    chosen = reuse_all(study, results, stages, tasks, variants)  # the selection; re-selected when a run finishes
    for run in study.runs:
        if not wanted(run, stages, tasks, variants):
            continue
        lr = lr_for(run, chosen)
        now = state(run, lr, results)
        if now == "done":
            continue
        if lr is None:
            print(f"[study] {run.id}: waiting for the lr selection of {run.key} (its grid runs are unfinished)")
            continue
        if now == "stale":
            supersede(run, lr, results, runs_root)
        elif now == "failed":
            print(f"[study] {run.id}: it failed before; running it again", flush=True)
        source = reuse_summary(study, run, lr, results)
        if source:
            print(f"[study] {run.id}: identical to {source}; its summary is reused, not run again", flush=True)
            chosen = write_selection(study, results)
            continue
        if max_runs and started >= max_runs:
            break
        started += 1
        out = runs_root / run.id / "stdout.txt"
        since = out.stat().st_size if out.is_file() else 0
        rc, stop = _launch(run, lr, runs_root / run.id)
        if stop or rc in (75, 143):
            print(f"[study] stopped during {run.id} (exit code {rc}); run the same command to continue", flush=True)
            return rc or 75
        if rc != 0:
            print(f"[study] {run.id}: exit code {rc}{failure_hint(runs_root / run.id, since)}", flush=True)
            _write_json(results / f"{run.id}.json", failed_summary(run, lr, study.name, rc))
            failed.append(run.id)
        else:
            _write_json(results / f"{run.id}.json", summarize(run, runs_root / run.id, lr, study.name))
            print(f"[study {time.strftime('%H:%M:%S')}] {run.id}: done -> {results / (run.id + '.json')}", flush=True)
        chosen = write_selection(study, results)
    if failed:
        print(f"[study] {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def failure_hint(run_dir: Path, since: int = 0) -> str:
    """The end of the line that reports a failed run: the last `fedsoda-mpi:` or FATAL line its mpirun wrote to
    stdout.txt after byte `since` (this attempt's), and the files to read, those that exist (a run refused at
    start writes no log.txt)."""
    out, log = run_dir / "stdout.txt", run_dir / "log.txt"
    try:
        with open(out, "rb") as f:
            f.seek(since)
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    said = [ln.strip() for ln in lines if ln.startswith("fedsoda-mpi:") or "FATAL" in ln]
    files = [str(p) for p in (log, out) if p.is_file()]
    return (f": {said[-1]}" if said else "") + (f"; see {' and '.join(files)}" if files else "")


def _launch(run: Run, lr: float, run_dir: Path) -> tuple[int, int]:
    """One run under its own mpirun; (exit code, the stop signal this process received meanwhile or 0)."""
    env = {**os.environ, **MPI_ENV, "OMP_NUM_THREADS": str(run.threads)}
    cmd = mpirun_command(run, lr, run_dir)
    print(f"[study {time.strftime('%H:%M:%S')}] {run.id} (lr {lr:g}): {shlex.join(cmd)}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = [0]
    with open(run_dir / "stdout.txt", "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

        def forward(signum, frame):  # USR1: finish the round and checkpoint; TERM / INT: abandon the round
            stop[0] = signum
            proc.send_signal(signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)

        old = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
        try:
            rc = proc.wait()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    return rc, stop[0]


def list_runs(study: Study, results: Path) -> None:
    chosen = select(study, summaries(results)) if results.is_dir() else {}
    for stage in study.stages:
        runs = study.stage(stage)
        if not runs:
            continue
        states = [state(r, lr_for(r, chosen), results) for r in runs]
        failed = states.count("failed")
        print(f"stage {stage}: {len(runs)} runs, {states.count('done')} done"
              + (f", {failed} failed" if failed else ""))
        for r, now in zip(runs, states):  # stale: at an lr the selection no longer picks; failed: `run` runs it again
            lr = lr_for(r, chosen)
            print(f"  {now}  {r.id}  lr={'selected (pending)' if lr is None else f'{lr:g}'}  np={r.np}")


def task_args(study: Study, stage: str, index: int, results: Path, runs_root: Path) -> tuple[Run, float, Path]:
    """The run of array task `index` of `stage` (the Slurm route), with its lr and run folder."""
    runs = study.stage(stage)
    if not 0 <= index < len(runs):
        raise StudyError(f"stage {stage} has {len(runs)} runs; array index {index} is out of range")
    run = runs[index]
    lr = lr_for(run, select(study, summaries(results)))
    if lr is None:
        raise StudyError(f"{run.id}: no selected lr for {run.key} yet; the grid stage must finish first")
    return run, lr, runs_root / run.id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fedsoda_mpi.study", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("list", "run", "name", "stages", "jobs", "args", "summarize", "select"))
    ap.add_argument("study", help="a study file, e.g. studies/cpu_smollm2.yaml")
    ap.add_argument("stage", nargs="?", help="args/summarize: the stage of the array")
    ap.add_argument("index", nargs="?", type=int, help="args/summarize: the array task index")
    ap.add_argument("--results", help="summaries folder (default: results/<study name>)")
    ap.add_argument("--runs", help="run folders (default: runs/<study name>)")
    ap.add_argument("--stage", dest="stages", action="append", help="run: only these stages (repeatable)")
    ap.add_argument("--task", dest="tasks", action="append", help="run: only runs of these tasks (repeatable)")
    ap.add_argument("--variant", dest="variants", action="append",
                    help="run: only runs of these variants (repeatable; a variant's name, or main)")
    ap.add_argument("--all", action="store_true", help="summarize: every finished run folder under --runs")
    ap.add_argument("--failed", type=int, default=0, metavar="CODE",
                    help="summarize: record the run as failed with this exit code")
    ap.add_argument("--max-runs", type=int, default=0, help="run: stop after starting this many runs")
    a = ap.parse_args(argv)
    try:
        study = load(a.study)
        results = Path(a.results or ROOT / "results" / study.name)
        runs_root = Path(a.runs or Path("runs") / study.name).resolve()
        if a.command == "list":
            list_runs(study, results)
        elif a.command == "name":
            print(study.name)
        elif a.command == "jobs":  # the job files its runs start from (slurm/prepare.sh prepares their models)
            print(" ".join(sorted({r.job for r in study.runs})))
        elif a.command == "stages":  # for slurm/submit_all.sh: one line per stage: name, runs, ranks, threads
            for stage in study.stages:
                runs = study.stage(stage)
                if runs:
                    print(stage, len(runs), max(r.np for r in runs), max(r.threads for r in runs))
        elif a.command == "run":
            check_filters(study, a.stages, a.tasks, a.variants)
            return run_local(study, results, runs_root, a.stages, a.max_runs, a.tasks, a.variants)
        elif a.command == "select":
            results.mkdir(parents=True, exist_ok=True)
            for key, lr in sorted(write_selection(study, results).items()):
                print(" ".join(key), f"{lr:g}")
        elif a.command == "summarize" and a.all:  # (re)write the summary of every finished run folder
            results.mkdir(parents=True, exist_ok=True)
            chosen = select(study, summaries(results))
            for run in study.runs:
                lr, run_dir = lr_for(run, chosen), runs_root / run.id
                if lr is not None and (run_dir / "run.h5").is_file():
                    try:
                        _write_json(results / f"{run.id}.json", summarize(run, run_dir, lr, study.name))
                        print(f"summarized {run.id}")
                    except StudyError as e:
                        print(f"skipped {run.id}: {e}")
            write_selection(study, results)
        elif a.command in ("args", "summarize"):
            if a.stage is None or a.index is None:
                raise StudyError(f"{a.command}: give the stage and the array index")
            run, lr, run_dir = task_args(study, a.stage, a.index, results, runs_root)
            if a.command == "args":
                now = state(run, lr, results)
                if now == "done":
                    print(f"{run.id}: already done ({results / (run.id + '.json')})", file=sys.stderr)
                    return DONE_EXIT
                if now == "stale":
                    supersede(run, lr, results, runs_root)
                print(shlex.join(run.args(lr, run_dir)))
            else:
                results.mkdir(parents=True, exist_ok=True)
                _write_json(results / f"{run.id}.json", failed_summary(run, lr, study.name, a.failed) if a.failed
                            else summarize(run, run_dir, lr, study.name))
    except StudyError as e:
        print(f"fedsoda-mpi: study error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
