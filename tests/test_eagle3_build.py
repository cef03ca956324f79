"""Building EAGLE-3 drafters with the real `distill` (drafters/build.py), on a tiny random Llama target
with its own small byte-level BPE tokenizer and hand-filled response cache (no vLLM server; the
target's responses are computed here with transformers): a generic head with a trimmed vocabulary and
a head fine-tuned from it, their cards, reuse, resume from the checkpoint of an interrupted build, and
the built directory as vLLM's config parser and loader read it."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.arms import TRAINED_STEPS_FIELD, vllm_command
from core.config import parse_config
from core.paths import drafter_dir
from drafters import build
from drafters.build import distill, drafter_summary, expected_hash_of, stale_drafters
from drafters.card import read_card
from drafters.data import prompt_ids
from drafters.recipe import REDUCED_HEAD_RECIPE, REDUCED_RECIPE
from drafters.responses import prompt_sha
from drafters.vocab import choose_vocabulary
from test_eagle3 import VLLM_CHECK

HIDDEN, LAYERS = 16, 8
WORDS = ("the cat sat on a mat and ran to see the dog who had eaten all of our bread so we went out for more "
         "numbers one two three four five six seven eight nine ten plus minus equals translate summarise").split()
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(directory: Path):
    """A byte-level BPE of about 700 tokens, special tokens first, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    rng = random.Random(0)  # made-up words too, so that the merges reach the vocabulary size
    made_up = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(600)]
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)] + [
        " ".join(made_up[i:i + 10]) for i in range(0, 600, 10)] * 3
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


def _target(directory: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(directory)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=LAYERS,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=2, pad_token_id=0)).eval()
    model.save_pretrained(directory)
    return tokenizer, model


def _rows() -> list[dict]:
    rows = []
    for task, offset in (("alpha", 0), ("beta", 3)):
        for i in range(6):
            text = " ".join(WORDS[(offset + i * 5 + j) % len(WORDS)] for j in range(4 + i))
            rows.append({"id": f"{task}:{i}", "task": task, "split": "train", "max_tokens": 10,
                         "messages": [{"role": "user", "content": text}]})
    rows.append({**rows[0], "id": "alpha:eval", "split": "eval"})  # never trained on
    return rows


def _fill_responses(config, rows, tokenizer, model, top_k: int) -> None:
    """The target's greedy responses (10 tokens each, no early stop) and top-k, in the distill cache."""
    from core.models import directory_hashes

    cache = (config.cache_path / "drafters" / config.target.name / "responses" /
             f"{expected_hash_of(directory_hashes(Path(config.target.path)), config.target.dtype)}-top{top_k}.jsonl")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "w") as f:
        for row in rows:
            ids = prompt_ids(tokenizer, row["messages"])
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=row["max_tokens"],
                                     min_new_tokens=row["max_tokens"], do_sample=False)
                logits = model(out).logits[0, len(ids) - 1:-1]
            top = torch.log_softmax(logits, -1).topk(top_k, dim=-1)
            f.write(json.dumps({"id": row["id"], "prompt_sha": prompt_sha(ids), "prompt_ids": ids,
                                "output_ids": out[0, len(ids):].tolist(), "topk_ids": top.indices.tolist(),
                                "topk_logprobs": top.values.tolist()}) + "\n")


RECIPE = {**REDUCED_HEAD_RECIPE, "vocab_size": 512, "batch_tokens": 96, "max_steps": 6, "eval_every_steps": 2,
          "warmup_steps": 1, "learning_rate": 1e-2, "device": "cpu"}
DRAFT_MODEL = {**REDUCED_RECIPE, "vocab_size": 512, "batch_tokens": 96, "max_steps": 2, "eval_every_steps": 2,
               "warmup_steps": 1, "device": "cpu"}
FINETUNE = {"batch_tokens": 96, "max_steps": 4, "eval_every_steps": 2, "warmup_steps": 1, "learning_rate": 5e-3,
            "ttt_steps": 3, "top_k": RECIPE["top_k"], "holdout_fraction": 0.25, "device": "cpu"}


