"""The study report: the statistics tables of docs/results.md, generated from per-run summaries only.

    python analysis/report.py results/cpu_smollm2 --out docs/results.md [--figures docs/gallery] [--study FILE]

Reads <results>/*.json (one summary per finished run, fedsoda_mpi.summary.RunSummary), <results>/selection.json
and the `tables` of the study file (--study, default studies/<study>.yaml): the rows, labels and reference of each
comparison table (table3, table4, drift, gap, bridge, auto, selfpublic, fedsrd, noniid, smaller_client) and how it is
drawn (fedsoda_mpi/study_tables.py; a row may narrow its runs to a method and a split and name its own reference);
never a run folder. In the --out file the lines between `<!-- report:begin NAME -->` and `<!-- report:end NAME -->` are
rewritten and everything else is kept (the captions live there); a new file gets every section (SECTIONS). The
curves section writes <figures>/<study>_curves_<task>.png (default <out folder>/gallery). A marker
`<!-- report:begin NAME@STUDY -->` belongs to the report of study STUDY: when the file has such markers for the
study being reported, only they are rewritten, otherwise the untagged ones are.

Table-2 runs are the grid and seeds stages at the selected lr (variant "main"); other stages are found by variant
name. Statistics over seeds (fedsoda_mpi.stats): mean ± sample std, the 95% CI of the mean (Student t), paired
differences by seed. A partial study renders with what exists: missing cells are "—" and every mean states its n.
Same input, byte-identical output.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from statistics import median
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # common, and the repository's fedsoda_mpi without an installed package
from common import markdown_table as table, plt, round_axis  # noqa: E402  (Agg backend and the house style)
from fedsoda_mpi.methods import METHODS, NAMES  # noqa: E402
from fedsoda_mpi.study import StudyError, read_tables  # noqa: E402
from fedsoda_mpi.summary import RunSummary, SummaryError  # noqa: E402
from fedsoda_mpi.stats import (binomial_se, mcnemar, mean_of, mean_std, missing, paired, t_ci,  # noqa: E402
                               unbits, wilson)

DASH = "—"
MAIN_STAGES = ("grid", "seeds")
GSM8K = "gsm8k"
TASKS = ("sst2", "boolq", "gsm8k")  # display order; other tasks follow alphabetically
BEGIN = re.compile(r"^<!-- report:begin (\S+) -->\s*$")
END = "<!-- report:end {} -->"
WARNED: set[str] = set()  # runs already warned about (one warning each)


class ReportError(ValueError):
    """Bad input; the message is the one line the user sees (exit code 2)."""


# ---- formatting -----------------------------------------------------------------------------------------------

def num(x, digits: int = 1, sign: bool = False) -> str:
    """`x` with `digits` decimals (no "-0.0"), "—" when missing."""
    if missing(x):
        return DASH
    x = 0.0 if round(float(x), digits) == 0 else float(x)
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def pct(frac) -> str:
    """A fraction as a percentage with one decimal."""
    return DASH if missing(frac) else num(100 * float(frac))


def mean_pm(m: float, s: float, n: int) -> str:
    """`mean ± std` (std left out for n = 1, "—" for n = 0)."""
    if n == 0:
        return DASH
    return num(m) if n == 1 else f"{num(m)} ± {num(s)}"


def ci_text(ci, sign: bool = False) -> str:
    """A confidence interval as `[lo, hi]`, "—" without one."""
    return DASH if ci is None else f"[{num(ci[0], sign=sign)}, {num(ci[1], sign=sign)}]"


def mib(nbytes, digits: int) -> str:
    """Bytes in MiB with `digits` decimals."""
    return DASH if missing(nbytes) else f"{float(nbytes) / 2 ** 20:.{digits}f}"


def count(x) -> str:
    """A count with thousands separators."""
    return DASH if missing(x) else f"{int(round(float(x))):,}"


# ---- loading --------------------------------------------------------------------------------------------------

def read_json(path: Path):
    """A JSON file's content (ReportError when unreadable)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not a readable JSON file ({str(e).splitlines()[0]})") from None


def load(folder: Path) -> tuple[list[RunSummary], dict]:
    """The summaries of `folder` (sorted by run id) and its selection.json ({} when absent)."""
    if not folder.is_dir():
        raise ReportError(f"{folder}: not a folder")
    runs = []
    for path in sorted(folder.glob("*.json")):
        if path.name == "selection.json":
            continue
        try:
            runs.append(RunSummary.from_json(read_json(path), str(path)))
        except SummaryError as e:
            raise ReportError(str(e)) from None
    if not runs:  # a study that has just started: every section says so
        print(f"warning: {folder}: no run summaries yet (*.json besides selection.json)", file=sys.stderr)
    failed = [s for s in runs if s.status == "failed"]
    for s in failed:
        print(f"warning: {s.run} failed (exit code {s.exit_code}): in no table", file=sys.stderr)
    runs = [s for s in runs if s.status != "failed"]
    sel_path = folder / "selection.json"
    selection = read_json(sel_path) if sel_path.exists() else {}
    if not isinstance(selection, dict):
        raise ReportError(f"{sel_path}: not a selection file (expected a JSON object)")
    return sorted(runs, key=lambda s: str(s.run)), selection


Setting = tuple  # (task, model, split)


def setting_of(s: RunSummary) -> Setting:
    """A run's (task, model, split)."""
    return (str(s.task), str(s.model), str(s.split))


def setting_order(st: Setting) -> tuple:
    """Sort key of settings: TASKS' order first."""
    return (TASKS.index(st[0]) if st[0] in TASKS else len(TASKS), *st)


def method_order(m: str) -> tuple:
    """Sort key of methods: METHODS' order, then other names."""
    return (METHODS.index(m) if m in METHODS else len(METHODS), m)


@dataclass
class Results:
    """All summaries of a study folder plus where the report goes."""

    runs: list[RunSummary]
    selection: dict
    out: Path
    figures: Path
    tables: dict = field(default_factory=dict)  # the study file's declared tables (fedsoda_mpi.study.tables)
    folder: str = ""  # the summaries folder's name: results/<study>, the study's name while it has no run

    @property
    def study(self) -> str:
        """The study name(s) of the runs; the folder's name before the first run finishes."""
        return ", ".join(sorted({str(s.study) for s in self.runs})) or self.folder

    def settings(self, runs: list[RunSummary] | None = None) -> list[Setting]:
        """The settings of `runs` (default: all), in display order."""
        return sorted({setting_of(s) for s in (self.runs if runs is None else runs)}, key=setting_order)

    def label(self, st: Setting) -> str:
        """The task, plus model and split when the study has more than one of them (`st` may be a (task, model)
        pair: a table drawn across splits)."""
        if len({x[1:len(st)] for x in self.settings()}) > 1:
            return f"{st[0]} ({', '.join(st[1:])})"
        return st[0]

    def main(self, st: Setting, method: str) -> list[RunSummary]:
        """The Table-2 runs of `method` in setting `st`: grid and seeds stages at the lr selection.json chose
        (a run labelled main at another lr, e.g. after the grid changed, is left out with a warning)."""
        chosen = self.selected(st, method)
        runs = [s for s in self.runs if s.stage in MAIN_STAGES and s.variant == "main"
                and s.method == method and setting_of(s) == st]
        for s in runs:
            if chosen is not None and s.lr != chosen and s.run not in WARNED:
                WARNED.add(s.run)
                print(f"warning: {s.run} ran at lr {s.lr} but the selected lr is {chosen}: left out",
                      file=sys.stderr)
        return [s for s in runs if chosen is None or s.lr == chosen]

    def selected(self, st: Setting, method: str) -> float | None:
        """The lr selection.json chose for (method, task, model, split), None when it has no entry."""
        for row in self.selection.get("selected", []):
            if (row.get("method"), row.get("task"), row.get("model"), row.get("split")) == (method, *st):
                return row.get("lr")
        return None

    def variant(self, st: Setting, name: str) -> list[RunSummary]:
        """The runs of variant `name` (any variant group; never grid, seeds or gsm8k) in setting `st`."""
        return [s for s in self.runs if s.stage not in (*MAIN_STAGES, GSM8K) and s.variant == name
                and setting_of(s) == st]

    def declared(self, name: str) -> list[tuple[tuple, tuple, tuple]]:
        """A declared table's rows as (label cells, spec, its reference's spec), then the other variants of its group
        (if it names one; labelled by their name, paired with the table's reference); [] when the study has none."""
        table = self.tables.get(name)
        if not table:
            return []
        rows = [(r.labels, spec_of(r.row, r.method, r.split), spec_of(r.ref)) for r in table.rows]
        listed, pad = {sp[:2] for _, sp, _ in rows}, (DASH,) * (len(rows[0][0]) - 1)
        rows += [((*pad, n), spec_of(n), spec_of(table.ref)) for n in stage_variants(self, table.group)
                 if ("variant", n) not in listed]
        return rows

    def rows(self, st: Setting, spec: tuple) -> list[RunSummary]:
        """A table row's runs in setting `st`, or in every split of a (task, model) pair `st`: spec = (kind, name,
        method, split) (spec_of), narrowed to the method and the split when they are not None."""
        kind, name, method, split = spec
        here = [x for x in self.settings() if x[:len(st)] == tuple(st) and split in (None, x[2])]
        runs = [s for x in here for s in (self.main(x, name) if kind == "main" else self.variant(x, name))]
        return [s for s in runs if method in (None, s.method)]


