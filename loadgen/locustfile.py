"""Replay a specdrift workload through the gateway, with Locust.

    locust -f loadgen/locustfile.py --host http://127.0.0.1:8100 --workload workload.jsonl

works as any locustfile does: web UI (the default), `--headless`, `--csv`,
and distributed `--master` / `--worker`. The options below choose the load
shape, the arms and the bounds; docs/workload.md lists them all with examples.

How it works: one process (the master, or the only process) reads the
workload and holds the plan (loadgen/shapes.py: `Scheduler`). Users, wherever
they run, ask it for their next job through Locust's node messages, send it
to the gateway as a streamed OpenAI chat completion (`model` = the arm), and
report back when it has ended. Only the master needs the workload file.

Each request is reported to Locust twice, under the name `<task> [<arm>]`:
type `e2e` (end-to-end time; failures count here) and type `ttft` (time to
the first content token, successful requests only). The number of requests
sent is the sum of the `e2e` rows' request counts.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections import Counter

import gevent
import httpx
from gevent.event import AsyncResult
from locust import LoadTestShape, User, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from core.contracts import EVAL, OK, TRAIN, is_database_url, read_records, read_workload, tag_headers
from loadgen.shapes import BLOCKS, ROTATE, SHAPES, Scheduler, steps_for

log = logging.getLogger("specdrift.locust")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request

ASK, JOB, DONE = "specdrift_ask", "specdrift_job", "specdrift_done"
IDLE_POLL_S = 0.2  # how often an idle user asks again
ASK_TIMEOUT_S = 30.0
DEFAULT_RUN_SECONDS = 600.0
# Locust rewrites --csv files every 1 s and workers report every 3 s, with no
# last write at the end: the run outlasts its last request by this much.
STATS_GRACE_S = 4.0


@events.init_command_line_parser.add_listener
def add_options(parser):
    group = parser.add_argument_group("specdrift", "replay a specdrift workload (docs/workload.md)")
    group.add_argument("--workload", default="workload.jsonl", help="workload file (specdrift workload build)")
    group.add_argument("--split", default=EVAL, choices=[EVAL, TRAIN], help="which rows to replay")
    group.add_argument("--arms", default="", help="comma-separated arm names, a name may repeat "
                       "(default: every model the gateway lists at /v1/models)")
    group.add_argument("--shape", default="sequential", choices=list(SHAPES), help="load shape")
    group.add_argument("--concurrency", type=int, default=2, help="requests in flight (shape concurrency)")
    group.add_argument("--rate", type=float, default=1.0, help="arrivals per second (shape poisson)")
    group.add_argument("--sweep", default="", help="steps, e.g. 'concurrency:1:60s,concurrency:4:60s,poisson:2:60s:100r'")
    group.add_argument("--arm-order", default="auto", choices=["auto", ROTATE, BLOCKS],
                       help="rotate: every prompt to every arm; blocks: arms take turns in time blocks "
                            "(auto: rotate when sequential, else blocks)")
    group.add_argument("--block-seconds", type=float, default=30.0, help="length of an arm's block")
    group.add_argument("--max-requests", type=int, default=1000, help="most requests in the whole run")
    group.add_argument("--drain-seconds", type=float, default=60.0,
                       help="after the time bound, how long requests in flight may finish")
    group.add_argument("--run-id", default=os.environ.get("SPECDRIFT_RUN_ID", "adhoc"), help="X-Specdrift-Run")
    group.add_argument("--regime-label", default="", help="X-Specdrift-Regime (default: the step's label)")
    group.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    group.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival times")
    group.add_argument("--request-timeout", type=float, default=300.0, help="longest silence while streaming (s)")
    group.add_argument("--auth-token-env", default="", help="environment variable holding a bearer token")
    group.add_argument("--skip-done", default="", help="gateway record store: skip what was already recorded ok "
                       "for this run id and regime (resume): (prompt, arm) pairs in rotate order, each arm's "
                       "first prompts under blocks")


# --- the plan, on the master (or the only process) ----------------------------------

def list_arms(host: str) -> list[str]:
    url = host.rstrip("/") + "/v1/models"
    try:
        with httpx.Client(timeout=httpx.Timeout(10.0)) as client:
            response = client.get(url)
            response.raise_for_status()
            return [m["id"] for m in response.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError) as err:
        raise ValueError(f"no --arms given, and the arms could not be listed from {url}: {err}") from None


def recorded_ok(path: str, run_id: str) -> Counter:
    """(regime, prompt id, arm) -> how many times the gateway recorded it ok."""
    if not path or not (is_database_url(path) or os.path.exists(path)):
        return Counter()
    try:
        records = read_records(path, run_id)
    except FileNotFoundError:  # a database no gateway has written to yet
        return Counter()
    return Counter((r["regime"], r["prompt_id"], r["arm"]) for r in records if r["status"] == OK)


def make_scheduler(environment) -> Scheduler:
    options = environment.parsed_options
    if not environment.host:
        raise ValueError("no --host: give the gateway's base URL")
    rows = read_workload(options.workload, split=options.split)
    arms = [a.strip() for a in options.arms.split(",") if a.strip()] or list_arms(environment.host)
    steps = steps_for(options.shape, options.concurrency, options.rate, options.sweep)
    scheduler = Scheduler(
        rows, arms, steps,
        arm_order=None if options.arm_order == "auto" else options.arm_order,
        block_seconds=options.block_seconds,
        run_seconds=options.run_time or DEFAULT_RUN_SECONDS,
        max_requests=options.max_requests,
        drain_seconds=options.drain_seconds,
        seed=options.seed,
        regime_label=options.regime_label or None,
        done=recorded_ok(options.skip_done, options.run_id),
    )
    log.info("specdrift plan: %d %s prompts from %s, arms %s, steps %s, at most %d requests in %.0f s",
             len(rows), options.split, options.workload, ",".join(arms),
             ", ".join(scheduler.regime_of(s) for s in steps), options.max_requests,
             options.run_time or DEFAULT_RUN_SECONDS)
    return scheduler


class SpecdriftShape(LoadTestShape):
    """Users follow the Scheduler's current step; the run stops when it says so."""

    use_common_options = True  # --run-time is the run's time bound

    def __init__(self):
        super().__init__()
        self.forget()

    def forget(self) -> None:
        """Drop the plan, so that the next test (web UI: Start again) makes a new one."""
        self.scheduler: Scheduler | None = None
        self.last_tick: tuple | None = None
        self.finished_at: float | None = None

    def tick(self):
        environment = self.runner.environment
        if self.scheduler is None:
            try:
                self.scheduler = make_scheduler(environment)
            except (OSError, ValueError) as err:
                log.error("specdrift: cannot start: %s", err)
                environment.process_exit_code = 2
                return None
            environment.specdrift_scheduler = self.scheduler
        generators = max(1, self.runner.worker_count) if isinstance(self.runner, MasterRunner) else 1
        users = self.scheduler.demand(generators)
        if users is None:
            if self.finished_at is None:
                self.finished_at = time.monotonic()
                if self.scheduler.abandoned:
                    log.warning("specdrift: %d requests were still in flight at a hard stop", self.scheduler.abandoned)
            if self.last_tick and time.monotonic() - self.finished_at < STATS_GRACE_S:
                return self.last_tick  # idle users while the statistics catch up
            return None
        self.last_tick = (users, users)
        return self.last_tick


