"""The emulator cache of a client rank: the frozen sub-emulator's output per local example, in host memory and on a
node-local disk tier.

The sub-emulator (with its aligned LoRA) is frozen between re-alignments, so its output for a
local example never changes: `EmulatorCache` keeps it per example and local steps run only the
adapter layers (plus the LM head at label positions). Re-alignment invalidates the cache.

Two tiers: host memory holds the rows of the clients placed on the rank this round only (memory stays
flat in fed.clients); a client that leaves the rank spills its rows to a node-local folder (`DiskTier`,
fed.cache_dir, at most fed.cache_max_gb, least recently used clients evicted first), from which its next
placement reloads them instead of running the emulator again. Both tiers are dropped on re-alignment.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from . import models
from .data import pad_batch
from .host import to_host
from .methods import Plan
from .paths import scratch_dir
from .reaper import process_alive

FILL_BATCH = 16  # examples per emulator pass when a client's cache is filled
CACHE_PREFIX = "fedsoda-cache-"  # <scratch>/fedsoda-cache-<pid>-<host>-rank<R>/: one client rank's disk tier


class DiskTier:
    """The disk tier of `EmulatorCache`: one safetensors file per virtual client in this rank's own folder,
    at most `max_bytes` in all, least recently used clients evicted first.

    Why one safetensors file per (rank, client) rather than one memory-mapped file: a client's rows are always
    read and written whole (a fill is all-or-none), so nothing needs random access into a shared file; with one
    file per client, evicting a client is one unlink and its bytes are free at once (a shared file would need
    its own free-space allocator, and would keep the space of dropped clients), a write is atomic (a temporary
    name, then a rename), and each file describes itself (dtype, shapes, the client and the emulator version
    in its metadata) without pickles. A file holds `rows` [sum of lengths, D] (the unpadded emulator outputs
    of the client's examples, concatenated in example order) and `lengths` [n] (int64); it is read with
    `pread` into memory the tensors own, so the values are the written bits and the file can go at any time.

    File names carry the emulator version (`client<k>-v<version>.safetensors`); `clear` deletes every file
    when re-alignment changes the emulator, so no entry outlives the emulator that computed it."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self.files: OrderedDict[int, int] = OrderedDict()  # client -> bytes of its file, least recently used first
        self.version = 0
        self.bytes = self.peak_bytes = 0
        self.writes = self.evictions = self.errors = self.skipped = 0
        shutil.rmtree(self.folder, ignore_errors=True)  # the name of a dead process that had our pid: not ours

    def path(self, client: int) -> Path:
        return self.folder / f"client{client}-v{self.version}.safetensors"

    def has(self, client: int) -> bool:
        return client in self.files

    def touch(self, client: int) -> None:
        """Mark `client` as the most recently used."""
        self.files.move_to_end(client)

    def save(self, client: int, rows: list[torch.Tensor]) -> bool:
        """Write the rows of `client` (after evicting least recently used clients until they fit under the cap).
        False when they cannot be kept: larger than the whole cap (counted in `skipped`), or the write failed
        (e.g. a full disk: the disk tier is a saving, never a reason to stop a run, so the error is only counted)."""
        blob = safetensors_bytes({"rows": torch.cat(rows), "lengths": torch.tensor([len(r) for r in rows])},
                                 metadata={"client": str(client), "emulator_version": str(self.version)})
        if len(blob) > self.max_bytes:
            self.skipped += 1
            return False
        self._evict_for(len(blob))
        path = self.path(client)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(blob)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.errors += 1
            return False
        self.files[client] = len(blob)
        self.bytes += len(blob)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        self.writes += 1
        return True

    def load(self, client: int, lengths: list[int]) -> list[torch.Tensor] | None:
        """The rows of `client` written by `save` (views into one tensor), or None if its file is unreadable or
        does not match the client's examples (the entry is then dropped and the caller runs the emulator)."""
        try:
            with safe_open(self.path(client), framework="pt", backend="pread") as f:
                meta = f.metadata() or {}
                flat, saved = f.get_tensor("rows"), f.get_tensor("lengths").tolist()
        except (OSError, SafetensorError, KeyError):
            saved, meta = None, {}
        if saved != lengths or meta.get("client") != str(client) or meta.get("emulator_version") != str(self.version):
            self.drop(client)
            self.errors += 1
            return None
        self.touch(client)
        return list(torch.split(flat, lengths))

    def drop(self, client: int) -> None:
        """Delete the file of `client` (if any; a file that cannot be deleted is no longer counted or used)."""
        self.bytes -= self.files.pop(client, 0)
        with contextlib.suppress(OSError):
            self.path(client).unlink(missing_ok=True)

    def _evict_for(self, size: int) -> None:
        """Delete least recently used files until `size` more bytes fit under the cap."""
        while self.files and self.bytes + size > self.max_bytes:
            self.drop(next(iter(self.files)))
            self.evictions += 1

    def clear(self, version: int) -> None:
        """Re-alignment: delete every file now (they hold the old emulator's outputs); new files get `version`."""
        for client in list(self.files):
            self.drop(client)
        self.version = version

    def close(self) -> None:
        """Remove the folder and everything in it (end of the run, an exception, a stop request)."""
        self.files.clear()
        self.bytes = 0
        shutil.rmtree(self.folder, ignore_errors=True)


class EmulatorCache:
    """Per-example output of the frozen sub-emulator (the adapter's input), unpadded [len, D].

    `store` holds the rows in host memory, keyed (client, example); `keep` drops the clients not placed on this
    rank, after spilling them to the optional disk tier (`DiskTier`: `folder`, at most `max_bytes`; none when
    `folder` is None or `max_bytes` is 0), from which `fill` reloads a client instead of running the emulator.
    Counters (rows, cumulative): `ram_hits` / `disk_hits` / `misses` = rows a fill found in memory / loaded from
    disk / computed with the emulator; `hits` = rows `hidden` served."""

    def __init__(self, enabled: bool = True, folder: Path | None = None, max_bytes: int = 0):
        self.enabled = enabled
        self.store: dict[tuple[int, int], torch.Tensor] = {}
        self.complete: dict[int, int] = {}  # client -> its number of examples, once `store` holds all their rows
        self.disk = DiskTier(folder, max_bytes) if enabled and folder is not None and max_bytes > 0 else None
        self.version = 0  # bumped by every `invalidate` (re-alignment): the version disk entries are keyed by
        self.hits = 0
        self.misses = 0
        self.ram_hits = 0
        self.disk_hits = 0
        self.seconds = 0.0  # wall time in `fill` and `hidden` (emulator passes, disk reads, assembling rows)

    def invalidate(self) -> None:
        """Called when re-alignment changes the emulator LoRA (Algorithm 2 line 13): both tiers are stale."""
        self.store.clear()
        self.complete.clear()
        self.version += 1
        if self.disk is not None:
            self.disk.clear(self.version)

    def keep(self, clients: set[int]) -> None:
        """Drop the entries of every client not in `clients` (the ones placed on this rank this round), after
        writing their rows to the disk tier (once per emulator version: a client whose file is still there is
        only marked as recently used)."""
        for client in sorted(set(self.complete) - set(clients)):
            self._spill(client)
        for key in [key for key in self.store if key[0] not in clients]:
            del self.store[key]
        self.complete = {k: n for k, n in self.complete.items() if k in clients}

    def _spill(self, client: int) -> None:
        """A client leaves this rank: its rows go to the disk tier (if there is one and they are not there yet)."""
        if self.disk is None:
            return
        if self.disk.has(client):
            self.disk.touch(client)
        else:
            self.disk.save(client, [self.store[(client, j)] for j in range(self.complete[client])])

    @torch.no_grad()
    def fill(self, model, plan: Plan, client: int, examples: list[dict], pad_id: int) -> None:
        """Compute the emulator output E*(x) of every example of `client` not cached yet (all of them or none:
        entries are only ever dropped per client), in right-padded batches of FILL_BATCH examples sorted by
        (length, index). The batches depend only on the client's examples, never on the local schedule, so a
        resumed run (empty cache) refills every value bit for bit; sorting by length keeps padding small.
        A client with nothing in memory is first looked up in the disk tier: the rows written there are the bits
        this fill computed, so a run gives the same results with or without the disk tier."""
        if not self.enabled:
            return
        t0 = time.perf_counter()
        missing = sorted((len(e["input_ids"]), j) for j, e in enumerate(examples) if (client, j) not in self.store)
        if len(missing) == len(examples) and self._load(client, examples):
            missing = []
        else:
            self.ram_hits += len(examples) - len(missing)
        device = next(model.parameters()).device
        for start in range(0, len(missing), FILL_BATCH):
            chunk = missing[start:start + FILL_BATCH]
            batch = pad_batch([examples[j] for _, j in chunk], pad_id)
            h = _emulator(model, plan, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            for row, (n, j) in enumerate(chunk):
                self.store[(client, j)] = to_host(h[row, :n])
        self.misses += len(missing)
        self.complete[client] = len(examples)
        self.seconds += time.perf_counter() - t0

    def _load(self, client: int, examples: list[dict]) -> bool:
        """Put the rows of `client` from the disk tier into memory; False if it has none (or none usable)."""
        if self.disk is None or not self.disk.has(client):
            return False
        rows = self.disk.load(client, [len(e["input_ids"]) for e in examples])
        if rows is None:
            return False
        for j, row in enumerate(rows):
            self.store[(client, j)] = row
        self.disk_hits += len(rows)
        return True

    @torch.no_grad()
    def hidden(self, model, plan: Plan, client: int, idx: list[int], batch: dict) -> torch.Tensor:
        """Adapter input for a padded batch: the cached rows (after `fill`), or one emulator pass without a cache.

        The cache lives in host memory (on GPU runs a batch is copied to the device per step)."""
        t0 = time.perf_counter()
        try:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if not self.enabled:
                return _emulator(model, plan, ids, mask)
            self.hits += len(idx)
            out = torch.zeros(ids.shape[0], ids.shape[1], self._dim(model), dtype=self.store[(client, idx[0])].dtype)
            for i, (j, n) in enumerate(zip(idx, mask.sum(1).tolist())):
                out[i, :n] = self.store[(client, j)]
            return out.to(ids.device)
        finally:
            self.seconds += time.perf_counter() - t0

    @staticmethod
    def _dim(model) -> int:
        return models.decoder(model).config.hidden_size

    def stats(self) -> dict[str, int]:
        """Cumulative counters (rows; bytes of the disk tier now and at its peak; files written and evicted)."""
        d = self.disk
        return {"ram_rows": self.ram_hits, "disk_rows": self.disk_hits, "emulator_rows": self.misses,
                "disk_bytes": d.bytes if d else 0, "disk_peak_bytes": d.peak_bytes if d else 0,
                "disk_files": len(d.files) if d else 0, "disk_writes": d.writes if d else 0,
                "disk_evictions": d.evictions if d else 0, "disk_errors": d.errors if d else 0,
                "disk_skipped": d.skipped if d else 0}

    def describe(self) -> str:
        """One log line of what the tiers did so far."""
        s = self.stats()
        line = (f"emulator cache: {s['ram_rows']} rows from memory, {s['disk_rows']} from disk, "
                f"{s['emulator_rows']} computed (emulator); {self.hits} rows served")
        if self.disk is None:
            return line + "; no disk tier"
        return (line + f"; disk tier {self.disk.folder}: {s['disk_bytes'] / 2**20:.2f} MiB in {s['disk_files']} "
                f"files (peak {s['disk_peak_bytes'] / 2**20:.2f} MiB, cap {self.disk.max_bytes / 1e9:g} GB), "
                f"{s['disk_writes']} written, {s['disk_evictions']} evicted, {s['disk_skipped']} larger than the cap, "
                f"{s['disk_errors']} errors")

    def close(self) -> None:
        """Drop every tier; the disk tier's folder is removed."""
        self.store.clear()
        self.complete.clear()
        if self.disk is not None:
            self.disk.close()


def _emulator(model, plan: Plan, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward of the frozen sub-emulator E* (eval mode: no dropout), giving the adapter's input."""
    with models.mode(model), torch.no_grad():
        return models.hidden_before_layer(model, ids, mask, plan.train_start)


def cache_folder_name(rank: int, pid: int | None = None) -> str:
    """This rank's disk-tier folder name, fedsoda-cache-<pid>-<host>-rank<R>: the pid (and host, in case the
    scratch folder is shared between nodes) let `sweep_stale_caches` tell a dead process's folder from a live one."""
    return f"{CACHE_PREFIX}{os.getpid() if pid is None else pid}-{socket.gethostname()}-rank{rank}"


def sweep_stale_caches(root: Path) -> list[str]:
    """Remove the disk-tier folders (fedsoda-cache-<pid>-<host>-rank<R>) of this host's processes that are gone:
    a client rank SIGKILLed (mpirun's grace period after SIGTERM, an out-of-memory kill) could not remove its own.
    Folders of other hosts are left alone: their pids mean nothing here."""
    removed, host = [], socket.gethostname()
    for path in sorted(Path(root).glob(f"{CACHE_PREFIX}*")):
        parts = path.name[len(CACHE_PREFIX):].split("-", 1)
        try:
            pid = int(parts[0])
        except ValueError:
            continue  # not a name this code writes
        if len(parts) == 2 and parts[1].rsplit("-rank", 1)[0] == host and not process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def disk_tier(fed, rank: int) -> dict:
    """`EmulatorCache` keyword arguments of this client rank's disk tier ({} without one: fed.emulator_cache=false
    or fed.cache_max_gb=0): its folder under fed.cache_dir (default the job's local scratch, `paths.scratch_dir`)
    and its cap in bytes (fed.cache_max_gb x 10^9). Stale folders of dead processes are swept first."""
    if not fed.disk_tier:
        return {}
    root = scratch_dir(fed.cache_dir)[0]
    sweep_stale_caches(root)
    return {"folder": root / cache_folder_name(rank), "max_bytes": int(fed.cache_max_gb * 1e9)}
