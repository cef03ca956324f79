"""The gateway process: `python -m service.server --settings FILE`.

One process, one event loop (uvloop, httptools with service.edge's bounds):
the overhead benchmark measures exactly this."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from service.records import RecordStoreError
from service.settings import GatewaySettings


def run(settings: GatewaySettings) -> None:
    # Here, not at the top: specdrift's CLI imports this module, and these cost every command ~0.3 s.
    import uvicorn

    from service.app import create_app
    from service.edge import ConnectionLimits, EdgeProtocol
    from service.gateway import open_record_store

    # A store that cannot be opened fails here, as one line (RecordStoreError), not in the app's start-up.
    open_record_store(settings).close()

    # The record writer thread waits for the GIL while the event loop is busy;
    # a request's last bytes wait for that writer. 0.5 ms instead of Python's
    # 5 ms bounds each such wait.
    sys.setswitchinterval(0.0005)
    app = create_app(settings)
    # httptools itself bounds neither header size nor receive time: EdgeProtocol does (docs/gateway.md, "Limits").
    limits = ConnectionLimits(settings.max_header_bytes, settings.max_headers, settings.header_timeout_s,
                              settings.body_timeout_s)
    protocol = functools.partial(EdgeProtocol, limits=limits, on_reject=app.state.gateway.count_rejection)
    uvicorn.run(app, host=settings.host, port=settings.port, loop="uvloop", http=protocol,
                access_log=False, timeout_graceful_shutdown=settings.shutdown_grace_s, log_level="info")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.server", description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, type=Path, help="GatewaySettings as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = GatewaySettings.model_validate_json(args.settings.read_text())
        settings.records_password()  # an unset variable fails here
    except ValidationError as err:
        first = err.errors()[0]
        sys.exit(f"gateway: gateway.{'.'.join(map(str, first['loc']))}: {first['msg']}")
    except ValueError as err:
        sys.exit(f"gateway: {err}")
    try:
        run(settings)
    except RecordStoreError as err:
        sys.exit(f"gateway: {err}")


if __name__ == "__main__":
    main()
