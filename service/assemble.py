"""Builds a non-streaming OpenAI response from the upstream's stream chunks.

The gateway always streams from the arm (that is how it sees every token's
arrival); a client that asked for `stream: false` gets the same object an
OpenAI server would return, put together from the chunks. The relay passes
only events that service/measure.py has checked; what only the assembly reads
(tool calls, logprobs) is checked here, and raises `UpstreamInvalid`."""

from __future__ import annotations

from typing import Any

from service.measure import UpstreamInvalid, checked_text, shown


class Assembly:
    def __init__(self, endpoint: str, arm: str, want_token_ids: bool):
        self.endpoint = endpoint
        self.arm = arm
        self.want_token_ids = want_token_ids
        self.head: dict[str, Any] = {}
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.logprobs: dict[str, list] | None = None
        self.token_ids: list[int] = []
        self.prompt_token_ids: list[int] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: Any = None
        self.usage: dict[str, Any] | None = None
        self.metrics: dict[str, Any] | None = None

    def add(self, event: dict[str, Any]) -> None:
        if not self.head:
            self.head = {k: event[k] for k in ("id", "created", "system_fingerprint") if k in event}
            self.prompt_token_ids = event.get("prompt_token_ids")
        if event.get("system_fingerprint"):
            self.head["system_fingerprint"] = event["system_fingerprint"]
        if event.get("usage"):
            self.usage = event["usage"]
        if event.get("metrics"):
            self.metrics = event["metrics"]
        for choice in event.get("choices") or ():
            self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        if self.endpoint == "chat":
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.text.append(delta["content"])
            reasoning = delta.get("reasoning") or delta.get("reasoning_content")
            if reasoning:
                self.reasoning.append(reasoning)
            for call in delta.get("tool_calls") or ():
                self._add_tool_call(call)
        elif choice.get("text"):
            self.text.append(choice["text"])
        if choice.get("prompt_token_ids"):
            self.prompt_token_ids = choice["prompt_token_ids"]
        if choice.get("token_ids"):
            self.token_ids.extend(choice["token_ids"])
        if choice.get("logprobs"):
            self._add_logprobs(choice["logprobs"])
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
            self.stop_reason = choice.get("stop_reason")

    def _add_tool_call(self, call: Any) -> None:
        """Tool calls stream as pieces keyed by index: id, type and name first, then argument fragments."""
        index = call.get("index", 0) if type(call) is dict else None
        function = (call.get("function") or {}) if type(call) is dict else None
        if type(index) is not int or type(function) is not dict:
            raise UpstreamInvalid(f"tool call {shown(call)} is not an object with an integer index")
        merged = self.tool_calls.setdefault(index, {"id": None, "type": "function",
                                                    "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            merged["id"] = checked_text(call["id"], "tool_calls[].id")
        if call.get("type"):
            merged["type"] = checked_text(call["type"], "tool_calls[].type")
        if function.get("name"):
            merged["function"]["name"] += checked_text(function["name"], "tool_calls[].function.name")
        if function.get("arguments"):
            merged["function"]["arguments"] += checked_text(function["arguments"], "tool_calls[].function.arguments")

    def _add_logprobs(self, logprobs: Any) -> None:
        """Chat logprobs stream as `content` lists, completion logprobs as parallel lists: concatenate each."""
        if type(logprobs) is not dict:
            raise UpstreamInvalid(f"logprobs is {shown(logprobs)}, not an object")
        if self.logprobs is None:
            self.logprobs = {}
        for key, values in logprobs.items():
            if isinstance(values, list):
                self.logprobs.setdefault(key, []).extend(values)

    def response(self) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": self.logprobs, "finish_reason": self.finish_reason}
        if self.stop_reason is not None:
            choice["stop_reason"] = self.stop_reason
        if self.endpoint == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": "".join(self.text) if self.text else None}
            if self.reasoning:
                message["reasoning"] = "".join(self.reasoning)
            if self.tool_calls:
                message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
            choice["message"] = message
            kind = "chat.completion"
        else:
            choice["text"] = "".join(self.text)
            kind = "text_completion"
        if self.want_token_ids:
            choice["token_ids"] = self.token_ids
            if self.prompt_token_ids is not None:
                choice["prompt_token_ids"] = self.prompt_token_ids
        body: dict[str, Any] = {"id": self.head.get("id", ""), "object": kind, "created": self.head.get("created", 0),
                                "model": self.arm, "choices": [choice], "usage": self.usage}
        if "system_fingerprint" in self.head:
            body["system_fingerprint"] = self.head["system_fingerprint"]
        if self.metrics:
            body["metrics"] = self.metrics
        return body
