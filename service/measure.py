"""What the gateway measures about one request, from the upstream's SSE chunks.

Times are taken when a chunk arrives at the gateway (`time.perf_counter`),
anchored once per request to the wall clock for the epoch columns. A chunk
"carries output" when it has token ids, or, from an upstream that sends no
ids, any text. Chat's opening role-only chunk carries none, so it does not
count as the first token.

Every value taken from a chunk is checked first (`Measurement.take`), with
plain type checks, cheap enough for every chunk: counts are integers in
SQLite's range, text is a string UTF-8 can hold (no lone surrogate), token
ids are such counts, `finish_reason` is a short string, the speculative
metrics are counts, and an arm sends no more token ids than max_tokens and
no more events than max_tokens + 64. Anything else raises `UpstreamInvalid`
before the chunk changes anything.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from core.contracts import token_ids_hash
from service.records import INT64_MAX, storable_text
from service.tags import Tags

# Events beyond max_tokens an arm may send (role, usage, tool-call pieces);
# past that the stream is not the request's, and an endless one ends.
EVENT_SLACK = 64
MAX_FINISH_REASON = 64
# Draft positions the acceptance histogram may cover; vLLM caps far lower.
MAX_DRAFT_POSITIONS = 64


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def accepted_per_position(histogram: list[int]) -> list[int]:
    """Accepted count per draft position from vLLM's acceptance histogram.

    histogram[j] counts verify steps that accepted exactly j draft tokens.
    Acceptance stops at the first rejection, so position i is accepted in
    every step that accepted more than i tokens."""
    counts = []
    remaining = sum(histogram)
    for accepted_exactly in histogram[:-1]:
        remaining -= accepted_exactly
        counts.append(remaining)
    return counts


def count(value: Any) -> int | None:
    """A token or step count from the upstream, or None if it is not an integer in [0, 2**63)."""
    return value if type(value) is int and 0 <= value <= INT64_MAX else None


def output_hash(token_ids: list[int] | None, text: str) -> tuple[str, str]:
    if token_ids is not None:
        return token_ids_hash(token_ids), "token_ids"
    # surrogatepass: a record is never lost to its hash (checked text has no lone surrogates).
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(), "text"


class UpstreamInvalid(ValueError):
    """A value in an arm's chunk that the gateway does not take; the message names it."""


def shown(value: Any) -> str:
    """A short, plain-ASCII rendering of an upstream value for an error message."""
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checked_count(value: Any, name: str) -> int | None:
    if value is None or count(value) is not None:
        return value
    raise UpstreamInvalid(f"{name} is {shown(value)}, not a count below 2**63")


def checked_text(value: Any, name: str) -> str | None:
    if value is None or type(value) is str and storable_text(value) is value:
        return value
    if type(value) is str:
        raise UpstreamInvalid(f"{name} is not valid Unicode (it holds a lone surrogate): {shown(value)}")
    raise UpstreamInvalid(f"{name} is {shown(value)}, not a string")


def checked_token_ids(value: Any) -> list[int] | None:
    if value is None:
        return None
    if type(value) is not list:
        raise UpstreamInvalid(f"token_ids is {shown(value)}, not a list")
    for token in value:
        if type(token) is not int or not 0 <= token <= INT64_MAX:
            raise UpstreamInvalid(f"token_ids holds {shown(token)}, not a token id")
    return value


def checked_spec(metrics: Any) -> dict[str, Any] | None:
    """vLLM's `metrics.speculative_decoding` object, checked where the record reads it."""
    if metrics is None:
        return None
    if type(metrics) is not dict:
        raise UpstreamInvalid(f"metrics is {shown(metrics)}, not an object")
    spec = metrics.get("speculative_decoding")
    if spec is None:
        return None
    if type(spec) is not dict:
        raise UpstreamInvalid(f"metrics.speculative_decoding is {shown(spec)}, not an object")
    for key in ("num_spec_steps", "num_draft_tokens", "num_accepted_draft_tokens"):
        checked_count(spec.get(key), f"speculative_decoding.{key}")
    histogram = spec.get("acceptance_histogram")
    if histogram is not None:
        if type(histogram) is not list or len(histogram) > MAX_DRAFT_POSITIONS + 1:
            raise UpstreamInvalid(f"speculative_decoding.acceptance_histogram is {shown(histogram)}, not a list "
                                  f"of at most {MAX_DRAFT_POSITIONS + 1} counts")
        for steps in histogram:
            checked_count(steps, "speculative_decoding.acceptance_histogram[]")
    return spec


@dataclass(slots=True)
class RequestInfo:
    """What is known about a request when it is accepted."""

    request_id: str
    arm: str
    tags: Tags
    labels: tuple[str, str, str]  # bounded (run, task, stratum)
    endpoint: str  # "chat" | "completions"
    stream: bool
    max_tokens: int
    temperature: float | None


