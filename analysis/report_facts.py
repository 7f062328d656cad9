"""What a run's summary says beyond its accuracy, as the texts of comparison columns: its pruning (SGP groups, (n, p),
removed layers, the candidates sgp.auto compared), its alignment (re-alignment interval or drift trigger,
re-alignments, emulator bytes, KL), its overrides beyond the Table-2 runs', its self-generated public data."""
from __future__ import annotations

from fedsoda_mpi.stats import missing
from fedsoda_mpi.summary import RunSummary
from report_cells import DASH, num
from report_data import MAIN_STAGES, Results, field_mean


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


def extra_overrides(res: Results, runs: list[RunSummary]) -> str:
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
