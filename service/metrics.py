"""The gateway's Prometheus metrics (docs/formats.md, "Gateway metrics").

Labels are bounded: `arm` is a configured arm, and `run`, `task`, `stratum`
come from service/tags.py's vocabulary (else `other`). Latency and token
histograms see successful requests only; counters see every recorded request,
so that each counter equals the sum of its column over the records. A record
is counted when its commit lands (the store's `on_stored`), whatever became
of the request meanwhile."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from core.contracts import OK, UPSTREAM_DIED, UPSTREAM_ERROR, UPSTREAM_INVALID, UPSTREAM_TIMEOUT, UPSTREAM_UNAVAILABLE
from service.records import WRITE_FAILURE_REASONS

LABELS = ("run", "arm", "task", "stratum")
# vLLM caps num_speculative_tokens far below this; it bounds `position` against a misbehaving upstream.
MAX_POSITIONS = 32

SECONDS_E2E = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
SECONDS_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)
SECONDS_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
UPSTREAM_ERROR_KINDS = {UPSTREAM_ERROR: "error", UPSTREAM_UNAVAILABLE: "unavailable", UPSTREAM_TIMEOUT: "timeout",
                        UPSTREAM_DIED: "died", UPSTREAM_INVALID: "invalid"}


class GatewayMetrics:
    def __init__(self, arms: list[str], vllm_names: bool = False):
        # `_created` series would double the exposition and nothing here reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("specdrift_requests_total", "Accepted requests by outcome (one per record).",
                                LABELS + ("status",), registry=r)
        self.duration = Histogram("specdrift_request_duration_seconds",
                                  "End-to-end request time seen by the gateway.", LABELS, buckets=SECONDS_E2E,
                                  registry=r)
        self.ttft = Histogram("specdrift_time_to_first_token_seconds", "Time to the first output token.", LABELS,
                              buckets=SECONDS_TTFT, registry=r)
        self.tpot = Histogram("specdrift_time_per_output_token_seconds",
                              "Decode time per output token after the first.", LABELS, buckets=SECONDS_PER_TOKEN,
                              registry=r)
        self.itl = Histogram("specdrift_inter_token_latency_seconds",
                             "Gaps between successive chunks that carry output tokens.", LABELS,
                             buckets=SECONDS_PER_TOKEN, registry=r)
        self.prompt_tokens = Histogram("specdrift_prompt_tokens", "Prompt length in tokens.", LABELS,
                                       buckets=TOKENS, registry=r)
        self.completion_tokens = Histogram("specdrift_completion_tokens", "Completion length in tokens.", LABELS,
                                           buckets=TOKENS, registry=r)
        self.drafts = Counter("specdrift_spec_decode_drafts_total", "Speculative verify steps that had drafts.",
                              LABELS, registry=r)
        self.draft_tokens = Counter("specdrift_spec_decode_draft_tokens_total", "Draft tokens proposed.", LABELS,
                                    registry=r)
        self.accepted_tokens = Counter("specdrift_spec_decode_accepted_tokens_total", "Draft tokens accepted.",
                                       LABELS, registry=r)
        self.accepted_per_pos = Counter("specdrift_spec_decode_accepted_tokens_per_pos_total",
                                        "Draft tokens accepted at each draft position (0 = first).",
                                        LABELS + ("position",), registry=r)
        self.in_flight = Gauge("specdrift_requests_in_flight", "Requests the gateway is serving now.", ("arm",),
                               registry=r)
        self.upstream_errors = Counter("specdrift_upstream_errors_total", "Failed upstream exchanges by kind.",
                                       ("arm", "kind"), registry=r)
        self.rejected = Counter("specdrift_rejected_requests_total",
                                "Requests refused before acceptance (not recorded), by reason.", ("reason",),
                                registry=r)
        self.record_write_failures = Counter("specdrift_record_write_failures_total",
                                             "Records that could not be written as they were, by reason "
                                             "(service/records.py).", ("reason",), registry=r)
        # Set to the store's backlog by the gateway: records not yet committed (buffered during an outage).
        self.records_buffered = Gauge("specdrift_records_buffered",
                                      "Records waiting to be committed to the record store.", registry=r)
        # gateway.vllm_metric_names: the same counts as vLLM's own counters, for `vllm bench serve`.
        self.vllm_spec = SimpleNamespace(
            drafts=Counter("vllm:spec_decode_num_drafts", "Speculative verify steps (vLLM's name).",
                           ("model_name",), registry=r),
            draft_tokens=Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed (vLLM's name).",
                                 ("model_name",), registry=r),
            accepted_tokens=Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted (vLLM's name).",
                                    ("model_name",), registry=r),
            accepted_per_pos=Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                     "Draft tokens accepted at each position (vLLM's name).",
                                     ("model_name", "position"), registry=r),
        ) if vllm_names else None
        for arm in arms:
            self.in_flight.labels(arm)  # exported as 0 before the first request
        for reason in WRITE_FAILURE_REASONS:
            self.record_write_failures.labels(reason)
        self._children: dict[tuple[str, ...], SimpleNamespace] = {}

    def count_write_failure(self, reason: str) -> None:
        """The record store's `on_failure`; called from its writer thread too (prometheus_client locks)."""
        self.record_write_failures.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def observe(self, record: dict[str, Any], labels: tuple[str, str, str], gaps: list[float]) -> None:
        """Count one finished request from its record (`gaps`: its inter-token gaps)."""
        run, task, stratum = labels
        arm = record["arm"]
        series = self._series(run, arm, task, stratum)
        status = record["status"]
        self.requests.labels(run, arm, task, stratum, status).inc()
        kind = UPSTREAM_ERROR_KINDS.get(status)
        if kind:
            self.upstream_errors.labels(arm, kind).inc()
        if status == OK:
            series.duration.observe(record["e2e_s"])
            if record["ttft_s"] is not None:
                series.ttft.observe(record["ttft_s"])
            if record["tpot_s"] is not None:
                series.tpot.observe(record["tpot_s"])
            for gap in gaps:
                series.itl.observe(gap)
            if record["prompt_tokens"] is not None:
                series.prompt_tokens.observe(record["prompt_tokens"])
            if record["completion_tokens"] is not None:
                series.completion_tokens.observe(record["completion_tokens"])
        if record.get("spec_drafts") is not None:
            per_pos = json.loads(record["spec_accepted_per_pos"])[:MAX_POSITIONS] \
                if record.get("spec_accepted_per_pos") else []
            series.drafts.inc(record["spec_drafts"])
            series.draft_tokens.inc(record["spec_draft_tokens"] or 0)
            series.accepted_tokens.inc(record["spec_accepted_tokens"] or 0)
            for position, count in enumerate(per_pos):
                self.accepted_per_pos.labels(run, arm, task, stratum, str(position)).inc(count)
            if self.vllm_spec is not None:
                self.vllm_spec.drafts.labels(arm).inc(record["spec_drafts"])
                self.vllm_spec.draft_tokens.labels(arm).inc(record["spec_draft_tokens"] or 0)
                self.vllm_spec.accepted_tokens.labels(arm).inc(record["spec_accepted_tokens"] or 0)
                for position, count in enumerate(per_pos):
                    self.vllm_spec.accepted_per_pos.labels(arm, str(position)).inc(count)

    def _series(self, *key: str) -> SimpleNamespace:
        """The labelled children for one (run, arm, task, stratum), looked up once; the key set is bounded."""
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = SimpleNamespace(**{
                name: getattr(self, name).labels(*key) for name in (
                    "duration", "ttft", "tpot", "itl", "prompt_tokens", "completion_tokens", "drafts",
                    "draft_tokens", "accepted_tokens")})
        return series
