"""The design's hypotheses on the replay (issue 12): results.json's "design".

The config's `design` names the generic drafter and, optionally, a crossover
(two tasks of one domain, one with short prompts and one with long):

- the drafter matrix is every drafter continued from the generic one on a
  single task; drafters whose recipes differ only in `seed` are seeds of one
  family. Every matrix drafter is replayed on every task's eval prompts.
- y per (drafter, prompt) = log(tau_drafter / tau_generic) at the design's K
  (the K the generic drafter's arm serves, else the smallest replayed K);
  prompts where either drafter drafted nothing are left out and counted.
- The crossover (H1) and the matrix's in-domain effect (H2) are estimated by
  analysis/design.py; the pre-registration copied into the run directory
  says which effect each hypothesis is, its direction and its smallest effect
  of interest; its SHA-256 is recorded, and each hypothesis gets a verdict
  and the minimal detectable effect at the realised n.

Only the crossover manipulates length inside one domain, so only H1 is a
length claim; across tasks, length and domain go together.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd
import yaml

from analysis import design, inference, stats, text
from analysis.replayed import prompt_trace, stratum_shares
from analysis.rundir import Drafter, RunData
from analysis.schema import ArmInfo

EFFECTS = ("crossover", "matrix.in_domain")  # what a pre-registered hypothesis can name
IDENTIFIES_LENGTH = ("The within-domain crossover manipulates length inside one domain at an equal budget: its "
                     "effect (H1) is the design's length claim. Across tasks, length and domain go together, so "
                     "the matrix's length slope and every between-task comparison are not length claims.")
NO_LENGTH_DESIGN = ("This design has no within-domain length contrast (design.crossover), so it does not identify "
                    "a length effect: no length claim is made. Across tasks, length and domain go together.")


class PreregistrationError(ValueError):
    """The run's pre-registration cannot be read as one."""


# --- the drafters ------------------------------------------------------------------------------

def _family_key(drafter: Drafter) -> str:
    recipe = {k: v for k, v in sorted(drafter.recipe.items()) if k != "seed"}
    return repr((drafter.init, drafter.tasks, recipe))


def matrix_drafters(run: RunData, generic: str) -> list[dict]:
    """The matrix: replayed drafters continued from `generic` on one task, with
    their family (the first name of the drafters that differ only in seed)."""
    chosen = [d for name, d in sorted(run.drafters.items())
              if d.init == generic and isinstance(d.tasks, list) and len(d.tasks) == 1
              and name in run.replay.matches]
    families: dict[str, str] = {}
    entries = []
    for d in chosen:
        family = families.setdefault(_family_key(d), d.name)
        entries.append({"name": d.name, "task": d.tasks[0], "family": family,
                        "seed": int(d.recipe.get("seed", 0)), "max_steps": d.recipe.get("max_steps"),
                        "max_train_tokens": d.recipe.get("max_train_tokens"),
                        "batch_tokens": d.recipe.get("batch_tokens")})
    return entries


def design_k(run: RunData, generic: str) -> int:
    if run.design.get("k"):
        return int(run.design["k"])
    served = [a.num_speculative_tokens for a in run.arms if a.drafter == generic and a.num_speculative_tokens]
    return int(served[0]) if served else min(run.replay.k)


def _tau(run: RunData, drafter: str, k: int, prompt_ids: list[str]) -> pd.Series:
    """tau per prompt from the drafter's match vectors (NaN where it drafted nothing)."""
    arm = ArmInfo(name=drafter, method="draft_model", num_speculative_tokens=k, drafter=drafter)
    values = {}
    for pid in prompt_ids:
        trace = prompt_trace(run, arm, pid, k)
        values[pid] = 1 + trace.accepted_tokens / trace.drafts if trace.drafts else math.nan
    return pd.Series(values, dtype=float)


def _weights(run: RunData, prompts: pd.DataFrame) -> pd.Series:
    """Each prompt's stratum weight within its task (replayed.stratum_shares)."""
    weights = pd.Series(0.0, index=prompts.index)
    for task, rows in prompts.groupby("task"):
        share, _ = stratum_shares(run, task, rows["stratum"].value_counts())
        weights[rows.index] = rows["stratum"].map(share)
    return weights


def y_frame(run: RunData, generic: str, drafters: list[dict], k: int) -> tuple[pd.DataFrame, int]:
    """One row per (matrix drafter, eval prompt) with y, x and the labels
    design.py reads; and the count of rows left out (no drafts)."""
    prompts = run.replay.prompts[~run.replay.prompts["is_control"]]
    prompts = prompts[prompts["prompt_id"].isin(run.replay.matches[generic])].reset_index(drop=True)
    prompts["weight"] = _weights(run, prompts)
    ids = list(prompts["prompt_id"])
    tau_gen = _tau(run, generic, k, ids)
    frames, excluded = [], 0
    for entry in drafters:
        rows = prompts[prompts["prompt_id"].isin(run.replay.matches[entry["name"]])].copy()
        tau = _tau(run, entry["name"], k, list(rows["prompt_id"]))
        rows["y"] = np.log(rows["prompt_id"].map(tau) / rows["prompt_id"].map(tau_gen))
        x = inference.length_shift(rows["prompt_tokens"].to_numpy(float),
                                   inference.mixture_lengths(run.drafters, entry["name"]))
        rows["x"] = x if x is not None else math.nan
        rows = rows.assign(drafter=entry["name"], drafter_task=entry["task"], family=entry["family"],
                           seed=entry["seed"])
        excluded += int(rows["y"].isna().sum())
        frames.append(rows[rows["y"].notna()])
    columns = ["prompt_id", "task", "stratum", "weight", "prompt_tokens", "drafter", "drafter_task", "family",
               "seed", "x", "y"]
    frame = pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
    return frame, excluded


