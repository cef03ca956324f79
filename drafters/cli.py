"""Subcommands of this area (registered by specdrift.cli): `specdrift drafter ...`."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    drafter = subparsers.add_parser("drafter", help="build and inspect draft models distilled from the target")
    commands = drafter.add_subparsers(dest="drafter_command", metavar="SUBCOMMAND", required=True)

    distill = commands.add_parser(
        "distill", help="generate target responses on the train split, distil a drafter, write its card")
    distill.add_argument("--config", required=True, help="experiment config file (YAML)")
    distill.add_argument("--drafter", required=True, help="name of a drafter in the config's `drafters`")
    distill.add_argument("--force", action="store_true", help="rebuild even if the cached drafter is up to date")
    distill.set_defaults(handler=distill_command)

    show = commands.add_parser("show", help="print a built drafter's card summary")
    show.add_argument("--config", required=True, help="experiment config file (YAML)")
    show.add_argument("--drafter", required=True, help="drafter name")
    show.set_defaults(handler=show_command)


def distill_command(args) -> int:
    from drafters.build import distill
    from specdrift.config import load_config

    config = load_config(args.config)
    config.drafter(args.drafter)  # an unknown name fails before any work
    out = distill(config, args.drafter, force=args.force, progress=lambda msg: print(msg, flush=True))
    print(f"drafter {args.drafter}: {out}")
    return 0


def show_command(args) -> int:
    from drafters.build import drafter_summary
    from specdrift.config import load_config
    from specdrift.paths import drafter_dir

    config = load_config(args.config)
    config.drafter(args.drafter)
    directory = drafter_dir(config, args.drafter)
    if not directory.exists():
        print(f"drafter {args.drafter} is not built at {directory}", file=sys.stderr)
        return 1
    print(drafter_summary(directory))
    return 0
