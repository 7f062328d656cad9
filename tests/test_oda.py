"""Tests of orchestrated distillation alignment (eq. 6-8, Algorithm 2 pre-/re-alignment)."""
import math
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from fedsoda_mpi import oda
from fedsoda_mpi.oda import AlignPairs, align, aligned_drift, alignment_losses, kl_divergence
from fedsoda_mpi.drift import DriftProbes
from fedsoda_mpi.sgp import angular_distance, kept_layers, layer_map
from tests.conftest import tiny_causal_lm

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(count: int, seed: int, length: int = 24) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        mask = torch.ones(4, length, dtype=torch.long)
        mask[1, length // 2:] = 0  # one right-padded row per batch
        out.append({"input_ids": torch.randint(3, 128, (4, length), generator=g) * mask, "attention_mask": mask})
    return out


def _prune(model, kept: list[int]):
    """A copy of `model` with only the `kept` decoder layers (renumbered, see docs/design.md)."""
    sub = copy.deepcopy(model)
    sub.model.layers = torch.nn.ModuleList(sub.model.layers[i] for i in kept)
    for i, layer in enumerate(sub.model.layers):
        layer.self_attn.layer_idx = i
    sub.config.num_hidden_layers = len(kept)
    if getattr(sub.config, "layer_types", None):
        sub.config.layer_types = [sub.config.layer_types[i] for i in kept]
    return sub


def _sharp_tiny_llama():
    """A tiny random Llama whose layers matter (larger residual writes) and whose next-token
    distributions are peaked (larger final-norm gain), so pruning costs a visible KL."""
    model = tiny_causal_lm("llama", layers=8)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight.mul_(3.0)
        model.model.norm.weight.mul_(20.0)
    return model.requires_grad_(False)


def _pruned_with_lora(full, groups, num_emulator_layers, n):
    kept = kept_layers(full.config.num_hidden_layers, groups)
    mapping = layer_map(groups, kept)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        layers_to_transform=[s for _, s in mapping])
    torch.manual_seed(0)
    sub = get_peft_model(_prune(full, kept), config)
    pairs = AlignPairs(inter=[(t + n, s) for t, s in mapping], full_final=num_emulator_layers - 1,
                       sub_final=num_emulator_layers - 1 - n * len(groups))
    return sub, pairs


def test_losses_vanish_when_sub_model_is_full_model():
    model = tiny_causal_lm("qwen2", layers=6)
    batch = _batches(1, seed=0)[0]
    with torch.no_grad():
        out_a = model(**batch, output_hidden_states=True)
        out_b = model(**batch, output_hidden_states=True)
    pairs = AlignPairs(inter=[(1, 1), (3, 3)], full_final=4, sub_final=4)
    losses = alignment_losses(out_a, out_b, pairs, batch["attention_mask"], alpha=1.0, beta=1.0)
    assert set(losses) == {"loss", "loss_rep", "loss_inter", "loss_final", "loss_kl"}
    for value in losses.values():
        assert abs(value.item()) < 1e-6
    assert kl_divergence(model, model, _batches(2, seed=1)) == pytest.approx(0.0, abs=1e-6)


