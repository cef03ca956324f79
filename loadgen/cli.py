"""Subcommands of this area (registered by specdrift.cli): `workload build`
and `workload show`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    workload = subparsers.add_parser("workload", help="build or inspect a length-stratified workload file")
    actions = workload.add_subparsers(dest="workload_command", metavar="ACTION", required=True)

    b = actions.add_parser("build", help="datasets in the config -> workload.jsonl (+ summary, histogram)")
    b.add_argument("--config", required=True, help="experiment config file (YAML)")
    b.add_argument("--out", default="workload.jsonl", help="workload file to write (default: workload.jsonl)")
    b.set_defaults(handler=build_command)

    s = actions.add_parser("show", help="print a workload file's summary")
    s.add_argument("file", help="a workload.jsonl")
    s.set_defaults(handler=show_command)


def build_command(args) -> int:
    from loadgen.datasets import DatasetError
    from loadgen.strata import StrataError
    from loadgen.workload import WorkloadError, build, save_built, sidecar
    from specdrift.config import load_config

    config = load_config(args.config)
    try:
        built = build(config)
    except (DatasetError, WorkloadError, StrataError, FileNotFoundError) as err:
        print(f"specdrift workload build: {err}", file=sys.stderr)
        return 1
    out = save_built(built, args.out)
    print(sidecar(out, "summary.md").read_text())
    splits = {s: sum(r["split"] == s for r in built.rows) for s in ("eval", "train")}
    print(f"wrote {out} ({splits['eval']} eval, {splits['train']} train rows), "
          f"{sidecar(out, 'summary.md')}, {sidecar(out, 'lengths.png')}, {sidecar(out, 'build.json')}")
    return 0


def show_command(args) -> int:
    from loadgen.summary import summary_markdown
    from loadgen.workload import WorkloadError, read_workload, sidecar

    try:
        rows = read_workload(args.file)
    except (OSError, WorkloadError) as err:
        print(f"specdrift workload show: {err}", file=sys.stderr)
        return 1
    report_path = sidecar(args.file, "build.json")
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    print(summary_markdown(rows, report), end="")
    if report is None:
        print(f"({report_path} not found: build details not shown)")
    return 0
