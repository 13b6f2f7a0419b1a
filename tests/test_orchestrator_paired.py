"""Paired intervals of the report (orchestrator/paired.py), against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from orchestrator.paired import holm, ratio_ci, stratified_mean_ci, t_quantile

# Student t quantiles from a printed table (two-sided 95 %).
T95 = {2: 12.7062, 3: 4.3027, 4: 3.1824}


def test_t_quantile_matches_the_printed_table():
    assert [round(t_quantile(n), 4) for n in T95] == list(T95.values())


def test_one_stratum_is_the_paired_t_interval_by_hand():
    # d = (-1.0, -1.2, -0.8, -1.0): mean -1, s = sqrt(0.08 / 3) = 0.163299, s/√4 = 0.0816497
    ci = stratified_mean_ci([[-1.0, -1.2, -0.8, -1.0]])
    assert (ci.estimate, ci.n) == (pytest.approx(-1.0), 4)
    assert (ci.lo, ci.hi) == pytest.approx((-1.0 - 3.1824 * 0.0816497, -1.0 + 3.1824 * 0.0816497), abs=1e-4)
    assert not ci.straddles_zero and ci.bounded


def test_an_interval_that_must_straddle_zero():
    # d = (1, 2, 3): mean 2, s/√3 = 0.57735, half-width 4.3027 · 0.57735 = 2.4841 > 2
    ci = stratified_mean_ci([[1.0, 2.0, 3.0]])
    assert (ci.lo, ci.hi) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-3)
    assert ci.straddles_zero
    # differences of either sign around 0 straddle it whatever their spread
    assert stratified_mean_ci([[0.5, -0.4, 0.1, -0.3]]).straddles_zero


def test_one_pair_has_an_estimate_and_no_interval():
    ci = stratified_mean_ci([[2.5]])
    assert ci.estimate == 2.5 and math.isnan(ci.lo) and math.isnan(ci.hi) and not ci.straddles_zero


def test_fieller_with_a_constant_gap_is_the_numerators_t_interval_scaled():
    # b = 10 in every seed: the set {θ : |ā - 10 θ| ≤ t s_a / √n} = (ā ± t s_a / √n) / 10
    ci = ratio_ci([7.5, 8.5, 8.0], [10.0, 10.0, 10.0])
    half = 4.3027 * 0.5 / math.sqrt(3) / 10
    assert ci.estimate == pytest.approx(0.8)
    assert (ci.lo, ci.hi) == pytest.approx((0.8 - half, 0.8 + half), abs=1e-4)


def test_fieller_by_hand_with_a_noisy_gap():
    # a = (2, 3, 4), b = (8, 10, 12): ā = 3, b̄ = 10, s_aa = 1, s_bb = 4, s_ab = 2, q = t² / 3 = 6.17094.
    # A = 100 - 4q = 75.3162, B = 30 - 2q = 17.6581, C = 9 - q = 2.82906; θ = (B ± √(B² - AC)) / A
    q = 4.302653**2 / 3
    big_a, big_b, big_c = 100 - 4 * q, 30 - 2 * q, 9 - q
    root = math.sqrt(big_b**2 - big_a * big_c)
    ci = ratio_ci([2.0, 3.0, 4.0], [8.0, 10.0, 12.0])
    assert ci.estimate == pytest.approx(0.3)
    assert (ci.lo, ci.hi) == pytest.approx(((big_b - root) / big_a, (big_b + root) / big_a), rel=1e-5)
    assert 0 < ci.lo < 0.3 < ci.hi  # here a and b move together, so the interval is narrower than a's alone


def test_fieller_is_unbounded_when_the_gap_is_not_distinguishable_from_zero():
    ci = ratio_ci([1.0, 2.0, 1.5], [1.0, -1.0, 0.5])
    assert ci.estimate == pytest.approx(1.5 / (0.5 / 3))
    assert (ci.lo, ci.hi) == (-math.inf, math.inf) and ci.straddles_zero and not ci.bounded
    assert math.isnan(ratio_ci([1.0, 2.0], [1.0, -1.0]).estimate)  # no gap at all: no ratio
    # equal accuracies at 4 and 8 bits, differenced through means: rounding, not a gap (was 4.5e13 "unbounded")
    rounded = [5.551115123125783e-17, 0.0, -1.1102230246251565e-16]  # the size float rounding leaves
    assert math.isnan(ratio_ci([0.01, 0.02, 0.0], rounded).estimate)


def test_stratified_interval_by_hand():
    # cell means 1.0 and 2.0 (estimate 1.5, each cell weighted equally); v = s²/n = 0.04/3 and 0.09/3;
    # SE = √(Σv) / 2 = 0.1040833; dof = (Σv)² / Σ v² / (n - 1) = 0.04333² / ((0.01333² + 0.03²) / 2) = 3.48454
    ci = stratified_mean_ci([[1.0, 1.2, 0.8], [2.0, 2.3, 1.7]])
    half = stats.t.ppf(0.975, 3.48454) * 0.1040833
    assert (ci.estimate, ci.n) == (pytest.approx(1.5), 6)
    assert (ci.lo, ci.hi) == pytest.approx((1.5 - half, 1.5 + half), abs=1e-4)
    # far narrower than either cell's own interval (2 degrees of freedom each)
    cell = stratified_mean_ci([[1.0, 1.2, 0.8]])
    assert ci.hi - ci.lo < cell.hi - cell.lo


def test_stratified_interval_covers_the_average_effect_of_cells_that_differ():
    """Cells with effects -1, 0, 2 and 5 and spreads 0.2 to 1.0, 3 seeds each: the interval covers their
    average 1.5 at about its level, although the effects differ far more than any cell's noise."""
    rng = np.random.default_rng(0)
    effects, spreads = np.array([-1.0, 0.0, 2.0, 5.0]), np.array([0.2, 0.5, 1.0, 0.3])
    covered = [
        ci.lo <= effects.mean() <= ci.hi
        for ci in (stratified_mean_ci([rng.normal(m, s, 3) for m, s in zip(effects, spreads, strict=True)])
                   for _ in range(4000))
    ]  # fmt: skip
    assert 0.93 <= np.mean(covered) <= 0.97


def test_stratified_interval_needs_two_pairs_in_every_cell_and_is_a_point_without_spread():
    short = stratified_mean_ci([[1.0, 2.0], [3.0]])
    assert short.estimate == pytest.approx(2.25) and math.isnan(short.lo) and short.n == 3
    flat = stratified_mean_ci([[0.5, 0.5], [1.5, 1.5, 1.5]])  # a deterministic init: the same every seed
    assert (flat.estimate, flat.lo, flat.hi) == (1.0, 1.0, 1.0) and not flat.straddles_zero
    assert math.isnan(stratified_mean_ci([]).estimate)


def test_the_p_value_is_the_one_sample_t_test_of_the_paired_differences():
    d = [-1.0, -1.2, -0.8, -1.0]
    assert stratified_mean_ci([d]).p == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue, rel=1e-9)
    # the interval excludes 0 exactly when p < 0.05
    assert stratified_mean_ci([[1.0, 2.0, 3.0]]).p > 0.05 and stratified_mean_ci([d]).p < 0.05
    assert math.isnan(stratified_mean_ci([[2.5]]).p)  # one pair: no test


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.02, math.nan, 0.5])  # NaN is no test: a family of 2
    assert (
        adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.5)
    )
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
