"""`specdrift report` and `specdrift compare` (registered by specdrift.cli)."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="analyse a run directory: results.json, report.md/.html, figures/")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `specdrift run`")
    p.add_argument("--out", help="write the outputs here instead of into RUN_DIR")
    p.set_defaults(handler=report_command)

    c = subparsers.add_parser("compare", help="set two runs side by side")
    c.add_argument("run_a", metavar="RUN_A")
    c.add_argument("run_b", metavar="RUN_B")
    c.add_argument("--out", help="write compare.json, compare.md and compare.html here (default: print Markdown)")
    c.set_defaults(handler=compare_command)


def report_command(args) -> int:
    from pathlib import Path

    from analysis.report import write_report
    from analysis.rundir import RunDirError

    try:
        results = write_report(args.run_dir, args.out)
    except RunDirError as err:
        print(f"specdrift report: {err}", file=sys.stderr)
        return 1
    out = Path(args.out or args.run_dir)
    print("\n".join(f"- {line}" for line in results["summary"]))
    print(f"\nreport: {out / 'report.html'} (and report.md, results.json, figures/)")
    return 0


def compare_command(args) -> int:
    from analysis.compare import compare_runs
    from analysis.rundir import RunDirError

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