def test_loss_normalisation_and_padding():
    """||H - H*||^2 is divided by the teacher's ||H||^2 per token and averaged over non-pad tokens only."""
    hidden, vocab = 8, 5
    mask = torch.tensor([[1, 1, 1, 0]])
    full_h = tuple(torch.ones(1, 4, hidden) for _ in range(5))  # embeddings + 4 layers (last one normed)
    sub_h = [torch.ones(1, 4, hidden) for _ in range(5)]
    sub_h[2] = torch.full((1, 4, hidden), 3.0)  # layer 1: |H - H*|^2 = 4 |H|^2
    sub_h[3][0, :3] = 2.0                       # layer 2: |H - H*|^2 = |H|^2 on real tokens
    sub_h[3][0, 3] = 100.0                      # ... and garbage on the pad token
    logits_t, logits_s = torch.randn(1, 4, vocab), torch.randn(1, 4, vocab)
    full_out = SimpleNamespace(hidden_states=full_h, logits=logits_t)
    sub_out = SimpleNamespace(hidden_states=tuple(sub_h), logits=logits_s)
    pairs = AlignPairs(inter=[(0, 1)], full_final=2, sub_final=2)
    losses = alignment_losses(full_out, sub_out, pairs, mask, alpha=2.0, beta=3.0)
    assert losses["loss_inter"].item() == pytest.approx(4.0)
    assert losses["loss_final"].item() == pytest.approx(1.0)
    kl = F.kl_div(F.log_softmax(logits_s[0, :3], -1), F.log_softmax(logits_t[0, :3], -1), log_target=True,
                  reduction="batchmean")
    assert losses["loss_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(2.0 * 5.0 + 3.0 * kl.item(), rel=1e-5)
    with pytest.raises(ValueError, match="un-normed"):
        alignment_losses(full_out, sub_out, AlignPairs([(0, 1)], full_final=3, sub_final=2), mask, 1.0, 1.0)


def test_kl_divergence_matches_reference_on_padded_batches():
    """Token-weighted mean of KL(M || M*) over non-pad tokens (an integer mask must not index rows)."""
    full = _sharp_tiny_llama()
    sub = _prune(full, [0, 1, 4, 5, 6, 7])
    batches = _batches(2, seed=4)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            keep = batch["attention_mask"].bool()
            log_p = F.log_softmax(full(**batch).logits[keep], -1)
            log_q = F.log_softmax(sub(**batch).logits[keep], -1)
            total += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
            count += int(keep.sum())
    assert kl_divergence(full, sub, batches) == pytest.approx(total / count, rel=1e-5)


def test_pre_alignment_reduces_held_out_kl_and_touches_only_given_params():
    full = _sharp_tiny_llama()
    sub, pairs = _pruned_with_lora(full, groups=[(1, 3)], num_emulator_layers=6, n=2)
    params = [p for p in sub.parameters() if p.requires_grad]
    assert params and all("lora_" in name for name, p in sub.named_parameters() if p.requires_grad)
    assert all(".layers.1." in name for name, p in sub.named_parameters() if p.requires_grad)
    frozen_before = {k: v.clone() for k, v in sub.state_dict().items() if "lora_" not in k}
    full_before = {k: v.clone() for k, v in full.state_dict().items()}
    lora_before = [p.detach().clone() for p in params]
    train, held_out = _batches(8, seed=1), _batches(6, seed=2)

    sub.eval()
    kl_before = kl_divergence(full, sub, held_out)
    seen = []
    history = align(full, sub, train, pairs, params, epochs=3, lr=5e-3, log=seen.append)
    kl_after = kl_divergence(full, sub, held_out)
    print(f"held-out KL(M || M*): {kl_before:.4f} -> {kl_after:.4f} ({kl_after / kl_before:.1%})")

    assert len(history) == 3 * 8 and seen == history
    assert set(history[0]) == {"epoch", "step", "loss", "loss_rep", "loss_inter", "loss_final", "loss_kl"}
    assert kl_before > 0.5 and kl_after < 0.8 * kl_before
    assert all(not torch.equal(a, b) for a, b in zip(lora_before, params))
    for k, v in sub.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen_before[k]), k
    for k, v in full.state_dict().items():
        assert torch.equal(v, full_before[k]), k
    assert not sub.training


