"""Peak device memory of rank 0 (server) and of a client rank, per job and method, for planning GPU sizes; and a
check of the same formulas against the tensor bytes a CPU run really allocates.

    python bench/gpu_memory.py                      # the planning table: every job in jobs/, 4 methods, GiB
    python bench/gpu_memory.py --validate           # formulas vs allocated tensor bytes, SmolLM2 on this CPU
    python bench/gpu_memory.py --validate --model DIR --max-len 64   # ... on another model folder (the test's)

No GPU was available: the planning numbers are arithmetic from each architecture's shapes and the code's
phases (below), checked against what the CPU allocates for the same phases (`--validate`). The bytes a phase
allocates do not depend on the device; what the CPU check cannot see is the CUDA context, cuBLAS workspaces
and the caching allocator's fragmentation (the allowance ALLOWANCE_GIB + FRAGMENTATION below: assumptions, not
measurements).

What each rank holds at its peak (formulas in the functions named):
  Sequence length: data.max_len for GSM8K, min(data.max_len, PROMPT_TOKENS) for SST-2 / BoolQ.
  client (`client_phases`): the shipped sub-LLM (NF4 decoder Linears at 4.127 bits/weight when quant.enabled,
    embeddings / LM head / norms in model.dtype), LoRA in fp32 on every sub-LLM layer that has it, AdamW state
    (grad + m + v) and the proximal anchor of the trained LoRA; then the larger of
    - the emulator-cache fill: FILL_BATCH examples x data.max_len through the emulator, no grad (one decoder
      layer's working set + one dequantized NF4 weight);
    - a local step of fed.batch_size examples (sequence length above): the activations autograd saves in every
      layer from the first trained one up (`saved_per_token`), one layer's backward working set, and the label logits
      with their gradient (`label_logits`: 12 bytes x label tokens x vocab, + model.dtype copies).
  server (`server_phases`): the full LLM in model.dtype + its adapter LoRA, the sub-LLM as on a client with its
    LoRA (after the device fix of issue 29 it is on the GPU), and the largest of
    - SGP: every emulator layer's output for one public batch, twice (list + stack);
    - an ODA step (oda.batch_size x data.public_max_len): the teacher's hidden states and logits, the student's
      saved activations and logits, the token KL's [tokens, vocab] fp32 tensors and their gradients;
    - evaluation: SST-2 / BoolQ one forward of eval.batch_size prompts of PROMPT_TOKENS (the longest); GSM8K
      generation, whose KV cache holds (k_shot + 1) x data.max_len +
      eval.max_new_tokens tokens per row (an upper bound: every shot and the question as long as max_len).
  Label tokens per training example: SST-2 / BoolQ 2 (the label word, one token, + eos); GSM8K the whole
  sequence (data.max_len - 1): the worst case, a solution that fills max_len.
Host RAM and TMPDIR at 8B (`host_needs`): from the code's copies of the bundle (models.model_bundle,
comm.broadcast_bytes, models.load_bundle) and of the sub-LLM (models.build_sub_model); see the table in docs/gpu.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsoda_mpi.emulator_cache import FILL_BATCH  # noqa: E402
from fedsoda_mpi.config import load_config  # noqa: E402
from fedsoda_mpi.methods import METHODS  # noqa: E402

GIB = 2**30
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + fp8 absmax per 64 + fp32 absmax per 256 blocks
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ALLOWANCE_GIB = 1.0  # per GPU process: CUDA context (~0.3-0.6 GiB on CUDA 12) + cuBLAS workspaces: an assumption
FRAGMENTATION = 0.10  # caching-allocator fragmentation on top of the tensor peak: an assumption
# Longest SST-2 / BoolQ prompt or training example (BoolQ is question-only): 116 / 76 test-prompt tokens and 127 /
# 82 training-example tokens with SmolLM2's tokenizer (all rows of both splits, `data.prompt_and_answer`); the
# 7-8B tokenizers give about as many or fewer. Training batches are padded to their longest example, so a
# label-task step is min(data.max_len, this) tokens wide.
PROMPT_TOKENS = {"sst2": 128, "boolq": 128}
LABEL_TOKENS = {"sst2": 2, "boolq": 2}  # label word + eos per example; GSM8K: data.max_len - 1


@dataclass(frozen=True)
class Arch:
    """The shapes of a decoder-only model that memory depends on (config.json names in comments)."""
    layers: int  # num_hidden_layers
    hidden: int  # hidden_size
    ffn: int  # intermediate_size
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings
    source: str = ""

    @property
    def kv(self) -> int:
        """Width of the K (or V) projection."""
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def linear_params(self) -> int:
        """Weights of one decoder layer's Linears (q, k, v, o, gate, up, down)."""
        d = self.hidden
        return 2 * d * d + 2 * d * self.kv + 3 * d * self.ffn

    def lora_params(self, r: int) -> int:
        """LoRA (A and B) parameters of one decoder layer with rank r on all seven Linears."""
        d = self.hidden
        return r * (2 * (d + d) + 2 * (d + self.kv) + 3 * (d + self.ffn))

    @property
    def max_linear(self) -> int:
        """The largest Linear weight (its dequantized copy is a temporary of every NF4 matmul)."""
        return self.hidden * max(self.hidden, self.ffn)


