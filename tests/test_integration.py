"""End to end under real mpirun on the real SmolLM2 model and real data (marked mpi + real + slow).

    pytest -m "mpi and real" tests/test_integration.py
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import MPI_ENV, ROOT, mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.real, pytest.mark.slow]

SMALL = ["data.public_samples=8", "data.max_train_per_client=32", "eval.max_examples=16", "fed.local_steps=2"]


@pytest.fixture(scope="module")
def e2e_run(smollm2_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    args = ["-m", "fedsoda_mpi.main", "fed.rounds=2", "fed.clients=4", "fed.clients_per_round=3", "oda.every=2",
            "eval.every=1", f"output.dir={run_dir}", *SMALL]
    p = mpirun(3, args, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return run_dir, p


def test_run_file_has_the_whole_schema(e2e_run):
    run_dir, p = e2e_run
    assert "fedsoda-mpi final results" in p.stdout
    with h5py.File(run_dir / "run.h5", "r") as f:
        for key in ("config_json", "method", "model", "world_size", "n_clients", "versions_json", "git_commit"):
            assert key in f.attrs, key
        assert json.loads(f.attrs["config_json"])["fed"]["rounds"] == 2 and f.attrs["world_size"] == 3
        L_E = 27
        dist = f["sgp/distance"][:]
        assert dist.shape == (4, L_E) and np.isnan(dist[3, L_E - 4:]).all() and np.isfinite(dist[0, :L_E - 1]).all()
        groups, kept, lmap = f["sgp/groups"][:], f["sgp/kept_layers"][:], f["sgp/layer_map"][:]
        assert groups.shape == (4, 2) and (groups[:, 1] - groups[:, 0] == 3).all() and len(kept) == 18
        assert [kept[s] for s in lmap[:, 1]] == lmap[:, 0].tolist() == groups[:, 0].tolist()
        for k in ("loss", "loss_rep", "loss_kl"):
            assert f[f"oda/pre/{k}"].shape == (2,) and np.isfinite(f[f"oda/pre/{k}"][:]).all()
        assert f["oda/pre"].attrs["kl_after"] < f["oda/pre"].attrs["kl_before"]
        assert f["oda/re/round"][:].tolist() == [2]
        r = f["rounds"]
        assert r["round"][:].tolist() == [1, 2] and r["realigned"][:].tolist() == [0, 1]
        assert r["train_loss"].shape == (2, 4) and r["n_samples"].shape == (2, 4) and r["upload_bytes"].shape == (2, 4)
        sampled = r["upload_bytes"][:] > 0
        assert (sampled.sum(1) == 3).all() and np.isnan(r["train_loss"][:][~sampled]).all()
        assert (r["n_samples"][:][sampled] == 32).all()
        assert r["download_bytes"][1] > r["download_bytes"][0]  # round 2 also carried the emulator LoRA
        assert np.isfinite(r["eval_acc"][0]) and r["comm_params"][0] > 0 and (r["wall_s"][:] > 0).all()
        assert f["drift/distance"].shape == (2, 4) and f["drift/round"][:].tolist() == [1, 2]
        fin = dict(f["final"].attrs)
        assert fin["n_eval"] == 16 and fin["task"] == "sst2"
        assert 0 <= fin["accuracy"] <= 1 and 0 <= fin["sub_accuracy"] <= 1
        assert fin["client_model_bytes"] < 0.35 * fin["full_model_bytes"]
        # LoRA r=8 on q,k,v,o (576->576, 576->192 x2, 576->576) and gate, up, down (576<->1536) of 3 adapter layers
        per_layer = 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
        assert fin["trainable_params"] == 3 * per_layer == 244224
        assert r["upload_bytes"][:][sampled].tolist() == [4 * 244224 + 8] * 6  # fp32 LoRA + loss + n_k
    assert (run_dir / "config.yaml").is_file() and (run_dir / "log.txt").is_file()
    assert (run_dir / "checkpoints" / "round00002" / "adapter.safetensors").is_file()


def test_clients_never_hold_the_full_llm(e2e_run):
    run_dir, _ = e2e_run
    with h5py.File(run_dir / "run.h5", "r") as f:
        full_bytes = f["final"].attrs["full_model_bytes"]
        kept = len(f["sgp/kept_layers"][:])
    for rank in (1, 2):
        held = json.loads((run_dir / f"client_rank{rank}.json").read_text())
        assert held["decoder_layers"] == kept == 18
        assert held["linear4bit"] == 18 * 7  # every decoder linear is NF4
        assert held["received_model_bytes"] < 0.3 * full_bytes and held["stored_bytes"] < 0.3 * full_bytes


def test_exported_adapter_reproduces_final_accuracy(e2e_run, smollm2_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedsoda_mpi.evaluate import evaluate

    run_dir, _ = e2e_run
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    with h5py.File(run_dir / "run.h5", "r") as f:
        want = f["final"].attrs["accuracy"]
    assert evaluate(model, tok, "sst2", max_examples=16)["accuracy"] == want


def _watch_failure(args: list[str], marker: str, timeout: float = 600) -> tuple[int, float, str]:
    """Run mpirun, return (exit code, seconds from the injected failure to exit, stderr)."""
    env = {**os.environ, **MPI_ENV}
    cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", "3", sys.executable, "-m", "mpi4py",
           "-m", "fedsoda_mpi.main", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    seen, out = None, []
    deadline = time.time() + timeout
    for line in proc.stdout:
        out.append(line)
        if seen is None and marker in line:
            seen = time.time()
        if time.time() > deadline:
            proc.kill()
            break
    code = proc.wait()
    return code, (time.time() - seen) if seen else float("inf"), "".join(out)


@pytest.mark.parametrize("rank", [1, 0])
def test_injected_failure_aborts_whole_job_fast(rank, tmp_path):
    args = ["fed.rounds=2", "fed.clients=2", f"debug.fail_rank={rank}", "debug.fail_round=2", "oda.pre_align=false",
            "oda.re_align=false", "eval.every=0", f"output.dir={tmp_path / 'run'}", *SMALL]
    code, after, out = _watch_failure(args, "injected failure")
    assert code != 0, out[-2000:]
    assert f"[rank {rank}] FATAL RuntimeError: debug.fail_rank={rank} debug.fail_round=2: injected failure" in out or \
        f"debug.fail_rank={rank} debug.fail_round=2: injected failure" in out, out[-2000:]
    assert after < 10, (after, out[-2000:])
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:  # completed rounds survive
        assert f["rounds/round"][:].tolist() == [1]


def test_smoke_11_ranks(smollm2_dir, tmp_path):
    p = mpirun(11, ["-m", "fedsoda_mpi.main", "fed.rounds=1", "fed.clients=10", "fed.local_steps=1", "oda.pre_epochs=0",
                    "oda.re_align=false", f"output.dir={tmp_path / 'run'}", "data.public_samples=4",
                    "data.max_train_per_client=8", "eval.max_examples=8"], timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert f.attrs["world_size"] == 11
        assert (f["rounds/n_samples"][0] == 8).all() and np.isfinite(f["rounds/train_loss"][0]).all()


@pytest.mark.parametrize("method", ["fedpetuning", "fedot", "fedbiot"])
def test_baseline_presets_run_end_to_end(method, smollm2_dir, tmp_path):
    run_dir = tmp_path / "run"
    p = mpirun(3, ["-m", "fedsoda_mpi.main", f"method={method}", "fed.rounds=1", "fed.clients=2", "fed.local_steps=1",
                   "eval.max_examples=8", "data.public_samples=4", "oda.re_samples=4", f"output.dir={run_dir}",
                   "data.max_train_per_client=8"], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with h5py.File(run_dir / "run.h5", "r") as f:
        kept, fin = f["sgp/kept_layers"][:].tolist(), dict(f["final"].attrs)
        realigned = f["rounds/realigned"][:].tolist()
    held = json.loads((run_dir / "client_rank1.json").read_text())
    assert held["linear4bit"] == 0  # baselines ship an unquantized model
    if method == "fedpetuning":
        assert kept == list(range(30)) and held["decoder_layers"] == 30
        assert fin["trainable_params"] == 30 * 8 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
    else:
        assert len(kept) == 18 and kept[0] == 0 and kept[-2:] == [28, 29] and held["decoder_layers"] == 18
        assert realigned == ([1] if method == "fedbiot" else [0])
