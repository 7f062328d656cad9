"""analysis/report.py on synthetic run summaries (the fields of fedsoda_mpi.study.summarize): statistics,
pairing by seed, partial studies, marker splicing, determinism, the figure, one-line errors."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsoda_mpi.data import LABEL_WORDS
from fedsoda_mpi.stats import bits, mcnemar
from fedsoda_mpi.summary import RunSummary

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("report", ROOT / "analysis" / "report.py")
report = sys.modules.setdefault("report", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(report)
import report_answers  # noqa: E402  (analysis/ is on sys.path once report.py is loaded)
import report_cells as cells  # noqa: E402
import report_sections  # noqa: E402
import report_tables  # noqa: E402

ROUNDS = 10


def summary(method="fedsoda", task="sst2", seed=0, acc=0.8, stage=None, variant="main", lr=1e-3, val=None,
            **kw) -> RunSummary:
    """A run summary as study.summarize writes it; val: per-round validation accuracies of rounds 2, 4, ... 10."""
    stage = stage or ("grid" if seed == 0 else "seeds")
    val = val or [acc - 0.1, acc - 0.05, acc - 0.02, acc - 0.01, acc]
    eval_acc = [None] * ROUNDS
    for i, v in enumerate(val):
        eval_acc[2 * i + 1] = v
    group = f".{variant}" if stage not in ("grid", "seeds") else ""
    run = f"{stage}{group}-{method}-{task}-smollm2-iid{f'-lr{lr:g}' if stage == 'grid' else ''}-s{seed}"
    s = {"study": "syn", "run": run, "stage": stage, "variant": variant, "method": method, "task": task,
         "model": "smollm2", "model_name": "smollm2-135m", "split": "iid", "seed": seed, "lr": lr,
         "overrides": ["fed.rounds=10", "eval.dtype=bfloat16"], "rounds": ROUNDS, "clients": 10,
         "examples_per_client": 16, "accuracy": acc, "sub_accuracy": acc - 0.05, "base_accuracy": None,
         "val_accuracy": val[-1], "n_eval": 872, "n_val": 300, "eval_dtype": "bfloat16",
         "eval_rounds": list(range(1, ROUNDS + 1)), "eval_acc": eval_acc, "train_loss": [1.0] * ROUNDS,
         "realigned": [0, 0, 0, 0, 1, 0, 0, 0, 0, 1], "comm_bytes_per_round": 2214592.0,
         "client_model_bytes": 152250762, "full_model_bytes": 538060288, "trainable_params": 244224,
         "kl_before": 6.5, "kl_after": 5.5, "sgp_groups": [[1, 4], [8, 11], [12, 15], [16, 19]], "wall_s": 100.0,
         "world_size": 3, "commit": "abc123", "finished": "2026-12-01"}
    return RunSummary(**{**s, **kw})


def write(folder: Path, summaries: list[RunSummary], selection: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in summaries:
        (folder / f"{s.run}.json").write_text(json.dumps(s.to_json(), indent=1))
    if selection is not None:
        (folder / "selection.json").write_text(json.dumps(selection))
    return folder


def section(text: str, name: str) -> str:
    return text.split(f"<!-- report:begin {name} -->")[1].split(f"<!-- report:end {name} -->")[0]


def full_study() -> list[RunSummary]:
    """Table 2 on SST-2 (FedSODA 3 seeds, FedPETuning 2, FedOT 3, FedBiOT none), a base run, variants, gsm8k."""
    runs = [summary("fedsoda", seed=s, acc=a) for s, a in zip((0, 1, 2), (0.80, 0.82, 0.84))]
    runs += [summary("fedpetuning", seed=s, acc=a) for s, a in ((0, 0.90), (2, 0.93))]
    runs += [summary("fedot", seed=s, acc=0.75, val=[0.5, 0.6, 0.65, 0.7, 0.7]) for s in (0, 1, 2)]
    runs += [summary("fedsoda", seed=0, acc=0.7, stage="grid", variant="lr=0.003", lr=3e-3, base_accuracy=0.52)]
    runs += [summary("fedsoda", seed=s, acc=0.85, stage="gap", variant="fp32_sub",
                     overrides=["fed.rounds=10", "eval.dtype=bfloat16", "quant.enabled=false"]) for s in (0, 2)]
    runs += [summary("fedsoda", seed=s, acc=0.7, stage="ablation", variant="no_re_align", realigned=[0] * ROUNDS)
             for s in (0, 1, 2)]
    runs += [summary("fedsoda", seed=0, acc=0.78, stage="param", variant="n3p2", sgp_groups=[[1, 4], [8, 11]],
                     overrides=["fed.rounds=10", "eval.dtype=bfloat16", "sgp.n=3", "sgp.p=2"])]
    runs += [summary(m, task="gsm8k", seed=0, acc=0.03, stage="gsm8k", variant="main", n_eval=1319)
             for m in ("fedsoda", "fedpetuning")]
    return runs


SELECTION = {"study": "syn", "rule": "max mean val_accuracy over seeds [0]; ties to the smaller lr",
             "selected": [{"method": "fedsoda", "task": "sst2", "model": "smollm2", "split": "iid", "lr": 0.001,
                           "val_accuracy": {"0.001/s0": 0.8, "0.003/s0": 0.7}}]}


STUDY = ROOT / "studies" / "cpu_smollm2.yaml"  # its declared tables (gap, bridge) name the variants used here


def run(folder: Path, out: Path, *extra) -> int:
    return report.main([str(folder), "--out", str(out), *extra,
                        *([] if "--study" in extra else ["--study", str(STUDY)])])


# ---- formatting ----------------------------------------------------------------------------------------------

def test_formatting():
    assert cells.num(-0.04, sign=True) == "+0.0" and cells.num(None) == "—" and cells.pct(0.8254) == "82.5"
    assert cells.mean_pm(82.0, 2.0, 3) == "82.0 ± 2.0" and cells.mean_pm(82.0, math.nan, 1) == "82.0"
    assert cells.mib(2 ** 20 * 2.5, 3) == "2.500" and cells.count(244224) == "244,224"


# ---- the report ----------------------------------------------------------------------------------------------

def test_full_report_tables(tmp_path):
    folder = write(tmp_path / "res", full_study(), SELECTION)
    out = tmp_path / "results.md"
    assert run(folder, out) == 0
    text = out.read_text()
    t2 = section(text, "table2")
    assert "| FedSODA | 82.0 ± 2.0 | [77.0, 87.0] | 3 |" in t2
    assert "| FedBiOT | — | — | 0 |" in t2  # missing method: dashes, n = 0
    assert "| FedPETuning | 91.5 ± 2.1 | [72.4, 110.6] | 2 |" in t2
    assert "| base model | 52.0 | — | 1 |" in t2
    # FedSODA - FedPETuning paired on seeds 0 and 2 only: 80 - 90, 84 - 93
    assert "| FedSODA − FedPETuning | 0, 2 | -9.5 |" in t2 and "s0 -10.0, s2 -9.0" in t2
    se = 100 * math.sqrt(0.82 * 0.18 / 872)
    assert f"| 3 | {se:.1f} |" in t2
    assert "#### gsm8k" not in t2  # the gsm8k stage's "main" runs are not Table-2 runs
    assert "| 2.112 | 145.2 | 244,224 | 83.0 ± 1.4 (2) |" in t2  # seeds 1, 2: not used to select the lr
    assert "| 244,224 | 93.0 (1) |" in t2 and "winner's curse" not in t2  # captions live outside the markers
    docs = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    assert "winner's curse" in docs.split("<!-- report:end table2 -->")[1].split("<!-- report:begin")[0]
    assert "| 83.0 ± 1.4 (2) | — |" in t2 and "| always the majority class |" not in t2  # no run records them
    lr = section(text, "lr")
    assert "| sst2 | FedSODA | **80.0** | 70.0 | **0.001** (grid edge) |" in lr  # the smaller of two: an edge
    t3 = section(text, "table3")
    assert "| w/o re-alignment (no_re_align) | — | 70.0 ± 0.0 | 3 | -12.0 |" in t3
    assert "| w/o pre-alignment (no_pre_align) | — | — | 0 | — |" in t3
    t4 = section(text, "table4")
    assert "| (n, p) | FedSODA (main) | (3, 4) | 5 | 82.0 ± 2.0 | 3 | (reference) |" in t4
    assert "| (n, p) | n3p2 | (3, 2) | 5 | 78.0 | 1 | -2.0 | — |" in t4
    assert "| r | no_re_align | (3, 4) | never |" in t4
    gap = section(text, "gap")
    # fp32_sub on seeds 0, 2: +5.0, +1.0 -> +3.0; FedPETuning - FedSODA paired: +9.5 -> 3.0 / 9.5 = 31.6 %
    assert "| NF4 off (fp32_sub) | FedSODA | `quant.enabled=false` | 85.0 ± 0.0 | 2 | +3.0 |" in gap
    assert f"| {100 * 3.0 / 9.5:.1f} | 5.500 |" in gap
    assert "| FedPETuning (main) | FedPETuning | — | 91.5 ± 2.1 | 2 | +9.5 |" in gap and "| 100.0 |" in gap
    t9 = section(text, "table9")
    assert "FedOT's target: 70.0%" in t9
    # FedSODA's mean curve 72, 77, 80, 81, 82 reaches 70 at round 2; FedOT's 50, 60, 65, 70, 70 at round 8
    assert "| FedSODA | 3 | 2 | 72.0 | 82.0 |" in t9 and "| FedOT | 3 | 8 | 70.0 | 70.0 |" in t9
    gsm = section(text, "gsm8k")
    assert "| FedSODA | 0 | 0.001 | 3.0 | [2.2, 4.1] | 1,319 |" in gsm and "| FedPETuning | 0 |" in gsm
    setup = section(text, "setup")
    assert "`abc123`" in setup and "sst2: 872" in setup and "gsm8k: 1319" in setup and "17 run summaries" in setup


def _auto(seed, acc, k, n, p, groups, **kw):
    settings = {"sgp_n": n, "sgp_p": p, "sgp_auto": True, "sgp_remove_layers": k, "public": "wikitext2"}
    cands = [[1, k, 0.08 * k], [k, 1, 0.02 * k]] if k != 12 else [[1, 12, 1.02], [3, 4, 0.51], [12, 1, 0.22]]
    return summary("fedsoda", seed=seed, acc=acc, stage="auto", variant=f"auto_k{k}", settings=settings,
                   sgp_candidates=cands, sgp_groups=groups, **kw)


def test_auto_and_selfpublic_tables(tmp_path, capsys):
    main = {"sgp_n": 3, "sgp_p": 4, "public": "wikitext2"}  # a summary from before sgp.auto (no sgp_auto field)
    runs = [summary("fedsoda", seed=s, acc=a, settings=main) for s, a in zip((0, 1, 2), (0.80, 0.82, 0.84))]
    runs += [_auto(s, a, 12, 12, 1, [[1, 13]], kl_after=4.0) for s, a in ((0, 0.78), (1, 0.80))]
    runs += [_auto(0, 0.85, 6, 6, 1, [[12, 18]])]
    self_settings = {"sgp_n": 3, "sgp_p": 4, "sgp_auto": False, "public": "self"}
    runs += [summary("fedsoda", seed=s, acc=0.83, stage="selfpublic", variant="self_public", settings=self_settings,
                     kl_on="wikitext2", kl_before=6.0, kl_after=5.0, kl_before_self=3.0, kl_after_self=2.0,
                     sgp_groups=[[2, 5], [8, 11], [12, 15], [16, 19]],
                     public_self={"temperature": 0.8, "max_new_tokens": 64, "n_public": 64}) for s in (0, 2)]
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, SELECTION), out) == 0
    assert "is in no table" not in capsys.readouterr().err
    text = out.read_text()
    auto = section(text, "auto")
    assert "| FedSODA (main) | 12 | (3, 4) | — | 82.0 ± 2.0 | 3 | (reference) |" in auto
    # K = 12: (12, 1) chosen, 0.22 / 12 per layer; seeds 0, 1 paired with FedSODA: -2.0, -2.0
    assert "| auto_k12 | 12 | (12, 1) | 0.0183 | 79.0 ± 1.4 | 2 | -2.0 | [-2.0, -2.0] | 6.500 → 4.000 |" in auto
    assert "| auto_k6 | 6 | (6, 1) | 0.0200 | 85.0 | 1 | +5.0 | — |" in auto
    assert auto.index("| auto_k6 |") < auto.index("| auto_k12 |")  # by budget K
    assert "| auto_k12 | (1, 12) 0.0850; (3, 4) 0.0425; **(12, 1) 0.0183** |" in auto
    sp = section(text, "selfpublic")
    assert "| FedSODA (main) | wikitext2 | (3, 4) | (1,4) (8,11) (12,15) (16,19) | 82.0 ± 2.0 | 3 | (reference) |" in sp
    assert ("| self_public | self | (3, 4) | (2,5) (8,11) (12,15) (16,19) | 83.0 ± 0.0 | 2 | +1.0 | [-24.4, +26.4] | "
            "6.000 → 5.000 | wikitext2 | 3.000 → 2.000 | T=0.8, 64 new tokens, 64 texts |") in sp
    # without those runs both sections still render (FedSODA main only, dashes for the rest)
    assert run(write(tmp_path / "res2", runs[:3], SELECTION), tmp_path / "r2.md") == 0
    text = (tmp_path / "r2.md").read_text()
    assert "| FedSODA (main) | 12 | (3, 4) |" in section(text, "auto") and "auto_k" not in section(text, "auto")
    assert "| FedSODA (main) | wikitext2 |" in section(text, "selfpublic")


def test_not_reached(tmp_path):
    runs = [summary("fedot", seed=0, acc=0.8, val=[0.6, 0.7, 0.8, 0.85, 0.9]),
            summary("fedbiot", seed=0, acc=0.8, val=[0.6, 0.7, 0.8, 0.85, 0.89])]
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs), out) == 0
    t9 = section(out.read_text(), "table9")
    assert "| FedBiOT | 1 | not reached | — | 89.0 |" in t9 and "| FedOT | 1 | 10 | 90.0 | 90.0 |" in t9


def test_partial_study_renders_dashes(tmp_path):
    folder = write(tmp_path / "res", [summary("fedot", seed=1, acc=0.7, stage="seeds")])
    out = tmp_path / "r.md"
    assert run(folder, out) == 0
    text = out.read_text()
    for name in report.SECTIONS:
        assert f"<!-- report:begin {name} -->" in text and f"<!-- report:end {name} -->" in text
    t2 = section(text, "table2")
    assert "| FedOT | 70.0 | — | 1 |" in t2 and "| FedSODA | — | — | 0 |" in t2
    assert "| base model | — | — | 0 |" in t2 and "| FedSODA − FedOT | — | — |" in t2
    assert "FedOT's target: 70.0%" in section(text, "table9")
    assert "No gsm8k runs yet" in section(text, "gsm8k") and "No grid runs yet" in section(text, "lr")
    # only grid runs before the selection (variant ""): no Table-2 numbers, no crash
    folder2 = write(tmp_path / "res2", [summary("fedsoda", seed=0, variant="")])
    assert run(folder2, tmp_path / "r2.md") == 0
    assert "pending" in section((tmp_path / "r2.md").read_text(), "lr")


def test_markers_replaced_outside_kept_and_deterministic(tmp_path, capsys):
    folder = write(tmp_path / "res", full_study(), SELECTION)
    out = tmp_path / "results.md"
    out.write_text("# My results\n\nHand-written intro 12.3%.\n\n<!-- report:begin table2 -->\nOLD TABLE\n"
                   "<!-- report:end table2 -->\n\nMiddle text.\n\n<!-- report:begin mystery -->\nkeep me\n"
                   "<!-- report:end mystery -->\n<!-- report:begin curves -->\n<!-- report:end curves -->\nTail.\n")
    assert run(folder, out) == 0
    first = out.read_bytes()
    text = first.decode()
    assert "OLD TABLE" not in text and "| FedSODA | 82.0 ± 2.0 |" in text
    assert text.startswith("# My results\n\nHand-written intro 12.3%.\n\n<!-- report:begin table2 -->\n")
    assert "\nMiddle text.\n" in text and text.endswith("<!-- report:end curves -->\nTail.\n")
    assert "<!-- report:begin mystery -->\nkeep me\n<!-- report:end mystery -->" in text
    assert "setup" not in text  # sections without markers are not added to an existing file
    err = capsys.readouterr().err
    assert "unknown report section 'mystery'" in err and "no section(s) setup, lr, table9" in err
    assert "budget, table3, table4" in err  # the declared tables follow SECTIONS
    assert run(folder, out) == 0
    assert out.read_bytes() == first
    # a fresh file: twice from scratch gives the same bytes
    a, b = tmp_path / "a" / "r.md", tmp_path / "b" / "r.md"
    for p in (a, b):
        p.parent.mkdir()
        assert run(folder, p, "--figures", str(tmp_path / "figs")) == 0
    assert a.read_bytes() == b.read_bytes()


def test_figure_written_and_linked(tmp_path):
    folder = write(tmp_path / "res", full_study(), SELECTION)
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    assert run(folder, out) == 0
    png = tmp_path / "docs" / "gallery" / "syn_curves_sst2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(gallery/syn_curves_sst2.png)" in section(out.read_text(), "curves")
    assert run(folder, out, "--figures", str(tmp_path / "figs")) == 0
    assert (tmp_path / "figs" / "syn_curves_sst2.png").is_file()
    assert "(../figs/syn_curves_sst2.png)" in section(out.read_text(), "curves")


def one_line_error(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in needles), err


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "selection.json").write_text("{}")
    assert run(empty, tmp_path / "r.md") == 0  # a study that has just started renders, every section says so
    declared = len(report.read_tables(STUDY))  # the study file's tables follow SECTIONS
    assert (tmp_path / "r.md").read_text().count(report.NO_RUNS) == len(report.SECTIONS) + declared
    capsys.readouterr()
    one_line_error(capsys, run(tmp_path / "nowhere", tmp_path / "r.md"), "not a folder")
    bad = write(tmp_path / "bad", [summary()])
    (bad / "broken-run.json").write_text("{not json")
    one_line_error(capsys, run(bad, tmp_path / "r.md"), "broken-run.json")
    odd = write(tmp_path / "odd", [summary()])
    (odd / "odd-run.json").write_text(json.dumps({"run": "x"}))
    one_line_error(capsys, run(odd, tmp_path / "r.md"), "odd-run.json", "stage")
    good = write(tmp_path / "good", [summary()])
    one_line_error(capsys, run(good, tmp_path / "missing" / "r.md"), "does not exist")
    assert not (tmp_path / "missing").exists()


def test_command_line(tmp_path):
    """The script as documented, in a fresh interpreter (finds analysis/common.py by itself)."""
    folder = write(tmp_path / "res", [summary()])
    out = tmp_path / "r.md"
    p = subprocess.run([sys.executable, str(ROOT / "analysis" / "report.py"), str(folder), "--out", str(out)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "| FedSODA | 80.0 | — | 1 |" in out.read_text()
    assert (tmp_path / "gallery" / "syn_curves_sst2.png").is_file()
    p = subprocess.run([sys.executable, str(ROOT / "analysis" / "report.py"), str(tmp_path / "none"),
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_docs_results_is_what_the_report_makes_of_the_committed_summaries(tmp_path):
    """docs/results.md's generated sections are exactly the report of results/cpu_smollm2 (no typed numbers)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text((ROOT / "docs" / "results.md").read_text())
    p = subprocess.run([sys.executable, str(ROOT / "analysis" / "report.py"), str(ROOT / "results" / "cpu_smollm2"),
                        "--out", str(docs / "results.md")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (docs / "results.md").read_text() == (ROOT / "docs" / "results.md").read_text(), \
        "docs/results.md is stale: run `python analysis/report.py results/cpu_smollm2 --out docs/results.md`"


def test_docs_results_evidence_ii_sections_are_what_the_report_makes_of_its_summaries(tmp_path):
    """docs/results.md's sections tagged @cpu_smollm2_ii are exactly the report of results/cpu_smollm2_ii."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text((ROOT / "docs" / "results.md").read_text())
    p = subprocess.run([sys.executable, str(ROOT / "analysis" / "report.py"),
                        str(ROOT / "results" / "cpu_smollm2_ii"), "--out", str(docs / "results.md")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (docs / "results.md").read_text() == (ROOT / "docs" / "results.md").read_text(), \
        "docs/results.md is stale: run `python analysis/report.py results/cpu_smollm2_ii --out docs/results.md`"


def test_every_variant_group_is_shown_paper_names_and_new_groups(tmp_path):
    """paper.yaml's variants (n2p6, n4p3, r2, r10, no_align, the non-IID and public-data groups) and any new group
    land in a table: Table 3 and Table 4 take the rows the study declares (Table 3 also its group's other variants),
    the rest goes to "Other variants"."""
    runs = [summary("fedsoda", seed=s, acc=a) for s, a in zip((0, 1, 2), (0.80, 0.82, 0.84))]
    ov = ["fed.rounds=10", "eval.dtype=bfloat16"]
    runs += [summary("fedsoda", seed=s, acc=0.6, stage="ablation", variant="no_align",
                     overrides=[*ov, "oda.pre_align=false", "oda.re_align=false"]) for s in (0, 1)]
    runs += [summary("fedsoda", seed=0, acc=0.79, stage="param", variant="n2p6", overrides=[*ov, "sgp.n=2", "sgp.p=6"],
                     sgp_groups=[[1, 3], [5, 7], [9, 11], [13, 15], [17, 19], [21, 23]])]
    runs += [summary("fedsoda", seed=0, acc=0.81, stage="param", variant=v, overrides=[*ov, f"oda.every={r}"],
                     realigned=[int(i % r == 0) for i in range(1, ROUNDS + 1)]) for v, r in (("r10", 10), ("r2", 2))]
    split = dict(split="dir0.5", overrides=[*ov, "data.split=dirichlet"])
    runs += [summary(m, seed=s, acc=a, stage="noniid", variant="dirichlet", **split)
             for m, a in (("fedsoda", 0.7), ("fedpetuning", 0.75)) for s in (0, 1)]
    runs += [summary("fedsoda", seed=s, acc=0.83, stage="public", variant="public_gsm8k",
                     overrides=[*ov, "data.public=gsm8k"]) for s in (0, 1)]
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs), out) == 0  # cpu_smollm2.yaml: table3 then its group's other variants
    assert "| no_align | `oda.pre_align=false`, `oda.re_align=false` | 60.0 ± 0.0 | 2 |" in section(out.read_text(),
                                                                                                  "table3")
    assert "| r10 | FedSODA | `oda.every=10` |" in section(out.read_text(), "variants")  # not in its Table 4
    assert run(tmp_path / "res", out, "--study", str(ROOT / "studies" / "paper.yaml")) == 0  # declares no_align's label
    text = out.read_text()
    t3, t4, other = section(text, "table3"), section(text, "table4"), section(text, "variants")
    assert ("| w/o ODA: neither pre- nor re-alignment (no_align) | `oda.pre_align=false`, `oda.re_align=false` "
            "| 60.0 ± 0.0 | 2 | -21.0 |") in t3
    assert "| (n, p) | n2p6 | (2, 6) | 5 | 79.0 | 1 | -1.0 |" in t4
    assert (t4.index("| r | r2 | (3, 4) | 2 |") < t4.index("| r | r10 | (3, 4) | 10 |")
            < t4.index("| r | FedSODA (main)"))
    assert "#### noniid: sst2 (smollm2, dir0.5)" in other
    assert "| dirichlet | FedSODA | `data.split=dirichlet` | 70.0 ± 0.0 | 2 | (reference) |" in other
    assert "| dirichlet | FedPETuning | `data.split=dirichlet` | 75.0 ± 0.0 | 2 | +5.0 |" in other
    assert "#### public: sst2 (smollm2, iid)" in other
    assert "| public_gsm8k | FedSODA | `data.public=gsm8k` | 83.0 ± 0.0 | 2 | +2.0 |" in other
    assert "no_align" not in other and "n2p6" not in other and "r10" not in other


def test_drift_table_compares_accuracy_and_emulator_bytes(tmp_path):
    """The drift section: r = 1, r = 5 (main), never and each drift variant with its re-alignments and the emulator
    LoRA bytes a client received and the drift probe's run mean; a summary without `emulator_lora_bytes` or
    `drift_probe` (older code) shows —, never 0 or a guess."""
    em = 3 * 2 ** 20  # 3 MiB per emulator LoRA message
    runs = full_study()  # FedSODA main: re-aligned at rounds 5 and 10, no emulator_lora_bytes (an older summary)
    runs += [summary("fedsoda", seed=s, acc=0.83, stage="param", variant="r1", realigned=[1] * ROUNDS,
                     realignments=ROUNDS, emulator_lora_bytes=em) for s in (0, 1)]
    drift = {"trigger": "drift", "drift_threshold": 1.5, "max_interval": 0}
    runs += [summary("fedsoda", seed=s, acc=a, stage="drift", variant="drift_tau1.5", realigned=flags,
                     realignments=sum(flags), emulator_lora_bytes=em, settings=drift,
                     comm_bytes_per_round=1.5 * 2 ** 20, drift_probe=probe)
             for s, a, flags, probe in ((0, 0.81, [0, 0, 1, 0, 0, 0, 0, 0, 0, 0], [1.0] * 10),
                                        (1, 0.80, [0, 0, 1, 0, 0, 0, 1, 0, 0, 0], [2.0, 4.0] * 5))]
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, SELECTION), out) == 0
    d = section(out.read_text(), "drift")
    assert "| r = 1 (r1) | every 1 | 83.0 ± 0.0 | 2 | +2.0 | [-10.7, +14.7] | 10.0 | 30.00 | 2.112 |" in d
    assert "| r = 5 (FedSODA main) | every 5 | 82.0 ± 2.0 | 3 | (reference) | — | 2.0 | — | 2.112 | — |" in d
    assert "| never (no_re_align) | never | 70.0 ± 0.0 | 3 | -12.0 |" in d and "| 0.0 | 0.00 |" in d
    # drift: seeds 0, 1 vs FedSODA 80, 82 -> +1.0, -2.0; 1 and 2 re-alignments of 3 MiB; probe run means 1 and 3
    assert "| drift_tau1.5 | drift, τ = 1.5 | 80.5 ± 0.7 | 2 | -0.5 |" in d and "| 1.5 | 4.50 | 1.500 | 2.00 |" in d
    assert "drift_tau1.5" not in section(out.read_text(), "variants")  # shown once, in its own section


def test_drift_section_without_drift_runs(tmp_path):
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", full_study(), SELECTION), out) == 0
    assert "_No drift-trigger runs yet._" in section(out.read_text(), "drift")


def test_cost_section_sums_and_medians_of_recorded_wall_time(tmp_path):
    """The cost section: per task and stage and per method, hours summed and the median (range) of minutes per run
    from each summary's wall_s; a summary without wall_s counts as a run but adds no time (—, never 0)."""
    runs = [summary("fedsoda", seed=0, lr=lr, wall_s=w) for lr, w in ((1e-3, 60.0), (3e-3, 180.0), (1e-2, 120.0))]
    runs += [summary("fedpetuning", seed=1, wall_s=None)]
    runs += [summary("fedsoda", seed=s, stage="gap", variant="fp32_sub", wall_s=3600.0) for s in (0, 1)]
    runs += [summary("fedsoda", task="boolq", seed=0, wall_s=600.0)]
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, SELECTION), out) == 0
    c = section(out.read_text(), "cost")
    assert "| sst2 | grid | 3 | 0.1 | 2.0 (1.0–3.0) |" in c  # 6 min in all; median of 1, 2, 3 minutes
    assert "| sst2 | seeds | 1 | — | — |" in c  # no wall_s recorded
    assert "| sst2 | gap | 2 | 2.0 | 60.0 (60.0–60.0) |" in c
    assert "| boolq | grid | 1 | 0.2 | 10.0 (10.0–10.0) |" in c
    assert "| all | all | 7 | 2.3 | 6.5 (1.0–60.0) |" in c  # 6 of the 7 record time: median of 1, 2, 3, 10, 60, 60
    assert "| sst2 | FedSODA | 3 | 0.1 | 2.0 (1.0–3.0) |" in c and "| sst2 | FedPETuning | 1 | — | — |" in c
    assert "| boolq | FedSODA | 1 |" in c and "fp32" not in c  # variants are not in the per-method table
    assert report_sections.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert "final test evaluation, h" not in c  # no summary records eval_s


def test_the_gsm8k_rows(tmp_path):
    runs = [summary("fedsoda", task="gsm8k", seed=0, acc=0.05, stage="gsm8k", variant="main", n_eval=1319,
                    sub_accuracy=0.02, eval_s=7200.0),
            summary("fedpetuning", task="gsm8k", seed=0, acc=0.06, stage="gsm8k", variant="main", n_eval=1319,
                    base_accuracy=0.01, eval_s=3600.0)]
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, SELECTION), out) == 0
    gsm = section(out.read_text(), "gsm8k")
    assert "| FedSODA | 0 | 0.001 | 5.0 | [3.9, 6.3] | 1,319 | 2.0 | 2.0 |" in gsm
    assert "| FedPETuning | 0 | 0.001 | 6.0 | [4.8, 7.4] | 1,319 | 1.0 | 1.0 |" in gsm
    assert "| base model | — | — | 1.0 | [0.6, 1.7] | 1,319 | — | — |" in gsm  # from the run that evaluated it


