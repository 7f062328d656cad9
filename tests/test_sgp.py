"""Tests of similarity group pruning (Algorithm 1, eq. 5) and the uniform layer-drop baseline."""
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsoda_mpi.sgp import (angular_distance, choose_groups, distance_profile, kept_layers, layer_map, run_sgp,
                             uniform_drop)
from tests.conftest import tiny_causal_lm


def _paper_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Eq. 5 literally: arccos of the cosine, over pi."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1, 1)
    return float(torch.arccos(cos) / math.pi)


def _batch(rows: list[torch.Tensor], length: int, side: str = "right") -> dict:
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
        ids[i, sl], mask[i, sl] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


def _rows(lengths: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def test_angular_distance_reference_points():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert angular_distance(a, a).item() == 0.0
    assert angular_distance(a, 7 * a).item() == pytest.approx(0.0, abs=1e-7)
    assert angular_distance(a, -a).item() == pytest.approx(1.0, abs=1e-7)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])
    assert angular_distance(e1, e2).item() == pytest.approx(0.5, abs=1e-7)
    out = angular_distance(a.bfloat16(), a.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (1,)


def test_angular_distance_equals_arccos_form():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 64, generator=g), torch.randn(50, 64, generator=g)
    b[:10] = a[:10] + 0.3 * b[:10]  # some small angles too
    ours = angular_distance(a, b)
    ref = torch.tensor([_paper_distance(x, y) for x, y in zip(a, b)])
    torch.testing.assert_close(ours, ref.float(), atol=1e-6, rtol=0)


def _naive_profile(model, batches, n_max, num_emulator_layers, token):
    """Per-(sample, token, l, n) loop with eq. 5 in float64."""
    sums, count = np.zeros((n_max, num_emulator_layers)), 0
    with torch.no_grad():
        for batch in batches:
            hs = model(**batch, output_hidden_states=True).hidden_states
            for row, mask in enumerate(batch["attention_mask"]):
                positions = mask.nonzero().flatten().tolist()
                for pos in positions if token == "all" else positions[-1:]:
                    count += 1
                    for n in range(1, n_max + 1):
                        for layer in range(num_emulator_layers - n):
                            sums[n - 1, layer] += _paper_distance(hs[layer + 1][row, pos], hs[layer + n + 1][row, pos])
    out = sums / count
    for n in range(1, n_max + 1):
        out[n - 1, num_emulator_layers - n:] = np.nan
    return out


