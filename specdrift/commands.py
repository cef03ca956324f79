"""Every `specdrift` subcommand: its arguments and its handler, in the order
of `specdrift --help`. A handler wires the floors below together and turns
their errors into one line for the user; the work itself lives in them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psycopg
from pydantic import ValidationError

from analysis.compare import compare_runs
from analysis.report import write_report
from analysis.rundir import RunDirError
from core.arms import start_arms
from core.config import ExperimentConfig, load_config
from core.contracts import (RunFiles, WorkloadFileError, check_database_url, is_database_url, one_line, read_records,
                            read_workload, shown_url, workload_sidecar)
from core.models import ModelError, prepare_target
from core.paths import drafter_dir
from core.processes import ProcessStack, StartupError
from drafters.build import distill, drafter_summary
from service.launch import start_gateway
from service.records import EXPORT_FORMATS, RecordStoreError, export_records
from service.server import run as run_gateway
from service.settings import records_source, settings_from_config
from specdrift.prepare import prepare_drafters
from specdrift.runner import RunError, RunState, copy_run_records, replay_experiment, run_experiment
from workload import builder
from workload.summary import summary_markdown


def add_command(subparsers, name: str, help: str, handler, config: bool = True) -> argparse.ArgumentParser:
    """A subcommand that runs `handler(args)`; most read an experiment config."""
    parser = subparsers.add_parser(name, help=help)
    if config:
        parser.add_argument("--config", required=True, help="experiment config file (YAML)")
    parser.set_defaults(handler=handler)
    return parser


def add_group(subparsers, name: str, help: str, metavar: str = "ACTION"):
    """A command with subcommands (`specdrift workload build`); its choice is args.<name>_command."""
    return subparsers.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", metavar=metavar,
                                                                  required=True)


def register(subparsers) -> None:
    p = add_command(subparsers, "prepare", "build the target model (and missing drafters) into the cache",
                    prepare_command)
    p.add_argument("--skip-drafters", action="store_true", help="only the target model")

    s = add_command(subparsers, "serve", "run the arms (and the gateway) in the foreground until Ctrl-C",
                    serve_command)
    s.add_argument("--arms", help="comma-separated arm names (default: all)")
    s.add_argument("--no-gateway", action="store_true", help="start the arms only")
    s.add_argument("--log-dir", help="folder for per-process logs (default: <cache>/logs/serve)")
    s.add_argument("--health-timeout", type=float, default=300, help="seconds to wait for each arm (default 300)")
    s.add_argument("--run-id", action="append", default=[], metavar="ID",
                   help="a run id clients send in X-Specdrift-Run, kept as a metrics label (repeatable; "
                        "other values are counted as 'other')")
    s.add_argument("--records", help="record store: an SQLite file or a postgresql:// URL (default: "
                                     "gateway.records_url, else gateway.records_path, else <cache>/records.sqlite)")

    r = add_command(subparsers, "run", "run the whole experiment and write the report", run_command)
    r.add_argument("--out", help="run directory (default: runs/<name>-<UTC time>)")
    r.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    r.add_argument("--arms", help="comma-separated arm names (default: all)")

    p = add_command(subparsers, "replay", "the acceptance replay alone: the target's outputs for the replay set, "
                    "each drafter's matches, a report of tau per arm, task, stratum and K", replay_command)
    p.add_argument("--drafter", help="replay only the arms of this drafter (and the n-gram arms)")
    p.add_argument("--out", help="run directory (default: runs/<name>-<UTC time>-replay); an existing run of "
                                 "the same config gets its replay redone and its report rewritten")

    actions = add_group(subparsers, "workload", "build or inspect a length-stratified workload file")
    b = add_command(actions, "build", "datasets in the config -> workload.jsonl (+ summary, histogram)",
                    workload_build_command)
    b.add_argument("--out", default="workload.jsonl", help="workload file to write (default: workload.jsonl)")
    w = add_command(actions, "show", "print a workload file's summary", workload_show_command, config=False)
    w.add_argument("file", help="a workload.jsonl")

    commands = add_group(subparsers, "drafter", "build and inspect draft models distilled from the target",
                         metavar="SUBCOMMAND")
    d = add_command(commands, "distill", "generate target responses on the train split, distil a drafter, "
                    "write its card", drafter_distill_command)
    d.add_argument("--drafter", required=True, help="name of a drafter in the config's `drafters`")
    d.add_argument("--force", action="store_true", help="rebuild even if the cached drafter is up to date")
    h = add_command(commands, "show", "print a built drafter's card summary", drafter_show_command)
    h.add_argument("--drafter", required=True, help="drafter name")

    a = add_command(subparsers, "report", "analyse a run directory: results.json, report.md/.html, figures/",
                    report_command, config=False)
    a.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `specdrift run`")
    a.add_argument("--out", help="write the outputs here instead of into RUN_DIR")
    a.add_argument("--records", metavar="URL", help="first refresh RUN_DIR/records.sqlite with the run's rows from "
                                                    "this PostgreSQL store (postgresql://...)")

    c = add_command(subparsers, "compare", "set two runs side by side", compare_command, config=False)
    c.add_argument("run_a", metavar="RUN_A")
    c.add_argument("run_b", metavar="RUN_B")
    c.add_argument("--out", help="write compare.json, compare.md and compare.html here (default: print Markdown)")

    record_actions = add_group(subparsers, "records", "per-request records of the gateway")
    e = add_command(record_actions, "export", "write one run's records as parquet, csv or jsonl",
                    records_export_command)
    e.add_argument("run_id", metavar="RUN_ID", help="the run's id (X-Specdrift-Run); 'all' for every record")
    e.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    e.add_argument("--out", help="output file (default: stdout)")
    e.add_argument("--records", help="record store, an SQLite file or a postgresql:// URL (default: "
                                     "runs/RUN_ID/records.sqlite if it exists, else the config's gateway.records_url, "
                                     "else gateway.records_path, else <cache>/records.sqlite)")

    g = add_command(subparsers, "gateway", "run the gateway in the foreground in front of running arms",
                    gateway_command)
    g.add_argument("--upstream", action="append", default=[], metavar="ARM=URL",
                   help="an arm and one replica's base URL; repeat for more arms or replicas "
                        "(default: the config's arms that list upstreams)")
    g.add_argument("--host", help="address to bind (default: the config's gateway.host, 127.0.0.1)")
    g.add_argument("--port", type=int, help="port (default: the config's ports.gateway)")
    g.add_argument("--records", help="record store: an SQLite file or a postgresql:// URL (default: "
                                     "gateway.records_url, else gateway.records_path, else <cache>/records.sqlite)")
    g.add_argument("--run-id", action="append", default=[], dest="run_ids", metavar="ID",
                   help="a run id to keep as a Prometheus label value (others count as 'other')")


def with_records(config: ExperimentConfig, value: str | None) -> tuple[ExperimentConfig, Path | None]:
    """`--records`: a postgresql:// URL, or an SQLite file (which then wins over the config's URL). Returns the
    config to use and the SQLite path to give the gateway; a bad URL raises ValueError."""
    if not value:
        return config, None
    try:
        url = check_database_url(value) if is_database_url(value) else None
    except ValueError as err:
        raise ValueError(f"--records: {err}") from None
    gateway = config.gateway.model_copy(update={"records_url": url})
    return config.model_copy(update={"gateway": gateway}), None if url else Path(value)


def arm_names(config: ExperimentConfig, text: str | None) -> list[str] | None:
    """`--arms a,b` as names; an unknown one fails here, before anything starts."""
    names = [n.strip() for n in text.split(",") if n.strip()] if text else None
    for name in names or []:
        config.arm(name)
    return names


# --- prepare, serve, run -----------------------------------------------------------------

def prepare_command(args) -> int:
    started = time.monotonic()
    config = load_config(args.config)
    try:
        prepare_target(config)
    except ModelError as err:
        print(f"specdrift prepare: {err}", file=sys.stderr)
        return 1
    if not args.skip_drafters:
        prepare_drafters(config, config.cache_path / "logs" / "drafters")
    print(f"prepared in {time.monotonic() - started:.1f}s")
    return 0


def run_command(args) -> int:
    config = load_config(args.config)
    names = arm_names(config, args.arms)
    try:
        run_experiment(config, Path(args.out) if args.out else None, args.resume, names)
    except (RunError, StartupError) as err:
        print(f"specdrift run: {err}", file=sys.stderr)
        return 1
    return 0


def replay_command(args) -> int:
    config = load_config(args.config)
    try:
        replay_experiment(config, Path(args.out) if args.out else None, args.drafter)
    except (RunError, ModelError, FileNotFoundError) as err:
        print(f"specdrift replay: {err}", file=sys.stderr)
        return 1
    return 0


def serve_command(args) -> int:
    config = load_config(args.config)
    names = arm_names(config, args.arms)
    try:
        config, records_path = with_records(config, args.records)
    except ValueError as err:
        print(f"specdrift serve: {err}", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir) if args.log_dir else config.cache_path / "logs" / "serve"
    with ProcessStack() as stack:
        try:
            upstreams = start_arms(config, names, log_dir, stack, args.health_timeout)
            for name, urls in upstreams.items():
                print(f"{name}: {', '.join(urls)}", flush=True)
            if not args.no_gateway:
                url = start_gateway(config, upstreams, log_dir, stack, vocabulary=builder.tag_vocabulary(config),
                                    run_ids=args.run_id or None, records_path=records_path)
                print(f"gateway: {url}", flush=True)
        except StartupError as err:
            print(f"specdrift serve: {err}", file=sys.stderr)
            return 1
        try:
            while True:
                for child in stack.children:
                    if not child.alive():
                        print(f"specdrift serve: {child.name} exited with code {child.proc.returncode}; "
                              f"see {child.log_path}", file=sys.stderr)
                        return 1
                time.sleep(1)
        except KeyboardInterrupt:
            print("specdrift serve: stopping", file=sys.stderr)
    return 0


# --- workload ---------------------------------------------------------------------------

def workload_build_command(args) -> int:
    config = load_config(args.config)
    built = builder.build(config)
    out = builder.save_built(built, args.out)
    print(workload_sidecar(out, "summary.md").read_text())
    splits = {s: sum(r["split"] == s for r in built.rows) for s in ("eval", "train")}
    print(f"wrote {out} ({splits['eval']} eval, {splits['train']} train rows), "
          f"{workload_sidecar(out, 'summary.md')}, {workload_sidecar(out, 'lengths.png')}, "
          f"{workload_sidecar(out, 'build.json')}")
    return 0


def workload_show_command(args) -> int:
    try:
        rows = read_workload(args.file)
    except (OSError, WorkloadFileError) as err:
        print(f"specdrift workload show: {err}", file=sys.stderr)
        return 1
    report_path = workload_sidecar(args.file, "build.json")
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    print(summary_markdown(rows, report), end="")
    if report is None:
        print(f"({report_path} not found: build details not shown)")
    return 0


# --- drafters ---------------------------------------------------------------------------

def drafter_distill_command(args) -> int:
    config = load_config(args.config)
    config.drafter(args.drafter)  # an unknown name fails before any work
    built = builder.build(config)
    log_dir = config.cache_path / "logs" / "drafters"
    out = distill(config, args.drafter, built.rows, builder.fingerprint(config), log_dir, force=args.force,
                  progress=lambda msg: print(msg, flush=True))
    print(f"drafter {args.drafter}: {out}")
    return 0


def drafter_show_command(args) -> int:
    config = load_config(args.config)
    config.drafter(args.drafter)
    directory = drafter_dir(config, args.drafter)
    if not directory.exists():
        print(f"drafter {args.drafter} is not built at {directory}", file=sys.stderr)
        return 1
    print(drafter_summary(directory))
    return 0


# --- report, compare ----------------------------------------------------------------------

def report_command(args) -> int:
    try:
        if args.records:
            refresh_records(Path(args.run_dir), args.records)
        results = write_report(args.run_dir, args.out)
    except (RunDirError, RunError, ValueError) as err:
        print(f"specdrift report: {err}", file=sys.stderr)
        return 1
    out = Path(args.out or args.run_dir)
    print("\n".join(f"- {line}" for line in results["summary"]))
    print(f"\nreport: {out / 'report.html'} (and report.md, results.json, figures/)")
    return 0


def refresh_records(run_dir: Path, url: str) -> None:
    """RUN_DIR/records.sqlite := the run's rows in the PostgreSQL store at `url` (PGPASSWORD / PGPASSFILE)."""
    check_database_url(url)
    run = RunFiles(run_dir)
    if not run.state.is_file():
        raise RunDirError(f"{run_dir}: no state.json, so no run id to take records of")
    copy_run_records(run, RunState.load(run.state).run_id, url, None, progress=lambda line: print(line,
                                                                                                 file=sys.stderr))


