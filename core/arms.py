"""Launching arms: each local arm is a real vLLM OpenAI server
(`python -m vllm.entrypoints.openai.api_server`), started one after another,
each with its own log file, port and speculative config."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.config import ArmConfig, ConfigError, ExperimentConfig
from core.paths import drafter_dir, target_dir, target_model_arg
from core.processes import Child, ProcessStack, StartupError, free_port, port_in_use, start_child, wait_healthy

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# The config.json field where an EAGLE-3 head records the draft steps it was trained for
# (drafters/eagle3.py writes it); an arm may draft no more tokens than that.
TRAINED_STEPS_FIELD = "specdrift_trained_draft_steps"


@dataclass
class RunningArm:
    name: str
    url: str  # base URL, without /v1
    child: Child | None  # None for a remote arm


def vllm_env(config: ExperimentConfig) -> dict[str, str]:
    """Environment for vLLM-CPU, set deliberately rather than inherited."""
    settings = config.vllm_cpu
    chosen = {
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kvcache_space_gib),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": str(settings.reserved_cpus),
        # Nothing may be fetched from a model hub at run time.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        **settings.extra_env,
    }
    return chosen


def speculative_json(config: ExperimentConfig, arm: ArmConfig) -> str | None:
    if arm.speculative is None:
        return None
    spec = arm.speculative.model_dump(exclude_none=True)
    drafter = spec.pop("drafter", None)
    if drafter:
        spec["model"] = str(drafter_dir(config, drafter))
    return json.dumps(spec, sort_keys=True)


def engine_flags(engine_args: dict) -> list[str]:
    flags: list[str] = []
    for key, value in engine_args.items():
        flag = "--" + key.lstrip("-")
        if value is True:
            flags.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def vllm_command(config: ExperimentConfig, arm: ArmConfig, port: int,
                 spec_metrics: str = "summary", model: str | None = None) -> list[str]:
    """`model` serves another model (a drafter alone, to time it) with the target's settings."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model or target_model_arg(config),
        "--served-model-name", arm.name,
        "--host", HOST,
        "--port", str(port),
        "--dtype", config.target.dtype,
        "--max-model-len", str(config.target.max_model_len),
        "--seed", "0",
        "--disable-uvicorn-access-log",
    ]
    spec = speculative_json(config, arm)
    if spec:
        cmd += ["--speculative-config", spec, "--per-request-spec-decode-metrics", spec_metrics]
    return cmd + engine_flags(arm.engine_args)


def missing_inputs(config: ExperimentConfig, arm: ArmConfig) -> list[str]:
    """Files an arm needs that are not there or cannot serve it, as plain sentences."""
    problems = []
    target = target_dir(config)
    if (config.target.source == "embedded" or target.exists()) and not (target / "config.json").exists():
        problems.append(f"target model directory {target} is missing or incomplete (run `specdrift prepare`)")
    spec = arm.speculative
    if spec and spec.drafter:
        ddir = drafter_dir(config, spec.drafter)
        if not (ddir / "config.json").exists():
            problems.append(f"drafter {spec.drafter!r} is not built at {ddir} "
                            f"(run `specdrift drafter distill --drafter {spec.drafter}`)")
        elif spec.method == "eagle3":
            problems += head_problems(ddir, spec.num_speculative_tokens)
    elif spec and spec.method == "eagle3" and spec.model:
        path = Path(spec.model)  # as vLLM gets it
        # A model that is no local path is a name vLLM resolves from a mounted HF cache: not checked here.
        if path.exists() or path.is_absolute() or spec.model.startswith("."):
            problems += head_problems(path, spec.num_speculative_tokens)
    return problems


def head_problems(directory: Path, k: int) -> list[str]:
    """Why the EAGLE-3 head in `directory` cannot draft K = `k` tokens: no config.json, or fewer
    trained draft steps than K where the head records them (heads trained elsewhere may not)."""
    config_file = directory / "config.json"
    if not config_file.exists():
        return [f"EAGLE-3 head {directory} has no config.json (give a directory holding a head in the "
                "speculators or vLLM format)"]
    try:
        steps = json.loads(config_file.read_text()).get(TRAINED_STEPS_FIELD)
    except (json.JSONDecodeError, AttributeError):
        return [f"EAGLE-3 head {config_file} is not a JSON object"]
    if isinstance(steps, int) and k > steps:
        return [f"EAGLE-3 head {directory} is trained for {steps} draft steps ({TRAINED_STEPS_FIELD}), "
                f"fewer than num_speculative_tokens {k}: lower it, or train the head for {k}"]
    return []


def launch_arm(config: ExperimentConfig, arm: ArmConfig, port: int, log_dir: Path, stack: ProcessStack,
               health_timeout_s: float = 300.0, spec_metrics: str = "summary",
               model: str | None = None) -> RunningArm:
    problems = missing_inputs(config, arm)
    if problems:
        raise StartupError(f"arm {arm.name!r} cannot start: " + "; ".join(problems))
    if port_in_use(HOST, port):
        raise StartupError(f"arm {arm.name!r}: port {port} on {HOST} is already in use")
    env_set = vllm_env(config)
    header = "\n".join(f"# env {k}={v}" for k, v in sorted(env_set.items()))
    cmd = vllm_command(config, arm, port, spec_metrics, model)
    log_path = log_dir / f"arm-{arm.name}.log"
    child = stack.add(start_child(f"arm {arm.name}", cmd, log_path, env={**os.environ, **env_set}, header=header))
    url = f"http://{HOST}:{port}"
    waited = wait_healthy(child, url + "/health", health_timeout_s)
    log.info("arm %s healthy at %s after %.0fs (pid %d, log %s)", arm.name, url, waited, child.pid, log_path)
    return RunningArm(arm.name, url, child)


def start_arms(config: ExperimentConfig, names: list[str] | None, log_dir: Path, stack: ProcessStack,
               health_timeout_s: float = 300.0, skip_missing_optional: bool = True,
               spec_metrics: str = "summary") -> dict[str, list[str]]:
    """Start the chosen local arms one after another; remote arms pass through.

    Returns arm name -> upstream base URLs. Optional arms whose inputs are
    missing are skipped with a warning."""
    chosen = [config.arm(n) for n in names] if names else list(config.arms)
    upstreams: dict[str, list[str]] = {}
    taken: set[int] = set()
    for arm in chosen:
        if not arm.local:
            upstreams[arm.name] = list(arm.upstreams)
            continue
        if skip_missing_optional and arm.optional and missing_inputs(config, arm):
            log.warning("skipping optional arm %s: %s", arm.name, "; ".join(missing_inputs(config, arm)))
            continue
        port = arm.port or free_port(HOST, config.ports.arms_from, taken)
        taken.add(port)
        started = time.monotonic()
        running = launch_arm(config, arm, port, log_dir, stack, health_timeout_s, spec_metrics)
        log.debug("arm %s took %.1fs", arm.name, time.monotonic() - started)
        upstreams[arm.name] = [running.url]
    if not upstreams:
        raise ConfigError("no arm to start")
    return upstreams
