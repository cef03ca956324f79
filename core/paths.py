"""Where prepared artefacts live in the cache directory. One place, so that
`prepare`, the drafters and the launcher agree."""

from __future__ import annotations

from pathlib import Path

from core.config import ExperimentConfig


def models_dir(config: ExperimentConfig) -> Path:
    return config.cache_path / "models"


def target_dir(config: ExperimentConfig) -> Path:
    """The HF directory the arms serve as the target model."""
    if config.target.source == "path":
        return config.resolve_path(config.target.path)
    return models_dir(config) / config.target.name


def drafter_dir(config: ExperimentConfig, name: str) -> Path:
    """A drafter built by specdrift for this target."""
    return config.cache_path / "drafters" / config.target.name / name


def target_model_arg(config: ExperimentConfig) -> str:
    """What to pass to vLLM's --model: a local directory, or a hub name that a
    mounted cache resolves (path targets that are not directories)."""
    path = target_dir(config)
    if config.target.source == "path" and not path.exists():
        return config.target.path
    return str(path)
