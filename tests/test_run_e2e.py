"""`specdrift run` end to end on real vLLM-CPU arms: a small run (two tasks,
two strata, baseline + ngram, two load regimes) is interrupted mid-regime,
resumed, and must end complete and consistent; `specdrift report` on the run
directory alone reproduces results.json exactly. A second run, whose n-gram
arm is killed, records to PostgreSQL (`gateway.records_url`): the runner
counts its progress from the database and leaves the run's rows in the run
directory's records.sqlite."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from core.contracts import read_records
from postgres_cluster import SUPERUSER, postgres_cluster  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"


def small_config(tmp_path: Path, records_url: str | None = None) -> Path:
    data = yaml.safe_load(SMOKE.read_text())
    data["workload"]["data_dir"] = str((SMOKE.parent / data["workload"]["data_dir"]).resolve())
    from core.processes import free_port

    data["ports"] = {"gateway": free_port(), "arms_from": free_port(), "prometheus": free_port()}
    if records_url:
        data.setdefault("gateway", {})["records_url"] = records_url
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def specdrift(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "specdrift.cli", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def records(run_dir: Path) -> list[dict]:
    with sqlite3.connect(run_dir / "records.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM requests")]


def wait_for_records(run_dir: Path, n: int, proc: subprocess.Popen, timeout_s: float,
                     records_url: str | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if records_url:
            try:
                if len(read_records(records_url, run_dir.name)) >= n:
                    return
            except FileNotFoundError:  # the gateway has not created the table yet
                pass
        elif (run_dir / "records.sqlite").exists():
            try:
                if len(records(run_dir)) >= n:
                    return
            except sqlite3.Error:
                pass
        time.sleep(1)
    pytest.fail(f"fewer than {n} records after {timeout_s}s")


def no_vllm_left(run_dir: Path) -> bool:
    out = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout
    return out.strip() == ""


def start_run(tmp: Path, name: str, records_first: int,
              records_url: str | None = None) -> tuple[Path, Path, subprocess.Popen]:
    """(config, run dir, process) of a run of the small config, once it has stored `records_first` records."""
    config = small_config(tmp, records_url)
    run_dir = tmp / name
    proc = specdrift("run", "--config", str(config), "--out", str(run_dir))
    wait_for_records(run_dir, records_first, proc, timeout_s=600, records_url=records_url)
    return config, run_dir, proc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, target_dir):
    config, run_dir, first = start_run(tmp_path_factory.mktemp("run"), "smoke-e2e", 4)
    os.killpg(first.pid, signal.SIGTERM)  # as a user's Ctrl-C / kill would
    first_output, _ = first.communicate(timeout=120)
    interrupted = records(run_dir)
    second = specdrift("run", "--config", str(config), "--out", str(run_dir), "--resume")
    output, _ = second.communicate(timeout=900)
    assert second.returncode == 0, output
    return {"dir": run_dir, "config": config, "interrupted": interrupted, "output": output,
            "first_output": first_output}


def test_interrupt_leaves_no_process_behind(finished_run):
    assert no_vllm_left(finished_run["dir"])
    assert "sequential" in finished_run["first_output"]


def test_run_directory_is_complete(finished_run):
    run_dir = finished_run["dir"]
    for name in ("config.resolved.yaml", "environment.json", "state.json", "workload.jsonl", "records.sqlite",
                 "results.json", "report.md", "report.html"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "locust").glob("sequential*_stats.csv"))
    assert any((run_dir / "figures").glob("*.png"))
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["packages"]["torch"].endswith("+cpu")
    assert env["target"]["files"]["model.safetensors"]


def test_resume_did_not_duplicate(finished_run):
    everything = records(finished_run["dir"])
    rows = [r for r in everything if r["status"] == "ok"]
    assert len(finished_run["interrupted"]) >= 4
    seq = Counter((r["prompt_id"], r["arm"]) for r in rows if r["regime"] == "sequential")
    # The baseline goes twice per prompt (its agreement with itself), every other arm once; the
    # regime's max_requests (30 of 12 prompts x 3) may cut the last prompt short, never repeat one.
    assert seq and all(n <= (2 if arm == "baseline" else 1) for (prompt, arm), n in seq.items()), seq
    # max_requests bounds what the regime sent across the interruption (a request cut by it is recorded too).
    assert sum(r["regime"] == "sequential" for r in everything) == 30
    state = json.loads((finished_run["dir"] / "state.json").read_text())
    assert {p: v["status"] for p, v in state["regimes"].items()} == {"sequential": "done", "concurrency-2": "done"}


def test_records_carry_tags_from_the_workload(finished_run):
    workload = {json.loads(line)["id"]: json.loads(line) for line in
                (finished_run["dir"] / "workload.jsonl").read_text().splitlines()}
    rows = records(finished_run["dir"])
    assert rows
    for row in rows:
        item = workload[row["prompt_id"]]
        assert item["split"] == "eval"
        assert (row["task"], row["stratum"]) == (item["task"], item["stratum"])
        assert row["run_id"] == "smoke-e2e"
    assert {r["task"] for r in rows} == {"gsm8k", "nq_open"}
    assert len({r["stratum"] for r in rows}) == 2


def test_speculation_is_lossless_in_float32(finished_run):
    rows = [r for r in records(finished_run["dir"]) if r["status"] == "ok" and r["regime"] == "sequential"]
    by_prompt: dict[str, set] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], set()).add(r["output_hash"])
    complete = [p for p in by_prompt if {r["arm"] for r in rows if r["prompt_id"] == p} == {"baseline", "ngram"}]
    assert complete
    same = sum(len(by_prompt[p]) == 1 for p in complete)
    assert same / len(complete) >= 0.8, (same, len(complete))
    assert sum(r["spec_draft_tokens"] or 0 for r in rows if r["arm"] == "ngram") > 0


def test_report_reproduces_results_from_records(finished_run):
    run_dir = finished_run["dir"]
    before = (run_dir / "results.json").read_text()
    proc = specdrift("report", str(run_dir))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert (run_dir / "results.json").read_text() == before
    html = (run_dir / "report.html").read_text()
    assert "<img" in html and "data:image/png;base64," in html


@pytest.fixture(scope="module")
def run_with_killed_arm(tmp_path_factory, target_dir, postgres_cluster):
    """A run whose ngram arm is killed (SIGKILL to its process group) during the sequential regime,
    its records in PostgreSQL."""
    import psutil

    postgres_cluster.psql("CREATE DATABASE killed_arm_run", database="postgres")
    records_url = postgres_cluster.url_as(SUPERUSER, "killed_arm_run")
    _, run_dir, proc = start_run(tmp_path_factory.mktemp("killed-arm"), "killed-arm", 6, records_url)
    arm_servers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "--served-model-name" in p.cmdline() and "ngram" in p.cmdline()]
    assert len(arm_servers) == 1, arm_servers
    os.killpg(os.getpgid(arm_servers[0].pid), signal.SIGKILL)
    killed_at = time.time()
    output, _ = proc.communicate(timeout=900)
    return {"dir": run_dir, "returncode": proc.returncode, "output": output, "killed_at": killed_at,
            "records_url": records_url}


def test_a_killed_arm_is_reported_and_the_run_goes_on(run_with_killed_arm):
    run_dir, output = run_with_killed_arm["dir"], run_with_killed_arm["output"]
    assert run_with_killed_arm["returncode"] == 0, output
    assert "arm ngram DIED" in output
    state = json.loads((run_dir / "state.json").read_text())
    assert list(state["dead_arms"]) == ["ngram"]
    assert {p: v["status"] for p, v in state["regimes"].items()} == {"sequential": "done", "concurrency-2": "done"}
    assert state["regimes"]["concurrency-2"]["arms"] == ["baseline"]
    rows = records(run_dir)
    # Nothing the dead arm was asked after its death succeeded; the baseline went on answering.
    late_ngram = [r for r in rows if r["arm"] == "ngram" and r["t_start"] > run_with_killed_arm["killed_at"] + 5]
    assert all(r["status"] != "ok" for r in late_ngram), Counter(r["status"] for r in late_ngram)
    assert sum(r["arm"] == "baseline" and r["status"] == "ok" and r["regime"] == "concurrency-2" for r in rows) > 0
    assert "gave up on arm ngram" in (run_dir / "report.md").read_text()
    assert no_vllm_left(run_dir)


def test_a_run_recording_to_postgres_keeps_its_rows_in_the_run_directory(run_with_killed_arm):
    run_dir = run_with_killed_arm["dir"]
    in_database = read_records(run_with_killed_arm["records_url"], run_dir.name)
    assert in_database and read_records(run_dir / "records.sqlite", run_dir.name) == in_database
    assert {r["run_id"] for r in read_records(run_with_killed_arm["records_url"])} == {run_dir.name}
    assert len({r["replica"] for r in in_database}) == 1 and None not in {r["replica"] for r in in_database}


def test_replay_agrees_with_served_vllm_in_float32(finished_run):
    """The float32 smoke run: the replayed n-gram arm's per-prompt accepted counts
    equal vLLM's for at least 90% of the sequentially served prompts, tau within 0.02."""
    run_dir = finished_run["dir"]
    for name in ("workload.replay.jsonl", "replay/targets.jsonl", "replay/replay.json"):
        assert (run_dir / name).is_file(), name
    validation = json.loads((run_dir / "results.json").read_text())["replay"]["validation"]
    assert validation["dtype"] == "float32"
    ngram = validation["arms"]["ngram"]
    assert ngram["n"] >= 5
    assert ngram["accepted_exact"]["share"] >= 0.9
    assert abs(ngram["gap"]) <= 0.02
    assert ngram["verdict"] == "agrees"
