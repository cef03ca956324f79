"""The PostgreSQL record store (`gateway.records_url`): the same table, columns
and guarantee as the SQLite one (service/records.py, whose docstring lists
the columns), in one database that every gateway replica writes to. Each row
names its replica.

Types: TEXT, BIGINT (SQLite's INTEGER), DOUBLE PRECISION (REAL). The table
is created at start-up, or gains the columns added since (under an advisory
lock, so that replicas starting together do not race), with an index on
(run_id, t_start). TEXT cannot hold NUL characters: they become `?`, marked
like any unstorable value.

One writer thread with one synchronous psycopg connection, so the event loop
never waits on the database. A batch is one executemany in pipeline mode:
one round trip, and one (implicit) transaction.

Durability: the session's `synchronous_commit` is `records_synchronous_commit`,
`off` by default, which matches SQLite's WAL with synchronous=NORMAL: a
committed record is in the database server, so it survives the gateway
crashing or being killed; only the database server itself crashing can drop
the last fraction of a second of commits (PostgreSQL's asynchronous commit:
never a torn or partial one). `on` waits for the WAL's fsync too, which adds
the fsync's latency to every request.

The database unreachable (refused connections, a dropped connection, a
server shutting down or starting up): the batch in hand stays in memory with
everything that arrives meanwhile, and the writer reconnects and retries,
backing off from 0.1 s to 1 s. Acknowledgement: while the database answers,
a request's last bytes wait for its commit, as with SQLite; while it does
not, a record counts as accepted once it is buffered, and its request is let
go at once (so a response never waits on an outage). Such records are lost
only if the gateway process itself dies before the database returns. The
gateway refuses new requests with a 503 once `records_buffer` records are
waiting (service/gateway.py); requests already in flight still buffer
theirs, so none it accepted is dropped. A batch whose commit may have landed
before the connection broke is retried with ON CONFLICT DO NOTHING for its
rows only: a row already there is that record, stored once. Closing during
an outage retries for `close_timeout_s`, then counts what is left as failed
(`database`) and logs it.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

import psycopg
from psycopg.types.numeric import Int8Dumper

from core.contracts import RECORD_COLUMNS, RECORDS_TABLE, connect_database, one_line, shown_url
from service.records import RecordStoreError, RecordWriter, storable_text

log = logging.getLogger(__name__)

POSTGRES_TYPES = {"TEXT": "TEXT", "INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION"}
# pg_advisory_xact_lock key held while creating or migrating the table: replicas start together.
SCHEMA_LOCK_KEY = 0x5_9EC_D817
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 1.0
CLOSE_TIMEOUT_S = 10.0
# Errors of the connection or the server, not of a row: retried, never blamed on a record.
OUTAGE = (psycopg.OperationalError, psycopg.InterfaceError)
# A half-open connection (a vanished host) fails within seconds instead of the kernel's minutes.
CONNECTION_OPTIONS = dict(autocommit=True, application_name="specdrift-gateway", keepalives=1, keepalives_idle=5,
                          keepalives_interval=2, keepalives_count=3, tcp_user_timeout=10_000)

_COLUMNS = ", ".join(RECORD_COLUMNS)
_INSERT = f"INSERT INTO {RECORDS_TABLE} ({_COLUMNS}) VALUES ({', '.join(['%s'] * len(RECORD_COLUMNS))})"
_INSERT_AGAIN = _INSERT + " ON CONFLICT (request_id) DO NOTHING"


def postgres_type(kind: str) -> str:
    """RECORD_COLUMNS' SQLite type as PostgreSQL's (`TEXT PRIMARY KEY` stays)."""
    first, _, rest = kind.partition(" ")
    return " ".join([POSTGRES_TYPES[first]] + ([rest] if rest else []))


def postgres_text(value: str) -> str:
    """storable_text, and no NUL characters (PostgreSQL's TEXT cannot hold them), each replaced by `?`."""
    if "\x00" in value:
        return storable_text(value.replace("\x00", "?"))
    return storable_text(value)


def ensure_schema(conn: psycopg.Connection) -> None:
    """Create the table, or add the columns an older gateway's table lacks, and the index."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        columns = ", ".join(f"{name} {postgres_type(kind)}" for name, kind in RECORD_COLUMNS.items())
        conn.execute(f"CREATE TABLE IF NOT EXISTS {RECORDS_TABLE} ({columns})")
        present = {row[0] for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = %s", (RECORDS_TABLE,))}
        for name, kind in RECORD_COLUMNS.items():
            if name not in present:
                conn.execute(f"ALTER TABLE {RECORDS_TABLE} ADD COLUMN {name} "
                             f"{postgres_type(kind).replace(' PRIMARY KEY', '')}")
        conn.execute(f"CREATE INDEX IF NOT EXISTS {RECORDS_TABLE}_run ON {RECORDS_TABLE} (run_id, t_start)")


class PostgresRecordStore(RecordWriter):
    """Records in PostgreSQL, buffered and retried while the database is unreachable (the module docstring)."""

    storable_text = staticmethod(postgres_text)
    database_error = psycopg.Error
    passed_on = OUTAGE

    def __init__(self, url: str, password: str | None = None, on_failure: Callable[[str], None] | None = None,
                 on_stop: Callable[[], None] | None = None, replica: str | None = None,
                 close_timeout_s: float = CLOSE_TIMEOUT_S, synchronous_commit: str = "off"):
        self.url = url
        self.synchronous_commit = synchronous_commit
        self.where = shown_url(url)
        self._password = password
        self.close_timeout_s = close_timeout_s
        self.down = False  # the database is unreachable: records are buffered
        # Request ids whose commit was under way when a connection broke: it may have landed.
        self._in_doubt: set[str] = set()
        super().__init__(on_failure, on_stop, replica)

    def reachable(self) -> bool:
        return not self.down

    def _open_message(self, error: BaseException) -> str:
        return f"cannot connect to {self.where}: {one_line(error)}"

    def _connect(self) -> psycopg.Connection:
        conn = connect_database(self.url, self._password, **CONNECTION_OPTIONS)
        try:
            # Every Python int as int8: one parameter type per column, so one prepared statement.
            conn.adapters.register_dumper(int, Int8Dumper)
            conn.execute("SELECT set_config('synchronous_commit', %s, false)", (self.synchronous_commit,))
            ensure_schema(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _close(self, conn: psycopg.Connection) -> None:
        try:
            conn.close()
        except psycopg.Error:
            pass

    # --- the writer thread ----------------------------------------------------
    def _commit(self, conn, batch: list) -> None:
        """Commit `batch`; while the database is unreachable, keep it (and what
        arrives meanwhile), let its requests go, and retry."""
        if not batch:
            return
        backoff = RETRY_FIRST_S
        give_up_at = None
        while True:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                super()._commit(self._conn, batch)
                if self.down:
                    self.down = False
                    log.warning("record store %s reachable again; %d buffered records written", self.where,
                                len(batch))
                return
            except OUTAGE as err:
                self._lost(err, batch)
            if self._stopping:
                give_up_at = give_up_at or time.monotonic() + self.close_timeout_s
                if time.monotonic() >= give_up_at:
                    self._abandon(batch)
                    return
            self._buffer_for(backoff, batch)
            backoff = min(2 * backoff, RETRY_MAX_S)

    def _lost(self, error: BaseException, batch: list) -> None:
        if self._conn is not None:
            self._close(self._conn)
            self._conn = None
        self._in_doubt.update(item[0][0] for item in batch)
        if not self.down:
            self.down = True
            log.error("record store %s unreachable (%s); buffering records and retrying", self.where,
                      one_line(error))
            self._acknowledge(batch)

    def _buffer_for(self, seconds: float, batch: list) -> None:
        """Wait `seconds`, moving what arrives into `batch` and letting its requests go."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if self._stopping:  # the stop request is in: only the wait is left
                time.sleep(left)
                return
            try:
                first = self._queue.get(timeout=left)
            except queue.Empty:
                return
            taken = [first]
            self._take_queued(taken)
            batch.extend(taken)
            self._acknowledge(taken)

    def _abandon(self, batch: list) -> None:
        """Closing, and the database still unreachable after close_timeout_s: what is buffered is lost."""
        log.critical("record store %s still unreachable at shutdown: %d buffered records lost", self.where,
                     len(batch))
        for _ in batch:
            self._count_failure("database")
        self.failed += len(batch)
        self._wake(batch, [RecordStoreError("the record store was unreachable at shutdown")] * len(batch))

    def _execute_batch(self, conn: psycopg.Connection, rows: list[tuple]) -> None:
        doubtful = self._in_doubt
        with conn.cursor() as cursor:
            if len(rows) == 1 and not doubtful:
                cursor.execute(_INSERT, rows[0])  # a third cheaper than executemany's pipeline
            elif not doubtful:
                # One round trip, all or nothing: in pipeline mode the inserts up to psycopg's one Sync are
                # one implicit transaction (an explicit one would cost two round trips more).
                cursor.executemany(_INSERT, rows)
            else:
                with conn.transaction():
                    again = [row for row in rows if row[0] in doubtful]
                    fresh = [row for row in rows if row[0] not in doubtful]
                    if fresh:
                        cursor.executemany(_INSERT, fresh)
                    if again:
                        cursor.executemany(_INSERT_AGAIN, again)

    def _execute_one(self, conn: psycopg.Connection, row: tuple) -> None:
        conn.execute(_INSERT_AGAIN if row[0] in self._in_doubt else _INSERT, row)

    def _insert(self, conn: psycopg.Connection, rows: list[tuple]) -> list[BaseException | None]:
        errors = super()._insert(conn, rows)
        if self._in_doubt:  # written or refused now: no longer in doubt
            self._in_doubt.difference_update(row[0] for row in rows)
        return errors
