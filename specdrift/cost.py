"""The draft/target cost ratio c, measured directly, for cost.json.

Leviathan et al.'s c is the time of one step of the draft model over one step
of the target. For each local arm that drafts with a model (`draft_model`),
the runner serves that draft model alone on vLLM with the target's engine
settings and times plain decoding on it and on the baseline arm: the same eval
prompts, one request at a time, the two servers alternating (drafter first on
even prompts, baseline first on odd ones) so that drift cancels, each request
forced to `max_tokens` output tokens (ignore_eos). A request's step time is its
TPOT as the gateway's records define it (core/streaming.py); c is the median
over prompts of drafter TPOT / baseline TPOT. Requests go to the
servers directly, not through the gateway, so they leave no records.

Inside speculative decoding vLLM runs the drafter within the target's engine
step, so this c measures the drafter's own step, not the extra bookkeeping of a
speculative step; the report sets it beside the estimate from the records.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import httpx

from core.arms import HOST, launch_arm
from core.config import ArmConfig, ExperimentConfig
from core.paths import drafter_dir
from core.processes import ProcessStack, StartupError, free_port
from core.streaming import stream_chat

METHOD = ("median over {n} eval prompts of the TPOT of the draft model served alone on vLLM over the baseline's "
          "TPOT, {max_tokens} forced output tokens, one request at a time, the two servers alternating")


def draft_model_path(config: ExperimentConfig, arm: ArmConfig) -> str | None:
    """The draft model an arm runs, when it is one vLLM can serve alone."""
    spec = arm.speculative
    if not arm.local or spec is None or spec.method != "draft_model":
        return None
    return str(drafter_dir(config, spec.drafter)) if spec.drafter else spec.model


def decode_step_s(client: httpx.Client, url: str, model: str, messages: list[dict], max_tokens: int) -> float:
    """One streamed request's TPOT in seconds."""
    streamed = stream_chat(client, url, {"model": model, "messages": messages, "max_tokens": max_tokens,
                                         "temperature": 0.0, "ignore_eos": True})
    if streamed.tpot_s is None:
        raise RuntimeError(f"{url}: {streamed.tokens} tokens streamed; cannot time a decode step")
    return streamed.tpot_s


def time_pair(draft_url: str, draft_model: str, base_url: str, base_model: str, rows: list[dict],
              max_tokens: int) -> dict:
    """Alternate the two servers over `rows`; the figures for cost.json."""
    ratios, draft_steps, base_steps = [], [], []
    with httpx.Client(timeout=httpx.Timeout(120.0, connect=5.0)) as client:
        warm = rows[0]["messages"]
        decode_step_s(client, draft_url, draft_model, warm, 4)
        decode_step_s(client, base_url, base_model, warm, 4)
        order = [(draft_url, draft_model), (base_url, base_model)]
        for i, row in enumerate(rows):
            timed = {}
            for url, model in order if i % 2 == 0 else order[::-1]:
                timed[url] = decode_step_s(client, url, model, row["messages"], max_tokens)
            draft_steps.append(timed[draft_url])
            base_steps.append(timed[base_url])
            ratios.append(timed[draft_url] / timed[base_url])
    return {"c": round(statistics.median(ratios), 4),
            "method": METHOD.format(n=len(rows), max_tokens=max_tokens),
            "draft_step_s": round(statistics.median(draft_steps), 5),
            "target_step_s": round(statistics.median(base_steps), 5),
            "n": len(rows)}


def measure_costs(config: ExperimentConfig, arm_names: list[str], base_url: str, eval_rows: list[dict],
                  cost_path: Path, log_dir: Path, progress=print) -> dict:
    """Measure c for each arm in `arm_names` that drafts with a model and is not
    in cost.json yet; cost.json is rewritten after each arm. Returns its arms."""
    measured = json.loads(cost_path.read_text())["arms"] if cost_path.exists() else {}
    n = min(config.cost.prompts, len(eval_rows))
    rows = [eval_rows[i * len(eval_rows) // n] for i in range(n)]  # spread over tasks and strata
    if not rows:
        return measured
    for name in arm_names:
        arm = config.arm(name)
        model = draft_model_path(config, arm)
        if model is None or name in measured:
            continue
        progress(f"cost {name}: serving its draft model alone to time it against {config.baseline_arm}")
        timer = ArmConfig(name=f"{name}-draft-alone", engine_args=arm.engine_args)
        try:
            with ProcessStack() as stack:
                running = launch_arm(config, timer, free_port(HOST, config.ports.arms_from), log_dir, stack,
                                     model=model)
                figures = time_pair(running.url, timer.name, base_url, config.baseline_arm, rows,
                                    config.cost.max_tokens)
        except (StartupError, RuntimeError, httpx.HTTPError) as err:
            progress(f"cost {name}: not measured ({str(err).splitlines()[0]}); the report estimates c from the records")
            continue
        measured[name] = figures
        cost_path.write_text(json.dumps({"arms": measured}, indent=1) + "\n")
        progress(f"cost {name}: c = {figures['c']} (draft step {figures['draft_step_s'] * 1000:.1f} ms, "
                 f"target step {figures['target_step_s'] * 1000:.1f} ms, {figures['n']} prompts)")
    return measured
