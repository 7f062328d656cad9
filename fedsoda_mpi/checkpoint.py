"""Checkpoints of a run and resuming from them (`resume=auto`).

    run_dir/checkpoints/round00007/   adapter.safetensors   global adapter LoRA (sub-LLM layer indices)
                                      emulator.safetensors  emulator LoRA at the retained layers s_i
                                      run.h5                the run file as it was after round 7
                                      state.json            round, plan, config, RNG scheme, sha256 of the files

Rank 0 writes a checkpoint into a hidden temporary folder and renames it (atomic on POSIX), keeps the
newest `fed.keep_checkpoints`, and on resume takes the newest one whose files match their sha256
(a corrupted one is skipped with a warning). Nothing else carries state between rounds: every random
draw of round t is seeded from (seed, t, client), so the round number is the whole RNG/sampler state,
and a resumed run reproduces an uninterrupted one bit for bit (tests/test_resume.py).
Tensors are safetensors and state is JSON: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .prepare import sha256_of

# How every random draw is derived (recorded in state.json; the sampler state is the round number).
RNG_SCHEME = {
    "client_sampling": "numpy default_rng([seed, round])",
    "local_batches": "numpy default_rng([seed, round, client])",
    "local_torch": "torch.manual_seed(seed * 100003 + round * 1009 + client)",
    "re_alignment_sample": "numpy default_rng([seed, round, 7])",
    "re_alignment_torch": "torch.manual_seed(seed * 100003 + round * 1009 + 999983)",
    "data_partition": "numpy default_rng(seed) over the task's training file",
}
FILES = ("adapter.safetensors", "emulator.safetensors", "run.h5")


class CheckpointError(RuntimeError):
    pass


@dataclass
class Checkpoint:
    round: int
    path: Path
    adapter: dict[str, torch.Tensor]
    emulator: dict[str, torch.Tensor]
    state: dict


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: Path, rnd: int, adapter: dict[str, torch.Tensor], emulator: dict[str, torch.Tensor],
         run_file: Path, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `rnd` atomically (temporary folder, fsync, rename) and keep the newest `keep`."""
    ckdir = folder(run_dir)
    ckdir.mkdir(parents=True, exist_ok=True)
    tmp = ckdir / f".round{rnd:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in adapter.items()}, tmp / "adapter.safetensors")
    save_file({k: v.detach().contiguous() for k, v in emulator.items()}, tmp / "emulator.safetensors")
    shutil.copyfile(run_file, tmp / "run.h5")
    state = {**state, "round": rnd, "rng": RNG_SCHEME, "sha256": {f: sha256_of(tmp / f) for f in FILES}}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in (*FILES, "state.json"):
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    final = ckdir / f"round{rnd:05d}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in rounds(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(ckdir / f"round{old:05d}", ignore_errors=True)
    return final


def rounds(run_dir: Path) -> list[int]:
    """Rounds with a (renamed, so complete when written) checkpoint folder, oldest first."""
    ckdir = folder(run_dir)
    if not ckdir.is_dir():
        return []
    out = []
    for p in ckdir.iterdir():
        if p.is_dir() and p.name.startswith("round") and p.name[5:].isdigit():
            out.append(int(p.name[5:]))
    return sorted(out)


def load(path: Path) -> Checkpoint:
    """Read and verify one checkpoint folder; raises CheckpointError naming what is wrong."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({e})") from None
    for name in FILES:
        want = state.get("sha256", {}).get(name)
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing")
        if want != sha256_of(path / name):
            raise CheckpointError(f"{path / name}: sha256 mismatch (corrupted or partly written)")
    try:
        adapter, emulator = load_file(path / "adapter.safetensors"), load_file(path / "emulator.safetensors")
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path}: safetensors unreadable ({e})") from None
    return Checkpoint(int(state["round"]), path, adapter, emulator, state)


def latest(run_dir: Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; a damaged newer one is reported through `warn` and skipped."""
    for rnd in reversed(rounds(run_dir)):
        try:
            return load(folder(run_dir) / f"round{rnd:05d}")
        except CheckpointError as e:
            warn(f"WARNING: skipping checkpoint round {rnd}: {e}; trying the previous one")
    return None
