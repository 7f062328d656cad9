"""Single-rank faults on a 3-rank mpirun run of the tiny model: exit code, seconds to exit, message, leftovers, and
whether `resume=auto` then finishes the run (docs/reliability.md, "One rank alone: signals and stops").

    python bench/single_rank_faults.py stop2:2:SIGSTOP:rounds kill0:0:SIGKILL:rounds kill1:1:SIGKILL:rounds \\
        hup0:0:SIGHUP:rounds int0:0:SIGINT:final_evaluation term1:1:SIGTERM:rounds

Each argument is NAME:RANK:SIGNAL:PHASE (rounds: after round 1's checkpoint; final_evaluation: once the final
evaluation logged its first line). The signal goes to the rank's pid, read from <run>/.heartbeat/rank<R>. Run
folders go to /tmp/faults/NAME.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsoda_mpi.reaper import session_pids  # noqa: E402
from fedsoda_mpi.tiny import build_model  # noqa: E402

OUT = Path("/tmp/faults")
MODEL = OUT / "tiny-llama"
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMPI_MCA_mpi_yield_when_idle": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
       "OMP_NUM_THREADS": "1", "HDF5_USE_FILE_LOCKING": "FALSE", "PYTHONUNBUFFERED": "1"}
SHOWN = r"fedsoda-mpi:|FATAL|stopping on|prterun|mpirun noticed|terminated|signal"


def command(run: Path, phase: str) -> list[str]:
    """mpirun -n 3 of the tiny model's run: 3 rounds, 2 clients, a 6 s stall timeout (a long final evaluation for
    the final_evaluation phase)."""
    return [str(ROOT / ".venv/bin/mpirun"), "-n", "3", sys.executable, "-m", "mpi4py", "-m", "fedsoda_mpi.main",
            f"model.name={MODEL}", "fed.rounds=3", "fed.clients=2", "fed.local_steps=2", "eval.every=0",
            "data.public_samples=8", "data.max_train_per_client=8", "data.val_size=8", "oda.re_align=false",
            "fed.stall_timeout=6", f"output.dir={run}",
            "eval.max_examples=400" if phase == "final evaluation" else "eval.max_examples=8"]


def wait_for_phase(proc: subprocess.Popen, run: Path, phase: str) -> None:
    """Until the final evaluation's first progress line, or round 1's checkpoint (or the run ended)."""
    def reached() -> bool:
        if phase == "final evaluation":
            log = run / "log.txt"
            return log.exists() and "eval full: " in log.read_text()
        return (run / "checkpoints" / "round00001").exists()

    while not reached() and proc.poll() is None:
        time.sleep(0.05)


def scenario(name: str, rank: int, sig: signal.Signals, phase: str) -> None:
    """One fault: start the run, signal the rank, time mpirun's end, list what is left, resume; print a summary."""
    run, tmp = OUT / name / "run", OUT / name / "tmp"
    subprocess.run(["rm", "-rf", str(run.parent)], check=True)
    tmp.mkdir(parents=True)
    env = {**ENV, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(command(run, phase), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    wait_for_phase(proc, run, phase)
    os.kill(int((run / ".heartbeat" / f"rank{rank}").read_text().split()[1]), sig)
    t0 = time.time()
    try:
        out = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0] + "\n<<TIMEOUT 300 s>>"
    took = time.time() - t0
    time.sleep(2)
    beats = sorted(p.name for p in (run / ".heartbeat").iterdir()) if (run / ".heartbeat").exists() else []
    left = (len(session_pids(proc.pid)), sorted(p.name for p in tmp.iterdir()), beats)
    res = subprocess.run(command(run, phase) + ["resume=auto"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=900)
    print(f"== {name}: {sig.name} to rank {rank} ({phase}): exit {proc.returncode}, {took:.1f} s, processes left "
          f"{left[0]}, TMPDIR left {left[1]}, heartbeat files left {left[2]}; resume=auto exit {res.returncode} "
          f"({'resumed from' in res.stdout})")
    for line in [x for x in out.splitlines() if re.search(SHOWN, x)][:8]:
        print("   ", line[:400])
    sys.stdout.flush()


def main(specs: list[str]) -> None:
    if not specs or any(len(spec.split(":")) != 4 for spec in specs):
        sys.exit(__doc__)
    if not MODEL.exists():
        build_model(MODEL, "llama")
    for spec in specs:
        name, rank, sig, phase = spec.split(":")
        scenario(name, int(rank), signal.Signals[sig], phase.replace("_", " "))


if __name__ == "__main__":
    main(sys.argv[1:])
