"""Drafter building, distillation and cards, on the real target (no servers).

The distillation test pre-fills the response cache with the target's greedy
responses computed by transformers (the vLLM generation step is exercised by
tests/test_drafters_e2e.py), then runs the real `distill` with the reduced
recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from core.config import ConfigError, DrafterConfig, TargetConfig
from drafters.build import distill, response_cache, stale_drafters
from drafters.card import CARD_FILE, HISTOGRAM_EDGES, card_problem, read_card
from drafters.data import prompt_ids, select_prompts
from drafters.model import drafter_from_target, save_drafter
from drafters.recipe import REDUCED_RECIPE, Recipe, recipe_for
from drafters.responses import prompt_sha
from drafters.vocab import VocabMap, choose_vocabulary, load_target_ids

TEXTS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
         "Translate German to English: Das ist ein kleines Haus am See.",
         "The quick brown fox jumps over the lazy dog. " * 3]


@pytest.fixture(scope="module")
def tokenizer(target_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(target_dir)


@pytest.fixture(scope="module")
def target_model(target_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


def test_drafter_from_target_keeps_layers_vocabulary_tokenizer_and_template(target_dir, tokenizer, target_model,
                                                                           tmp_path):
    streams = [tokenizer(t)["input_ids"] for t in TEXTS]
    target_ids = choose_vocabulary(tokenizer, 1024, streams)
    assert target_ids == sorted(target_ids) and len(target_ids) == 1024
    assert {0, 1, 2} <= set(target_ids) and all(t in target_ids for s in streams for t in s)

    drafter = drafter_from_target(target_dir, 2, target_ids)
    save_drafter(drafter, tmp_path, target_dir, target_ids, "bfloat16")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 1024
    assert config["hidden_size"] == target_model.config.hidden_size
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # special tokens keep their ids
    assert load_target_ids(tmp_path) == target_ids

    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    embedding = saved.get_input_embeddings().weight
    assert embedding.shape == (1024, 576)
    assert saved.lm_head.weight.data_ptr() == embedding.data_ptr()
    expected_rows = target_model.get_input_embeddings().weight[torch.tensor(target_ids)].to(torch.bfloat16)
    assert torch.equal(embedding.to(torch.bfloat16), expected_rows)
    assert torch.equal(saved.model.layers[1].mlp.down_proj.weight.to(torch.bfloat16),
                       target_model.model.layers[1].mlp.down_proj.weight.to(torch.bfloat16))

    draft_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(draft_tokenizer) == 1024
    assert draft_tokenizer.chat_template == tokenizer.chat_template
    assert draft_tokenizer.convert_ids_to_tokens(list(range(1024))) == tokenizer.convert_ids_to_tokens(target_ids)
    # Text made of kept tokens tokenizes to the same tokens in both vocabularies.
    for text, stream in zip(TEXTS, streams):
        assert [target_ids[i] for i in draft_tokenizer(text)["input_ids"]] == stream
    messages = [{"role": "user", "content": TEXTS[0]}]
    assert (draft_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_full_vocabulary_drafter_shares_the_target_tokenizer(target_dir, tokenizer, tmp_path):
    drafter = drafter_from_target(target_dir, 1, None)
    save_drafter(drafter, tmp_path, target_dir, None, "bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == len(tokenizer)
    assert (tmp_path / "tokenizer.json").read_text() == (target_dir / "tokenizer.json").read_text()
    assert load_target_ids(tmp_path) is None


def test_vocab_map_sends_unknown_inputs_to_unk_and_marks_unknown_outputs():
    vocab = VocabMap(10, [0, 1, 2, 7], unk_id=0)
    assert vocab.inputs(torch.tensor([7, 5, 2])).tolist() == [3, 0, 2]
    assert vocab.outputs(torch.tensor([7, 5, 2])).tolist() == [3, -1, 2]


def test_recipe_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"drafters\.generic\.recipe\.learning_rate"):
        recipe_for(DrafterConfig(name="generic", recipe={"learning_rate": -1}))
    with pytest.raises(ConfigError, match=r"drafters\.generic\.recipe\.lerning_rate"):
        recipe_for(DrafterConfig(name="generic", recipe={"lerning_rate": 1e-3}))
    with pytest.raises(ConfigError, match=r"drafters\.ft\.recipe\.layers"):
        recipe_for(DrafterConfig(name="ft", init="generic", recipe={"layers": 3}))
    assert recipe_for(DrafterConfig(name="ft", init="generic", recipe={"learning_rate": 1e-3})).layers == 2


def _rows(tokenizer, data_rows: list[dict]) -> list[dict]:
    for row in data_rows:
        row["prompt_tokens"] = len(prompt_ids(tokenizer, row["messages"]))
    return data_rows


def _workload_rows(data_dir: Path, n_per_task: int) -> list[dict]:
    """A small real train split: GSM8K questions and WMT22 sources."""
    from workload import templates

    rows = []
    with open(data_dir / "gsm8k" / "test.jsonl") as f:
        for i, line in zip(range(n_per_task), f):
            question = json.loads(line)["question"]
            rows.append({"id": f"gsm8k:{i}", "task": "gsm8k", "split": "train", "max_tokens": 24,
                         "messages": [{"role": "user", "content": templates.GSM8K.format(question=question)}]})
    sources = (data_dir / "wmt22_de_en" / "generaltest2022.de-en.src.de").read_text().splitlines()
    for i, source in enumerate(sources[:n_per_task]):
        rows.append({"id": f"wmt22_de_en:{i}", "task": "wmt22_de_en", "split": "train", "max_tokens": 24,
                     "messages": [{"role": "user", "content": templates.WMT22_DE_EN.format(source=source)}]})
    rows.append({**rows[0], "id": "gsm8k:eval", "split": "eval"})  # must never be trained on
    return rows


def test_every_seed_draws_the_same_capped_prompts_and_its_own_holdout(tokenizer, data_dir):
    rows = _workload_rows(data_dir, 40)

    def chosen(seed: int, cap: int):
        recipe = Recipe(max_prompts_per_task=cap, seed=seed, holdout_fraction=0.3)
        return select_prompts(rows, ["gsm8k", "wmt22_de_en"], recipe, tokenizer)

    seed0, seed1 = chosen(0, 25), chosen(1, 25)
    assert sorted(p.row_id for p in seed0) == sorted(p.row_id for p in seed1)
    assert len(seed0) == 50 and "gsm8k:eval" not in {p.row_id for p in seed0}
    assert {p.row_id for p in seed0 if p.holdout} != {p.row_id for p in seed1 if p.holdout}
    # A smaller cap takes a part of the larger one's subset, so its responses are cached already.
    assert {p.row_id for p in chosen(1, 10)} < {p.row_id for p in seed0}


def _fill_response_cache(config, rows, tokenizer, model, top_k: int) -> Path:
    """The target's greedy responses and top-k, computed with transformers, in the distill cache."""
    cache = response_cache(config, top_k)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "w") as f:
        for row in rows:
            ids = prompt_ids(tokenizer, row["messages"])
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=row["max_tokens"], do_sample=False)
                logits = model(out).logits[0, len(ids) - 1:-1]
            output = out[0, len(ids):].tolist()
            top = torch.log_softmax(logits, -1).topk(top_k, dim=-1)
            f.write(json.dumps({"id": row["id"], "prompt_sha": prompt_sha(ids), "prompt_ids": ids,
                                "output_ids": output, "topk_ids": top.indices.tolist(),
                                "topk_logprobs": top.values.tolist()}) + "\n")
    return cache


