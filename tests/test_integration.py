"""End to end under real mpirun on real data (marked mpi + slow).

Wiring (run-file schema, timing, byte accounting, failures, NaN rejection, FedSRD bytes, 11 ranks, the baseline
presets) runs on the tiny SmolLM2-shaped model folder (`tiny_model_dir`: 30 layers, hidden 64, random weights);
the exported PEFT adapter is checked on one real SmolLM2 FedSODA run (marked real), where accuracy means something.

    pytest -m mpi tests/test_integration.py
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
import torch
from safetensors.torch import load_file

from tests import tiny_models as T
from tests.conftest import MPI_ENV, ROOT, mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

# d_model, d_ff, k/v out width (KV heads x head dim), vocab (tied head), layers; LoRA rank R
SMOLLM2 = dict(D=576, FF=1536, KV=192, V=49152, L=30)  # 9 heads of 64, 3 KV heads
TINY = dict(D=T.HIDDEN, FF=T.FFN, KV=T.KV_HEADS * T.HEAD_DIM, V=T.VOCAB, L=T.LAYERS)  # 64, 256, 32, 4096, 30
R = 8


def layer_lora(a: dict) -> int:
    """LoRA parameters of one decoder layer: r x (in + out) for q, o (D->D), k, v (D->KV), gate, up, down (D<->FF)."""
    D, FF, KV = a["D"], a["FF"], a["KV"]
    return R * (2 * (D + D) + 2 * (D + KV) + 3 * (D + FF))


def analytic_accounting(layers_held: int, adapter_layers: int, emulator_lora_layers: int, realign_every: int,
                        nf4: bool, arch: dict = TINY) -> dict:
    """The paper's section 5 / appendix C accounting from the architecture alone, to check what the
    transport counted and what the clients hold: comm params per round O((m^S/r + 2 m^A) r d_model)
    (the emulator LoRA counts only when it is re-sent every r rounds), storage 4 bytes/param (fp32) or
    4 + 8/64 + 32/(64*256) = 4.127 bits/param (NF4, double quantization), plus the LoRA the client holds."""
    D, FF, KV, V, L = (arch[k] for k in ("D", "FF", "KV", "V", "L"))
    layer_linear = 2 * D * D + 2 * D * KV + 3 * D * FF  # q, o; k, v; gate, up, down
    lora = layer_lora(arch)
    linear = layers_held * layer_linear
    other = V * D + layers_held * 2 * D + D  # tied embedding/head, per-layer norms, final norm
    weight_bytes = linear * (4 + 8 / 64 + 32 / (64 * 256)) / 8 if nf4 else 4 * linear
    lora_held = (adapter_layers + emulator_lora_layers) * lora
    return {"trainable_params": adapter_layers * lora,
            "comm_params_per_round": 2 * adapter_layers * lora
            + (emulator_lora_layers * lora / realign_every if realign_every else 0),
            "client_weight_bytes": weight_bytes + 4 * other + 4 * lora_held,
            "full_model_bytes": 4 * (L * (layer_linear + 2 * D) + V * D + D),
            "linear4bit": layers_held * 7 if nf4 else 0}


# bytes a Linear4bit holds beyond the 4.127 bits/weight formula, whatever its size: the 16-entry NF4 code book
# (64 B), the 256-entry nested code book (1 KB), the packed quant state and the nested absmax/offset (rounded up
# to whole blocks). Negligible on SmolLM2 (0.1%), a large share of the tiny model's few MB.
CODE_BOOKS = 1400


def check_accounting(fin: dict, held: dict, want: dict) -> None:
    assert fin["trainable_params"] == want["trainable_params"]
    assert abs(fin["comm_params_per_round"] - want["comm_params_per_round"]) <= 1  # int() of the amortized share
    assert fin["comm_bytes_per_round"] == pytest.approx(4 * want["comm_params_per_round"], rel=1e-6)  # fp32 LoRA
    assert 0 <= fin["full_model_bytes"] - want["full_model_bytes"] <= 4096  # + rotary inv_freq buffers
    # held tensors vs formula: the extras are rotary buffers and, for NF4, each Linear4bit's code books and
    # packed state (about 1.3 KB per layer)
    assert held["linear4bit"] == want["linear4bit"]
    assert want["client_weight_bytes"] <= held["stored_bytes"] <= \
        1.002 * want["client_weight_bytes"] + 4096 + CODE_BOOKS * want["linear4bit"]


SMALL = ["data.public_samples=8", "data.max_train_per_client=32", "eval.max_examples=16", "data.val_size=16",
         "fed.local_steps=2"]


E2E = ["-m", "fedsoda_mpi.main", "fed.rounds=2", "fed.clients=4", "fed.clients_per_round=3", "oda.every=2",
       "eval.every=1", "oda.re_samples=8", *SMALL]  # re-alignment: 2 steps of 4 paragraphs (default 32: 8 steps)


def _e2e(model: Path, run_dir: Path, *extra: str):
    p = mpirun(3, [*E2E, f"model.name={model}", f"output.dir={run_dir}", *extra], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.leftover_tmp == []  # the clients' on-disk copy of the sub-LLM is removed once loaded
    return run_dir, p


@pytest.fixture(scope="module")
def e2e_run(tiny_model_dir, tmp_path_factory):
    """FedSODA, 2 rounds, 4 clients (3 per round), re-alignment in round 2, on the tiny model folder."""
    return _e2e(tiny_model_dir, tmp_path_factory.mktemp("e2e") / "run")


# On the real model the alignments and the base evaluation dominate the run's time and its test reads none of
# them: 4 public paragraphs make SGP's profile, the pre-alignment and the re-alignment one batch each
REAL_CHEAPER = ["eval.base=false", "data.public_samples=4", "oda.re_samples=4"]


@pytest.fixture(scope="module")
def e2e_real(smollm2_dir, tmp_path_factory):
    """The same FedSODA run on the real SmolLM2 (`REAL_CHEAPER`): the one end-to-end run whose accuracy means
    something."""
    return _e2e(smollm2_dir, tmp_path_factory.mktemp("e2e-real") / "run", *REAL_CHEAPER)


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
        # LoRA r=8 on q,k,v,o (64->64, 64->32 x2, 64->64) and gate, up, down (64<->256) of 3 adapter layers
        per_layer = 8 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 256) * 3)
        assert fin["trainable_params"] == 3 * per_layer == 3 * layer_lora(TINY) == 33792
        assert r["upload_bytes"][:][sampled].tolist() == [4 * 33792 + 8] * 6  # fp32 LoRA + loss + n_k
    assert (run_dir / "config.yaml").is_file() and (run_dir / "log.txt").is_file()
    assert (run_dir / "checkpoints" / "round00002" / "adapter.safetensors").is_file()


def test_timing_accounts_for_every_rank_and_phase(e2e_run):
    """/timing: one row per round and rank; phases add up to the wall time; the clients ran their steps;
    the transport moved the LoRA payload plus only a few control bytes."""
    from fedsoda_mpi.timing import PHASES

    run_dir, _ = e2e_run
    with h5py.File(run_dir / "run.h5", "r") as f:
        t, r = f["timing"], f["rounds"]
        assert [p.decode() if isinstance(p, bytes) else p for p in t.attrs["phases"]] == list(PHASES)
        assert t["round"][:].tolist() == [1, 2] and t["phase_s"].shape == (2, 3, len(PHASES))
        phase, wall = t["phase_s"][:], t["wall_s"][:]
        np.testing.assert_allclose(phase.sum(2), wall, rtol=1e-9)
        col = {p: phase[..., i] for i, p in enumerate(PHASES)}
        assert (col["adapter"][:, 1:] > 0).all() and (col["adapter"][:, 0] == 0).all()  # only clients train
        assert (col["emulator"][0, 1:] > 0).all()  # round 1 fills the emulator cache
        assert col["realign"][1, 0] > 0 and col["realign"][0, 0] == 0  # oda.every=2: round 2 re-aligns
        assert (col["evaluate"][:, 0] > 0).all()  # eval.every=1 (round 2's is in /final) + the drift probe
        # 4 clients, 3 sampled per round on 2 client ranks, fed.local_steps=2 each
        assert t["local_steps"][:, 1:].sum(1).tolist() == [6.0, 6.0] and (t["local_steps"][:, 0] == 0).all()
        assert (t["peak_rss_mb"][:] > 100).all() and (t["mpi_s"][:] > 0).all()
        assert {"sgp_s", "pre_align_s", "base_eval_s", "build_s"} <= set(t.attrs)
        ratio = r["moved_bytes"][:] / r["payload_bytes"][:]
        assert (ratio >= 1).all() and (ratio < 1.01).all(), ratio


def test_accounting_matches_the_analytic_formulas(e2e_run):
    """FedSODA: 3 adapter layers, LoRA on p=4 retained layers s_i re-sent every oda.every=2 rounds, NF4."""
    run_dir, _ = e2e_run
    with h5py.File(run_dir / "run.h5", "r") as f:
        fin = dict(f["final"].attrs)
    held = json.loads((run_dir / "client_rank1.json").read_text())
    check_accounting(fin, held, analytic_accounting(18, 3, 4, 2, nf4=True))


@pytest.mark.real
def test_real_run_accounting_and_exported_adapter_reproduces_final_accuracy(e2e_real, smollm2_dir):
    """On the real SmolLM2: the same accounting at its real size (244224 trainable LoRA parameters), and the
    exported PEFT adapter on the full model gives exactly the logged final accuracy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedsoda_mpi.evaluate import evaluate

    run_dir, p = e2e_real
    assert "fedsoda-mpi final results" in p.stdout
    with h5py.File(run_dir / "run.h5", "r") as f:
        fin = dict(f["final"].attrs)
        assert f["rounds/round"][:].tolist() == [1, 2] and f["rounds/realigned"][:].tolist() == [0, 1]
    held = json.loads((run_dir / "client_rank1.json").read_text())
    assert fin["trainable_params"] == 3 * layer_lora(SMOLLM2) == 244224
    check_accounting(fin, held, analytic_accounting(18, 3, 4, 2, nf4=True, arch=SMOLLM2))
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert evaluate(model, tok, "sst2", max_examples=16)["accuracy"] == fin["accuracy"]


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


