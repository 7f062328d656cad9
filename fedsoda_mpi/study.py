"""Studies: the paper's experimental protocol as data. A study file (studies/*.yaml) names the axes
(methods, tasks, models, splits, seeds, learning-rate grid) and the extra arrays (ablation, parameter
study, gap explanation); one expansion drives both routes.

    python -m fedsoda_mpi.study list studies/cpu_smollm2.yaml            # every run: stage, state, its lr
    python -m fedsoda_mpi.study run  studies/cpu_smollm2.yaml            # local route: runs in order under mpirun
    python -m fedsoda_mpi.study run  studies/cpu_smollm2.yaml --stage grid --max-runs 2
    python -m fedsoda_mpi.study run  studies/cpu_smollm2.yaml --variant no_re_align --variant r1
    bash slurm/submit_all.sh studies/paper.yaml                          # Slurm route: one array per stage

Protocol (paper Sec. 5.1: "the best combination of hyperparameters", "three different random seeds"):
1. stage `grid`: every method x task x model x split at every learning rate of the grid, at the
   `select_seeds` (default: the first seed);
2. `select`: per (method, task, model, split) the lr with the highest mean validation accuracy
   (`/final` val_accuracy: the fixed rows held out of the training file, data.val_size; never the test
   split); ties go to the smaller lr. Written to <results>/selection.json; grid summaries get their
   variant ("main" at the selected lr, "lr=<value>" otherwise);
3. stage `seeds`: the other seeds at the selected lr (variant "main");
   `grid.lr_extend` adds learning rates for one method (one whose best lr was the grid's edge); a run whose
   summary is at an lr the selection no longer picks is stale: `run` moves it aside and runs it again;
4. one stage per variant group (ablation, parameter study, gap explanation): its runs at the selected
   lr of (`lr_of` or its method, task, model, split).
Every finished run leaves a few-KB summary <results>/<run id>.json (`summarize`); analysis/report.py
builds docs/results.md from those alone. Run folders go to <runs>/<run id> and resume with resume=auto.

This module is the command line and the local route; the parts live in study_expand.py (a study file -> its runs),
study_select.py (steps 2-3: the lr selection), study_summaries.py (the run summaries) and study_reuse.py (runs
another study already made).
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from .config import ROOT
from .study_expand import Run, Study, StudyError, load, read_tables, wanted  # noqa: F401 (read_tables: the report)
from .study_reuse import reuse_all, reuse_summary
from .study_select import lr_for, select, state, supersede, write_selection
from .study_summaries import failed_summary, summaries, summarize, write_json

DONE_EXIT = 3  # `study args`: the run's summary exists already (a re-submitted array task has nothing to do)


def mpirun_command(run: Run, lr: float, run_dir: Path) -> list[str]:
    """The local route's launch line: the mpirun next to this python (the MPI mpi4py is linked against)."""
    mpirun = Path(sys.executable).parent / "mpirun"
    return [str(mpirun if mpirun.exists() else "mpirun"), "-n", str(run.np), sys.executable, "-m", "mpi4py", "-m",
            "fedsoda_mpi.main", *run.args(lr, run_dir)]


MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
           "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "HDF5_USE_FILE_LOCKING": "FALSE",
           "OMP_WAIT_POLICY": "PASSIVE",  # passive: idle OpenMP threads must not spin on shared cores
           "FEDSODA_PROGRESS": "0"}


def check_filters(study: Study, stages: list[str] | None, tasks: list[str] | None,
                  variants: list[str] | None) -> None:
    """`study run --stage/--task/--variant`: every name given must name something of the study (a typo would
    otherwise select nothing and exit 0 as if all were done)."""
    for flag, given, have in (("--stage", stages, {r.stage for r in study.runs}),
                              ("--task", tasks, {r.task for r in study.runs}),
                              ("--variant", variants, {r.variant for r in study.runs})):
        unknown = sorted(set(given or ()) - have)
        if unknown:
            raise StudyError(f"{flag} {unknown[0]}: not a {flag[2:]} of {study.name} "
                             f"(its {flag[2:]}s: {', '.join(sorted(n for n in have if n))})")


