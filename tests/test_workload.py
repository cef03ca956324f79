"""Building workloads from the real data with the target's tokenizer:
lengths, strata, exclusions, splits, stratified sampling, the length-matched
control, the file and the CLI."""

import json
import random
import shutil
from collections import Counter, defaultdict

import pytest
from scipy import stats

from core.config import DatasetSpec, LengthControl
from core.contracts import read_workload, write_jsonl
from core.contracts import workload_sidecar as sidecar
from specdrift.cli import main
from workload import strata
from workload.builder import build, fingerprint, tag_vocabulary
from workload.lengths import PromptTokenizer
from workload.sampling import length_matched, split_of

# The control's KS statistic against the target task's prompt lengths stays
# below this (docs/workload.md). A random draw of 20 from the target itself
# would typically give about 0.19; quantile matching gives about 1/(2n).
CONTROL_KS_BOUND = 0.1


def small_config(config, **workload):
    config = config.model_copy(deep=True)
    config.workload.datasets = [DatasetSpec(adapter="gsm8k", max_tokens=128), DatasetSpec(adapter="wmt22_de_en", max_tokens=64),
                                DatasetSpec(adapter="nq_open", max_tokens=32), DatasetSpec(adapter="xsum", max_tokens=64)]
    config.workload.controls = [LengthControl(task="wmt22_de_en", like="gsm8k", n=20)]
    for key, value in workload.items():
        setattr(config.workload, key, value)
    return config


@pytest.fixture(scope="module")
def tokenizer(target_dir):
    return PromptTokenizer(target_dir)


@pytest.fixture(scope="module")
def built(default_config, data_dir, tokenizer):
    return build(small_config(default_config), tokenizer)


def eval_rows(rows):
    return [r for r in rows if r["split"] == "eval"]


def test_rows_have_the_documented_fields(built):
    for row in built.rows:
        assert set(row) >= {"id", "task", "stratum", "messages", "max_tokens", "prompt_tokens", "ref_tokens",
                            "split", "dataset", "source_id"}
        assert row["split"] in ("train", "eval")
    assert len({r["id"] for r in built.rows}) == len(built.rows)


def test_prompt_lengths_match_the_chat_template_tokenized_independently(built, tokenizer):
    sample = random.Random(1).sample(built.rows, 200)
    for row in sample:
        ids = tokenizer.tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]
        assert row["prompt_tokens"] == len(ids)


def test_reference_lengths_are_the_reference_text_alone(default_config, built, tokenizer):
    from workload.datasets import load_items

    references = {f"gsm8k:{i.source_id}": i.reference for i in load_items(default_config, DatasetSpec(adapter="gsm8k"))}
    for row in [r for r in built.rows if r["task"] == "gsm8k"][:100]:
        expected = len(tokenizer.tokenizer(references[row["id"]], add_special_tokens=False)["input_ids"])
        assert row["ref_tokens"] == expected


def test_every_row_is_in_the_stratum_of_its_prompt_length(built):
    edges = built.report["settings"]["prompt_strata"]
    for row in built.rows:
        assert row["stratum"] == strata.stratum(row["prompt_tokens"], edges)
        lo, _, hi = row["stratum"][1:].partition("-")
        assert int(lo.rstrip("+")) <= row["prompt_tokens"] and (not hi or row["prompt_tokens"] < int(hi))


def test_strata_labels_and_edges():
    edges = strata.log_spaced_edges(64, 4, 4)
    assert edges == [0, 64, 256, 1024] == list(strata.DEFAULT_PROMPT_EDGES)
    assert [strata.stratum(n, edges) for n in (0, 63, 64, 255, 256, 1023, 1024, 99_999)] == [
        "p0-64", "p0-64", "p64-256", "p64-256", "p256-1024", "p256-1024", "p1024+", "p1024+"]
    assert strata.stratum(100, edges, 40, [0, 32, 128]) == "p64-256.o32-128"
    assert strata.all_strata([0, 10], [0, 5]) == ["p0-10.o0-5", "p0-10.o5+", "p10+.o0-5", "p10+.o5+"]
    for bad in ([], [5, 10], [0, 10, 10]):
        with pytest.raises(strata.StrataError):
            strata.check_edges(bad)


def test_output_strata_use_the_reference_length_within_the_budget(default_config, data_dir, tokenizer):
    built = build(small_config(default_config, output_strata=[0, 16, 64], controls=[]), tokenizer)
    for row in built.rows:
        expected = min(row["ref_tokens"], row["max_tokens"]) if row["ref_tokens"] is not None else row["max_tokens"]
        assert row["stratum"] == strata.stratum(row["prompt_tokens"], [0, 64, 256, 1024], expected, [0, 16, 64])
    assert {r["stratum"] for r in built.rows} <= set(tag_vocabulary(small_config(default_config, output_strata=[0, 16, 64]))["stratum"])


