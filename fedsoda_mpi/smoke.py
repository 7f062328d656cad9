"""The five-minute smoke check a cluster user runs first: does fedsoda-mpi work on THIS node's device?

    python -m fedsoda_mpi.smoke                                   # device=auto, the tiny model and SmolLM2
    python -m fedsoda_mpi.smoke --device cuda --model tiny         # refuse to fall back to the CPU
    python -m fedsoda_mpi.smoke --model tiny /path/to/hf-folder    # another (small) model folder too
    sbatch slurm/smoke.sh                                          # 3 ranks, one GPU each (the MPI step via srun)

On each model (the tiny one, built on the fly in a temporary folder; SmolLM2-135M when prepared, else SKIP with
the reason; any HF folder given by path) it runs, on the device it is given, the steps below, and then one real
round under MPI on the tiny model. Each step compares something and FAILs when it is wrong:

    nf4-bundle     the NF4 sub-LLM, built on the CPU and shipped as a bundle (models.model_bundle / load_bundle),
                   on the client's device: bitsandbytes' dequantize_4bit of every Linear4bit gives the CPU
                   side's weights within NF4_TOL x max|W| (why that tolerance: `NF4_TOL`), which are the full
                   model's within NF4's own rounding (relative Frobenius error < NF4_ERROR); how many layers
                   kept the shipped 4-bit codes byte for byte is reported (a device may repack them)
    lora-grad      LoRA on every layer of that shipped NF4 sub-LLM: every LoRA tensor of the first layer (its
                   gradient flows back through every later 4-bit layer) gets a finite, non-zero gradient, and
                   the same one (GRAD_RTOL) after a plain eval/no-grad forward: bitsandbytes' CPU trap
                   (models.fix_bnb_cpu, docs/design.md) makes exactly that gradient vanish
    fedsoda-round  Algorithm 2 in one process, server and client on the device, NF4 on: SGP (fewer layers kept),
                   build (M* NF4 on the server's device), pre-alignment (finite KL), the client loads the shipped
                   bundle on its device, fits two virtual clients (finite loss), uploads through the MPI buffer
                   format, FedAvg accepts both and moves the global adapter LoRA
    fedsrd-round   one FedSRD round (fed.upload_density = fed.download_density = 0.5) on the same server and
                   client: a sparse upload (about half the dense bytes), accepted, the global moves, and the
                   client rebuilds the server's new global from the sparse download bit for bit
    drift-probe    Server.drift() (the aligned layers' angular distances: finite, in [0, 1]) and the output drift
                   probe (KL(M || M*) on the held-out batch: finite, >= 0), both on the server's device
    plug-in        Algorithm 2 line 22: the full LLM holds the global adapter (exactly); its evaluation on a few
                   test rows gives an accuracy in [0, 1]; the exported PEFT adapter, loaded by PEFT onto a fresh
                   copy of the full LLM, reproduces the plugged model's logits, which differ from the base model's
    mpi-round      `mpirun -n 3 python -m mpi4py -m fedsoda_mpi.main` (inside a Slurm job: srun, as
                   slurm/common.sh launches) on the tiny model, fed.rounds=1, device=<the setting>: exit 0, one
                   round and /final in run.h5, and /devices read back: every rank on the device the setting
                   asks for (cuda everywhere when this node has a GPU and the setting is auto or cuda)

Output: one line per step, `PASS <model>/<step> <seconds>s <device> peak <MiB> <kind>: <what was compared>` or
`FAIL <model>/<step>: <one-line reason>` (`SKIP ...` for a model that is not there); the MPI step adds one line
per rank (its device, host and peak memory). Peak memory: on a GPU torch.cuda.max_memory_allocated of each device
the step used, reset before the step ("cuda"); on the CPU the process's peak resident set size so far ("rss",
ru_maxrss: a high-water mark of the whole process, not of the step alone). The first failure ends the check
with exit code 1 (2: the device setting cannot hold, e.g. --device cuda without a GPU); a last line sums up.
Times measured on the project's 2-core CPU machine: docs/design.md, "Smoke check" (tiny model on the CPU: 2-3 min,
most of it the MPI round; with SmolLM2 about 7 min; on a GPU node the model steps take seconds).
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .host import to_host

STEPS = ("nf4-bundle", "lora-grad", "fedsoda-round", "fedsrd-round", "drift-probe", "plug-in")
MPI_STEP = "mpi-round"
MPI_RANKS = 3
SMOLLM2 = "smollm2-135m"

# nf4-bundle: |dequantized on the target - dequantized on the CPU| <= NF4_TOL x max|W| per layer. Both sides hold
# the same shipped bytes (4-bit codes, 8-bit absmax, the nested absmax and code books), and a weight is
# code[q] x absmax, with the absmax itself dequantized (double quant: code2[q2] x absmax2 + offset) in float32: the
# same products, on a GPU possibly fused (FMA) or in another order, so the two sides agree to a few float32 ulps
# (~1e-7 relative). A wrong code book, block size, absmax or quant type is off by the weights' own size (>= 1e-2).
NF4_TOL = 1e-6
NF4_ERROR = 0.2  # NF4 vs the full model's weights (relative Frobenius): ~0.09-0.1 measured, garbage gives ~1
GRAD_RTOL = 1e-3  # lora-grad: the same forward twice (no dropout); float32, the GPU's kernels need not be bitwise
PLUGIN_RTOL = 1e-4  # plug-in: exported-and-reloaded adapter vs the plugged one, max |logit diff| / max |logit|
TRAIN = ["fed.clients=2", "data.max_train_per_client=4", "data.public_samples=8", "data.val_size=20",
         "eval.max_examples=8", "eval.batch_size=4", "fed.local_steps=2", "fed.lr=1e-3", "oda.pre_epochs=1",
         "quant.enabled=true", "model.dtype=float32", "eval.dtype=float32"]
FEDSRD = ["fed.aggregator=fedsrd", "fed.upload_density=0.5", "fed.download_density=0.5"]
MPI_RUN = ["fed.rounds=1", "oda.re_align=false", "eval.base=false"]


class SmokeFailure(Exception):
    """A step found something wrong; the message is its one-line reason."""


@dataclass
class Outcome:
    """What a passing step reports beyond its time: what it compared, extra lines (the MPI round's ranks), and,
    for a step whose work ran in other processes, their devices and peak memory instead of this process's."""
    detail: str
    lines: list = field(default_factory=list)
    where: str = ""
    peak: str = ""


def check(ok, reason: str) -> None:
    """Fail the step with `reason` unless `ok`."""
    if not ok:
        raise SmokeFailure(reason)


# ------------------------------------------------------------------------------------------------- devices

@dataclass(frozen=True)
class Devices:
    """The device setting and where the in-process steps run: the server (M, M*) and the client (the shipped
    M*); with two or more GPUs visible they are different GPUs, so a tensor on the wrong one fails here."""
    setting: str
    server: torch.device
    client: torch.device


def resolve_devices(setting: str) -> Devices:
    """`--device` as this process sees it (devices.py's rule for one process): cpu, cuda (SmokeFailure without a
    visible GPU) or auto (cuda when torch sees a GPU). With several GPUs the client takes cuda:1."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if setting == "cuda" and gpus == 0:
        raise SmokeFailure(f"--device cuda but torch {torch.__version__} sees no GPU (torch.cuda.is_available() is "
                           f"{torch.cuda.is_available()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"
                           f", torch built for CUDA {torch.version.cuda}); run on a GPU node, or use --device auto|cpu")
    if setting == "cpu" or gpus == 0:
        return Devices(setting, torch.device("cpu"), torch.device("cpu"))
    return Devices(setting, torch.device("cuda", 0), torch.device("cuda", min(1, gpus - 1)))


def describe(d: torch.device) -> str:
    """cuda:i (name, compute capability, total memory) or cpu (cores)."""
    if d.type != "cuda":
        return f"cpu ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"
    p = torch.cuda.get_device_properties(d)
    return f"{d} ({p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB)"


class PeakMemory:
    """Peak memory of a step: torch.cuda.max_memory_allocated of each CUDA device used (reset at the start), or the
    process's peak RSS (ru_maxrss, a process-wide high-water mark) on the CPU."""

    def __init__(self, devices: tuple[torch.device, ...]):
        self.cuda = list(dict.fromkeys(d for d in devices if d.type == "cuda"))
        for d in self.cuda:
            torch.cuda.reset_peak_memory_stats(d)

    def read(self) -> str:
        """"<MiB>[,<MiB>...] MiB cuda" or "<MiB> MiB rss"."""
        if self.cuda:
            return ",".join(f"{torch.cuda.max_memory_allocated(d) / 2**20:.0f}" for d in self.cuda) + " MiB cuda"
        from .timing import peak_rss_mb

        return f"{peak_rss_mb():.0f} MiB rss"


def free_memory() -> None:
    """Give memory back between models (GPU caches too)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- one model's run

@dataclass
class ModelRun:
    """One model's in-process steps and what they hand on to each other (the shipped bundle, the server and the
    client of the FedSODA round). `work` is a temporary folder owned by the caller."""
    name: str
    path: Path
    devices: Devices
    work: Path
    bundle: dict = field(default_factory=dict)
    kept: list = field(default_factory=list)
    server: object = None
    client: object = None
    log: object = None
    rows: list = field(default_factory=list)
    overrides: list = field(default_factory=list)

    def config(self, extra: list[str] = ()):
        """The smoke round's config (TRAIN on this model and device, run folder in `work`)."""
        from .config import load_config
        from .validation import validate

        cfg = load_config(None, [f"model.name={self.path}", f"device={self.devices.setting}", *TRAIN,
                                 f"output.dir={self.work / 'run'}", *self.overrides, *extra])
        validate(cfg)
        return cfg

    def close(self) -> None:
        """Drop the models, remove the client's folders, close run.h5."""
        if self.client is not None:
            self.client.close()
        if self.log is not None:
            self.log.close()
        self.server = self.client = self.log = None
        self.bundle = {}
        free_memory()