def test_gsm8k_paired_rows_from_the_summaries_bits(tmp_path):
    rng = np.random.default_rng(0)
    soda, pet, ot, sub, base = (rng.random(1319) < p for p in (0.05, 0.08, 0.06, 0.02, 0.015))
    gsm = dict(task="gsm8k", stage="gsm8k", variant="main", n_eval=1319)
    runs = [summary("fedsoda", seed=0, acc=soda.mean(), correct=bits(soda), sub_correct=bits(sub),
                    base_accuracy=0.9, **gsm),  # a base record without its answers: neither the base row nor pairs
            summary("fedpetuning", seed=0, acc=pet.mean(), correct=bits(pet), base_accuracy=base.mean(),
                    base_correct=bits(base), **gsm),
            summary("fedot", seed=1, acc=ot.mean(), correct=bits(ot), **gsm),  # seed 1: not paired with FedSODA
            summary("fedbiot", seed=0, acc=0.05, correct=bits(soda[:1000]), **{**gsm, "n_eval": 1000})]  # other n
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, SELECTION), out) == 0
    text = section(out.read_text(), "gsm8k")

    def row(name: str, seed: int, a, b) -> str:
        t = mcnemar(a.tolist(), b.tolist())
        return (f"| {name} | {seed} | {cells.num(t['diff'], sign=True)} | {cells.ci_text(t['ci'], sign=True)} "
                f"| {t['only_a']} | {t['only_b']} | {t['p']:.3g} |")

    assert row("FedSODA − FedPETuning", 0, soda, pet) in text and row("FedSODA − its sub-LLM", 0, soda, sub) in text
    for name, seed, mine in (("FedSODA", 0, soda), ("FedPETuning", 0, pet), ("FedOT", 1, ot)):
        assert row(f"{name} − the base model", seed, mine, base) in text  # every run against the base's answers
    assert f"| base model | — | — | {cells.pct(base.mean())} |" in text
    assert "FedSODA − FedOT" not in text and "FedBiOT −" not in text and "− FedBiOT" not in text
    assert text.count("the base model |") == 3

    other = rng.random(1319) < 0.03  # a second model's runs pair only with that model's runs and base
    runs.append(summary("fedsoda", seed=0, acc=other.mean(), correct=bits(other), model="tiny", base_accuracy=0.02,
                        base_correct=bits(base[::-1]), run="gsm8k.main-fedsoda-gsm8k-tiny-iid-s0", **gsm))
    assert run(write(tmp_path / "res2", runs, SELECTION), out) == 0
    text = section(out.read_text(), "gsm8k")
    assert row("FedSODA (tiny) − the base model", 0, other, base[::-1]) in text
    assert row("FedSODA (smollm2) − FedPETuning (smollm2)", 0, soda, pet) in text
    assert "FedSODA (tiny) − FedPETuning" not in text and "| base model (tiny) | — | — | 2.0 |" in text


