"""The analysis on synthetic run directories with known truth: acceptance,
the Leviathan model, pairing, figures recomputed independently from the
records, determinism, and robustness to dead arms, failures and small samples."""

from __future__ import annotations

import json
import math
import sqlite3

import numpy as np
import pandas as pd
import pytest

from analysis import acceptance
from analysis.cells import find_cell
from analysis.pairing import paired_requests, speed_units
from analysis.report import results_json, write_report
from analysis.results import compute_results
from analysis.rundir import load_run
from test_analysis_synthetic import ACCEPTANCE, COST_RATIO, DRAFT_PROBABILITY, K, write_synthetic_run


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(run directory, results) of the default synthetic run."""
    run_dir = write_synthetic_run(tmp_path_factory.mktemp("analysis") / "run")
    return run_dir, compute_results(load_run(run_dir))


# --- acceptance and the analytic model ----------------------------------------

def test_leviathan_worked_examples():
    # alpha = 0.8, gamma = 4: E = (1 - 0.8^5) / 0.2 = 3.3616; with c = 0.05: 3.3616 / 1.2 = 2.80133.
    assert acceptance.expected_tokens_per_step(0.8, 4) == pytest.approx(3.3616)
    assert acceptance.leviathan_speedup(0.8, 4, 0.05) == pytest.approx(3.3616 / 1.2)
    # alpha = 0.6, gamma = 3, c = 0: E = 1 + 0.6 + 0.36 + 0.216 = 2.176.
    assert acceptance.leviathan_speedup(0.6, 3, 0.0) == pytest.approx(2.176)
    # The limits: nothing accepted costs gamma c extra; everything accepted gives gamma + 1.
    assert acceptance.leviathan_speedup(0.0, 3, 0.1) == pytest.approx(1 / 1.3)
    assert acceptance.leviathan_speedup(1.0, 3, 0.1) == pytest.approx(4 / 1.3)


def test_model_with_steps_that_do_not_draft():
    # Half the steps draft (alpha 0.6, gamma 3: E = 2.176), 1.5 drafted tokens per step, c = 0.1:
    # (0.5 * 2.176 + 0.5) / (1.5 * 0.1 + 1) = 1.588 / 1.15.
    assert acceptance.leviathan_speedup(0.6, 3, 0.1, drafting_share=0.5, drafted_per_step=1.5) == \
        pytest.approx(1.588 / 1.15)
    assert acceptance.leviathan_speedup(0.6, 3, 0.1, drafting_share=1.0) == acceptance.leviathan_speedup(0.6, 3, 0.1)


def test_alpha_from_tau_inverts_the_expected_tokens():
    for alpha in (0.05, 0.3, 0.7, 0.95):
        assert acceptance.alpha_from_tau(acceptance.expected_tokens_per_step(alpha, 3), 3) == pytest.approx(alpha)
    assert acceptance.alpha_from_tau(1.0, 3) == 0.0
    assert acceptance.alpha_from_tau(4.0, 3) == 1.0


def test_cost_ratio_round_trips_through_the_model():
    speedup = acceptance.leviathan_speedup(0.6, 3, 0.15)
    tau = acceptance.expected_tokens_per_step(0.6, 3)
    assert acceptance.cost_ratio_from_speedup(tau, speedup, 3) == pytest.approx(0.15)


def test_decode_steps_give_tokens_per_step_and_drafting_share():
    # 100 decode tokens in 70 steps, 20 of which drafted (3 tokens each) and 30 tokens accepted.
    summary = acceptance.summarize(20, 60, 30, [15, 10, 5], k=3, decode_tokens=100, decode_steps=70)
    assert summary["tokens_per_step"] == pytest.approx(100 / 70)
    assert summary["drafting_share"] == pytest.approx(20 / 70)
    assert summary["drafted_per_step"] == pytest.approx(60 / 70)
    assert summary["tau"] == pytest.approx(2.5)


def test_acceptance_definitions_on_geometric_counts():
    """Counts as a geometric acceptance with p = 0.25, K = 3 produces them in
    expectation: vLLM's rate is (p + p^2 + p^3) / 3 = 0.109375 (DESIGN: 0.10,
    measured 0.099), while Leviathan's alpha is p."""
    p, drafts = 0.25, 64_000
    per_pos = [drafts * p, drafts * p ** 2, drafts * p ** 3]
    summary = acceptance.summarize(drafts, 3 * drafts, sum(per_pos), per_pos, k=3)
    assert summary["vllm_rate"] == pytest.approx(0.109375)
    assert summary["tau"] == pytest.approx(1 + p + p ** 2 + p ** 3)
    assert summary["alpha"] == pytest.approx(p)
    assert summary["alpha_from_tau"] == pytest.approx(p)
    assert summary["conditional"] == pytest.approx([p, p, p])
    assert summary["position_rate"] == pytest.approx([p, p ** 2, p ** 3])


