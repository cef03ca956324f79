"""What the gateway adds: latency and throughput, direct against a FAKE
upstream (benchmarks/fake_upstream.py) versus through the gateway, in one run,
with each record store: SQLite and PostgreSQL side by side.

Setup: two gateways run as in production (one process each, uvloop,
httptools), one recording to SQLite, one to a throw-away PostgreSQL cluster
that this script starts (tests/postgres_cluster.py: initdb, fsync on, the
gateway's default synchronous_commit=off), both pinned to one CPU, as is the
PostgreSQL server (so the store's whole cost lands on the gateway's core,
as SQLite's does); the fake upstream and this script's lean HTTP client share
the other CPU. Each request is a streamed
completion of --tokens tokens, one SSE chunk each, --token-gap-ms apart (so
that, as from a real server, chunks arrive one by one; 0 sends them in one
burst), with the final usage chunk and speculative metrics the gateway parses.

At each concurrency level, short blocks alternate: direct, SQLite gateway,
PostgreSQL gateway, direct, ... so that every path sees the same machine state
(this machine is shared). Reported per path: medians and p99s of time to first
token and end to end; the added latency is a gateway's percentile minus the
direct one, and `postgres - sqlite` is what the PostgreSQL store costs over
SQLite's (goal: at most 0.2 ms of p50 at 16 streams).
Throughput is completed requests per second of block time. Because the
client may saturate its CPU before the gateway does, the gateway's own CPU
time per request is also reported, and the rate one fully used core allows
(1 / CPU-seconds per request).

Run (holds the shared heavy-job lock for about two minutes):
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
from service.records import RecordStore
from service.records_postgres import PostgresRecordStore
from service.settings import GatewaySettings

REPO = Path(__file__).resolve().parent.parent
# The tests' throw-away cluster, so that both start PostgreSQL one way.
sys.path.insert(0, str(REPO / "tests"))
from postgres_cluster import start_cluster  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STORES = ("sqlite", "postgres")


@dataclass
class Sample:
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    gateway_cpu_s: float = 0.0
    database_cpu_s: float = 0.0  # the PostgreSQL server's processes, during this path's blocks


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (0 once it has ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
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
                    gateway_pid: int | None, database_pids: list[int] = ()) -> None:
    cpu_before = cpu_seconds(gateway_pid) if gateway_pid else 0.0
    database_before = sum(cpu_seconds(pid) for pid in database_pids)
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(stream_requests(port, request, deadline, sample) for _ in range(concurrency)))
    sample.seconds += time.perf_counter() - started
    if gateway_pid:
        sample.gateway_cpu_s += cpu_seconds(gateway_pid) - cpu_before
    sample.database_cpu_s += sum(cpu_seconds(pid) for pid in database_pids) - database_before


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


def figures(s: Sample) -> dict:
    return {"requests": len(s.e2e), "errors": s.errors, "req_per_s": len(s.e2e) / s.seconds,
            "ttft_p50_ms": 1e3 * statistics.median(s.ttft), "ttft_p99_ms": 1e3 * percentile(s.ttft, 99),
            "e2e_p50_ms": 1e3 * statistics.median(s.e2e), "e2e_p99_ms": 1e3 * percentile(s.e2e, 99)}


METRICS = ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms")


def summarize(direct: Sample, gateways: dict[str, Sample]) -> dict:
    row = {"direct": figures(direct)}
    for store, gateway in gateways.items():
        path = row[store] = figures(gateway)
        for metric in METRICS:
            path[f"added_{metric}"] = path[metric] - row["direct"][metric]
        cpu_per_request = gateway.gateway_cpu_s / max(len(gateway.e2e) + gateway.errors, 1)
        path["gateway_cpu_ms_per_request"] = 1e3 * cpu_per_request
        path["gateway_req_per_s_per_core"] = 1 / cpu_per_request if cpu_per_request else float("inf")
        path["gateway_cpu_busy"] = gateway.gateway_cpu_s / gateway.seconds
        path["database_cpu_ms_per_request"] = 1e3 * gateway.database_cpu_s / max(len(gateway.e2e) + gateway.errors, 1)
    row["postgres_minus_sqlite"] = {metric: row["postgres"][metric] - row["sqlite"][metric] for metric in METRICS}
    return row


async def measure(direct_port: int, gateways: dict[str, tuple[int, int]], database_pids: list[int], levels: list[int],
                  blocks: int, block_s: float, tokens: int, gap_ms: int) -> dict[int, dict]:
    """gateways: store -> (port, pid); database_pids: the PostgreSQL server's processes."""
    results = {}
    direct_request = http_request(direct_port, tokens, gap_ms)
    requests = {store: http_request(port, tokens, gap_ms) for store, (port, _) in gateways.items()}
    for concurrency in levels:
        direct, through = Sample(), {store: Sample() for store in gateways}
        # Warm every path (connections, caches, prepared statements) outside the measurement.
        await run_block(direct_port, direct_request, concurrency, 0.5, Sample(), None)
        for store, (port, _) in gateways.items():
            await run_block(port, requests[store], concurrency, 0.5, Sample(), None)
        for block in range(blocks):
            await run_block(direct_port, direct_request, concurrency, block_s, direct, None)
            # Each store goes first in every other round, so neither always follows the direct block.
            order = list(gateways.items()) if block % 2 == 0 else list(reversed(gateways.items()))
            for store, (port, pid) in order:
                await run_block(port, requests[store], concurrency, block_s, through[store], pid,
                                database_pids if store == "postgres" else [])
        results[concurrency] = summarize(direct, through)
    return results