def test_cost_section_times_the_final_evaluation_of_runs_that_record_it(tmp_path):
    runs = [summary("fedsoda", task="gsm8k", seed=0, wall_s=600.0, eval_s=4 * 3600.0),
            summary("fedpetuning", task="gsm8k", seed=0, wall_s=900.0, eval_s=3600.0),
            summary("fedsoda", task="boolq", seed=0, eval_s=300.0),
            summary("fedsoda", task="boolq", seed=1, eval_s=None),
            summary("fedot", task="boolq", seed=0, eval_s=180.0)]
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, SELECTION), out) == 0
    c = section(out.read_text(), "cost")
    evals = c[c.index("final test evaluation, h (sum)"):]
    assert "| boolq | FedSODA | 1 | 0.1 | 5.0 (5.0–5.0) |" in evals  # the seed without eval_s is not a row's run
    assert "| boolq | FedOT | 1 | 0.1 | 3.0 (3.0–3.0) |" in evals
    assert "| gsm8k | FedSODA | 1 | 4.0 | 240.0 (240.0–240.0) |" in evals
    assert "| gsm8k | FedPETuning | 1 | 1.0 |" in evals
    assert evals.index("| boolq |") < evals.index("| gsm8k |")


def test_bridge_section_steps_from_fedsoda_to_fedbiot_at_one_lr(tmp_path):
    """The bridge section: FedSODA at FedPETuning's lr is the reference; each one-setting step, FedBiOT and the
    perfect-emulator row get Δ paired by seed against it, with their lr and the sub-LLM accuracy; a step without runs
    shows dashes; the steps appear in no other section."""
    runs = full_study()
    runs += [summary("fedsoda", seed=s, acc=a, stage="gap", variant="lr_pet", sub_accuracy=a - 0.02)
             for s, a in ((0, 0.60), (1, 0.56), (2, 0.52))]
    runs += [summary("fedsoda", seed=s, acc=a, stage="gap", variant="uniform_lr_pet", kl_after=3.7,
                     overrides=["fed.rounds=10", "eval.dtype=bfloat16", "sgp.enabled=false"])
             for s, a in ((0, 0.64), (1, 0.60))]
    runs += [summary("fedbiot", seed=s, acc=a, sub_accuracy=0.51) for s, a in ((0, 0.70), (1, 0.56), (2, 0.66))]
    sel = {"selected": SELECTION["selected"] + [{"method": "fedbiot", "task": "sst2", "model": "smollm2",
                                                  "split": "iid", "lr": 0.001}]}
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, sel), out) == 0
    b = section(out.read_text(), "bridge")
    assert "| FedSODA at FedPETuning's lr (lr_pet) | 0.001 | 56.0 ± 4.0 | 3 | (reference) | — | — | 54.0 |" in b
    # seeds 0, 1: +4.0 and +4.0 -> +4.0 (the CI of two equal differences has zero width)
    assert ("| uniform layer drop instead of SGP (uniform_lr_pet) | 0.001 | 62.0 ± 2.8 | 2 | +4.0 | [+4.0, +4.0] "
            "| 0, 1 |") in b
    assert "| 3.700 |" in b  # its KL after pre-alignment
    assert "| NF4 off (fp32_sub_lr_pet) | — | — | 0 | — |" in b
    assert "| FedBiOT (main): all four | 0.001 | 64.0 ± 7.2 | 3 | +8.0 |" in b and "| 51.0 |" in b
    assert "uniform_lr_pet" not in section(out.read_text(), "variants")


