"""Acceptance from the replay (analysis/replayed.py) on synthetic run
directories whose replay files and served counts are known by construction:
the tau table against the chain run by hand, post-stratification, the
fine-tuned/generic y table, validation with a planted disagreement, the cost
decomposition, the projection, and runs without a replay."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from analysis import chain, replayed, stats
from analysis.cells import ALL
from analysis.report import REPLAY_HEADING, results_json, write_report
from analysis.results import compute_results
from analysis.rundir import load_run
from test_analysis_synthetic import COST_RATIO, K, MAX_MODEL_LEN, REPLAY_K, write_synthetic_run

PLANTED = 8  # prompts of the generic arm whose served accepted count is 2 above the replay's


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """A float32 run whose served counts equal the replay's: (run dir, run, results)."""
    run_dir = write_synthetic_run(tmp_path_factory.mktemp("replay") / "run", replay=True, dtype="float32")
    run = load_run(run_dir)
    return run_dir, run, compute_results(run)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The same run, but the generic arm's served accepted count is off on PLANTED prompts."""
    run_dir = write_synthetic_run(tmp_path_factory.mktemp("replay") / "run", replay=True, dtype="float32",
                                  disagree={"generic": PLANTED})
    return compute_results(load_run(run_dir))


def _targets(run_dir):
    return {row["id"]: row for row in map(json.loads, (run_dir / "replay" / "targets.jsonl").read_text().splitlines())}


def _matches(run_dir, drafter):
    rows = map(json.loads, (run_dir / "replay" / "matches.jsonl").read_text().splitlines())
    return {row["id"]: row for row in rows if row["drafter"] == drafter}


def _row(results, arm, k, task=ALL, stratum=ALL):
    return next(r for r in results["replay"]["acceptance"]
                if (r["arm"], r["k"], r["task"], r["stratum"]) == (arm, k, task, stratum))


# --- 1. the tau table ----------------------------------------------------------------------

def test_tau_table_sums_the_chain_over_a_cells_prompts(exact):
    run_dir, _, results = exact
    targets, matches = _targets(run_dir), _matches(run_dir, "generic")
    for k in REPLAY_K:
        mine = [t for t in targets.values() if (t["task"], t["stratum"]) == ("xsum", "p256-1024")]
        traces = [chain.draft_model_trace([c == "1" for c in matches[t["id"]]["match"]], t["served_tokens"], k,
                                          prompt_tokens=len(t["prompt_ids"]), max_model_len=MAX_MODEL_LEN,
                                          output_ids=t["output_ids"]) for t in mine]
        row = _row(results, "generic", k, "xsum", "p256-1024")
        drafts, accepted = sum(t.drafts for t in traces), sum(t.accepted_tokens for t in traces)
        assert (row["n"], row["drafts"], row["accepted_tokens"]) == (len(mine), drafts, accepted)
        assert row["tau"] == pytest.approx(1 + accepted / drafts, rel=1e-5)
        per_pos = np.sum([t.per_position(k) for t in traces], axis=0)
        assert row["position_rate"] == pytest.approx(per_pos / drafts, rel=1e-5)
        steps = sum(t.decode_steps for t in traces)
        assert row["tokens_per_step"] == pytest.approx(sum(t["served_tokens"] - 1 for t in mine) / steps, rel=1e-5)
        outside = sum(matches[t["id"]]["in_vocab"][1:t["served_tokens"]].count("0") for t in mine)
        assert row["oov_share"] == pytest.approx(outside / sum(t["served_tokens"] - 1 for t in mine), rel=1e-5)
        assert row["served"] == (k == K)
        assert row["tau_ci"][0] < row["tau"] < row["tau_ci"][1]
        small = row["n"] < replayed.RATIO_BOOTSTRAP_FROM  # issue 12: log-scale delta-t below 20 prompts
        assert row["interval"].startswith("delta method on the log scale" if small else "bootstrap")
        assert not row["small_n"]


def test_ngram_rows_replay_vllms_prompt_lookup(exact):
    run_dir, run, results = exact
    arm = run.arm("ngram")
    assert replayed.ngram_window(arm) == (2, 4)
    mine = [t for t in _targets(run_dir).values() if (t["task"], t["stratum"]) == ("gsm8k", "p0-64")]
    traces = [chain.ngram_trace(t["prompt_ids"], t["output_ids"], t["served_tokens"], K, min_n=2, max_n=4,
                                max_model_len=MAX_MODEL_LEN) for t in mine]
    row = _row(results, "ngram", K, "gsm8k", "p0-64")
    assert row["accepted_tokens"] == sum(t.accepted_tokens for t in traces)
    assert row["drafting_share"] == pytest.approx(sum(t.drafts for t in traces) / sum(t.decode_steps for t in traces),
                                                  rel=1e-5)
    assert row["oov_share"] is None