def linear4bit(model) -> dict:
    """{module name (without PEFT's prefix): Linear4bit} of a model."""
    import bitsandbytes as bnb

    return {re.sub(r"^(base_model\.model\.)", "", n): m for n, m in model.named_modules()
            if isinstance(m, bnb.nn.Linear4bit)}


def dequantized(module) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit of a Linear4bit's weight, on the weight's own device, as float32 on the host."""
    from bitsandbytes.functional import dequantize_4bit

    w = module.weight
    return to_host(dequantize_4bit(w.data, w.quant_state).float())


def kept_layers(n: int) -> list[int]:
    """A sub-LLM's layers for the bundle check: every other layer and the last one (renumbered on the way)."""
    return sorted(set(range(0, n, 2)) | {n - 1})


def step_nf4_bundle(run: ModelRun) -> str:
    """The CPU-built NF4 bundle, loaded on the client's device, dequantizes to the CPU side's weights."""
    from . import models

    full, tok = models.load_causal_lm(run.path, "float32", "cpu")
    layers = len(models.get_layers(full))
    run.kept = kept_layers(layers)
    sub = models.build_sub_model(full, run.kept, quantize=True, device="cpu")
    run.bundle = models.model_bundle(sub, tok)
    target, _ = models.load_bundle(run.bundle, run.work / "nf4-bundle", str(run.devices.client))
    cpu_side, far = linear4bit(sub), linear4bit(target)
    check(cpu_side, "the sub-LLM built with quantize=True has no Linear4bit layer (NF4 is not on)")
    check(far.keys() == cpu_side.keys(), f"{len(far)} Linear4bit layers on the target, {len(cpu_side)} on the CPU "
          f"side (e.g. {sorted(set(cpu_side) ^ set(far))[:1]})")
    full_state, worst, worst_err, same_codes = full.state_dict(), 0.0, 0.0, 0
    for name, here in cpu_side.items():
        there = far[name]
        check(there.weight.device == run.devices.client, f"{name}: weight on {there.weight.device}, not on "
              f"{run.devices.client}")
        same_codes += torch.equal(to_host(here.weight.data), to_host(there.weight.data))  # reported, not required: a
        # device may keep another layout of the same weights; what must hold is what they dequantize to
        a, b = dequantized(here), dequantized(there)
        diff = float((a - b).abs().max()) / max(float(a.abs().max()), 1e-30)
        check(diff <= NF4_TOL, f"{name}: dequantized on {run.devices.client} differs from the CPU side by "
              f"{diff:.2e} x max|W| > {NF4_TOL:g}")
        j = int(re.search(r"\.layers\.(\d+)\.", name).group(1))
        orig = full_state[re.sub(r"\.layers\.\d+\.", f".layers.{run.kept[j]}.", name, count=1) + ".weight"].float()
        err = float((a - orig).norm() / orig.norm())
        check(err < NF4_ERROR, f"{name}: the NF4 weights are {err:.3f} (relative) from the full model's, "
              f"expected < {NF4_ERROR} (NF4 rounding is ~0.1)")
        worst, worst_err = max(worst, diff), max(worst_err, err)
    del full, sub, target
    return (f"{len(cpu_side)} Linear4bit layers of {len(run.kept)}/{layers} kept layers: dequantized max diff "
            f"{worst:.1e} x max|W| (<= {NF4_TOL:g}), packed codes identical in {same_codes}/{len(cpu_side)}, NF4 "
            f"error <= {worst_err:.3f}")