def test_prompts_too_long_for_the_context_are_excluded_and_counted(default_config, data_dir, tokenizer):
    config = small_config(default_config, controls=[])
    config.target = config.target.model_copy(update={"max_model_len": 512})
    built = build(config, tokenizer)
    assert all(r["prompt_tokens"] + r["max_tokens"] <= 512 for r in built.rows)
    from workload.builder import read_datasets

    kept, _ = read_datasets(config)
    lengths = tokenizer.prompt_lengths([item.messages for item, _ in kept])
    expected = Counter(item.task for (item, budget), n in zip(kept, lengths) if n + budget > 512)
    assert built.report["too_long"] == dict(expected) and expected["xsum"] > 100


def test_splits_are_disjoint_by_prompt_and_by_group(built, default_config):
    text = lambda row: json.dumps(row["messages"])  # noqa: E731
    train = {text(r) for r in built.rows if r["split"] == "train"}
    evaluation = {text(r) for r in built.rows if r["split"] == "eval"}
    assert train and evaluation and not train & evaluation
    assert split_of("some group", 0, 0.5) == split_of("some group", 0, 0.5)


def test_same_seed_same_file_other_seed_other_split(default_config, data_dir, tokenizer, built, tmp_path):
    again = build(small_config(default_config), tokenizer)
    first, second = write_jsonl(tmp_path / "a.jsonl", built.rows), write_jsonl(tmp_path / "b.jsonl", again.rows)
    assert first.read_bytes() == second.read_bytes()
    other = build(small_config(default_config, seed=1), tokenizer)
    split = lambda rows: {r["id"]: r["split"] for r in rows if not r.get("control")}  # noqa: E731
    train_a = {i for i, s in split(built.rows).items() if s == "train"}
    train_b = {i for i, s in split(other.rows).items() if s == "train"}
    # Independent splits: a share f of A's train prompts is in B's train split too.
    fraction = default_config.workload.train_fraction
    assert abs(len(train_a & train_b) / len(train_a) - fraction) < 0.05


def test_train_fraction_is_respected(built, default_config):
    population = sum(len(v["prompt_tokens"]) for v in built.report["lengths"].values())
    train = sum(r["split"] == "train" for r in built.rows)
    assert abs(train / population - default_config.workload.train_fraction) < 0.03


def test_stratified_sample_takes_n_per_cell_and_reports_the_shortfall(built):
    n = built.report["settings"]["n_per_cell"]
    cells = Counter((r["task"], r["stratum"]) for r in eval_rows(built.rows) if not r.get("control"))
    shortfall = {(s["task"], s["stratum"]): s["got"] for s in built.report["shortfall"]}
    for cell, count in cells.items():
        assert count == shortfall.get(cell, n)
    for cell, got in shortfall.items():
        assert got < n and cells.get(cell, 0) == got
    # every populated cell is either full or in the shortfall list
    populated = {(t, strata.stratum(p, [0, 64, 256, 1024])) for t, v in built.report["lengths"].items()
                 for p in v["prompt_tokens"]}
    assert populated == set(cells) | set(shortfall)


def test_length_matched_control_follows_the_target_lengths(built):
    control = [r for r in built.rows if r.get("control")]
    assert len(control) == 20 and {r["task"] for r in control} == {"wmt22_de_en-like-gsm8k"}
    assert all(r["control"] == {"task": "wmt22_de_en", "like": "gsm8k"} and r["split"] == "eval" for r in control)
    target = built.report["lengths"]["gsm8k"]["prompt_tokens"]
    ks = stats.ks_2samp([r["prompt_tokens"] for r in control], target).statistic
    assert ks < CONTROL_KS_BOUND
    assert built.report["controls"][0]["ks_statistic"] == pytest.approx(ks, abs=1e-4)
    # the same number of wmt22 prompts drawn at random do not follow gsm8k's lengths
    wmt = built.report["lengths"]["wmt22_de_en"]["prompt_tokens"]
    assert stats.ks_2samp(random.Random(0).sample(wmt, 20), target).statistic > 3 * CONTROL_KS_BOUND
    # and a control prompt is not also one of the task's own eval rows
    own = {r["source_id"] for r in eval_rows(built.rows) if r["task"] == "wmt22_de_en"}
    assert not own & {r["source_id"] for r in control}


def test_length_matching_reports_a_target_it_cannot_reach():
    short = [(n, n) for n in range(10, 50)]
    matched = length_matched(short, list(range(200, 400)), 10, random.Random(0))
    assert len(matched.chosen) == 10 and matched.ks_statistic == 1.0


def test_eval_rows_come_first_and_interleave_tasks(built):
    splits = [r["split"] for r in built.rows]
    assert splits == sorted(splits)  # "eval" < "train"
    first = [r["task"] for r in eval_rows(built.rows)[:12]]
    assert len(set(first)) >= 3


