"""The gateway against the HOSTILE upstream (tests/hostile_upstream.py, a test
double that misbehaves as a broken or malicious arm would): for each bad value,
and for random answers (hypothesis), the client gets an OpenAI-format error or
a clean stream end, the request has exactly one record, and the gateway
answers the next request. Also: counters that equal the records after a run
with clients leaving between their last token and [DONE], answers to requests
cut by shutdown, and a record writer that stops (the process exits non-zero).

These start the gateway as a child process (about a second), so they are
marked slow like every test that starts a server."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import hypothesis
import pytest
from hypothesis import strategies as st

from core.contracts import STATUSES, read_records
from core.processes import ProcessStack, free_port, start_child, wait_healthy
from hostile_upstream import MODEL, SCRIPTS, HostileUpstream, Script, good, hostile_scripts
from service.settings import GatewaySettings
from service.tags import Vocabulary
from test_gateway import metric_samples, metric_sum

pytestmark = pytest.mark.slow

OK, INVALID, ERROR, DIED = "ok", "upstream_invalid", "upstream_error", "upstream_died"
MAX_TOKENS = 16


def only_whole(chat: bool, stream: bool, endpoint_matters: bool = False) -> str:
    """Values only the assembly of a non-streaming answer reads (the stream passes them on untouched)."""
    return INVALID if not stream and (chat or not endpoint_matters) else OK


# Script -> the record status it must end in: a status, or f(chat, stream) -> status.
EXPECTED = {
    "ok": OK, "late_done": OK, "multiline_data": OK,
    "usage_2_64": INVALID, "usage_negative": INVALID, "usage_string": INVALID, "usage_float": INVALID,
    "usage_bool": INVALID, "usage_not_object": INVALID, "prompt_tokens_2_70": INVALID,
    "usage_nan": ERROR,  # NaN is not JSON
    "surrogate_text": INVALID, "surrogate_text_no_ids": INVALID, "encoded_surrogate": INVALID,
    "surrogate_error_message": ERROR, "error_message_object": ERROR, "error_not_object": ERROR,
    "refused_in_stream": ERROR,
    "finish_reason_object": INVALID, "finish_reason_number": INVALID, "finish_reason_surrogate": INVALID,
    "finish_reason_long": INVALID, "text_number": INVALID, "text_object": INVALID,
    "token_ids_strings": INVALID, "token_ids_negative": INVALID, "token_ids_2_64": INVALID,
    "token_ids_floats": INVALID, "token_ids_bools": INVALID, "token_ids_nested": INVALID,
    "token_ids_not_list": INVALID, "token_ids_past_max_tokens": INVALID, "text_past_max_tokens": INVALID,
    "empty_events_forever": INVALID,
    "spec_steps_2_64": INVALID, "spec_steps_string": INVALID, "spec_draft_tokens_negative": INVALID,
    "spec_histogram_strings": INVALID, "spec_histogram_2_64": INVALID, "spec_histogram_long": INVALID,
    "spec_not_object": INVALID, "metrics_not_object": INVALID,
    "choices_not_list": INVALID, "two_choices": INVALID, "choice_not_object": INVALID, "delta_not_object": INVALID,
    "tool_calls_bad": lambda chat, stream: only_whole(chat, stream, endpoint_matters=True),
    "logprobs_not_object": only_whole, "logprobs_surrogate": only_whole,
    "event_number": INVALID, "event_list": INVALID, "event_string": INVALID,
    "not_json": ERROR, "nan_in_logprobs": ERROR, "deep_nesting": ERROR, "huge_int_literal": ERROR,
    "invalid_utf8": ERROR, "huge_event": INVALID,
    "no_done": DIED, "dies_mid_stream": DIED,
    "status_302": INVALID, "status_204": INVALID,
    "status_500_huge_body": ERROR, "status_400_surrogate": ERROR, "status_400_message_list": ERROR,
    "status_500_dies": ERROR,
}
MODES = [(chat, stream) for chat in (False, True) for stream in (False, True)]
MODE_IDS = ["completions-whole", "completions-stream", "chat-whole", "chat-stream"]


# --- processes ------------------------------------------------------------------------

def launch(stack: ProcessStack, log_dir: Path, upstream: str, name: str, wrapper: str | None = None,
           **settings) -> tuple[str, object, Path]:
    """A gateway child in front of the hostile upstream; returns (url, child, records path).
    `wrapper`: Python code run instead of `-m service.server` (it gets the same arguments)."""
    records = log_dir / f"{name}.sqlite"
    config = GatewaySettings(upstreams={MODEL: [upstream]}, records_path=records, port=free_port(), **settings)
    path = log_dir / f"{name}.json"
    path.write_text(config.model_dump_json())
    cmd = [sys.executable, *(["-c", wrapper] if wrapper else ["-m", "service.server"]), "--settings", str(path)]
    child = stack.add(start_child(f"gateway {name}", cmd, log_dir / f"{name}.log", env=dict(os.environ)))
    url = f"http://127.0.0.1:{config.port}"
    wait_healthy(child, url + "/health", 60, interval_s=0.1)
    return url, child, records


@pytest.fixture(scope="module")
def hostile():
    with HostileUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def gateway(stack, logs, hostile) -> dict:
    url, _, records = launch(stack, logs, hostile.url, "main")
    return {"url": url, "records": records}


# --- asking, and checking the answer --------------------------------------------------------

def run_tag() -> str:
    return "h-" + uuid.uuid4().hex[:12]


def ask(url: str, script: str, run: str, chat: bool, stream: bool, timeout: float = 30) -> httpx.Response:
    text = f"hostile:{script}"
    body = {"model": MODEL, "stream": stream, "max_tokens": MAX_TOKENS,
            **({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})}
    return httpx.post(url + ("/v1/chat/completions" if chat else "/v1/completions"), json=body,
                      headers={"X-Specdrift-Run": run}, timeout=timeout)


def not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def strict_json(text: str):
    return json.loads(text, parse_constant=not_json)


def check_error(error: dict, code: int | None = None) -> str:
    assert set(error) >= {"message", "type"} and isinstance(error["message"], str) and isinstance(error["type"], str)
    if code is not None:
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    return error["type"]


def checked_answer(response: httpx.Response, stream: bool) -> str | None:
    """Asserts the client got an OpenAI-format error or a clean end; returns the error's type (None: none)."""
    body = response.content.decode("utf-8")  # strict: no invalid UTF-8 reaches a client
    if response.status_code != 200:
        assert response.headers["content-type"] == "application/json"
        return check_error(strict_json(body)["error"], response.status_code)
    if not stream:
        answer = strict_json(body)
        assert answer["object"] in ("text_completion", "chat.completion") and len(answer["choices"]) == 1
        return None
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in body.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    events = [line[6:] for line in lines]
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    parsed = [strict_json(event) for event in events[:-1]]
    assert all(isinstance(event, dict) for event in parsed)
    errors = [event for event in parsed if "error" in event]
    assert not errors or errors == parsed[-1:]  # one error event, the last before [DONE]
    return check_error(errors[0]["error"]) if errors else None


