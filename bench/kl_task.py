"""How close the sub-LLM M* is to the full LLM M on each task's text, before and after pre-alignment (eq. 7).

    python bench/kl_task.py                                  # the study's FedSODA emulator (SST-2 job, seed 0)
    python bench/kl_task.py --texts 64 seed=1 sgp.p=2        # extra key=value overrides go to the config

Builds the emulator a FedSODA run builds on rank 0 (`Server`: SGP on the public set, the pruned NF4 sub-LLM,
pre-alignment on D_public) from `--config` and the overrides, and measures KL(M || M*) per token
(`oda.kl_divergence`, what a run records as kl_before / kl_after) on:
- the public held-out texts the run measures it on (WikiText-2's held-out 10 %: the run's own numbers);
- `--texts` training examples of each task (a seeded sample of the rows no validation row repeats), as the
  clients see them: prompt + answer, cut at data.max_len.
Pre-alignment only sees D_public, so the task rows say how far the alignment carries to what clients train on.
"""
import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedsoda_mpi import data, oda
from fedsoda_mpi.config import load_config
from fedsoda_mpi.runlog import RunLog
from fedsoda_mpi.server import Server


def task_batches(server: Server, task: str, n: int, seed: int) -> list[dict]:
    """`n` training examples of `task` (prompt + answer, as clients train on them), sampled with `seed`."""
    cfg = server.cfg
    train, _ = data.split_train_val(data.load_rows(task, "train"), task, cfg.data.val_size)
    pick = np.random.default_rng(seed).choice(len(train), size=min(n, len(train)), replace=False)
    texts = ["".join(data.prompt_and_answer(task, train[i])) for i in sorted(pick)]
    return data.public_batches(server.tok, texts, cfg.data.max_len, cfg.oda.batch_size)


def measure(server: Server, sets: dict[str, list[dict]]) -> dict[str, float]:
    """KL(M || M*) per token on every set of batches, with the sub-LLM as it is now."""
    return {name: oda.kl_divergence(server.full, server.sub, batches) for name, batches in sets.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="jobs/smollm2_sst2_iid.yaml")
    ap.add_argument("--tasks", default="sst2,boolq,gsm8k")
    ap.add_argument("--texts", type=int, default=64, help="training examples per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, ["method=fedsoda", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        log = RunLog(Path(tmp), 0, echo=False)  # its log.txt only: no run file to record into
        server = Server.load(cfg, log, torch.device("cpu"))
        server.build(server.plan_layers())
        held = server.texts
        sets = {f"{held.kl_on} held-out ({len(held.heldout)} batches, the run's kl_on)": held.heldout}
        sets |= {f"{t} training examples ({args.texts})": task_batches(server, t, args.texts, cfg.seed)
                 for t in args.tasks.split(",")}
        before = measure(server, sets)
        server.pre_align()
        after = measure(server, sets)
        log.close()
    print(f"\nKL(M || M*) per token, {cfg.model.name}, seed {cfg.seed}, groups {server.plan.groups}, "
          f"NF4 {cfg.quant.enabled}, {cfg.oda.pre_epochs} pre-alignment epoch(s) on {cfg.data.public}")
    print("| text | before pre-alignment | after | after / before |\n|---|---:|---:|---:|")
    for name in sets:
        print(f"| {name} | {before[name]:.4g} | {after[name]:.4g} | {after[name] / before[name]:.3f} |")


if __name__ == "__main__":
    main()
