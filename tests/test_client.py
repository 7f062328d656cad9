"""Client local training: the emulator activation cache gives the same losses and weights as no cache,
the proximal term's gradient is mu (w - w_global) (eq. 10), batch schedules, NF4 sub-LLM training."""
import numpy as np
import pytest
import torch

from fedsoda_mpi import models
from fedsoda_mpi.client import EmulatorCache, batch_schedule, local_train, proximal
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
        torch.testing.assert_close(w_cache[k], w_nocache[k], rtol=1e-3, atol=1e-4)  # float reordering of batched NF4 matmuls, amplified by Adam
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
    from fedsoda_mpi import client as client_mod

    monkeypatch.setattr(client_mod, "FILL_BATCH", 4)  # 6 examples: a batch of 4 (padded) and one of 2
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
        alone = client_mod._emulator(sub, plan, ids, torch.ones_like(ids))[0]
        torch.testing.assert_close(stores[0][(0, j)], alone, rtol=1e-4, atol=1e-5)
