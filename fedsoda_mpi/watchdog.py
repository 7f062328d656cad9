"""Heartbeats: a stopped or frozen rank ends the job within `fed.stall_timeout` instead of holding every other rank.

Every rank runs a daemon thread that rewrites `<run folder>/.heartbeat/rank<k>` every `period` seconds with a
counter, its pid and its host (the run folder is shared by all ranks: they write their logs there too), and a second
daemon thread (`Watcher`) that reads the other ranks' files about once a second, whatever its main thread is doing:
sleeping in `Comm.idle_wait`, or blocked in any collective (where MPI spins and no Python code of the main thread
runs). A rank whose counter has not changed for `fed.stall_timeout` seconds, timed on the reader's own monotonic
clock (no clock is compared across nodes), is stalled: SIGSTOP (Ctrl-Z, a debugger), a frozen node, a process that
cannot run. The watching thread logs one line naming the stalled rank and calls MPI_Abort
(`signals.stalled_exit`), so mpirun (or srun) kills every rank, the stopped one too.

Not detected: a rank whose heartbeat thread still runs while its main thread hangs (a deadlock inside an MPI call
or a GPU kernel that never returns); Slurm's time limit bounds those.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

FOLDER = ".heartbeat"


class RankStalled(RuntimeError):
    """A rank gave no heartbeat for longer than fed.stall_timeout (the message names it, its pid and host)."""


def period_for(timeout_s: float) -> float:
    """Seconds between two heartbeats: a tenth of the timeout, at most 30 s (a missed beat or two is no stall)."""
    return min(30.0, timeout_s / 10)


class Heartbeat:
    """This rank's beat: `with Heartbeat(run_dir, rank, period_s):` (the file is removed when the block ends)."""

    def __init__(self, run_dir: Path, rank: int, period_s: float):
        self.path = Path(run_dir) / FOLDER / f"rank{rank}"
        self.period_s, self.count = period_s, 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self.path.parent.mkdir(exist_ok=True)
        self.beat()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # the last rank to leave removes the folder
        except OSError:
            pass

    def beat(self) -> None:
        """Rewrite the file atomically: '<counter> <pid> <host>'."""
        self.count += 1
        tmp = self.path.with_name(f"{self.path.name}.tmp")
        tmp.write_text(f"{self.count} {os.getpid()} {socket.gethostname()}")
        os.replace(tmp, self.path)

    def _loop(self) -> None:
        while not self.stopped.wait(self.period_s):
            try:
                self.beat()
            except OSError:  # a full or briefly unreachable file system: the next beat tries again
                pass


class Watch:
    """The other ranks' heartbeats as one waiting rank sees them: `check()` raises RankStalled for a silent one."""

    def __init__(self, run_dir: Path, rank: int, ranks: list[int], timeout_s: float, clock=time.monotonic):
        self.folder, self.rank, self.timeout_s, self.clock = Path(run_dir) / FOLDER, rank, timeout_s, clock
        now = clock()
        self.seen = {r: (self._read(r) or "", now) for r in ranks if r != rank}  # rank -> (content, when it changed)

    def _read(self, r: int) -> str | None:
        """Rank r's heartbeat file, or None when it has none (not written yet, or removed: the rank left)."""
        try:
            return (self.folder / f"rank{r}").read_text()
        except OSError:
            return None

    def check(self) -> None:
        """Note every rank whose file changed; raise RankStalled for the first silent for longer than the timeout."""
        if self.timeout_s <= 0:
            return
        now = self.clock()
        for r, (last, since) in list(self.seen.items()):
            text = self._read(r)
            if text is None and last:  # its file existed and is gone: the rank left the run (Heartbeat removes it)
                del self.seen[r]
                continue
            text = last if text is None else text
            if text != last:
                self.seen[r] = (text, now)
            elif now - since > self.timeout_s:
                _, pid, host = (text.split() + ["?", "?", "?"])[:3]
                raise RankStalled(f"rank {r} (pid {pid} on {host}) gave no sign of life for {now - since:.0f} s "
                                  f"while rank {self.rank} waited for it (fed.stall_timeout="
                                  f"{self.timeout_s:g}): it is stopped (SIGSTOP?) or its node is frozen")


class Watcher:
    """`with Watcher(watch, on_stall):` checks `watch` every `every_s` seconds in a daemon thread for as long as the
    block lasts and calls `on_stall(error)` with the first RankStalled (it does not return: MPI_Abort)."""

    def __init__(self, watch: Watch, on_stall, every_s: float = 1.0):
        self.watch, self.on_stall, self.every_s = watch, on_stall, every_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="watch", daemon=True)

    def __enter__(self) -> "Watcher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)

    def _loop(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                self.watch.check()
            except RankStalled as e:
                if not self.stopped.is_set():  # the run did not end meanwhile
                    self.on_stall(e)
                return
