"""The names every floor must agree on, in one place: the request tags that
clients send, the per-request record that the gateway stores and the runner,
Locust and the analysis read, the statuses a record can end in, the regime
labels, the order of strata, the workload file and the run directory.

Whoever writes one of these and whoever reads it import it from here, so a
rename is one edit. docs/formats.md describes each for people.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row

# --- request tags (HTTP headers) -------------------------------------------

# Tag field -> header. Header names are case-insensitive; these are lower case.
TAG_HEADERS = {
    "run_id": "x-specdrift-run",
    "task": "x-specdrift-task",
    "stratum": "x-specdrift-stratum",
    "prompt_id": "x-specdrift-prompt-id",
    "regime": "x-specdrift-regime",
}
REQUEST_ID_HEADER = "X-Specdrift-Request-Id"
TAG_VALUE_PATTERN = r"[A-Za-z0-9._:@+-]{1,128}"
# The client's own id of a request (AIPerf, `vllm bench serve --request-id-prefix`), kept in the record so that
# a client's per-request figures can be joined to the gateway's. Printable ASCII without spaces.
CLIENT_REQUEST_ID_HEADER = "x-request-id"
CLIENT_REQUEST_ID_PATTERN = r"[!-~]{1,200}"
TAG_MISSING = "none"  # a tag the client did not send


def tag_headers(*, run_id: str, task: str, stratum: str, prompt_id: str, regime: str) -> dict[str, str]:
    """The headers a client sends to tag one request."""
    values = {"run_id": run_id, "task": task, "stratum": stratum, "prompt_id": prompt_id, "regime": regime}
    return {TAG_HEADERS[field]: value for field, value in values.items()}


# --- how a request ended --------------------------------------------------------

OK = "ok"
CLIENT_DISCONNECT = "client_disconnect"
UPSTREAM_ERROR = "upstream_error"  # the arm answered with an error
UPSTREAM_UNAVAILABLE = "upstream_unavailable"  # no replica reachable
UPSTREAM_TIMEOUT = "upstream_timeout"
UPSTREAM_DIED = "upstream_died"  # the connection broke mid-stream
UPSTREAM_INVALID = "upstream_invalid"  # the arm sent a value the gateway does not take
GATEWAY_SHUTDOWN = "gateway_shutdown"  # cancelled when the gateway stopped
STATUSES = (OK, CLIENT_DISCONNECT, UPSTREAM_ERROR, UPSTREAM_UNAVAILABLE, UPSTREAM_TIMEOUT, UPSTREAM_DIED,
            UPSTREAM_INVALID, GATEWAY_SHUTDOWN)


# --- per-request records ----------------------------------------------------------

RECORDS_TABLE = "requests"
# Column -> SQLite type; the meaning of each is in service/records.py's docstring.
RECORD_COLUMNS: dict[str, str] = {
    "request_id": "TEXT PRIMARY KEY",
    "run_id": "TEXT", "arm": "TEXT", "task": "TEXT", "stratum": "TEXT", "prompt_id": "TEXT", "regime": "TEXT",
    "client_request_id": "TEXT",
    "endpoint": "TEXT", "stream": "INTEGER", "upstream": "TEXT", "replica": "TEXT",
    "status": "TEXT", "http_status": "INTEGER", "error": "TEXT", "finish_reason": "TEXT",
    "t_start": "REAL", "t_first_token": "REAL", "t_end": "REAL",
    "ttft_s": "REAL", "e2e_s": "REAL", "tpot_s": "REAL",
    "itl_mean_s": "REAL", "itl_p50_s": "REAL", "itl_p99_s": "REAL", "itl_max_s": "REAL", "itl_json": "TEXT",
    "prompt_tokens": "INTEGER", "completion_tokens": "INTEGER", "max_tokens": "INTEGER", "temperature": "REAL",
    "spec_drafts": "INTEGER", "spec_draft_tokens": "INTEGER", "spec_accepted_tokens": "INTEGER",
    "spec_accepted_per_pos": "TEXT", "spec_json": "TEXT",
    "output_hash": "TEXT", "output_hash_kind": "TEXT", "output_text": "TEXT",
}


def token_ids_hash(token_ids: list[int]) -> str:
    """A record's output_hash of kind `token_ids`: sha256 hex of the ids as compact JSON (`[1,2,3]`)."""
    return hashlib.sha256(json.dumps(token_ids, separators=(",", ":")).encode()).hexdigest()


