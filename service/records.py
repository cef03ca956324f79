"""Per-request records: one durable row per accepted request, in SQLite (this
module, the default) or in PostgreSQL shared by gateway replicas
(service/records_postgres.py, `gateway.records_url`). What both stores share
lives here: the columns' storable values, the writer thread, the export.

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
| client_request_id | TEXT | the client's own `X-Request-ID` (AIPerf sends one; NULL when absent), to join a client's per-request figures to these |
| endpoint | TEXT | `chat` or `completions` |
| stream | INTEGER | 1 if the client asked for a stream (the upstream is always streamed) |
| upstream | TEXT | base URL of the replica that served it (NULL if none was reachable) |
| replica | TEXT | the gateway process that recorded it: `gateway.replica`, else $SPECDRIFT_REPLICA, else `<hostname>:<pid>` |
| status | TEXT | `ok`, `client_disconnect`, `upstream_error` (the arm answered an error), `upstream_unavailable` (no replica reachable), `upstream_timeout`, `upstream_died` (connection broke mid-stream), `upstream_invalid` (the arm sent a value the gateway does not take), `gateway_shutdown` (cancelled when the gateway stopped) |
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

SQLite's durability: WAL journal with `synchronous=NORMAL`. A committed transaction
is in the WAL file as soon as `COMMIT` returns, so it survives the gateway
process crashing or being killed; only an OS crash or power loss could drop
the last transactions (FULL would fsync every commit to close that gap, which
a gateway restart does not need). The gateway waits for a request's commit
before it sends the response's last bytes, so every acknowledged request is
on disk. Writes happen on one writer thread that commits whatever has queued
up in one transaction, so the event loop never touches SQLite. (PostgreSQL's
durability and what it does while the database is unreachable:
service/records_postgres.py.)

Failures stay contained. Every value is made storable before it is queued:
an integer outside SQLite's signed 64 bits or of the wrong kind becomes
NULL, a string loses its lone surrogates (replaced by `?`), and a record
that needed this is stored with status `upstream_invalid` (if it was `ok`)
and the columns named in `error`. Any exception while writing one record is
caught, logged and counted, and the other records of its batch are written
one by one. `on_failure(reason)` counts each failure: `unstorable_value`
(stored, changed as above), `database` (the database refused it), `unexpected`
(anything else), `writer_stopped` (the writer is not running); only the
first is stored. Should the writer thread still end, every waiting or later
write fails at once instead of hanging, `alive()` turns false and `on_stop()`
is called.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from core.contracts import OK, RECORD_COLUMNS, RECORDS_TABLE, UPSTREAM_INVALID, one_line

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("parquet", "csv", "jsonl")
WRITE_FAILURE_REASONS = ("unstorable_value", "database", "unexpected", "writer_stopped")
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1  # SQLite INTEGER, PostgreSQL BIGINT

_INSERT = f"INSERT INTO {RECORDS_TABLE} ({', '.join(RECORD_COLUMNS)}) VALUES ({', '.join('?' * len(RECORD_COLUMNS))})"
_KINDS = tuple((name, kind.split()[0]) for name, kind in RECORD_COLUMNS.items())
_FLOAT_MAX = 2 ** 1023  # below float's largest value
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


def storable_text(value: str) -> str:
    """`value` without lone surrogates (UTF-8, so SQLite, cannot hold them), each replaced by `?`."""
    if value.isascii():
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode()
    return value


def default_replica() -> str:
    """This process's name in the `replica` column: $SPECDRIFT_REPLICA, else <hostname>:<pid>."""
    return os.environ.get("SPECDRIFT_REPLICA") or f"{os.uname().nodename}:{os.getpid()}"


def _row(record: dict[str, Any], text: Callable[[str], str] = storable_text) -> tuple[list, list[int]]:
    """The record as a row the store takes, and the indexes of the values that had to change.
    `text` is the store's storable_text."""
    row = []
    changed = []
    for index, (name, kind) in enumerate(_KINDS):
        value = record.get(name)
        if value is None:
            pass
        elif kind == "TEXT":
            if type(value) is not str or text(value) is not value:
                value = text(str(value))
                changed.append(index)
        elif type(value) is float and kind == "REAL":
            pass
        elif type(value) is bool:  # a flag: stored as 0/1, which PostgreSQL's BIGINT needs spelt out
            value = int(value)
        elif isinstance(value, int) and INT64_MIN <= value <= INT64_MAX:
            pass
        elif kind == "REAL" and isinstance(value, int) and abs(value) < _FLOAT_MAX:
            value = float(value)
        else:  # an integer too large for 64 bits, or a value of the wrong kind
            value = None
            changed.append(index)
        row.append(value)
    return row, changed