def test_workload_file_round_trips_and_filters_by_split(built, tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", built.rows)
    assert read_workload(path) == built.rows
    assert read_workload(path, split="eval") == eval_rows(built.rows)


def test_cli_build_writes_the_file_summary_histogram_and_show_prints_it(repo_root, tmp_path, capsys, target_dir):
    out = tmp_path / "own.jsonl"
    assert main(["workload", "build", "--config", str(repo_root / "examples" / "own-data.yaml"), "--out", str(out)]) == 0
    rows = read_workload(out)
    assert len(rows) == 9  # 10 records; the eval half sampled 2 per cell, where available
    summary = sidecar(out, "summary.md").read_text()
    assert "| eval | conversion | p0-64 |" in summary and "dataset jsonl: read 10" in summary
    assert sidecar(out, "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert main(["workload", "show", str(out)]) == 0
    assert capsys.readouterr().out == summary


def test_eval_rows_per_task_cover_its_strata(built):
    strata_by_task = defaultdict(set)
    for r in eval_rows(built.rows):
        strata_by_task[r["task"]].add(r["stratum"])
    assert strata_by_task["xsum"] >= {"p64-256", "p256-1024", "p1024+"}
    assert strata_by_task["nq_open"] >= {"p0-64"}


def test_prompt_tokenizer_reads_a_hub_name_from_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not-a-real/model-name: no tokenizer in this directory or in the local HF cache"):
        PromptTokenizer("not-a-real/model-name")
    with pytest.raises(FileNotFoundError, match="no model directory"):
        PromptTokenizer(tmp_path / "missing")


def test_prompt_tokenizer_resolves_a_hub_name_from_a_mounted_cache(tmp_path, monkeypatch, target_dir):
    # The layout huggingface_hub writes: hub/models--ORG--NAME/{refs/main, snapshots/REV/...}
    repo = tmp_path / "hf" / "hub" / "models--someorg--smol-target"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "config.json"):
        if (target_dir / name).exists():
            shutil.copy(target_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert PromptTokenizer("someorg/smol-target").prompt_lengths([messages]) == \
        PromptTokenizer(target_dir).prompt_lengths([messages])


def test_fingerprint_follows_the_settings_and_the_data_files_only(default_config, target_dir, tmp_path):
    own = tmp_path / "own.jsonl"
    own.write_text('{"q": "What is two plus two?", "id": 1}\n')
    config = small_config(default_config)
    config.workload.datasets.append(DatasetSpec(adapter="jsonl", path=str(own), task="own", fields={"prompt": "q"}))
    first = fingerprint(config)
    assert fingerprint(config.model_copy(deep=True)) == first  # deterministic, nothing tokenized
    assert fingerprint(small_config(config, seed=1)) != first
    own.write_text('{"q": "What is two plus three?", "id": 1}\n')
    assert fingerprint(config) != first


def test_replay_set_holds_the_served_rows_and_more_eval_prompts_per_cell(default_config, tokenizer, built):
    per_cell = default_config.replay.per_cell
    served = {r["id"] for r in eval_rows(built.rows)}
    replay = built.replay_rows
    replay_ids = [r["id"] for r in replay]
    assert len(replay_ids) == len(set(replay_ids))
    assert served <= set(replay_ids)  # every served prompt is replayed, controls included
    assert all(r["split"] == "eval" for r in replay)
    cells = Counter((r["task"], r["stratum"]) for r in replay if "control" not in r)
    everything = small_config(default_config)
    everything.replay.per_cell = 10**6  # every eval prompt of every cell
    available = Counter((r["task"], r["stratum"]) for r in build(everything, tokenizer).replay_rows
                        if "control" not in r)
    for cell, n in cells.items():
        assert n == min(per_cell, available[cell]), cell  # full cells capped, small ones whole
    assert max(cells.values()) == per_cell
    assert built.report["replay"]["cells"] == {f"{t}|{s}": n for (t, s), n in sorted(
        Counter((r["task"], r["stratum"]) for r in replay).items())}


def test_replay_set_is_seeded_and_off_at_zero(default_config, data_dir, tokenizer, built):
    again = build(small_config(default_config), tokenizer)
    assert again.replay_rows == built.replay_rows
    config = small_config(default_config)
    config.replay.per_cell = 0
    assert build(config, tokenizer).replay_rows == []


def test_a_larger_replay_set_keeps_the_smaller_ones_prompts(default_config, tokenizer, built):
    config = small_config(default_config)
    config.replay.per_cell = default_config.replay.per_cell + 50
    larger = {r["id"] for r in build(config, tokenizer).replay_rows}
    assert {r["id"] for r in built.replay_rows} < larger  # cached target outputs stay useful
