"""Prometheus configs and rules (deploy/prometheus), checked with Debian's real
promtool: syntax, the rules' unit tests (deploy/prometheus/tests), and that
the rules read metrics the gateway really exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS = REPO / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
JOBS = {"specdrift-gateway", "vllm-arms"}

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (apt install prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def rules() -> list[dict]:
    return [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def test_rule_files_pass_promtool_check():
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass():
    tests = sorted((PROMETHEUS / "tests").glob("*_test.yml"))
    assert {t.name for t in tests} >= {"recording_test.yml", "alerts_test.yml"}
    result = promtool("test", "rules", *map(str, tests))
    assert result.returncode == 0, result.stdout + result.stderr


def with_local_rules(config_path: Path, tmp_path: Path) -> Path:
    """The config with its rule_files pointing at the repository's rules, so
    that promtool checks them as the server would load them, and the gateway
    token's file (a secret in the deployments) at a local stand-in."""
    config = yaml.safe_load(config_path.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    config["rule_files"] = [str(PROMETHEUS / "rules" / "*.yml")]
    token = tmp_path / "gateway-token"
    token.write_text("a-test-token")
    for job in config["scrape_configs"]:
        if "authorization" in job:
            job["authorization"]["credentials_file"] = str(token)
    path = tmp_path / config_path.name
    path.write_text(yaml.safe_dump(config))
    return path


def test_compose_config_passes_promtool_check(tmp_path):
    result = promtool("check", "config", str(with_local_rules(PROMETHEUS / "prometheus.yml", tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 2 rule files found" in result.stdout


def test_kubernetes_config_passes_promtool_check(tmp_path):
    """Debian builds Prometheus without Kubernetes discovery, so its promtool
    rejects `kubernetes_sd_configs`; the rest of the config (relabelling,
    rules) is checked with the pod discovery replaced by a static target."""
    path = with_local_rules(PROMETHEUS / "prometheus.k8s.yml", tmp_path)
    config = yaml.safe_load(path.read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["specdrift"]}}]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["placeholder:8000"]}]
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    relabelled = {r["target_label"]: r["source_labels"] for r in job["relabel_configs"] if "target_label" in r}
    assert relabelled["job"] == ["__meta_kubernetes_pod_label_specdrift_io_scrape_job"]
    assert relabelled["arm"] == ["__meta_kubernetes_pod_label_specdrift_io_arm"]


def test_every_deployment_uses_the_job_names_the_rules_expect():
    from specdrift.prometheus import scrape_config

    compose = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert {j["job_name"] for j in compose["scrape_configs"]} == JOBS
    local = scrape_config("http://127.0.0.1:8100", {"baseline": ["http://127.0.0.1:8101"]})
    assert {j["job_name"] for j in local["scrape_configs"]} == JOBS
    k8s_jobs = set()
    for path in (REPO / "deploy" / "k8s").glob("*.yaml"):
        k8s_jobs |= set(re.findall(r"specdrift\.io/scrape-job: (\S+)", path.read_text()))
    assert k8s_jobs == JOBS
    alert_jobs = set(re.findall(r'job="([^"]+)"', (PROMETHEUS / "rules" / "specdrift-alerts.yml").read_text()))
    assert alert_jobs == JOBS


def test_local_runs_load_these_rule_files():
    from specdrift.prometheus import rule_files

    assert rule_files() == RULE_FILES


def test_recording_rules_follow_the_naming_convention():
    recorded = [r for r in rules() if "record" in r]
    assert len(recorded) > 40
    for rule in recorded:
        level, metric, operations = rule["record"].split(":")
        assert re.fullmatch(r"[a-z0-9_]+", metric) and operations, rule["record"]
        # The level names the labels the result keeps.
        assert set(level.split("_")) <= {"run", "arm", "task", "stratum", "status", "position", "kind"}, level
    keys = [(r["record"], tuple(sorted((r.get("labels") or {}).items()))) for r in recorded]
    assert len(keys) == len(set(keys)), "two rules record the same series"


def test_rules_read_only_metrics_the_gateway_exports():
    from service.metrics import GatewayMetrics

    exposition = GatewayMetrics(["baseline"]).exposition().decode()
    exported = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        exported |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    recorded = {r["record"] for r in rules() if "record" in r}
    for rule in rules():
        for name in re.findall(r"(?<![\w:])(specdrift_[a-z_]+)(?![\w:])", rule["expr"]):
            assert name in exported, f"{rule.get('record') or rule['alert']} reads {name}, which the gateway lacks"
        for name in re.findall(r"\b([a-z_]+:[a-z_]+:[a-z0-9_]+)\b", rule["expr"]):
            assert name in recorded, f"{rule.get('record') or rule['alert']} reads {name}, which no rule records"


def test_a_local_run_s_prometheus_sends_the_gateway_s_metrics_token(tmp_path, monkeypatch):
    from core.config import parse_config
    from specdrift.prometheus import metrics_token, scrape_config

    def config(**gateway):
        return parse_config({"name": "t", "target": {"name": "tiny"}, "arms": [{"name": "baseline"}],
                             "gateway": gateway}, tmp_path / "x.yaml")

    monkeypatch.setenv("API_TOKEN", "api-secret")
    monkeypatch.setenv("METRICS_TOKEN", "metrics-secret")
    assert metrics_token(config()) is None
    assert metrics_token(config(auth_token_env="API_TOKEN")) == "api-secret"
    assert metrics_token(config(auth_token_env="API_TOKEN", metrics_token_env="METRICS_TOKEN")) == "metrics-secret"
    assert metrics_token(config(auth_token_env="API_TOKEN", metrics_open=True)) is None

    token_file = tmp_path / "gateway-token"
    token_file.write_text("metrics-secret")
    local = scrape_config("http://127.0.0.1:8100", {"baseline": ["http://127.0.0.1:8101"]}, token_file=token_file)
    (gateway_job,) = [j for j in local["scrape_configs"] if j["job_name"] == "specdrift-gateway"]
    assert gateway_job["authorization"] == {"type": "Bearer", "credentials_file": str(token_file)}
    assert all("authorization" not in j for j in local["scrape_configs"] if j is not gateway_job)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(local))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
