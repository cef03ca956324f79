"""Per-request records: one durable row per accepted request, in SQLite.

Table `requests`, written once when the request ends (success, error or
disconnect). Requests rejected before they are accepted (bad JSON, unknown
arm, failed auth, ...) have no row; `specdrift_rejected_requests_total`
counts them.

| column | type | meaning |
|---|---|---|
| request_id | TEXT | primary key; also the `X-Specdrift-Request-Id` response header |
| run_id | TEXT | `X-Specdrift-Run` (raw value; `none` when absent) |
| arm | TEXT | the request's `model`, i.e. the arm |
| task | TEXT | `X-Specdrift-Task` |
| stratum | TEXT | `X-Specdrift-Stratum` |
| prompt_id | TEXT | `X-Specdrift-Prompt-Id` |
| regime | TEXT | `X-Specdrift-Regime` |
| endpoint | TEXT | `chat` or `completions` |
| stream | INTEGER | 1 if the client asked for a stream (the upstream is always streamed) |
| upstream | TEXT | base URL of the replica that served it (NULL if none was reachable) |
| status | TEXT | `ok`, `client_disconnect`, `upstream_error` (the arm answered an error), `upstream_unavailable` (no replica reachable), `upstream_timeout`, `upstream_died` (connection broke mid-stream), `gateway_shutdown` (cancelled when the gateway stopped) |
| http_status | INTEGER | status the client got (200 also when a stream later failed) |
| error | TEXT | error message, NULL when ok |
| finish_reason | TEXT | the arm's finish reason (`stop`, `length`, ...) |
| t_start | REAL | unix epoch seconds when the gateway accepted the request |
| t_first_token | REAL | epoch seconds of the first chunk carrying output tokens |
| t_end | REAL | epoch seconds when the upstream stream ended |
| ttft_s | REAL | t_first_token - t_start |
| e2e_s | REAL | t_end - t_start |
| tpot_s | REAL | (t_end - t_first_token) / (completion_tokens - 1); NULL below 2 tokens |
| itl_mean_s | REAL | mean inter-token gap |
| itl_p50_s | REAL | median inter-token gap |
| itl_p99_s | REAL | 99th percentile inter-token gap (linear interpolation) |
| itl_max_s | REAL | largest inter-token gap |
| itl_json | TEXT | JSON list of every gap, in seconds, between successive chunks that carry output tokens; under speculation one chunk can carry several tokens |
| prompt_tokens | INTEGER | from the arm's usage |
| completion_tokens | INTEGER | from the arm's usage (else the token ids seen) |
| max_tokens | INTEGER | the bound applied (the client's, or the gateway's limit when absent) |
| temperature | REAL | the client's temperature (NULL: the arm's default) |
| spec_drafts | INTEGER | vLLM `num_spec_steps`: verify steps with drafts |
| spec_draft_tokens | INTEGER | vLLM `num_draft_tokens` |
| spec_accepted_tokens | INTEGER | vLLM `num_accepted_draft_tokens` |
| spec_accepted_per_pos | TEXT | JSON list; index i = steps that accepted draft position i (from `acceptance_histogram`: acceptance is a prefix) |
| spec_json | TEXT | vLLM's raw `metrics.speculative_decoding` object |
| output_hash | TEXT | sha256 hex of the completion token ids as a JSON list (`[1,2,3]`), or of the UTF-8 text |
| output_hash_kind | TEXT | `token_ids` or `text`; compare hashes of the same kind only |
| output_text | TEXT | the completion text |

Durability: WAL journal with `synchronous=NORMAL`. A committed transaction
is in the WAL file as soon as `COMMIT` returns, so it survives the gateway
process crashing or being killed; only an OS crash or power loss could drop
the last transactions (FULL would fsync every commit to close that gap, which
a gateway restart does not need). The gateway waits for a request's commit
before it sends the response's last bytes, so every acknowledged request is
on disk. Writes happen on one writer thread that commits whatever has queued
up in one transaction, so the event loop never touches SQLite.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import queue
import sqlite3
import threading
from pathlib import Path
from typing import IO, Any

from core.contracts import RECORD_COLUMNS, RECORDS_TABLE

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("parquet", "csv", "jsonl")

_INSERT = f"INSERT INTO {RECORDS_TABLE} ({', '.join(RECORD_COLUMNS)}) VALUES ({', '.join('?' * len(RECORD_COLUMNS))})"
_STOP = object()


class RecordStoreError(RuntimeError):
    """The record store cannot be opened or written."""


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    columns = ", ".join(f"{name} {kind}" for name, kind in RECORD_COLUMNS.items())
    conn.execute(f"CREATE TABLE IF NOT EXISTS {RECORDS_TABLE} ({columns})")
    # A store written by an older gateway gains the columns added since.
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({RECORDS_TABLE})")}
    for name, kind in RECORD_COLUMNS.items():
        if name not in present:
            conn.execute(f"ALTER TABLE {RECORDS_TABLE} ADD COLUMN {name} {kind.replace(' PRIMARY KEY', '')}")
    conn.execute(f"CREATE INDEX IF NOT EXISTS {RECORDS_TABLE}_run ON {RECORDS_TABLE} (run_id, t_start)")
    conn.commit()
    return conn


def _resolve_all(done: list[tuple[asyncio.Future, BaseException | None]]) -> None:
    for future, error in done:
        if future.done():  # the waiting request was cancelled meanwhile
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class RecordStore:
    """Appends records from the event loop; one writer thread owns the connection.

    The writer needs the GIL, which a busy event loop holds, so it is kept to
    few acquisitions per batch: rows are built by the caller, the batch is
    inserted with one executemany and one commit (SQLite runs without the
    GIL), and the waiting requests are woken with one callback."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self.written = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="records-writer", daemon=True)
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            raise RecordStoreError(f"cannot open record store {self.path}: {self._open_error}")

    def alive(self) -> bool:
        return self._thread.is_alive()

    async def write(self, record: dict[str, Any]) -> None:
        """Queue `record` and return once it is committed."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((_row(record), loop, future))
        await future

    def write_nowait(self, record: dict[str, Any]) -> None:
        """Queue `record` without waiting (nobody is left to acknowledge)."""
        self._queue.put((_row(record), None, None))

    def close(self) -> None:
        """Commit everything queued so far, then stop the writer."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        try:
            conn = _open(self.path)
        except (sqlite3.Error, OSError) as err:
            self._open_error = err
            self._opened.set()
            return
        self._opened.set()
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                self._commit(conn, batch)
        conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list) -> None:
        rows = [row for row, _, _ in batch]
        try:
            with conn:  # one transaction for the whole batch
                conn.executemany(_INSERT, rows)
            errors: list[BaseException | None] = [None] * len(batch)
        except sqlite3.Error:
            # One bad row must not sink the others: retry them one by one.
            errors = [self._insert_one(conn, row) for row in rows]
        self.failed += sum(error is not None for error in errors)
        self.written += len(batch) - sum(error is not None for error in errors)
        waiting: dict[asyncio.AbstractEventLoop, list] = {}
        for (_, loop, future), error in zip(batch, errors):
            if future is not None:
                waiting.setdefault(loop, []).append((future, error))
        for loop, done in waiting.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, done)
            except RuntimeError:  # that event loop is closed: nobody waits any more
                pass

    def _insert_one(self, conn: sqlite3.Connection, row: tuple) -> BaseException | None:
        try:
            with conn:
                conn.execute(_INSERT, row)
        except sqlite3.Error as err:
            log.error("could not write record %s to %s: %s", row[0], self.path, err)
            return RecordStoreError(str(err))
        return None


def _row(record: dict[str, Any]) -> tuple:
    return tuple(record.get(column) for column in RECORD_COLUMNS)


def export_records(records: list[dict[str, Any]], fmt: str, out: IO[bytes]) -> None:
    """Write records as parquet, csv or jsonl to a binary stream."""
    if fmt == "jsonl":
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    elif fmt == "csv":
        text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
        writer = csv.DictWriter(text, fieldnames=list(RECORD_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        text.detach()  # leave `out` open for the caller
    elif fmt == "parquet":
        # Here, not at the top: pyarrow is slow to import and only parquet export needs it.
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow_type = {"TEXT": pa.string(), "INTEGER": pa.int64(), "REAL": pa.float64()}
        schema = pa.schema([(name, arrow_type[kind.split()[0]]) for name, kind in RECORD_COLUMNS.items()])
        table = pa.Table.from_pylist([{c: r.get(c) for c in RECORD_COLUMNS} for r in records], schema=schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        out.write(sink.getvalue().to_pybytes())
    else:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