def test_acceptance_without_drafts_is_empty_not_an_error():
    summary = acceptance.summarize(0, 0, 0, [], k=3)
    assert summary["tau"] is None and summary["alpha"] is None and summary["vllm_rate"] is None


# --- pairing -------------------------------------------------------------------

def _records(rows):
    columns = ["arm", "regime", "prompt_id", "request_id", "t_start", "tpot_s", "e2e_s", "output_hash",
               "output_hash_kind", "temperature"]
    return pd.DataFrame([dict(zip(columns, r)) for r in rows]).sort_values(["t_start", "request_id"])


def test_pairing_takes_the_reference_request_nearest_in_time():
    ok = _records([
        ("base", "sequential", "p1", "b1", 0.0, 0.040, 4.0, "h", "token_ids", 0.0),
        ("base", "sequential", "p1", "b2", 100.0, 0.020, 2.0, "x", "token_ids", 0.0),
        ("spec", "sequential", "p1", "s1", 98.0, 0.010, 1.0, "x", "token_ids", 0.0),
        ("spec", "concurrency-4", "p1", "s2", 99.0, 0.001, 0.1, "x", "token_ids", 0.0),  # no partner in its regime
    ])
    pairs = paired_requests(ok, "spec", "base")
    assert list(pairs["request_id_ref"]) == ["b2"]
    units = speed_units(pairs)
    assert units["log_tpot"].iloc[0] == pytest.approx(math.log(2.0))
    assert bool(units["identical"].iloc[0])


def test_several_requests_of_one_prompt_count_once():
    ok = _records([
        ("base", "concurrency-4", "p1", "b1", 0.0, 0.040, 4.0, "h", "token_ids", 0.0),
        ("spec", "concurrency-4", "p1", "s1", 1.0, 0.010, 1.0, "h", "token_ids", 0.0),
        ("spec", "concurrency-4", "p1", "s2", 2.0, 0.040, 4.0, "h", "token_ids", 0.0),
    ])
    units = speed_units(paired_requests(ok, "spec", "base"))
    assert len(units) == 1
    assert units["log_tpot"].iloc[0] == pytest.approx((math.log(4.0) + math.log(1.0)) / 2)


def test_baseline_against_itself_pairs_second_with_first():
    ok = _records([
        ("base", "sequential", "p1", "b1", 0.0, 0.020, 2.0, "h", "token_ids", 0.0),
        ("base", "sequential", "p1", "b2", 10.0, 0.025, 2.5, "g", "token_ids", 0.0),
        ("base", "sequential", "p2", "b3", 20.0, 0.020, 2.0, "h", "token_ids", 0.0),  # sent once: no pair
    ])
    units = speed_units(paired_requests(ok, "base", "base"))
    assert list(units["prompt_id"]) == ["p1"]
    assert units["log_tpot"].iloc[0] == pytest.approx(math.log(0.020 / 0.025))
    assert not bool(units["identical"].iloc[0])


def test_hashes_of_different_kinds_or_sampled_outputs_are_not_compared():
    ok = _records([
        ("base", "sequential", "p1", "b1", 0.0, 0.02, 2.0, "h", "token_ids", 0.0),
        ("spec", "sequential", "p1", "s1", 1.0, 0.02, 2.0, "h", "text", 0.0),
        ("base", "sequential", "p2", "b2", 2.0, 0.02, 2.0, "h", "token_ids", 0.7),
        ("spec", "sequential", "p2", "s2", 3.0, 0.02, 2.0, "h", "token_ids", 0.7),
    ])
    units = speed_units(paired_requests(ok, "spec", "base"))
    assert not units["comparable"].any()


# --- the analysis recovers the synthetic truth ------------------------------------

def test_alpha_recovers_the_simulated_acceptance(synthetic):
    _, results = synthetic
    for arm in ("generic", "finetuned", "ngram"):
        for task, p in ACCEPTANCE[arm].items():
            accepted = find_cell(results["cells"], arm, "sequential", task)["acceptance"]
            # Positions tried: every draft's first, plus each accepted position but the last.
            tried = accepted["drafts"] * (1 + p + p * p)
            assert accepted["alpha"] == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / tried)), (arm, task)
            # Geometric acceptance: both ways of getting alpha agree.
            assert accepted["alpha_from_tau"] == pytest.approx(accepted["alpha"], abs=0.03)


