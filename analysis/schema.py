"""results.json as types, for reading it: `Results.from_dict(results)`.

compute_results (analysis/results.py) writes results.json as a plain dict;
the summary, the report, the figures and `compare` read it through these
classes instead of nested string keys. A class models the fields somebody
reads; every instance keeps the dict it was built from as `raw`, so nothing
unmodelled is lost (compare.json passes estimates on as they are).
Building converts no value: an int stays an int, a missing optional field
reads as its default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from analysis.cells import ALL, cell_key


@cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(hint, value):
    """`value` (parsed JSON) as `hint` says: dataclasses from dicts, into lists,
    dicts and optionals; anything else as it is."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _build(options[0], value) if len(options) == 1 else value
    if origin is list:
        (item,) = typing.get_args(hint)
        return [_build(item, v) for v in value]
    if origin is dict:
        _, item = typing.get_args(hint)
        return {k: _build(item, v) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Section):
        return hint.from_dict(value)
    return value


@dataclass(frozen=True)
class Section:
    """A part of results.json; `raw` is the dict it was read from. Each
    subclass is a frozen dataclass of the fields it models."""

    raw: dict = field(default_factory=dict, repr=False, compare=False, kw_only=True)

    @classmethod
    def from_dict(cls, data: dict):
        values = {}
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "raw":
                continue
            if f.name in data:
                values[f.name] = _build(hints[f.name], data[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyError(f"{cls.__name__}: results.json lacks {f.name!r}")
        return cls(**values, raw=data)


# --- the run -------------------------------------------------------------------------

@dataclass(frozen=True)
class ArmInfo(Section):
    """An arm as configured (rundir reads it from the config; results.json's run.arms)."""

    name: str
    method: str | None  # None: no speculation
    num_speculative_tokens: int | None
    drafter: str | None
    prompt_lookup_min: int | None = None  # n-gram arms, as configured (None: vLLM's default)
    prompt_lookup_max: int | None = None

    def is_speculative(self, baseline: str) -> bool:
        """The one definition of a speculative arm: it speculates and is not the baseline."""
        return bool(self.method) and self.name != baseline


@dataclass(frozen=True)
class RunInfo(Section):
    run_id: str
    name: str
    baseline_arm: str
    arms: list[ArmInfo]
    regimes: list[str]  # measured, in load order
    primary_regime: str | None
    regime_plans: dict[str, str]
    target_dtype: str | None
    temperature: float | None
    duration_s: float | None

    @property
    def speculative_arms(self) -> list[ArmInfo]:
        return [a for a in self.arms if a.is_speculative(self.baseline_arm)]


@dataclass(frozen=True)
class Coverage(Section):
    prompts_sent: int  # to this arm in this regime
    prompts_ok: int  # of which answered ok
    baseline_prompts_without_answer: int  # so unpaired


@dataclass(frozen=True)
class Inputs(Section):
    records: int
    arms_without_records: list[str]
    dead_arms: dict[str, str]
    requests_by_status: dict[str, dict[str, dict[str, int]]]  # arm -> regime -> status -> requests
    coverage: dict[str, dict[str, Coverage]]  # arm -> regime


@dataclass(frozen=True)
class Bootstrap(Section):
    kind: str
    resamples: int
    level: float
    base_seed: int
    unit: str
    min_units_for_ci: int
    small_sample: int


@dataclass(frozen=True)
class Methods(Section):
    bootstrap: Bootstrap
    pairing: str  # each one a sentence for the methods section
    speedup: str
    alpha: str
    significant_digits: int  # of every float in results.json


# --- cells ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate(Section):
    """A value over n units with its 95% interval (a speed-up, a gain, a slope)."""

    n: int  # units (prompts; cells for a fit)
    value: float | None  # None below the minimum units
    ci: list[float] | None  # [low, high]
    n_reference: int | None = None  # an unpaired speed-up: the baseline's prompts


@dataclass(frozen=True)
class Spearman(Section):
    n: int
    rho: float | None
    p: float | None


@dataclass(frozen=True)
class Latency(Section):
    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    completion_tokens: float | None


@dataclass(frozen=True)
class Speedup(Section):
    reference: str
    paired: bool
    tpot: Estimate
    e2e: Estimate
    median_gap_s: float | None


@dataclass(frozen=True)
class Share(Section):
    """Prompts whose output equals the reference's."""

    compared: int
    identical: int
    share: float | None
    ci: list[float] | None


@dataclass(frozen=True)
class Lossless(Share):
    baseline_self: Share | None = None  # the baseline against its own repeat, same scope


@dataclass(frozen=True)
class Acceptance(Section):
    drafts: int
    tau: float | None
    tau_ci: list[float] | None
    tokens_per_step: float | None
    drafting_share: float | None
    vllm_rate: float | None
    position_rate: list[float]
    conditional: list[float | None]
    alpha: float | None
    alpha_from_tau: float | None


@dataclass(frozen=True)
class Model(Section):
    """The Leviathan model's prediction for one cell."""

    alpha: float
    gamma: int
    c: float
    drafting_share: float
    expected_tokens_per_step: float
    cost_factor: float
    predicted_speedup: float
    predicted_speedup_from_measured_tokens: float
    measured_speedup: float | None


@dataclass(frozen=True)
class Cell(Section):
    arm: str
    regime: str
    task: str
    stratum: str
    prompts: int
    requests: int
    latency: Latency
    speedup: Speedup
    lossless: Lossless
    acceptance: Acceptance | None = None  # speculative arms only
    model: Model | None = None

    @property
    def key(self) -> tuple:
        return cell_key(self.arm, self.regime, self.task, self.stratum)


@dataclass(frozen=True)
class Cost(Section):
    c: float | None
    source: str
    method: str
    draft_step_s: float | None = None
    target_step_s: float | None = None


# --- lengths and the answer -------------------------------------------------------------

@dataclass(frozen=True)
class Divergence(Section):
    """Two length samples compared: JS, W1, KS (None when a sample is empty)."""

    js: float | None
    w1: float | None
    ks: float | None


@dataclass(frozen=True)
class LengthSummary(Section):
    n: int
    median: float | None


@dataclass(frozen=True)
class DivergenceMethod(Section):
    js_log_base: int  # 2: JS in bits, in [0, 1]
    bins_per_doubling: int  # of the shared log-spaced length bins
    task_lengths: str  # where each task's own lengths came from


@dataclass(frozen=True)
class DatasetDivergence(Section):
    tasks: list[str]
    matrices: dict[str, dict[str, list[list[float | None]]]]  # kind -> measure -> matrix
    source: str | None


@dataclass(frozen=True)
class Divergences(Section):
    method: DivergenceMethod
    tasks: list[str]
    task_lengths: dict[str, dict[str, LengthSummary]]  # task -> kind
    matrices: dict[str, dict[str, list[list[float | None]]]]  # kind -> measure -> task x task
    datasets: DatasetDivergence | None
    drafters: dict[str, dict[str, dict[str, Divergence]]]  # drafter -> task -> kind


@dataclass(frozen=True)
class Fit(Section):
    spearman: Spearman
    slope: Estimate
    slope_within_task: Estimate | None = None  # on the headline measure only
    slope_within_stratum: Estimate | None = None


@dataclass(frozen=True)
class GainRow(Section):
    """The fine-tuned arm against the generic one in one (task, stratum)."""

    task: str
    stratum: str
    is_control: bool
    speed_ratio: Estimate
    log_speed_ratio: float | None
    tau_gain: Estimate
    divergence_finetune: dict[str, Divergence]  # kind -> from the fine-tuning split
    divergence_generic: dict[str, Divergence]

    def gain(self, name: str) -> float | None:
        """One of cells.GAINS."""
        return self.log_speed_ratio if name == "log_speed_ratio" else self.tau_gain.value


@dataclass(frozen=True)
class Answer(Section):
    finetuned_arm: str
    generic_arm: str
    drafter: str
    regime: str | None
    finetune_tasks: list[str] | str
    rows: list[GainRow]
    fits: dict[str, Fit]  # cells.fit_key(gain, measure, kind)
    missing: str | None = None  # why this pair is not answered
    cells_in_fit: int | None = None


@dataclass(frozen=True)
class PromptMatch(Section):
    control_vs_like: Divergence  # the control's prompt lengths against the task it imitates
    task_vs_like: Divergence  # the source task's own, for contrast
    reference: str  # which lengths stand for the imitated task


@dataclass(frozen=True)
class ControlArm(Section):
    speedup_tpot: Estimate  # in the control's cell
    tau: float | None  # its acceptance length there
    tau_ci: list[float] | None  # and the interval


@dataclass(frozen=True)
class ControlGain(Section):
    speed_ratio: Estimate
    tau_gain: Estimate


@dataclass(frozen=True)
class Control(Section):
    """A length-matched control: `task` prompts resampled to `like`'s lengths, analysed as `label`."""

    label: str
    task: str
    like: str
    prompt_divergence: PromptMatch
    arms: dict[str, dict[str, ControlArm | None]]  # arm -> task, control or like -> its cell
    gains: dict[str, dict[str, ControlGain | None]]  # fine-tuned arm -> task, control or like


# --- regimes and drift -------------------------------------------------------------------

@dataclass(frozen=True)
class RegimePoint(Section):
    regime: str
    paired: bool
    tpot: Estimate
    e2e: Estimate


@dataclass(frozen=True)
class RegimeCurve(Section):
    """An arm's speed-up across the load regimes."""

    points: list[RegimePoint]
    crosses_between: list[str] | None
    status: str  # crosses, above, below, at, no data


@dataclass(frozen=True)
class Drift(Section):
    n: int
    span_min: float
    percent_over_span: float | None
    ci: list[float | None]
    spearman: Spearman


# --- the replay (analysis/replayed.py) -------------------------------------------------------

@dataclass(frozen=True)
class ReplayArm(Section):
    method: str
    drafter: str | None
    served_k: int
    ks: list[int]  # replayed K values (config replay.k and the served K)
    prompts: int  # replayed prompts of this arm


@dataclass(frozen=True)
class ReplayAcceptance(Section):
    """Replayed acceptance of one arm at one K in one (task, stratum); 'all' rows post-stratified."""

    arm: str
    k: int
    served: bool  # k is the arm's served K
    task: str
    stratum: str
    n: int  # prompts
    drafts: int
    draft_tokens: int
    accepted_tokens: int
    tau: float | None
    tau_ci: list[float] | None
    interval: str  # which interval tau_ci is
    small_n: bool
    position_rate: list[float]
    conditional: list[float | None]
    tokens_per_step: float | None
    drafting_share: float | None
    oov_share: float | None  # draft-model arms: served output tokens outside the drafter's vocabulary
    weights: str  # how prompts were weighted
    natural_share_covered: float | None = None
    alpha: float | None = None
    vllm_rate: float | None = None


@dataclass(frozen=True)
class YRow(Section):
    """y = log(tau_ft / tau_gen) per prompt, in one (task, stratum) at one K."""

    k: int
    served: bool
    task: str
    stratum: str
    n: int
    excluded: int  # prompts where either arm drafted nothing
    small_n: bool
    mean_y: float | None
    ci: list[float] | None
    ratio: float | None  # exp(mean y)
    ratio_ci: list[float] | None
    tau_ft: float | None
    tau_gen: float | None
    weights: str


@dataclass(frozen=True)
class ReplayFinetune(Section):
    finetuned_arm: str
    generic_arm: str
    drafter: str
    rows: list[YRow]


# issue 12: replay["inference"] (analysis/inference.py)
@dataclass(frozen=True)
class SlopeFit(Section):
    """A slope of y on the length shift x with its t interval."""

    model: str  # what was fitted (a fallback says so here and in `fallback`)
    n: int  # prompts
    slope: float | None
    se: float | None
    df: float | None  # of the t quantile
    ci: list[float] | None
    p: float | None
    excludes_zero: bool
    fallback: str | None = None  # why the intended model was not the one fitted
    task_variance: float | None = None
    stratum_variance: float | None = None
    cell_variance: float | None = None
    residual_variance: float | None = None


@dataclass(frozen=True)
class PermutationTest(Section):
    """The task-level permutation test of the between-task slope."""

    tasks: int
    statistic: str
    slope: float | None
    p: float | None
    permutations: int
    exact: bool | None  # every distinct permutation, or seeded draws
    min_p: float | None  # the smallest p this many tasks can give
    can_reach_alpha: bool  # min_p <= 0.05
    note: str | None = None


@dataclass(frozen=True)
class InferencePair(Section):
    finetuned_arm: str
    generic_arm: str
    drafter: str
    k: int  # the fine-tuned arm's served K
    mixture_prompts: int  # training prompts of the drafter and its init chain
    mixture_log_mean: float | None
    mixture_log_sd: float | None
    n: int | None = None
    tasks: int | None = None
    cells: int | None = None
    mixed: SlopeFit | None = None
    within_task: SlopeFit | None = None
    permutation: PermutationTest | None = None
    missing: str | None = None  # why there is no fit


@dataclass(frozen=True)
class ReplayInference(Section):
    y: str
    covariate: str
    confounded: str  # what the design can and cannot say
    level: float
    pairs: list[InferencePair]


@dataclass(frozen=True)
class Agreement(Section):
    n: int
    count: int
    share: float | None
    ci: list[float] | None


@dataclass(frozen=True)
class ValidationArm(Section):
    """The replay against one arm's sequentially served requests, at the served K."""

    k: int
    n: int
    not_replayed: int
    accepted_exact: Agreement
    accepted_within_1: Agreement
    drafts_exact: Agreement
    identical_outputs: int
    identical_exact: Agreement
    identical_within_1: Agreement
    tau_served: float | None
    tau_replayed: float | None
    gap: float | None  # served - replayed
    gap_ci: list[float] | None
    interval: str
    verdict: str  # agrees, disagrees, not validated


@dataclass(frozen=True)
class Validation(Section):
    regime: str
    dtype: str | None
    rule: str
    baseline_self: Share | None
    arms: dict[str, ValidationArm]


@dataclass(frozen=True)
class CostArm(Section):
    method: str
    gamma: int
    r: Estimate
    tokens_per_step: float
    speedup: float
    c: float | None
    c_ci: list[float] | None
    c_n: int
    served_alone_c: float | None  # cost.json's, labelled apart


@dataclass(frozen=True)
class CostCell(Section):
    arm: str
    task: str
    stratum: str
    tokens_per_step: float
    speedup: float
    r: Estimate
    c: float | None


@dataclass(frozen=True)
class KSweep(Section):
    arms: list[str]
    source: str  # served arms, or the timed K sweep of cost.json
    gammas: list[int]
    r: list[float]
    c: float
    v: float


@dataclass(frozen=True)
class CostModel(Section):
    regime: str
    definition: str
    assumption: str
    v: Estimate | None
    v_arms: list[str]
    arms: dict[str, CostArm]
    cells: list[CostCell]
    k_sweep: dict[str, KSweep]  # drafter -> fit
    served_alone: str


# issue 16: replay["kinds"] (analysis/kinds.py)
@dataclass(frozen=True)
class KindRow(Section):
    arm: str
    kind: str  # draft_model | eagle3
    drafter: str
    k: int | None
    init: str | None
    tau: float | None  # replayed, all tasks, served K
    tau_ci: list[float] | None
    tokens_per_step: float | None
    served_speedup: float | None  # TPOT, sequential regime (the cost model's)
    r: Estimate | None
    c: float | None
    build_minutes: float | None  # the card's build wall time
    training_steps: int | None
    vocabulary: int | None


@dataclass(frozen=True)
class KindRatio(Section):
    arm: str
    kind: str
    reference: str
    reference_kind: str
    r_ratio: Estimate


@dataclass(frozen=True)
class Kinds(Section):
    kinds: list[str]
    rows: list[KindRow]
    ratios: list[KindRatio]
    definition: str


@dataclass(frozen=True)
class ProjectedRatio(Section):
    label: str
    r: float
    speedup: float | None
    break_even_tau: float | None


@dataclass(frozen=True)
class ProjectionRow(Section):
    arm: str
    task: str
    stratum: str
    k: int
    tau: float | None
    tau_ci: list[float] | None
    tokens_per_step: float | None
    drafting_share: float | None
    ratios: list[ProjectedRatio]


@dataclass(frozen=True)
class Projection(Section):
    label: str  # always "projection"
    note: str
    rows: list[ProjectionRow]


@dataclass(frozen=True)
class Binned(Section):
    edges: list[int]
    n: list[int]
    rate: list[float | None]


@dataclass(frozen=True)
class Profile(Section):
    position: Binned  # by output position t
    context: Binned  # by context length prompt_tokens + t


@dataclass(frozen=True)
class Replay(Section):
    info: dict
    methods: dict[str, str]
    coverage: list[dict]
    arms: dict[str, ReplayArm]
    acceptance: list[ReplayAcceptance]
    finetune: list[ReplayFinetune]
    validation: Validation | None
    cost_model: CostModel | None
    projection: Projection
    profiles: dict[str, Profile]
    inference: ReplayInference | None = None  # issue 12; None without a fine-tuned/generic pair
    kinds: Kinds | None = None  # issue 16; None without a drafter arm

    def rows(self, arm: str | None = None, served: bool | None = True) -> list[ReplayAcceptance]:
        return [r for r in self.acceptance if (arm is None or r.arm == arm) and (served is None or r.served == served)]


# --- the design's hypotheses (issue 12; analysis/hypotheses.py) ---------------------------------

@dataclass(frozen=True)
class Hypothesis(Section):
    id: str
    statement: str
    effect: str  # crossover | matrix.in_domain
    direction: str
    smallest_effect: float
    estimate: float | None
    ci: list[float] | None
    ratio: float | None
    ratio_ci: list[float] | None
    mde: float | None  # minimal detectable effect at the realised n (80% power)
    powered: bool | None
    verdict: str  # confirmed | refuted | inconclusive
    seed_spread: dict | None = None


@dataclass(frozen=True)
class Design(Section):
    k: int
    y: str
    generic: dict
    drafters: list[dict]
    crossover: dict | None
    matrix: dict | None
    preregistration: dict | None
    hypotheses: list[Hypothesis]
    length_claim: str
    identifies_length: bool
    excluded: int = 0


# --- the whole -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Results(Section):
    schema: int
    run: RunInfo
    methods: Methods
    inputs: Inputs
    cells: list[Cell]
    cost: dict[str, Cost]  # speculative arm -> its draft/target cost ratio
    divergence: Divergences
    answer: list[Answer]
    controls: list[Control]
    regimes: dict[str, RegimeCurve]  # speculative arm -> its speed-up across regimes
    drift: dict[str, dict[str, Drift]]  # arm -> regime
    environment: dict
    summary: list[str] = field(default_factory=list)  # absent while the summary is being written
    replay: Replay | None = None  # None: no replay in this run (and schema < 3)
    design: Design | None = None  # None: no design section in the config, or no replay (and schema < 4)

    def __post_init__(self):
        index = {}
        for c in self.cells:
            index.setdefault(c.key, c)
        object.__setattr__(self, "_cells", index)

    def cell(self, arm: str, regime: str | None, task: str = ALL, stratum: str = ALL) -> Cell | None:
        return self._cells.get(cell_key(arm, regime, task, stratum))

    def cells_in(self, regime: str | None, arms: list[str] | None = None, strata: bool = True) -> list[Cell]:
        """The cells of one regime (of some arms; with or without the per-stratum ones), in results order."""
        return [c for c in self.cells if c.regime == regime and (arms is None or c.arm in arms)
                and (strata or c.stratum == ALL)]
