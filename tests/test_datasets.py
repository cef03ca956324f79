"""Dataset adapters against the real data: counts equal the SOURCE.md figures,
minus the exclusions docs/workload.md documents; overlaps are found; the
generic JSONL adapter follows its field mapping. No tokenization here."""

import json
import statistics
from collections import Counter
from pathlib import Path

import pytest

from core.config import DatasetSpec, LengthControl
from workload.builder import read_datasets, tag_vocabulary
from workload.datasets import BUILT_IN, DatasetError, Item, load_items

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "own-data.jsonl"

# Record counts from each folder's SOURCE.md.
SOURCE_COUNTS = {
    "spec_bench": 480,
    "mt_bench": 160,  # 80 questions x 2 turns
    "gsm8k": 1319,
    "wmt22_de_en": 1984,
    "nq_open": 3610,
    "nq_rag": 2655,
    "xsum": 485,
    "qmsum": 281,  # 37 general + 244 specific queries
}


def with_datasets(config, *specs):
    config = config.model_copy(deep=True)
    config.workload.datasets = [DatasetSpec(**s) if isinstance(s, dict) else DatasetSpec(adapter=s) for s in specs]
    return config


@pytest.fixture(scope="module")
def items(default_config, data_dir):
    return {name: load_items(default_config, DatasetSpec(adapter=name)) for name in BUILT_IN}


@pytest.mark.parametrize("name", list(SOURCE_COUNTS))
def test_adapter_yields_every_record(items, name):
    assert len(items[name]) == SOURCE_COUNTS[name]


@pytest.mark.parametrize("name", list(SOURCE_COUNTS))
def test_every_prompt_is_chat_ending_with_the_user(items, name):
    for item in items[name]:
        assert isinstance(item, Item)
        assert item.messages and item.messages[-1]["role"] == "user" and item.messages[-1]["content"].strip()
        assert all(m["role"] in ("user", "assistant") for m in item.messages)
    assert len({(i.task, i.source_id) for i in items[name]}) == len(items[name])  # ids unique


def test_spec_bench_has_its_six_tasks_of_80(items):
    assert Counter(i.task for i in items["spec_bench"]) == {
        "spec_bench_mt": 80, "spec_bench_translation": 80, "spec_bench_summarization": 80,
        "spec_bench_qa": 80, "spec_bench_math": 80, "spec_bench_rag": 80}
    # SOURCE.md: 359 records carry a reference; one of them is empty, so it gives no length
    assert sum(i.reference is not None for i in items["spec_bench"]) == 358
    assert not any(i.reference for i in items["spec_bench"] if i.task == "spec_bench_qa")


def test_mt_bench_second_turn_carries_the_first_as_context(items):
    by_id = {i.source_id: i for i in items["mt_bench"]}
    first, second = by_id["81.t1"], by_id["81.t2"]
    assert len(first.messages) == 1 and [m["role"] for m in second.messages] == ["user", "assistant", "user"]
    assert second.messages[0] == first.messages[0]
    assert second.messages[1]["content"] == first.reference  # the first answer is the first turn's reference
    assert second.group == first.group and second.key != first.key


def test_adapters_read_the_fields_source_md_describes(items):
    # SOURCE.md character medians of the raw fields, recovered from the prompts
    gsm8k = [len(i.messages[0]["content"]) for i in items["gsm8k"]]
    assert statistics.median_low(gsm8k) == 222
    wmt = [len(i.messages[0]["content"].removeprefix("Translate German to English: ")) for i in items["wmt22_de_en"]]
    assert statistics.median_low(wmt) == 87
    assert statistics.median_low([len(i.reference) for i in items["xsum"]]) == 108
    assert statistics.median_low([len(i.reference) for i in items["qmsum"]]) == 367


def test_documented_duplicates_within_a_dataset(default_config, data_dir):
    _, report = read_datasets(with_datasets(default_config, *SOURCE_COUNTS))
    duplicates_within = {d["adapter"]: d["duplicates_of"].get(d["adapter"], 0) for d in report}
    # docs/workload.md: WMT22 repeats 6 source lines; no other dataset repeats a prompt
    assert duplicates_within == {name: 6 if name == "wmt22_de_en" else 0 for name in SOURCE_COUNTS}


def test_documented_overlaps_are_dropped_once(default_config, data_dir):
    kept, report = read_datasets(with_datasets(default_config, *SOURCE_COUNTS))
    by_adapter = {d["adapter"]: d for d in report}
    assert by_adapter["mt_bench"]["duplicates_of"] == {"spec_bench": 80}  # MT-Bench first turns
    assert by_adapter["gsm8k"]["duplicates_of"] == {"spec_bench": 80}
    assert by_adapter["nq_open"]["duplicates_of"] == {"spec_bench": 43}
    assert sum(d["kept"] for d in report) == sum(SOURCE_COUNTS.values()) - 80 - 80 - 43 - 6
    assert len(kept) == sum(d["kept"] for d in report)
    assert len({item.key for item, _ in kept}) == len(kept)  # no prompt twice


def test_dataset_order_decides_which_copy_is_kept(default_config, data_dir):
    kept, report = read_datasets(with_datasets(default_config, "gsm8k", "spec_bench"))
    assert report[1]["duplicates_of"] == {"gsm8k": 80}
    assert Counter(item.task for item, _ in kept)["spec_bench_math"] == 0