def test_small_cells_get_a_delta_t_interval_marked_small_n(exact):
    _, _, results = exact
    row = _row(results, "finetuned", K, "gsm8k-like-xsum", "p64-256")  # 3 control prompts
    assert row["n"] == 3 and row["small_n"] and row["interval"].startswith("delta")
    assert row["tau_ci"][0] >= 1


def test_delta_t_interval_by_hand():
    num, den = np.array([3.0, 5.0, 4.0, 6.0]), np.array([4.0, 5.0, 6.0, 5.0])
    weights = np.full(4, 0.25)
    ci, kind = replayed.ratio_interval(num, den, weights, np.zeros(4, int), seed=1)
    ratio = num.sum() / den.sum()
    z = (num - ratio * den) / den.mean()  # the textbook ratio-estimator se, on the log scale (issue 12)
    half = sps.t.ppf(0.975, 3) * z.std(ddof=1) / 2 / ratio
    assert kind.startswith("delta method on the log scale")
    assert ci == pytest.approx([ratio * math.exp(-half), ratio * math.exp(half)])


# --- post-stratification -------------------------------------------------------------------

def test_natural_shares_and_the_pooled_row_by_hand(exact):
    run_dir, run, results = exact
    natural = json.loads((run_dir / "workload.build.json").read_text())["lengths"]["gsm8k"]["prompt_tokens"]
    low = sum(n < 64 for n in natural) / len(natural)
    assert replayed.natural_shares(run, "gsm8k") == pytest.approx({"p0-64": low, "p64-256": 1 - low})
    # The pooled tau is the combined ratio estimator: sum_s W_s mean(A_s) / sum_s W_s mean(D_s).
    cells = {s: _row(results, "generic", K, "gsm8k", s) for s in ("p0-64", "p64-256")}
    weights = {"p0-64": low, "p64-256": 1 - low}
    accepted = sum(weights[s] * c["accepted_tokens"] / c["n"] for s, c in cells.items())
    drafts = sum(weights[s] * c["drafts"] / c["n"] for s, c in cells.items())
    pooled = _row(results, "generic", K, "gsm8k")
    assert pooled["tau"] == pytest.approx(1 + accepted / drafts, rel=1e-5)
    assert pooled["weights"] == replayed.NATURAL and pooled["natural_share_covered"] == pytest.approx(1.0)
    assert pooled["drafts"] == sum(c["drafts"] for c in cells.values())  # raw counts stay counts
    overall = _row(results, "generic", K)
    assert "tasks weigh equally" in overall["weights"]
    assert overall["n"] == sum(_row(results, "generic", K, t)["n"] for t in ("gsm8k", "nq_open", "xsum"))


# --- 2. fine-tuned against generic ------------------------------------------------------------

def test_y_table_is_the_mean_log_tau_ratio_with_a_t_interval(exact):
    run_dir, _, results = exact
    targets = _targets(run_dir)
    ft, gen = _matches(run_dir, "finetuned"), _matches(run_dir, "generic")

    def tau(match, t):
        return chain.draft_model_trace([c == "1" for c in match["match"]], t["served_tokens"], K,
                                       prompt_tokens=len(t["prompt_ids"]), max_model_len=MAX_MODEL_LEN,
                                       output_ids=t["output_ids"]).tau

    mine = [t for t in targets.values() if (t["task"], t["stratum"]) == ("xsum", "p64-256")]
    y = np.array([math.log(tau(ft[t["id"]], t) / tau(gen[t["id"]], t)) for t in mine])
    (entry,) = results["replay"]["finetune"]
    assert (entry["finetuned_arm"], entry["generic_arm"]) == ("finetuned", "generic")
    row = next(r for r in entry["rows"] if (r["k"], r["task"], r["stratum"]) == (K, "xsum", "p64-256"))
    half = sps.t.ppf(0.975, y.size - 1) * y.std(ddof=1) / math.sqrt(y.size)
    assert row["n"] == y.size and row["excluded"] == 0 and row["served"]
    assert row["mean_y"] == pytest.approx(y.mean(), rel=1e-5, abs=1e-9)
    assert row["ci"] == pytest.approx([y.mean() - half, y.mean() + half], rel=1e-4, abs=1e-6)
    assert row["ratio"] == pytest.approx(math.exp(y.mean()), rel=1e-5)
    # The fine-tuned drafter (on gsm8k) gains most on gsm8k, as simulated.
    pooled = {r["task"]: r for r in entry["rows"] if r["k"] == K and r["stratum"] == ALL}
    assert pooled["gsm8k"]["mean_y"] > pooled["xsum"]["mean_y"] and pooled["gsm8k"]["ci"][0] > 0


