"""Emulator activation cache: one client's local epoch with the cache warm vs without it, side by side.

    python bench/cache.py [--examples 64] [--batch 4] [--threads 1]

SmolLM2-135M, the default job's SGP plan (18 of 30 layers kept, NF4), SST-2 examples of one client.
Prints the time per local epoch of each route, their ratio, and checks the losses agree.
"""
import argparse
import time

import numpy as np
import torch

from fedsoda_mpi import data, models
from fedsoda_mpi.client import EmulatorCache, local_train
from fedsoda_mpi.methods import Plan
from fedsoda_mpi.prepare import prepare_model

KEPT = [0, 1, 5, 6, 7, 8, 12, 16, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]  # groups (1,4) (8,11) (12,15) (16,19)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    full, tok = models.load_causal_lm(prepare_model("smollm2-135m"))
    plan = Plan(30, 3, KEPT, [(1, 4), (8, 11), (12, 15), (16, 19)], [(1, 1), (8, 5), (12, 6), (16, 7)], 0, [1, 5, 6, 7])
    torch.manual_seed(0)
    sub = models.add_lora(models.build_sub_model(full, KEPT, quantize=True), plan.emulator_lora_sub + plan.adapter_sub)
    del full
    rows = data.load_rows("sst2", "train")[:args.examples]
    examples = [data.tokenize_sft(tok, *data.prompt_and_answer("sst2", r), 128) for r in rows]
    params = models.set_trainable(sub, plan.adapter_sub)
    start = models.lora_state(sub, plan.adapter_sub)

    def epoch(cache: EmulatorCache) -> tuple[float, float]:
        models.load_lora_state(sub, start)
        torch.manual_seed(1)
        t0 = time.perf_counter()
        loss, _ = local_train(sub, plan, params, examples, tok.pad_token_id, cache, 0, 0, 1, args.batch, 1e-3, 0.01,
                              np.random.default_rng(0))
        return time.perf_counter() - t0, loss

    warm = EmulatorCache(True)
    t_fill, _ = epoch(warm)  # first epoch after a (re-)alignment fills the cache
    t_cached, l_cached = epoch(warm)
    t_plain, l_plain = epoch(EmulatorCache(False))
    print(f"\n{args.examples} examples, batch {args.batch}, {args.threads} thread(s), local epoch of {len(examples) // args.batch} steps")
    print("| route | s / local epoch | ratio to no cache |")
    print("|---|---|---|")
    print(f"| no cache (15 emulator + 3 adapter layers every step) | {t_plain:.1f} | 1.00 |")
    print(f"| cache, first epoch after alignment (fills it) | {t_fill:.1f} | {t_fill / t_plain:.2f} |")
    print(f"| cache, warm (3 adapter layers + head) | {t_cached:.1f} | {t_cached / t_plain:.2f} |")
    print(f"losses: cached {l_cached:.6f}, no cache {l_plain:.6f}")


if __name__ == "__main__":
    main()
