"""The workload: configured datasets into length-stratified, split requests.

The workload file is JSON Lines, one request a line, with these fields:

| field | meaning |
|---|---|
| `id` | unique, `{task}:{source_id}`; sent as `X-Specdrift-Prompt-Id` |
| `task` | task name; sent as `X-Specdrift-Task` |
| `stratum` | length stratum (workload/strata.py); sent as `X-Specdrift-Stratum` |
| `messages` | OpenAI chat messages, the last one the user's |
| `max_tokens` | the output budget (the task's `max_tokens`) |
| `prompt_tokens` | prompt length in target tokens, chat template included |
| `ref_tokens` | the reference output's length in target tokens, or null |
| `split` | `train` (drafter distillation) or `eval` (what Locust replays) |
| `dataset` | the adapter it came from (`jsonl:<file name>` for a user's file) |
| `source_id` | the record's id within its dataset |
| `control` | only on length-matched control rows: `{"task": A, "like": B}` |

A control row is a prompt of task A, drawn so that the control rows' prompt
lengths follow task B's; its `task` is `A-like-B`, so that it is measured
apart from A's own rows.

The eval rows come first, in a seeded random order (so that a sequential
replay interleaves the tasks), then the train rows in dataset order.

How a workload is built (`build`):

1. Each configured dataset's adapter yields prompts (workload/datasets.py).
   A prompt whose content an earlier dataset already produced is a duplicate
   and is dropped (so the order of `datasets` decides which copy is kept).
2. Prompts and reference outputs are tokenized with the target's tokenizer
   and chat template. A prompt with prompt_tokens + max_tokens above the
   target's max_model_len is excluded and counted, never truncated.
3. The split is a seeded hash of the prompt's split group
   (workload/sampling.py): same seed, same split. Every train prompt is
   written; the eval rows are n_per_cell per (task, stratum) where
   available, with the shortfall reported, plus the length-matched controls,
   drawn from eval prompts that are not already in the eval set.

Next to `workload.jsonl` the build writes `workload.build.json` (the counts
above, the settings, and every kept prompt's lengths per task, for the
length-divergence analysis), `workload.summary.md`, `workload.lengths.png` and
`workload.replay.jsonl`: the acceptance replay's prompts (rows as above), per
(task, stratum) cell the served eval rows and more eval prompts up to
`replay.per_cell`, plus the controls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ExperimentConfig
from core.contracts import EVAL, TRAIN, workload_sidecar, write_jsonl
from core.models import sha256_file
from core.paths import target_model_arg
from workload import strata
from workload.datasets import Item, dataset_tasks, load_items, source_path
from workload.lengths import PromptTokenizer
from workload.sampling import length_matched, split_of, stratified_sample
from workload.summary import plot_lengths, summary_markdown

log = logging.getLogger(__name__)

CONTROL_JOIN = "-like-"


class WorkloadError(ValueError):
    """A workload that cannot be built as configured; the message says why."""


def control_task(task: str, like: str) -> str:
    return f"{task}{CONTROL_JOIN}{like}"


def tag_vocabulary(config: ExperimentConfig) -> dict[str, list[str]]:
    """Every task and stratum label this config's workload can produce: the
    bounded label sets the gateway accepts. Cheap: reads no prompts (a JSONL
    dataset with a per-record task field is scanned for its task names)."""
    tasks: list[str] = []
    for spec in config.workload.datasets:
        tasks += [t for t in dataset_tasks(config, spec) if t not in tasks]
    tasks += [control_task(c.task, c.like) for c in config.workload.controls]
    edges = strata.check_edges(config.workload.prompt_strata, "prompt_strata")
    output = strata.check_edges(config.workload.output_strata, "output_strata") if config.workload.output_strata else None
    return {"task": tasks, "stratum": strata.all_strata(edges, output)}


def fingerprint(config: ExperimentConfig) -> str:
    """A hash of everything the built rows are made from: the workload
    settings, the content of every dataset file read, the target's tokenizer
    and context length, and this package's code. Cheap: nothing is tokenized."""
    sources = {}
    for spec in config.workload.datasets:
        path = source_path(config, spec)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        sources[spec.adapter + ":" + (spec.path or "")] = {
            str(f.relative_to(path) if path.is_dir() else f.name): sha256_file(f) for f in files if f.exists()}
    target = Path(target_model_arg(config))
    tokenizer = {p.name: sha256_file(p) for p in sorted(target.glob("tokenizer*")) + sorted(target.glob("*.jinja"))
                 } if target.is_dir() else str(target)
    code = {p.name: sha256_file(p) for p in sorted(Path(__file__).parent.glob("*.py"))}
    settings = config.workload.model_dump(mode="json", exclude={"data_dir"})
    settings["replay_per_cell"] = config.replay.per_cell
    parts = {"settings": settings, "sources": sources, "tokenizer": tokenizer,
             "max_model_len": config.target.max_model_len, "code": code}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def read_datasets(config: ExperimentConfig) -> tuple[list[tuple[Item, int]], list[dict]]:
    """(item, max_tokens) of every configured dataset, in config order, the
    duplicates dropped (the first copy of a prompt wins), and per dataset how
    many were read, dropped as duplicates of which dataset, and kept."""
    wl = config.workload
    seen: dict[str, str] = {}
    kept: list[tuple[Item, int]] = []
    report = []
    for spec in wl.datasets:
        items = load_items(config, spec)
        duplicates: Counter = Counter()
        for item in items:
            if item.key in seen:
                duplicates[seen[item.key]] += 1
                continue
            seen[item.key] = item.dataset
            kept.append((item, spec.max_tokens or wl.default_max_tokens))
        report.append({"adapter": spec.adapter, "read": len(items), "duplicates_of": dict(duplicates),
                       "kept": len(items) - sum(duplicates.values())})
    ids = Counter(f"{item.task}:{item.source_id}" for item, _ in kept)
    repeated = [i for i, n in ids.items() if n > 1]
    if repeated:
        raise WorkloadError(f"row ids repeat (e.g. {repeated[0]!r}); give each record a unique id")
    return kept, report