def lora_grads(model, batch: dict, first: dict) -> dict[str, torch.Tensor]:
    """Gradients (host copies) of the LoRA tensors in `first` after one training forward/backward."""
    model.train()
    for p in first.values():
        p.grad = None
    model(**batch).loss.backward()
    return {n: (to_host(p.grad.float()) if p.grad is not None else torch.zeros(p.shape)) for n, p in first.items()}


def step_lora_grad(run: ModelRun) -> str:
    """LoRA gradients through the 4-bit layers are non-zero on the client's device, and unchanged by a plain
    eval/no-grad forward in between (the bitsandbytes CPU trap)."""
    from . import models

    check(run.bundle, "no bundle: nf4-bundle did not run")
    sub, _ = models.load_bundle(run.bundle, run.work / "lora-grad", str(run.devices.client))
    layers = len(models.get_layers(sub))
    torch.manual_seed(0)
    model = models.add_lora(sub, range(layers), r=8, alpha=16, dropout=0.0)
    models.set_trainable(model, range(layers))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # PEFT starts B at 0, which would zero every lora_A gradient
                p.copy_((0.02 * torch.randn(p.shape, generator=gen)).to(p.device, p.dtype))
    first = {n.replace("base_model.model.", "", 1): p for n, p in model.named_parameters()
             if p.requires_grad and ".layers.0." in n}
    check(first and len(linear4bit(model)) > 0, f"{len(first)} LoRA tensors in layer 0, "
          f"{len(linear4bit(model))} Linear4bit layers: nothing to check")
    vocab = models.causal_lm(model).config.vocab_size
    ids = torch.randint(3, vocab, (2, 16), generator=gen).to(run.devices.client)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = lora_grads(model, batch, first)
    for n, g in before.items():
        check(torch.isfinite(g).all() and g.abs().max() > 0, f"{n}: LoRA gradient through the 4-bit layers is "
              f"{'zero' if torch.isfinite(g).all() else 'not finite'} on {run.devices.client}")
    model.eval()
    with torch.no_grad():  # what generate(), evaluation and the emulator cache do
        model(input_ids=ids, attention_mask=batch["attention_mask"])
    after = lora_grads(model, batch, first)
    worst = 0.0
    for n, g in after.items():
        check(torch.isfinite(g).all(), f"{n}: the LoRA gradient is not finite after an eval/no-grad forward")
        check(g.abs().max() > 0, f"{n}: the LoRA gradient vanished after an eval/no-grad forward (the bitsandbytes "
              "CPU trap: models.fix_bnb_cpu not applied)")
        rel = float((g - before[n]).norm() / before[n].norm())
        check(rel <= GRAD_RTOL, f"{n}: the LoRA gradient changed by {rel:.2e} (relative) after an eval/no-grad "
              f"forward, > {GRAD_RTOL:g}")
        worst = max(worst, rel)
    del model, sub
    return (f"{len(first)} LoRA tensors of layer 0 (below {layers - 1} NF4 layers): non-zero gradients, "
            f"the same after an eval/no-grad forward (max change {worst:.1e} <= {GRAD_RTOL:g})")


