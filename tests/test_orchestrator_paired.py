"""Paired intervals of the report (orchestrator/paired.py), against values computed by hand."""

from __future__ import annotations

import math

import pytest

from orchestrator.paired import mean_ci, ratio_ci, t_quantile

# Student t quantiles from a printed table (two-sided 95 %).
T95 = {2: 12.7062, 3: 4.3027, 4: 3.1824}


def test_t_quantile_matches_the_printed_table():
    assert [round(t_quantile(n), 4) for n in T95] == list(T95.values())


def test_mean_interval_of_paired_differences_by_hand():
    # d = (-1.0, -1.2, -0.8, -1.0): mean -1, s = sqrt(0.08 / 3) = 0.163299, s/√4 = 0.0816497
    ci = mean_ci([-1.0, -1.2, -0.8, -1.0])
    assert (ci.estimate, ci.n) == (pytest.approx(-1.0), 4)
    assert (ci.lo, ci.hi) == pytest.approx((-1.0 - 3.1824 * 0.0816497, -1.0 + 3.1824 * 0.0816497), abs=1e-4)
    assert not ci.straddles_zero and ci.bounded


def test_an_interval_that_must_straddle_zero():
    # d = (1, 2, 3): mean 2, s/√3 = 0.57735, half-width 4.3027 · 0.57735 = 2.4841 > 2
    ci = mean_ci([1.0, 2.0, 3.0])
    assert (ci.lo, ci.hi) == pytest.approx((2 - 2.4841, 2 + 2.4841), abs=1e-3)
    assert ci.straddles_zero
    # differences of either sign around 0 straddle it whatever their spread
    assert mean_ci([0.5, -0.4, 0.1, -0.3]).straddles_zero


def test_one_pair_has_an_estimate_and_no_interval():
    ci = mean_ci([2.5])
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
