"""Exchange benchmark: flat typed buffers (comm.Comm) vs pickled dicts of tensors, one FedAvg exchange.

    mpirun -n 11 python -m mpi4py bench/comm.py [--sizes-mb 3 30] [--reps 5]

Per repetition every client uploads a LoRA-like dict of fp32 tensors of the given size to rank 0
(Gatherv vs pickled gather), rank 0 averages it and broadcasts the result (Bcast vs pickled bcast).
Prints, per size: median time of each route, their ratio, and bytes moved / payload bytes, where
"moved" is what each route hands to MPI (the pickled route: the pickle's length).
"""
import argparse
import pickle
import time

import numpy as np
import torch
from mpi4py import MPI

from fedsoda_mpi.comm import Comm, Schema


def lora_like(total_mb: float, seed: int) -> dict[str, torch.Tensor]:
    """fp32 tensors shaped like LoRA A (8 x 576) / B (576 x 8) pairs adding up to ~total_mb."""
    g = torch.Generator().manual_seed(seed)
    n_pairs = max(1, int(total_mb * 2**20 / (2 * 8 * 576 * 4)))
    out = {}
    for i in range(n_pairs):
        out[f"layers.{i}.lora_A.weight"] = torch.randn(8, 576, generator=g)
        out[f"layers.{i}.lora_B.weight"] = torch.randn(576, 8, generator=g)
    return out


def average(msgs: list[dict]) -> dict:
    return {k: torch.stack([m[k] for m in msgs]).mean(0) for k in msgs[0]}


def buffers(comm: Comm, msg: dict, schema: Schema) -> float:
    comm.comm.Barrier()
    t0 = time.perf_counter()
    counts = [0] + [1] * (comm.size - 1)
    got = comm.gatherv([] if comm.rank == 0 else [msg], schema, counts, category="bench")
    avg = average([m for r in got for m in r]) if comm.rank == 0 else None
    comm.broadcast(avg, schema, category="bench")
    return time.perf_counter() - t0


def pickled(world, msg: dict) -> tuple[float, int]:
    world.Barrier()
    t0 = time.perf_counter()
    got = world.gather(None if world.Get_rank() == 0 else msg, root=0)
    avg = average([m for m in got if m is not None]) if world.Get_rank() == 0 else None
    out = world.bcast(avg, root=0)
    dt = time.perf_counter() - t0
    moved = len(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)) if world.Get_rank() == 0 else 0
    return dt, moved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[3, 30])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    comm = Comm()
    world = MPI.COMM_WORLD
    rows = []
    for mb in args.sizes_mb:
        msg = lora_like(mb, comm.rank)
        schema = comm.agree_schema(Schema.of(msg))
        comm.bytes.clear()
        t_buf = [buffers(comm, msg, schema) for _ in range(args.reps)]
        moved_buf = world.reduce(comm.bytes["bench"]["sent"], op=MPI.SUM)
        t_pkl, moved_pkl = [], 0
        for _ in range(args.reps):
            dt, m = pickled(world, msg)
            t_pkl.append(dt)
        # pickled route: uploads (each client's pickle) + the broadcast's pickle to every client
        up = world.reduce(len(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)) if comm.rank else 0, op=MPI.SUM)
        if comm.rank == 0:
            payload = schema.nbytes * (comm.size - 1) * 2 * args.reps
            moved_pkl = (up + m * (comm.size - 1)) * args.reps
            rows.append((mb, schema.nbytes, np.median(t_buf), np.median(t_pkl),
                         moved_buf / payload, moved_pkl / payload))
    if comm.rank == 0:
        print(f"\n{comm.size} ranks ({comm.size - 1} clients), median of {args.reps}; "
              "one exchange = Gatherv + average + Bcast\n")
        print("| per client | buffers (ms) | pickled dict (ms) | time ratio pickled/buffers "
              "| bytes moved/payload, buffers | bytes moved/payload, pickled |")
        print("|---|---|---|---|---|---|")
        for mb, nbytes, tb, tp, rb, rp in rows:
            print(f"| {nbytes / 2**20:.1f} MiB | {tb * 1e3:.1f} | {tp * 1e3:.1f} | {tp / tb:.1f}x "
                  f"| {rb:.4f} | {rp:.4f} |")


if __name__ == "__main__":
    main()
