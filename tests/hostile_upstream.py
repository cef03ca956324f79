"""HOSTILE UPSTREAM: a test double that misbehaves as a broken or malicious
arm would. Only the gateway's tests use it.

A tiny real HTTP server on 127.0.0.1 (asyncio, in a background thread of the
test process). It answers `POST /v1/completions` and `/v1/chat/completions`
with a scripted answer, named by the prompt (completions) or the last
message (chat): "hostile:<name>". `SCRIPTS` holds one script per bad value;
a test may add its own to `HostileUpstream.scripts` (the fuzz test does).
A script is a function of `chat` (True for the chat route) returning a
`Script`: its HTTP status, and the items of its chunked body:

| item | written |
|---|---|
| dict | one SSE event `data: <json>` (json.dumps: a lone surrogate goes out as `\\ud800`, 2**64 as digits) |
| bytes | these bytes, as one chunk |
| float | nothing: a pause of that many seconds |
| DROP | nothing more: the connection is aborted |

`GET /health` and `GET /v1/models` (serving `hostile`) answer normally.
`served` counts the requests per script name. `hostile_scripts` and
`hostile_events` are hypothesis strategies for random answers and chunks.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

MODEL = "hostile"
DROP = object()


@dataclass
class Script:
    items: list = field(default_factory=list)
    status: int = 200


def choice(chat: bool, text: Any = " t", token_ids: Any = None, finish_reason: Any = None,
           **more: Any) -> dict[str, Any]:
    """One choice in the arm's shape; pass `text=...` as any value, `token_ids=...` to add ids."""
    found = {"index": 0, ("delta" if chat else "text"): {"content": text} if chat else text,
             "finish_reason": finish_reason, **more}
    if token_ids is not None:
        found["token_ids"] = token_ids
    return found


def chunk(chat: bool, *choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"id": "hostile-1", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
            "model": MODEL, "choices": list(choices), **top}


