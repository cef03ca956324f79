"""Gateway replicas on one PostgreSQL record store (tests/postgres_cluster.py), on loopback:

- two replicas in front of the real vLLM-CPU baseline arm, one run: the store's records for the run equal
  the client's completed requests, and each names its replica;
- one replica SIGKILLed mid-load: every request the client saw complete has exactly one record, and those in
  flight on the dead replica ended in an error the client saw;
- PostgreSQL stopped for 5 s under load, then started again on its port: every accepted request has its record;
  with a tiny `records_buffer`, the gateway answers 503 past it, and no accepted request loses its record.

The error-path tests stand the FAKE upstream (benchmarks/fake_upstream.py) in for vLLM, so that their load
is fast and bounded."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from core.contracts import REQUEST_ID_HEADER, read_records
from core.processes import free_port, start_child, wait_healthy
from postgres_cluster import postgres_cluster, postgres_database  # noqa: F401 (fixtures)
from service.launch import start_gateway
from service.settings import GatewaySettings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FAKE_UPSTREAM = REPO / "benchmarks" / "fake_upstream.py"


@dataclass
class Outcome:
    gateway: str
    started: float
    ended: float | None = None
    status: int | None = None
    request_id: str | None = None
    completed: bool = False  # a 200 whose whole answer arrived, without an error event
    error: str | None = None  # what the client saw go wrong (a broken connection, an error event, an HTTP error)
    body: str = ""


async def request_once(client: httpx.AsyncClient, gateway: str, body: dict, run: str) -> Outcome:
    outcome = Outcome(gateway, time.monotonic())
    try:
        async with client.stream("POST", gateway + "/v1/completions", json=body,
                                 headers={"X-Specdrift-Run": run}) as response:
            outcome.status = response.status_code
            outcome.request_id = response.headers.get(REQUEST_ID_HEADER)
            outcome.body = (await response.aread()).decode()
        if outcome.status != 200:
            outcome.error = f"HTTP {outcome.status}"
        elif body.get("stream"):
            events = [line[6:] for line in outcome.body.splitlines() if line.startswith("data: ")]
            outcome.completed = events[-1:] == ["[DONE]"] and not any('"error"' in e for e in events[:-1])
            outcome.error = None if outcome.completed else "stream ended without [DONE] or with an error event"
        else:
            outcome.completed = bool(json.loads(outcome.body).get("choices"))
    except httpx.HTTPError as err:
        outcome.error = f"{type(err).__name__}: {err}"
    outcome.ended = time.monotonic()
    return outcome


async def load(gateways: list[str], make_body, run: str, *, concurrency: int, requests: int | None = None,
               seconds: float | None = None, during=None) -> list[Outcome]:
    """`concurrency` clients sending back to back, request n to gateways[n % len(gateways)], until `requests`
    were sent or `seconds` passed; `during(outcomes, in_flight)` runs alongside."""
    outcomes: list[Outcome] = []
    in_flight: dict[int, Outcome] = {}
    counter = itertools.count()
    deadline = time.monotonic() + seconds if seconds else None
    limits = httpx.Limits(max_connections=concurrency * len(gateways))
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:
        async def worker():
            while True:
                n = next(counter)
                if (requests is not None and n >= requests) or (deadline and time.monotonic() > deadline):
                    return
                gateway = gateways[n % len(gateways)]
                task = asyncio.ensure_future(request_once(client, gateway, make_body(n), run))
                in_flight[n] = Outcome(gateway, time.monotonic())
                outcome = await task
                del in_flight[n]
                outcomes.append(outcome)

        workers = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
        if during is not None:
            await during(outcomes, in_flight)
        await asyncio.gather(*workers)
    return outcomes


def records_by_id(url: str, run: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for record in read_records(url, run):
        found.setdefault(record["request_id"], []).append(record)
    return found


def wait_drained(gateways: list[str], timeout_s: float = 30) -> None:
    """Until every gateway's store has committed what it buffered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(httpx.get(g + "/health").json()["records"]["buffered"] == 0 for g in gateways):
            return
        time.sleep(0.1)
    raise AssertionError("records still buffered after the database came back")