class Measurement:
    """Accumulates one request's output and timings as its chunks arrive."""

    __slots__ = ("info", "t0_wall", "t0", "first_token", "last_token", "gaps", "token_ids", "text_parts",
                 "events", "finish_reason", "usage", "spec", "upstream")

    def __init__(self, info: RequestInfo):
        self.info = info
        self.t0_wall = time.time()
        self.t0 = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.gaps: list[float] = []
        # None once a chunk with output but without ids arrives: then hash the text.
        self.token_ids: list[int] | None = []
        self.text_parts: list[str] = []
        self.events = 0
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.spec: dict[str, Any] | None = None
        self.upstream: str | None = None

    def take(self, now: float, event: dict[str, Any], chat: bool) -> None:
        """Measure one event of the arm's stream (arrived at `now`), once every value read from it is checked."""
        self.events += 1
        if self.events > self.info.max_tokens + EVENT_SLACK:
            raise UpstreamInvalid(f"more events than max_tokens ({self.info.max_tokens}) allows")
        usage = event.get("usage")
        spec = None
        if usage:
            if type(usage) is not dict:
                raise UpstreamInvalid(f"usage is {shown(usage)}, not an object")
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                checked_count(usage.get(key), f"usage.{key}")
            spec = checked_spec(event.get("metrics"))
        choices = event.get("choices")
        if choices:
            if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
                raise UpstreamInvalid(f"choices is {shown(choices)}, not a list of one object")
            self._take_choice(now, choices[0], chat)
        if usage:
            self.usage = usage
            self.spec = spec

    def _take_choice(self, now: float, choice: dict[str, Any], chat: bool) -> None:
        if chat:
            delta = choice.get("delta")
            if delta is None:
                delta = {}
            elif type(delta) is not dict:
                raise UpstreamInvalid(f"delta is {shown(delta)}, not an object")
            text = checked_text(delta.get("content"), "delta.content")
            reasoning = checked_text(delta.get("reasoning"), "delta.reasoning") or checked_text(
                delta.get("reasoning_content"), "delta.reasoning_content")
            tool_calls = delta.get("tool_calls")
            if tool_calls is not None and type(tool_calls) is not list:
                raise UpstreamInvalid(f"delta.tool_calls is {shown(tool_calls)}, not a list")
            carries = text or reasoning or tool_calls
        else:
            text = carries = checked_text(choice.get("text"), "text")
        token_ids = checked_token_ids(choice.get("token_ids"))
        finish_reason = checked_text(choice.get("finish_reason"), "finish_reason")
        if finish_reason is not None and len(finish_reason) > MAX_FINISH_REASON:
            raise UpstreamInvalid(f"finish_reason is {shown(finish_reason)}, longer than {MAX_FINISH_REASON}")
        if token_ids and self.token_ids is not None and len(self.token_ids) + len(token_ids) > self.info.max_tokens:
            raise UpstreamInvalid(f"more token ids than max_tokens ({self.info.max_tokens})")
        if token_ids or token_ids is None and carries:
            self.on_output(now, token_ids or None, text)
        if finish_reason:
            self.finish_reason = finish_reason

    def on_output(self, now: float, token_ids: list[int] | None, text: str | None) -> None:
        """A chunk that carries output arrived at `now`."""
        if self.first_token is None:
            self.first_token = now
        else:
            self.gaps.append(now - self.last_token)
        self.last_token = now
        if token_ids is None:
            self.token_ids = None
        elif self.token_ids is not None:
            self.token_ids.extend(token_ids)
        if text:
            self.text_parts.append(text)

    def record(self, status: str, http_status: int | None, error: str | None = None) -> dict[str, Any]:
        """The finished record (service/records.py); the request ends now."""
        end = time.perf_counter()
        info, tags = self.info, self.info.tags
        usage = self.usage or {}
        completion_tokens = count(usage.get("completion_tokens"))
        if completion_tokens is None and self.token_ids:
            completion_tokens = len(self.token_ids)
        text = "".join(self.text_parts)
        digest, digest_kind = output_hash(self.token_ids or None, text) if (self.token_ids or text) else (None, None)

        def epoch(t: float | None) -> float | None:
            return None if t is None else self.t0_wall + (t - self.t0)

        record: dict[str, Any] = {
            "request_id": info.request_id, "run_id": tags.run_id, "arm": info.arm, "task": tags.task,
            "stratum": tags.stratum, "prompt_id": tags.prompt_id, "regime": tags.regime,
            "client_request_id": tags.client_request_id, "endpoint": info.endpoint, "stream": int(info.stream),
            "upstream": self.upstream,
            "status": status, "http_status": http_status, "error": error, "finish_reason": self.finish_reason,
            "t_start": self.t0_wall, "t_first_token": epoch(self.first_token), "t_end": epoch(end),
            "ttft_s": None if self.first_token is None else self.first_token - self.t0,
            "e2e_s": end - self.t0,
            "tpot_s": (end - self.first_token) / (completion_tokens - 1)
            if self.first_token is not None and completion_tokens and completion_tokens >= 2 else None,
            "prompt_tokens": count(usage.get("prompt_tokens")), "completion_tokens": completion_tokens,
            "max_tokens": info.max_tokens, "temperature": info.temperature,
            "output_hash": digest, "output_hash_kind": digest_kind, "output_text": text,
        }
        if self.gaps:
            ordered = sorted(self.gaps)
            record.update(itl_mean_s=sum(ordered) / len(ordered), itl_p50_s=percentile(ordered, 50),
                          itl_p99_s=percentile(ordered, 99), itl_max_s=ordered[-1], itl_json=json.dumps(self.gaps))
        spec = self.spec
        if isinstance(spec, dict) and count(spec.get("num_spec_steps")) is not None:
            record.update(spec_drafts=spec["num_spec_steps"], spec_draft_tokens=count(spec.get("num_draft_tokens")),
                          spec_accepted_tokens=count(spec.get("num_accepted_draft_tokens")),
                          spec_json=json.dumps(spec, separators=(",", ":")))
            histogram = spec.get("acceptance_histogram")
            if isinstance(histogram, list) and histogram and all(count(c) is not None for c in histogram):
                record["spec_accepted_per_pos"] = json.dumps(accepted_per_position(histogram))
        return record
