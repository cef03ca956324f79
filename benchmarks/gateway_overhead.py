"""What the gateway adds: latency and throughput, direct against a FAKE
upstream (benchmarks/fake_upstream.py) versus through the gateway, in one run.

Setup: the gateway runs as it does in production (one process, uvloop,
httptools, records to SQLite) pinned to one CPU; the fake upstream and this
script's lean HTTP client share the other CPU. Each request is a streamed
completion of --tokens tokens, one SSE chunk each, --token-gap-ms apart (so
that, as from a real server, chunks arrive one by one; 0 sends them in one
burst), with the final usage chunk and speculative metrics the gateway parses.

At each concurrency level, short blocks alternate: direct, gateway, direct,
gateway, ... so that both paths see the same machine state (this machine is
shared). Reported per path: medians and p99s of time to first token and end
to end; the added latency is the gateway's percentile minus the direct one.
Throughput is completed requests per second of block time. Because the
client may saturate its CPU before the gateway does, the gateway's own CPU
time per request is also reported, and the rate one fully used core allows
(1 / CPU-seconds per request).

Run (holds the shared heavy-job lock for about a minute):
    flock /tmp/specdrift-heavy.lock .venv/bin/python benchmarks/gateway_overhead.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from core.processes import ProcessStack, free_port, start_child, wait_healthy
from service.settings import GatewaySettings

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    gateway_cpu_s: float = 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def stream_requests(port: int, request: bytes, deadline: float, sample: Sample) -> None:
    """One keep-alive connection sending streamed requests back to back until the deadline."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            ok = head.startswith(b"HTTP/1.1 200")
            first = None
            while True:  # chunked body: size line, data, CRLF; a zero size ends it
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                if first is None and b'"text"' in data:
                    first = time.perf_counter()
            ended = time.perf_counter()
            if ok and first is not None:
                sample.ttft.append(first - started)
                sample.e2e.append(ended - started)
            else:
                sample.errors += 1
    finally:
        writer.close()


async def run_block(port: int, request: bytes, concurrency: int, seconds: float, sample: Sample,
                    gateway_pid: int | None) -> None:
    cpu_before = cpu_seconds(gateway_pid) if gateway_pid else 0.0
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(stream_requests(port, request, deadline, sample) for _ in range(concurrency)))
    sample.seconds += time.perf_counter() - started
    if gateway_pid:
        sample.gateway_cpu_s += cpu_seconds(gateway_pid) - cpu_before


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def http_request(port: int, tokens: int, gap_ms: int) -> bytes:
    body = json.dumps({"model": "fake", "prompt": f"benchmark fake:tokens={tokens} fake:delay_ms={gap_ms}",
                       "max_tokens": tokens,
                       "temperature": 0, "stream": True}).encode()
    return (b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"x-specdrift-task: bench\r\ncontent-length: %d\r\n\r\n%s" % (port, len(body), body))


def summarize(direct: Sample, gateway: Sample) -> dict:
    row = {}
    for name, s in (("direct", direct), ("gateway", gateway)):
        row[name] = {"requests": len(s.e2e), "errors": s.errors, "req_per_s": len(s.e2e) / s.seconds,
                     "ttft_p50_ms": 1e3 * statistics.median(s.ttft), "ttft_p99_ms": 1e3 * percentile(s.ttft, 99),
                     "e2e_p50_ms": 1e3 * statistics.median(s.e2e), "e2e_p99_ms": 1e3 * percentile(s.e2e, 99)}
    for metric in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms"):
        row[f"added_{metric}"] = row["gateway"][metric] - row["direct"][metric]
    cpu_per_request = gateway.gateway_cpu_s / max(len(gateway.e2e) + gateway.errors, 1)
    row["gateway_cpu_ms_per_request"] = 1e3 * cpu_per_request
    row["gateway_req_per_s_per_core"] = 1 / cpu_per_request if cpu_per_request else float("inf")
    row["gateway_cpu_busy"] = gateway.gateway_cpu_s / gateway.seconds
    return row


