"""The per-round schedule (which virtual clients train, on which rank) and the client rank's stale-copy sweep."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedsoda_mpi.config import load_config
from fedsoda_mpi.federation import client_schedule, placement
from tests.conftest import ROOT


def test_placement_balances_ranks_and_is_stable_under_full_participation():
    cfg = load_config(None, ["fed.clients=100", "fed.clients_per_round=10"])
    worst_fixed_home = 0
    for rnd in range(1, 21):
        chosen = client_schedule(cfg, 11, rnd)
        where = placement(chosen, 11)
        assert sorted(where) == sorted(chosen) and Counter(where.values()) == Counter(range(1, 11))
        worst_fixed_home = max(worst_fixed_home, max(Counter(1 + k % 10 for k in chosen).values()))
    assert worst_fixed_home >= 2  # what the placement avoids: fixed homes load some rank 2x or more
    full = load_config(None, ["fed.clients=10"])
    for rnd in (1, 2, 3):
        assert placement(client_schedule(full, 4, rnd), 4) == {k: 1 + k % 3 for k in range(10)}


def test_schedule_is_seeded_per_round():
    cfg = load_config(None, ["fed.clients=100", "fed.clients_per_round=10"])
    a, b = client_schedule(cfg, 11, 3), client_schedule(cfg, 11, 4)
    assert a == client_schedule(cfg, 11, 3) and a != b and len(set(a)) == 10
    assert np.all(np.diff(a) > 0)


def test_sweep_removes_only_copies_of_dead_client_processes(tmp_path, monkeypatch):
    """A client rank SIGKILLed while loading its on-disk sub-LLM copy leaves it; the next start removes it."""
    import os
    import subprocess
    import sys
    import tempfile

    from fedsoda_mpi.reaper import sweep_stale_copies

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the default root: TMPDIR
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f"fedsoda-client1-{dead}-abc").mkdir()
    (tmp_path / f"fedsoda-server-{dead}-ghi").mkdir()  # the server's build of M* (SIGKILLed rank 0): swept too
    (tmp_path / f"fedsoda-client2-{os.getpid()}-def").mkdir()  # alive: kept
    (tmp_path / "fedsoda-client1-xyz").mkdir()  # not a name with a pid: kept
    assert sweep_stale_copies() == [f"fedsoda-client1-{dead}-abc", f"fedsoda-server-{dead}-ghi"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fedsoda-client1-xyz", f"fedsoda-client2-{os.getpid()}-def"]


def test_sweep_removes_only_cache_folders_of_dead_processes_of_this_host(tmp_path):
    """A client rank SIGKILLed mid-run leaves its disk-tier folder; the next client start on the node removes it,
    but never a live process's folder, another host's (a shared scratch) or a name it did not write."""
    import os
    import subprocess
    import sys

    from fedsoda_mpi.emulator_cache import cache_folder_name, sweep_stale_caches

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale, live = tmp_path / cache_folder_name(1, dead), tmp_path / cache_folder_name(2)
    for folder in (stale, live):
        folder.mkdir()
        (folder / "client0-v1.safetensors").write_bytes(b"x")
    elsewhere = tmp_path / f"fedsoda-cache-{dead}-another-host-rank1"
    elsewhere.mkdir()
    (tmp_path / "fedsoda-cache-notapid-rank1").mkdir()
    assert sweep_stale_caches(tmp_path) == [stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, elsewhere.name, "fedsoda-cache-notapid-rank1"])
    assert live.name == f"fedsoda-cache-{os.getpid()}-{__import__('socket').gethostname()}-rank2"


def test_a_killed_but_unreaped_process_counts_as_gone(tmp_path):
    """In a container whose init never reaps, a SIGKILLed rank stays a zombie: kill(pid, 0) still succeeds,
    yet its copy must be swept (the CI failure of the SIGTERM test)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fedsoda_mpi.reaper import process_alive, sweep_stale_copies

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert process_alive(child.pid)
    (tmp_path / f"fedsoda-client1-{child.pid}-abc").mkdir()
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.time() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline
        time.sleep(0.01)
    os.kill(child.pid, 0)  # the zombie still answers kill(0)
    assert not process_alive(child.pid)
    assert sweep_stale_copies(tmp_path) == [f"fedsoda-client1-{child.pid}-abc"]
    child.wait()