def arch_from_config(config: dict, source: str = "") -> Arch:
    """Arch from a parsed config.json."""
    return Arch(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
                config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"],
                config["vocab_size"], bool(config.get("tie_word_embeddings", False)), source)


# The hub is offline here: the 7-8B shapes are the config.json values of the published checkpoints (the same
# numbers as bench/gpu_memory.py's earlier client table); a prepared folder's own config.json wins (`arch_of`).
KNOWN = {
    "hf:meta-llama/Meta-Llama-3-8B": Arch(32, 4096, 14336, 32, 8, 128256, False,
                                          "config.json of meta-llama/Meta-Llama-3-8B"),
    "hf:Qwen/Qwen2-7B": Arch(28, 3584, 18944, 28, 4, 152064, False, "config.json of Qwen/Qwen2-7B"),
    "hf:mistralai/Mistral-7B-v0.1": Arch(32, 4096, 14336, 32, 8, 32000, False,
                                         "config.json of mistralai/Mistral-7B-v0.1"),
    "smollm2-135m": Arch(30, 576, 1536, 9, 3, 49152, True, "SmolLM2-135M-Instruct (docs TOOLCHAIN facts)"),
}


def arch_of(model_name: str) -> Arch:
    """The shapes of a job's model.name: its prepared folder's config.json if there is one, else `KNOWN`."""
    from fedsoda_mpi.paths import model_path

    cfg_file = model_path(model_name) / "config.json"
    if cfg_file.is_file():
        return arch_from_config(json.loads(cfg_file.read_text()), str(cfg_file))
    if model_name in KNOWN:
        return KNOWN[model_name]
    raise SystemExit(f"no config.json for {model_name}: prepare it or add its shapes to KNOWN")


@dataclass(frozen=True)
class Layout:
    """Which layers a method's client sub-LLM has and what runs with gradients (fedsoda_mpi.methods.Plan, before SGP
    picks the groups: only counts matter here)."""
    sub_layers: int  # layers of the sub-LLM (L for FedPETuning)
    adapter: int  # trained layers (L_A + adapter_first)
    emulator_lora: int  # aligned emulator layers carrying LoRA
    grad_layers: int  # layers a client's backward runs through (from the first trained layer up)
    frozen_lora_in_grad: int  # of those, layers whose LoRA is frozen (emulator LoRA below an adapter layer)
    quantized: bool
    embed_bits: int = 16  # quant.embed_bits of a quantized sub-LLM (its embedding / LM head table; 16: model.dtype)


def layout(cfg, arch: Arch) -> Layout:
    """The layer counts of `cfg`'s method on `arch` (mirrors Server.plan_layers and methods.Plan)."""
    L = arch.layers
    first = cfg.model.adapter_first
    la = cfg.model.adapter_layers or L
    removed = cfg.sgp.n * cfg.sgp.p if cfg.sgp.p > 0 else 0
    sub = L - removed
    emulator = sub - la - first
    aligned = cfg.oda.pre_align or cfg.oda.re_align
    if removed == 0 or not aligned:
        emu_lora = 0
    else:
        emu_lora = cfg.sgp.p if cfg.sgp.enabled else emulator
    grad = sub if first else la  # Plan.train_start: 0 with bottom adapter layers, else the emulator's end
    frozen = emu_lora if first else 0
    return Layout(sub, la + first, emu_lora, grad, frozen, cfg.quant.enabled,
                  cfg.quant.embed_bits if cfg.quant.enabled else 16)


