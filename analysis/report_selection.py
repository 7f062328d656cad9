"""Evidence II's sections on choosing the lr: selection over three seeds beside the seed-0 selection (`seeds3`) and
the budget axis, an lr selected per series and examples per client with FedSODA's gaps paired by seed (`budget`)."""
from __future__ import annotations

import re

from common import markdown_table as table
from fedsoda_mpi.methods import NAMES
from fedsoda_mpi.stats import best_lr, mean_std, missing, paired
from fedsoda_mpi.summary import RunSummary
from report_cells import DASH, acc_cells, delta_text, diff_parts, lr_text, num
from report_data import BUDGET, MAIN_STAGES, Results, Setting, by_seed, method_order, per_setting, setting_of


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
    return best_lr(vals)


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
    best = best_lr(means)
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
