"""Which device each rank computes on: the `device` setting (auto | cuda | cpu), decided once before the run.

Every rank reports what it sees (`Seen`: host, node-local rank, visible GPUs and whether they support bfloat16);
`comm.Comm.agree_devices` gathers the reports to every rank, and each rank applies the same pure rule (`assign`),
so all ranks know every rank's device and stop together on a setting that cannot hold:

    cpu    every rank on the CPU
    cuda   every rank on a GPU: GPU (node-local rank mod visible GPUs) of its node; a rank that sees no GPU stops
           every rank with one line (exit 2)
    auto   cuda where a rank sees a GPU, else the CPU (logged per rank)

Node-local rank: the rank's position among the ranks of its host (an MPI shared-memory split). With Slurm's
per-task binding (`--gpus-per-task=1`) each rank sees one GPU and takes it; with every GPU visible (mpirun on a
node, or `--gpus-per-node`), rank i of a node takes GPU i mod visible. Ranks sharing a GPU are reported once
(`Assignment.warnings`), naming rank 0 when it shares: it holds the full LLM. bfloat16 settings (model.dtype,
eval.dtype, quant.compute_dtype) on a GPU without bfloat16 support (compute capability < 8.0: V100, T4) are
refused rather than replaced by float16, whose narrower range would change the run's numbers silently.
"""
from __future__ import annotations

import os
import socket
from collections import defaultdict
from dataclasses import dataclass, field

import torch

CHOICES = ("auto", "cuda", "cpu")


class DeviceError(ValueError):
    """A device setting that cannot hold on some rank (raised on every rank, with the same text)."""


@dataclass(frozen=True)
class Seen:
    """What one rank sees: its host, its node-local rank, the GPUs visible to it and their bfloat16 support."""
    host: str
    local_rank: int
    gpus: int
    bf16: bool
    names: tuple = ()
    uuids: tuple = ()  # one per visible GPU: tells GPUs apart across ranks (per-task binding: all are "cuda:0")

    @classmethod
    def here(cls, local_rank: int) -> "Seen":
        """This process's view (torch.cuda, no GPU work)."""
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        bf16 = n > 0 and all(torch.cuda.get_device_capability(i)[0] >= 8 for i in range(n))
        names = tuple(torch.cuda.get_device_name(i) for i in range(n))
        uuids = tuple(str(getattr(torch.cuda.get_device_properties(i), "uuid", "")) for i in range(n))
        return cls(socket.gethostname(), local_rank, n, bf16, names, uuids)


@dataclass
class Assignment:
    """Every rank's device ("cpu" or "cuda:<i>", indices as the rank sees its GPUs), with the reports behind it."""
    devices: list[str]
    seen: list[Seen]
    warnings: list[str] = field(default_factory=list)

    def table(self) -> list[str]:
        """One log line per rank: rank, host, device, the GPU's name."""
        out = []
        for r, (d, s) in enumerate(zip(self.devices, self.seen)):
            name = f" ({s.names[int(d.split(':')[1])]})" if d != "cpu" and s.names else ""
            out.append(f"rank {r}: {s.host} {d}{name}")
        return out

    def attrs(self) -> dict:
        """/devices attributes of run.h5: per rank its device, host and GPU count."""
        return {"device": self.devices, "host": [s.host for s in self.seen],
                "visible_gpus": [s.gpus for s in self.seen], "warnings": self.warnings or [""]}


def assign(setting: str, seen: list[Seen], bf16_keys: list[str] | None = None) -> Assignment:
    """The device of every rank under `setting` (module docstring); DeviceError when it cannot hold."""
    if setting not in CHOICES:
        raise DeviceError(f"device: must be one of {', '.join(CHOICES)}, got {setting!r}")
    if setting == "cuda":
        blind = [r for r, s in enumerate(seen) if s.gpus == 0]
        if blind:
            where = ", ".join(f"rank {r} on {seen[r].host}" for r in blind[:4]) + (" ..." if len(blind) > 4 else "")
            raise DeviceError(f"device=cuda: {len(blind)} of {len(seen)} ranks see no GPU ({where}); request one "
                              "GPU per rank (e.g. sbatch --gpus-per-task=1) or run with device=auto or device=cpu")
    devices = ["cpu" if setting == "cpu" or s.gpus == 0 else f"cuda:{s.local_rank % s.gpus}" for s in seen]
    out = Assignment(devices, list(seen))
    _check_bf16(out, bf16_keys or [])
    out.warnings = sharing(out) + mixed(out)
    return out


def mixed(a: Assignment) -> list[str]:
    """device=auto with some ranks on GPUs and some on the CPU: one warning naming the CPU ranks."""
    cpu = [r for r, d in enumerate(a.devices) if d == "cpu"]
    if not cpu or len(cpu) == len(a.devices):
        return []
    return [f"ranks {', '.join(map(str, cpu))} see no GPU and run on the CPU while the others use GPUs; a round "
            "waits for its slowest rank (device=cuda makes this an error)"]


def _check_bf16(a: Assignment, bf16_keys: list[str]) -> None:
    no = [r for r, (d, s) in enumerate(zip(a.devices, a.seen)) if d != "cpu" and not s.bf16]
    if bf16_keys and no:
        raise DeviceError(f"{', '.join(bf16_keys)}=bfloat16 but the GPU of rank {no[0]} ({a.seen[no[0]].host}) has "
                          "no bfloat16 support (compute capability < 8.0, e.g. V100, T4); set "
                          f"{'=float16 / '.join(bf16_keys)}=float16 or float32")


def sharing(a: Assignment) -> list[str]:
    """One warning per GPU that several ranks use. A GPU is known by its UUID; without one, by host and index
    (exact when every rank of a host sees the same GPUs)."""
    users = defaultdict(list)
    for r, (d, s) in enumerate(zip(a.devices, a.seen)):
        if d != "cpu":
            index = int(d.split(":")[1])
            uuid = s.uuids[index] if len(s.uuids) > index and s.uuids[index] else ""
            users[(s.host, d, uuid)].append(r)
    out = []
    for (host, d, _), ranks in sorted(users.items(), key=lambda kv: kv[1][0]):
        if len(ranks) > 1:
            who = ("rank 0 (the server, holding the full LLM) shares it with clients" if 0 in ranks
                   else "clients share it")
            out.append(f"{host} {d} is used by ranks {', '.join(map(str, ranks))}: {who}; each rank's peak memory "
                       "adds up on it (request one GPU per rank to avoid this)")
    return out


def bf16_keys(cfg) -> list[str]:
    """The settings that ask for bfloat16 compute on the rank's device."""
    keys = {"model.dtype": cfg.model.dtype, "eval.dtype": cfg.eval.dtype,
            "quant.compute_dtype": cfg.quant.compute_dtype}
    return [k for k, v in keys.items() if v == "bfloat16"]


def activate(device: str) -> torch.device:
    """Make `device` this process's current device (torch.cuda.set_device), so that CUDA calls without an explicit
    device (allocator statistics, kernels of libraries) go to it; returns it as a torch.device."""
    d = torch.device(device)
    if d.type == "cuda":
        torch.cuda.set_device(d)
    return d


def deterministic(on: bool) -> None:
    """debug.deterministic: deterministic algorithms (CUDA: cuBLAS workspace config, no cuDNN autotuning), so that
    two runs on one GPU give the same bits; an op without a deterministic kernel then raises, naming it."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