def weight_bytes(arch: Arch, layers: int, quantized: bool, dense: int, embed_bits: int = 16) -> float:
    """A model of `layers` decoder layers: Linears in NF4 (quantized) or `dense` bytes, norms in `dense` bytes, the
    embedding / untied head in `dense` bytes or, at `embed_bits` 8 / 4 (fedsoda_mpi/quantize.py), int8 codes with a
    float32 scale per row / NF4 like the Linears."""
    linear = layers * arch.linear_params * (NF4_BITS / 8 if quantized else dense)
    per_weight = {16: dense, 8: 1 + 4 / arch.hidden, 4: NF4_BITS / 8}[embed_bits]
    table = arch.vocab * arch.hidden * (1 if arch.tied else 2) * per_weight
    return linear + table + (2 * layers + 1) * arch.hidden * dense


def saved_per_token(arch: Arch, act: int, lora: str, dropout: bool = True) -> float:
    """Bytes autograd keeps per token for one decoder layer that gradients pass through (activations in `act`
    bytes). RMSNorm keeps its fp32 input twice (8d); q, k, v after RoPE (K and V repeated to all heads: SDPA with a
    padding mask) and the attention output (4d act); the MLP keeps gate, SiLU(gate) and up (3 ffn act); a LoRA
    module with trained weights keeps its fp32 dropout output and the dropout mask (5 bytes per input element;
    the inputs of q, k, v, gate, up are d wide, o's d, down's ffn), a frozen LoRA only the mask."""
    d, f = arch.hidden, arch.ffn
    base = 8 * d + act * 4 * d + 3 * act * f + 4 * arch.heads
    per_input = {"train": 5 if dropout else 4, "frozen": 1 if dropout else 0, "none": 0}[lora]
    return base + per_input * (6 * d + f)


def transient_per_token(arch: Arch, act: int) -> float:
    """Working set of one decoder layer's forward without grad, per token: layer input and output, the fp32 norm
    copy, q, k, v (repeated) and the attention output, gate, up and their product."""
    d, f = arch.hidden, arch.ffn
    return act * 6 * d + 4 * d + 3 * act * f


def label_logits(tokens: int, vocab: int, act: int) -> float:
    """Peak of the LM head + cross-entropy at `tokens` label positions (models.label_loss): log_softmax's fp32
    output, the incoming gradient and log_softmax's input gradient ([tokens, vocab] fp32 each), plus the logits in
    model.dtype when that is not fp32 (the .float() copy's source and the gradient cast back)."""
    return tokens * vocab * (12 + (2 * act if act < 4 else 0))


def kl_step(arch: Arch, batch: int, seq: int, act: int, backward: bool) -> float:
    """oda._token_kl on a batch of batch x seq tokens: both models' logits [B, S, V] in act bytes, the masked fp32
    copies log_p, log_q, p (and, with backward, two more [T, V] fp32 gradients and the scatter into [B, S, V])."""
    t, v = batch * seq, arch.vocab
    forward = 2 * act * t * v + 3 * 4 * t * v + (act * t * v if act < 4 else 0)
    return forward + ((2 * 4 + act) * t * v if backward else 0)


def generation(arch: Arch, act: int, batch: int, prompt: int, new: int) -> float:
    """generate() of `new` tokens after prompts of `prompt` tokens: the KV cache of every layer (K and V, kv wide,
    for prompt + new tokens) and the prefill's working set of one layer."""
    return 2 * arch.layers * arch.kv * act * batch * (prompt + new) + batch * prompt * transient_per_token(arch, act)


