"""Run file: schema round trip, resizable per-round rows, readable while open."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from fedsoda_mpi.config import load_config
from fedsoda_mpi.runlog import RunLog, versions

ROOT = Path(__file__).resolve().parents[1]


def test_schema_round_trip(tmp_path):
    cfg = load_config(None, ["fed.rounds=3"])
    log = RunLog(tmp_path / "run", rank=0, echo=False)
    log.open_h5(cfg, world_size=3, model_name="smollm2-135m")
    dist = np.full((4, 27), np.nan, np.float32)
    dist[0, :26] = np.linspace(0.1, 0.3, 26)
    log.write("sgp/distance", dist)
    log.write("sgp/groups", np.array([[3, 6], [10, 13]], np.int32))
    for r in range(1, 4):
        log.append("rounds", {"round": np.int32(r), "wall_s": np.float64(1.5 * r),
                              "train_loss": np.arange(2, dtype=np.float32) + r,
                              "n_samples": np.ones(2, np.float32), "eval_acc": np.float32(np.nan)})
        log.append("drift", {"round": np.int32(r), "distance": np.full(2, 0.1 * r, np.float32)})
        log.flush()
        # another process reads the file while the writer holds it open
        code = "import h5py; f = h5py.File(sys.argv[1], 'r'); print(f['rounds/round'].shape[0])"
        out = subprocess.run([sys.executable, "-c", "import sys; " + code, str(tmp_path / "run" / "run.h5")],
                             capture_output=True, text=True, env={"HDF5_USE_FILE_LOCKING": "FALSE"})
        assert out.stdout.strip() == str(r), out.stderr
    log.set_attrs("final", accuracy=0.5, task="sst2")
    log.close()
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert json.loads(f.attrs["config_json"])["fed"]["rounds"] == 3
        assert f.attrs["method"] == "fedsoda" and f.attrs["world_size"] == 3 and f.attrs["n_clients"] == 10
        assert json.loads(f.attrs["versions_json"]) == versions() and f.attrs["git_commit"]
        assert np.array_equal(f["sgp/distance"][:], dist, equal_nan=True)
        assert f["rounds/round"][:].tolist() == [1, 2, 3] and f["rounds/train_loss"].shape == (3, 2)
        assert f["rounds/wall_s"].dtype == np.float64 and f["drift/distance"].shape == (3, 2)
        assert f["final"].attrs["accuracy"] == 0.5
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("method: fedsoda")


def _hold_lock(run_dir):
    """A separate process that takes the run folder's lock and sleeps (as a running job would)."""
    code = ("import sys, time; from pathlib import Path; from fedsoda_mpi.runlog import lock_run_dir; "
            "lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_run_folder_is_locked_by_one_process_and_freed_when_it_dies(tmp_path):
    """Two jobs never write one run folder; the lock names its holder and dies with it (even on SIGKILL)."""
    import os
    import socket

    import pytest

    from fedsoda_mpi.runlog import RunFolderBusy, lock_run_dir

    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        with pytest.raises(RunFolderBusy) as e:
            lock_run_dir(run_dir)
        msg = str(e.value)
        assert f"{run_dir} is in use by another job (host {socket.gethostname()}, pid {holder.pid}, since " in msg
        assert msg.endswith("wait for it to end, stop it, or choose another output.dir") and "\n" not in msg
    finally:
        holder.kill()
        holder.wait()
    assert lock_run_dir(run_dir)  # the kernel released the killed holder's lock: no stale lock
    assert (run_dir / ".lock").read_text().startswith(f"host {socket.gethostname()}, pid {os.getpid()}")


def test_default_run_folders_of_two_runs_started_in_the_same_second_differ(tmp_path):
    """No output.name, no Slurm job id: the run folder is <job>-<method>-<start time>-<pid of rank 0>, so two runs
    started in the same second get two folders instead of the second being refused by the first one's lock."""
    code = ("import time; from fedsoda_mpi.config import load_config; from fedsoda_mpi.runlog import run_dir_of; "
            "time.sleep(1 - time.time() % 1); cfg = load_config('jobs/smollm2_sst2_iid.yaml', []); "
            "print(run_dir_of(cfg).name, run_dir_of(cfg).name)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    names = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(a == b for a, b in names)  # one process, one name
    assert names[0][0] != names[1][0]
    for (name, _), p in zip(names, procs):
        assert re.fullmatch(rf"smollm2_sst2_iid-fedsoda-\d{{8}}-\d{{6}}-{p.pid}", name), name


def test_a_line_after_close_goes_to_stderr(tmp_path, capsys):
    """A client rank that finished its run has closed its log; a SIGTERM then (mpirun ending the job after rank 0
    stopped) logs its line to stderr instead of failing with 'I/O operation on closed file'."""
    log = RunLog(tmp_path / "run", rank=2, echo=False)
    log.log("first")
    log.close()
    log.log("stopping on SIGTERM in round 3")
    assert "stopping on SIGTERM in round 3" in capsys.readouterr().err
    assert "first" in (tmp_path / "run" / "log.rank2.txt").read_text()
