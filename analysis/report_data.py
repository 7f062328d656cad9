"""The report's input: the run summaries of a study folder and its selection.json (`load`), the settings and orders
of the tables, and `Results`, which finds a table's runs: the Table-2 runs at the selected lr, a variant's runs,
a declared row's runs (narrowed to a method and a split); plus accuracies by seed and means of summary fields."""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedsoda_mpi.methods import METHODS
from fedsoda_mpi.stats import mean_of, missing
from fedsoda_mpi.summary import RunSummary, SummaryError
from report_cells import DASH

MAIN_STAGES = ("grid", "seeds")
GSM8K = "gsm8k"
BUDGET = "budget"  # the stage of the data-budget runs (studies/cpu_smollm2_ii.yaml: group budget)
TASKS = ("sst2", "boolq", "gsm8k")  # display order; other tasks follow alphabetically
WARNED: set[str] = set()  # runs already warned about (one warning each)


class ReportError(ValueError):
    """Bad input; the message is the one line the user sees (exit code 2)."""


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
    drawn: set = field(default_factory=set)  # the declared tables this report writes (report.rewrite)

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
        (if it names one; labelled by their name, paired with the table's reference)."""
        table = self.tables[name]
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
    return mean_of(getattr(s, key) for s in runs)


def per_setting(res: Results, settings: list[Setting], render) -> str:
    """One `#### <setting>` part per setting, `render(st)` below its heading."""
    return "\n\n".join(f"#### {res.label(st)}\n\n" + render(st) for st in settings)


def tasks_of(runs: list[RunSummary]) -> list[str]:
    """The runs' tasks in display order."""
    return sorted({s.task for s in runs}, key=lambda t: setting_order((t,)))


def natural(name: str) -> tuple:
    """Sort key that orders r2 before r10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def stage_variants(res: Results, stage: str) -> list[str]:
    """The variant names of a stage's runs, naturally sorted."""
    return sorted({s.variant for s in res.runs if s.stage == stage}, key=natural)


def stages_of(runs: list[RunSummary], key=None) -> list[str]:
    """The runs' stages: grid and seeds first, then the others sorted (by `key`)."""
    return [x for x in MAIN_STAGES if any(s.stage == x for s in runs)] + \
        sorted({s.stage for s in runs} - set(MAIN_STAGES), key=key)


def label_counts_of(runs: list[RunSummary]) -> list[int] | None:
    """The test labels per class, from the first run that records them (every run of a task has the same)."""
    return next((s.label_counts for s in runs if s.label_counts), None)
