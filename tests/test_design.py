"""analysis/design.py on synthetic data: the 2x2 length crossover (H1) with a planted effect and
with none (false-positive rates at nominal 5%, coverage at small n), the drafter x task matrix (H2)
and its permutation test, and the power and verdict helpers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import design, stats

LEVEL_FLOOR = 0.93  # coverage of a nominal 95% interval at small n (issue 12)
FPR_CEILING = 0.08  # false-positive rate of a nominal 5% test
SHARES = {"short": (0.7, 0.3), "long": (0.35, 0.65)}  # natural stratum shares within each eval set


# --- simulated crossover data --------------------------------------------------------------------------

def _crossover(rng, n_short: int, n_long: int, theta=(0.0, 0.0), seeds=(0, 1), sd_prompt=0.3, sd_family=0.05,
               sd=0.1, sd_seed=0.005) -> pd.DataFrame:
    """Per prompt and drafter: y = cell level + prompt difficulty + prompt x family + seed x eval set
    + noise, matched drafters +theta_s/2 and mismatched -theta_s/2 in stratum s (so the true theta is
    the shares' weighted mean of theta_s). Strata sizes are drawn, never the natural shares."""
    # Main effects only: any interaction of the cell levels is theta itself.
    level = {("short", "short"): 0.05, ("long", "short"): -0.02, ("short", "long"): -0.07, ("long", "long"): -0.14}
    seed_effect = {(f, s, e): rng.normal(0, sd_seed) for f in design.SETS for s in seeds for e in design.SETS}
    parts = []
    for eval_set, n in (("short", n_short), ("long", n_long)):
        first = int(np.clip(rng.binomial(n, 0.5), 1, n - 1))
        strata = np.repeat([0, 1], [first, n - first])
        difficulty = rng.normal(0, sd_prompt, n) + 0.2 * strata
        for family in design.SETS:
            sign = 1 if family == eval_set else -1
            prompt_family = rng.normal(0, sd_family, n)
            for s in seeds:
                y = (level[(family, eval_set)] + sign * np.asarray(theta)[strata] / 2 + difficulty + prompt_family
                     + seed_effect[(family, s, eval_set)] + rng.normal(0, sd, n))
                parts.append(pd.DataFrame({
                    "prompt_id": [f"{eval_set}-{i}" for i in range(n)], "eval_set": eval_set,
                    "stratum": [f"s{k}" for k in strata], "weight": np.asarray(SHARES[eval_set])[strata],
                    "family": family, "seed": s, "drafter": f"{family}-{s}", "y": y}))
    return pd.concat(parts, ignore_index=True)


def _truth(theta) -> float:
    return 0.5 * sum(sum(w * t for w, t in zip(SHARES[e], theta)) for e in design.SETS)


def _covers(ci, truth: float) -> bool:
    return ci is not None and ci[0] <= truth <= ci[1]


def test_the_crossover_finds_a_planted_theta_with_two_seeds():
    theta = (0.15, 0.25)
    frame = _crossover(np.random.default_rng(1), 40, 50, theta=theta)
    result = design.crossover(frame)
    truth = _truth(theta)
    assert result["ci"][0] > 0 and _covers(result["ci"], truth), (result["ci"], truth)
    assert result["ratio"] == pytest.approx(math.exp(result["effect"]))
    assert result["ratio_ci"] == pytest.approx([math.exp(v) for v in result["ci"]])
    assert result["n_prompts"] == {"short": 40, "long": 50} and result["excluded"] == 0
    model = result["model"]
    assert model["seed_component"] and model["df"] == 90 - 4 and _covers(model["ci"], truth)
    assert len(result["per_seed"]) == 2 and all(s["ci"][0] > 0 for s in result["per_seed"])
    assert {(c["family"], c["eval_set"]) for c in result["cells"]} == {(f, e) for f in design.SETS
                                                                       for e in design.SETS}
    assert all(c["n"] in (40, 50) and c["ratio"] == pytest.approx(math.exp(c["mean"])) for c in result["cells"])
    assert result["method"].startswith("theta = 1/2")
    assert pd.io.json.ujson_dumps(result)  # JSON-able: no numpy scalars


def test_the_crossover_sign_on_a_hand_made_frame():
    """Family short gains 0.3 on short prompts and 0.1 on long ones, family long 0.1 and 0.2:
    theta = 1/2 [(0.3 - 0.1) + (0.2 - 0.1)] = 0.15 > 0 (each family is better on its own length)."""
    gains = {("short", "short"): 0.3, ("long", "short"): 0.1, ("short", "long"): 0.1, ("long", "long"): 0.2}
    jitter = [0.0, 0.02, -0.02, 0.01]
    rows = [(f"{e}{i}", e, "all", 1.0, f, 0, f"{f}-0", gains[(f, e)] + jitter[i] + (0.001 * i if f == e else 0))
            for e in design.SETS for f in design.SETS for i in range(4)]
    frame = pd.DataFrame(rows, columns=["prompt_id", "eval_set", "stratum", "weight", "family", "seed", "drafter",
                                        "y"])
    result = design.crossover(frame)
    assert result["effect"] == pytest.approx(0.15 + 0.0015, abs=1e-12)
    assert result["per_set"]["short"]["effect"] == pytest.approx(0.2015)
    assert result["model"]["effect"] == pytest.approx(result["effect"], abs=1e-6)
    assert not result["model"]["seed_component"]  # one seed per family
    flipped = design.crossover(frame.assign(family=frame["family"].map({"short": "long", "long": "short"})))
    assert flipped["effect"] == pytest.approx(-result["effect"])


def test_the_mixed_model_equals_the_primary_theta_on_balanced_data():
    frame = _crossover(np.random.default_rng(2), 30, 30, theta=(0.1, 0.1))
    # Balanced: every stratum's share equals its share of the sample, so post-stratification is the plain mean.
    sizes = frame.drop_duplicates("prompt_id").groupby(["eval_set", "stratum"]).size()
    frame["weight"] = [sizes[(e, s)] / 30 for e, s in zip(frame["eval_set"], frame["stratum"])]
    result = design.crossover(frame)
    assert result["model"]["effect"] == pytest.approx(result["effect"], abs=1e-6)
    assert result["model"]["se"] == pytest.approx(result["se"], rel=0.25)


def test_theta_per_seed_and_its_spread():
    frame = _crossover(np.random.default_rng(3), 30, 30, theta=(0.1, 0.1), seeds=(3, 7, 11), sd_seed=0.05)
    result = design.crossover(frame)
    thetas = [s["effect"] for s in result["per_seed"]]
    assert [s["seeds"] for s in result["per_seed"]] == [{"short": s, "long": s} for s in (3, 7, 11)]
    spread = result["seed_spread"]
    assert spread["n"] == 3 and spread["sd"] == pytest.approx(np.std(thetas, ddof=1))
    assert spread["range"] == pytest.approx(max(thetas) - min(thetas))
    assert spread["exceeds_half_width"] == (spread["sd"] > (result["ci"][1] - result["ci"][0]) / 2)
    assert result["effect"] == pytest.approx(np.mean(thetas))  # balanced seeds: theta is their mean
    # Different seeds in the two families are paired by sorted order.
    frame.loc[frame["family"] == "long", "seed"] += 100
    paired = design.crossover(frame)["per_seed"]
    assert [s["seeds"] for s in paired] == [{"short": s, "long": s + 100} for s in (3, 7, 11)]
    assert [s["effect"] for s in paired] == pytest.approx(thetas)


def test_nan_rows_are_dropped_and_counted():
    frame = _crossover(np.random.default_rng(4), 20, 20, theta=(0.1, 0.1))
    frame.loc[[0, 5, 9], "y"] = np.nan  # three drafter rows of short-set prompts; the other seed remains
    result = design.crossover(frame)
    assert result["excluded"] == 3 and result["n_prompts"] == {"short": 20, "long": 20}
    # A prompt without any row of one family has no contrast.
    gone = frame[~((frame["prompt_id"] == "long-0") & (frame["family"] == "long"))]
    result = design.crossover(gone)
    assert result["n_prompts"] == {"short": 20, "long": 19} and result["unpaired"] == 1


def test_the_local_stratified_helper_is_stratified_means_computation():
    rng = np.random.default_rng(5)
    for sizes, shares in (((6, 3), (0.7, 0.3)), ((3, 1, 4), (0.2, 0.5, 0.3)), ((2, 2), (0.99, 0.01))):
        groups = [(w, rng.normal(0, 1, k)) for w, k in zip(shares, sizes)]
        mean, variance, df = design.stratified_parts(groups)
        expected_mean, expected_ci = stats.stratified_mean(groups)
        assert mean == pytest.approx(expected_mean)
        assert stats.t_interval(mean, math.sqrt(variance), df) == pytest.approx(expected_ci)
