"""Temporary files that outlive a SIGKILL: a detached reaper removes them as soon as their process is gone.

    python -m fedsoda_mpi.reaper PID PATH...   # what `reap_when_gone` starts (imports nothing else of the package)

A client rank that mpirun SIGKILLs (its grace period after SIGTERM is about a second; a load of the sub-LLM in C
code outlasts it) cannot remove its own temporary copy; its reaper, in a session of its own, outlives it and does.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRATCH_GLOBS = ("fedsoda-client*-*-*", "fedsoda-server-*-*")  # `scratch` folders: fedsoda-<role>-<pid>-<random>


def process_alive(pid: int) -> bool:
    """True if `pid` runs. A zombie (killed, not yet reaped: in containers whose init never reaps, forever) is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): trust kill(0)
    return state not in ("Z", "X", "x")


def session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (a launcher started with start_new_session and every rank it started)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getsid(int(p.name)) == sid and process_alive(int(p.name)):
                    pids.append(int(p.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def reap_when_gone(*paths: Path) -> subprocess.Popen:
    """Start a reaper for `paths`: they are removed as soon as this process ends, however it ends; the reaper exits
    by itself once the paths are gone. Returns the Popen (wait on it to reap it)."""
    return subprocess.Popen([sys.executable, "-m", "fedsoda_mpi.reaper", str(os.getpid()), *map(str, paths)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


@contextlib.contextmanager
def scratch(role: str):
    """A temporary folder TMPDIR/fedsoda-<role>-<pid>-<random> (role: server, client<R>) for a model copy: removed
    when the block ends, by its reaper when this process is SIGKILLed inside it, and by `sweep_stale_copies` at the
    next start if even the reaper was killed."""
    with tempfile.TemporaryDirectory(prefix=f"fedsoda-{role}-{os.getpid()}-") as tmp:
        reaper = reap_when_gone(Path(tmp))
        yield Path(tmp)
    with contextlib.suppress(Exception):
        reaper.wait(timeout=5)  # it sees the folder gone within 0.2 s and exits


def sweep_stale_copies(root: Path | None = None) -> list[str]:
    """Remove the `scratch` folders (TMPDIR/fedsoda-client<R>-<pid>-*, fedsoda-server-<pid>-*) of processes that are
    gone: a rank SIGKILLed while building or loading a sub-LLM (mpirun's grace period after SIGTERM is about a
    second) could not remove its own, nor could its reaper if it was killed too."""
    removed = []
    root = Path(root or tempfile.gettempdir())
    for path in sorted({p for pattern in SCRATCH_GLOBS for p in root.glob(pattern)}):
        try:
            pid = int(path.name.split("-")[2])
        except ValueError:
            continue  # not a name this code writes
        if not process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def main(argv: list[str]) -> None:
    pid, paths = int(argv[0]), argv[1:]
    while process_alive(pid) and any(os.path.exists(p) for p in paths):
        time.sleep(0.2)
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
