"""Interval estimates used throughout the report.

Every bootstrap resamples independent units (prompts, or answer cells), and
is seeded from a fixed base seed and the name of the quantity, so that results
do not depend on the order in which they are computed.

Intervals are expanded percentile intervals (Hesterberg 2015, "What teachers
should know about the bootstrap"): the plain percentile interval is too
narrow at small n (about 89% coverage for a nominal 95% at n = 10), so the
tail probability is taken at Phi(-sqrt(n / (n - 1)) * t_(n-1)), which
restores the nominal coverage for a mean; with many units it is the plain
percentile interval.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np
from scipy import stats as sps

BASE_SEED = 20230518  # fixed: results.json must be reproducible byte for byte
RESAMPLES = 2000
LEVEL = 0.95
# Below this many units no interval is given; below SMALL_SAMPLE the report warns.
MIN_UNITS_FOR_CI = 3
SMALL_SAMPLE = 10


def seed_for(*key) -> int:
    return zlib.crc32("|".join(map(str, (BASE_SEED, *key))).encode())


def expanded_tail(n: int, level: float = LEVEL) -> float:
    """Lower-tail probability of the expanded percentile interval for n units."""
    t = sps.t.ppf(1 - (1 - level) / 2, df=n - 1)
    return float(sps.norm.cdf(-math.sqrt(n / (n - 1)) * t))


def t_interval(value: float, se: float, df: float, level: float = LEVEL) -> list[float]:
    """value ± t_df se: the small-sample interval every t-based estimate here uses."""
    half = float(sps.t.ppf(1 - (1 - level) / 2, df)) * se
    return [value - half, value + half]


def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], n: int, seed: int,
                 resamples: int = RESAMPLES, level: float = LEVEL) -> tuple[float, float] | None:
    """Expanded percentile interval of `statistic`, which maps a (resamples, n) matrix of
    unit indices to one value per row (vectorised: one call, not a loop)."""
    if n < MIN_UNITS_FOR_CI:
        return None
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    values = np.asarray(statistic(indices), dtype=float)
    values = values[np.isfinite(values)]
    if values.size < resamples / 2:
        return None
    tail = expanded_tail(n, level)
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def geometric_mean(log_values, seed: int) -> dict:
    """exp(mean(log)) of per-unit log ratios, with a bootstrap interval."""
    logs = np.asarray(log_values, dtype=float)
    if logs.size == 0:
        return {"n": 0, "value": None, "ci": None}
    ci = bootstrap_ci(lambda idx: logs[idx].mean(axis=1), logs.size, seed)
    return {
        "n": int(logs.size),
        "value": math.exp(logs.mean()),
        "ci": [math.exp(ci[0]), math.exp(ci[1])] if ci else None,
    }


def unpaired_ratio(strata: list[tuple[np.ndarray, np.ndarray]], seed: int) -> dict:
    """exp of the weighted mean, over strata, of mean(reference logs) -
    mean(arm logs), for when two arms did not answer the same prompts.

    Comparing within strata (task and length stratum) keeps a different task
    mix between the two arms out of the ratio; each stratum weighs by its
    number of arm prompts, and a stratum that lacks either side is left out.
    The bootstrap resamples each side of each stratum on its own.
    """
    strata = [(np.asarray(r, dtype=float), np.asarray(a, dtype=float)) for r, a in strata]
    strata = [(r, a) for r, a in strata if r.size and a.size]
    n_ref, n_arm = sum(r.size for r, _ in strata), sum(a.size for _, a in strata)
    result = {"n": n_arm, "n_reference": n_ref, "value": None, "ci": None}
    if not strata:
        return result
    weights = np.array([a.size for _, a in strata], dtype=float) / n_arm
    result["value"] = math.exp(sum(w * (r.mean() - a.mean()) for w, (r, a) in zip(weights, strata)))
    if min(n_ref, n_arm) >= MIN_UNITS_FOR_CI:
        rng = np.random.default_rng(seed)
        diffs = sum(w * (r[rng.integers(0, r.size, (RESAMPLES, r.size))].mean(axis=1)
                         - a[rng.integers(0, a.size, (RESAMPLES, a.size))].mean(axis=1))
                    for w, (r, a) in zip(weights, strata))
        tail = expanded_tail(min(n_ref, n_arm))
        lo, hi = np.quantile(diffs, [tail, 1 - tail])
        result["ci"] = [math.exp(lo), math.exp(hi)]
    return result


def wilson_interval(successes: int, trials: int, level: float = LEVEL) -> list[float] | None:
    """Wilson score interval of a binomial share (honest at small n and at 0 or 1)."""
    if trials == 0:
        return None
    z = sps.norm.ppf(1 - (1 - level) / 2)
    share = successes / trials
    centre = (share + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def ols_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope along the last axis (rows are independent samples)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (xc * yc).sum(axis=-1) / (xc * xc).sum(axis=-1)


def _demean(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Subtract each group's mean along the last axis; `codes` (same shape)
    holds each unit's group as an integer 0..G-1."""
    onehot = codes[..., None] == np.arange(codes.max() + 1)  # (..., n, G)
    sums = (values[..., None] * onehot).sum(axis=-2)
    counts = onehot.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return values - np.take_along_axis(means, codes, axis=-1)


