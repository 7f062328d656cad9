"""The comparison table "Δ vs a reference, paired by seed": one `Row` per label, COLUMNS before the accuracy and after
the Δ, and the tables a study file declares (`tables`; fedsoda_mpi/study_tables.py says how each is drawn), drawn
per setting (or per (task, model) across splits) by `sec_declared`; "Other variants" (`sec_variants`): every variant
run no written declared table shows."""
from __future__ import annotations

import math
from dataclasses import dataclass

from common import markdown_table as table
from fedsoda_mpi.methods import NAMES
from fedsoda_mpi.stats import mean_of, mean_std, paired
from fedsoda_mpi.study_tables import Table
from report_cells import DASH, ci_text, distinct, mean_pm, mib, num, pct
from report_data import (BUDGET, GSM8K, MAIN_STAGES, Results, Setting, by_seed, field_mean, method_order, natural,
                         per_setting, setting_of, spec_of)
from report_facts import (before_after, candidates_text, chosen_distance, chosen_np, emulator_bytes, extra_overrides,
                          generation_text, groups_np, groups_text, realign_r, realignments, removed_layers,
                          trigger_text)

@dataclass(frozen=True)
class Row:
    """One row of a comparison table: its label cells, its runs, the runs of the reference its Δ is paired with by
    seed (None: this row is the reference), whether it is a `main <method>` row, and its setting."""

    label: tuple
    runs: list
    ref_runs: list | None
    main: bool = False
    st: Setting = ()

    @property
    def ref(self) -> dict | None:
        """The reference's test accuracy by seed (points); None for a reference row."""
        return None if self.ref_runs is None else by_seed(self.ref_runs)


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
    p, gap = paired(by_seed(r.runs), r.ref), paired(by_seed(res.rows(r.st, spec_of("main fedpetuning"))), r.ref)
    return num(100 * p["mean"] / gap["mean"] if p["n"] and gap["n"] and gap["mean"] != 0 else math.nan)


def comm_share(r: Row) -> str:
    """The row's mean bytes per round and client as a share (%) of its reference's (— without both)."""
    ref_runs = r.runs if r.ref_runs is None else r.ref_runs
    mine, ref = field_mean(r.runs, "comm_bytes_per_round"), field_mean(ref_runs, "comm_bytes_per_round")
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
VARIANTS = Table("", (), labels=("variant", "method", "overrides"), after=COST, left=3)  # how sec_variants draws


def comparison(res: Results, rows: list[Row], lay: Table) -> str:
    """The table "Δ vs a reference, paired by seed" drawn as `lay` says: per row its label cells, the `before`
    COLUMNS, the test accuracy (mean ± std, n), Δ vs the row's reference with its 95% CI (and the paired seeds when
    `seeds`), the `after` COLUMNS."""
    cols = lambda names, r: [COLUMNS[c][1](res, r) for c in names]  # noqa: E731
    before, after, seeds = lay.before, lay.after, lay.seeds
    headers = [*lay.labels, *(COLUMNS[c][0] for c in before), "test acc. % (mean ± std)", "n", lay.delta, "95% CI",
               *["paired seeds"] * seeds, *(COLUMNS[c][0] for c in after)]
    return table(headers, [[*r.label, *cols(before, r), *diff_cells(r, seeds), *cols(after, r)] for r in rows],
                 lay.left_columns)


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
    declared, lay = res.declared(name), res.tables[name]

    def render(st: Setting) -> str:
        """The table (and its `then`) in one setting."""
        rows = [Row(label, res.rows(st, sp), None if sp == ref else res.rows(st, ref), sp[0] == "main", st)
                for label, sp, ref in declared]
        return comparison(res, rows, lay) + (THENS[lay.then](rows) if lay.then else "")
    return per_setting(res, declared_settings(res, name, declared), render) or lay.empty


def shown_elsewhere(res: Results) -> tuple[set[str], set[str]]:
    """The stages and the variant names other sections show: Table 2, gsm8k, budget, the variant groups of the
    declared tables this report writes; the variants such a table names."""
    drawn = [name for name in res.tables if name in res.drawn]  # a table without a section in the out file: none
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
                ref = [s for s in of if s.method == "fedsoda"] if len(methods) > 1 else res.main(st, "fedsoda")
                rows += [Row((name, NAMES.get(m, m), extra_overrides(res, mine)), mine,
                             None if len(methods) > 1 and m == "fedsoda" else ref)
                         for m in methods for mine in [[s for s in of if s.method == m]]]
            parts.append(f"#### {stage}: {res.label(st)}\n\n"
                         + comparison(res, rows, VARIANTS))
    return "\n\n".join(parts) + (
        "\n\nΔ: run − FedSODA in points, paired by seed, 95% CI (Student t); the FedSODA runs of the same variant "
        "when the group runs several methods (they are the reference), else the FedSODA main runs of the setting.")
