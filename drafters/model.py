"""Drafter networks: cut from the target, loaded from a drafter directory, saved.

A drafter built from the target is the target's embedding, its first N decoder
layers and its final norm, with the output head tied to the embedding (as in
SmolLM2). With a trimmed vocabulary the embedding keeps only the chosen rows.
It is an ordinary LlamaForCausalLM, so vLLM serves it as a `draft_model`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from drafters.dtypes import saved_dtype
from drafters.vocab import load_target_ids, save_trimmed_tokenizer


def drafter_from_target(source: Path | str, layers: int | None, target_ids: list[int] | None):
    """A float32 drafter from a model's first `layers` layers (all if None), keeping the `target_ids` rows."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if layers is None:
        layers = model.config.num_hidden_layers
    if layers > model.config.num_hidden_layers:
        raise ValueError(f"recipe.layers {layers} exceeds the target's {model.config.num_hidden_layers} layers")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    if target_ids is not None:
        _trim_vocabulary(model, target_ids)
    return model


def _trim_vocabulary(model, target_ids: list[int]) -> None:
    new_id = {old: new for new, old in enumerate(target_ids)}
    rows = model.get_input_embeddings().weight.data[torch.tensor(target_ids)].clone()
    embedding = torch.nn.Embedding(len(target_ids), rows.shape[1])
    embedding.weight.data.copy_(rows)
    model.set_input_embeddings(embedding)
    if not model.config.tie_word_embeddings:
        head = model.get_output_embeddings().weight.data[torch.tensor(target_ids)].clone()
        model.get_output_embeddings().weight = torch.nn.Parameter(head)
    model.config.vocab_size = len(target_ids)
    model.tie_weights()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        old = getattr(model.config, key, None)
        if isinstance(old, int):
            setattr(model.config, key, new_id[old])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        old = getattr(model.generation_config, key, None)
        if isinstance(old, int):
            setattr(model.generation_config, key, new_id[old])


def load_drafter(drafter_dir: Path):
    """A saved drafter as a float32 model, ready to train further."""
    return AutoModelForCausalLM.from_pretrained(drafter_dir, dtype=torch.float32)


def save_drafter(model, out_dir: Path, tokenizer_source: Path, target_ids: list[int] | None, dtype: str) -> None:
    """Weights (in the dtype the arms serve), config and tokenizer: an HF dir vLLM loads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to(saved_dtype(dtype)).save_pretrained(out_dir, safe_serialization=True)
    model.to(torch.float32)
    if target_ids is None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if (tokenizer_source / name).exists():
                (out_dir / name).write_text((tokenizer_source / name).read_text())
    else:
        save_trimmed_tokenizer(tokenizer_source, out_dir, target_ids)


def drafter_shape(drafter_dir: Path) -> dict:
    config = json.loads((drafter_dir / "config.json").read_text())
    target_ids = load_target_ids(drafter_dir)
    return {"layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
            "vocab_size": config["vocab_size"], "trimmed_vocabulary": target_ids is not None}
