"""Everything one gateway process needs, in one validated object.

`specdrift serve` and the experiment runner write it as JSON for the gateway
child (`python -m service.server --settings FILE`); `specdrift gateway` builds
it in-process. The bearer token itself never goes into the file: only the name
of the environment variable that holds it."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator

from core.config import ExperimentConfig, GatewayConfig
from service.tags import Vocabulary


class GatewaySettings(GatewayConfig):
    """The config's `gateway` section (host, limits, auth, timeouts: one
    definition, core.config.GatewayConfig), resolved for one process."""

    port: int = Field(default=8100, ge=0, le=65535)
    # arm name -> upstream base URLs (replicas), without /v1.
    upstreams: dict[str, list[str]]
    records_path: Path  # resolved: the config's may be unset
    vocabulary: Vocabulary = Field(default_factory=Vocabulary)
    # How long a stopping gateway lets in-flight requests finish before it
    # cancels (and records) them; below ProcessStack's 15 s SIGTERM grace.
    shutdown_grace_s: float = Field(default=10.0, ge=0)

    @field_validator("upstreams")
    @classmethod
    def _some_replica_each(cls, upstreams: dict[str, list[str]]) -> dict[str, list[str]]:
        if not upstreams:
            raise ValueError("no arms to serve")
        for arm, urls in upstreams.items():
            if not urls:
                raise ValueError(f"arm {arm!r} has no upstream URL")
        return {arm: [u.rstrip("/") for u in urls] for arm, urls in upstreams.items()}

    def auth_token(self) -> str | None:
        """The bearer token clients must send, or None when auth is off."""
        return _token(self.auth_token_env, "auth_token_env")

    def records_password(self) -> str | None:
        """The PostgreSQL password from records_password_env; None: libpq's PGPASSWORD / PGPASSFILE."""
        return _token(self.records_password_env, "records_password_env")

    def metrics_token(self) -> str | None:
        """The bearer token /metrics needs: its own, else the API's; None when it is open."""
        if self.metrics_open:
            return None
        if self.metrics_token_env:
            return _token(self.metrics_token_env, "metrics_token_env")
        return self.auth_token()


def _token(variable: str | None, setting: str) -> str | None:
    if not variable:
        return None
    token = os.environ.get(variable)
    if not token:
        raise ValueError(f"{setting} names {variable!r}, but that variable is unset or empty")
    return token

def default_records_path(config: ExperimentConfig) -> Path:
    if config.gateway.records_path:
        return config.resolve_path(config.gateway.records_path)
    return config.cache_path / "records.sqlite"


def records_source(config: ExperimentConfig, path: Path | None = None) -> tuple[str | Path, str | None]:
    """Where this config's gateway keeps its records, to read them: (records_url, its password or None:
    libpq's PGPASSWORD / PGPASSFILE), else (`path` or the default SQLite file, None)."""
    if config.gateway.records_url:
        return config.gateway.records_url, _token(config.gateway.records_password_env, "records_password_env")
    return Path(path) if path else default_records_path(config), None


def settings_from_config(config: ExperimentConfig, upstreams: dict[str, list[str]], *,
                         vocabulary: dict[str, list[str]], records_path: Path | None = None,
                         port: int | None = None, run_ids: list[str] | None = None) -> GatewaySettings:
    """`vocabulary`: the task and stratum label values Prometheus may see
    (workload.builder.tag_vocabulary gives a config's); run_ids: the run
    label values. Anything else is counted as `other`."""
    return GatewaySettings(
        **config.gateway.model_dump(exclude={"records_path"}),
        port=config.ports.gateway if port is None else port,
        upstreams=upstreams,
        records_path=Path(records_path) if records_path else default_records_path(config),
        vocabulary=Vocabulary(run=list(run_ids or []), task=list(vocabulary.get("task", [])),
                              stratum=list(vocabulary.get("stratum", []))),
    )
