"""`drafter_card.json`: what a drafter is, what it learned from, and how well.

The card sits beside the drafter's weights. `specdrift prepare` reuses a
drafter only when its card's `inputs_hash` equals the hash of the current
inputs and every file still has the hash in `files`. The analysis reads
`training_data.lengths` to compute length divergences against the workload,
cut to the window the drafter was trained at (`recipe.max_seq_len`, with
core.contracts.training_window, the rule distillation cuts examples by).

Format (`format: "specdrift-drafter-card/1"`), all keys always present:

- `name`: the drafter's name in the config.
- `fingerprint`: a hash of what the inputs are made from, cheap to compute
  (drafters/build.py, `fingerprint`); a matching one spares the inputs hash.
- `inputs_hash`: sha256 over everything that determines the drafter: this
  format's version, the target's file hashes and dtype, the parent drafter's
  inputs hash (fine-tuned drafters), the recipe, the tasks, and every training
  prompt (row id, prompt-token hash, max_tokens). A change to any of them
  means a rebuild.
- `base`: `{"kind": "target" | "drafter" | "model", "name": str, "path": str,
  "inputs_hash": str | null}` — what the weights started from.
- `target`: `{"name", "path", "dtype", "files": {file: sha256}}`.
- `recipe`: the full validated recipe (drafters/recipe.py), defaults included.
- `shape`: `{"layers", "hidden_size", "vocab_size", "trimmed_vocabulary"}`; a
  trimmed vocabulary is listed (as target ids) in `target_token_ids.json`, and
  vLLM must run the drafter with `"use_heterogeneous_vocab": true`.
- `training_data`:
  - `split`: always `"train"` (workload rows with split == "train").
  - `tasks`: sorted task names; `counts`: prompts per task;
    `response_tokens`: response tokens per task; `holdout_prompts`: per task,
    the prompts held out of training to measure agreement; `seed`.
  - `vocabulary_coverage`: share of response tokens inside the drafter's
    vocabulary (1.0 without trimming).
  - `histograms`: `{"bin_edges": [...], "prompt": {task | "all": [counts]},
    "output": {...}}` over shared power-of-two token-length bins; a count
    `c[i]` is for lengths in `[edges[i], edges[i+1])`.
  - `lengths`: the raw lists behind the histograms, in tokens:
    `{"prompt": [...], "output": [...], "by_task": {task: {"prompt": [...],
    "output": [...]}}}`. Prompt length counts the chat-templated prompt as
    served; output length counts the target's greedy response. The lists
    cover every train prompt the drafter used, holdout included, in one order
    (`prompt[i]` and `output[i]` are the same request).
- `generation`: `{"engine": "vllm", "dtype", "top_k", "seconds", "cached"}`
  for the target responses.
- `training`: steps, minutes, device, first/last loss, held-out figures before
  and after (top-1 agreement = per-token acceptance α on the target's own
  responses, and the mean acceptance length τ it implies for K = 1..3,
  overall and per task), and the evaluation history; a head's also has
  `ttt_steps`, `step_decay` and `feature_dtype` (the dtype of the target pass
  its input features came from).
- `build_seconds`: `{"responses", "training", "total"}` wall time of this build
  (a parent built in the same call is not counted).
- `files`: sha256 of every file in the drafter directory except the card.
- `software`: versions of torch, transformers and vLLM used.
- `created`: UTC time, ISO 8601.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from core.contracts import DRAFTER_CARD as CARD_FILE
from core.models import directory_hashes
CARD_FORMAT = "specdrift-drafter-card/1"
HISTOGRAM_EDGES = [2 ** i for i in range(0, 15)]  # 1 .. 16384 tokens


def inputs_hash(parts: dict) -> str:
    """A stable hash of the build inputs (a JSON-serialisable mapping)."""
    canonical = json.dumps({"format": CARD_FORMAT, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    return directory_hashes(directory, skip=CARD_FILE)


def histogram(lengths: list[int]) -> list[int]:
    counts = [0] * (len(HISTOGRAM_EDGES) - 1)
    for length in lengths:
        for i in range(len(counts)):
            if HISTOGRAM_EDGES[i] <= length < HISTOGRAM_EDGES[i + 1] or (
                    i == len(counts) - 1 and length >= HISTOGRAM_EDGES[-1]):
                counts[i] += 1
                break
    return counts


def length_record(by_task: dict[str, dict[str, list[int]]]) -> tuple[dict, dict]:
    """(histograms, lengths) for the card from per-task prompt/output length lists."""
    tasks = sorted(by_task)
    lengths = {
        "prompt": [n for t in tasks for n in by_task[t]["prompt"]],
        "output": [n for t in tasks for n in by_task[t]["output"]],
        "by_task": {t: {"prompt": list(by_task[t]["prompt"]), "output": list(by_task[t]["output"])} for t in tasks},
    }
    histograms = {"bin_edges": HISTOGRAM_EDGES}
    for kind in ("prompt", "output"):
        histograms[kind] = {"all": histogram(lengths[kind]), **{t: histogram(by_task[t][kind]) for t in tasks}}
    return histograms, lengths


def write_card(directory: Path, card: dict) -> Path:
    """Complete the card with file hashes and write it."""
    card = {**card, "format": CARD_FORMAT, "files": file_hashes(directory)}
    path = directory / CARD_FILE
    path.write_text(json.dumps(card, indent=1) + "\n")
    return path


def update_card(directory: Path, **fields) -> None:
    """Set top-level fields of an existing card (the card is not among the hashed files)."""
    path = directory / CARD_FILE
    card = json.loads(path.read_text())
    if any(card.get(k) != v for k, v in fields.items()):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**card, **fields}, indent=1) + "\n")
        tmp.replace(path)


def read_card(directory: Path) -> dict | None:
    try:
        card = json.loads((directory / CARD_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return card if card.get("format") == CARD_FORMAT else None


def card_problem(directory: Path, expected_inputs_hash: str) -> str | None:
    """Why the drafter in `directory` cannot be reused, or None if it can."""
    card = read_card(directory)
    if card is None:
        return "no drafter card"
    if card["inputs_hash"] != expected_inputs_hash:
        return "its inputs changed (recipe, data, target or parent drafter)"
    if file_hashes(directory) != card["files"]:
        return "its files do not match the hashes in its card"
    return None
