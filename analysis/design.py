"""The designs that separate length from domain (issue 12): the 2x2 length
crossover within one domain (H1), the drafter x task matrix (H2), and the
power and verdict helpers that plan and read them.

Everything is on y = log(tau_drafter / tau_generic) per replayed prompt (tau =
1 + accepted / drafts at the served K, from the acceptance replay); a larger y
is a larger gain of the fine-tuned drafter over the generic one.

- `crossover` (H1): two drafter families fine-tuned on one domain, one on short
  prompts, one on long (same budget, >= 1 seeds each), replayed on short and
  long eval prompts. theta = 1/2 [(Y_S,short - Y_L,short) + (Y_L,long -
  Y_S,long)], the 2x2 interaction on the log scale: > 0 when a drafter gains
  more on prompts of the length it was fine-tuned on (H1). The primary
  estimate works on each prompt's contrast c_p = y_matched - y_mismatched
  (seeds averaged), in which the generic drafter and the prompt's difficulty
  cancel; each eval set's c is post-stratified (stats.stratified_mean's
  computation), the two sets' halves are added, the interval is t with
  Welch-Satterthwaite df. A mixed model (y ~ C(family) * C(eval_set), prompt
  random intercept, seed-within-prompt component) is reported beside it.
  Both read the drafters as trained: a seed's own gain on one eval set (a
  drafter-level effect shared by all the set's prompts) is not prompt noise,
  and `seed_spread` shows how far single-seed estimates disagree.
- `matrix` (H2): every fine-tuned drafter on every task; the in-domain
  coefficient of y ~ in_domain + x + C(drafter) + C(task), fitted by least
  squares on the (drafter, task) cell means, is the diagonal's gain at a
  fixed length shift x: in_domain varies only between cells, and each cell
  has its own gain, so the cells are the units (a prompt-level mixed model,
  reported beside it, assumes no cell gain and is too narrow when there is
  one); and an exact task-level permutation test of the double-centred
  diagonal of the cell means.
- `minimal_detectable_effect`, `planned_n`, `verdict`: power and the reading
  of an interval against the smallest effect of interest.

Every function is pure (pandas / numpy in, JSON-able dicts out) and seeded.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats as sps
from statsmodels.stats.power import TTestPower

from analysis import stats
from analysis.inference import EXACT_LIMIT, PERMUTATIONS, fit_mixedlm, gls_se

ALPHA = 1 - stats.LEVEL
SETS = ("short", "long")  # eval sets and drafter families of the crossover
CROSSOVER_METHOD = (
    "theta = 1/2 [(Y_S,short - Y_L,short) + (Y_L,long - Y_S,long)] on y = log(tau_drafter / tau_generic): per prompt "
    "c = y(matched family) - y(mismatched family), seeds averaged; each eval set's c post-stratified to its natural "
    "stratum shares; theta = the mean of the two sets' estimates, t interval with Welch-Satterthwaite df; exp(theta) "
    "is the ratio of tau_matched / tau_mismatched (each against the generic drafter).")
MATRIX_METHOD = ("least squares on the (drafter, task) cell means (post-stratified mean y, mean x): y ~ in_domain + x "
                 "+ C(drafter) + C(task), t interval with df = cells - parameters (in_domain varies between cells "
                 "only, and each cell has its own gain)")
PROMPT_MODEL = ("check: mixedlm (REML) on prompts, y ~ in_domain + x + C(drafter) + C(task), random intercept per "
                "prompt, GLS se, df = cells - parameters; it assumes no cell-level gain, so its interval is narrower")
SLOPE_NOTE = ("x's slope is read across domains as well as within them: the drafter and task effects absorb the "
              "domains' levels, but not a domain-specific length effect")


# --- small helpers --------------------------------------------------------------------------------------

def _float(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _exp(ci: list[float] | None) -> list[float] | None:
    return [math.exp(ci[0]), math.exp(ci[1])] if ci else None


def _t_result(value: float, se: float | None, df: float | None) -> dict:
    """estimate, se, df, ci, p and their exp, for one t-based estimate."""
    ok = se is not None and df is not None and math.isfinite(value) and math.isfinite(se) and df >= 1
    ci = stats.t_interval(value, se, df) if ok else None
    p = float(2 * sps.t.sf(abs(value / se), df)) if ok and se > 0 else None
    return {"estimate": _float(value), "se": _float(se) if ok else None, "df": float(df) if ok else None,
            "ci": [float(ci[0]), float(ci[1])] if ci else None, "p": p,
            "ratio": math.exp(value) if math.isfinite(value) else None, "ratio_ci": _exp(ci)}


def _groups(values: pd.Series, info: pd.DataFrame) -> list[tuple[float, np.ndarray]]:
    """(stratum share, values) per stratum, strata in sorted order (stratified_mean's input)."""
    frame = info.loc[values.index].assign(value=values.to_numpy(float))
    return [(float(part["weight"].iloc[0]), part["value"].to_numpy(float))
            for _, part in frame.groupby("stratum", sort=True)]


def _clean(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    kept = frame.dropna(subset=["y"])
    return kept.reset_index(drop=True), int(len(frame) - len(kept))


# --- H1: the 2x2 length crossover ------------------------------------------------------------------------

def _set_groups(values: np.ndarray, strata: np.ndarray, weights: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """stratified_mean's (share, values) per stratum, strata in sorted order, from per-prompt arrays."""
    return [(float(weights[strata == s][0]), values[strata == s]) for s in np.unique(strata)]


def crossover_effect(frame: pd.DataFrame) -> dict:
    """The primary estimate of theta on a frame without NaN y (crossover's input columns)."""
    codes, prompts = pd.factorize(frame["prompt_id"], sort=True)
    first = np.unique(codes, return_index=True)[1]  # each prompt's first row: its eval set, stratum, weight
    eval_set = frame["eval_set"].to_numpy()[first]
    strata = frame["stratum"].astype(str).to_numpy()[first]
    weights = frame["weight"].to_numpy(float)[first]
    y, family = frame["y"].to_numpy(float), frame["family"].to_numpy()
    means = {}
    for name in SETS:  # each family's y per prompt, its seeds averaged (NaN where it has no row)
        mine = family == name
        with np.errstate(invalid="ignore", divide="ignore"):
            means[name] = (np.bincount(codes[mine], y[mine], minlength=prompts.size)
                           / np.bincount(codes[mine], minlength=prompts.size))
    contrast = np.where(eval_set == "short", means["short"] - means["long"], means["long"] - means["short"])
    paired = np.isfinite(contrast)
    unpaired = int((~paired).sum())
    per_set, set_means, variances, dfs = {}, [], [], []
    for name in SETS:
        mine = paired & (eval_set == name)
        mean, variance, df = stats.stratified_parts(_set_groups(contrast[mine], strata[mine], weights[mine]))
        per_set[name] = {"n": int(mine.sum()), "effect": mean,
                         "ci": stats.t_interval(mean, math.sqrt(variance), df) if df else None}
        set_means.append(mean), variances.append(variance), dfs.append(df)
    n_prompts = {name: per_set[name]["n"] for name in SETS}
    if None in set_means:
        return {**_t_result(math.nan, None, None), "effect": None, "n_prompts": n_prompts, "unpaired": unpaired,
                "per_set": per_set, "note": "an eval set has no prompt with both families"}
    theta = 0.5 * (set_means[0] + set_means[1])
    if None in variances:
        result = _t_result(theta, None, None)
    elif sum(variances) == 0:
        result = {**_t_result(theta, None, None), "se": 0.0, "ci": [theta, theta], "ratio_ci": _exp([theta, theta])}
    else:
        variance = 0.25 * sum(variances)
        # Welch-Satterthwaite over the two sets (the same as over all their strata's parts).
        df = variance ** 2 / sum((0.25 * v) ** 2 / d for v, d in zip(variances, dfs) if v > 0)
        result = _t_result(theta, math.sqrt(variance), df)
    return {**result, "effect": result["estimate"], "n_prompts": n_prompts, "unpaired": unpaired,
            "per_set": per_set}


def _seed_index(frame: pd.DataFrame) -> pd.Series:
    """The rank of a drafter's seed within its family: families' seeds are paired by sorted order."""
    ranks = {}
    for family, part in frame.groupby("family"):
        ranks.update({(family, s): i for i, s in enumerate(sorted(part["seed"].unique()))})
    return pd.Series([ranks[(f, s)] for f, s in zip(frame["family"], frame["seed"])], index=frame.index)


def crossover_model(frame: pd.DataFrame) -> dict:
    """mixedlm (REML) y ~ C(family) * C(eval_set), prompt random intercept, a seed-within-prompt
    variance component with >= 2 seeds in each family; theta = the interaction / 2."""
    n = int(frame["prompt_id"].nunique())
    formula = "y ~ C(family) * C(eval_set)"
    base = {"formula": formula, "n": n, "effect": None, "se": None, "df": None, "ci": None, "p": None,
            "ratio": None, "ratio_ci": None, "seed_component": False, "fallback": None}
    if frame.groupby(["family", "eval_set"]).ngroups < 4 or n - 4 < 1:
        return {**base, "fallback": "not every (family, eval_set) cell has prompts, or too few prompts: no fit"}
    # Treatment coding, reference level "long" for both factors: cells long/long = a, short-family/long = a + b,
    # long-family/short = a + c, short/short = a + b + c + d, so theta = 1/2 [(b + d) + (-b)] = d / 2. The
    # interaction column is the product of the two dummies; it is named x, the coefficient inference.fit_mixedlm checks by default.
    data = frame.assign(x=((frame["family"] == "short") & (frame["eval_set"] == "short")).astype(float),
                        seed_index=_seed_index(frame).to_numpy())
    fit_formula = "y ~ C(family) + C(eval_set) + x"
    with_seed = bool(data.groupby("family")["seed_index"].nunique().min() >= 2)
    why = None
    result = fit_mixedlm(fit_formula, data, "prompt_id", {"seed": "0 + C(seed_index)"}) if with_seed else None
    if with_seed and result is None:
        why, with_seed = "the seed-within-prompt component did not fit: dropped", False
    if result is None:
        result = fit_mixedlm(fit_formula, data, "prompt_id", None)
    if result is None:
        return {**base, "fallback": (why + "; " if why else "") + "the mixed model did not fit"}
    groups = pd.factorize(data["prompt_id"], sort=True)[0]
    components = [(float(result.cov_re.iloc[0, 0]), groups)]
    if with_seed:
        cells = pd.factorize(data["prompt_id"].astype(str) + "|" + data["seed_index"].astype(str))[0]
        components.append((float(result.vcomp[0]), cells))
    exog = np.asarray(result.model.exog)
    se = gls_se(exog, groups, float(result.scale), components)[list(result.model.exog_names).index("x")]
    estimate = _t_result(0.5 * float(result.params["x"]), 0.5 * float(se), n - 4)
    return {**base, **estimate, "effect": estimate["estimate"], "seed_component": with_seed, "fallback": why,
            "prompt_variance": components[0][0],
            "seed_variance": components[1][0] if with_seed else None, "residual_variance": float(result.scale)}


def _stratified_cells(frame: pd.DataFrame, column: str) -> list[tuple[str, str, pd.DataFrame, dict]]:
    """Per (family, `column`): its rows and its post-stratified mean y (seeds averaged) with the t interval."""
    info = frame.groupby("prompt_id", sort=True)[["stratum", "weight"]].first()
    cells = []
    for (family, other), part in frame.groupby(["family", column], sort=True):
        y = part.groupby("prompt_id", sort=True)["y"].mean()
        mean, ci = stats.stratified_mean(_groups(y, info))
        cells.append((str(family), str(other), part, {"n": int(y.size), "mean": mean, "ci": ci,
                                                      "ratio": math.exp(mean), "ratio_ci": _exp(ci)}))
    return cells


def _cells_crossover(frame: pd.DataFrame) -> list[dict]:
    return [{"family": f, "eval_set": e, **figures} for f, e, _, figures in _stratified_cells(frame, "eval_set")]


def crossover(frame: pd.DataFrame) -> dict:
    """H1 on the 2x2 crossover (module docstring): the primary theta, the mixed model beside it,
    theta per seed and their spread, and the four cells."""
    frame, excluded = _clean(frame)
    primary = crossover_effect(frame)
    # Per seed: the i-th seed of one family against the i-th of the other (sorted order).
    seeds = {f: sorted(frame.loc[frame["family"] == f, "seed"].unique()) for f in SETS}
    per_seed = []
    for i in range(min(len(seeds["short"]), len(seeds["long"]))):
        pair = {"short": int(seeds["short"][i]), "long": int(seeds["long"][i])}
        mine = frame[((frame["family"] == "short") & (frame["seed"] == pair["short"]))
                     | ((frame["family"] == "long") & (frame["seed"] == pair["long"]))]
        one = crossover_effect(mine)
        per_seed.append({"seeds": pair, "effect": one["effect"], "ci": one["ci"], "se": one["se"]})
    thetas = np.array([s["effect"] for s in per_seed if s["effect"] is not None], dtype=float)
    half = (primary["ci"][1] - primary["ci"][0]) / 2 if primary["ci"] else None
    sd = float(thetas.std(ddof=1)) if thetas.size >= 2 else None
    spread = {"n": int(thetas.size), "sd": sd, "range": float(np.ptp(thetas)) if thetas.size >= 2 else None,
              "half_width": half, "exceeds_half_width": bool(sd is not None and half is not None and sd > half),
              "compared": "sd of theta per seed against the primary interval's half-width"}
    return {"effect": primary["effect"], "ci": primary["ci"], "se": primary["se"], "df": primary["df"],
            "p": primary["p"], "ratio": primary["ratio"], "ratio_ci": primary["ratio_ci"],
            "n_prompts": primary["n_prompts"], "excluded": excluded, "unpaired": primary["unpaired"],
            "per_set": primary["per_set"], "model": crossover_model(frame), "per_seed": per_seed,
            "seed_spread": spread, "cells": _cells_crossover(frame), "level": stats.LEVEL,
            "method": CROSSOVER_METHOD}


# --- H2: the drafter x task matrix -------------------------------------------------------------------------

def _matrix_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (drafter, task): the post-stratified mean y, the mean x, in_domain."""
    info = frame.groupby("prompt_id", sort=True)[["stratum", "weight"]].first()
    rows = []
    for (drafter, task), part in frame.groupby(["drafter", "task"], sort=True):
        y = part.groupby("prompt_id", sort=True)["y"].mean()
        mean, _, _ = stats.stratified_parts(_groups(y, info))
        rows.append({"drafter": drafter, "task": task, "y": mean, "x": float(part["x"].mean()),
                     "in_domain": float(bool(part["in_domain"].iloc[0]))})
    return pd.DataFrame(rows)


def _matrix_model(frame: pd.DataFrame) -> tuple[dict, dict, str, str | None, dict]:
    """in_domain and x coefficients of the cell-means least squares (primary), and the prompt-level
    mixed model beside it. in_domain varies only between (drafter, task) cells, and each cell has
    its own gain beyond the main effects: a prompt-level model reads that cell noise as signal
    (false-positive rate 0.17 at a cell sd of 0.05, tests/test_design.py), the cells do not."""
    formula = "y ~ in_domain + x + C(drafter) + C(task)"
    cells = _matrix_cells(frame)
    empty = _t_result(math.nan, None, None)
    try:
        fit = smf.ols(formula, cells).fit()
        df = float(fit.df_resid)
        if df < 1 or not np.isfinite(fit.bse[["in_domain", "x"]]).all():
            raise ValueError("no residual degrees of freedom")
        out = [_t_result(float(fit.params[k]), float(fit.bse[k]), df) for k in ("in_domain", "x")]
        model, fallback = MATRIX_METHOD, None
    except (ValueError, KeyError, np.linalg.LinAlgError) as err:
        out, model, fallback = [empty, empty], MATRIX_METHOD, f"the cell-means fit failed ({err})"
    data = frame.assign(in_domain=frame["in_domain"].astype(float))
    n_cells = len(cells)
    result = fit_mixedlm(formula, data, "prompt_id", None)
    if result is None:
        check = {"model": PROMPT_MODEL, "fallback": "the mixed model did not fit", **empty}
    else:
        names = list(result.model.exog_names)
        groups = pd.factorize(data["prompt_id"], sort=True)[0]
        se = gls_se(np.asarray(result.model.exog), groups, float(result.scale),
                     [(float(result.cov_re.iloc[0, 0]), groups)])
        check = {"model": PROMPT_MODEL, "fallback": None,
                 **_t_result(float(result.params["in_domain"]), float(se[names.index("in_domain")]),
                             n_cells - len(names))}
    return out[0], out[1], model, fallback, check


def _cell_means(frame: pd.DataFrame) -> list[dict]:
    return [{"family": f, "task": t, **figures, "mean_x": float(part["x"].mean()),
             "in_domain": bool(part["in_domain"].iloc[0])} for f, t, part, figures in _stratified_cells(frame, "task")]


def diagonal_permutation(cells: list[dict], own_task: dict, seed: int) -> dict:
    """Permutation test of the double-centred diagonal of the cell means M[family, task]."""
    tasks = sorted({own_task[f] for f in own_task} & {c["task"] for c in cells})
    families = sorted(f for f in own_task if own_task[f] in tasks)
    base = {"statistic": None, "p": None, "permutations": 0, "exact": None, "min_p": None,
            "can_reach_alpha": False, "families": len(families), "tasks": len(tasks),
            "definition": "mean over families of the double-centred cell mean M at (family, its own task)"}
    means = {(c["family"], c["task"]): c["mean"] for c in cells}
    m = np.array([[means.get((f, t), math.nan) for t in tasks] for f in families], dtype=float)
    if len(tasks) < 2 or m.size == 0 or not np.isfinite(m).all():
        return {**base, "note": "fewer than 2 own tasks, or the family x task matrix has empty cells: no test"}
    # Double-centring removes drafter quality (rows) and task difficulty (columns).
    d = m - m.mean(axis=1, keepdims=True) - m.mean(axis=0, keepdims=True) + m.mean()
    own = np.array([tasks.index(own_task[f]) for f in families])
    t = len(tasks)
    if math.factorial(t) <= EXACT_LIMIT:
        order, exact = np.array(list(itertools.permutations(range(t)))), True
    else:
        rng = np.random.default_rng(seed)
        order, exact = np.vstack([np.arange(t), np.argsort(rng.random((PERMUTATIONS, t)), axis=1)]), False
    statistics = d[np.arange(len(families)), order[:, own]].mean(axis=1)  # row 0: the identity
    observed = float(statistics[0])
    p = float(np.mean(np.abs(statistics) >= abs(observed) * (1 - 1e-9)))
    min_p = 1 / math.factorial(t) if exact else 1 / (PERMUTATIONS + 1)
    note = (f"with {t} tasks the smallest attainable p is {min_p:.3g}"
            + ("" if min_p <= ALPHA else f": this test cannot reach {ALPHA:g}"))
    return {**base, "statistic": observed, "p": p, "permutations": int(order.shape[0]), "exact": exact,
            "min_p": min_p, "can_reach_alpha": bool(min_p <= ALPHA), "note": note}


def matrix(frame: pd.DataFrame, seed: int) -> dict:
    """H2 on the drafter x task matrix (module docstring): the in-domain coefficient at a fixed
    length shift, the length slope, the task-level permutation test and the cells. in_domain is
    drafter_task == task unless the frame brings its own column."""
    kept = frame.dropna(subset=["y", "x"]).reset_index(drop=True)
    excluded = int(len(frame) - len(kept))
    # A caller's own in_domain (e.g. two tasks of one domain) is kept; else drafter_task == task.
    same = kept["in_domain"].astype(bool) if "in_domain" in kept else kept["drafter_task"] == kept["task"]
    frame = kept.assign(in_domain=same.to_numpy())
    if frame["in_domain"].nunique() < 2 or frame["x"].nunique() < 2:
        empty = _t_result(math.nan, None, None)
        in_domain, slope, model, fallback = empty, empty, MATRIX_METHOD, "in_domain or x does not vary: no fit"
    else:
        in_domain, slope, model, fallback, check = _matrix_model(frame)
    cells = _cell_means(frame)
    own_task = frame.groupby("family")["drafter_task"].first().astype(str).to_dict()
    return {"in_domain": in_domain, "length_slope": {**slope, "note": SLOPE_NOTE}, "model": model,
            "fallback": fallback, "prompt_model": check, "permutation": diagonal_permutation(cells, own_task, seed), "cells": cells,
            "n_prompts": int(frame["prompt_id"].nunique()), "n_drafters": int(frame["drafter"].nunique()),
            "n_tasks": int(frame["task"].nunique()), "n_cells": int(frame.groupby(["drafter", "task"]).ngroups),
            "excluded": excluded, "level": stats.LEVEL}


# --- power and verdicts ----------------------------------------------------------------------------------

def minimal_detectable_effect(se: float, df: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The true effect a two-sided t test at `alpha` detects with probability `power`."""
    return float((sps.t.ppf(1 - alpha / 2, df) + sps.t.ppf(power, df)) * se)


def planned_n(sd: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Units of a two-sided one-sample (paired) t test that detect `effect` with `power`."""
    n = TTestPower().solve_power(effect_size=effect / sd, alpha=alpha, power=power, alternative="two-sided")
    return int(math.ceil(float(n) - 1e-9))


def verdict(ci, direction: str, smallest_effect: float) -> str:
    """"confirmed": the interval excludes 0 on the predicted side; "refuted": it excludes 0 on
    the other, or lies inside (-smallest_effect, smallest_effect) (every effect it allows is
    smaller than the smallest of interest); else "inconclusive"."""
    if direction not in ("positive", "negative"):
        raise ValueError(f"direction must be 'positive' or 'negative', not {direction!r}")
    if ci is None or None in ci:
        return "inconclusive"
    lo, hi = float(ci[0]), float(ci[1])
    if (lo > 0) if direction == "positive" else (hi < 0):
        return "confirmed"
    if (hi < 0) if direction == "positive" else (lo > 0):
        return "refuted"
    if -smallest_effect < lo and hi < smallest_effect:
        return "refuted"
    return "inconclusive"