def test_bridge_section_without_its_runs(tmp_path):
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", full_study(), SELECTION), out) == 0
    assert "_No runs of the FedSODA -> FedBiOT steps yet._" in section(out.read_text(), "bridge")


def test_table2_shows_the_most_predicted_label_share_and_the_majority_share(tmp_path):
    """Per seed, the share of test rows given the most-predicted label (572 of 872 = 65.6 %); the majority row
    comes from the recorded test labels (476 of 872 = 54.6 %), not from any accuracy."""
    labels = [396, 476]
    runs = [summary("fedsoda", seed=0, acc=0.546, pred_counts=[0, 872], label_counts=labels),
            summary("fedsoda", seed=1, acc=0.60, pred_counts=[300, 572], label_counts=labels),
            summary("fedsoda", seed=2, acc=0.454, pred_counts=[872, 0], label_counts=labels),
            summary("fedot", seed=0, acc=0.7)]
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs), out) == 0
    t2 = section(out.read_text(), "table2")
    fedsoda = next(line for line in t2.splitlines() if line.startswith("| FedSODA |"))
    assert fedsoda.endswith("| s0 100.0, s1 65.6, s2 100.0 |")
    assert next(line for line in t2.splitlines() if line.startswith("| FedOT |")).endswith("| — |")
    assert "| always the majority class | 54.6 | — | — |" in t2