def compare_command(args) -> int:
    try:
        _, document = compare_runs(args.run_a, args.run_b, args.out)
    except RunDirError as err:
        print(f"specdrift compare: {err}", file=sys.stderr)
        return 1
    if args.out:
        print(f"comparison: {args.out}/compare.html (and compare.md, compare.json)")
    else:
        print(document.to_markdown())
    return 0


# --- records, gateway -------------------------------------------------------------------------

def records_store_for(config: ExperimentConfig, run_id: str, explicit: str | None) -> tuple[str | Path, str | None]:
    """The store to export from, and its password: --records, else the run directory's copy, else the config's."""
    if explicit:
        return (check_database_url(explicit) if is_database_url(explicit) else Path(explicit)), None
    run_dir_store = Path("runs") / run_id / "records.sqlite"
    if run_id != "all" and run_dir_store.exists():
        return run_dir_store, None
    return records_source(config)


def records_export_command(args) -> int:
    config = load_config(args.config)
    try:
        store, password = records_store_for(config, args.run_id, args.records)
        records = read_records(store, None if args.run_id == "all" else args.run_id, password)
    except (FileNotFoundError, ValueError) as err:
        print(f"specdrift records export: {err}", file=sys.stderr)
        return 1
    except psycopg.Error as err:
        print(f"specdrift records export: {shown_url(store)}: {one_line(err)}", file=sys.stderr)
        return 1
    shown = shown_url(store) if is_database_url(store) else store
    if not records:
        print(f"specdrift records export: no records of run {args.run_id!r} in {shown}", file=sys.stderr)
        return 1
    if args.out:
        with open(args.out, "wb") as out:
            export_records(records, args.format, out)
        print(f"{len(records)} records -> {args.out}", file=sys.stderr)
    else:
        export_records(records, args.format, sys.stdout.buffer)
        sys.stdout.flush()
    return 0


