"""The record store: schema, batching off the event loop, failures that stay
contained, reading back, and `specdrift records export`."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import sqlite3

import pyarrow.parquet as pq
import pytest

from core.contracts import RECORD_COLUMNS as COLUMNS
from core.contracts import read_records
from service.records import RecordStore, RecordStoreError, export_records
import service.records as records_module
from specdrift.cli import main


def record(request_id: str, run_id: str = "run-1", **fields) -> dict:
    return {"request_id": request_id, "run_id": run_id, "arm": "baseline", "status": "ok", "t_start": 1.0,
            "itl_json": "[0.1, 0.2]", "completion_tokens": 2, "e2e_s": 0.5, **fields}


def test_the_docstring_table_lists_exactly_the_columns():
    documented = re.findall(r"^\| (\w+) \| (\w+) \|", records_module.__doc__, re.MULTILINE)
    assert [(name, kind) for name, kind in documented if name != "column"] == [
        (name, kind.split()[0]) for name, kind in COLUMNS.items()]


def test_store_commits_batches_and_reads_back_by_run(tmp_path):
    path = tmp_path / "records.sqlite"
    store = RecordStore(path)

    async def write_many():
        await asyncio.gather(*(store.write(record(f"r{n}", t_start=float(n))) for n in range(50)))

    asyncio.run(write_many())
    store.write_nowait(record("other", run_id="run-2"))
    store.close()
    assert [r["request_id"] for r in read_records(path, "run-1")] == [f"r{n}" for n in range(50)]
    assert len(read_records(path)) == 51 and store.written == 51
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_bad_row_does_not_sink_its_batch(tmp_path):
    path = tmp_path / "records.sqlite"
    store = RecordStore(path)

    async def write_with_a_duplicate():
        return await asyncio.gather(store.write(record("same")), store.write(record("same")),
                                    store.write(record("fine")), return_exceptions=True)

    outcomes = asyncio.run(write_with_a_duplicate())
    store.close()
    assert sum(isinstance(o, RecordStoreError) for o in outcomes) == 1
    assert sorted(r["request_id"] for r in read_records(path)) == ["fine", "same"]
    assert (store.written, store.failed) == (2, 1)


def test_an_older_store_gains_new_columns(tmp_path):
    path = tmp_path / "records.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE requests (request_id TEXT PRIMARY KEY, run_id TEXT)")
        conn.execute("INSERT INTO requests VALUES ('old', 'run-1')")
    store = RecordStore(path)
    asyncio.run(store.write(record("new")))
    store.close()
    assert [(r["request_id"], r["arm"]) for r in read_records(path)] == [("old", None), ("new", "baseline")]


def test_unwritable_store_fails_at_open(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RecordStoreError, match="cannot open"):
        RecordStore(tmp_path / "file" / "records.sqlite")


def test_reading_a_missing_store_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no record store"):
        read_records(tmp_path / "absent.sqlite")


def test_export_formats_carry_every_column(tmp_path):
    rows = [record("a", output_text="hé,\n\"quoted\""), record("b", spec_drafts=3)]
    out = io.BytesIO()
    export_records(rows, "jsonl", out)
    assert [json.loads(line)["request_id"] for line in out.getvalue().splitlines()] == ["a", "b"]
    out = io.BytesIO()
    export_records(rows, "csv", out)
    parsed = list(csv.DictReader(io.StringIO(out.getvalue().decode())))
    assert list(parsed[0]) == list(COLUMNS) and parsed[0]["output_text"] == "hé,\n\"quoted\""
    out = io.BytesIO()
    export_records(rows, "parquet", out)
    table = pq.read_table(io.BytesIO(out.getvalue()))
    assert table.column_names == list(COLUMNS) and table.column("spec_drafts").to_pylist() == [None, 3]


@pytest.fixture
def store_with_two_runs(tmp_path):
    path = tmp_path / "records.sqlite"
    store = RecordStore(path)
    for n in range(3):
        store.write_nowait(record(f"x{n}", run_id="run-x", t_start=float(n)))
    store.write_nowait(record("y0", run_id="run-y"))
    store.close()
    return path


def test_cli_export_to_stdout_and_to_a_file(store_with_two_runs, tmp_path, capsysbinary, repo_root):
    config = str(repo_root / "experiments" / "cpu-default.yaml")
    assert main(["records", "export", "run-x", "--config", config, "--format", "jsonl",
                 "--records", str(store_with_two_runs)]) == 0
    lines = capsysbinary.readouterr().out.splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["x0", "x1", "x2"]

    out = tmp_path / "run-x.parquet"
    assert main(["records", "export", "run-x", "--config", config, "--format", "parquet", "--out", str(out),
                 "--records", str(store_with_two_runs)]) == 0
    assert pq.read_table(out).num_rows == 3

    assert main(["records", "export", "all", "--config", config, "--format", "csv",
                 "--records", str(store_with_two_runs)]) == 0
    assert len(list(csv.DictReader(io.StringIO(capsysbinary.readouterr().out.decode())))) == 4


def test_cli_export_of_an_unknown_run_fails(store_with_two_runs, capsys, repo_root):
    config = str(repo_root / "experiments" / "cpu-default.yaml")
    assert main(["records", "export", "nope", "--config", config, "--format", "csv",
                 "--records", str(store_with_two_runs)]) == 1
    assert "no records of run 'nope'" in capsys.readouterr().err
