"""Shared fixtures. `real_arms` starts real vLLM-CPU servers once per test
session (float32, so that greedy outputs are comparable across arms)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.config import ExperimentConfig, load_config
from core.processes import ProcessStack, free_port

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "experiments" / "cpu-default.yaml"
LOCAL_ARMS = ("baseline", "ngram")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def default_config() -> ExperimentConfig:
    return load_config(DEFAULT_CONFIG)


@pytest.fixture(scope="session")
def data_dir(default_config) -> Path:
    path = default_config.data_path
    if not path.is_dir():
        pytest.fail(f"datasets not found at {path}; set SPECDRIFT_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def cpu_config(default_config) -> ExperimentConfig:
    """The default experiment with float32 arms on free ports, for tests."""
    config = default_config.model_copy(deep=True)
    config.target = config.target.model_copy(update={"dtype": "float32", "max_model_len": 1024})
    config.ports = config.ports.model_copy(update={"gateway": free_port(), "arms_from": free_port()})
    return config


@pytest.fixture(scope="session")
def target_dir(default_config) -> Path:
    from core.models import prepare_target

    return prepare_target(default_config, progress=lambda msg: None)


@pytest.fixture(scope="session")
def real_arms(cpu_config, target_dir, tmp_path_factory):
    """{arm name: base URL} for real baseline and ngram vLLM-CPU servers."""
    from core.arms import start_arms

    log_dir = tmp_path_factory.mktemp("arm-logs")
    stack = ProcessStack()
    try:
        upstreams = start_arms(cpu_config, list(LOCAL_ARMS), log_dir, stack, health_timeout_s=600)
        yield {name: urls[0] for name, urls in upstreams.items()}
    finally:
        stack.stop_all()


@pytest.fixture(scope="module")
def stack():
    """The processes a test module starts, stopped (by PID, whole groups) when it ends."""
    stack = ProcessStack()
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def logs(request, tmp_path_factory) -> Path:
    """A test module's folder for the logs of what it starts."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_") + "-logs")


def pytest_report_header(config):
    return f"specdrift cache: {os.environ.get('SPECDRIFT_CACHE', '~/.cache/specdrift')}"