def client_phases(cfg, arch: Arch, lay: Layout, batch: int, seq: int, label_tokens: int) -> dict[str, float]:
    """Device bytes of a client rank: {"weights", "state", "fill", "step"}; its peak is weights + state + the larger
    phase. `state`: the LoRA, and the trained LoRA's grad, AdamW m and v and proximal anchor (16 bytes/param)."""
    dense, act = DTYPE_BYTES[cfg.model.dtype], DTYPE_BYTES[cfg.model.dtype]
    r = cfg.lora.r
    lora_layers = lay.adapter + lay.emulator_lora
    state = lora_layers * arch.lora_params(r) * 4 + lay.adapter * arch.lora_params(r) * 16
    dequant = arch.max_linear * DTYPE_BYTES[cfg.quant.compute_dtype] if lay.quantized else 0
    fill_tokens = FILL_BATCH * seq
    emulator = lay.sub_layers - lay.adapter
    fill = (fill_tokens * transient_per_token(arch, act) + dequant + fill_tokens * arch.hidden * act) if emulator else 0
    dropout = cfg.lora.dropout > 0
    tokens = batch * seq
    frozen_plain = lay.grad_layers - lay.adapter - lay.frozen_lora_in_grad
    saved = tokens * (lay.adapter * saved_per_token(arch, act, "train", dropout)
                      + lay.frozen_lora_in_grad * saved_per_token(arch, act, "frozen", dropout)
                      + frozen_plain * saved_per_token(arch, act, "none", dropout))
    step = (tokens * arch.hidden * act + saved + tokens * transient_per_token(arch, act) + dequant
            + label_logits(label_tokens, arch.vocab, act) + head_table(arch, lay, act))
    return {"weights": weight_bytes(arch, lay.sub_layers, lay.quantized, dense, lay.embed_bits), "state": state,
            "fill": fill, "step": step}


def head_table(arch: Arch, lay: Layout, act: int) -> float:
    """A quantized LM head (quant.embed_bits 8 / 4) dequantizes its whole table for each call and autograd keeps it
    for the backward: vocab x hidden in the activations' dtype during a step (0 for a 16-bit table)."""
    return arch.vocab * arch.hidden * act if lay.embed_bits < 16 else 0


def server_phases(cfg, arch: Arch, lay: Layout, eval_prompt: int) -> dict[str, float]:
    """Device bytes of rank 0: {"weights", "sgp", "align", "eval"}; its peak is weights + the largest phase.
    weights: M in model.dtype + its adapter LoRA, M* (as a client holds it) + its LoRA."""
    dense = act = DTYPE_BYTES[cfg.model.dtype]
    r = cfg.lora.r
    full = weight_bytes(arch, arch.layers, False, dense) + lay.adapter * arch.lora_params(r) * 4
    sub = weight_bytes(arch, lay.sub_layers, lay.quantized, dense, lay.embed_bits) + \
        (lay.adapter + lay.emulator_lora) * arch.lora_params(r) * 4
    # Server.build always builds M* as a new model, also for FedPETuning (whose M* is an unquantized copy of M)
    ob, ps = cfg.oda.batch_size, cfg.data.public_max_len
    emulator_full = arch.layers - lay.adapter
    sgp = 2 * ob * ps * emulator_full * arch.hidden * act if cfg.sgp.p > 0 and cfg.sgp.enabled else 0
    align = 0.0
    if lay.emulator_lora:
        t = ob * ps
        dequant = arch.max_linear * DTYPE_BYTES[cfg.quant.compute_dtype] if lay.quantized else 0
        teacher = (arch.layers + 1) * t * arch.hidden * act
        student = t * (lay.emulator_lora * saved_per_token(arch, act, "train", cfg.lora.dropout > 0)
                       + lay.adapter * saved_per_token(arch, act, "frozen", cfg.lora.dropout > 0)
                       + (lay.sub_layers - lay.emulator_lora - lay.adapter) * saved_per_token(arch, act, "none"))
        adamw = lay.emulator_lora * arch.lora_params(r) * 12  # grad, m, v of the emulator LoRA
        align = teacher + student + t * transient_per_token(arch, act) + dequant + kl_step(arch, ob, ps, act, True) \
            + adamw + head_table(arch, lay, act)
    e = cfg.eval
    if cfg.data.task == "gsm8k":
        evaluation = generation(arch, act, e.batch_size, (e.k_shot + 1) * cfg.data.max_len, e.max_new_tokens)
    else:
        evaluation = e.batch_size * eval_prompt * (transient_per_token(arch, act) + arch.hidden * act)
    return {"weights": full + sub, "sgp": sgp, "align": align, "eval": evaluation}


