"""Device discipline without a GPU: the server on virtual cuda:0 and a client on virtual cuda:1
(tests/virtual_cuda.py), so that a tensor left on the wrong device fails here as it would on a GPU node."""

import numpy as np
import pytest
import torch

from fedsoda_mpi import models
from fedsoda_mpi.config import load_config
from tests.virtual_cuda import VirtualCuda, device_of, place


@pytest.fixture
def virtual_loading(monkeypatch):
    """Model loading on a virtual device: transformers loads on the CPU (its device_map cannot name a virtual
    device), then the weights are placed on the device asked for. Records every device loading was asked for."""
    asked = []
    load, build = models.load_causal_lm, models.build_sub_model

    def on(model, device):
        asked.append(str(device))
        return place(model, str(device)) if str(device) != "cpu" else model

    def load_causal_lm(path, dtype="float32", device="cpu"):
        model, tok = load(path, dtype, "cpu")
        return on(model, device), tok

    def build_sub_model(*args, device="cpu", **kwargs):
        return on(build(*args, device="cpu", **kwargs), device)

    monkeypatch.setattr(models, "load_causal_lm", load_causal_lm)
    monkeypatch.setattr(models, "build_sub_model", build_sub_model)
    return asked


def _devices(model) -> set[str]:
    return {device_of(p) for p in model.parameters()}


def _lora_model(device: str):
    """A tiny llama with LoRA on every layer, on a virtual device."""
    from tests.conftest import tiny_causal_lm

    return place(models.add_lora(tiny_causal_lm("llama", layers=6), range(6)), device)


def test_aligned_drift_feeds_each_model_on_its_device_and_returns_host_values():
    """Issue 29 bug 1: the drift probe's batch is built on the host (data.pad_batch); the full LLM and M* on the
    server's GPU must receive it on their device, and the distances come back in host memory (DriftProbes.inter
    turns them into numpy). The values equal the all-CPU computation."""
    from tests.conftest import tiny_causal_lm
    from fedsoda_mpi import oda

    torch.manual_seed(0)
    full = tiny_causal_lm("llama", layers=8)
    sub = models.build_sub_model(full, [0, 1, 2, 5, 6, 7], quantize=False)
    batch = {"input_ids": torch.randint(3, 128, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    batch["attention_mask"][1, 5:] = 0
    pairs = [(4, 2)]
    expected = oda.aligned_drift(full, sub, batch, pairs)
    with VirtualCuda():
        place(full, "cuda:0"), place(sub, "cuda:0")
        got = oda.aligned_drift(full, sub, batch, pairs)
        assert device_of(got) == "cpu" and torch.equal(got, expected)


def test_lora_state_is_staged_to_the_host_so_fedsrd_can_encode_a_gpu_clients_update():
    """Issue 29 bug 3: a client's LoRA lives on its GPU; what leaves the model (models.lora_state) is in host
    memory, so FedSRD's sparse upload (local - received, top-k, positions via numpy) and the MPI buffer work."""
    from fedsoda_mpi.comm import Schema
    from fedsoda_mpi.strategies import strategy_for

    cfg = load_config(None, ["fed.aggregator=fedsrd", "fed.upload_density=0.5", "fed.download_density=0.5"])
    with VirtualCuda():
        model = _lora_model("cuda:1")
        for p in model.parameters():
            if p.requires_grad:
                p.data.add_(0.01)  # a trained adapter: B != 0
        local = models.lora_state(model)
        assert {device_of(t) for t in local.values()} == {"cpu"}
        received = {k: torch.zeros_like(v) for k, v in local.items()}
        strategy = strategy_for(cfg, Schema.of(received))
        msgs = strategy.pack_upload(local, received)
        flat = [Schema.of(m).pack(m) for m in msgs]
        assert all(device_of(f) == "cpu" for f in flat)
        update = strategy.unpack_upload(msgs, received)
        assert all(device_of(t) == "cpu" for t in update.values())


def test_the_timing_row_reads_and_resets_the_peak_of_the_ranks_own_gpu(monkeypatch):
    """Issue 29 bug 4: /timing/peak_gpu_mb is the peak of the rank's device (cuda:3 here, not the current device
    0), per round: the peak is reset when a round starts (not before round 1, whose row includes the set-up)."""
    from fedsoda_mpi.timing import EXTRA, PHASES, PhaseClock

    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: calls.append(("peak", device)) or 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))

    class Comm:
        idle_seconds = mpi_seconds = 0.0

    gpu = torch.device("cuda", 3)
    clock = PhaseClock(Comm(), gpu)
    assert calls == []
    row = clock.row()
    assert row[len(PHASES) + EXTRA.index("peak_gpu_mb")] == 3.0 and calls == [("peak", gpu)]
    clock.start_round()
    assert calls[-1] == ("reset", gpu)
    calls.clear()
    PhaseClock(Comm(), torch.device("cpu")).row()
    assert calls == []  # the CPU: no CUDA call at all