@pytest.mark.parametrize("token", ["last", "all"])
def test_distance_profile_matches_naive_loop(token):
    model = tiny_causal_lm("llama", layers=8)
    batches = [_batch(_rows([12, 7, 9], seed=1), 12), _batch(_rows([5, 12], seed=2), 12)]
    got = distance_profile(model, batches, n_max=4, num_emulator_layers=6, token=token)
    ref = _naive_profile(model, batches, 4, 6, token)
    assert got.dtype == np.float32 and got.shape == (4, 6)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, atol=2e-6, equal_nan=True)
    expected_nan = np.add.outer(np.arange(1, 5), np.arange(6)) >= 6
    np.testing.assert_array_equal(np.isnan(got), expected_nan)
    assert np.all(got[~expected_nan] > 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_distance_profile_padding_does_not_change_a_row(side):
    model = tiny_causal_lm("qwen2", layers=6)
    short, long = _rows([9, 16], seed=3)
    alone = {tok: [distance_profile(model, [_batch([r], len(r))], 3, 5, tok) for r in (short, long)]
             for tok in ("last", "all")}
    batch = _batch([short, long], 16, side)
    last = distance_profile(model, [batch], 3, 5, "last")
    np.testing.assert_allclose(last, (alone["last"][0] + alone["last"][1]) / 2, atol=1e-6)
    every = distance_profile(model, [batch], 3, 5, "all")
    np.testing.assert_allclose(every, (9 * alone["all"][0] + 16 * alone["all"][1]) / 25, atol=1e-6)


def test_distance_profile_rejects_bad_arguments():
    model = tiny_causal_lm("llama", layers=6)
    batch = [_batch(_rows([8], seed=0), 8)]
    with pytest.raises(ValueError, match="no adapter layer"):
        distance_profile(model, batch, 2, 6)
    with pytest.raises(ValueError, match="token"):
        distance_profile(model, batch, 2, 5, token="first")
    with pytest.raises(ValueError, match="n_max"):
        distance_profile(model, batch, 5, 5)


def _brute_force(distance, n, p):
    num_emulator_layers = distance.shape[1]
    best = None
    for starts in itertools.combinations(range(num_emulator_layers - n), p):
        if all(b - a >= n + 1 for a, b in zip(starts, starts[1:])):
            key = (sum(float(distance[n - 1, t]) for t in starts), starts)
            best = key if best is None or key < best else best
    return [(t, t + n) for t in best[1]]


def test_choose_groups_equals_brute_force():
    rng = np.random.default_rng(0)
    cases = 0
    for _ in range(300):
        num_emulator_layers = int(rng.integers(3, 15))
        n = int(rng.integers(1, 5))
        p = int(rng.integers(1, 5))
        if p * (n + 1) > num_emulator_layers or n > num_emulator_layers - 1:
            continue
        distance = rng.random((num_emulator_layers - 1, num_emulator_layers))
        if rng.random() < 0.5:  # small integers: many exact ties, tests the lowest-t rule
            distance = rng.integers(0, 3, distance.shape).astype(float)
        assert choose_groups(distance, n, p) == _brute_force(distance, n, p)
        cases += 1
    assert cases > 100


def test_choose_groups_ties_take_lowest_start_and_respect_closed_intervals():
    distance = np.zeros((2, 9))
    assert choose_groups(distance, 2, 3) == [(0, 2), (3, 5), (6, 8)]
    distance[1] = [5, 5, 0, 5, 0, 5, 5, 9, 9]  # (2,4) and (4,6) would share layer 4
    assert choose_groups(distance, 2, 2) == [(0, 2), (4, 6)]


def test_choose_groups_infeasible_and_bad_profiles():
    distance = np.zeros((3, 10))
    with pytest.raises(ValueError, match=r"p=3 .*n=3.*L_E=10"):
        choose_groups(distance, 3, 3)
    with pytest.raises(ValueError, match="n_max"):
        choose_groups(distance, 4, 1)
    distance[0, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        choose_groups(distance, 1, 2)


def test_kept_layers_and_layer_map_hand_example():
    groups = [(3, 6), (10, 13)]
    kept = kept_layers(30, groups)
    assert kept == [0, 1, 2, 3, 7, 8, 9, 10] + list(range(14, 30))
    assert len(kept) == 30 - 3 * 2
    assert layer_map(groups, kept) == [(3, 3), (10, 7)]
    with pytest.raises(ValueError, match="overlaps"):
        kept_layers(30, [(3, 6), (6, 9)])
    with pytest.raises(ValueError, match="inside"):
        kept_layers(30, [(28, 31)])
    with pytest.raises(ValueError, match="not a kept layer"):
        layer_map([(4, 6)], kept)


def _offsite_tuning(num_layers, first, last, n_drop):
    """mit-han-lab/offsite-tuning uniform_choose_layers on layers[first:L-last]."""
    middle = list(range(first, num_layers - last))
    k = len(middle) - n_drop
    stride = (len(middle) - 1) / (k - 1)
    return list(range(first)) + [middle[round(i * stride)] for i in range(k)] + list(range(num_layers - last, num_layers))


def _federatedscope(num_layers, first, last, n_drop):
    """alibaba/FederatedScope model_drop_layer on layers[first:L-last] (int instead of round)."""
    middle = list(range(first, num_layers - last))
    k = len(middle) - n_drop
    stride = (len(middle) - 1) / (k - 1)
    return list(range(first)) + [middle[int(i * stride)] for i in range(k)] + list(range(num_layers - last, num_layers))


@pytest.mark.parametrize("num_layers", [32, 30])
def test_uniform_drop_matches_peers(num_layers):
    # paper Sec. 6.1: FedOT keeps the first and the last two layers as adapter and drops 12 layers
    got_round = uniform_drop(num_layers, 1, 2, 12, "round")
    got_int = uniform_drop(num_layers, 1, 2, 12, "int")
    assert got_round == _offsite_tuning(num_layers, 1, 2, 12)
    assert got_int == _federatedscope(num_layers, 1, 2, 12)
    for kept in (got_round, got_int):
        assert len(kept) == num_layers - 12 and kept == sorted(set(kept))
        assert kept[:2] == [0, 1] and kept[-3:] == list(range(num_layers - 3, num_layers))
    if num_layers == 32:  # literal values, stride 28/16 = 1.75 (round half to even at 3.5, 10.5, ...)
        assert got_round == [0, 1, 3, 5, 6, 8, 10, 11, 13, 15, 17, 19, 20, 22, 24, 25, 27, 29, 30, 31]
        assert got_int == [0, 1, 2, 4, 6, 8, 9, 11, 13, 15, 16, 18, 20, 22, 23, 25, 27, 29, 30, 31]
    assert uniform_drop(num_layers, 0, 3, 0) == list(range(num_layers))
    with pytest.raises(ValueError, match="n_drop"):
        uniform_drop(num_layers, 1, 2, num_layers - 3)
    with pytest.raises(ValueError, match="spacing"):
        uniform_drop(num_layers, 1, 2, 3, "floor")


def test_run_sgp_on_tiny_model():
    model = tiny_causal_lm("mistral", layers=10)
    batches = [_batch(_rows([16, 11, 16, 8], seed=5), 16)]
    result = run_sgp(model, batches, n=2, p=2, num_emulator_layers=8)
    assert result.distance.shape == (7, 8)
    assert result.groups == choose_groups(result.distance, 2, 2)
    assert result.kept == kept_layers(10, result.groups) and len(result.kept) == 10 - 4
    assert result.layer_map == layer_map(result.groups, result.kept)
    assert all(end <= 7 for _, end in result.groups)


def _wikitext_batches(tokenizer, count: int, batch_size: int, max_length: int) -> list[dict]:
    text = Path("/work/shared/data/wikitext2/test.txt").read_text().splitlines()
    paragraphs = [line.strip() for line in text if len(line.split()) > 40 and not line.strip().startswith("=")]
    batches = []
    for i in range(0, count, batch_size):
        enc = tokenizer(paragraphs[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


@pytest.mark.real
def test_sgp_on_real_smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    batches = _wikitext_batches(tokenizer, 16, 4, 128)
    result = run_sgp(model, batches, n=3, p=4, num_emulator_layers=27)
    print("SmolLM2 SGP groups:", result.groups, "profile shape:", result.distance.shape)
    print("n=3 row:", json.dumps([round(float(x), 4) for x in result.distance[2]]))
    assert result.distance.shape == (26, 27)
    assert len(result.groups) == 4 and all(end - t == 3 and end <= 26 for t, end in result.groups)
    assert len(result.kept) == 30 - 12
    assert result.groups == _brute_force(result.distance, 3, 4)
    assert np.all((result.distance[~np.isnan(result.distance)] > 0) & (result.distance[~np.isnan(result.distance)] < 1))
