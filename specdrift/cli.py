"""The `specdrift` command. Each area registers its own subcommands, so the
code behind a command lives with the rest of its area."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from specdrift.config import ConfigError

# Modules with a `register(subparsers)` function, in the order of --help.
COMMAND_MODULES = [
    "specdrift.commands",  # prepare, serve
    "loadgen.cli",  # workload build/show, run
    "drafters.cli",  # drafter distill
    "analysis.cli",  # report, compare
    "service.cli",  # records export, gateway
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdrift",
        description="Measure whether speculative decoding pays off on a multitask workload.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    # Datasets and workload settings are read by several commands (run, prepare, drafter, workload).
    from loadgen.datasets import DatasetError
    from loadgen.strata import StrataError
    from loadgen.workload import WorkloadError

    try:
        return int(args.handler(args) or 0)
    except ConfigError as err:
        print(f"specdrift: config error: {err}", file=sys.stderr)
        return 2
    except (DatasetError, WorkloadError, StrataError) as err:
        print(f"specdrift {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("specdrift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