@pytest.fixture(scope="module")
def fake(stack, logs) -> str:
    port = free_port()
    child = stack.add(start_child("fake upstream", [sys.executable, str(FAKE_UPSTREAM), "--port", str(port)],
                                  logs / "fake.log"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(child, url + "/health", 30, interval_s=0.1)
    return url


def launch(stack, logs: Path, fake: str, database: str, replica: str, **settings):
    """A gateway process (`python -m service.server`) on the fake upstream and the store; (url, child)."""
    config = GatewaySettings(upstreams={"fake": [fake]}, port=free_port(), records_path=logs / "unused.sqlite",
                             records_url=database, replica=replica, **settings)
    path = logs / f"gateway-{replica}.json"
    path.write_text(config.model_dump_json())
    child = stack.add(start_child(f"gateway {replica}", [sys.executable, "-m", "service.server", "--settings",
                                                         str(path)], logs / f"gateway-{replica}.log", cwd=REPO))
    url = f"http://127.0.0.1:{config.port}"
    wait_healthy(child, url + "/health", 60, interval_s=0.1)
    return url, child


def fake_body(tokens: int, delay_ms: int):
    return lambda n: {"model": "fake", "prompt": f"request {n} fake:tokens={tokens} fake:delay_ms={delay_ms}",
                      "max_tokens": tokens, "stream": n % 2 == 0}


# --- two replicas, the real arm -----------------------------------------------------------

def test_two_replicas_record_every_completed_request_once(real_arms, cpu_config, postgres_database, stack, logs):
    config = cpu_config.model_copy(update={"gateway": cpu_config.gateway.model_copy(
        update={"records_url": postgres_database})})
    run = "replicas-two"
    gateways, pids = [], []
    for name in ("a", "b"):
        gateways.append(start_gateway(config, {"baseline": [real_arms["baseline"]]}, logs / f"real-{name}", stack,
                                      vocabulary={"task": [], "stratum": []}, port=0, run_ids=[run]))
        pids.append(stack.children[-1].pid)

    def body(n: int) -> dict:
        return {"model": "baseline", "prompt": f"Write one sentence about the number {n}.", "max_tokens": 8,
                "temperature": 0, "stream": n % 2 == 1}

    outcomes = asyncio.run(load(gateways, body, run, concurrency=6, requests=24))
    completed = [o for o in outcomes if o.completed]
    assert len(completed) == 24, [o.error for o in outcomes if not o.completed]
    records = read_records(postgres_database, run)
    assert len(records) == len(completed)
    assert sorted(r["request_id"] for r in records) == sorted(o.request_id for o in completed)
    assert {r["status"] for r in records} == {"ok"}
    hostname = os.uname().nodename
    assert {r["replica"] for r in records} == {f"{hostname}:{pid}" for pid in pids}
    by_id = {r["request_id"]: r for r in records}
    for outcome in completed:  # each record names the replica that answered
        assert by_id[outcome.request_id]["replica"] == f"{hostname}:{pids[gateways.index(outcome.gateway)]}"


# --- a replica killed -------------------------------------------------------------------------

def test_a_replica_killed_mid_load_leaves_no_completed_request_unrecorded(fake, postgres_database, stack, logs):
    (a, child_a), (b, _) = (launch(stack, logs, fake, postgres_database, name) for name in ("kill-a", "kill-b"))
    run = "replicas-kill"
    at_kill: dict[int, Outcome] = {}

    async def kill_a(outcomes, in_flight):
        while sum(o.completed for o in outcomes) < 12:
            await asyncio.sleep(0.01)
        # No await between the snapshot and the kill: nothing else runs in between.
        at_kill.update({n: o for n, o in in_flight.items() if o.gateway == a})
        os.kill(child_a.pid, signal.SIGKILL)

    outcomes = asyncio.run(load([a, b], fake_body(8, 40), run, concurrency=8, requests=60, during=kill_a))
    records = records_by_id(postgres_database, run)
    completed = [o for o in outcomes if o.completed]
    assert all(len(records.get(o.request_id, [])) == 1 for o in completed)
    assert all(records[o.request_id][0]["status"] == "ok" for o in completed)
    assert all(o.completed or o.error for o in outcomes) and len(outcomes) == 60  # none silently missing
    assert at_kill, "nothing was in flight on the killed replica"
    # From the first request in flight at the kill on, every one sent to the dead replica ended in an error the
    # client saw, unless its whole answer (and so its record) was already out.
    first = min(o.started for o in at_kill.values())
    late = [o for o in outcomes if o.gateway == a and o.started >= first]
    assert all(o.error or (o.completed and len(records[o.request_id]) == 1) for o in late)
    assert any(o.error for o in late)
    assert {r[0]["replica"] for r in records.values()} == {"kill-a", "kill-b"}
    assert sum(o.completed for o in outcomes if o.gateway == b) == 30  # the survivor answered all of its share


# --- the database down ------------------------------------------------------------------------

def test_the_database_down_for_five_seconds_loses_no_accepted_record(postgres_cluster, postgres_database, fake,
                                                                     stack, logs):
    gateways = [launch(stack, logs, fake, postgres_database, name)[0] for name in ("outage-a", "outage-b")]
    run = "replicas-outage"
    seen = {}

    async def outage(outcomes, in_flight):
        await asyncio.sleep(1.5)
        postgres_cluster.stop_fast()
        stopped = time.monotonic()
        try:
            await asyncio.sleep(2.5)
            async with httpx.AsyncClient() as client:
                health = [(await client.get(g + "/health")) for g in gateways]
                metrics = (await client.get(gateways[0] + "/metrics")).text
            seen["health"] = [(h.status_code, h.json()["records"]["reachable"]) for h in health]
            seen["buffered"] = next(float(line.split()[-1]) for line in metrics.splitlines()
                                    if line.startswith("specdrift_records_buffered "))
            seen["answered_meanwhile"] = sum(o.completed and o.started > stopped for o in outcomes)
            await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - stopped)))
        finally:
            postgres_cluster.start()

    outcomes = asyncio.run(load(gateways, fake_body(4, 10), run, concurrency=4, seconds=8.5, during=outage))
    assert seen["health"] == [(200, False), (200, False)] and seen["buffered"] > 0
    assert seen["answered_meanwhile"] > 0  # responses did not wait for the database
    assert all(o.completed for o in outcomes), {o.error for o in outcomes if not o.completed}
    wait_drained(gateways)
    records = records_by_id(postgres_database, run)
    assert sorted(records) == sorted(o.request_id for o in outcomes)
    assert all(len(found) == 1 for found in records.values())