def usage(chat: bool, completion_tokens: Any = 2, prompt_tokens: Any = 3, **top: Any) -> dict[str, Any]:
    return chunk(chat, usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": 5}, **top)


def spec(**fields: Any) -> dict[str, Any]:
    values = {"num_spec_steps": 2, "num_draft_tokens": 6, "num_accepted_draft_tokens": 1,
              "acceptance_histogram": [1, 1, 0, 0], **fields}
    return {"speculative_decoding": values}


def stream(chat: bool, *events: Any, done: bool = True) -> Script:
    """A stream: chat's role chunk, `events`, then `[DONE]`."""
    head = [chunk(chat, {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})] \
        if chat else []
    return Script(head + list(events) + ([b"data: [DONE]\n\n"] if done else []))


def good(chat: bool, tokens: int = 2) -> list[dict[str, Any]]:
    """A well-formed answer's events: `tokens` chunks with ids, then usage with speculative metrics."""
    events = [chunk(chat, choice(chat, f" t{n}", [100 + n], "length" if n == tokens - 1 else None))
              for n in range(tokens)]
    return events + [usage(chat, tokens, metrics=spec(num_spec_steps=tokens))]


def error_event(message: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": "HostileError", "param": None, "code": 500}}


# One script per bad value; each ends the request in `expected status` (the test's table).
SCRIPTS: dict[str, Callable[[bool], Script]] = {
    "ok": lambda chat: stream(chat, *good(chat)),
    "slow": lambda chat: stream(chat, *[item for n in range(200) for item in (
        chunk(chat, choice(chat, f" t{n}", [100 + n])), 0.05)]),
    # the last token, then a pause before usage and [DONE]: time for a client to leave
    "late_done": lambda chat: stream(chat, *good(chat)[:-1], 0.2, good(chat)[-1]),
    "usage_2_64": lambda chat: stream(chat, *good(chat)[:-1], usage(chat, 2 ** 64)),
    "usage_negative": lambda chat: stream(chat, *good(chat)[:-1], usage(chat, -1)),
    "usage_string": lambda chat: stream(chat, *good(chat)[:-1], usage(chat, "2")),
    "usage_float": lambda chat: stream(chat, *good(chat)[:-1], usage(chat, 2.5)),
    "usage_bool": lambda chat: stream(chat, *good(chat)[:-1], usage(chat, prompt_tokens=True)),
    "usage_nan": lambda chat: stream(chat, *good(chat)[:-1], usage(chat, float("nan"))),
    "usage_not_object": lambda chat: stream(chat, *good(chat)[:-1], chunk(chat, usage=[1, 2])),
    "prompt_tokens_2_70": lambda chat: stream(chat, *good(chat)[:-1], usage(chat, prompt_tokens=2 ** 70)),
    "surrogate_text": lambda chat: stream(chat, chunk(chat, choice(chat, "a\ud800b", [5])), *good(chat)),
    "surrogate_text_no_ids": lambda chat: stream(chat, chunk(chat, choice(chat, "\ud800")), usage(chat, 1)),
    "surrogate_error_message": lambda chat: stream(chat, *good(chat)[:1], error_event("broke \ud800 here")),
    "error_message_object": lambda chat: stream(chat, error_event({"deep": ["\udfff", 2 ** 64]})),
    "error_not_object": lambda chat: stream(chat, {"error": 2 ** 64}),
    # vLLM checks a prompt's token ids only once it streams: a 400 as its first event.
    "refused_in_stream": lambda chat: stream(chat, {"error": {"message": "Token id 318588 is out of vocabulary",
                                                              "type": "BadRequestError", "param": None, "code": 400}}),
    "finish_reason_object": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [5], {"why": "stop"})),
                                                usage(chat, 1)),
    "finish_reason_number": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [5], 7)), usage(chat, 1)),
    "finish_reason_surrogate": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [5], "st\ud800p"))),
    "finish_reason_long": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [5], "x" * 10_000))),
    "text_number": lambda chat: stream(chat, chunk(chat, choice(chat, 12345, [5]))),
    "text_object": lambda chat: stream(chat, chunk(chat, choice(chat, {"a": 1}))),
    "token_ids_strings": lambda chat: stream(chat, chunk(chat, choice(chat, " t", ["1", "2"]))),
    "token_ids_negative": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [-1]))),
    "token_ids_2_64": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [2 ** 64]))),
    "token_ids_floats": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [1.5]))),
    "token_ids_bools": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [True]))),
    "token_ids_nested": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [[1]]))),
    "token_ids_not_list": lambda chat: stream(chat, chunk(chat, choice(chat, " t", "123"))),
    "token_ids_past_max_tokens": lambda chat: stream(chat, *[chunk(chat, choice(chat, " t", [1, 2, 3, 4]))
                                                            for _ in range(10)]),
    "text_past_max_tokens": lambda chat: stream(chat, *[chunk(chat, choice(chat, " t")) for _ in range(100)]),
    "empty_events_forever": lambda chat: stream(chat, *[b"data: {}\n\n"] * 10_000),
    "spec_steps_2_64": lambda chat: stream(chat, *good(chat)[:-1], usage(chat, metrics=spec(num_spec_steps=2 ** 64))),
    "spec_steps_string": lambda chat: stream(chat, *good(chat)[:-1], usage(chat, metrics=spec(num_spec_steps="2"))),
    "spec_draft_tokens_negative": lambda chat: stream(chat, *good(chat)[:-1],
                                                      usage(chat, metrics=spec(num_draft_tokens=-6))),
    "spec_histogram_strings": lambda chat: stream(chat, *good(chat)[:-1],
                                                  usage(chat, metrics=spec(acceptance_histogram=["x"]))),
    "spec_histogram_2_64": lambda chat: stream(chat, *good(chat)[:-1],
                                               usage(chat, metrics=spec(acceptance_histogram=[2 ** 64, 1]))),
    "spec_histogram_long": lambda chat: stream(chat, *good(chat)[:-1],
                                               usage(chat, metrics=spec(acceptance_histogram=[1] * 10_000))),
    "spec_not_object": lambda chat: stream(chat, *good(chat)[:-1],
                                           usage(chat, metrics={"speculative_decoding": [1, 2]})),
    "metrics_not_object": lambda chat: stream(chat, *good(chat)[:-1], usage(chat, metrics="fast")),
    "choices_not_list": lambda chat: stream(chat, chunk(chat) | {"choices": "abc"}),
    "two_choices": lambda chat: stream(chat, chunk(chat, choice(chat, " a", [1]), choice(chat, " b", [2]))),
    "choice_not_object": lambda chat: stream(chat, chunk(chat) | {"choices": [5]}),
    "delta_not_object": lambda chat: stream(chat, chunk(chat, {"index": 0, "delta": "hi", "text": ["hi"]})),
    "tool_calls_bad": lambda chat: stream(chat, chunk(chat, {"index": 0, "delta": {"tool_calls": [
        {"index": "first", "function": {"name": 5}}]}, "token_ids": [7]})),
    "logprobs_not_object": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [5], logprobs=[1, 2]))),
    "logprobs_surrogate": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [5], logprobs={
        "tokens": ["\ud800"]})), usage(chat, 1)),
    "event_number": lambda chat: stream(chat, b"data: 5\n\n"),
    "event_list": lambda chat: stream(chat, b"data: [1, 2]\n\n"),
    "event_string": lambda chat: stream(chat, b'data: "text"\n\n'),
    "not_json": lambda chat: stream(chat, b"data: {not json\n\n"),
    "nan_in_logprobs": lambda chat: stream(chat, chunk(chat, choice(chat, " t", [5], logprobs={
        "token_logprobs": [float("nan")]})), usage(chat, 1)),
    "deep_nesting": lambda chat: stream(chat, b"data: " + b"[" * 100_000 + b"\n\n"),
    "huge_int_literal": lambda chat: stream(chat, b'data: {"usage": {"completion_tokens": ' + b"9" * 5000 + b"}}\n\n"),
    "invalid_utf8": lambda chat: stream(chat, b'data: {"choices": [{"index": 0, "text": "\xff\xfe"}]}\n\n'),
    "encoded_surrogate": lambda chat: stream(chat, b'data: {"choices": [{"index": 0, ' + (
        b'"delta": {"content": "\xed\xa0\x80"}' if chat else b'"text": "\xed\xa0\x80"') + b'}]}\n\n'),
    "huge_event": lambda chat: stream(chat, *[b"x" * 2 ** 20] * 6),
    "multiline_data": lambda chat: stream(chat, b'data: {"id": "x", "choices":\ndata: [' + json.dumps(
        choice(chat, " t", [5], "stop")).encode() + b"]}\n\n", usage(chat, 1)),
    "no_done": lambda chat: stream(chat, *good(chat), done=False),
    "dies_mid_stream": lambda chat: stream(chat, *good(chat)[:1], DROP),
    "status_302": lambda chat: Script([b'{"error": {"message": "go elsewhere"}}'], status=302),
    "status_204": lambda chat: Script([], status=204),
    "status_500_huge_body": lambda chat: Script([b"e" * 2 ** 20] * 4, status=500),
    "status_400_surrogate": lambda chat: Script([json.dumps(error_event("no \ud800 way")).encode()], status=400),
    "status_400_message_list": lambda chat: Script([json.dumps({"error": {"message": ["a", 2 ** 64]}}).encode()],
                                                   status=400),
    "status_500_dies": lambda chat: Script([b'{"error": ', DROP], status=500),
}


