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

from .config import Config, ConfigError, flatten, job_keys, set_key
from .host import to_host_state
from .paths import sha256_of
from .runlog import RunFolderRefused, archive_failed_attempt, finished_rounds
from .seeds import REALIGN_STREAM, RNG_SCHEME, torch_seed  # noqa: F401 (server.py seeds re-alignment through here)

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
    save_file(to_host_state(adapter), tmp / "adapter.safetensors")
    save_file(to_host_state(emulator), tmp / "emulator.safetensors")
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
    if not isinstance(state, dict) or not isinstance(state.get("sha256"), dict) or \
            not isinstance(state.get("round"), int):
        raise CheckpointError(f"{path / 'state.json'}: not a checkpoint state (a JSON object with round and sha256)")
    if path.name.startswith("round") and path.name != f"round{state['round']:05d}":
        raise CheckpointError(f"{path / 'state.json'}: says round {state['round']}, but the folder is {path.name}")
    _check_plan(path, state)
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


def _check_plan(path: Path, state: dict) -> None:
    """The pruning plan a resume rebuilds M* and M from (methods.Plan.to_dict) must be readable."""
    from .methods import Plan

    try:
        Plan.from_dict(state["plan"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path / 'state.json'}: no usable pruning plan ({type(e).__name__}: {e})") from None


def latest(run_dir: Path, warn=print) -> Checkpoint | None:
    """The newest checkpoint that verifies; a damaged newer one is reported through `warn` and skipped."""
    for rnd in reversed(rounds(run_dir)):
        try:
            return load(folder(run_dir) / f"round{rnd:05d}")
        except CheckpointError as e:
            warn(f"WARNING: skipping checkpoint round {rnd}: {e}; trying the previous one")
    return None


def claim(cfg: Config, run_dir: Path) -> tuple[Checkpoint | None, list[str]]:
    """Rank 0, the run folder locked, before any rank logs: the checkpoint this start continues from and the lines
    for the log. Without resume=auto an unfinished attempt moves to failed-<time>/ (prepare_config refused a
    finished run). With resume=auto: the newest valid checkpoint (a damaged newer one is named); with none valid, a
    finished run is refused (RunFolderRefused: it is never started over in place) and an unfinished attempt moves
    to failed-<time>/ (its generated public texts stay: the settings are the run's own) and the run starts over."""
    notes: list[str] = []
    if cfg.resume == "auto":
        ck = latest(run_dir, warn=notes.append)
        if ck is not None:
            return ck, notes
        done = finished_rounds(run_dir)
        if done is not None:
            raise RunFolderRefused(not_continuable(run_dir, done, "none of its checkpoints is valid"))
    moved = archive_failed_attempt(run_dir, keep=("public_self.jsonl",) if cfg.resume == "auto" else ())
    if moved and cfg.resume == "auto":
        notes.append(f"resume=auto: the folder has no valid checkpoint to continue from: moved its unfinished attempt "
                     f"(no /final) to {moved}; starting the run over")
    elif moved:
        notes.append(f"the folder held an unfinished attempt (no /final): moved it to {moved}; starting over")
    return None, notes


def resume_point(run_dir: Path, ck: Checkpoint) -> Checkpoint:
    """resume=auto from `ck`: its run.h5 copy replaces the live one, so rows written after it are dropped, not
    duplicated."""
    shutil.copyfile(ck.path / "run.h5", Path(run_dir) / "run.h5")
    return ck


def not_continuable(run_dir: Path, done: int, why: str) -> str:
    """The refusal of resume=auto on a finished run that has no checkpoint to continue from."""
    return (f"resume=auto: {run_dir} holds a finished run of {done} round{'s' * (done != 1)} but {why}, so it cannot "
            "be continued, and it is not started over in place; run the longer run in another output.dir (or move "
            "this folder away first)")


# keys that may change when a run is resumed; every other setting must equal the checkpointed run's
RESUME_MAY_CHANGE = ("resume", "device", "job", "debug.", "output.", "fed.rounds", "fed.checkpoint_every",
                     "fed.keep_checkpoints",
                     "eval.", "fed.cache_dir", "fed.cache_max_gb",  # the disk tier changes no result
                     "fed.stall_timeout")


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """resume=auto: the run folder must be fixed in advance; a run found there must have the same resolved settings
    and must not have done more rounds than fed.rounds; a finished run needs a checkpoint to continue from."""
    if not (cfg.output.dir or cfg.output.name or os.environ.get("SLURM_JOB_ID")):
        raise ConfigError("resume=auto: set output.dir (or output.name) so that a restart finds the same run folder")
    saved = run_dir / "config.yaml"
    if saved.is_file():
        _check_same_settings(cfg, saved)
    _check_rounds(cfg, run_dir)


def saved_settings(saved: Path) -> dict:
    """The resolved settings a run wrote to its config.yaml, as flat keys: the file's values as they are (no method
    preset is applied to them again); a key the file lacks (added to Config since) has its default."""
    cfg = Config()
    for key, value in job_keys(saved).items():
        set_key(cfg, key, value)
    return flatten(cfg.to_dict())


def _check_same_settings(cfg: Config, saved: Path) -> None:
    """Every setting outside RESUME_MAY_CHANGE equals the run's (both resolved: preset, job file, overrides)."""
    try:
        old = saved_settings(saved)
    except ConfigError as e:
        raise ConfigError(f"resume=auto: the run's settings cannot be read back ({e}); restore {saved} or choose "
                          "another output.dir") from None
    new = flatten(cfg.to_dict())
    for key in sorted(set(old) | set(new)):
        if not key.startswith(RESUME_MAY_CHANGE) and old.get(key) != new.get(key):
            raise ConfigError(f"resume=auto: {key} is {old.get(key)!r} in the run at {saved.parent} "
                              f"but {new.get(key)!r} "
                              "now; resume with the same settings (only rounds, eval, output, checkpoint keys may "
                              "change) or choose another output.dir")


def _check_rounds(cfg: Config, run_dir: Path) -> None:
    """fed.rounds may extend a run, never shorten it: not below the rounds of a finished run or the newest checkpoint
    of an unfinished one; a finished run without checkpoints cannot be continued (cheap: folder names only; rank 0
    verifies the checkpoints' files in `claim`)."""
    done = finished_rounds(run_dir)
    have = rounds(run_dir)
    reached, what = (done, "finished after") if done is not None else (max(have, default=0), "has a checkpoint of")
    if cfg.fed.rounds < reached:
        raise ConfigError(f"fed.rounds={cfg.fed.rounds}: the run at {run_dir} {what} round {reached}; resume=auto "
                          f"continues a run, it cannot shorten it: give fed.rounds >= {reached}, or choose another "
                          "output.dir")
    if done is not None and not have:
        raise ConfigError(not_continuable(run_dir, done, "no checkpoint (fed.checkpoint_every=0 keeps none)"))
