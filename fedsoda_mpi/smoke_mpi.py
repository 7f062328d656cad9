"""The smoke check's MPI step: one real round under mpirun (or srun inside a Slurm job) on the tiny model, its
record in run.h5 read back, every rank on the device the setting asks for."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from .smoke_steps import TRAIN, Devices, Outcome, SmokeFailure, check

MPI_STEP = "mpi-round"
MPI_RANKS = 3
MPI_RUN = ["fed.rounds=1", "oda.re_align=false", "eval.base=false"]


def launcher(kind: str, n: int) -> list[str]:
    """The MPI launch prefix, as slurm/common.sh's fedsoda_step builds it: srun (the job's allocation, PMIx) or
    the mpirun next to this Python (its MPI is the one mpi4py loads; --bind-to none inside a Slurm job);
    auto = srun inside a Slurm job with at least n tasks, else mpirun."""
    if kind == "auto":
        kind = "srun" if int(os.environ.get("SLURM_NTASKS", "0") or 0) >= n and shutil.which("srun") else "mpirun"
    if kind == "srun":
        return ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "-n", str(n)]
    if kind != "mpirun":
        raise SmokeFailure(f"--launcher must be auto, srun or mpirun, got {kind!r}")
    mpirun = Path(sys.executable).parent / "mpirun"
    cmd = [str(mpirun) if mpirun.exists() else "mpirun", "-n", str(n)]
    return cmd + (["--bind-to", "none"] if os.environ.get("SLURM_JOB_ID") else [])


def mpi_env() -> dict:
    """This environment plus what a smoke round wants from Open MPI: idle ranks yield, more ranks than cores
    allowed, no progress bars."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEDSODA_PROGRESS": "0", "HDF5_USE_FILE_LOCKING": "FALSE"}
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    env.setdefault("PMIX_MCA_psec", "native")
    return env


def expected_device(setting: str, devices: Devices) -> str:
    """The device type every rank must report: cpu for --device cpu, cuda for cuda, and for auto what this node
    offers (a Slurm task with --gpus-per-task sees its GPU; mpirun's ranks see the node's)."""
    return "cpu" if setting == "cpu" or devices.server.type == "cpu" else "cuda"


def read_mpi_run(run_h5: Path) -> dict:
    """What the MPI round recorded: rounds, train loss, /final, and per rank its device, host, peak GPU and RSS."""
    import h5py

    with h5py.File(run_h5, "r") as f:
        dev = f["devices"].attrs if "devices" in f else {}
        timing = f["timing"] if "timing" in f else {}
        return {"rounds": f["rounds/round"][:].tolist() if "rounds/round" in f else [],
                "loss": f["rounds/train_loss"][:].tolist() if "rounds/train_loss" in f else [],  # [round][client]
                "final": "final" in f,
                "accuracy": float(f["final"].attrs.get("accuracy", np.nan)) if "final" in f else np.nan,
                "device": [str(d) for d in dev.get("device", [])], "host": [str(h) for h in dev.get("host", [])],
                "peak_gpu_mb": timing["peak_gpu_mb"][-1].tolist() if "peak_gpu_mb" in timing else [],
                "peak_rss_mb": timing["peak_rss_mb"][-1].tolist() if "peak_rss_mb" in timing else []}


def check_mpi_run(got: dict, want: str) -> list[str]:
    """SmokeFailure unless the MPI round's record is complete and every rank ran on `want`; one line per rank."""
    check(got["rounds"] == [1] and got["final"], f"run.h5 holds rounds {got['rounds']}, /final "
          f"{'present' if got['final'] else 'missing'}")
    check(len(got["loss"]) == 1 and np.isfinite(got["loss"][0]).all(), f"train loss per client {got['loss']}")
    check(0 <= got["accuracy"] <= 1, f"final accuracy {got['accuracy']}")
    check(len(got["device"]) == MPI_RANKS, f"/devices lists {len(got['device'])} ranks, expected {MPI_RANKS}")
    wrong = [f"rank {r} on {d}" for r, d in enumerate(got["device"]) if d.split(":")[0] != want]
    check(not wrong, f"{', '.join(wrong)}; expected every rank on {want}")
    lines = []
    for r, d in enumerate(got["device"]):
        host = got["host"][r] if r < len(got["host"]) else "?"
        rss = "" if d == "cpu" else f" (host: {_at(got['peak_rss_mb'], r):.0f} MiB rss)"
        lines.append(f"  rank {r} ({'server' if r == 0 else 'client'}): {d} on {host}, peak {rank_peak(got, r)} MiB "
                     f"{'cuda' if d != 'cpu' else 'rss'}{rss}")
    return lines


def _at(values: list, i: int) -> float:
    return values[i] if i < len(values) else float("nan")


def rank_peak(got: dict, r: int) -> str:
    """Rank r's peak of round 1 in MiB: /timing/peak_gpu_mb on a GPU, /timing/peak_rss_mb on the CPU."""
    return f"{_at(got['peak_gpu_mb'] if got['device'][r] != 'cpu' else got['peak_rss_mb'], r):.0f}"


def step_mpi_round(tiny: Path, devices: Devices, work: Path, launch: str, timeout: float) -> Outcome:
    """One real round under MPI with MPI_RANKS ranks on the tiny model, its ranks' devices and peaks from run.h5."""
    out, prefix = work / "mpi-run", launcher(launch, MPI_RANKS)
    cmd = [*prefix, sys.executable, "-m", "mpi4py", "-m", "fedsoda_mpi.main",
           f"model.name={tiny}", f"device={devices.setting}", *TRAIN, *MPI_RUN, f"output.dir={out}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env())
    except subprocess.TimeoutExpired:
        raise SmokeFailure(f"{' '.join(cmd[:6])} ... did not finish in {timeout:.0f}s") from None
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        said = next((ln for ln in lines if "fedsoda-mpi:" in ln or "Error" in ln), lines[-1] if lines else "")
        (work / "mpi-round.log").write_text(res.stdout + res.stderr)
        raise SmokeFailure(f"exit {res.returncode} of `{' '.join(cmd[:len(prefix) + 5])} ...`: "
                           f"{said.strip()[:300]}")
    check((out / "run.h5").is_file(), f"no run.h5 in {out}")
    got = read_mpi_run(out / "run.h5")
    lines = check_mpi_run(got, expected_device(devices.setting, devices))
    kind = "cuda" if got["device"][0] != "cpu" else "rss"
    return Outcome(f"{MPI_RANKS} ranks ({Path(prefix[0]).name}) exited 0, "
                   f"round 1 train loss {np.mean(got['loss'][0]):.3f}, final accuracy "
                   f"{got['accuracy']:.3f}, /devices read back",
                   lines, where=",".join(got["device"]),
                   peak=",".join(rank_peak(got, r) for r in range(len(got["device"]))) + f" MiB {kind}")
