"""oda.trigger=drift under real mpirun on the tiny SmolLM2-shaped model folder (wiring, not model quality): rank 0
decides each round's re-alignment from the output drift probe (/rounds/drift_probe: KL(M || M*) on the held-out probe
batch) against tau x its value just after the last alignment (/rounds/drift_ref), every rank follows the broadcast
flag, and only those rounds carry the emulator LoRA. Resume with the trigger: tests/test_resume.py."""
import json

import h5py
import numpy as np
import pytest

from fedsoda_mpi.oda import realign_due
from tests.conftest import mpirun

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

TAU, MAX_INTERVAL, ROUNDS = 1.05, 3, 5
ARGS = ["-m", "fedsoda_mpi.main", f"fed.rounds={ROUNDS}", "fed.clients=4", "data.public_samples=8", "oda.re_samples=8",
        "data.max_train_per_client=16", "eval.max_examples=16", "data.val_size=16", "fed.local_steps=2", "eval.every=0",
        "fed.lr=1e-2", "oda.trigger=drift", f"oda.drift_threshold={TAU}", f"oda.max_interval={MAX_INTERVAL}"]
FLAG_BYTES = 8  # comm.broadcast_flag: one int64 per client rank, in the round's download_bytes


@pytest.fixture(scope="module")
def drift_run(tiny_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("drift") / "run"
    p = mpirun(3, [*ARGS, f"model.name={tiny_model_dir}", f"output.dir={run_dir}"], timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with h5py.File(run_dir / "run.h5", "r") as f:
        rec = {k: f[f"rounds/{k}"][:] for k in f["rounds"]}
        rec["probe_0"] = float(f["rounds"].attrs["drift_probe_0"])
        rec["re_round"] = f["oda/re/round"][:] if "oda/re" in f else np.zeros(0, np.int32)
        rec["inter"] = f["drift/distance"][:]
        rec["final"] = dict(f["final"].attrs)
        rec["config"] = json.loads(f.attrs["config_json"])
    return rec, p.stdout


def test_realignment_rounds_follow_the_probe_rule(drift_run):
    """Each round's flag is `oda.realign_due` of the values the run recorded before it; the reference resets exactly
    at the re-aligned rounds; the run has rounds of both kinds and at least one re-alignment the probe (not the
    interval) caused."""
    rec, _ = drift_run
    assert rec["round"].tolist() == list(range(1, ROUNDS + 1))
    assert rec["config"]["oda"]["trigger"] == "drift" and rec["config"]["oda"]["drift_threshold"] == TAU
    probe, ref, flags = rec["drift_probe"], rec["drift_ref"], rec["realigned"].astype(bool)
    assert probe.dtype == np.float32 and np.isfinite(probe).all() and np.isfinite(ref).all() and (probe > 0).all()
    last, prev_probe, prev_ref, by_drift = 0, rec["probe_0"], rec["probe_0"], 0
    for t, realigned in zip(range(1, ROUNDS + 1), flags):
        assert realigned == realign_due(t, last, prev_probe, prev_ref, TAU, MAX_INTERVAL), t
        assert (ref[t - 1] != prev_ref) == realigned, t  # a new reference only after a re-alignment
        if realigned:
            by_drift += t - last < MAX_INTERVAL
            last = t
        prev_probe, prev_ref = float(probe[t - 1]), float(ref[t - 1])
    assert 0 < flags.sum() < ROUNDS and by_drift >= 1, (flags, probe, ref)
    assert rec["re_round"].tolist() == rec["round"][flags].tolist()
    assert rec["final"]["realignments"] == flags.sum()


def test_emulator_lora_is_sent_only_on_realignment_rounds(drift_run):
    """The byte columns: the emulator LoRA (and its parameters) only in the re-aligned rounds' rows; /final's
    per-round share is what the run did (re-alignments / rounds)."""
    rec, _ = drift_run
    fin, flags = rec["final"], rec["realigned"].astype(np.int64)
    adapter, emulator = 4 * int(fin["trainable_params"]), int(fin["emulator_lora_bytes"])  # fp32 LoRA
    assert emulator > 0
    assert rec["download_bytes"].tolist() == (adapter + FLAG_BYTES + flags * emulator).tolist()
    assert rec["comm_params"].tolist() == (2 * fin["trainable_params"] + flags * emulator // 4).tolist()
    # the LoRA payload: the download to 2 client ranks (+ the emulator LoRA) and 4 uploads (without loss and n_k)
    assert rec["payload_bytes"].tolist() == (2 * (adapter + flags * emulator) + 4 * adapter).tolist()
    assert fin["comm_bytes_per_round"] == pytest.approx(2 * adapter + emulator * flags.sum() / ROUNDS)


def test_the_l_inter_probe_stays_still_between_realignments(drift_run):
    """The observation behind the output probe: /drift (L_inter angular distances at the aligned layers) changes
    only in re-aligned rounds; /rounds/drift_probe changes every round."""
    rec, _ = drift_run
    inter, flags = rec["inter"], rec["realigned"].astype(bool)
    for t in range(1, ROUNDS):
        assert np.array_equal(inter[t], inter[t - 1]) == (not flags[t]), t
    assert (np.diff(rec["drift_probe"]) != 0).all()
