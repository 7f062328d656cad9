"""The report's cell texts: numbers, percentages, mean ± std, confidence intervals, MiB, counts, and the cells of
an accuracy over seeds or a paired difference (fedsoda_mpi.stats computes them). "—" marks a missing value."""
from __future__ import annotations

from fedsoda_mpi.stats import mean_std, missing, t_ci

DASH = "—"


def num(x, digits: int = 1, sign: bool = False) -> str:
    """`x` with `digits` decimals (no "-0.0"), "—" when missing."""
    if missing(x):
        return DASH
    x = 0.0 if round(float(x), digits) == 0 else float(x)
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def pct(frac) -> str:
    """A fraction as a percentage with one decimal."""
    return DASH if missing(frac) else num(100 * float(frac))


def mean_pm(m: float, s: float, n: int) -> str:
    """`mean ± std` (std left out for n = 1, "—" for n = 0)."""
    if n == 0:
        return DASH
    return num(m) if n == 1 else f"{num(m)} ± {num(s)}"


def ci_text(ci, sign: bool = False) -> str:
    """A confidence interval as `[lo, hi]`, "—" without one."""
    return DASH if ci is None else f"[{num(ci[0], sign=sign)}, {num(ci[1], sign=sign)}]"


def mib(nbytes, digits: int) -> str:
    """Bytes in MiB with `digits` decimals."""
    return DASH if missing(nbytes) else f"{float(nbytes) / 2 ** 20:.{digits}f}"


def count(x) -> str:
    """A count with thousands separators."""
    return DASH if missing(x) else f"{int(round(float(x))):,}"


def distinct(values) -> str:
    """The distinct values, with how many of each when there is more than one."""
    values = [v for v in values if v is not None]
    if not values:
        return DASH
    kinds = sorted(set(values), key=lambda v: (str(type(v)), v))
    if len(kinds) == 1:
        return str(kinds[0])
    return ", ".join(f"{v} ({values.count(v)} run{'s' if values.count(v) > 1 else ''})" for v in kinds)


def acc_cells(acc: dict[int, float]) -> list[str]:
    """Test accuracy by seed as [mean ± std, 95% CI, n]."""
    return [mean_pm(*mean_std(acc.values())), ci_text(t_ci(acc.values())), str(len(acc))]


def diff_parts(p: dict) -> list[str]:
    """A paired difference as [mean, 95% CI, per seed]."""
    return [num(p["mean"], sign=True), ci_text(p["ci"], sign=True), per_seed(p)]


def per_seed(p: dict) -> str:
    """A paired difference per seed: `s0 +1.0, s1 -2.0`."""
    return ", ".join(f"s{s} {num(d, sign=True)}" for s, d in zip(p["seeds"], p["diffs"])) or DASH


def delta_text(p: dict, n: bool = False) -> str:
    """A paired difference as `mean [95% CI]` (and `(n=...)`); — without pairs when `n`."""
    if n and not p["n"]:
        return DASH
    return f"{num(p['mean'], sign=True)} {ci_text(p['ci'], sign=True)}" + (f" (n={p['n']})" if n else "")


def lr_text(lr) -> str:
    """A selected lr, or "pending" before the selection."""
    return "pending" if lr is None else f"{float(lr):g}"
