"""Splits and sampling: the seeded train/eval split, stratified sampling of the
eval set, and the length-matched control.

The split is a pure function of (seed, split group, train fraction), so a
prompt's split never depends on which other datasets were configured, and
one seed gives one split on every machine.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from core.contracts import EVAL, TRAIN


def split_of(group: str, seed: int, train_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}\n{group}".encode()).digest()
    uniform = int.from_bytes(digest[:8], "big") / 2**64
    return TRAIN if uniform < train_fraction else EVAL


def stratified_sample(cells: dict[tuple, list], n: int, rng: random.Random) -> tuple[dict[tuple, list], dict[tuple, int]]:
    """Up to n members of each cell, drawn without replacement, and each
    cell's shortfall (how many fewer than n it had)."""
    chosen, shortfall = {}, {}
    for cell in sorted(cells):
        members = cells[cell]
        take = min(n, len(members))
        chosen[cell] = rng.sample(members, take)
        if take < n:
            shortfall[cell] = n - take
    return chosen, shortfall


@dataclass
class MatchedSample:
    chosen: list  # candidate objects
    lengths: list[int]
    ks_statistic: float  # two-sample KS of `lengths` against the target lengths
    ks_pvalue: float


def length_matched(candidates: Sequence[tuple[int, object]], target_lengths: Sequence[int], n: int,
                   rng: random.Random) -> MatchedSample:
    """n candidates whose lengths follow the target distribution.

    For each of the n target quantiles (i + 1/2)/n, take the unused candidate
    nearest in length (ties in a seeded random order). With candidates dense
    over the target's range the KS statistic is about 1/(2n); where the
    candidates do not cover the target's range it is larger, and says so."""
    if not target_lengths:
        raise ValueError("no target lengths to match")
    pool = list(candidates)
    rng.shuffle(pool)  # seeded tie-breaking
    pool.sort(key=lambda c: c[0])
    lengths = np.array([c[0] for c in pool])
    used = np.zeros(len(pool), dtype=bool)
    quantiles = np.quantile(np.asarray(target_lengths), (np.arange(n) + 0.5) / n, method="inverted_cdf")
    chosen = []
    for want in quantiles:
        if used.all():
            break
        distance = np.where(used, np.inf, np.abs(lengths - want))
        best = int(np.argmin(distance))
        used[best] = True
        chosen.append(pool[best])
    chosen_lengths = [int(c[0]) for c in chosen]
    result = stats.ks_2samp(chosen_lengths, list(target_lengths)) if chosen else None
    return MatchedSample([c[1] for c in chosen], chosen_lengths,
                         float(result.statistic) if result else 1.0, float(result.pvalue) if result else 0.0)