def through_buffers(msgs: list[dict]) -> list[dict]:
    """Messages as MPI moves them: packed into one flat host buffer by their Schema and unpacked."""
    from .comm import Schema

    return [Schema.of(m).unpack(Schema.of(m).pack(m)) for m in msgs]


def message_bytes(msgs: list[dict]) -> int:
    """Bytes of messages in their MPI buffers."""
    return sum(v.numel() * v.element_size() for m in msgs for v in m.values())


def one_round(run: ModelRun, strategy, rnd: int) -> tuple[dict, list, list[dict]]:
    """Download, fit both virtual clients on the client, upload (through MPI buffers), aggregate. Returns (the new
    global adapter LoRA, the fits, the uploaded messages of the first client); SmokeFailure on a non-finite
    loss, a rejected update, or a global that did not move."""
    server, client = run.server, run.client
    old = server.global_adapter
    held = strategy.receive(through_buffers(strategy.download(old, rnd, 1)), None, rnd, 1)
    client.place({0, 1})
    fits = [client.fit(k, held, rnd) for k in (0, 1)]
    for k, f in enumerate(fits):
        check(f.steps > 0 and np.isfinite(f.loss), f"client {k}: {f.steps} local steps, loss {f.loss}")
    uploads = [through_buffers(strategy.pack_upload(f.state, held)) for f in fits]
    updates = [strategy.unpack_upload(u, old) for u in uploads]
    new, rejected = strategy.aggregate(updates, [float(f.n_samples) for f in fits], old, rnd)
    check(new is not None and not rejected, f"the aggregation rejected clients {rejected} (non-finite updates)")
    check(all(torch.isfinite(t).all() for t in new.values()), "the new global adapter LoRA is not finite")
    moved = sum(not torch.equal(new[k], old[k]) for k in new)
    check(moved > 0, "the aggregation left the global adapter LoRA unchanged")
    return new, fits, uploads[0]