def peaks(cfg) -> tuple[float, float, Arch, Layout]:
    """(server peak, client peak) tensor bytes of `cfg` at its planning shapes (fed.batch_size examples of the
    sequence length in the module docstring)."""
    arch = arch_of(cfg.model.name)
    lay = layout(cfg, arch)
    seq = min(cfg.data.max_len, PROMPT_TOKENS.get(cfg.data.task, cfg.data.max_len))
    label = cfg.fed.batch_size * (LABEL_TOKENS[cfg.data.task] if cfg.data.task in LABEL_TOKENS else seq - 1)
    c = client_phases(cfg, arch, lay, cfg.fed.batch_size, seq, label)
    s = server_phases(cfg, arch, lay, PROMPT_TOKENS.get(cfg.data.task, 0))
    server = s["weights"] + max(s["sgp"], s["align"], s["eval"])
    client = c["weights"] + c["state"] + max(c["fill"], c["step"])
    return server, client, arch, lay


def on_gpu(tensor_bytes: float) -> float:
    """GiB a GPU must have for a peak of `tensor_bytes` (plus fragmentation and the context allowance)."""
    return tensor_bytes * (1 + FRAGMENTATION) / GIB + ALLOWANCE_GIB


# GiB a process can use on a "24 / 40 / 80 GB" card: vendor figures as nvidia-smi reports them (A10 / L4 about
# 22.5 GiB, A100-40GB 39.6 GiB, A100 / H100 80GB 79.6 GiB), rounded down: an assumption, not measured here.
USABLE_GIB = {24: 22.0, 40: 39.0, 80: 79.0}


def fits(gib: float) -> str:
    """The smallest of the 24 / 40 / 80 GB GPUs (`USABLE_GIB`) that holds `gib`."""
    for size, usable in USABLE_GIB.items():
        if gib <= usable:
            return f"{size} GB"
    return "> 80 GB"


def planning_table(jobs: list[Path], methods: tuple[str, ...], overrides: tuple[str, ...] = ()) -> list[str]:
    """Markdown rows: job, method, rank 0 and client GiB on a GPU, the smallest GPU for each (`overrides`: key=value
    settings applied to every job, e.g. fed.batch_size=4)."""
    rows = ["| job | method | rank 0 GiB | rank 0 needs | client GiB | client needs |", "|---|---|---:|---|---:|---|"]
    for job in jobs:
        for method in methods:
            cfg = load_config(str(job), [f"method={method}", *overrides])
            server, client, _, _ = peaks(cfg)
            rows.append(f"| {job.stem} | {method} | {on_gpu(server):.1f} | {fits(on_gpu(server))} | "
                        f"{on_gpu(client):.1f} | {fits(on_gpu(client))} |")
    return rows


def summary_table(methods: tuple[str, ...], overrides: tuple[str, ...] = ()) -> list[str]:
    """Markdown rows per 7-8B model and method: rank 0's GiB (its largest over the three tasks) and a client's on
    each task, with the smallest card that holds it (the table in docs/gpu.md)."""
    rows = ["| model | method | rank 0 | client SST-2 | client BoolQ | client GSM8K |", "|---|---|---|---|---|---|"]
    for model in ("llama3", "qwen2", "mistral"):
        for method in methods:
            cfgs = [load_config(str(ROOT / "jobs" / f"{model}_{task}_iid.yaml"), [f"method={method}", *overrides])
                    for task in ("sst2", "boolq", "gsm8k")]
            got = [peaks(cfg) for cfg in cfgs]
            server = max(on_gpu(g[0]) for g in got)
            cells = [f"{server:.1f} ({fits(server)})"] + [f"{on_gpu(g[1]):.1f} ({fits(on_gpu(g[1]))})" for g in got]
            rows.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
    return rows


def host_needs(cfg) -> dict[str, float]:
    """Host RAM and TMPDIR bytes at start-up, from the copies the code makes (an estimate from reading the code):
    bundle = the sub-LLM's safetensors as shipped (NF4 or dense) + tokenizer (ignored);
    rank 0: models.build_sub_model writes the kept layers in model.dtype to a temporary folder (TMPDIR) through
    safetensors.save_file, which builds the whole file in memory first; model_bundle serializes the quantized copy
    in memory (safetensors.save; only config and tokenizer go to TMPDIR), and broadcast_bytes packs those bytes into
    one send buffer: 2 copies at the broadcast (Server.release_bundle: the server keeps none afterwards);
    a client rank: the receive buffer (the files are memoryviews into it), which load_bundle writes to TMPDIR and
    loads from there."""
    arch, lay = arch_of(cfg.model.name), layout(cfg, arch_of(cfg.model.name))
    dense = DTYPE_BYTES[cfg.model.dtype]
    bundle = weight_bytes(arch, lay.sub_layers, lay.quantized, dense, lay.embed_bits)
    sub_dense = weight_bytes(arch, lay.sub_layers, False, dense)
    return {"bundle": bundle, "server_ram": max(sub_dense, 2 * bundle), "server_tmp": sub_dense,
            "client_ram": bundle, "client_tmp": bundle}


