"""The two significance tests drift detection runs, in numpy and the standard library alone.

scipy would add 116 MB to the serving image for two functions (see docs/delivery.md), so they are computed here:
the two-sample Kolmogorov-Smirnov test with its asymptotic p-value, and Pearson's chi-squared test of independence
on a contingency table. tests/contract/test_significance.py holds them to scipy's `ks_2samp(method="asymp")` and
`chi2_contingency(correction=False)`.
"""

from __future__ import annotations

import math

import numpy as np

# The Kolmogorov distribution's two series: the first converges fast for large arguments, the second for small
# ones; each is summed where it needs only a few terms to reach double precision.
_SERIES_SWITCH = 1.0
_TERMS = np.arange(1, 21, dtype=np.float64)


def kolmogorov_sf(x: np.ndarray) -> np.ndarray:
    """P(K > x) for the Kolmogorov distribution, the limit of sqrt(n) times the KS distance."""
    x = np.asarray(x, dtype=np.float64)
    large = np.maximum(x, _SERIES_SWITCH)[..., None]
    signs = np.where(_TERMS % 2 == 1, 1.0, -1.0)
    upper = 2.0 * (signs * np.exp(-2.0 * _TERMS**2 * large**2)).sum(axis=-1)
    small = np.clip(x, 1e-3, _SERIES_SWITCH)[..., None]
    odd = 2.0 * _TERMS - 1.0
    cdf = math.sqrt(2.0 * math.pi) / small[..., 0] * np.exp(-(odd**2) * math.pi**2 / (8.0 * small**2)).sum(axis=-1)
    return np.asarray(np.clip(np.where(x >= _SERIES_SWITCH, upper, 1.0 - cdf), 0.0, 1.0))


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two-sided two-sample KS test of each column of `a` [n, k] against the same column of `b` [m, k].

    Returns the distances and the asymptotic p-values, [k] each. The p-value is the Kolmogorov limit with
    Stephens' small-sample correction of its argument: against a reference of 2000, it is at most 0.025 from the
    exact distribution scipy evaluates at a window of 20, 0.009 at the default 200, and within 5% of it where
    the alarm is decided (p below 0.05).
    """
    n, m = len(a), len(b)
    pooled = np.concatenate([a, b]).astype(np.float64)
    order = np.argsort(pooled, axis=0, kind="stable")
    ordered = np.take_along_axis(pooled, order, axis=0)
    from_a = order < n
    gap = np.abs(np.cumsum(from_a, axis=0) / n - np.cumsum(~from_a, axis=0) / m)
    # Both empirical CDFs are compared only after the last of a run of equal values has been counted.
    run_ends = np.ones_like(from_a)
    run_ends[:-1] = ordered[1:] != ordered[:-1]
    distance = np.where(run_ends, gap, 0.0).max(axis=0)
    effective = math.sqrt(n * m / (n + m))
    p_value = kolmogorov_sf((effective + 0.12 + 0.11 / effective) * distance)
    return distance, p_value


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X > statistic) for a chi-squared variable of `dof` (a positive integer) degrees of freedom."""
    half = statistic / 2.0
    if half <= 0.0:
        return 1.0
    if dof % 2 == 0:
        exponents = (-half + i * math.log(half) - math.lgamma(i + 1) for i in range(dof // 2))
        return min(1.0, sum(math.exp(exponent) for exponent in exponents))
    tail = math.erfc(math.sqrt(half))
    exponents = (-half + (i - 0.5) * math.log(half) - math.lgamma(i + 0.5) for i in range(1, (dof + 1) // 2))
    return min(1.0, tail + sum(math.exp(exponent) for exponent in exponents))


def chi2_independence(table: np.ndarray) -> tuple[float, float]:
    """Pearson's chi-squared test of independence of a table's rows and columns (no continuity correction).

    Every row and column must have a positive total. Returns the statistic and its p-value.
    """
    table = np.asarray(table, dtype=np.float64)
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    dof = (table.shape[0] - 1) * (table.shape[1] - 1)
    return statistic, chi2_sf(statistic, dof)