def one_record(records: Path, run: str) -> dict:
    found = read_records(records, run)
    assert len(found) == 1, found
    return found[0]


def next_request_is_answered(url: str, records: Path) -> None:
    run = run_tag()
    response = ask(url, "ok", run, chat=False, stream=True)
    assert response.status_code == 200 and checked_answer(response, stream=True) is None
    assert one_record(records, run)["status"] == OK
    assert httpx.get(url + "/health").status_code == 200


# --- each bad value ------------------------------------------------------------------------

def test_every_script_has_an_expected_outcome():
    assert set(EXPECTED) == set(SCRIPTS) - {"slow"}


@pytest.mark.parametrize("chat, stream", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_each_bad_value_ends_in_one_record_and_an_openai_answer(gateway, script, chat, stream):
    expected = EXPECTED[script]
    expected = expected(chat, stream) if callable(expected) else expected
    run = run_tag()
    response = ask(gateway["url"], script, run, chat, stream)
    error_type = checked_answer(response, stream)
    record = one_record(gateway["records"], run)
    assert record["status"] == expected, record["error"]
    assert record["http_status"] == response.status_code
    if expected == OK:
        assert error_type is None and record["error"] is None
    else:
        assert error_type is not None and record["error"]
        assert response.status_code != 200 or stream
    if expected == INVALID:
        assert response.status_code in (200, 502) and error_type == INVALID
    next_request_is_answered(gateway["url"], gateway["records"])


@pytest.mark.parametrize("chat", [False, True])
def test_an_arm_refusing_the_request_in_its_stream_keeps_its_code(gateway, chat):
    """Before any output, the arm's own 4xx reaches a non-streaming client as it would have without the
    gateway's streaming; a mid-stream error after output stays a 502."""
    for script, expected in (("refused_in_stream", 400), ("surrogate_error_message", 502)):
        run = run_tag()
        response = ask(gateway["url"], script, run, chat, False)
        assert response.status_code == expected and response.headers["x-specdrift-error-source"] == "upstream"
        record = one_record(gateway["records"], run)
        assert (record["status"], record["http_status"]) == (ERROR, expected)


def test_what_is_kept_of_an_invalid_request(gateway):
    """Storable text, the tokens that arrived before the bad value, the field named in the error."""
    run = run_tag()
    ask(gateway["url"], "usage_2_64", run, chat=False, stream=True)
    record = one_record(gateway["records"], run)
    assert "usage.completion_tokens" in record["error"] and record["completion_tokens"] == 2
    assert record["output_text"] == " t0 t1" and record["ttft_s"] is not None
    run = run_tag()
    events = [line for line in ask(gateway["url"], "surrogate_error_message", run, chat=True, stream=True)
              .text.splitlines() if line.startswith("data: {")]
    assert strict_json(events[-1][6:])["error"]["message"].endswith("broke ? here")
    assert one_record(gateway["records"], run)["error"].endswith("broke ? here")
    run = run_tag()
    whole = ask(gateway["url"], "status_500_huge_body", run, chat=False, stream=False)
    assert whole.status_code == 500 and len(whole.content) < 2000
    assert len(one_record(gateway["records"], run)["error"]) <= 1000


def test_a_hostile_stream_does_not_disturb_a_concurrent_one(gateway):
    run = run_tag()
    results = {}

    def slow():
        with httpx.stream("POST", gateway["url"] + "/v1/completions", json={
                "model": MODEL, "prompt": "hostile:slow", "stream": True, "max_tokens": 4096},
                headers={"X-Specdrift-Run": run}, timeout=30) as response:
            for n, _ in enumerate(response.iter_lines()):
                if n == 20:
                    results["slow"] = response.status_code
                    break

    thread = threading.Thread(target=slow)
    thread.start()
    for script in ("usage_2_64", "surrogate_text_no_ids", "huge_event", "deep_nesting", "status_204"):
        checked_answer(ask(gateway["url"], script, run_tag(), chat=False, stream=True), stream=True)
    thread.join(30)
    assert results["slow"] == 200


# --- random answers -----------------------------------------------------------------------

@hypothesis.given(data=st.data())
@hypothesis.settings(max_examples=150, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_random_answers_end_in_one_record_and_an_openai_answer(gateway, hostile, data):
    chat, stream = data.draw(st.sampled_from(MODES))
    name = "fuzz-" + uuid.uuid4().hex[:8]
    script = data.draw(hostile_scripts(chat))
    hostile.scripts[name] = lambda chat: script
    run = run_tag()
    try:
        response = ask(gateway["url"], name, run, chat, stream)
        checked_answer(response, stream)
        record = one_record(gateway["records"], run)
        assert record["status"] in STATUSES and record["http_status"] == response.status_code
        next_request_is_answered(gateway["url"], gateway["records"])
    finally:
        del hostile.scripts[name]


# --- counters against records ----------------------------------------------------------------

def leave_after_the_last_token(url: str, script: str, run: str) -> None:
    """Stream, and close the connection as soon as a chunk carries a finish_reason, before [DONE]."""
    with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": f"hostile:{script}",
                      "stream": True, "max_tokens": MAX_TOKENS}, headers={"X-Specdrift-Run": run},
                      timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["finish_reason"]:
                return


def leave_mid_stream(url: str, run: str) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "hostile:slow",
                      "stream": True, "max_tokens": 4096}, headers={"X-Specdrift-Run": run}, timeout=30) as response:
        for n, _ in enumerate(response.iter_lines()):
            if n == 3:
                return