def test_transfer_section_lists_what_each_adapter_answers_on_both_hosts(tmp_path):
    """The share of test rows answered "true", full model beside sub-LLM, for runs that record it; others left out."""
    labels = [1237, 2033]
    runs = [summary("fedsoda", task="boolq", seed=0, acc=0.378, sub_accuracy=0.617, pred_counts=[3270, 0],
                    sub_pred_counts=[49, 3221], label_counts=labels, n_eval=3270),
            summary("fedpetuning", task="boolq", seed=0, acc=0.622, sub_accuracy=0.622, pred_counts=[0, 3270],
                    sub_pred_counts=[0, 3270], label_counts=labels, n_eval=3270),
            summary("fedot", task="sst2", seed=0, acc=0.7)]
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs), out) == 0
    t = section(out.read_text(), "transfer")
    assert '#### boolq (test rows whose answer is "true": 62.2 %)' in t and "#### sst2" not in t
    assert "| FedSODA | grid | 0.001 | 0 | 37.8 | 0.0 | 61.7 | 98.5 |" in t
    assert "| FedPETuning | grid | 0.001 | 0 | 62.2 | 100.0 | 62.2 | 100.0 |" in t
    assert t.index("| FedSODA |") < t.index("| FedPETuning |")
    assert "| base model |" not in t  # no run recorded the base model's answers
    runs.append(summary("fedbiot", task="boolq", seed=0, acc=0.4, base_accuracy=0.506, base_pred_counts=[1742, 1528]))
    assert run(write(tmp_path / "res3", runs), out) == 0
    assert "| base model | — | — | — | 50.6 | 46.7 | — | — |" in section(out.read_text(), "transfer")
    assert report_answers.LABEL_NAMES == {k: tuple(v) for k, v in LABEL_WORDS.items()}
    empty = tmp_path / "e.md"
    assert run(write(tmp_path / "res2", runs[2:]), empty) == 0
    assert "No run records" in section(empty.read_text(), "transfer")


