"""The drafter's training prompts: the workload's train split, tokenized as served.

Only rows with split == "train" are used, so the eval prompts that Locust
replays (and the benchmark measures) are never trained on.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass

from core.config import ConfigError, DrafterConfig
from drafters.recipe import Recipe
from drafters.responses import Request

SUBSET_SEED = 0  # which capped subset of a task's train prompts every drafter draws from


@dataclass(frozen=True)
class TrainPrompt:
    row_id: str
    task: str
    request: Request
    holdout: bool


def drafter_tasks(drafter: DrafterConfig, rows: list[dict]) -> list[str]:
    available = sorted({r["task"] for r in rows if r["split"] == "train" and "control" not in r})
    if drafter.tasks == "all":
        return available
    unknown = [t for t in drafter.tasks if t not in available]
    if unknown:
        raise ConfigError(f"drafters.{drafter.name}.tasks: {unknown[0]!r} has no train prompts in the workload "
                          f"(tasks: {', '.join(available)})")
    return sorted(drafter.tasks)


def select_prompts(rows: list[dict], tasks: list[str], recipe: Recipe, tokenizer) -> list[TrainPrompt]:
    """Train rows of `tasks` (capped per task; the holdout seeded), each tokenized with the chat template."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["split"] == "train" and row["task"] in tasks and "control" not in row:
            by_task[row["task"]].append(row)
    chosen: list[TrainPrompt] = []
    for task in tasks:
        task_rows = sorted(by_task[task], key=lambda r: r["id"])
        # The subset is the same for every seed (seed 0's draw), so seeds differ in training, not in
        # the prompts they could see, and a second seed needs no new target responses.
        random.Random(f"{SUBSET_SEED}:{task}").shuffle(task_rows)
        task_rows = task_rows[: recipe.max_prompts_per_task]
        # Held out by a hash of the row id, not by position: a prompt held out from a generic
        # drafter stays held out from drafters fine-tuned from it, whatever their caps.
        held = {r["id"] for r in task_rows if _unit_hash(recipe.seed, r["id"]) < recipe.holdout_fraction}
        held = held or {min(task_rows, key=lambda r: _unit_hash(recipe.seed, r["id"]))["id"]}
        for row in task_rows:
            ids = prompt_ids(tokenizer, row["messages"])
            if "prompt_tokens" in row and len(ids) != row["prompt_tokens"]:
                raise RuntimeError(f"{row['id']}: {len(ids)} prompt tokens here but {row['prompt_tokens']} "
                                   "in the workload: the tokenizer or chat template differs")
            chosen.append(TrainPrompt(row["id"], task, Request(row["id"], ids, row["max_tokens"]), row["id"] in held))
    return chosen


def _unit_hash(seed: int, row_id: str) -> float:
    """A stable number in [0, 1) for a row."""
    digest = hashlib.sha256(f"{seed}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids as the server sees them: the chat template with the generation prompt."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
