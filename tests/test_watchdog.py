"""A stopped rank ends the job (fedsoda_mpi/watchdog.py): heartbeats, the watch of a waiting rank, and SIGSTOP of one
rank of a real 3-rank mpirun run (the tiny model folder), which then resumes from its last checkpoint."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsoda_mpi.watchdog import FOLDER, Heartbeat, RankStalled, Watch, period_for
from tests.conftest import MPI_ENV, ROOT, mpirun, running


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_rank_whose_heartbeat_stops_is_named_after_the_timeout(tmp_path):
    clock = Clock()
    beats = {r: Heartbeat(tmp_path, r, period_s=3600) for r in (0, 1, 2)}
    for b in beats.values():
        b.path.parent.mkdir(exist_ok=True)
        b.beat()
    watch = Watch(tmp_path, 0, [0, 1, 2], timeout_s=30, clock=clock)
    for _ in range(3):  # rank 1 beats, rank 2 is silent for 3 x 12 s
        clock.now += 12
        beats[1].beat()
        if clock.now - 100 <= 30:
            watch.check()
    with pytest.raises(RankStalled, match=rf"^rank 2 \(pid {os.getpid()} on \S+\) gave no sign of life for 36 s "
                                          r"while rank 0 waited for it \(fed.stall_timeout=30\)"):
        watch.check()


def test_a_rank_that_has_not_written_yet_gets_the_whole_timeout(tmp_path):
    clock = Clock()
    watch = Watch(tmp_path, 1, [0, 1], timeout_s=10, clock=clock)
    clock.now += 9
    watch.check()  # no file of rank 0 yet: silent for 9 s, within the timeout
    clock.now += 2
    with pytest.raises(RankStalled, match=r"^rank 0 \(pid \? on \?\) gave no sign of life for 11 s"):
        watch.check()
    assert Watch(tmp_path, 1, [0, 1], timeout_s=0, clock=clock).check() is None  # 0: never


def test_a_rank_that_left_the_run_is_not_watched_any_more(tmp_path):
    """A rank that leaves the run removes its file (Heartbeat's block ends): the others may go on for longer than the
    timeout (rank 0's export after the last collective) without being ended by their watch of it."""
    clock = Clock()
    beat = Heartbeat(tmp_path, 1, period_s=3600)
    beat.path.parent.mkdir(exist_ok=True)
    beat.beat()
    watch = Watch(tmp_path, 0, [0, 1], timeout_s=10, clock=clock)
    beat.path.unlink()
    clock.now += 60
    watch.check()
    assert watch.seen == {}


def test_the_heartbeat_thread_beats_and_its_file_goes_with_the_block(tmp_path):
    with Heartbeat(tmp_path, 3, period_s=0.05) as beat:
        first = beat.path.read_text()
        time.sleep(0.3)
        count, pid, _ = beat.path.read_text().split()
        assert int(count) >= 3 and int(pid) == os.getpid() and first.split()[0] == "1"
    assert not (tmp_path / FOLDER).exists()
    assert period_for(1800) == 30 and period_for(6) == 0.6


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of a job started with start_new_session (the launcher, and ranks spinning in MPI or
    stopped: SIGKILL ends those too)."""
    from fedsoda_mpi.reaper import session_pids

    for pid in session_pids(proc.pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("stalled", [2, 0], ids=["client", "server"])
def test_sigstop_of_one_rank_ends_every_rank_and_the_run_resumes(stalled, tiny_model_dir, tmp_path):
    """SIGSTOP of a client rank (or of rank 0) after round 1's checkpoint: a waiting rank names it within
    fed.stall_timeout (6 s here) + a heartbeat check, the job ends with a non-zero exit and no process left,
    and resume=auto finishes the run from the checkpoint."""
    run_dir = tmp_path / "run"
    args = ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", "fed.rounds=3", "fed.clients=2",
            "fed.local_steps=2", "eval.every=0", "eval.max_examples=8", "data.public_samples=8",
            "data.max_train_per_client=8", "data.val_size=8", "oda.re_align=false", "fed.stall_timeout=6",
            f"output.dir={run_dir}"]
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", "3", sys.executable, "-m", "mpi4py", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **MPI_ENV}, start_new_session=True)
    deadline = time.time() + 600
    while not (run_dir / "checkpoints" / "round00001").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    pid = int((run_dir / FOLDER / f"rank{stalled}").read_text().split()[1])
    os.kill(pid, signal.SIGSTOP)
    t0 = time.time()
    try:
        out = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:  # the job did not end: kill it, show its output
        _kill_session(proc)
        pytest.fail(f"the job still ran 120 s after SIGSTOP of rank {stalled}:\n{proc.communicate()[0][-4000:]}")
    took = time.time() - t0
    assert proc.returncode != 0 and took < 6 + 15, (took, out[-3000:])
    assert f"fedsoda-mpi: rank {stalled} (pid {pid} on " in out and "gave no sign of life for" in out, out[-3000:]
    assert "ending the job; run the same command with resume=auto to continue from the checkpoint of round" in out
    assert not running(pid)
    p = mpirun(3, args + ["resume=auto"], timeout=600)
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert not (run_dir / FOLDER).exists()  # every heartbeat file goes with its rank's clean exit
    print(f"SIGSTOP of rank {stalled}: the job ended after {took:.1f} s")


def test_the_watcher_thread_sees_a_stall_while_the_main_thread_is_blocked(tmp_path):
    """The watch runs in its own thread, so a rank blocked in a collective (MPI spins in C code; no Python code of
    its main thread runs, as in a Bcast for which rank 0 never comes) still ends the job: here the main thread blocks
    on an Event and the Watcher calls on_stall with the silent rank's RankStalled."""
    import threading

    from fedsoda_mpi.watchdog import Watcher

    (tmp_path / FOLDER).mkdir()
    (tmp_path / FOLDER / "rank0").write_text("7 4242 node-a")  # rank 0's last beat; it never beats again
    seen, blocked = [], threading.Event()
    watch = Watch(tmp_path, 1, [0, 1], timeout_s=0.3)

    def on_stall(e):
        seen.append(str(e))
        blocked.set()

    with Watcher(watch, on_stall, every_s=0.05):
        assert blocked.wait(timeout=10)  # the "collective" ends only because the watcher acted
    assert len(seen) == 1 and seen[0].startswith("rank 0 (pid 4242 on node-a) gave no sign of life for")


def test_the_watcher_calls_nothing_while_every_rank_beats(tmp_path):
    from fedsoda_mpi.watchdog import Watcher

    calls = []
    with Heartbeat(tmp_path, 0, 0.05), Watcher(Watch(tmp_path, 1, [0, 1], timeout_s=0.5), calls.append, every_s=0.05):
        time.sleep(1.2)
    assert calls == []


@pytest.mark.mpi
def test_ranks_blocked_in_a_collective_end_the_job_when_rank_0_stops(tmp_path):
    """The window the waits in Comm.idle_wait cannot see: rank 0 stopped between two collectives while the clients
    block in the second (tests/mpi_jobs/stall_job.py). Their watch threads end the job: non-zero exit within the
    timeout (5 s) plus a little, one line naming rank 0, no process left (the stopped one killed too)."""
    job = ROOT / "tests" / "mpi_jobs" / "stall_job.py"
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", "3", sys.executable, "-m", "mpi4py", str(job),
           str(tmp_path / "run")]
    (tmp_path / "run").mkdir()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **MPI_ENV}, start_new_session=True)
    try:
        out = proc.communicate(timeout=180)[0]
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        pytest.fail(f"the job still ran 180 s after rank 0 stopped:\n{proc.communicate()[0][-3000:]}")
    assert proc.returncode != 0, out[-3000:]  # (Open MPI continues the stopped rank to kill it: it may print
    # "not reached" first; the job ends all the same)
    assert re.search(r"fedsoda-mpi: rank 0 \(pid \d+ on \S+\) gave no sign of life for \d+ s while rank [12] waited",
                     out), out[-3000:]
    assert not (tmp_path / "run" / FOLDER).exists() or all(
        not running(int(p.read_text().split()[1])) for p in (tmp_path / "run" / FOLDER).glob("rank?"))