def test_rounds_in_one_process_server_client_and_strategy(tiny_model_dir, tmp_path):
    """Algorithm 2 without MPI, on the tiny model folder: the server plans (SGP), builds and pre-aligns M*; a
    Client loads the shipped bundle (never the full LLM), receives the emulator LoRA, fits two clients from the
    downloaded global LoRA; the strategy aggregates; M and M* then hold the new global LoRA. A fit is
    reproducible (seeded by seed, round, client), and a client whose update diverged (debug.fail_kind=nan) is
    rejected while the other one is averaged. Clients that leave the rank spill their emulator cache to the
    disk tier, a returning one reloads it (the same fit, bit for bit), set_emulator deletes it, close removes
    the folder."""
    import torch

    from fedsoda_mpi import models
    from fedsoda_mpi.client import Client
    from fedsoda_mpi.comm import Schema
    from fedsoda_mpi.main import prepare_inputs
    from fedsoda_mpi.runlog import RunLog
    from fedsoda_mpi.server import Server
    from fedsoda_mpi.strategies import strategy_for

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "fed.clients=2", "data.max_train_per_client=4",
                             "data.public_samples=8", "data.val_size=20", "eval.max_examples=8",
                             "debug.fail_rank=1", "debug.fail_round=2", "debug.fail_kind=nan",
                             f"fed.cache_dir={tmp_path / 'scratch'}", "fed.cache_max_gb=1"])
    log = RunLog(tmp_path, 0, echo=False)
    log.open_h5(cfg, 2, cfg.model.name, mode="w")
    server = Server.load(cfg, log, torch.device("cpu"))
    plan = server.plan_layers()
    server.build(plan)
    server.pre_align()
    rows, _ = prepare_inputs(cfg)
    client = Client(cfg, 1, plan, dict(server.bundle), rows, torch.device("cpu"))
    assert len(models.get_layers(client.sub)) == plan.sub_layers == 18 < plan.num_layers == 30
    client.set_emulator(server.emulator_lora())
    strategy = strategy_for(cfg, Schema.of(server.global_adapter))
    held = None
    for rnd in (1, 2):
        held = strategy.receive(strategy.download(server.global_adapter, rnd, 1), held, rnd, 1)
        client.place({0, 1})
        fits = [client.fit(k, held, rnd) for k in (0, 1)]
        assert all(f.steps > 0 and f.n_samples == 4 and np.isfinite(f.loss) for f in fits)
        if rnd == 1:  # the same client, round and global LoRA: the same update, bit for bit (on the CPU; on a GPU
            # only with debug.deterministic=true: docs/design.md, Devices)
            again = client.fit(0, held, rnd)
            assert all(torch.equal(again.state[k], fits[0].state[k]) for k in again.state)
        updates = [strategy.unpack_upload(strategy.pack_upload(f.state, held), server.global_adapter) for f in fits]
        new, rejected = strategy.aggregate(updates, [float(f.n_samples) for f in fits], server.global_adapter, rnd)
        assert rejected == ([0] if rnd == 2 else [])  # round 2: client 0's update is NaN (the injected fault)
        assert not any(torch.equal(new[k], server.global_adapter[k]) for k in new if "lora_B" in k)
        server.set_global(new)
    full_state = models.lora_state(server.full, plan.adapter_full)
    sub_state = models.lora_state(server.sub, plan.adapter_sub)
    assert all(torch.equal(sub_state[k], new[k]) for k in new)
    assert all(torch.equal(v, new[k]) for k, v in models.remap_layers(full_state, plan.full_to_sub).items())

    folder = client.cache.disk.folder
    assert folder.parent == tmp_path / "scratch" and folder.name.endswith("-rank1")
    first = client.fit(1, held, 3)
    client.place(set())  # both clients leave the rank: their rows go to disk, memory holds none
    assert sorted(p.name for p in folder.iterdir()) == ["client0-v1.safetensors", "client1-v1.safetensors"]
    assert client.cache.store == {} and client.examples == {}
    client.place({1})
    again = client.fit(1, held, 3)
    assert client.cache.disk_hits == 4 and all(torch.equal(again.state[k], first.state[k]) for k in first.state)
    client.set_emulator(server.emulator_lora())  # re-alignment: the disk entries are stale, deleted at once
    assert list(folder.iterdir()) == [] and client.cache.version == 2
    client.close()
    assert not folder.exists() and list((tmp_path / "scratch").iterdir()) == []
    log.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_client_holds_what_it_received_tied_or_untied_head(family, request, tmp_path):
    """Issue 17: on an untied LM head (Qwen2, as LLaMA3-8B, Qwen2-7B, Mistral-7B) the client used to report the
    decoder without the head. The shipped safetensors (NF4 weights as the client keeps them) and the bytes the
    client holds (minus its LoRA, which travels separately) agree up to the rotary buffers (not shipped: rebuilt
    from the config), and the untied head is counted: held >= embeddings + head in fp32."""
    import torch

    from fedsoda_mpi.client import Client
    from fedsoda_mpi.main import prepare_inputs
    from fedsoda_mpi.runlog import RunLog
    from fedsoda_mpi.server import Server

    folder = request.getfixturevalue("tiny_model_dir" if family == "llama" else "tiny_qwen2_dir")
    cfg = load_config(None, [f"model.name={folder}", "fed.clients=2", "data.max_train_per_client=4",
                             "data.public_samples=8", "data.val_size=20", "oda.pre_align=false"])
    log = RunLog(tmp_path, 0, echo=False)
    log.open_h5(cfg, 2, cfg.model.name, mode="w")
    server = Server.load(cfg, log, torch.device("cpu"))
    plan = server.plan_layers()
    server.build(plan)
    client = Client(cfg, 1, plan, dict(server.bundle), prepare_inputs(cfg)[0], torch.device("cpu"))
    held = client.holdings()
    log.close()
    config = server.full.config
    embed = 4 * config.vocab_size * config.hidden_size
    assert held["lm_head_tied"] == (family == "llama") == config.tie_word_embeddings
    weights = held["stored_bytes"] - held["lora_bytes"]
    assert weights >= embed * (1 if family == "llama" else 2)
    assert 0 <= weights - held["received_weight_bytes"] <= 1024
    assert held["received_weight_bytes"] < held["received_model_bytes"] <= 1.2 * held["received_weight_bytes"] + 2**20