def _drafter_config(cpu_config, target_dir: Path, cache: Path, recipe: dict):
    config = cpu_config.model_copy(deep=True)
    config.cache_dir = str(cache)
    config.target = TargetConfig(name="smollm2-135m-instruct", source="path", path=str(target_dir), dtype="bfloat16")
    config.drafters = [DrafterConfig(name="generic", init="target", tasks="all", recipe=recipe),
                       DrafterConfig(name="narrow", init="generic", tasks=["gsm8k"],
                                     recipe={k: v for k, v in recipe.items() if k not in ("layers", "vocab_size")})]
    config.arms = [config.arms[0]]
    return config


def test_tiny_distillation_lowers_loss_writes_a_complete_card_and_is_reused(
        cpu_config, target_dir, data_dir, tokenizer, target_model, tmp_path):
    recipe = {**REDUCED_RECIPE, "max_steps": 25, "eval_every_steps": 25,
              "learning_rate": 3e-3, "warmup_steps": 2}
    config = _drafter_config(cpu_config, target_dir, tmp_path / "cache", recipe)
    rows = _rows(tokenizer, _workload_rows(data_dir, 5))
    _fill_response_cache(config, rows, tokenizer, target_model, Recipe.model_validate(recipe).top_k)
    messages = []

    out = distill(config, "narrow", rows, "test-workload", tmp_path / "logs", progress=messages.append)

    generic = read_card(out.parent / "generic")
    card = read_card(out)
    for c in (generic, card):
        assert c["training"]["loss_last"] < c["training"]["loss_first"]
        assert set(c) >= {"name", "inputs_hash", "base", "target", "recipe", "shape", "training_data",
                          "generation", "training", "build_seconds", "files", "software", "created"}
    assert generic["training"]["holdout_after"]["top1_agreement"] > generic["training"]["holdout_before"]["top1_agreement"]
    assert card["base"] == {"kind": "drafter", "name": "generic", "path": str(out.parent / "generic"),
                            "inputs_hash": generic["inputs_hash"]}
    assert generic["shape"] == {"layers": 1, "hidden_size": 576, "vocab_size": 4096, "trimmed_vocabulary": True}
    assert card["shape"] == generic["shape"]

    data = generic["training_data"]
    assert data["tasks"] == ["gsm8k", "wmt22_de_en"] and data["counts"] == {"gsm8k": 5, "wmt22_de_en": 5}
    assert card["training_data"]["counts"] == {"gsm8k": 5}
    lengths = data["lengths"]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert sorted(lengths["prompt"]) == sorted(r["prompt_tokens"] for r in train_rows)
    assert sorted(lengths["by_task"]["gsm8k"]["prompt"]) == sorted(
        r["prompt_tokens"] for r in train_rows if r["task"] == "gsm8k")
    assert len(lengths["output"]) == 10 and all(0 < n <= 24 for n in lengths["output"])
    assert data["histograms"]["bin_edges"] == HISTOGRAM_EDGES
    assert sum(data["histograms"]["prompt"]["all"]) == 10 and sum(data["histograms"]["output"]["gsm8k"]) == 5
    assert set(card["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "target_token_ids.json"}
    assert not (out / "checkpoint.pt").exists()

    # Unchanged inputs: reused, nothing rebuilt.
    messages.clear()
    assert distill(config, "narrow", rows, "test-workload", tmp_path / "logs", progress=messages.append) == out
    assert all("up to date" in m for m in messages), messages
    assert read_card(out)["created"] == card["created"]

    # The cheap check agrees: nothing stale for this workload, everything for another one.
    assert stale_drafters(config, "test-workload") == []
    assert stale_drafters(config, "another-workload") == ["generic", "narrow"]
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    assert stale_drafters(config, "test-workload") == ["narrow"]


def test_building_several_drafters_generates_their_responses_in_one_vllm_run(
        cpu_config, target_dir, data_dir, tokenizer, tmp_path, monkeypatch):
    from drafters import build as build_module

    config = _drafter_config(cpu_config, target_dir, tmp_path / "cache", REDUCED_RECIPE)
    config.drafters.append(DrafterConfig(name="other", init="generic", tasks=["wmt22_de_en"],
                                         recipe={**config.drafter("narrow").recipe, "seed": 1}))
    rows = _rows(tokenizer, _workload_rows(data_dir, 6))
    runs = []

    class Generated(Exception):
        pass

    def generate(requests, cache_file, *args, **kwargs):
        runs.append((sorted(r.id for r in requests), cache_file, args[-1].name))
        raise Generated  # the rest of the build is the tiny distillation's test

    monkeypatch.setattr(build_module, "generate_responses", generate)
    with pytest.raises(Generated):
        build_module.build_drafters(config, ["narrow", "other"], rows, "test-workload", tmp_path / "logs",
                                    progress=lambda _: None)
    train_ids = sorted(r["id"] for r in rows if r["split"] == "train")
    top_k = REDUCED_RECIPE["top_k"]
    assert runs == [(train_ids, response_cache(config, top_k), "responses-drafters.log")]


def test_card_hashes_detect_changed_inputs_and_files(cpu_config, target_dir, tmp_path):
    from drafters.card import inputs_hash, write_card

    directory = tmp_path / "d"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"weights")
    parts = {"recipe": Recipe().model_dump(mode="json"), "prompts": [["gsm8k:1", "abc", 128, False]]}
    write_card(directory, {"name": "d", "inputs_hash": inputs_hash(parts)})
    assert (directory / CARD_FILE).exists()
    assert card_problem(directory, inputs_hash(parts)) is None

    changed_recipe = {**parts, "recipe": Recipe(learning_rate=1e-4).model_dump(mode="json")}
    changed_prompt = {**parts, "prompts": [["gsm8k:1", "abd", 128, False]]}
    for changed in (changed_recipe, changed_prompt):
        assert inputs_hash(changed) != inputs_hash(parts)
        assert "inputs changed" in card_problem(directory, inputs_hash(changed))

    (directory / "model.safetensors").write_bytes(b"weightz")
    assert "files do not match" in card_problem(directory, inputs_hash(parts))


def test_response_generation_progress_reaches_the_console_and_the_engine_log_stays_in_its_file(tmp_path):
    from core.processes import start_child
    from drafters.responses import PROGRESS_PREFIX, follow_progress

    script = (f"import time\nprint('INFO engine line', flush=True)\n"
              f"print('{PROGRESS_PREFIX}64/128 prompts', flush=True)\ntime.sleep(0.3)\n"
              f"print('WARNING engine line', flush=True)\nprint('{PROGRESS_PREFIX}128/128 prompts')\n")
    child = start_child("fake generator", [sys.executable, "-c", script], tmp_path / "responses.log")
    shown = []
    follow_progress(child, shown.append, poll_s=0.1)
    assert shown == [f"{PROGRESS_PREFIX}64/128 prompts", f"{PROGRESS_PREFIX}128/128 prompts"]
    assert "INFO engine line" in (tmp_path / "responses.log").read_text()


def test_a_training_example_keeps_the_outputs_start_and_the_prompts_end_within_the_window():
    from core.contracts import training_window
    from drafters.train import make_example

    vocab = VocabMap(1000, None, unk_id=0)
    for window in (32, 40):
        for prompt_len in (0, 1, 5, 31, 32, 60):
            for output_len in (0, 1, 10, 31, 32, 50):
                prompt, output = list(range(100, 100 + prompt_len)), list(range(500, 500 + output_len))
                response = {"prompt_ids": prompt, "output_ids": output, "topk_ids": [[t] for t in output],
                            "topk_logprobs": [[0.0] for _ in output]}
                example = make_example("t", response, vocab, window)
                kept_prompt, kept_output = training_window(prompt_len, output_len, window)
                if output_len == 0:
                    assert example is None and kept_output == 0
                    continue
                tokens = prompt[len(prompt) - kept_prompt:] + output[:kept_output]
                assert example.input_ids.tolist() == tokens[:-1]
                assert kept_prompt + kept_output <= window and kept_output == min(output_len, window - 1)
                assert example.first_scored == kept_prompt - 1 and len(example.topk_ids) == kept_output


def _tiny_training(seed: int = 0):
    """A tiny randomly initialised Llama and a few examples: train()'s own loop, in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from drafters.train import Example

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    generator = torch.Generator().manual_seed(seed)

    def example(length: int) -> Example:
        ids = torch.randint(1, 64, (length,), generator=generator)
        scored = length // 2
        topk = torch.randint(1, 64, (length - scored, 2), generator=generator)
        return Example("t", ids, scored - 1, topk, torch.log_softmax(torch.randn(length - scored, 2), -1))

    return model, [example(6 + i % 7) for i in range(24)], [example(8) for _ in range(3)]


def test_training_evaluates_each_step_once_and_its_last_step_always(tmp_path):
    from drafters.train import train

    for max_steps, evaluated in ((6, [0, 3, 6]), (8, [0, 3, 6, 8])):
        recipe = Recipe.model_validate({**REDUCED_RECIPE, "max_steps": max_steps, "eval_every_steps": 3,
                                        "batch_tokens": 64, "warmup_steps": 2})
        model, examples, holdout = _tiny_training()
        record = train(model, examples, holdout, recipe, 0, tmp_path / f"{max_steps}.pt", progress=lambda m: None)
        assert [e["step"] for e in record["evaluations"]] == evaluated
        assert record["holdout_after"]["top1_agreement"] == record["evaluations"][-1]["top1_agreement"]


def test_training_is_counted_in_steps_and_a_resumed_build_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    from drafters.train import train

    recipe = Recipe.model_validate({**REDUCED_RECIPE, "max_steps": 8, "eval_every_steps": 3, "batch_tokens": 64,
                                    "warmup_steps": 2})
    model, examples, holdout = _tiny_training()
    whole = train(model, examples, holdout, recipe, 0, tmp_path / "whole.pt", progress=lambda m: None)
    assert whole["steps"] == 8 and whole["train_tokens"] > 0

    class Interrupted(Exception):
        pass

    real_save = torch.save

    def save_then_stop(obj, path):
        real_save(obj, path)
        raise Interrupted

    interrupted, examples_b, holdout_b = _tiny_training()
    monkeypatch.setattr(torch, "save", save_then_stop)
    with pytest.raises(Interrupted):  # right after the checkpoint at step 3, mid-epoch
        train(interrupted, examples_b, holdout_b, recipe, 0, tmp_path / "resumed.pt", progress=lambda m: None)
    monkeypatch.setattr(torch, "save", real_save)
    resumed, examples_c, holdout_c = _tiny_training()  # a new process: fresh weights, then the checkpoint
    record = train(resumed, examples_c, holdout_c, recipe, 0, tmp_path / "resumed.pt", progress=lambda m: None)
    assert record["steps"] == 8 and record["train_tokens"] == whole["train_tokens"]
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name

    by_tokens = Recipe.model_validate({**REDUCED_RECIPE, "max_steps": None, "max_train_tokens": 30,
                                       "eval_every_steps": 100, "batch_tokens": 64})
    model, examples, holdout = _tiny_training()
    record = train(model, examples, holdout, by_tokens, 0, tmp_path / "tokens.pt", progress=lambda m: None)
    assert record["train_tokens"] >= 30 and record["steps"] < 8


def test_a_recipe_has_a_step_or_token_budget_and_no_wall_clock_one():
    with pytest.raises(ConfigError, match="max_minutes is no longer a budget"):
        recipe_for(DrafterConfig(name="g", init="target", tasks="all", recipe={"max_minutes": 10}))
    with pytest.raises(ConfigError, match="needs a budget"):
        recipe_for(DrafterConfig(name="g", init="target", tasks="all",
                                 recipe={"max_steps": None, "max_train_tokens": None}))
    assert recipe_for(DrafterConfig(name="g", init="target", tasks="all", recipe={})).max_steps == 400