def step_fedsoda_round(run: ModelRun) -> str:
    """One in-process FedSODA round, server and client on the device, NF4 on, FedAvg."""
    from .client import Client
    from .comm import Schema
    from .main import prepare_inputs
    from .runlog import RunLog
    from .server import Server
    from .strategies import strategy_for

    cfg = run.config()
    run.log = RunLog(run.work / "run", 0, echo=False)
    run.log.open_h5(cfg, 2, cfg.model.name, mode="w")
    run.rows = prepare_inputs(cfg)[0]
    server = run.server = Server.load(cfg, run.log, run.devices.server)
    plan = server.plan_layers()
    check(plan.sub_layers < plan.num_layers, f"SGP kept all {plan.num_layers} layers")
    server.build(plan)
    check(linear4bit(server.sub), "the server's M* has no Linear4bit layer (quant.enabled=true)")
    where = {str(p.device) for p in [*server.full.parameters(), *server.sub.parameters()]}
    check(where == {str(run.devices.server)}, f"the server's M and M* are on {sorted(where)}, not on "
          f"{run.devices.server}")
    server.pre_align()
    server.mark_aligned(0)
    kl = run.log.attrs("oda/pre")
    check(np.isfinite(kl.get("kl_before", np.nan)) and np.isfinite(kl.get("kl_after", np.nan)),
          f"pre-alignment KL(M || M*) {kl.get('kl_before')} -> {kl.get('kl_after')}")
    client = run.client = Client(cfg, 1, plan, server.release_bundle(), run.rows, run.devices.client)
    where = {str(p.device) for p in client.sub.parameters()}
    check(where == {str(run.devices.client)} and linear4bit(client.sub),
          f"the client's M* is on {sorted(where)} with {len(linear4bit(client.sub))} Linear4bit layers")
    client.set_emulator(server.emulator_lora())
    new, fits, _ = one_round(run, strategy_for(cfg, Schema.of(server.global_adapter)), 1)
    server.set_global(new)
    return (f"SGP kept {plan.sub_layers}/{plan.num_layers} layers, pre-alignment KL {kl['kl_before']:.3f} -> "
            f"{kl['kl_after']:.3f}, 2 clients x {fits[0].steps} steps, loss {np.mean([f.loss for f in fits]):.3f}, "
            "FedAvg accepted both")


def step_fedsrd_round(run: ModelRun) -> str:
    """One FedSRD round at upload and download density 0.5 on the fedsoda-round's server and client."""
    from .comm import Schema
    from .fedsrd import factor_for_round
    from .strategies import strategy_for

    check(run.server is not None and run.client is not None, "no server and client: fedsoda-round did not run")
    cfg = run.config(FEDSRD)
    strategy = strategy_for(cfg, Schema.of(run.server.global_adapter))
    dense = message_bytes([run.server.global_adapter])
    new, fits, upload = one_round(run, strategy, 1)
    up = message_bytes(upload)
    check(up <= 0.6 * dense, f"the upload at density 0.5 is {up} bytes, {up / dense:.2f} of the dense {dense}")
    down = through_buffers(strategy.download(new, 2, 1))  # round 2 downloads round 1's sparse update
    held = strategy.receive(down, run.server.global_adapter, 2, 1)
    check(all(torch.equal(held[k], new[k]) for k in new), "the client's global after the sparse download differs "
          "from the server's")
    factor = factor_for_round(1)  # the one factor round 1 updates and round 2 downloads
    part = message_bytes([{k: v for k, v in new.items() if f"lora_{factor}" in k}])
    down_bytes = message_bytes(down)
    check(down_bytes <= 0.6 * part, f"the sparse download at density 0.5 is {down_bytes} bytes, "
          f"{down_bytes / part:.2f} of the dense lora_{factor} bytes {part}")
    run.server.set_global(new)
    return (f"loss {np.mean([f.loss for f in fits]):.3f}; upload {up / dense:.2f} of the dense bytes, download "
            f"{down_bytes / part:.2f} of the dense lora_{factor}; the client rebuilt the new global bit for bit")


def step_drift_probe(run: ModelRun) -> str:
    """Server.drift() and the output drift probe, on the server's device, are finite and in range."""
    server = run.server
    check(server is not None, "no server: fedsoda-round did not run")
    drift = server.drift()
    pairs = server.plan.align_pairs
    check(len(drift) == len(pairs) > 0, f"{len(drift)} drift values for {len(pairs)} aligned layer pairs")
    check(np.isfinite(drift).all() and (drift >= 0).all() and (drift <= 1).all(),
          f"angular distances {np.round(drift, 4).tolist()} not finite or outside [0, 1]")
    probe = server.probe_round()
    check(np.isfinite(probe) and probe >= 0, f"output drift probe KL(M || M*) = {probe}")
    check(np.isfinite(server.drift_ref), f"the probe's reference after pre-alignment is {server.drift_ref}")
    return (f"{len(drift)} aligned pairs, angular distance {drift.min():.4f}..{drift.max():.4f}; output probe "
            f"KL {probe:.4f} (after pre-alignment {server.drift_ref:.4f})")


