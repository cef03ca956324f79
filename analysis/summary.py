"""The plain-language summary: what the data support, and what they do not.

Each sentence is derived from results.json by a stated rule: a speed-up is
called a gain or a loss only when its 95% interval excludes 1, a relation
only when its slope interval excludes 0 and at least MIN_CELLS_FOR_RELATION
cells went into it; anything measured on fewer than stats.SMALL_SAMPLE
prompts is flagged as a small sample.
"""

from __future__ import annotations

from analysis import stats, text
from analysis.cells import ALL, GAINS, HEADLINE, fit_key
from analysis.schema import Estimate, Results
from core.contracts import OK

MIN_CELLS_FOR_RELATION = 5


def _verdict(estimate: Estimate, what: str = "") -> str:
    if estimate.value is None:
        return "not measured"
    if estimate.ci is None:
        return f"too few prompts for an interval (n = {estimate.n})"
    if stats.excludes(estimate.ci, 1):
        word = "faster than" if estimate.value > 1 else "slower than"
        verdict = f"{word} {what}".strip()
    else:
        verdict = f"not distinguishable from {what or '1×'}".strip()
    if estimate.n < stats.SMALL_SAMPLE:
        verdict += f" (small sample: {estimate.n} prompts)"
    return verdict


def _arms(results: Results) -> list[str]:
    run, lines = results.run, []
    primary = run.primary_regime
    for arm in run.speculative_arms:
        cell = results.cell(arm.name, primary)
        if cell is None:
            continue
        speed, e2e = cell.speedup.tpot, cell.speedup.e2e
        pairing = "" if cell.speedup.paired else " (unpaired: few prompts in common with the baseline)"
        line = (f"{arm.name} ({arm.method}, {primary}): TPOT speed-up{pairing} {text.ratio(speed)}, "
                f"{_verdict(speed, 'the baseline')}; end-to-end {text.ratio(e2e)}.")
        accepted = cell.acceptance
        if accepted and accepted.tau is not None:
            line += (f" τ = {text.num(accepted.tau)} tokens per drafting step, "
                     f"{text.num(accepted.tokens_per_step)} per decode step (drafts on "
                     f"{text.num(100 * (accepted.drafting_share or 0), 0)}% of steps); α = "
                     f"{text.num(accepted.alpha)}, vLLM acceptance rate {text.num(accepted.vllm_rate)}.")
        model = cell.model
        if model:
            cost = results.cost[arm.name]
            negative = " (below 0: noise, taken as 0)" if model.c < 0 else ""
            line += (f" The Leviathan model predicts {text.num(model.predicted_speedup, 2)}× from α and "
                     f"c = {text.num(model.c)}{negative} ({cost.source}).")
            if cost.source != "cost.json":
                line += " With c estimated from these same timings that prediction is not an independent check."
        lines.append(line)
    return lines


def _baseline_noise(results: Results) -> list[str]:
    run = results.run
    cell = results.cell(run.baseline_arm, run.primary_regime)
    if cell is None:
        where = f"in the {run.primary_regime} regime" if run.primary_regime else "at all"
        return [f"The baseline arm {run.baseline_arm} answered no request successfully {where}, so no "
                "speed-up can be measured."]
    repeat = cell.speedup.tpot
    if repeat.value is None:
        return ["The baseline was not run twice on the same prompts, so there is no noise floor for "
                "speed-up or for output agreement."]
    return [f"The baseline against itself (second run over first, same prompts) gives a TPOT ratio of "
            f"{text.ratio(repeat)}: {_verdict(repeat, 'its first run')}. Speed-ups closer to 1 than this "
            "spread are within the machine's noise."]


def _lossless(results: Results) -> list[str]:
    run = results.run
    if run.temperature not in (None, 0, 0.0):
        return [f"Temperature was {run.temperature}, so outputs are not expected to match; "
                "losslessness was not assessed."]
    parts = [f"{cell.arm} {text.share(cell.lossless)}" for cell in results.cells_in(run.primary_regime, strata=False)
             if cell.task == ALL and cell.arm != run.baseline_arm and cell.lossless.compared]
    if not parts:
        return []
    base = results.cell(run.baseline_arm, run.primary_regime)
    floor = text.share(base.lossless) if base else text.DASH
    line = (f"Outputs identical to the baseline's: {', '.join(parts)}; the baseline agreed with itself on "
            f"{floor}. ")
    if run.target_dtype == "float32":
        line += "The target ran in float32, so disagreement beyond the baseline's own is evidence of a lossy arm."
    else:
        line += (f"In {run.target_dtype or 'this dtype'} greedy outputs differ from run to run by numerics "
                 "alone, so only a share well below the baseline's own agreement would point to a lossy arm; "
                 "for an exact check, run the experiment with `target.dtype: float32`.")
    return [line]