def _resolve_all(done: list[tuple[asyncio.Future | None, BaseException | None, Callable[[], None] | None]]) -> None:
    for future, error, on_stored in done:
        if error is None and on_stored is not None:
            try:
                on_stored()
            except Exception:  # counting must not keep the request waiting
                log.exception("on_stored failed")
        if future is None or future.done():  # nobody waits, acknowledged earlier, or the request was cancelled
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class RecordWriter:
    """What both stores share: records are appended from the event loop, and
    one writer thread owns the connection. A store supplies `_connect()`,
    `_execute_batch(conn, rows)` (one transaction), `_execute_one(conn, row)`
    and the errors its driver raises; a batch that fails is retried row by
    row, so one bad row does not sink the others.

    The writer needs the GIL, which a busy event loop holds, so it is kept to
    few acquisitions per batch: rows are built by the caller, the batch is
    inserted in one transaction, and the waiting requests are woken with one
    callback, which first calls each record's `on_stored` (so counters count
    exactly what is committed, even for a request cancelled while it
    waited)."""

    where = "record store"  # for messages: a path, or a URL without its password
    storable_text = staticmethod(storable_text)

    def __init__(self, on_failure: Callable[[str], None] | None = None,
                 on_stop: Callable[[], None] | None = None, replica: str | None = None):
        self.replica = replica or default_replica()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._on_failure = on_failure
        self._on_stop = on_stop
        # Guards _running against the writer ending while a record is queued, and _queued.
        self._lock = threading.Lock()
        self._running = True
        self._closing = False
        self._stopping = False  # the writer has taken the stop request
        self._queued = 0  # records accepted for writing; minus written and failed: the backlog
        self.written = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="records-writer", daemon=True)
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            raise RecordStoreError(self._open_message(self._open_error))

    def _open_message(self, error: BaseException) -> str:
        return f"cannot open record store {self.where}: {error}"

    def alive(self) -> bool:
        return self._running

    def reachable(self) -> bool:
        """Whether the database answers (a local SQLite file always does)."""
        return True

    def backlog(self) -> int:
        """Records handed to the store and neither committed nor failed yet."""
        return max(0, self._queued - self.written - self.failed)

    async def write(self, record: dict[str, Any], on_stored: Callable[[], None] | None = None) -> None:
        """Queue `record` and return once it is committed (the PostgreSQL store, while its database is
        unreachable: once it is buffered); `on_stored()` runs on this loop when it is committed."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._put((self._prepare(record), loop, future, on_stored)):
            raise RecordStoreError("the record writer is not running")
        await future

    def write_nowait(self, record: dict[str, Any], on_stored: Callable[[], None] | None = None) -> None:
        """Queue `record` without waiting (nobody is left to acknowledge); a failure is only counted."""
        loop = asyncio.get_running_loop() if on_stored is not None else None
        self._put((self._prepare(record), loop, None, on_stored))

    def close(self) -> None:
        """Commit everything queued so far, then stop the writer."""
        self._closing = True
        with self._lock:
            if self._running:
                self._queue.put(_STOP)
        self._thread.join()

    # --- the caller's side --------------------------------------------------
    def _prepare(self, record: dict[str, Any]) -> tuple:
        if record.get("replica") is None:
            record["replica"] = self.replica
        text = self.storable_text
        row, changed = _row(record, text)
        if changed:
            # Store what can be stored, marked as an error that names what was lost.
            for index in changed:
                record[_KINDS[index][0]] = row[index]
            note = f"unstorable values in {', '.join(_KINDS[index][0] for index in changed)}"
            if record.get("status") == OK:
                record["status"] = UPSTREAM_INVALID
            record["error"] = f"{record['error']}; {note}" if record.get("error") else note
            log.warning("record %s: %s", record.get("request_id"), note)
            self._count_failure("unstorable_value")
            row = _row(record, text)[0]
        return tuple(row)

    def _put(self, item: tuple) -> bool:
        with self._lock:
            if self._running:
                self._queued += 1
                self._queue.put(item)
                return True
        self.failed += 1
        self._count_failure("writer_stopped")
        log.error("record %s not written: the record writer is not running", item[0][0])
        return False

    def _count_failure(self, reason: str) -> None:
        if self._on_failure is not None:
            self._on_failure(reason)

    # --- the writer thread ----------------------------------------------------
    # The store's driver errors (a failure counted as `database`), and those that are not a row's fault
    # (the PostgreSQL store's outages), which the insert passes on to be retried.
    database_error: type[BaseException] | tuple = sqlite3.Error
    passed_on: tuple = ()

    def _connect(self):
        """The store's connection, its table ready; raises if it cannot be had."""
        raise NotImplementedError

    def _execute_batch(self, conn, rows: list[tuple]) -> None:
        """Insert `rows` in one transaction."""
        raise NotImplementedError

    def _execute_one(self, conn, row: tuple) -> None:
        raise NotImplementedError

    def _insert(self, conn, rows: list[tuple]) -> list[BaseException | None]:
        """Insert the batch; one error or None per row."""
        try:
            self._execute_batch(conn, rows)
            return [None] * len(rows)
        except self.passed_on:
            raise
        except Exception:
            # One bad row must not sink the others: retry them one by one.
            return [self._insert_one(conn, row) for row in rows]

    def _insert_one(self, conn, row: tuple) -> BaseException | None:
        try:
            self._execute_one(conn, row)
        except self.passed_on:
            raise
        except Exception as err:
            reason = "database" if isinstance(err, self.database_error) else "unexpected"
            message = one_line(err)
            log.error("could not write record %s to %s: %s: %s", row[0], self.where, type(err).__name__, message)
            self._count_failure(reason)
            return RecordStoreError(f"{type(err).__name__}: {message}")
        return None

    def _close(self, conn) -> None:
        conn.close()

    def _run(self) -> None:
        try:
            self._conn = self._connect()
        except Exception as err:
            self._open_error = err
            self._running = False
            self._opened.set()
            return
        self._opened.set()
        batch: list = []
        try:
            while not self._stopping:
                batch = [self._queue.get()]
                self._take_queued(batch)
                try:
                    self._commit(self._conn, batch)
                except Exception:  # a bug here must not end the writer
                    log.exception("record writer: batch of %d failed", len(batch))
                    self.failed += len(batch)
                    self._wake(batch, [RecordStoreError("record writer error")] * len(batch))
                batch = []
        finally:
            self._stopped(batch)
            if self._conn is not None:
                self._close(self._conn)

    def _take_queued(self, batch: list) -> list:
        """Move whatever is queued into `batch` (a stop request sets _stopping); returns what was moved."""
        taken = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            taken.append(item)
        if batch and batch[0] is _STOP:
            batch.pop(0)
            self._stopping = True
        if _STOP in taken:
            self._stopping = True
            taken = [item for item in taken if item is not _STOP]
        batch.extend(taken)
        return taken

    def _stopped(self, batch: list) -> None:
        """The writer is ending: fail what it holds and what is queued, and say so."""
        with self._lock:
            self._running = False
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        batch = [item for item in batch if item is not _STOP]
        for _ in batch:
            self._count_failure("writer_stopped")
        self.failed += len(batch)
        self._wake(batch, [RecordStoreError("the record writer stopped")] * len(batch))
        if not self._closing:
            log.critical("the record writer stopped; %d queued records were not written", len(batch))
            if self._on_stop is not None:
                self._on_stop()

    def _commit(self, conn, batch: list) -> None:
        if not batch:
            return
        errors = self._insert(conn, [item[0] for item in batch])
        failed = sum(error is not None for error in errors)
        self.failed += failed
        self.written += len(batch) - failed
        self._wake(batch, errors)

    def _wake(self, batch: list, errors: list[BaseException | None]) -> None:
        waiting: dict[asyncio.AbstractEventLoop, list] = {}
        for (_, loop, future, on_stored), error in zip(batch, errors):
            if loop is not None:
                waiting.setdefault(loop, []).append((future, error, on_stored))
        for loop, done in waiting.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, done)
            except RuntimeError:  # that event loop is closed: nobody waits any more
                pass

    def _acknowledge(self, batch: list) -> None:
        """Let the requests waiting on `batch` go on before their commit (only the
        PostgreSQL store does, while its database is unreachable); `on_stored` still
        waits for the commit."""
        self._wake([(row, loop, future, None) for row, loop, future, _ in batch], [None] * len(batch))


