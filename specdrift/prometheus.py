"""A local Prometheus for `specdrift run`, when Debian's `prometheus` is
installed: it scrapes the gateway and every arm, with the project's recording
and alert rules, and keeps its data in the run directory."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import yaml

from core.config import ExperimentConfig
from core.processes import ProcessStack, StartupError, free_port, start_child, wait_healthy

log = logging.getLogger(__name__)

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "rules"


def rule_files() -> list[Path]:
    return sorted(p for p in RULES_DIR.glob("*.yml") if not p.name.endswith("_test.yml"))


def scrape_config(gateway_url: str, upstreams: dict[str, list[str]], interval_s: int = 5,
                  token_file: Path | None = None) -> dict:
    """`token_file` holds the bearer token the gateway's /metrics asks for, if any."""
    def target(url: str) -> str:
        return urlparse(url).netloc

    arm_targets = [{"targets": [target(u)], "labels": {"arm": name}} for name, urls in upstreams.items() for u in urls]
    gateway_job = {"job_name": "specdrift-gateway", "static_configs": [{"targets": [target(gateway_url)]}]}
    if token_file is not None:
        gateway_job["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
    return {
        "global": {"scrape_interval": f"{interval_s}s", "evaluation_interval": f"{interval_s}s"},
        "rule_files": [str(p) for p in rule_files()],
        "scrape_configs": [gateway_job, {"job_name": "vllm-arms", "static_configs": arm_targets}],
    }


def metrics_token(config: ExperimentConfig) -> str | None:
    """The token the gateway's /metrics asks for under this config (docs/gateway.md, "Exposure")."""
    gateway = config.gateway
    if gateway.metrics_open:
        return None
    variable = gateway.metrics_token_env or gateway.auth_token_env
    return os.environ.get(variable) if variable else None


def start_prometheus(config: ExperimentConfig, gateway_url: str, upstreams: dict[str, list[str]], folder: Path,
                     stack: ProcessStack) -> str | None:
    """Start Prometheus on loopback; None (with a note) where it is not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        log.info("prometheus is not installed; metrics go to the gateway's /metrics and the records only")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    token, token_file = metrics_token(config), None
    if token:
        token_file = folder / "gateway-token"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
    config_path = folder / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(scrape_config(gateway_url, upstreams, token_file=token_file)))
    port = free_port("127.0.0.1", config.ports.prometheus)
    cmd = [binary, f"--config.file={config_path}", f"--storage.tsdb.path={folder / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=30d"]
    child = stack.add(start_child("prometheus", cmd, folder / "prometheus.log"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(child, url + "/-/ready", timeout_s=60)
    except StartupError as err:
        log.warning("prometheus did not start; going on without it: %s", err)
        child.stop()
        return None
    return url
