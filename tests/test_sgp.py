"""Tests of similarity group pruning (Algorithm 1, eq. 5) and the uniform layer-drop baseline."""
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsoda_mpi.sgp import (angular_distance, auto_pairs, cap_groups, choose_auto, choose_groups, distance_profile,
                             kept_layers, layer_map, run_sgp, select_groups, uniform_drop)
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


# ---- sgp.auto and sgp.max_distance (pure functions on synthetic profiles) ------------------------------------------

def _profile(num_emulator_layers: int, value) -> np.ndarray:
    """A [L_E - 1, L_E] profile with distance[n-1, t] = value(n, t), NaN where t + n >= L_E (as distance_profile)."""
    d = np.full((num_emulator_layers - 1, num_emulator_layers), np.nan)
    for n in range(1, num_emulator_layers):
        for t in range(num_emulator_layers - n):
            d[n - 1, t] = value(n, t)
    return d


def _brute_auto(distance, k, n_max=0, max_distance=0.0):
    """argmin over (n, p), n * p = k, of the brute-force optimum cost / k (ties: smaller n), under the cap."""
    best = None
    for n, p in auto_pairs(k, distance.shape[1], n_max or distance.shape[0]):
        capped = distance.copy()
        if max_distance:
            capped[capped > max_distance] = 1e9
        groups = _brute_force(capped, n, p)
        cost = sum(float(capped[n - 1, t]) for t, _ in groups)
        if cost < 1e9 and (best is None or (cost / k, n) < best[0]):
            best = ((cost / k, n), n, p, groups)
    return best


def test_auto_pairs_are_the_divisor_pairs_that_fit():
    assert auto_pairs(12, 27) == [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]
    assert auto_pairs(12, 15) == [(4, 3), (6, 2), (12, 1)]  # p (n + 1) <= L_E
    assert auto_pairs(12, 27, n_max=4) == [(1, 12), (2, 6), (3, 4), (4, 3)]
    assert auto_pairs(16, 27) == [(2, 8), (4, 4), (8, 2), (16, 1)]  # (1, 16) needs 32 layers
    assert auto_pairs(27, 27) == [] and auto_pairs(7, 27, n_max=6) == [(1, 7)]


def test_choose_auto_is_the_argmin_of_distance_per_removed_layer():
    # long groups cost n^2 (super-additive), except four cheap n = 3 groups: (3, 4) beats (12, 1) and (1, 12)
    cheap = {0, 4, 8, 12}
    d = _profile(27, lambda n, t: 0.001 if n == 3 and t in cheap else 0.01 * n * n)
    chosen, tried = choose_auto(d, 12)
    assert (chosen.n, chosen.p, chosen.groups) == (3, 4, [(0, 3), (4, 7), (8, 11), (12, 15)])
    assert chosen.cost == pytest.approx(0.004) and chosen.per_layer == pytest.approx(0.004 / 12)
    assert [(c.n, c.p) for c in tried] == auto_pairs(12, 27)
    assert {(c.n, c.p): round(c.cost, 6) for c in tried}[(1, 12)] == 0.12
    # a metric-like profile (d grows sub-additively with n, as on real models): one long group wins
    chosen, _ = choose_auto(_profile(27, lambda n, t: 0.05 * math.sqrt(n) + 0.001 * t), 12)
    assert (chosen.n, chosen.p, chosen.groups) == (12, 1, [(0, 12)])
    # n_max caps the group length
    chosen, tried = choose_auto(_profile(27, lambda n, t: 0.05 * math.sqrt(n) + 0.001 * t), 12, n_max=4)
    assert (chosen.n, chosen.p) == (4, 3) and max(c.n for c in tried) == 4


def test_choose_auto_ties_go_to_the_smaller_n():
    chosen, tried = choose_auto(_profile(27, lambda n, t: 0.02 * n), 12)  # every (n, p) costs 0.02 K
    assert len({round(c.cost, 12) for c in tried}) == 1 and (chosen.n, chosen.p) == (1, 12)


def test_choose_auto_equals_brute_force_on_random_profiles():
    rng = np.random.default_rng(1)
    cases = 0
    for _ in range(150):
        num_emulator_layers = int(rng.integers(4, 13))
        k = int(rng.integers(1, num_emulator_layers))
        if not auto_pairs(k, num_emulator_layers):
            continue
        d = _profile(num_emulator_layers, lambda n, t: float(rng.random()))
        if rng.random() < 0.4:
            d = np.round(d * 3) / 3  # exact ties between candidates and between placements
        cap = float(rng.choice([0.0, 0.5, 0.8]))
        chosen, tried = choose_auto(d, k, max_distance=cap)
        want, kk = None, k
        while want is None and kk > 0:
            want, kk = _brute_auto(d, kk, max_distance=cap), kk - 1
        if want is None:
            assert (chosen.n, chosen.p, chosen.groups) == (0, 0, [])
        else:
            assert (chosen.n, chosen.p, chosen.groups) == want[1:], (k, cap)
            assert all(d[chosen.n - 1, t] <= cap for t, _ in chosen.groups) or cap == 0
        cases += 1
    assert cases > 80