def test_the_server_builds_m_star_on_its_own_device(virtual_loading, tiny_model_dir, tmp_path):
    """Issue 29 bug 2: with the server on a GPU, M* is built on that GPU (it was built and kept on the CPU, where
    every alignment then ran); M's and M*'s LoRA live there too, and the global adapter leaves them on the host."""
    from fedsoda_mpi.methods import Plan
    from fedsoda_mpi.runlog import RunLog
    from fedsoda_mpi.server import Server

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "fed.clients=2", "data.public_samples=8",
                             "data.val_size=20", "quant.enabled=false"])
    log = RunLog(tmp_path, 0, echo=False)
    log.open_h5(cfg, 2, cfg.model.name, mode="w")
    kept = [0, 1, 5, 6, 7, 8, 12, 16, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    plan = Plan(30, 3, kept, [(1, 4), (8, 11), (12, 15), (16, 19)], [(1, 1), (8, 5), (12, 6), (16, 7)], 0, [1, 5, 6, 7])
    with VirtualCuda():
        server = Server.load(cfg, log, torch.device("cuda", 0))
        server.build(plan)
        assert _devices(server.full) == _devices(server.sub) == {"cuda:0"}
        assert {device_of(t) for t in server.global_adapter.values()} == {"cpu"}
    assert virtual_loading == ["cuda:0", "cuda:0"]  # M, then M* (build)
    log.close()


# Algorithm 2 end to end on virtual devices (the model is loaded inside the mode: transformers builds its skeleton on
# the meta device, which tests/virtual_cuda.py leaves as it is).
@pytest.mark.parametrize("aggregator", [["fed.aggregator=fedavg"], ["fed.aggregator=fedsrd", "fed.upload_density=0.5",
                                                                     "fed.download_density=0.5"]],
                         ids=["fedavg", "fedsrd"])
def test_algorithm_2_in_one_process_with_the_server_on_cuda0_and_a_client_on_cuda1(aggregator, virtual_loading,
                                                                                  tiny_model_dir, tmp_path):
    """Issue 29 bugs 1-3 and every device line between them: the server (M and M*, issue 29 bug 2: M* on the
    server's GPU, not the CPU) on virtual cuda:0, a client on virtual cuda:1: SGP, build, pre-alignment, the
    drift probes, two rounds of local training, upload through the strategy (FedSRD: sparse upload and download
    at density 0.5), aggregation, evaluation, a checkpoint and the PEFT export. NF4 is off: bitsandbytes' kernels
    cannot run on a virtual device (the NF4 path on a GPU is what `python -m fedsoda_mpi.smoke` checks there)."""
    from fedsoda_mpi.client import Client
    from fedsoda_mpi.comm import Schema
    from fedsoda_mpi.main import prepare_inputs
    from fedsoda_mpi.runlog import RunLog
    from fedsoda_mpi.server import Server
    from fedsoda_mpi.strategies import strategy_for

    cfg = load_config(None, [f"model.name={tiny_model_dir}", "fed.clients=2", "data.max_train_per_client=4",
                             "data.public_samples=8", "data.val_size=20", "eval.max_examples=8", "quant.enabled=false",
                             "eval.dtype=bfloat16", *aggregator])
    log = RunLog(tmp_path, 0, echo=False)
    log.open_h5(cfg, 2, cfg.model.name, mode="w")
    rows, _ = prepare_inputs(cfg)
    with VirtualCuda():
        server = Server.load(cfg, log, torch.device("cuda", 0))
        plan = server.plan_layers()
        server.build(plan)
        assert _devices(server.full) == _devices(server.sub) == {"cuda:0"}
        server.pre_align()
        server.monitor.mark_aligned(0)
        assert np.isfinite(server.monitor.ref) and np.isfinite(server.probes.inter()).all()
        client = Client(cfg, 1, plan, dict(server.bundle), rows, torch.device("cuda", 1))
        assert _devices(client.sub) == {"cuda:1"}
        client.set_emulator(server.emulator_lora())
        strategy = strategy_for(cfg, Schema.of(server.global_adapter))
        held = None
        for rnd in (1, 2):
            msgs = [Schema.of(m).unpack(Schema.of(m).pack(m)) for m in strategy.download(server.global_adapter, rnd, 1)]
            held = strategy.receive(msgs, held, rnd, 1)
            client.place({0, 1})
            fits = [client.fit(k, held, rnd) for k in (0, 1)]
            uploads = [[Schema.of(m).unpack(Schema.of(m).pack(m)) for m in strategy.pack_upload(f.state, held)]
                       for f in fits]
            updates = [strategy.unpack_upload(u, server.global_adapter) for u in uploads]
            new, rejected = strategy.aggregate(updates, [float(f.n_samples) for f in fits], server.global_adapter, rnd)
            assert rejected == [] and {device_of(t) for t in new.values()} == {"cpu"}
            server.set_global(new)
            assert np.isfinite(server.monitor.after_round()) and np.isfinite(server.probes.inter()).all()
        server.re_align(2)
        assert np.isfinite(server.evaluate("full", split="val")["accuracy"])
        assert np.isfinite(server.evaluate("sub")["accuracy"])
        server.checkpoint(2)
        server.export_adapter()
        client.close()
    assert virtual_loading == ["cuda:0", "cuda:0", "cuda:1"]  # M, M* (build), the client's M* (load_bundle)

    log.close()


# ------------------------------------------------------------------- the device policy (fedsoda_mpi/devices.py)

def _seen(hosts_gpus: list[tuple[str, int]], ranks: int, bf16: bool = True):
    """Reports of `ranks` ranks placed in order over nodes (host, visible GPUs per rank), filled node by node,
    each node taking as many ranks as it has GPUs, the last node the rest; node-local ranks from 0."""
    from fedsoda_mpi.devices import Seen

    out, node = [], 0
    local = 0
    for _ in range(ranks):
        host, gpus = hosts_gpus[node]
        out.append(Seen(host, local, gpus, bf16, tuple(f"GPU{i}" for i in range(gpus))))
        local += 1
        if local == max(gpus, 1) and node < len(hosts_gpus) - 1:
            node, local = node + 1, 0
    return out


def test_two_nodes_of_four_gpus_and_eleven_ranks_share_only_the_last_nodes_gpus():
    """2 nodes x 4 GPUs, 11 ranks (every GPU visible to every rank of its node, as with mpirun): ranks 0-3 on
    node a's GPUs 0-3, ranks 4-10 on node b's GPUs 0-3 round-robin, so three of b's GPUs are shared by clients
    (warned once per GPU); rank 0 does not share."""
    from fedsoda_mpi.devices import assign

    a = assign("auto", _seen([("a", 4), ("b", 4)], 11))
    assert a.devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1", "cuda:2", "cuda:3",
                         "cuda:0", "cuda:1", "cuda:2"]
    assert len(a.warnings) == 3 and all("clients share it" in w for w in a.warnings)
    assert a.warnings[0].startswith("b cuda:0 is used by ranks 4, 8")
    assert a.table()[5] == "rank 5: b cuda:1 (GPU1)"