@dataclass
class Prompt:
    """A kept item with its lengths, split and stratum."""

    item: Item
    max_tokens: int
    prompt_tokens: int
    ref_tokens: int | None
    split: str
    stratum: str = ""

    def row(self, task: str | None = None, control: dict | None = None) -> dict:
        task = task or self.item.task
        row = {
            "id": f"{task}:{self.item.source_id}",
            "task": task,
            "stratum": self.stratum,
            "messages": self.item.messages,
            "max_tokens": self.max_tokens,
            "prompt_tokens": self.prompt_tokens,
            "ref_tokens": self.ref_tokens,
            "split": self.split,
            "dataset": self.item.dataset,
            "source_id": self.item.source_id,
        }
        if control:
            row["control"] = control
        return row


@dataclass
class Built:
    rows: list[dict]
    report: dict = field(default_factory=dict)
    replay_rows: list[dict] = field(default_factory=list)  # workload.replay.jsonl: the acceptance replay's prompts


def build(config: ExperimentConfig, tokenizer=None) -> Built:
    """Rows and the build report; `tokenizer` defaults to the target's."""
    wl = config.workload
    prompt_edges = strata.check_edges(wl.prompt_strata, "prompt_strata")
    output_edges = strata.check_edges(wl.output_strata, "output_strata") if wl.output_strata else None
    if not wl.datasets:
        raise WorkloadError("workload.datasets is empty")
    if tokenizer is None:
        tokenizer = PromptTokenizer(target_model_arg(config))

    # 1. read, drop duplicates across and within datasets (first copy wins)
    kept, dataset_report = read_datasets(config)

    # 2. lengths, and the context-length exclusion
    prompt_tokens = tokenizer.prompt_lengths([item.messages for item, _ in kept])
    with_ref = [i for i, (item, _) in enumerate(kept) if item.reference is not None]
    ref_lengths = dict(zip(with_ref, tokenizer.text_lengths([kept[i][0].reference for i in with_ref])))
    max_len = config.target.max_model_len
    prompts: list[Prompt] = []
    too_long: Counter = Counter()
    for i, (item, max_tokens) in enumerate(kept):
        if prompt_tokens[i] + max_tokens > max_len:
            too_long[item.task] += 1
            continue
        prompt = Prompt(item, max_tokens, prompt_tokens[i], ref_lengths.get(i),
                        split_of(item.group, wl.seed, wl.train_fraction))
        expected = min(prompt.ref_tokens, max_tokens) if prompt.ref_tokens is not None else max_tokens
        prompt.stratum = strata.stratum(prompt.prompt_tokens, prompt_edges, expected, output_edges)
        prompts.append(prompt)

    # 3. the eval sample, the controls, the train rows
    by_task: dict[str, list[Prompt]] = defaultdict(list)
    for p in prompts:
        by_task[p.item.task].append(p)
    cells: dict[tuple, list[Prompt]] = defaultdict(list)
    for p in prompts:
        cells[(p.item.task, p.stratum)]  # every populated cell is listed, even if all of it went to train
        if p.split == EVAL:
            cells[(p.item.task, p.stratum)].append(p)
    chosen, shortfall = stratified_sample(cells, wl.n_per_cell, random.Random(f"{wl.seed}:sample"))
    eval_rows = [p.row() for cell in sorted(chosen) for p in chosen[cell]]
    in_eval = {id(p) for members in chosen.values() for p in members}

    control_report = []
    for control in wl.controls:
        for name in (control.task, control.like):
            if name not in by_task:
                raise WorkloadError(f"control {control.task}->{control.like}: no task {name!r} in the workload "
                                    f"(tasks: {', '.join(sorted(by_task))})")
        candidates = [(p.prompt_tokens, p) for p in by_task[control.task] if p.split == EVAL and id(p) not in in_eval]
        target = [p.prompt_tokens for p in by_task[control.like]]
        matched = length_matched(candidates, target, control.n, random.Random(f"{wl.seed}:control:{control.task}"))
        name = control_task(control.task, control.like)
        eval_rows += [p.row(task=name, control={"task": control.task, "like": control.like}) for p in matched.chosen]
        in_eval |= {id(p) for p in matched.chosen}
        control_report.append({"task": name, "wanted": control.n, "got": len(matched.chosen),
                               "ks_statistic": round(matched.ks_statistic, 4), "ks_pvalue": round(matched.ks_pvalue, 4)})

    random.Random(f"{wl.seed}:order").shuffle(eval_rows)
    replay_rows = _replay_rows(cells, chosen, in_eval, eval_rows, config.replay.per_cell,
                               random.Random(f"{wl.seed}:replay"))
    train_rows = [p.row() for p in prompts if p.split == TRAIN]
    report = {
        "settings": {
            "seed": wl.seed, "train_fraction": wl.train_fraction, "n_per_cell": wl.n_per_cell,
            "max_model_len": max_len, "prompt_strata": prompt_edges, "output_strata": output_edges,
            "tokenizer": str(getattr(tokenizer, "model_dir", "")),
        },
        "datasets": dataset_report,
        "too_long": dict(too_long),
        "shortfall": [{"task": t, "stratum": s, "wanted": wl.n_per_cell, "got": wl.n_per_cell - n}
                      for (t, s), n in sorted(shortfall.items())],
        "controls": control_report,
        "replay": {"per_cell": config.replay.per_cell,
                   "cells": dict(sorted(Counter(f"{r['task']}|{r['stratum']}" for r in replay_rows).items()))},
        "lengths": {task: {"prompt_tokens": [p.prompt_tokens for p in ps],
                           "ref_tokens": [p.ref_tokens for p in ps if p.ref_tokens is not None]}
                    for task, ps in sorted(by_task.items())},
    }
    return Built(eval_rows + train_rows, report, replay_rows)


