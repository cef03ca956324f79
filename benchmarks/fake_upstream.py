"""FAKE UPSTREAM: a tiny, fast stand-in for a vLLM OpenAI server.

It exists for two things only: the gateway's error-path tests and its
overhead benchmark. It never generates text; it answers in vLLM's streaming
shape (role chunk for chat, `token_ids` per chunk, a final usage chunk with
`metrics.speculative_decoding`, `data: [DONE]`) with as little work as
possible, so that what is measured through it is the gateway.

Behaviour is chosen per request by directives in the prompt (completions) or
the last message (chat), e.g. "fake:tokens=5 fake:die_after=2":

| directive | effect |
|---|---|
| tokens=N | N output tokens (default: min(max_completion_tokens or max_tokens, 16)) |
| burst=B | B tokens per chunk, like a speculative step (default 1) |
| first_ms=T | wait T ms before the first token |
| delay_ms=T | wait T ms between chunks |
| die_after=K | drop the connection after K chunks |
| error_after=K | after K chunks send a vLLM-style error event |
| status=S | answer HTTP S with an OpenAI error body instead |
| hangup=1 | drop the connection without answering |
| nodone=1 | end the stream without `[DONE]` |
| badjson=1 | send an event that is not JSON |

`GET /stats` counts requests started, completed, aborted by the client (a
closed connection mid-stream) and hung up on. `GET /v1/models` lists `--served-model`.

Run: python benchmarks/fake_upstream.py --port 9001 [--spec-tokens 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys

import uvloop

DIRECTIVE = re.compile(r"fake:([a-z_]+)=(\d+)")


class FakeUpstream:
    def __init__(self, served_models: list[str], spec_tokens: int):
        self.served_models = served_models
        self.spec_tokens = spec_tokens
        self.stats = {"started": 0, "completed": 0, "aborted": 0, "active": 0, "hung_up": 0}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, _, header_block = head.decode("latin-1").partition("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = dict(line.split(": ", 1) for line in header_block.strip().split("\r\n") if ": " in line)
                length = int({k.lower(): v for k, v in headers.items()}.get("content-length", 0))
                body = await reader.readexactly(length) if length else b""
                keep_going = await self.route(method, path, body, reader, writer)
                if not keep_going:
                    return
        finally:
            writer.close()

    async def route(self, method: str, path: str, body: bytes, reader, writer) -> bool:
        if method == "GET" and path == "/v1/models":
            return self.reply_json(writer, 200, {"object": "list", "data": [
                {"id": name, "object": "model"} for name in self.served_models]})
        if method == "GET" and path in ("/health", "/stats"):
            return self.reply_json(writer, 200, self.stats if path == "/stats" else {})
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            request = json.loads(body)
            if request.get("model") not in self.served_models:
                return self.reply_json(writer, 404, error(f"The model `{request.get('model')}` does not exist.", 404))
            return await self.generate(request, path.endswith("chat/completions"), reader, writer)
        return self.reply_json(writer, 404, error(f"no route {method} {path}", 404))

    def reply_json(self, writer, status: int, payload: dict) -> bool:
        data = json.dumps(payload).encode()
        writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (status, len(data), data))
        return True

    async def generate(self, request: dict, chat: bool, reader, writer) -> bool:
        text = (request["messages"][-1].get("content") if request.get("messages") else None) if chat \
            else request.get("prompt")
        options = {k: int(v) for k, v in DIRECTIVE.findall(text if isinstance(text, str) else "")}
        if "status" in options:
            return self.reply_json(writer, options["status"], error("fake upstream refused", options["status"]))
        if options.get("hangup"):
            self.stats["hung_up"] += 1
            writer.transport.abort()
            return False
        self.stats["started"] += 1
        self.stats["active"] += 1
        try:
            finished = await self.stream(request, chat, options, reader, writer)
        finally:
            self.stats["active"] -= 1
        self.stats["completed" if finished else "aborted"] += 1
        return finished

    async def stream(self, request: dict, chat: bool, options: dict, reader, writer) -> bool:
        """Write the SSE stream; False if the client went away (or we dropped it on purpose)."""
        # The output bound as vLLM reads it: max_completion_tokens first.
        budget = request.get("max_completion_tokens") or request.get("max_tokens") or 16
        n_tokens = options.get("tokens", min(budget, 16))
        burst = max(1, options.get("burst", 1))
        with_ids = bool(request.get("return_token_ids"))
        head = {"id": "fake-1", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": 0, "model": request["model"]}
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")

        def event(payload) -> None:
            if not isinstance(payload, bytes):
                payload = json.dumps(payload, separators=(",", ":")).encode()  # compact, as vLLM writes
            data = b"data: " + payload + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))

        if chat:
            event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]})
        if options.get("first_ms"):
            await asyncio.sleep(options["first_ms"] / 1000)
        sent = chunks = 0
        chunk_sizes = []
        while sent < n_tokens:
            if reader.at_eof() or writer.transport.is_closing():
                return False
            if chunks == options.get("die_after"):
                writer.transport.abort()
                return False
            if chunks == options.get("error_after"):
                event(error("fake upstream failed mid-stream", 500))
                break
            ids = list(range(100 + sent, 100 + min(sent + burst, n_tokens)))
            sent += len(ids)
            chunk_sizes.append(len(ids))
            piece = "".join(f" t{i}" for i in ids)
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            choice["finish_reason"] = "length" if sent >= n_tokens else None
            if with_ids:
                choice["token_ids"] = ids
            event({**head, "choices": [choice]})
            chunks += 1
            if options.get("delay_ms"):
                await asyncio.sleep(options["delay_ms"] / 1000)
            await writer.drain()
        if options.get("badjson"):
            event(b"{not json")
        usage = {"prompt_tokens": 7, "completion_tokens": sent, "total_tokens": 7 + sent}
        final = {**head, "choices": [], "usage": usage}
        if self.spec_tokens:
            final["metrics"] = {"speculative_decoding": self.spec_metrics(chunk_sizes)}
        if request.get("stream_options", {}).get("include_usage"):
            event(final)
        if not options.get("nodone"):
            event(b"[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    def spec_metrics(self, chunk_sizes: list[int]) -> dict:
        """Each chunk is one verify step that accepted (its tokens - 1) drafts."""
        k = self.spec_tokens
        histogram = [0] * (k + 1)
        for size in chunk_sizes:
            histogram[min(k, size - 1)] += 1
        steps = len(chunk_sizes)
        accepted = sum(j * c for j, c in enumerate(histogram))
        return {"mean_acceptance_length": 1 + accepted / steps if steps else 1.0,
                "draft_acceptance_rate": accepted / (k * steps) if steps else 0.0,
                "acceptance_histogram": histogram, "num_spec_steps": steps,
                "num_accepted_draft_tokens": accepted, "num_draft_tokens": k * steps, "num_spec_tokens": k}


def error(message: str, code: int) -> dict:
    return {"error": {"message": message, "type": "FakeUpstreamError", "param": None, "code": code}}


async def serve(port: int, served_models: list[str], spec_tokens: int) -> None:
    fake = FakeUpstream(served_models, spec_tokens)
    server = await asyncio.start_server(fake.handle, "127.0.0.1", port, backlog=1024)
    print(f"fake upstream listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="FAKE vLLM-like upstream for gateway tests and benchmarks")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model", action="append", default=[],
                        help="a model name it serves; repeat for more (default: fake)")
    parser.add_argument("--spec-tokens", type=int, default=3, help="K for the fake speculative metrics; 0: none")
    parser.add_argument("--cpu", type=int, help="pin to this CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    try:
        uvloop.run(serve(args.port, args.served_model or ["fake"], args.spec_tokens))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