class HostileUpstream:
    """The server; `url` once started. Use as a context manager, or start() and stop()."""

    def __init__(self):
        self.scripts: dict[str, Callable[[bool], Script]] = dict(SCRIPTS)
        self.served: Counter = Counter()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hostile-upstream", daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> HostileUpstream:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, _, header_block = head.decode("latin-1").partition("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in header_block.split("\r\n")
                                                     if ": " in line)}
                length = int(headers.get("content-length", 0))
                body = await reader.readexactly(length) if length else b""
                if not await self._answer(method, path, body, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return  # the peer left, or stop() ends the connection
        finally:
            writer.close()

    async def _answer(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answers one request; False when the connection is to be dropped."""
        if method == "GET" and path in ("/health", "/v1/models"):
            payload = json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(payload), payload))
            return True
        request = json.loads(body or b"{}")
        chat = path.endswith("/chat/completions")
        text = request["messages"][-1]["content"] if chat else request.get("prompt", "")
        name = text.removeprefix("hostile:") if isinstance(text, str) else "ok"
        self.served[name] += 1
        script = self.scripts.get(name, SCRIPTS["ok"])(chat)
        if script.status in (204, 304):  # no body, not even a chunked one's end
            writer.write(b"HTTP/1.1 %d X\r\n\r\n" % script.status)
            return True
        writer.write(b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n" % (
            script.status, b"text/event-stream" if script.status == 200 else b"application/json"))
        for item in script.items:
            if item is DROP:
                writer.transport.abort()
                return False
            if isinstance(item, float):
                await asyncio.sleep(item)
                continue
            data = b"data: " + json.dumps(item).encode() + b"\n\n" if isinstance(item, dict) else item
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            try:
                await writer.drain()
            except ConnectionError:
                return False
            if writer.transport.is_closing():  # the gateway went away
                return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


# --- random chunks, for the fuzz tests -----------------------------------------------

def hostile_values() -> st.SearchStrategy:
    """Any JSON value, with the edges an arm could send: lone surrogates, integers past 2**63, NaN."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.sampled_from([2 ** 63 - 1, 2 ** 63, 2 ** 64, -1, 0]),
        st.floats(), st.text(st.characters(exclude_categories=()), max_size=6),
        st.sampled_from(["\ud800", "a\udfffb", "stop", "length", ""]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=4), inner, max_size=3), max_leaves=6)