def test_counters_equal_the_records_with_clients_leaving_before_done(stack, logs, hostile):
    """Sums every counter and histogram over one run and compares them with the records, after a run of
    successes, invalid answers, arm errors, clients leaving mid-stream, and clients leaving between their last
    token and [DONE] (the arm sends [DONE] 0-5 ms after the last token, so that a few leave while the gateway
    commits an `ok` record: about 2 in 100 here, each of which the gateway once left uncounted)."""
    run = "counted-run"
    url, _, records = launch(stack, logs, hostile.url, "counters", vocabulary=Vocabulary(run=[run]))
    for n in range(40):
        pause = n % 11 * 0.0005
        hostile.scripts[f"quick_done_{n}"] = lambda chat, pause=pause: Script(
            good(chat)[:-1] + [pause, good(chat)[-1], b"data: [DONE]\n\n"] if pause else good(chat) + [
                b"data: [DONE]\n\n"])
    jobs = [lambda n=n: leave_after_the_last_token(url, f"quick_done_{n % 40}", run) for n in range(96)]
    jobs += [lambda: leave_mid_stream(url, run)] * 4
    for script in ("ok", "usage_2_64", "surrogate_text_no_ids", "finish_reason_object", "not_json", "no_done",
                   "status_400_surrogate", "spec_histogram_2_64"):
        for chat, stream in MODES:
            jobs.append(lambda script=script, chat=chat, stream=stream: ask(url, script, run, chat, stream))
    threads = [threading.Thread(target=job) for job in jobs]
    for start in range(0, len(threads), 8):  # eight clients at a time
        batch = threads[start:start + 8]
        for thread in batch:
            thread.start()
        for thread in batch:
            thread.join(30)
    deadline = time.monotonic() + 10
    while len(read_records(records, run)) < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = read_records(records, run)
    assert len(found) == len(jobs)
    by_status = Counter(r["status"] for r in found)
    assert by_status["ok"] and by_status["client_disconnect"] and by_status[INVALID]

    def mismatches() -> list[str]:
        samples = metric_samples(url)
        ok = [r for r in found if r["status"] == OK]
        pairs = [(f"requests_total{{status={s}}}", metric_sum(samples, "specdrift_requests_total", run=run, status=s),
                  by_status[s]) for s in STATUSES]
        pairs += [
            ("duration_count", metric_sum(samples, "specdrift_request_duration_seconds_count", run=run), len(ok)),
            ("ttft_count", metric_sum(samples, "specdrift_time_to_first_token_seconds_count", run=run),
             sum(r["ttft_s"] is not None for r in ok)),
            ("tpot_count", metric_sum(samples, "specdrift_time_per_output_token_seconds_count", run=run),
             sum(r["tpot_s"] is not None for r in ok)),
            ("itl_count", metric_sum(samples, "specdrift_inter_token_latency_seconds_count", run=run),
             sum(len(json.loads(r["itl_json"])) for r in ok if r["itl_json"])),
            ("completion_tokens_sum", metric_sum(samples, "specdrift_completion_tokens_sum", run=run),
             sum(r["completion_tokens"] or 0 for r in ok)),
            ("prompt_tokens_count", metric_sum(samples, "specdrift_prompt_tokens_count", run=run),
             sum(r["prompt_tokens"] is not None for r in ok)),
            ("drafts", metric_sum(samples, "specdrift_spec_decode_drafts_total", run=run),
             sum(r["spec_drafts"] or 0 for r in found)),
            ("draft_tokens", metric_sum(samples, "specdrift_spec_decode_draft_tokens_total", run=run),
             sum(r["spec_draft_tokens"] or 0 for r in found)),
            ("accepted", metric_sum(samples, "specdrift_spec_decode_accepted_tokens_total", run=run),
             sum(r["spec_accepted_tokens"] or 0 for r in found)),
        ]
        kinds = {"upstream_error": "error", "upstream_died": "died", "upstream_invalid": "invalid"}
        pairs += [(f"upstream_errors{{kind={kind}}}", metric_sum(samples, "specdrift_upstream_errors_total",
                                                                  kind=kind), by_status[status])
                  for status, kind in kinds.items()]
        return [f"{name}: metrics {got:g}, records {want:g}" for name, got, want in pairs if got != want]

    deadline = time.monotonic() + 5
    while mismatches() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mismatches() == [], dict(by_status)
    samples = metric_samples(url)
    assert metric_sum(samples, "specdrift_request_duration_seconds_sum", run=run) == pytest.approx(
        sum(r["e2e_s"] for r in found if r["status"] == OK))
    assert metric_sum(samples, "specdrift_record_write_failures_total") == 0


