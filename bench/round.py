"""Rounds of the default job for each method under real mpirun; per-phase time on every rank from `/timing`.

    python bench/round.py                                   # 4 methods, 3 ranks, 3 rounds, 16 examples/client
    python bench/round.py --np 11 --methods fedsoda         # the MPI share at 11 ranks
    python bench/round.py --np 11 --methods fedsoda --tag c100 fed.clients=100 fed.clients_per_round=10
    python bench/round.py --np 11 --methods fedsoda --tag c100-nodisk fed.clients=100 fed.clients_per_round=10 \
        fed.cache_max_gb=0                                  # the same without the emulator cache's disk tier
    python bench/round.py --rounds 5 -- eval.every=0        # extra key=value overrides go to every run

Each method runs in `runs/bench/<tag>-<method>/` (one after the other, never concurrently); the tables
come from `analysis/timing.py` (steady state: rounds 2..R), followed by each method's ratios to
FedPETuning (client seconds per local step, client peak RSS) when FedPETuning is among the methods, and
what the emulator cache did (rows from memory / from its disk tier / computed, the disk tier's peak per
client rank; `fed.cache_max_gb=0` runs without the disk tier).
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "analysis"))

from common import open_run  # noqa: E402
from timing import cache_table, phase_table, ratio_table, summary  # noqa: E402

# the default job, made short: fewer local examples, a small evaluation, a smaller public set for SGP/ODA
QUICK = ["data.max_train_per_client=16", "eval.max_examples=50", "eval.every=0", "data.public_samples=16"]
MPIENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
          "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "OMP_NUM_THREADS": "1",
          "HDF5_USE_FILE_LOCKING": "FALSE", "FEDSODA_PROGRESS": "0"}


def run_method(method: str, np_: int, rounds: int, out: Path, overrides: list[str]) -> Path:
    """One mpirun of the job; returns its run.h5. A failed run stops the benchmark with its log's tail."""
    if out.exists():
        shutil.rmtree(out)
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
    cmd = [mpirun, "-n", str(np_), sys.executable, "-m", "mpi4py", "-m", "fedsoda_mpi.main", f"method={method}",
           f"fed.rounds={rounds}", f"output.dir={out}", *QUICK, *overrides]
    t0 = time.time()
    print(f"[bench] {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **MPIENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"[bench] {method} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(f"[bench] {method}: {time.time() - t0:.0f}s", flush=True)
    return out / "run.h5"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--np", type=int, default=3)
    ap.add_argument("--methods", default="fedpetuning,fedsoda,fedot,fedbiot")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default=None, help="run folder prefix (default: np<N>)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args()
    tag = args.tag or f"np{args.np}"
    files = [run_method(m, args.np, args.rounds, ROOT / "runs" / "bench" / f"{tag}-{m}", args.overrides)
             for m in args.methods.split(",")]
    rows = []
    for path in files:
        with open_run(path) as f:
            rows.append(summary(f))
    print(f"\n{args.np} ranks, rounds 2..{args.rounds} (steady state), overrides: {' '.join(QUICK + args.overrides)}")
    print(phase_table(rows))
    print()
    print(ratio_table(rows))
    cache = cache_table(rows)
    if cache:
        print("\nemulator cache (client ranks, rounds 2..R; disk peak over the whole run)")
        print(cache)
    ref = next((s for s in rows if s["method"] == "fedpetuning"), None)
    if ref is not None:
        print("\n| method | client s/step / FedPETuning's | client peak RSS / FedPETuning's |\n|---|---:|---:|")
        for s in rows:
            print(f"| {s['method']} | {s['client_s_per_step'] / ref['client_s_per_step']:.3f} | "
                  f"{s['client_rss_mb'] / ref['client_rss_mb']:.3f} |")
    setup = [s for s in rows if "sgp_s" in s["setup"]]
    if setup:
        print("\none-time server phases (s): " + "; ".join(
            f"{s['method']}: " + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in s["setup"].items()) for s in setup))


if __name__ == "__main__":
    main()