def test_a_reaper_removes_the_copy_of_a_sigkilled_process_and_exits_when_the_copy_is_gone(tmp_path):
    """reaper.reap_when_gone: a SIGKILLed owner (mpirun's ~1 s grace after SIGTERM ends a rank loading the sub-LLM)
    leaves no copy behind, also while it is an unreaped zombie; an owner that removes its copy itself ends the
    reaper at once. The owner here runs the reaper exactly as Client.__init__ does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    owner_code = ("import sys, time; from pathlib import Path; from fedsoda_mpi.reaper import reap_when_gone; "
                  "d = Path(sys.argv[1]); d.mkdir(); (d / 'model.safetensors').write_bytes(b'x' * 1000); "
                  "r = reap_when_gone(d); print(r.pid, flush=True); time.sleep(60)")
    copy = tmp_path / "fedsoda-client1-copy"
    owner = subprocess.Popen([sys.executable, "-c", owner_code, str(copy)], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    reaper_pid = int(owner.stdout.readline())
    assert copy.is_dir()
    time.sleep(0.5)
    assert copy.is_dir()  # the owner lives: nothing is removed
    os.kill(owner.pid, signal.SIGKILL)  # not reaped yet (a zombie) until owner.wait() below
    deadline = time.time() + 10
    while copy.exists():
        assert time.time() < deadline, "the reaper did not remove the copy of a SIGKILLed process"
        time.sleep(0.05)
    owner.wait()
    from fedsoda_mpi.reaper import process_alive, reap_when_gone

    while process_alive(reaper_pid):
        assert time.time() < deadline
        time.sleep(0.05)
    mine = tmp_path / "mine"
    mine.mkdir()
    r = reap_when_gone(mine)
    mine.rmdir()  # the owner removes its copy itself (the normal case): the reaper exits
    assert r.wait(timeout=5) == 0


def test_the_servers_sub_llm_build_and_bundle_use_recognizable_scratch_folders(tiny_llama, tmp_path, monkeypatch):
    """Rank 0's temporary copy of M* while it builds it is TMPDIR/fedsoda-server-<pid>-* (as is the bundle's,
    `reaper.scratch`): a later start sweeps it when rank 0 was SIGKILLed mid-build, and it is gone after the call."""
    import os
    import tempfile

    from fedsoda_mpi import models

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []
    write = models._write_checkpoint
    monkeypatch.setattr(models, "_write_checkpoint",
                        lambda m, c, s, folder: seen.append(folder.name) or write(m, c, s, folder))
    models.build_sub_model(tiny_llama, [0, 1, 2, 3], quantize=False)
    assert len(seen) == 1 and seen[0].startswith(f"fedsoda-server-{os.getpid()}-")
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_alignment_stops_before_the_clients_with_one_line_naming_oda_lr(tiny_model_dir, tmp_path):
    """oda.lr=1e10 drives pre-alignment to NaN: the server stops right there naming oda.lr (issue 33), instead of
    shipping a broken M* whose clients' updates round 1 would reject with advice about fed.lr."""
    import torch

    from fedsoda_mpi.runlog import RunLog
    from fedsoda_mpi.server import AlignmentDiverged, Server

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "fed.clients=2", "data.public_samples=8",
                             "data.val_size=20", "oda.lr=1e10", "oda.re_samples=100000"])
    log = RunLog(tmp_path, 0, echo=False)
    log.open_h5(cfg, 2, cfg.model.name, mode="w")
    server = Server.load(cfg, log, torch.device("cpu"))
    server.build(server.plan_layers())
    with pytest.raises(AlignmentDiverged, match=r"^pre-alignment diverged \((loss nan at step \d+ of \d+|the emulator "
                                                r"LoRA holds NaN/Inf)\); lower oda.lr \(now 1e\+10\) and run again$"):
        server.pre_align()
    log.close()
    text = (tmp_path / "log.txt").read_text()
    pool = len(server.texts.pool)
    assert f"oda.re_samples=100000 is more than the {pool} texts of D_public (wikitext2); using all {pool}" in text
    assert "SGP distance profile: 2 batches to run" in text and "pre-alignment: 2 steps to run" in text
    assert "pre-alignment: 1/2 steps, " in text  # after the first step: its time and the estimate of the rest


