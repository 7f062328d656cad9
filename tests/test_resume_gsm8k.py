"""SIGUSR1 during a GSM8K evaluation stops between two generation batches; resume=auto generates only the rest (real
mpirun on the tiny SmolLM2-shaped model folder `tiny_model_dir`). The bit-exact resume tests are in
tests/test_resume.py; this file is apart so that pytest-xdist (--dist loadfile) runs it beside them."""
import signal
from pathlib import Path

import h5py
import pytest

from fedsoda_mpi import data
from fedsoda_mpi.evaluate import gsm8k_correct
from tests.conftest import mpirun
from tests.test_resume import ARGS, _start, _wait_for

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


@pytest.fixture(scope="module")
def args(tiny_model_dir) -> list[str]:
    return [*ARGS, f"model.name={tiny_model_dir}"]


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
