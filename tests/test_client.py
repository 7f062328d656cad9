"""Client local training: the emulator activation cache gives the same losses and weights as no cache,
the proximal term's gradient is mu (w - w_global) (eq. 10), batch schedules, NF4 sub-LLM training."""
import numpy as np
import pytest
import torch

from fedsoda_mpi import models
from fedsoda_mpi.client import batch_schedule, local_train, proximal
from fedsoda_mpi.emulator_cache import EmulatorCache
from fedsoda_mpi.methods import Plan
from tests.conftest import tiny_causal_lm


def _setup(quantize: bool, tmp_path):
    full = tiny_causal_lm("llama", layers=8, hidden=64, vocab=128)
    kept = [0, 1, 4, 5, 6, 7]  # groups (1, 3): keeps 1, drops 2, 3
    plan = Plan(8, 2, kept, [(1, 3)], [(1, 1)])
    sub = models.build_sub_model(full, kept, quantize, workdir=tmp_path / "sub")
    torch.manual_seed(0)
    sub = models.add_lora(sub, plan.emulator_lora_sub + plan.adapter_sub, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (7, 11, 5, 9, 12, 6):
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (n - 2) + ids[-2:]})
    return sub, plan, examples


def _train(sub, plan, examples, cache_on: bool):
    params = models.set_trainable(sub, plan.adapter_sub)
    start = models.lora_state(sub, plan.adapter_sub)
    cache = EmulatorCache(cache_on)
    losses = []
    for rnd in range(3):  # three rounds: the cache is filled in round 1, then hit
        models.load_lora_state(sub, start)
        torch.manual_seed(rnd)
        losses.append(local_train(sub, plan, params, examples, 0, cache, client=0, steps=3, epochs=1, batch_size=2,
                                  lr=1e-2, mu=0.1, rng=np.random.default_rng(rnd))[0])
        start = models.lora_state(sub, plan.adapter_sub)
    return losses, start, cache


@pytest.mark.parametrize("quantize", [False, True])
def test_cache_gives_same_losses_and_weights(quantize, tmp_path):
    sub, plan, examples = _setup(quantize, tmp_path)
    init = models.lora_state(sub)
    l_nocache, w_nocache, _ = _train(sub, plan, examples, False)
    models.load_lora_state(sub, init)
    l_cache, w_cache, cache = _train(sub, plan, examples, True)
    assert cache.hits > 0 and cache.misses == len(examples) and cache.seconds > 0
    np.testing.assert_allclose(l_cache, l_nocache, rtol=1e-5)
    for k in w_cache:
        # float reordering of batched NF4 matmuls, amplified by Adam
        torch.testing.assert_close(w_cache[k], w_nocache[k], rtol=1e-3, atol=1e-4)
    assert l_cache[0] != l_cache[-1]  # training moved the weights


def test_only_adapter_lora_changes(tmp_path):
    sub, plan, examples = _setup(True, tmp_path)
    before = {k: v.clone() for k, v in sub.state_dict().items()}
    _train(sub, plan, examples, True)
    after = sub.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k and any(f".layers.{i}." in k for i in plan.adapter_sub) for k in changed)


def test_proximal_gradient_is_mu_times_difference():
    w = torch.randn(4, 3, requires_grad=True)
    g = torch.randn(4, 3)
    proximal([w], [g], mu=0.3).backward()
    torch.testing.assert_close(w.grad, 0.3 * (w.detach() - g))


def test_batch_schedule_steps_and_epochs():
    rng = np.random.default_rng(0)
    s = batch_schedule(10, 4, steps=0, epochs=2, rng=rng)
    assert len(s) == 6 and all(len(b) == 4 for b in s)
    assert sorted(sum(s[:3], [])[:10]) == list(range(10))  # first epoch covers every example once
    assert len(batch_schedule(3, 4, steps=5, epochs=1, rng=rng)) == 5