class _OneRank:
    """The part of comm.Comm that federation.open_run uses, for rank 0 alone."""
    rank, is_server = 0, True

    def broadcast_bytes(self, msg, category):
        return msg


def test_open_run_names_job_file_keys_over_the_preset_and_refuses_for_every_rank(tmp_path, monkeypatch):
    """Rank 0 logs the resolved config and the preset keys a job file overrides (the job file wins); a run folder
    that `checkpoint.claim` refuses (a finished run whose every checkpoint is damaged) is the one-line
    RunFolderRefused that every rank raises, before any log file is opened."""
    import sys

    import h5py

    from fedsoda_mpi.federation import open_run
    from fedsoda_mpi.runlog import RunFolderRefused
    from fedsoda_mpi.signals import PROGRESS

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # (open_run installs the abort hook)
    monkeypatch.setitem(PROGRESS, "log", None)
    job = tmp_path / "job.yaml"
    job.write_text("method: fedsoda\noda:\n  every: 5\n")
    log, ck = open_run(load_config(job, ["method=fedbiot", f"output.dir={tmp_path / 'run'}"]), _OneRank())
    log.close()
    text = (tmp_path / "run" / "log.txt").read_text()
    assert ck is None and (f"note: the job file {job} sets oda.every=5 (the fedbiot preset: 1); the job file wins over "
                           "the method preset") in text
    assert f"resolved config (the fedbiot preset < {job} < key=value overrides; also config.yaml):" in text
    assert "]   method: fedbiot\n" in text and "]     every: 5\n" in text  # the YAML, a line each, before the note
    assert text.index("]     every: 5") < text.index("note: the job file")
    finished = tmp_path / "finished"
    (finished / "checkpoints" / "round00001").mkdir(parents=True)  # no state.json: not a valid checkpoint
    with h5py.File(finished / "run.h5", "w") as f:
        f.create_dataset("rounds/round", data=[1])
        f.create_group("final")
    with pytest.raises(RunFolderRefused, match="holds a finished run of 1 round but none of its checkpoints is valid"):
        open_run(load_config(None, ["resume=auto", f"output.dir={finished}"]), _OneRank())
    assert not (finished / "log.txt").exists()


def test_label_evaluation_logs_its_progress(tiny_model_dir):
    """A label task's final evaluation (thousands of rows at 8B) logs after its first batch and at its end (and at
    most once a minute between), through the same callback as GSM8K's, in rows; it never stops half-way."""
    from pathlib import Path
    from types import SimpleNamespace

    from fedsoda_mpi import data, models
    from fedsoda_mpi.evaluate import label_accuracy
    from fedsoda_mpi.evaluator import Evaluator
    from fedsoda_mpi.signals import STOP_REQUESTED

    model, tok = models.load_causal_lm(tiny_model_dir)
    lines, calls = [], []
    fake = SimpleNamespace(cfg=load_config(None, []), log=SimpleNamespace(log=lines.append, run_dir=Path("-")))
    step = Evaluator.progress(fake, "full")
    STOP_REQUESTED[0] = "SIGUSR1"  # a stop request waits for the end of a label evaluation
    try:
        label_accuracy(model, tok, "sst2", data.load_rows("sst2", "test")[:10], batch_size=4,
                       progress=lambda *a: (calls.append(a), step(*a)))
    finally:
        STOP_REQUESTED[0] = None
    assert calls == [(4, 10, 4), (8, 10, 8), (10, 10, 10)]
    assert [line.split(",")[0] for line in lines] == ["eval full: 4/10 rows", "eval full: 10/10 rows"], lines
    assert " s per row, about " in lines[0]
