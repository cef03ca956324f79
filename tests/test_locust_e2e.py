"""End to end: headless Locust, one master and two workers, through the real
gateway to real vLLM-CPU arms. Every request Locust reports is one gateway
record, and every record carries the task, stratum and prompt length of its
workload row (the arm's own prompt token count equals the workload's)."""

import csv
import json
import sys
from pathlib import Path

import pytest

from core.config import DatasetSpec
from core.processes import ProcessStack, free_port, start_child

pytestmark = pytest.mark.slow

LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadgen" / "locustfile.py"
RUN_ID = "locust-e2e"
REQUESTS = 10


def e2e_requests(csv_prefix: Path) -> tuple[int, int]:
    """(requests, failures) over Locust's end-to-end rows."""
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["Type"] == "e2e"]
    return sum(int(r["Request Count"]) for r in rows), sum(int(r["Failure Count"]) for r in rows)


def test_master_and_two_workers_through_the_gateway(cpu_config, real_arms, target_dir, data_dir, tmp_path):
    from core.contracts import write_jsonl
    from workload.builder import build, tag_vocabulary
    from service.launch import start_gateway
    from core.contracts import read_records

    config = cpu_config.model_copy(deep=True)
    # Real prompts of three lengths; few tokens out, to keep it short on CPU.
    config.workload.datasets = [DatasetSpec(adapter="nq_open", max_tokens=8, limit=60),
                                DatasetSpec(adapter="gsm8k", max_tokens=16, limit=60),
                                DatasetSpec(adapter="xsum", max_tokens=16, limit=60)]
    config.workload.controls = []
    config.workload.n_per_cell = 2
    rows = build(config).rows
    workload = write_jsonl(tmp_path / "workload.jsonl", rows)
    rows_by_id = {r["id"]: r for r in rows}
    arms = sorted(real_arms)
    records_path = tmp_path / "records.sqlite"
    csv_prefix = tmp_path / "locust"
    port = free_port()

    with ProcessStack() as stack:
        gateway = start_gateway(config, {name: [real_arms[name]] for name in arms}, tmp_path / "logs", stack,
                                records_path=records_path, port=0, run_ids=[RUN_ID],
                                vocabulary=tag_vocabulary(config))
        locust = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
        workers = [stack.add(start_child(f"locust worker {i}", [*locust, "--worker", "--master-port", str(port)],
                                         tmp_path / f"worker{i}.log")) for i in range(2)]
        master = stack.add(start_child("locust master", [
            *locust, "--master", "--master-bind-port", str(port), "--expect-workers", "2", "--headless",
            "--only-summary", "--host", gateway, "--csv", str(csv_prefix), "--workload", str(workload),
            "--split", "eval", "--arms", ",".join(arms), "--shape", "concurrency", "--concurrency", "2",
            "--block-seconds", "4", "--max-requests", str(REQUESTS), "--run-time", "240s",
            "--run-id", RUN_ID], tmp_path / "master.log"))
        master.proc.wait(timeout=400)
        for worker in workers:
            worker.proc.wait(timeout=30)
        assert master.proc.returncode == 0, (tmp_path / "master.log").read_text()[-3000:]

    requests, failures = e2e_requests(csv_prefix)
    records = read_records(records_path, RUN_ID)
    assert requests == len(records) == REQUESTS and failures == 0
    for record in records:
        row = rows_by_id[record["prompt_id"]]
        assert row["split"] == "eval"
        assert (record["task"], record["stratum"]) == (row["task"], row["stratum"])
        assert record["status"] == "ok" and record["regime"] == "concurrency-2"
        assert record["arm"] in arms and record["max_tokens"] == row["max_tokens"]
        assert record["prompt_tokens"] == row["prompt_tokens"], json.dumps(row["messages"])[:200]
    assert len({r["task"] for r in records}) >= 2