def test_max_distance_filters_groups_and_shrinks_the_budget():
    cheap = {0, 4, 8, 12}
    d = _profile(27, lambda n, t: 0.001 if n == 3 and t in cheap else 0.01 * n * n)
    # cap 0.02: only n = 1 groups (0.01) and the four cheap n = 3 groups qualify; (3, 4) still wins
    chosen, tried = choose_auto(d, 12, max_distance=0.02)
    assert (chosen.n, chosen.p) == (3, 4)
    costs = {(c.n, c.p): c.cost for c in tried}
    assert math.isinf(costs[(12, 1)]) and math.isinf(costs[(2, 6)]) and costs[(1, 12)] == pytest.approx(0.12)
    # cap 0.005: only the four cheap groups: K = 12 impossible (and 11, 10, ..., 13 > 12): K' = 12 via (3, 4)
    chosen, _ = choose_auto(d, 12, max_distance=0.005)
    assert (chosen.n, chosen.p) == (3, 4)
    # K = 16 under cap 0.005: 16, 15, 14, 13 have no placement; 12 = (3, 4) is the largest K' that fits
    chosen, tried = choose_auto(d, 16, max_distance=0.005)
    assert (chosen.n, chosen.p) == (3, 4) and {c.n * c.p for c in tried} == {16, 15, 14, 13, 12}
    assert all(math.isinf(c.cost) for c in tried if c.n * c.p > 12)
    # nothing qualifies: no pruning
    chosen, tried = choose_auto(d, 12, max_distance=0.0005)
    assert (chosen.n, chosen.p, chosen.groups) == (0, 0, []) and len({c.n * c.p for c in tried}) == 12
    with pytest.raises(ValueError, match="no n \\* p = 27"):
        choose_auto(d, 27)


def test_max_distance_with_a_fixed_n_shrinks_p():
    d = _profile(20, lambda n, t: [0.3, 0.1, 0.4, 0.2, 0.05][t % 5] * n)
    assert cap_groups(d, 1, 4, 0.5) == choose_groups(d, 1, 4)  # the cap changes nothing
    groups = cap_groups(d, 2, 5, 0.25)  # n = 2: eligible starts t % 5 in {1, 4} (0.2, 0.1): at most 4 disjoint
    assert len(groups) == 4 and all(d[1, t] <= 0.25 for t, _ in groups)
    assert groups == _brute_force(np.where(d <= 0.25, d, 1e9), 2, 4)
    assert cap_groups(d, 3, 4, 0.16) == [(4, 7), (9, 12), (14, 17)]  # only t % 5 = 4 (0.15): p shrinks to 3
    assert cap_groups(d, 3, 4, 0.1) == []
    with pytest.raises(ValueError, match="no 4 disjoint groups of n=3"):
        choose_groups(d, 3, 4, max_distance=0.16)
    n, p, groups, rows = select_groups(d, 3, 4, max_distance=0.16)
    assert (n, p, groups) == (3, 3, [(4, 7), (9, 12), (14, 17)])
    assert [(c.n, c.p) for c in rows] == [(3, 3)] and rows[0].cost == pytest.approx(3 * 0.15)
    n, p, groups, rows = select_groups(d, 3, 4)
    assert (n, p, len(rows)) == (3, 4, 1) and groups == choose_groups(d, 3, 4)


def test_run_sgp_auto_on_tiny_model():
    model = tiny_causal_lm("llama", layers=10)
    batches = [_batch(_rows([16, 11, 16, 8], seed=5), 16)]
    res = run_sgp(model, batches, n=3, p=4, num_emulator_layers=8, remove_layers=4)
    assert res.distance.shape == (7, 8)
    chosen, tried = choose_auto(res.distance, 4)
    assert (res.n, res.p, res.groups) == (chosen.n, chosen.p, chosen.groups) and res.n * res.p == 4
    assert [(c.n, c.p) for c in res.candidates] == [(1, 4), (2, 2), (4, 1)]
    assert res.kept == kept_layers(10, res.groups) and len(res.kept) == 6


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
    return (list(range(first)) + [middle[round(i * stride)] for i in range(k)]
            + list(range(num_layers - last, num_layers)))


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
