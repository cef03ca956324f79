"""Every number of the report, computed from a run directory's tables.

`compute_results(run)` returns a plain dict (written as results.json); the
report, the figures and `compare` read nothing else, except the drift figure,
which plots the raw request times.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis import acceptance, divergence, hypotheses, replayed, stats
from analysis.cells import ALL, GAINS, HEADLINE, find_cell, fit_key
from analysis.pairing import acceptance_units, paired_requests, position_counts, prompt_logs, speed_units
from analysis.rundir import RunData, finetune_pairs, scopes, select
from analysis.schema import Results
from analysis.summary import summarize
from core.contracts import OK, TAG_MISSING

SCHEMA_VERSION = 4  # 3: the replay section; 4: the design section
SIGNIFICANT_DIGITS = 6


# --- labels: a prompt's task, stratum and control flag (scopes over them: analysis/rundir.py) ---

def _label(frame: pd.DataFrame, run: RunData) -> pd.DataFrame:
    labels = run.prompts.set_index("prompt_id")
    return frame.assign(
        task=frame["prompt_id"].map(labels["task"]),
        stratum=frame["prompt_id"].map(labels["stratum"]).fillna(TAG_MISSING).astype(str),
        is_control=frame["prompt_id"].map(labels["is_control"]).fillna(False).astype(bool),
    )


# --- per-cell statistics ------------------------------------------------------

def _share(units: pd.DataFrame) -> dict:
    compared = units[units["comparable"].astype(bool)]
    identical = int(compared["identical"].astype(bool).sum())
    n = len(compared)
    return {"compared": n, "identical": identical, "share": identical / n if n else None,
            "ci": stats.wilson_interval(identical, n)}


def _acceptance(units: pd.DataFrame, k: int | None, seed: int) -> dict:
    drafts, accepted = units["drafts"].to_numpy(float), units["accepted"].to_numpy(float)
    summary = acceptance.summarize(drafts.sum(), units["draft_tokens"].sum(), accepted.sum(),
                                   position_counts(units).sum(axis=0), k, units["decode_tokens"].sum(),
                                   units["decode_steps"].sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        ci = stats.bootstrap_ci(lambda idx: 1 + accepted[idx].sum(axis=1) / drafts[idx].sum(axis=1),
                                len(units), seed) if drafts.sum() > 0 else None
    summary["tau_ci"] = list(ci) if ci else None
    summary["requests_with_metrics"] = int(units["with_metrics"].sum())
    # Aggregated as the speed-up is (a geometric mean over prompts), for the cost estimate and the model.
    steps = units["decode_steps"].to_numpy(float)
    tokens = units["decode_tokens"].to_numpy(float)[steps > 0] / steps[steps > 0]
    summary["tokens_per_step_geomean"] = float(np.exp(np.log(tokens).mean())) if tokens.size else None
    return summary


def _speedup(units: pd.DataFrame, arm_logs: pd.DataFrame, base_logs: pd.DataFrame | None, key) -> dict:
    """Paired by prompt when at least half the arm's prompts (and MIN_UNITS_FOR_CI)
    have a baseline partner; otherwise the unpaired ratio of geometric means,
    compared within (task, stratum) cells."""
    paired = units["log_tpot"].notna().sum()
    answered = arm_logs["log_tpot"].notna().sum()
    if base_logs is None or paired == answered or paired >= max(stats.MIN_UNITS_FOR_CI, answered / 2):
        return {"paired": True, **{
            metric: stats.geometric_mean(units[f"log_{metric}"].dropna(), stats.seed_for(metric, *key))
            for metric in ("tpot", "e2e")}}
    cells = sorted(set(zip(arm_logs["task"], arm_logs["stratum"])))

    def strata(metric):
        return [(select(base_logs, None, t, s)[f"log_{metric}"].dropna().to_numpy(),
                 select(arm_logs, None, t, s)[f"log_{metric}"].dropna().to_numpy()) for t, s in cells]

    return {"paired": False, **{metric: stats.unpaired_ratio(strata(metric), stats.seed_for(metric, "unpaired", *key))
                                for metric in ("tpot", "e2e")}}


def _latency(records: pd.DataFrame) -> dict:
    def median(column):
        values = records[column].dropna()
        return float(values.median()) if len(values) else None

    return {"ttft_s": median("ttft_s"), "tpot_s": median("tpot_s"), "e2e_s": median("e2e_s"),
            "completion_tokens": median("completion_tokens")}


def _cells(run: RunData, regimes: list[str], speed: dict, logs: dict, accept: dict,
           records: pd.DataFrame) -> list[dict]:
    baseline_units = speed.get(run.baseline)
    cells = []
    for regime in regimes:
        in_regime = records[records["regime"] == regime]
        for task, stratum in scopes(in_regime):
            for arm in run.arms:
                mine = select(in_regime[in_regime["arm"] == arm.name], None, task, stratum)
                if mine.empty:
                    continue
                key = (arm.name, regime, task, stratum)
                units = select(speed[arm.name], regime, task, stratum)
                base_logs = None if arm.name == run.baseline or run.baseline not in logs else \
                    select(logs[run.baseline], regime, task, stratum)
                cell = {
                    "arm": arm.name, "regime": regime, "task": task, "stratum": stratum,
                    "prompts": int(mine["prompt_id"].nunique()), "requests": len(mine),
                    "latency": _latency(mine),
                    "speedup": {
                        "reference": "baseline, repeat vs first" if arm.name == run.baseline else run.baseline,
                        **_speedup(units, select(logs[arm.name], regime, task, stratum), base_logs, key),
                        "median_gap_s": float(units["gap_s"].median()) if len(units) else None,
                    },
                    "lossless": _share(units),
                }
                if baseline_units is not None and arm.name != run.baseline:
                    cell["lossless"]["baseline_self"] = _share(select(baseline_units, regime, task, stratum))
                if arm.name in accept:
                    cell["acceptance"] = _acceptance(select(accept[arm.name], regime, task, stratum),
                                                     arm.num_speculative_tokens, stats.seed_for("tau", *key))
                cells.append(cell)
    return cells


# --- the analytic model ------------------------------------------------------

def _gamma(arm, cell: dict | None) -> int | None:
    if arm.num_speculative_tokens:
        return int(arm.num_speculative_tokens)
    length = (cell or {}).get("acceptance", {}).get("mean_draft_length")
    return max(1, round(length)) if length else None


def _step_shape(accepted: dict, gamma: int) -> tuple[float, float, float]:
    """(drafting share f, drafted tokens per decode step g, measured tokens per
    decode step as a geometric mean over prompts, like the speed-up); without
    decode counts, every step drafts gamma tokens and emits tau."""
    if accepted.get("tokens_per_step_geomean") is None:
        return 1.0, float(gamma), accepted["tau"]
    return accepted["drafting_share"], accepted["drafted_per_step"], accepted["tokens_per_step_geomean"]


def _cost(run: RunData, cells: list[dict], primary: str | None) -> dict:
    """c per speculative arm: from cost.json where measured, else from the records."""
    cost = {}
    for arm in run.speculative_arms:
        measured = run.cost.get(arm.name)
        if measured and measured.get("c") is not None:
            cost[arm.name] = {"c": float(measured["c"]), "source": "cost.json", "method": measured.get("method", ""),
                              **{k: measured[k] for k in ("draft_step_s", "target_step_s", "n") if k in measured}}
            continue
        cell = find_cell(cells, arm.name, primary) or {}
        accepted = cell.get("acceptance") or {}
        speed = cell.get("speedup", {}).get("tpot", {}).get("value")
        gamma = _gamma(arm, cell)
        if accepted.get("tau") is None or speed is None or gamma is None:
            cost[arm.name] = {"c": None, "source": "none", "method": "no cost.json entry and too few records"}
            continue
        _, drafted, tokens = _step_shape(accepted, gamma)
        cost[arm.name] = {
            "c": acceptance.cost_ratio_from_speedup(tokens, speed, drafted), "source": "estimated from records",
            "method": f"c = (tokens per decode step / S_tpot - 1) / drafted tokens per decode step, from the "
                      f"{primary} regime ({tokens:.3f}, S_tpot = {speed:.3f}, {drafted:.3f}); circular: the model "
                      "then reproduces S_tpot",
        }
    return cost


def _add_model(run: RunData, cells: list[dict], cost: dict) -> None:
    for cell in cells:
        accepted = cell.get("acceptance")
        if not accepted or accepted["tau"] is None or cell["arm"] not in cost:
            continue
        arm = run.arm(cell["arm"])
        gamma, c = _gamma(arm, cell), cost[cell["arm"]]["c"]
        alpha = accepted["alpha"] if accepted["alpha"] is not None else accepted["alpha_from_tau"]
        if gamma is None or c is None or alpha is None:
            continue
        share, drafted, tokens = _step_shape(accepted, gamma)
        cost_factor = 1 / (drafted * max(c, 0.0) + 1)  # a negative estimate is noise: no cost
        expected = acceptance.expected_tokens_per_step(alpha, gamma)
        cell["model"] = {
            "alpha": alpha, "alpha_source": "per-position counts" if accepted["alpha"] is not None else "tau",
            "gamma": gamma, "c": c, "drafting_share": share, "drafted_per_step": drafted,
            "expected_tokens_per_draft": expected, "expected_tokens_per_step": share * expected + 1 - share,
            "cost_factor": cost_factor,
            "predicted_speedup": acceptance.leviathan_speedup(alpha, gamma, max(c, 0.0), share, drafted),
            "predicted_speedup_from_measured_tokens": tokens * cost_factor,
            "measured_speedup": cell["speedup"]["tpot"]["value"],
        }


# --- lengths and their divergence ---------------------------------------------

def prompt_lengths(run: RunData) -> pd.DataFrame:
    """Per prompt sent: prompt tokens (workload), output tokens (the baseline's
    first answer, as measured) and their sum."""
    first_answer = run.ok[run.ok["arm"] == run.baseline].drop_duplicates("prompt_id").set_index("prompt_id")
    frame = run.prompts[["prompt_id", "task", "stratum", "is_control", "prompt_tokens"]].rename(
        columns={"prompt_tokens": "prompt"})
    frame["output"] = pd.to_numeric(frame["prompt_id"].map(first_answer["completion_tokens"]), errors="coerce")
    frame["total"] = frame["prompt"] + frame["output"]
    return frame


def _sample(frame: pd.DataFrame, kind: str) -> list[float]:
    return frame[kind].dropna().tolist()


def _divergence(run: RunData, lengths: pd.DataFrame, edges: np.ndarray) -> dict:
    tasks = sorted(lengths.loc[~lengths["is_control"], "task"].unique())
    by_task = {t: lengths[lengths["task"] == t] for t in tasks}
    matrices = {}
    for kind in divergence.LENGTH_KINDS:
        pairs = {(a, b): divergence.compare(_sample(by_task[a], kind), _sample(by_task[b], kind), edges)
                 for a in tasks for b in tasks}
        matrices[kind] = {m: [[pairs[a, b][m] for b in tasks] for a in tasks] for m in divergence.MEASURES}
    datasets = sorted(run.dataset_lengths)
    dataset_matrices = {}
    for kind, field in (("prompt", "prompt_tokens"), ("reference output", "ref_tokens")):
        samples = {t: run.dataset_lengths[t].get(field) or [] for t in datasets}
        pairs = {(a, b): divergence.compare(samples[a], samples[b], edges) for a in datasets for b in datasets}
        dataset_matrices[kind] = {m: [[pairs[a, b][m] for b in datasets] for a in datasets]
                                  for m in divergence.MEASURES}
    drafters = {
        name: {task: {kind: divergence.compare(d.lengths[kind], _sample(by_task[task], kind), edges)
                      for kind in divergence.LENGTH_KINDS if kind in d.lengths} for task in tasks}
        for name, d in run.drafters.items() if d.lengths
    }
    return {
        "method": {"js_log_base": divergence.JS_LOG_BASE, "bins_per_doubling": divergence.BINS_PER_DOUBLING,
                   "bin_edges": edges.tolist(),
                   "task_lengths": "eval prompts sent: prompt tokens from the workload, output tokens "
                                   "from the baseline's first answer",
                   "drafter_lengths": "each drafter's training examples as it saw them: the output's first "
                                      "window - 1 tokens, then the prompt's last tokens that still fit "
                                      "(window: the recipe's max_seq_len)"},
        "tasks": tasks,
        "task_lengths": {t: {kind: {"n": int(by_task[t][kind].notna().sum()),
                                    "median": _median(by_task[t][kind])} for kind in divergence.LENGTH_KINDS}
                         for t in tasks},
        "matrices": matrices,
        # The datasets as kept by the workload (workload.build.json): natural, not stratified, lengths.
        "datasets": {"tasks": datasets, "matrices": dataset_matrices, "source": run.dataset_lengths_source}
        if datasets else None,
        "drafters": drafters,
        "drafter_lengths": {name: {kind: {"n": len(v), "median": float(np.median(v))} for kind, v in d.lengths.items()}
                            for name, d in run.drafters.items() if d.lengths},
    }


def _median(series: pd.Series):
    values = series.dropna()
    return float(values.median()) if len(values) else None


# --- the answer: fine-tuned against generic -----------------------------------

def _gain_row(task, stratum, speed_units_, acc_ft, acc_gen, lengths, split_ft, split_gen, edges, key) -> dict:
    units = select(speed_units_, None, task, stratum)
    speed = stats.geometric_mean(units["log_tpot"].dropna(), stats.seed_for("gain-tpot", *key))
    ft, gen = select(acc_ft, None, task, stratum), select(acc_gen, None, task, stratum)
    both = ft.merge(gen, on="prompt_id", suffixes=("_ft", "_gen"))
    tau_gain = {"n": len(both), "value": None, "ci": None}
    d_ft, a_ft = both["drafts_ft"].to_numpy(float), both["accepted_ft"].to_numpy(float)
    d_gen, a_gen = both["drafts_gen"].to_numpy(float), both["accepted_gen"].to_numpy(float)
    if d_ft.sum() > 0 and d_gen.sum() > 0:
        tau_gain["value"] = a_ft.sum() / d_ft.sum() - a_gen.sum() / d_gen.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            ci = stats.bootstrap_ci(
                lambda idx: a_ft[idx].sum(1) / d_ft[idx].sum(1) - a_gen[idx].sum(1) / d_gen[idx].sum(1),
                len(both), stats.seed_for("gain-tau", *key))
        tau_gain["ci"] = list(ci) if ci else None
    cell_lengths = select(lengths, None, task, stratum)
    return {
        "task": task, "stratum": stratum, "is_control": bool(cell_lengths["is_control"].any()),
        "speed_ratio": speed,
        "log_speed_ratio": math.log(speed["value"]) if speed["value"] else None,
        "tau_gain": tau_gain,
        "divergence_finetune": {k: divergence.compare(split_ft[k], _sample(cell_lengths, k), edges)
                                for k in divergence.LENGTH_KINDS if k in split_ft},
        "divergence_generic": {k: divergence.compare(split_gen[k], _sample(cell_lengths, k), edges)
                               for k in divergence.LENGTH_KINDS if k in split_gen},
    }


def _fits(rows: list[dict], key) -> dict:
    """Spearman rho and the slope of each gain on each divergence measure, over (task, stratum) cells."""
    fits = {}
    for y_name in GAINS:
        for kind in divergence.LENGTH_KINDS:
            for measure in divergence.MEASURES:
                points = [(r["divergence_finetune"].get(kind, {}).get(measure),
                           r[y_name] if y_name == "log_speed_ratio" else r[y_name]["value"], r["task"], r["stratum"])
                          for r in rows]
                points = [p for p in points if p[0] is not None and p[1] is not None]
                x, y = [p[0] for p in points], [p[1] for p in points]
                fit = {"spearman": stats.spearman(x, y),
                       "slope": stats.slope(x, y, stats.seed_for("slope", *key, y_name, kind, measure))}
                if (measure, kind) == HEADLINE:
                    fit["slope_within_task"] = stats.slope(
                        x, y, stats.seed_for("slope-task", *key, y_name), within=[p[2] for p in points])
                    fit["slope_within_stratum"] = stats.slope(
                        x, y, stats.seed_for("slope-stratum", *key, y_name), within=[p[3] for p in points])
                fits[fit_key(y_name, measure, kind)] = fit
    return fits


def _answer(run: RunData, ok: pd.DataFrame, accept: dict, lengths: pd.DataFrame, edges, primary) -> list[dict]:
    answers = []
    for ft, gen, drafter in finetune_pairs(run):
        split_ft = run.drafters[drafter].lengths
        split_gen = run.drafters[run.drafters[drafter].init].lengths
        key = (ft, gen, primary)
        entry = {"finetuned_arm": ft, "generic_arm": gen, "drafter": drafter, "regime": primary,
                 "finetune_tasks": run.drafters[drafter].tasks, "rows": [], "fits": {}}
        unmeasured = [a for a in (ft, gen) if a not in accept]
        if unmeasured or not split_ft:
            entry["missing"] = (f"no records for {' and '.join(unmeasured)}" if unmeasured
                                else f"drafter card of {drafter} has no lengths")
            answers.append(entry)
            continue
        speed = _label(speed_units(paired_requests(ok[ok["regime"] == primary], ft, gen)), run)
        acc_ft = accept[ft][accept[ft]["regime"] == primary]
        acc_gen = accept[gen][accept[gen]["regime"] == primary]
        answered = [s for s in scopes(acc_ft) if s[0] != ALL]
        entry["rows"] = [_gain_row(t, s, speed, acc_ft, acc_gen, lengths, split_ft, split_gen, edges, (*key, t, s))
                         for t, s in answered]
        cells = [r for r in entry["rows"] if r["stratum"] != ALL and not r["is_control"]]
        entry["fits"] = _fits(cells, key)
        entry["cells_in_fit"] = len(cells)
        answers.append(entry)
    return answers


def _controls(run: RunData, cells: list[dict], answers: list[dict], lengths: pd.DataFrame, edges,
              primary) -> list[dict]:
    labels = run.prompts[run.prompts["is_control"]].drop_duplicates("task")
    controls = []
    for _, row in labels.sort_values("task").iterrows():
        task, like, label = row["control_task"], row["control_like"], row["task"]
        sample = {t: _sample(lengths[lengths["task"] == t], "prompt") for t in (task, label)}
        # The control was drawn to follow B's own lengths, not B's stratified eval sample.
        natural = (run.dataset_lengths.get(like) or {}).get("prompt_tokens")
        reference = natural or _sample(lengths[lengths["task"] == like], "prompt")
        arms = {}
        for arm in run.speculative_arms:
            arms[arm.name] = {}
            for scope in (task, label, like):
                cell = find_cell(cells, arm.name, primary, scope)
                arms[arm.name][scope] = None if cell is None else {
                    "speedup_tpot": cell["speedup"]["tpot"], "tau": cell.get("acceptance", {}).get("tau"),
                    "tau_ci": cell.get("acceptance", {}).get("tau_ci")}
        gains = {}
        for answer in answers:
            by_task = {r["task"]: r for r in answer["rows"] if r["stratum"] == ALL}
            gains[answer["finetuned_arm"]] = {
                t: None if t not in by_task else {"speed_ratio": by_task[t]["speed_ratio"],
                                                  "tau_gain": by_task[t]["tau_gain"]}
                for t in (task, label, like)}
        controls.append({
            "label": label, "task": task, "like": like, "regime": primary,
            "prompt_divergence": {"control_vs_like": divergence.compare(sample[label], reference, edges),
                                  "task_vs_like": divergence.compare(sample[task], reference, edges),
                                  "reference": f"{like}: {run.dataset_lengths_source}" if natural
                                  else f"{like}: its eval prompts"},
            "arms": arms, "gains": gains,
        })
    return controls


# --- load regimes and drift ----------------------------------------------------

def _regime_curves(run: RunData, cells: list[dict], regimes: list[str]) -> dict:
    curves = {}
    for arm in run.speculative_arms:
        points = []
        for regime in regimes:
            cell = find_cell(cells, arm.name, regime)
            if cell and cell["speedup"]["tpot"]["value"] is not None:
                points.append({"regime": regime, "paired": cell["speedup"]["paired"],
                               "tpot": cell["speedup"]["tpot"], "e2e": cell["speedup"]["e2e"]})
        values = [p["tpot"]["value"] for p in points]
        crossing = next(([a["regime"], b["regime"]] for a, b in zip(points, points[1:])
                         if (a["tpot"]["value"] - 1) * (b["tpot"]["value"] - 1) < 0), None)
        if not values:
            status = "no data"
        elif crossing:
            status = "crosses"
        else:
            status = "above" if min(values) > 1 else "below" if max(values) < 1 else "at"
        curves[arm.name] = {"points": points, "crosses_between": crossing, "status": status}
    return curves


DRIFT_MIN_REQUESTS = 5
DRIFT_MIN_SPAN_MIN = 1.0


def _percent_change(log_slope_per_min: float, minutes: float) -> float | None:
    exponent = log_slope_per_min * minutes
    return 100 * math.expm1(exponent) if exponent < 50 else None


def _drift(run: RunData, regimes: list[str], t0: float) -> dict:
    """Per arm and regime: the robust (Theil-Sen) trend of log TPOT over time,
    as the change it implies from the regime's first request to its last."""
    drift = {}
    ok = run.ok
    for arm in run.arms:
        for regime in regimes:
            rows = ok[(ok["arm"] == arm.name) & (ok["regime"] == regime) & (ok["tpot_s"] > 0)]
            minutes = ((rows["t_start"] - t0) / 60).to_numpy()
            if len(rows) < DRIFT_MIN_REQUESTS or np.ptp(minutes) < DRIFT_MIN_SPAN_MIN:
                continue
            logs = np.log(rows["tpot_s"].to_numpy())
            slope, _, lo, hi = sps.theilslopes(logs, minutes)
            span = float(np.ptp(minutes))
            drift.setdefault(arm.name, {})[regime] = {
                "n": len(rows), "span_min": span,
                "percent_over_span": _percent_change(slope, span),
                "ci": [_percent_change(lo, span), _percent_change(hi, span)],
                "spearman": stats.spearman(minutes, logs),
            }
    return drift