def _replay_rows(cells: dict[tuple, list[Prompt]], chosen: dict[tuple, list[Prompt]], in_eval: set[int],
                 eval_rows: list[dict], per_cell: int, rng: random.Random) -> list[dict]:
    """The replay set: per (task, stratum) cell its served prompts and more
    eval prompts, up to per_cell (every one where the cell holds fewer); the
    controls as served. Empty when per_cell is 0 (the replay is off)."""
    if per_cell == 0:
        return []
    rows = []
    for cell in sorted(cells):
        served = chosen.get(cell, [])
        rest = [p for p in cells[cell] if id(p) not in in_eval]
        rng.shuffle(rest)  # a prefix of one shuffle: a larger per_cell keeps the smaller one's prompts
        extra = rest[:max(0, per_cell - len(served))]
        rows += [p.row() for p in served + sorted(extra, key=lambda p: p.item.source_id)]
    rows += [r for r in eval_rows if "control" in r]
    return rows


def build_workload(config: ExperimentConfig, tokenizer=None) -> list[dict]:
    """The workload rows (see the module docstring for their fields)."""
    return build(config, tokenizer).rows


def save_built(built: Built, path: str | Path) -> Path:
    """The workload file and its sidecars: build.json (the build report, which
    the divergence tables read), summary.md and lengths.png."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workload_sidecar(path, "build.json").write_text(json.dumps(built.report, indent=1) + "\n")
    workload_sidecar(path, "summary.md").write_text(summary_markdown(built.rows, built.report))
    plot_lengths(built.report, workload_sidecar(path, "lengths.png"))
    write_jsonl(workload_sidecar(path, "replay.jsonl"), built.replay_rows)
    return write_jsonl(path, built.rows)  # last: its presence means the build is complete
