"""Client local step: FedSODA vs FedPETuning on the same batches, measured side by side in one process.

    python bench/step.py [--examples 64] [--batch 4] [--steps 16] [--repeats 3] [--threads 1]

SmolLM2-135M, SST-2 examples of one client, the production `client.local_train` for every route:
- FedPETuning client: the full fp32 model, LoRA on all 30 layers (trains them all, nothing cached);
- FedSODA client: the default job's NF4 sub-LLM (18 of 30 layers; the SGP plan of the default job), LoRA on
  the 3 adapter layers + 4 aligned emulator layers, the emulator output cached (warm: between re-alignments),
  and the same without the cache (every step runs the 15 emulator layers too);
- every route scores the LM head only at label positions (`models.label_loss`).
Routes alternate `--repeats` times (the median is reported), so machine noise hits all of them alike.
Issue target: FedSODA (cached) / FedPETuning <= 0.12.
"""
import argparse
import statistics
import time

import numpy as np
import torch

from fedsoda_mpi import data, models
from fedsoda_mpi.client import local_train
from fedsoda_mpi.emulator_cache import EmulatorCache
from fedsoda_mpi.methods import Plan
from fedsoda_mpi.prepare import prepare_model

KEPT = [0, 1, 5, 6, 7, 8, 12, 16, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]  # groups (1,4) (8,11) (12,15) (16,19)
FEDSODA = Plan(30, 3, KEPT, [(1, 4), (8, 11), (12, 15), (16, 19)], [(1, 1), (8, 5), (12, 6), (16, 7)], 0, [1, 5, 6, 7])
FEDPETUNING = Plan(30, 30, list(range(30)), [], [])


def client(full, plan: Plan, quantize: bool):
    """A client's model as `client.Client` builds it: sub-LLM (or the full model), LoRA, adapter trainable."""
    torch.manual_seed(0)
    model = models.build_sub_model(full, plan.kept, quantize=quantize)
    model = models.add_lora(model, plan.lora_sub)
    return model, models.set_trainable(model, plan.adapter_sub)


def set_up(examples: int, steps: int):
    """The options of the client-step benchmarks (parsed, threads set), SmolLM2-135M and its tokenizer, and the
    first `--examples` SST-2 training rows as SFT examples of 128 tokens: (args, full model, tokenizer, examples)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=examples)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    full, tok = models.load_causal_lm(prepare_model("smollm2-135m"))
    data.ensure_pad_token(tok)
    rows = data.load_rows("sst2", "train")[:args.examples]
    return args, full, tok, [data.tokenize_sft(tok, *data.prompt_and_answer("sst2", r), 128) for r in rows]


def main() -> None:
    args, full, tok, examples = set_up(examples=64, steps=16)
    routes = {
        "FedPETuning (full fp32 model, LoRA on 30 layers)": (*client(full, FEDPETUNING, False), FEDPETUNING, False),
        "FedSODA, emulator cached (NF4 sub-LLM, 3 adapter layers)": (*client(full, FEDSODA, True), FEDSODA, True),
        "FedSODA, no cache (15 NF4 emulator layers + 3 adapter layers)": (*client(full, FEDSODA, True), FEDSODA, False),
    }
    del full
    caches = {name: EmulatorCache(cached) for name, (_, _, _, cached) in routes.items()}
    starts = {name: models.lora_state(m, plan.adapter_sub) for name, (m, _, plan, _) in routes.items()}

    def run(name: str) -> tuple[float, float]:
        model, params, plan, _ = routes[name]
        models.load_lora_state(model, starts[name])
        torch.manual_seed(1)
        t0 = time.perf_counter()
        loss, steps = local_train(model, plan, params, examples, tok.pad_token_id, caches[name], 0, args.steps, 1,
                                  args.batch, 1e-3, 0.01, np.random.default_rng(0))
        return (time.perf_counter() - t0) / steps, loss

    for name, (_, _, plan, cached) in routes.items():  # fill the caches: a warm cache is the steady state
        if cached:
            local_train(routes[name][0], plan, routes[name][1], examples, tok.pad_token_id, caches[name], 0, 0, 1,
                        args.batch, 1e-3, 0.01, np.random.default_rng(0))
    times = {name: [] for name in routes}
    losses = {}
    for _ in range(args.repeats):
        for name in routes:
            t, losses[name] = run(name)
            times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref = med[next(iter(routes))]
    print(f"\nSmolLM2-135M, SST-2, batch {args.batch}, {args.steps} local steps x {args.repeats} repeats, "
          f"{args.threads} thread(s); median time per local step")
    print("| client route | trainable params | s / step | ratio to FedPETuning |")
    print("|---|---:|---:|---:|")
    for name, (model, params, _, _) in routes.items():
        print(f"| {name} | {sum(p.numel() for p in params):,} | {med[name]:.3f} | {med[name] / ref:.3f} |")
    print("mean task loss of the measured steps: " + ", ".join(f"{v:.4f}" for v in losses.values()))


if __name__ == "__main__":
    main()
