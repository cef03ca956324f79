"""The experiment runner behind `specdrift run`: from a config to a run
directory holding everything the analysis needs.

Phases: prepare models and drafters, build the workload, start every arm (all
stay up, so that requests can be paired in time), start the gateway (and
Prometheus where it is installed), replay the eval prompts under each load
regime with Locust, time each draft model alone against the baseline for the
cost ratio c (loadgen/cost.py, cost.json), then write the report.

Pairing in time: in the sequential regime each prompt goes to every arm in a
rotating order, with the baseline twice (its agreement with itself is the
losslessness noise floor); under load, short blocks of each arm alternate.
Only one request is in flight in the sequential regime, so arms never compete
for cores while being timed there.

Run directory (`runs/<run id>/`):

| path | what |
|---|---|
| `config.resolved.yaml` | the config as run, every default filled in |
| `environment.json` | versions, CPU, model and drafter file hashes |
| `state.json` | phases done, arms that died; what `--resume` reads |
| `workload.jsonl` (+ `.build.json`, `.summary.md`, `.lengths.png`) | the prompts, with split and stratum; the build report |
| `records.sqlite` | one row per request (the gateway's records) |
| `cost.json` | the measured draft/target cost ratio c per draft-model arm |
| `locust/<regime>_*.csv` | Locust's own statistics per phase |
| `logs/` | one log per arm, the gateway, Prometheus and each Locust phase |
| `drafters/<name>/drafter_card.json` | what each drafter learned from |
| `results.json`, `report.md`, `report.html`, `figures/` | the answer |
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from specdrift.config import ExperimentConfig, LoadRegime
from specdrift.processes import Child, ProcessStack, StartupError, log_tail, start_child

log = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
PROGRESS_EVERY_S = 10.0


@dataclass
class RunDir:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.resolved.yaml"

    @property
    def environment(self) -> Path:
        return self.root / "environment.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def workload(self) -> Path:
        return self.root / "workload.jsonl"

    @property
    def records(self) -> Path:
        return self.root / "records.sqlite"

    @property
    def locust(self) -> Path:
        return self.root / "locust"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def drafters(self) -> Path:
        return self.root / "drafters"


@dataclass
class RunState:
    """What has been done; saved after every phase so that --resume can go on."""

    run_id: str
    phases: dict[str, dict] = field(default_factory=dict)
    dead_arms: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "RunState":
        data = json.loads(path.read_text())
        return cls(run_id=data["run_id"], phases=data.get("phases", {}), dead_arms=data.get("dead_arms", {}))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "phases": self.phases, "dead_arms": self.dead_arms},
                                  indent=2, sort_keys=True) + "\n")
        tmp.replace(path)


class RunError(RuntimeError):
    """The run cannot go on; the message says why."""


def new_run_id(config: ExperimentConfig) -> str:
    return f"{config.name}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def open_run_dir(config: ExperimentConfig, out: Path | None, resume: bool) -> tuple[RunDir, RunState]:
    if resume:
        if out is None:
            raise RunError("--resume needs --out RUN_DIR, the run to continue")
        run = RunDir(out)
        if not run.state.exists():
            raise RunError(f"{out} is not a specdrift run directory (no state.json) to resume")
        state = RunState.load(run.state)
        previous = yaml.safe_load(run.config.read_text())
        if previous != resolved_config(config):
            raise RunError(f"the config differs from the one {out} was started with; resume with "
                           f"--config {run.config} or start a new run")
        return run, state
    run_id = out.name if out else new_run_id(config)
    run = RunDir(out or Path("runs") / run_id)
    if run.state.exists():
        raise RunError(f"{run.root} already holds a run; use --resume to continue it or choose another --out")
    for folder in (run.root, run.locust, run.logs, run.drafters):
        folder.mkdir(parents=True, exist_ok=True)
    state = RunState(run_id=run_id)
    run.config.write_text(yaml.safe_dump(resolved_config(config), sort_keys=False))
    state.save(run.state)
    return run, state


def resolved_config(config: ExperimentConfig) -> dict:
    data = config.model_dump(mode="json")
    data["cache_dir"] = str(config.cache_path)
    data["workload"]["data_dir"] = str(config.data_path)
    return data


def write_environment(config: ExperimentConfig, run: RunDir, drafter_names: list[str]) -> None:
    from specdrift.environment import describe
    from specdrift.models import MANIFEST, directory_hashes
    from specdrift.paths import drafter_dir, target_dir

    env = describe()
    env["target"] = {"dir": str(target_dir(config)), "files": directory_hashes(target_dir(config))}
    env["drafters"] = {}
    for name in drafter_names:
        ddir = drafter_dir(config, name)
        env["drafters"][name] = {"dir": str(ddir), "files": directory_hashes(ddir)}
        card = ddir / "drafter_card.json"
        if card.exists():
            (run.drafters / name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(card, run.drafters / name / "drafter_card.json")
    env.pop(MANIFEST, None)
    run.environment.write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")


def drafters_used(config: ExperimentConfig, arm_names: list[str]) -> list[str]:
    names = []
    for name in arm_names:
        spec = config.arm(name).speculative
        if spec and spec.drafter:
            names.append(spec.drafter)
    return names


# --- progress ---------------------------------------------------------------

def count_records(db: Path, run_id: str, regime: str) -> tuple[int, int]:
    """(requests recorded, of which failed) for one phase."""
    if not db.exists():
        return 0, 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute(
                # A sweep's steps are recorded as '<label>.<step>'.
                "SELECT COUNT(*), SUM(status != 'ok') FROM requests WHERE run_id = ? AND (regime = ? OR regime LIKE ?)",
                (run_id, regime, regime + ".%")).fetchone()
    except sqlite3.Error:
        return 0, 0
    return int(row[0] or 0), int(row[1] or 0)


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(label: str, done: int, errors: int, expected: int, elapsed: float,
                  max_seconds: float | None = None) -> str:
    """ETA: the rate so far over what is left, or the phase's time bound if that comes first."""
    eta_s = elapsed / done * (expected - done) if 0 < done < expected else None
    if max_seconds is not None and done < expected:
        eta_s = min(eta_s if eta_s is not None else max_seconds, max(0.0, max_seconds - elapsed))
    eta = format_eta(eta_s) if eta_s is not None else "-"
    return f"phase {label}: {done}/{expected} requests, {errors} errors, {elapsed:.0f}s elapsed, ETA {eta}"