def test_past_a_tiny_buffer_the_gateway_answers_503_and_keeps_what_it_accepted(postgres_cluster, postgres_database,
                                                                                fake, stack, logs):
    gateway, _ = launch(stack, logs, fake, postgres_database, "tiny", records_buffer=4)
    run = "replicas-tiny"
    asyncio.run(load([gateway], fake_body(2, 0), run, concurrency=1, requests=2))  # connected and warm
    postgres_cluster.stop_fast()
    try:
        outcomes = asyncio.run(load([gateway], fake_body(2, 0), run, concurrency=2, requests=14))
    finally:
        postgres_cluster.start()
    accepted = [o for o in outcomes if o.completed]
    refused = [o for o in outcomes if o.status == 503]
    assert len(accepted) + len(refused) == 14 and 4 <= len(accepted) <= 5 and refused
    for outcome in refused:
        error = json.loads(outcome.body)["error"]
        assert error["type"] == "record_store_error" and "record store" in error["message"]
    wait_drained([gateway])
    records = records_by_id(postgres_database, run)
    assert all(len(records.get(o.request_id, [])) == 1 for o in accepted)
    assert len(records) == 2 + len(accepted)  # the refused were never accepted: no record
    metrics = httpx.get(gateway + "/metrics").text
    assert f'specdrift_rejected_requests_total{{reason="records_buffer_full"}} {float(len(refused))}' in metrics
    again = asyncio.run(load([gateway], fake_body(2, 0), run, concurrency=1, requests=1))
    assert again[0].completed  # the database is back: requests are accepted again
