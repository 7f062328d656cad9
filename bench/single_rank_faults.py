"""Single-rank faults on a 3-rank mpirun run of the tiny model: exit code, seconds to exit, message, leftovers, and
whether `resume=auto` then finishes the run (docs/reliability.md, "One rank alone: signals and stops").

    python bench/single_rank_faults.py stop2:2:SIGSTOP:rounds kill0:0:SIGKILL:rounds kill1:1:SIGKILL:rounds \
        hup0:0:SIGHUP:rounds int0:0:SIGINT:final_evaluation term1:1:SIGTERM:rounds

Each argument is NAME:RANK:SIGNAL:PHASE (rounds: after round 1's checkpoint; final_evaluation: once the final
evaluation logged its first line). Run folders go to /tmp/faults/NAME.
"""
import os, re, signal, subprocess, sys, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fedsoda_mpi.tiny import build_model
from fedsoda_mpi.reaper import process_alive
MODEL = Path("/tmp/faults/tiny-llama")
if not MODEL.exists():
    build_model(MODEL, "llama")
PY = str(ROOT / ".venv/bin/python")
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
       "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe", "OMP_NUM_THREADS": "1", "HDF5_USE_FILE_LOCKING": "FALSE",
       "PYTHONUNBUFFERED": "1"}

def session_pids(sid):
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getsid(int(p.name)) == sid and process_alive(int(p.name)):
                    out.append(int(p.name))
            except (ProcessLookupError, PermissionError):
                pass
    return out

def scenario(name, rank, sig, phase):
    run, tmp = Path(f"/tmp/faults/{name}/run"), Path(f"/tmp/faults/{name}/tmp")
    subprocess.run(["rm", "-rf", str(run.parent)])
    tmp.mkdir(parents=True)
    args = ["-m", "fedsoda_mpi.main", f"model.name={MODEL}", "fed.rounds=3", "fed.clients=2", "fed.local_steps=2",
            "eval.every=0", "data.public_samples=8", "data.max_train_per_client=8", "data.val_size=8",
            "oda.re_align=false", "fed.stall_timeout=6", f"output.dir={run}",
            "eval.max_examples=400" if phase == "final evaluation" else "eval.max_examples=8"]
    cmd = [str(ROOT / ".venv/bin/mpirun"), "-n", "3", PY, "-m", "mpi4py", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**ENV, "TMPDIR": str(tmp)}, start_new_session=True)
    if phase == "final evaluation":
        while "eval full: " not in ((run / "log.txt").read_text() if (run / "log.txt").exists() else ""):
            time.sleep(0.05)
            if proc.poll() is not None: break
        # wait until the evaluation is actually running
        time.sleep(0.2)
    else:
        while not (run / "checkpoints" / "round00001").exists():
            time.sleep(0.05)
            if proc.poll() is not None: break
    pid = int((run / ".heartbeat" / f"rank{rank}").read_text().split()[1])
    os.kill(pid, sig)
    t0 = time.time()
    try:
        out = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL); out = proc.communicate()[0] + "\n<<TIMEOUT 300 s>>"
    took = time.time() - t0
    time.sleep(2)
    left_procs = session_pids(proc.pid)
    left_tmp = sorted(p.name for p in tmp.iterdir())
    left_hb = sorted(p.name for p in (run / ".heartbeat").iterdir()) if (run / ".heartbeat").exists() else []
    lines = [l for l in out.splitlines() if re.search(r"fedsoda-mpi:|FATAL|stopping on|prterun|mpirun noticed|terminated|signal", l)]
    res = subprocess.run(cmd + ["resume=auto"], capture_output=True, text=True, cwd=ROOT, env={**ENV, "TMPDIR": str(tmp)}, timeout=900)
    print(f"== {name}: signal {sig.name} to rank {rank} ({phase}): exit {proc.returncode}, {took:.1f} s, "
          f"processes left {len(left_procs)}, TMPDIR left {left_tmp}, heartbeat files left {left_hb}; "
          f"resume=auto exit {res.returncode} ({'resumed from' in res.stdout})")
    for l in lines[:8]:
        print("   ", l[:400])
    sys.stdout.flush()

S = {"SIGSTOP": signal.SIGSTOP, "SIGKILL": signal.SIGKILL, "SIGHUP": signal.SIGHUP, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
for spec in sys.argv[1:]:
    name, rank, sig, phase = spec.split(":")
    scenario(name, int(rank), S[sig], phase.replace("_", " "))
