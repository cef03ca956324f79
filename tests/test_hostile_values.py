"""Bad values in isolation, no servers: the record store that cannot die
(unstorable values, failing inserts, a writer that ends anyway, a commit whose
request was cancelled), and the checks of every value taken from an arm's
chunk (fixed cases and hypothesis)."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading

import hypothesis
import pytest
from hypothesis import strategies as st

import service.records as records_module
from core.contracts import read_records
from hostile_upstream import hostile_events
from service.assemble import Assembly
from service.measure import Measurement, RequestInfo, UpstreamInvalid
from service.records import RecordStore, RecordStoreError
from service.tags import Tags


def record(request_id: str, **fields) -> dict:
    return {"request_id": request_id, "run_id": "run-1", "arm": "a", "status": "ok", "t_start": 1.0, **fields}


class Failures:
    """Collects the store's on_failure reasons and on_stop calls."""

    def __init__(self):
        self.reasons: list[str] = []
        self.stops = 0

    def store(self, path) -> RecordStore:
        return RecordStore(path, on_failure=self.reasons.append, on_stop=self.stop)

    def stop(self) -> None:
        self.stops += 1


# --- the record store --------------------------------------------------------------

def test_unstorable_values_are_stored_as_far_as_they_can_be_and_marked(tmp_path):
    failures = Failures()
    store = failures.store(tmp_path / "r.sqlite")
    bad = record("bad", completion_tokens=2 ** 64, prompt_tokens=-2 ** 63 - 1, output_text="a\ud800b",
                 error=None, finish_reason={"why": "stop"}, spec_drafts="3", ttft_s=10 ** 400, temperature=10 ** 30)
    waited = record("waited", error="arm said \udfff")

    async def write_both():
        await asyncio.gather(store.write(bad), store.write(waited), store.write(record("fine")))

    asyncio.run(write_both())
    store.close()
    rows = {r["request_id"]: r for r in read_records(tmp_path / "r.sqlite")}
    assert rows["fine"]["status"] == "ok" and rows["fine"]["error"] is None
    stored = rows["bad"]
    assert stored["status"] == "upstream_invalid"
    assert (stored["completion_tokens"], stored["prompt_tokens"], stored["spec_drafts"], stored["ttft_s"]) == (
        None, None, None, None)
    assert stored["output_text"] == "a?b" and stored["finish_reason"] == "{'why': 'stop'}"
    assert stored["temperature"] == pytest.approx(1e30)  # a large integer is still a REAL
    assert stored["error"] == ("unstorable values in finish_reason, ttft_s, prompt_tokens, completion_tokens, "
                               "spec_drafts, output_text")
    assert rows["waited"]["status"] == "upstream_invalid" and rows["waited"]["error"].startswith("arm said ?; ")
    assert bad["status"] == "upstream_invalid"  # the caller's dict says so too, for the counters
    assert failures.reasons == ["unstorable_value", "unstorable_value"]
    assert (store.written, store.failed) == (3, 0)