def on_ask(environment, msg, **kwargs):
    scheduler = getattr(environment, "specdrift_scheduler", None)
    job = scheduler.next_job() if scheduler else None
    environment.runner.send_message(JOB, {"token": msg.data["token"], "job": job}, client_id=msg.node_id)


def on_done(environment, msg, **kwargs):
    scheduler = getattr(environment, "specdrift_scheduler", None)
    if scheduler:
        scheduler.finished(msg.data["seq"])


# --- users, wherever they run --------------------------------------------------------

class JobChannel:
    """A user's side of the plan: ask for a job, say when it ended."""

    def __init__(self, runner):
        self.runner = runner
        self.pending: dict[str, AsyncResult] = {}
        self.tokens = itertools.count()

    def on_job(self, environment, msg, **kwargs):
        waiting = self.pending.pop(msg.data["token"], None)
        if waiting is not None:
            waiting.set(msg.data["job"])

    def ask(self) -> dict | None:
        token = f"{self.runner.client_id}:{next(self.tokens)}"
        waiting = self.pending[token] = AsyncResult()
        self.runner.send_message(ASK, {"token": token})
        try:
            return waiting.get(timeout=ASK_TIMEOUT_S)
        except gevent.Timeout:
            self.pending.pop(token, None)
            log.warning("specdrift: no answer from the master in %.0f s", ASK_TIMEOUT_S)
            return None

    def done(self, job: dict) -> None:
        self.runner.send_message(DONE, {"seq": job["seq"]})