async def measure(direct_port: int, gateway_port: int, gateway_pid: int, levels: list[int], blocks: int,
                  block_s: float, tokens: int, gap_ms: int) -> dict[int, dict]:
    results = {}
    direct_request = http_request(direct_port, tokens, gap_ms)
    gateway_request = http_request(gateway_port, tokens, gap_ms)
    for concurrency in levels:
        direct, through = Sample(), Sample()
        # Warm both paths (connections, caches) outside the measurement.
        await run_block(direct_port, direct_request, concurrency, 0.5, Sample(), None)
        await run_block(gateway_port, gateway_request, concurrency, 0.5, Sample(), None)
        for _ in range(blocks):
            await run_block(direct_port, direct_request, concurrency, block_s, direct, None)
            await run_block(gateway_port, gateway_request, concurrency, block_s, through, gateway_pid)
        results[concurrency] = summarize(direct, through)
    return results


def print_table(results: dict[int, dict], tokens: int, gap_ms: int) -> None:
    print(f"\nstreamed completions of {tokens} tokens, {gap_ms} ms apart; added = gateway - direct "
          f"(same run, alternating blocks)\n")
    print(f"{'streams':>7} | {'path':>7} | {'req/s':>7} | {'TTFT p50':>9} | {'TTFT p99':>9} | "
          f"{'e2e p50':>8} | {'e2e p99':>8} | errors")
    for concurrency, row in results.items():
        for path in ("direct", "gateway"):
            r = row[path]
            print(f"{concurrency:>7} | {path:>7} | {r['req_per_s']:>7.0f} | {r['ttft_p50_ms']:>7.2f}ms | "
                  f"{r['ttft_p99_ms']:>7.2f}ms | {r['e2e_p50_ms']:>6.2f}ms | {r['e2e_p99_ms']:>6.2f}ms | {r['errors']}")
        print(f"{'':>7} | {'added':>7} | {'':>7} | {row['added_ttft_p50_ms']:>7.2f}ms | "
              f"{row['added_ttft_p99_ms']:>7.2f}ms | {row['added_e2e_p50_ms']:>6.2f}ms | "
              f"{row['added_e2e_p99_ms']:>6.2f}ms |")
        print(f"{'':>7} | gateway CPU {row['gateway_cpu_ms_per_request']:.3f} ms/request, core busy "
              f"{100 * row['gateway_cpu_busy']:.0f}%: {row['gateway_req_per_s_per_core']:.0f} req/s per core")
    print("\ngoals: added p50 < 0.5 ms, added p99 < 2 ms, >= 1000 streamed req/s on one core")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,16,64", help="concurrent streams (default 1,16,64)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per streamed completion (default 16)")
    parser.add_argument("--token-gap-ms", type=int, default=1, help="ms between tokens (default 1; 0: one burst)")
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks per path and level (default 4)")
    parser.add_argument("--block-seconds", type=float, default=1.5, help="seconds per block (default 1.5)")
    parser.add_argument("--gateway-cpu", type=int, default=0, help="CPU the gateway is pinned to (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU of the client and the fake (default 1)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]

    with tempfile.TemporaryDirectory(prefix="specdrift-bench-") as tmp, ProcessStack() as stack:
        tmp = Path(tmp)
        fake_port = free_port()
        fake = stack.add(start_child("fake upstream", [
            sys.executable, str(REPO / "benchmarks" / "fake_upstream.py"), "--port", str(fake_port),
            "--cpu", str(args.client_cpu)], tmp / "fake.log"))
        wait_healthy(fake, f"http://127.0.0.1:{fake_port}/health", 30, interval_s=0.1)
        settings = GatewaySettings(port=free_port(), upstreams={"fake": [f"http://127.0.0.1:{fake_port}"]},
                                   records_path=tmp / "records.sqlite")
        (tmp / "gateway.json").write_text(settings.model_dump_json())
        gateway = stack.add(start_child("gateway", [
            "taskset", "-c", str(args.gateway_cpu), sys.executable, "-m", "service.server",
            "--settings", str(tmp / "gateway.json")], tmp / "gateway.log", cwd=str(REPO)))
        wait_healthy(gateway, f"http://127.0.0.1:{settings.port}/health", 60, interval_s=0.1)
        os.sched_setaffinity(0, {args.client_cpu})
        results = uvloop.run(measure(fake_port, settings.port, gateway.pid, levels, args.blocks,
                                     args.block_seconds, args.tokens, args.token_gap_ms))
    print_table(results, args.tokens, args.token_gap_ms)
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "token_gap_ms": args.token_gap_ms,
                                         "levels": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
