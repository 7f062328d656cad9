"""Host staging: the one place where tensors leave a model's device (a GPU, or the CPU) for host memory.

Models live on their rank's device (devices.py); everything downstream of a model works in host memory: LoRA
states (`models.lora_state`) that the strategies aggregate, MPI buffers (comm.py), numpy arrays, HDF5 rows,
safetensors checkpoints and exports. Crossing goes through here:

    to_host(t)          a detached copy in host memory (from any device): a snapshot, e.g. of LoRA weights
    readable(t)         t in host memory for a read-only exit (a file, a hash): no copy when it is there already
    to_host_state(d)    the same for a dict of tensors (a LoRA state)
    to_numpy(t)         to_host(t) as a numpy array (from any device)
    copy_into(buf, t)   t (any device) copied into a slice of a host buffer, one copy (MPI send buffers)
    as_numpy(t)         a numpy VIEW of a host tensor (MPI receive buffers): a device tensor here is a bug, and
                        raises DeviceError instead of copying silently

On CPU-only machines every tensor is on the host, so a missing `to_host` cannot fail there; the tests run the
device paths on virtual CUDA devices (tests/virtual_cuda.py) where it does (docs/design.md, "Devices").
"""
from __future__ import annotations

import numpy as np
import torch

HOST = torch.device("cpu")


class DeviceError(RuntimeError):
    """A tensor on a device reached a host-only exit (MPI buffer, numpy view) without `to_host`."""


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous copy of `t` in host memory (a copy even when `t` is already there)."""
    return t.detach().to(HOST, copy=True).contiguous()


def readable(t: torch.Tensor) -> torch.Tensor:
    """`t` detached and contiguous in host memory, sharing its memory when it is already there (read-only exits:
    files, hashes; at 8B a copy of every weight on the way to a file would double the host memory)."""
    return t.detach().to(HOST).contiguous()


def to_host_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`to_host` of every tensor of a state dict, keys and order kept."""
    return {k: to_host(v) for k, v in state.items()}


def copy_into(buf: torch.Tensor, t: torch.Tensor) -> None:
    """Copy `t` from any device into the host tensor `buf` (same number of elements): one device-to-host copy."""
    if buf.device.type != "cpu":
        raise DeviceError(f"copy_into needs a host buffer, got a {buf.device} one")
    buf.copy_(t.detach().reshape(buf.shape))


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """`t` from any device as a numpy array of its own memory."""
    return to_host(t).numpy()


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view sharing `t`'s memory (MPI send/receive buffers); `t` must already be in host memory."""
    if t.device.type != "cpu":
        raise DeviceError(f"a {t.device} tensor {tuple(t.shape)} reached a host buffer without host.to_host")
    return t.detach().numpy()