def spec_of(row: str, method: str | None = None, split: str | None = None) -> tuple:
    """A declared row's runs as (kind, name, method, split): ("main", <method>, ...) for `main <method>`, else
    ("variant", <name>, ...)."""
    return ("main", row[5:], method, split) if row.startswith("main ") else ("variant", row, method, split)


def by_seed(runs: list[RunSummary], key: str = "accuracy") -> dict[int, float]:
    """{seed: 100 * run[key]} (points), the runs without a value left out; one run per seed."""
    out = {}
    for s in runs:
        if not missing(getattr(s, key)):
            if int(s.seed) in out and s.run not in WARNED:
                WARNED.add(s.run)
                print(f"warning: two runs of seed {s.seed} in one group; using {s.run}", file=sys.stderr)
            out[int(s.seed)] = 100 * float(getattr(s, key))
    return out


def field_mean(runs: list[RunSummary], key: str):
    """Mean of `key` over the runs that have it (None if none)."""
    vals = [float(getattr(s, key)) for s in runs if not missing(getattr(s, key))]
    return math.fsum(vals) / len(vals) if vals else None


def distinct(values) -> str:
    """The distinct values, with how many of each when there is more than one."""
    values = [v for v in values if v is not None]
    if not values:
        return DASH
    kinds = sorted(set(values), key=lambda v: (str(type(v)), v))
    if len(kinds) == 1:
        return str(kinds[0])
    return ", ".join(f"{v} ({values.count(v)} run{'s' if values.count(v) > 1 else ''})" for v in kinds)


# ---- cells and orders the sections share ---------------------------------------------------------------------

def per_setting(res: Results, settings: list[Setting], render) -> str:
    """One `#### <setting>` part per setting, `render(st)` below its heading."""
    return "\n\n".join(f"#### {res.label(st)}\n\n" + render(st) for st in settings)


def acc_cells(acc: dict[int, float]) -> list[str]:
    """Test accuracy by seed as [mean ± std, 95% CI, n]."""
    return [mean_pm(*mean_std(acc.values())), ci_text(t_ci(acc.values())), str(len(acc))]


def diff_parts(p: dict) -> list[str]:
    """A paired difference as [mean, 95% CI, per seed]."""
    return [num(p["mean"], sign=True), ci_text(p["ci"], sign=True), per_seed(p)]


def per_seed(p: dict) -> str:
    """A paired difference per seed: `s0 +1.0, s1 -2.0`."""
    return ", ".join(f"s{s} {num(d, sign=True)}" for s, d in zip(p["seeds"], p["diffs"])) or DASH


def delta_text(p: dict, n: bool = False) -> str:
    """A paired difference as `mean [95% CI]` (and `(n=...)`); — without pairs when `n`."""
    if n and not p["n"]:
        return DASH
    return f"{num(p['mean'], sign=True)} {ci_text(p['ci'], sign=True)}" + (f" (n={p['n']})" if n else "")


def lr_text(lr) -> str:
    """A selected lr, or "pending" before the selection."""
    return "pending" if lr is None else f"{float(lr):g}"


def tasks_of(runs: list[RunSummary]) -> list[str]:
    """The runs' tasks in display order."""
    return sorted({s.task for s in runs}, key=lambda t: setting_order((t,)))


def natural(name: str) -> tuple:
    """Sort key that orders r2 before r10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def stage_variants(res: Results, stage: str) -> list[str]:
    """The variant names of a stage's runs, naturally sorted."""
    return sorted({s.variant for s in res.runs if s.stage == stage}, key=natural)


# ---- sections -------------------------------------------------------------------------------------------------

def stages_of(runs: list[RunSummary], key=None) -> list[str]:
    """The runs' stages: grid and seeds first, then the others sorted (by `key`)."""
    return [x for x in MAIN_STAGES if any(s.stage == x for s in runs)] + \
        sorted({s.stage for s in runs} - set(MAIN_STAGES), key=key)


def sec_setup(res: Results) -> str:
    """Study, models, the settings the runs share, test and validation sizes, commits, number of summaries."""
    R = res.runs
    stages = stages_of(R)
    per_task = lambda key: "; ".join(f"{t}: {distinct([getattr(s, key) for s in R if s.task == t])}"  # noqa: E731
                                     for t in tasks_of(R))
    models = sorted({f"{s.model} ({s.model_name})" for s in R})
    grid_lrs = sorted({float(s.lr) for s in R if s.stage == "grid" and not missing(s.lr)})
    commits = sorted({str(s.commit) for s in R})
    lines = [f"- study: `{res.study}`; {len(R)} run summaries ("
             + ", ".join(f"{st} {sum(s.stage == st for s in R)}" for st in stages) + ")",
             f"- model(s): {', '.join(models)}; split(s): {distinct([s.split for s in R])}",
             f"- rounds: {distinct([s.rounds for s in R])}; clients: {distinct([s.clients for s in R])}; "
             f"training examples per client: {distinct([s.examples_per_client for s in R])}",
             f"- seeds: {', '.join(str(x) for x in sorted({int(s.seed) for s in R}))}; "
             f"learning-rate grid: {', '.join(f'{x:g}' for x in grid_lrs) or DASH}",
             f"- test set size n_eval (accuracy is on the full test set): {per_task('n_eval')}",
             f"- validation rows n_val (lr selection, per-round curves): {per_task('n_val')}",
             f"- evaluation dtype: {distinct([s.eval_dtype for s in R])}",
             f"- commits of the runs: {', '.join(f'`{c}`' for c in commits)}"]
    return "\n".join(lines)


def sec_lr(res: Results) -> str:
    """Validation accuracy at each grid lr per (task, method), the selected lr in bold."""
    selected = {(e["task"], e.get("model", "?"), e.get("split", "?"), e["method"]): e
                for e in res.selection.get("selected", []) if isinstance(e, dict) and "method" in e and "task" in e}
    vals: dict[tuple, dict[float, list[float]]] = {}
    for s in res.runs:  # grid summaries: also the keys whose selection is pending
        if s.stage == "grid" and not missing(s.lr) and not missing(s.val_accuracy):
            vals.setdefault((*setting_of(s), s.method), {}).setdefault(float(s.lr), []).append(
                100 * float(s.val_accuracy))
    for key, e in selected.items():  # the record behind each choice ("<lr>/s<seed>": accuracy)
        rec: dict[float, list[float]] = {}
        for k, v in sorted((e.get("val_accuracy") or {}).items()):
            if not missing(v):
                rec.setdefault(float(k.split("/")[0]), []).append(100 * float(v))
        vals[key] = rec
    if not vals:
        return "_No grid runs yet._"
    lrs = sorted({lr for per in vals.values() for lr in per})
    rows = []
    for key in sorted(vals, key=lambda k: (setting_order(k[:3]), method_order(k[3]))):
        chosen = selected[key]["lr"] if key in selected else None
        cells = []
        for lr in lrs:
            v = vals[key].get(lr, [])
            text = num(mean_std(v)[0]) + (f" (n={len(v)})" if len(v) > 1 else "")
            cells.append(f"**{text}**" if chosen is not None and float(chosen) == lr and v else text)
        ran = [lr for lr in lrs if vals[key].get(lr)]
        edge = chosen is not None and len(ran) > 1 and float(chosen) in (ran[0], ran[-1])
        rows.append([res.label(key[:3]), NAMES.get(key[3], key[3]), *cells,
                     "pending" if chosen is None else f"**{float(chosen):g}**" + (" (grid edge)" if edge else "")])
    rule = res.selection.get("rule", "no selection.json yet")
    return (table(["task", "method", *[f"val. acc. % at lr = {lr:g}" for lr in lrs], "selected lr"], rows, 2)
            + f"\n\nValidation accuracy (held-out training rows, never the test set). Rule: {rule}. \"Grid edge\": the "
            "selected lr is the smallest or largest this method ran, so a better one may lie outside its grid "
            "(the study's grid.lr_extend adds learning rates for one method).")