# --- phases -------------------------------------------------------------------

def phase_arms(config: ExperimentConfig, regime: LoadRegime, live_arms: list[str]) -> list[str]:
    """Arms in a phase; in the sequential regime the baseline goes twice, for
    its agreement with itself."""
    arms = list(live_arms)
    if regime.kind == "sequential" and config.baseline_arm in arms:
        arms.append(config.baseline_arm)
    return arms


def expected_requests(regime: LoadRegime, n_prompts: int, n_arm_slots: int) -> int:
    if regime.kind == "sequential":
        return min(regime.max_requests, n_prompts * n_arm_slots)
    return regime.max_requests


def locust_command(config: ExperimentConfig, regime: LoadRegime, gateway_url: str, run: RunDir, run_id: str,
                   arms: list[str], max_requests: int) -> list[str]:
    from loadgen.shapes import locust_shape_options

    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--host", gateway_url,
        "--csv", str(run.locust / regime.label),
        "--workload", str(run.workload), "--split", "eval",
        "--arms", ",".join(arms),
        "--run-id", run_id, "--regime-label", regime.label,
        "--max-requests", str(max_requests),
        "--run-time", f"{int(regime.max_seconds)}s",
        "--block-seconds", f"{regime.block_seconds:g}",
        "--skip-done", str(run.records),
        *locust_shape_options(regime),
    ]


def run_phase(config: ExperimentConfig, regime: LoadRegime, gateway_url: str, run: RunDir, state: RunState,
              arm_children: dict[str, Child], n_prompts: int, progress=print) -> None:
    live = [a for a in arm_children if a not in state.dead_arms]
    arms = phase_arms(config, regime, live)
    expected = expected_requests(regime, n_prompts, len(arms))
    # max_requests bounds the phase, an interrupted part included: a resumed
    # phase sends only what is left (and --skip-done skips pairs already answered).
    sent_before, _ = count_records(run.records, state.run_id, regime.label)
    left = max(0, regime.max_requests - sent_before)
    state.phases[regime.label] = {"status": "running", "started": time.time(), "arms": arms}
    if left == 0:
        progress(f"phase {regime.label}: its {regime.max_requests} requests were sent before the interruption")
        finish_phase(run, state, regime.label)
        return
    cmd = locust_command(config, regime, gateway_url, run, state.run_id, arms, left)
    log_path = run.logs / f"locust-{regime.label}.log"
    progress(f"phase {regime.label}: arms {', '.join(arms)}; up to {expected} requests, {regime.max_seconds:.0f}s")
    if regime.kind != "sequential" and regime.max_seconds < regime.block_seconds * len(arms):
        progress(f"phase {regime.label}: WARNING: {regime.max_seconds:.0f}s holds fewer than one "
                 f"{regime.block_seconds:.0f}s block for each of the {len(arms)} arms; the last arms may get none")
    state.save(run.state)
    started = time.monotonic()

    def report_progress():
        done, errors = count_records(run.records, state.run_id, regime.label)
        progress(progress_line(regime.label, done, errors, expected, time.monotonic() - started, regime.max_seconds))

    child = start_child(f"locust {regime.label}", cmd, log_path)
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
        raise RunError(f"Locust failed in phase {regime.label} (exit {child.proc.returncode}); "
                       f"last lines of {log_path}:\n{log_tail(log_path)}")
    finish_phase(run, state, regime.label)


