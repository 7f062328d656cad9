"""A paper-style results table (Table 2 of the paper) from the `/final` attributes of run files.

    python analysis/table.py runs/*/run.h5                 # markdown on stdout
    python analysis/table.py runs/*/run.h5 --latex         # LaTeX (booktabs) instead
    python analysis/table.py runs/*/run.h5 --out figures   # also writes figures/table.md (or table.tex)

One row per run, in the order given. Accuracies in %, parameter counts as in the paper (1.3M),
bytes in MiB. Runs without `/final` (unfinished or failed) are skipped with a warning.
"""
from __future__ import annotations

import argparse
import math

from common import attr_str, check_out, config, main_guard, markdown_table, open_runs, reading, write_text

HEADERS = ("model", "method", "task", "pre-align", "re-align", "accuracy (%)", "sub-LLM acc. (%)",
           "base acc. (%)", "eval n", "# tr. params", "# comm. params/round", "comm MiB/round",
           "client model MiB", "full model MiB")


def percent(x) -> str:
    return "–" if x is None or math.isnan(float(x)) else f"{100 * float(x):.1f}"


def count(n) -> str:
    """A parameter count the way the paper writes it: 1.3M, 15.2M, 12.3K."""
    n = float(n)
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def mib(n, digits: int) -> str:
    return f"{float(n) / 2**20:.{digits}f}"


def row(f) -> tuple[str, ...]:
    """The table row of one run file."""
    fin = f["final"].attrs
    oda = config(f).get("oda", {})
    yes_no = {True: "yes", False: "no", None: "?"}
    method = attr_str(f, "method", "?")
    agg = attr_str(f["final"], "aggregator", "fedavg")
    if agg != "fedavg":  # e.g. "fedsoda + fedsrd (0.25 / 0.25)": upload / download density
        method += f" + {agg} ({float(fin['upload_density']):g} / {float(fin['download_density']):g})"
    return (attr_str(f, "model", "?"), method, attr_str(f["final"], "task", "?"),
            yes_no[oda.get("pre_align")], yes_no[oda.get("re_align")],
            percent(fin.get("accuracy")), percent(fin.get("sub_accuracy")), percent(fin.get("base_accuracy")),
            str(int(fin.get("n_eval", 0))), count(fin["trainable_params"]), count(fin["comm_params_per_round"]),
            mib(fin["comm_bytes_per_round"], 3), mib(fin["client_model_bytes"], 1), mib(fin["full_model_bytes"], 1))


def markdown(rows: list[tuple[str, ...]]) -> str:
    return markdown_table(list(HEADERS), rows, 5) + "\n"


def latex(rows: list[tuple[str, ...]]) -> str:
    def esc(s: str) -> str:
        for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"), ("–", "--")):
            s = s.replace(a, b)
        return s

    spec = "l" * 5 + "r" * (len(HEADERS) - 5)
    body = [" & ".join(esc(c) for c in r) + r" \\" for r in rows]
    return "\n".join([rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(esc(h) for h in HEADERS) + r" \\",
                      r"\midrule", *body, r"\bottomrule", r"\end{tabular}"]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run files (runs/<name>/run.h5) or run folders")
    ap.add_argument("--latex", action="store_true", help="print LaTeX (booktabs) instead of markdown")
    ap.add_argument("--out", default=None, help="also write table.md / table.tex into this folder")
    args = ap.parse_args()

    def go():
        if args.out:
            check_out(args.out)  # a bad --out fails before any run is read
        rows = []
        for f in open_runs(args.runs, "final"):
            with reading(f):
                rows.append(row(f))
        text = (latex if args.latex else markdown)(rows)
        print(text, end="")
        if args.out:
            write_text(args.out, "table.tex" if args.latex else "table.md", text)

    return main_guard(go)


if __name__ == "__main__":
    raise SystemExit(main())