def _config(tmp_path: Path, cache: str):
    return parse_config({
        "name": "t", "cache_dir": str(tmp_path / cache),
        "target": {"name": "tiny", "source": "path", "path": str(tmp_path / "target"), "dtype": "float32"},
        "drafters": [{"name": "head", "kind": "eagle3", "init": "target", "tasks": "all", "recipe": RECIPE},
                     {"name": "head-alpha", "kind": "eagle3", "init": "head", "tasks": ["alpha"], "recipe": FINETUNE},
                     {"name": "small", "init": "target", "recipe": DRAFT_MODEL}],
        "arms": [{"name": "baseline"},
                 {"name": "eagle3", "speculative": {"method": "eagle3", "drafter": "head-alpha",
                                                    "num_speculative_tokens": 3}}],
    }, tmp_path / "exp.yaml")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two caches over one target: `a` builds both heads straight through; `b` has the same generic head,
    and its fine-tuned head is interrupted after its first checkpoint, then resumed."""
    tmp_path = tmp_path_factory.mktemp("eagle3-build")
    tokenizer, model = _target(tmp_path / "target")
    rows = _rows()
    config = _config(tmp_path, "a")
    _fill_responses(config, rows, tokenizer, model, RECIPE["top_k"])
    said: list[str] = []
    distill(config, "head", rows, "w", tmp_path / "logs", progress=said.append)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    out = distill(config, "head-alpha", rows, "w", tmp_path / "logs", progress=said.append)
    distill(config, "small", rows, "w", tmp_path / "logs", progress=said.append)  # a draft model beside them
    return {"tmp": tmp_path, "config": config, "rows": rows, "tokenizer": tokenizer, "said": said, "out": out}


def test_a_generic_head_and_one_fine_tuned_from_it_get_complete_cards(built):
    config, out, tokenizer = built["config"], built["out"], built["tokenizer"]
    generic, card = read_card(drafter_dir(config, "head")), read_card(out)
    for c in (generic, card):
        assert c["kind"] == "eagle3"
        assert set(c) >= {"name", "kind", "inputs_hash", "base", "target", "recipe", "shape", "training_data",
                          "generation", "training", "build_seconds", "files", "software", "created"}
        after = c["training"]["holdout_after"]
        assert set(after) >= {"top1_agreement", "tokens", "simulated_tau_k1", "simulated_tau_k2",
                              "top1_agreement_by_step", "by_task"}
        assert c["training"]["loss_last"] < c["training"]["loss_first"]
    assert generic["training"]["ttt_steps"] == 2 and card["training"]["ttt_steps"] == 3
    assert len(card["training"]["holdout_after"]["top1_agreement_by_step"]) == 3
    assert "simulated_tau_k3" in card["training"]["holdout_after"]

    # The generic head's vocabulary: trimmed on its responses, as a draft model's is.
    cache = next((config.cache_path / "drafters" / "tiny" / "responses").glob("*.jsonl"))
    responses = [json.loads(line) for line in cache.read_text().splitlines()]
    train_ids = {r["id"] for r in built["rows"] if r["split"] == "train"}
    streams = [r["output_ids"] for r in responses if r["id"] in train_ids] + [
        [t for step in r["topk_ids"] for t in step] for r in responses if r["id"] in train_ids]
    kept = choose_vocabulary(tokenizer, 512, streams)
    tensors = load_file(drafter_dir(config, "head") / "model.safetensors")
    assert (tensors["d2t"] + torch.arange(512)).tolist() == kept
    shape = {"layers": 1, "hidden_size": HIDDEN, "aux_layers": [2, 4, 5], "norm_before_residual": False,
             "vocab_size": len(tokenizer), "draft_vocab_size": 512, "trimmed_vocabulary": True}
    assert generic["shape"] == {**shape, "parameters": generic["shape"]["parameters"], "ttt_steps": 2}
    assert card["shape"] == {**shape, "parameters": generic["shape"]["parameters"], "ttt_steps": 3}
    assert generic["shape"]["parameters"] == sum(t.numel() for t in tensors.values() if t.is_floating_point())

    assert card["base"] == {"kind": "drafter", "name": "head", "path": str(drafter_dir(config, "head")),
                            "inputs_hash": generic["inputs_hash"]}
    assert generic["base"]["kind"] == "target"
    data = card["training_data"]
    assert data["tasks"] == ["alpha"] and data["counts"] == {"alpha": 6} and data["split"] == "train"
    assert len(data["lengths"]["output"]) == 6 and all(n == 10 for n in data["lengths"]["output"])
    assert generic["training_data"]["counts"] == {"alpha": 6, "beta": 6}
    assert card["recipe"]["ttt_steps"] == 3 and "layers" not in card["recipe"]
    assert json.loads((out / "config.json").read_text())[TRAINED_STEPS_FIELD] == 3
    assert not (out / "checkpoint.pt").exists() and not out.with_name(out.name + ".partial").exists()
    assert json.loads(drafter_summary(out))["kind"] == "eagle3"

    spec = json.loads(vllm_command(config, config.arm("eagle3"), 1)[-3])
    assert spec == {"method": "eagle3", "model": str(out), "num_speculative_tokens": 3}


def test_a_draft_model_beside_the_heads_shares_their_responses_and_says_its_kind(built):
    config = built["config"]
    card = read_card(drafter_dir(config, "small"))
    assert card["kind"] == "draft_model" and json.loads(drafter_summary(drafter_dir(config, "small")))["kind"] == \
        "draft_model"
    assert card["shape"] == {"layers": 1, "hidden_size": HIDDEN, "vocab_size": 512, "trimmed_vocabulary": True}
    assert card["generation"]["cache"] == read_card(drafter_dir(config, "head"))["generation"]["cache"]
    assert "ttt_steps" not in card["recipe"] and card["recipe"]["layers"] == 1
    old = {k: v for k, v in card.items() if k != "kind"}  # a card written before drafters had a kind
    (drafter_dir(config, "small") / "drafter_card.json").write_text(json.dumps(old))
    assert json.loads(drafter_summary(drafter_dir(config, "small")))["kind"] == "draft_model"


def test_unchanged_heads_are_reused_and_a_changed_recipe_rebuilds(built):
    config, rows = built["config"], built["rows"]
    said: list[str] = []
    assert distill(config, "head-alpha", rows, "w", built["tmp"] / "logs", progress=said.append) == built["out"]
    assert said and all("up to date" in m for m in said), said
    assert stale_drafters(config, "w") == []
    changed = config.model_copy(deep=True)
    changed.drafters[1].recipe = {**FINETUNE, "step_decay": 0.5}
    assert stale_drafters(changed, "w") == ["head-alpha"]


def test_a_fine_tuned_head_that_builds_its_parent_first_times_only_its_own_build(built, monkeypatch):
    tmp_path, rows = built["tmp"], built["rows"]
    config = _config(tmp_path, "c")
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    for name in ("head", "head-alpha"):
        shutil.rmtree(drafter_dir(config, name))
    # The parent's build is made to look an hour long: the clock jumps once it returns.
    offset, real_monotonic, real_distill = [0.0], time.monotonic, build.distill

    def parent_then_an_hour(*args, **kwargs):
        out = real_distill(*args, **kwargs)
        offset[0] += 3600.0
        return out

    monkeypatch.setattr(build.time, "monotonic", lambda: real_monotonic() + offset[0])
    monkeypatch.setattr(build, "distill", parent_then_an_hour)
    real_distill(config, "head-alpha", rows, "w", tmp_path / "logs", progress=lambda m: None)
    assert offset[0] == 3600.0 and read_card(drafter_dir(config, "head"))["build_seconds"]["total"] < 3600
    assert read_card(drafter_dir(config, "head-alpha"))["build_seconds"]["total"] < 3600


def test_an_interrupted_head_build_resumes_from_its_checkpoint_to_the_same_weights(built, monkeypatch):
    tmp_path, rows = built["tmp"], built["rows"]
    config = _config(tmp_path, "b")

    class Interrupted(Exception):
        pass

    real_save = torch.save

    def save_then_stop(obj, path):
        real_save(obj, path)
        raise Interrupted

    monkeypatch.setattr(torch, "save", save_then_stop)
    with pytest.raises(Interrupted):
        distill(config, "head-alpha", rows, "w", tmp_path / "logs", progress=lambda m: None)
    out = drafter_dir(config, "head-alpha")
    assert (out.with_name(out.name + ".partial") / "checkpoint.pt").exists() and not out.exists()
    monkeypatch.setattr(torch, "save", real_save)

    said: list[str] = []
    assert distill(config, "head-alpha", rows, "w", tmp_path / "logs", progress=said.append) == out
    assert any("resumed from" in m and "at step 2" in m for m in said), said
    whole, resumed = load_file(built["out"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name, tensor in whole.items():
        assert torch.equal(resumed[name], tensor), name
    assert read_card(out)["training"]["steps"] == read_card(built["out"])["training"]["steps"] == 4


def test_vllm_parses_the_built_head_as_an_eagle3_draft_and_maps_every_tensor(built):
    config, out = built["config"], built["out"]
    result = subprocess.run([sys.executable, "-c", VLLM_CHECK, config.target.path, str(out)], capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    seen = json.loads(lines[0].removeprefix("REPORT "))[str(out)]
    assert seen["class"] == "Eagle3LlamaForCausalLM" and seen["draft_vocab_size"] == 512
    assert seen["aux_layers"] == [2, 4, 5] and seen["matched"] == seen["expected"]
    assert seen["d2t_equal"] is True and seen["has_own_lm_head"] is True and seen["has_own_embed_tokens"] is False