def logits_of(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Float32 host logits of a batch (eval mode, no grad)."""
    from . import models

    with models.mode(model), torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return to_host(out.logits.float())


def step_plug_in(run: ModelRun) -> str:
    """Algorithm 2 line 22 and the final evaluation: the plugged-in adapter, its accuracy on a few rows, and the
    exported PEFT adapter reproducing the plugged model."""
    from peft import PeftModel

    from . import models

    server = run.server
    check(server is not None, "no server: fedsoda-round did not run")
    plan, device = server.plan, run.devices.server
    plugged = models.remap_layers(models.lora_state(server.full, plan.adapter_full), plan.full_to_sub)
    check(plugged.keys() == server.global_adapter.keys() and
          all(torch.equal(plugged[k], server.global_adapter[k]) for k in plugged),
          "the full LLM's adapter LoRA is not the global adapter LoRA")
    res = server.evaluate("full", split="test")
    check(res["n"] > 0 and 0 <= res["accuracy"] <= 1, f"evaluation of the full LLM: accuracy {res['accuracy']} "
          f"on {res['n']} rows")
    out = server.export_adapter()
    batch = server.probe[0]
    mine = logits_of(server.full, batch, device)
    with server.full.disable_adapter():
        base = logits_of(server.full, batch, device)
    fresh, _ = models.load_causal_lm(run.path, server.cfg.model.dtype, str(device))
    reloaded = logits_of(PeftModel.from_pretrained(fresh, str(out)).to(device), batch, device)
    scale = float(mine.abs().max())
    diff, effect = float((reloaded - mine).abs().max()) / scale, float((base - mine).abs().max()) / scale
    check(diff <= PLUGIN_RTOL, f"the exported adapter, reloaded by PEFT, gives logits {diff:.2e} x max|logit| "
          f"away from the plugged model's (> {PLUGIN_RTOL:g})")
    check(effect > 10 * max(diff, 1e-7), f"the plugged adapter changes the logits by only {effect:.2e} x max|logit|: "
          "the plug-in check would not see a missing adapter")
    del fresh, reloaded
    return (f"accuracy {res['accuracy']:.3f} on {res['n']} test rows; exported adapter reproduces the plugged "
            f"logits to {diff:.1e} (adapter effect {effect:.1e}) x max|logit|")


STEP_FUNCS = {"nf4-bundle": step_nf4_bundle, "lora-grad": step_lora_grad, "fedsoda-round": step_fedsoda_round,
              "fedsrd-round": step_fedsrd_round, "drift-probe": step_drift_probe, "plug-in": step_plug_in}
STEP_DEVICES = {"nf4-bundle": ("client",), "lora-grad": ("client",), "fedsoda-round": ("server", "client"),
                "fedsrd-round": ("server", "client"), "drift-probe": ("server",), "plug-in": ("server",)}


# --------------------------------------------------------------------------------------------- the MPI round

def launcher(kind: str, n: int) -> list[str]:
    """The MPI launch prefix, as slurm/common.sh's fedsoda_step builds it: srun (the job's allocation, PMIx) or
    the mpirun next to this Python (its MPI is the one mpi4py loads; --bind-to none inside a Slurm job);
    auto = srun inside a Slurm job with at least n tasks, else mpirun."""
    if kind == "auto":
        kind = "srun" if int(os.environ.get("SLURM_NTASKS", "0") or 0) >= n and shutil.which("srun") else "mpirun"
    if kind == "srun":
        return ["srun", "--mpi=pmix", "--kill-on-bad-exit=1", "-n", str(n)]
    if kind != "mpirun":
        raise SmokeFailure(f"--launcher must be auto, srun or mpirun, got {kind!r}")
    mpirun = Path(sys.executable).parent / "mpirun"
    cmd = [str(mpirun) if mpirun.exists() else "mpirun", "-n", str(n)]
    return cmd + (["--bind-to", "none"] if os.environ.get("SLURM_JOB_ID") else [])


def mpi_env() -> dict:
    """This environment plus what a smoke round wants from Open MPI: idle ranks yield, more ranks than cores
    allowed, no progress bars."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEDSODA_PROGRESS": "0", "HDF5_USE_FILE_LOCKING": "FALSE"}
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    env.setdefault("PMIX_MCA_psec", "native")
    return env


def expected_device(setting: str, devices: Devices) -> str:
    """The device type every rank must report: cpu for --device cpu, cuda for cuda, and for auto what this node
    offers (a Slurm task with --gpus-per-task sees its GPU; mpirun's ranks see the node's)."""
    return "cpu" if setting == "cpu" or devices.server.type == "cpu" else "cuda"


def read_mpi_run(run_h5: Path) -> dict:
    """What the MPI round recorded: rounds, train loss, /final, and per rank its device, host, peak GPU and RSS."""
    import h5py

    with h5py.File(run_h5, "r") as f:
        dev = f["devices"].attrs if "devices" in f else {}
        timing = f["timing"] if "timing" in f else {}
        return {"rounds": f["rounds/round"][:].tolist() if "rounds/round" in f else [],
                "loss": f["rounds/train_loss"][:].tolist() if "rounds/train_loss" in f else [],  # [round][client]
                "final": "final" in f, "accuracy": float(f["final"].attrs.get("accuracy", np.nan)) if "final" in f else np.nan,
                "device": [str(d) for d in dev.get("device", [])], "host": [str(h) for h in dev.get("host", [])],
                "peak_gpu_mb": timing["peak_gpu_mb"][-1].tolist() if "peak_gpu_mb" in timing else [],
                "peak_rss_mb": timing["peak_rss_mb"][-1].tolist() if "peak_rss_mb" in timing else []}