TABLE2 = ["method", "test acc. % (mean ± std)", "95% CI", "n seeds", "test-set SE (pts)", "sub-LLM acc. %",
          "comm MiB/round/client", "client model MiB", "trainable params", "seeds not used to select lr: acc. % (n)",
          "most-predicted label, % of test rows"]


def method_row(m: str, runs: list[RunSummary]) -> list[str]:
    """A Table-2 row: the method's test accuracy over seeds, the test-set SE at that accuracy, the sub-LLM, sizes,
    the seeds that did not select the lr, and the most-predicted label's share."""
    acc = by_seed(runs)
    mu, _, n = mean_std(acc.values())
    n_eval = min((int(s.n_eval) for s in runs if not missing(s.n_eval)), default=0)
    return [NAMES[m], *acc_cells(acc), num(100 * binomial_se(mu / 100, n_eval) if n else math.nan),
            num(mean_std(by_seed(runs, "sub_accuracy").values())[0]), mib(field_mean(runs, "comm_bytes_per_round"), 3),
            mib(field_mean(runs, "client_model_bytes"), 1), count(field_mean(runs, "trainable_params")),
            unselected(runs), top_label_share(runs)]


def sec_table2(res: Results) -> str:
    """Per task: the four methods (mean ± std, CI, n, sub-LLM, bytes) and FedSODA − baseline paired by seed."""
    def render(st: Setting) -> str:
        """The method table and the paired differences of one setting."""
        rows = [method_row(m, res.main(st, m)) for m in METHODS]
        bm, bs, bn = mean_std([100 * float(s.base_accuracy) for s in res.runs
                               if setting_of(s) == st and not missing(s.base_accuracy)])
        rows.append(["base model", mean_pm(bm, bs, bn), DASH, str(bn)] + [DASH] * 7)
        majority = majority_share([s for s in res.runs if setting_of(s) == st])
        rows += [["always the majority class", num(majority), DASH, DASH] + [DASH] * 7] if majority is not None else []
        ref = by_seed(res.main(st, "fedsoda"))
        diffs = [[f"FedSODA − {NAMES[m]}", ", ".join(map(str, p["seeds"])) or DASH, *diff_parts(p),
                  DASH if p["excludes_zero"] is None else ("yes" if p["excludes_zero"] else "no")]
                 for m in METHODS[1:] for p in [paired(ref, by_seed(res.main(st, m)))]]
        return table(TABLE2, rows) + "\n\n" + table(["paired difference", "seeds", "mean Δ (pts)", "95% CI",
                                                      "per seed", "CI excludes 0"], diffs)
    return per_setting(res, res.settings([s for s in res.runs if s.stage in MAIN_STAGES]), render) or \
        "_No Table-2 runs yet._"


def top_label_share(runs: list[RunSummary]) -> str:
    """Per seed, the share (%) of test rows given the label the run's full model predicts most (pred_counts): 100
    is a model that answers one label whatever the input; — when no run records pred_counts (GSM8K, say)."""
    shares = {s.seed: 100 * max(s.pred_counts) / sum(s.pred_counts) for s in runs if s.pred_counts}
    return ", ".join(f"s{k} {num(v)}" for k, v in sorted(shares.items())) or DASH


def label_counts_of(runs: list[RunSummary]) -> list[int] | None:
    """The test labels per class, from the first run that records them (every run of a task has the same)."""
    return next((s.label_counts for s in runs if s.label_counts), None)


def majority_share(runs: list[RunSummary]) -> float | None:
    """The accuracy (%) of always predicting the test set's most frequent label."""
    counts = label_counts_of(runs)
    return 100 * max(counts) / sum(counts) if counts else None


def unselected(runs: list[RunSummary]) -> str:
    """Mean ± std (n) of the runs that did not take part in the lr selection (stage seeds, not grid)."""
    acc = by_seed([s for s in runs if s.stage != "grid"])
    return f"{mean_pm(*mean_std(acc.values()))} ({len(acc)})" if acc else DASH


def mean_curve(runs: list[RunSummary]) -> list[tuple[int, float, float, float, int]]:
    """Per evaluated round: (round, mean, min, max, n) of the validation accuracy (%) over the runs."""
    per: dict[int, list[float]] = {}
    for s in runs:
        for r, a in zip(s.eval_rounds or [], s.eval_acc or []):
            if not missing(a):
                per.setdefault(int(r), []).append(100 * float(a))
    return [(r, mean_std(v)[0], min(v), max(v), len(v)) for r, v in sorted(per.items())]


def last_val(s: RunSummary):
    """The validation accuracy (%) of a run's last evaluated round (None if never evaluated)."""
    pts = [a for a in (s.eval_acc or []) if not missing(a)]
    return 100 * float(pts[-1]) if pts else None


def sec_table9(res: Results) -> str:
    """Rounds until each method's mean validation curve reaches FedOT's final validation accuracy."""
    def render(st: Setting) -> str:
        """FedOT's target and each method's first round at it, in one setting."""
        target, _, n_t = mean_std([v for v in (last_val(s) for s in res.main(st, "fedot")) if v is not None])
        rows = []
        for m in METHODS:
            runs = res.main(st, m)
            curve = mean_curve(runs)
            hit = next((c for c in curve if n_t and c[1] >= target - 1e-9), None)
            reached = DASH if not n_t or not curve else (str(hit[0]) if hit else "not reached")
            rows.append([NAMES[m], str(len([s for s in runs if last_val(s) is not None])), reached,
                         num(hit[1]) if hit else DASH, num(curve[-1][1]) if curve else DASH])
        goal = f"{num(target)}% (mean of n = {n_t} seeds)" if n_t else f"{DASH} (no FedOT validation curve yet)"
        return f"FedOT's target: {goal}\n\n" + table(
            ["method", "n seeds", "first round with mean val. acc. ≥ target", "mean val. acc. % there",
             "mean val. acc. % at the last evaluated round"], rows)
    settings = res.settings([s for s in res.runs if s.stage in MAIN_STAGES and s.variant == "main"])
    return per_setting(res, settings, render) or "_No Table-2 runs yet._"


LABEL_NAMES = {"sst2": ("negative", "positive"), "boolq": ("false", "true")}  # = fedsoda_mpi.data.LABEL_WORDS


def share(counts, k: int = 1) -> str:
    """The share (%) of class k in per-class counts (predictions or labels); — without counts."""
    return num(100 * counts[k] / sum(counts)) if counts and sum(counts) else DASH


def sec_transfer(res: Results) -> str:
    """Per task: every grid and seeds run that records its test predictions per class, the adapter on the
    full model and on the sub-LLM it was trained against: accuracy and the share of rows given class 1."""
    runs = [s for s in res.runs if s.stage in MAIN_STAGES and s.pred_counts]
    if not runs:
        return "_No run records its test predictions per class yet._"
    parts = []
    for task in tasks_of(runs):
        word = LABEL_NAMES.get(task, ("class 0", "class 1"))[1]
        mine = sorted((s for s in runs if s.task == task),
                      key=lambda s: (method_order(s.method), float(s.lr), s.seed))
        rows = [[NAMES.get(s.method, s.method), s.stage, f"{float(s.lr):g}", str(s.seed),
                 pct(s.accuracy), share(s.pred_counts), pct(s.sub_accuracy),
                 share(s.sub_pred_counts)] for s in mine]
        if based := base_run([s for s in res.runs if s.task == task], "base_pred_counts"):
            rows.append(["base model", DASH, DASH, DASH, pct(based.base_accuracy),
                         share(based.base_pred_counts), DASH, DASH])
        answer = f"test rows whose answer is \"{word}\": {share(label_counts_of(mine))} %"
        parts.append(f"#### {task} ({answer})\n\n" + table(
            ["method", "stage", "lr", "seed", "full model: acc. %", f"full model: % \"{word}\"",
             "sub-LLM: acc. %", f"sub-LLM: % \"{word}\""], rows, 2))
    return "\n\n".join(parts)