def three_seed_grid(study="ii") -> tuple[list[dict], dict]:
    """A grid at seeds 0-2: FedSODA's seed 0 prefers 3e-3 but the mean over seeds 1e-3; FedPETuning 1e-3 both ways."""
    vals = {("fedsoda", 1e-3): (0.60, 0.62, 0.64), ("fedsoda", 3e-3): (0.70, 0.50, 0.50),
            ("fedpetuning", 1e-3): (0.85, 0.84, 0.83), ("fedpetuning", 3e-3): (0.80, 0.80, 0.80)}
    accs = {("fedsoda", 1e-3): (0.60, 0.64, 0.68), ("fedsoda", 3e-3): (0.70, 0.50, 0.52),
            ("fedpetuning", 1e-3): (0.86, 0.85, 0.84), ("fedpetuning", 3e-3): (0.81, 0.80, 0.79)}
    runs = [summary(m, seed=sd, acc=accs[m, lr][sd], stage="grid", lr=lr, study=study,
                    val=[0.5, 0.5, 0.5, 0.5, vals[m, lr][sd]], variant="main" if lr == 1e-3 else f"lr={lr:g}")
            for (m, lr) in vals for sd in (0, 1, 2)]
    for s in runs:
        s.run = f"grid-{s.method}-sst2-smollm2-iid-lr{s.lr:g}-s{s.seed}"
    sel = {"study": study, "rule": "max mean val_accuracy over seeds [0, 1, 2]; ties to the smaller lr",
           "selected": [{"method": m, "task": "sst2", "model": "smollm2", "split": "iid", "lr": 1e-3}
                        for m in ("fedsoda", "fedpetuning")]}
    return runs, sel


def test_selection_over_three_seeds_beside_the_seed0_selection(tmp_path):
    """seeds3: validation accuracy per lr and seed, the rule's choice in bold, the seed-0 choice marked †; test
    accuracy at both selections with the paired change (only where the selection changed) and FedSODA − baseline."""
    runs, sel = three_seed_grid()
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, sel), out) == 0
    text = section(out.read_text(), "seeds3")
    assert "| FedSODA | **62.0 (60.0 · 62.0 · 64.0)** | 56.7 (70.0 · 50.0 · 50.0) † |" in text
    assert "| FedPETuning | **84.0 (85.0 · 84.0 · 83.0)** † | 80.0 (80.0 · 80.0 · 80.0) |" in text
    # FedSODA: seed-0 selection 3e-3 (70, 50, 52) -> 1e-3 (60, 64, 68): +6.7 paired; CIs with t(2) = 4.303
    half = 4.303 * float(np.std([70, 50, 52], ddof=1)) / math.sqrt(3)  # 27.4 around 57.3
    d = [60 - 70, 64 - 50, 68 - 52]
    dhalf = 4.303 * float(np.std(d, ddof=1)) / math.sqrt(3)
    assert (f"| FedSODA | 0.003 | 57.3 ± 11.0 | [{172 / 3 - half:.1f}, {172 / 3 + half:.1f}] | 3 | 0.001 | 64.0 ± 4.0 "
            f"| [54.1, 73.9] | 3 | 5.3 | yes | +{np.mean(d):.1f} "
            f"[{np.mean(d) - dhalf:+.1f}, {np.mean(d) + dhalf:+.1f}] |") in text
    assert "| FedPETuning | 0.001 | 85.0 ± 1.0 |" in text and "| 4.0 | no (the same runs) | — |" in text
    assert "| FedSODA − FedPETuning | -27.7 |" in text and "| -21.0 |" in text  # at seed-0, at three-seed selections
    one_seed = [s for s in runs if s.seed == 0]
    assert run(write(tmp_path / "res1", one_seed, SELECTION), tmp_path / "r1.md") == 0
    assert "No grid at more than one seed" in section((tmp_path / "r1.md").read_text(), "seeds3")


def test_tagged_sections_belong_to_their_study(tmp_path, capsys):
    """A marker NAME@STUDY is rewritten only by the report of STUDY, which then rewrites nothing else; the report of
    another study leaves it alone, without a warning (and does not ask for the plain NAME section)."""
    ii_runs, ii_sel = three_seed_grid("ii")
    ii = write(tmp_path / "ii", ii_runs, ii_sel)
    first = write(tmp_path / "first", full_study(), SELECTION)
    out = tmp_path / "results.md"
    out.write_text("<!-- report:begin table2 -->\nOLD\n<!-- report:end table2 -->\n\n"
                   "<!-- report:begin seeds3@ii -->\nOLD II\n<!-- report:end seeds3@ii -->\n")
    assert run(first, out) == 0
    text = out.read_text()
    assert "OLD\n" not in text.split("seeds3@ii")[0] and "OLD II" in text
    assert "seeds3" not in capsys.readouterr().err
    assert run(ii, out) == 0
    after = out.read_text()
    assert "OLD II" not in after and "**62.0 (60.0 · 62.0 · 64.0)**" in after
    assert after.split("<!-- report:begin seeds3@ii -->")[0] == text.split("<!-- report:begin seeds3@ii -->")[0]
    assert "warning" not in capsys.readouterr().err


def test_budget_axis_selects_per_budget_and_pairs_the_gaps(tmp_path):
    """budget: per series and examples per client the lr with the best mean validation accuracy over seeds among
    the lr steps run (the Table-2 runs at the grid's budget), test accuracy over seeds, FedSODA − each series paired
    by seed at each budget and the change of that gap, paired by seed; incomplete lr steps are pending."""
    runs, sel = three_seed_grid()
    acc64 = {("fedsoda", "x64", 3e-4): (0.70, 0.72, 0.74), ("fedsoda", "x64", 1e-3): (0.76, 0.78, 0.80),
             ("fedpetuning", "fed_last3_x16", 1e-3): (0.62, 0.66, 0.70),
             ("fedpetuning", "fed_last3_x64", 1e-3): (0.80, 0.80, 0.86)}
    val64 = {("fedsoda", "x64", 3e-4): 0.70, ("fedsoda", "x64", 1e-3): 0.75,
             ("fedpetuning", "fed_last3_x16", 1e-3): 0.6, ("fedpetuning", "fed_last3_x64", 1e-3): 0.8}
    for (m, v, lr), accs in acc64.items():
        for sd, a in enumerate(accs):
            s = summary(m, seed=sd, acc=a, stage="budget", variant=v, lr=lr, study="ii",
                        val=[0.5, 0.5, 0.5, 0.5, val64[m, v, lr]],
                        examples_per_client=16 if v.endswith("x16") else 64)
            s.run = f"budget.{v}-{m}-sst2-smollm2-iid-step{lr:g}-s{sd}"
            runs.append(s)
    pet = summary("fedpetuning", seed=0, acc=0.9, stage="budget", variant="x64", lr=1e-3, study="ii",
                  examples_per_client=64)
    pet.run = "budget.x64-fedpetuning-sst2-smollm2-iid-step+0-s0"
    runs.append(pet)
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, sel), out) == 0
    text = section(out.read_text(), "budget")
    assert "| FedSODA | 16 | 0.001 | — | — | 64.0 ± 4.0 | [54.1, 73.9] | 3 |" in text  # the Table-2 runs
    assert "| FedSODA | 64 | 0.001 | 2 | 5.0 | 78.0 ± 2.0 | [73.0, 83.0] | 3 |" in text
    assert "| FedPETuning | 64 | 0.001 | 1 | — | 90.0 | — | 1 |" in text
    assert "| fed_last3 | 16 | 0.001 | 1 | — | 66.0 ± 4.0 |" in text and "| fed_last3 | 64 | 0.001 | 1 |" in text
    # FedSODA − fed_last3: at 16 (60-62, 64-66, 68-70) = -2 each; at 64 (76-80, 78-80, 80-86) = -4, -2, -6
    assert "| FedSODA − fed_last3 | -2.0 [-2.0, -2.0] (n=3) | -4.0 [-9.0, +1.0] (n=3) | -2.0 [-7.0, +3.0] (n=3) |" \
        in text
    assert "| FedSODA − FedPETuning | -21.0 [-33.4, -8.6] (n=3) | -14.0 — (n=1) | +12.0 — (n=1) |" in text
    assert "budget" not in section(out.read_text(), "variants")  # shown here, not among the other variants