def hostile_events(chat: bool) -> st.SearchStrategy:
    """Events shaped like the arm's: well-formed ones, ones with one field set to any value, ones whose every
    field may hold any value, and values that are not even objects."""
    anything = hostile_values()
    text = st.text(st.characters(exclude_categories=()), max_size=5)
    well_formed = st.builds(
        lambda text, ids, finish: chunk(chat, choice(chat, text, ids, finish)), text,
        st.lists(st.integers(0, 50_000), min_size=1, max_size=3), st.sampled_from([None, None, "stop", "length"]))
    usage_event = st.builds(lambda n, steps: usage(chat, n, metrics=spec(num_spec_steps=steps)),
                            st.integers(0, 10), st.integers(0, 10))
    one_bad = st.builds(with_field, st.one_of(well_formed, usage_event), st.sampled_from(FIELDS), anything)
    counts = st.one_of(st.integers(0, 1000), anything)
    one_choice = st.fixed_dictionaries({"index": st.just(0)}, optional={
        ("delta" if chat else "text"): st.one_of(st.fixed_dictionaries({}, optional={
            "content": text, "reasoning": anything, "tool_calls": anything}), anything) if chat else text,
        "token_ids": st.one_of(st.lists(st.integers(0, 50_000), max_size=4), anything),
        "finish_reason": anything, "logprobs": anything})
    spec_fields = st.fixed_dictionaries({}, optional={
        "num_spec_steps": counts, "num_draft_tokens": counts, "num_accepted_draft_tokens": counts,
        "acceptance_histogram": st.one_of(st.lists(counts, max_size=5), anything)})
    random_event = st.fixed_dictionaries({"id": st.just("fuzz")}, optional={
        "choices": st.one_of(st.lists(one_choice, max_size=2), anything),
        "usage": st.one_of(st.fixed_dictionaries({}, optional={
            "prompt_tokens": counts, "completion_tokens": counts, "total_tokens": counts}), anything),
        "metrics": st.one_of(st.fixed_dictionaries({"speculative_decoding": st.one_of(spec_fields, anything)}),
                             anything)})
    error = st.builds(error_event, anything)
    return st.one_of(well_formed, well_formed, usage_event, one_bad, one_bad, random_event, error, anything)


# Where with_field puts its value: a choice's field, a usage count, a speculative count, or a whole part.
FIELDS = ("text", "token_ids", "finish_reason", "logprobs", "delta", "choices", "usage", "metrics",
          "usage.completion_tokens", "usage.prompt_tokens", "spec.num_spec_steps", "spec.acceptance_histogram")


def with_field(event: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    event = json.loads(json.dumps(event))
    part, _, key = field.partition(".")
    if part == "usage" and key:
        event.setdefault("usage", {})[key] = value
    elif part == "spec":
        event.setdefault("usage", {"completion_tokens": 1})
        event.setdefault("metrics", spec())["speculative_decoding"][key] = value
    elif part in ("choices", "usage", "metrics"):
        event[part] = value
    elif event.get("choices"):
        target = event["choices"][0]
        if part == "text" and "delta" in target:
            target["delta"]["content"] = value
        else:
            target[part] = value
    return event


def hostile_scripts(chat: bool) -> st.SearchStrategy:
    """Whole answers: a status and a body of random events, raw bytes and breaks, usually ending in [DONE]."""
    raw = st.one_of(st.binary(max_size=12).map(lambda data: b"data: " + data + b"\n\n"),
                    st.sampled_from([b": comment\n\n", b"data: [DONE]\n\n", b"\r\n\r\n", b"data: {\n\n"]))
    # An event that is no object goes out as its JSON too (a float item would be a pause).
    event = hostile_events(chat).map(
        lambda e: e if isinstance(e, dict) else b"data: " + json.dumps(e).encode() + b"\n\n")
    item = st.one_of(event, event, raw, st.just(DROP))
    return st.builds(lambda items, done, status: Script(items + ([b"data: [DONE]\n\n"] if done else []), status),
                     st.lists(item, max_size=6), st.booleans(), st.sampled_from([200, 200, 200, 200, 400, 500, 302]))
