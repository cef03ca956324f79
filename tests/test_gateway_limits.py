"""The gateway's limits and exposure, against real gateway processes on
127.0.0.1 in front of the FAKE upstream (benchmarks/fake_upstream.py):
header size and count, slowloris, caps on messages and prompts, strict JSON,
auth before any body error, what /health, errors, /metrics and /docs
disclose; and a bounded load test: slow and oversized clients running
alongside ordinary streams leave those streams' recorded TTFT within 5 ms
(median) of a run without them."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import statistics
import threading
import time

import httpx
import pytest

from core.contracts import read_records
from core.processes import free_port
from service.settings import GatewaySettings
from test_gateway import launch, metric_samples, metric_sum, post, run_tag, start_fake

pytestmark = pytest.mark.slow

TOKEN, METRICS_TOKEN = "api-s3cret", "metrics-s3cret"
TOKEN_ENV = {"SPECDRIFT_LIMITS_TOKEN": TOKEN, "SPECDRIFT_LIMITS_METRICS_TOKEN": METRICS_TOKEN}
HEADER_TIMEOUT_S = BODY_TIMEOUT_S = 0.5
SLACK_S = 1.0  # scheduling on a busy 2-core machine


@pytest.fixture(scope="module")
def fake(stack, logs) -> str:
    return start_fake(stack, logs, "fake")


def settings(logs, fake, name: str, **overrides) -> GatewaySettings:
    return GatewaySettings(upstreams={"fake": [fake], "down": [f"http://127.0.0.1:{free_port()}"]},
                           records_path=logs / f"{name}.sqlite", **overrides)


@pytest.fixture(scope="module")
def limited(stack, logs, fake) -> dict:
    """A gateway with small limits, so that each is cheap to reach."""
    config = settings(logs, fake, "limited", max_header_bytes=8192, max_headers=30, header_timeout_s=HEADER_TIMEOUT_S,
                      body_timeout_s=BODY_TIMEOUT_S, max_messages=4, max_prompt_chars=200, max_prompt_tokens=8,
                      max_json_values=500)
    url, _ = launch(stack, logs, config)
    return {"url": url, "port": config.port, "records": config.records_path, "fake": fake}


@pytest.fixture(scope="module")
def authed(stack, logs, fake) -> dict:
    config = settings(logs, fake, "authed", auth_token_env="SPECDRIFT_LIMITS_TOKEN",
                      metrics_token_env="SPECDRIFT_LIMITS_METRICS_TOKEN")
    url, _ = launch(stack, logs, config, env=TOKEN_ENV)
    return {"url": url, "records": config.records_path}


def raw_request(port: int, data: bytes, timeout_s: float = 10.0) -> tuple[bytes, float]:
    """Send bytes on a fresh connection; return what came back until the gateway closed it, and when."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    return bytes(answer), time.monotonic() - started


def status_and_error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


def request_head(extra: bytes = b"", content_length: int | None = None) -> bytes:
    length = b"" if content_length is None else b"content-length: %d\r\n" % content_length
    return (b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n"
            b"content-type: application/json\r\n" + length + extra + b"\r\n")


def still_serves(gateway: dict) -> None:
    answer = post(gateway["url"], "/v1/completions", {"model": "fake", "prompt": "fake:tokens=2"})
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == " t100 t101"


# --- headers --------------------------------------------------------------------------------

def test_oversized_headers_are_refused_before_any_route(limited):
    answer, _ = raw_request(limited["port"], request_head(b"x-big: " + b"a" * 12_000 + b"\r\n", 2) + b"{}")
    status, error = status_and_error(answer)
    assert status == 431 and error["code"] == 431 and error["type"] == "invalid_request_error"
    many = b"".join(b"x-h%d: v\r\n" % n for n in range(31))
    status, error = status_and_error(raw_request(limited["port"], request_head(many, 2) + b"{}")[0])
    assert status == 431 and "more than 30 headers" in error["message"]
    # 16 MiB of header: refused after the first reads, not buffered; the client may see only the reset.
    answer, elapsed = raw_request(limited["port"], request_head(b"x-huge: " + b"a" * (16 << 20)))
    assert elapsed < 5 and (not answer or status_and_error(answer)[0] == 431)
    samples = metric_samples(limited["url"])
    assert metric_sum(samples, "specdrift_rejected_requests_total", reason="headers_too_large") >= 1
    assert metric_sum(samples, "specdrift_rejected_requests_total", reason="headers_too_many") >= 1
    still_serves(limited)


# --- slowloris ------------------------------------------------------------------------------