def test_local_train_reports_its_steps(tmp_path):
    sub, plan, examples = _setup(False, tmp_path)
    params = models.set_trainable(sub, plan.adapter_sub)
    for steps, epochs, expected in ((5, 1, 5), (0, 2, 6)):  # 6 examples, batch 2: 3 steps per epoch
        _, n = local_train(sub, plan, params, examples, 0, EmulatorCache(True), 0, steps, epochs, 2, 1e-3, 0.0,
                           np.random.default_rng(0))
        assert n == expected


def test_cache_keep_drops_other_clients(tmp_path):
    sub, plan, examples = _setup(False, tmp_path)
    params = models.set_trainable(sub, plan.adapter_sub)
    cache = EmulatorCache(True)
    for client in (0, 1, 2):
        local_train(sub, plan, params, examples, 0, cache, client, 3, 1, 2, 1e-3, 0.0, np.random.default_rng(0))
    assert {c for c, _ in cache.store} == {0, 1, 2}
    cache.keep({1, 5})
    assert {c for c, _ in cache.store} == {1} and len(cache.store) == 6


@pytest.mark.parametrize("quantize", [False, True])
def test_cache_fill_is_independent_of_the_local_schedule(quantize, tmp_path, monkeypatch):
    """A client's cache is filled whole, in length-sorted batches: the same values bit for bit whatever
    schedule (steps, seed) first touched it (what makes a resumed run's refill exact), and each value is the
    unpadded emulator output of its example."""
    from fedsoda_mpi import emulator_cache as cache_mod

    monkeypatch.setattr(cache_mod, "FILL_BATCH", 4)  # 6 examples: a batch of 4 (padded) and one of 2
    sub, plan, examples = _setup(quantize, tmp_path)
    params = models.set_trainable(sub, plan.adapter_sub)
    start = models.lora_state(sub, plan.adapter_sub)
    stores = []
    for steps, seed in ((1, 0), (3, 7)):
        models.load_lora_state(sub, start)
        cache = EmulatorCache(True)
        local_train(sub, plan, params, examples, 0, cache, 0, steps, 1, 2, 1e-3, 0.0, np.random.default_rng(seed))
        assert cache.misses == len(examples) and len(cache.store) == len(examples)
        stores.append(cache.store)
    for key in stores[0]:
        assert torch.equal(stores[0][key], stores[1][key])
    for j, e in enumerate(examples):
        ids = torch.tensor([e["input_ids"]])
        alone = cache_mod._emulator(sub, plan, ids, torch.ones_like(ids))[0]
        torch.testing.assert_close(stores[0][(0, j)], alone, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- the disk tier

def _fill(cache, sub, plan, examples, client):
    """One local fit's worth of cache use for `client` (fill + one step): what a placement does."""
    params = models.set_trainable(sub, plan.adapter_sub)
    local_train(sub, plan, params, examples, 0, cache, client, 1, 1, 2, 1e-3, 0.0, np.random.default_rng(0))


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("quantize", [False, True])
def test_disk_round_trip_is_bit_identical(quantize, tmp_path):
    """A client that leaves the rank spills its rows to one safetensors file; placed again, it reloads them
    (a disk hit, no emulator pass) bit for bit; its file stays for its next departure (written once)."""
    sub, plan, examples = _setup(quantize, tmp_path)
    folder = tmp_path / "cache"
    cache = EmulatorCache(True, folder, 10**9)
    _fill(cache, sub, plan, examples, 3)
    before = {j: cache.store[(3, j)].clone() for j in range(len(examples))}
    cache.keep(set())
    assert cache.store == {} and _files(folder) == ["client3-v0.safetensors"]
    assert cache.stats()["disk_bytes"] == (folder / "client3-v0.safetensors").stat().st_size > 0
    _fill(cache, sub, plan, examples, 3)
    assert (cache.misses, cache.disk_hits, cache.ram_hits) == (6, 6, 0)
    for j, row in before.items():
        assert cache.store[(3, j)].dtype == row.dtype and torch.equal(cache.store[(3, j)], row)
    _fill(cache, sub, plan, examples, 3)  # the same round again: memory
    assert cache.ram_hits == 6
    cache.keep(set())
    assert cache.disk.writes == 1 and _files(folder) == ["client3-v0.safetensors"]
    cache.close()
    assert not folder.exists()


def test_training_with_the_disk_tier_matches_training_without(tmp_path):
    """Clients 0 and 1 take turns on one rank for four rounds: with the disk tier the returning client's rows
    come from disk, without it from a new emulator pass; losses and adapter weights are the same bits."""
    sub, plan, examples = _setup(True, tmp_path)
    data = {0: examples, 1: examples[::-1][:5]}
    init = models.lora_state(sub)
    runs = []
    for folder, cap in ((None, 0), (tmp_path / "cache", 10**9)):
        models.load_lora_state(sub, init)
        params = models.set_trainable(sub, plan.adapter_sub)
        cache = EmulatorCache(True, folder, cap)
        losses = []
        for rnd in range(4):
            k = rnd % 2
            cache.keep({k})
            torch.manual_seed(rnd)
            losses.append(local_train(sub, plan, params, data[k], 0, cache, k, 2, 1, 2, 1e-2, 0.1,
                                      np.random.default_rng(rnd))[0])
        runs.append((losses, models.lora_state(sub, plan.adapter_sub), cache.stats()))
        cache.close()
    (l_ram, w_ram, s_ram), (l_disk, w_disk, s_disk) = runs
    assert s_ram["emulator_rows"] == 2 * (6 + 5) and s_ram["disk_rows"] == 0
    assert s_disk["emulator_rows"] == 6 + 5 and s_disk["disk_rows"] == 6 + 5
    assert l_ram == l_disk and all(torch.equal(w_ram[k], w_disk[k]) for k in w_ram)


def test_lru_eviction_under_a_tiny_cap(tmp_path):
    """The cap holds two clients' files: a third evicts the least recently used one, where a reload counts as a
    use; a cap smaller than one file keeps nothing on disk. The disk tier never exceeds its cap."""
    sub, plan, examples = _setup(False, tmp_path)
    probe = EmulatorCache(True, tmp_path / "probe", 10**9)
    _fill(probe, sub, plan, examples, 0)
    probe.keep(set())
    size = probe.stats()["disk_bytes"]  # every client below has the same examples: the same file size
    probe.close()

    folder = tmp_path / "cache"
    cache = EmulatorCache(True, folder, 2 * size + size // 2)
    for k in (0, 1):
        _fill(cache, sub, plan, examples, k)
    cache.keep(set())  # 0 then 1 written: 0 is the least recently used
    _fill(cache, sub, plan, examples, 0)  # 0 reloaded from disk: now 1 is the least recently used
    _fill(cache, sub, plan, examples, 2)
    cache.keep({0})  # 2 leaves: 1 is evicted, 0's file stays (it is still valid)
    assert _files(folder) == ["client0-v0.safetensors", "client2-v0.safetensors"]
    s = cache.stats()
    assert s["disk_evictions"] == 1 and s["disk_peak_bytes"] == 2 * size <= cache.disk.max_bytes
    _fill(cache, sub, plan, examples, 1)  # evicted: computed again
    assert cache.stats()["emulator_rows"] == 4 * 6 and cache.stats()["disk_rows"] == 6
    cache.close()

    one = EmulatorCache(True, tmp_path / "one", size + 1)  # room for one client only
    for k in (0, 1, 2):
        _fill(one, sub, plan, examples, k)
    one.keep(set())
    assert _files(tmp_path / "one") == ["client2-v0.safetensors"] and one.stats()["disk_evictions"] == 2
    none = EmulatorCache(True, tmp_path / "none", size - 1)  # smaller than one file
    _fill(none, sub, plan, examples, 0)
    none.keep(set())
    assert _files(tmp_path / "none") == [] and none.stats()["disk_skipped"] == 1
    one.close()
    none.close()


def test_invalidate_deletes_the_disk_entries_and_bumps_the_version(tmp_path):
    """Re-alignment (Client.set_emulator -> invalidate): every file goes at once; the next fill runs the emulator
    and a later departure writes a file of the new version."""
    sub, plan, examples = _setup(False, tmp_path)
    folder = tmp_path / "cache"
    cache = EmulatorCache(True, folder, 10**9)
    for k in (0, 1):
        _fill(cache, sub, plan, examples, k)
    cache.keep({1})
    assert _files(folder) == ["client0-v0.safetensors"]
    cache.invalidate()
    assert _files(folder) == [] and cache.store == {} and cache.version == 1 and cache.stats()["disk_bytes"] == 0
    _fill(cache, sub, plan, examples, 0)
    assert cache.disk_hits == 0 and cache.misses == 3 * 6
    cache.keep(set())
    assert _files(folder) == ["client0-v1.safetensors"]
    cache.close()


def test_a_damaged_file_falls_back_to_the_emulator(tmp_path):
    """A disk entry that cannot be read (truncated) or does not match the client's examples is dropped and
    the rows are computed again: the disk tier can cost a pass, never a wrong value or a failed run."""
    sub, plan, examples = _setup(False, tmp_path)
    folder = tmp_path / "cache"
    cache = EmulatorCache(True, folder, 10**9)
    _fill(cache, sub, plan, examples, 0)
    want = {j: cache.store[(0, j)].clone() for j in range(6)}
    cache.keep(set())
    path = folder / "client0-v0.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    _fill(cache, sub, plan, examples, 0)
    assert cache.disk_hits == 0 and cache.misses == 12 and cache.stats()["disk_errors"] == 1
    assert all(torch.equal(cache.store[(0, j)], want[j]) for j in want)
    cache.keep(set())  # written again
    _fill(cache, sub, plan, examples[:5], 0)  # not the examples it was written for
    assert cache.disk_hits == 0 and cache.stats()["disk_errors"] == 2 and _files(folder) == []
    cache.close()


def test_disk_tier_folder_and_cap_from_the_config(tmp_path, monkeypatch):
    """fed.cache_dir (default $SLURM_TMPDIR, else $TMPDIR) / fedsoda-cache-<pid>-<host>-rank<R>; the cap is
    fed.cache_max_gb x 10^9 bytes; no disk tier with fed.cache_max_gb=0 or fed.emulator_cache=false."""
    import os
    import socket

    from fedsoda_mpi.emulator_cache import disk_tier
    from fedsoda_mpi.config import load_config

    name = f"fedsoda-cache-{os.getpid()}-{socket.gethostname()}-rank2"
    cfg = load_config(None, [f"fed.cache_dir={tmp_path / 'c'}", "fed.cache_max_gb=0.5"])
    assert disk_tier(cfg.fed, 2) == {"folder": tmp_path / "c" / name, "max_bytes": 500_000_000}
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "slurm"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    assert disk_tier(load_config(None, []).fed, 2) == {}  # the disk tier is opt-in
    assert disk_tier(load_config(None, ["fed.cache_max_gb=1"]).fed, 2)["folder"] == tmp_path / "slurm" / name
    monkeypatch.delenv("SLURM_TMPDIR")
    assert disk_tier(load_config(None, ["fed.cache_max_gb=1"]).fed, 2)["folder"] == tmp_path / "tmp" / name
    assert disk_tier(load_config(None, ["fed.cache_max_gb=0"]).fed, 2) == {}
    assert disk_tier(load_config(None, ["fed.emulator_cache=false", "fed.cache_max_gb=1"]).fed, 2) == {}
    assert EmulatorCache(True).disk is None and EmulatorCache(False, tmp_path, 10**9).disk is None


def test_a_failed_write_is_counted_not_raised(tmp_path):
    """A write that fails (here the folder cannot be created: a file is in the way; a full disk alike) leaves no
    disk entry and no partial file: the client's rows are computed again when it returns."""
    sub, plan, examples = _setup(False, tmp_path)
    (tmp_path / "afile").write_text("x")
    cache = EmulatorCache(True, tmp_path / "afile" / "cache", 10**9)
    _fill(cache, sub, plan, examples, 0)
    cache.keep(set())
    s = cache.stats()
    assert s["disk_errors"] == 1 and s["disk_writes"] == 0 and s["disk_files"] == 0 and s["disk_bytes"] == 0
    _fill(cache, sub, plan, examples, 0)
    assert cache.misses == 12 and cache.disk_hits == 0
    cache.close()
