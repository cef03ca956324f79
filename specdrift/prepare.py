"""Drafters brought up to date before they are served: shared by `specdrift
prepare` and the runner, so that both check and build them the same way."""

from __future__ import annotations

from pathlib import Path

from core.config import ExperimentConfig
from drafters.build import build_drafters, stale_drafters
from workload import builder


def prepare_drafters(config: ExperimentConfig, log_dir: Path, rows: list[dict] | None = None,
                     progress=print) -> None:
    """Build the drafters that are missing or stale; vLLM's logs go to
    `log_dir`. The workload is built only when some drafter needs checking
    (or taken from `rows`, the run's own)."""
    if not config.drafters:
        return
    fingerprint = builder.fingerprint(config)
    stale = stale_drafters(config, fingerprint)
    if not stale:
        progress(f"drafters {', '.join(d.name for d in config.drafters)}: up to date")
        return
    if rows is None:
        progress(f"drafters {', '.join(stale)}: building the workload for their train split")
        rows = builder.build(config).rows
    build_drafters(config, stale, rows, fingerprint, log_dir, progress)