def base_run(runs: list[RunSummary], key: str) -> RunSummary | None:
    """The run that evaluated the base model (a study does it once per task): the first whose `key` is recorded."""
    return next((s for s in runs if not missing(getattr(s, key))), None)


def sec_gsm8k(res: Results) -> str:
    """The gsm8k stage: one row per run, with the Wilson interval over the test questions, the sub-LLM, the time of
    the final evaluation; then the base model (from the run that evaluated it)."""
    runs = sorted((s for s in res.runs if s.stage == GSM8K),
                  key=lambda s: (setting_order(setting_of(s)), method_order(s.method), int(s.seed), s.run))
    if not runs:
        return "_No gsm8k runs yet._"
    hours = lambda s: DASH if missing(s.eval_s) else num(float(s.eval_s) / 3600)  # noqa: E731
    rows = [[NAMES.get(s.method, s.method), str(s.seed),
             DASH if missing(s.lr) else f"{float(s.lr):g}", pct(s.accuracy),
             ci_text(wilson(s.accuracy, s.n_eval)), count(s.n_eval), pct(s.sub_accuracy),
             hours(s)] for s in runs]
    models = list(dict.fromkeys(s.model for s in runs))
    for model in models:
        if based := gsm8k_base(runs, model):
            rows.append(["base model" if len(models) == 1 else f"base model ({model})", DASH, DASH,
                         pct(based.base_accuracy), ci_text(wilson(based.base_accuracy, based.n_eval)),
                         count(based.n_eval), DASH, DASH])
    return table(["method", "seed", "lr", "test acc. %", "95% CI", "n_eval", "sub-LLM acc. %",
                  "final evaluation, h"], rows, 2) + gsm8k_paired(runs)


def gsm8k_base(runs: list[RunSummary], model) -> RunSummary | None:
    """The run that evaluated `model`'s base model on GSM8K (a study does it once per task and model), preferring
    one whose summary records which questions it answered (`base_correct`)."""
    mine = [s for s in runs if s.model == model]
    return base_run(mine, "base_correct") or base_run(mine, "base_accuracy")


def gsm8k_paired(runs: list[RunSummary]) -> str:
    """Question by question (`mcnemar`), for the runs whose summaries record which questions they answered: each
    FedSODA run against every other method of its seed and setting and against its own sub-LLM, then every run
    against its model's base model. Only models evaluated on the same test questions (the same n_eval: the first
    n of the test file) are paired."""
    several = len({s.model for s in runs}) > 1  # then a row names its model
    name = lambda s: NAMES.get(s.method, s.method) + (f" ({s.model})" if several else "")  # noqa: E731
    pairs = []  # (run a, its name, the name of b, b's answered-correctly bits, b's n_eval)
    for s in (s for s in runs if s.method == "fedsoda" and s.correct):
        pairs += [(s, name(s), name(o), o.correct, o.n_eval) for o in runs if o.method != "fedsoda"
                  and o.correct and o.seed == s.seed and setting_of(o) == setting_of(s)]
        pairs += [(s, name(s), "its sub-LLM", s.sub_correct, s.n_eval)] if s.sub_correct else []
    for s in (s for s in runs if s.correct):
        if (based := gsm8k_base(runs, s.model)) and based.base_correct:
            pairs.append((s, name(s), "the base model", based.base_correct, based.n_eval))
    rows = []
    for s, a, b, theirs, n in (p for p in pairs if int(p[4]) == int(p[0].n_eval)):
        t = mcnemar(unbits(s.correct, int(n)), unbits(theirs, int(n)))
        rows.append([f"{a} − {b}", str(s.seed), num(t["diff"], sign=True), ci_text(t["ci"], sign=True),
                     count(t["only_a"]), count(t["only_b"]), f"{t['p']:.3g}"])
    if not rows:
        return ""
    return "\n\n" + table(["paired on the test questions: a − b", "seed", "Δ (pts)", "95% CI", "only a right",
                            "only b right", "McNemar p (exact)"], rows, 1)


# ---- what a run's summary says about its pruning and alignment (comparison columns) -------------------------

def groups_np(runs: list[RunSummary]) -> str:
    """(n, p) of SGP read from the runs' pruned groups [t, e] (layers t < l <= e): n = e - t, p = the count."""
    found = sorted({(tuple(sorted({int(e) - int(t) for t, e in s.sgp_groups})), len(s.sgp_groups))
                    for s in runs if s.sgp_groups})
    return ", ".join(f"({'/'.join(map(str, n))}, {p})" for n, p in found) or DASH


def realign_r(runs: list[RunSummary]) -> str:
    """The re-alignment interval r read from the runs' per-round `realigned` flags ("never" without any)."""
    found = set()
    for s in runs:
        flags, rounds = s.realigned or [], s.eval_rounds or []
        if not flags:
            continue
        rounds = rounds if len(rounds) == len(flags) else range(1, len(flags) + 1)
        done = [int(r) for r, f in zip(rounds, flags) if f]
        steps = {b - a for a, b in zip([0] + done, done)}
        found.add("never" if not done else "/".join(map(str, sorted(steps))))
    return ", ".join(sorted(found)) or DASH


def extra_overrides(res: "Results", runs: list[RunSummary]) -> str:
    """The overrides of `runs` beyond those every Table-2 run shares (what makes a variant a variant)."""
    shared = [set(s.overrides or []) for s in res.runs if s.stage in MAIN_STAGES]
    shared = set.intersection(*shared) if shared else set()
    extra = sorted({o for s in runs for o in (s.overrides or []) if o not in shared
                    and not o.startswith("eval.base=")})
    return ", ".join(f"`{o}`" for o in extra) or DASH


def realignments(s: RunSummary):
    """The number of re-alignments of one run (`realignments`, else counted from the per-round flags)."""
    if not missing(s.realignments):
        return int(s.realignments)
    return sum(int(x) for x in s.realigned) if s.realigned else None


def emulator_bytes(s: RunSummary):
    """The emulator LoRA bytes one client rank received over the run's re-alignments (the copy after pre-alignment,
    which every aligned run sends once, left out); None when the summary has no `emulator_lora_bytes`."""
    n = realignments(s)
    if n == 0:
        return 0
    return None if n is None or missing(s.emulator_lora_bytes) else n * int(s.emulator_lora_bytes)


def trigger_text(runs: list[RunSummary]) -> str:
    """How the runs decided to re-align: `drift, τ = <tau>[, max <k>]` or the fixed interval r (`realign_r`)."""
    found = sorted({f"drift, τ = {float(st['drift_threshold']):g}"
                    + (f", max {int(st['max_interval'])}" if st.get("max_interval") else "")
                    for st in (s.settings or {} for s in runs) if st.get("trigger") == "drift"})
    if found:
        return ", ".join(found)
    r = realign_r(runs)
    return r if r in (DASH, "never") else f"every {r}"


def chosen_np(runs: list[RunSummary]) -> str:
    """(n, p) the runs pruned with: the summaries' settings (the chosen ones for sgp.auto), else their groups."""
    found = sorted({(int(s.settings["sgp_n"]), int(s.settings["sgp_p"])) for s in runs
                    if "sgp_auto" in (s.settings or {})})
    return ", ".join(f"({n}, {p})" for n, p in found) if found else groups_np(runs)


def removed_layers(runs: list[RunSummary]) -> str:
    """The emulator layers the runs pruned: n * p of their groups."""
    found = sorted({sum(int(e) - int(t) for t, e in s.sgp_groups) for s in runs if s.sgp_groups})
    return ", ".join(map(str, found)) or DASH


def chosen_distance(s: RunSummary):
    """The summed distance per removed layer of a run's (n, p) (its sgp_candidates row), None when unknown."""
    st, n_p = s.settings or {}, None
    if "sgp_auto" in st:
        n_p = (int(st["sgp_n"]), int(st["sgp_p"]))
    for n, p, cost in s.sgp_candidates or []:
        if (int(n), int(p)) == n_p and not missing(cost) and n * p:
            return float(cost) / (n * p)
    return None


