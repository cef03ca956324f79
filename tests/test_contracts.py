"""The contracts every floor agrees on (core/contracts.py): tag headers, the
records reader, regime labels, strata order, the workload file, run files."""

import json
import sqlite3

import pytest

from core.config import LoadRegime
from core.contracts import (RECORD_COLUMNS, TAG_HEADERS, RunFiles, WorkloadFileError, read_records, read_workload,
                            regime_label, step_regime, stratum_key, tag_headers, workload_sidecar)
from service.tags import parse_tags


def test_a_client_s_tag_headers_are_what_the_gateway_parses():
    headers = tag_headers(run_id="r1", task="gsm8k", stratum="p64-256", prompt_id="gsm8k:7", regime="sequential")
    assert set(headers) == set(TAG_HEADERS.values())
    tags = parse_tags(headers)
    assert (tags.run_id, tags.task, tags.stratum, tags.prompt_id, tags.regime) == \
        ("r1", "gsm8k", "p64-256", "gsm8k:7", "sequential")


def test_regime_labels_for_regimes_and_sweep_steps():
    assert regime_label("concurrency", users=4) == "concurrency-4"
    assert regime_label("poisson", rate=0.5) == "poisson-0.5"
    assert step_regime("sweep", "concurrency-2", 3) == "sweep.concurrency-2"
    assert step_regime(None, "concurrency-2", 3) == "sweep.concurrency-2"
    assert step_regime("sweep", "concurrency-2", 1) == "sweep"
    assert step_regime(None, "poisson-1", 1) == "poisson-1"
    sweep = LoadRegime(kind="sweep", steps=[LoadRegime(kind="concurrency", users=1),
                                            LoadRegime(kind="poisson", rate=2)])
    assert sweep.step_labels() == ["sweep.concurrency-1", "sweep.poisson-2"]
    assert LoadRegime(kind="sweep", steps=[LoadRegime(kind="sequential")]).step_labels() == ["sweep"]
    assert LoadRegime(kind="concurrency", users=4).step_labels() == ["concurrency-4"]


def test_strata_sort_by_their_bounds():
    labels = ["p256-1024", "p1024+", "p0-64", "none", "p64-256.o32-128", "p64-256.o0-32"]
    assert sorted(labels, key=stratum_key) == ["p0-64", "p64-256.o0-32", "p64-256.o32-128", "p256-1024", "p1024+",
                                               "none"]


def test_records_reader_is_ordered_and_fills_columns_an_older_store_lacks(tmp_path):
    path = tmp_path / "records.sqlite"
    with pytest.raises(FileNotFoundError, match="no record store"):
        read_records(path)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE requests (request_id TEXT, run_id TEXT, t_start REAL, status TEXT)")
        conn.executemany("INSERT INTO requests VALUES (?, ?, ?, ?)",
                         [("b", "r", 2.0, "ok"), ("a", "r", 2.0, "ok"), ("c", "x", 1.0, "ok")])
    records = read_records(path, "r")
    assert [r["request_id"] for r in records] == ["a", "b"]
    assert set(records[0]) == set(RECORD_COLUMNS) and records[0]["tpot_s"] is None
    assert [r["request_id"] for r in read_records(path)] == ["c", "a", "b"]


def test_workload_reader_names_the_bad_line(tmp_path):
    path = tmp_path / "workload.jsonl"
    row = {"id": "t:1", "task": "t", "stratum": "p0-64", "messages": [], "max_tokens": 8, "split": "eval"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "split": "train", "id": "t:2"}) + "\n")
    assert [r["id"] for r in read_workload(path, split="train")] == ["t:2"]
    path.write_text(json.dumps(row) + "\n{not json\n")
    with pytest.raises(WorkloadFileError, match="workload.jsonl:2: not JSON"):
        read_workload(path)
    path.write_text(json.dumps({"id": "t:1"}) + "\n")
    with pytest.raises(WorkloadFileError, match=":1: missing max_tokens, messages, split, stratum, task"):
        read_workload(path)
    assert workload_sidecar(path, "build.json").name == "workload.build.json"


def test_run_files_name_the_run_directory(tmp_path):
    run = RunFiles(tmp_path)
    assert run.records == tmp_path / "records.sqlite" and run.workload == tmp_path / "workload.jsonl"
    assert run.workload_build == tmp_path / "workload.build.json"
    assert run.drafter_card("generic") == tmp_path / "drafters" / "generic" / "drafter_card.json"