def check_mpi_run(got: dict, want: str) -> list[str]:
    """SmokeFailure unless the MPI round's record is complete and every rank ran on `want`; one line per rank."""
    check(got["rounds"] == [1] and got["final"], f"run.h5 holds rounds {got['rounds']}, /final "
          f"{'present' if got['final'] else 'missing'}")
    check(len(got["loss"]) == 1 and np.isfinite(got["loss"][0]).all(), f"train loss per client {got['loss']}")
    check(0 <= got["accuracy"] <= 1, f"final accuracy {got['accuracy']}")
    check(len(got["device"]) == MPI_RANKS, f"/devices lists {len(got['device'])} ranks, expected {MPI_RANKS}")
    wrong = [f"rank {r} on {d}" for r, d in enumerate(got["device"]) if d.split(":")[0] != want]
    check(not wrong, f"{', '.join(wrong)}; expected every rank on {want}")
    lines = []
    for r, d in enumerate(got["device"]):
        host = got["host"][r] if r < len(got["host"]) else "?"
        rss = "" if d == "cpu" else f" (host: {_at(got['peak_rss_mb'], r):.0f} MiB rss)"
        lines.append(f"  rank {r} ({'server' if r == 0 else 'client'}): {d} on {host}, peak {rank_peak(got, r)} MiB "
                     f"{'cuda' if d != 'cpu' else 'rss'}{rss}")
    return lines


def _at(values: list, i: int) -> float:
    return values[i] if i < len(values) else float("nan")


def rank_peak(got: dict, r: int) -> str:
    """Rank r's peak of round 1 in MiB: /timing/peak_gpu_mb on a GPU, /timing/peak_rss_mb on the CPU."""
    return f"{_at(got['peak_gpu_mb'] if got['device'][r] != 'cpu' else got['peak_rss_mb'], r):.0f}"