# ------------------------------------------------------------------------------------ the check on the CPU

def allocated_peak(fn) -> tuple[float, object]:
    """(peak bytes of CPU tensor memory allocated while fn() runs, above what was live before, fn's result):
    torch.profiler's allocation events carry the CPU allocator's running total of the bytes allocated during the
    profile and not yet freed (c10's ProfiledCPUMemoryReporter; tensors that were live before and are freed during
    it are not subtracted, so the peak can only be over-counted by those); tensor storage only, not the RSS."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            peak = max(peak, ev.extra_fields.total_allocated)
        stack.extend(ev.children)
    return float(peak), out


def _plan(cfg, n_layers: int):
    """A FedSODA plan with the job's (n, p) groups spread evenly over the emulator (SGP's choice does not change any
    byte count): the same Plan the server would build."""
    from fedsoda_mpi import sgp
    from fedsoda_mpi.methods import Plan

    n, p, la = cfg.sgp.n, cfg.sgp.p, cfg.model.adapter_layers
    emulator = n_layers - la
    step = emulator // p
    groups = [(1 + i * step, 1 + i * step + n) for i in range(p)]
    kept = sgp.kept_layers(n_layers, groups)
    lmap = [tuple(map(int, m)) for m in sgp.layer_map(groups, kept)]
    return Plan(n_layers, la, kept, groups, lmap, 0, sorted(s for _, s in lmap))


def _examples(vocab: int, count: int, seq: int, answer: int, seed: int = 0) -> list[dict]:
    """`count` training examples of exactly `seq` tokens whose last `answer` tokens are labels (random token ids:
    memory does not depend on the text)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (seq - answer) + ids[seq - answer:]})
    return out


