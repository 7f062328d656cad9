"""SGP's distance profile (Algorithm 1 lines 1-5, every n <= n_max at once) vs one plain forward pass.

    python bench/sgp.py [--samples 64] [--threads 1] [--repeats 3]

SmolLM2-135M, the default job's public set (WikiText-2, 64 paragraphs, 128 tokens, batches of 8) and its
SGP settings (L_E = 27 emulator layers, n_max = 4). Routes, alternated `--repeats` times (median):
- plain forward: `model(ids, mask)`, all 30 layers + LM head (what a server would run anyway);
- the profile as `sgp.distance_profile` computes it: the first L_E layers only, no head, + eq. 5 for all n;
- the profile from a full forward with output_hidden_states (how it was computed before), for reference.
Issue target: profile / plain forward <= 1.2.
"""
import argparse
import statistics
import time

import numpy as np
import torch

from fedsoda_mpi import data, models, sgp
from fedsoda_mpi.prepare import prepare_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = models.load_causal_lm(prepare_model("smollm2-135m"))
    data.ensure_pad_token(tok)
    batches = data.public_batches(tok, data.load_public("wikitext2")[:args.samples], 128, 8)
    L_E, n_max = 27, 4

    @torch.no_grad()
    def plain():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def profile():
        return sgp.distance_profile(model, batches, n_max, L_E)

    @torch.no_grad()
    def profile_full_forward():
        sums, count = torch.zeros(n_max, L_E, dtype=torch.float64), 0
        for b in batches:
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True,
                        use_cache=False)
            hidden = torch.stack(out.hidden_states[1:L_E + 1], dim=2)
            select = sgp._token_mask(b["attention_mask"], "last")
            sums += sgp._batch_distance_sums(hidden, select, n_max)
            count += int(select.sum())
        return (sums / count).float().numpy()

    model.eval()
    routes = {"plain forward (30 layers + LM head)": plain, "distance profile (sgp.py: 27 layers, no head)": profile,
              "distance profile via full forward + output_hidden_states": profile_full_forward}
    times = {k: [] for k in routes}
    for _ in range(args.repeats):
        for name, fn in routes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med[next(iter(routes))]
    print(f"\n{args.samples} public paragraphs ({len(batches)} batches), L_E={L_E}, n_max={n_max}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print("| route | s | ratio to plain forward |\n|---|---:|---:|")
    for name in routes:
        print(f"| {name} | {med[name]:.2f} | {med[name] / ref:.3f} |")
    a, b = profile(), profile_full_forward()
    ok = np.isfinite(a)
    print(f"max |profile - full-forward profile| over {int(ok.sum())} entries: {np.abs(a[ok] - b[ok]).max():.2e}")


if __name__ == "__main__":
    main()
