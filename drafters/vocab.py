"""A trimmed drafter vocabulary: the tokens that matter, and a tokenizer for them.

On a CPU the drafter's output head is a large share of its cost (49k rows for
SmolLM2). A drafter can keep only the tokens the target actually produces;
vLLM then runs it with `"use_heterogeneous_vocab": true`, mapping tokens
between the two tokenizers by their strings. A token outside the drafter's
vocabulary is never drafted, and is fed to the drafter as its `unk` token.

Drafter id i is target id `target_ids[i]`; ids keep their order, so the special
tokens (the lowest ids) keep their ids. The drafter's tokenizer is the
target's byte-level BPE restricted to those tokens (every single-byte token is
kept, so it can still encode any text).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

TARGET_IDS_FILE = "target_token_ids.json"


def choose_vocabulary(target_tokenizer, size: int, token_streams: Iterable[list[int]]) -> list[int]:
    """Target ids to keep: special and single-character tokens, then the most frequent in the streams.

    A token is kept together with the tokens its BPE merges are made of, so
    that the trimmed tokenizer still produces it."""
    vocab = target_tokenizer.get_vocab()
    parts = _merge_parts(json.loads(target_tokenizer.backend_tokenizer.to_str()), vocab)
    special = set(target_tokenizer.all_special_ids) | set(target_tokenizer.added_tokens_decoder)
    kept = {tid for tok, tid in vocab.items() if len(tok) == 1} | special
    if len(kept) >= size:
        raise ValueError(f"vocab_size {size} is smaller than the {len(kept)} special and byte tokens it must keep")
    counts: Counter[int] = Counter()
    for stream in token_streams:
        counts.update(stream)
    by_frequency = [tid for tid, _ in counts.most_common() if tid < len(vocab)]
    # Tokens never seen come next in id order: BPE gives earlier merges (commoner strings) lower ids.
    seen = set(by_frequency)
    by_frequency += [tid for tid in range(len(vocab)) if tid not in seen]
    for tid in by_frequency:
        closure = _with_parts(tid, parts) - kept
        if len(kept) + len(closure) <= size:
            kept |= closure
        if len(kept) == size:
            break
    return sorted(kept)


def _merge_parts(tokenizer_json: dict, vocab: dict[str, int]) -> dict[int, tuple[int, int]]:
    """Token id -> the ids of the two tokens its BPE merge joins."""
    parts = {}
    for merge in tokenizer_json["model"]["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        joined = vocab.get(left + right)
        if joined is not None and left in vocab and right in vocab:
            parts.setdefault(joined, (vocab[left], vocab[right]))
    return parts


def _with_parts(tid: int, parts: dict[int, tuple[int, int]]) -> set[int]:
    found, todo = set(), [tid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(parts.get(current, ()))
    return found


def trimmed_tokenizer_json(target_tokenizer_json: dict, target_ids: list[int]) -> dict:
    """The target's tokenizer.json with only `target_ids`, renumbered 0..n-1."""
    data = json.loads(json.dumps(target_tokenizer_json))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"vocabulary trimming supports BPE tokenizers, not {model.get('type')!r}")
    id_to_token = {tid: tok for tok, tid in model["vocab"].items()}
    new_id = {old: new for new, old in enumerate(target_ids)}
    model["vocab"] = {id_to_token[old]: new for old, new in new_id.items() if old in id_to_token}
    kept = model["vocab"]

    def merge_parts(merge):
        return merge.split(" ", 1) if isinstance(merge, str) else merge

    # A merge survives if its parts and its result are all still tokens.
    model["merges"] = [m for m in model["merges"]
                       if all(p in kept for p in merge_parts(m)) and "".join(merge_parts(m)) in kept]
    data["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in data["added_tokens"] if t["id"] in new_id]
    _renumber_post_processor(data.get("post_processor"), new_id)
    return data


def _renumber_post_processor(processor: dict | None, new_id: dict[int, int]) -> None:
    """Template processors name special tokens by id; follow the renumbering."""
    if not processor:
        return
    for child in processor.get("processors", []) or []:
        _renumber_post_processor(child, new_id)
    for special in (processor.get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special.get("ids", [])]


def save_trimmed_tokenizer(target_dir: Path, out_dir: Path, target_ids: list[int]) -> None:
    """Write the drafter's tokenizer (same template and special tokens) and its id map."""
    tokenizer_json = json.loads((target_dir / "tokenizer.json").read_text())
    (out_dir / "tokenizer.json").write_text(json.dumps(trimmed_tokenizer_json(tokenizer_json, target_ids)))
    for name in ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (target_dir / name).exists():
            (out_dir / name).write_text((target_dir / name).read_text())
    (out_dir / TARGET_IDS_FILE).write_text(json.dumps(target_ids))


def load_target_ids(drafter_dir: Path) -> list[int] | None:
    """The drafter's vocabulary as target ids, or None for a full-vocabulary drafter."""
    path = drafter_dir / TARGET_IDS_FILE
    return json.loads(path.read_text()) if path.exists() else None


class VocabMap:
    """Target ids to drafter ids (unknown -> the drafter's unk id), as one lookup table."""

    def __init__(self, target_vocab_size: int, target_ids: list[int] | None, unk_id: int):
        if target_ids is None:
            self.to_draft = torch.arange(target_vocab_size)
        else:
            self.to_draft = torch.full((target_vocab_size,), -1, dtype=torch.long)
            self.to_draft[torch.tensor(target_ids)] = torch.arange(len(target_ids))
        self.unk_id = unk_id

    def inputs(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Drafter input ids: unknown tokens become unk, as vLLM feeds them."""
        ids = self.to_draft[target_ids]
        return torch.where(ids < 0, torch.full_like(ids, self.unk_id), ids)

    def outputs(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Drafter ids for prediction targets; -1 where the drafter cannot produce the token."""
        return self.to_draft[target_ids]
