"""fedsoda_mpi.stats against values computed by hand: mean and std, Student-t intervals, pairing by seed, the
binomial SE, the Wilson interval, the exact McNemar test, and the bit vectors of per-question answers."""
import math

import numpy as np
import pytest

from fedsoda_mpi import stats as S


def test_mean_std_ci_hand_computed():
    m, s, n = S.mean_std([80.0, 82.0, 84.0])
    assert (m, n) == (82.0, 3) and s == pytest.approx(2.0)
    lo, hi = S.t_ci([80.0, 82.0, 84.0])
    assert (hi - lo) / 2 == pytest.approx(4.303 * 2 / math.sqrt(3)) and (lo + hi) / 2 == pytest.approx(82.0)
    assert S.t_ci([80.0]) is None and math.isnan(S.mean_std([80.0])[1])
    assert S.mean_std([])[2] == 0
    assert S.t975(1) == 12.706 and S.t975(2) == 4.303 and S.t975(30) == 2.042
    assert S.t975(31) == 1.96
    assert S.binomial_se(0.5, 100) == pytest.approx(0.05)


def test_paired_uses_only_common_seeds():
    p = S.paired({0: 80.0, 1: 82.0, 2: 84.0}, {1: 80.0, 2: 81.0, 3: 99.0})
    assert p["seeds"] == [1, 2] and p["diffs"] == [2.0, 3.0] and p["mean"] == 2.5
    half = 12.706 * math.sqrt(0.5) / math.sqrt(2)
    assert p["ci"] == pytest.approx((2.5 - half, 2.5 + half)) and p["excludes_zero"] is False
    one = S.paired({0: 80.0}, {0: 70.0, 1: 60.0})
    assert one["n"] == 1 and one["ci"] is None and one["excludes_zero"] is None
    assert S.paired({0: 1.0}, {1: 1.0})["n"] == 0
    assert S.paired({0: 90.0, 1: 91.0, 2: 92.5}, {0: 80.0, 1: 80.0, 2: 80.0})["excludes_zero"] is True


def test_mcnemar_exact_p_and_paired_interval():
    a = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 83  # 10 only a, 2 only b, 5 both, 83 neither
    b = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 83
    t = S.mcnemar(a, b)
    assert (t["only_a"], t["only_b"], t["n"]) == (10, 2, 100) and t["diff"] == pytest.approx(8.0)
    assert t["p"] == pytest.approx(2 * (1 + 12 + 66) / 4096)  # 2 P(X <= 2), X ~ Bin(12, 1/2) = 0.0386
    half = 1.96 * math.sqrt(12 - 8 ** 2 / 100) / 100 * 100
    assert t["ci"] == pytest.approx((8.0 - half, 8.0 + half))
    assert S.mcnemar([True, False], [True, False])["p"] == 1.0  # no discordant question
    assert S.mcnemar([True] * 3, [False] * 3)["p"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="paired questions"):
        S.mcnemar([True], [True, False])


def test_wilson_interval_bounds_solve_the_score_test():
    for k, n in ((40, 1319), (0, 32), (1319, 1319), (5, 10)):
        p, bounds = k / n, [b / 100 for b in S.wilson(k / n, n)]
        # the Wilson bounds are the two p' with |p - p'| = 1.96 * sqrt(p' (1 - p') / n) (the score test's limits)
        assert all(abs((p - b) ** 2 - 1.96 ** 2 * b * (1 - b) / n) < 1e-12 for b in bounds), (k, n, bounds)
        assert 0 <= bounds[0] <= p <= bounds[1] <= 1
    assert S.wilson(0.0, 32)[0] == 0.0 and 10.0 < S.wilson(0.0, 32)[1] < 11.0  # 0 of 32: [0, 10.7]
    assert S.wilson(None, 10) is None and S.wilson(0.5, 0) is None


def test_bits_round_trip_and_layout():
    assert S.bits([1, 0, 0, 1, 1, 0, 0, 0, 1, 1]) == "98c0" and S.bits(np.zeros(10, np.int8)) == "0000"
    assert S.bits(None) is None and S.bits([]) == ""
    rng = np.random.default_rng(0)
    for n in (1, 8, 9, 1319):
        x = rng.random(n) < 0.3
        assert S.bits(x) == np.packbits(x).tobytes().hex() and S.unbits(S.bits(x), n) == x.tolist()


def test_missing_and_mean_of():
    assert S.missing(None) and S.missing(math.nan) and not S.missing(0.0) and not S.missing(0)
    assert S.mean_of([1.0, None, 3.0, math.nan]) == 2.0 and S.mean_of([None]) is None


def test_wilson_known_value():
    lo, hi = S.wilson(0.5, 10)  # 5 of 10: the textbook [0.2366, 0.7634]
    assert (round(lo, 2), round(hi, 2)) == (23.66, 76.34)


def test_best_lr_takes_the_highest_score_and_ties_to_the_smaller_lr():
    assert S.best_lr({1e-3: 0.6, 3e-3: 0.7, 1e-2: 0.65}) == 3e-3
    assert S.best_lr({3e-3: 0.7, 1e-3: 0.7}) == 1e-3  # a tie: the smaller lr, whatever the order
    assert S.best_lr({1e-3: -math.inf, 3e-3: 0.1}) == 3e-3  # a failed run scores -inf
