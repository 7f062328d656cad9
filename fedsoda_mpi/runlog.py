"""The run folder: `run.h5` (the one record of a run, its contract in docs/design.md), `config.yaml`, `log.txt`.

Only rank 0 writes the HDF5 file; rows are appended to resizable datasets and flushed every round,
so another process can read it during the run with `HDF5_USE_FILE_LOCKING=FALSE`:

    HDF5_USE_FILE_LOCKING=FALSE python -c "import h5py; print(h5py.File('runs/NAME/run.h5')['rounds/train_loss'][:])"
"""
from __future__ import annotations

import errno
import fcntl
import importlib.metadata
import json
import os
import socket
import platform
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from .config import ROOT, Config, ConfigError, to_yaml

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "h5py", "numpy", "mpi4py", "safetensors")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def git_commit() -> str:
    """The commit of the checkout the code runs from (+ '-dirty' with local changes), or 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


_STARTED: list[str] = []  # this process's start time as run names use it, fixed at the first call


def run_name(cfg: Config) -> str:
    """output.name, or <job>-<method>-<Slurm job id (_array task), or the start time and process id>. The start
    time is taken once per process, so every call names the same folder (the lock and the run must be one folder);
    the process id keeps two runs started in the same second apart (rank 0 names the folder for every rank)."""
    job = Path(cfg.job).stem if cfg.job else "job"
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if not _STARTED:
        _STARTED.append(f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    tag = f"{slurm}_{task}" if slurm and task else (slurm or _STARTED[0])
    return cfg.output.name or f"{job}-{cfg.method}-{tag}"


def run_dir_of(cfg: Config) -> Path:
    """The run folder: output.dir, or output.root/output.name, or output.root/<job>-<method>-<job id or time>."""
    return Path(cfg.output.dir or Path(cfg.output.root) / run_name(cfg))


def finished_run(run_dir: Path) -> bool:
    """Whether run_dir/run.h5 is the record of a run that reached its final evaluation (/final)."""
    return finished_rounds(run_dir) is not None


def finished_rounds(run_dir: Path) -> int | None:
    """The rounds a finished run did (the last /rounds/round of a run.h5 with /final), or None when run_dir holds
    no finished run (no run.h5, one cut short by a crash or not HDF5, or one without /final)."""
    try:
        with h5py.File(run_dir / "run.h5", "r", locking=False) as f:
            if "final" not in f:
                return None
            rounds = f["rounds/round"][:] if "rounds/round" in f else []
            return int(max(rounds, default=0))
    except (OSError, ValueError):
        return None


ATTEMPT_FILES = ("run.h5", "config.yaml", "log.txt", "log.rank*.txt", "client_rank*.json", "checkpoints", "adapter",
                 # data.SELF_FILE: a new attempt may generate its texts with other settings
                 "public_self.jsonl", "public_self.jsonl.tmp")


class RunFolderRefused(ConfigError):
    """The run folder cannot be used as asked (rank 0 finds it once the folder is locked; every rank stops with it)."""


def archive_failed_attempt(run_dir: Path, keep: tuple[str, ...] = ()) -> Path | None:
    """Move the files of an unfinished attempt (failed or interrupted, no /final) into run_dir/failed-<time>/ so the
    run starts over and nothing of the old attempt is lost (its log keeps the FATAL line); the names in `keep` stay.
    Rank 0 only, before any rank logs. All or nothing: when a file cannot be moved, those moved already go back and
    RunFolderRefused names the file."""
    found = [p for pattern in ATTEMPT_FILES for p in run_dir.glob(pattern) if p.name not in keep]
    if not found:
        return None
    dest = _new_folder_name(run_dir, time.strftime("failed-%Y%m%d-%H%M%S"))
    moved: list[Path] = []
    failing = dest
    try:
        dest.mkdir()
        for failing in found:
            failing.rename(dest / failing.name)
            moved.append(failing)
    except OSError as e:
        for p in reversed(moved):  # back where they were (the same folder, the same file system)
            try:
                (dest / p.name).rename(p)
            except OSError:
                pass
        try:
            dest.rmdir()
        except OSError:
            pass
        raise RunFolderRefused(f"{run_dir} holds an unfinished attempt (no /final) that cannot be moved aside into "
                               f"{dest.name}/ ({failing}: {e.strerror or e}); nothing was moved: fix the permissions "
                               "or choose another output.dir") from None
    return dest


def _new_folder_name(parent: Path, stem: str) -> Path:
    """parent/stem, or parent/stem-2, -3, ... when a folder of that name exists (two attempts in one second)."""
    path, i = parent / stem, 1
    while path.exists():
        i += 1
        path = parent / f"{stem}-{i}"
    return path


LOCK_FILE = ".lock"
_HELD_LOCKS: list = []  # open lock files of this process (released when it exits, however it exits)


class RunFolderBusy(RunFolderRefused):
    """Another live process holds the run folder's lock (or the lock file cannot be made)."""


