"""Subcommands of this area (registered by specdrift.cli): `records export`
and `gateway`."""

from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    records = subparsers.add_parser("records", help="per-request records of the gateway")
    actions = records.add_subparsers(dest="records_command", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write one run's records as parquet, csv or jsonl")
    export.add_argument("run_id", metavar="RUN_ID", help="the run's id (X-Specdrift-Run); 'all' for every record")
    export.add_argument("--config", required=True, help="experiment config file (YAML)")
    export.add_argument("--format", required=True, choices=("parquet", "csv", "jsonl"))
    export.add_argument("--out", help="output file (default: stdout)")
    export.add_argument("--records", help="SQLite record store (default: runs/RUN_ID/records.sqlite if it exists, "
                                          "else the config's gateway.records_path, else <cache>/records.sqlite)")
    export.set_defaults(handler=export_command)

    gateway = subparsers.add_parser("gateway", help="run the gateway in the foreground in front of running arms")
    gateway.add_argument("--config", required=True, help="experiment config file (YAML)")
    gateway.add_argument("--upstream", action="append", default=[], metavar="ARM=URL",
                         help="an arm and one replica's base URL; repeat for more arms or replicas "
                              "(default: the config's arms that list upstreams)")
    gateway.add_argument("--host", help="address to bind (default: the config's gateway.host, 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port (default: the config's ports.gateway)")
    gateway.add_argument("--records", help="SQLite record store (default: gateway.records_path, "
                                           "else <cache>/records.sqlite)")
    gateway.add_argument("--run-id", action="append", default=[], dest="run_ids", metavar="ID",
                         help="a run id to keep as a Prometheus label value (others count as 'other')")
    gateway.set_defaults(handler=gateway_command)


def records_path_for(config, run_id: str, explicit: str | None) -> Path:
    from service.settings import default_records_path

    if explicit:
        return Path(explicit)
    run_dir_store = Path("runs") / run_id / "records.sqlite"
    if run_id != "all" and run_dir_store.exists():
        return run_dir_store
    return default_records_path(config)


def export_command(args) -> int:
    from service.records import export_records, read_records
    from specdrift.config import load_config

    config = load_config(args.config)
    path = records_path_for(config, args.run_id, args.records)
    try:
        records = read_records(path, None if args.run_id == "all" else args.run_id)
    except FileNotFoundError as err:
        print(f"specdrift records export: {err}", file=sys.stderr)
        return 1
    if not records:
        print(f"specdrift records export: no records of run {args.run_id!r} in {path}", file=sys.stderr)
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
    from pydantic import ValidationError

    from service.server import run
    from service.settings import settings_from_config
    from specdrift.config import load_config

    config = load_config(args.config)
    try:
        upstreams = parse_upstreams(args.upstream) if args.upstream else {
            arm.name: list(arm.upstreams) for arm in config.arms if arm.upstreams}
        if not upstreams:
            raise ValueError("no upstreams: give --upstream ARM=URL, or list `upstreams` for arms in the config")
        settings = settings_from_config(config, upstreams, records_path=Path(args.records) if args.records else None,
                                        port=args.port, run_ids=args.run_ids)
        if args.host:
            settings.host = args.host
        settings.auth_token()
    except (ValidationError, ValueError) as err:
        print(f"specdrift gateway: {err}", file=sys.stderr)
        return 2
    print(f"gateway: http://{settings.host}:{settings.port} -> {', '.join(upstreams)}; records in "
          f"{settings.records_path}", file=sys.stderr, flush=True)
    run(settings)
    return 0
