"""The `specdrift` command: the parser, logging, and the errors that every
subcommand reports as one line (specdrift/commands.py holds the subcommands)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from core.config import ConfigError
from core.contracts import WorkloadFileError
from core.processes import sigterm_unwinds
from specdrift import commands
from workload.builder import WorkloadError
from workload.datasets import DatasetError
from workload.strata import StrataError

# Datasets, strata and workload files are read by several commands (run,
# prepare, drafter, workload); a missing tokenizer is a FileNotFoundError
# with its own message (workload/lengths.py).
INPUT_ERRORS = (DatasetError, WorkloadError, WorkloadFileError, StrataError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specdrift",
        description="Measure whether speculative decoding pays off on a multitask workload.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.register(subparsers)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """'workload build', 'run', ...: the words the user typed."""
    action = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {action}" if action else args.command


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    # The hub's, transformers' and tqdm's own bars (loading weights, writing shards, de-quantizing the GGUF)
    # would break the console's progress lines; each reads these when first imported, which is after this,
    # and child processes inherit them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        with sigterm_unwinds():  # a killed command stops the children it started, whatever it was doing
            return int(args.handler(args) or 0)
    except ConfigError as err:
        print(f"specdrift: config error: {err}", file=sys.stderr)
        return 2
    except INPUT_ERRORS as err:
        print(f"specdrift {command_name(args)}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("specdrift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