def test_stratified_mean_by_hand():
    a, b = np.array([0.1, 0.3, 0.2]), np.array([0.5, 0.7])
    mean, ci = stats.stratified_mean([(0.25, a), (0.75, b)])
    assert mean == pytest.approx(0.25 * a.mean() + 0.75 * b.mean())
    parts = [0.25 ** 2 * a.var(ddof=1) / 3, 0.75 ** 2 * b.var(ddof=1) / 2]
    df = sum(parts) ** 2 / (parts[0] ** 2 / 2 + parts[1] ** 2 / 1)
    half = sps.t.ppf(0.975, df) * math.sqrt(sum(parts))
    assert ci == pytest.approx([mean - half, mean + half])
    # A stratum of one is collapsed into its neighbour for the interval (its estimate stays its own),
    # each value keeping its weight (issue 12): Cochran's collapsed-strata variance, Kish's n_eff - 1 df.
    single_mean, single_ci = stats.stratified_mean([(0.5, a), (0.5, np.array([1.0]))])
    assert single_mean == pytest.approx(0.5 * a.mean() + 0.5)
    w, joined = np.array([0.5 / 3] * 3 + [0.5]), np.append(a, 1.0)
    z = w * joined
    variance = 4 / 3 * ((z - z.mean()) ** 2).sum()
    df = max(1.0, w.sum() ** 2 / (w ** 2).sum() - 1)
    half = sps.t.ppf(0.975, df) * math.sqrt(variance)
    assert single_ci[1] - single_ci[0] == pytest.approx(2 * half)
    assert stats.stratified_mean([(1.0, np.array([1.0]))])[1] is None


def test_prompts_without_drafts_are_excluded_and_counted(exact):
    _, run, _ = exact
    units = replayed.prompt_units(run)
    frame = units["finetuned", K].copy()
    frame.loc[frame.index[0], ["drafts", "accepted"]] = 0
    tau = replayed._tau_per_prompt(frame)
    assert math.isnan(tau.iloc[0]) and tau.iloc[1:].notna().all()


# --- 3. validation -----------------------------------------------------------------------------

def test_validation_is_exact_when_served_counts_follow_the_chain(exact):
    _, _, results = exact
    validation = results["replay"]["validation"]
    assert validation["dtype"] == "float32" and validation["baseline_self"]["compared"] > 0
    for arm in ("ngram", "generic", "finetuned"):
        check = validation["arms"][arm]
        assert check["n"] > 0 and check["k"] == K
        assert check["accepted_exact"]["share"] == 1 and check["drafts_exact"]["share"] == 1
        assert check["gap"] == 0 and check["verdict"] == "agrees"
        assert 0 < check["identical_outputs"] <= check["n"]


def test_a_planted_disagreement_is_shown_and_flips_the_verdict(planted, exact):
    check = planted["replay"]["validation"]["arms"]["generic"]
    n = check["n"]
    assert check["accepted_exact"]["count"] == n - PLANTED
    assert check["accepted_within_1"]["count"] == n - PLANTED
    assert check["drafts_exact"]["share"] == 1  # the chain's drafts still agree
    assert check["gap"] > 0 and check["tau_served"] > check["tau_replayed"]
    assert check["verdict"] == "disagrees"  # float32: fewer than 90% exact
    assert planted["replay"]["validation"]["arms"]["finetuned"]["verdict"] == "agrees"
    line = next(s for s in planted["summary"] if s.startswith("generic (replay"))
    assert "disagrees" in line and f"exact on {n - PLANTED}/{n}" in line


def test_verdict_rules():
    assert replayed.verdict("float32", 20, 0.95, 0.01, [0.0, 0.02]) == "agrees"
    assert replayed.verdict("float32", 20, 0.85, 0.0, [0.0, 0.0]) == "disagrees"
    assert replayed.verdict("float32", 20, 1.0, 0.03, [0.02, 0.04]) == "disagrees"
    assert replayed.verdict("bfloat16", 20, 0.5, 0.05, [-0.01, 0.1]) == "agrees"  # interval holds 0
    assert replayed.verdict("bfloat16", 20, 0.5, 0.015, [0.01, 0.02]) == "agrees"  # within tolerance
    assert replayed.verdict("bfloat16", 20, 0.5, 0.05, [0.03, 0.07]) == "disagrees"
    assert replayed.verdict("bfloat16", 0, None, None, None) == "not validated"