def _baseline_self(cells: list[dict], baseline: str) -> dict | None:
    """The baseline's output agreement with its own repeat, all tasks, in the replay's validation regime."""
    cell = find_cell(cells, baseline, replayed.VALIDATION_REGIME)
    return cell["lossless"] if cell else None


# --- inputs, and assembling everything -----------------------------------------

def _inputs(run: RunData, regimes: list[str]) -> dict:
    records = run.records
    counts = {}
    for (arm, regime, status), n in records.groupby(["arm", "regime", "status"]).size().items():
        counts.setdefault(arm, {}).setdefault(regime, {})[status] = int(n)
    baseline_prompts = {r: set(run.ok.loc[(run.ok["arm"] == run.baseline) & (run.ok["regime"] == r), "prompt_id"])
                        for r in regimes}
    coverage = {}
    for arm in run.arms:
        for regime in regimes:
            answered = set(run.ok.loc[(run.ok["arm"] == arm.name) & (run.ok["regime"] == regime), "prompt_id"])
            sent = set(records.loc[(records["arm"] == arm.name) & (records["regime"] == regime), "prompt_id"])
            if sent or baseline_prompts[regime]:
                coverage.setdefault(arm.name, {})[regime] = {
                    "prompts_sent": len(sent), "prompts_ok": len(answered),
                    "baseline_prompts_without_answer": len(baseline_prompts[regime] - answered)}
    return {
        "records": len(records), "files": run.files,
        "arms_configured": [a.name for a in run.arms],
        "arms_without_records": [a.name for a in run.arms if a.name not in set(records["arm"])],
        "dead_arms": run.dead_arms,
        "requests_by_status": counts, "coverage": coverage,
        "cost_json_arms": sorted(run.cost),
    }