def print_table(results: dict[int, dict], tokens: int, gap_ms: int) -> None:
    print(f"\nstreamed completions of {tokens} tokens, {gap_ms} ms apart; added = gateway - direct "
          f"(same run, alternating blocks)\n")
    print(f"{'streams':>7} | {'path':>8} | {'req/s':>7} | {'TTFT p50':>9} | {'TTFT p99':>9} | "
          f"{'e2e p50':>8} | {'e2e p99':>8} | errors")
    for concurrency, row in results.items():
        for path in ("direct",) + STORES:
            r = row[path]
            print(f"{concurrency:>7} | {path:>8} | {r['req_per_s']:>7.0f} | {r['ttft_p50_ms']:>7.2f}ms | "
                  f"{r['ttft_p99_ms']:>7.2f}ms | {r['e2e_p50_ms']:>6.2f}ms | {r['e2e_p99_ms']:>6.2f}ms | {r['errors']}")
        for store in STORES:
            r = row[store]
            print(f"{'':>7} | {'+' + store:>8} | {'':>7} | {r['added_ttft_p50_ms']:>7.2f}ms | "
                  f"{r['added_ttft_p99_ms']:>7.2f}ms | {r['added_e2e_p50_ms']:>6.2f}ms | "
                  f"{r['added_e2e_p99_ms']:>6.2f}ms |")
        d = row["postgres_minus_sqlite"]
        print(f"{'':>7} | {'pg - sql':>8} | {'':>7} | {d['ttft_p50_ms']:>7.2f}ms | {d['ttft_p99_ms']:>7.2f}ms | "
              f"{d['e2e_p50_ms']:>6.2f}ms | {d['e2e_p99_ms']:>6.2f}ms |")
        for store in STORES:
            r = row[store]
            database = (f"; database server CPU {r['database_cpu_ms_per_request']:.3f} ms/request"
                        if store == "postgres" else "")
            print(f"{'':>7} | {store} gateway CPU {r['gateway_cpu_ms_per_request']:.3f} ms/request, core busy "
                  f"{100 * r['gateway_cpu_busy']:.0f}%: {r['gateway_req_per_s_per_core']:.0f} req/s per core{database}")
    print("\ngoals: added p50 < 0.5 ms, added p99 < 2 ms, >= 1000 streamed req/s on one core; "
          "PostgreSQL's e2e p50 at most 0.2 ms over SQLite's at 16 streams")


def bench_record(n: int) -> dict:
    """A record shaped like a 16-token streamed completion's."""
    now = time.time()
    return {"request_id": f"commit-{n}-{time.time_ns()}", "run_id": "none", "arm": "fake", "task": "bench",
            "stratum": "none", "prompt_id": "none", "regime": "none", "endpoint": "completions", "stream": 1,
            "upstream": "http://127.0.0.1:1", "status": "ok", "http_status": 200, "finish_reason": "length",
            "t_start": now, "t_first_token": now + 0.001, "t_end": now + 0.02, "ttft_s": 0.001, "e2e_s": 0.02,
            "tpot_s": 0.001, "itl_mean_s": 0.001, "itl_p50_s": 0.001, "itl_p99_s": 0.001, "itl_max_s": 0.001,
            "itl_json": json.dumps([0.001] * 15), "prompt_tokens": 12, "completion_tokens": 16, "max_tokens": 16,
            "temperature": 0.0, "spec_drafts": 5, "spec_draft_tokens": 15, "spec_accepted_tokens": 10,
            "spec_accepted_per_pos": "[5, 3, 2]", "spec_json": "{}", "output_hash": "0" * 64,
            "output_hash_kind": "token_ids", "output_text": " fake" * 16}


async def commit_wait_ms(store, concurrency: int, rounds: int) -> float:
    """Median time from a record's write() to its commit's acknowledgement, `concurrency` at a time."""
    waits = []

    async def one(n: int) -> None:
        started = time.perf_counter()
        await store.write(bench_record(n))
        waits.append(time.perf_counter() - started)

    for r in range(rounds):
        await asyncio.gather(*(one(r * concurrency + i) for i in range(concurrency)))
    return 1e3 * statistics.median(waits[5 * concurrency:])  # past the warm-up (prepared statement, caches)