def test_related_prompts_share_a_split_group(items):
    open_groups = {i.group for i in items["nq_open"]}
    rag = items["nq_rag"]
    shared = [i for i in rag if i.group in open_groups]
    assert len(shared) > 2000  # the oracle set's questions come from NQ-open dev
    assert not {i.key for i in rag} & {i.key for i in items["nq_open"]}  # different prompts all the same
    meetings = Counter(i.group for i in items["qmsum"])
    assert len(meetings) == 35 and sum(meetings.values()) == 281


def test_task_rename_and_limit(default_config, data_dir):
    items = load_items(default_config, DatasetSpec(adapter="gsm8k", task="math", limit=5))
    assert [i.task for i in items] == ["math"] * 5
    with pytest.raises(DatasetError, match="several tasks"):
        load_items(default_config, DatasetSpec(adapter="spec_bench", task="mixed"))


def test_missing_folder_and_unknown_adapter_are_reported(default_config, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_items(default_config, DatasetSpec(adapter="gsm8k", path=str(tmp_path / "nowhere")))
    with pytest.raises(DatasetError, match="unknown adapter"):
        load_items(default_config, DatasetSpec(adapter="squad"))


# --- the generic JSONL adapter -----------------------------------------------------

EXAMPLE_FIELDS = {"prompt": "question.text", "reference": "answer", "id": "ticket", "task": "desk"}


def test_jsonl_example_follows_the_mapping(default_config):
    items = load_items(default_config, DatasetSpec(adapter="jsonl", path=str(EXAMPLE), fields=EXAMPLE_FIELDS))
    records = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    assert len(items) == len(records) == 10
    for item, record in zip(items, records):
        assert item.messages == [{"role": "user", "content": record["question"]["text"]}]
        assert item.reference == record.get("answer")
        assert item.task == record["desk"] and item.source_id == record["ticket"]
        assert item.dataset == "jsonl:own-data.jsonl"


def test_jsonl_messages_and_one_task_for_the_file(default_config, tmp_path):
    path = tmp_path / "chats.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    path.write_text(json.dumps({"conv": chat, "gold": "Blue."}) + "\n" + json.dumps({"conv": chat[:2]}) + "\n")
    items = load_items(default_config, DatasetSpec(adapter="jsonl", path=str(path), task="chat",
                                                   fields={"messages": "conv", "reference": "gold"}))
    assert [i.messages for i in items] == [chat, chat[:2]]
    assert [i.source_id for i in items] == ["1", "2"] and [i.reference for i in items] == ["Blue.", None]


@pytest.mark.parametrize("fields, task, lines, message", [
    ({"prompt": "q"}, None, ['{"q": "x"}'], "needs `task:`"),
    ({"prompt": "q", "messages": "m"}, "t", ['{"q": "x"}'], "exactly one of"),
    ({"prompt": "q", "answer": "a"}, "t", ['{"q": "x"}'], "unknown"),
    ({"prompt": "q"}, "t", ['{"p": "x"}'], "missing or not a non-empty string"),
    ({"prompt": "q"}, "t", ['{"q": "x"', ], "not JSON"),
    ({"messages": "m"}, "t", ['{"m": [{"role": "assistant", "content": "x"}]}'], "last message"),
    ({"prompt": "q", "task": "k"}, None, ['{"q": "x", "k": "Bad Task"}'], "task name"),
])
def test_jsonl_mistakes_name_the_line_and_field(default_config, tmp_path, fields, task, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_items(default_config, DatasetSpec(adapter="jsonl", path=str(path), task=task, fields=fields))


# --- the label vocabulary ---------------------------------------------------------

def test_tag_vocabulary_lists_every_task_and_stratum(default_config, data_dir):
    config = with_datasets(default_config, "spec_bench", "gsm8k",
                           {"adapter": "jsonl", "path": str(EXAMPLE), "fields": EXAMPLE_FIELDS})
    config.workload.controls = [LengthControl(task="gsm8k", like="spec_bench_qa")]
    config.workload.prompt_strata = [0, 64, 256]
    config.workload.output_strata = [0, 32]
    vocab = tag_vocabulary(config)
    assert vocab["task"] == ["spec_bench_mt", "spec_bench_translation", "spec_bench_summarization", "spec_bench_qa",
                             "spec_bench_math", "spec_bench_rag", "gsm8k", "conversion", "cooking",
                             "gsm8k-like-spec_bench_qa"]
    assert vocab["stratum"] == ["p0-64.o0-32", "p0-64.o32+", "p64-256.o0-32", "p64-256.o32+",
                                "p256+.o0-32", "p256+.o32+"]


def test_a_missing_data_dir_is_one_clear_line_from_the_commands(tmp_path, monkeypatch, capsys, target_dir):
    from specdrift.cli import main
    from core.config import load_config

    monkeypatch.setenv("SPECDRIFT_DATA_DIR", str(tmp_path / "no-such-data"))
    config = Path(__file__).resolve().parent.parent / "experiments" / "smoke.yaml"
    with pytest.raises(DatasetError, match="data_dir .*no-such-data does not exist.*SPECDRIFT_DATA_DIR"):
        load_items(load_config(config), DatasetSpec(adapter="gsm8k"))
    # `run` reaches the datasets after preparing the (already prepared) target: one line, no traceback.
    capsys.readouterr()
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("specdrift run: data_dir ") and "Traceback" not in err and err.count("\n") == 1