def finish_phase(run: RunDir, state: RunState, label: str) -> None:
    done, errors = count_records(run.records, state.run_id, label)
    state.phases[label].update(status="done", ended=time.time(), requests=done, errors=errors)
    state.save(run.state)


def note_dead_arms(arm_children: dict[str, Child], state: RunState, run: RunDir, progress=print) -> None:
    for name, child in arm_children.items():
        if name not in state.dead_arms and not child.alive():
            state.dead_arms[name] = f"exited with code {child.proc.returncode} at {time.time():.0f}"
            state.save(run.state)
            progress(f"arm {name} DIED ({state.dead_arms[name]}); the run goes on with the other arms. "
                     f"Last lines of {child.log_path}:\n{log_tail(child.log_path, 10)}")


# --- the whole run ------------------------------------------------------------

def run_experiment(config: ExperimentConfig, out: Path | None = None, resume: bool = False,
                   arm_names: list[str] | None = None, progress=print) -> Path:
    from drafters.build import build_missing_drafters
    from loadgen.cost import measure_costs
    from loadgen.workload import build, read_workload, save_built, tag_vocabulary
    from service.launch import start_gateway
    from specdrift.arms import missing_inputs, start_arms
    from specdrift.models import prepare_target
    from specdrift.prometheus import start_prometheus

    started = time.monotonic()
    run, state = open_run_dir(config, out, resume)
    progress(f"run {state.run_id} in {run.root}")

    progress("== prepare models")
    prepare_target(config, progress)
    build_missing_drafters(config)
    chosen = arm_names or [a.name for a in config.arms]
    local = [n for n in chosen if config.arm(n).local]
    usable = [n for n in chosen if not (config.arm(n).optional and missing_inputs(config, config.arm(n)))]
    for name in sorted(set(chosen) - set(usable)):
        progress(f"arm {name} skipped: {'; '.join(missing_inputs(config, config.arm(name)))}")
    write_environment(config, run, drafters_used(config, [n for n in usable if n in local]))

    progress("== workload")
    if not run.workload.exists():
        save_built(build(config), run.workload)
    rows = read_workload(run.workload)
    n_eval = sum(1 for r in rows if r["split"] == "eval")
    progress(f"workload: {len(rows)} rows, {n_eval} eval prompts")

    with ProcessStack() as stack:
        progress("== arms")
        upstreams = start_arms(config, usable, run.logs, stack)
        arm_children = {c.name.removeprefix("arm "): c for c in stack.children}
        gateway_url = start_gateway(config, upstreams, run.logs, stack, records_path=run.records,
                                    run_ids=[state.run_id], vocabulary=tag_vocabulary(config))
        progress(f"gateway: {gateway_url}")
        prometheus_url = start_prometheus(config, gateway_url, upstreams, run.root / "prometheus", stack)
        if prometheus_url:
            progress(f"prometheus: {prometheus_url}")
        for regime in config.regimes:
            if state.phases.get(regime.label, {}).get("status") == "done":
                progress(f"phase {regime.label}: done earlier, skipped")
                continue
            run_phase(config, regime, gateway_url, run, state, arm_children, n_eval, progress)
        if config.baseline_arm in arm_children and config.baseline_arm not in state.dead_arms:
            progress("== cost ratio c")
            measure_costs(config, [n for n in arm_children if n not in state.dead_arms],
                          upstreams[config.baseline_arm][0], [r for r in rows if r["split"] == "eval"],
                          run.root / "cost.json", run.logs, progress)

    progress("== report")
    from analysis.report import write_report
    from analysis.rundir import RunDirError

    try:
        write_report(run.root)
    except RunDirError as err:
        raise RunError(f"no report: {err}") from None
    progress(f"done in {format_eta(time.monotonic() - started)}: {run.root / 'report.md'}")
    return run.root