DATABASE_URL_PREFIXES = ("postgresql://", "postgres://")
DATABASE_CONNECT_TIMEOUT_S = 5


def is_database_url(store: str | Path | None) -> bool:
    """A PostgreSQL URL (the shared store), not an SQLite path."""
    return isinstance(store, str) and store.startswith(DATABASE_URL_PREFIXES)


def one_line(error: BaseException | str) -> str:
    """An error message as one line (libpq's run over several)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def shown_url(url: str) -> str:
    """`url` with any password masked, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def check_database_url(url: str) -> str:
    """`url` if it is a PostgreSQL URL libpq takes and holds no password; else ValueError."""
    if not is_database_url(url):
        raise ValueError(f"expected postgresql://USER@HOST:PORT/DATABASE, not {shown_url(url)!r}")
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as err:
        raise ValueError(f"{shown_url(url)!r} is not a valid PostgreSQL URL ({one_line(err)})") from None
    for port in params.get("port", "").split(","):  # libpq parses any port, and fails only when it connects
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{shown_url(url)!r}: port {port!r} is not a number from 1 to 65535")
    if "password" in params:
        raise ValueError("the URL holds a password; give it in PGPASSWORD or a PGPASSFILE, or name the variable "
                         "that holds it with records_password_env")
    return url


def connect_database(url: str, password: str | None = None, **options) -> psycopg.Connection:
    """A connection to the shared store (libpq's PGPASSWORD / PGPASSFILE apply when `password` is None)."""
    return psycopg.connect(url, password=password, connect_timeout=DATABASE_CONNECT_TIMEOUT_S, **options)


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def read_records(store: str | Path, run_id: str | None = None, password: str | None = None) -> list[dict[str, Any]]:
    """All records (of one run, if given), oldest first, as dicts keyed by
    column, from an SQLite path or a PostgreSQL URL (`password`: for the
    latter). Read-only: the gateway may be writing meanwhile. A column that an
    older store lacks reads as None."""
    if is_database_url(store):
        return _read_database(store, run_id, password)
    path = Path(store)
    if not path.exists():
        raise FileNotFoundError(f"no record store at {path}")
    conn = _read_only(path)
    try:
        conn.row_factory = sqlite3.Row
        where, params = ("WHERE run_id = ?", (run_id,)) if run_id is not None else ("", ())
        rows = conn.execute(f"SELECT * FROM {RECORDS_TABLE} {where} ORDER BY t_start, request_id",
                            params).fetchall()
    finally:
        conn.close()
    return [{column: row[column] if column in row.keys() else None for column in RECORD_COLUMNS} for row in rows]


def _read_database(url: str, run_id: str | None, password: str | None) -> list[dict[str, Any]]:
    where, params = ("WHERE run_id = %s", (run_id,)) if run_id is not None else ("", ())
    # Byte order and NULLs first: the order SQLite gives, whatever the database's collation.
    with connect_database(url, password, row_factory=dict_row) as conn:
        conn.read_only = True
        try:
            rows = conn.execute(f'SELECT * FROM {RECORDS_TABLE} {where} ORDER BY t_start NULLS FIRST, '
                                f'request_id COLLATE "C"', params).fetchall()
        except psycopg.errors.UndefinedTable:
            # As for a missing SQLite file: no gateway has written to this database yet.
            raise FileNotFoundError(f"no record store at {shown_url(url)}: it has no {RECORDS_TABLE} table") from None
    return [{column: row.get(column) for column in RECORD_COLUMNS} for row in rows]


def count_records(store: str | Path, run_id: str, regime: str, password: str | None = None) -> tuple[int, int]:
    """(requests recorded, of which not ok) for one run and regime, a sweep's
    steps included; (0, 0) while the store does not exist, is busy or is
    unreachable."""
    query = (f"SELECT COUNT(*), SUM(CASE WHEN status != {{0}} THEN 1 ELSE 0 END) FROM {RECORDS_TABLE} "
             "WHERE run_id = {0} AND (regime = {0} OR regime LIKE {0})")
    params = (OK, run_id, regime, regime + STEP_JOIN + "%")
    if is_database_url(store):
        try:
            with connect_database(store, password) as conn:
                row = conn.execute(query.format("%s"), params).fetchone()
        except psycopg.Error:
            return 0, 0
        return int(row[0] or 0), int(row[1] or 0)
    path = Path(store)
    if not path.exists():
        return 0, 0
    try:
        with _read_only(path) as conn:
            row = conn.execute(query.format("?"), params).fetchone()
    except sqlite3.Error:
        return 0, 0
    return int(row[0] or 0), int(row[1] or 0)


