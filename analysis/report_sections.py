"""The sections of the first study's report drawn by code rather than declared: the setup, the learning-rate
selection, Table 2 (the four methods and FedSODA − each baseline paired by seed), Table 9 (rounds to FedOT's
accuracy), the accuracy-per-round figures and what the study cost in wall time."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from statistics import median

from common import markdown_table as table, plt, round_axis
from fedsoda_mpi.methods import METHODS, NAMES
from fedsoda_mpi.stats import binomial_se, mean_std, missing, paired
from fedsoda_mpi.summary import RunSummary
from report_cells import DASH, acc_cells, count, diff_parts, distinct, mean_pm, mib, num
from report_data import (MAIN_STAGES, Results, Setting, by_seed, field_mean, label_counts_of, method_order, natural,
                         per_setting, setting_of, setting_order, stages_of, tasks_of)


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
