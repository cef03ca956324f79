"""The PostgreSQL record store against a real, throw-away PostgreSQL (tests/postgres_cluster.py), no vLLM:
schema and migration, batches and bad rows, the replica column, buffering through an outage, the readers,
the run directory's copy, and bad input at start-up."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import psycopg
import pytest
import yaml
from pydantic import ValidationError

from core.config import ConfigError, GatewayConfig, parse_config
from core.contracts import RECORD_COLUMNS, RunFiles, count_records, read_records
from core.processes import free_port
from postgres_cluster import postgres_cluster, postgres_database  # noqa: F401 (fixtures)
from service.gateway import open_record_store
from service.records import RecordStoreError
from service.records_postgres import PostgresRecordStore
from service.settings import GatewaySettings
from specdrift.cli import main
from specdrift.commands import with_records
from specdrift.runner import RunError, copy_run_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(request_id: str, run_id: str = "run-1", **fields) -> dict:
    return {"request_id": request_id, "run_id": run_id, "arm": "baseline", "status": "ok", "t_start": 1.0,
            "itl_json": "[0.1, 0.2]", "completion_tokens": 2, "e2e_s": 0.5, "stream": True, **fields}


class Failures:
    def __init__(self):
        self.reasons: list[str] = []

    def store(self, url: str, **options) -> PostgresRecordStore:
        return PostgresRecordStore(url, on_failure=self.reasons.append, **options)


def gather_writes(store, records: list[dict]) -> list:
    async def write_all():
        return await asyncio.gather(*(store.write(r) for r in records), return_exceptions=True)

    return asyncio.run(write_all())


def column_types(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_name = 'requests'").fetchall())


def test_store_commits_batches_with_the_replica_and_reads_back_by_run(postgres_database):
    store = PostgresRecordStore(postgres_database, replica="gw-a")
    outcomes = gather_writes(store, [record(f"r{n:02d}", t_start=float(n)) for n in range(50)])
    store.write_nowait(record("other", run_id="run-2", replica="given"))
    store.close()
    assert outcomes == [None] * 50 and (store.written, store.failed, store.backlog()) == (51, 0, 0)
    rows = read_records(postgres_database, "run-1")
    assert [r["request_id"] for r in rows] == [f"r{n:02d}" for n in range(50)]
    assert {r["replica"] for r in rows} == {"gw-a"}
    assert read_records(postgres_database, "run-2")[0]["replica"] == "given"
    assert rows[0]["stream"] == 1 and rows[0]["e2e_s"] == 0.5 and list(rows[0]) == list(RECORD_COLUMNS)
    types = column_types(postgres_database)
    assert types["request_id"] == "text" and types["completion_tokens"] == "bigint"
    assert types["ttft_s"] == "double precision" and set(types) == set(RECORD_COLUMNS)


def test_the_session_commits_as_records_synchronous_commit_says(postgres_database, tmp_path):
    for setting in ("off", "on"):
        settings = GatewaySettings(upstreams={"a": ["http://127.0.0.1:1"]}, records_path=tmp_path / "unused.sqlite",
                                   records_url=postgres_database, records_synchronous_commit=setting)
        store = open_record_store(settings)
        try:
            assert store._conn.execute("SHOW synchronous_commit").fetchone()[0] == setting
        finally:
            store.close()


def test_the_default_replica_is_the_environment_s_else_host_and_pid(postgres_database, monkeypatch):
    monkeypatch.delenv("SPECDRIFT_REPLICA", raising=False)
    store = PostgresRecordStore(postgres_database)
    assert store.replica == f"{os.uname().nodename}:{os.getpid()}"
    store.close()
    monkeypatch.setenv("SPECDRIFT_REPLICA", "pod-7")
    store = PostgresRecordStore(postgres_database)
    asyncio.run(store.write(record("x")))
    store.close()
    assert read_records(postgres_database)[0]["replica"] == "pod-7"


def test_a_duplicate_does_not_sink_its_batch(postgres_database):
    failures = Failures()
    store = failures.store(postgres_database)
    outcomes = gather_writes(store, [record("same"), record("same"), record("fine")])
    store.close()
    assert sum(isinstance(o, RecordStoreError) for o in outcomes) == 1
    assert sorted(r["request_id"] for r in read_records(postgres_database)) == ["fine", "same"]
    assert (store.written, store.failed) == (2, 1) and failures.reasons == ["database"]


def test_a_retried_commit_that_had_landed_is_one_record(postgres_database):
    """A row of a batch whose commit may have landed before its connection broke is written again without
    a second row and without a failure; a row not in doubt still fails as a duplicate."""
    store = PostgresRecordStore(postgres_database)
    asyncio.run(store.write(record("landed")))
    store._in_doubt.add("landed")  # as _lost() marks a batch whose commit was under way
    assert gather_writes(store, [record("landed"), record("new")]) == [None, None]
    assert not store._in_doubt
    with pytest.raises(RecordStoreError):
        asyncio.run(store.write(record("new")))
    store.close()
    assert sorted(r["request_id"] for r in read_records(postgres_database)) == ["landed", "new"]


def test_values_postgres_cannot_hold_are_stored_as_far_as_they_can_be_and_marked(postgres_database):
    failures = Failures()
    store = failures.store(postgres_database)
    bad = record("bad", output_text="nul\x00here", completion_tokens=2 ** 64, error="arm said \udfff")
    asyncio.run(store.write(bad))
    store.close()
    [row] = read_records(postgres_database)
    assert row["output_text"] == "nul?here" and row["completion_tokens"] is None
    assert row["status"] == "upstream_invalid" and "output_text" in row["error"] and "completion_tokens" in row["error"]
    assert failures.reasons == ["unstorable_value"]


def test_an_older_table_gains_the_new_columns(postgres_database):
    with psycopg.connect(postgres_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE requests (request_id TEXT PRIMARY KEY, run_id TEXT, t_start DOUBLE PRECISION)")
        conn.execute("INSERT INTO requests VALUES ('old', 'run-1', 0.5)")
    store = PostgresRecordStore(postgres_database, replica="new-gw")
    asyncio.run(store.write(record("new")))
    store.close()
    assert [(r["request_id"], r["arm"], r["replica"]) for r in read_records(postgres_database)] == [
        ("old", None, None), ("new", "baseline", "new-gw")]
    with psycopg.connect(postgres_database) as conn:
        assert conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'requests_run'").fetchone()[0]\
            .endswith("(run_id, t_start)")


def test_replicas_starting_together_create_one_table(postgres_database):
    stores, errors = [], []

    def open_one():
        try:
            stores.append(PostgresRecordStore(postgres_database))
        except Exception as err:  # collected: the assertion below names it
            errors.append(err)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert errors == [] and len(stores) == 4


def test_an_outage_buffers_lets_requests_go_and_loses_nothing(postgres_cluster, postgres_database):
    """The database stops mid-stream: writes are acknowledged from the buffer at once, the backlog
    shows them, and once the database is back every record is there exactly once."""
    store = PostgresRecordStore(postgres_database, replica="gw")
    gather_writes(store, [record(f"before{n}") for n in range(5)])
    postgres_cluster.stop_fast()
    try:
        started = time.monotonic()
        outcomes = gather_writes(store, [record(f"during{n}") for n in range(20)])
        acknowledged_in = time.monotonic() - started
        assert outcomes == [None] * 20 and acknowledged_in < 2.0
        assert store.down and not store.reachable() and store.backlog() == 20
        store.write_nowait(record("nowait"))
        assert store.backlog() == 21
        assert count_records(postgres_database, "run-1", "none") == (0, 0)  # unreachable: counted as nothing yet
    finally:
        postgres_cluster.start()
    deadline = time.monotonic() + 15
    while store.backlog() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.backlog() == 0 and store.reachable() and store.failed == 0
    store.close()
    ids = [r["request_id"] for r in read_records(postgres_database)]
    assert sorted(ids) == sorted([f"before{n}" for n in range(5)] + [f"during{n}" for n in range(20)] + ["nowait"])


def test_closing_while_the_database_is_down_gives_up_after_its_timeout(postgres_cluster, postgres_database):
    failures = Failures()
    store = failures.store(postgres_database, close_timeout_s=0.5)
    postgres_cluster.stop_fast()
    try:
        gather_writes(store, [record("stranded")])
        started = time.monotonic()
        store.close()
        assert 0.4 < time.monotonic() - started < 5
    finally:
        postgres_cluster.start()
    assert (store.written, store.failed, failures.reasons) == (0, 1, ["database"])
    assert read_records(postgres_database) == []


def test_a_database_no_gateway_wrote_to_reads_as_a_missing_store(postgres_database, tmp_path):
    with pytest.raises(FileNotFoundError, match="no record store at .*: it has no requests table"):
        read_records(postgres_database)
    with pytest.raises(FileNotFoundError, match="no record store at"):
        read_records(tmp_path / "absent.sqlite")
    with pytest.raises(RunError, match="cannot copy run run-1's records .* no requests table"):
        copy_run_records(RunFiles(tmp_path), "run-1", postgres_database, None, progress=lambda line: None)


def test_count_records_and_the_run_directory_copy(postgres_database, tmp_path):
    store = PostgresRecordStore(postgres_database)
    gather_writes(store, [record("a", regime="sequential"), record("b", regime="sequential", status="upstream_died"),
                          record("c", regime="sweep.2"), record("z", run_id="run-2")])
    store.close()
    assert count_records(postgres_database, "run-1", "sequential") == (2, 1)
    assert count_records(postgres_database, "run-1", "sweep") == (1, 0)
    run = RunFiles(tmp_path)
    assert copy_run_records(run, "run-1", postgres_database, None, progress=lambda line: None) == 3
    assert read_records(run.records) == read_records(postgres_database, "run-1")
    assert not list(tmp_path.glob("records.sqlite-*")) and not list(tmp_path.glob("*.tmp"))


def test_cli_export_and_report_read_from_the_database(postgres_database, tmp_path, capsysbinary, repo_root):
    store = PostgresRecordStore(postgres_database)
    gather_writes(store, [record("x0", run_id="run-x", t_start=0.0), record("x1", run_id="run-x", t_start=1.0)])
    store.close()
    config = str(repo_root / "experiments" / "cpu-default.yaml")
    assert main(["records", "export", "run-x", "--config", config, "--format", "jsonl", "--records",
                 postgres_database]) == 0
    assert [json.loads(line)["request_id"] for line in capsysbinary.readouterr().out.splitlines()] == ["x0", "x1"]
    # `report --records` refreshes the run directory's copy before it analyses it.
    (tmp_path / "state.json").write_text(json.dumps({"run_id": "run-x"}))
    main(["report", str(tmp_path), "--records", postgres_database])
    assert [r["request_id"] for r in read_records(tmp_path / "records.sqlite")] == ["x0", "x1"]


def test_a_password_from_the_variable_records_password_env_names(postgres_cluster, tmp_path, monkeypatch):
    url = postgres_cluster.add_password_role("s3cr'et")
    base = dict(upstreams={"a": ["http://127.0.0.1:1"]}, records_path=tmp_path / "unused.sqlite", records_url=url)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(RecordStoreError) as refused:
        open_record_store(GatewaySettings(**base))
    assert str(refused.value).startswith("gateway.records_url: cannot connect to postgresql://secured@")
    assert "password" in str(refused.value) and "\n" not in str(refused.value)
    monkeypatch.setenv("TEST_RECORDS_PASSWORD", "s3cr'et")
    store = open_record_store(GatewaySettings(**base, records_password_env="TEST_RECORDS_PASSWORD"))
    asyncio.run(store.write(record("secured")))
    store.close()
    assert [r["request_id"] for r in read_records(url, password="s3cr'et")] == ["secured"]


@pytest.mark.parametrize("url, says", [
    ("postgresql://u@h/db?nosuch=1", "not a valid PostgreSQL URL"),
    ("postgresql://u@h:notaport/db", "port 'notaport' is not a number"),
    ("mysql://u@h/db", "expected postgresql://"),
    ("postgresql://u:hunter2@127.0.0.1/db", "holds a password"),
])
def test_a_bad_url_is_refused_by_the_config_in_one_line(url, says, repo_root):
    with pytest.raises(ValidationError, match=says):
        GatewayConfig(records_url=url)
    data = yaml.safe_load((repo_root / "experiments" / "cpu-default.yaml").read_text())
    data.setdefault("gateway", {})["records_url"] = url
    with pytest.raises(ConfigError) as refused:
        parse_config(data, repo_root / "experiments" / "cpu-default.yaml")
    message = str(refused.value)
    assert ": gateway.records_url: " in message and says in message and "\n" not in message
    assert "hunter2" not in message


def start_server(tmp_path, **settings) -> subprocess.CompletedProcess:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"upstreams": {"a": ["http://127.0.0.1:1"]}, "port": free_port(),
                                "records_path": str(tmp_path / "r.sqlite"), **settings}))
    return subprocess.run([sys.executable, "-m", "service.server", "--settings", str(path)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


def test_the_gateway_refuses_to_start_on_a_refused_connection_in_one_line(tmp_path):
    url = f"postgresql://specdrift@127.0.0.1:{free_port()}/specdrift"
    result = start_server(tmp_path, records_url=url)
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"gateway: gateway.records_url: cannot connect to {url}")
    assert "refused" in errors[0]


def test_the_gateway_refuses_a_malformed_url_in_one_line(tmp_path):
    result = start_server(tmp_path, records_url="postgresql://u@h/db?nosuch=1")
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(errors) == 1 and errors[0].startswith("gateway: gateway.records_url: ")


def test_specdrift_gateway_names_the_setting_in_one_line(tmp_path, repo_root):
    config = str(repo_root / "experiments" / "cpu-default.yaml")
    for records, says in ((f"postgresql://specdrift@127.0.0.1:{free_port()}/x", "gateway.records_url: cannot connect"),
                          ("postgresql://u@h/db?nosuch=1", "--records")):
        result = subprocess.run([sys.executable, "-m", "specdrift.cli", "gateway", "--config", config,
                                 "--upstream", "a=http://127.0.0.1:1", "--port", str(free_port()),
                                 "--records", records], capture_output=True, text=True, timeout=60, cwd=REPO)
        errors = [line for line in result.stderr.splitlines() if line.startswith("specdrift gateway:")]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(errors) == 1 and says in errors[0], result.stderr


def test_records_option_takes_a_url_or_a_path_in_place_of_the_config_s_store(default_config, tmp_path):
    with_url = default_config.model_copy(update={"gateway": default_config.gateway.model_copy(
        update={"records_url": "postgresql://specdrift@127.0.0.1:5432/specdrift"})})
    config, path = with_records(with_url, str(tmp_path / "local.sqlite"))
    assert config.gateway.records_url is None and path == tmp_path / "local.sqlite"
    config, path = with_records(default_config, "postgresql://other@127.0.0.1:5433/records")
    assert config.gateway.records_url == "postgresql://other@127.0.0.1:5433/records" and path is None
    assert with_records(with_url, None) == (with_url, None)
    with pytest.raises(ValueError, match="^--records: .*holds a password"):
        with_records(default_config, "postgresql://u:pw@127.0.0.1/db")
