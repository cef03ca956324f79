"""Acceptance from the replay: the report's primary outcome (issue 11).

Greedy speculative decoding is deterministic given the target's greedy
output, so the replay files (the target's output for every replayed prompt,
each drafter's teacher-forced match vector over it, an EAGLE-3 head's one per
draft depth; analysis/rundir.py reads them) give every step's accepted count
at any K through vLLM's chain rule (analysis/chain.py); draft-model and EAGLE-3
arms alike ("drafter arms"). `compute_replay` turns them into results.json's
"replay" section:

- acceptance per (arm, K, task, stratum), with "all" rows pooled by
  post-stratification on the tasks' natural stratum shares;
- the fine-tuned-against-generic answer per prompt, y = log(tau_ft / tau_gen);
- y against the prompt's length shift from the drafter's training mixture: a
  mixed model, the within-task slope, a task-level permutation test
  (analysis/inference.py; issue 12);
- validation of the replay against the sequentially served requests;
- the served step-cost ratio r = tokens per decode step / TPOT speed-up and
  its decomposition r = gamma c + v;
- the projection of each replayed tau to a band of step-cost ratios;
- the match rate against output position and context length (the figure).

Every interval is seeded (stats.seed_for), so re-analysis is byte-identical.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis import acceptance, chain, inference, kinds, stats, text
from analysis.cells import ALL
from analysis.rundir import RunData, finetune_pairs, scopes, select
from analysis.schema import ArmInfo, Results
from core.config import DRAFTER_KINDS  # arm methods that draft with a drafter's weights, replayed from its vectors
from core.contracts import stratum_key

VALIDATION_REGIME = "sequential"  # the regime whose per-request counts validate the replay
TAU_TOLERANCE = 0.02  # |tau served - tau replayed| that counts as agreement
EXACT_SHARE_FLOAT32 = 0.90  # float32: share of prompts whose accepted count must match exactly
NGRAM_DEFAULT_N = 5  # vLLM's prompt_lookup_min/max when neither is configured (config/speculative.py)
# Published step-cost ratios r on GPUs (Spec-Bench, Xia et al. 2024): the band a replayed tau is projected to.
SPEC_BENCH = (("Spec-Bench GPU: prompt lookup", 1.09), ("Spec-Bench GPU: 68M draft model, low", 1.25),
              ("Spec-Bench GPU: 68M draft model, high", 1.53), ("Spec-Bench GPU: EAGLE", 1.58),
              ("Spec-Bench GPU: EAGLE-2", 1.94))
NATURAL = "natural stratum shares"
# issue 12: below this many prompts a ratio of sums gets the log-scale delta-t interval, from it the
# bootstrap (whose coverage at 10 skewed prompts is 0.92; tests/test_inference.py)
RATIO_BOOTSTRAP_FROM = 20
NO_REPLAY = "No replay in this run: acceptance comes only from the served requests."


# --- per-prompt traces -------------------------------------------------------------------

def ngram_window(arm: ArmInfo) -> tuple[int, int]:
    """(min_n, max_n) as vLLM resolves them: both default to 5, one given sets the other."""
    lo, hi = arm.prompt_lookup_min, arm.prompt_lookup_max
    if lo is None and hi is None:
        return NGRAM_DEFAULT_N, NGRAM_DEFAULT_N
    return (hi if lo is None else lo), (lo if hi is None else hi)


def _has_vectors(run: RunData, arm: ArmInfo) -> bool:
    """Whether the replay holds what the arm's chain needs: match vectors, and a head's per depth."""
    if arm.method == "draft_model":
        return arm.drafter in run.replay.matches
    return arm.method == "eagle3" and arm.drafter in run.replay.depth_matches


def replayed_arms(run: RunData) -> list[ArmInfo]:
    """Speculative arms the replay covers: n-gram arms, and drafter arms whose drafter has its vectors."""
    if run.replay is None:
        return []
    return [a for a in run.speculative_arms if a.num_speculative_tokens
            and (a.method == "ngram" or _has_vectors(run, a))]


def arm_ks(run: RunData, arm: ArmInfo) -> list[int]:
    return sorted(set(run.replay.k) | {int(arm.num_speculative_tokens)})


def prompt_trace(run: RunData, arm: ArmInfo, prompt_id: str, k: int) -> chain.Trace:
    replay = run.replay
    target = replay.targets[prompt_id]
    # Without a recorded max_model_len the cap never binds.
    limit = replay.max_model_len or len(target["prompt_ids"]) + len(target["output_ids"]) + k + 2
    if arm.method == "ngram":
        lo, hi = ngram_window(arm)
        return chain.ngram_trace(target["prompt_ids"], target["output_ids"], target["served_tokens"], k,
                                 min_n=lo, max_n=hi, max_model_len=limit)
    # By the drafter's vectors, not the arm's method: the design's replay-only drafters come as draft-model arms.
    depths = replay.depth_matches.get(arm.drafter, {}).get(prompt_id)
    if depths is not None:
        return chain.eagle3_trace([[c == "1" for c in d] for d in depths], target["served_tokens"], k,
                                  prompt_tokens=len(target["prompt_ids"]), max_model_len=limit,
                                  output_ids=target["output_ids"])
    match, _ = replay.matches[arm.drafter][prompt_id]
    return chain.draft_model_trace([c == "1" for c in match], target["served_tokens"], k,
                                   prompt_tokens=len(target["prompt_ids"]), max_model_len=limit,
                                   output_ids=target["output_ids"])


def _out_of_vocab(run: RunData, arm: ArmInfo, prompt_id: str) -> tuple[int, int]:
    """(served output tokens outside the drafter's vocabulary, tokens scored): positions
    1..served_tokens-1, the ones a draft can propose (position 0 comes from the prefill). A drafter
    without a trimmed vocabulary marks every token inside, so its share is 0."""
    if arm.method not in DRAFTER_KINDS:
        return 0, 0
    served = run.replay.targets[prompt_id]["served_tokens"]
    in_vocab = run.replay.matches[arm.drafter][prompt_id][1][1:served]
    return in_vocab.count("0"), len(in_vocab)


def prompt_units(run: RunData) -> dict[tuple[str, int], pd.DataFrame]:
    """{(arm, K): one row per replayed prompt}: drafts, draft_tokens, accepted,
    per_pos (a_i, a list of K), decode_steps, decode_tokens (served tokens - 1),
    oov and scored (out-of-vocabulary output tokens of the positions scored),
    with the prompt's task, stratum and is_control."""
    units = {}
    labels = run.replay.prompts.set_index("prompt_id")
    for arm in replayed_arms(run):
        ids = sorted(run.replay.targets) if arm.method == "ngram" else sorted(run.replay.matches[arm.drafter])
        oov = [_out_of_vocab(run, arm, pid) for pid in ids]
        for k in arm_ks(run, arm):
            rows = []
            for pid, (outside, scored) in zip(ids, oov):
                trace = prompt_trace(run, arm, pid, k)
                rows.append([pid, trace.drafts, trace.draft_tokens, trace.accepted_tokens, trace.per_position(k),
                             trace.decode_steps, max(0, run.replay.targets[pid]["served_tokens"] - 1), outside,
                             scored])
            frame = pd.DataFrame(rows, columns=["prompt_id", "drafts", "draft_tokens", "accepted", "per_pos",
                                                "decode_steps", "decode_tokens", "oov", "scored"])
            frame["task"] = frame["prompt_id"].map(labels["task"])
            frame["stratum"] = frame["prompt_id"].map(labels["stratum"])
            frame["is_control"] = frame["prompt_id"].map(labels["is_control"]).astype(bool)
            units[arm.name, k] = frame
    return units


def prompt_rows(run: RunData) -> list[dict]:
    """The replay per prompt (report output `replay_prompts.jsonl`): one row per
    (arm, K, prompt) with drafts, draft tokens, accepted tokens, accepted per
    position, decode steps and tau; sorted, so re-analysis writes the same file."""
    if run.replay is None:
        return []
    rows = []
    for (arm, k), frame in sorted(prompt_units(run).items()):
        for unit in frame.sort_values("prompt_id").itertuples():
            rows.append({"arm": arm, "k": k, "prompt_id": unit.prompt_id, "task": unit.task,
                         "stratum": unit.stratum, "drafts": int(unit.drafts), "draft_tokens": int(unit.draft_tokens),
                         "accepted": int(unit.accepted), "accepted_per_position": [int(a) for a in unit.per_pos],
                         "decode_steps": int(unit.decode_steps),
                         "tau": round(1 + unit.accepted / unit.drafts, 6) if unit.drafts else None})
    return rows


# --- post-stratification -------------------------------------------------------------------

def _bin(value: float, edges: list[int], prefix: str) -> str:
    """The stratum label of a length, named as workload/strata.py names it (docs/formats.md)."""
    index = int(np.searchsorted(edges, value, side="right")) - 1
    if index < 0:
        return ""
    return f"{prefix}{edges[index]}+" if index == len(edges) - 1 else f"{prefix}{edges[index]}-{edges[index + 1]}"


def natural_shares(run: RunData, task: str) -> dict[str, float]:
    """Each stratum's share of the task's kept prompts (workload.build.json, else
    the train split); empty when the task's natural lengths are unknown."""
    lengths = run.dataset_lengths.get(task) or {}
    prompt = lengths.get("prompt_tokens") or []
    if not prompt:
        return {}
    labels = [_bin(n, run.prompt_strata, "p") for n in prompt]
    if run.output_strata:
        outputs = lengths.get("ref_tokens") or []
        if len(outputs) != len(prompt):
            return {}
        labels = [f"{p}.{_bin(o, run.output_strata, 'o')}" for p, o in zip(labels, outputs)]
    counts = pd.Series(labels).value_counts()
    return {label: float(n / len(labels)) for label, n in sorted(counts.items())}


def stratum_shares(run: RunData, task: str, counts: pd.Series) -> tuple[dict[str, float], float | None]:
    """Each replayed stratum's weight within the task (summing to 1): its natural share, renormalised
    over the strata the replay covers (counts: prompts per stratum); without natural lengths, its share
    of the replayed prompts. Also the natural share covered (None without natural lengths)."""
    shares = natural_shares(run, task)
    known = {s: shares.get(s, 0.0) for s in counts.index}
    covered = sum(known.values())
    if covered <= 0:
        known, covered = {s: float(c) for s, c in counts.items()}, None
    total = sum(known.values())
    return {s: v / total for s, v in known.items()}, covered


def unit_weights(run: RunData, frame: pd.DataFrame, task: str, stratum: str) -> tuple[np.ndarray, str, float | None]:
    """Per-prompt weights (summing to 1) for one scope of a units frame, how
    they were set, and the natural share of the strata the scope covers.

    A stratum weighs by its share of the task's kept prompts (the natural
    distribution), renormalised over the strata the replay covers; each of its
    prompts by 1/n of that. Without natural lengths, prompts weigh equally.
    Over all tasks, each task weighs equally."""
    n = len(frame)
    if n == 0:
        return np.zeros(0), "", None
    if stratum != ALL:
        return np.full(n, 1 / n), "prompts equally (one stratum)", None
    weights = np.zeros(n)
    tasks = sorted(frame["task"].unique())
    how, covered = set(), []
    for t in tasks:
        mine = (frame["task"] == t).to_numpy()
        counts = frame.loc[mine, "stratum"].value_counts()
        share, natural = stratum_shares(run, t, counts)
        if natural is not None:
            how.add(NATURAL)
            covered.append(natural)
        else:
            how.add("replayed prompts (no natural lengths)")
        per_prompt = frame.loc[mine, "stratum"].map(lambda s: share[s] / counts[s]).to_numpy(float)
        weights[mine] = per_prompt / len(tasks)
    label = " and ".join(sorted(how))
    if task == ALL and len(tasks) > 1:
        label += "; tasks weigh equally"
    return weights, label, float(np.mean(covered)) if covered else None


# --- intervals -------------------------------------------------------------------------------

def _stratified_indices(codes: np.ndarray, seed: int) -> np.ndarray:
    """(RESAMPLES, n) resampled unit indices, each row drawn within strata (same stratum sizes)."""
    rng = np.random.default_rng(seed)
    indices = np.empty((stats.RESAMPLES, codes.size), dtype=int)
    for code in np.unique(codes):
        members = np.flatnonzero(codes == code)
        indices[:, members] = members[rng.integers(0, members.size, size=(stats.RESAMPLES, members.size))]
    return indices


def _percentile(values: np.ndarray, n: int) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size < stats.RESAMPLES / 2:
        return None
    tail = stats.expanded_tail(n)
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return [float(lo), float(hi)]


def log_delta_t_interval(estimate: float, influence: np.ndarray) -> list[float]:
    """exp(log estimate ± t_(n-1) se / estimate): the delta-method t interval on the log
    scale (issue 12: a ratio of skewed per-prompt counts keeps its level there at small n,
    where the linear interval covers 0.89-0.90 at n = 3-5; tests/test_inference.py).
    A zero estimate has no log: the linear interval then."""
    if estimate <= 0:
        return stats.delta_t_interval(estimate, influence)
    lo, hi = stats.delta_t_interval(math.log(estimate), influence / estimate)
    return [math.exp(lo), math.exp(hi)]


def ratio_interval(num: np.ndarray, den: np.ndarray, weights: np.ndarray, codes: np.ndarray,
                   seed: int) -> tuple[list[float] | None, str]:
    """Interval of R = sum(w num) / sum(w den), and which interval it is.

    From RATIO_BOOTSTRAP_FROM prompts: a bootstrap over prompts, resampled
    within strata, expanded percentile. Below it, the delta method with a t
    quantile (n-1 df) on the log scale: the bootstrap's coverage is not
    trustworthy there (0.92 at 10 prompts of skewed acceptance). Below
    MIN_UNITS_FOR_CI prompts: none."""
    n = num.size
    total = float((weights * den).sum())
    if total <= 0 or n < stats.MIN_UNITS_FOR_CI:
        return None, "none (fewer than 3 prompts)" if n < stats.MIN_UNITS_FOR_CI else "none (no drafts)"
    ratio = float((weights * num).sum()) / total
    if n < RATIO_BOOTSTRAP_FROM:  # issue 12: log scale, and up to 19 prompts (was linear, below 10)
        return (log_delta_t_interval(ratio, weights * (num - ratio * den) / total),
                "delta method on the log scale, t" + (" (small n)" if n < stats.SMALL_SAMPLE else ""))
    idx = _stratified_indices(codes, seed)
    w = weights[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (w * num[idx]).sum(axis=1) / (w * den[idx]).sum(axis=1)
    return _percentile(values, n), "bootstrap over prompts within strata, expanded percentile"


# --- 1. acceptance per (arm, K, task, stratum) ---------------------------------------------------

def _codes(frame: pd.DataFrame) -> np.ndarray:
    return pd.factorize(frame["task"].astype(str) + "|" + frame["stratum"].astype(str), sort=True)[0]


def acceptance_row(frame: pd.DataFrame, weights: np.ndarray, k: int, seed: int, drafter: bool) -> dict:
    """acceptance.summarize on weighted sums (weights 1/n: the plain ratios of
    sums), the raw counts, and tau's interval."""
    drafts, accepted = frame["drafts"].to_numpy(float), frame["accepted"].to_numpy(float)
    per_pos = np.vstack([np.asarray(p, dtype=float) for p in frame["per_pos"]]) if len(frame) else np.zeros((0, k))

    def total(column):
        return float((weights * frame[column].to_numpy(float)).sum())

    summary = acceptance.summarize(total("drafts"), total("draft_tokens"), total("accepted"),
                                   (weights[:, None] * per_pos).sum(axis=0), k, total("decode_tokens"),
                                   total("decode_steps"))
    ci, interval = ratio_interval(accepted, drafts, weights, _codes(frame), seed)
    scored = total("scored")
    return {
        "n": len(frame), "prompts_with_drafts": int((drafts > 0).sum()),
        "drafts": int(drafts.sum()), "draft_tokens": int(frame["draft_tokens"].sum()),
        "accepted_tokens": int(accepted.sum()),
        # tau >= 1 by definition: a small-n delta interval is cut there.
        "tau": summary["tau"], "tau_ci": None if ci is None else [1 + max(0.0, ci[0]), 1 + ci[1]],
        "interval": interval, "small_n": len(frame) < stats.SMALL_SAMPLE,
        "position_rate": summary["position_rate"], "conditional": summary["conditional"],
        "alpha": summary["alpha"], "vllm_rate": summary["vllm_rate"],
        "tokens_per_step": summary["tokens_per_step"], "drafting_share": summary["drafting_share"],
        "oov_share": total("oov") / scored if drafter and scored > 0 else None,
    }


def _acceptance(run: RunData, units: dict) -> list[dict]:
    rows = []
    for (arm_name, k), frame in units.items():
        arm = run.arm(arm_name)
        for task, stratum in scopes(frame):
            scope = select(frame, None, task, stratum)
            weights, how, covered = unit_weights(run, scope, task, stratum)
            row = {"arm": arm_name, "k": k, "served": k == arm.num_speculative_tokens, "task": task,
                   "stratum": stratum, "weights": how, "natural_share_covered": covered,
                   **acceptance_row(scope, weights, k, stats.seed_for("replay-tau", arm_name, k, task, stratum),
                                    arm.method in DRAFTER_KINDS)}
            rows.append(row)
    return rows


# --- 2. fine-tuned against generic ------------------------------------------------------------------

def _tau_per_prompt(frame: pd.DataFrame) -> pd.Series:
    drafts = frame["drafts"].where(frame["drafts"] > 0)
    return (1 + frame["accepted"] / drafts).set_axis(frame["prompt_id"])


def _y_frame(units: dict, ft: str, gen: str, k: int) -> pd.DataFrame:
    """Per prompt both arms replayed at K: tau_ft, tau_gen and y = log(tau_ft / tau_gen)."""
    both = units[ft, k][["prompt_id", "task", "stratum", "is_control"]].assign(
        tau_ft=_tau_per_prompt(units[ft, k]).to_numpy())
    both = both.merge(_tau_per_prompt(units[gen, k]).rename("tau_gen"), left_on="prompt_id", right_index=True)
    both["y"] = np.log(both["tau_ft"] / both["tau_gen"])
    return both


def _inference(run: RunData, units: dict) -> dict | None:
    """issue 12: the mixed model, the within-task slope and the task-level permutation test
    (analysis/inference.py) on y at the fine-tuned arm's served K; None without a pair."""
    replayed = {a.name for a in replayed_arms(run)}
    pairs = []
    for ft, gen, drafter in finetune_pairs(run):
        k = run.arm(ft).num_speculative_tokens
        if ft in replayed and gen in replayed and (gen, k) in units:
            pairs.append((ft, gen, drafter, int(k), _y_frame(units, ft, gen, k)))
    return inference.replay_inference(run, pairs) if pairs else None


def _finetune(run: RunData, units: dict) -> list[dict]:
    entries = []
    replayed = {a.name for a in replayed_arms(run)}
    for ft, gen, drafter in finetune_pairs(run):
        if ft not in replayed or gen not in replayed:
            continue
        served_k = run.arm(ft).num_speculative_tokens
        rows = []
        for k in sorted(set(arm_ks(run, run.arm(ft))) & set(arm_ks(run, run.arm(gen)))):
            both = _y_frame(units, ft, gen, k)
            for task, stratum in scopes(both):
                if task == ALL:
                    continue  # the answer is per task: its domains differ
                scope = select(both, None, task, stratum)
                valid = scope[scope["y"].notna()]
                row = {"k": k, "served": k == served_k, "task": task, "stratum": stratum, "n": len(valid),
                       "excluded": len(scope) - len(valid), "small_n": len(valid) < stats.SMALL_SAMPLE}
                if stratum == ALL:
                    weights, how, _ = unit_weights(run, valid, task, ALL)
                    groups = [(float(weights[(valid["stratum"] == s).to_numpy()].sum()),
                               valid.loc[valid["stratum"] == s, "y"].to_numpy(float))
                              for s in sorted(valid["stratum"].unique(), key=stratum_key)]
                    mean, ci = stats.stratified_mean(groups)
                    tau_ft = float((weights * valid["tau_ft"]).sum()) if len(valid) else None
                    tau_gen = float((weights * valid["tau_gen"]).sum()) if len(valid) else None
                    row.update(weights=how + ", Welch-Satterthwaite t interval", mean_y=mean, ci=ci)
                else:
                    y = valid["y"].to_numpy(float)
                    mean = float(y.mean()) if y.size else None
                    tau_ft = float(valid["tau_ft"].mean()) if len(valid) else None
                    tau_gen = float(valid["tau_gen"].mean()) if len(valid) else None
                    row.update(weights="prompts equally, t interval", mean_y=mean, ci=stats.mean_interval(y))
                row.update(ratio=None if row["mean_y"] is None else math.exp(row["mean_y"]),
                           ratio_ci=None if row["ci"] is None else [math.exp(b) for b in row["ci"]],
                           tau_ft=tau_ft, tau_gen=tau_gen)
                rows.append(row)
        entries.append({"finetuned_arm": ft, "generic_arm": gen, "drafter": drafter, "rows": rows})
    return entries


# --- 3. validation against served vLLM ------------------------------------------------------------------

def _agreement(hits: np.ndarray) -> dict:
    n, count = int(hits.size), int(hits.sum())
    return {"n": n, "count": count, "share": count / n if n else None, "ci": stats.wilson_interval(count, n)}


def verdict(dtype: str | None, n: int, exact_share: float | None, gap: float | None,
            gap_ci: list[float] | None) -> str:
    """float32: agrees iff at least 90% of prompts match exactly and |gap| <= 0.02;
    otherwise agrees iff the gap's interval holds 0 or |gap| <= 0.02."""
    if n == 0 or gap is None:
        return "not validated"
    close = abs(gap) <= TAU_TOLERANCE
    if dtype == "float32":
        return "agrees" if exact_share is not None and exact_share >= EXACT_SHARE_FLOAT32 and close else "disagrees"
    return "agrees" if close or (gap_ci is not None and gap_ci[0] <= 0 <= gap_ci[1]) else "disagrees"


def _gap(served_a, served_d, replay_a, replay_d, seed) -> tuple[float | None, list[float] | None, str]:
    """tau served - tau replayed over the same prompts, with a paired interval (bootstrap, or delta-t below
    SMALL_SAMPLE)."""
    n = served_a.size
    if n == 0 or served_d.sum() <= 0 or replay_d.sum() <= 0:
        return None, None, "none"
    gap = served_a.sum() / served_d.sum() - replay_a.sum() / replay_d.sum()
    if n < stats.MIN_UNITS_FOR_CI:
        return float(gap), None, "none (fewer than 3 prompts)"
    if n < stats.SMALL_SAMPLE:
        rs, rr = served_a.sum() / served_d.sum(), replay_a.sum() / replay_d.sum()
        influence = (served_a - rs * served_d) / served_d.sum() - (replay_a - rr * replay_d) / replay_d.sum()
        return float(gap), stats.delta_t_interval(float(gap), influence), "delta method, t (small n)"
    with np.errstate(invalid="ignore", divide="ignore"):
        ci = stats.bootstrap_ci(lambda idx: served_a[idx].sum(1) / served_d[idx].sum(1)
                                - replay_a[idx].sum(1) / replay_d[idx].sum(1), n, seed)
    return float(gap), list(ci) if ci else None, "paired bootstrap over prompts, expanded percentile"


def _validation(run: RunData, units: dict, baseline_self: dict | None) -> dict | None:
    ok = run.ok[run.ok["regime"] == VALIDATION_REGIME]
    if ok.empty:
        return None
    arms = {}
    for arm in replayed_arms(run):
        k = int(arm.num_speculative_tokens)
        served = ok[(ok["arm"] == arm.name) & ok["spec_drafts"].notna()].drop_duplicates("prompt_id")
        replay = units[arm.name, k].set_index("prompt_id")
        both = served[served["prompt_id"].isin(replay.index)]
        mine = replay.loc[both["prompt_id"]]
        a_s, d_s = both["spec_accepted_tokens"].fillna(0).to_numpy(float), both["spec_drafts"].to_numpy(float)
        a_r, d_r = mine["accepted"].to_numpy(float), mine["drafts"].to_numpy(float)
        target_hash = both["prompt_id"].map(lambda pid: run.replay.targets[pid].get("output_hash"))
        identical = ((both["output_hash_kind"] == "token_ids") & (both["output_hash"] == target_hash)).to_numpy()
        gap, gap_ci, interval = _gap(a_s, d_s, a_r, d_r, stats.seed_for("replay-gap", arm.name))
        exact = _agreement(a_s == a_r)
        arms[arm.name] = {
            "k": k, "n": len(both), "not_replayed": int(len(served) - len(both)),
            "accepted_exact": exact, "accepted_within_1": _agreement(np.abs(a_s - a_r) <= 1),
            "drafts_exact": _agreement(d_s == d_r),
            "identical_outputs": int(identical.sum()),
            "identical_exact": _agreement((a_s == a_r)[identical]),
            "identical_within_1": _agreement((np.abs(a_s - a_r) <= 1)[identical]),
            "tau_served": 1 + a_s.sum() / d_s.sum() if d_s.sum() > 0 else None,
            "tau_replayed": 1 + a_r.sum() / d_r.sum() if d_r.sum() > 0 else None,
            "gap": gap, "gap_ci": gap_ci, "interval": interval,
            "verdict": verdict(run.target_dtype, len(both), exact["share"], gap, gap_ci),
        }
    rule = (f"float32: agrees iff at least {EXACT_SHARE_FLOAT32:.0%} of prompts have the served accepted count "
            f"exactly and |tau gap| <= {TAU_TOLERANCE}" if run.target_dtype == "float32" else
            f"{run.target_dtype or 'unknown dtype'}: agrees iff the gap's 95% interval holds 0 or |tau gap| <= "
            f"{TAU_TOLERANCE}; disagrees otherwise")
    return {"regime": VALIDATION_REGIME, "dtype": run.target_dtype, "rule": rule, "baseline_self": baseline_self,
            "arms": arms}


# --- 4. the cost model --------------------------------------------------------------------------------

def _log_r(speed: pd.DataFrame, accept: pd.DataFrame) -> pd.DataFrame:
    """Per prompt of the validation regime: log r = log(tokens per decode step) - log(TPOT speed-up)."""
    accept = accept[(accept["regime"] == VALIDATION_REGIME) & (accept["decode_steps"] > 0)]
    frame = speed[speed["regime"] == VALIDATION_REGIME].dropna(subset=["log_tpot"]).merge(
        accept[["prompt_id", "decode_tokens", "decode_steps"]], on="prompt_id")
    frame["log_tokens"] = np.log(frame["decode_tokens"] / frame["decode_steps"])
    frame["log_r"] = frame["log_tokens"] - frame["log_tpot"]
    return frame.dropna(subset=["log_r"])


def decompose(r: float | None, gamma: int, v: float | None) -> float | None:
    """c from r = gamma c + v, v given by the n-gram arm (whose c ~ 0)."""
    return None if r is None or v is None else (r - v) / gamma


def k_sweep(points: list[tuple[int, float]]) -> dict | None:
    """Least squares r = gamma c + v over arms of one drafter at several K."""
    if len({g for g, _ in points}) < 2:
        return None
    gammas, rs = np.array([g for g, _ in points], float), np.array([r for _, r in points], float)
    c, v = np.polyfit(gammas, rs, 1)
    return {"gammas": gammas.astype(int).tolist(), "r": rs.tolist(), "c": float(c), "v": float(v)}


def log_r_frames(run: RunData, speed: dict, accept: dict) -> dict[str, pd.DataFrame]:
    """Arm -> its per-request log r frame (_log_r), for the speculative arms with any."""
    arms = [a for a in run.speculative_arms if a.name in speed and a.name in accept and a.num_speculative_tokens]
    logs = {a.name: _log_r(speed[a.name], accept[a.name]) for a in arms}
    return {name: frame for name, frame in logs.items() if len(frame)}


def _cost_model(run: RunData, logs: dict[str, pd.DataFrame]) -> dict | None:
    arms = [a for a in run.speculative_arms if a.name in logs]
    # Pooled figures cover the (all, all) cell: every task but the controls.
    pooled_logs = {name: select(frame, None, ALL, ALL) for name, frame in logs.items()}
    if not arms:
        return None
    ngram = [a.name for a in arms if a.method == "ngram"]
    pooled = {a.name: stats.geometric_mean(pooled_logs[a.name]["log_r"], stats.seed_for("replay-r", a.name))
              for a in arms}
    v_logs = np.concatenate([pooled_logs[a]["log_r"].to_numpy() for a in ngram]) if ngram else np.zeros(0)
    v = stats.geometric_mean(v_logs, stats.seed_for("replay-v")) if ngram else None
    gamma = {a.name: int(a.num_speculative_tokens) for a in arms}
    v_value = v["value"] if v else None
    entries, cells = {}, []
    for arm in arms:
        mine = pooled_logs[arm.name]
        entry = {"method": arm.method, "gamma": gamma[arm.name], "r": pooled[arm.name],
                 "tokens_per_step": math.exp(mine["log_tokens"].mean()),
                 "speedup": math.exp(mine["log_tpot"].mean()), "c": None, "c_ci": None, "c_n": 0,
                 "served_alone_c": (run.cost.get(arm.name) or {}).get("c")}
        if v_value is not None and arm.name not in ngram:
            entry["c"] = decompose(pooled[arm.name]["value"], gamma[arm.name], v_value)
            # The interval resamples the prompts both this arm and the n-gram arms answered, paired.
            v_per_prompt = pd.concat([pooled_logs[a] for a in ngram]).groupby("prompt_id")["log_r"].mean()
            common = mine.set_index("prompt_id")["log_r"].groupby(level=0).mean().to_frame("arm").join(
                v_per_prompt.rename("v"), how="inner").sort_index()
            la, lv = common["arm"].to_numpy(), common["v"].to_numpy()
            ci = stats.bootstrap_ci(lambda idx: (np.exp(la[idx].mean(1)) - np.exp(lv[idx].mean(1))) / gamma[arm.name],
                                    len(common), stats.seed_for("replay-c", arm.name))
            entry.update(c_ci=list(ci) if ci else None, c_n=len(common))
        entries[arm.name] = entry
        for task, stratum in scopes(logs[arm.name]):
            scope = select(logs[arm.name], None, task, stratum)
            r = stats.geometric_mean(scope["log_r"], stats.seed_for("replay-r", arm.name, task, stratum))
            cells.append({"arm": arm.name, "task": task, "stratum": stratum,
                          "tokens_per_step": math.exp(scope["log_tokens"].mean()),
                          "speedup": math.exp(scope["log_tpot"].mean()), "r": r,
                          "c": None if arm.name in ngram else decompose(r["value"], gamma[arm.name], v_value)})
    sweeps = {}
    for drafter in sorted({a.drafter for a in arms if a.method in DRAFTER_KINDS and a.drafter}):
        mine = [a for a in arms if a.drafter == drafter and a.method in DRAFTER_KINDS]
        fit = k_sweep([(gamma[a.name], pooled[a.name]["value"]) for a in mine])
        if fit:
            sweeps[drafter] = {"arms": [a.name for a in mine], "source": "served arms", **fit}
    for name, sweep in sorted(run.cost_sweep.items()):
        # The timed K sweep (specdrift/cost.py): the arm served again at other K, forced tokens.
        fit = k_sweep([(int(p["k"]), float(p["r"])) for p in sweep.get("points", [])])
        if fit:
            sweeps[name] = {"arms": [name], "source": "timed K sweep (cost.json)", **fit}
    return {
        "regime": VALIDATION_REGIME,
        "definition": "r = tokens per decode step / TPOT speed-up, per prompt (log r = log(N/S) - log(TPOT_base/"
                      "TPOT_arm)), geometric mean over prompts as the speed-up is: the step time of the arm over "
                      "the baseline's",
        "assumption": "r = gamma c + v, with v (verification and bookkeeping per step) the same for every K and "
                      "method: the n-gram arm (c ~ 0) gives v, and c = (r - v) / gamma for each drafter arm "
                      "(draft model or EAGLE-3 head). "
                      + ("A K sweep tests it: r = gamma c + v fitted by least squares below, its v beside the n-gram "
                         "arm's." if sweeps else
                         "A K sweep (cost.k_sweep, or served arms of one drafter at several K) would test it; "
                         "none was run."),
        "v": v, "v_arms": ngram, "arms": entries, "cells": cells, "k_sweep": sweeps,
        "served_alone": "cost.json's c (the drafter served alone, timed against the baseline) is shown apart: it "
                        "is biased in both directions (it leaves out the verification overhead, and times the "
                        "drafter as a full engine rather than inside one), so it is not a bound on c",
    }


# --- 5. projection --------------------------------------------------------------------------------------

def project(tokens_per_step: float | None, drafting_share: float | None, r: float) -> tuple[float | None,
                                                                                             float | None]:
    """(speed-up S = tokens per step / r, the break-even tau at which S = 1): tokens per
    step = f tau + 1 - f, so S = 1 at tau = 1 + (r - 1) / f."""
    speedup = tokens_per_step / r if tokens_per_step is not None else None
    break_even = 1 + (r - 1) / drafting_share if drafting_share else None
    return speedup, break_even


def _projection(acceptance_rows: list[dict], cost_model: dict | None) -> dict:
    rows = []
    for row in acceptance_rows:
        if not row["served"]:
            continue
        measured = ((cost_model or {}).get("arms", {}).get(row["arm"]) or {}).get("r", {}).get("value")
        band = ([(f"this CPU: measured r of {row['arm']}", measured)] if measured else []) + list(SPEC_BENCH)
        ratios = []
        for label, r in band:
            speedup, break_even = project(row["tokens_per_step"], row["drafting_share"], r)
            ratios.append({"label": label, "r": r, "speedup": speedup, "break_even_tau": break_even})
        rows.append({"arm": row["arm"], "task": row["task"], "stratum": row["stratum"], "k": row["k"],
                     "tau": row["tau"], "tau_ci": row["tau_ci"], "tokens_per_step": row["tokens_per_step"],
                     "drafting_share": row["drafting_share"], "ratios": ratios})
    return {"label": "projection",
            "note": "A projection, not a measurement: S = replayed tokens per decode step / r for a step-cost "
                    "ratio r. GPU speed claims come only from GPU runs.",
            "rows": rows}


# --- 6. match rate against position and context ------------------------------------------------------------

def _binned(values: np.ndarray, hits: np.ndarray) -> dict:
    top = max(2, int(values.max()) + 1) if values.size else 2
    edges = [2 ** i for i in range(int(math.ceil(math.log2(top))) + 1)]
    index = np.searchsorted(edges, values, side="right") - 1
    n = np.bincount(index, minlength=len(edges) - 1)[:len(edges) - 1]
    k = np.bincount(index, weights=hits, minlength=len(edges) - 1)[:len(edges) - 1]
    return {"edges": edges, "n": n.astype(int).tolist(),
            "rate": [float(h / c) if c else None for h, c in zip(k, n)]}


def _profiles(run: RunData) -> dict:
    """Per drafter arm over every replayed prompt: the match rate m[t] (the
    first draft position's acceptance when a step starts at t) by output
    position t and by context length prompt_tokens + t, in doubling bins."""
    profiles = {}
    for arm in replayed_arms(run):
        if arm.method not in DRAFTER_KINDS:
            continue
        positions, contexts, hits = [], [], []
        for pid, (match, _) in sorted(run.replay.matches[arm.drafter].items()):
            target = run.replay.targets[pid]
            t = np.arange(1, target["served_tokens"])
            positions.append(t)
            contexts.append(t + len(target["prompt_ids"]))
            hits.append(np.frombuffer(match.encode(), dtype=np.uint8)[1:target["served_tokens"]] == ord("1"))
        positions, contexts = np.concatenate(positions or [[]]), np.concatenate(contexts or [[]])
        hits = np.concatenate(hits or [[]]).astype(float)
        profiles[arm.name] = {"position": _binned(positions, hits), "context": _binned(contexts, hits)}
    return profiles


# --- assembling ---------------------------------------------------------------------------------------------

def compute_replay(run: RunData, speed: dict, accept: dict, baseline_self: dict | None) -> dict | None:
    """results.json's "replay" section, or None when the run has no replay.
    `speed` and `accept` are results.py's per-prompt served units per arm
    (speed-up paired with the baseline; acceptance counts); `baseline_self`
    the baseline's agreement with its own repeat in the validation regime."""
    if run.replay is None:
        return None
    units = prompt_units(run)
    rows = _acceptance(run, units)
    logs = log_r_frames(run, speed, accept)
    cost_model = _cost_model(run, logs)
    coverage = run.replay.prompts.groupby(["task", "stratum"]).size()
    return {
        "info": {"dtype": run.replay.info.get("dtype"), "k": run.replay.k, "max_model_len": run.replay.max_model_len,
                 "prompts": len(run.replay.targets), "targets": run.replay.info.get("targets"),
                 "drafters": run.replay.info.get("drafters") or {}},
        "methods": {
            "tau": "tau = 1 + sum A / sum D over the prompts (a ratio of sums); a_i/D per position, a_i/a_(i-1) "
                   "conditional, tokens per decode step = (served tokens - 1) / decode steps, drafting share = "
                   "D / decode steps; out-of-vocabulary share over the served output positions 1..n-1",
            "tau_interval": f"from {RATIO_BOOTSTRAP_FROM} prompts a bootstrap over prompts ({stats.RESAMPLES} "
                            "resamples, within strata for pooled rows, expanded percentile); from "
                            f"{stats.MIN_UNITS_FOR_CI} to {RATIO_BOOTSTRAP_FROM - 1} prompts the delta method "
                            f"with a t quantile on the log scale (below {stats.SMALL_SAMPLE} marked small n); "
                            "none below",
            "pooling": "'all' rows post-stratify: each stratum weighs by its share of the task's kept prompts "
                       "(natural lengths), renormalised over the strata replayed; over all tasks each task weighs "
                       "equally; controls are their own task",
            "y": "y = log(tau_ft / tau_gen) per prompt; mean with a t interval per cell, and per task the "
                 "natural-share weighted mean with a Welch-Satterthwaite t interval (a one-prompt stratum "
                 "collapsed into its neighbour, each prompt keeping its weight); prompts where either arm "
                 "drafted nothing are excluded and counted",
        },
        "coverage": [{"task": t, "stratum": s, "prompts": int(n)}
                     for (t, s), n in sorted(coverage.items(), key=lambda x: (x[0][0], stratum_key(x[0][1])))],
        "arms": {a.name: {"method": a.method, "drafter": a.drafter, "served_k": a.num_speculative_tokens,
                          "ks": arm_ks(run, a), "prompts": len(units[a.name, a.num_speculative_tokens])}
                 for a in replayed_arms(run)},
        "acceptance": rows,
        "finetune": _finetune(run, units),
        "inference": _inference(run, units),  # issue 12
        "validation": _validation(run, units, baseline_self),
        "cost_model": cost_model,
        "kinds": kinds.compare_kinds(run, rows, cost_model, logs),  # issue 16
        "projection": _projection(rows, cost_model),
        "profiles": _profiles(run),
    }


# --- the summary's replay lines -------------------------------------------------------------------------------

def _interval_word(value: float, ci, null: float, above: str, below: str, neither: str) -> str:
    """What a summary line says of an estimate whose interval may exclude the null value."""
    if ci is None:
        return "too few prompts for an interval"
    if stats.excludes(ci, null):
        return above if value > null else below
    return neither


def summary_lines(results: Results) -> list[str]:
    """The summary's first lines: the replayed acceptance, the fine-tuned/generic
    answer and the validation verdicts (each sentence from results.json by a stated rule)."""
    replay = results.replay
    if replay is None:
        return [NO_REPLAY]
    lines = []
    validation = replay.validation.arms if replay.validation else {}
    for arm, info in replay.arms.items():
        row = next((r for r in replay.acceptance if r.arm == arm and r.served and r.task == ALL
                    and r.stratum == ALL), None)
        if row is None:
            continue
        line = (f"{arm} (replay, {row.n} prompts, K = {row.k}): τ = {text.with_ci(row.tau, row.tau_ci)}, "
                f"{text.num(row.tokens_per_step)} tokens per decode step ({row.weights}).")
        check = validation.get(arm)
        if check and check.n:
            line += (f" Against served vLLM ({check.n} prompts): {check.verdict}; accepted count exact on "
                     f"{check.accepted_exact.count}/{check.n}, τ served {text.num(check.tau_served)} vs replayed "
                     f"{text.num(check.tau_replayed)} (gap {text.with_ci(check.gap, check.gap_ci)}).")
        else:
            line += " Not validated: no sequentially served request of this arm was replayed."
        lines.append(line)
    for entry in replay.finetune:
        for row in entry.rows:
            if not row.served or row.stratum != ALL or row.ratio is None:
                continue
            word = _interval_word(row.mean_y, row.ci, 0, "the fine-tuned drafter's τ is higher",
                                  "the fine-tuned drafter's τ is lower", "not distinguishable from equal τ")
            small = f" (small sample: {row.n} prompts)" if row.small_n else ""
            lines.append(f"{entry.finetuned_arm} against {entry.generic_arm} on {row.task} (replay, K = {row.k}): "
                         f"τ ratio {text.with_ci(row.ratio, row.ratio_ci)} over {row.n} prompts: {word}{small}.")
    found = replay.kinds
    for ratio in found.ratios if found else []:
        est = ratio.r_ratio
        if est.value is None:
            continue
        word = _interval_word(est.value, est.ci, 1, "its step is dearer", "its step is cheaper",
                              "not distinguishable from equal step cost")
        lines.append(f"{ratio.arm} ({kinds.KIND_NAMES.get(ratio.kind, ratio.kind)}) against {ratio.reference} "
                     f"({kinds.KIND_NAMES.get(ratio.reference_kind, ratio.reference_kind)}), served: r ratio {text.with_ci(est.value, est.ci)} "
                     f"over {est.n} prompts: {word}.")
    lines.append("Projected speed-ups in the replay section are projections from replayed τ and a step-cost "
                 "ratio, not measurements; GPU speed claims come only from GPU runs.")
    return lines
