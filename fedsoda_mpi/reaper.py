"""Temporary files that outlive a SIGKILL: a detached reaper removes them as soon as their process is gone.

    python -m fedsoda_mpi.reaper PID PATH...   # what `reap_when_gone` starts (imports nothing else of the package)

A client rank that mpirun SIGKILLs (its grace period after SIGTERM is about a second; a load of the sub-LLM in C
code outlasts it) cannot remove its own temporary copy; its reaper, in a session of its own, outlives it and does.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


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


def reap_when_gone(*paths: Path) -> subprocess.Popen:
    """Start a reaper for `paths`: they are removed as soon as this process ends, however it ends; the reaper exits
    by itself once the paths are gone. Returns the Popen (wait on it to reap it)."""
    return subprocess.Popen([sys.executable, "-m", "fedsoda_mpi.reaper", str(os.getpid()), *map(str, paths)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def main(argv: list[str]) -> None:
    pid, paths = int(argv[0]), argv[1:]
    while process_alive(pid) and any(os.path.exists(p) for p in paths):
        time.sleep(0.2)
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
