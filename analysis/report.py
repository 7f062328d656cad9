"""The study report: the statistics tables of docs/results.md, generated from per-run summaries only.

    python analysis/report.py results/cpu_smollm2 --out docs/results.md [--figures docs/gallery] [--study FILE]

Reads <results>/*.json (one summary per finished run, fedsoda_mpi.summary.RunSummary), <results>/selection.json
and the `tables` of the study file (--study, default studies/<study>.yaml): each comparison table it declares is a
section (cpu_smollm2.yaml: table3, table4, drift, gap, bridge, auto, selfpublic; cpu_smollm2_ii.yaml: fedsrd, noniid,
smaller_client) with its rows, labels, references and how it is drawn (fedsoda_mpi/study_tables.py); never a run
folder. In the --out file the lines between `<!-- report:begin NAME -->` and `<!-- report:end NAME -->` are
rewritten and everything else is kept (the captions live there); a new file gets every section (SECTIONS, then the
declared tables). The curves section writes <figures>/<study>_curves_<task>.png (default <out folder>/gallery). A marker
`<!-- report:begin NAME@STUDY -->` belongs to the report of study STUDY: when the file has such markers for the
study being reported, only they are rewritten, otherwise the untagged ones are.

Table-2 runs are the grid and seeds stages at the selected lr (variant "main"); other stages are found by variant
name. Statistics over seeds (fedsoda_mpi.stats): mean ± sample std, the 95% CI of the mean (Student t), paired
differences by seed. A partial study renders with what exists: missing cells are "—" and every mean states its n.
Same input, byte-identical output.

This module is the command line, the section registry (SECTIONS) and the out file; the parts: report_data.py (the
summaries, Results: which runs a table shows), report_cells.py (cell texts), report_tables.py (the declared
comparison tables and their COLUMNS), report_facts.py (what a summary says beyond its accuracy), report_sections.py
(setup, lr, Table 2, Table 9, curves, cost), report_answers.py (transfer, GSM8K), report_selection.py (Evidence II:
selection over seeds, the budget axis).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # common, and the repository's fedsoda_mpi without an installed package
from fedsoda_mpi.study import StudyError, read_tables  # noqa: E402
from report_answers import sec_gsm8k, sec_transfer  # noqa: E402
from report_data import ReportError, Results, load  # noqa: E402
from report_sections import sec_cost, sec_curves, sec_lr, sec_setup, sec_table2, sec_table9  # noqa: E402
from report_selection import sec_budget, sec_seeds3  # noqa: E402
from report_tables import COLUMNS, THENS, sec_declared, sec_variants  # noqa: E402

BEGIN = re.compile(r"^<!-- report:begin (\S+) -->\s*$")


END = "<!-- report:end {} -->"


NO_RUNS = "_No finished run of this study yet._"


SECTIONS = {  # name: (heading in a new file, its function); the study file's declared tables follow (sections)
            "setup": ("Setup", sec_setup), "lr": ("Learning-rate selection", sec_lr),
            "table2": ("Table 2: accuracy of the four methods", sec_table2),
            "table9": ("Table 9: rounds to reach FedOT's accuracy", sec_table9),
            "transfer": ("What each adapter answers, on the full model and on its sub-LLM", sec_transfer),
            "gsm8k": ("GSM8K", sec_gsm8k), "variants": ("Other variants", sec_variants),
            "curves": ("Accuracy per round", sec_curves), "cost": ("What the study cost (wall time)", sec_cost),
            "seeds3": ("Selection over three seeds", sec_seeds3),
            "budget": ("Accuracy against training examples per client", sec_budget)}


def sections(res: Results) -> dict[str, tuple]:
    """This report's sections in the order of a new file: SECTIONS, then the tables the study file declares (their
    function None: sec_declared)."""
    return {**SECTIONS, **{name: (t.heading or name, None) for name, t in res.tables.items()}}


def section(res: Results, name: str) -> str:
    """The generated content of one section."""
    if not res.runs:
        return NO_RUNS
    render = sections(res)[name][1]
    return sec_declared(res, name) if render is None else render(res)


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
                warnings.append(f"unknown report section '{name}'; left alone (neither a section of the report nor a "
                                "table the study file declares)")
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
    for name, (heading, _) in sections(res).items():
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
    clash = sorted(set(res.tables) & set(SECTIONS))
    if clash:
        raise ReportError(f"{study_file}: tables.{clash[0]}: the name of a report section; rename the table")
    return res


def rewrite(res: Results, text: str | None) -> tuple[str, list[str], list[str]]:
    """The new out file, the sections written and the warnings. A file with markers NAME@STUDY of this study gets
    only those rewritten; otherwise its untagged markers are (other studies' tagged sections left alone)."""
    markers = names_in(text) if text is not None else []
    names = list(sections(res))
    tagged = {n: n.split("@", 1) for n in markers if "@" in n}
    own = [n for n, (name, study) in tagged.items() if study == res.study and name in names]
    if own:
        keys = {tagged[n][0]: n for n in own}
        wanted = list(keys)
    else:
        keys = {n: n for n in names}
        wanted = names if text is None else [n for n in names if n in markers]
    res.drawn = set(wanted) & set(res.tables)
    content = {keys[n]: section(res, n) if n in wanted else "" for n in names if n in keys}
    if text is None:
        return new_file(res, content), wanted, []
    new, warnings = splice(text, content, frozenset(markers) - set(content) if own else frozenset(tagged))
    elsewhere = {name for name, _ in tagged.values()}  # a section another study's report fills
    skipped = [n for n in names if n not in wanted and n not in elsewhere]
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
