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
import pytest
import yaml

from analysis import chain, divergence
from analysis.hypotheses import PreregistrationError, read_preregistration
from analysis.report import write_report
from analysis.results import compute_results, prompt_lengths
from analysis.rundir import load_run
from core.config import parse_config
from core.contracts import RECORD_COLUMNS, token_ids_hash

RECORD_SCHEMA = [
    ("request_id", "TEXT"), ("run_id", "TEXT"), ("arm", "TEXT"), ("task", "TEXT"), ("stratum", "TEXT"),
    ("prompt_id", "TEXT"), ("regime", "TEXT"), ("client_request_id", "TEXT"), ("endpoint", "TEXT"), ("stream", "INTEGER"), ("upstream", "TEXT"),
    ("replica", "TEXT"), ("status", "TEXT"), ("http_status", "INTEGER"), ("error", "TEXT"), ("finish_reason", "TEXT"),
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


SYNTHETIC_WINDOW = 512


def _source(task: str) -> str:
    """The task a prompt comes from (a control "A-like-B" comes from A)."""
    return task.split("-like-")[0]


def stratum_label(n: int) -> str:
    lo, hi = next((lo, hi) for lo, hi in STRATA if lo <= n < hi)
    return f"p{lo}-{hi}"


MAX_MODEL_LEN = 2048
REPLAY_K = [1, 2, 3, 4]
NGRAM_ALPHABET = 12  # token ids of the synthetic outputs: few, so that n-gram lookup finds matches
OOV_RATE = 0.03  # output tokens outside a drafter's (trimmed) vocabulary


def _config(arms: list[str], regimes: list[str], dtype: str) -> dict:
    speculative = {
        "ngram": {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4, "prompt_lookup_min": 2},
        "generic": {"method": "draft_model", "drafter": "generic", "num_speculative_tokens": K},
        "finetuned": {"method": "draft_model", "drafter": "finetuned", "num_speculative_tokens": K},
    }
    regime_config = {"sequential": {"kind": "sequential"}, "concurrency-4": {"kind": "concurrency", "users": 4}}
    return {
        "name": "synthetic",
        "target": {"name": "smollm2-135m-instruct", "source": "embedded", "dtype": dtype,
                   "max_model_len": MAX_MODEL_LEN},
        "arms": [{"name": a, **({"speculative": speculative[a]} if a in speculative else {})} for a in arms],
        "baseline_arm": "baseline",
        "drafters": [{"name": "generic", "init": "target", "tasks": "all"},
                     {"name": "finetuned", "init": "generic", "tasks": ["gsm8k"]}],
        "workload": {"prompt_strata": [0, 64, 256, 1024], "n_per_cell": 6,
                     "controls": [{"task": "gsm8k", "like": "xsum", "n": 6}]},
        "regimes": [regime_config[r] for r in regimes],
        "replay": {"per_cell": 100, "k": REPLAY_K},
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


def _record(rng, clock, run_id, arm, prompt, regime, output_tokens, failed_status=None, trace=None,
            target_hash=None) -> dict:
    """One request; with `trace` (the replay's chain at the served K) its spec
    counts are the replay's, and with `target_hash` an output equal to the
    target's carries the replay target's hash."""
    record = {name: None for name, _ in RECORD_SCHEMA}
    record.update({
        "request_id": f"{regime}-{arm}-{prompt['id']}-{clock.now:.3f}", "run_id": run_id, "arm": arm,
        "task": prompt["task"], "stratum": prompt["stratum"], "prompt_id": prompt["id"], "regime": regime,
        "endpoint": "chat", "stream": 1, "upstream": f"http://127.0.0.1:81{len(arm)}",
        "replica": "synthetic:1",
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
        if trace is None:
            steps, drafts, per_pos = _decode(rng, ACCEPTANCE[arm][_source(prompt["task"])], DRAFT_PROBABILITY[arm],
                                             output_tokens)
        else:
            steps, drafts, per_pos = trace.decode_steps, trace.drafts, trace.per_position(K)
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
    output_hash = target_hash if same_as_target and target_hash else _hash(text)
    record.update({
        "status": "ok", "http_status": 200, "finish_reason": "length", "t_first_token": clock.now + ttft,
        "t_end": clock.now + e2e, "ttft_s": ttft, "e2e_s": e2e, "tpot_s": tpot, "itl_mean_s": tpot,
        "itl_p50_s": tpot, "itl_p99_s": tpot * 1.5, "itl_max_s": tpot * 2, "itl_json": json.dumps([tpot] * 3),
        "completion_tokens": output_tokens, "output_hash": output_hash, "output_hash_kind": "token_ids",
        "output_text": text,
    })
    clock.now += e2e + 0.01
    return record


def _replay_prompts(rng, prompts: list[dict], outputs: dict[str, int], extra: int) -> list[dict]:
    """The replay set: every served eval prompt, plus `extra` more per (task, stratum) cell of the tasks."""
    replay = [dict(p, served_tokens=outputs[p["id"]]) for p in prompts]
    cells = sorted({(p["task"], p["stratum"]) for p in prompts if "control" not in p})
    for task, stratum in cells:
        lo, hi = TASKS[task]["prompt"]
        s_lo, s_hi = next((a, b) for a, b in STRATA if stratum_label(a) == stratum)
        budget = TASKS[task]["max_tokens"]
        for i in range(extra):
            n = int(rng.integers(max(lo, s_lo), min(hi, s_hi)))
            replay.append({"id": f"{task}-{s_lo}-replay-{i}", "task": task, "stratum": stratum, "prompt_tokens": n,
                           "served_tokens": int(rng.integers(budget // 2, budget + 1))})
    return sorted(replay, key=lambda p: p["id"])


def _write_replay(run_dir: Path, rng, replay: list[dict], drafters: list[str]) -> dict[str, dict]:
    """Targets (random token ids from a small alphabet), each drafter's match
    vector (Bernoulli with the drafter's per-token acceptance on the task, never
    on an out-of-vocabulary token), the replay workload and replay.json; returns
    {prompt id: target line}."""
    folder = run_dir / "replay"
    folder.mkdir(parents=True, exist_ok=True)
    targets = {}
    with (folder / "targets.jsonl").open("w") as f, (run_dir / "workload.replay.jsonl").open("w") as w:
        for p in replay:
            served, budget = p["served_tokens"], TASKS[_source(p["task"])]["max_tokens"]
            prompt_ids = rng.integers(0, NGRAM_ALPHABET, p["prompt_tokens"]).tolist()
            output_ids = rng.integers(0, NGRAM_ALPHABET, min(budget + 4, MAX_MODEL_LEN - len(prompt_ids))).tolist()
            line = {"id": p["id"], "task": p["task"], "stratum": p["stratum"], "prompt_ids": prompt_ids,
                    "output_ids": output_ids, "served_tokens": served, "finish": "length", "max_tokens": budget,
                    "output_hash": token_ids_hash(output_ids[:served])}
            targets[p["id"]] = line
            f.write(json.dumps(line) + "\n")
            row = {"id": p["id"], "task": p["task"], "stratum": p["stratum"], "split": "eval",
                   "dataset": _source(p["task"]), "messages": [{"role": "user", "content": f"prompt {p['id']}"}],
                   "max_tokens": budget, "prompt_tokens": p["prompt_tokens"], "ref_tokens": None,
                   **({"control": p["control"]} if "control" in p else {})}
            w.write(json.dumps(row) + "\n")
    with (folder / "matches.jsonl").open("w") as f:
        for drafter in drafters:
            for pid, target in targets.items():
                size = len(target["output_ids"])
                in_vocab = rng.random(size) >= OOV_RATE
                match = (rng.random(size) < ACCEPTANCE[drafter][_source(target["task"])]) & in_vocab
                f.write(json.dumps({"drafter": drafter, "id": pid, "match": "".join("01"[int(m)] for m in match),
                                    "in_vocab": "".join("01"[int(v)] for v in in_vocab)}) + "\n")
    (folder / "replay.json").write_text(json.dumps({
        "dtype": "float32", "k": REPLAY_K, "max_model_len": MAX_MODEL_LEN,
        "drafters": {d: {"inputs_hash": "synthetic", "vocab_size": 16384, "seconds": 1.0} for d in drafters},
        "targets": {"prompts": len(targets), "generated": len(targets), "seconds": 1.0}}))
    return targets


def served_trace(arm: str, target: dict, matches: dict[str, str]) -> chain.Trace:
    """The chain at the served K for one arm: what the synthetic served records report."""
    if arm == "ngram":
        return chain.ngram_trace(target["prompt_ids"], target["output_ids"], target["served_tokens"], K,
                                 min_n=2, max_n=4, max_model_len=MAX_MODEL_LEN)
    return chain.draft_model_trace([c == "1" for c in matches[arm]], target["served_tokens"], K,
                                   prompt_tokens=len(target["prompt_ids"]), max_model_len=MAX_MODEL_LEN,
                                   output_ids=target["output_ids"])


def write_synthetic_run(run_dir: Path, *, seed: int = 0, per_cell: int = 6,
                        arms=("baseline", "ngram", "generic", "finetuned"),
                        regimes=("sequential", "concurrency-4"), dtype: str = "bfloat16",
                        dies_after: dict[str, int] | None = None, failures: int = 2,
                        cards: bool = True, shuffle_rows: bool = False, replay: bool = False,
                        replay_extra: int = 6, disagree: dict[str, int] | None = None) -> Path:
    """Write config, workload, drafter cards and records; `dies_after` maps an
    arm to the number of its requests after which it answers only errors.

    With `replay`, also the replay files (every eval prompt, plus
    `replay_extra` more per cell), and the sequentially served speculative
    requests report exactly the replay's counts at the served K, except on the
    first `disagree[arm]` prompts (by id) of an arm, whose accepted count is 2
    more than the replay's."""
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
            if name == "generic":  # trained at a window its longest examples exceed; the other card has no recipe
                card["recipe"] = {"max_seq_len": SYNTHETIC_WINDOW}
            (run_dir / "drafters" / name).mkdir(parents=True, exist_ok=True)
            (run_dir / "drafters" / name / "drafter_card.json").write_text(json.dumps(card))

    # Output length is a property of the prompt (greedy decoding), shared by all arms.
    budget = {p["id"]: TASKS[_source(p["task"])]["max_tokens"] for p in prompts}
    outputs = {pid: int(rng.integers(tokens // 2, tokens + 1)) for pid, tokens in budget.items()}
    targets, matches = {}, {}
    if replay:
        replay_rng = np.random.default_rng(seed + 1)
        drafters = [a for a in ("generic", "finetuned") if a in arms]
        targets = _write_replay(run_dir, replay_rng, _replay_prompts(replay_rng, prompts, outputs, replay_extra),
                                drafters)
        for line in (run_dir / "replay" / "matches.jsonl").read_text().splitlines():
            row = json.loads(line)
            matches.setdefault(row["id"], {})[row["drafter"]] = row["match"]
    planted = {arm: set(sorted(outputs)[:n]) for arm, n in (disagree or {}).items()}
    clock = _Clock(1_700_000_000.0)
    sent = {a: 0 for a in arms}
    records = []

    def send(arm, prompt, regime):
        sent[arm] += 1
        dead = dies_after and arm in dies_after and sent[arm] > dies_after[arm]
        failed = "upstream_unavailable" if dead else None
        if not failed and arm == "ngram" and failures and rng.random() < failures / len(prompts):
            failed = "upstream_error"
        target = targets.get(prompt["id"])
        trace = served_trace(arm, target, matches.get(prompt["id"], {})) \
            if target and regime == "sequential" and arm != "baseline" else None
        record = _record(rng, clock, run_id, arm, prompt, regime, outputs[prompt["id"]], failed, trace,
                         target and target["output_hash"])
        if trace and record["status"] == "ok" and prompt["id"] in planted.get(arm, ()):
            record["spec_accepted_tokens"] += 2
        records.append(record)

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


def test_synthetic_replay_follows_the_file_contract(tmp_path):
    """The replay files as /work/notes/replay-formats.md (and drafters/replay.py) write them: a
    match and in_vocab character per target output token, served_tokens within the extended
    output, the output hash of the served tokens, and one replay workload row per target."""
    run_dir = write_synthetic_run(tmp_path / "run", replay=True)
    targets = [json.loads(line) for line in (run_dir / "replay" / "targets.jsonl").read_text().splitlines()]
    matches = [json.loads(line) for line in (run_dir / "replay" / "matches.jsonl").read_text().splitlines()]
    workload = [json.loads(line) for line in (run_dir / "workload.replay.jsonl").read_text().splitlines()]
    by_id = {t["id"]: t for t in targets}
    assert {w["id"] for w in workload} == set(by_id)
    for t in targets:
        assert 1 <= t["served_tokens"] <= len(t["output_ids"])
        assert t["output_hash"] == token_ids_hash(t["output_ids"][:t["served_tokens"]])
    for m in matches:
        size = len(by_id[m["id"]]["output_ids"])
        assert len(m["match"]) == len(m["in_vocab"]) == size
        assert all(not (c == "1" and v == "0") for c, v in zip(m["match"], m["in_vocab"]))
    assert {m["drafter"] for m in matches} == {"generic", "finetuned"}


def test_drafter_lengths_are_what_training_saw_within_its_window(tmp_path):
    run_dir = tmp_path / "run"
    write_synthetic_run(run_dir)
    card = json.loads((run_dir / "drafters" / "generic" / "drafter_card.json").read_text())
    raw = list(zip(card["training_data"]["lengths"]["prompt"], card["training_data"]["lengths"]["output"]))
    run = load_run(run_dir)
    generic, finetuned = run.drafters["generic"], run.drafters["finetuned"]
    assert generic.window == SYNTHETIC_WINDOW and finetuned.window is None
    assert any(p + o > SYNTHETIC_WINDOW for p, o in raw), "the synthetic card must exceed its window"
    assert max(generic.lengths["total"]) <= SYNTHETIC_WINDOW
    for (p, o), seen_p, seen_o in zip(raw, generic.lengths["prompt"], generic.lengths["output"]):
        assert seen_o == min(o, SYNTHETIC_WINDOW - 1) and seen_p == min(p, SYNTHETIC_WINDOW - seen_o)
    ft_card = json.loads((run_dir / "drafters" / "finetuned" / "drafter_card.json").read_text())
    assert finetuned.lengths["prompt"] == ft_card["training_data"]["lengths"]["prompt"]
    results = compute_results(run)
    assert results["run"]["drafters"]["generic"]["window"] == SYNTHETIC_WINDOW
    assert results["divergence"]["drafter_lengths"]["generic"]["total"]["n"] == len(raw)
    task = results["divergence"]["tasks"][0]
    lengths = prompt_lengths(run)
    sent = lengths.loc[(lengths["task"] == task) & ~lengths["is_control"], "total"].dropna().tolist()
    edges = np.asarray(results["divergence"]["method"]["bin_edges"])
    reported = results["divergence"]["drafters"]["generic"][task]["total"]
    within = divergence.compare(generic.lengths["total"], sent, edges)
    uncut = divergence.compare([p + o for p, o in raw], sent, edges)
    assert all(reported[m] == pytest.approx(within[m], abs=1e-5) for m in ("js", "w1", "ks"))
    assert abs(reported["w1"] - uncut["w1"]) > 1.0, "the window must change what is compared"


# --- the design of issue 12: a drafter matrix and a within-domain length crossover -------------------

REPO = Path(__file__).resolve().parent.parent
PREREGISTRATION = REPO / "experiments" / "cpu-default.prereg.yaml"
DESIGN_TASKS = {"gsm8k": (40, 240), "wmt22_de_en": (20, 120), "nq_open": (8, 60), "nq_rag": (220, 900)}
DESIGN_BASE = {"gsm8k": 0.2, "wmt22_de_en": -0.2, "nq_open": 0.0, "nq_rag": 0.1}  # logit of the generic's p
DESIGN_OUTPUT = 24
CROSSOVER = {"short": "nq_open", "long": "nq_rag"}
DOMAIN = {"nq_rag": "nq_open"}  # the crossover's two tasks are one domain


def design_drafters() -> list[dict]:
    """generic (on gsm8k and wmt22), one drafter fine-tuned per task, and a second seed on each crossover side."""
    recipe = {"max_steps": 160, "batch_tokens": 4096, "max_seq_len": SYNTHETIC_WINDOW}
    drafters = [{"name": "generic", "init": "target", "tasks": ["gsm8k", "wmt22_de_en"],
                 "recipe": {**recipe, "max_steps": 400}}]
    drafters += [{"name": f"ft-{t}", "init": "generic", "tasks": [t], "recipe": {**recipe, "seed": 0}}
                 for t in DESIGN_TASKS]
    drafters += [{"name": f"ft-{t}-s1", "init": "generic", "tasks": [t], "recipe": {**recipe, "seed": 1}}
                 for t in CROSSOVER.values()]
    return drafters


def write_design_run(run_dir: Path, *, length_effect: float = 0.0, in_domain_effect: float = 0.0,
                     per_cell: int = 40, seed: int = 0) -> Path:
    """A replay-only run of the design (as `specdrift replay` writes one): targets, every drafter's
    match vectors, cards, the config's design section and the pre-registration of cpu-default.

    A drafter's per-token match probability on a prompt is sigmoid(base(task) + u_prompt + quality
    + in_domain_effect [fine-tuned on the prompt's domain] + length_effect [on the crossover's domain,
    fine-tuned on the side whose length the prompt has] + seed noise); the generic's is
    sigmoid(base(task) + u_prompt). u_prompt (sd 0.4) is the prompt's difficulty, shared by all."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    drafters = design_drafters()
    config = {"name": "synthetic-design",
              "target": {"name": "smollm2-135m-instruct", "source": "embedded", "dtype": "float32",
                         "max_model_len": MAX_MODEL_LEN},
              "arms": [{"name": "baseline"},
                       {"name": "generic", "speculative": {"method": "draft_model", "drafter": "generic",
                                                           "num_speculative_tokens": 2}}],
              "drafters": drafters,
              "design": {"generic": "generic", "crossover": CROSSOVER,
                         "preregistration": "cpu-default.prereg.yaml"},
              "workload": {"prompt_strata": [0, 64, 256, 1024]},
              "replay": {"per_cell": per_cell, "k": [2]}, "temperature": 0.0}
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run_dir / "environment.json").write_text(json.dumps({"python": "3.11"}))
    (run_dir / "preregistration.yaml").write_bytes(PREREGISTRATION.read_bytes())
    natural = {t: [int(rng.integers(lo, hi)) for _ in range(200)] for t, (lo, hi) in DESIGN_TASKS.items()}
    (run_dir / "workload.build.json").write_text(json.dumps({"lengths": {
        t: {"prompt_tokens": v, "ref_tokens": [DESIGN_OUTPUT] * len(v)} for t, v in natural.items()}}))
    for d in drafters:
        tasks = d["tasks"]
        prompts = [int(rng.integers(*DESIGN_TASKS[tasks[i % len(tasks)]])) for i in range(120)]
        card = {"name": d["name"], "init": d["init"], "tasks": tasks, "recipe": d["recipe"],
                "training_data": {"lengths": {"prompt": prompts, "output": [DESIGN_OUTPUT] * len(prompts)}}}
        (run_dir / "drafters" / d["name"]).mkdir(parents=True, exist_ok=True)
        (run_dir / "drafters" / d["name"] / "drafter_card.json").write_text(json.dumps(card))
    quality = {d["name"]: float(rng.normal(0, 0.2)) for d in drafters if d["name"] != "generic"}
    seed_noise = {(d["name"], t): float(rng.normal(0, 0.03)) for d in drafters for t in DESIGN_TASKS}
    side_of = {task: side for side, task in CROSSOVER.items()}
    folder = run_dir / "replay"
    folder.mkdir(parents=True, exist_ok=True)
    targets, match_lines = [], []
    for task, (lo, hi) in DESIGN_TASKS.items():
        for s_lo, s_hi in STRATA:
            if max(lo, s_lo) >= min(hi, s_hi):
                continue
            for i in range(per_cell):
                n = int(rng.integers(max(lo, s_lo), min(hi, s_hi)))
                pid = f"{task}-{s_lo}-{i}"
                output = rng.integers(0, NGRAM_ALPHABET, DESIGN_OUTPUT + 2).tolist()
                targets.append({"id": pid, "task": task, "stratum": stratum_label(n),
                                "prompt_ids": rng.integers(0, NGRAM_ALPHABET, n).tolist(), "output_ids": output,
                                "served_tokens": DESIGN_OUTPUT, "finish": "length", "max_tokens": DESIGN_OUTPUT,
                                "output_hash": token_ids_hash(output[:DESIGN_OUTPUT])})
                difficulty = float(rng.normal(0, 0.4))
                for d in drafters:
                    logit = DESIGN_BASE[task] + difficulty
                    if d["name"] != "generic":
                        own = d["tasks"][0]
                        logit += quality[d["name"]] + seed_noise[d["name"], task]
                        logit += in_domain_effect * (DOMAIN.get(own, own) == DOMAIN.get(task, task))
                        if task in side_of and own in side_of:
                            logit += length_effect * (own == task)
                    match = rng.random(len(output)) < 1 / (1 + math.exp(-logit))
                    match_lines.append({"drafter": d["name"], "id": pid, "match": "".join("01"[int(m)] for m in match),
                                        "in_vocab": "1" * len(output)})
    (folder / "targets.jsonl").write_text("".join(json.dumps(t) + "\n" for t in targets))
    (folder / "matches.jsonl").write_text("".join(json.dumps(m) + "\n" for m in match_lines))
    (folder / "replay.json").write_text(json.dumps({"dtype": "float32", "k": [2], "max_model_len": MAX_MODEL_LEN,
                                                    "drafters": {}, "targets": {"prompts": len(targets)}}))
    (run_dir / "workload.replay.jsonl").write_text("".join(json.dumps({
        "id": t["id"], "task": t["task"], "stratum": t["stratum"], "split": "eval", "dataset": t["task"],
        "messages": [{"role": "user", "content": t["id"]}], "max_tokens": DESIGN_OUTPUT,
        "prompt_tokens": len(t["prompt_ids"]), "ref_tokens": None}) + "\n" for t in targets))
    return run_dir


def _hypothesis(results: dict, name: str) -> dict:
    return next(h for h in results["design"]["hypotheses"] if h["id"] == name)


def test_a_planted_length_effect_inside_one_domain_is_found_and_reported(tmp_path):
    """issue 12: drafters fine-tuned on NQ's short and long prompts, each better on its own length by
    0.5 logit, and nothing else planted: H1 is confirmed with the planted sign, the report says so,
    and the length claim comes from the crossover only."""
    run_dir = write_design_run(tmp_path / "run", length_effect=0.5)
    results = compute_results(load_run(run_dir))
    h1 = _hypothesis(results, "H1")
    assert h1["verdict"] == "confirmed" and h1["estimate"] > 0.05
    assert results["design"]["identifies_length"] is True
    cross = results["design"]["crossover"]
    assert cross["seed_spread"]["n"] == 2
    assert results["design"]["preregistration"]["sha256"] == hashlib.sha256(PREREGISTRATION.read_bytes()).hexdigest()
    assert any(line.startswith("H1 ") and "confirmed" in line for line in results["summary"])
    write_report(run_dir)
    report = (run_dir / "report.md").read_text()
    assert "H1" in report and "confirmed" in report


def test_no_planted_effect_makes_the_report_say_nothing_was_found(tmp_path):
    run_dir = write_design_run(tmp_path / "run", seed=3)
    results = compute_results(load_run(run_dir))
    verdicts = {h["id"]: h["verdict"] for h in results["design"]["hypotheses"]}
    assert set(verdicts) == {"H1", "H2"}
    assert "confirmed" not in verdicts.values(), verdicts
    assert not any("confirmed" in line for line in results["summary"] if line[:3] in ("H1 ", "H2 "))


def test_a_planted_in_domain_gain_is_found_by_the_matrix(tmp_path):
    run_dir = write_design_run(tmp_path / "run", in_domain_effect=0.6, seed=5)
    results = compute_results(load_run(run_dir))
    h2 = _hypothesis(results, "H2")
    assert h2["verdict"] == "confirmed" and h2["estimate"] > 0
    h1 = _hypothesis(results, "H1")
    assert h1["verdict"] != "confirmed", "an in-domain gain shared by both lengths is not a length effect"


def test_a_design_without_a_crossover_makes_no_length_claim(tmp_path):
    run_dir = write_design_run(tmp_path / "run", length_effect=0.5)
    config = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
    del config["design"]["crossover"]
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    results = compute_results(load_run(run_dir))
    assert results["design"]["identifies_length"] is False
    assert _hypothesis(results, "H1")["verdict"] == "inconclusive"
    assert any("does not identify a length effect" in line for line in results["summary"])


def test_the_matrix_reports_how_far_its_answer_moves_with_the_seeds(tmp_path):
    results = compute_results(load_run(write_design_run(tmp_path / "run", in_domain_effect=0.6, seed=5)))
    spread = results["design"]["matrix"]["seed_spread"]
    assert spread["n"] == 2 and len(spread["per_seed"]) == 2 and spread["sd"] is not None
    assert _hypothesis(results, "H2")["seed_spread"] == spread


@pytest.mark.parametrize("text, error", [
    (b"hypotheses: []", "lists no hypotheses"),
    (b"hypotheses: [{id: H1, statement: s, effect: slope, direction: positive, smallest_effect: 0.1}]",
     "is not one of crossover, matrix.in_domain"),
    (b"hypotheses: [{id: H1, statement: s, effect: crossover, direction: up, smallest_effect: 0.1}]",
     "is not positive or negative"),
    (b"hypotheses: [{id: H1, effect: crossover, direction: positive, smallest_effect: 0.1}]", "lacks 'statement'"),
    (b"hypotheses: [", "not valid YAML"),
])
def test_a_broken_preregistration_is_named_and_gets_no_verdicts(tmp_path, text, error):
    with pytest.raises(PreregistrationError, match=error):
        read_preregistration(text)
    run_dir = write_design_run(tmp_path / "run", per_cell=8)
    (run_dir / "preregistration.yaml").write_bytes(text)
    results = compute_results(load_run(run_dir))
    assert error.split("'")[0] in results["design"]["preregistration"]["error"]
    assert results["design"]["hypotheses"] == []
    assert any("could not be read" in line for line in results["summary"])
