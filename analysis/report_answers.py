"""What the models answer: per task, the share of test rows each adapter gives class 1 on the full model and on its
sub-LLM (`transfer`), and the GSM8K runs with Wilson intervals and McNemar tests question by question (`gsm8k`)."""
from __future__ import annotations

from common import markdown_table as table
from fedsoda_mpi.methods import NAMES
from fedsoda_mpi.stats import mcnemar, missing, unbits, wilson
from fedsoda_mpi.summary import RunSummary
from report_cells import DASH, ci_text, count, num, pct
from report_data import GSM8K, MAIN_STAGES, Results, label_counts_of, method_order, setting_of, setting_order, tasks_of


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