def test_half_sent_requests_are_closed_within_the_bound(limited):
    def half_sent(data: bytes) -> tuple[bytes, float]:
        return raw_request(limited["port"], data)

    cases = ([b""] * 10 + [b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"] * 30
             + [request_head(content_length=1000) + b'{"model": "fake", "prompt": '] * 20)
    run = run_tag()
    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(half_sent, [c.replace(b"host:", b"x-specdrift-run: %s\r\nhost:" % run.encode())
                                            for c in cases]))
    for answer, elapsed in results:
        assert elapsed < max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + SLACK_S
        status, error = status_and_error(answer)
        assert status == 408 and error["code"] == 408 and "not received within 0.5 s" in error["message"]
    assert read_records(limited["records"], run) == []
    still_serves(limited)


# --- bodies ---------------------------------------------------------------------------------

def chat(messages: list) -> dict:
    return {"model": "fake", "messages": messages}


USER = {"role": "user", "content": "fake:tokens=1"}
REFUSED = [
    ("too many messages", "/v1/chat/completions", chat([USER] * 5), 422, "messages"),
    ("a message too long", "/v1/chat/completions", chat([{"role": "user", "content": "x" * 201}]), 422, "messages"),
    ("too many content parts", "/v1/chat/completions",
     chat([{"role": "user", "content": [{"type": "text", "text": "x"}] * 5}]), 422, "messages"),
    ("a text part too long", "/v1/chat/completions",
     chat([{"role": "user", "content": [{"type": "text", "text": "x" * 201}]}]), 422, "messages"),
    ("a prompt too long", "/v1/completions", {"model": "fake", "prompt": "x" * 201}, 422, "prompt"),
    ("too many prompt tokens", "/v1/completions", {"model": "fake", "prompt": list(range(9))}, 422, "prompt"),
    ("too many JSON values", "/v1/completions", {"model": "fake", "prompt": "x", "extra": [1] * 600}, 413, None),
    ("300,000 invalid messages", "/v1/chat/completions", b'{"model": "fake", "messages": ['
     + b",".join([b'{"role":"x"}'] * 300_000) + b"]}", 413, None),
    ("NaN", "/v1/completions", b'{"model": "fake", "prompt": "x", "temperature": NaN}', 400, None),
    ("Infinity in a passed-through field", "/v1/completions", b'{"model": "fake", "prompt": "x", "top_p": -Infinity}',
     400, None),
    ("a number out of range", "/v1/completions", b'{"model": "fake", "prompt": "x", "temperature": 1e999}', 400, None),
]


