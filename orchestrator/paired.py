"""Confidence intervals for comparisons paired by seed: a mean difference, and a ratio of two mean differences.

Paired t, not a bootstrap: sweeps run 2 to 5 seeds. With n = 3 a resampled mean takes 10 distinct values
and each extreme one has probability 1/27 > 2.5 %, so the percentile bootstrap interval is [min, max] of the
three differences, which covers the mean of a symmetric distribution only 1 - 2·(1/2)³ = 75 % of the time.
The t interval is exact when the paired differences are normal and is the standard choice at this n.

The ratio (the recovered fraction) gets Fieller's interval, the exact counterpart of the paired t for a ratio
of means (Fieller 1954): it is bounded only when the denominator (the 4-to-8-bit gap) differs from 0 at the
same level, and is reported unbounded otherwise, where a delta-method interval would look finite.

Over several models and ranks, the mean of the per-cell mean differences gets a stratified t interval
(stratified_mean_ci): with 3 seeds a cell's own interval has 2 degrees of freedom (t = 4.30); the average over
4 cells has at most 8 (Welch-Satterthwaite: 8 only when the 4 cells' variances are equal, fewer the more they
differ; the fair comparison's tables report 3.0-6.2) and half the standard error when they are equal.

Each mean difference also carries the two-sided p-value of its t test (Interval.p), so that arms sharing one
baseline can be adjusted together (holm): several arms against the same QLoRA runs are several tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95


def t_quantile(n: int, level: float = LEVEL) -> float:
    """The two-sided Student t quantile for n paired observations (n - 1 degrees of freedom)."""
    return _t(n - 1, level)


def _t(dof: float, level: float) -> float:
    return float(stats.t.ppf(0.5 + level / 2, dof))


@dataclass(frozen=True)
class Interval:
    """An estimate with its confidence interval; lo/hi are NaN with fewer than two pairs, ±inf when unbounded."""

    estimate: float
    lo: float
    hi: float
    n: int
    p: float = math.nan  # two-sided p-value of the t test of estimate = 0; NaN where there is none

    @property
    def straddles_zero(self) -> bool:
        """The interval contains 0 (an unbounded one does too); False when there is no interval."""
        return self.lo <= 0 <= self.hi

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)


def stratified_mean_ci(strata: Sequence[Sequence[float]], level: float = LEVEL) -> Interval:
    """The mean over strata (a sweep's models and ranks) of each stratum's mean paired difference, every
    stratum weighted equally, with a t interval from the within-stratum variances alone:
    SE² = Σ (s_i² / n_i) / k², Welch-Satterthwaite degrees of freedom (Σ v_i)² / Σ v_i² / (n_i - 1).
    It is the average effect over exactly these strata, so it assumes nothing about models not run, and a
    stratum's own effect (however far from the others) adds no noise to it. n counts the pairs; the interval
    needs two pairs in every stratum. One stratum: the paired t interval, mean ± t(n - 1)·s/√n."""
    groups = [np.asarray(s, dtype=float) for s in strata if len(s)]
    n = sum(len(g) for g in groups)
    if not groups:
        return Interval(math.nan, math.nan, math.nan, 0)
    estimate = float(np.mean([g.mean() for g in groups]))
    if any(len(g) < 2 for g in groups):
        return Interval(estimate, math.nan, math.nan, n)
    var = np.array([g.var(ddof=1) / len(g) for g in groups])
    if var.sum() == 0:  # the same difference in every seed (a deterministic init): no spread to widen by
        return Interval(estimate, estimate, estimate, n, 1.0 if estimate == 0 else 0.0)
    dof = var.sum() ** 2 / sum(v**2 / (len(g) - 1) for v, g in zip(var, groups, strict=True))
    se = math.sqrt(var.sum()) / len(groups)
    half = _t(dof, level) * se
    p = float(2 * stats.t.sf(abs(estimate) / se, dof))
    return Interval(estimate, estimate - half, estimate + half, n, p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN entries kept out of the family, and NaN).
    Written here: scipy has only false_discovery_control (Benjamini-Hochberg), and Holm's familywise bound is
    the one that fits a few arms against one shared baseline."""
    values = np.asarray(pvalues, dtype=float)
    valid = np.flatnonzero(~np.isnan(values))
    adjusted = np.full(len(values), math.nan)
    order = valid[np.argsort(values[valid], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * values[index]))
        adjusted[index] = running
    return adjusted.tolist()


# A mean denominator this close to 0 is rounding of equal values (8-bit and 4-bit QLoRA with the same
# accuracy: 0.685 - 0.685 computed through means comes out as ~1e-17), not a gap to divide by.
NO_GAP = 1e-9


def ratio_ci(numerators: Sequence[float], denominators: Sequence[float], level: float = LEVEL) -> Interval:
    """mean(a) / mean(b) for paired (a, b) with Fieller's interval: the θ for which the paired t test of
    a - θ·b = 0 does not reject, {θ : (ā - θ b̄)² ≤ t² (s_aa - 2θ s_ab + θ² s_bb) / n}. When b̄ itself is not
    distinguishable from 0 that set is unbounded, returned as (-inf, inf). No ratio (NaN) when b̄ is 0 (NO_GAP)."""
    a, b = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    n = len(a)
    if n == 0 or abs(b.mean()) < NO_GAP:
        return Interval(math.nan, math.nan, math.nan, n)
    estimate = float(a.mean() / b.mean())
    if n < 2:
        return Interval(estimate, math.nan, math.nan, n)
    cov = np.cov(a, b, ddof=1)
    q = t_quantile(n, level) ** 2 / n
    # A θ² - 2 B θ + C ≤ 0
    big_a = b.mean() ** 2 - q * cov[1, 1]
    big_b = a.mean() * b.mean() - q * cov[0, 1]
    big_c = a.mean() ** 2 - q * cov[0, 0]
    if big_a <= 0:
        return Interval(estimate, -math.inf, math.inf, n)
    root = math.sqrt(max(big_b**2 - big_a * big_c, 0.0))  # ≥ 0 up to rounding: the estimate is in the set
    return Interval(estimate, (big_b - root) / big_a, (big_b + root) / big_a, n)
