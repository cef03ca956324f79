"""How a drafter is distilled: the `recipe` mapping of a drafter in the config.

Every field has a default, so `recipe: {}` gives the recipe that was measured
best on the CPU default (docs/drafters.md). Fields that shape the network
(`layers`, `vocab_size`) apply only to drafters built from the target; a
drafter fine-tuned from another drafter inherits its parent's shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.config import ConfigError, DrafterConfig


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # --- network (init: target only) ---
    base_model: str | None = Field(
        default=None,
        description="start from this HF model (a directory, or a name in a mounted HF cache) that shares the "
                    "target's tokenizer, instead of cutting layers from the target")
    layers: int = Field(default=2, ge=1, description="first N decoder layers of the target")
    vocab_size: int | None = Field(
        default=16384, ge=512,
        description="keep the N most frequent tokens of the training data in the drafter's vocabulary "
                    "(served with use_heterogeneous_vocab); null keeps the full vocabulary")

    # --- data ---
    max_prompts_per_task: int | None = Field(default=None, ge=1, description="cap on train prompts per task")
    top_k: int = Field(default=8, ge=1, le=20, description="target log-probabilities kept per token (soft targets)")
    max_seq_len: int = Field(default=512, ge=32, description="longer prompts keep their last tokens in training")
    holdout_fraction: float = Field(default=0.05, gt=0, lt=0.5,
                                    description="train prompts held out to measure top-1 agreement")

    # --- optimisation ---
    learning_rate: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="cosine decay floor, as a share of the peak")
    warmup_steps: int = Field(default=20, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_tokens: int = Field(default=4096, ge=64, description="padded tokens per optimiser step")
    hard_weight: float = Field(default=0.0, ge=0, le=1,
                               description="weight of cross-entropy on the target's greedy token; "
                                           "the rest is soft cross-entropy on its top-k")
    freeze_embedding: bool = False

    # --- budget, in optimiser steps or trained tokens, never in time, so that one recipe gives one drafter on
    # any machine; training stops at whichever is spent first, and the learning-rate schedule follows it ---
    max_steps: int | None = Field(default=400, ge=1)
    max_train_tokens: int | None = Field(default=None, ge=1,
                                         description="response tokens trained on (each step counts its batch's)")
    eval_every_steps: int = Field(default=50, ge=1)

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _no_wall_clock_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_minutes" in data:
            raise ValueError("max_minutes is no longer a budget (the same recipe must give the same drafter on "
                             "any machine): give max_steps or max_train_tokens instead")
        return data

    @model_validator(mode="after")
    def _some_budget(self) -> "Recipe":
        if self.max_steps is None and self.max_train_tokens is None:
            raise ValueError("the recipe needs a budget: max_steps, max_train_tokens or both")
        return self


# The CI build: same code, a few minutes on 2 cores (tests use it).
REDUCED_RECIPE = {
    "layers": 1,
    "vocab_size": 4096,
    "max_prompts_per_task": 8,
    "top_k": 4,
    "max_seq_len": 256,
    "holdout_fraction": 0.25,
    "batch_tokens": 1024,
    "max_steps": 30,
    "eval_every_steps": 10,
}

SHAPE_FIELDS = ("base_model", "layers", "vocab_size")


def recipe_for(drafter: DrafterConfig) -> Recipe:
    """The drafter's validated recipe; errors name the drafter and the field."""
    try:
        recipe = Recipe.model_validate(drafter.recipe)
    except ValidationError as err:
        first = err.errors()[0]
        where = "".join(f".{p}" for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"drafters.{drafter.name}.recipe{where}: {message}") from None
    if drafter.init != "target":
        fixed = [f for f in SHAPE_FIELDS if f in recipe.model_fields_set]
        if fixed:
            raise ConfigError(f"drafters.{drafter.name}.recipe.{fixed[0]}: a drafter fine-tuned from "
                              f"{drafter.init!r} inherits its shape; remove this field")
    return recipe