def candidates_text(runs: list[RunSummary]) -> str:
    """Every (n, p) a run compared with its distance per removed layer (— for no placement under
    sgp.max_distance), the chosen one in bold; from the first run that has them (seeds share the public texts)."""
    for s in runs:
        if s.sgp_candidates:
            chosen = (int(s.settings["sgp_n"]), int(s.settings["sgp_p"]))
            cells = []
            for n, p, cost in s.sgp_candidates:
                text = f"({n}, {p}) {DASH if missing(cost) else f'{float(cost) / (n * p):.4f}'}"
                cells.append(f"**{text}**" if (int(n), int(p)) == chosen else text)
            return "; ".join(cells)
    return DASH


def before_after(runs: list[RunSummary], before: str, after: str) -> str:
    """`mean before → mean after` over the runs (— when neither is recorded)."""
    a, b = field_mean(runs, before), field_mean(runs, after)
    return DASH if a is None and b is None else f"{num(a, 3)} → {num(b, 3)}"


def groups_text(runs: list[RunSummary]) -> str:
    """The distinct SGP groups of the runs (seeds may differ when the public texts are generated per seed)."""
    found = sorted({" ".join(f"({int(t)},{int(e)})" for t, e in s.sgp_groups) for s in runs if s.sgp_groups})
    return "; ".join(found) or DASH


def generation_text(runs: list[RunSummary]) -> str:
    """temperature, new tokens and texts of the self-generated public data (— for a public file)."""
    found = sorted({(g.get("temperature"), g.get("max_new_tokens"), g.get("n_public")) for g in
                    (s.public_self or {} for s in runs) if g}, key=str)
    return "; ".join(f"T={t:g}, {m} new tokens, {n} texts" for t, m, n in found) or DASH


# ---- the comparison tables: "Δ vs a reference, paired by seed" ------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One row of a comparison table: its label cells, its runs, the reference its Δ is paired with ({seed: test
    accuracy in points}; None: this row is the reference), whether it is a `main <method>` row, and its setting."""

    label: tuple
    runs: list
    ref: dict | None
    main: bool = False
    st: Setting = ()
    ref_runs: list = ()


def diff_cells(r: Row, seeds: bool) -> list[str]:
    """Accuracy mean ± std and n of the row's runs, then Δ vs its reference paired by seed: mean, 95% CI (and the
    paired seeds when `seeds`)."""
    acc = by_seed(r.runs)
    cells = [mean_pm(*mean_std(acc.values())), str(len(acc))]
    if r.ref is None:
        return cells + ["(reference)", DASH] + [DASH] * seeds
    p = paired(acc, r.ref)
    return cells + [num(p["mean"], sign=True), ci_text(p["ci"], sign=True)] + \
        [", ".join(map(str, p["seeds"])) or DASH] * seeds


def gap_closed(res: Results, r: Row) -> str:
    """The share (%) of the FedSODA − FedPETuning gap of the setting that the row closes, both paired by seed with
    the reference."""
    if r.ref is None:
        return "(reference)"
    p, gap = paired(by_seed(r.runs), r.ref), paired(by_seed(res.main(r.st, "fedpetuning")), r.ref)
    return num(100 * p["mean"] / gap["mean"] if p["n"] and gap["n"] and gap["mean"] != 0 else math.nan)


def comm_share(r: Row) -> str:
    """The row's mean bytes per round and client as a share (%) of its reference's (— without both)."""
    mine, ref = field_mean(r.runs, "comm_bytes_per_round"), field_mean(r.ref_runs, "comm_bytes_per_round")
    return DASH if mine is None or not ref else num(100 * mine / ref)


COLUMNS = {  # name: (header, cell(res, row)): the columns a comparison table may show besides the accuracy
    "overrides": ("overrides", lambda res, r: DASH if r.main else extra_overrides(res, r.runs)),
    "methods": ("method", lambda res, r: ", ".join(NAMES.get(m, m) for m in sorted(
        {s.method for s in r.runs}, key=method_order)) or DASH),
    "lr": ("lr", lambda res, r: distinct([s.lr for s in r.runs]) if r.runs else DASH),
    "groups np": ("(n, p)", lambda res, r: groups_np(r.runs)),
    "r": ("r", lambda res, r: realign_r(r.runs)),
    "trigger": ("re-alignment", lambda res, r: trigger_text(r.runs) if r.runs else DASH),
    "realignments": ("re-alignments (mean)", lambda res, r: num(mean_of(realignments(s) for s in r.runs))),
    "emulator": ("emulator MiB/client (run)", lambda res, r: mib(mean_of(emulator_bytes(s) for s in r.runs), 2)),
    "probe": ("drift probe, run mean", lambda res, r: num(mean_of(mean_of(s.drift_probe or []) for s in r.runs), 2)),
    "gap closed": ("gap closed %", gap_closed),
    "sub": ("sub-LLM acc. % (mean)", lambda res, r: pct(field_mean(r.runs, "sub_accuracy"))),
    "comm": ("comm MiB/round/client", lambda res, r: mib(field_mean(r.runs, "comm_bytes_per_round"), 3)),
    "comm share": ("comm % of the reference's", lambda res, r: comm_share(r)),
    "client": ("client model MiB", lambda res, r: mib(field_mean(r.runs, "client_model_bytes"), 1)),
    "kl after": ("KL after pre-align (mean)", lambda res, r: num(field_mean(r.runs, "kl_after"), 3)),
    "K": ("layers removed K", lambda res, r: removed_layers(r.runs)),
    "chosen np": ("(n, p)", lambda res, r: chosen_np(r.runs)),
    "distance": ("distance / removed layer", lambda res, r: num(mean_of(chosen_distance(s) for s in r.runs), 4)),
    "kl": ("held-out KL before → after pre-align", lambda res, r: before_after(r.runs, "kl_before", "kl_after")),
    "public": ("D_public", lambda res, r: distinct([(s.settings or {}).get("public") for s in r.runs])),
    "groups": ("SGP groups", lambda res, r: groups_text(r.runs)),
    "kl on": ("KL measured on", lambda res, r: distinct([s.kl_on for s in r.runs])),
    "kl self": ("KL on generated text", lambda res, r: before_after(r.runs, "kl_before_self", "kl_after_self")),
    "generation": ("generation", lambda res, r: generation_text(r.runs))}
COST = ("comm", "client", "kl after")


def candidates_table(rows: list[Row]) -> str:
    """Every (n, p) each non-reference row's runs compared (sgp.auto), the chosen one in bold."""
    cand = [[r.label[0], candidates_text(r.runs)] for r in rows if r.ref is not None]
    return "\n\n" + table(["run", "candidates (n, p): summed distance / K (chosen in bold)"], cand, 2) if cand else ""


THENS = {"candidates": candidates_table}  # `then` of a declared table: a table drawn below from its rows


def comparison(res: Results, rows: list[Row], labels: tuple, before=(), after=(), left: int = 1, seeds: bool = False,
               delta: str = "Δ vs FedSODA (pts)") -> str:
    """The table "Δ vs a reference, paired by seed": per row its label cells, the `before` COLUMNS, the test accuracy
    (mean ± std, n), Δ vs the row's reference with its 95% CI (and the paired seeds when `seeds`), the `after`
    COLUMNS."""
    cols = lambda names, r: [COLUMNS[c][1](res, r) for c in names]  # noqa: E731
    headers = [*labels, *(COLUMNS[c][0] for c in before), "test acc. % (mean ± std)", "n", delta, "95% CI",
               *["paired seeds"] * seeds, *(COLUMNS[c][0] for c in after)]
    return table(headers, [[*r.label, *cols(before, r), *diff_cells(r, seeds), *cols(after, r)] for r in rows], left)


def declared_settings(res: Results, name: str, rows: list[tuple]) -> list[Setting]:
    """The settings a declared table is drawn for (its `settings`: of its variant rows' runs, else of its main rows';
    of its variant rows' only; of its group's runs; `task` only; (task, model) pairs when drawn across splits)."""
    lay = res.tables[name]
    names = {sp[1] for _, sp, ref in rows if sp[0] == "variant" and sp != ref}
    methods = {sp[1] for _, sp, _ in rows if sp[0] == "main"}
    mine = lambda runs: list(dict.fromkeys(st[:2] if lay.splits else st for st in res.settings(runs)  # noqa: E731
                                           if lay.task is None or st[0] == lay.task))
    have = mine([s for s in res.runs if s.stage == lay.group] if lay.settings == "group" else
                [s for s in res.runs if s.stage not in (*MAIN_STAGES, GSM8K) and s.variant in names])
    return have or (mine([s for s in res.runs if s.stage in MAIN_STAGES and s.variant == "main"
                          and s.method in methods]) if lay.settings == "variants or main" else [])


