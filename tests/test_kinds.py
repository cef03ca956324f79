"""Drafter kinds compared (analysis/kinds.py): the per-arm rows come from the
replay, the cost model and the cards; the step-cost ratio of a head against a
draft model is taken on the prompts both were served, controls left out."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis.kinds import compare_kinds
from analysis.rundir import Drafter
from analysis.schema import ArmInfo, Kinds

R_HEAD, R_DRAFT = 1.18, 1.42  # planted step costs, in plain decode steps


def _run():
    arms = [ArmInfo("baseline", None, None, None), ArmInfo("ngram", "ngram", 3, None),
            ArmInfo("generic", "draft_model", 2, "generic"), ArmInfo("head", "eagle3", 2, "head")]
    drafters = {"generic": Drafter("generic", "target", "all", build_seconds={"total": 1416.0}, training_steps=250,
                                   vocabulary=16384),
                "head": Drafter("head", "target", "all", build_seconds={"total": 900.0}, training_steps=240,
                                vocabulary=16384)}
    return SimpleNamespace(arms=arms, baseline="baseline", drafters=drafters,
                           speculative_arms=[a for a in arms if a.is_speculative("baseline")])


def _log_r(r: float, prompts: list[str], noise: np.ndarray, control: str | None = None) -> pd.DataFrame:
    rows = [{"prompt_id": p, "task": "gsm8k", "stratum": "p0-64", "is_control": False,
             "log_r": math.log(r) + e} for p, e in zip(prompts, noise)]
    if control:  # a control prompt with a wild r: must not enter the ratio
        rows.append({"prompt_id": control, "task": "gsm8k-like-xsum", "stratum": "p0-64", "is_control": True,
                     "log_r": math.log(50.0)})
    return pd.DataFrame(rows)


def test_a_heads_step_cost_against_a_draft_models_is_the_ratio_on_shared_prompts():
    noise = np.random.default_rng(0).normal(0, 0.05, 30)  # the same prompt is slow for both arms
    shared = [f"p{i}" for i in range(30)]
    logs = {"head": _log_r(R_HEAD, shared + ["only-head"], np.append(noise, 0.9), control="c1"),
            "generic": _log_r(R_DRAFT, shared, noise)}
    rows = [{"arm": arm, "served": True, "task": "all", "stratum": "all", "tau": tau, "tau_ci": [tau - 0.02, tau + 0.02],
             "tokens_per_step": tau} for arm, tau in (("head", 1.40), ("generic", 1.42))]
    rows.append({"arm": "head", "served": False, "task": "all", "stratum": "all", "tau": 1.2, "tau_ci": None,
                 "tokens_per_step": 1.2})  # another K: not the served row
    cost = {"arms": {"generic": {"speedup": 1.0, "r": {"n": 30, "value": R_DRAFT, "ci": [1.4, 1.44]}, "c": 0.2},
                     "head": {"speedup": 1.19, "r": {"n": 31, "value": R_HEAD, "ci": [1.16, 1.2]}, "c": 0.09}}}

    found = compare_kinds(_run(), rows, cost, logs)
    typed = Kinds.from_dict(found)

    assert typed.kinds == ["draft_model", "eagle3"]
    by_arm = {r.arm: r for r in typed.rows}
    assert set(by_arm) == {"generic", "head"}  # the n-gram arm has no drafter kind
    head = by_arm["head"]
    assert (head.kind, head.tau, head.served_speedup, head.r.value, head.c) == ("eagle3", 1.40, 1.19, R_HEAD, 0.09)
    assert head.build_minutes == pytest.approx(15.0) and by_arm["generic"].build_minutes == pytest.approx(23.6)
    assert (head.training_steps, head.vocabulary) == (240, 16384)
    (ratio,) = typed.ratios
    assert (ratio.arm, ratio.reference) == ("head", "generic")
    # The shared noise cancels: exactly the planted ratio, over the 30 shared prompts only.
    assert ratio.r_ratio.n == 30 and ratio.r_ratio.value == pytest.approx(R_HEAD / R_DRAFT, rel=1e-9)
    assert ratio.r_ratio.ci[0] <= ratio.r_ratio.value <= ratio.r_ratio.ci[1]


def test_one_kind_gives_rows_without_ratios_and_no_drafter_arm_gives_none():
    run = _run()
    run.speculative_arms = [a for a in run.speculative_arms if a.name != "head"]
    logs = {"generic": _log_r(R_DRAFT, ["p0", "p1", "p2"], np.zeros(3))}
    found = compare_kinds(run, [], None, logs)
    assert found["kinds"] == ["draft_model"] and found["ratios"] == []
    assert found["rows"][0]["r"] is None and found["rows"][0]["tau"] is None
    run.speculative_arms = [a for a in run.speculative_arms if a.method == "ngram"]
    assert compare_kinds(run, [], None, {}) is None