def _watch_failure(args: list[str], marker: str, tmpdir: Path, timeout: float = 600) -> tuple[int, float, str]:
    """Run mpirun with TMPDIR=tmpdir, return (exit code, seconds from the injected failure to exit, stderr)."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **MPI_ENV, "TMPDIR": str(tmpdir)}
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
def test_injected_failure_aborts_whole_job_fast(rank, tiny_model_dir, tmp_path):
    args = [f"model.name={tiny_model_dir}", "fed.rounds=2", "fed.clients=2", f"debug.fail_rank={rank}",
            "debug.fail_round=2", "oda.pre_align=false", "oda.re_align=false", "eval.every=0",
            f"output.dir={tmp_path / 'run'}", *SMALL]
    code, after, out = _watch_failure(args, "injected failure", tmp_path / "tmp")
    assert code != 0, out[-2000:]
    assert f"[rank {rank}] FATAL RuntimeError: debug.fail_rank={rank} debug.fail_round=2: injected failure" in out or \
        f"debug.fail_rank={rank} debug.fail_round=2: injected failure" in out, out[-2000:]
    assert after < 10, (after, out[-2000:])
    assert not list((tmp_path / "tmp").glob("fedsoda*"))  # no copy of the sub-LLM left behind by the abort
    log = (tmp_path / "run" / ("log.txt" if rank == 0 else f"log.rank{rank}.txt")).read_text()
    assert f"[rank {rank}] FATAL RuntimeError: debug.fail_rank={rank}" in log, log[-2000:]  # in the failed rank's log
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:  # completed rounds survive
        assert f["rounds/round"][:].tolist() == [1]


def test_simulated_oom_names_rank_client_and_batch_size(tiny_model_dir, tmp_path):
    args = [f"model.name={tiny_model_dir}", "fed.rounds=2", "fed.clients=2", "debug.fail_rank=2", "debug.fail_round=1",
            "debug.fail_kind=oom", "oda.pre_align=false", "oda.re_align=false", "eval.every=0",
            f"output.dir={tmp_path / 'run'}", *SMALL]
    code, after, out = _watch_failure(args, "out of memory on rank 2", tmp_path / "tmp")
    assert code != 0 and after < 10, out[-2000:]
    assert ("[rank 2] FATAL RuntimeError: out of memory on rank 2 (client 1) at fed.batch_size=4, data.max_len=128: "
            "lower fed.batch_size or data.max_len") in out, out[-2000:]


def test_nan_update_is_rejected_and_the_round_aggregates_the_others(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    p = mpirun(3, ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", "fed.rounds=2", "fed.clients=4",
                   "debug.fail_rank=1", "debug.fail_round=1", "debug.fail_kind=nan", "oda.pre_align=false",
                   "oda.re_align=false", "eval.every=0",
                   f"output.dir={run_dir}", *SMALL], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "round 1: rejected the update of client 0 (non-finite values)" in p.stdout
    with h5py.File(run_dir / "run.h5", "r") as f:
        assert f["rounds/rejected"][:].tolist() == [[1, 0, 0, 0], [0, 0, 0, 0]]  # client 0 (rank 1), round 1 only
        assert 0 <= f["final"].attrs["accuracy"] <= 1
        devices = f["devices"].attrs  # every rank's device (device=auto on a machine without GPUs: the CPU)
        assert [str(d) for d in devices["device"]] == ["cpu"] * 3 and devices["setting"] == "auto"
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_a_round_whose_every_update_is_nan_stops_the_run_with_an_error(tiny_model_dir, tmp_path):
    """No exit 0 for a run that cannot learn: one client, NaN in round 2 -> a FATAL naming the round and client,
    a non-zero exit, and the checkpoint of round 1 kept for resume=auto."""
    run_dir = tmp_path / "run"
    p = mpirun(2, ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", "fed.rounds=3", "fed.clients=1",
                   "debug.fail_rank=1", "debug.fail_round=2", "debug.fail_kind=nan", "oda.pre_align=false",
                   "oda.re_align=false", "eval.every=0",
                   f"output.dir={run_dir}", *SMALL], timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    assert "FATAL RuntimeError: round 2: every client update was non-finite (NaN/Inf; clients 0), so the global LoRA " \
           "cannot move; the run stops here (its last checkpoint is round 1)" in out, out[-3000:]
    assert "FATAL RuntimeError: round 2: every client update" in (run_dir / "log.txt").read_text()
    assert (run_dir / "checkpoints" / "round00001").is_dir() and not (run_dir / "adapter").exists()
    assert p.leftover_tmp == []
    # the same command with the cause removed starts over; the failed attempt is kept beside it
    again = mpirun(2, ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", "fed.rounds=1", "fed.clients=1",
                       "oda.pre_align=false", "oda.re_align=false", "eval.every=0", f"output.dir={run_dir}", *SMALL],
                       timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    (failed,) = run_dir.glob("failed-*")
    assert "FATAL RuntimeError: round 2" in (failed / "log.txt").read_text()
    assert "moved it to" in (run_dir / "log.txt").read_text() and (run_dir / "adapter").is_dir()


def test_smoke_11_ranks(tiny_model_dir, tmp_path):
    p = mpirun(11, ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", "fed.rounds=1", "fed.clients=10",
                    "fed.local_steps=1", "oda.pre_epochs=0", "oda.re_align=false", f"output.dir={tmp_path / 'run'}",
                    "data.public_samples=4",
                    "data.max_train_per_client=8", "eval.max_examples=8"], timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.leftover_tmp == []
    with h5py.File(tmp_path / "run" / "run.h5", "r") as f:
        assert f.attrs["world_size"] == 11
        assert (f["rounds/n_samples"][0] == 8).all() and np.isfinite(f["rounds/train_loss"][0]).all()


@pytest.mark.parametrize("method", ["fedpetuning", "fedot", "fedbiot"])
def test_baseline_presets_run_end_to_end(method, tiny_model_dir, tmp_path):
    """Wiring of the baseline presets (what is shipped, trained, sent and counted), so on the tiny model."""
    run_dir = tmp_path / "run"
    p = mpirun(3, ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", f"method={method}", "fed.rounds=1",
                   "fed.clients=2", "fed.local_steps=1", "eval.max_examples=8", "data.public_samples=4",
                   "oda.re_samples=4", f"output.dir={run_dir}",
                   "data.max_train_per_client=8"], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.leftover_tmp == []
    with h5py.File(run_dir / "run.h5", "r") as f:
        kept, fin = f["sgp/kept_layers"][:].tolist(), dict(f["final"].attrs)
        realigned = f["rounds/realigned"][:].tolist()
    held = json.loads((run_dir / "client_rank1.json").read_text())
    assert held["linear4bit"] == 0  # baselines ship an unquantized model
    want = {"fedpetuning": analytic_accounting(30, 30, 0, 0, nf4=False),  # full model, LoRA everywhere
            "fedot": analytic_accounting(18, 3, 15, 0, nf4=False),  # emulator LoRA sent once (pre-alignment)
            "fedbiot": analytic_accounting(18, 3, 15, 1, nf4=False)}[method]  # emulator LoRA every round
    check_accounting(fin, held, want)
    if method == "fedpetuning":
        assert kept == list(range(30)) and held["decoder_layers"] == 30
    else:
        assert len(kept) == 18 and kept[0] == 0 and kept[-2:] == [28, 29] and held["decoder_layers"] == 18
        assert realigned == ([1] if method == "fedbiot" else [0])


@pytest.mark.parametrize("aggregator", ["fedsrd", "fedsrd-e"])
def test_fedsrd_sparse_rounds_end_to_end(aggregator, tiny_model_dir, tmp_path):
    """FedSODA + FedSRD: sparse uploads and (from round 2) sparse one-factor downloads shrink the bytes by
    the density; clients and server stay in sync (the final adapter reproduces the logged accuracy)."""
    run_dir = tmp_path / "run"
    p = mpirun(3, ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", "fed.rounds=3", "fed.clients=2",
                   f"fed.aggregator={aggregator}",
                   "fed.upload_density=0.25", "fed.download_density=0.25", "oda.pre_align=false", "oda.re_align=false",
                   "eval.every=0", f"output.dir={run_dir}", *SMALL], timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with h5py.File(run_dir / "run.h5", "r") as f:
        r, fin = f["rounds"], dict(f["final"].attrs)
        D, FF, KV = TINY["D"], TINY["FF"], TINY["KV"]
        a_factor = 3 * R * (6 * D + FF)  # lora_A (r x in) of q, k, v, o, gate, up (in: D) and down (in: FF)
        b_factor = 3 * R * (3 * D + 2 * KV + 2 * FF)  # lora_B (out x r): q, o, down (D), k, v (KV), gate, up (FF)
        assert a_factor + b_factor == 33792
        dense = 4 * 33792
        kept = 33792 // 4  # every LoRA tensor's numel is divisible by 4 here: exactly 25% kept
        # float32 values + a bitmask of the positions (1 bit per LoRA entry), + loss and n_k
        assert (r["upload_bytes"][:] == 4 * kept + 33792 // 8 + 8).all()
        assert r["upload_density"][:].tolist() == [0.25] * 3
        down = r["download_bytes"][:]
        # round 1 dense, then ONE factor per round (B, then A: about half the LoRA on SmolLM2, 55% / 45% here),
        # 25% of its entries at 4 bytes each + a bitmask of its positions
        assert down[0] == dense and down[1:].tolist() == [b_factor + b_factor // 8, a_factor + a_factor // 8]
        assert down[1] < 0.28 * dense and down[2] < 0.28 * dense
        assert r["download_density"][0] == 1 and 0 < r["download_density"][1] < 0.26
        assert fin["aggregator"] == aggregator and fin["comm_bytes_per_round"] < 0.3 * 2 * dense
        assert np.isfinite(r["train_loss"][:]).all()
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
