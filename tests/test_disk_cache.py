"""The emulator cache's disk tier under real mpirun (issue #17), on the tiny SmolLM2-shaped model folder.

6 virtual clients, 2 sampled per round, on 2 client ranks (one client per rank and round), 6 rounds, re-alignment
in round 4. The seeded schedule (seed 0) places: round 1 clients 2 | 5 (rank 1 | rank 2), round 2 0 | 4, round 3
2 | 5 (both back on the rank they left: warm restarts from disk), round 4 2 | 5 (re-aligned: every cache is
stale), round 5 2 | 3, round 6 2 | 5 (5 back on rank 2: from disk, a file of the new emulator version).

A run with the disk tier gives the same /rounds losses and final adapter, bit for bit, as a run without it
(fed.cache_max_gb=0, every returning client refilled by the emulator), and each rank's cache folder is gone
after the run, after a SIGUSR1 stop and after a SIGTERM."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.torch import load_file

from tests.conftest import MPI_ENV, ROOT, mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

ARGS = ["-m", "fedsoda_mpi.main", "fed.rounds=6", "fed.clients=6", "fed.clients_per_round=2", "oda.every=4",
        "eval.every=0", "data.public_samples=8", "oda.re_samples=8", "data.max_train_per_client=16",
        "eval.max_examples=16", "data.val_size=16", "fed.local_steps=2"]


def _run(args: list[str], run_dir: Path, *extra: str) -> dict:
    p = mpirun(3, [*args, f"output.dir={run_dir}", *extra], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.leftover_tmp == []  # nothing of the run left in TMPDIR
    with h5py.File(run_dir / "run.h5", "r") as f:
        rec = {k: f[f"rounds/{k}"][:] for k in ("round", "train_loss", "n_samples", "realigned")}
        rec.update({k: f[f"timing/cache_{k}"][:][:, 1:] for k in ("ram_rows", "disk_rows", "emulator_rows",
                                                                    "disk_peak_mb")})
    rec["adapter"] = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    rec["log"] = (run_dir / "log.rank2.txt").read_text()
    return rec


@pytest.fixture(scope="module")
def args(tiny_model_dir) -> list[str]:
    return [*ARGS, f"model.name={tiny_model_dir}"]


def test_disk_tier_gives_warm_restarts_and_the_same_results(args, tmp_path):
    cache_dir = tmp_path / "scratch"
    without = _run(args, tmp_path / "ram", "fed.cache_max_gb=0", f"fed.cache_dir={cache_dir}")
    with_disk = _run(args, tmp_path / "disk", "fed.cache_max_gb=1", f"fed.cache_dir={cache_dir}")
    assert list(cache_dir.iterdir()) == []  # each client rank removed its own folder

    assert with_disk["round"].tolist() == [1, 2, 3, 4, 5, 6] and with_disk["realigned"].tolist() == [0, 0, 0, 1, 0, 0]
    for k in ("train_loss", "n_samples"):
        assert np.array_equal(with_disk[k], without[k], equal_nan=True), (k, with_disk[k], without[k])
    assert with_disk["adapter"].keys() == without["adapter"].keys()
    for k in with_disk["adapter"]:
        assert np.array_equal(with_disk["adapter"][k].numpy(), without["adapter"][k].numpy()), k  # bit for bit

    # rows per round and client rank (16 examples per client): what the schedule in the docstring predicts
    assert with_disk["disk_rows"].sum(1).tolist() == [0, 0, 32, 0, 0, 16]
    assert with_disk["emulator_rows"].sum(1).tolist() == [32, 32, 0, 32, 16, 0]
    assert with_disk["ram_rows"].sum(1).tolist() == [0, 0, 0, 0, 16, 16]
    assert without["disk_rows"].sum() == 0 and without["emulator_rows"].sum(1).tolist() == [32, 32, 32, 32, 16, 16]
    assert (with_disk["disk_peak_mb"][-1] > 0).all() and (without["disk_peak_mb"] == 0).all()
    assert "end of the run: emulator cache: " in with_disk["log"] and "16 from disk" in with_disk["log"]
    assert "no disk tier" in without["log"]


def _cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("fedsoda-cache-*/*.safetensors"))


@pytest.mark.parametrize("sig", ["SIGUSR1", "SIGTERM"])
def test_cache_folders_are_removed_on_a_stop(sig, args, tmp_path):
    """Stopped while the disk tier holds files (after round 2: each client rank wrote the client that left it):
    SIGUSR1 (finish the round, checkpoint, exit 75) and SIGTERM (abandon the round) leave no cache folder. A rank
    that cannot act on SIGTERM within mpirun's ~1 s grace (busy in C code on the loaded cores) is SIGKILLed: its
    folder is what `sweep_stale_caches` removes at the next start on the node."""
    from fedsoda_mpi.emulator_cache import sweep_stale_caches
    from fedsoda_mpi.reaper import process_alive

    run_dir, cache_dir = tmp_path / "run", tmp_path / "scratch"
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", "3", sys.executable, "-m", "mpi4py", *args,
           f"output.dir={run_dir}", f"fed.cache_dir={cache_dir}", "fed.cache_max_gb=1", "fed.rounds=12"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **MPI_ENV}, start_new_session=True)
    deadline = time.time() + 900
    while not (_cache_files(cache_dir) and (run_dir / "checkpoints" / "round00002").exists()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    assert len({p.parent for p in _cache_files(cache_dir)}) == 2  # both client ranks hold a file
    proc.send_signal(getattr(signal, sig))
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, out[-3000:]
    expected = "stopped: emulator cache" if sig == "SIGUSR1" else "stopping on SIGTERM"
    handled = [rank for rank in (1, 2) if expected in (run_dir / f"log.rank{rank}.txt").read_text()]
    left = sorted(p.name for p in cache_dir.iterdir())
    if sig == "SIGUSR1" or handled == [1, 2]:
        assert handled == [1, 2] and left == [], (handled, left, out[-3000:])
    else:  # a folder is left only by a rank that did not log the stop (SIGKILLed: its unwinding may or may not have
        # removed the folder before the kill), and the next start sweeps it
        assert len(left) <= 2 - len(handled) and not any(name.endswith(f"-rank{r}") for r in handled for name in left)
        pids = [int(name.split("-")[2]) for name in left]
        deadline = time.time() + 30  # a SIGKILLed rank may take a moment to die (a zombie counts as gone)
        while any(process_alive(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert sweep_stale_caches(cache_dir) == left and list(cache_dir.iterdir()) == []