def test_cost_ratio_estimate_is_labelled_and_near_the_simulated_one(synthetic):
    _, results = synthetic
    for arm in ("ngram", "generic", "finetuned"):
        cost = results["cost"][arm]
        assert cost["source"] == "estimated from records"
        assert "circular" in cost["method"]
        assert cost["c"] == pytest.approx(COST_RATIO[arm], abs=0.02)


def test_drafting_share_separates_ngram_lookup_from_a_draft_model(synthetic):
    _, results = synthetic
    for arm in ("ngram", "generic"):
        accepted = find_cell(results["cells"], arm, "sequential")["acceptance"]
        assert accepted["drafting_share"] == pytest.approx(DRAFT_PROBABILITY[arm], abs=0.05)
        # Steps without a draft emit one token, so tokens per decode step stay below tau.
        assert accepted["tokens_per_step"] <= accepted["tau"]


def test_cost_json_is_used_when_present(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=3)
    (run_dir / "cost.json").write_text(json.dumps({"arms": {"generic": {
        "c": 0.3, "method": "timed 50 drafter and target forward passes", "draft_step_s": 0.0078,
        "target_step_s": 0.026, "n": 50}}}))
    results = compute_results(load_run(run_dir))
    assert results["cost"]["generic"]["source"] == "cost.json"
    assert results["cost"]["finetuned"]["source"] == "estimated from records"
    model = find_cell(results["cells"], "generic", "sequential")["model"]
    assert model["c"] == 0.3
    assert model["cost_factor"] == pytest.approx(1 / (K * 0.3 + 1), rel=1e-5)
    assert model["predicted_speedup"] == pytest.approx(
        acceptance.leviathan_speedup(model["alpha"], K, 0.3), rel=1e-5)


def test_speedup_falls_under_load_and_crosses_one(synthetic):
    _, results = synthetic
    generic = results["regimes"]["generic"]
    assert generic["status"] == "crosses"
    assert generic["crosses_between"] == ["sequential", "concurrency-4"]
    assert results["regimes"]["ngram"]["status"] == "above"


def test_under_load_arms_without_common_prompts_are_compared_unpaired(synthetic):
    """The synthetic concurrency regime cycles one prompt cursor through
    alternating arm blocks, as loadgen does, so arms share few prompts."""
    _, results = synthetic
    speedup = find_cell(results["cells"], "generic", "concurrency-4")["speedup"]
    assert speedup["paired"] is False
    assert speedup["tpot"]["n"] >= 3 and speedup["tpot"]["n_reference"] >= 3
    assert speedup["tpot"]["ci"][1] < 1  # simulated: speculation's step cost x4 under load
    assert find_cell(results["cells"], "generic", "sequential")["speedup"]["paired"] is True


def test_baseline_repeat_is_the_noise_floor(synthetic):
    _, results = synthetic
    repeat = find_cell(results["cells"], "baseline", "sequential")["speedup"]["tpot"]
    assert repeat["ci"][0] < 1 < repeat["ci"][1]
    assert find_cell(results["cells"], "baseline", "sequential")["speedup"]["reference"].startswith("baseline, repeat")


# --- independent recomputation from the database --------------------------------

def test_speedup_tau_and_agreement_recomputed_from_sqlite(synthetic):
    """Recompute three headline numbers with plain SQL and Python, as a
    reviewer would, and compare them with results.json."""
    run_dir, results = synthetic
    con = sqlite3.connect(run_dir / "records.sqlite")
    rows = con.execute("SELECT arm, prompt_id, t_start, tpot_s, output_hash, spec_drafts, spec_accepted_tokens "
                       "FROM requests WHERE status = 'ok' AND regime = 'sequential' "
                       "AND task NOT LIKE '%-like-%'").fetchall()
    con.close()
    base = {}
    for arm, prompt, t, tpot, h, _, _ in rows:
        if arm == "baseline":
            base.setdefault(prompt, []).append((t, tpot, h))
    logs, same, compared = [], 0, 0
    for arm, prompt, t, tpot, h, _, _ in rows:
        if arm != "ngram" or prompt not in base:
            continue
        _, ref_tpot, ref_hash = min(base[prompt], key=lambda r: abs(r[0] - t))
        logs.append(math.log(ref_tpot / tpot))
        same += h == ref_hash
        compared += 1
    cell = find_cell(results["cells"], "ngram", "sequential")
    assert cell["speedup"]["tpot"]["value"] == pytest.approx(math.exp(np.mean(logs)), rel=1e-5)
    assert cell["speedup"]["tpot"]["n"] == len(logs)
    assert (cell["lossless"]["identical"], cell["lossless"]["compared"]) == (same, compared)

    drafts = sum(r[5] for r in rows if r[0] == "finetuned")
    accepted = sum(r[6] for r in rows if r[0] == "finetuned")
    tau = find_cell(results["cells"], "finetuned", "sequential")["acceptance"]["tau"]
    assert tau == pytest.approx(1 + accepted / drafts, rel=1e-5)