# --- regime labels ------------------------------------------------------------------

def regime_label(kind: str, users: int | None = None, rate: float | None = None) -> str:
    """A regime's name in records and reports: 'sequential', 'concurrency-4', 'poisson-0.5'."""
    if kind == "concurrency":
        return f"concurrency-{users}"
    if kind == "poisson":
        return f"poisson-{rate:g}"
    return kind


STEP_JOIN = "."


def step_regime(regime: str | None, step: str, steps: int) -> str:
    """The label a step's requests are recorded under: the regime's own label
    when it has one step, else '<regime>.<step>' (a sweep without a label of
    its own is 'sweep')."""
    if steps == 1:
        return regime or step
    return f"{regime or 'sweep'}{STEP_JOIN}{step}"


# --- strata ------------------------------------------------------------------------------

def stratum_key(label: str):
    """Strata sort by their lower prompt bound (`p64-256` after `p0-64`), then
    output bound; labels without numbers go last."""
    numbers = [int(n) for n in re.findall(r"\d+", str(label))]
    return (0, numbers, str(label)) if numbers else (1, [], str(label))


# --- the workload file ------------------------------------------------------------------

# Fields every workload row has; workload/builder.py documents them all.
WORKLOAD_REQUIRED = ("id", "task", "stratum", "messages", "max_tokens", "split")
TRAIN, EVAL = "train", "eval"


class WorkloadFileError(ValueError):
    """A workload file that cannot be read; the message names the line."""


def read_workload(path: str | Path, split: str | None = None) -> list[dict]:
    """The rows of a workload file, optionally of one split only."""
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise WorkloadFileError(f"{path}:{number}: not JSON ({err.msg})") from None
            missing = set(WORKLOAD_REQUIRED) - set(row)
            if missing:
                raise WorkloadFileError(f"{path}:{number}: missing {', '.join(sorted(missing))}")
            if split is None or row["split"] == split:
                rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Rows as JSON Lines, written whole or not at all (a temporary file, then renamed):
    the workload file, its replay set and the replay's files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def workload_sidecar(path: str | Path, kind: str) -> Path:
    """workload.jsonl -> workload.<kind> (build.json, summary.md, lengths.png, replay.jsonl)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".jsonl") + "." + kind)


# --- drafters ---------------------------------------------------------------------------------

DRAFTER_CARD = "drafter_card.json"  # beside a drafter's weights; drafters/card.py documents it


def training_window(prompt_tokens: int, output_tokens: int, max_seq_len: int) -> tuple[int, int]:
    """(prompt, output) tokens of one training example that a drafter trained with `max_seq_len` sees: the
    output's first max_seq_len - 1 tokens, then as many of the prompt's last tokens as still fit. The
    distillation cuts its examples so (drafters/train.py), and the analysis measures the drafter's training
    lengths so (analysis/rundir.py)."""
    output = min(output_tokens, max_seq_len - 1)
    return min(prompt_tokens, max_seq_len - output), output


# --- the run directory ---------------------------------------------------------------------

class RunFiles:
    """Where each file of a run directory (`runs/<run id>/`) lives; the runner
    writes them, the analysis reads them. specdrift/runner.py's docstring says
    what each holds."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.resolved.yaml"
        self.environment = self.root / "environment.json"
        self.preregistration = self.root / "preregistration.yaml"  # the design's, copied at the start
        self.state = self.root / "state.json"
        self.workload = self.root / "workload.jsonl"
        self.workload_build = workload_sidecar(self.workload, "build.json")
        self.replay_workload = workload_sidecar(self.workload, "replay.jsonl")  # the replay's prompts
        self.replay = self.root / "replay"
        self.replay_targets = self.replay / "targets.jsonl"
        self.replay_matches = self.replay / "matches.jsonl"
        self.replay_info = self.replay / "replay.json"
        self.records = self.root / "records.sqlite"
        self.cost = self.root / "cost.json"
        self.locust = self.root / "locust"
        self.logs = self.root / "logs"
        self.prometheus = self.root / "prometheus"
        self.drafters = self.root / "drafters"

    def drafter_card(self, name: str) -> Path:
        return self.drafters / name / DRAFTER_CARD
