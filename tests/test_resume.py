"""Resume after an interruption reproduces the uninterrupted run bit for bit (real mpirun; the tiny SmolLM2-shaped
model folder `tiny_model_dir`: bit-identity and signal handling are wiring, not model quality). The guarantee holds
on the CPU, where these tests run; on a GPU a resumed run is bit-identical only with debug.deterministic=true
(nondeterministic CUDA kernels otherwise: docs/design.md, "Devices").

Interruptions: SIGKILL of the whole mpirun process tree mid-run, and the SIGUSR1 stop request
(what Slurm's `--signal=B:USR1@...` sends; slurm/common.sh forwards it to the MPI step)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.torch import load_file

from fedsoda_mpi import data
from fedsoda_mpi.evaluate import gsm8k_correct
from fedsoda_mpi.reaper import session_pids
from tests.conftest import MPI_ENV, ROOT, mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

ARGS = ["-m", "fedsoda_mpi.main", "fed.rounds=3", "fed.clients=4", "fed.clients_per_round=3", "oda.every=2",
        "eval.every=1", "data.public_samples=8", "oda.re_samples=8", "data.max_train_per_client=16",
        "eval.max_examples=16", "data.val_size=16", "fed.local_steps=2", "lora.dropout=0.1"]


@pytest.fixture(scope="module")
def args(tiny_model_dir) -> list[str]:
    return [*ARGS, f"model.name={tiny_model_dir}"]


def _start(args: list[str], run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", "3", sys.executable, "-m", "mpi4py", *args,
           f"output.dir={run_dir}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **MPI_ENV}, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _record(run_dir: Path) -> dict:
    with h5py.File(run_dir / "run.h5", "r") as f:
        rec = {k: f[f"rounds/{k}"][:] for k in ("round", "train_loss", "n_samples", "eval_acc", "realigned",
                                                 "upload_bytes", "drift_probe", "drift_ref")}
        rec.update({f"re_{k}": f[f"oda/re/{k}"][:] for k in ("round", "loss")})
        rec["drift"] = f["drift/distance"][:]
        rec["final"] = {k: f["final"].attrs[k] for k in ("accuracy", "sub_accuracy", "base_accuracy")}
    rec["adapter"] = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    return rec


def _assert_same(a: dict, b: dict) -> None:
    assert a["round"].tolist() == b["round"].tolist() == [1, 2, 3]  # no duplicated rows after the resume
    for k in ("train_loss", "n_samples", "eval_acc", "realigned", "upload_bytes", "re_round", "re_loss", "drift",
              "drift_probe", "drift_ref"):
        assert np.array_equal(a[k], b[k], equal_nan=True), (k, a[k], b[k])
    assert a["final"] == b["final"]
    assert a["adapter"].keys() == b["adapter"].keys()
    for k in a["adapter"]:
        assert np.array_equal(a["adapter"][k].numpy(), b["adapter"][k].numpy()), k  # bit for bit


@pytest.fixture(scope="module")
def reference(args, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    p = mpirun(3, args + [f"output.dir={run_dir}"], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return _record(run_dir)


def test_sigkill_mid_run_then_resume_is_bit_exact(reference, args, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(args, run_dir)
    _wait_for(run_dir / "checkpoints" / "round00002", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # mpirun and every rank, mid round 3
    proc.wait()
    deadline = time.time() + 10
    while session_pids(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not session_pids(proc.pid)
    with h5py.File(run_dir / "run.h5", "r") as f:  # the run file survives SIGKILL with every completed round
        done = f["rounds/round"][:].tolist()
    assert done in ([1, 2], [1, 2, 3]) and "final" not in h5py.File(run_dir / "run.h5", "r")

    p = mpirun(3, args + [f"output.dir={run_dir}", "resume=auto"], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from" in p.stdout and "(round 2 of 3)" in p.stdout
    _assert_same(reference, _record(run_dir))
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f.attrs["resumed_from"].tolist() == [2]


# oda.trigger=drift: the decision of the first resumed round reads the trigger's state (the last probe, the value after
# the last alignment, that alignment's round) back from the checkpoint's run file; max_interval=3 re-aligns round 3 at
# the latest (so /oda/re exists), rounds 2 and 3 may re-align on the probe
DRIFT = ["oda.trigger=drift", "oda.drift_threshold=1.05", "oda.max_interval=3", "fed.lr=1e-2"]


@pytest.fixture(scope="module")
def drift_reference(args, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref-drift") / "run"
    p = mpirun(3, args + DRIFT + [f"output.dir={run_dir}"], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return _record(run_dir)


def test_drift_trigger_sigkill_then_resume_is_bit_exact(drift_reference, args, tmp_path):
    assert np.isfinite(drift_reference["drift_probe"]).all() and drift_reference["realigned"].any()
    run_dir = tmp_path / "run"
    proc = _start(args, run_dir, *DRIFT)
    _wait_for(run_dir / "checkpoints" / "round00001", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    p = mpirun(3, args + DRIFT + [f"output.dir={run_dir}", "resume=auto"], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "(round 1 of 3)" in p.stdout or "(round 2 of 3)" in p.stdout, p.stdout[-3000:]
    _assert_same(drift_reference, _record(run_dir))


def test_sigusr1_stops_cleanly_then_resume_is_bit_exact(reference, args, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(args, run_dir)
    _wait_for(run_dir / "checkpoints" / "round00001", proc)
    proc.send_signal(signal.SIGUSR1)  # to mpirun, which forwards it to every rank
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode != 0, out[-3000:]  # stopped early is not success
    assert "on SIGUSR1: checkpoint" in out and "run the same command with resume=auto" in out, out[-3000:]
    stopped_at = int(out.split("stopping after round ")[1].split()[0])
    assert stopped_at in (1, 2) and not (run_dir / "adapter").exists()

    p = mpirun(3, args + [f"output.dir={run_dir}", "resume=auto"], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"(round {stopped_at} of 3)" in p.stdout
    _assert_same(reference, _record(run_dir))



@pytest.mark.parametrize("moment", ["after the shipment", "mid-run"])
def test_sigterm_stops_every_rank_with_a_line_and_leaves_no_temporary_files(request, args, tmp_path, moment):
    """SIGTERM to mpirun (what `kill`, scancel and a time limit send): every rank logs one line naming the
    signal, abandons the round, removes its temporary files and exits; the checkpoint of the last finished
    round is intact and resume=auto finishes the run exactly like an uninterrupted one."""
    run_dir, tmp = tmp_path / "run", tmp_path / "tmp"
    tmp.mkdir()
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", "3", sys.executable, "-m", "mpi4py", *args,
           f"output.dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, **MPI_ENV, "TMPDIR": str(tmp)}, start_new_session=True)
    if moment == "after the shipment":  # while a client loads its on-disk copy of the sub-LLM (the observed leak)
        deadline = time.time() + 900
        while not list(tmp.glob("fedsoda-client*")):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.005)  # the tiny model's copy exists for a fraction of a second
    else:
        _wait_for(run_dir / "checkpoints" / "round00001", proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and time.time() - t0 < 30, out[-3000:]
    assert "stopping on SIGTERM" in (run_dir / "log.txt").read_text()
    logged = [name for name in ("log.rank1.txt", "log.rank2.txt")
              if "stopping on SIGTERM" in (run_dir / name).read_text()]
    left = sorted(p.name for p in tmp.glob("fedsoda*"))
    if moment == "mid-run" or len(logged) == 2:  # every rank handled the signal: nothing of theirs is left
        assert logged == ["log.rank1.txt", "log.rank2.txt"] and not left, (logged, left)
    else:  # a client rank busy in C code (loading weights) outlived mpirun's ~1 s grace and was SIGKILLed: its
        # reaper (reaper.reap_when_gone) removes its copy once it is gone (a zombie counts as gone)
        deadline = time.time() + 30
        while list(tmp.glob("fedsoda*")) and time.time() < deadline:
            time.sleep(0.1)
        assert not list(tmp.glob("fedsoda*")), (left, sorted(p.name for p in tmp.glob("fedsoda*")))
    if moment == "mid-run":
        p = mpirun(3, args + [f"output.dir={run_dir}", "resume=auto"], timeout=1200)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        _assert_same(request.getfixturevalue("reference"), _record(run_dir))


# GSM8K: the base and final evaluations generate for hours on the real model; SIGUSR1 during one stops between two
# batches, the batches done stay in run_dir/eval/<base|full|sub>.jsonl and resume=auto generates only the others
GSM8K = ["data.task=gsm8k", "fed.rounds=2", "eval.every=0", "eval.k_shot=1", "eval.max_examples=12",
         "eval.batch_size=1", "eval.max_new_tokens=12", "data.max_len=128"]


def _outputs(run_dir: Path) -> dict:
    """Every journaled batch's outputs by question, per evaluation (the fingerprint line left out)."""
    import json

    kept = {}
    for path in sorted((run_dir / "eval").glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()[1:]]
        kept[path.stem] = {i: o for line in lines for i, o in zip(line["rows"], line["outputs"])}
    return kept


