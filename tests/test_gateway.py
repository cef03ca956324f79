"""The gateway against the FAKE upstream (benchmarks/fake_upstream.py): every
error path, the OpenAI client, records, metrics, replicas, auth, durability.

These start small local servers (the fake and the gateway, about a second
each) and no model, so they are marked slow like every test that starts a
server; the real-vLLM tests are in test_gateway_e2e.py."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import hypothesis
import openai
import pytest
import schemathesis

from core.contracts import read_records
from core.processes import ProcessStack, free_port, start_child, wait_healthy
from service.launch import start_gateway
from service.settings import GatewaySettings

REPO = Path(__file__).resolve().parent.parent
FAKE_UPSTREAM = REPO / "benchmarks" / "fake_upstream.py"
VOCABULARY = {"task": ["gsm8k", "xsum"], "stratum": ["p0-64", "p64-256"]}

pytestmark = pytest.mark.slow


# --- processes ----------------------------------------------------------------

def start_fake(stack: ProcessStack, log_dir: Path, *served: str) -> str:
    port = free_port()
    cmd = [sys.executable, str(FAKE_UPSTREAM), "--port", str(port)]
    for name in served:
        cmd += ["--served-model", name]
    child = stack.add(start_child(f"fake upstream {port}", cmd, log_dir / f"fake-{port}.log"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(child, url + "/health", 30, interval_s=0.1)
    return url


def launch(stack: ProcessStack, log_dir: Path, settings: GatewaySettings, env: dict | None = None) -> tuple[str, object]:
    """Start a gateway child from explicit settings; returns (url, child)."""
    settings.port = free_port()
    path = log_dir / f"gateway-{settings.port}.json"
    path.write_text(settings.model_dump_json())
    child = stack.add(start_child("gateway", [sys.executable, "-m", "service.server", "--settings", str(path)],
                                  log_dir / f"gateway-{settings.port}.log", env={**os.environ, **(env or {})}))
    url = f"http://127.0.0.1:{settings.port}"
    wait_healthy(child, url + "/health", 60, interval_s=0.1)
    return url, child


@pytest.fixture(scope="module")
def fake(stack, logs) -> str:
    return start_fake(stack, logs, "fake")


@pytest.fixture(scope="module")
def gateway(stack, logs, fake, cpu_config) -> dict:
    """A gateway started the way `specdrift serve` does, in front of the fake
    and of a port where nothing listens."""
    records = logs / "records.sqlite"
    url = start_gateway(cpu_config, {"fake": [fake], "down": [f"http://127.0.0.1:{free_port()}"]}, logs / "main",
                        stack, records_path=records, port=0, run_ids=["known-run"], vocabulary=VOCABULARY)
    return {"url": url, "records": records, "fake": fake}


def run_tag() -> str:
    return "t-" + uuid.uuid4().hex[:12]


def post(url: str, path: str, body, run: str | None = None, **kwargs) -> httpx.Response:
    headers = {"X-Specdrift-Run": run} if run else {}
    headers.update(kwargs.pop("headers", {}))
    if isinstance(body, (dict, list)):
        kwargs["json"] = body
    else:
        kwargs["content"] = body
        headers.setdefault("content-type", "application/json")
    return httpx.post(url + path, headers=headers, timeout=30, **kwargs)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric_samples(url: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric_sum(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and all((k, v2) in lab for k, v2 in labels.items()))


def wait_for(predicate, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


# --- the OpenAI client ----------------------------------------------------------

def test_openai_client_streaming_and_not(gateway):
    run = run_tag()
    client = openai.OpenAI(base_url=gateway["url"] + "/v1", api_key="unused", max_retries=0,
                           default_headers={"X-Specdrift-Run": run, "X-Specdrift-Task": "gsm8k"})
    chat = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "fake:tokens=3"}])
    assert chat.choices[0].message.content == " t100 t101 t102"
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 3
    assert chat.model == "fake"

    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "fake:tokens=4"}], stream=True) if c.choices]
    assert "".join(p for p in pieces if p) == " t100 t101 t102 t103"

    text = client.completions.create(model="fake", prompt="fake:tokens=2 fake:burst=2")
    assert text.choices[0].text == " t100 t101" and text.usage.completion_tokens == 2

    chunks = list(client.completions.create(model="fake", prompt="fake:tokens=5", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " t100 t101 t102 t103 t104"
    assert chunks[-1].usage.completion_tokens == 5  # asked for usage: the usage chunk comes through
    assert [m.id for m in client.models.list()] == ["fake", "down"]

    records = read_records(gateway["records"], run)
    assert [r["endpoint"] for r in records] == ["chat", "chat", "completions", "completions"]
    assert [r["stream"] for r in records] == [0, 1, 0, 1]
    assert all(r["status"] == "ok" and r["http_status"] == 200 and r["task"] == "gsm8k" for r in records)
    assert [r["completion_tokens"] for r in records] == [3, 4, 2, 5]
    assert all(r["output_hash_kind"] == "token_ids" for r in records)
    assert [r["spec_drafts"] for r in records] == [3, 4, 1, 5]  # the fake: one verify step per chunk
    assert records[2]["spec_accepted_per_pos"] == "[1, 0, 0]"  # one step that accepted one draft
    timed = records[1]
    assert timed["t_start"] <= timed["t_first_token"] <= timed["t_end"]
    assert len(json.loads(timed["itl_json"])) == 3
    assert timed["tpot_s"] == pytest.approx((timed["t_end"] - timed["t_first_token"]) / 3, abs=1e-6)  # epoch floats


def test_every_request_gets_an_id_that_names_its_record(gateway):
    run = run_tag()
    response = post(gateway["url"], "/v1/completions", {"model": "fake", "prompt": "fake:tokens=2"}, run)
    request_id = response.headers["X-Specdrift-Request-Id"]
    assert [r["request_id"] for r in read_records(gateway["records"], run)] == [request_id]
    assert post(gateway["url"], "/v1/completions", b"{", run).headers["X-Specdrift-Request-Id"]
    assert httpx.get(gateway["url"] + "/health").headers["X-Specdrift-Request-Id"]


def test_injected_fields_reach_the_client_only_when_asked(gateway):
    body = {"model": "fake", "prompt": "fake:tokens=3", "stream": True}
    plain = sse_events(post(gateway["url"], "/v1/completions", body))
    assert plain[-1] == "[DONE]"
    assert all("usage" not in e and "token_ids" not in e["choices"][0] for e in plain[:-1])
    asked = sse_events(post(gateway["url"], "/v1/completions", {**body, "return_token_ids": True}))
    assert [e["choices"][0]["token_ids"] for e in asked[:-1]] == [[100], [101], [102]]
    whole = post(gateway["url"], "/v1/chat/completions", {
        "model": "fake", "messages": [{"role": "user", "content": "fake:tokens=2"}], "return_token_ids": True}).json()
    assert whole["choices"][0]["token_ids"] == [100, 101]


def test_gateway_applies_its_max_tokens_bound_when_the_client_sets_none(gateway, cpu_config):
    run = run_tag()
    post(gateway["url"], "/v1/completions", {"model": "fake", "prompt": "fake:tokens=1"}, run)
    assert read_records(gateway["records"], run)[0]["max_tokens"] == cpu_config.gateway.max_tokens_limit


# --- requests refused before they are accepted -------------------------------------

REFUSED = [
    ("malformed JSON", b'{"model": "fake", "prompt": ', {}, 400, None),
    ("body not an object", b"[1, 2]", {}, 422, None),
    ("missing prompt", {"model": "fake"}, {}, 422, "prompt"),
    ("stream not a bool", {"model": "fake", "prompt": "x", "stream": "yes"}, {}, 422, "stream"),
    ("two sequences", {"model": "fake", "prompt": "x", "n": 2}, {}, 422, "n"),
    ("two prompts", {"model": "fake", "prompt": ["a", "b"]}, {}, 422, "prompt"),
    ("max_tokens over the limit", {"model": "fake", "prompt": "x", "max_tokens": 10 ** 6}, {}, 422, "max_tokens"),
    ("unknown arm", {"model": "nope", "prompt": "x"}, {}, 404, "model"),
    ("bad tag value", {"model": "fake", "prompt": "x"}, {"X-Specdrift-Task": "a b"}, 400, "headers"),
    ("overlong tag", {"model": "fake", "prompt": "x"}, {"X-Specdrift-Prompt-Id": "x" * 129}, 400, "headers"),
]


@pytest.mark.parametrize("body, headers, status, param", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_requests_answer_openai_errors_and_leave_no_record(gateway, body, headers, status, param):
    run = run_tag()
    response = post(gateway["url"], "/v1/completions", body, run, headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"] and error["param"] == param
    assert "X-Specdrift-Error-Source" not in response.headers
    assert read_records(gateway["records"], run) == []


def test_chat_max_completion_tokens_is_bounded_too(gateway):
    body = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10 ** 6}
    response = post(gateway["url"], "/v1/chat/completions", body)
    assert response.status_code == 422 and response.json()["error"]["param"] == "max_completion_tokens"


def test_unknown_routes_and_methods_answer_openai_errors(gateway):
    assert httpx.get(gateway["url"] + "/v1/nothing").json()["error"]["code"] == 404
    assert httpx.get(gateway["url"] + "/v1/completions").json()["error"]["code"] == 405


def test_oversized_bodies_are_refused_before_being_read(gateway, cpu_config):
    limit = cpu_config.gateway.max_body_bytes
    big = json.dumps({"model": "fake", "prompt": "x" * limit}).encode()
    declared = post(gateway["url"], "/v1/completions", big)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == 413

    def chunked():
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    streamed = httpx.post(gateway["url"] + "/v1/completions", content=chunked(),
                          headers={"content-type": "application/json"}, timeout=30)
    assert streamed.status_code == 413
    samples = metric_samples(gateway["url"])
    assert metric_sum(samples, "specdrift_rejected_requests_total", reason="body_too_large") >= 2


# --- upstream trouble ------------------------------------------------------------

def test_arm_down_is_503_and_recorded(gateway):
    run = run_tag()
    response = post(gateway["url"], "/v1/completions", {"model": "down", "prompt": "x"}, run)
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "upstream_unavailable"
    assert response.headers["X-Specdrift-Error-Source"] == "upstream"
    [record] = read_records(gateway["records"], run)
    assert (record["status"], record["http_status"], record["upstream"]) == ("upstream_unavailable", 503, None)


def test_arm_hanging_up_without_an_answer_is_retried_once_then_503(gateway):
    run = run_tag()
    before = httpx.get(gateway["fake"] + "/stats").json()["hung_up"]
    response = post(gateway["url"], "/v1/completions", {"model": "fake", "prompt": "fake:hangup=1"}, run)
    assert response.status_code == 503 and response.json()["error"]["type"] == "upstream_unavailable"
    assert httpx.get(gateway["fake"] + "/stats").json()["hung_up"] == before + 2
    [record] = read_records(gateway["records"], run)
    assert record["status"] == "upstream_unavailable" and "ServerDisconnectedError" in record["error"]


@pytest.mark.parametrize("status", [400, 500])
def test_arm_refusals_pass_through_with_their_status(gateway, status):
    run = run_tag()
    response = post(gateway["url"], "/v1/completions", {"model": "fake", "prompt": f"fake:status={status}"}, run)
    assert response.status_code == status
    assert response.json()["error"]["message"] == "fake upstream refused"
    assert response.headers["X-Specdrift-Error-Source"] == "upstream"
    [record] = read_records(gateway["records"], run)
    assert (record["status"], record["http_status"]) == ("upstream_error", status)


def test_arm_dying_mid_stream_ends_the_stream_with_an_error_event(gateway):
    run = run_tag()
    body = {"model": "fake", "prompt": "fake:tokens=10 fake:die_after=3", "stream": True}
    events = sse_events(post(gateway["url"], "/v1/completions", body, run))
    assert [e["choices"][0]["text"] for e in events[:3]] == [" t100", " t101", " t102"]
    assert events[3]["error"]["type"] == "upstream_died" and events[4] == "[DONE]"
    client = openai.OpenAI(base_url=gateway["url"] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.completions.create(model="fake", prompt="fake:tokens=10 fake:die_after=3", stream=True,
                                           extra_headers={"X-Specdrift-Run": run}):
            pass
    whole = post(gateway["url"], "/v1/completions", {**body, "stream": False}, run)
    assert whole.status_code == 502 and whole.json()["error"]["type"] == "upstream_died"
    records = read_records(gateway["records"], run)
    assert [(r["status"], r["http_status"], r["completion_tokens"]) for r in records] == [
        ("upstream_died", 200, 3), ("upstream_died", 200, 3), ("upstream_died", 502, 3)]


def test_arm_error_event_reaches_the_client_and_the_record(gateway):
    run = run_tag()
    body = {"model": "fake", "prompt": "fake:tokens=5 fake:error_after=2", "stream": True}
    events = sse_events(post(gateway["url"], "/v1/completions", body, run))
    assert events[2]["error"]["message"] == "fake upstream failed mid-stream" and events[3] == "[DONE]"
    [record] = read_records(gateway["records"], run)
    assert record["status"] == "upstream_error" and "fake upstream failed" in record["error"]


@pytest.mark.parametrize("directive, status", [("nodone=1", "upstream_died"), ("badjson=1", "upstream_error")])
def test_malformed_streams_are_errors(gateway, directive, status):
    run = run_tag()
    body = {"model": "fake", "prompt": f"fake:tokens=2 fake:{directive}", "stream": True}
    events = sse_events(post(gateway["url"], "/v1/completions", body, run))
    assert events[-2]["error"]["type"] == status and events[-1] == "[DONE]"
    assert read_records(gateway["records"], run)[0]["status"] == status


def test_timeouts_are_504_before_the_first_event_and_an_error_event_after(stack, logs, fake):
    records = logs / "timeouts.sqlite"
    url, _ = launch(stack, logs, GatewaySettings(upstreams={"fake": [fake]}, records_path=records, read_timeout_s=0.3))
    run = run_tag()
    late = post(url, "/v1/completions", {"model": "fake", "prompt": "fake:first_ms=1500", "stream": True}, run)
    assert late.status_code == 504 and late.json()["error"]["type"] == "upstream_timeout"
    stalled = post(url, "/v1/completions", {"model": "fake", "prompt": "fake:tokens=3 fake:delay_ms=1500",
                                            "stream": True}, run)
    assert stalled.status_code == 200
    events = sse_events(stalled)
    assert events[0]["choices"][0]["text"] == " t100" and events[1]["error"]["type"] == "upstream_timeout"
    assert [(r["status"], r["http_status"]) for r in read_records(records, run)] == [
        ("upstream_timeout", 504), ("upstream_timeout", 200)]


# --- the client going away ------------------------------------------------------------

def test_client_disconnect_cancels_the_upstream_and_is_recorded(gateway):
    run = run_tag()
    aborted_before = httpx.get(gateway["fake"] + "/stats").json()["aborted"]
    body = {"model": "fake", "prompt": "fake:tokens=500 fake:delay_ms=10", "stream": True}
    with httpx.stream("POST", gateway["url"] + "/v1/completions", json=body, headers={"X-Specdrift-Run": run},
                      timeout=30) as response:
        for n, _ in enumerate(response.iter_lines()):
            if n == 6:
                break
    assert wait_for(lambda: httpx.get(gateway["fake"] + "/stats").json()["aborted"] == aborted_before + 1)
    [record] = wait_for(lambda: read_records(gateway["records"], run))
    assert record["status"] == "client_disconnect" and 2 <= record["completion_tokens"] < 500

    # A non-streaming client that gives up waiting is a disconnect too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway["url"] + "/v1/completions", json={**body, "stream": False},
                   headers={"X-Specdrift-Run": run}, timeout=httpx.Timeout(5, read=0.3))
    assert wait_for(lambda: httpx.get(gateway["fake"] + "/stats").json()["aborted"] == aborted_before + 2)
    assert wait_for(lambda: len(read_records(gateway["records"], run)) == 2)
    assert read_records(gateway["records"], run)[1]["status"] == "client_disconnect"
    assert httpx.get(gateway["url"] + "/health").json()["arms"]["fake"]["in_flight"] == 0


# --- replicas and remote arms -----------------------------------------------------------

def test_replicas_share_load_by_outstanding_requests_and_skip_a_dead_one(stack, logs):
    import concurrent.futures

    first, second = start_fake(stack, logs, "pair"), start_fake(stack, logs, "pair")
    dead = f"http://127.0.0.1:{free_port()}"
    records = logs / "replicas.sqlite"
    url, _ = launch(stack, logs, GatewaySettings(upstreams={"pair": [dead, first, second]}, records_path=records))
    run = run_tag()
    body = {"model": "pair", "prompt": "fake:tokens=20 fake:delay_ms=20"}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: post(url, "/v1/completions", body, run), range(6)))
    assert all(a.status_code == 200 for a in answers)
    started = [httpx.get(u + "/stats").json()["started"] for u in (first, second)]
    assert started == [3, 3]
    assert sorted({r["upstream"] for r in read_records(records, run)}) == sorted([first, second])


def test_remote_arm_serving_another_model_name(stack, logs):
    upstream = start_fake(stack, logs, "org/remote-model")
    url, _ = launch(stack, logs, GatewaySettings(upstreams={"remote": [upstream]}, records_path=logs / "remote.sqlite"))
    answer = wait_for(lambda: (r := post(url, "/v1/completions", {"model": "remote", "prompt": "fake:tokens=1"}))
                      .status_code == 200 and r)
    assert answer.json()["model"] == "remote"


# --- auth ---------------------------------------------------------------------------------

def test_bearer_token_guards_the_api_and_metrics_but_not_health(stack, logs, fake):
    settings = GatewaySettings(upstreams={"fake": [fake]}, records_path=logs / "auth.sqlite",
                               auth_token_env="SPECDRIFT_TEST_TOKEN")
    url, _ = launch(stack, logs, settings, env={"SPECDRIFT_TEST_TOKEN": "s3cret"})
    body = {"model": "fake", "prompt": "fake:tokens=1"}
    assert post(url, "/v1/completions", body).status_code == 401
    wrong = post(url, "/v1/completions", body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/v1/models").status_code == 401
    assert post(url, "/v1/completions", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert openai.OpenAI(base_url=url + "/v1", api_key="s3cret").completions.create(
        model="fake", prompt="fake:tokens=1").choices[0].text == " t100"
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_auth_with_unset_token_variable_fails_at_start(cpu_config, fake, tmp_path):
    from core.processes import StartupError

    config = cpu_config.model_copy(deep=True)
    config.gateway.auth_token_env = "SPECDRIFT_TOKEN_THAT_IS_NOT_SET"
    with ProcessStack() as stack, pytest.raises(StartupError, match="SPECDRIFT_TOKEN_THAT_IS_NOT_SET"):
        start_gateway(config, {"fake": [fake]}, tmp_path, stack, records_path=tmp_path / "r.sqlite", port=0,
                      vocabulary=VOCABULARY)


def test_busy_port_fails_clearly(cpu_config, gateway, tmp_path):
    from core.processes import StartupError

    port = int(gateway["url"].rsplit(":", 1)[1])
    with ProcessStack() as stack, pytest.raises(StartupError, match="already in use"):
        start_gateway(cpu_config, {"fake": [gateway["fake"]]}, tmp_path, stack, port=port, vocabulary=VOCABULARY)


# --- metrics ------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (.ci/run installs prometheus)")
def test_metrics_pass_promtool_and_equal_the_records(gateway, tmp_path):
    run = "known-run"  # in the run vocabulary: its own label value
    for prompt, stream in [("fake:tokens=4 fake:burst=2", True), ("fake:tokens=3 fake:burst=3", False),
                           ("fake:tokens=5", True), ("fake:tokens=6 fake:die_after=1", True)]:
        post(gateway["url"], "/v1/completions", {"model": "fake", "prompt": prompt, "stream": stream}, run,
             headers={"X-Specdrift-Task": "xsum", "X-Specdrift-Stratum": "p64-256"})
    exposition = httpx.get(gateway["url"] + "/metrics").text
    check = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    records = [r for r in read_records(gateway["records"], run) if r["task"] == "xsum"]
    samples = metric_samples(gateway["url"])
    labels = {"run": run, "arm": "fake", "task": "xsum", "stratum": "p64-256"}
    for status in ("ok", "upstream_died"):
        assert metric_sum(samples, "specdrift_requests_total", status=status, **labels) == sum(
            r["status"] == status for r in records)
    for metric, column in [("specdrift_spec_decode_drafts_total", "spec_drafts"),
                           ("specdrift_spec_decode_draft_tokens_total", "spec_draft_tokens"),
                           ("specdrift_spec_decode_accepted_tokens_total", "spec_accepted_tokens")]:
        assert metric_sum(samples, metric, **labels) == sum(r[column] or 0 for r in records) > 0
    for position in range(3):
        assert metric_sum(samples, "specdrift_spec_decode_accepted_tokens_per_pos_total", position=str(position),
                          **labels) == sum(json.loads(r["spec_accepted_per_pos"])[position]
                                           for r in records if r["spec_accepted_per_pos"])
    ok = [r for r in records if r["status"] == "ok"]
    assert metric_sum(samples, "specdrift_completion_tokens_sum", **labels) == sum(r["completion_tokens"] for r in ok)
    assert metric_sum(samples, "specdrift_inter_token_latency_seconds_count", **labels) == sum(
        len(json.loads(r["itl_json"])) for r in ok if r["itl_json"])
    assert metric_sum(samples, "specdrift_request_duration_seconds_sum", **labels) == pytest.approx(
        sum(r["e2e_s"] for r in ok))
    assert metric_sum(samples, "specdrift_upstream_errors_total", arm="fake", kind="died") >= 1
    assert metric_sum(samples, "specdrift_requests_in_flight", arm="fake") == 0


def test_label_values_stay_bounded_whatever_clients_send(gateway):
    for n in range(40):
        post(gateway["url"], "/v1/completions", {"model": "fake", "prompt": "fake:tokens=1"}, f"run{n}",
             headers={"X-Specdrift-Task": f"task{n}", "X-Specdrift-Stratum": f"s{n}"})
    samples = metric_samples(gateway["url"])
    seen = {(dict(labels).get("run"), dict(labels).get("task"), dict(labels).get("stratum"))
            for (name, labels), _ in samples.items() if name == "specdrift_requests_total"}
    runs, tasks, strata = (set(column) for column in zip(*seen))
    assert runs <= {"none", "other", "known-run"}
    assert tasks <= {"none", "other", *VOCABULARY["task"]}
    assert strata <= {"none", "other", *VOCABULARY["stratum"]}
    assert ("other", "other", "other") in seen


# --- durability ---------------------------------------------------------------------------

def test_acknowledged_records_survive_a_killed_gateway(stack, logs, fake):
    records = logs / "durable.sqlite"
    settings = GatewaySettings(upstreams={"fake": [fake]}, records_path=records)
    url, child = launch(stack, logs, settings)
    run = run_tag()
    ids = [post(url, "/v1/completions", {"model": "fake", "prompt": "fake:tokens=2", "stream": n % 2 == 0}, run)
           .headers["X-Specdrift-Request-Id"] for n in range(20)]
    os.killpg(child.pid, signal.SIGKILL)  # no shutdown, no flush: only what was committed survives
    child.proc.wait(10)
    assert [r["request_id"] for r in read_records(records, run)] == ids

    url, _ = launch(stack, logs, settings)  # a restarted gateway appends to the same store
    post(url, "/v1/completions", {"model": "fake", "prompt": "fake:tokens=2"}, run)
    assert len(read_records(records, run)) == 21


def test_requests_in_flight_when_the_gateway_stops_are_recorded(stack, logs, fake):
    records = logs / "shutdown.sqlite"
    url, child = launch(stack, logs, GatewaySettings(upstreams={"fake": [fake]}, records_path=records,
                                                     shutdown_grace_s=0.5))
    run = run_tag()
    with httpx.stream("POST", url + "/v1/completions", json={"model": "fake", "prompt": "fake:tokens=400 "
                      "fake:delay_ms=20", "stream": True}, headers={"X-Specdrift-Run": run}, timeout=30) as response:
        lines = response.iter_lines()
        next(lines)
        os.killpg(child.pid, signal.SIGTERM)
        child.proc.wait(10)  # uvicorn shuts down gracefully, then re-raises SIGTERM
    [record] = read_records(records, run)
    assert record["status"] == "gateway_shutdown" and record["http_status"] == 200


# --- fuzzing against the OpenAPI schema ------------------------------------------------------

def fuzz(url: str, mode: str, arms: list[str], max_examples: int) -> collections.Counter:
    """Schemathesis generates requests from /openapi.json (valid ones, or
    invalid ones) and runs all its checks on each answer; a 5xx is allowed
    only when the gateway marks the upstream as its cause. Valid requests
    name a real arm half the time, so they reach the upstream; one the arm
    refuses (vLLM checks more than the gateway's schema) is not counted as
    the gateway rejecting valid data."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.config import SchemathesisConfig
    from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    # 413 rejects too: the schema's caps on messages and prompts allow bodies over the body limit.
    config = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {
        "expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]}}})
    schema = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
    answers = collections.Counter()

    @hypothesis.given(case=schema.as_strategy(schemathesis.GenerationMode(mode)),
                      arm=hypothesis.strategies.sampled_from([None, *arms]))
    @hypothesis.settings(max_examples=max_examples, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    def check(case, arm):
        if mode == "positive" and arm and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = arm
        response = case.call(base_url=url, timeout=60)
        answers[response.status_code] += 1
        from_upstream = response.headers.get("x-specdrift-error-source") == ["upstream"]
        assert response.status_code < 500 or from_upstream, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")
        # The arm's own answers are its business: the assert above holds the gateway to its own.
        upstream_checks = [positive_data_acceptance, not_a_server_error]
        case.validate_response(response, excluded_checks=upstream_checks if from_upstream else None)

    check()
    return answers


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_get_no_5xx_of_the_gateways_own(gateway, mode):
    answers = fuzz(gateway["url"], mode, ["fake"], max_examples=150)
    if mode == "positive":
        assert answers[200] >= 10  # the fuzzing reached the upstream, not only the validation
