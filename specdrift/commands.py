"""`specdrift prepare` and `specdrift serve`."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from specdrift.config import load_config
from specdrift.processes import ProcessStack, StartupError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="build the target model (and missing drafters) into the cache")
    p.add_argument("--config", required=True, help="experiment config file (YAML)")
    p.add_argument("--skip-drafters", action="store_true", help="only the target model")
    p.set_defaults(handler=prepare_command)

    s = subparsers.add_parser("serve", help="run the arms (and the gateway) in the foreground until Ctrl-C")
    s.add_argument("--config", required=True, help="experiment config file (YAML)")
    s.add_argument("--arms", help="comma-separated arm names (default: all)")
    s.add_argument("--no-gateway", action="store_true", help="start the arms only")
    s.add_argument("--log-dir", help="folder for per-process logs (default: <cache>/logs/serve)")
    s.add_argument("--health-timeout", type=float, default=300, help="seconds to wait for each arm (default 300)")
    s.add_argument("--run-id", action="append", default=[], metavar="ID",
                   help="a run id clients send in X-Specdrift-Run, kept as a metrics label (repeatable; "
                        "other values are counted as 'other')")
    s.add_argument("--records", help="SQLite file for per-request records (default: gateway.records_path, "
                                     "else <cache>/records.sqlite)")
    s.set_defaults(handler=serve_command)

    r = subparsers.add_parser("run", help="run the whole experiment and write the report")
    r.add_argument("--config", required=True, help="experiment config file (YAML)")
    r.add_argument("--out", help="run directory (default: runs/<name>-<UTC time>)")
    r.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    r.add_argument("--arms", help="comma-separated arm names (default: all)")
    r.set_defaults(handler=run_command)


def prepare_command(args) -> int:
    from specdrift.models import ModelError, prepare_target

    config = load_config(args.config)
    try:
        prepare_target(config)
    except ModelError as err:
        print(f"specdrift prepare: {err}", file=sys.stderr)
        return 1
    if not args.skip_drafters and config.drafters:
        from drafters.build import build_missing_drafters

        build_missing_drafters(config)
    return 0


def run_command(args) -> int:
    from loadgen.runner import RunError, run_experiment

    config = load_config(args.config)
    names = [n.strip() for n in args.arms.split(",") if n.strip()] if args.arms else None
    for name in names or []:
        config.arm(name)
    try:
        run_experiment(config, Path(args.out) if args.out else None, args.resume, names)
    except (RunError, StartupError) as err:
        print(f"specdrift run: {err}", file=sys.stderr)
        return 1
    return 0


def serve_command(args) -> int:
    from specdrift.arms import start_arms

    config = load_config(args.config)
    names = [n.strip() for n in args.arms.split(",") if n.strip()] if args.arms else None
    if names:
        for name in names:
            config.arm(name)  # unknown names fail here, before anything starts
    log_dir = Path(args.log_dir) if args.log_dir else config.cache_path / "logs" / "serve"
    with ProcessStack() as stack:
        try:
            upstreams = start_arms(config, names, log_dir, stack, args.health_timeout)
        except StartupError as err:
            print(f"specdrift serve: {err}", file=sys.stderr)
            return 1
        for name, urls in upstreams.items():
            print(f"{name}: {', '.join(urls)}", flush=True)
        if not args.no_gateway:
            from service.launch import start_gateway

            try:
                url = start_gateway(config, upstreams, log_dir, stack, run_ids=args.run_id or None,
                                    records_path=Path(args.records) if args.records else None)
            except StartupError as err:
                print(f"specdrift serve: {err}", file=sys.stderr)
                return 1
            print(f"gateway: {url}", flush=True)
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
