"""Read a run directory into tables (the file contract is in analysis/__init__)."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

RECORD_COLUMNS = (
    "request_id", "run_id", "arm", "task", "stratum", "prompt_id", "regime", "status", "http_status", "error",
    "finish_reason", "t_start", "t_first_token", "t_end", "ttft_s", "e2e_s", "tpot_s", "prompt_tokens",
    "completion_tokens", "max_tokens", "temperature", "spec_drafts", "spec_draft_tokens", "spec_accepted_tokens",
    "spec_accepted_per_pos", "output_hash", "output_hash_kind",
)
NUMERIC_COLUMNS = (
    "t_start", "t_first_token", "t_end", "ttft_s", "e2e_s", "tpot_s", "prompt_tokens", "completion_tokens",
    "max_tokens", "temperature", "spec_drafts", "spec_draft_tokens", "spec_accepted_tokens", "http_status",
)
OK = "ok"


class RunDirError(Exception):
    """A run directory the analysis cannot read; the message says what is missing."""


@dataclass(frozen=True)
class Arm:
    name: str
    method: str | None  # None: no speculation
    num_speculative_tokens: int | None
    drafter: str | None


@dataclass(frozen=True)
class Drafter:
    name: str
    init: str
    tasks: list[str] | str
    # {"prompt": [...], "output": [...], "total": [...]} of its training split; empty when no card.
    lengths: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class RunData:
    path: Path
    run_id: str
    name: str
    baseline: str
    arms: list[Arm]  # config order, then arms seen only in the records
    regimes: list[str]  # load order
    regime_plans: dict[str, str]  # label -> how arms were scheduled (from the config)
    drafters: dict[str, Drafter]
    # All records sorted by (t_start, request_id), with `group` (the workload's task) added.
    records: pd.DataFrame
    # One row per prompt: prompt_id, group, stratum, is_control, control_task, control_like, prompt_tokens.
    prompts: pd.DataFrame
    cost: dict
    dead_arms: dict[str, str]  # from state.json: arm -> why the runner gave up on it
    # Each task's natural lengths: {task: {"prompt_tokens": [...], "ref_tokens": [...]}} (see _dataset_lengths)
    dataset_lengths: dict[str, dict[str, list[int]]]
    dataset_lengths_source: str | None
    environment: dict
    target_dtype: str | None
    temperature: float | None
    files: dict[str, bool]

    @property
    def ok(self) -> pd.DataFrame:
        return self.records[self.records["status"] == OK]

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    @property
    def speculative_arms(self) -> list[Arm]:
        return [a for a in self.arms if a.method and a.name != self.baseline]


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunDirError(f"{path}: not valid JSON ({err})") from None


def _read_records(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise RunDirError(f"{path}: no records database (the run wrote no requests?)")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        frame = pd.read_sql_query("SELECT * FROM requests", con)
    except (sqlite3.DatabaseError, pd.errors.DatabaseError) as err:
        raise RunDirError(f"{path}: cannot read table 'requests' ({err})") from None
    finally:
        con.close()
    if frame.empty:
        raise RunDirError(f"{path}: table 'requests' is empty: the run recorded no request")
    for column in RECORD_COLUMNS:
        if column not in frame:
            frame[column] = None
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    for column in ("arm", "task", "stratum", "prompt_id", "regime", "status", "request_id"):
        frame[column] = frame[column].fillna("none").astype(str)
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
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        control = row.get("control") or {}
        rows.append({
            "prompt_id": str(row["id"]), "task": row.get("task"), "stratum": row.get("stratum"),
            "split": row.get("split"), "prompt_tokens": row.get("prompt_tokens"), "ref_tokens": row.get("ref_tokens"),
            "control_task": control.get("task"), "control_like": control.get("like"),
        })
    return pd.DataFrame(rows)


def _dataset_lengths(run_dir: Path, workload: pd.DataFrame | None) -> tuple[dict, str | None]:
    """Each task's own (unstratified) lengths: every prompt the workload kept
    (workload.build.json), else its train split, a seeded random half of them."""
    built = _read_json(run_dir / "workload.build.json", {}).get("lengths")
    if built:
        return built, "workload.build.json: every prompt the workload kept"
    if workload is None or "split" not in workload:
        return {}, None
    train = workload[(workload["split"] == "train") & workload["control_task"].isna()]
    lengths = {task: {"prompt_tokens": [int(v) for v in rows["prompt_tokens"].dropna()],
                      "ref_tokens": [int(v) for v in rows["ref_tokens"].dropna()]}
               for task, rows in train.groupby("task", sort=True)}
    return lengths, ("workload.jsonl train split: a seeded random half of the prompts kept" if lengths else None)


def _prompts(records: pd.DataFrame, workload: pd.DataFrame | None) -> pd.DataFrame:
    """Every prompt that was sent, with its group, stratum and prompt length."""
    answered_first = pd.concat([records[records["status"] == OK], records[records["status"] != OK]])
    sent = answered_first.drop_duplicates("prompt_id")[["prompt_id", "task", "stratum", "prompt_tokens"]]
    if workload is not None:
        known = workload.drop_duplicates("prompt_id").set_index("prompt_id")
        sent = sent.copy()
        for column in ("task", "stratum", "prompt_tokens"):
            from_workload = sent["prompt_id"].map(known[column])
            sent[column] = from_workload.where(from_workload.notna(), sent[column])
        sent["control_task"] = sent["prompt_id"].map(known["control_task"])
        sent["control_like"] = sent["prompt_id"].map(known["control_like"])
    else:
        sent = sent.assign(control_task=None, control_like=None)
    sent["is_control"] = sent["control_task"].notna() & sent["control_like"].notna()
    sent["group"] = sent["task"].astype(str)  # a control's task is already its own ("A-like-B")
    sent["prompt_tokens"] = pd.to_numeric(sent["prompt_tokens"], errors="coerce")
    return sent.sort_values("prompt_id").reset_index(drop=True)


def _regime_plans(regimes: list[dict]) -> dict[str, str]:
    """{label: how the runner schedules arms in it}, in load order."""
    from core.config import LoadRegime  # the one definition of a regime's label

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


def _arms(config: dict, records: pd.DataFrame) -> list[Arm]:
    arms = []
    for raw in config.get("arms") or []:
        spec = raw.get("speculative") or {}
        arms.append(Arm(raw["name"], spec.get("method"), spec.get("num_speculative_tokens"), spec.get("drafter")))
    known = {a.name for a in arms}
    for name in sorted(set(records["arm"]) - known):
        arms.append(Arm(name, None, None, None))
    return arms


def _drafters(run_dir: Path, config: dict) -> dict[str, Drafter]:
    drafters = {}
    cards = {p.parent.name: _read_json(p, {}) for p in sorted(run_dir.glob("drafters/*/drafter_card.json"))}
    configured = {d["name"]: d for d in config.get("drafters") or []}
    for name in sorted(set(cards) | set(configured)):
        card, conf = cards.get(name, {}), configured.get(name, {})
        raw = (card.get("training_data") or {}).get("lengths") or {}
        lengths = {kind: [int(x) for x in raw.get(kind) or []] for kind in ("prompt", "output")}
        if lengths["prompt"] and len(lengths["prompt"]) == len(lengths["output"]):
            lengths["total"] = [p + o for p, o in zip(lengths["prompt"], lengths["output"])]
        lengths = {k: v for k, v in lengths.items() if v}
        drafters[name] = Drafter(
            name=name, init=card.get("init") or conf.get("init") or "target",
            tasks=card.get("tasks") or conf.get("tasks") or "all", lengths=lengths,
        )
    return drafters


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: not a directory")
    config_path = run_dir / "config.resolved.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    records = _read_records(run_dir / "records.sqlite")
    workload = _read_workload(run_dir / "workload.jsonl")
    prompts = _prompts(records, workload)
    groups = prompts.set_index("prompt_id")["group"]
    records["group"] = records["prompt_id"].map(groups).fillna(records["task"])
    records["stratum"] = records["prompt_id"].map(prompts.set_index("prompt_id")["stratum"]).fillna(records["stratum"])

    plans = _regime_plans(config.get("regimes") or [])
    regimes = list(plans) + sorted(set(records["regime"]) - set(plans))
    run_ids = sorted(set(records["run_id"].dropna().astype(str)) - {"none"})
    cost = _read_json(run_dir / "cost.json", {})
    dataset_lengths, dataset_source = _dataset_lengths(run_dir, workload)
    return RunData(
        path=run_dir,
        run_id=",".join(run_ids) or run_dir.name,
        name=config.get("name") or run_dir.name,
        baseline=config.get("baseline_arm") or "baseline",
        arms=_arms(config, records),
        regimes=regimes,
        regime_plans=plans,
        drafters=_drafters(run_dir, config),
        records=records,
        prompts=prompts,
        cost=cost.get("arms") or {},
        dead_arms=_read_json(run_dir / "state.json", {}).get("dead_arms") or {},
        dataset_lengths=dataset_lengths,
        dataset_lengths_source=dataset_source,
        environment=_read_json(run_dir / "environment.json", {}),
        target_dtype=(config.get("target") or {}).get("dtype"),
        temperature=config.get("temperature"),
        files={name: (run_dir / name).exists() for name in
               ("config.resolved.yaml", "workload.jsonl", "workload.build.json", "environment.json", "state.json",
                "cost.json", "drafters")},
    )