def sec_declared(res: Results, name: str) -> str:
    """A comparison table the study file declares (`tables.<name>`: its rows and how it is drawn), per setting."""
    declared = res.declared(name)
    if not declared:
        return NO_TABLE.format(name)
    lay = res.tables[name]

    def render(st: Setting) -> str:
        """The table (and its `then`) in one setting."""
        rows = [Row(label, res.rows(st, sp), None if sp == ref else by_seed(res.rows(st, ref)), sp[0] == "main", st,
                    res.rows(st, ref)) for label, sp, ref in declared]
        return comparison(res, rows, lay.labels, lay.before, lay.after, lay.left_columns, lay.seeds, lay.delta) + (
            THENS[lay.then](rows) if lay.then else "")
    return per_setting(res, declared_settings(res, name, declared), render) or lay.empty


def shown_elsewhere(res: Results) -> tuple[set[str], set[str]]:
    """The stages and the variant names other sections show: Table 2, gsm8k, budget, the variant groups of the
    declared tables; the variants a declared table names."""
    drawn = [name for name in res.tables if SECTIONS.get(name, (0, 0))[1] is None]  # others have no section
    names = {sp[1] for name in drawn for _, sp, _ in res.declared(name) if sp[0] == "variant"}
    return {*MAIN_STAGES, GSM8K, BUDGET, *(res.tables[n].group for n in drawn if res.tables[n].group)}, names


def sec_variants(res: Results) -> str:
    """Every variant run no other section shows (paper.yaml's non-IID and public-data groups, new groups), by
    group and setting; Δ against the same variant's FedSODA runs when the group has several methods, else
    against the FedSODA main runs of the setting."""
    stages, names = shown_elsewhere(res)
    runs = [s for s in res.runs if s.stage not in stages and s.variant not in names]
    if not runs:
        return "_No other variant runs._"
    parts = []
    for stage in sorted({s.stage for s in runs}, key=natural):
        for st in res.settings([s for s in runs if s.stage == stage]):
            here = [s for s in runs if s.stage == stage and setting_of(s) == st]
            rows = []
            for name in sorted({s.variant for s in here}, key=natural):
                of = [s for s in here if s.variant == name]
                methods = sorted({s.method for s in of}, key=method_order)
                ref = by_seed([s for s in of if s.method == "fedsoda"] if len(methods) > 1 else res.main(st, "fedsoda"))
                rows += [Row((name, NAMES.get(m, m), extra_overrides(res, mine)), mine,
                             None if len(methods) > 1 and m == "fedsoda" else ref)
                         for m in methods for mine in [[s for s in of if s.method == m]]]
            parts.append(f"#### {stage}: {res.label(st)}\n\n"
                         + comparison(res, rows, ("variant", "method", "overrides"), (), COST, left=3))
    return "\n\n".join(parts) + (
        "\n\nΔ: run − FedSODA in points, paired by seed, 95% CI (Student t); the FedSODA runs of the same variant "
        "when the group runs several methods (they are the reference), else the FedSODA main runs of the setting.")


# ---- the other sections: curves, cost, selection over seeds, budget -------------------------------------------

def figure_name(res: Results, st: Setting) -> str:
    """`<study>_curves_<task>.png` (model and split appended when a task has several settings)."""
    study = re.sub(r"[^A-Za-z0-9_.-]+", "_", res.study)
    extra = f"_{st[1]}_{st[2]}" if sum(x[0] == st[0] for x in res.settings()) > 1 else ""
    return f"{study}_curves_{st[0]}{extra}.png"


def plot_curves(res: Results, st: Setting, path: Path) -> None:
    """Validation accuracy per evaluated round: the mean over seeds per method with a min–max band."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    rounds = []
    for i, m in enumerate(METHODS):
        curve = mean_curve(res.main(st, m))
        if not curve:
            continue
        r, mu, lo, hi, _ = zip(*curve)
        rounds += r
        n = len([s for s in res.main(st, m) if last_val(s) is not None])
        ax.plot(r, mu, marker="o", ms=3, color=f"C{i}", label=f"{NAMES[m]} (n={n})")
        ax.fill_between(r, lo, hi, color=f"C{i}", alpha=0.2, lw=0)
    round_axis(ax, sorted(set(rounds)))
    ax.set_xlabel("round")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{res.study}: {res.label(st)} (mean, min–max over seeds)")
    if rounds:
        ax.legend(loc="best", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def sec_curves(res: Results) -> str:
    """Writes one accuracy-vs-round PNG per task and links it."""
    settings = [st for st in res.settings() if any(mean_curve(res.main(st, m)) for m in METHODS)]
    if not settings:
        return "_No per-round validation curves yet._"
    links = []
    for st in settings:
        path = res.figures / figure_name(res, st)
        plot_curves(res, st, path)
        rel = Path(os.path.relpath(path.resolve(), res.out.resolve().parent)).as_posix()
        links.append(f"![{res.study}: validation accuracy per round, {res.label(st)}]({rel})")
    return "\n\n".join(links)


def minutes_cells(runs: list[RunSummary], key: str = "wall_s") -> list[str]:
    """[runs, hours summed, "median (min–max)" minutes per run] from the runs' `key` seconds ("—" without)."""
    mins = [float(getattr(s, key)) / 60 for s in runs if not missing(getattr(s, key))]
    if not mins:
        return [count(len(runs)), DASH, DASH]
    return [count(len(runs)), num(sum(mins) / 60), f"{num(median(mins))} ({num(min(mins))}–{num(max(mins))})"]


def cost_rows(runs: list[RunSummary], by: str, key: str = "wall_s") -> list[list[str]]:
    """[task, stage or method, *minutes_cells] for every task and value of `by` ("stage" or "method") with runs."""
    values = stages_of(runs, key=natural) if by == "stage" else sorted({s.method for s in runs}, key=method_order)
    return [[t, v if by == "stage" else NAMES.get(v, v), *minutes_cells(here, key)] for t in tasks_of(runs)
            for v in values if (here := [s for s in runs if s.task == t and getattr(s, by) == v])]


def sec_cost(res: Results) -> str:
    """What the study cost in wall time (each summary's wall_s): per task and stage, then per method and task for
    the grid and seeds runs, whose medians are the planning numbers for the runs still to come, then the final test
    evaluation of the runs that time it (eval_s)."""
    tail = ["wall time, h (sum)", "min per run: median (min–max)"]
    parts = [(["task", "stage", "runs", *tail],
              cost_rows(res.runs, "stage") + [["all", "all", *minutes_cells(res.runs)]]),
             (["task", "method (grid and seeds runs)", "runs", *tail],
              cost_rows([s for s in res.runs if s.stage in MAIN_STAGES], "method")),
             (["task", "method (runs that record it)", "runs", "final test evaluation, h (sum)", tail[1]],
              cost_rows([s for s in res.runs if not missing(s.eval_s)], "method", "eval_s"))]
    return "\n\n".join(table(headers, rows, 2) for headers, rows in parts if rows)


def val_means(per_lr: dict[float, list[RunSummary]]) -> dict[float, float]:
    """The mean validation accuracy (points) over the seeds at each lr."""
    return {lr: mean_std(by_seed(runs, "val_accuracy").values())[0] for lr, runs in per_lr.items()}


def margin(means: dict[float, float], lr) -> float | None:
    """The mean validation accuracy at `lr` minus the best other lr's (None without a choice or another lr)."""
    rest = [v for x, v in means.items() if lr is None or x != float(lr)]
    return means[float(lr)] - max(rest) if lr is not None and float(lr) in means and rest else None


def seed0_choice(per_lr: dict[float, dict[int, RunSummary]]) -> float | None:
    """The lr a seed-0-only selection picks from a grid {lr: {seed: summary}}: the best seed-0 validation accuracy,
    ties to the smaller lr; None until every lr has a finished seed-0 run."""
    vals = {lr: runs[0].val_accuracy if 0 in runs else None for lr, runs in per_lr.items()}
    if not vals or any(missing(v) for v in vals.values()):
        return None
    return min(vals, key=lambda lr: (-float(vals[lr]), lr))


