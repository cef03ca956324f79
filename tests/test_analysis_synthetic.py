"""A synthetic run directory with the structure the runner writes, for the
analysis tests: records simulated from a known per-token acceptance, step
cost and drift, so the tests can check the analysis recovers them.

`write_synthetic_run` is imported by the other analysis and report tests; the
test here checks that its records match the gateway's schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import yaml

from core.config import parse_config
from core.contracts import RECORD_COLUMNS

RECORD_SCHEMA = [
    ("request_id", "TEXT"), ("run_id", "TEXT"), ("arm", "TEXT"), ("task", "TEXT"), ("stratum", "TEXT"),
    ("prompt_id", "TEXT"), ("regime", "TEXT"), ("endpoint", "TEXT"), ("stream", "INTEGER"), ("upstream", "TEXT"),
    ("status", "TEXT"), ("http_status", "INTEGER"), ("error", "TEXT"), ("finish_reason", "TEXT"),
    ("t_start", "REAL"), ("t_first_token", "REAL"), ("t_end", "REAL"), ("ttft_s", "REAL"), ("e2e_s", "REAL"),
    ("tpot_s", "REAL"), ("itl_mean_s", "REAL"), ("itl_p50_s", "REAL"), ("itl_p99_s", "REAL"), ("itl_max_s", "REAL"),
    ("itl_json", "TEXT"), ("prompt_tokens", "INTEGER"), ("completion_tokens", "INTEGER"), ("max_tokens", "INTEGER"),
    ("temperature", "REAL"), ("spec_drafts", "INTEGER"), ("spec_draft_tokens", "INTEGER"),
    ("spec_accepted_tokens", "INTEGER"), ("spec_accepted_per_pos", "TEXT"), ("spec_json", "TEXT"),
    ("output_hash", "TEXT"), ("output_hash_kind", "TEXT"), ("output_text", "TEXT"),
]

TASKS = {  # prompt-length range and output tokens (max_tokens) of each synthetic task
    "gsm8k": {"prompt": (40, 240), "max_tokens": 128},
    "nq_open": {"prompt": (8, 60), "max_tokens": 32},
    "xsum": {"prompt": (70, 900), "max_tokens": 64},
}
STRATA = [(0, 64), (64, 256), (256, 1024)]
# True per-token acceptance p per arm and task: the fine-tuned drafter (on
# gsm8k) gains most on gsm8k and least on the task whose lengths differ most.
ACCEPTANCE = {
    "ngram": {"gsm8k": 0.25, "nq_open": 0.2, "xsum": 0.45},
    "generic": {"gsm8k": 0.55, "nq_open": 0.5, "xsum": 0.5},
    "finetuned": {"gsm8k": 0.8, "nq_open": 0.6, "xsum": 0.52},
}
COST_RATIO = {"ngram": 0.01, "generic": 0.12, "finetuned": 0.12}
DRAFT_PROBABILITY = {"ngram": 0.6, "generic": 1.0, "finetuned": 1.0}  # n-gram lookup drafts only on a match
K = 3
TARGET_STEP_S = 0.026
DRIFT_PER_MIN = 0.01  # the machine slows down 1% a minute
LOAD_SLOWDOWN = {"sequential": 1.0, "concurrency-4": 4.0}  # speculation's step cost grows with batch size


def _source(task: str) -> str:
    """The task a prompt comes from (a control "A-like-B" comes from A)."""
    return task.split("-like-")[0]


def stratum_label(n: int) -> str:
    lo, hi = next((lo, hi) for lo, hi in STRATA if lo <= n < hi)
    return f"p{lo}-{hi}"


def _config(arms: list[str], regimes: list[str], dtype: str) -> dict:
    speculative = {
        "ngram": {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
        "generic": {"method": "draft_model", "drafter": "generic", "num_speculative_tokens": K},
        "finetuned": {"method": "draft_model", "drafter": "finetuned", "num_speculative_tokens": K},
    }
    regime_config = {"sequential": {"kind": "sequential"}, "concurrency-4": {"kind": "concurrency", "users": 4}}
    return {
        "name": "synthetic",
        "target": {"name": "smollm2-135m-instruct", "source": "embedded", "dtype": dtype},
        "arms": [{"name": a, **({"speculative": speculative[a]} if a in speculative else {})} for a in arms],
        "baseline_arm": "baseline",
        "drafters": [{"name": "generic", "init": "target", "tasks": "all"},
                     {"name": "finetuned", "init": "generic", "tasks": ["gsm8k"]}],
        "workload": {"prompt_strata": [0, 64, 256, 1024], "n_per_cell": 6,
                     "controls": [{"task": "gsm8k", "like": "xsum", "n": 6}]},
        "regimes": [regime_config[r] for r in regimes],
        "temperature": 0.0,
    }


def _prompts(rng: np.random.Generator, per_cell: int) -> list[dict]:
    prompts = []
    for task, spec in TASKS.items():
        lo, hi = spec["prompt"]
        for s_lo, s_hi in STRATA:
            if max(lo, s_lo) >= min(hi, s_hi):
                continue
            for i in range(per_cell):
                n = int(rng.integers(max(lo, s_lo), min(hi, s_hi)))
                prompts.append({"id": f"{task}-{s_lo}-{i}", "task": task, "stratum": stratum_label(n),
                                "prompt_tokens": n})
    # The control: gsm8k questions drawn to follow xsum's prompt lengths.
    for i in range(per_cell):
        n = int(rng.integers(*TASKS["xsum"]["prompt"]))
        prompts.append({"id": f"control-gsm8k-xsum-{i}", "task": "gsm8k-like-xsum", "stratum": stratum_label(n),
                        "prompt_tokens": n, "control": {"task": "gsm8k", "like": "xsum"}})
    return prompts


def _decode(rng, p: float, draft_probability: float, output_tokens: int) -> tuple[int, int, list[int]]:
    """Decode steps after the prefill's first token until output_tokens are out:
    (steps, drafts, per-position accepted counts). A step drafts with
    draft_probability (n-gram lookup needs a match); acceptance is geometric
    with per-token probability p, and stops at the output budget."""
    steps, drafts, per_pos, emitted = 0, 0, [0] * K, 1
    while emitted < output_tokens:
        accepted = 0
        if rng.random() < draft_probability:
            drafts += 1
            while accepted < min(K, output_tokens - emitted - 1) and rng.random() < p:
                per_pos[accepted] += 1
                accepted += 1
        steps += 1
        emitted += accepted + 1
    return steps, drafts, per_pos


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Clock:
    def __init__(self, start: float):
        self.now = start
        self.start = start

    def drift(self) -> float:
        return 1 + DRIFT_PER_MIN * (self.now - self.start) / 60


def _record(rng, clock, run_id, arm, prompt, regime, output_tokens, failed_status=None) -> dict:
    record = {name: None for name, _ in RECORD_SCHEMA}
    record.update({
        "request_id": f"{regime}-{arm}-{prompt['id']}-{clock.now:.3f}", "run_id": run_id, "arm": arm,
        "task": prompt["task"], "stratum": prompt["stratum"], "prompt_id": prompt["id"], "regime": regime,
        "endpoint": "chat", "stream": 1, "upstream": f"http://127.0.0.1:81{len(arm)}",
        "prompt_tokens": prompt["prompt_tokens"], "max_tokens": TASKS[_source(prompt["task"])]["max_tokens"],
        "temperature": 0.0, "t_start": clock.now,
    })
    if failed_status:
        record.update({"status": failed_status, "http_status": 502, "error": "synthetic failure",
                       "t_end": clock.now + 0.01, "e2e_s": 0.01})
        clock.now += 0.05
        return record
    step = TARGET_STEP_S * clock.drift()
    if arm == "baseline":
        decode_time = (output_tokens - 1) * step
    else:
        p = ACCEPTANCE[arm][_source(prompt["task"])]
        steps, drafts, per_pos = _decode(rng, p, DRAFT_PROBABILITY[arm], output_tokens)
        # Drafting costs c target steps per drafted token, more under load.
        decode_time = step * (steps + drafts * K * COST_RATIO[arm] * LOAD_SLOWDOWN[regime])
        spec = {"num_spec_steps": drafts, "num_draft_tokens": K * drafts, "num_accepted_draft_tokens": sum(per_pos)}
        record.update({"spec_drafts": drafts, "spec_draft_tokens": K * drafts, "spec_accepted_tokens": sum(per_pos),
                       "spec_accepted_per_pos": json.dumps(per_pos), "spec_json": json.dumps(spec)})
    noise = math.exp(rng.normal(0, 0.05))
    ttft = 0.03 + 0.0002 * prompt["prompt_tokens"]
    tpot = decode_time / (output_tokens - 1) * noise
    e2e = ttft + tpot * (output_tokens - 1)
    same_as_target = rng.random() < (0.85 if arm == "baseline" else 0.75)
    text = f"answer to {prompt['id']}" if same_as_target else f"variant {rng.random()}"
    record.update({
        "status": "ok", "http_status": 200, "finish_reason": "length", "t_first_token": clock.now + ttft,
        "t_end": clock.now + e2e, "ttft_s": ttft, "e2e_s": e2e, "tpot_s": tpot, "itl_mean_s": tpot,
        "itl_p50_s": tpot, "itl_p99_s": tpot * 1.5, "itl_max_s": tpot * 2, "itl_json": json.dumps([tpot] * 3),
        "completion_tokens": output_tokens, "output_hash": _hash(text), "output_hash_kind": "token_ids",
        "output_text": text,
    })
    clock.now += e2e + 0.01
    return record


def write_synthetic_run(run_dir: Path, *, seed: int = 0, per_cell: int = 6,
                        arms=("baseline", "ngram", "generic", "finetuned"),
                        regimes=("sequential", "concurrency-4"), dtype: str = "bfloat16",
                        dies_after: dict[str, int] | None = None, failures: int = 2,
                        cards: bool = True, shuffle_rows: bool = False) -> Path:
    """Write config, workload, drafter cards and records; `dies_after` maps an
    arm to the number of its requests after which it answers only errors."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = "synthetic-run"
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(_config(list(arms), list(regimes), dtype)))
    (run_dir / "environment.json").write_text(json.dumps({"python": "3.11", "cpu": {"model": "synthetic", "cores": 2}}))
    prompts = _prompts(rng, per_cell)
    rng.shuffle(prompts)  # as the workload does: a sequential replay interleaves the tasks
    with (run_dir / "workload.jsonl").open("w") as f:
        for p in prompts:
            row = {"dataset": _source(p["task"]), "messages": [{"role": "user", "content": f"prompt {p['id']}"}],
                   "max_tokens": TASKS[_source(p["task"])]["max_tokens"], "ref_tokens": None, "split": "eval", **p}
            f.write(json.dumps(row) + "\n")
        for task, spec in TASKS.items():  # the train split: written, never sent
            for i in range(20):
                row = {"id": f"{task}-train-{i}", "task": task, "dataset": task, "stratum": "p0-64",
                       "messages": [], "max_tokens": spec["max_tokens"], "split": "train",
                       "prompt_tokens": int(rng.integers(*spec["prompt"])), "ref_tokens": int(rng.integers(10, 60))}
                f.write(json.dumps(row) + "\n")
    natural = {task: [int(rng.integers(*spec["prompt"])) for _ in range(80)] for task, spec in TASKS.items()}
    (run_dir / "workload.build.json").write_text(json.dumps({"lengths": {
        task: {"prompt_tokens": lengths, "ref_tokens": [int(rng.integers(10, spec["max_tokens"])) for _ in lengths]}
        for (task, lengths), spec in zip(natural.items(), TASKS.values())}}))
    if cards:
        generic = [(int(rng.integers(8, 900)), int(rng.integers(20, 128))) for _ in range(300)]
        finetuned = [(int(rng.integers(40, 240)), int(rng.integers(60, 128))) for _ in range(150)]
        for name, pairs, init, tasks in (("generic", generic, "target", "all"),
                                          ("finetuned", finetuned, "generic", ["gsm8k"])):
            card = {"name": name, "init": init, "tasks": tasks, "training_data": {"lengths": {
                "prompt": [p for p, _ in pairs], "output": [o for _, o in pairs], "by_task": {}}}}
            (run_dir / "drafters" / name).mkdir(parents=True, exist_ok=True)
            (run_dir / "drafters" / name / "drafter_card.json").write_text(json.dumps(card))

    # Output length is a property of the prompt (greedy decoding), shared by all arms.
    budget = {p["id"]: TASKS[_source(p["task"])]["max_tokens"] for p in prompts}
    outputs = {pid: int(rng.integers(tokens // 2, tokens + 1)) for pid, tokens in budget.items()}
    clock = _Clock(1_700_000_000.0)
    sent = {a: 0 for a in arms}
    records = []

    def send(arm, prompt, regime):
        sent[arm] += 1
        dead = dies_after and arm in dies_after and sent[arm] > dies_after[arm]
        failed = "upstream_unavailable" if dead else None
        if not failed and arm == "ngram" and failures and rng.random() < failures / len(prompts):
            failed = "upstream_error"
        records.append(_record(rng, clock, run_id, arm, prompt, regime, outputs[prompt["id"]], failed))

    order = list(arms)
    for regime in regimes:
        if regime == "sequential":
            for i, prompt in enumerate(prompts):  # rotating arm order, baseline twice
                rotated = order[i % len(order):] + order[:i % len(order)]
                for arm in rotated:
                    send(arm, prompt, regime)
                send("baseline", prompt, regime)
        else:
            # Arms alternate in blocks over different prompts (one shared cursor): the unpaired case.
            # loadgen/shapes.py gives each arm its own cursor, so real runs pair unless a bound cuts
            # an arm short; the analysis must still handle this one.
            for i in range(2 * len(prompts)):
                send(order[(i // 8) % len(order)], prompts[i % len(prompts)], regime)

    if shuffle_rows:
        rng.shuffle(records)
    con = sqlite3.connect(run_dir / "records.sqlite")
    con.execute(f"CREATE TABLE requests ({', '.join(f'{n} {t}' for n, t in RECORD_SCHEMA)})")
    con.executemany(f"INSERT INTO requests VALUES ({', '.join('?' * len(RECORD_SCHEMA))})",
                    [[r[n] for n, _ in RECORD_SCHEMA] for r in records])
    con.commit()
    con.close()
    return run_dir


def test_synthetic_run_follows_the_contract(tmp_path):
    """The synthetic run is valid for the config schema and has exactly the
    gateway's record columns (core/contracts.py), which the analysis reads."""
    run_dir = write_synthetic_run(tmp_path / "run")
    parse_config(yaml.safe_load((run_dir / "config.resolved.yaml").read_text()), run_dir / "config.resolved.yaml")
    columns = [name for name, _ in RECORD_SCHEMA]
    assert columns == list(RECORD_COLUMNS), "the synthetic records no longer match the gateway's table"