def test_controls_are_their_own_group_and_not_pooled(synthetic):
    _, results = synthetic
    assert find_cell(results["cells"], "ngram", "sequential", "gsm8k-like-xsum") is not None
    pooled = find_cell(results["cells"], "ngram", "sequential")["prompts"]
    per_task = sum(find_cell(results["cells"], "ngram", "sequential", t)["prompts"] for t in ACCEPTANCE["ngram"])
    assert pooled == per_task
    control = results["controls"][0]
    assert (control["task"], control["like"], control["label"]) == ("gsm8k", "xsum", "gsm8k-like-xsum")
    # The control's prompts were drawn to look like xsum's: closer to xsum than gsm8k is.
    match = control["prompt_divergence"]
    assert match["control_vs_like"]["w1"] < match["task_vs_like"]["w1"]
    assert set(control["gains"]["finetuned"]) == {"gsm8k", "gsm8k-like-xsum", "xsum"}


def test_answer_compares_finetuned_with_its_generic_parent(synthetic):
    _, results = synthetic
    (answer,) = results["answer"]
    assert (answer["finetuned_arm"], answer["generic_arm"], answer["drafter"]) == ("finetuned", "generic", "finetuned")
    gsm8k = next(r for r in answer["rows"] if (r["task"], r["stratum"]) == ("gsm8k", "all"))
    xsum = next(r for r in answer["rows"] if (r["task"], r["stratum"]) == ("xsum", "all"))
    # Simulated: p 0.8 vs 0.55 on gsm8k, 0.52 vs 0.5 on xsum.
    assert gsm8k["tau_gain"]["ci"][0] > 0.4
    assert xsum["tau_gain"]["value"] < gsm8k["tau_gain"]["value"]
    assert gsm8k["speed_ratio"]["value"] > 1
    fit = answer["fits"]["tau_gain|js|total"]
    assert fit["spearman"]["n"] == answer["cells_in_fit"] == 5
    assert {"slope", "slope_within_task", "slope_within_stratum"} <= set(fit)


def test_divergence_tables_cover_tasks_drafters_and_datasets(synthetic):
    _, results = synthetic
    div = results["divergence"]
    assert div["tasks"] == ["gsm8k", "nq_open", "xsum"]
    js = div["matrices"]["prompt"]["js"]
    assert all(js[i][i] == 0 for i in range(3))
    assert js[0][1] == js[1][0] > 0
    finetuned = div["drafters"]["finetuned"]
    assert finetuned["gsm8k"]["prompt"]["js"] < finetuned["nq_open"]["prompt"]["js"]
    assert div["datasets"]["tasks"] == ["gsm8k", "nq_open", "xsum"]
    assert div["method"]["js_log_base"] == 2


def test_dataset_lengths_fall_back_to_the_train_split(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=2, regimes=("sequential",))
    (run_dir / "workload.build.json").unlink()
    run = load_run(run_dir)
    assert {task: len(v["prompt_tokens"]) for task, v in run.dataset_lengths.items()} == \
        {"gsm8k": 20, "nq_open": 20, "xsum": 20}
    assert "train split" in compute_results(run)["divergence"]["datasets"]["source"]
    assert "train" not in set(run.prompts["prompt_id"].str.split("-").str[1])  # never sent, never analysed


# --- determinism -------------------------------------------------------------------

def test_results_are_byte_identical_whatever_the_row_order(tmp_path):
    first = write_synthetic_run(tmp_path / "a", seed=4, per_cell=3)
    shuffled = write_synthetic_run(tmp_path / "b", seed=4, per_cell=3, shuffle_rows=True)
    text_a = results_json(compute_results(load_run(first)))
    assert text_a == results_json(compute_results(load_run(first)))
    assert text_a == results_json(compute_results(load_run(shuffled)))
    assert "NaN" not in text_a and "Infinity" not in text_a


# --- robustness ----------------------------------------------------------------------

