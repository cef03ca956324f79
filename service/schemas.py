"""Request bodies the gateway accepts, as pydantic models (they are also the
OpenAPI schema). Only the fields the gateway reads are declared; every other
OpenAI or vLLM field passes through to the arm unchanged.

The gateway measures one sequence per request, so `n` must be 1 and a
completion takes a single prompt."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool | None = None


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, description="the arm's name (see GET /v1/models)")
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0)
    n: int | None = Field(default=None, ge=1, le=1, description="one sequence per request")
    return_token_ids: bool | None = None

    def requested_max_tokens(self) -> tuple[str, int | None]:
        return "max_tokens", self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="one prompt: text or token ids (a list of one is accepted too)")

    def single_prompt(self) -> bool:
        return isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int) \
            or len(self.prompt) == 1


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def requested_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["integer", "string", "null"]}}}},
}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR_SCHEMA}}}


GENERATION_RESPONSES: dict[int | str, dict] = {
    200: {"description": "the arm's answer; with `stream: true` an SSE stream of chunks ending in `data: [DONE]`",
          "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}}},
    400: _error("malformed JSON, a bad tag header, max_tokens over the limit, or a rejection by the arm"),
    401: _error("missing or wrong bearer token (when auth is on)"),
    404: _error("unknown arm"),
    413: _error("request body too large"),
    422: _error("a missing or invalid field"),
    502: _error("the arm failed or broke the connection"),
    503: _error("no replica of the arm is reachable"),
    504: _error("the arm did not answer in time"),
}
