"""The primary model of issue 12 on the replay: per prompt y = log(tau_ft / tau_gen)
against a continuous length shift x, a mixed model, a task-level permutation
test and the within-task slope (results.json's replay["inference"]).

- x, the length shift of a prompt against the fine-tuned drafter's full
  training mixture (its own training prompts and those of every drafter it
  was continued from, Drafter.lengths["prompt"]): |log(prompt tokens) - m| / s,
  with m and s the mean and sd of the mixture's log prompt lengths. 0 is a
  prompt of the mixture's typical length, 1 one sd away on the log scale.
- The mixed model (statsmodels mixedlm, REML): y ~ x, a random intercept per
  task and a variance component for the length stratum within the task. When
  that fit fails (no convergence, a singular or non-finite fit) the stratum
  component is dropped; when that fails too, or with fewer than 3 tasks (a
  task variance cannot be estimated), ordinary least squares with task fixed
  effects stands in, and `model` / `fallback` say so. The slope's interval is
  Wald with a t quantile whose degrees of freedom are the cells (task x
  stratum, or tasks without the stratum component) less the fixed effects:
  x varies mostly between cells, and the z interval of a mixed model with a
  handful of cells is too narrow (tests/test_inference.py measures the
  false-positive rate).
- The within-task slope: y ~ x + task fixed effects, a random intercept per
  (task, stratum) cell; the between-task variation of x is absorbed, so this
  is the only slope that is not confounded with the task (domain).
- The task-level permutation test of the between-task claim: the statistic is
  the least-squares slope of the tasks' mean y on their mean x; the tasks'
  mean x are permuted across tasks (every distinct permutation when there are
  at most EXACT_LIMIT, else PERMUTATIONS seeded draws), two-sided p = share of
  permutations whose |slope| >= the observed. With T tasks the smallest
  attainable p is 1 / (distinct permutations) (1/T! without ties): with 3
  tasks 1/6, so the test cannot reach 0.05 below 4 tasks, and the result says
  so.

With one fine-tuned drafter, the tasks' mean x and their domain are the same
contrast (the fine-tuning task is the one nearest its mixture): the mixed
model's slope and the permutation test read length and domain together. Only
the within-task slope speaks to length, and only weakly (its x range inside
one task is one or two strata). A length manipulation inside one domain is
the design that separates them (issue 12).
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats as sps

from analysis import stats

EXACT_LIMIT = 40320  # 8!: enumerate every permutation up to 8 tasks
PERMUTATIONS = 9999  # seeded draws beyond that
# statsmodels optimisers, tried in turn (lbfgs alone lands on odd boundary fits). The derivative-free
# two come last: with a variance near its boundary, the gradient methods can fail to converge where they
# reach the optimum (seen on an AVX2-only CPU, whose floating-point path differs).
OPTIMISERS = ("bfgs", "lbfgs", "powell", "nm")
MIN_TASKS_MIXED = 3  # fewer: no task variance component
ALPHA = 1 - stats.LEVEL
COVARIATE = ("|log(prompt tokens) - mean log prompt length of the drafter's training mixture| / sd of the "
             "mixture's log prompt lengths; the mixture is the fine-tuned drafter's training split and that of "
             "every drafter it was continued from")
CONFOUNDED = ("With one fine-tuned drafter, length and domain are confounded across tasks: the task nearest the "
              "drafter's training mixture in length is also its fine-tuning domain, so the mixed model's slope "
              "and the task-level permutation test read length and domain together. Only the within-task slope "
              "speaks to length, and only weakly (x varies little inside one task). A length manipulation "
              "within one domain is the design that separates them (issue 12).")


# --- the covariate ------------------------------------------------------------------

def mixture_lengths(drafters: dict, name: str) -> list[int]:
    """Training prompt lengths of drafter `name` and of every drafter it was
    continued from (its init chain, as far as the run knows the drafters)."""
    lengths, seen = [], set()
    while name in drafters and name not in seen:
        seen.add(name)
        lengths += list(drafters[name].lengths.get("prompt") or [])
        name = drafters[name].init
    return lengths


def length_shift(prompt_tokens, mixture) -> np.ndarray | None:
    """|log n - m| / s per prompt (m, s: mean and sd of the mixture's log lengths);
    None without at least 2 distinct mixture lengths."""
    mixture = np.log(np.asarray([v for v in mixture if v and v > 0], dtype=float))
    if mixture.size < 2 or np.ptp(mixture) == 0:
        return None
    logs = np.log(np.maximum(np.asarray(prompt_tokens, dtype=float), 1.0))
    return np.abs(logs - mixture.mean()) / mixture.std(ddof=1)


# --- fits ---------------------------------------------------------------------------------

def _t_interval(value: float, se: float, df: float) -> list[float] | None:
    if not (math.isfinite(value) and math.isfinite(se)) or df < 1:
        return None
    return stats.t_interval(value, se, df)


def _estimate(model: str, value: float, se: float, df: float, n: int, fallback: str | None = None,
              **extra) -> dict:
    ci = _t_interval(value, se, df)
    p = float(2 * sps.t.sf(abs(value / se), df)) if ci and se > 0 else None
    return {"model": model, "n": n, "slope": float(value) if math.isfinite(value) else None,
            "se": float(se) if math.isfinite(se) else None,
            "df": float(df), "ci": ci, "p": p, "excludes_zero": bool(stats.excludes(ci, 0)),
            "fallback": fallback, **extra}


def _none(model: str, n: int, why: str) -> dict:
    return {"model": model, "n": n, "slope": None, "se": None, "df": None, "ci": None, "p": None,
            "excludes_zero": False, "fallback": why}


def _ols(frame: pd.DataFrame, fixed_tasks: bool, fallback: str | None) -> dict:
    """OLS y ~ x (+ task fixed effects), classical se, residual df."""
    design = _design(frame, fixed_tasks)
    y = frame["y"].to_numpy(float)
    df = len(frame) - design.shape[1]
    model = "ols: y ~ x" + (" + task fixed effects" if fixed_tasks else "")
    if df < 1 or np.linalg.matrix_rank(design) < design.shape[1]:
        return _none(model, len(frame), (fallback + "; " if fallback else "") + "too few prompts or no x variation")
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ beta
    cov = np.linalg.inv(design.T @ design) * float(resid @ resid) / df
    return _estimate(model, float(beta[1]), math.sqrt(max(cov[1, 1], 0.0)), df, len(frame), fallback)


def fit_mixedlm(formula: str, frame: pd.DataFrame, groups: str, vc: dict | None, effect: str = "x"):
    """A REML mixedlm fit (the first of OPTIMISERS that converges), or None
    when it fails: every optimiser raised or did not converge, or the
    coefficient `effect` is not finite. A variance at its boundary (0) is a fit, not a failure (REML
    puts a small variance there)."""
    with warnings.catch_warnings():
        # Boundary fits warn (singular covariance, Hessian not positive definite); the slope's se
        # (gls_se) does not use the Hessian.
        warnings.simplefilter("ignore")
        try:
            model = smf.mixedlm(formula, frame, groups=frame[groups], re_formula="1", vc_formula=vc)
        except (ValueError, np.linalg.LinAlgError):
            return None
        for method in OPTIMISERS:
            try:
                result = model.fit(reml=True, method=[method])
            except (ValueError, np.linalg.LinAlgError, ZeroDivisionError):
                continue
            if (result.converged and np.isfinite(result.params[effect]) and np.isfinite(result.scale)
                    and np.isfinite(result.llf)):
                return result
    return None


def gls_se(exog: np.ndarray, groups: np.ndarray, scale: float,
           components: list[tuple[float, np.ndarray]]) -> np.ndarray:
    """se of every fixed effect by GLS at the fitted variances: cov = (X' V^-1 X)^-1, V = scale I +
    sum_c var_c Z_c Z_c' (Z_c: indicators of codes_c, every component nested in the group), summed
    group by group (V is block diagonal). Not the Hessian: at a boundary variance (0) statsmodels'
    Hessian is singular."""
    information = np.zeros((exog.shape[1], exog.shape[1]))
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for rows in np.split(order, bounds):
        v = np.eye(rows.size) * scale
        for variance, codes in components:
            mine = codes[rows]
            v += max(variance, 0.0) * (mine[:, None] == mine[None, :])
        x = exog[rows]
        information += x.T @ np.linalg.solve(v, x)
    return np.sqrt(np.maximum(np.diag(np.linalg.pinv(information)), 0.0))


def _slope_se(frame: pd.DataFrame, design: np.ndarray, scale: float,
              components: list[tuple[float, np.ndarray]]) -> float:
    """gls_se of x's coefficient (column 1), grouped by task."""
    return float(gls_se(design, pd.factorize(frame["task"], sort=True)[0], scale, components)[1])


def _design(frame: pd.DataFrame, fixed_tasks: bool) -> np.ndarray:
    tasks = pd.factorize(frame["task"], sort=True)[0]
    columns = [np.ones(len(frame)), frame["x"].to_numpy(float)]
    if fixed_tasks:
        columns += [(tasks == t).astype(float) for t in range(1, tasks.max() + 1)]
    return np.column_stack(columns)


def _cells(frame: pd.DataFrame) -> pd.Series:
    return frame["task"].astype(str) + "|" + frame["stratum"].astype(str)


def mixed_slope(frame: pd.DataFrame) -> dict:
    """The primary model: y ~ x, task random intercept, stratum-within-task variance component."""
    frame = frame.assign(cell=_cells(frame).to_numpy())
    n, tasks, cells = len(frame), frame["task"].nunique(), frame["cell"].nunique()
    if tasks < MIN_TASKS_MIXED:
        return _ols(frame, tasks > 1, f"fewer than {MIN_TASKS_MIXED} tasks: no task variance component")
    if frame["x"].nunique() < 2:
        return _none("mixedlm", n, "x does not vary")
    task_codes = pd.factorize(frame["task"], sort=True)[0]
    cell_codes = pd.factorize(frame["cell"], sort=True)[0]
    design = _design(frame, False)
    why = None
    if cells > tasks:
        result = fit_mixedlm("y ~ x", frame, "task", {"stratum": "0 + C(stratum)"})
        if result is not None:
            task_var, stratum_var = float(result.cov_re.iloc[0, 0]), float(result.vcomp[0])
            se = _slope_se(frame, design, float(result.scale), [(task_var, task_codes), (stratum_var, cell_codes)])
            return _estimate("mixedlm: y ~ x, task random intercept, stratum-within-task variance component",
                             float(result.params["x"]), se, max(1, cells - 2), n, task_variance=task_var,
                             stratum_variance=stratum_var, residual_variance=float(result.scale))
        why = "the stratum-within-task component did not fit: dropped"
    result = fit_mixedlm("y ~ x", frame, "task", None)
    if result is not None:
        task_var = float(result.cov_re.iloc[0, 0])
        se = _slope_se(frame, design, float(result.scale), [(task_var, task_codes)])
        return _estimate("mixedlm: y ~ x, task random intercept", float(result.params["x"]), se,
                         max(1, tasks - 2), n, why, task_variance=task_var, stratum_variance=None,
                         residual_variance=float(result.scale))
    return _ols(frame, True, (why + "; " if why else "") + "the mixed model did not fit")


def within_slope(frame: pd.DataFrame) -> dict:
    """y ~ x + task fixed effects, random intercept per (task, stratum) cell."""
    frame = frame.assign(cell=_cells(frame).to_numpy())
    n, tasks, cells = len(frame), frame["task"].nunique(), frame["cell"].nunique()
    centred = frame["x"] - frame.groupby("task")["x"].transform("mean")
    if not (centred.abs() > 1e-12).any():
        return _none("within-task", n, "x does not vary within any task")
    if cells - tasks >= 2:
        result = fit_mixedlm("y ~ x + C(task)" if tasks > 1 else "y ~ x", frame, "cell", None)
        if result is not None:
            cell_var = float(result.cov_re.iloc[0, 0])
            se = _slope_se(frame, _design(frame, tasks > 1), float(result.scale),
                         [(cell_var, pd.factorize(frame["cell"], sort=True)[0])])
            return _estimate("mixedlm: y ~ x + task fixed effects, random intercept per (task, stratum) cell",
                             float(result.params["x"]), se, max(1, cells - tasks - 1), n, cell_variance=cell_var,
                             residual_variance=float(result.scale))
        why = "the cell random intercept did not fit"
    else:
        why = "fewer than 2 strata beyond one per task: no cell variance component"
    return _ols(frame, tasks > 1, why)


# --- the task-level permutation test ---------------------------------------------------------

def _distinct_permutations(values: np.ndarray) -> int:
    _, counts = np.unique(values, return_counts=True)
    return math.factorial(values.size) // math.prod(math.factorial(int(c)) for c in counts)


def permutation_test(frame: pd.DataFrame, seed: int) -> dict:
    """Slope of the tasks' mean y on their mean x, p by permuting the mean x across tasks."""
    means = frame.groupby("task", sort=True)[["x", "y"]].mean()
    t = len(means)
    base = {"tasks": t, "statistic": "least-squares slope of task mean y on task mean x", "slope": None, "p": None,
            "permutations": 0, "exact": None, "min_p": None, "can_reach_alpha": False}
    if t < 2 or means["x"].nunique() < 2:
        return {**base, "note": "fewer than 2 tasks with distinct mean x: no test"}
    x, y = means["x"].to_numpy(float), means["y"].to_numpy(float)
    observed = float(stats.ols_slope(x, y))
    distinct = _distinct_permutations(x)
    if math.factorial(t) <= EXACT_LIMIT:
        order = np.array(list(itertools.permutations(range(t))))
        exact = True
    else:
        rng = np.random.default_rng(seed)
        order = np.vstack([np.arange(t), np.argsort(rng.random((PERMUTATIONS, t)), axis=1)])
        exact = False
    slopes = stats.ols_slope(x[order], np.broadcast_to(y, order.shape))
    p = float(np.mean(np.abs(slopes) >= abs(observed) * (1 - 1e-9)))
    min_p = 1 / distinct if exact else 1 / (PERMUTATIONS + 1)
    note = (f"with {t} tasks the smallest attainable p is {min_p:.3g}" +
            ("" if min_p <= ALPHA else f": this test cannot reach {ALPHA:g}"))
    return {**base, "slope": observed, "p": p, "permutations": int(order.shape[0]), "exact": exact,
            "min_p": min_p, "can_reach_alpha": min_p <= ALPHA, "note": note}


# --- on the replay ------------------------------------------------------------------------------

def analyse(frame: pd.DataFrame, seed: int) -> dict:
    """Every fit on one frame of y, x, task, stratum (one row per prompt)."""
    frame = frame.dropna(subset=["y", "x"]).sort_values(["task", "stratum", "prompt_id"]).reset_index(drop=True)
    return {"n": len(frame), "tasks": int(frame["task"].nunique()),
            "cells": int(_cells(frame).nunique()) if len(frame) else 0,
            "mixed": mixed_slope(frame) if len(frame) else _none("mixedlm", 0, "no prompts"),
            "within_task": within_slope(frame) if len(frame) else _none("within-task", 0, "no prompts"),
            "permutation": permutation_test(frame, seed)}


def replay_inference(run, pairs: list[tuple[str, str, str, int, pd.DataFrame]]) -> dict:
    """replay["inference"]: per (fine-tuned arm, generic arm, drafter, served K, y frame)
    the mixed model, the within-task slope and the permutation test. Controls are left out
    (their domain is their source task's, their lengths another's)."""
    lengths = run.replay.prompts.set_index("prompt_id")["prompt_tokens"]
    entries = []
    for ft, gen, drafter, k, frame in pairs:
        mixture = mixture_lengths(run.drafters, drafter)
        frame = frame[~frame["is_control"]].copy()
        x = length_shift(frame["prompt_id"].map(lengths).to_numpy(float), mixture)
        logs = np.log([v for v in mixture if v and v > 0])
        entry = {"finetuned_arm": ft, "generic_arm": gen, "drafter": drafter, "k": k,
                 "mixture_prompts": len(mixture), "mixture_log_mean": float(logs.mean()) if logs.size else None,
                 "mixture_log_sd": float(logs.std(ddof=1)) if logs.size > 1 else None}
        if x is None:
            entry.update(missing="no training prompt lengths for this drafter (no drafter card): no covariate")
            entries.append(entry)
            continue
        frame["x"] = x
        entry.update(analyse(frame[["prompt_id", "task", "stratum", "y", "x"]], stats.seed_for("inference", ft)))
        entries.append(entry)
    return {"y": "y = log(tau_ft / tau_gen) per prompt at the served K (the replay); controls left out",
            "covariate": COVARIATE, "confounded": CONFOUNDED, "level": stats.LEVEL, "pairs": entries}
