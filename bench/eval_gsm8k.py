"""GSM8K k-shot evaluation: the naive loop vs the prefix-cached batched path, side by side in one process.

    python bench/eval_gsm8k.py [--questions 16] [--batch 4] [--max-new-tokens 96] [--threads 1]

SmolLM2-135M-Instruct, the first `--questions` GSM8K test questions, the default 4-shot prefix (seed 0):
- naive: `gsm8k_accuracy(batch_size=1, prefix_cache=False)`: one question at a time, whole prompt prefilled;
- cached: `gsm8k_accuracy(batch_size=--batch, prefix_cache=True)`: the k-shot prefix is prefilled once and its
  KV cache shared by batches of questions, which only prefill their own tokens (what `evaluate` runs).
Both are greedy, so the generated texts must be identical; the bench prints how many are.
Issue target: cached / naive time per example <= 0.5 with identical outputs.
"""
import argparse
import time

import torch

from fedsoda_mpi import data, models
from fedsoda_mpi.evaluate import gsm8k_accuracy
from fedsoda_mpi.prepare import prepare_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load_causal_lm(prepare_model("smollm2-135m"))
    data.ensure_pad_token(tok)
    test, train = data.load_rows("gsm8k", "test"), data.load_rows("gsm8k", "train")
    runs = {"naive loop (batch 1, whole prompt)": dict(batch_size=1, prefix_cache=False),
            f"prefix KV cache, batches of {args.batch}": dict(batch_size=args.batch, prefix_cache=True)}
    seconds, results = {}, {}
    for name, kw in runs.items():
        t = time.perf_counter()
        results[name] = gsm8k_accuracy(model, tok, test, train, k=4, max_new_tokens=args.max_new_tokens,
                                       max_examples=args.questions, seed=0, **kw)
        seconds[name] = time.perf_counter() - t
    (naive, cached) = runs
    same = sum(a == b for a, b in zip(results[naive]["outputs"], results[cached]["outputs"]))
    prefix_tokens = len(tok(data.gsm8k_kshot_prefix(train, 4, 0)).input_ids)
    print(f"SmolLM2-135M, {args.questions} GSM8K test questions, 4-shot prefix of {prefix_tokens} tokens, "
          f"max {args.max_new_tokens} new tokens, {args.threads} thread(s)")
    print(f"{'route':42s} {'s/example':>10s} {'accuracy':>9s} {'ratio':>7s}")
    for name in runs:
        per = seconds[name] / args.questions
        print(f"{name:42s} {per:10.3f} {results[name]['accuracy']:9.3f} {seconds[name] / seconds[naive]:7.3f}")
    print(f"identical greedy outputs: {same}/{args.questions}")
    print(f"cached / naive time per example: {seconds[cached] / seconds[naive]:.3f} (target <= 0.5)")


if __name__ == "__main__":
    main()