def parse_upstreams(values: list[str]) -> dict[str, list[str]]:
    upstreams: dict[str, list[str]] = {}
    for value in values:
        arm, sep, url = value.partition("=")
        if not sep or not arm or not url.startswith(("http://", "https://")):
            raise ValueError(f"--upstream {value!r}: expected ARM=http://HOST:PORT")
        upstreams.setdefault(arm, []).append(url.rstrip("/"))
    return upstreams


def gateway_command(args) -> int:
    config = load_config(args.config)
    try:
        config, records_path = with_records(config, args.records)
        upstreams = parse_upstreams(args.upstream) if args.upstream else {
            arm.name: list(arm.upstreams) for arm in config.arms if arm.upstreams}
        if not upstreams:
            raise ValueError("no upstreams: give --upstream ARM=URL, or list `upstreams` for arms in the config")
        settings = settings_from_config(config, upstreams, vocabulary=builder.tag_vocabulary(config),
                                        records_path=records_path, port=args.port, run_ids=args.run_ids)
        if args.host:
            settings.host = args.host
        settings.auth_token()
        settings.records_password()
    except (ValidationError, ValueError) as err:
        print(f"specdrift gateway: {err}", file=sys.stderr)
        return 2
    records = shown_url(settings.records_url) if settings.records_url else settings.records_path
    print(f"gateway: http://{settings.host}:{settings.port} -> {', '.join(upstreams)}; records in {records}",
          file=sys.stderr, flush=True)
    try:
        run_gateway(settings)
    except RecordStoreError as err:
        print(f"specdrift gateway: {err}", file=sys.stderr)
        return 2
    return 0