def test_align_is_deterministic_given_seed():
    full = _sharp_tiny_llama()
    runs = []
    for _ in range(2):
        sub, pairs = _pruned_with_lora(full, groups=[(0, 1), (3, 4)], num_emulator_layers=6, n=1)
        params = [p for p in sub.parameters() if p.requires_grad]
        torch.manual_seed(7)
        runs.append(align(full, sub, _batches(2, seed=3), pairs, params, epochs=1, lr=1e-3, alpha=0.5, beta=2.0))
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="requires_grad"):
        align(full, sub, _batches(1, seed=3), pairs, [], epochs=1, lr=1e-3)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_aligned_drift_equals_distance_of_hf_hidden_states(family):
    """Only the layers the pairs reach run, yet the distances are those of HF's own hidden_states (padded rows)."""
    full = tiny_causal_lm(family, layers=8)
    sub = _prune(full, [0, 1, 4, 5, 6, 7])
    with torch.no_grad():  # make the pruned model differ inside its emulator too
        sub.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    batch = _batches(1, seed=3)[0]
    pairs = [(3, 1), (4, 2), (5, 3)]
    with torch.no_grad():
        hf = full(**batch, output_hidden_states=True).hidden_states
        hs = sub(**batch, output_hidden_states=True).hidden_states
    last = batch["attention_mask"].sum(1) - 1
    rows = torch.arange(4)
    want = torch.stack([angular_distance(hf[f + 1][rows, last], hs[s + 1][rows, last]).mean() for f, s in pairs])
    got = aligned_drift(full, sub, batch, pairs)
    assert got.shape == (3,) and (got > 0.01).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_inter_probe_recomputes_only_when_lora_below_the_probe_changes(monkeypatch):
    """The per-round L_inter drift probe reruns only when a LoRA tensor that feeds a probed layer changed."""
    full = tiny_causal_lm("llama", layers=8).requires_grad_(False)
    sub, _ = _pruned_with_lora(full, groups=[(1, 3)], num_emulator_layers=6, n=2)  # LoRA on sub layer 1
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, layers_to_transform=[7])
    full = get_peft_model(full, config)  # the plugged adapter: the last layer, above every probed layer
    calls = []
    monkeypatch.setattr(oda, "aligned_drift", lambda *a: calls.append(1) or aligned_drift(*a))
    batch = _batches(1, seed=5)[0]
    probes = DriftProbes(full, sub, SimpleNamespace(align_pairs=[(3, 1)]), batch, emulator_lora=dict, sub_is_full=False)
    first = probes.inter()
    with torch.no_grad():  # a new global adapter (layer 7) does not feed layer 3: the probe is not rerun
        next(p for n, p in full.named_parameters() if "layers.7." in n and "lora_B" in n).add_(1.0)
    assert np.array_equal(probes.inter(), first) and len(calls) == 1
    with torch.no_grad():  # re-alignment changes the emulator LoRA (sub layer 1): rerun, new value
        next(p for n, p in sub.named_parameters() if "layers.1." in n and "lora_B" in n).add_(0.1)
    again = probes.inter()
    assert len(calls) == 2 and not np.array_equal(again, first)
    torch.testing.assert_close(torch.from_numpy(again), aligned_drift(full, sub, batch, [(3, 1)]))


def test_realign_due_fires_on_the_ratio_or_the_interval_and_never_on_nan():
    """Algorithm 2 line 9 with oda.trigger=drift, as a pure function of the probe, its reference, tau, max_interval."""
    due = oda.realign_due
    assert due(4, 2, probe=2.01, ref=1.0, tau=2.0, max_interval=0)
    assert not due(4, 2, probe=2.0, ref=1.0, tau=2.0, max_interval=0)  # strictly above tau x ref
    assert not due(4, 0, probe=float("nan"), ref=1.0, tau=2.0, max_interval=0)  # not measured: no trigger
    assert due(5, 0, probe=float("nan"), ref=1.0, tau=2.0, max_interval=5)  # ... but the interval still fires
    assert not due(4, 0, probe=1.0, ref=1.0, tau=2.0, max_interval=5)
    assert not due(100, 0, probe=0.0, ref=0.0, tau=1.5, max_interval=0)  # 0 > 1.5 x 0 is false


def test_drift_schedule_rounds_from_probe_values():
    """Which rounds re-align, given the probe after each round and just after each alignment: the reference resets
    at every re-alignment, max_interval counts from the last one, and 'every r' is trigger=drift with max_interval r
    and a probe that never crosses."""
    after_round = [1.1, 1.3, 1.9, 2.4, 1.2, 1.5, 2.2, 2.3]  # after rounds 1..8
    after_align = [1.0, 9, 9, 9, 1.0, 9, 9, 9, 1.0]  # after an alignment at round 0..8 (9: never read)
    assert oda.drift_schedule(after_round, after_align, tau=2.0, max_interval=0) == [5]  # 2.4 > 2 x 1.0 after round 4
    assert oda.drift_schedule(after_round, after_align, tau=1.2, max_interval=0) == [3]  # 1.3 > 1.2 after round 2
    # tau = 1.2 from round 3's reference (9): never again; max_interval = 3 adds rounds 6 (3 + 3) and 9 (> T)
    assert oda.drift_schedule(after_round, after_align, tau=1.2, max_interval=3) == [3, 6]
    flat = [1.0] * 10
    assert oda.drift_schedule(flat, [1.0] * 11, tau=1.5, max_interval=5) == [5, 10]  # = oda.every=5
    assert oda.drift_schedule(flat, [1.0] * 11, tau=1.5, max_interval=0) == []  # = oda.re_align=false
    assert oda.drift_schedule([5.0] * 4, [1.0] * 5, tau=1.5, max_interval=0) == [2, 3, 4]  # round 1 never by drift