def _answer(results: Results) -> list[str]:
    lines = []
    measure, kind = HEADLINE
    if not results.answer:
        return ["No fine-tuned/generic drafter pair of arms was measured, so the research question "
                "(does the fine-tuned drafter's advantage depend on length divergence?) is not answered by this run."]
    for answer in results.answer:
        head = f"Fine-tuned ({answer.finetuned_arm}) against generic ({answer.generic_arm})"
        if answer.missing:
            lines.append(f"{head}: not answered ({answer.missing}).")
            continue
        n_cells = answer.cells_in_fit
        for gain, what in GAINS.items():
            fit = answer.fits[fit_key(gain, measure, kind)]
            rho, slope = fit.spearman, fit.slope
            line = (f"{head}: {what} against JS divergence of {kind} length from the fine-tuning split, over "
                    f"{n_cells} (task, stratum) cells: Spearman ρ = {text.num(rho.rho, 2)}"
                    f" (p = {text.num(rho.p, 2)}), slope {text.num(slope.value)} {text.ci(slope.ci)}. ")
            if n_cells < MIN_CELLS_FOR_RELATION:
                line += (f"That is too few cells (fewer than {MIN_CELLS_FOR_RELATION}) to support or rule out "
                         "any relation.")
            elif stats.excludes(slope.ci, 0):
                direction = "falls" if slope.value < 0 else "rises"
                # issue 12: across tasks the divergence is also the domain, so this is never a length claim.
                line += (f"Its interval excludes 0 (the fine-tuned drafter's {what} {direction} as the divergence "
                         "grows), but across tasks length and domain go together, so this is not a length claim"
                         + (" (the within-domain crossover, H1, is)." if results.design and
                            results.design.identifies_length else "."))
            else:
                line += "The slope's interval includes 0: the data do not support a relation."
            lines.append(line)
    return lines


def _controls(results: Results) -> list[str]:
    lines = []
    for control in results.controls:
        for arm, gains in control.gains.items():
            scopes = (control.task, control.label, control.like)
            own, matched, like = (gains.get(s).tau_gain if gains.get(s) else None for s in scopes)
            values = [None if gain is None else gain.value for gain in (own, matched, like)]
            if None in values:
                lines.append(f"Length-matched control {control.label} ({arm}): not enough data.")
                continue
            line = (f"Length-matched control ({arm}): τ gain on {control.task} {text.num(values[0])}, on "
                    f"{control.task} resampled to {control.like}'s prompt lengths {text.num(values[1])}, "
                    f"on {control.like} {text.num(values[2])}. ")
            if own.ci and like.ci and (own.ci[1] < like.ci[0] or like.ci[1] < own.ci[0]):
                closer = control.like if abs(values[1] - values[2]) < abs(values[1] - values[0]) else control.task
                line += (f"The control sits closer to {closer}: "
                         + ("length explains the difference." if closer == control.like else
                            "domain, not length, explains the difference."))
            else:
                line += ("The two tasks' intervals overlap, so the control cannot tell length from domain here.")
            lines.append(line)
    return lines


def _regimes(results: Results) -> list[str]:
    lines = []
    if len(results.run.regimes) < 2:
        return ["Only one load regime was measured, so where speculation stops paying off under load is not shown."]
    for arm, curve in results.regimes.items():
        if curve.status == "crosses":
            a, b = curve.crosses_between
            lines.append(f"{arm}: the TPOT speed-up crosses 1× between the {a} and {b} regimes.")
        elif curve.status in ("above", "below"):
            lines.append(f"{arm}: the TPOT speed-up stays {curve.status} 1× in every measured regime.")
    return lines


def _drift(results: Results) -> list[str]:
    run = results.run
    entry = results.drift.get(run.baseline_arm, {}).get(run.primary_regime)
    if not entry:
        return []
    trend = (f"{text.percent(entry.percent_over_span)} {text.ci(entry.ci, 1)} over "
             f"{text.num(entry.span_min, 2)} min")
    if stats.excludes(entry.ci, 0):
        return [f"The baseline's TPOT drifted by {trend}: comparisons are only trustworthy because they are "
                "paired in time."]
    return [f"No drift of the baseline's TPOT could be shown ({trend})."]


def _inputs(results: Results) -> list[str]:
    lines = []
    inputs = results.inputs
    for arm in inputs.arms_without_records:
        lines.append(f"Arm {arm} has no records: it did not start or died before its first request, and is "
                     "absent from every table.")
    for arm, reason in sorted(inputs.dead_arms.items()):
        lines.append(f"The runner gave up on arm {arm} ({reason}); its tables cover only what it answered before.")
    for arm, by_regime in inputs.requests_by_status.items():
        failed = {}
        for regime in by_regime.values():
            for status, n in regime.items():
                if status != OK:
                    failed[status] = failed.get(status, 0) + n
        total = sum(n for regime in by_regime.values() for n in regime.values())
        if failed:
            detail = ", ".join(f"{n} {s}" for s, n in sorted(failed.items()))
            lines.append(f"Arm {arm}: {sum(failed.values())} of {total} requests failed ({detail}); "
                         "failed requests are left out of every statistic.")
    return lines


def summarize(results: Results) -> list[str]:
    return (_inputs(results) + _arms(results) + _baseline_noise(results) + _lossless(results) + _answer(results)
            + _controls(results) + _regimes(results) + _drift(results)
            + [_length_alone(results)])


def _length_alone(results: Results) -> str:
    if results.design and results.design.identifies_length:
        return ("Correlations across tasks mix length with domain; the within-domain crossover (H1) is the part of "
                "this report that manipulates length alone, and the served per-stratum slopes and the length-matched "
                "control only hint at it.")
    return ("Correlations across tasks mix length with domain; the within-task (per-stratum) slopes and the "
            "length-matched control are the parts of this report that speak to length alone, and only weakly.")