def matrix_seed_spread(frame: pd.DataFrame, seed: int) -> dict | None:
    """The in-domain effect refitted once per seed rank (each family's r-th seed, or its only one):
    how far the matrix's answer moves with the drafters' seeds; None when no family has two seeds."""
    ranks = frame.groupby("family")["seed"].unique().map(sorted)
    most = int(ranks.map(len).max()) if len(ranks) else 0
    if most < 2:
        return None
    estimates = []
    for r in range(most):
        chosen = {f: seeds[min(r, len(seeds) - 1)] for f, seeds in ranks.items()}
        part = frame[frame["seed"] == frame["family"].map(chosen)]
        estimates.append(design.matrix(part, seed)["in_domain"]["estimate"])
    values = np.array([v for v in estimates if v is not None], dtype=float)
    return {"n": int(values.size), "per_seed": [None if v is None else float(v) for v in estimates],
            "sd": float(values.std(ddof=1)) if values.size >= 2 else None,
            "range": float(np.ptp(values)) if values.size >= 2 else None,
            "compared": "the in-domain effect with each family's r-th seed (families with one seed keep it)"}


# --- the pre-registration -------------------------------------------------------------------------

def read_preregistration(raw: bytes) -> dict:
    """The parsed file; PreregistrationError names what is wrong."""
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise PreregistrationError(f"not valid YAML ({err})") from None
    hypotheses = (data or {}).get("hypotheses") if isinstance(data, dict) else None
    if not isinstance(hypotheses, list) or not hypotheses:
        raise PreregistrationError("it lists no hypotheses")
    for i, h in enumerate(hypotheses):
        where = f"hypotheses[{i}]"
        if not isinstance(h, dict):
            raise PreregistrationError(f"{where} is not a mapping")
        for key in ("id", "statement", "effect", "direction", "smallest_effect"):
            if key not in h:
                raise PreregistrationError(f"{where} lacks {key!r}")
        if h["effect"] not in EFFECTS:
            raise PreregistrationError(f"{where}.effect: {h['effect']!r} is not one of {', '.join(EFFECTS)}")
        if h["direction"] not in ("positive", "negative"):
            raise PreregistrationError(f"{where}.direction: {h['direction']!r} is not positive or negative")
    return data


def _effect(name: str, crossover: dict | None, matrix: dict | None) -> dict | None:
    if name == "crossover":
        return crossover
    return (matrix or {}).get("in_domain")


def _hypothesis(h: dict, found: dict | None, spread: dict | None) -> dict:
    estimate = None if found is None else found.get("effect", found.get("estimate"))
    ci, se, df = (None, None, None) if found is None else (found.get("ci"), found.get("se"), found.get("df"))
    mde = design.minimal_detectable_effect(se, df) if se is not None and df else None
    sesoi = float(h["smallest_effect"])
    return {"id": str(h["id"]), "statement": " ".join(str(h["statement"]).split()), "effect": h["effect"],
            "direction": h["direction"], "smallest_effect": sesoi, "estimate": estimate, "ci": ci, "se": se,
            "df": df, "ratio": None if estimate is None else math.exp(estimate),
            "ratio_ci": None if ci is None else [math.exp(b) for b in ci],
            "mde": mde, "powered": None if mde is None else bool(mde <= sesoi),
            "verdict": design.verdict(ci, h["direction"], sesoi), "seed_spread": spread}


# --- the section ---------------------------------------------------------------------------------