def test_one_node_of_eleven_gpus_gives_every_rank_its_own_gpu_and_no_warning():
    from fedsoda_mpi.devices import assign

    a = assign("cuda", _seen([("n", 11)], 11))
    assert a.devices == [f"cuda:{i}" for i in range(11)] and a.warnings == []


def test_more_ranks_than_gpus_warns_that_rank_0_shares_with_clients():
    from fedsoda_mpi.devices import assign

    a = assign("auto", _seen([("n", 2)], 5))
    assert a.devices == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert "rank 0 (the server, holding the full LLM) shares it with clients" in a.warnings[0]
    assert a.warnings[0].startswith("n cuda:0 is used by ranks 0, 2, 4")


def test_slurm_per_task_binding_gives_each_rank_its_one_visible_gpu():
    """--gpus-per-task=1: every rank sees one GPU (CUDA_VISIBLE_DEVICES) and takes it, whatever its local rank.
    All say cuda:0, but the UUIDs differ: nothing is shared. Two ranks bound to the same GPU are."""
    from fedsoda_mpi.devices import Seen, assign

    seen = [Seen("n", i, 1, True, ("A100",), (f"GPU-{i}",)) for i in range(4)]
    a = assign("cuda", seen)
    assert a.devices == ["cuda:0"] * 4 and a.warnings == []
    seen[3] = Seen("n", 3, 1, True, ("A100",), ("GPU-2",))
    assert assign("cuda", seen).warnings[0].startswith("n cuda:0 is used by ranks 2, 3: clients share it")


def test_device_cuda_with_a_rank_that_sees_no_gpu_is_one_line_naming_the_rank():
    from fedsoda_mpi.devices import DeviceError, Seen, assign

    seen = [Seen("a", 0, 1, True), Seen("b", 0, 0, True), Seen("b", 1, 0, True)]
    with pytest.raises(DeviceError, match=r"device=cuda: 2 of 3 ranks see no GPU \(rank 1 on b, rank 2 on b\)"):
        assign("cuda", seen)
    auto = assign("auto", seen)
    assert auto.devices == ["cuda:0", "cpu", "cpu"]
    assert auto.warnings == ["ranks 1, 2 see no GPU and run on the CPU while the others use GPUs; a round waits for "
                             "its slowest rank (device=cuda makes this an error)"]
    assert assign("cpu", seen).devices == ["cpu"] * 3