@pytest.mark.parametrize("path, body, status, param", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_over_the_caps_or_not_json_is_an_openai_error_and_no_record(limited, path, body, status, param):
    run = run_tag()
    response = post(limited["url"], path, body, run)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert read_records(limited["records"], run) == []


def test_at_the_caps_is_accepted_and_stream_null_means_false(limited):
    run = run_tag()
    assert post(limited["url"], "/v1/chat/completions", chat([{"role": "user", "content": "x" * 200}] * 3 + [USER]),
                run).status_code == 200
    assert post(limited["url"], "/v1/completions", {"model": "fake", "prompt": list(range(8)), "max_tokens": 1},
                run).status_code == 200
    answer = post(limited["url"], "/v1/completions", {"model": "fake", "prompt": "fake:tokens=2", "stream": None}, run)
    assert answer.status_code == 200 and answer.json()["object"] == "text_completion"
    records = read_records(limited["records"], run)
    assert [(r["status"], r["stream"]) for r in records] == [("ok", 0)] * 3


# --- auth and exposure ---------------------------------------------------------------------------

def test_with_auth_on_a_missing_token_is_401_before_any_body_error(authed):
    url = authed["url"]
    for body in (b'{"model": "fake", "prompt": ', b'{"temperature": NaN}', b"[1, 2]", {"model": "fake"}):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {METRICS_TOKEN}"}):
            response = post(url, "/v1/completions", body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
            assert response.headers["WWW-Authenticate"] == "Bearer"
    oversized = post(url, "/v1/completions", b"x" * (2 << 20))
    assert oversized.status_code == 401
    malformed = post(url, "/v1/completions", b'{"model": ', headers={"Authorization": f"Bearer {TOKEN}"})
    assert malformed.status_code == 400
    assert post(url, "/v1/completions", {"model": "fake", "prompt": "fake:tokens=1"},
                headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_with_auth_on_metrics_take_their_own_token_and_docs_the_apis(authed):
    url = authed["url"]
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert metrics.status_code == 200 and "specdrift_requests_total" in metrics.text
    for path in ("/docs", "/openapi.json", "/v1/models"):
        assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200


def test_metrics_stay_open_with_auth_only_when_told(stack, logs, fake):
    config = settings(logs, fake, "open-metrics", auth_token_env="SPECDRIFT_LIMITS_TOKEN", metrics_open=True,
                      expose_internals=True)
    url, _ = launch(stack, logs, config, env=TOKEN_ENV)
    assert httpx.get(url + "/metrics").status_code == 200
    assert httpx.get(url + "/docs").status_code == 401
    health = httpx.get(url + "/health").json()  # the debug setting shows the internals
    assert health["arms"]["fake"]["urls"] == [fake] and health["records"]["path"] == str(config.records_path)
    with pytest.raises(ValueError, match="exclude each other"):
        settings(logs, fake, "both", metrics_open=True, metrics_token_env="SPECDRIFT_LIMITS_METRICS_TOKEN")


def disclosed(text: str, gateway: dict) -> list[str]:
    return [secret for secret in ("http://", "127.0.0.1", gateway["fake"], str(gateway["records"]), ".sqlite")
            if secret in text]


def test_health_and_errors_disclose_no_upstream_url_or_path(limited):
    health = httpx.get(limited["url"] + "/health")
    assert health.status_code == 200 and disclosed(health.text, limited) == []
    assert health.json()["arms"]["fake"] == {"replicas": 1, "in_flight": 0}
    down = post(limited["url"], "/v1/completions", {"model": "down", "prompt": "x"})
    assert down.status_code == 503 and disclosed(down.text, limited) == []
    streamed = post(limited["url"], "/v1/completions", {"model": "down", "prompt": "x", "stream": True})
    assert streamed.status_code == 503 and disclosed(streamed.text, limited) == []
    for path, body in (("/v1/completions", {"model": "nope", "prompt": "x"}), ("/v1/nothing", {})):
        assert disclosed(post(limited["url"], path, body).text, limited) == []


# --- hostile clients do not stall other streams ----------------------------------------------------

STREAMS, STREAM_USERS = 80, 4


def ttft_median(url: str, records, run: str) -> float:
    body = {"model": "fake", "prompt": "fake:tokens=4", "stream": True, "max_tokens": 4}
    with concurrent.futures.ThreadPoolExecutor(STREAM_USERS) as pool:
        answers = list(pool.map(lambda _: post(url, "/v1/completions", body, run), range(STREAMS)))
    assert all(a.status_code == 200 for a in answers)
    rows = read_records(records, run)
    assert len(rows) == STREAMS and all(r["status"] == "ok" for r in rows)
    return statistics.median(r["ttft_s"] for r in rows)


def hostile_clients(port: int, stop: threading.Event) -> dict[str, int]:
    """Slowloris, oversized headers, oversized bodies and bodies at the JSON-values cap, until `stop`."""
    at_cap = json.dumps({"model": "fake", "messages": [{"role": "x"}] * 19_000}).encode()
    oversized = b"x" * (2 << 20)
    sent = {"slow": 0, "headers": 0, "bodies": 0, "at_cap": 0}

    def slowloris():
        while not stop.is_set():
            raw_request(port, b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            sent["slow"] += 1

    def huge_headers():
        while not stop.is_set():
            raw_request(port, request_head(b"x-huge: " + b"a" * (4 << 20)))
            sent["headers"] += 1
            time.sleep(0.02)

    def big_bodies():
        while not stop.is_set():
            raw_request(port, request_head(content_length=len(oversized)) + oversized)
            sent["bodies"] += 1
            time.sleep(0.02)

    def values_at_cap():
        while not stop.is_set():
            raw_request(port, request_head(content_length=len(at_cap)) + at_cap)
            sent["at_cap"] += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=slowloris) for _ in range(20)]
    threads += [threading.Thread(target=f) for f in (huge_headers, big_bodies, values_at_cap)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(10)
    return sent


def test_slow_and_oversized_clients_leave_other_streams_ttft_within_5_ms(stack, logs, fake):
    config = settings(logs, fake, "load", header_timeout_s=1.0, body_timeout_s=1.0)
    url, _ = launch(stack, logs, config)
    post(url, "/v1/completions", {"model": "fake", "prompt": "fake:tokens=1"})  # warm the upstream connection
    quiet = ttft_median(url, config.records_path, run_tag())
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hostile = pool.submit(hostile_clients, config.port, stop)
        time.sleep(0.5)
        try:
            busy = ttft_median(url, config.records_path, run_tag())
        finally:
            stop.set()
        sent = hostile.result(30)
    assert all(sent.values()), sent  # every kind of hostile client was running
    assert busy - quiet < 0.005, f"median TTFT {quiet * 1e3:.2f} ms quiet, {busy * 1e3:.2f} ms with {sent}"