def test_an_arm_that_died_mid_run(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=3, dies_after={"finetuned": 12})
    (run_dir / "state.json").write_text(json.dumps({"run_id": "synthetic-run", "phases": {},
                                                    "dead_arms": {"finetuned": "health check failed"}}))
    results = write_report(run_dir)
    failed = results["inputs"]["requests_by_status"]["finetuned"]["sequential"]["upstream_unavailable"]
    assert failed > 0
    coverage = results["inputs"]["coverage"]["finetuned"]["sequential"]
    assert coverage["prompts_ok"] == 12 and coverage["baseline_prompts_without_answer"] > 0
    assert any("gave up on arm finetuned" in line for line in results["summary"])
    con = sqlite3.connect(run_dir / "records.sqlite")
    (answered,) = con.execute("SELECT COUNT(DISTINCT prompt_id) FROM requests WHERE arm = 'finetuned' "
                              "AND status = 'ok' AND regime = 'sequential' AND task NOT LIKE '%-like-%'").fetchone()
    con.close()
    assert find_cell(results["cells"], "finetuned", "sequential")["prompts"] == answered
    assert "finetuned" in (run_dir / "report.md").read_text()


def test_an_arm_without_any_record(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=3)
    con = sqlite3.connect(run_dir / "records.sqlite")
    con.execute("DELETE FROM requests WHERE arm = 'generic'")
    con.commit()
    con.close()
    results = write_report(run_dir)
    assert results["inputs"]["arms_without_records"] == ["generic"]
    assert "no records for generic" in results["answer"][0]["missing"]
    assert results["cost"]["generic"]["c"] is None
    assert (run_dir / "report.html").exists()


def test_baseline_only_run_without_cards_or_workload(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=2, arms=("baseline",), regimes=("sequential",),
                                  cards=False)
    (run_dir / "workload.jsonl").unlink()
    (run_dir / "workload.build.json").unlink()
    results = write_report(run_dir)
    assert results["answer"] == [] and results["regimes"] == {} and results["controls"] == []
    assert any("not answered by this run" in line for line in results["summary"])
    assert find_cell(results["cells"], "baseline", "sequential")["speedup"]["tpot"]["n"] > 0


def test_tiny_sample_gives_no_intervals_and_says_so(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=1, regimes=("sequential",))
    results = write_report(run_dir)
    cell = find_cell(results["cells"], "generic", "sequential", "gsm8k", "p0-64")
    assert cell["speedup"]["tpot"]["n"] == 1 and cell["speedup"]["tpot"]["ci"] is None
    summary = " ".join(results["summary"])
    assert "too few cells" in summary or "small sample" in summary
    assert "Only one load regime" in summary


def test_sampled_outputs_are_not_judged_for_losslessness(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=2, regimes=("sequential",))
    con = sqlite3.connect(run_dir / "records.sqlite")
    con.execute("UPDATE requests SET temperature = 0.7")
    con.commit()
    con.close()
    config = run_dir / "config.resolved.yaml"
    config.write_text(config.read_text().replace("temperature: 0.0", "temperature: 0.7"))
    results = compute_results(load_run(run_dir))
    assert find_cell(results["cells"], "ngram", "sequential")["lossless"]["compared"] == 0
    assert any("losslessness was not assessed" in line for line in results["summary"])


def test_float32_run_is_called_an_exact_check(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=2, regimes=("sequential",), dtype="float32")
    results = compute_results(load_run(run_dir))
    assert any("float32" in line and "lossy" in line for line in results["summary"])


def test_a_run_where_every_request_failed(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=2, regimes=("sequential",))
    con = sqlite3.connect(run_dir / "records.sqlite")
    con.execute("UPDATE requests SET status = 'upstream_unavailable'")
    con.commit()
    con.close()
    results = write_report(run_dir)
    assert results["cells"] == [] and results["run"]["primary_regime"] is None
    assert any("answered no request successfully at all" in line for line in results["summary"])
    assert (run_dir / "report.html").exists()


def test_missing_records_database_is_a_clear_error(tmp_path):
    from analysis.rundir import RunDirError

    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="no records database"):
        load_run(tmp_path / "empty")


def test_records_are_read_from_a_live_wal_database(tmp_path):
    """The gateway writes in WAL mode; the analysis must see committed rows
    that are still in the -wal file (a run directory copied while live)."""
    run_dir = write_synthetic_run(tmp_path / "run", per_cell=2, regimes=("sequential",))
    writer = sqlite3.connect(run_dir / "records.sqlite")
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("UPDATE requests SET tpot_s = tpot_s * 2 WHERE arm = 'ngram'")
    writer.commit()
    try:
        assert (run_dir / "records.sqlite-wal").exists()
        run = load_run(run_dir)
        before = compute_results(run)
        assert find_cell(before["cells"], "ngram", "sequential")["speedup"]["tpot"]["value"] < 1
    finally:
        writer.close()
