"""Divergence between two samples of sequence lengths (in tokens).

- Jensen-Shannon divergence, log base 2 (so 0 = same histogram, 1 = disjoint),
  on shared log-spaced bins: edges 1, 2^(1/2), 2, 2^(3/2), ... tokens (two
  bins per doubling), one set of edges for the whole report so that every
  figure in a matrix is comparable. Lengths below 1 count in the first bin.
- Wasserstein-1 (earth mover's) distance in tokens: the area between the two
  empirical CDFs.
- The two-sample Kolmogorov-Smirnov statistic: the largest gap between them.
"""

from __future__ import annotations

import math

import numpy as np

JS_LOG_BASE = 2
BINS_PER_DOUBLING = 2
LENGTH_KINDS = ("prompt", "output", "total")
MEASURES = ("js", "w1", "ks")


def log_bin_edges(max_length: float) -> np.ndarray:
    """Edges 2^(k / BINS_PER_DOUBLING) from 1 up to the first edge above max_length."""
    top = max(1, math.ceil(math.log2(max(max_length, 1) + 1) * BINS_PER_DOUBLING))
    return 2.0 ** (np.arange(top + 1) / BINS_PER_DOUBLING)


def histogram(lengths, edges: np.ndarray) -> np.ndarray:
    values = np.clip(np.asarray(lengths, dtype=float), edges[0], edges[-1])
    counts, _ = np.histogram(values, bins=edges)
    return counts / counts.sum()


def js_divergence(p: np.ndarray, q: np.ndarray, base: float = JS_LOG_BASE) -> float:
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a):
        mask = a > 0
        return float(np.sum(a[mask] * np.log(a[mask] / m[mask])))

    return max(0.0, (kl(p) + kl(q)) / 2 / math.log(base))


def ecdf_distances(u, v) -> tuple[float, float]:
    """(Wasserstein-1, KS statistic) from the two empirical CDFs on the merged support."""
    u, v = np.sort(np.asarray(u, dtype=float)), np.sort(np.asarray(v, dtype=float))
    support = np.unique(np.concatenate([u, v]))
    cdf_u = np.searchsorted(u, support, side="right") / u.size
    cdf_v = np.searchsorted(v, support, side="right") / v.size
    gap = np.abs(cdf_u - cdf_v)
    w1 = float(np.sum(gap[:-1] * np.diff(support)))
    return w1, float(gap.max())


def compare(u, v, edges: np.ndarray) -> dict:
    """All three measures between two length samples; None when either is empty."""
    if len(u) == 0 or len(v) == 0:
        return {"js": None, "w1": None, "ks": None, "n": [len(u), len(v)]}
    w1, ks = ecdf_distances(u, v)
    return {"js": js_divergence(histogram(u, edges), histogram(v, edges)), "w1": w1, "ks": ks, "n": [len(u), len(v)]}
