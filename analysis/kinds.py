"""Drafter kinds compared (issue 16): draft models beside EAGLE-3 heads.

Both kinds are judged by the same rules elsewhere (replayed tau, served
TPOT speed-up, the cost model's r); this part sets them side by side with
each drafter's build time, steps and vocabulary from its card, and compares their step
cost directly: for every pair of arms of different kinds, the ratio of their
r on the prompts both were served (r_a / r_b per prompt, its geometric mean
with a bootstrap interval). At equal tau that ratio is the whole difference
in speed-up, so it is the figure that tells the kinds apart.
"""

from __future__ import annotations

import itertools

import pandas as pd

from analysis import stats
from analysis.cells import ALL
from analysis.rundir import RunData, select
from core.config import DRAFTER_KINDS

KIND_NAMES = {"draft_model": "draft model", "eagle3": "EAGLE-3 head"}


def _per_prompt(frame: pd.DataFrame) -> pd.Series:
    """log r per prompt over every task but the controls (a prompt served twice: its mean)."""
    return select(frame, None, ALL, ALL).groupby("prompt_id")["log_r"].mean()


def _drafter_row(run: RunData, arm, acceptance_rows: list[dict], cost_arms: dict) -> dict:
    drafter = run.drafters.get(arm.drafter)
    replayed = next((r for r in acceptance_rows if r["arm"] == arm.name and r["served"] and r["task"] == ALL
                     and r["stratum"] == ALL), None)
    cost = cost_arms.get(arm.name) or {}
    build = drafter.build_seconds if drafter else {}
    return {
        "arm": arm.name, "kind": arm.method, "drafter": arm.drafter, "k": arm.num_speculative_tokens,
        "init": drafter.init if drafter else None,
        "tau": replayed["tau"] if replayed else None, "tau_ci": replayed["tau_ci"] if replayed else None,
        "tokens_per_step": replayed["tokens_per_step"] if replayed else None,
        "served_speedup": cost.get("speedup"), "r": cost.get("r"), "c": cost.get("c"),
        "build_minutes": build["total"] / 60 if build.get("total") is not None else None,
        "training_steps": drafter.training_steps if drafter else None,
        "vocabulary": drafter.vocabulary if drafter else None,
    }


def compare_kinds(run: RunData, acceptance_rows: list[dict], cost_model: dict | None,
                  log_r: dict[str, pd.DataFrame]) -> dict | None:
    """results.json's replay["kinds"]: a row per drafter arm, and the step-cost ratio of every pair of
    arms of different kinds; None when the run has no drafter arm. `log_r`: the cost model's per-request
    frames (replayed._log_r) per arm."""
    arms = [a for a in run.speculative_arms if a.method in DRAFTER_KINDS and a.drafter]
    if not arms:
        return None
    cost_arms = (cost_model or {}).get("arms", {})
    rows = [_drafter_row(run, arm, acceptance_rows, cost_arms) for arm in arms]
    ratios = []
    order = list(DRAFTER_KINDS)
    for a, b in itertools.combinations(sorted(arms, key=lambda x: -order.index(x.method)), 2):
        if a.method == b.method or a.name not in log_r or b.name not in log_r:
            continue
        both = pd.concat([_per_prompt(log_r[a.name]).rename("a"), _per_prompt(log_r[b.name]).rename("b")],
                         axis=1, join="inner").sort_index()
        estimate = stats.geometric_mean((both["a"] - both["b"]).to_numpy(),
                                        stats.seed_for("kinds-r", a.name, b.name))
        ratios.append({"arm": a.name, "kind": a.method, "reference": b.name, "reference_kind": b.method,
                       "r_ratio": estimate})
    return {
        "kinds": sorted({a.method for a in arms}, key=order.index),
        "rows": rows,
        "ratios": ratios,
        "definition": "r ratio = r(arm) / r(reference) per prompt served by both in the sequential regime "
                      "(every task but the controls), geometric mean over prompts with a bootstrap 95% interval: "
                      "a speculative step of the arm in steps of the reference's; < 1: the arm's step is cheaper",
    }
