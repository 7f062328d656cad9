"""A study file expanded into its runs: the axes (methods, tasks, models, splits, seeds, learning-rate grid), the
variants (ablation, parameter study, gap explanation) and the report's declared tables, each run's config validated
before anything starts. Stage `grid` runs every lr at the select seeds, stage `seeds` the other seeds at the
selected lr (study_select.py), one stage per variant group after them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .config import ROOT, ConfigError, load_config
from .study_tables import Table, TableError, Vocabulary, read_spec
from .study_tables import tables as declared_tables

GRID, SEEDS = "grid", "seeds"


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
    tables: dict[str, Table] = field(default_factory=dict)  # the report's declared tables (`tables`)

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
        runs = [replace(r, overrides=r.overrides
                        + (f"eval.base={'true' if firsts[r.task, r.model] == r.id else 'false'}",))
                for r in runs]
    _check_unique(runs)
    _check_graph(runs, stages)
    reuse = [Path(x) if Path(x).is_absolute() else ROOT / x for x in _list(spec, "reuse", [])]
    return Study(str(spec["name"]), runs, lrs, select_seeds, stages, reuse, tables(spec))


def tables(spec: dict, columns: set | None = None, thens: set | None = None) -> dict[str, Table]:
    """The study's validated `tables` (study_tables.py): rows may name its variants and `main <method>` of its grid
    methods, `group` one of its variant groups, `method` and `split` a method and a split some of its runs have;
    `columns` and `thens`: the report's names, checked when given."""
    variants = [v for v in spec.get("variants") or [] if isinstance(v, dict)]
    grid = spec.get("grid") or {}

    def named(key: str, plural: str) -> set[str]:
        """The values of `key` and `plural` (one value or a list) in the grid and the variants."""
        values = [x for v in [grid, *variants] for k in (key, plural) if v.get(k) is not None
                  for x in (v[k] if isinstance(v[k], list) else [v[k]])]
        return {str(x) for x in values}

    known = Vocabulary(rows={str(v.get("name")) for v in variants} | {f"main {m}" for m in _list(grid, "methods", [])},
                       groups={str(v.get("group", "variants")) for v in variants},
                       methods=named("method", "methods"), splits=named("split", "splits") | {"iid"})
    try:
        return declared_tables(spec, known, columns, thens)
    except TableError as e:
        raise StudyError(str(e)) from None


def read_tables(path: str | Path, columns: set | None = None, thens: set | None = None) -> dict[str, Table]:
    """The validated `tables` of a study file, without expanding or checking its runs (what the report needs, which
    passes its column and `then` names)."""
    try:
        return tables(read_spec(path), columns, thens)
    except TableError as e:
        raise StudyError(str(e)) from None


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
        raise StudyError("grid.lr_extend: expected a mapping from methods of grid.methods "
                         f"({', '.join(map(str, methods))})"
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


def wanted(run: Run, stages: list[str] | None = None, tasks: list[str] | None = None,
           variants: list[str] | None = None) -> bool:
    """`study run --stage/--task/--variant`: whether a run passes the filters (each empty filter passes all)."""
    return (not stages or run.stage in stages) and (not tasks or run.task in tasks) and \
        (not variants or run.variant in variants)