# --- shutdown and a stopped writer ------------------------------------------------------------

def test_requests_cut_by_shutdown_get_a_503_or_an_error_event(stack, logs, hostile):
    url, child, records = launch(stack, logs, hostile.url, "shutdown", shutdown_grace_s=0.5)
    run = run_tag()
    answers = {}
    streaming = threading.Event()

    def whole():
        answers["whole"] = ask(url, "slow", run, chat=True, stream=False)

    def streamed():
        with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "hostile:slow",
                          "stream": True, "max_tokens": 4096}, headers={"X-Specdrift-Run": run},
                          timeout=30) as response:
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                streaming.set()
            answers["stream"] = (response, "\n\n".join(lines) + "\n\n")

    threads = [threading.Thread(target=whole), threading.Thread(target=streamed)]
    served = hostile.served["slow"]
    for thread in threads:
        thread.start()
    assert streaming.wait(10)
    deadline = time.monotonic() + 5
    while hostile.served["slow"] < served + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGTERM)
    for thread in threads:
        thread.join(15)
    child.proc.wait(15)

    whole_answer = answers["whole"]
    assert whole_answer.status_code == 503
    assert checked_answer(whole_answer, stream=False) == "gateway_shutdown"
    response, body = answers["stream"]
    assert response.status_code == 200
    events = [line[6:] for line in body.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and strict_json(events[-2])["error"]["type"] == "gateway_shutdown"
    assert len(events) > 3  # tokens came before the error event
    found = sorted((r["stream"], r["status"], r["http_status"]) for r in read_records(records, run))
    assert found == [(0, "gateway_shutdown", 503), (1, "gateway_shutdown", 200)]


# Runs the gateway with a record writer that ends at its first batch, as no Exception can make it.
DYING_WRITER = """
import sys
from service.records import RecordStore
def dying(self, conn, batch):
    raise SystemExit("test: the record writer ends")
RecordStore._commit = dying
from service.server import main
main(sys.argv[1:])
"""


def test_a_stopped_writer_fails_health_and_exits_non_zero_without_hanging(stack, logs, hostile):
    url, child, records = launch(stack, logs, hostile.url, "dying", wrapper=DYING_WRITER, shutdown_grace_s=1)
    run = run_tag()
    response = ask(url, "ok", run, chat=False, stream=False, timeout=10)
    assert response.status_code == 503
    assert checked_answer(response, stream=False) == "record_store_error"
    try:
        health = httpx.get(url + "/health", timeout=5).status_code
    except httpx.TransportError:
        health = None  # already stopped serving
    assert health in (503, None)
    assert child.proc.wait(20) == 3
    assert read_records(records, run) == []
    assert "the record writer stopped" in (logs / "dying.log").read_text()