# --- 4. and 5. the cost model and the projection ---------------------------------------------------

def test_decomposition_on_planted_r():
    # v = 1.2 from the n-gram arm; a draft arm at K = 4 with c = 0.05 has r = 4 * 0.05 + 1.2.
    assert replayed.decompose(1.4, 4, 1.2) == pytest.approx(0.05)
    assert replayed.decompose(1.4, 4, None) is None
    fit = replayed.k_sweep([(2, 2 * 0.1 + 1.3), (4, 4 * 0.1 + 1.3), (6, 6 * 0.1 + 1.3)])
    assert fit["c"] == pytest.approx(0.1) and fit["v"] == pytest.approx(1.3)
    assert replayed.k_sweep([(3, 1.4), (3, 1.5)]) is None  # one K: no sweep


def test_cost_model_recovers_the_simulated_step_cost(exact):
    _, _, results = exact
    model = results["replay"]["cost_model"]
    # Simulated: a step costs 1 + f K c target steps, so r_ngram ~ 1 + 0.6 * 3 * 0.01 and c ~ 0.12.
    assert model["v"]["value"] == pytest.approx(1.02, abs=0.06)
    for arm in ("generic", "finetuned"):
        entry = model["arms"][arm]
        assert entry["c"] == pytest.approx(COST_RATIO[arm], abs=0.03)
        assert entry["c_ci"][0] < entry["c"] < entry["c_ci"][1]
        assert entry["r"]["value"] == pytest.approx(entry["tokens_per_step"] / entry["speedup"], rel=1e-4)
    assert model["k_sweep"] == {} and "none was run" in model["assumption"]
    assert "upper bound" not in json.dumps(model) and "both directions" in model["served_alone"]


def test_projection_arithmetic(exact):
    assert replayed.project(2.0, 1.0, 1.25) == pytest.approx((1.6, 1.25))
    assert replayed.project(1.2, 0.5, 1.25) == pytest.approx((0.96, 1.5))  # tokens/step = f tau + 1 - f
    _, _, results = exact
    projection = results["replay"]["projection"]
    assert projection["label"] == "projection" and "GPU runs" in projection["note"]
    row = next(r for r in projection["rows"] if (r["arm"], r["task"], r["stratum"]) == ("generic", ALL, ALL))
    assert [x["r"] for x in row["ratios"]][1:] == [r for _, r in replayed.SPEC_BENCH]
    cpu = row["ratios"][0]
    assert cpu["r"] == results["replay"]["cost_model"]["arms"]["generic"]["r"]["value"]
    for ratio in row["ratios"]:
        assert ratio["speedup"] == pytest.approx(row["tokens_per_step"] / ratio["r"], rel=1e-4)


# --- 6. the profile, the report, and runs without a replay -------------------------------------------

def test_match_rate_profile_counts_every_scored_position(exact):
    run_dir, _, results = exact
    profile = results["replay"]["profiles"]["generic"]
    targets, matches = _targets(run_dir), _matches(run_dir, "generic")
    scored = sum(t["served_tokens"] - 1 for t in targets.values())
    hits = sum(matches[p]["match"][1:t["served_tokens"]].count("1") for p, t in targets.items())
    for kind in ("position", "context"):
        n, rate = np.array(profile[kind]["n"]), profile[kind]["rate"]
        assert n.sum() == scored
        assert sum(r * c for r, c in zip(rate, n) if r is not None) == pytest.approx(hits, rel=1e-4)
    assert "ngram" not in results["replay"]["profiles"]