def validate(model_dir: str, seq: int, batch: int = 4, examples: int = 16, answer: int | None = None,
             eval_batch: int = 8) -> list[tuple[str, float, float]]:
    """Run the phases on the CPU with the FedSODA defaults (fp32, NF4 clients) on `model_dir` at batch x seq, measure
    the tensor bytes each allocates above what was live (`allocated_peak`), and return (phase, estimated, measured)
    rows; the estimates are this module's formulas for the same shapes (label tokens: `answer` per example)."""
    import numpy as np
    import torch

    from fedsoda_mpi import models, oda
    from fedsoda_mpi.client import local_train
    from fedsoda_mpi.emulator_cache import EmulatorCache

    cfg = load_config(None, [f"model.name={model_dir}", f"fed.batch_size={batch}", f"data.max_len={seq}",
                             f"oda.batch_size={batch}", f"data.public_max_len={seq}"])
    answer = answer or seq // 2
    torch.manual_seed(0)
    full, _ = models.load_causal_lm(model_dir, "float32")
    arch = arch_from_config(full.config.to_dict())
    lay = layout(cfg, arch)
    plan = _plan(cfg, arch.layers)
    sub = models.build_sub_model(full, plan.kept, True, "float32")
    sub = models.add_lora(sub, plan.lora_sub, **cfg.lora.kwargs())
    params = models.set_trainable(sub, plan.adapter_sub)
    rows = _examples(arch.vocab, examples, seq, answer)
    c = client_phases(cfg, arch, lay, batch, seq, batch * answer)
    cache_host = examples * seq * arch.hidden * 4  # the fill's rows, host memory on a GPU run
    measured, _ = allocated_peak(lambda: local_train(
        sub, plan, params, rows, 0, EmulatorCache(True), 0, 2, 1, batch, 1e-4, 0.01, np.random.default_rng(0)))
    out = [("client: local training (fill + 2 steps), minus cache rows", c["state"] - arch.lora_params(cfg.lora.r) *
            (lay.adapter + lay.emulator_lora) * 4 + max(c["fill"], c["step"]), measured - cache_host)]
    stored = models.stored_bytes(models.causal_lm(sub))
    out.append(("client: sub-LLM + LoRA as stored", c["weights"] + arch.lora_params(cfg.lora.r) *
                (lay.adapter + lay.emulator_lora) * 4, float(stored)))
    full = models.add_lora(full, plan.adapter_full, **cfg.lora.kwargs())
    s = server_phases(cfg, arch, lay, seq)
    batches = [{"input_ids": torch.tensor([r["input_ids"] for r in rows[:batch]]),
                "attention_mask": torch.ones(batch, seq, dtype=torch.long)}]
    pairs = oda.AlignPairs(plan.align_pairs, plan.num_layers - plan.adapter_size - 1, plan.emulator_end - 1)
    align_params = models.set_trainable(sub, plan.emulator_lora_sub)
    measured, _ = allocated_peak(lambda: oda.align(full, sub, batches, pairs, align_params, 1, 1e-4))
    out.append(("server: one ODA step", s["align"], measured))
    from fedsoda_mpi import sgp as sgp_mod

    measured, _ = allocated_peak(lambda: sgp_mod.distance_profile(full, batches, 4, arch.layers - lay.adapter))
    out.append(("server: SGP distance profile", s["sgp"], measured))
    ids = torch.tensor([r["input_ids"] for r in _examples(arch.vocab, eval_batch, seq, 1, seed=1)])

    def label_eval():
        with torch.no_grad(), models.mode(full):
            return models.decoder(full)(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

    cfg.eval.batch_size = eval_batch
    s = server_phases(cfg, arch, lay, seq)
    measured, _ = allocated_peak(label_eval)
    out.append(("server: label evaluation forward", s["eval"], measured))
    new = 16

    def generate():
        with torch.no_grad(), models.mode(full):
            return full.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)

    measured, _ = allocated_peak(generate)
    out.append((f"server: generation ({new} new tokens)", generation(arch, 4, eval_batch, seq, new), measured))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--validate", action="store_true", help="check the formulas against a CPU run")
    ap.add_argument("--model", default=None, help="model folder for --validate (default: prepared SmolLM2)")
    ap.add_argument("--max-len", type=int, default=128, help="tokens per example in --validate")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--jobs", default="*", help="glob of job files under jobs/ (default: all)")
    ap.add_argument("--summary", action="store_true", help="docs/gpu.md's table: 7-8B models, GiB (smallest card)")
    ap.add_argument("overrides", nargs="*", help="key=value settings applied to every job (what to change)")
    args = ap.parse_args()
    if args.validate:
        from fedsoda_mpi.paths import model_path

        model = args.model or str(model_path("smollm2-135m"))
        print(f"CPU check on {model}, seq {args.max_len}: estimated vs allocated tensor MiB (torch.profiler)\n")
        print("| phase | estimated MiB | allocated MiB | estimated / allocated |\n|---|---:|---:|---:|")
        for name, est, got in validate(model, args.max_len):
            print(f"| {name} | {est / 2**20:.1f} | {got / 2**20:.1f} | {est / got:.3f} |")
        return
    methods = tuple(args.methods.split(","))
    if args.summary:
        print("\n".join(summary_table(methods, tuple(args.overrides))))
        return
    jobs = sorted((ROOT / "jobs").glob(f"{args.jobs}.yaml"))
    print(f"GiB per GPU: tensor peak x {1 + FRAGMENTATION:g} + {ALLOWANCE_GIB:g} GiB (assumptions: fragmentation, "
          f"CUDA context); one rank per GPU{'; with ' + ' '.join(args.overrides) if args.overrides else ''}\n")
    print("\n".join(planning_table(jobs, tuple(args.methods.split(",")), tuple(args.overrides))))
    print("\nHost memory and TMPDIR at start-up (GiB; estimate from the code's copies, see host_needs):\n")
    print("| job | method | bundle | rank 0 RAM | rank 0 TMPDIR | client RAM | client TMPDIR |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for job in jobs:
        if "gsm8k" not in job.stem:
            continue  # the same model and method need the same bytes on every task
        for method in args.methods.split(","):
            h = host_needs(load_config(str(job), [f"method={method}", *args.overrides]))
            print(f"| {job.stem.split('_')[0]} | {method} | {h['bundle'] / GIB:.1f} | {h['server_ram'] / GIB:.1f} | "
                  f"{h['server_tmp'] / GIB:.1f} | {h['client_ram'] / GIB:.1f} | {h['client_tmp'] / GIB:.1f} |")


if __name__ == "__main__":
    main()
