"""Evaluation in float32 vs bfloat16 autocast (`eval.dtype`), side by side in one process: time, accuracy and
how many predictions agree, on the full test set, for the base model and for trained adapters.

    python bench/eval_dtype.py [--task sst2] [--threads 2] [RUN_DIR ...]

Each RUN_DIR is a finished run folder whose `adapter/` (a PEFT adapter for the full model) is loaded onto
SmolLM2-135M-Instruct; without RUN_DIRs only the base model is measured. The CPU study evaluates in
bfloat16 to fit its budget (docs/results.md); this says what that costs in accuracy and agreement.
"""
import argparse
import time
from pathlib import Path

import torch

from fedsoda_mpi import data, models
from fedsoda_mpi.evaluate import label_accuracy
from fedsoda_mpi.prepare import prepare_model


def measure(model, tok, task: str, rows: list[dict]) -> dict:
    """{dtype: (accuracy, predictions, seconds)} for float32 and bfloat16 autocast."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            res = label_accuracy(model, tok, task, rows, batch_size=8)
        out[dtype] = (res["accuracy"], res["predictions"], time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="*", help="finished run folders (their adapter/ is evaluated)")
    ap.add_argument("--task", default="sst2", choices=("sst2", "boolq"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = prepare_model("smollm2-135m")
    model, tok = models.load_causal_lm(path)
    data.ensure_pad_token(tok)
    rows = data.load_rows(args.task, "test")
    print(f"{args.task} test, n={len(rows)}, {args.threads} threads")
    print("| model | acc. float32 | acc. bfloat16 | predictions that agree | time bf16 / fp32 |")
    print("|---|---:|---:|---:|---:|")
    targets = [("base model", None)] + [(Path(r).name, Path(r) / "adapter") for r in args.runs]
    for name, adapter in targets:
        m = model
        if adapter is not None:
            from peft import PeftModel

            m = PeftModel.from_pretrained(models.load_causal_lm(path)[0], str(adapter)).eval()
        r = measure(m, tok, args.task, rows)
        (a32, p32, t32), (a16, p16, t16) = r["float32"], r["bfloat16"]
        agree = float((torch.as_tensor(p32) == torch.as_tensor(p16)).float().mean())
        print(f"| {name} | {100 * a32:.2f} | {100 * a16:.2f} | {100 * agree:.2f}% | {t16 / t32:.3f} |", flush=True)


if __name__ == "__main__":
    main()
