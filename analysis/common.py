"""Shared helpers of the analysis scripts: open run files, label runs, save figures as PNG + PDF, markdown tables.

The scripts read ONLY the HDF5 run files (the HDF5 contract of docs/design.md), never re-run anything. Files are opened
read-only without HDF5 file locking, so a run that is still writing can be plotted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import contextmanager
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
    """A run file is missing, unreadable, damaged or not a fedsoda-mpi run file."""


class OutDirError(ValueError):
    """The `--out` folder cannot be created or written."""


def _h5_reason(exc: Exception) -> str:
    """The reason inside an h5py message `Unable to ... open object (REASON)`, else the message."""
    text = str(exc.args[0]) if exc.args else str(exc)
    return text[text.find("(") + 1:text.rfind(")")] if text.startswith("Unable to") and "(" in text else text


def _hdf5_problem(exc: OSError) -> str:
    """Why h5py could not open a file, in words."""
    reason = _h5_reason(exc)
    if "file signature not found" in reason:
        return "not an HDF5 file (expected a run.h5 written by fedsoda-mpi)"
    if reason.startswith("truncated file"):
        fields = dict(part.strip().split(" = ") for part in reason.split(":", 1)[1].split(",") if " = " in part)
        return (f"truncated HDF5 file ({fields.get('eof', '?')} of {fields.get('stored_eof', '?')} bytes; "
                "an interrupted copy or a full disk?)")
    return f"cannot be opened as HDF5 ({reason})"


def check_run_file(f: h5py.File) -> None:
    """Raise RunFileError unless `f` looks like a fedsoda-mpi run file: a root `config_json` attribute
    holding a JSON object (runlog.open_h5 writes it when the run starts)."""
    if "config_json" not in f.attrs:
        raise RunFileError(f"{f.filename}: not a fedsoda-mpi run file (no root attribute config_json)")
    try:
        ok = isinstance(json.loads(attr_str(f, "config_json")), dict)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise RunFileError(f"{f.filename}: not a fedsoda-mpi run file "
                           "(root attribute config_json is not a JSON object)")


def open_run(path: str | Path) -> h5py.File:
    """Open `path` (a run.h5, or a run folder holding one) read-only; RunFileError if it is missing,
    not HDF5, truncated or not a fedsoda-mpi run file."""
    path = Path(path)
    if path.is_dir():
        path = path / "run.h5"
    if not path.is_file():
        raise RunFileError(f"no run file at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise RunFileError(f"{path}: {_hdf5_problem(exc)}") from None
    try:
        check_run_file(f)
    except RunFileError:
        f.close()
        raise
    return f


@contextmanager
def reading(f: h5py.File):
    """Turn a missing dataset or attribute, unreadable data or an unexpected shape met while reading
    run file `f` into a RunFileError naming the file (a run file of another version or program)."""
    try:
        yield
    except RunFileError:
        raise
    except KeyError as exc:  # h5py: a missing dataset, group or attribute
        raise RunFileError(f"{f.filename}: unexpected content ({_h5_reason(exc)}); "
                           "is it a run file of this fedsoda-mpi version?") from None
    except (OSError, ValueError, IndexError, TypeError) as exc:
        raise RunFileError(f"{f.filename}: unexpected content ({type(exc).__name__}: {_h5_reason(exc)}); "
                           "is it a run file of this fedsoda-mpi version?") from None


def open_runs(paths: list, need: str) -> list[h5py.File]:
    """Open every run file that holds `need` (e.g. `rounds/round`); warn about and skip the others."""
    files = []
    for p in paths:
        f = open_run(p)
        if need in f:
            files.append(f)
        else:
            why = (f"a finished {f.attrs.get('method', '?')} run: its method does not record it" if "final" in f
                   else "unfinished or failed run?")
            print(f"warning: skipping {f.filename}: no /{need} ({why})", file=sys.stderr)
            f.close()
    if not files:
        raise RunFileError(f"none of the {len(paths)} run file(s) has /{need}")
    return files


def _can_write_in(folder: Path) -> str:
    """'' if a file can be created in `folder` (tried with a temporary file, as root ignores modes), else why not."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return ""
    except OSError as exc:
        return exc.strerror or str(exc)


def check_out(path: str | Path) -> Path:
    """Check, creating nothing, that the `--out` folder `path` exists and is writable or can be created;
    OutDirError naming it otherwise. Scripts call it before reading any run, so a bad `--out` fails at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutDirError(f"--out {path}: exists and is not a folder")
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    if base != path and not base.is_dir():
        raise OutDirError(f"--out {path}: cannot create the folder ({base} is not a folder)")
    why = _can_write_in(base)
    if why:
        raise OutDirError(f"--out {path}: cannot write in the folder ({why})" if base == path else
                          f"--out {path}: cannot create the folder ({base}: {why})")
    return path


def out_dir(path: str | Path) -> Path:
    """The `--out` folder `path`, checked (`check_out`) and created with its parents."""
    path = check_out(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutDirError(f"--out {path}: cannot create the folder ({exc.strerror or exc})") from None
    return path


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


def save(fig, out: str | Path, stem: str) -> list[Path]:
    """Save `fig` as `<out>/<stem>.png` and `.pdf`, close it, and return both paths."""
    out = out_dir(out)
    paths = [out / f"{stem}.{ext}" for ext in ("png", "pdf")]
    try:
        for p in paths:
            fig.savefig(p, bbox_inches="tight")
    except OSError as exc:
        raise OutDirError(f"--out {out}: cannot write {p.name} ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return paths


def write_text(out: str | Path, name: str, text: str) -> Path:
    """Write `text` to `<out>/<name>`; OutDirError naming the file if that fails."""
    path = out_dir(out) / name
    try:
        path.write_text(text)
    except OSError as exc:
        raise OutDirError(f"--out {out}: cannot write {name} ({exc.strerror or exc})") from None
    return path


def byte_unit(max_bytes: float) -> tuple[float, str]:
    """A (divisor, name) pair so that the largest value reads as a number >= 1 (B, KiB, MiB, GiB)."""
    for power, name in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if max_bytes >= 1024 ** power:
            return 1024.0 ** power, name
    return 1.0, "B"


def markdown_table(headers: list[str], rows: list, left: int = 1) -> str:
    """A markdown table; the first `left` columns are left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("runs", nargs="+", help="run files (runs/<name>/run.h5) or run folders")
    ap.add_argument("--out", default="figures", help="output folder (default: figures)")
    return ap


def main_guard(fn) -> int:
    """Run `fn()`; a RunFileError or OutDirError becomes one line on stderr and exit code 2."""
    try:
        fn()
    except (RunFileError, OutDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def plot_cli(doc: str, need: str, plot, per_run: bool = False) -> int:
    """The command line of a plot script: `SCRIPT RUN.h5 ... [--out DIR]`; prints the files written.

    `plot(files, out)` gets every run holding `need`, or `plot(file, out)` one run at a time with per_run.
    `--out` is checked first; reading errors inside `plot` name their file where the script uses `reading`."""
    args = parser(doc.split("\n")[0]).parse_args()

    def go():
        check_out(args.out)
        files = open_runs(args.runs, need)
        for path in (p for f in files for p in plot(f, args.out)) if per_run else plot(files, args.out):
            print(path)

    return main_guard(go)