def _rounded(value):
    if isinstance(value, dict):
        return {str(k): _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else None
    return value


def compute_results(run: RunData) -> dict:
    ok = run.ok
    regimes = [r for r in run.regimes if r in set(ok["regime"])]
    primary = "sequential" if "sequential" in regimes else (regimes[0] if regimes else None)
    records = _label(run.records[["arm", "regime", "prompt_id", "status", "ttft_s", "tpot_s", "e2e_s",
                                  "completion_tokens"]][run.records["status"] == OK], run)
    answered = set(ok["arm"])
    speed = {a.name: _label(speed_units(paired_requests(ok, a.name, run.baseline)), run)
             for a in run.arms if a.name in answered}
    logs = {a.name: _label(prompt_logs(ok, a.name), run) for a in run.arms if a.name in answered}
    accept = {a.name: _label(acceptance_units(ok, a.name), run) for a in run.speculative_arms if a.name in answered}
    cells = _cells(run, regimes, speed, logs, accept, records)
    cost = _cost(run, cells, primary)
    _add_model(run, cells, cost)

    lengths = prompt_lengths(run)
    all_lengths = [v for kind in divergence.LENGTH_KINDS for v in lengths[kind].dropna()]
    all_lengths += [v for d in run.drafters.values() for values in d.lengths.values() for v in values]
    all_lengths += [v for by_kind in run.dataset_lengths.values() for values in by_kind.values() for v in values or []]
    edges = divergence.log_bin_edges(max(all_lengths, default=1))
    answers = _answer(run, ok, accept, lengths, edges, primary)
    t0 = float(run.records["t_start"].min()) if len(run.records) else 0.0

    results = {
        "schema": SCHEMA_VERSION,
        "run": {"run_id": run.run_id, "name": run.name, "baseline_arm": run.baseline,
                "arms": [{"name": a.name, "method": a.method, "num_speculative_tokens": a.num_speculative_tokens,
                          "drafter": a.drafter} for a in run.arms],
                "regimes": regimes, "primary_regime": primary,
                "regime_plans": {r: run.regime_plans.get(r, "not in the config") for r in regimes},
                "target_dtype": run.target_dtype, "temperature": run.temperature,
                "drafters": {n: {"init": d.init, "tasks": d.tasks, "window": d.window}
                             for n, d in run.drafters.items()},
                "duration_s": float(run.records["t_end"].max() - t0) if len(run.records) else None},
        "methods": {
            "bootstrap": {"kind": "expanded percentile (Hesterberg 2015)", "resamples": stats.RESAMPLES,
                          "level": stats.LEVEL,
                          "base_seed": stats.BASE_SEED, "unit": "prompt (answer fits: (task, stratum) cell)",
                          "min_units_for_ci": stats.MIN_UNITS_FOR_CI, "small_sample": stats.SMALL_SAMPLE},
            "pairing": "each request is paired with the reference arm's request for the same prompt in the same "
                       "regime that started nearest in time; per prompt the log ratios are averaged",
            "speedup": "geometric mean over prompts of reference/arm (TPOT, end-to-end time); > 1 = arm faster. "
                       "Paired by prompt when at least half of the arm's prompts (and 3) have a partner; otherwise "
                       "(under load, when a bound stops the arms' blocks at different points of the prompt list) the unpaired ratio of "
                       "geometric means, taken within each (task, stratum) and weighted by the arm's prompts, with a "
                       "bootstrap of each side (paired: false)",
            "alpha": "Leviathan alpha: maximum-likelihood per-token acceptance from the per-position counts "
                     "(accepted positions / positions tried); alpha_from_tau solves tau = (1-a^(K+1))/(1-a)",
            "headline_divergence": {"measure": HEADLINE[0], "length": HEADLINE[1]},
            "significant_digits": SIGNIFICANT_DIGITS,
        },
        "inputs": _inputs(run, regimes),
        "cells": cells,
        "cost": cost,
        "divergence": _divergence(run, lengths, edges),
        "answer": answers,
        "controls": _controls(run, cells, answers, lengths, edges, primary),
        "regimes": _regime_curves(run, cells, regimes),
        "drift": _drift(run, regimes, t0),
        "environment": run.environment,
        "replay": replayed.compute_replay(run, speed, accept, _baseline_self(cells, run.baseline)),
        "design": hypotheses.compute_design(run),
    }
    results = _rounded(results)
    typed = Results.from_dict(results)
    served = summarize(typed) if len(run.records) else [
        "A replay-only run (`specdrift replay`): nothing was served, so there are no timed speed-ups, "
        "no validation against served vLLM and no served acceptance."]
    results["summary"] = hypotheses.summary_lines(typed) + replayed.summary_lines(typed) + served
    return results