def compute_design(run: RunData) -> dict | None:
    """results.json's "design"; None when the config has no design or the run no replay."""
    generic = run.design.get("generic")
    if not generic or run.replay is None or generic not in run.replay.matches:
        return None
    drafters = matrix_drafters(run, generic)
    k = design_k(run, generic)
    frame, excluded = y_frame(run, generic, drafters, k)
    parent = run.drafters.get(generic)
    generic_tasks = list(parent.tasks) if parent and isinstance(parent.tasks, list) else []
    eval_tasks = sorted(frame["task"].unique()) if len(frame) else []
    section = {
        "k": k, "y": f"log(tau_drafter / tau_{generic}) per replayed eval prompt at K = {k}",
        "excluded": excluded,
        "generic": {"name": generic, "tasks": generic_tasks,
                    "eval_tasks": [{"task": t, "in_generic_mixture": t in generic_tasks} for t in eval_tasks]},
        "drafters": drafters, "crossover": None, "matrix": None, "preregistration": None, "hypotheses": [],
    }
    cross = run.design.get("crossover") or {}
    # The crossover's two tasks are one domain: a drafter fine-tuned on either is in its domain on both, and
    # the length shift x carries their difference (H2 is the in-domain gain at a matched length shift).
    domain = {cross["long"]: cross["short"]} if cross else {}
    section["domains"] = {t: domain.get(t, t) for t in eval_tasks}
    matrix_tasks = {d["task"] for d in drafters}
    in_matrix = frame[frame["task"].isin(matrix_tasks)]
    if len({d["family"] for d in drafters}) >= 2 and len(in_matrix):
        same = in_matrix["drafter_task"].map(lambda t: domain.get(t, t)) == in_matrix["task"].map(
            lambda t: domain.get(t, t))
        labelled = in_matrix.assign(in_domain=same)
        section["matrix"] = design.matrix(labelled, stats.seed_for("design", "matrix"))
        section["matrix"]["seed_spread"] = matrix_seed_spread(labelled, stats.seed_for("design", "matrix"))
    if cross:
        sides = {cross["short"]: "short", cross["long"]: "long"}
        rows = frame[frame["task"].isin(sides) & frame["drafter_task"].isin(sides)]
        if rows["drafter_task"].nunique() == 2 and rows["task"].nunique() == 2:
            rows = rows.assign(eval_set=rows["task"].map(sides), family=rows["drafter_task"].map(sides))
            section["crossover"] = {"short_task": cross["short"], "long_task": cross["long"],
                                    **design.crossover(rows)}
        else:
            section["crossover"] = {"short_task": cross["short"], "long_task": cross["long"],
                                    "missing": "the replay lacks the drafters or eval prompts of one side"}
    identified = bool(section["crossover"] and section["crossover"].get("effect") is not None)
    section["length_claim"] = IDENTIFIES_LENGTH if identified else NO_LENGTH_DESIGN
    section["identifies_length"] = identified
    if run.preregistration is not None:
        section["preregistration"] = {"file": "preregistration.yaml",
                                      "sha256": hashlib.sha256(run.preregistration).hexdigest()}
        try:
            plan = read_preregistration(run.preregistration)
        except PreregistrationError as err:
            section["preregistration"]["error"] = str(err)
        else:
            section["preregistration"].update(
                level=plan.get("level"), primary_outcome=" ".join(str(plan.get("primary_outcome", "")).split()),
                amendments=[" ".join(str(a).split()) for a in plan.get("amendments") or []])
            crossover = section["crossover"] if identified else None
            for h in plan["hypotheses"]:
                spread = (crossover or {}).get("seed_spread") if h["effect"] == "crossover" else \
                    (section["matrix"] or {}).get("seed_spread")
                section["hypotheses"].append(_hypothesis(h, _effect(h["effect"], crossover, section["matrix"]),
                                                         spread))
    return section


# --- the summary's lines -----------------------------------------------------------------------

EFFECT_NAMES = {"crossover": "within-domain length crossover, theta", "matrix.in_domain": "in-domain gain at a "
                "matched length shift, the drafter matrix"}


def summary_lines(results) -> list[str]:
    """The design's sentences: each hypothesis's verdict with its effect, and whether the design makes a
    length claim (each from results.json's design section by a stated rule)."""
    found = results.design
    if found is None:
        return []
    lines = []
    generic = found.generic
    outside = [e["task"] for e in generic["eval_tasks"] if not e["in_generic_mixture"]]
    lines.append(f"Design: {len(found.drafters)} drafters fine-tuned from {generic['name']} (trained on "
                 f"{', '.join(generic['tasks']) or 'an unrecorded mix'}"
                 + (f"; {', '.join(outside)} outside its mixture" if outside else "") + f"), replayed at K = "
                 f"{found.k} on every task.")
    if found.preregistration is None:
        lines.append("No pre-registration in this run: the design's effects are reported without verdicts.")
    elif found.preregistration.get("error"):
        lines.append(f"The pre-registration could not be read ({found.preregistration['error']}): no verdicts.")
    for h in found.hypotheses:
        if h.estimate is None:
            lines.append(f"{h.id} ({EFFECT_NAMES[h.effect]}): inconclusive, not estimable in this run.")
            continue
        power = "" if h.mde is None else (
            f"; minimal detectable effect {text.num(h.mde)}"
            + ("" if h.powered else ", larger than the smallest effect of interest: underpowered"))
        spread = h.seed_spread or {}
        seeds = (f"; between-seed sd {text.num(spread.get('sd'))} over {spread.get('n')} seeds"
                 if spread.get("n", 0) >= 2 else "")
        lines.append(f"{h.id} ({EFFECT_NAMES[h.effect]}): {h.verdict} (pre-registered, {h.direction} predicted): "
                     f"{text.with_ci(h.estimate, h.ci)} on the log scale, τ ratio {text.with_ci(h.ratio, h.ratio_ci)}; "
                     f"smallest effect of interest {text.num(h.smallest_effect)}{power}{seeds}.")
    lines.append(found.length_claim)
    return lines
