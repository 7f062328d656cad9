"""Where a round's time goes: per-phase wall time on every rank, gathered into `/timing` of run.h5.

Each rank adds the wall time of its phases of a round to a `PhaseClock`; at the end of the round the
ranks' rows (one float64 vector each, fixed schema, no pickles) are gathered to rank 0, which appends
them to run.h5:

    /timing/round          [R]          int32
    /timing/phase_s        [R, W, P]    float64  seconds per rank and phase (names: attr `phases`)
    /timing/mpi_s          [R, W]       float64  seconds inside MPI data calls (part of download/upload/...)
    /timing/wall_s         [R, W]       float64  the rank's round time up to the gather
    /timing/local_steps    [R, W]       float64  optimizer steps the rank ran (clients)
    /timing/peak_rss_mb    [R, W]       float64  the process's peak resident set size so far
    /timing/peak_gpu_mb    [R, W]       float64  peak CUDA memory allocated on the rank's device during the round
                                                (the first round's row includes set-up: SGP, ODA; 0 on the CPU)
    /timing/cache_ram_rows      [R, W]  float32  emulator-cache rows this round's fills found in memory (clients)
    /timing/cache_disk_rows     [R, W]  float32  ... loaded from the disk tier
    /timing/cache_emulator_rows [R, W]  float32  ... computed with the emulator (misses)
    /timing/cache_disk_peak_mb  [R, W]  float64  the disk tier's peak size so far (MiB; 0 without one)

Run files written before the cache columns existed lack them (analysis/timing.py reads both).

Phases (P = 9): download (global adapter / emulator LoRA broadcast, incl. decode), emulator (the frozen
sub-emulator's forward, or assembling its cached output), adapter (forward/backward/step of the trainable
layers + LM head), upload (packing + gather), aggregate, realign (server ODA), evaluate (accuracy and the
drift probe), idle (waiting for
other ranks in `Comm.idle_wait`), other (= wall - all of the above: logging, HDF5, bookkeeping).
A checkpoint is written after the round's row, so its time is not in /timing (log.txt has it).

    python analysis/timing.py runs/NAME/run.h5      # the table of phases per role, and the MPI share
"""
from __future__ import annotations

import contextlib
import resource
import time

import numpy as np
import torch

PHASES = ("download", "emulator", "adapter", "upload", "aggregate", "realign", "evaluate", "idle", "other")
CACHE_ROWS = ("ram_rows", "disk_rows", "emulator_rows")  # `EmulatorCache.stats` counters recorded per round
EXTRA = ("mpi_s", "wall_s", "local_steps", "peak_rss_mb", "peak_gpu_mb", *(f"cache_{k}" for k in CACHE_ROWS),
         "cache_disk_peak_mb")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseClock:
    """Per-round phase seconds of one rank; `idle` comes from `comm.idle_seconds`, MPI from `comm.mpi_seconds`."""

    def __init__(self, comm, device: torch.device):
        self.comm, self.device = comm, device
        self.cache_disk_peak_mb = 0.0  # a high-water mark, like peak RSS: never reset
        self.start_round(reset_gpu=False)  # the first round's GPU peak includes the set-up phases

    def start_round(self, reset_gpu: bool = True) -> None:
        if reset_gpu and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self.cache_rows = dict.fromkeys(CACHE_ROWS, 0.0)
        self._idle0, self._mpi0 = self.comm.idle_seconds, self.comm.mpi_seconds

    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the block's wall time to `name` (blocks must not nest); time the block spends in `Comm.idle_wait`
        (a collective called with `idle=True`) counts as idle, not as `name`."""
        if name not in PHASES or name in ("idle", "other"):
            raise ValueError(f"unknown phase {name!r}")
        t, idle = time.perf_counter(), self.comm.idle_seconds
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t - (self.comm.idle_seconds - idle)

    def add(self, name: str, seconds: float) -> None:
        """Move `seconds` measured inside another phase's block into `name` (e.g. emulator out of adapter)."""
        self.seconds[name] += seconds

    def count_cache(self, before: dict, after: dict) -> None:
        """Add what the emulator cache did between two `EmulatorCache.stats()` snapshots to this round's row."""
        for k in CACHE_ROWS:
            self.cache_rows[k] += after[k] - before[k]
        self.cache_disk_peak_mb = max(self.cache_disk_peak_mb, after["disk_peak_bytes"] / 2**20)

    def row(self) -> np.ndarray:
        """[PHASES..., EXTRA...] of this round so far (float64)."""
        wall = time.perf_counter() - self.t0
        s = dict(self.seconds)
        s["idle"] = self.comm.idle_seconds - self._idle0
        s["other"] = max(0.0, wall - sum(v for k, v in s.items() if k != "other"))
        gpu = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        extra = [self.comm.mpi_seconds - self._mpi0, wall, float(self.steps), peak_rss_mb(), gpu,
                 *(float(self.cache_rows[k]) for k in CACHE_ROWS), self.cache_disk_peak_mb]
        return np.array([s[p] for p in PHASES] + extra, dtype=np.float64)


def split(rows: np.ndarray) -> dict[str, np.ndarray]:
    """[W, P + E] gathered rows -> the `/timing` datasets of one round."""
    p = len(PHASES)
    out = {"phase_s": rows[:, :p]}
    for i, name in enumerate(EXTRA):
        out[name] = rows[:, p + i]
    return out
