"""What `debug.deterministic=true` costs on the CPU: client local steps with and without deterministic algorithms,
measured side by side in one process (routes alternate, the median of `--repeats` is reported).

    python bench/deterministic.py [--examples 32] [--batch 4] [--steps 8] [--repeats 3] [--threads 1]

SmolLM2-135M, SST-2, the production `client.local_train` on the FedSODA client (NF4 sub-LLM, emulator cached) and
the FedPETuning client (full fp32 model, LoRA on every layer), as in bench/step.py. Also reports whether the two
settings give the same loss bit for bit (on the CPU torch's kernels are deterministic already, so they should;
on CUDA the switch is what makes two runs agree, at a cost this CPU measurement cannot show).
"""
import statistics
import time

import numpy as np
import torch

from fedsoda_mpi import devices, models
from fedsoda_mpi.client import local_train
from fedsoda_mpi.emulator_cache import EmulatorCache
from step import FEDPETUNING, FEDSODA, client, set_up


def main() -> None:
    args, full, tok, examples = set_up(examples=32, steps=8)
    routes = {"FedSODA client (NF4 sub-LLM, cached)": (*client(full, FEDSODA, True), FEDSODA, True),
              "FedPETuning client (fp32, 30 LoRA layers)": (*client(full, FEDPETUNING, False), FEDPETUNING, False)}
    del full
    caches = {name: EmulatorCache(cached) for name, (*_, cached) in routes.items()}
    starts = {name: models.lora_state(m, plan.adapter_sub) for name, (m, _, plan, _) in routes.items()}

    def run(name: str, det: bool) -> tuple[float, float]:
        model, params, plan, _ = routes[name]
        torch.use_deterministic_algorithms(False)
        devices.deterministic(det)
        models.load_lora_state(model, starts[name])
        torch.manual_seed(1)
        t0 = time.perf_counter()
        loss, steps = local_train(model, plan, params, examples, tok.pad_token_id, caches[name], 0, args.steps, 1,
                                  args.batch, 1e-3, 0.01, np.random.default_rng(0))
        return (time.perf_counter() - t0) / steps, loss

    for name in routes:  # warm the caches and the allocator
        run(name, False)
    times = {(n, d): [] for n in routes for d in (False, True)}
    losses = {}
    for _ in range(args.repeats):
        for key in times:
            t, losses[key] = run(*key)
            times[key].append(t)
    print(f"\nSmolLM2-135M, SST-2, batch {args.batch}, {args.steps} local steps x {args.repeats} repeats, "
          f"{args.threads} thread(s), torch {torch.__version__}; median seconds per local step")
    print("| client | deterministic off | on | on / off | same loss bits |")
    print("|---|---:|---:|---:|---|")
    for name in routes:
        off, on = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
        same = np.float64(losses[(name, False)]).tobytes() == np.float64(losses[(name, True)]).tobytes()
        print(f"| {name} | {off:.3f} | {on:.3f} | {on / off:.3f} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