class RecordStore(RecordWriter):
    """The SQLite store (the default): one file, WAL (the module docstring)."""

    def __init__(self, path: Path, on_failure: Callable[[str], None] | None = None,
                 on_stop: Callable[[], None] | None = None, replica: str | None = None):
        self.path = Path(path)
        self.where = str(self.path)
        super().__init__(on_failure, on_stop, replica)

    def _connect(self) -> sqlite3.Connection:
        return _open(self.path)

    def _execute_batch(self, conn: sqlite3.Connection, rows: list[tuple]) -> None:
        with conn:  # one transaction for the whole batch
            conn.executemany(_INSERT, rows)

    def _execute_one(self, conn: sqlite3.Connection, row: tuple) -> None:
        with conn:
            conn.execute(_INSERT, row)


def copy_records(records: list[dict[str, Any]], path: Path) -> Path:
    """`records` as a new SQLite store at `path`, written whole (a temporary file,
    then renamed): a run directory's own copy of its rows from a shared store."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    for stale in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        stale.unlink(missing_ok=True)
    conn = _open(tmp)
    try:
        with conn:
            conn.executemany(_INSERT, [tuple(r.get(c) for c in RECORD_COLUMNS) for r in records])
        conn.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    finally:
        conn.close()
    tmp.replace(path)
    for stale in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        stale.unlink(missing_ok=True)
    return path


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
