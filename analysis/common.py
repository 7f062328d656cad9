"""Shared helpers of the analysis scripts: open run files, label runs, save figures as PNG + PDF.

The scripts read ONLY the HDF5 run files (DESIGN.md schema), never re-run anything. Files are opened
read-only without HDF5 file locking, so a run that is still writing can be plotted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")  # must precede the h5py import

import h5py  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "font.size": 10, "axes.grid": True,
                     "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
                     "legend.frameon": False})


class RunFileError(ValueError):
    """A run file is missing or lacks what a script needs."""


def open_run(path: str | Path) -> h5py.File:
    """Open `path` (a run.h5, or a run folder holding one) read-only."""
    path = Path(path)
    if path.is_dir():
        path = path / "run.h5"
    if not path.is_file():
        raise RunFileError(f"no run file at {path}")
    return h5py.File(path, "r")


def open_runs(paths: list, need: str) -> list[h5py.File]:
    """Open every run file that holds `need` (e.g. `rounds/round`); warn about and skip the others."""
    files = []
    for p in paths:
        f = open_run(p)
        if need in f:
            files.append(f)
        else:
            print(f"warning: skipping {f.filename}: no /{need} (unfinished or failed run?)", file=sys.stderr)
            f.close()
    if not files:
        raise RunFileError(f"none of the {len(paths)} run file(s) has /{need}")
    return files


def attr_str(obj, key: str, default: str = "") -> str:
    value = obj.attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def config(f: h5py.File) -> dict:
    """The resolved config stored in the root attribute `config_json` ({} if absent)."""
    raw = attr_str(f, "config_json", "{}")
    return json.loads(raw) if raw else {}


def task_of(f: h5py.File) -> str:
    """The task from `/final` attrs, else from the stored config."""
    if "final" in f and "task" in f["final"].attrs:
        return attr_str(f["final"], "task")
    return str(config(f).get("data", {}).get("task", "?"))


def run_name(f: h5py.File) -> str:
    """The run folder's name (the parent directory of run.h5)."""
    return Path(f.filename).resolve().parent.name


def run_label(f: h5py.File) -> str:
    """`method / task`, e.g. `fedsoda / gsm8k`, plus the Dirichlet beta of a non-IID split."""
    data = config(f).get("data", {})
    skew = f" / Dir(\u03b2={data.get('dirichlet_beta')})" if data.get("split") == "dirichlet" else ""
    return f"{attr_str(f, 'method', '?')} / {task_of(f)}{skew}"


def labels(files: list[h5py.File]) -> list[str]:
    """Run labels for a legend; runs sharing `method / task` get their run name appended."""
    base = [run_label(f) for f in files]
    return [f"{b} ({run_name(f)})" if base.count(b) > 1 else b for b, f in zip(base, files)]


def round_axis(ax, rounds) -> None:
    """Integer round ticks, half a round of margin on each side (readable with a single round too)."""
    if len(rounds):
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def legend(fig, ax) -> None:
    """The run legend: inside `ax` for a few runs, below the figure in columns for many."""
    handles, names = ax.get_legend_handles_labels()
    if len(handles) <= 4:
        ax.legend(loc="best", fontsize=8)
    else:
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, fontsize=8)


def save(fig, out_dir: str | Path, stem: str) -> list[Path]:
    """Save `fig` as `<out_dir>/<stem>.png` and `.pdf`, close it, and return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight")
    plt.close(fig)
    return paths


def byte_unit(max_bytes: float) -> tuple[float, str]:
    """A (divisor, name) pair so that the largest value reads as a number >= 1 (B, KiB, MiB, GiB)."""
    for power, name in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if max_bytes >= 1024 ** power:
            return 1024.0 ** power, name
    return 1.0, "B"


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("runs", nargs="+", help="run files (runs/<name>/run.h5) or run folders")
    ap.add_argument("--out", default="figures", help="output folder (default: figures)")
    return ap


def main_guard(fn) -> int:
    """Run `fn()`; a RunFileError becomes one line on stderr and exit code 2."""
    try:
        fn()
    except RunFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def plot_cli(doc: str, need: str, plot, per_run: bool = False) -> int:
    """The command line of a plot script: `SCRIPT RUN.h5 ... [--out DIR]`; prints the files written.

    `plot(files, out)` gets every run holding `need`, or `plot(file, out)` one run at a time with per_run."""
    args = parser(doc.split("\n")[0]).parse_args()

    def go():
        files = open_runs(args.runs, need)
        for path in (p for f in files for p in plot(f, args.out)) if per_run else plot(files, args.out):
            print(path)

    return main_guard(go)
