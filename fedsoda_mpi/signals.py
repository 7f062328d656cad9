"""Stop requests: SIGUSR1 ends the run cleanly after the current round; SIGTERM, SIGINT and SIGHUP abandon the round.

    SIGUSR1  Slurm's `--signal=B:USR1@300` (forwarded by slurm/common.sh): the round finishes, rank 0 writes a
             checkpoint, every rank exits with STOPPED_EXIT (75); `resume=auto` continues. In a GSM8K
             evaluation (hours) rank 0 stops between two batches instead (StopRequested): its journal keeps them.
    SIGTERM  `scancel`, Slurm's time limit, `kill <mpirun>` (a SIGKILL follows after Slurm's KillWait, 30 s by
             default, or mpirun's own short grace period): every rank logs one line, abandons the round (the
             checkpoint of the last finished round stays the newest), removes its temporary files and exits
             with TERMINATED_EXIT (143).
    SIGINT   Ctrl-C on a rank started without mpirun, and SIGHUP (its terminal closed): as SIGTERM. Ctrl-C on
    SIGHUP   mpirun reaches the ranks as SIGTERM (mpirun forwards it so), which is what their logs then say.
"""
from __future__ import annotations

import signal
import sys

STOPPED_EXIT = 75  # EX_TEMPFAIL: stopped early on SIGUSR1 after a checkpoint; continue with resume=auto
TERMINATED_EXIT = 128 + signal.SIGTERM  # stopped on SIGTERM: the round in progress is abandoned
STOP_REQUESTED: list[str | None] = [None]  # the name of the signal that asked for a stop (read by rank 0 per round)
PROGRESS = {"round": 0, "log": None}  # what a SIGTERM reports: the round in progress, this rank's RunLog


class StopRequested(Exception):
    """Raised on rank 0 between two batches of a long evaluation (GSM8K generation) once SIGUSR1 has asked for a
    stop: the batches done so far are in the evaluation's journal, and resume=auto continues from them."""


class Terminated(BaseException):
    """Raised by the SIGTERM / SIGINT / SIGHUP handler in the main thread: unwinds every `with` block (temporary
    folders are removed, files closed) and ends the rank with TERMINATED_EXIT. A BaseException, so no
    `except Exception` on the way swallows it. `signal` names the signal."""

    def __init__(self, name: str = "SIGTERM"):
        super().__init__(name)
        self.signal = name


TERMINATING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def install_stop_handlers() -> None:
    """SIGUSR1 sets STOP_REQUESTED (the protocol stops after the round); SIGTERM, SIGINT, SIGHUP raise Terminated."""
    def stop(signum, frame):
        STOP_REQUESTED[0] = signal.Signals(signum).name

    def terminate(signum, frame):  # writes nothing itself: the main thread may be inside a write to the same log
        for sig in TERMINATING:  # a second signal must not interrupt the clean-up
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signal.Signals(signum).name)

    signal.signal(signal.SIGUSR1, stop)
    for sig in TERMINATING:
        signal.signal(sig, terminate)


def resume_hint(run_dir) -> str:
    """What to run after an abandoned round: continue from the newest checkpoint, or, with none yet, start over."""
    from .checkpoint import rounds

    done = rounds(run_dir) if run_dir is not None else []
    if done:
        return f"run the same command with resume=auto to continue from the checkpoint of round {done[-1]}"
    return "no checkpoint exists yet, so run the same command again to start over"


def where_now() -> str:
    return f"in round {PROGRESS['round']}" if PROGRESS["round"] else "before round 1"


def stalled_exit(comm, e: Exception) -> None:
    """One line (stderr and this rank's log) naming the stalled rank (watchdog.RankStalled), then MPI_Abort: the
    launcher kills every rank, the stalled one too. Called from the watch thread (MPI_THREAD_MULTIPLE)."""
    log = PROGRESS["log"]
    line = f"fedsoda-mpi: {e}, {where_now()}; ending the job; {resume_hint(log.run_dir if log else None)}"
    if log is not None:
        log.log(line)
    print(line, file=sys.stderr, flush=True)
    comm.comm.Abort(1)
