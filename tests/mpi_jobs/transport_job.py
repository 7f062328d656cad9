"""Run under `mpirun -n 3`: round trips of fp32/bf16/int tensors through comm.Comm, and the collectives' idle=True
waits; prints JSON per rank.

    mpirun -n 3 python -m mpi4py tests/mpi_jobs/transport_job.py [--raise-on 2] [--chunk 1000]
"""
import argparse
import json
import time

import torch

from fedsoda_mpi import comm as C


def message(rank: int, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(rank * 31 + 7)
    if dtype.is_floating_point:
        return {"a": torch.randn(5, 7, generator=g).to(dtype), "b": torch.randn(3, generator=g).to(dtype)}
    return {"a": torch.randint(-1000, 1000, (5, 7), generator=g).to(dtype),
            "b": torch.randint(0, 100, (3,), generator=g).to(dtype)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--raise-on", type=int, default=-1)
    ap.add_argument("--chunk", type=int, default=0)
    args = ap.parse_args()
    if args.chunk:
        C.CHUNK_ELEMS = args.chunk
    C.install_abort_hook()
    comm = C.Comm()
    if comm.rank == args.raise_on:
        raise RuntimeError(f"boom on rank {comm.rank}")
    report = {"rank": comm.rank, "ok": True, "payload": {"sent": 0, "recv": 0}}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8):
        root_msg = message(0, dtype)
        schema = comm.agree_schema(C.Schema.of(root_msg) if comm.rank == 0 else None, category="schema")
        got = comm.broadcast(root_msg if comm.rank == 0 else None, schema, category="data")
        report["ok"] &= all(torch.equal(got[k], root_msg[k]) for k in root_msg)
        report["payload"]["recv" if comm.rank else "sent"] += schema.nbytes * (1 if comm.rank else comm.size - 1)
        # gather: rank r sends r messages (a virtual-client schedule)
        counts = list(range(comm.size))
        mine = [message(comm.rank * 10 + i, dtype) for i in range(counts[comm.rank])]
        out = comm.gatherv(mine, schema, counts, category="data")
        if comm.rank == 0:
            for r in range(comm.size):
                for i, m in enumerate(out[r]):
                    ref = message(r * 10 + i, dtype)
                    report["ok"] &= all(torch.equal(m[k], ref[k]) for k in ref)
            report["payload"]["recv"] += sum(counts[1:]) * schema.nbytes
        else:
            report["payload"]["sent"] += counts[comm.rank] * schema.nbytes
    files = comm.broadcast_bytes({"x.bin": bytes(range(256)) * 40, "y.json": b"{}"} if comm.rank == 0 else None)
    report["ok"] &= files["x.bin"] == bytes(range(256)) * 40 and files["y.json"] == b"{}"
    report["counted"] = dict(comm.bytes["data"])
    report["idle"] = idle_collectives(comm)
    print("RESULT " + json.dumps(report), flush=True)


def idle_collectives(comm: C.Comm, work_s: float = 0.3) -> dict:
    """Each collective with idle=True after one rank (the "worker", rank i mod W for the i-th call) works for
    `work_s`: the value arrives, and each other rank spent about that long asleep in idle_wait, the worker not."""
    root_msg = message(0, torch.float32)
    calls = {
        "agree_schema": lambda: comm.agree_schema(C.Schema.of(root_msg) if comm.rank == 0 else None, idle=True),
        "broadcast": lambda: comm.broadcast(root_msg if comm.rank == 0 else None, C.Schema.of(root_msg), idle=True),
        "gatherv": lambda: comm.gatherv([root_msg], C.Schema.of(root_msg), [1] * comm.size, idle=True),
        "broadcast_flag": lambda: comm.broadcast_flag(True if comm.rank == 0 else None, idle=True),
        "broadcast_bytes": lambda: comm.broadcast_bytes({"z": b"xyz"} if comm.rank == 0 else None, idle=True),
    }
    out = {}
    for i, (name, call) in enumerate(calls.items()):
        worker = i % comm.size
        if comm.rank == worker:
            time.sleep(work_s)
        before = comm.idle_seconds
        got = call()
        waited = comm.idle_seconds - before
        arrived = {"agree_schema": lambda: got == C.Schema.of(root_msg),
                   "broadcast": lambda: all(torch.equal(got[k], root_msg[k]) for k in root_msg),
                   "gatherv": lambda: comm.rank != 0 or all(torch.equal(m[0]["a"], root_msg["a"]) for m in got),
                   "broadcast_flag": lambda: got is True,
                   "broadcast_bytes": lambda: bytes(got["z"]) == b"xyz"}[name]()
        slept = waited < 0.5 * work_s if comm.rank == worker else waited > 0.5 * work_s
        out[name] = bool(arrived and slept)
    return out


if __name__ == "__main__":
    main()