def _adapter_pair():
    """A sharp tiny M with the adapter LoRA on its last layer (7) and M* = M without layers 2-3, LoRA on its aligned
    layer 1 (emulator) and on its last layer 5 (the adapter); `plug(scale)` puts one global adapter into both."""
    full = _sharp_tiny_llama()
    groups = [(1, 3)]
    kept = kept_layers(8, groups)  # [0, 1, 4, 5, 6, 7]: sub layer 5 = full layer 7 (the adapter)
    torch.manual_seed(0)
    sub = get_peft_model(_prune(full, kept), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                        target_modules=LORA_TARGETS, layers_to_transform=[1, 5]))
    full = get_peft_model(full, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                           layers_to_transform=[7]))

    def plug(scale: float) -> None:
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for name, p in sorted(full.named_parameters()):
                if "layers.7." in name and "lora_" in name:
                    value = scale * torch.randn(p.shape, generator=g)
                    p.copy_(value)
                    dict(sub.named_parameters())[name.replace("layers.7.", "layers.5.")].copy_(value)

    return full, sub, [(t + 2, s) for t, s in layer_map(groups, kept)], plug


def test_output_probe_moves_with_the_adapter_while_the_l_inter_probe_cannot():
    """Why /rounds/drift_probe is KL(M || M*) and not /drift: with the adapter LoRA above every aligned layer and the
    emulator LoRA frozen, a new global adapter (the same tensors plugged into M and M*) leaves the L_inter angular
    distances bit for bit unchanged, while the output KL on the same probe batch moves. The cached form
    (`adapter_inputs` once, `adapter_kl` per round) gives the KL of the whole forward."""
    full, sub, pairs, plug = _adapter_pair()
    batch = _batches(1, seed=5)
    starts = (7, 5)  # the adapter's first layer in M and in M*
    plug(0.0)
    hidden = oda.adapter_inputs(full, sub, batch[0], starts)  # computed once: nothing below the adapters changes
    inter0, kl0 = aligned_drift(full, sub, batch[0], pairs), kl_divergence(full, sub, batch)
    assert oda.adapter_kl(full, sub, batch[0], hidden, starts) == pytest.approx(kl0, rel=1e-5)
    plug(0.5)
    inter1, kl1 = aligned_drift(full, sub, batch[0], pairs), kl_divergence(full, sub, batch)
    assert torch.equal(inter0, inter1)
    assert kl0 > 0 and abs(kl1 - kl0) > 0.01 * kl0, (kl0, kl1)  # measured: 5.50 -> 5.66
    assert oda.adapter_kl(full, sub, batch[0], hidden, starts) == pytest.approx(kl1, rel=1e-5)  # the cached probe


def test_output_probe_recomputes_the_adapter_inputs_only_after_the_emulator_changed(monkeypatch):
    """DriftProbes.output: a new global adapter reuses the cached adapter inputs; a new emulator LoRA (an
    alignment) recomputes them; either way the value is the whole forward's KL, as float32."""
    from fedsoda_mpi import models

    full, sub, _, plug = _adapter_pair()
    calls, original = [], oda.adapter_inputs
    monkeypatch.setattr(oda, "adapter_inputs", lambda *a: calls.append(1) or original(*a))
    plan = SimpleNamespace(adapter_first=0, num_layers=8, adapter_size=1, train_start=5)
    batches = _batches(1, seed=5)
    probes = DriftProbes(full, sub, plan, batches[0], lambda: models.lora_state(sub, [1]), sub_is_full=False)
    plug(0.3)
    first = probes.output()
    assert first == pytest.approx(kl_divergence(full, sub, batches), rel=1e-5)
    plug(0.6)
    second = probes.output()
    assert len(calls) == 1 and second != first
    assert second == pytest.approx(kl_divergence(full, sub, batches), rel=1e-5)
    with torch.no_grad():  # a re-alignment changes the emulator LoRA (sub layer 1)
        next(p for n, p in sub.named_parameters() if "layers.1." in n and "lora_B" in n).add_(0.05)
    third = probes.output()
    assert len(calls) == 2 and third == pytest.approx(kl_divergence(full, sub, batches), rel=1e-5)
    assert third == float(np.float32(third))


def test_an_infinite_drift_probe_triggers_a_realignment():
    """A diverged sub-LLM (KL = inf) re-aligns at once, whatever tau; NaN (not measured) still never does."""
    from fedsoda_mpi.oda import realign_due

    assert realign_due(3, 1, math.inf, 2.0, 100.0, 0)
    assert not realign_due(3, 1, math.nan, 2.0, 1.1, 0)
