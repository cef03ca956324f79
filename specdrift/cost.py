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
servers directly, not through the gateway, so they leave no records. Two
arms whose draft models have one architecture (config.json and engine
arguments) share one measurement: c is the cost of the network's step, which
the weights do not change (the generic and fine-tuned drafters).

An EAGLE-3 head (`eagle3`) cannot be served alone: it drafts from the target's
hidden states. Its arms are skipped here with a line saying so; their step cost
r comes from the served TPOT instead.

Inside speculative decoding vLLM runs the drafter within the target's engine
step, so this c measures the drafter's own step, not the extra bookkeeping of a
speculative step; the report sets it beside the estimate from the records.

The K sweep (`cost.k_sweep`, for `cost.sweep_arms`): the arm's own speculative
config served at each K and timed against the baseline the same way, each
request forced to `max_tokens`. Per prompt the step-cost ratio is
r = (TPOT_spec / TPOT_base) x tokens per decode step, the tokens per step
from vLLM's per-request counts ((N - 1) / (N - 1 - accepted)); the median r
at each K, and the least-squares line r = gamma c + v through them, go to
cost.json's `k_sweep`: c is the drafter's cost per drafted token, v the rest
of a speculative step.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import httpx
import numpy as np

from core.arms import HOST, launch_arm
from core.config import ArmConfig, ExperimentConfig
from core.paths import drafter_dir
from core.processes import ProcessStack, StartupError, free_port
from core.streaming import stream_chat

PROVENANCE_FIELDS = ("_name_or_path", "transformers_version")
METHOD = ("median over {n} eval prompts of the TPOT of the draft model served alone on vLLM over the baseline's "
          "TPOT, {max_tokens} forced output tokens, one request at a time, the two servers alternating")


def draft_model_path(config: ExperimentConfig, arm: ArmConfig) -> str | None:
    """The draft model an arm runs, when it is one vLLM can serve alone."""
    spec = arm.speculative
    if not arm.local or spec is None or spec.method != "draft_model":
        return None
    return str(drafter_dir(config, spec.drafter)) if spec.drafter else spec.model


