"""One streamed OpenAI chat completion, timed by the client that sends it.

The timings follow the gateway's records (service/records.py): time to the
first chunk that carries output text, end-to-end time to the end of the
stream, and TPOT = (end - first token) / (completion tokens - 1), the tokens
counted by the server's usage. Used where specdrift talks to an arm directly
(the cost measurement, benchmarks) rather than through the gateway.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class StreamedCompletion:
    started: float  # perf_counter seconds
    first_token: float | None
    ended: float
    tokens: int  # completion tokens, from the usage chunk
    spec: dict | None  # vLLM's metrics.speculative_decoding, when the server sends it
    text: str = ""
    chunks: list[dict] = field(default_factory=list, repr=False)

    @property
    def ttft_s(self) -> float:
        return (self.first_token if self.first_token is not None else self.ended) - self.started

    @property
    def e2e_s(self) -> float:
        return self.ended - self.started

    @property
    def tpot_s(self) -> float | None:
        if self.first_token is None or self.tokens < 2:
            return None
        return (self.ended - self.first_token) / (self.tokens - 1)


def stream_chat(client: httpx.Client, base_url: str, body: dict) -> StreamedCompletion:
    """POST `body` to base_url/v1/chat/completions as a stream with usage; raises
    httpx.HTTPStatusError on an error status."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    tokens, spec, text = 0, None, []
    with client.stream("POST", base_url.rstrip("/") + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first if first is not None else time.perf_counter()
                    text.append(content)
            if chunk.get("usage"):
                tokens = int(chunk["usage"].get("completion_tokens") or 0)
            spec = (chunk.get("metrics") or {}).get("speculative_decoding") or spec
    return StreamedCompletion(started, first, time.perf_counter(), tokens, spec, "".join(text))