def test_an_exception_on_one_record_is_contained(tmp_path, monkeypatch):
    """Any exception, not only sqlite3's: the others of the batch are stored, the writer goes on."""
    real_open = records_module._open

    class Flaky:
        def __init__(self, conn):
            self.conn = conn

        def executemany(self, sql, rows):
            rows = list(rows)
            if any(row[0] == "boom" for row in rows):
                raise MemoryError("test: no memory for this batch")
            return self.conn.executemany(sql, rows)

        def execute(self, sql, row):
            if row[0] == "boom":
                raise MemoryError("test: no memory for this row")
            return self.conn.execute(sql, row)

        def __enter__(self):
            return self.conn.__enter__()

        def __exit__(self, *exc):
            return self.conn.__exit__(*exc)

        def close(self):
            self.conn.close()

    monkeypatch.setattr(records_module, "_open", lambda path: Flaky(real_open(path)))
    failures = Failures()
    store = failures.store(tmp_path / "r.sqlite")

    async def write_all():
        return await asyncio.gather(store.write(record("boom")), store.write(record("a")), store.write(record("a")),
                                    return_exceptions=True)

    outcomes = asyncio.run(write_all())
    asyncio.run(store.write(record("later")))
    assert store.alive()
    store.close()
    assert [type(o) for o in outcomes] == [RecordStoreError, type(None), RecordStoreError]
    assert sorted(r["request_id"] for r in read_records(tmp_path / "r.sqlite")) == ["a", "later"]
    assert sorted(failures.reasons) == ["database", "unexpected"] and failures.stops == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_writer_that_ends_anyway_fails_every_write_at_once(tmp_path, monkeypatch):
    """Nothing waits forever: the record in hand, the queued ones and later ones fail, and on_stop is called."""
    entered, release = threading.Event(), threading.Event()

    def dying(self, conn, batch):
        entered.set()
        release.wait(5)
        raise SystemExit("test: the writer thread ends")  # not an Exception: past every guard

    monkeypatch.setattr(RecordStore, "_commit", dying)
    failures = Failures()
    store = failures.store(tmp_path / "r.sqlite")

    async def scenario():
        first = asyncio.ensure_future(store.write(record("first")))
        await asyncio.to_thread(entered.wait, 5)
        queued = asyncio.ensure_future(store.write(record("queued")))
        await asyncio.sleep(0)
        release.set()
        outcomes = await asyncio.wait_for(asyncio.gather(first, queued, return_exceptions=True), 5)
        with pytest.raises(RecordStoreError, match="not running"):
            await asyncio.wait_for(store.write(record("after")), 1)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert all(isinstance(o, RecordStoreError) for o in outcomes)
    assert not store.alive() and failures.stops == 1
    assert failures.reasons.count("writer_stopped") == 3
    store.write_nowait(record("nowait"))  # nobody waits: counted, no exception
    assert failures.reasons.count("writer_stopped") == 4
    store.close()  # returns at once


def test_a_commit_is_counted_even_when_its_request_was_cancelled_waiting(tmp_path):
    """A client that leaves between its last token and [DONE] cancels the wait, not the record or its count."""
    store = RecordStore(tmp_path / "r.sqlite")
    stored = []

    async def scenario():
        waiting = asyncio.ensure_future(store.write(record("late"), on_stored=lambda: stored.append("late")))
        await asyncio.sleep(0)
        waiting.cancel()
        store.write_nowait(record("nowait"), on_stored=lambda: stored.append("nowait"))
        for _ in range(200):
            if len(stored) == 2:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    store.close()
    assert stored == ["late", "nowait"]
    assert sorted(r["request_id"] for r in read_records(tmp_path / "r.sqlite")) == ["late", "nowait"]


def test_a_failing_on_stored_does_not_keep_the_request_waiting(tmp_path):
    store = RecordStore(tmp_path / "r.sqlite")

    async def scenario():
        await asyncio.wait_for(store.write(record("x"), on_stored=lambda: 1 / 0), 5)

    asyncio.run(scenario())
    store.close()
    assert len(read_records(tmp_path / "r.sqlite")) == 1


def test_an_unopenable_store_still_fails_at_open(tmp_path, monkeypatch):
    def broken(path):
        raise ValueError("test: not sqlite's kind of error")

    monkeypatch.setattr(records_module, "_open", broken)
    with pytest.raises(RecordStoreError, match="cannot open"):
        RecordStore(tmp_path / "r.sqlite")


# --- the checks at the upstream's edge ------------------------------------------------

def info(max_tokens: int = 16, endpoint: str = "completions") -> RequestInfo:
    return RequestInfo(request_id="r", arm="a", tags=Tags(), labels=("none", "none", "none"), endpoint=endpoint,
                       stream=True, max_tokens=max_tokens, temperature=None)


def text_chunk(**choice) -> dict:
    return {"choices": [{"index": 0, "text": " t", "token_ids": [1], **choice}]}


