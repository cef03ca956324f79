"""Length divergences (analysis/divergence.py) against hand-computed values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from analysis import divergence


def test_js_hand_computed():
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4);
    # KL(p||m) = log2(4/3); KL(q||m) = 1/2 log2(2/3) + 1/2 log2(2).
    expected = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5) / 2
    assert divergence.js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(expected)
    assert divergence.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: 1 bit
    assert divergence.js_divergence([0.3, 0.7], [0.3, 0.7]) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(5))
def test_js_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    p, q = rng.random(12), rng.random(12)
    p[rng.integers(0, 12)] = 0  # empty bins must be handled
    # scipy returns the JS *distance*, the square root of the divergence.
    assert divergence.js_divergence(p, q) == pytest.approx(jensenshannon(p, q, base=2) ** 2)


def test_w1_and_ks_hand_computed():
    w1, ks = divergence.ecdf_distances([1, 2, 3], [2, 3, 4])
    assert w1 == pytest.approx(1.0)  # every unit of mass moves one token
    assert ks == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_w1_and_ks_match_scipy_with_ties_and_unequal_sizes(seed):
    rng = np.random.default_rng(seed)
    u = rng.integers(5, 400, size=37)  # integer token lengths: ties are common
    v = rng.integers(20, 900, size=81)
    w1, ks = divergence.ecdf_distances(u, v)
    assert w1 == pytest.approx(sps.wasserstein_distance(u, v))
    assert ks == pytest.approx(sps.ks_2samp(u, v).statistic)


def test_log_bins_are_shared_log_spaced_and_cover_every_length():
    edges = divergence.log_bin_edges(1000)
    assert edges[0] == 1
    assert np.allclose(edges[1:] / edges[:-1], 2 ** (1 / divergence.BINS_PER_DOUBLING))
    assert edges[-1] > 1000
    hist = divergence.histogram([0, 1, 5, 1000], edges)
    assert hist.sum() == pytest.approx(1.0)
    assert hist[0] == pytest.approx(0.5)  # lengths 0 and 1 both land in the first bin


def test_compare_gives_all_measures_and_handles_empty_samples():
    edges = divergence.log_bin_edges(100)
    same = divergence.compare([10, 20, 30], [10, 20, 30], edges)
    assert same == {"js": 0.0, "w1": 0.0, "ks": 0.0, "n": [3, 3]}
    far = divergence.compare([2, 3], [80, 90], edges)
    assert far["js"] == pytest.approx(1.0) and far["ks"] == 1.0 and far["w1"] == pytest.approx(82.5)
    assert divergence.compare([], [1, 2], edges)["js"] is None
