"""Token lengths with the target's own tokenizer and chat template.

A prompt's length is what the server will see: the chat template rendered
with the generation prompt, then tokenized without extra special tokens (the
template already has them), as vLLM's chat endpoint does. A reference
output's length is its text alone.
"""

from __future__ import annotations

import os
from pathlib import Path


class PromptTokenizer:
    """`model` is a model directory, or a hub name (e.g. meta-llama/Llama-3.1-8B-Instruct)
    that the local HF cache already holds (a compose stack mounts it); nothing is downloaded."""

    def __init__(self, model: str | Path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub; set before transformers reads it
        from transformers import AutoTokenizer  # here: importing transformers takes seconds

        path = Path(model)
        if path.is_dir():
            if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
                raise FileNotFoundError(f"no tokenizer in {path}; run `specdrift prepare --config ... --skip-drafters`")
        elif path.is_absolute() or str(model).startswith("."):
            raise FileNotFoundError(f"no model directory {path}; run `specdrift prepare --config ... --skip-drafters`")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True, cache_dir=_hub_cache())
        except OSError as err:
            raise FileNotFoundError(f"{model}: no tokenizer in this directory or in the local HF cache "
                                    f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); "
                                    f"mount a cache that holds it ({str(err).splitlines()[0]})") from None
        self.model = str(model)

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_lengths(self, conversations: list[list[dict]]) -> list[int]:
        texts = [self.render(messages) for messages in conversations]
        return self.text_lengths(texts)

    def text_lengths(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]


def _hub_cache() -> str | None:
    """The HF hub cache named by the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None