def _stop_when(args: list[str], run_dir: Path, journal: str) -> tuple[str, dict]:
    """Start (or resume) the run, send SIGUSR1 once eval/<journal>.jsonl exists; (rank 0's output, the journals)."""
    proc = _start(args, run_dir, "resume=auto")
    _wait_for(run_dir / "eval" / f"{journal}.jsonl", proc)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 75, out[-3000:]  # every rank exits with STOPPED_EXIT, as after a round
    return out, _outputs(run_dir)


def test_sigusr1_in_the_gsm8k_evaluations_then_resume_generates_only_the_rest(args, tmp_path):
    ref_dir, run_dir, run = tmp_path / "ref", tmp_path / "run", args + GSM8K
    p = mpirun(3, run + ["eval.base=false", f"output.dir={ref_dir}"], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "eval full: 12/12 questions" in p.stdout and "eval sub: 12/12 questions" in p.stdout
    reference = _outputs(ref_dir)
    assert sorted(reference) == ["full", "sub"] and all(len(v) == 12 for v in reference.values())

    out, kept = _stop_when(run, run_dir, "base")  # in the base model's evaluation, before round 1
    assert "before round 1: eval base stopped at" in out and "resume=auto" in out, out[-3000:]
    assert sorted(kept) == ["base"] and 0 < len(kept["base"]) < 12 and not (run_dir / "checkpoints").exists()
    n_base = len(kept["base"])
    out, kept = _stop_when(run, run_dir, "full")  # in the final evaluation
    assert f"eval base: {n_base} of 12 questions taken from its journal" in out, out[-3000:]
    assert "in the final evaluation: eval full stopped at" in out, out[-3000:]
    assert len(kept["base"]) == 12 and 0 < len(kept["full"]) < 12 and "sub" not in kept, kept
    assert not (run_dir / "adapter").exists()

    p = mpirun(3, run + [f"output.dir={run_dir}", "resume=auto"], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"eval full: {len(kept['full'])} of 12 questions taken from its journal" in p.stdout, p.stdout[-3000:]
    final = _outputs(run_dir)
    assert final["base"] == kept["base"] and {k: final[k] for k in ("full", "sub")} == reference
    with h5py.File(ref_dir / "run.h5", "r") as a, h5py.File(run_dir / "run.h5", "r") as b:
        for k in ("accuracy", "sub_accuracy", "n_eval"):
            assert a["final"].attrs[k] == b["final"].attrs[k], k
        for k, acc in (("correct", "accuracy"), ("sub_correct", "sub_accuracy")):  # which questions, per model
            assert a["final"].attrs[k].tolist() == b["final"].attrs[k].tolist() and len(b["final"].attrs[k]) == 12
            assert b["final"].attrs[k].mean() == b["final"].attrs[acc]
        assert b["final"].attrs["eval_s"] > 0
        assert b["base"].attrs["n"] == 12 and b.attrs["resumed_from"].tolist() == [2]
        # the base model's journaled answers, scored as the evaluation scores them
        right = gsm8k_correct([final["base"][i] for i in range(12)], data.load_rows("gsm8k", "test")[:12]).tolist()
        assert b["base"].attrs["correct"].tolist() == right
        assert b["base"].attrs["correct"].mean() == b["base"].attrs["accuracy"]


def _sha(path: Path) -> str:
    from fedsoda_mpi.paths import sha256_of

    return sha256_of(path)


def _refused(p, message: str) -> None:
    """Exit code 2, the one line `message` (a regex) from rank 0, no traceback, nothing left in TMPDIR."""
    lines = [line for line in p.stderr.splitlines() if line.startswith("fedsoda-mpi:")]
    assert p.returncode == 2 and len(lines) == 1, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert re.match(message, lines[0]), lines[0]
    assert "Traceback" not in p.stderr + p.stdout and not p.leftover_tmp


def test_resume_of_a_preset_key_override_and_the_run_folders_it_must_not_overwrite(tiny_model_dir, tmp_path):
    """`method=fedpetuning model.adapter_layers=3` (a key the preset also sets, as the study's fed_last3 does)
    finishes, then the same command with resume=auto fed.rounds=2 continues it (it was refused: "model.adapter_layers
    is 0 in the run"). On that finished run, resume=auto never overwrites it: fed.rounds=1 (fewer than done: it
    logged "round 2 of 1" and rewrote /final), every checkpoint damaged and no checkpoint at all (it started the run
    over in place, exit 0) each stop with one line and leave run.h5 and adapter/ as they were. An unfinished attempt
    without a checkpoint moves to failed-<time>/ and the run starts over."""
    run_dir = tmp_path / "run"
    cmd = ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", "method=fedpetuning", "model.adapter_layers=3",
           "fed.clients=2", "fed.local_steps=1", "data.max_train_per_client=4", "data.val_size=8", "eval.every=1",
           "eval.max_examples=8", "data.public_samples=4", f"output.dir={run_dir}"]
    p = mpirun(3, cmd + ["fed.rounds=1"], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = mpirun(3, cmd + ["fed.rounds=2", "resume=auto"], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "(round 1 of 2)" in p.stdout
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f["rounds/round"][:].tolist() == [1, 2] and f.attrs["resumed_from"].tolist() == [1] and "final" in f
        assert json.loads(f.attrs["config_json"])["model"]["adapter_layers"] == 3
    kept = {p: _sha(p) for p in [run_dir / "run.h5", *sorted((run_dir / "adapter").iterdir())]}

    _refused(mpirun(3, cmd + ["fed.rounds=1", "resume=auto"], timeout=300),
             r"fedsoda-mpi: config error: fed.rounds=1: the run at .* finished after round 2; resume=auto continues a "
             r"run, it cannot shorten it: give fed.rounds >= 2")
    for ck in (run_dir / "checkpoints").iterdir():  # every checkpoint damaged: rank 0 finds it, every rank stops
        (ck / "adapter.safetensors").write_bytes(b"damaged")
    _refused(mpirun(3, cmd + ["fed.rounds=3", "resume=auto"], timeout=300),
             r"fedsoda-mpi: config error: resume=auto: .* holds a finished run of 2 rounds but none of its checkpoints "
             r"is valid, so it cannot be continued, and it is not started over in place")
    shutil.rmtree(run_dir / "checkpoints")  # as fed.checkpoint_every=0 leaves it
    _refused(mpirun(3, cmd + ["fed.rounds=3", "resume=auto"], timeout=300),
             r"fedsoda-mpi: config error: resume=auto: .* holds a finished run of 2 rounds but no checkpoint")
    assert {p: _sha(p) for p in kept} == kept and not list(run_dir.glob("failed-*"))

    with h5py.File(run_dir / "run.h5", "a") as f:  # now an unfinished attempt without a checkpoint
        del f["final"]
    p = mpirun(3, cmd + ["fed.rounds=1", "resume=auto"], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    moved = list(run_dir.glob("failed-*"))
    assert len(moved) == 1 and f"moved its unfinished attempt (no /final) to {moved[0]}" in p.stdout
    assert (moved[0] / "run.h5").exists() and (moved[0] / "adapter").is_dir() and (moved[0] / "log.txt").exists()
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f["rounds/round"][:].tolist() == [1] and "final" in f and "resumed_from" not in f.attrs
