"""The experiment runner behind `specdrift run`: from a config to a run
directory holding everything the analysis needs.

Steps: prepare the target model, build the workload (once: the drafters take
their train split from it), build the drafters that are missing or stale,
write the acceptance replay's inputs (the target's outputs for the replay set
and each draft model's teacher-forced matches, drafters/replay.py), start every arm (all stay up, so that requests can be paired in time), start
the gateway (and Prometheus where it is installed), replay the eval prompts
under each load regime with Locust, time each draft model alone against the
baseline for the cost ratio c (specdrift/cost.py, cost.json), then write the
report. The console gets specdrift's own progress; every child's output
(vLLM's engine logs among them) goes to `logs/`.

Pairing in time: in the sequential regime each prompt goes to every arm in a
rotating order, with the baseline twice (its agreement with itself is the
losslessness noise floor), and no arm is sent two requests in a row; under
load, short blocks of each arm alternate.
Only one request is in flight in the sequential regime, so arms never compete
for cores while being timed there.

Run directory (`runs/<run id>/`):

| path | what |
|---|---|
| `config.resolved.yaml` | the config as run, every default filled in |
| `environment.json` | versions, CPU, model and drafter file hashes |
| `preregistration.yaml` | the design's pre-registration, copied before anything is measured |
| `state.json` | regimes done, arms that died; what `--resume` reads |
| `workload.jsonl` (+ `.build.json`, `.summary.md`, `.lengths.png`) | the prompts, with split and stratum; the build report |
| `workload.replay.jsonl`, `replay/` | the replay's prompts; the target's outputs, each drafter's matches, what was replayed |
| `records.sqlite` | one row per request (the gateway's records; with `gateway.records_url`, the run's rows copied from PostgreSQL at the end) |
| `cost.json` | the measured draft/target cost ratio c per draft-model arm, and the K sweep of `cost.sweep_arms` (r per K, r = γc + v) |
| `locust/<regime>_*.csv` | Locust's own statistics per regime |
| `logs/` | one log per arm, the gateway, Prometheus, each Locust regime and each target-response generation |
| `drafters/<name>/drafter_card.json` | what each drafter learned from |
| `results.json`, `report.md`, `report.html`, `figures/` | the answer |

core/contracts.py's `RunFiles` names these paths for every reader.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import yaml

import loadgen
from analysis.report import write_report
from analysis.rundir import RunDirError
from core.arms import missing_inputs, start_arms
from core.config import ExperimentConfig, LoadRegime
from core.contracts import (DRAFTER_CARD, EVAL, RunFiles, count_records, one_line, read_records, read_workload,
                            shown_url)
from core.environment import describe
from core.models import directory_hashes, prepare_target
from core.paths import drafter_dir, target_dir
from core.processes import Child, ProcessStack, log_tail, start_child
from drafters.replay import replay_inputs, replayed_drafters
from loadgen.shapes import locust_shape_options
from service.launch import start_gateway
from service.records import copy_records
from service.settings import records_source
from specdrift.cost import measure_costs
from specdrift.prepare import prepare_drafters
from specdrift.prometheus import start_prometheus
from workload.builder import build, save_built, tag_vocabulary

log = logging.getLogger(__name__)

LOCUSTFILE = Path(loadgen.__file__).resolve().parent / "locustfile.py"
PROGRESS_EVERY_S = 10.0


@dataclass
class RunState:
    """What has been done; saved after every regime so that --resume can go on."""

    run_id: str
    regimes: dict[str, dict] = field(default_factory=dict)
    dead_arms: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "RunState":
        data = json.loads(path.read_text())
        return cls(run_id=data["run_id"], regimes=data.get("regimes", {}), dead_arms=data.get("dead_arms", {}))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "regimes": self.regimes, "dead_arms": self.dead_arms},
                                  indent=2, sort_keys=True) + "\n")
        tmp.replace(path)


class RunError(RuntimeError):
    """The run cannot go on; the message says why."""


def new_run_id(config: ExperimentConfig) -> str:
    return f"{config.name}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def open_run_dir(config: ExperimentConfig, out: Path | None, resume: bool) -> tuple[RunFiles, RunState]:
    if resume:
        if out is None:
            raise RunError("--resume needs --out RUN_DIR, the run to continue")
        run = RunFiles(out)
        if not run.state.exists():
            raise RunError(f"{out} is not a specdrift run directory (no state.json) to resume")
        state = RunState.load(run.state)
        previous = yaml.safe_load(run.config.read_text())
        if previous != resolved_config(config):
            raise RunError(f"the config differs from the one {out} was started with; resume with "
                           f"--config {run.config} or start a new run")
        return run, state
    run_id = out.name if out else new_run_id(config)
    preregistration = preregistration_path(config) if config.design.preregistration else None
    run = RunFiles(out or Path("runs") / run_id)
    if run.state.exists():
        raise RunError(f"{run.root} already holds a run; use --resume to continue it or choose another --out")
    for folder in (run.root, run.locust, run.logs, run.drafters):
        folder.mkdir(parents=True, exist_ok=True)
    state = RunState(run_id=run_id)
    run.config.write_text(yaml.safe_dump(resolved_config(config), sort_keys=False))
    if preregistration is not None:
        # Copied before anything is measured: the report checks its hypotheses against this copy.
        shutil.copy2(preregistration, run.preregistration)
    state.save(run.state)
    return run, state


def preregistration_path(config: ExperimentConfig) -> Path:
    path = config.resolve_path(config.design.preregistration)
    if not path.is_file():
        raise RunError(f"design.preregistration: no such file {path}")
    return path


def resolved_config(config: ExperimentConfig) -> dict:
    data = config.model_dump(mode="json")
    data["cache_dir"] = str(config.cache_path)
    data["workload"]["data_dir"] = str(config.data_path)
    return data


def write_environment(config: ExperimentConfig, run: RunFiles, drafter_names: list[str]) -> None:
    env = describe()
    env["target"] = {"dir": str(target_dir(config)), "files": directory_hashes(target_dir(config))}
    env["drafters"] = {}
    for name in drafter_names:
        ddir = drafter_dir(config, name)
        env["drafters"][name] = {"dir": str(ddir), "files": directory_hashes(ddir)}
        card = ddir / DRAFTER_CARD
        if card.exists():
            run.drafter_card(name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(card, run.drafter_card(name))
    run.environment.write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")


def drafters_used(config: ExperimentConfig, arm_names: list[str]) -> list[str]:
    """The named arms' drafters, then the replay-only ones (their cards go into the run too)."""
    return replayed_drafters(config, arm_names)


