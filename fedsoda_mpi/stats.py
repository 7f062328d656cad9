"""The statistics of the study report, as pure functions: mean and sample std, Student-t intervals, differences
paired by seed, the lr selection rule (best score, ties to the smaller lr), the binomial standard error, the Wilson
interval of one accuracy, the exact McNemar test of two models on the same questions, and the hex bit vectors in
which run summaries store per-question answers.

No dependency beyond the standard library (scipy is not one): Student's t quantiles are tabulated for df <= 30.
"""
from __future__ import annotations

import math

# t_{0.975, df} for df = 1..30; 1.96 beyond
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def missing(x) -> bool:
    """None or nan: a value a summary does not record."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (1.96 beyond df = 30)."""
    return T975[df - 1] if df <= len(T975) else 1.96


def mean_std(xs) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof = 1) and n of `xs`; std is nan for n < 2, both nan for n = 0."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = math.fsum(xs) / n
    s = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return m, s, n


def mean_of(values) -> float | None:
    """The mean of the values that are not missing (None when none is)."""
    vals = [float(v) for v in values if not missing(v)]
    return math.fsum(vals) / len(vals) if vals else None


def t_ci(xs) -> tuple[float, float] | None:
    """The 95% confidence interval of the mean of `xs` (Student t, df = n - 1); None for n < 2."""
    m, s, n = mean_std(xs)
    if n < 2:
        return None
    half = t975(n - 1) * s / math.sqrt(n)
    return m - half, m + half


def paired(a: dict, b: dict) -> dict:
    """a - b paired by seed (only the seeds both have): seeds, per-seed diffs, their mean, 95% CI (None for
    n < 2) and whether the CI excludes 0 (None without a CI)."""
    seeds = sorted(set(a) & set(b))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    ci = t_ci(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean_std(diffs)[0], "n": len(seeds), "ci": ci,
            "excludes_zero": None if ci is None else (ci[0] > 0 or ci[1] < 0)}


def best_lr(scores: dict) -> float:
    """The lr (a key of {lr: score}) with the highest score, ties to the smaller lr: the rule of every lr selection."""
    return min(scores, key=lambda lr: (-float(scores[lr]), lr))


def binomial_se(p: float, n: int) -> float:
    """The standard error sqrt(p (1 - p) / n) of one accuracy measured on n test examples."""
    return math.sqrt(p * (1 - p) / n) if n > 0 and 0 <= p <= 1 else math.nan


def wilson(p, n, z: float = 1.96) -> tuple[float, float] | None:
    """95% Wilson score interval (in %) of an accuracy `p` measured on `n` test questions; None without both."""
    if missing(p) or missing(n) or int(n) < 1:
        return None
    p, n = float(p), int(n)
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half) / (1 + z * z / n), 100 * (centre + half) / (1 + z * z / n)


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Two models on the same test questions (a, b: answered correctly): a − b in points with a 95% Wald interval of
    the paired difference, the discordant counts (only a right; only b right) and the exact two-sided McNemar p
    (the binomial test of the discordant questions against 1/2)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired questions: {len(a)} against {len(b)}")
    n, only_a, only_b = len(a), sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    d, m = (only_a - only_b) / n, only_a + only_b
    half = 1.96 * math.sqrt(max(m - (only_a - only_b) ** 2 / n, 0.0)) / n
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2 ** m)
    return {"diff": 100 * d, "ci": (100 * (d - half), 100 * (d + half)), "only_a": only_a, "only_b": only_b,
            "p": p, "n": n}


def bits(x) -> str | None:
    """A per-question 0/1 vector (GSM8K: answered correctly) as hex of its bits, 8 questions per byte in order, the
    first in the high bit of the first byte, the last byte padded with zeros (`unbits` reverses it); None for None."""
    if x is None:
        return None
    flags = [bool(v) for v in (x.reshape(-1).tolist() if hasattr(x, "reshape") else x)]
    return bytes(sum(f << (7 - j) for j, f in enumerate(flags[i:i + 8])) for i in range(0, len(flags), 8)).hex()


def unbits(text: str, n: int) -> list[bool]:
    """The first `n` flags of the vector `bits` wrote."""
    return [bool(byte >> (7 - j) & 1) for byte in bytes.fromhex(text) for j in range(8)][:n]
