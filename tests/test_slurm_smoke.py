"""`sbatch slurm/smoke.sh` on the local one-node Slurm cluster (tests/conftest.py's `cluster`: 11 fake GPUs,
which CPU torch cannot see, so device=auto falls back to the CPU on every rank, as the script intends)."""
import re
import time

import pytest

from fedsoda_mpi import smoke as S
from tests.test_slurm import job_env, job_id, sbatch, wait_done

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_smoke_script_passes_on_the_local_cluster(cluster, tmp_path):
    """3 tasks with --gpus-per-task=1: the in-process steps in the batch shell, the MPI round as an srun step of the
    job's 3 tasks; every step PASSes, every rank reports the CPU (the fake GPUs are invisible to CPU torch), and
    the job completes with exit 0."""
    out = tmp_path / "smoke.out"
    t0 = time.time()
    res = sbatch(["--wait", "--parsable", "-o", str(out), "slurm/smoke.sh"],
                 job_env(tmp_path, SMOKE_ARGS="--model tiny"), timeout=900)
    text = out.read_text() if out.exists() else res.stderr
    assert res.returncode == 0, text[-4000:]
    assert wait_done(job_id(res), timeout=60) == ("COMPLETED", "0:0"), text[-4000:]
    passed = re.findall(r"^PASS (\S+) \S+s (\S+) peak ", text, flags=re.M)
    assert [p[0] for p in passed] == [f"tiny/{s}" for s in (*S.STEPS, S.MPI_STEP)], text[-4000:]
    assert passed[-1][1] == "cpu,cpu,cpu", text[-4000:]
    assert "PASS tiny/mpi-round" in text and "3 ranks (srun) exited 0" in text, text[-4000:]
    assert len(re.findall(r"^  rank \d \((server|client)\): cpu on ", text, flags=re.M)) == 3, text[-4000:]
    assert re.search(r"^smoke: all 7 steps passed in \d+s$", text, flags=re.M), text[-4000:]
    print(f"sbatch slurm/smoke.sh (tiny model, CPU fallback): {time.time() - t0:.0f} s")