def test_report_leads_with_the_replay(exact, tmp_path):
    run_dir, _, _ = exact
    results = write_report(run_dir, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    headings = [line[3:] for line in markdown.splitlines() if line.startswith("## ")]
    assert headings[:3] == ["Summary", "The run", REPLAY_HEADING]
    assert "Projection (not a measurement)" in markdown and "](figures/acceptance_context.png)" in markdown
    assert results["summary"][0].startswith("ngram (replay")
    assert results["schema"] == 4
    # One kind here (two draft models): their rows, with the cost model's r, and no cross-kind ratio.
    found = results["replay"]["kinds"]
    assert [r["arm"] for r in found["rows"]] == ["generic", "finetuned"] and found["ratios"] == []
    assert found["rows"][0]["r"] == results["replay"]["cost_model"]["arms"]["generic"]["r"]
    assert "Every drafter arm, by kind" in markdown and "Step cost of one kind" not in markdown


def test_a_run_without_replay_still_analyses(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=3, regimes=("sequential",))
    results = write_report(run_dir, tmp_path / "out")
    assert results["replay"] is None
    assert results["summary"][0] == replayed.NO_REPLAY
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"## {REPLAY_HEADING}\n\n{replayed.NO_REPLAY}" in markdown
    assert not (tmp_path / "out" / "figures" / "acceptance_context.png").exists()


def test_replayed_results_are_byte_identical_on_reanalysis(exact, tmp_path):
    run_dir, _, results = exact
    shuffled = write_synthetic_run(tmp_path / "run", replay=True, dtype="float32", shuffle_rows=True)
    again = compute_results(load_run(shuffled))
    assert results_json(compute_results(load_run(run_dir))) == results_json(results)
    assert results_json(again["replay"]) == results_json(results["replay"])


def test_a_one_prompt_stratum_is_collapsed_into_its_neighbour_for_the_interval():
    from analysis.stats import stratified_mean

    rng = np.random.default_rng(3)
    big, small, single = rng.normal(0.1, 0.2, 150), rng.normal(0.0, 0.2, 30), np.array([0.5])
    mean, interval = stratified_mean([(0.6, big), (0.39, small), (0.01, single)])
    assert mean == pytest.approx(0.6 * big.mean() + 0.39 * small.mean() + 0.01 * 0.5)
    assert interval is not None and interval[0] < mean < interval[1]
    merged_mean, merged = stratified_mean([(0.6, big), (0.4, np.concatenate([small, single]))])
    # The one prompt keeps its own weight (0.01, its neighbours 0.013 each): nearly the merged interval.
    assert interval[1] - interval[0] == pytest.approx(merged[1] - merged[0], rel=0.05)


def test_the_replay_per_prompt_is_written_beside_the_report_and_sums_to_the_table(exact, tmp_path):
    from analysis.report import REPLAY_PROMPTS, write_report

    run_dir, _, results = exact
    write_report(run_dir, tmp_path / "a")
    write_report(run_dir, tmp_path / "b")
    assert (tmp_path / "a" / REPLAY_PROMPTS).read_bytes() == (tmp_path / "b" / REPLAY_PROMPTS).read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "a" / REPLAY_PROMPTS).read_text().splitlines()]
    served = [r for r in results["replay"]["acceptance"] if r["served"]]
    for row in served:
        if row["task"] != "all" and row["stratum"] != "all":
            mine = [p for p in rows if p["arm"] == row["arm"] and p["k"] == row["k"]
                    and p["task"] == row["task"] and p["stratum"] == row["stratum"]]
            assert len(mine) == row["n"]
            assert sum(p["accepted"] for p in mine) == row["accepted_tokens"]
            assert sum(p["drafts"] for p in mine) == row["drafts"]


def test_a_timed_k_sweep_in_cost_json_is_fitted_and_named(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", replay=True, dtype="float32")
    cost = json.loads((run_dir / "cost.json").read_text()) if (run_dir / "cost.json").exists() else {"arms": {}}
    cost["k_sweep"] = {"generic": {"points": [{"k": 1, "r": 1.35, "n": 8}, {"k": 3, "r": 1.65, "n": 8}],
                                   "fit": {"c": 0.15, "v": 1.2}, "method": "test"}}
    (run_dir / "cost.json").write_text(json.dumps(cost))
    model = compute_results(load_run(run_dir))["replay"]["cost_model"]
    sweep = model["k_sweep"]["generic"]
    assert sweep["source"] == "timed K sweep (cost.json)" and sweep["gammas"] == [1, 3]
    assert sweep["c"] == pytest.approx(0.15) and sweep["v"] == pytest.approx(1.2)
    assert "none was run" not in model["assumption"]


def test_the_summary_states_each_cross_kind_r_ratio_and_whether_it_excludes_one(exact):
    from analysis.schema import Results

    _, _, results = exact
    planted = json.loads(json.dumps(results))
    ratio = {"arm": "head", "kind": "eagle3", "reference": "generic", "reference_kind": "draft_model"}
    planted["replay"]["kinds"]["ratios"] = [
        {**ratio, "r_ratio": {"n": 28, "value": 0.86, "ci": [0.8, 0.93]}},
        {**ratio, "arm": "head-nq", "r_ratio": {"n": 28, "value": 0.97, "ci": [0.9, 1.05]}}]
    lines = replayed.summary_lines(Results.from_dict(planted))
    assert ("head (EAGLE-3 head) against generic (draft model), served: r ratio 0.860 [0.800, 0.930] over 28 prompts: "
            "its step is cheaper.") in lines
    assert any(line.startswith("head-nq (EAGLE-3 head)") and "not distinguishable" in line for line in lines)