def architecture_key(model: str, engine_args: dict) -> str | None:
    """What a draft model's step cost depends on: its config.json (without the fields that name where it
    came from) and the engine arguments; None when `model` is not a local directory."""
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        return None
    shape = {k: v for k, v in json.loads(config_file.read_text()).items() if k not in PROVENANCE_FIELDS}
    text = json.dumps({"config": shape, "engine_args": engine_args}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def time_speculative_pair(spec_url: str, spec_model: str, base_url: str, base_model: str, rows: list[dict],
                          max_tokens: int) -> dict:
    """Alternate a speculative arm and the baseline over `rows`; the step-cost ratio r per prompt."""
    ratios, tokens_per_step, speedups = [], [], []
    with httpx.Client(timeout=httpx.Timeout(120.0, connect=5.0)) as client:
        def streamed(url, model, messages, tokens):
            return stream_chat(client, url, {"model": model, "messages": messages, "max_tokens": tokens,
                                             "temperature": 0.0, "ignore_eos": True})
        streamed(spec_url, spec_model, rows[0]["messages"], 4)
        streamed(base_url, base_model, rows[0]["messages"], 4)
        order = [(spec_url, spec_model), (base_url, base_model)]
        for i, row in enumerate(rows):
            timed = {url: streamed(url, model, row["messages"], max_tokens)
                     for url, model in (order if i % 2 == 0 else order[::-1])}
            spec, base = timed[spec_url], timed[base_url]
            if spec.tpot_s is None or base.tpot_s is None:
                raise RuntimeError(f"{spec_url}: too few tokens streamed to time a decode step")
            decode_tokens = spec.tokens - 1
            accepted = min(int((spec.spec or {}).get("num_accepted_draft_tokens", 0)), decode_tokens - 1)
            per_step = decode_tokens / (decode_tokens - accepted)
            ratios.append(spec.tpot_s / base.tpot_s * per_step)
            tokens_per_step.append(per_step)
            speedups.append(base.tpot_s / spec.tpot_s)
    return {"r": round(statistics.median(ratios), 4), "tokens_per_step": round(statistics.median(tokens_per_step), 4),
            "speedup": round(statistics.median(speedups), 4), "n": len(rows)}


def fit_step_cost(points: list[dict]) -> dict | None:
    """Least squares r = gamma c + v through the sweep's (K, median r) points."""
    ks = [p["k"] for p in points]
    if len(set(ks)) < 2:
        return None
    c, v = np.polyfit(np.array(ks, float), np.array([p["r"] for p in points], float), 1)
    return {"c": round(float(c), 4), "v": round(float(v), 4)}


def sweep_step_costs(config: ExperimentConfig, name: str, base_url: str, rows: list[dict], log_dir: Path,
                     progress=print) -> dict:
    """The arm's speculative config served at every K of `cost.k_sweep` and timed against the baseline."""
    arm = config.arm(name)
    points = []
    for k in config.cost.k_sweep:
        spec = arm.speculative.model_copy(update={"num_speculative_tokens": k})
        timer = ArmConfig(name=f"{name}-k{k}", speculative=spec, engine_args=arm.engine_args)
        progress(f"cost {name}: K sweep, serving it at K = {k} to time it against {config.baseline_arm}")
        with ProcessStack() as stack:
            running = launch_arm(config, timer, free_port(HOST, config.ports.arms_from), log_dir, stack)
            point = {"k": k, **time_speculative_pair(running.url, timer.name, base_url, config.baseline_arm, rows,
                                                    config.cost.max_tokens)}
        points.append(point)
        progress(f"cost {name}: K = {k}: r = {point['r']} ({point['tokens_per_step']} tokens per step, "
                 f"TPOT speed-up {point['speedup']}, {point['n']} prompts)")
    fit = fit_step_cost(points)
    return {"points": points, "fit": fit,
            "method": f"median over {len(rows)} eval prompts of r = TPOT_spec / TPOT_base x tokens per decode step, "
                      f"{config.cost.max_tokens} forced output tokens, the arm at each K and the baseline "
                      f"alternating; r = gamma c + v by least squares over K"}


def measure_costs(config: ExperimentConfig, arm_names: list[str], base_url: str, eval_rows: list[dict],
                  cost_path: Path, log_dir: Path, progress=print) -> dict:
    """Measure c for each arm in `arm_names` that drafts with a model and is not
    in cost.json yet; cost.json is rewritten after each arm. Returns its arms."""
    saved = json.loads(cost_path.read_text()) if cost_path.exists() else {}
    measured, sweeps = saved.get("arms", {}), saved.get("k_sweep", {})
    n = min(config.cost.prompts, len(eval_rows))
    rows = [eval_rows[i * len(eval_rows) // n] for i in range(n)]  # spread over tasks and strata
    if not rows:
        return measured
    for name in arm_names:
        arm = config.arm(name)
        model = draft_model_path(config, arm)
        if arm.local and arm.speculative is not None and arm.speculative.method == "eagle3" and name not in measured:
            progress(f"cost {name}: not measured alone (an EAGLE-3 head reads the target's hidden states, so vLLM "
                     "cannot serve it without the target); its step cost r comes from the served TPOT")
        if model is None or name in measured:
            continue
        shape = architecture_key(model, arm.engine_args)
        twin = next((other for other, figures in measured.items() if shape and figures.get("architecture") == shape),
                    None)
        if twin is not None:
            # c is the cost of a step of the network; drafters of one architecture share it by construction.
            measured[name] = {**measured[twin], "shared_with": twin,
                              "method": f"{measured[twin]['method']}; measured on {twin}, the same architecture"}
            _save(cost_path, measured, sweeps)
            progress(f"cost {name}: c = {measured[name]['c']}, {twin}'s: its draft model has the same architecture")
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
        measured[name] = {**figures, "architecture": shape} if shape else figures
        _save(cost_path, measured, sweeps)
        progress(f"cost {name}: c = {figures['c']} (draft step {figures['draft_step_s'] * 1000:.1f} ms, "
                 f"target step {figures['target_step_s'] * 1000:.1f} ms, {figures['n']} prompts)")
    for name in config.cost.sweep_arms if config.cost.k_sweep else []:
        if name in sweeps or name not in arm_names:
            continue
        try:
            sweeps[name] = sweep_step_costs(config, name, base_url, rows, log_dir, progress)
        except (StartupError, RuntimeError, httpx.HTTPError) as err:
            progress(f"cost {name}: K sweep not measured ({str(err).splitlines()[0]})")
            continue
        _save(cost_path, measured, sweeps)
        fit = sweeps[name]["fit"]
        if fit:
            progress(f"cost {name}: K sweep r = gamma c + v: c = {fit['c']}, v = {fit['v']}")
    return measured


def _save(cost_path: Path, measured: dict, sweeps: dict) -> None:
    cost_path.write_text(json.dumps({"arms": measured, "k_sweep": sweeps}, indent=1) + "\n")