def slope(x, y, seed: int, within=None) -> dict:
    """Regression slope of y on x with a bootstrap interval over the (x, y) units.

    With `within` (a group label per unit), x and y are first centred within
    each group, so the slope uses only the variation inside groups (a
    fixed-effects slope). Resampled units keep their group label.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = x.size
    if n < 2:
        return {"n": n, "value": None, "ci": None}
    codes = np.unique(np.asarray(within), return_inverse=True)[1].reshape(n) if within is not None \
        else np.zeros(n, dtype=int)
    point = float(ols_slope(_demean(x, codes), _demean(y, codes)))
    ci = bootstrap_ci(lambda idx: ols_slope(_demean(x[idx], codes[idx]), _demean(y[idx], codes[idx])), n, seed)
    return {"n": n, "value": point if math.isfinite(point) else None, "ci": list(ci) if ci else None}


def spearman(x, y) -> dict:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": int(x.size), "rho": None, "p": None}
    result = sps.spearmanr(x, y)
    return {"n": int(x.size), "rho": float(result.statistic), "p": float(result.pvalue)}


def excludes(ci, value: float) -> bool:
    """True when an interval lies wholly on one side of `value`."""
    return ci is not None and None not in ci and (ci[0] > value or ci[1] < value)


# --- small-sample t intervals (issue 12) ---------------------------------------------------

def delta_t_interval(estimate: float, influence: np.ndarray) -> list[float]:
    """estimate ± t_(n-1) se, se from the linearised (delta-method) influence of each unit."""
    n = influence.size
    se = math.sqrt(float((influence ** 2).sum()) * n / (n - 1))
    return t_interval(estimate, se, n - 1)


def mean_interval(values: np.ndarray) -> list[float] | None:
    """The t interval of a mean (n-1 df)."""
    n = values.size
    if n < MIN_UNITS_FOR_CI:
        return None
    return delta_t_interval(float(values.mean()), (values - values.mean()) / n)


def stratified_mean(groups: list[tuple[float, np.ndarray]]) -> tuple[float | None, list[float] | None]:
    """sum_s W_s mean(y_s) with weights W_s (summing to 1) and a t interval,
    degrees of freedom by Welch-Satterthwaite. A stratum with one value has no
    variance of its own: for the interval it is collapsed into its neighbour
    (the next stratum, else the previous; Cochran's collapsed strata). The
    collapsed group keeps each value's own weight w_i = W_s / n_s: its variance
    is n/(n-1) sum (w_i y_i - mean w y)^2 and its degrees of freedom n_eff - 1
    (Kish's n_eff = (sum w)^2 / sum w^2, at least 1), so a heavy one-value
    stratum widens the interval as it should (issue 12: merging with equal
    weights covered 0.66 when the one value carried 90% of the weight;
    tests/test_inference.py). With equal weights this is the plain stratum
    variance. No interval below MIN_UNITS_FOR_CI values in all."""
    mean, variance, df = stratified_parts(groups)
    if mean is None or variance is None:
        return mean, None
    if variance <= 0:
        return mean, [mean, mean]
    return mean, t_interval(mean, math.sqrt(variance), df)


def stratified_parts(groups: list[tuple[float, np.ndarray]]) -> tuple[float | None, float | None, float | None]:
    """stratified_mean's (mean, variance, Welch-Satterthwaite df); variance None where it gives no
    interval, df None at zero variance. Exposed so that two sets' variances and df can be combined."""
    groups = [(w, y) for w, y in groups if y.size]
    if not groups:
        return None, None, None
    total = sum(w for w, _ in groups)
    mean = float(sum(w / total * y.mean() for w, y in groups))
    collapsed = collapse_singletons([(np.full(y.size, w / total / y.size), y) for w, y in groups])
    if min(y.size for _, y in collapsed) < 2 or sum(y.size for _, y in collapsed) < MIN_UNITS_FOR_CI:
        return mean, None, None
    parts, dfs = [], []
    for w, y in collapsed:
        z = w * y
        parts.append(y.size / (y.size - 1) * float(((z - z.mean()) ** 2).sum()))
        dfs.append(max(1.0, float(w.sum() ** 2 / (w ** 2).sum()) - 1))
    variance = sum(parts)
    if variance <= 0:
        return mean, 0.0, None
    return mean, float(variance), float(variance ** 2 / sum(p ** 2 / d for p, d in zip(parts, dfs) if p > 0))


def collapse_singletons(groups: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Merge each one-value stratum into its neighbour; groups are (per-value weights, values)."""
    groups = list(groups)
    while len(groups) > 1 and any(y.size < 2 for _, y in groups):
        i = next(i for i, (_, y) in enumerate(groups) if y.size < 2)
        a, b = sorted((i, i + 1 if i + 1 < len(groups) else i - 1))
        groups[a] = (np.concatenate([groups[a][0], groups[b][0]]), np.concatenate([groups[a][1], groups[b][1]]))
        del groups[b]
    return groups
