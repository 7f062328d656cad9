"""GPU-hours of a study (e.g. studies/paper.yaml) estimated from FLOPs: nothing here ran on a GPU.

    python bench/gpu_hours.py studies/paper.yaml                       # A100-80GB-class assumptions (below)
    python bench/gpu_hours.py studies/paper.yaml --mfu 0.2 --tflops 989 --hbm 3.35   # e.g. H100 SXM, lower MFU
    python bench/gpu_hours.py --cache                                  # host memory of a client's emulator cache

Every run of the study (`fedsoda_mpi.study.load`) is costed phase by phase with its own resolved config, in the
order the ranks execute them (the server's phases and the clients' training never overlap, so a run's wall time
is their sum) and charged for all of its ranks (one GPU per rank for the whole job):
  - compute-bound phases at --mfu x --tflops: forward FLOPs per token of n decoder layers are 2 x the Linear weights
    + 2 x hidden x context (attention, causal: half the sequence on average), + 2 x hidden x vocab where logits are
    computed; a LoRA step on frozen weights costs 2 forwards (backward computes input gradients only; LoRA's own
    weight gradients are negligible). Phases: base / per-round validation / final evaluation (SST-2, BoolQ: one
    forward per prompt), SGP (emulator layers of the public set), ODA pre- and re-alignment (teacher forward +
    student forward and backward, logits at every token) and its held-out KL, the clients' local epochs (the
    trained layers forward + backward; the emulator-cache fill after every alignment; FedPETuning and FedOT train
    from layer 0, so every layer every step), spread evenly over the client ranks;
  - GSM8K generation is memory-bound: each decode step reads the model's weights once at --hbm TB/s x --hbm-eff
    (bf16 bytes also for the NF4 sub-LLM, whose weights bitsandbytes dequantizes at every step); every question
    decodes its mean reference solution length ("typical") or eval.max_new_tokens ("upper bound").
Token counts come from the task files tokenized with SmolLM2's tokenizer (a stand-in: the 7-8B tokenizers are not
available offline; Llama-3's and Qwen2's larger vocabularies give somewhat fewer tokens) on SAMPLE rows per file.
Not counted: loading models, the sub-LLM's build and broadcast, checkpoints, queue waits, failed or requeued runs.
"""
from __future__ import annotations

import argparse
import math
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

from gpu_memory import Arch, arch_of, layout  # noqa: E402

SAMPLE = 2000  # rows per file whose token lengths are measured
HELDOUT_TEXTS = 16  # fedsoda_mpi.public_texts.HELDOUT_TEXTS: the held-out KL before and after pre-alignment


