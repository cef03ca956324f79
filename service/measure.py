"""What the gateway measures about one request, from the upstream's SSE chunks.

Times are taken when a chunk arrives at the gateway (`time.perf_counter`),
anchored once per request to the wall clock for the epoch columns. A chunk
"carries output" when it has token ids, or, from an upstream that sends no
ids, any text. Chat's opening role-only chunk carries none, so it does not
count as the first token.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from service.tags import Tags


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
    """A token or step count from the upstream, or None if it is not a non-negative integer."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def output_hash(token_ids: list[int] | None, text: str) -> tuple[str, str]:
    if token_ids is not None:
        return hashlib.sha256(json.dumps(token_ids, separators=(",", ":")).encode()).hexdigest(), "token_ids"
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), "text"


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
                 "finish_reason", "usage", "spec", "upstream")

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
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.spec: dict[str, Any] | None = None
        self.upstream: str | None = None

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
            "endpoint": info.endpoint, "stream": int(info.stream), "upstream": self.upstream,
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
