"""resume=auto of a run with a preset key overridden, and the finished run folders it must never overwrite (real mpirun
on the tiny model folder). Apart from tests/test_resume.py so that pytest-xdist (--dist loadfile) runs it beside it."""
import json
import re
import shutil
from pathlib import Path

import h5py
import pytest

from tests.conftest import mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


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
