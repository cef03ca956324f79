"""Read a run directory into tables (the file contract is in analysis/__init__)."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from analysis.cells import ALL
from analysis.schema import ArmInfo
from core.config import LoadRegime
from core.contracts import (OK, RECORD_COLUMNS, RECORDS_TABLE, TAG_MISSING, RunFiles, WorkloadFileError,
                            read_records, read_workload, stratum_key, training_window)

NUMERIC_COLUMNS = (
    "t_start", "t_first_token", "t_end", "ttft_s", "e2e_s", "tpot_s", "prompt_tokens", "completion_tokens",
    "max_tokens", "temperature", "spec_drafts", "spec_draft_tokens", "spec_accepted_tokens", "http_status",
)
WORKLOAD_COLUMNS = ["prompt_id", "task", "split", "prompt_tokens", "ref_tokens", "control_task", "control_like"]
TEXT_COLUMNS = ("arm", "task", "stratum", "prompt_id", "regime", "status", "request_id")  # never null


class RunDirError(Exception):
    """A run directory the analysis cannot read; the message says what is missing."""


@dataclass(frozen=True)
class ReplayData:
    """The replay of one run: the target's greedy output for every replayed
    prompt, and each drafter's teacher-forced match vector over it."""

    # One row per replayed prompt: prompt_id, task, stratum, is_control, prompt_tokens (len(prompt_ids)).
    prompts: pd.DataFrame
    targets: dict[str, dict]  # prompt id -> its targets.jsonl line
    matches: dict[str, dict[str, tuple[str, str]]]  # drafter -> prompt id -> (match, in_vocab)
    info: dict  # replay.json
    k: list[int]  # the K list to replay (config replay.k, else replay.json's)
    max_model_len: int | None
    # EAGLE-3 heads only: drafter -> prompt id -> one match string per draft depth (docs/formats.md).
    depth_matches: dict[str, dict[str, list[str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Drafter:
    name: str
    init: str
    tasks: list[str] | str
    # {"prompt": [...], "output": [...], "total": [...]} of its training split as the drafter saw them (cut to
    # its training window, core.contracts.training_window); empty when no card.
    lengths: dict[str, list[int]] = field(default_factory=dict)
    window: int | None = None  # the recipe's max_seq_len; None: the card does not say (lengths uncut)
    recipe: dict = field(default_factory=dict)  # as the card (else the config) gives it: seed, budget
    # From the card only (empty or None without one): its build's wall time, steps and output vocabulary.
    build_seconds: dict = field(default_factory=dict)  # {"responses", "training", "total"}
    training_steps: int | None = None
    vocabulary: int | None = None  # tokens it drafts over (a trimmed vocabulary's size)


@dataclass
class RunData:
    path: Path
    run_id: str
    name: str
    baseline: str
    arms: list[ArmInfo]  # config order, then arms seen only in the records
    regimes: list[str]  # load order
    regime_plans: dict[str, str]  # label -> how arms were scheduled (from the config)
    drafters: dict[str, Drafter]
    # All records sorted by (t_start, request_id), their task and stratum as the requests were tagged.
    records: pd.DataFrame
    # One row per prompt: prompt_id, task, stratum, is_control, control_task, control_like, prompt_tokens.
    prompts: pd.DataFrame
    cost: dict
    cost_sweep: dict  # cost.json's k_sweep: {arm: {"points": [{"k", "r", ...}], "fit": {"c", "v"}, "method"}}
    dead_arms: dict[str, str]  # from state.json: arm -> why the runner gave up on it
    # Each task's natural lengths: {task: {"prompt_tokens": [...], "ref_tokens": [...]}} (see _dataset_lengths)
    dataset_lengths: dict[str, dict[str, list[int]]]
    dataset_lengths_source: str | None
    environment: dict
    target_dtype: str | None
    temperature: float | None
    files: dict[str, bool]
    replay: ReplayData | None = None  # None: no replay in this run
    prompt_strata: list[int] = field(default_factory=lambda: [0, 64, 256, 1024])  # config workload.prompt_strata
    output_strata: list[int] | None = None
    design: dict = field(default_factory=dict)  # the config's design section (generic, crossover)
    preregistration: bytes | None = None  # the run's copy of the pre-registration file, as written

    @property
    def ok(self) -> pd.DataFrame:
        return self.records[self.records["status"] == OK]

    def arm(self, name: str) -> ArmInfo:
        return next(a for a in self.arms if a.name == name)

    @property
    def speculative_arms(self) -> list[ArmInfo]:
        return [a for a in self.arms if a.is_speculative(self.baseline)]


# --- scopes: which prompts a cell covers ------------------------------------

def select(frame: pd.DataFrame, regime: str | None, task: str, stratum: str) -> pd.DataFrame:
    """The rows of one scope of a per-prompt frame (task, stratum, is_control; regime unless None)."""
    mask = pd.Series(True, index=frame.index) if regime is None else frame["regime"] == regime
    mask &= ~frame["is_control"] if task == ALL else frame["task"] == task
    if stratum != ALL:
        mask &= frame["stratum"] == stratum
    return frame[mask]


def scopes(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """(all, all), then per task (tasks, then controls): (task, all) and each stratum."""
    found = [(ALL, ALL)]
    tasks = frame.drop_duplicates("task").sort_values(["is_control", "task"])
    for task in tasks["task"]:
        found.append((task, ALL))
        strata = frame.loc[frame["task"] == task, "stratum"].unique()
        found += [(task, s) for s in sorted(strata, key=stratum_key)]
    return found


def finetune_pairs(run: RunData) -> list[tuple[str, str, str]]:
    """(fine-tuned arm, generic arm, fine-tuned drafter): a drafter arm whose
    drafter was initialised from the drafter of another arm."""
    by_drafter = {a.drafter: a.name for a in run.arms if a.drafter}
    pairs = []
    for arm in run.arms:
        drafter = run.drafters.get(arm.drafter) if arm.drafter else None
        if drafter and drafter.init in by_drafter:
            pairs.append((arm.name, by_drafter[drafter.init], drafter.name))
    return pairs


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from None


def _read_records(path: Path, replay_only: bool = False) -> pd.DataFrame:
    """The records, sorted; none at all only in a replay-only run (`specdrift replay`)."""
    if not path.is_file() and not replay_only:
        raise RunDirError(f"{path}: no records database (the run wrote no requests?)")
    try:
        rows = read_records(path) if path.is_file() else []
    except sqlite3.Error as err:
        raise RunDirError(f"{path}: cannot read table {RECORDS_TABLE!r} ({err})") from None
    if not rows and not replay_only:
        raise RunDirError(f"{path}: table {RECORDS_TABLE!r} is empty: the run recorded no request")
    frame = pd.DataFrame(rows, columns=list(RECORD_COLUMNS))
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in TEXT_COLUMNS:
        frame[column] = frame[column].fillna(TAG_MISSING).astype(str)
    frame["accepted_per_pos"] = [_int_list(v) for v in frame["spec_accepted_per_pos"]]
    return frame.sort_values(["t_start", "request_id"], kind="mergesort").reset_index(drop=True)


def _int_list(value) -> list[int]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    items = json.loads(value) if isinstance(value, str) else value
    return [int(x) for x in items]


def _read_workload(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        rows = read_workload(path)
    except WorkloadFileError as err:
        raise RunDirError(str(err)) from None
    table = []
    for row in rows:
        control = row.get("control") or {}
        table.append([str(row["id"]), row["task"], row["split"], row.get("prompt_tokens"), row.get("ref_tokens"),
                      control.get("task"), control.get("like")])
    return pd.DataFrame(table, columns=WORKLOAD_COLUMNS)


def _dataset_lengths(files: RunFiles, workload: pd.DataFrame | None) -> tuple[dict, str | None]:
    """Each task's own (unstratified) lengths: every prompt the workload kept
    (workload.build.json), else its train split, a seeded random half of them."""
    built = _read_json(files.workload_build, {}).get("lengths")
    if built:
        return built, f"{files.workload_build.name}: every prompt the workload kept"
    if workload is None:
        return {}, None
    train = workload[(workload["split"] == "train") & workload["control_task"].isna()]
    lengths = {task: {"prompt_tokens": [int(v) for v in rows["prompt_tokens"].dropna()],
                      "ref_tokens": [int(v) for v in rows["ref_tokens"].dropna()]}
               for task, rows in train.groupby("task", sort=True)}
    return lengths, (f"{files.workload.name} train split: a seeded random half of the prompts kept" if lengths
                     else None)


def _prompts(records: pd.DataFrame, workload: pd.DataFrame | None) -> pd.DataFrame:
    """Every prompt that was sent, with its task and stratum as its requests were
    tagged, and from the workload what the records lack: whether it is a
    length-matched control, and its prompt length (the records' where the
    workload has none)."""
    answered_first = pd.concat([records[records["status"] == OK], records[records["status"] != OK]])
    sent = answered_first.drop_duplicates("prompt_id")[["prompt_id", "task", "stratum", "prompt_tokens"]].copy()
    if workload is not None:
        known = workload.drop_duplicates("prompt_id").set_index("prompt_id")
        from_workload = sent["prompt_id"].map(known["prompt_tokens"])
        sent["prompt_tokens"] = from_workload.where(from_workload.notna(), sent["prompt_tokens"])
        sent["control_task"] = sent["prompt_id"].map(known["control_task"])
        sent["control_like"] = sent["prompt_id"].map(known["control_like"])
    else:
        sent = sent.assign(control_task=None, control_like=None)
    # A control's task is its own ("A-like-B"), so it is analysed apart from A's prompts.
    sent["is_control"] = sent["control_task"].notna() & sent["control_like"].notna()
    sent["prompt_tokens"] = pd.to_numeric(sent["prompt_tokens"], errors="coerce")
    return sent.sort_values("prompt_id").reset_index(drop=True)


def _regime_plans(regimes: list[dict]) -> dict[str, str]:
    """{label: how the runner schedules arms in it}, in load order."""
    plans = {}
    for raw in regimes:
        regime = LoadRegime.model_validate(raw)
        for step, label in zip(regime.steps or [regime], regime.step_labels()):
            if step.kind == "sequential":
                plan = "one request at a time; each prompt to every arm in rotating order"
                plan += ", the baseline twice" if regime.kind == "sequential" else ""
            else:
                plan = (f"arms alternate in blocks of {regime.block_seconds:g} s; each arm is sent the prompts "
                        "in the same order (its own cursor), so arms pair by prompt")
            plans.setdefault(label, plan)
    return plans


def _arms(config: dict, records: pd.DataFrame) -> list[ArmInfo]:
    arms = []
    for raw in config.get("arms") or []:
        spec = raw.get("speculative") or {}
        arms.append(ArmInfo(raw["name"], spec.get("method"), spec.get("num_speculative_tokens"),
                            spec.get("drafter"), spec.get("prompt_lookup_min"), spec.get("prompt_lookup_max")))
    known = {a.name for a in arms}
    for name in sorted(set(records["arm"]) - known):
        arms.append(ArmInfo(name, None, None, None))
    return arms


def _drafters(files: RunFiles, config: dict) -> dict[str, Drafter]:
    drafters = {}
    names = sorted(d.name for d in files.drafters.iterdir()) if files.drafters.is_dir() else []
    cards = {name: _read_json(files.drafter_card(name), {}) for name in names if files.drafter_card(name).is_file()}
    configured = {d["name"]: d for d in config.get("drafters") or []}
    for name in sorted(set(cards) | set(configured)):
        card, conf = cards.get(name, {}), configured.get(name, {})
        raw = (card.get("training_data") or {}).get("lengths") or {}
        lengths = {kind: [int(x) for x in raw.get(kind) or []] for kind in ("prompt", "output")}
        window = (card.get("recipe") or {}).get("max_seq_len")
        shape = card.get("shape") or {}
        if lengths["prompt"] and len(lengths["prompt"]) == len(lengths["output"]):
            if window:  # what training saw: an example without output tokens was not trained on at all
                seen = [training_window(p, o, int(window)) for p, o in zip(lengths["prompt"], lengths["output"])]
                lengths = {"prompt": [p for p, o in seen if o], "output": [o for _, o in seen if o]}
            lengths["total"] = [p + o for p, o in zip(lengths["prompt"], lengths["output"])]
        lengths = {k: v for k, v in lengths.items() if v}
        drafters[name] = Drafter(
            name=name, init=card.get("init") or conf.get("init") or "target",
            tasks=card.get("tasks") or conf.get("tasks") or "all", lengths=lengths,
            window=int(window) if window else None,
            recipe=card.get("recipe") or conf.get("recipe") or {},
            build_seconds=card.get("build_seconds") or {},
            training_steps=(card.get("training") or {}).get("steps"),
            vocabulary=shape.get("draft_vocab_size") or shape.get("vocab_size"),
        )
    return drafters


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise RunDirError(f"{path}:{number}: not JSON ({err.msg})") from None
    return rows


def _read_replay(files: RunFiles, config: dict, prompts: pd.DataFrame) -> ReplayData | None:
    """The replay's files, or None when the run has no replay targets. A
    prompt's task and stratum come from its targets line; whether it is a
    control, from the replay workload (else the served workload)."""
    if not files.replay_targets.is_file():
        return None
    targets = {}
    for row in _jsonl(files.replay_targets):
        missing = {"id", "task", "stratum", "prompt_ids", "output_ids", "served_tokens"} - set(row)
        if missing:
            raise RunDirError(f"{files.replay_targets}: a line lacks {', '.join(sorted(missing))}")
        targets[str(row["id"])] = row
    if not targets:
        return None
    matches: dict[str, dict[str, tuple[str, str]]] = {}
    depth_matches: dict[str, dict[str, list[str]]] = {}
    if files.replay_matches.is_file():
        for row in _jsonl(files.replay_matches):
            target = targets.get(str(row["id"]))
            if target is None:
                continue
            if len(row["match"]) != len(target["output_ids"]):
                raise RunDirError(f"{files.replay_matches}: {row['drafter']}/{row['id']}: match has "
                                  f"{len(row['match'])} positions, the target output {len(target['output_ids'])}")
            matches.setdefault(row["drafter"], {})[str(row["id"])] = (row["match"], row.get("in_vocab") or "")
            if "depth_match" in row:
                if any(len(d) != len(target["output_ids"]) for d in row["depth_match"]):
                    raise RunDirError(f"{files.replay_matches}: {row['drafter']}/{row['id']}: a depth_match string "
                                      f"is not {len(target['output_ids'])} positions long, as the target output")
                depth_matches.setdefault(row["drafter"], {})[str(row["id"])] = list(row["depth_match"])
    controls = set(prompts.loc[prompts["is_control"], "prompt_id"])
    if files.replay_workload.is_file():
        try:
            controls |= {str(r["id"]) for r in read_workload(files.replay_workload) if r.get("control")}
        except WorkloadFileError as err:
            raise RunDirError(str(err)) from None
    table = pd.DataFrame([[pid, t["task"], str(t["stratum"]), pid in controls, len(t["prompt_ids"])]
                          for pid, t in targets.items()],
                         columns=["prompt_id", "task", "stratum", "is_control", "prompt_tokens"])
    info = _read_json(files.replay_info, {})
    k = (config.get("replay") or {}).get("k") or info.get("k") or [1, 2, 3, 4]
    max_model_len = info.get("max_model_len") or (config.get("target") or {}).get("max_model_len")
    return ReplayData(prompts=table.sort_values("prompt_id").reset_index(drop=True), targets=targets,
                      matches=matches, info=info, k=sorted({int(x) for x in k}),
                      max_model_len=int(max_model_len) if max_model_len else None, depth_matches=depth_matches)


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory")
    files = RunFiles(run_dir)
    config = yaml.safe_load(files.config.read_text()) if files.config.is_file() else {}
    records = _read_records(files.records, replay_only=files.replay_targets.is_file())
    workload = _read_workload(files.workload)
    plans = _regime_plans(config.get("regimes") or [])
    regimes = list(plans) + sorted(set(records["regime"]) - set(plans))
    run_ids = sorted(set(records["run_id"].dropna().astype(str)) - {TAG_MISSING})
    dataset_lengths, dataset_source = _dataset_lengths(files, workload)
    prompts = _prompts(records, workload)
    strata = config.get("workload") or {}
    return RunData(
        path=run_dir,
        run_id=",".join(run_ids) or run_dir.name,
        name=config.get("name") or run_dir.name,
        baseline=config.get("baseline_arm") or "baseline",
        arms=_arms(config, records),
        regimes=regimes,
        regime_plans=plans,
        drafters=_drafters(files, config),
        records=records,
        prompts=prompts,
        cost=_read_json(files.cost, {}).get("arms") or {},
        cost_sweep=_read_json(files.cost, {}).get("k_sweep") or {},
        dead_arms=_read_json(files.state, {}).get("dead_arms") or {},
        dataset_lengths=dataset_lengths,
        dataset_lengths_source=dataset_source,
        environment=_read_json(files.environment, {}),
        target_dtype=(config.get("target") or {}).get("dtype"),
        temperature=config.get("temperature"),
        files={path.name: path.exists() for path in (files.config, files.workload, files.workload_build,
                                                     files.environment, files.state, files.cost, files.drafters,
                                                     files.replay_targets)},
        replay=_read_replay(files, config, prompts),
        prompt_strata=[int(e) for e in strata.get("prompt_strata") or [0, 64, 256, 1024]],
        output_strata=[int(e) for e in strata["output_strata"]] if strata.get("output_strata") else None,
        design=config.get("design") or {},
        preregistration=files.preregistration.read_bytes() if files.preregistration.is_file() else None,
    )
