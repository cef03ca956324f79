"""The interval estimates in analysis/stats.py against hand-computed cases,
scipy, and a coverage simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from analysis import stats


def test_geometric_mean_of_ratios_is_exp_mean_log():
    estimate = stats.geometric_mean(np.log([2.0, 8.0]), seed=1)
    assert estimate["value"] == pytest.approx(4.0)
    assert estimate["n"] == 2
    assert estimate["ci"] is None  # fewer than MIN_UNITS_FOR_CI prompts: no interval


def test_empty_sample_has_no_estimate():
    assert stats.geometric_mean([], seed=1) == {"n": 0, "value": None, "ci": None}


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    logs = np.log(np.random.default_rng(3).lognormal(0.2, 0.3, size=25))
    first = stats.geometric_mean(logs, seed=stats.seed_for("x"))
    again = stats.geometric_mean(logs, seed=stats.seed_for("x"))
    other = stats.geometric_mean(logs, seed=stats.seed_for("y"))
    assert first == again
    assert first["ci"] != other["ci"]
    assert first["ci"][0] < first["value"] < first["ci"][1]


def test_bootstrap_ci_of_constant_sample_is_a_point():
    estimate = stats.geometric_mean(np.log([1.5] * 6), seed=0)
    assert estimate["ci"] == pytest.approx([1.5, 1.5])


@pytest.mark.parametrize("n", [10, 30])
def test_geometric_mean_ci_covers_the_truth_at_about_the_nominal_rate(n):
    """Simulate 400 experiments of n paired prompts with log-normal speed-up
    ratios around a known geometric mean; the 95% interval should contain it
    in about 95% of them, also at the small n of a per-stratum cell."""
    truth, sigma, trials = 1.3, 0.25, 400
    rng = np.random.default_rng(12345)
    covered = 0
    for trial in range(trials):
        logs = rng.normal(math.log(truth), sigma, size=n)
        lo, hi = stats.geometric_mean(logs, seed=stats.seed_for("coverage", n, trial))["ci"]
        covered += lo <= truth <= hi
    rate = covered / trials
    # 95% nominal; the binomial sd at 400 trials is 1.1 points.
    assert 0.92 <= rate <= 0.98, rate


def test_expanded_tail_hand_computed():
    # n = 10: t(0.975, 9) = 2.2622; sqrt(10/9) * 2.2622 = 2.3846; Phi(-2.3846) = 0.00855.
    assert stats.expanded_tail(10) == pytest.approx(0.00855, abs=2e-5)
    assert stats.expanded_tail(100_000) == pytest.approx(0.025, abs=1e-4)  # large n: plain percentile


def test_unpaired_ratio_compares_within_strata():
    """Stratum 1: reference 2, 2 against arm 1 (weight 1/3); stratum 2:
    reference 4 against arm 1, 1 (weight 2/3); a stratum without reference is
    left out. exp(1/3 ln 2 + 2/3 ln 4) = 2^(5/3)."""
    log = np.log
    result = stats.unpaired_ratio([(log([2.0, 2.0]), log([1.0])), (log([4.0]), log([1.0, 1.0])),
                                   (np.array([]), log([9.0]))], seed=0)
    assert result["value"] == pytest.approx(2 ** (5 / 3))
    assert (result["n"], result["n_reference"]) == (3, 3)
    assert result["ci"] == pytest.approx([2 ** (5 / 3), 2 ** (5 / 3)])  # no spread within strata
    assert stats.unpaired_ratio([(np.array([]), log([1.0]))], seed=0)["value"] is None


def test_wilson_interval_matches_the_textbook_value():
    # 8 successes in 10: Wilson 95% interval (0.4902, 0.9433).
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)
    assert stats.wilson_interval(0, 0) is None
    lo, hi = stats.wilson_interval(5, 5)
    assert hi == 1.0 and 0.5 < lo < 0.6


def test_spearman_matches_scipy_and_refuses_degenerate_input():
    x = [0.1, 0.4, 0.2, 0.9, 0.5, 0.7]
    y = [3.0, 1.0, 2.5, 0.2, 1.1, 0.4]
    ours = stats.spearman(x, y)
    theirs = sps.spearmanr(x, y)
    assert ours["rho"] == pytest.approx(theirs.statistic)
    assert ours["p"] == pytest.approx(theirs.pvalue)
    assert stats.spearman([1, 2], [3, 4])["rho"] is None  # fewer than 3 points
    assert stats.spearman([1, 1, 1], [1, 2, 3])["rho"] is None  # no variation


def test_slope_of_exact_line_and_its_interval():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    fit = stats.slope(x, 2 * x + 1, seed=0)
    assert fit["value"] == pytest.approx(2.0)
    assert fit["ci"] == pytest.approx([2.0, 2.0])
    assert fit["value"] == pytest.approx(sps.linregress(x, 2 * x + 1).slope)


def test_within_group_slope_removes_group_offsets():
    """Two groups with slope 0.5 each but far-apart intercepts: pooled OLS is
    dominated by the offset, the within-group slope recovers 0.5."""
    x = np.array([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])
    group = np.array(["a", "a", "a", "b", "b", "b"])
    y = 0.5 * x + np.where(group == "a", 20.0, 0.0)
    pooled = stats.slope(x, y, seed=0)
    within = stats.slope(x, y, seed=0, within=group)
    assert pooled["value"] < 0
    assert within["value"] == pytest.approx(0.5)
    assert within["ci"] == pytest.approx([0.5, 0.5])


def test_slope_ci_is_none_below_minimum_units():
    assert stats.slope([1.0, 2.0], [1.0, 3.0], seed=0)["ci"] is None


def test_excludes():
    assert stats.excludes([1.1, 1.3], 1)
    assert stats.excludes([0.7, 0.9], 1)
    assert not stats.excludes([0.9, 1.1], 1)
    assert not stats.excludes(None, 1)
