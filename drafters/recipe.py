"""How a drafter is distilled: the `recipe` mapping of a drafter in the config.

Every field has a default, so `recipe: {}` gives the recipe that was measured
best on the CPU default (docs/drafters.md). A draft model (`kind:
draft_model`) takes a `Recipe`, an EAGLE-3 head (`kind: eagle3`) a
`HeadRecipe`: both share the data, optimisation and budget fields of
`_Recipe`; each adds the fields of its own network, and a field of the other
kind is refused by name. Fields that shape the network (SHAPE_FIELDS,
HEAD_SHAPE_FIELDS) apply only to drafters built from the target; a drafter
fine-tuned from another drafter inherits its parent's shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.config import DEFAULT_TTT_STEPS, ConfigError, DrafterConfig


class _Recipe(BaseModel):
    """The fields every drafter's recipe has."""

    model_config = ConfigDict(extra="forbid")

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
    def _some_budget(self) -> "_Recipe":
        if self.max_steps is None and self.max_train_tokens is None:
            raise ValueError("the recipe needs a budget: max_steps, max_train_tokens or both")
        return self


class Recipe(_Recipe):
    """A draft model's recipe: the network is cut from the target (or `base_model`)."""

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
    freeze_embedding: bool = False


class HeadRecipe(_Recipe):
    """An EAGLE-3 head's recipe (drafters/eagle3.py). Its defaults differ from a draft model's where a head
    differs: it starts from random weights, and its output head is the target's unless trimmed."""

    # --- network (init: target only) ---
    vocab_size: int | None = Field(
        default=None, ge=512,
        description="the head's draft vocabulary: the N most frequent tokens of the training data, with its own "
                    "output head (started from the target's rows) and a d2t table; null shares the target's "
                    "output head and vocabulary (as measured in issue 16)")
    aux_layers: list[int] | None = Field(
        default=None, min_length=1,
        description="the target layers whose hidden states the head reads (id L: the residual stream entering "
                    "layer L); null: vLLM's default [2, n // 2, n - 3]")
    norm_before_residual: bool = Field(default=False, description="the residual is the normed hidden state")

    # --- training-time test ---
    ttt_steps: int = Field(default=DEFAULT_TTT_STEPS, ge=1, le=16,
                           description="draft steps unrolled in training; arms may draft up to this many")
    step_decay: float = Field(default=1.0, gt=0, le=1, description="unrolled step j's loss weighs step_decay ** j")

    learning_rate: float = Field(default=1e-3, gt=0, description="a fresh head's random weights; see docs")

    @field_validator("aux_layers")
    @classmethod
    def _distinct_layers(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (len(set(layers)) != len(layers) or min(layers) < 0):
            raise ValueError(f"{layers}: need distinct layer ids, 0 or more")
        return layers


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
# The same for a head (its trimmed vocabulary keeps the reduced build's output head small).
REDUCED_HEAD_RECIPE = {k: v for k, v in REDUCED_RECIPE.items() if k != "layers"}

SHAPE_FIELDS = ("base_model", "layers", "vocab_size")
HEAD_SHAPE_FIELDS = ("vocab_size", "aux_layers", "norm_before_residual")

_KINDS = {"draft_model": (Recipe, SHAPE_FIELDS, "draft models"),
          "eagle3": (HeadRecipe, HEAD_SHAPE_FIELDS, "EAGLE-3 heads")}


def recipe_for(drafter: DrafterConfig) -> Recipe | HeadRecipe:
    """The drafter's validated recipe, of its kind; errors name the drafter and the field."""
    model, shape_fields, _ = _KINDS[drafter.kind]
    for kind, (other, _, plural) in _KINDS.items():
        foreign = sorted(set(drafter.recipe) & (set(other.model_fields) - set(model.model_fields)))
        if kind != drafter.kind and foreign:
            raise ConfigError(f"drafters.{drafter.name}.recipe.{foreign[0]}: a field for {plural} (kind: {kind}), "
                              f"not for this drafter of kind {drafter.kind}; remove it")
    try:
        recipe = model.model_validate(drafter.recipe)
    except ValidationError as err:
        first = err.errors()[0]
        where = "".join(f".{p}" for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"drafters.{drafter.name}.recipe{where}: {message}") from None
    if drafter.init != "target":
        fixed = [f for f in shape_fields if f in recipe.model_fields_set]
        if fixed:
            raise ConfigError(f"drafters.{drafter.name}.recipe.{fixed[0]}: a drafter fine-tuned from "
                              f"{drafter.init!r} inherits its shape; remove this field")
    return recipe
