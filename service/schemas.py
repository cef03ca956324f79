"""Request bodies the gateway accepts, as pydantic models (they are also the
OpenAPI schema). Only the fields the gateway reads are declared; every other
OpenAI or vLLM field passes through to the arm unchanged.

The gateway measures one sequence per request, so `n` must be 1 and a
completion takes a single prompt. The max_tokens bound and the caps on
messages and prompts (count and length) are part of the schema
(`request_models`), so clients and fuzzers see them; pydantic checks a list's
length before its items, so an over-long one costs nothing to refuse."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, field_validator

from core.config import GatewayConfig
from core.contracts import TAG_HEADERS
from service.tags import TAG_VALUE


DEFAULTS = GatewayConfig()


def _integral_float_to_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def json_int(**bounds: int) -> Any:
    """An integer as JSON Schema means it (5.0 is one), checked strictly otherwise ("5" is not).
    Bounds go inside the Annotated, before the validator, or pydantic's JSON schema loses them."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral_float_to_int)]


JsonInt = json_int()
PositiveInt = json_int(ge=1)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool | None = None


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, description="the arm's name (see GET /v1/models)")
    max_tokens: PositiveInt | None = None
    stream: bool | None = Field(default=False, description="null means false")
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0)
    n: json_int(ge=1, le=1) | None = Field(default=None, description="one sequence per request")
    return_token_ids: bool | None = None

    @field_validator("stream")
    @classmethod
    def _null_is_false(cls, stream: bool | None) -> bool:
        return bool(stream)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[JsonInt] | Annotated[list[str], Field(max_length=1)] | Annotated[
        list[list[JsonInt]], Field(max_length=1)] = Field(
        description="one prompt: text or token ids (a list of one is accepted too)")


class ContentPart(BaseModel):
    """One part of a message's content (text, image, ...); only its text is bounded."""
    model_config = ConfigDict(extra="allow", strict=True)

    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def request_models(max_tokens_limit: int, arms: list[str], *, max_messages: int = DEFAULTS.max_messages,
                   max_prompt_chars: int = DEFAULTS.max_prompt_chars,
                   max_prompt_tokens: int = DEFAULTS.max_prompt_tokens) -> tuple[type[CompletionRequest],
                                                                                 type[ChatCompletionRequest]]:
    """The request models with this gateway's bounds: max_tokens (absent: the bound is applied), messages per
    request (and content parts per message), characters per prompt, message text or text part, token ids per
    prompt. Its arms are examples of `model` (any other name is a 404, as from an OpenAI server)."""
    def bounded() -> Any:
        return (json_int(ge=1, le=max_tokens_limit) | None,
                Field(default=None, description=f"at most {max_tokens_limit}; absent: {max_tokens_limit}"))

    text = Annotated[str, Field(max_length=max_prompt_chars)]
    token_ids = Annotated[list[JsonInt], Field(max_length=max_prompt_tokens)]
    prompt = (text | token_ids | Annotated[list[text], Field(max_length=1)] | Annotated[
        list[token_ids], Field(max_length=1)], Field(description="one prompt: text or token ids (a list of one is "
                                                              "accepted too)"))
    part = create_model("ContentPart", __base__=ContentPart, text=(text | None, None))
    message = create_model("ChatMessage", __base__=ChatMessage, content=(
        text | Annotated[list[part], Field(max_length=max_messages)] | None, None))
    messages = (list[message], Field(min_length=1, max_length=max_messages))
    model = (str, Field(min_length=1, examples=arms, description="the arm's name (see GET /v1/models)"))
    completion = create_model("CompletionRequest", __base__=CompletionRequest, model=model, max_tokens=bounded(),
                              prompt=prompt)
    chat = create_model("ChatCompletionRequest", __base__=ChatCompletionRequest, model=model, messages=messages,
                        max_tokens=bounded(), max_completion_tokens=bounded())
    return completion, chat


# Documented for clients (and fuzzers); service/tags.py checks them.
TAG_PARAMETERS = [
    {"name": header.title(), "in": "header", "required": False,
     "schema": {"type": "string", "pattern": f"^{TAG_VALUE.pattern}$"}}
    for header in TAG_HEADERS.values()
]

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
    400: _error("malformed JSON (NaN and Infinity are not JSON), a bad tag header, or a rejection by the arm"),
    401: _error("missing or wrong bearer token (when auth is on)"),
    404: _error("unknown arm"),
    413: _error("request body too large, or with too many JSON values"),
    422: _error("a missing or invalid field (including max_tokens, messages or a prompt over the limit)"),
    502: _error("the arm failed or broke the connection"),
    503: _error("no replica of the arm is reachable"),
    504: _error("the arm did not answer in time"),
}