def test_declared_tables_come_from_the_study_file(tmp_path, capsys):
    """The gap and bridge tables are the study file's `tables`: a study without them has no such section (its marker
    is left alone with a warning); the loader refuses a row that names no variant of the study (a renamed variant
    fails when the study is read, not as an empty row)."""
    import yaml

    from fedsoda_mpi.study import StudyError, read_tables

    bare = tmp_path / "bare.yaml"
    bare.write_text("name: syn\ngrid: {methods: [fedsoda], tasks: [sst2], lr: [1.0e-3]}\n")
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", full_study(), SELECTION), out, "--study", str(bare)) == 0
    assert "report:begin gap" not in out.read_text()
    out.write_text("<!-- report:begin gap -->\nOLD\n<!-- report:end gap -->\n")
    assert run(tmp_path / "res", out, "--study", str(bare)) == 0
    assert "OLD" in section(out.read_text(), "gap")
    assert "unknown report section 'gap'; left alone (neither a section of the report nor a table" in \
        capsys.readouterr().err
    spec = yaml.safe_load(STUDY.read_text(encoding="utf-8"))
    assert [r.row for r in read_tables(STUDY)["bridge"].rows][:2] == ["lr_pet", "fp32_sub_lr_pet"]
    spec["variants"] = [v for v in spec["variants"] if v["name"] != "fp32_sub"]
    bad = tmp_path / "renamed.yaml"
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(StudyError, match="tables.gap.rows: 'fp32_sub' is neither a variant"):
        read_tables(bad)
    assert run(tmp_path / "res", out, "--study", str(bad)) == 2
    assert "tables.gap.rows: 'fp32_sub'" in capsys.readouterr().err
    spec["tables"] = {"gap": {"ref": "main fedbiot", "rows": [["main fedsoda", "FedSODA"]]}}
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(StudyError, match="tables.gap.ref: 'main fedbiot' is not one of its rows"):
        read_tables(bad)
    spec["tables"] = {"table4": {"ref": "main fedsoda", "rows": [["main fedsoda", "r", "FedSODA"], ["r1", "r1"]]}}
    bad.write_text(yaml.safe_dump(spec))
    with pytest.raises(StudyError, match="tables.table4.rows: every row has as many labels as the first"):
        read_tables(bad)


def test_a_declared_table_without_variant_runs_is_drawn_where_its_main_rows_ran(tmp_path):
    """No run of a declared table's variants: the table is drawn (dashes) for the settings of its `main <method>`
    rows' runs, else it says that nothing ran."""
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", [summary("fedpetuning", seed=s, acc=0.9) for s in (0, 1)]), out) == 0
    text = out.read_text()
    assert "| FedPETuning (main) | FedPETuning | — | 90.0 ± 0.0 | 2 | — |" in section(text, "gap")
    assert "| FedSODA (main) | — | — | — | 0 | (reference) |" in section(text, "gap")
    assert "_No FedSODA or ablation runs yet._" in section(text, "table3")


def test_a_declared_table_is_a_section_and_hides_its_variants_only_where_it_is_written(tmp_path):
    """A table the study file declares gets its own section (after SECTIONS in a new file, under its heading); its
    variants leave "Other variants" only when the out file has its section."""
    import yaml

    spec = yaml.safe_load(STUDY.read_text(encoding="utf-8"))
    spec["tables"] = {"other": {"ref": "main fedsoda", "rows": [["main fedsoda", "F"], ["fp32_sub", "NF4 off"]],
                                "heading": "Another table"}}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(spec))
    res = write(tmp_path / "res", full_study(), SELECTION)
    out = tmp_path / "r.md"
    assert run(res, out, "--study", str(study)) == 0
    text = out.read_text()
    assert "## Another table\n\n<!-- report:begin other -->" in text and text.index("begin budget") < \
        text.index("begin other")
    assert "| NF4 off | 85.0 ± 0.0 | 2 | +3.0 |" in section(text, "other")
    assert "fp32_sub" not in section(text, "variants")
    out.write_text("<!-- report:begin variants -->\n<!-- report:end variants -->\n")
    assert run(res, out, "--study", str(study)) == 0
    assert "| fp32_sub | FedSODA | `quant.enabled=false` |" in section(out.read_text(), "variants")
    spec["tables"] = {"setup": spec["tables"]["other"]}
    study.write_text(yaml.safe_dump(spec))
    assert run(res, out, "--study", str(study)) == 2  # a table may not take a section's name


def test_a_study_folder_without_runs_rewrites_only_its_own_sections(tmp_path, capsys):
    """Before a study's first run finishes its folder holds no summary: the study is then the folder's name, so its
    tagged sections say "no runs yet" and another study's sections stay as they are."""
    empty = tmp_path / "ii"
    empty.mkdir()
    out = tmp_path / "results.md"
    out.write_text("<!-- report:begin table2 -->\nFIRST\n<!-- report:end table2 -->\n\n"
                   "<!-- report:begin seeds3@ii -->\nOLD II\n<!-- report:end seeds3@ii -->\n")
    assert run(empty, out) == 0
    text = out.read_text()
    assert "FIRST" in section(text, "table2") and "OLD II" not in text
    assert "no run summaries yet" in capsys.readouterr().err


STUDY_II = ROOT / "studies" / "cpu_smollm2_ii.yaml"  # its fedsrd, noniid and smaller_client tables


def variant_runs(stage: str, variant: str, method: str, accs: dict, **kw) -> list[RunSummary]:
    """One run per seed of a variant ({seed: test accuracy}), named as the study names them."""
    runs = []
    for seed, acc in accs.items():
        s = summary(method, seed=seed, acc=acc, stage=stage, variant=variant, study="ii", **kw)
        s.run = f"{stage}.{variant}-{method}-sst2-smollm2-{s.split}-s{seed}"
        runs.append(s)
    return runs


def row_of(text: str, start: str) -> str:
    """The one table line of `text` that starts with `start`."""
    lines = [line for line in text.splitlines() if line.startswith(start)]
    assert len(lines) == 1, (start, lines)
    return lines[0]


def test_fedsrd_table_pairs_each_density_with_fedavg_and_shows_the_bytes(tmp_path):
    """fedsrd: FedSODA's FedAvg main runs (60, 64, 68) are the reference; each FedSRD variant's Δ is paired by seed
    (srd_d0.1 ran seeds 1 and 2 only: 60 − 64, 70 − 68), beside its bytes per round and their share of FedAvg's."""
    runs, sel = three_seed_grid()
    srd = ["fed.rounds=10", "eval.dtype=bfloat16", "fed.aggregator=fedsrd", "fed.upload_density=0.25",
           "fed.download_density=0.25"]
    runs += variant_runs("fedsrd", "srd_d0.25", "fedsoda", {0: 0.62, 1: 0.63, 2: 0.70}, overrides=srd,
                         comm_bytes_per_round=2214592.0 / 4)
    runs += variant_runs("fedsrd", "srd_d0.1", "fedsoda", {1: 0.60, 2: 0.70}, comm_bytes_per_round=2214592.0 / 10)
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, sel), out, "--study", str(STUDY_II)) == 0
    text = section(out.read_text(), "fedsrd")
    assert text.count("#### ") == 1
    assert row_of(text, "| FedAvg (FedSODA main) |") == \
        "| FedAvg (FedSODA main) | — | 64.0 ± 4.0 | 3 | (reference) | — | — | 2.112 | 100.0 |"
    assert row_of(text, "| FedSRD, density 0.25 (srd_d0.25) |") == (
        "| FedSRD, density 0.25 (srd_d0.25) | `fed.aggregator=fedsrd`, `fed.download_density=0.25`, "
        "`fed.upload_density=0.25` | 65.0 ± 4.4 | 3 | +1.0 | [-3.3, +5.3] | 0, 1, 2 | 0.528 | 25.0 |")
    assert "| 65.0 ± 7.1 | 2 | -1.0 | [-39.1, +37.1] | 1, 2 | 0.211 | 10.0 |" in \
        row_of(text, "| FedSRD, density 0.1 (srd_d0.1) |")
    assert row_of(text, "| FedSRD-E, density 0.25 (srde_d0.25) |") == \
        "| FedSRD-E, density 0.25 (srde_d0.25) | — | — | 0 | — | — | — | — | — |"
    assert "comm MiB/round/client | comm % of the reference's |" in text
    assert "srd_d0.25" not in section(out.read_text(), "variants")