@events.test_stop.add_listener
def on_test_stop(environment, **kwargs):
    if isinstance(environment.shape_class, SpecdriftShape):
        environment.shape_class.forget()
    environment.specdrift_scheduler = None


@events.init.add_listener
def on_init(environment, **kwargs):
    runner = environment.runner
    if not isinstance(runner, WorkerRunner):
        runner.register_message(ASK, on_ask)
        runner.register_message(DONE, on_done)
    if not isinstance(runner, MasterRunner):
        environment.specdrift_channel = JobChannel(runner)
        runner.register_message(JOB, environment.specdrift_channel.on_job)


class GatewayUser(User):
    """Asks the plan for its next job and sends it to the gateway: a closed-loop
    job at once, waiting for it to end (sequential, concurrency); an open-loop
    job at its arrival time, without waiting for it (poisson)."""

    wait_time = constant(0)

    def on_start(self):
        options = self.environment.parsed_options
        timeout = httpx.Timeout(connect=10.0, read=options.request_timeout, write=30.0, pool=30.0)
        self.http = httpx.Client(base_url=self.host.rstrip("/"), timeout=timeout,
                                 limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))
        token = os.environ.get(options.auth_token_env, "") if options.auth_token_env else ""
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.channel: JobChannel = self.environment.specdrift_channel

    def on_stop(self):
        self.http.close()

    @task
    def next_request(self):
        job = self.channel.ask()
        if job is None:
            gevent.sleep(IDLE_POLL_S)
        elif job["open_loop"]:
            gevent.sleep(job["delay_s"])
            gevent.spawn(self.send, job)
        else:
            self.send(job)

    def send(self, job: dict) -> None:
        """One streamed chat completion; reported to Locust, then to the plan."""
        try:
            self._stream(job)
        finally:
            self.channel.done(job)
    def _stream(self, job: dict) -> None:
        row, arm = job["row"], job["arm"]
        options = self.environment.parsed_options
        headers = {**tag_headers(run_id=options.run_id, task=row["task"], stratum=row["stratum"],
                                 prompt_id=row["id"], regime=job["regime"]), **self.auth}
        body = {
            "model": arm, "messages": row["messages"], "max_tokens": row["max_tokens"],
            "temperature": options.temperature, "stream": True, "stream_options": {"include_usage": True},
        }
        name = f"{row['task']} [{arm}]"
        started = time.perf_counter()
        first_token_s = None
        received = 0
        error: Exception | None = None
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
                if response.status_code != 200:
                    text = response.read().decode(errors="replace")
                    raise RuntimeError(f"HTTP {response.status_code}: {text[:300]}")
                for line in response.iter_lines():
                    received += len(line) + 1
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(f"stream error: {json.dumps(chunk['error'])[:300]}")
                    if first_token_s is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                        first_token_s = time.perf_counter() - started
        except Exception as err:  # every failure is a failed request in Locust's statistics
            error = err
        elapsed_ms = (time.perf_counter() - started) * 1000
        context = {"arm": arm, "prompt_id": row["id"], "stratum": row["stratum"], "regime": job["regime"]}
        fire = self.environment.events.request.fire
        fire(request_type="e2e", name=name, response_time=elapsed_ms, response_length=received,
             exception=error, context=context)
        if error is None and first_token_s is not None:
            fire(request_type="ttft", name=name, response_time=first_token_s * 1000, response_length=0,
                 exception=None, context=context)
