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
    def __init__(self, model_dir: Path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        from transformers import AutoTokenizer

        if not (Path(model_dir) / "tokenizer.json").exists() and not (Path(model_dir) / "tokenizer_config.json").exists():
            raise FileNotFoundError(f"no tokenizer in {model_dir}; run `specdrift prepare --config ... --skip-drafters`")
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)

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