def commit_waits(tmp: Path, url: str, synchronous_commit: str, levels: list[int]) -> dict[int, dict[str, float]]:
    """Each store's commit wait alone, in this process, as the gateway's event loop sees it."""
    sys.setswitchinterval(0.0005)  # as service/server.py sets it
    stores = {"sqlite": RecordStore(tmp / "commit-wait.sqlite"),
              "postgres": PostgresRecordStore(url, synchronous_commit=synchronous_commit)}
    try:
        return {level: {name: uvloop.run(commit_wait_ms(store, level, 200)) for name, store in stores.items()}
                for level in levels}
    finally:
        for store in stores.values():
            store.close()


def start_gateway(stack: ProcessStack, tmp: Path, name: str, cpu: int, **settings) -> tuple[int, int]:
    """A gateway process pinned to `cpu`, healthy; (port, pid)."""
    config = GatewaySettings(port=free_port(), **settings)
    (tmp / f"gateway-{name}.json").write_text(config.model_dump_json())
    child = stack.add(start_child(f"gateway {name}", [
        "taskset", "-c", str(cpu), sys.executable, "-m", "service.server",
        "--settings", str(tmp / f"gateway-{name}.json")], tmp / f"gateway-{name}.log", cwd=str(REPO)))
    wait_healthy(child, f"http://127.0.0.1:{config.port}/health", 60, interval_s=0.1)
    return config.port, child.pid


def postgres_pids(cluster) -> list[int]:
    """The server and its processes now (the gateway's backend among them, once it has connected)."""
    server = cluster.server_pid()
    return [server] + [int(pid) for pid in Path(f"/proc/{server}/task/{server}/children").read_text().split()]


def pin_postgres(cluster, cpu: int) -> None:
    """The server and every process it has, onto `cpu` (backends forked later inherit it)."""
    for pid in postgres_pids(cluster):
        try:
            os.sched_setaffinity(pid, {cpu})
        except ProcessLookupError:  # a start-up helper that has just ended
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,16,64", help="concurrent streams (default 1,16,64)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per streamed completion (default 16)")
    parser.add_argument("--token-gap-ms", type=int, default=1, help="ms between tokens (default 1; 0: one burst)")
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks per path and level (default 4)")
    parser.add_argument("--block-seconds", type=float, default=1.5, help="seconds per block (default 1.5)")
    parser.add_argument("--gateway-cpu", type=int, default=0, help="CPU the gateway is pinned to (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU of the client and the fake (default 1)")
    parser.add_argument("--postgres-cpu", type=int, help="CPU of the PostgreSQL server (default: the gateway's)")
    parser.add_argument("--synchronous-commit", choices=("on", "off"), default="off",
                        help="the PostgreSQL gateway's records_synchronous_commit (default off, the gateway's)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]

    cluster = start_cluster(durable=True)
    try:
        pin_postgres(cluster, args.gateway_cpu if args.postgres_cpu is None else args.postgres_cpu)
        with tempfile.TemporaryDirectory(prefix="specdrift-bench-") as tmp, ProcessStack() as stack:
            tmp = Path(tmp)
            fake_port = free_port()
            fake = stack.add(start_child("fake upstream", [
                sys.executable, str(REPO / "benchmarks" / "fake_upstream.py"), "--port", str(fake_port),
                "--cpu", str(args.client_cpu)], tmp / "fake.log"))
            wait_healthy(fake, f"http://127.0.0.1:{fake_port}/health", 30, interval_s=0.1)
            upstreams = {"fake": [f"http://127.0.0.1:{fake_port}"]}
            gateways = {
                "sqlite": start_gateway(stack, tmp, "sqlite", args.gateway_cpu, upstreams=upstreams,
                                        records_path=tmp / "records.sqlite"),
                "postgres": start_gateway(stack, tmp, "postgres", args.gateway_cpu, upstreams=upstreams,
                                          records_path=tmp / "unused.sqlite", records_url=cluster.url,
                                          records_synchronous_commit=args.synchronous_commit),
            }
            os.sched_setaffinity(0, {args.client_cpu})
            results = uvloop.run(measure(fake_port, gateways, postgres_pids(cluster), levels, args.blocks,
                                         args.block_seconds, args.tokens, args.token_gap_ms))
            stack.stop_all()
            os.sched_setaffinity(0, {args.gateway_cpu})  # where the gateway's writer thread runs
            waits = commit_waits(tmp, cluster.url, args.synchronous_commit, levels)
    finally:
        cluster.stop()
    print_table(results, args.tokens, args.token_gap_ms)
    print("\ncommit wait alone (write() to acknowledgement, in one process on the gateway's CPU), p50:")
    for level, wait in waits.items():
        print(f"{level:>7} writers: sqlite {wait['sqlite']:.3f} ms, postgres {wait['postgres']:.3f} ms, "
              f"difference {wait['postgres'] - wait['sqlite']:.3f} ms")
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "token_gap_ms": args.token_gap_ms,
                                         "synchronous_commit": args.synchronous_commit, "levels": results,
                                         "commit_wait_p50_ms": waits}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
