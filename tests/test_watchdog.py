"""A stopped rank ends the job (fedsoda_mpi/watchdog.py): heartbeats, the watch of a waiting rank, and SIGSTOP of one
rank of a real 3-rank mpirun run (the tiny model folder), which then resumes from its last checkpoint."""
import os
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


def test_the_heartbeat_thread_beats_and_its_file_goes_with_the_block(tmp_path):
    with Heartbeat(tmp_path, 3, period_s=0.05) as beat:
        first = beat.path.read_text()
        time.sleep(0.3)
        count, pid, _ = beat.path.read_text().split()
        assert int(count) >= 3 and int(pid) == os.getpid() and first.split()[0] == "1"
    assert not (tmp_path / FOLDER).exists()
    assert period_for(1800) == 30 and period_for(6) == 0.6


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
    out = proc.communicate(timeout=120)[0]
    took = time.time() - t0
    assert proc.returncode != 0 and took < 6 + 15, (took, out[-3000:])
    assert f"fedsoda-mpi: rank {stalled} (pid {pid} on " in out and "gave no sign of life for" in out, out[-3000:]
    assert "ending the job; run the same command with resume=auto to continue from the checkpoint of round" in out
    assert not running(pid)
    p = mpirun(3, args + ["resume=auto"], timeout=600)
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert not (run_dir / FOLDER).exists()  # every heartbeat file goes with its rank's clean exit
    print(f"SIGSTOP of rank {stalled}: the job ended after {took:.1f} s")
