"""Starting the gateway as a child process, in front of running arms."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from core.config import ExperimentConfig
from core.contracts import shown_url
from core.processes import ProcessStack, StartupError, free_port, port_in_use, start_child, wait_healthy
from service.settings import settings_from_config

log = logging.getLogger(__name__)


def client_url(host: str, port: int) -> str:
    """The URL to reach a server bound to host:port from this machine."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def start_gateway(config: ExperimentConfig, upstreams: dict[str, list[str]], log_dir: Path, stack: ProcessStack,
                  *, vocabulary: dict[str, list[str]], records_path: Path | None = None, port: int | None = None,
                  run_ids: list[str] | None = None, health_timeout_s: float = 60.0) -> str:
    """Start the gateway (own process group, log in log_dir/gateway.log), wait
    until /health answers, and return its base URL.

    upstreams: arm name -> replica base URLs. vocabulary: the task and
    stratum label values for Prometheus (workload.builder.tag_vocabulary).
    run_ids: run label values (others count as `other`). Port: `port`, else
    config.ports.gateway; 0 picks a free one."""
    try:
        settings = settings_from_config(config, upstreams, records_path=records_path, port=port, run_ids=run_ids,
                                        vocabulary=vocabulary)
        settings.auth_token()  # a missing token (or password) variable fails here, not in the child
        settings.records_password()
    except (ValidationError, ValueError) as err:
        raise StartupError(f"gateway: {err}") from None
    if settings.port == 0:
        settings.port = free_port(settings.host)
    if port_in_use(settings.host, settings.port):
        raise StartupError(f"gateway: port {settings.port} on {settings.host} is already in use "
                           f"(choose another with ports.gateway in the config)")
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    settings_path = log_dir / "gateway-settings.json"
    settings_path.write_text(settings.model_dump_json(indent=2) + "\n")
    cmd = [sys.executable, "-m", "service.server", "--settings", str(settings_path)]
    child = stack.add(start_child("gateway", cmd, log_dir / "gateway.log", env=dict(os.environ)))
    url = client_url(settings.host, settings.port)
    waited = wait_healthy(child, url + "/health", health_timeout_s)
    log.info("gateway healthy at %s after %.1fs (pid %d, records %s)", url, waited, child.pid,
             shown_url(settings.records_url) if settings.records_url else settings.records_path)
    return url