def replay_enabled(config: ExperimentConfig, progress=print) -> bool:
    """The replay reproduces greedy decoding only; it is off at replay.per_cell 0."""
    if config.replay.per_cell == 0:
        return False
    if config.temperature > 0:
        progress(f"acceptance replay skipped: it replays greedy decoding, and temperature is {config.temperature}")
        return False
    return True


# --- progress ---------------------------------------------------------------

def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(label: str, done: int, errors: int, expected: int, elapsed: float,
                  max_seconds: float | None = None) -> str:
    """ETA: the rate so far over what is left, or the regime's time bound if that comes first."""
    eta_s = elapsed / done * (expected - done) if 0 < done < expected else None
    if max_seconds is not None and done < expected:
        eta_s = min(eta_s if eta_s is not None else max_seconds, max(0.0, max_seconds - elapsed))
    eta = format_eta(eta_s) if eta_s is not None else "-"
    return f"regime {label}: {done}/{expected} requests, {errors} errors, {elapsed:.0f}s elapsed, ETA {eta}"


# --- regimes ------------------------------------------------------------------

def regime_arms(config: ExperimentConfig, regime: LoadRegime, live_arms: list[str]) -> list[str]:
    """Arms in a regime; in the sequential regime the baseline goes twice, for
    its agreement with itself, its repeat half-way round the order from it, so
    that the rotation never runs the two back to back (loadgen/shapes.py)."""
    arms = list(live_arms)
    if regime.kind == "sequential" and config.baseline_arm in arms:
        slots = len(arms) + 1
        arms.insert((arms.index(config.baseline_arm) + (slots + 1) // 2) % slots, config.baseline_arm)
    return arms


def expected_requests(regime: LoadRegime, n_prompts: int, n_arm_slots: int) -> int:
    if regime.kind == "sequential":
        return min(regime.max_requests, n_prompts * n_arm_slots)
    return regime.max_requests


def locust_command(config: ExperimentConfig, regime: LoadRegime, gateway_url: str, run: RunFiles, run_id: str,
                   arms: list[str], max_requests: int) -> list[str]:
    store, _ = records_source(config, run.records)
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", gateway_url,
        "--csv", str(run.locust / regime.label),
        "--workload", str(run.workload), "--split", EVAL,
        "--arms", ",".join(arms),
        "--run-id", run_id, "--regime-label", regime.label,
        "--max-requests", str(max_requests),
        "--run-time", f"{int(regime.max_seconds)}s",
        "--block-seconds", f"{regime.block_seconds:g}",
        "--skip-done", str(store),
        *locust_shape_options(regime),
    ]


def run_regime(config: ExperimentConfig, regime: LoadRegime, gateway_url: str, run: RunFiles, state: RunState,
              arm_children: dict[str, Child], n_prompts: int, progress=print) -> None:
    live = [a for a in arm_children if a not in state.dead_arms]
    arms = regime_arms(config, regime, live)
    expected = expected_requests(regime, n_prompts, len(arms))
    # max_requests bounds the regime, an interrupted part included: a resumed
    # regime sends only what is left (and --skip-done skips pairs already answered).
    store, password = records_source(config, run.records)
    sent_before, _ = count_records(store, state.run_id, regime.label, password)
    left = max(0, regime.max_requests - sent_before)
    state.regimes[regime.label] = {"status": "running", "started": time.time(), "arms": arms}
    if left == 0:
        progress(f"regime {regime.label}: its {regime.max_requests} requests were sent before the interruption")
        finish_regime(run, state, regime.label, store, password)
        return
    cmd = locust_command(config, regime, gateway_url, run, state.run_id, arms, left)
    log_path = run.logs / f"locust-{regime.label}.log"
    progress(f"regime {regime.label}: arms {', '.join(arms)}; up to {expected} requests, {regime.max_seconds:.0f}s")
    if regime.kind != "sequential" and regime.max_seconds < regime.block_seconds * len(arms):
        progress(f"regime {regime.label}: WARNING: {regime.max_seconds:.0f}s holds fewer than one "
                 f"{regime.block_seconds:.0f}s block for each of the {len(arms)} arms; the last arms may get none")
    state.save(run.state)
    started = time.monotonic()

    def report_progress():
        done, errors = count_records(store, state.run_id, regime.label, password)
        progress(progress_line(regime.label, done, errors, expected, time.monotonic() - started, regime.max_seconds))

    # Locust reads the records too (--skip-done); libpq takes the password from the environment.
    env = {**os.environ, "PGPASSWORD": password} if password else None
    child = start_child(f"locust {regime.label}", cmd, log_path, env=env)
    try:
        last = 0.0
        while child.alive():
            time.sleep(1)
            note_dead_arms(arm_children, state, run, progress)
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                report_progress()
    finally:
        child.stop()
    report_progress()
    if child.proc.returncode not in (0, 1):  # locust exits 1 when any request failed
        raise RunError(f"Locust failed in regime {regime.label} (exit {child.proc.returncode}); "
                       f"last lines of {log_path}:\n{log_tail(log_path)}")
    finish_regime(run, state, regime.label, store, password)


def finish_regime(run: RunFiles, state: RunState, label: str, store: str | Path, password: str | None) -> None:
    done, errors = count_records(store, state.run_id, label, password)
    state.regimes[label].update(status="done", ended=time.time(), requests=done, errors=errors)
    state.save(run.state)


def note_dead_arms(arm_children: dict[str, Child], state: RunState, run: RunFiles, progress=print) -> None:
    for name, child in arm_children.items():
        if name not in state.dead_arms and not child.alive():
            state.dead_arms[name] = f"exited with code {child.proc.returncode} at {time.time():.0f}"
            state.save(run.state)
            progress(f"arm {name} DIED ({state.dead_arms[name]}); the run goes on with the other arms. "
                     f"Last lines of {child.log_path}:\n{log_tail(child.log_path, 10)}")


# --- the whole run ------------------------------------------------------------

def prepare_inputs(config: ExperimentConfig, run: RunFiles, progress=print) -> list[dict]:
    """The target model, the run's workload (built once) and the drafters; returns the workload rows."""
    progress("== target model")
    prepare_target(config, progress)
    progress("== workload")
    if not run.workload.exists():
        save_built(build(config), run.workload)
    rows = read_workload(run.workload)
    progress(f"workload: {len(rows)} rows, {sum(r['split'] == EVAL for r in rows)} eval prompts, "
             f"{len(read_workload(run.replay_workload)) if run.replay_workload.exists() else 0} to replay")
    progress("== drafters")
    prepare_drafters(config, run.logs, rows, progress)
    return rows


def replay_experiment(config: ExperimentConfig, out: Path | None = None, drafter: str | None = None,
                      progress=print) -> Path:
    """The acceptance replay alone (`specdrift replay`): a run directory with
    the workload, the replay files and a report of them, and no served
    requests. `out` may be an existing run of the same config: its replay is
    redone and its report rewritten."""
    if config.replay.per_cell == 0:
        raise RunError("replay.per_cell is 0 in this config: the replay is off")
    if not replay_enabled(config, progress):
        raise RunError("nothing to replay")
    if drafter is not None:
        config.drafter(drafter)  # an unknown name fails here, before any work
    started = time.monotonic()
    existing = out is not None and RunFiles(out).state.exists()
    if existing and drafter is not None:
        raise RunError(f"{out} is a run: its replay covers every arm, so --drafter cannot be used with it")
    run, state = open_run_dir(config, out or Path("runs") / f"{new_run_id(config)}-replay", existing)
    progress(f"replay {state.run_id} in {run.root}")
    prepare_inputs(config, run, progress)
    arms = [a.name for a in config.arms if a.speculative and not (a.optional and missing_inputs(config, a))]
    if drafter is not None:
        arms = [n for n in arms if config.arm(n).speculative.drafter in (None, drafter)]
    if not run.environment.exists():
        write_environment(config, run, drafters_used(config, arms))
    progress("== acceptance replay")
    replay_inputs(config, run, arms, run.logs, progress, only=drafter)
    report_into(run, f"replay done in {format_eta(time.monotonic() - started)}", progress)
    return run.root


def run_experiment(config: ExperimentConfig, out: Path | None = None, resume: bool = False,
                   arm_names: list[str] | None = None, progress=print) -> Path:
    started = time.monotonic()
    run, state = open_run_dir(config, out, resume)
    progress(f"run {state.run_id} in {run.root}; every server's log goes to {run.logs}")

    rows = prepare_inputs(config, run, progress)
    eval_rows = [r for r in rows if r["split"] == EVAL]
    chosen = arm_names or [a.name for a in config.arms]
    local = [n for n in chosen if config.arm(n).local]
    usable = [n for n in chosen if not (config.arm(n).optional and missing_inputs(config, config.arm(n)))]
    for name in sorted(set(chosen) - set(usable)):
        progress(f"arm {name} skipped: {'; '.join(missing_inputs(config, config.arm(name)))}")
    write_environment(config, run, drafters_used(config, [n for n in usable if n in local]))

    if replay_enabled(config, progress):
        progress("== acceptance replay")
        replay_inputs(config, run, usable, run.logs, progress)

    with ProcessStack() as stack:
        progress("== arms")
        upstreams = start_arms(config, usable, run.logs, stack)
        arm_children = {c.name.removeprefix("arm "): c for c in stack.children}
        gateway_url = start_gateway(config, upstreams, run.logs, stack, vocabulary=tag_vocabulary(config),
                                    records_path=run.records, run_ids=[state.run_id])
        progress(f"gateway: {gateway_url}")
        prometheus_url = start_prometheus(config, gateway_url, upstreams, run.prometheus, stack)
        if prometheus_url:
            progress(f"prometheus: {prometheus_url}")
        for regime in config.regimes:
            if state.regimes.get(regime.label, {}).get("status") == "done":
                progress(f"regime {regime.label}: done earlier, skipped")
                continue
            run_regime(config, regime, gateway_url, run, state, arm_children, len(eval_rows), progress)
        if config.baseline_arm in arm_children and config.baseline_arm not in state.dead_arms:
            progress("== cost ratio c")
            measure_costs(config, [n for n in arm_children if n not in state.dead_arms],
                          upstreams[config.baseline_arm][0], eval_rows, run.cost, run.logs, progress)

    if config.gateway.records_url:  # the gateway has stopped: every record is in the database
        copy_run_records(run, state.run_id, *records_source(config), progress)
    report_into(run, f"done in {format_eta(time.monotonic() - started)}", progress)
    return run.root


def copy_run_records(run: RunFiles, run_id: str, url: str, password: str | None, progress=print) -> int:
    """Fill the run directory's records.sqlite with the run's rows from the shared store, so that the run
    stays analysable without the database; returns how many."""
    try:
        records = read_records(url, run_id, password)
    except (psycopg.Error, FileNotFoundError) as err:  # the second: no gateway created the table
        raise RunError(f"cannot copy run {run_id}'s records from {shown_url(url)}: {one_line(err)}") from None
    copy_records(records, run.records)
    progress(f"records: {len(records)} of run {run_id} copied from {shown_url(url)} into {run.records}")
    return len(records)


def report_into(run: RunFiles, done: str, progress=print) -> None:
    progress("== report")
    try:
        write_report(run.root)
    except RunDirError as err:
        raise RunError(f"no report: {err}") from None
    progress(f"{done}: {run.root / 'report.md'}")