SEEDS3_CAPTION = (
    "First table: validation accuracy (held-out training rows, never the test set) of every grid run, the mean "
    "over seeds and each seed in parentheses; **bold**: the lr the study's rule selects ({}); †: the lr "
    "a selection on seed 0 alone picks (the rule of the first CPU study). Second table: test accuracy over the "
    "seeds at each of the two selections (mean ± sample std, 95% CI of the mean with Student t, df = n − 1) and "
    "the paired difference by seed; where the selection did not change the runs are the same. Margin: the selected "
    "lr's mean validation accuracy minus the best other lr's (a margin within the evaluation noise between machines "
    "is a tie; docs/results.md measures that noise on one rerun). Third: FedSODA − "
    "each baseline paired by seed, at both selections. Every run at the new selection took part in choosing it "
    "(its validation accuracy entered the mean), so Table 2's column of seeds not used to select the lr has no "
    "counterpart here: the choice now rests on three seeds' mean, which shrinks the winner's curse of a one-seed "
    "choice without removing it (the test accuracies were never looked at).")


def sec_seeds3(res: Results) -> str:
    """Selection over several seeds: per method, the grid's validation accuracy per lr and seed, the lr a
    seed-0-only selection picks and the one the study's rule (selection.json: best mean over its select seeds)
    picks; the test accuracy over seeds at both, their paired difference, and FedSODA − each baseline at both."""
    grid = [s for s in res.runs if s.stage == "grid" and not missing(s.lr)]
    settings = [st for st in res.settings(grid) if len({int(s.seed) for s in grid if setting_of(s) == st}) > 1]
    if not settings:
        return "_No grid at more than one seed yet (grid.select_seeds over several seeds)._"
    return per_setting(res, settings, lambda st: seeds3_part(res, st, [s for s in grid if setting_of(s) == st])) + \
        "\n\n" + SEEDS3_CAPTION.format(res.selection.get("rule", "no selection.json yet"))


def seeds3_part(res: Results, st: Setting, grid: list[RunSummary]) -> str:
    """The three tables of sec_seeds3 for one setting's grid runs."""
    per: dict[str, dict[float, dict[int, RunSummary]]] = {}
    for s in grid:
        per.setdefault(s.method, {}).setdefault(float(s.lr), {})[int(s.seed)] = s
    methods = sorted(per, key=method_order)
    lrs = sorted({lr for m in methods for lr in per[m]})
    seeds = sorted({seed for m in methods for by in per[m].values() for seed in by})
    picks = {m: (seed0_choice(per[m]), res.selected(st, m)) for m in methods}  # (seed-0 choice, the rule's)
    accs = {m: [by_seed(list(per[m].get(float(lr), {}).values())) if lr is not None else {} for lr in picks[m]]
            for m in methods}
    val_rows = [[NAMES.get(m, m), *(val_cell(per[m].get(lr, {}), seeds, lr, *picks[m]) for lr in lrs)]
                for m in methods]
    acc_rows = [[NAMES.get(m, m), *(c for lr, a in zip(picks[m], accs[m]) for c in (lr_text(lr), *acc_cells(a))),
                 *selection_change(per[m], picks[m], accs[m])] for m in methods]
    diff_rows = [[f"FedSODA − {NAMES.get(m, m)}", *(c for i in (0, 1) for c in diff_parts(
        paired(accs["fedsoda"][i], accs[m][i])))] for m in methods if m != "fedsoda" and "fedsoda" in methods]
    at = ", ".join(map(str, seeds))
    text = table(["method", *[f"val. acc. % at lr = {lr:g}: mean (s{' · s'.join(map(str, seeds))})" for lr in lrs]],
                 val_rows) + "\n\n" + table(
        ["method", "seed-0 selection: lr", "test acc. % (mean ± std)", "95% CI", "n", f"selection over seeds {at}: lr",
         "test acc. % (mean ± std)", "95% CI", "n", "val. margin over the next lr (pts)", "selection changed",
         "Δ new − seed-0 selection (pts) [95% CI]"], acc_rows)
    return text + ("\n\n" + table(["paired difference", "at seed-0 selections: mean Δ (pts)", "95% CI", "per seed",
                                   f"at selections over seeds {at}: mean Δ (pts)", "95% CI", "per seed"], diff_rows)
                   if diff_rows else "")


def val_cell(by: dict[int, RunSummary], seeds: list[int], lr: float, first, chosen) -> str:
    """The mean validation accuracy at one lr with each seed's in parentheses; bold at the rule's choice, † at the
    seed-0 choice."""
    v = by_seed(list(by.values()), "val_accuracy")
    if not v:
        return DASH
    text = f"{num(mean_std(v.values())[0])} ({' · '.join(num(v[x]) if x in v else DASH for x in seeds)})"
    return (f"**{text}**" if chosen is not None and float(chosen) == lr else text) + (" †" if first == lr else "")


def selection_change(per_lr: dict[float, dict], picks: tuple, accs: list[dict]) -> list[str]:
    """The chosen lr's validation margin, whether the selection changed from the seed-0 choice, and the test
    accuracy's paired change (new − seed-0 selection)."""
    first, chosen = picks
    same = first is not None and chosen is not None and float(first) == float(chosen)
    d = paired(accs[1], accs[0])
    return [num(margin(val_means({lr: list(by.values()) for lr, by in per_lr.items()}), chosen)),
            "no (the same runs)" if same else ("yes" if chosen is not None and first is not None else "pending"),
            DASH if same or not d["n"] else delta_text(d)]


BUDGET = "budget"  # the stage of the data-budget runs (studies/cpu_smollm2_ii.yaml: group budget)


def series_of(s: RunSummary) -> str:
    """A budget run's series: its variant name without the examples-per-client part (x64, fed_last3_x16 ->
    fed_last3), or its method when nothing is left."""
    name = re.sub(r"(^|_)x\d+$", "", str(s.variant))
    return name or str(s.method)


def select_by_val(runs: list[RunSummary]) -> tuple[float | None, float | None, list[RunSummary], int]:
    """Among runs at several lrs and seeds: the lr with the best mean validation accuracy over seeds (ties to the
    smaller lr; None while some lr lacks a seed another lr has), its margin over the next lr (points), its runs,
    and how many lrs ran."""
    per: dict[float, list[RunSummary]] = {}
    for s in runs:
        if not missing(s.lr):
            per.setdefault(float(s.lr), []).append(s)
    seeds = {int(s.seed) for s in runs}
    if not per or any({int(s.seed) for s in v} != seeds for v in per.values()):
        return None, None, [], len(per)
    means = val_means(per)
    best = min(means, key=lambda lr: (-means[lr], lr))
    return best, margin(means, best), per[best], len(per)


def sec_budget(res: Results) -> str:
    """The budget axis: per series (method, or the fed_last3 perfect emulator) and training examples per client,
    the lr selected by mean validation accuracy over the seeds among the budget runs' lr steps (at the first grid
    budget: the Table-2 runs at the study's selection), its test accuracy over seeds, and the FedSODA gaps paired
    by seed at each budget with how they change from the smallest budget to each larger one."""
    budget = [s for s in res.runs if s.stage == BUDGET]
    if not budget:
        return "_No budget runs yet._"
    return per_setting(res, res.settings(budget), lambda st: budget_part(res, st, [s for s in budget
                                                                                if setting_of(s) == st]))


def budget_points(res: Results, st: Setting, here: list[RunSummary]) -> dict[tuple[str, int], tuple]:
    """(series, examples per client) -> (lr, its validation margin, its runs, lrs run): select_by_val over the budget
    runs; a method's own budget is its Table-2 runs at the study's selection."""
    ex = lambda s: int(s.examples_per_client or 0)  # noqa: E731
    series = {series_of(s) for s in here}
    methods = sorted({s.method for s in res.runs if s.stage in MAIN_STAGES and setting_of(s) == st}, key=method_order)
    points = {(m, ex(main[0])): (res.selected(st, m), None, main, DASH) for m in methods
              if (main := res.main(st, m)) and m in series}
    for key in sorted({(series_of(s), ex(s)) for s in here}):
        points[key] = select_by_val([s for s in here if (series_of(s), ex(s)) == key])
    return points


