"""Emulator activation cache: one client's local epoch with the cache warm vs without it, side by side; and
the two ways a returning client's cache is refilled: an emulator pass vs a read from the disk tier.

    python -m bench.cache [--examples 64] [--batch 4] [--threads 1] [--repeats 3]

SmolLM2-135M, the default job's SGP plan (18 of 30 layers kept, NF4), SST-2 examples of one client.
Prints the time per local epoch of each route, their ratio, and checks the losses agree; then the time to
fill one client's cache by the emulator, to spill it to the disk tier and to read it back (routes alternate,
median of --repeats; the file is read right after it was written, so from the OS page cache when the
machine has the memory, as on a node whose scratch holds recently written clients), and checks the rows
read back are the computed bits.
"""
import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedsoda_mpi import data, models
from fedsoda_mpi.client import local_train
from fedsoda_mpi.emulator_cache import EmulatorCache
from fedsoda_mpi.methods import Plan
from fedsoda_mpi.prepare import prepare_model

KEPT = [0, 1, 5, 6, 7, 8, 12, 16, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]  # groups (1,4) (8,11) (12,15) (16,19)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
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
    print(f"\n{args.examples} examples, batch {args.batch}, {args.threads} thread(s), "
          f"local epoch of {len(examples) // args.batch} steps")
    print("| route | s / local epoch | ratio to no cache |")
    print("|---|---|---|")
    print(f"| no cache (15 emulator + 3 adapter layers every step) | {t_plain:.1f} | 1.00 |")
    print(f"| cache, first epoch after alignment (fills it) | {t_fill:.1f} | {t_fill / t_plain:.2f} |")
    print(f"| cache, warm (3 adapter layers + head) | {t_cached:.1f} | {t_cached / t_plain:.2f} |")
    print(f"losses: cached {l_cached:.6f}, no cache {l_plain:.6f}")
    refill_table(sub, plan, examples, tok.pad_token_id, args.repeats)


def refill_table(sub, plan: Plan, examples: list[dict], pad_id: int, repeats: int) -> None:
    """Fill one client's cache with the emulator, spill it to a disk tier, read it back; print the medians."""
    folder = Path(tempfile.mkdtemp(prefix="fedsoda-bench-cache-"))
    times: dict[str, list[float]] = {"emulator": [], "spill": [], "disk": []}
    try:
        for _ in range(repeats):
            cache = EmulatorCache(True, folder / "tier", 10**12)
            t0 = time.perf_counter()
            cache.fill(sub, plan, 0, examples, pad_id)
            t1 = time.perf_counter()
            rows = dict(cache.store)
            cache.keep(set())
            t2 = time.perf_counter()
            cache.fill(sub, plan, 0, examples, pad_id)
            t3 = time.perf_counter()
            assert cache.disk_hits == len(examples) and all(torch.equal(cache.store[k], v) for k, v in rows.items())
            size = cache.stats()["disk_bytes"]
            cache.close()
            for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[name].append(dt)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = sum(len(e["input_ids"]) for e in examples)
    print(f"\nrefilling one client's cache ({len(examples)} examples, {tokens} tokens, file {size / 2**20:.2f} MiB), "
          f"median of {repeats}")
    print("| route | s per client | ratio to the emulator pass |")
    print("|---|---|---|")
    print(f"| emulator pass (15 NF4 layers, batches of 16) | {med['emulator']:.3f} | 1.000 |")
    routes = (("spill", "spill to the disk tier (when the client leaves)"), ("disk", "read back from the disk tier"))
    for name, text in routes:
        print(f"| {text} | {med[name]:.3f} | {med[name] / med['emulator']:.4f} |")
    print("rows read back equal the computed ones: yes (checked)")


if __name__ == "__main__":
    main()
