"""The smoke check's in-process steps on one model (`python -m fedsoda_mpi.smoke`, whose docstring says what each
compares): the NF4 bundle, LoRA gradients through the 4-bit layers, a FedSODA and a FedSRD round with server and
client in this process, the drift probes, the plug-in and the exported adapter."""
from __future__ import annotations

import gc
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .host import to_host

STEPS = ("nf4-bundle", "lora-grad", "fedsoda-round", "fedsrd-round", "drift-probe", "plug-in")

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


@dataclass(frozen=True)
class Devices:
    """The device setting and where the in-process steps run: the server (M, M*) and the client (the shipped
    M*); with two or more GPUs visible they are different GPUs, so a tensor on the wrong one fails here."""
    setting: str
    server: torch.device
    client: torch.device


def free_memory() -> None:
    """Give memory back between models (GPU caches too)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    server.monitor.mark_aligned(0)
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
    """The L_inter drift probe and the output drift probe, on the server's device, are finite and in range."""
    server = run.server
    check(server is not None, "no server: fedsoda-round did not run")
    drift = server.probes.inter()
    pairs = server.plan.align_pairs
    check(len(drift) == len(pairs) > 0, f"{len(drift)} drift values for {len(pairs)} aligned layer pairs")
    check(np.isfinite(drift).all() and (drift >= 0).all() and (drift <= 1).all(),
          f"angular distances {np.round(drift, 4).tolist()} not finite or outside [0, 1]")
    probe = server.monitor.after_round()
    check(np.isfinite(probe) and probe >= 0, f"output drift probe KL(M || M*) = {probe}")
    check(np.isfinite(server.monitor.ref), f"the probe's reference after pre-alignment is {server.monitor.ref}")
    return (f"{len(drift)} aligned pairs, angular distance {drift.min():.4f}..{drift.max():.4f}; output probe "
            f"KL {probe:.4f} (after pre-alignment {server.monitor.ref:.4f})")


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
    batch = server.texts.probe[0]
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