def budget_part(res: Results, st: Setting, here: list[RunSummary]) -> str:
    """The selection table of one setting's budget runs, then FedSODA's paired gaps per budget."""
    points = budget_points(res, st, here)
    keys = sorted(points, key=lambda k: (method_order(k[0]), k[1]))
    accs = {k: by_seed(points[k][2]) for k in keys}
    rows = [[NAMES.get(k[0], k[0]), str(k[1]), lr_text(lr), str(n_lr), num(gain), *acc_cells(accs[k])]
            for k in keys for lr, gain, _, n_lr in [points[k]]]
    text = table(["series", "examples per client", "selected lr", "lrs run", "val. margin over the next lr (pts)",
                  "test acc. % (mean ± std)", "95% CI", "n seeds"], rows, 2)
    examples = sorted({k[1] for k in keys})
    others = sorted({k[0] for k in keys if k[0] != "fedsoda"}, key=method_order)
    if not others or "fedsoda" not in {k[0] for k in keys}:
        return text
    gaps = [[f"FedSODA − {NAMES.get(o, o)}", *budget_gaps(accs, o, examples)] for o in others]
    return text + "\n\n" + table(["paired gap (pts)", *[f"at {ex} per client: mean [95% CI]" for ex in examples],
                                  *[f"change {examples[0]} → {ex}: mean [95% CI]" for ex in examples[1:]]], gaps)


def budget_gaps(accs: dict, other: str, examples: list[int]) -> list[str]:
    """FedSODA − `other` paired by seed at each budget, then the change of that gap from the smallest budget to each
    larger one (paired by seed)."""
    diffs = [paired(accs.get(("fedsoda", ex), {}), accs.get((other, ex), {})) for ex in examples]
    first = dict(zip(diffs[0]["seeds"], diffs[0]["diffs"]))
    changes = [paired(dict(zip(d["seeds"], d["diffs"])), first) for d in diffs[1:]]
    return [delta_text(d, n=True) for d in diffs + changes]


NO_RUNS = "_No finished run of this study yet._"
NO_TABLE = "_The study file declares no `{}` table (its `tables` key)._"
SECTIONS = {  # name: (heading in a new file, its function; None: a table the study file declares, sec_declared)
            "setup": ("Setup", sec_setup), "lr": ("Learning-rate selection", sec_lr),
            "table2": ("Table 2: accuracy of the four methods", sec_table2),
            "table3": ("Table 3: ablation of ODA", None), "table4": ("Table 4: parameter study", None),
            "drift": ("Drift-triggered re-alignment", None),
            "table9": ("Table 9: rounds to reach FedOT's accuracy", sec_table9),
            "gap": ("The FedSODA − FedPETuning gap on SST-2", None),
            "bridge": ("FedSODA -> FedBiOT one setting at a time (SST-2)", None),
            "transfer": ("What each adapter answers, on the full model and on its sub-LLM", sec_transfer),
            "gsm8k": ("GSM8K", sec_gsm8k),
            "auto": ("Automatic pruning configuration (sgp.auto)", None),
            "selfpublic": ("Alignment without a public data set (data.public=self)", None),
            "variants": ("Other variants", sec_variants), "curves": ("Accuracy per round", sec_curves),
            "cost": ("What the study cost (wall time)", sec_cost),
            "seeds3": ("Selection over three seeds", sec_seeds3),
            "budget": ("Accuracy against training examples per client", sec_budget),
            "fedsrd": ("FedSRD: sparse LoRA transfer against FedAvg", None),
            "noniid": ("Non-IID: Dirichlet label skew against IID", None),
            "smaller_client": ("A smaller client: the quantized embedding table and LM head", None)}


def section(res: Results, name: str) -> str:
    """The generated content of one section."""
    if not res.runs:
        return NO_RUNS
    return sec_declared(res, name) if SECTIONS[name][1] is None else SECTIONS[name][1](res)


# ---- the out file ---------------------------------------------------------------------------------------------

def names_in(text: str) -> list[str]:
    """The NAMEs of the text's begin markers."""
    return [m.group(1) for m in (BEGIN.match(line.rstrip("\n")) for line in text.splitlines()) if m]


def splice(text: str, content: dict[str, str], ignore: frozenset = frozenset()) -> tuple[str, list[str]]:
    """Replace the lines between each begin/end marker pair whose NAME is in `content`; keep everything else (the
    names in `ignore` without a warning: another study's sections). Returns the new text and warnings (unknown
    names, a begin without its end)."""
    lines, out, warnings, i = text.splitlines(keepends=True), [], [], 0
    while i < len(lines):
        m = BEGIN.match(lines[i].rstrip("\n"))
        out.append(lines[i])
        i += 1
        if not m:
            continue
        name = m.group(1)
        if name not in content:
            if name not in ignore:
                warnings.append(f"unknown report section '{name}'; left alone")
            continue
        end = next((j for j in range(i, len(lines)) if lines[j].strip() == END.format(name)), None)
        if end is None:
            warnings.append(f"section '{name}' has no '{END.format(name)}' line; left alone")
            continue
        if not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(f"\n{content[name]}\n\n")
        i = end
    return "".join(out), warnings


def new_file(res: Results, content: dict[str, str]) -> str:
    """A fresh out file: every section in order, each with a heading."""
    parts = [f"# Results: {res.study}\n\nGenerated by `analysis/report.py` from the run summaries; the text between "
             "report markers is rewritten on every run.\n"]
    for name, (heading, _) in SECTIONS.items():
        parts.append(f"## {heading}\n\n<!-- report:begin {name} -->\n\n{content[name]}\n\n{END.format(name)}\n")
    return "\n".join(parts)


def open_results(a: argparse.Namespace) -> Results:
    """The summaries, the selection and the study file's tables the command line names (ReportError if unusable)."""
    out = Path(a.out)
    if not out.parent.is_dir():
        raise ReportError(f"--out {out}: folder {out.parent} does not exist")
    if out.exists() and not out.is_file():
        raise ReportError(f"--out {out}: not a file")
    res = Results(*load(Path(a.results)), out, Path(a.figures) if a.figures else out.parent / "gallery",
                  folder=Path(a.results).resolve().name)
    study_file = Path(a.study) if a.study else HERE.parent / "studies" / f"{res.study}.yaml"
    if a.study or study_file.is_file():
        try:
            res.tables = read_tables(study_file, set(COLUMNS), set(THENS))
        except StudyError as e:
            raise ReportError(str(e)) from None
    return res


def rewrite(res: Results, text: str | None) -> tuple[str, list[str], list[str]]:
    """The new out file, the sections written and the warnings. A file with markers NAME@STUDY of this study gets
    only those rewritten; otherwise its untagged markers are (other studies' tagged sections left alone)."""
    markers = names_in(text) if text is not None else []
    tagged = {n: n.split("@", 1) for n in markers if "@" in n}
    own = [n for n, (name, study) in tagged.items() if study == res.study and name in SECTIONS]
    if own:
        keys = {tagged[n][0]: n for n in own}
        wanted = list(keys)
    else:
        keys = {n: n for n in SECTIONS}
        wanted = list(SECTIONS) if text is None else [n for n in SECTIONS if n in markers]
    content = {keys[n]: section(res, n) if n in wanted else "" for n in SECTIONS if n in keys}
    if text is None:
        return new_file(res, content), wanted, []
    new, warnings = splice(text, content, frozenset(markers) - set(content) if own else frozenset(tagged))
    elsewhere = {name for name, _ in tagged.values()}  # a section another study's report fills
    skipped = [n for n in SECTIONS if n not in wanted and n not in elsewhere]
    if skipped and not own:
        warnings.append(f"{res.out} has no section(s) {', '.join(skipped)} (add their report markers to include them)")
    return new, wanted, warnings


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring); exit code 2 with one line on bad input."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", help="the study's summaries folder, e.g. results/cpu_smollm2")
    ap.add_argument("--out", required=True, help="the markdown file to write (e.g. docs/results.md)")
    ap.add_argument("--figures", help="folder of the figures (default: <out folder>/gallery)")
    ap.add_argument("--study", help="the study file whose `tables` the report draws (default: studies/<study>.yaml "
                    "of the summaries' study, when it exists)")
    a = ap.parse_args(argv)
    try:
        res = open_results(a)
        new, wanted, warnings = rewrite(res, res.out.read_text(encoding="utf-8") if res.out.exists() else None)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    res.out.write_text(new, encoding="utf-8")
    print(f"wrote {res.out} ({len(wanted)} section(s): {', '.join(wanted)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