def lock_run_dir(run_dir: Path) -> bool:
    """Take run_dir/.lock (an exclusive flock, rank 0, for the life of the process) so that two jobs never write
    one run folder: a resubmitted Slurm array task, a second `study run`, the same command typed twice. The
    kernel drops the lock when the process dies, even on SIGKILL, so a crash never leaves a stale lock.
    Raises RunFolderBusy naming the holder (host, pid, Slurm job, start time); returns False (and locks
    nothing) on a file system without flock support (e.g. Lustre mounted without -o flock)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise RunFolderBusy(f"{run_dir} is in use by another job ({holder}); wait for it to end, stop it, "
                                "or choose another output.dir") from None
        return False
    f.seek(0)
    f.truncate()
    job = os.environ.get("SLURM_JOB_ID")
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}" + (f", Slurm job {job}" if job else "")
            + time.strftime(", since %Y-%m-%d %H:%M:%S") + "\n")
    f.flush()
    _HELD_LOCKS.append(f)
    return True


def take_lock(run_dir: Path) -> str | None:
    """Rank 0: `lock_run_dir`, or the one-line reason the run cannot have this folder (a live holder, a lock file
    that cannot be created); a file system without flock is a warning on stderr, not a reason."""
    try:
        if not lock_run_dir(run_dir):
            print(f"fedsoda-mpi: warning: {run_dir}: the file system does not support flock; the run folder is not "
                  "locked against a second job", file=sys.stderr, flush=True)
    except RunFolderBusy as e:
        return str(e)
    except OSError as e:
        return f"output.dir: cannot create the lock file in {run_dir}: {e.strerror or e}"
    return None


class RunLog:
    """Text log on every rank (rank 0: log.txt, others: log.rank<R>.txt); HDF5 + config.yaml on rank 0."""

    def __init__(self, run_dir: Path, rank: int = 0, echo: bool = True):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.echo = echo
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._text = open(self.run_dir / ("log.txt" if rank == 0 else f"log.rank{rank}.txt"), "a", buffering=1)
        self.h5: h5py.File | None = None
        self._t0 = time.time()

    def log(self, msg: str, echo: bool | None = None) -> None:
        """One timestamped line into this rank's log file (and stdout on rank 0 unless echo=False)."""
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self._t0:7.1f}s rank {self.rank}] {msg}"
        if self._text.closed:  # a signal after this rank finished its run: the line goes to stderr instead
            print(line, file=sys.stderr, flush=True)
            return
        self._text.write(line + "\n")
        self._text.flush()
        if (self.echo if echo is None else echo) and self.rank == 0:
            print(line, flush=True)

    def log_config(self, cfg: Config) -> None:
        """The resolved config (method preset < job file < overrides; config.yaml holds the same), one line per
        YAML line after a header line; only the header is echoed to stdout."""
        self.log(f"resolved config (the {cfg.method} preset < {cfg.job} < key=value overrides; also config.yaml):")
        for line in to_yaml(cfg).splitlines():
            self.log(f"  {line}", echo=False)

    def progress(self, what: str, total: int, unit: str = "steps", every_s: float = 60.0):
        """A callback `done -> None` for a long phase of `total` units: one line now with the count, one after the
        first unit with the time it took and an estimate of the rest, then at most one every `every_s` seconds
        and one at the end."""
        self.log(f"{what}: {total} {unit} to run")
        t0, last = time.time(), [None]

        def step(done: int) -> None:
            now = time.time()
            if done == 1 or done == total or now - last[0] >= every_s:
                rate = (now - t0) / max(done, 1)
                self.log(f"{what}: {done}/{total} {unit}, {rate:.2f} s each, about {rate * (total - done) / 60:.1f} "
                         "min left")
                last[0] = now

        return step

    def open_h5(self, cfg: Config, world_size: int, model_name: str, mode: str = "a") -> h5py.File:
        """Create (mode 'w') or reopen on resume (mode 'a') run.h5 with the root attributes and write config.yaml."""
        assert self.rank == 0, "only rank 0 writes the run file"
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        self.h5 = h5py.File(self.run_dir / "run.h5", mode)
        attrs = {"config_json": json.dumps(cfg.to_dict()), "method": cfg.method, "model": model_name,
                 "world_size": world_size, "n_clients": cfg.fed.clients, "versions_json": json.dumps(versions()),
                 "git_commit": git_commit(), "command": " ".join(sys.argv)}
        for k, v in attrs.items():
            self.h5.attrs[k] = v
        self.h5.flush()
        return self.h5

    def write(self, path: str, data, **attrs) -> None:
        """Write (or replace) a whole dataset, e.g. `/sgp/distance`."""
        if self.h5 is None:
            return
        if path in self.h5:
            del self.h5[path]
        ds = self.h5.create_dataset(path, data=np.asarray(data))
        for k, v in attrs.items():
            ds.attrs[k] = v

    def append(self, group: str, row: dict) -> None:
        """Append one row to each `group/key` dataset (resizable along axis 0)."""
        if self.h5 is None:
            return
        for key, value in row.items():
            arr = np.asarray(value)
            if arr.dtype == np.float64 and not key.endswith(("_s", "_mb", "_steps")):
                arr = arr.astype(np.float32)  # metrics in float32; seconds and memory stay float64
            path = f"{group}/{key}"
            if path not in self.h5:
                self.h5.create_dataset(path, shape=(0, *arr.shape), maxshape=(None, *arr.shape), dtype=arr.dtype,
                                       chunks=(max(1, 4096 // max(arr.nbytes, 1)), *(max(1, d) for d in arr.shape)))
            ds = self.h5[path]
            ds.resize(ds.shape[0] + 1, axis=0)
            ds[-1] = arr

    def last(self, group: str, key: str):
        """The last row of `group/key` (None if the run file has no such row): e.g. the newest /rounds/eval_acc."""
        if self.h5 is None or f"{group}/{key}" not in self.h5 or not len(self.h5[f"{group}/{key}"]):
            return None
        return self.h5[f"{group}/{key}"][-1]

    def column(self, group: str, key: str):
        """All rows of `group/key` as a numpy array (None if the run file has no such dataset)."""
        if self.h5 is None or f"{group}/{key}" not in self.h5:
            return None
        return self.h5[f"{group}/{key}"][:]

    def attrs(self, path: str) -> dict:
        """The attributes of a group or dataset of the run file (empty if absent)."""
        return {k: v.item() if isinstance(v, np.generic) else v for k, v in self.h5[path].attrs.items()} \
            if self.h5 is not None and path in self.h5 else {}

    def set_attrs(self, path: str, **attrs) -> None:
        if self.h5 is None:
            return
        obj = self.h5.require_group(path) if path not in self.h5 else self.h5[path]
        for k, v in attrs.items():
            obj.attrs[k] = v

    def flush(self) -> None:
        if self.h5 is not None:
            self.h5.flush()
        self._text.flush()

    def close(self) -> None:
        """Close run.h5 (rank 0) and the log file; a later `log` line goes to stderr."""
        if self.h5 is not None:
            self.h5.close()
            self.h5 = None
        self._text.close()