def test_bfloat16_on_a_gpu_without_it_is_refused_and_allowed_on_the_cpu():
    from fedsoda_mpi.devices import DeviceError, Seen, assign, bf16_keys

    cfg = load_config(None, ["eval.dtype=bfloat16", "model.dtype=bfloat16"])
    keys = bf16_keys(cfg)
    assert keys == ["model.dtype", "eval.dtype"]
    v100 = [Seen("n", 0, 1, False, ("Tesla V100",))]
    with pytest.raises(DeviceError, match="model.dtype, eval.dtype=bfloat16 but the GPU of rank 0"):
        assign("auto", v100, keys)
    assert assign("cpu", v100, keys).devices == ["cpu"]
    assert assign("auto", v100, []).devices == ["cuda:0"]


def test_seen_here_reads_torch_cuda(monkeypatch):
    """What a rank reports, from a monkeypatched torch.cuda: 4 GPUs, compute capability 7.0 (no bfloat16)."""
    from fedsoda_mpi.devices import Seen

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"V100-{i}")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"uuid": f"uuid-{i}"})())
    s = Seen.here(2)
    assert (s.local_rank, s.gpus, s.bf16, s.names[3], s.uuids[1]) == (2, 4, False, "V100-3", "uuid-1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Seen.here(0).gpus == 0


def test_activate_sets_the_current_cuda_device(monkeypatch):
    from fedsoda_mpi.devices import activate

    got = []
    monkeypatch.setattr(torch.cuda, "set_device", got.append)
    assert activate("cuda:2") == torch.device("cuda", 2) and got == [torch.device("cuda", 2)]
    assert activate("cpu") == torch.device("cpu") and len(got) == 1


@pytest.mark.mpi
def test_device_cuda_without_a_gpu_stops_every_rank_with_one_line_and_exit_2(tiny_model_dir, tmp_path):
    """device=cuda on a machine without GPUs: exit 2 before any work, one line from rank 0 naming the ranks."""
    import socket

    from tests.conftest import mpirun

    p = mpirun(3, ["-m", "fedsoda_mpi.main", f"model.name={tiny_model_dir}", "device=cuda",
                   f"output.dir={tmp_path / 'run'}"], timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-1500:])
    lines = [line for line in p.stderr.splitlines() if "fedsoda-mpi:" in line]
    host = socket.gethostname()
    assert lines == [f"fedsoda-mpi: device error: device=cuda: 3 of 3 ranks see no GPU (rank 0 on {host}, rank 1 on "
                     f"{host}, rank 2 on {host}); request one GPU per rank (e.g. sbatch --gpus-per-task=1) or run "
                     "with device=auto or device=cpu"], lines
    assert "Traceback" not in p.stderr and not (tmp_path / "run" / "run.h5").exists()


def test_tensors_leave_a_device_only_through_host_py():
    """Host staging has one home: no `.numpy()`, `.cpu()` or `.to("cpu")` in fedsoda_mpi/ outside host.py
    (docs/design.md; `.item()` and `.tolist()` give Python numbers from any device and stay allowed)."""
    import re
    from pathlib import Path

    import fedsoda_mpi

    found = [f"{p.name}:{i}: {line.strip()}" for p in sorted(Path(fedsoda_mpi.__file__).parent.glob("*.py"))
             if p.name != "host.py" for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\.(numpy|cpu)\(\)|\.to\(\s*[\"']cpu", line)]
    assert found == []


def test_evaluation_on_a_gpu_gives_the_cpu_answers(tiny_model_dir):
    """Every evaluation path on virtual cuda:0 (label likelihood on SST-2 and BoolQ, k-shot GSM8K generation with
    the shared-prefix KV cache and the stop criteria, perplexity) runs with its inputs on the model's device and
    returns what the same model returns on the CPU."""
    from fedsoda_mpi import data
    from fedsoda_mpi.evaluate import evaluate, perplexity

    model, tok = models.load_causal_lm(tiny_model_dir)
    data.ensure_pad_token(tok)
    texts = data.load_public("wikitext2", holdout=True)[:2]

    def run():
        out = {task: evaluate(model, tok, task, max_examples=4, batch_size=2, k_shot=2, max_new_tokens=6)
               for task in ("sst2", "boolq", "gsm8k")}
        return {t: (r["accuracy"], r.get("outputs", r.get("pred_counts"))) for t, r in out.items()}, \
            perplexity(model, tok, texts, max_len=32)

    expected = run()
    with VirtualCuda():
        place(model, "cuda:0")
        assert run() == expected