def step_mpi_round(tiny: Path, devices: Devices, work: Path, launch: str, timeout: float) -> Outcome:
    """One real round under MPI with MPI_RANKS ranks on the tiny model, its ranks' devices and peaks from run.h5."""
    out, prefix = work / "mpi-run", launcher(launch, MPI_RANKS)
    cmd = [*prefix, sys.executable, "-m", "mpi4py", "-m", "fedsoda_mpi.main",
           f"model.name={tiny}", f"device={devices.setting}", *TRAIN, *MPI_RUN, f"output.dir={out}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env())
    except subprocess.TimeoutExpired:
        raise SmokeFailure(f"{' '.join(cmd[:6])} ... did not finish in {timeout:.0f}s") from None
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        said = next((ln for ln in lines if "fedsoda-mpi:" in ln or "Error" in ln), lines[-1] if lines else "")
        (work / "mpi-round.log").write_text(res.stdout + res.stderr)
        raise SmokeFailure(f"exit {res.returncode} of `{' '.join(cmd[:len(prefix) + 5])} ...`: "
                           f"{said.strip()[:300]}")
    check((out / "run.h5").is_file(), f"no run.h5 in {out}")
    got = read_mpi_run(out / "run.h5")
    lines = check_mpi_run(got, expected_device(devices.setting, devices))
    kind = "cuda" if got["device"][0] != "cpu" else "rss"
    return Outcome(f"{MPI_RANKS} ranks ({Path(prefix[0]).name}) exited 0, round 1 train loss {np.mean(got['loss'][0]):.3f}, final accuracy "
                   f"{got['accuracy']:.3f}, /devices read back",
                   lines, where=",".join(got["device"]),
                   peak=",".join(rank_peak(got, r) for r in range(len(got["device"]))) + f" MiB {kind}")


# -------------------------------------------------------------------------------------------------- driver

class Report:
    """Prints the step lines and keeps the outcome."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.passed, self.skipped, self.failed = [], [], None

    def say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def run(self, step: str, devices: tuple[torch.device, ...], fn) -> bool:
        """Run one step: PASS line (seconds, devices, peak memory, what it compared) or FAIL line; False on FAIL."""
        meter, t0 = PeakMemory(devices), time.perf_counter()
        try:
            out = fn()
        except SmokeFailure as e:
            return self.fail(step, str(e))
        except Exception as e:  # noqa: BLE001 - any error of the code under test is the step's failure
            if os.environ.get("FEDSODA_SMOKE_TRACEBACK") == "1":
                import traceback

                traceback.print_exc()
            first = (str(e).strip().splitlines() or ["no detail"])[0][:300]
            return self.fail(step, f"{type(e).__name__}: {first}")
        out = out if isinstance(out, Outcome) else Outcome(out)
        where = out.where or ",".join(dict.fromkeys(str(d) for d in devices))
        self.say(f"PASS {step} {time.perf_counter() - t0:.1f}s {where} peak {out.peak or meter.read()}: {out.detail}")
        for line in out.lines:
            self.say(line)
        self.passed.append(step)
        return True

    def fail(self, step: str, reason: str) -> bool:
        self.failed = step
        self.say(f"FAIL {step}: {reason}")
        return False

    def skip(self, step: str, reason: str) -> None:
        self.skipped.append(step)
        self.say(f"SKIP {step}: {reason}")


def model_folders(names: list[str], work: Path, report: Report) -> list[tuple[str, Path]]:
    """(label, folder) of each --model: tiny (built now in `work`), smollm2 (the prepared folder, or SKIP with the
    reason), or a path to an HF model folder."""
    from .paths import model_path

    out = []
    for name in names:
        if name == "tiny":
            out.append(("tiny", tiny_model(work)))
        elif name == "smollm2":
            folder = model_path(SMOLLM2)
            if (folder / "config.json").is_file():
                out.append(("smollm2", folder))
            else:
                report.skip("smollm2", f"not prepared ({folder} has no config.json): run `python -m "
                                       f"fedsoda_mpi.prepare model {SMOLLM2}` on a machine with internet first")
        else:
            out.append((Path(name).name, Path(name).expanduser()))
    return out


def tiny_model(work: Path) -> Path:
    """The tiny SmolLM2-shaped model (fedsoda_mpi/tiny.py), built once per check in `work`."""
    from .tiny import build_model

    folder = work / "tiny-llama"
    return folder if (folder / "config.json").is_file() else build_model(folder, "llama")


def run_model(label: str, folder: Path, devices: Devices, work: Path, report: Report) -> bool:
    """The six in-process steps on one model; False at the first failure."""
    run = ModelRun(label, folder, devices, work / label)
    run.work.mkdir(parents=True, exist_ok=True)
    try:
        for step in STEPS:
            used = tuple(getattr(devices, w) for w in STEP_DEVICES[step])
            if not report.run(f"{label}/{step}", used, lambda s=step: STEP_FUNCS[s](run)):
                return False
        return True
    finally:
        run.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fedsoda_mpi.smoke", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                    help="where the steps run (the run's `device` setting) [auto]")
    ap.add_argument("--model", nargs="+", default=["tiny", "smollm2"], metavar="tiny|smollm2|PATH",
                    help="models of the in-process steps [tiny smollm2]; the MPI round always uses the tiny one")
    ap.add_argument("--launcher", choices=("auto", "srun", "mpirun"), default="auto",
                    help="how the MPI round starts its ranks [auto: srun inside a Slurm job, else mpirun]")
    ap.add_argument("--no-mpi", action="store_true", help="skip the MPI round (says SKIP)")
    ap.add_argument("--mpi-timeout", type=float, default=600, help="seconds the MPI round may take [600]")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (models, run folders, logs)")
    return ap.parse_args(argv)


def quiet() -> None:
    """No progress bars (ODA's, transformers' weight loading) and only transformers' errors: the step lines are
    the output (warnings still reach stderr)."""
    os.environ.setdefault("FEDSODA_PROGRESS", "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None, stream=None) -> int:
    """Run the check; 0 when every step passed (SKIPs allowed), 1 at the first FAIL, 2 when --device cannot hold."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet()
    report, t0 = Report(stream), time.perf_counter()
    try:
        devices = resolve_devices(args.device)
    except SmokeFailure as e:
        report.fail("device", str(e))
        return 2
    from . import devices as policy

    policy.activate(str(devices.server))
    report.say(f"smoke: --device {args.device}: server {describe(devices.server)}, client {describe(devices.client)}"
               f"; peak = {'torch.cuda.max_memory_allocated per device' if devices.server.type == 'cuda' else 'process peak RSS (ru_maxrss)'}")
    work = Path(tempfile.mkdtemp(prefix="fedsoda-smoke-"))
    try:
        ok = all_steps(args, devices, work, report)
    finally:
        if args.keep:
            report.say(f"smoke: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    skipped = f" ({len(report.skipped)} skipped: {', '.join(report.skipped)})" if report.skipped else ""
    if not ok:
        report.say(f"smoke: FAILED at {report.failed} after {seconds:.0f}s ({len(report.passed)} steps passed)")
        return 1
    report.say(f"smoke: all {len(report.passed)} steps passed in {seconds:.0f}s{skipped}")
    return 0


def all_steps(args, devices: Devices, work: Path, report: Report) -> bool:
    """Every model's in-process steps, then the MPI round; False at the first failure."""
    for label, folder in model_folders(args.model, work, report):
        if not run_model(label, folder, devices, work, report):
            return False
    if args.no_mpi:
        report.skip(f"tiny/{MPI_STEP}", "--no-mpi")
        return True
    return report.run(f"tiny/{MPI_STEP}", (), lambda: step_mpi_round(tiny_model(work), devices, work,
                                                                     args.launcher, args.mpi_timeout))


if __name__ == "__main__":
    sys.exit(main())