def test_noniid_table_pairs_each_method_with_its_own_iid_runs_across_splits(tmp_path):
    """noniid: one table per (task, model) holding the IID main runs and both Dirichlet splits; each Dirichlet row is
    paired by seed with the SAME method's IID runs (FedSODA 60, 64, 68; FedPETuning 86, 85, 84), never the table's
    FedSODA reference for FedPETuning."""
    runs, sel = three_seed_grid()
    for method, split, accs in (("fedsoda", "dirichlet-1.0", {0: 0.58, 1: 0.60, 2: 0.66}),
                                ("fedsoda", "dirichlet-0.1", {1: 0.50, 2: 0.60}),
                                ("fedpetuning", "dirichlet-1.0", {0: 0.80, 1: 0.84, 2: 0.82}),
                                ("fedpetuning", "dirichlet-0.1", {0: 0.70, 1: 0.72, 2: 0.75})):
        runs += variant_runs("noniid", "dirichlet", method, accs, split=split)
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, sel), out, "--study", str(STUDY_II)) == 0
    text = section(out.read_text(), "noniid")
    assert text.count("#### ") == 1 and "#### sst2\n" in text  # not one table per split
    assert row_of(text, "| FedSODA | IID (main) |") == \
        "| FedSODA | IID (main) | 0.001 | 64.0 ± 4.0 | 3 | (reference) | — | — | 59.0 |"
    assert row_of(text, "| FedSODA | Dirichlet β = 1.0 |") == \
        "| FedSODA | Dirichlet β = 1.0 | 0.001 | 61.3 ± 4.2 | 3 | -2.7 | [-5.5, +0.2] | 0, 1, 2 | 56.3 |"
    assert "| 55.0 ± 7.1 | 2 | -11.0 | [-49.1, +27.1] | 1, 2 |" in row_of(text, "| FedSODA | Dirichlet β = 0.1 |")
    assert "| 85.0 ± 1.0 | 3 | (reference) |" in row_of(text, "| FedPETuning | IID (main) |")
    assert "| 82.0 ± 2.0 | 3 | -3.0 | [-9.6, +3.6] | 0, 1, 2 |" in row_of(text, "| FedPETuning | Dirichlet β = 1.0 |")
    assert "| -12.7 | [-21.4, -3.9] | 0, 1, 2 |" in row_of(text, "| FedPETuning | Dirichlet β = 0.1 |")
    assert text.index("| FedSODA | IID") < text.index("| FedSODA | Dirichlet β = 1.0") < \
        text.index("| FedPETuning | IID")
    assert "Δ vs the method at IID (pts)" in text
    assert "dirichlet" not in section(out.read_text(), "variants")


def test_smaller_client_table_pairs_the_quantized_tables_with_the_16bit_runs(tmp_path):
    """smaller_client: embed8 and embed4 paired by seed with FedSODA's main runs, with the client's model size and
    the KL after pre-alignment of each."""
    runs, sel = three_seed_grid()
    runs += variant_runs("smaller_client", "embed8", "fedsoda", {0: 0.61, 1: 0.65, 2: 0.67},
                         client_model_bytes=120 * 2 ** 20, kl_after=5.625,
                         overrides=["fed.rounds=10", "eval.dtype=bfloat16", "quant.embed_bits=8"])
    runs += variant_runs("smaller_client", "embed4", "fedsoda", {0: 0.55, 2: 0.66}, client_model_bytes=100 * 2 ** 20,
                         kl_after=6.125, overrides=["fed.rounds=10", "eval.dtype=bfloat16", "quant.embed_bits=4"])
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", runs, sel), out, "--study", str(STUDY_II)) == 0
    text = section(out.read_text(), "smaller_client")
    assert row_of(text, "| 16-bit table (FedSODA main) |") == \
        "| 16-bit table (FedSODA main) | — | 64.0 ± 4.0 | 3 | (reference) | — | — | 59.0 | 145.2 | 5.500 |"
    assert row_of(text, "| int8 rows (embed8) |") == ("| int8 rows (embed8) | `quant.embed_bits=8` | 64.3 ± 3.1 | 3 | "
                                                       "+0.3 | [-2.5, +3.2] | 0, 1, 2 | 59.3 | 120.0 | 5.625 |")
    assert row_of(text, "| NF4 blocks (embed4) |") == (
        "| NF4 blocks (embed4) | `quant.embed_bits=4` | 60.5 ± 7.8 | 2 | -3.5 | [-22.6, +15.6] | 0, 2 | 55.5 | 100.0 "
        "| 6.125 |")


def test_a_row_may_name_its_own_reference_method_and_split(tmp_path):
    """A row's options: ref (one of the table's rows), method and split (of the study); anything else is refused
    with one line."""
    import yaml

    from fedsoda_mpi.study import StudyError, read_tables

    tables = read_tables(STUDY_II)
    pet = tables["noniid"].rows[4]
    assert (pet.row, pet.method, pet.split, pet.ref, pet.is_ref) == \
        ("dirichlet", "fedpetuning", "dirichlet-1.0", "main fedpetuning", False)
    assert tables["noniid"].rows[3].is_ref and not tables["fedsrd"].rows[1].is_ref
    spec = yaml.safe_load(STUDY_II.read_text(encoding="utf-8"))
    bad = tmp_path / "bad.yaml"
    for options, message in (({"ref": "main fedbiot"}, "tables.t.rows: dirichlet: ref: 'main fedbiot' is not one"),
                             ({"split": "dirichlet-0.5"}, "split 'dirichlet-0.5' is not a split of this study"),
                             ({"method": "fedx"}, "method 'fedx' is not a method of this study"),
                             ({"seed": "1"}, "options are strings among method, ref, split")):
        spec["tables"] = {"t": {"ref": "main fedsoda", "rows": [["main fedsoda", "F"], ["dirichlet", "D", options]]}}
        bad.write_text(yaml.safe_dump(spec))
        with pytest.raises(StudyError, match=message):
            read_tables(bad)


def test_a_study_file_says_how_its_tables_are_drawn(tmp_path, capsys):
    """The drawing keys of a declared table (labels, before, after, delta, empty, ...) come from the study file; an
    unknown column, a labels list of the wrong length or a bad value is refused with one line naming the key."""
    import yaml

    from fedsoda_mpi.study import StudyError, read_tables

    spec = yaml.safe_load(STUDY.read_text(encoding="utf-8"))
    spec["tables"] = {"gap": {"ref": "main fedsoda", "rows": [["main fedsoda", "F"], ["fp32_sub", "NF4 off"]],
                              "labels": ["what"], "before": ["lr"], "after": ["comm"], "delta": "Δ here (pts)"}}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(spec))
    out = tmp_path / "r.md"
    assert run(write(tmp_path / "res", full_study(), SELECTION), out, "--study", str(study)) == 0
    gap = section(out.read_text(), "gap")
    assert "| what | lr | test acc. % (mean ± std) | n | Δ here (pts) | 95% CI | comm MiB/round/client |" in gap
    assert "| NF4 off | 0.001 | 85.0 ± 0.0 | 2 | +3.0 |" in gap
    columns = set(report_tables.COLUMNS)
    for key, value, message in (("after", ["comm", "bytes"], "tables.gap.after: unknown column 'bytes'"),
                                ("labels", ["a", "b"], "tables.gap.labels: one header per label of a row"),
                                ("settings", "some", "tables.gap.settings: expected one of"),
                                ("splits", "yes", "tables.gap.splits: the only value is 'across'"),
                                ("seeds", "yes", "tables.gap.seeds: expected true or false"),
                                ("then", "plot", "tables.gap.then: unknown table 'plot'"),
                                ("colour", "red", "tables.gap: expected the keys ref and rows")):
        bad = {**spec, "tables": {"gap": {**spec["tables"]["gap"], key: value}}}
        study.write_text(yaml.safe_dump(bad))
        with pytest.raises(StudyError, match=message):
            read_tables(study, columns, set(report_tables.THENS))
        assert run(tmp_path / "res", out, "--study", str(study)) == 2
        assert message.split(":")[0] in capsys.readouterr().err