@lru_cache(maxsize=None)
def tokenizer():
    from transformers import AutoTokenizer

    from fedsoda_mpi.paths import model_path

    tok = AutoTokenizer.from_pretrained(model_path("smollm2-135m"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@lru_cache(maxsize=None)
def task_lengths(task: str, max_len: int, k_shot: int) -> dict[str, float]:
    """Rows and mean token lengths of a task: n_train, n_test, train (a training example, cut at max_len as
    data.tokenize_sft cuts it), labels (its label tokens), prompt (an evaluation prompt, k-shot prefix included for
    GSM8K), question (GSM8K: a prompt without the shared prefix), answer (GSM8K: a reference solution)."""
    from fedsoda_mpi import data

    tok, rng = tokenizer(), np.random.default_rng(0)
    train, test = data.load_rows(task, "train"), data.load_rows(task, "test")
    pick = lambda rows: [rows[i] for i in rng.choice(len(rows), min(SAMPLE, len(rows)), replace=False)]  # noqa: E731
    ex = [data.tokenize_sft(tok, *data.prompt_and_answer(task, r), max_len) for r in pick(train)]
    prompts = [data.prompt_and_answer(task, r)[0] for r in pick(test)]
    out = {"n_train": len(train), "n_test": len(test), "train": np.mean([len(e["input_ids"]) for e in ex]),
           "labels": np.mean([sum(x != -100 for x in e["labels"]) for e in ex])}
    question = np.mean([len(tok(p).input_ids) for p in prompts])
    if task == "gsm8k":
        prefix = len(tok(data.gsm8k_kshot_prefix(train, k_shot, 0)).input_ids)
        out.update(prompt=prefix + question, question=question,
                   answer=np.mean([len(tok(data.prompt_and_answer(task, r)[1]).input_ids) for r in pick(train)]))
    else:
        out.update(prompt=question, question=question, answer=0.0)
    return out


@lru_cache(maxsize=None)
def public_length(max_len: int) -> float:
    """Mean tokens of a WikiText-2 paragraph cut at data.public_max_len."""
    from fedsoda_mpi import data

    texts = data.load_public("wikitext2", holdout=False)[:SAMPLE]
    return float(np.mean([min(len(tokenizer()(t).input_ids), max_len) for t in texts]))


def forward_flops(arch: Arch, layers: int, tokens: float, context: float, logits: float = 0.0) -> float:
    """Forward FLOPs of `layers` decoder layers on `tokens` tokens of sequences `context` long, plus the LM head at
    `logits` positions."""
    per_token = layers * (2 * arch.linear_params + 2 * arch.hidden * context / 2)
    return tokens * per_token + logits * 2 * arch.hidden * arch.vocab


class Costs:
    """Seconds of one run's phases under the hardware assumptions."""

    def __init__(self, flops_per_s: float, bytes_per_s: float):
        self.flops_per_s, self.bytes_per_s = flops_per_s, bytes_per_s

    def compute(self, flops: float) -> float:
        return flops / self.flops_per_s

    def evaluation(self, cfg, arch: Arch, layers: int, rows: int, lengths: dict, decode: str) -> float:
        """One evaluation of a model with `layers` layers on `rows` rows (label forward, or GSM8K generation)."""
        if cfg.data.task != "gsm8k":
            return self.compute(forward_flops(arch, layers, rows * lengths["prompt"], lengths["prompt"], rows))
        prefill = forward_flops(arch, layers, rows * lengths["question"], lengths["prompt"])
        steps = math.ceil(rows / cfg.eval.batch_size) * (cfg.eval.max_new_tokens if decode == "upper"
                                                          else min(lengths["answer"], cfg.eval.max_new_tokens))
        weights = (layers * arch.linear_params + 2 * arch.vocab * arch.hidden) * 2  # bf16 bytes read per step
        return self.compute(prefill) + steps * weights / self.bytes_per_s


def run_seconds(cfg, world: int, costs: Costs, decode: str) -> dict[str, float]:
    """Wall seconds of one run by phase (server phases and client rounds in sequence)."""
    arch = arch_of(cfg.model.name)
    lay = layout(cfg, arch)
    lengths = task_lengths(cfg.data.task, cfg.data.max_len, cfg.eval.k_shot)
    n_val = cfg.data.val_size
    n_test = cfg.eval.max_examples or lengths["n_test"]
    train_rows = lengths["n_train"] - n_val
    if cfg.data.max_train_per_client:
        train_rows = min(train_rows, cfg.data.max_train_per_client * cfg.fed.clients)
    public_tokens = cfg.data.public_samples * public_length(cfg.data.public_max_len)
    ctx = public_length(cfg.data.public_max_len)
    out = dict.fromkeys(("evaluation", "sgp", "alignment", "clients"), 0.0)
    full, sub = arch.layers, lay.sub_layers
    if cfg.eval.base:
        out["evaluation"] += costs.evaluation(cfg, arch, full, n_test, lengths, decode)
    if cfg.sgp.p > 0 and cfg.sgp.enabled:
        out["sgp"] += costs.compute(forward_flops(arch, full - lay.adapter, public_tokens, ctx))

    def align(tokens: float) -> float:
        teacher = forward_flops(arch, full, tokens, ctx, tokens)
        return costs.compute(teacher + 2 * forward_flops(arch, sub, tokens, ctx, tokens))

    held = HELDOUT_TEXTS * ctx
    kl = costs.compute(forward_flops(arch, full, held, ctx, held) + forward_flops(arch, sub, held, ctx, held))
    if lay.emulator_lora and cfg.oda.pre_align:
        out["alignment"] += cfg.oda.pre_epochs * align(public_tokens) + 2 * kl
    per_rank = train_rows * cfg.fed.local_epochs / max(world - 1, 1)
    if cfg.fed.local_steps:
        per_rank = min(per_rank, cfg.fed.local_steps * cfg.fed.batch_size * cfg.fed.clients / max(world - 1, 1))
    tokens = per_rank * lengths["train"]
    step = 2 * forward_flops(arch, lay.grad_layers, tokens, lengths["train"], per_rank * lengths["labels"])
    fill = forward_flops(arch, sub - lay.grad_layers, tokens, lengths["train"])
    every = cfg.oda.every  # FedBiOT's preset: 1
    realign = lay.emulator_lora and cfg.oda.re_align
    for rnd in range(1, cfg.fed.rounds + 1):
        refill = rnd == 1 or (realign and rnd % every == 0)
        out["clients"] += costs.compute(step + (fill if refill else 0.0))
        if realign and rnd % every == 0:
            out["alignment"] += cfg.oda.re_epochs * align(cfg.oda.re_samples * ctx)
        if cfg.eval.every and rnd % cfg.eval.every == 0:
            out["evaluation"] += costs.evaluation(cfg, arch, full, n_val, lengths, decode)
    out["evaluation"] += costs.evaluation(cfg, arch, full, n_test, lengths, decode)
    if sub < full or lay.quantized:
        out["evaluation"] += costs.evaluation(cfg, arch, sub, n_test, lengths, decode)
    return out


def study_hours(path: str, costs: Costs, decode: str) -> dict[tuple[str, str], list[float]]:
    """{(stage, method): [GPU-hours per run]} of every run of the study."""
    from fedsoda_mpi.config import load_config
    from fedsoda_mpi.study import load

    study, out = load(path), {}
    for run in study.runs:
        cfg = load_config(run.job, run.args(run.lr or study.lr_grid[0], Path("runs/_estimate"))[2:])
        seconds = sum(run_seconds(cfg, run.np, costs, decode).values())
        out.setdefault((run.stage, run.method), []).append(run.np * seconds / 3600)
    return out


def cache_table() -> list[str]:
    """Markdown rows: host GiB of one client rank's emulator cache per 7-8B job (10 client ranks, every training row
    but the validation rows, mean tokens per example x hidden size x 2 bytes: the bf16 rows EmulatorCache keeps)."""
    from fedsoda_mpi.config import load_config

    rows = ["| job | examples per client rank | mean tokens | cache GiB per client rank |", "|---|---:|---:|---:|"]
    for job in sorted((ROOT / "jobs").glob("*.yaml")):
        cfg = load_config(str(job), [])
        if cfg.model.dtype == "float32":
            continue  # the CPU job
        t = task_lengths(cfg.data.task, cfg.data.max_len, cfg.eval.k_shot)
        per_rank = (t["n_train"] - cfg.data.val_size) / cfg.fed.clients
        gib = per_rank * t["train"] * arch_of(cfg.model.name).hidden * 2 / 2**30
        rows.append(f"| {job.stem} | {per_rank:.0f} | {t['train']:.0f} | {gib:.2f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", nargs="?", help="a study file (or --cache)")
    ap.add_argument("--cache", action="store_true", help="host memory of the emulator cache per 7-8B job instead")
    ap.add_argument("--tflops", type=float, default=312.0, help="dense bf16 peak per GPU, TFLOP/s (A100: 312)")
    ap.add_argument("--mfu", type=float, default=0.3, help="fraction of the peak the compute phases reach")
    ap.add_argument("--hbm", type=float, default=2.0, help="memory bandwidth per GPU, TB/s (A100-80GB: 2.0)")
    ap.add_argument("--hbm-eff", type=float, default=0.6, help="fraction of --hbm a decode step reaches")
    args = ap.parse_args()
    if args.cache:
        print("\n".join(cache_table()))
        return
    if not args.study:
        ap.error("name a study file, e.g. studies/paper.yaml (or --cache)")
    costs = Costs(args.tflops * 1e12 * args.mfu, args.hbm * 1e12 * args.hbm_eff)
    print(f"{args.study}: GPU-hours estimated from FLOPs ({args.tflops:g} TFLOP/s x MFU {args.mfu:g}; decode at "
          f"{args.hbm:g} TB/s x {args.hbm_eff:g}); every rank holds one GPU for the whole run\n")
    results = {decode: study_hours(args.study, costs, decode) for decode in ("typical", "upper")}
    print("| stage | method | runs | GPU-h per run (typical) | GPU-h (typical) | GPU-h (upper bound) |")
    print("|---|---|---:|---:|---:|---:|")
    for key in results["typical"]:
        typ, up = results["typical"][key], results["upper"][key]
        print(f"| {key[0]} | {key[1]} | {len(typ)} | {np.mean(typ):.1f} | {sum(typ):,.0f} | {sum(up):,.0f} |")
    total = {d: sum(sum(v) for v in r.values()) for d, r in results.items()}
    n = sum(len(v) for v in results["typical"].values())
    print(f"| all | | {n} | | **{total['typical']:,.0f}** | **{total['upper']:,.0f}** |")


if __name__ == "__main__":
    main()