BAD_EVENTS = [
    ("usage.completion_tokens", {"usage": {"completion_tokens": 2 ** 64}}),
    ("usage.prompt_tokens", {"usage": {"prompt_tokens": -1}}),
    ("usage.total_tokens", {"usage": {"total_tokens": "5"}}),
    ("usage is", {"usage": [1]}),
    ("lone surrogate", text_chunk(text="\ud800")),
    ("lone surrogate", text_chunk(text="\ud800", token_ids=None)),
    ("finish_reason is", text_chunk(finish_reason={"a": 1})),
    ("finish_reason is", text_chunk(finish_reason=7)),
    ("longer than", text_chunk(finish_reason="x" * 65)),
    ("text is", text_chunk(text=5)),
    ("token_ids holds", text_chunk(token_ids=["1"])),
    ("token_ids holds", text_chunk(token_ids=[2 ** 63])),
    ("token_ids holds", text_chunk(token_ids=[True])),
    ("token_ids is", text_chunk(token_ids="12")),
    ("more token ids", text_chunk(token_ids=list(range(17)))),
    ("choices is", {"choices": "abc"}),
    ("choices is", {"choices": [text_chunk()["choices"][0]] * 2}),
    ("choices is", {"choices": [5]}),
    ("speculative_decoding.num_spec_steps", {"usage": {"completion_tokens": 1},
                                             "metrics": {"speculative_decoding": {"num_spec_steps": 2 ** 64}}}),
    ("acceptance_histogram[]", {"usage": {"completion_tokens": 1},
                                "metrics": {"speculative_decoding": {"acceptance_histogram": [1, -1]}}}),
    ("acceptance_histogram is", {"usage": {"completion_tokens": 1},
                                 "metrics": {"speculative_decoding": {"acceptance_histogram": [1] * 66}}}),
    ("speculative_decoding is", {"usage": {"completion_tokens": 1}, "metrics": {"speculative_decoding": 3}}),
    ("metrics is", {"usage": {"completion_tokens": 1}, "metrics": [1]}),
]


@pytest.mark.parametrize("message, event", BAD_EVENTS, ids=[b[0] for b in BAD_EVENTS])
def test_each_bad_value_is_refused_before_it_changes_anything(message, event):
    m = Measurement(info())
    m.take(m.t0 + 0.1, text_chunk(), chat=False)
    before = m.record("ok", 200)
    with pytest.raises(UpstreamInvalid, match=re.escape(message)):
        m.take(m.t0 + 0.2, event, chat=False)
    after = m.record("ok", 200)
    ignore = ("t_end", "e2e_s", "tpot_s")
    assert {k: v for k, v in after.items() if k not in ignore} == {k: v for k, v in before.items() if k not in ignore}


def test_chat_deltas_are_checked_too():
    m = Measurement(info(endpoint="chat"))
    for delta in ("hi", {"content": 5}, {"reasoning": "\ud800"}, {"tool_calls": "x"}):
        with pytest.raises(UpstreamInvalid):
            m.take(m.t0, {"choices": [{"index": 0, "delta": delta}]}, chat=True)
    m.take(m.t0 + 0.1, {"choices": [{"index": 0, "delta": {"content": "ok"}, "token_ids": [3]}]}, chat=True)
    assert m.record("ok", 200)["output_text"] == "ok"


@pytest.mark.parametrize("event", [{"choices": [{"index": 0, "text": "x"}]}, {}], ids=["text only", "empty"])
def test_an_endless_stream_is_bounded_by_max_tokens_too(event):
    m = Measurement(info(max_tokens=4))
    with pytest.raises(UpstreamInvalid, match="more events"):
        for n in range(1000):
            m.take(m.t0 + n, event, chat=False)
    assert n == 4 + 64


def test_assembly_refuses_odd_tool_calls_and_logprobs():
    assembly = Assembly("chat", "a", want_token_ids=False)
    for choice in ({"index": 0, "delta": {"tool_calls": [5]}}, {"index": 0, "delta": {"tool_calls": [
            {"index": "x"}]}}, {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": 5}}]}},
            {"index": 0, "logprobs": [1]}):
        with pytest.raises(UpstreamInvalid):
            assembly.add({"choices": [choice]})


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@hypothesis.given(data=st.data())
@hypothesis.settings(max_examples=300, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
def test_random_chunks_are_taken_or_refused_and_the_record_is_always_storable(chat, data):
    """Whatever the chunks: take() refuses with UpstreamInvalid or takes them; the assembly likewise; the
    record is built and needs no change to be stored; the assembled answer encodes or is refused."""
    m = Measurement(info(max_tokens=8, endpoint="chat" if chat else "completions"))
    assembly = Assembly("chat" if chat else "completions", "a", want_token_ids=data.draw(st.booleans()))
    for n, event in enumerate(data.draw(st.lists(hostile_events(chat), max_size=6))):
        if not isinstance(event, dict) or "error" in event:
            continue  # the relay handles these before take()
        try:
            m.take(m.t0 + n, event, chat)
            assembly.add(event)
        except UpstreamInvalid:
            break
    record = m.record("ok", 200)
    row, changed = records_module._row(record)
    assert changed == [], [list(record)[i] for i in changed]
    sqlite3.connect(":memory:").execute("SELECT ?", (json.dumps(row),))
    try:
        json.dumps(assembly.response(), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        pass  # the relay answers this as upstream_invalid