def run_local(study: Study, results: Path, runs_root: Path, stages: list[str] | None, max_runs: int,
              tasks: list[str] | None = None, variants: list[str] | None = None) -> int:
    """Run every unfinished run in order (each under its own mpirun, resume=auto), summarize it, re-select.
    A run that fails leaves a failed summary (selection ranks it last until it succeeds; `list` shows it as failed)
    and the loop goes on; the next `study run` runs it again (resume=auto: from its checkpoint, else from the start,
    the failed attempt moved aside). SIGUSR1 / SIGTERM / Ctrl-C are passed to the run's mpirun and stop the loop
    (the same command continues)."""
    results.mkdir(parents=True, exist_ok=True)
    lock = open(results / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise StudyError(f"another `study run` is using {results}; wait for it or stop it first") from None
    failed, started = [], 0
    chosen = reuse_all(study, results, stages, tasks, variants)  # the selection; re-selected when a run finishes
    for run in study.runs:
        if not wanted(run, stages, tasks, variants):
            continue
        lr = lr_for(run, chosen)
        now = state(run, lr, results)
        if now == "done":
            continue
        if lr is None:
            print(f"[study] {run.id}: waiting for the lr selection of {run.key} (its grid runs are unfinished)")
            continue
        if now == "stale":
            supersede(run, lr, results, runs_root)
        elif now == "failed":
            print(f"[study] {run.id}: it failed before; running it again", flush=True)
        source = reuse_summary(study, run, lr, results)
        if source:
            print(f"[study] {run.id}: identical to {source}; its summary is reused, not run again", flush=True)
            chosen = write_selection(study, results)
            continue
        if max_runs and started >= max_runs:
            break
        started += 1
        out = runs_root / run.id / "stdout.txt"
        since = out.stat().st_size if out.is_file() else 0
        rc, stop = _launch(run, lr, runs_root / run.id)
        if stop or rc in (75, 143):
            print(f"[study] stopped during {run.id} (exit code {rc}); run the same command to continue", flush=True)
            return rc or 75
        if rc != 0:
            print(f"[study] {run.id}: exit code {rc}{failure_hint(runs_root / run.id, since)}", flush=True)
            write_json(results / f"{run.id}.json", failed_summary(run, lr, study.name, rc))
            failed.append(run.id)
        else:
            write_json(results / f"{run.id}.json", summarize(run, runs_root / run.id, lr, study.name))
            print(f"[study {time.strftime('%H:%M:%S')}] {run.id}: done -> {results / (run.id + '.json')}", flush=True)
        chosen = write_selection(study, results)
    if failed:
        print(f"[study] {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def failure_hint(run_dir: Path, since: int = 0) -> str:
    """The end of the line that reports a failed run: the last `fedsoda-mpi:` or FATAL line its mpirun wrote to
    stdout.txt after byte `since` (this attempt's), and the files to read, those that exist (a run refused at
    start writes no log.txt)."""
    out, log = run_dir / "stdout.txt", run_dir / "log.txt"
    try:
        with open(out, "rb") as f:
            f.seek(since)
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    said = [ln.strip() for ln in lines if ln.startswith("fedsoda-mpi:") or "FATAL" in ln]
    files = [str(p) for p in (log, out) if p.is_file()]
    return (f": {said[-1]}" if said else "") + (f"; see {' and '.join(files)}" if files else "")


def _launch(run: Run, lr: float, run_dir: Path) -> tuple[int, int]:
    """One run under its own mpirun; (exit code, the stop signal this process received meanwhile or 0)."""
    env = {**os.environ, **MPI_ENV, "OMP_NUM_THREADS": str(run.threads)}
    cmd = mpirun_command(run, lr, run_dir)
    print(f"[study {time.strftime('%H:%M:%S')}] {run.id} (lr {lr:g}): {shlex.join(cmd)}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    stop = [0]
    with open(run_dir / "stdout.txt", "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

        def forward(signum, frame):  # USR1: finish the round and checkpoint; TERM / INT: abandon the round
            stop[0] = signum
            proc.send_signal(signal.SIGUSR1 if signum == signal.SIGUSR1 else signal.SIGTERM)

        old = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
        try:
            rc = proc.wait()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
    return rc, stop[0]


def list_runs(study: Study, results: Path) -> None:
    chosen = select(study, summaries(results)) if results.is_dir() else {}
    for stage in study.stages:
        runs = study.stage(stage)
        if not runs:
            continue
        states = [state(r, lr_for(r, chosen), results) for r in runs]
        failed = states.count("failed")
        print(f"stage {stage}: {len(runs)} runs, {states.count('done')} done"
              + (f", {failed} failed" if failed else ""))
        for r, now in zip(runs, states):  # stale: at an lr the selection no longer picks; failed: `run` runs it again
            lr = lr_for(r, chosen)
            print(f"  {now}  {r.id}  lr={'selected (pending)' if lr is None else f'{lr:g}'}  np={r.np}")


def task_args(study: Study, stage: str, index: int, results: Path, runs_root: Path) -> tuple[Run, float, Path]:
    """The run of array task `index` of `stage` (the Slurm route), with its lr and run folder."""
    runs = study.stage(stage)
    if not 0 <= index < len(runs):
        raise StudyError(f"stage {stage} has {len(runs)} runs; array index {index} is out of range")
    run = runs[index]
    lr = lr_for(run, select(study, summaries(results)))
    if lr is None:
        raise StudyError(f"{run.id}: no selected lr for {run.key} yet; the grid stage must finish first")
    return run, lr, runs_root / run.id


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fedsoda_mpi.study", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("list", "run", "name", "stages", "jobs", "args", "summarize", "select"))
    ap.add_argument("study", help="a study file, e.g. studies/cpu_smollm2.yaml")
    ap.add_argument("stage", nargs="?", help="args/summarize: the stage of the array")
    ap.add_argument("index", nargs="?", type=int, help="args/summarize: the array task index")
    ap.add_argument("--results", help="summaries folder (default: results/<study name>)")
    ap.add_argument("--runs", help="run folders (default: runs/<study name>)")
    ap.add_argument("--stage", dest="stages", action="append", help="run: only these stages (repeatable)")
    ap.add_argument("--task", dest="tasks", action="append", help="run: only runs of these tasks (repeatable)")
    ap.add_argument("--variant", dest="variants", action="append",
                    help="run: only runs of these variants (repeatable; a variant's name, or main)")
    ap.add_argument("--all", action="store_true", help="summarize: every finished run folder under --runs")
    ap.add_argument("--failed", type=int, default=0, metavar="CODE",
                    help="summarize: record the run as failed with this exit code")
    ap.add_argument("--max-runs", type=int, default=0, help="run: stop after starting this many runs")
    a = ap.parse_args(argv)
    try:
        study = load(a.study)
        results = Path(a.results or ROOT / "results" / study.name)
        runs_root = Path(a.runs or Path("runs") / study.name).resolve()
        if a.command == "list":
            list_runs(study, results)
        elif a.command == "name":
            print(study.name)
        elif a.command == "jobs":  # the job files its runs start from (slurm/prepare.sh prepares their models)
            print(" ".join(sorted({r.job for r in study.runs})))
        elif a.command == "stages":  # for slurm/submit_all.sh: one line per stage: name, runs, ranks, threads
            for stage in study.stages:
                runs = study.stage(stage)
                if runs:
                    print(stage, len(runs), max(r.np for r in runs), max(r.threads for r in runs))
        elif a.command == "run":
            check_filters(study, a.stages, a.tasks, a.variants)
            return run_local(study, results, runs_root, a.stages, a.max_runs, a.tasks, a.variants)
        elif a.command == "select":
            results.mkdir(parents=True, exist_ok=True)
            for key, lr in sorted(write_selection(study, results).items()):
                print(" ".join(key), f"{lr:g}")
        elif a.command == "summarize" and a.all:  # (re)write the summary of every finished run folder
            results.mkdir(parents=True, exist_ok=True)
            chosen = select(study, summaries(results))
            for run in study.runs:
                lr, run_dir = lr_for(run, chosen), runs_root / run.id
                if lr is not None and (run_dir / "run.h5").is_file():
                    try:
                        write_json(results / f"{run.id}.json", summarize(run, run_dir, lr, study.name))
                        print(f"summarized {run.id}")
                    except StudyError as e:
                        print(f"skipped {run.id}: {e}")
            write_selection(study, results)
        elif a.command in ("args", "summarize"):
            if a.stage is None or a.index is None:
                raise StudyError(f"{a.command}: give the stage and the array index")
            run, lr, run_dir = task_args(study, a.stage, a.index, results, runs_root)
            if a.command == "args":
                now = state(run, lr, results)
                if now == "done":
                    print(f"{run.id}: already done ({results / (run.id + '.json')})", file=sys.stderr)
                    return DONE_EXIT
                if now == "stale":
                    supersede(run, lr, results, runs_root)
                print(shlex.join(run.args(lr, run_dir)))
            else:
                results.mkdir(parents=True, exist_ok=True)
                write_json(results / f"{run.id}.json", failed_summary(run, lr, study.name, a.failed) if a.failed
                            else summarize(run, run_dir, lr, study.name))
    except StudyError as e:
        print(f"fedsoda-mpi: study error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
