"""results.json into report.md and report.html, and `write_report`, the one
entry point that analyses a run directory. Every number shown comes from
results.json; this module only arranges and words them."""

from __future__ import annotations

import json
from pathlib import Path

from analysis import replayed, text
from analysis.cells import ALL, GAINS, HEADLINE, fit_key, fit_key_parts
from analysis.document import Bullets, Document, Figure, Heading, Paragraph, Table
from analysis.figures import draw_all
from analysis.kinds import KIND_NAMES
from analysis.replayed import NO_REPLAY
from analysis.results import compute_results
from analysis.rundir import load_run
from analysis.schema import Answer, Divergence, Results, Speedup
from core.contracts import OK

FIGURES = "figures"
REPLAY_PROMPTS = "replay_prompts.jsonl"  # the replay per (arm, K, prompt)
REPLAY_HEADING = "Acceptance (replay, primary outcome)"


def _figure(figures: dict[str, str], name: str) -> list[Figure]:
    """The figure as a block, or none where the run had no data for it."""
    return [Figure(f"{FIGURES}/{name}", figures[name])] if name in figures else []


def _spec_names(results: Results) -> list[str]:
    return [a.name for a in results.run.speculative_arms]


def _run_section(results: Results) -> list:
    run, inputs = results.run, results.inputs
    rows = []
    for arm in run.arms:
        statuses = {}
        for by_status in inputs.requests_by_status.get(arm.name, {}).values():
            for status, n in by_status.items():
                statuses[status] = statuses.get(status, 0) + n
        failed = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()) if s != OK) or "none"
        role = " (baseline)" if arm.name == run.baseline_arm else ""
        rows.append([arm.name + role, arm.method or "none", text.num(arm.num_speculative_tokens),
                     arm.drafter or text.DASH, text.num(statuses.get(OK, 0)), failed])
    blocks = [
        Heading(2, "The run"),
        Paragraph(f"Run `{run.run_id}` of experiment `{run.name}`: {inputs.records} requests over "
                  f"{text.num(run.duration_s, 3)} s; load regimes {', '.join(run.regimes) or 'none'} "
                  f"(primary: {run.primary_regime}); target dtype {run.target_dtype or 'unknown'}, "
                  f"temperature {text.num(run.temperature)}. Speed-ups are against `{run.baseline_arm}`."),
        Table(["arm", "speculation", "K", "drafter", "ok requests", "failed requests"], rows),
        Table(["regime", "how arms were scheduled (pairing in time)"],
              [[regime, plan] for regime, plan in run.regime_plans.items()]),
    ]
    for arm, reason in sorted(inputs.dead_arms.items()):
        blocks.append(Paragraph(f"The runner gave up on arm {arm}: {reason}."))
    if inputs.arms_without_records:
        blocks.append(Paragraph("Configured arms without a single record (not started, or died before their "
                                f"first request): {', '.join(inputs.arms_without_records)}."))
    gaps = [[arm, regime, text.num(c.prompts_sent), text.num(c.prompts_ok),
             text.num(c.baseline_prompts_without_answer)]
            for arm, by_regime in inputs.coverage.items() for regime, c in by_regime.items()
            if c.baseline_prompts_without_answer or c.prompts_ok < c.prompts_sent]
    if gaps:
        blocks.append(Table(["arm", "regime", "prompts sent", "prompts answered", "baseline prompts it did not answer"],
                            gaps, "Coverage gaps: prompts an arm did not answer are missing from its pairs."))
    return blocks


def _pairing(speedup: Speedup) -> str:
    tpot = speedup.tpot
    if speedup.paired:
        return f"{tpot.n} paired"
    return f"{tpot.n} vs {tpot.n_reference} unpaired"


def _speedup_section(results: Results, figures: dict) -> list:
    run = results.run
    blocks = [Heading(2, "Speed-up against the baseline, paired by prompt"),
              Paragraph(results.methods.pairing.capitalize() + ". A speed-up is the geometric mean over "
                        "prompts of baseline/arm, for TPOT (time per output token after the first) and for "
                        "end-to-end time; > 1 means the arm is faster. Intervals: 95% bootstrap (expanded "
                        "percentile) over prompts. The baseline's own row is its second run over its first: "
                        "the noise floor. Where too few prompts were answered by both arms (under load, when a bound stops the "
                        "arms' blocks at different points of the prompt list), the row is 'unpaired': the ratio "
                        "of geometric means within each (task, stratum), weighted by the arm's prompts.")]
    blocks += _figure(figures, "speedup.png")
    medians = [[c.arm, c.regime, text.num(c.requests), text.num(c.latency.ttft_s),
                text.num(c.latency.tpot_s and 1000 * c.latency.tpot_s, 1),
                text.num(c.latency.e2e_s), text.num(c.latency.completion_tokens, 0)]
               for regime in run.regimes for c in results.cells_in(regime, strata=False) if c.task == ALL]
    blocks.append(Table(["arm", "regime", "ok requests", "median TTFT (s)", "median TPOT (ms)", "median end-to-end (s)",
                         "median output tokens"], medians, "Raw medians, all tasks (not paired: for scale only)"))
    for regime in run.regimes:
        rows = [[c.task, c.stratum, c.arm, _pairing(c.speedup), text.ratio(c.speedup.tpot),
                 text.ratio(c.speedup.e2e), text.num(c.speedup.median_gap_s, 2)]
                for c in results.cells_in(regime, strata=regime == run.primary_regime)]
        blocks.append(Table(["task", "stratum", "arm", "prompts (pairing)", "TPOT speed-up [95% CI]",
                             "end-to-end speed-up [95% CI]", "median pair gap (s)"], rows, f"Regime: {regime}"))
    return blocks


def _acceptance_section(results: Results, figures: dict) -> list:
    run = results.run
    rows = []
    for c in results.cells_in(run.primary_regime, _spec_names(results)):
        a = c.acceptance
        if not a:
            continue
        rows.append([c.task, c.stratum, c.arm, text.num(a.drafts),
                     text.with_ci(a.tau, a.tau_ci), text.num(a.tokens_per_step),
                     text.num(a.drafting_share), text.num(a.alpha), text.num(a.alpha_from_tau),
                     text.num(a.vllm_rate), " / ".join(text.num(r) for r in a.position_rate) or text.DASH,
                     " / ".join(text.num(r) for r in a.conditional) or text.DASH])
    blocks = [Heading(2, "Acceptance (served)"),
              Paragraph("τ = 1 + accepted/drafts (vLLM's mean acceptance length: tokens per step that carried a "
                        "draft). Tokens per decode step counts every step, drafted or not (output tokens after the "
                        "first over decode steps); TPOT is the step time divided by it. Drafting share: steps that "
                        "carried a draft. α (Leviathan's per-token acceptance) is "
                        "shown from the per-position counts: accepted positions over positions tried; α from τ "
                        "solves τ = (1−α^(K+1))/(1−α) and agrees when acceptance is geometric. vLLM's rate is "
                        "accepted/drafted tokens and counts positions after the first rejection, so it is lower "
                        "than α. Per-position rate i: share of drafts with position i accepted; conditional i: "
                        "given position i−1 accepted. Acceptance does not depend on timing: it is the robust part "
                        "of the answer.")]
    blocks += _figure(figures, "acceptance_per_position.png")
    if rows:
        blocks.append(Table(["task", "stratum", "arm", "drafts", "τ [95% CI]", "tokens/decode step",
                             "drafting share", "α (per-position)", "α from τ",
                             "vLLM rate", "per-position rate", "conditional"], rows,
                            f"Regime: {run.primary_regime}"))
    return blocks


def _small(row) -> str:
    return " (small n)" if row.small_n else ""


def _agreement(entry) -> str:
    return text.DASH if not entry.n else f"{entry.count}/{entry.n} ({100 * entry.share:.0f}%) {text.ci(entry.ci, 2)}"


def _percent(share: float | None) -> str:
    return text.DASH if share is None else f"{100 * share:.1f}%"


def _replay_acceptance(replay) -> list:
    rows = [[r.task, r.stratum, r.arm, text.num(r.k), text.num(r.n), text.with_ci(r.tau, r.tau_ci) + _small(r),
             text.num(r.tokens_per_step), text.num(r.drafting_share),
             " / ".join(text.num(x) for x in r.position_rate) or text.DASH,
             " / ".join(text.num(x) for x in r.conditional) or text.DASH,
             _percent(r.oov_share), r.weights if r.stratum == ALL else ""]
            for r in replay.rows()]
    by_k = {}
    for r in replay.rows(served=None):
        if r.stratum == ALL:
            by_k.setdefault((r.arm, r.task), {})[r.k] = r
    ks = sorted({r.k for r in replay.acceptance})
    k_rows = [[arm, task] + [text.with_ci(row.tau, row.tau_ci) + (" (served)" if row.served else "")
                             if (row := found.get(k)) else text.DASH for k in ks]
              for (arm, task), found in by_k.items()]
    return [Table(["task", "stratum", "arm", "K", "prompts", "τ [95% CI]", "tokens/decode step", "drafting share",
                   "per-position rate", "conditional", "out-of-vocabulary share", "pooled with"], rows,
                  "Replayed acceptance at each arm's served K"),
            Table(["arm", "task"] + [f"τ at K = {k}" for k in ks], k_rows,
                  "Replayed τ at every K (pooled rows, all strata)")]


def _replay_finetune(replay) -> list:
    blocks = []
    for entry in replay.finetune:
        rows = [[r.task, r.stratum, text.num(r.k), text.num(r.n), text.num(r.excluded),
                 text.with_ci(r.mean_y, r.ci) + _small(r), text.with_ci(r.ratio, r.ratio_ci), text.num(r.tau_ft),
                 text.num(r.tau_gen)] for r in entry.rows if r.served or r.stratum == ALL]
        blocks.append(Table(["task", "stratum", "K", "prompts", "excluded (no drafts)", "mean y [95% CI]",
                             "τ ratio exp(mean y) [95% CI]", f"mean τ {entry.finetuned_arm}",
                             f"mean τ {entry.generic_arm}"], rows,
                            f"y = log(τ {entry.finetuned_arm} / τ {entry.generic_arm}) per prompt (replay): every "
                            "stratum at the served K, and the pooled row of each task at every K"))
    return blocks


def _replay_inference(replay) -> list:
    """issue 12: the length-shift model on y (analysis/inference.py), after the y table."""
    found = replay.inference
    if found is None or not found.pairs:
        return []

    def fit(f):
        if f is None:
            return [text.DASH] * 3
        return [f.model + (f" (fallback: {f.fallback})" if f.fallback else ""),
                text.with_ci(f.slope, f.ci) + (f", t df {f.df:.3g}" if f.df is not None else ""),
                text.num(f.p)]

    rows = []
    for e in found.pairs:
        if e.missing:
            rows.append([f"{e.finetuned_arm} / {e.generic_arm}", text.num(e.k), text.DASH, e.missing]
                        + [text.DASH] * 4)
            continue
        perm = e.permutation
        perm_text = (text.DASH if perm is None or perm.p is None else
                     f"p {text.num(perm.p)} ({perm.permutations} {'permutations' if perm.exact else 'draws'}; "
                     f"{perm.note})")
        for label, f in (("mixed", e.mixed), ("within task", e.within_task)):
            rows.append([f"{e.finetuned_arm} / {e.generic_arm}", text.num(e.k),
                         f"{e.n} prompts, {e.tasks} tasks, {e.cells} cells", label] + fit(f)
                        + [perm_text if label == "mixed" else ""])
    return [Paragraph(f"Length shift against the drafter's training mixture ({found.y}). x = {found.covariate}. "
                      "Slopes are the change in y per unit of x, with 95% intervals; the permutation test is of "
                      f"the between-task slope. {found.confounded}"),
            Table(["pair", "K", "data", "fit", "model", "slope of y on x [95% CI]", "p", "task permutation test"],
                  rows, "y against the length shift x: mixed model, within-task slope, task-level permutation")]


def _replay_validation(replay) -> list:
    check = replay.validation
    if check is None:
        return [Paragraph("No sequentially served requests: the replay could not be validated in this run.")]
    floor = check.baseline_self
    rows = [[arm, text.num(v.k), text.num(v.n), _agreement(v.accepted_exact), _agreement(v.accepted_within_1),
             _agreement(v.drafts_exact), text.num(v.identical_outputs), _agreement(v.identical_exact),
             _agreement(v.identical_within_1), text.num(v.tau_served), text.num(v.tau_replayed),
             text.with_ci(v.gap, v.gap_ci), v.verdict] for arm, v in check.arms.items()]
    return [Paragraph(f"Replay against served vLLM, per prompt the {check.regime} regime answered (its first ok "
                      f"request), at the served K. Verdict rule ({check.rule}). The gap is τ served − τ replayed "
                      "over the same prompts, with a paired interval; a disagreement is shown as it is. Baseline "
                      f"against itself: {text.share(floor)} of prompts gave identical outputs (the numerics' own "
                      "spread; prompts whose served output differs from the replay's target can differ in "
                      "acceptance too)."),
            Table(["arm", "K", "prompts", "accepted exact", "within 1 token", "drafts exact",
                   "identical outputs", "accepted exact (identical)", "within 1 (identical)", "τ served",
                   "τ replayed", "gap [95% CI]", "verdict"], rows, "Validation: replay against served vLLM")]


def _replay_cost(replay) -> list:
    model = replay.cost_model
    if model is None:
        return [Paragraph("No sequential speculative arm with baseline pairs: no cost model.")]
    v = model.v
    rows = [[arm, a.method, text.num(a.gamma), text.num(a.tokens_per_step), text.num(a.speedup),
             text.with_ci(a.r.value, a.r.ci), text.with_ci(a.c, a.c_ci), text.num(a.served_alone_c)]
            for arm, a in model.arms.items()]
    cells = [[c.task, c.stratum, c.arm, text.num(c.tokens_per_step), text.num(c.speedup),
              text.with_ci(c.r.value, c.r.ci), text.num(c.c)] for c in model.cells]
    blocks = [Paragraph(f"Step-cost ratio, served ({model.regime} regime): {model.definition}. {model.assumption} "
                        f"v = {text.with_ci(v.value if v else None, v.ci if v else None)} "
                        f"(from {', '.join(model.v_arms) or 'no n-gram arm'}). {model.served_alone.capitalize()}."),
              Table(["arm", "method", "γ", "tokens/decode step", "TPOT speed-up", "r [95% CI]", "c [95% CI]",
                     "c served alone (cost.json)"], rows, "Cost model r = γc + v per arm (all tasks)"),
              Table(["task", "stratum", "arm", "tokens/decode step", "TPOT speed-up", "r [95% CI]", "c"], cells,
                    "r per cell")]
    if model.k_sweep:
        blocks.append(Table(["drafter or arm", "from", "arms", "γ", "r", "c (fit)", "v (fit)"],
                            [[d, f.source, ", ".join(f.arms), " / ".join(map(str, f.gammas)),
                              " / ".join(text.num(x) for x in f.r), text.num(f.c), text.num(f.v)]
                             for d, f in model.k_sweep.items()], "K sweep: least squares r = γc + v"))
    return blocks


def _replay_kinds(replay) -> list:
    found = replay.kinds
    if found is None:
        return []
    rows = [[r.arm, KIND_NAMES.get(r.kind, r.kind), r.drafter, r.init or text.DASH, text.num(r.k),
             text.with_ci(r.tau, r.tau_ci), text.num(r.tokens_per_step), text.num(r.served_speedup),
             text.with_ci(r.r.value, r.r.ci) if r.r else text.DASH, text.num(r.c), text.num(r.build_minutes, 1),
             text.num(r.training_steps), text.num(r.vocabulary)] for r in found.rows]
    blocks = [Heading(3, "Drafter kinds compared"),
              Paragraph(f"Kinds in this run: {', '.join(KIND_NAMES.get(k, k) for k in found.kinds)}. τ is the "
                        "replayed one (all tasks, the served K); TPOT speed-up, r and c are the cost model's "
                        "(served, sequential regime); build time, steps and vocabulary come from each drafter's "
                        "card (the build's wall time on the machine that built it)."),
              Table(["arm", "kind", "drafter", "init", "K", "τ replayed [95% CI]", "tokens/decode step",
                     "TPOT speed-up", "r [95% CI]", "c", "build (min)", "training steps", "vocabulary"], rows,
                    "Every drafter arm, by kind")]
    if found.ratios:
        blocks += [Paragraph(found.definition.capitalize() + "."),
                   Table(["arm", "kind", "against", "its kind", "prompts", "r ratio [95% CI]"],
                         [[x.arm, KIND_NAMES.get(x.kind, x.kind), x.reference,
                           KIND_NAMES.get(x.reference_kind, x.reference_kind), text.num(x.r_ratio.n),
                           text.with_ci(x.r_ratio.value, x.r_ratio.ci)] for x in found.ratios],
                         "Step cost of one kind in steps of the other")]
    return blocks


def _replay_projection(replay) -> list:
    projection = replay.projection
    labels = []
    for row in projection.rows:
        for ratio in row.ratios:
            key = "this CPU (measured r)" if ratio.label.startswith("this CPU") else ratio.label
            if key not in labels:
                labels.append(key)
    rows = []
    for row in projection.rows:
        found = {("this CPU (measured r)" if x.label.startswith("this CPU") else x.label): x for x in row.ratios}
        rows.append([row.task, row.stratum, row.arm, text.with_ci(row.tau, row.tau_ci),
                     text.num(row.tokens_per_step)]
                    + [f"{text.num(x.speedup, 2)}× (r {text.num(x.r, 2)}, break-even τ {text.num(x.break_even_tau, 2)})"
                       if (x := found.get(label)) else text.DASH for label in labels])
    return [Heading(3, "Projection (not a measurement)"),
            Paragraph(projection.note + " The break-even τ is the τ at which the projected speed-up is 1 "
                      "(tokens per decode step = r, with the replayed drafting share)."),
            Table(["task", "stratum", "arm", "τ replayed [95% CI]", "tokens/decode step"] + labels, rows,
                  "Projected speed-up S = tokens per decode step / r (projection)")]


def _replay_section(results: Results, figures: dict) -> list:
    replay = results.replay
    blocks = [Heading(2, REPLAY_HEADING)]
    if replay is None:
        return blocks + [Paragraph(NO_REPLAY)]
    info = replay.info
    covered = ", ".join(f"{c['task']} {c['stratum']}: {c['prompts']}" for c in replay.coverage)
    methods = replay.methods
    blocks += [
        Paragraph(f"Acceptance replayed offline from the target's greedy outputs ({info.get('prompts')} prompts, "
                  f"drafters teacher-forced in {info.get('dtype') or 'an unrecorded dtype'}) through vLLM's chain "
                  f"rule at K = {', '.join(map(str, info.get('k') or []))}: the primary outcome, timing-free. "
                  f"Prompts replayed per cell: {covered}."),
        Bullets([f"τ: {methods['tau']}.", f"Intervals: {methods['tau_interval']}.", f"Pooling: {methods['pooling']}.",
                 f"Fine-tuned against generic: {methods['y']}."]),
    ]
    blocks += _figure(figures, "acceptance_context.png")
    blocks += _replay_acceptance(replay)
    blocks += _replay_finetune(replay)
    blocks += _replay_inference(replay)  # issue 12
    blocks += [Heading(3, "Validation against served vLLM")] + _replay_validation(replay)
    blocks += [Heading(3, "Cost model (served)")] + _replay_cost(replay)
    blocks += _replay_kinds(replay)  # issue 16
    blocks += _replay_projection(replay)
    return blocks


DESIGN_HEADING = "Hypotheses: length against domain (pre-registered)"


def _design_hypotheses(found) -> list:
    rows = []
    for h in found.hypotheses:
        spread = h.seed_spread or {}
        rows.append([h.id, h.effect, h.direction, text.with_ci(h.estimate, h.ci), text.with_ci(h.ratio, h.ratio_ci),
                     text.num(h.smallest_effect), text.num(h.mde),
                     text.num(spread.get("sd")) + (f" ({spread['n']} seeds)" if spread.get("n") else ""),
                     f"**{h.verdict}**"])
    return [Table(["hypothesis", "effect", "predicted", "estimate, log scale [95% CI]", "τ ratio [95% CI]",
                   "smallest effect of interest", "minimal detectable effect (80% power)", "between-seed sd",
                   "verdict"], rows, "Each pre-registered hypothesis, its effect and verdict")] if rows else []


def _design_crossover(cross: dict) -> list:
    if cross.get("missing"):
        return [Paragraph(f"Crossover {cross['short_task']} / {cross['long_task']}: not estimable ({cross['missing']}).")]
    model = cross.get("model") or {}
    cells = [[c["family"], c["eval_set"], text.num(c["n"]), text.with_ci(c["mean"], c["ci"]),
              text.with_ci(c["ratio"], c["ratio_ci"])] for c in cross["cells"]]
    seeds = [[f"short seed {s['seeds']['short']}, long seed {s['seeds']['long']}", text.with_ci(s["effect"], s["ci"])]
             for s in cross["per_seed"]]
    spread = cross["seed_spread"]
    return [
        Heading(3, f"Within one domain: {cross['short_task']} (short) against {cross['long_task']} (long)"),
        Paragraph(f"{cross['method']} Prompts: {cross['n_prompts']['short']} short, {cross['n_prompts']['long']} long; "
                  f"left out (no drafts): {cross['excluded']}. "
                  f"θ = {text.with_ci(cross['effect'], cross['ci'])} (t df {text.num(cross['df'])}, p "
                  f"{text.num(cross['p'])}); τ matched / mismatched {text.with_ci(cross['ratio'], cross['ratio_ci'])}. "
                  f"Mixed-model check (mixedlm {model.get('formula', '')}, random intercept per prompt"
                  + (", prompt × seed component" if model.get("seed_component") else "") + "): "
                  f"{text.with_ci(model.get('effect'), model.get('ci'))}"
                  + (f" (fallback: {model['fallback']})" if model.get("fallback") else "") + "."),
        Table(["drafters fine-tuned on", "eval prompts", "prompts", "mean y [95% CI]", "τ ratio to generic [95% CI]"],
              cells, "The 2 × 2 cells (seeds averaged, post-stratified to natural stratum shares)"),
        Table(["seed pair", "θ [95% CI]"], seeds,
              f"θ per seed: between-seed sd {text.num(spread.get('sd'))}, range {text.num(spread.get('range'))}, "
              f"against the interval's half-width {text.num(spread.get('half_width'))}"),
    ]


def _design_matrix(matrix: dict, domains: dict) -> list:
    tasks = sorted({c["task"] for c in matrix["cells"]})
    families = sorted({c["family"] for c in matrix["cells"]})
    means = {(c["family"], c["task"]): c for c in matrix["cells"]}

    def cell(f, t):
        c = means.get((f, t))
        return text.DASH if c is None else text.with_ci(c["mean"], c["ci"]) + (" ◆" if c["in_domain"] else "")

    inside, slope, perm = matrix["in_domain"], matrix["length_slope"], matrix["permutation"]
    merged = sorted({f"{t} = {d}" for t, d in domains.items() if t != d})
    return [
        Heading(3, "The drafter matrix: every fine-tuned drafter on every task"),
        Paragraph(f"{matrix['model']}" + (f" (fallback: {matrix['fallback']})" if matrix.get("fallback") else "")
                  + f". {matrix['n_drafters']} drafters × {matrix['n_tasks']} tasks, {matrix['n_cells']} cells, "
                  f"{matrix['n_prompts']} prompts. In-domain gain at a matched length shift: "
                  f"{text.with_ci(inside.get('estimate'), inside.get('ci'))} (t df {text.num(inside.get('df'))}, p "
                  f"{text.num(inside.get('p'))}); the prompt-level check "
                  f"{text.with_ci((matrix.get('prompt_model') or {}).get('estimate'), (matrix.get('prompt_model') or {}).get('ci'))}"
                  f" ({(matrix.get('prompt_model') or {}).get('model', 'not fitted')}). Length slope (per unit of x): "
                  f"{text.with_ci(slope.get('estimate'), slope.get('ci'))}; {slope.get('note')}. Task-level "
                  f"permutation test of the diagonal: p {text.num(perm.get('p'))} ({perm.get('permutations')} "
                  f"permutations; {perm.get('note') or ''})."
                  + (f" One domain: {', '.join(merged)} (◆ marks a drafter in its domain)." if merged else
                     " ◆ marks a drafter on its own task.")),
        Table(["drafters fine-tuned on"] + tasks, [[f] + [cell(f, t) for t in tasks] for f in families],
              "Mean y per (drafter family, eval task), seeds averaged, post-stratified [95% t interval]"),
    ]


def _design_section(results: Results) -> list:
    found = results.design
    if found is None:
        return []
    generic = found.generic
    relation = ", ".join(f"{e['task']} ({'in' if e['in_generic_mixture'] else 'not in'} its mixture)"
                         for e in generic["eval_tasks"])
    drafters = [[d["name"], d["task"], d["family"], text.num(d["seed"]), text.num(d.get("max_steps")),
                 text.num(d.get("batch_tokens"))] for d in found.drafters]
    prereg = found.preregistration
    blocks = [Heading(2, DESIGN_HEADING),
              Paragraph(f"y = {found.y}. The generic drafter {generic['name']} was trained on "
                        f"{', '.join(generic['tasks']) or 'an unrecorded mix'}; eval tasks: {relation}. "
                        f"Prompts left out (a drafter drafted nothing): {found.excluded}."),
              Table(["drafter", "fine-tuned on", "family", "seed", "max steps", "batch tokens"], drafters,
                    "The matrix's drafters, each continued from the generic one (null: the recipe's default)")]
    if prereg is None:
        blocks.append(Paragraph("No pre-registration in this run: effects without verdicts."))
    else:
        blocks.append(Paragraph(f"Pre-registration: {prereg['file']} in the run directory, SHA-256 "
                                f"{prereg['sha256']}" + (f"; it could not be read: {prereg['error']}"
                                                        if prereg.get("error") else "")
                                + ". Verdicts: confirmed when the interval excludes 0 on the predicted side; refuted "
                                  "when it excludes 0 on the other side or lies inside ± the smallest effect of "
                                  "interest; inconclusive otherwise."))
        if prereg.get("amendments"):
            blocks.append(Bullets([f"Amendment: {a}" for a in prereg["amendments"]]))
    blocks += _design_hypotheses(found)
    power = [f"{h.id}: {text.num(h.mde)} against a smallest effect of interest of {text.num(h.smallest_effect)}"
             + ("" if h.powered is None else (" (powered)" if h.powered else " (underpowered)"))
             for h in found.hypotheses if h.mde is not None]
    if power:
        blocks.append(Paragraph("Power at the realised n: the minimal detectable effect, (t_0.975 + t_0.8) × se at "
                                "the realised df, is " + "; ".join(power) + "."))
    blocks.append(Paragraph(found.length_claim))
    if found.crossover:
        blocks += _design_crossover(found.crossover)
    if found.matrix:
        blocks += _design_matrix(found.matrix, found.raw.get("domains") or {})
    return blocks


def _model_section(results: Results) -> list:
    run = results.run
    cost_rows = [[arm, text.num(c.c), c.source, c.method, text.num(c.draft_step_s, 3),
                  text.num(c.target_step_s, 3)] for arm, c in sorted(results.cost.items())]
    rows = []
    for c in results.cells_in(run.primary_regime, _spec_names(results)):
        m = c.model
        if m:
            rows.append([c.task, c.stratum, c.arm, text.num(m.alpha), text.num(m.gamma),
                         text.num(m.drafting_share), text.num(m.c), text.num(m.expected_tokens_per_step),
                         text.num(m.cost_factor), text.num(m.predicted_speedup, 2),
                         text.num(m.predicted_speedup_from_measured_tokens, 2), text.num(m.measured_speedup, 2)])
    blocks = [Heading(2, "The analytic model (Leviathan et al. 2023)"),
              Paragraph("Expected tokens per drafting step E = (1−α^(γ+1))/(1−α) is the acceptance factor and "
                        "1/(γc+1) the cost factor, with c the draft/target cost ratio per drafted token: predicted "
                        "speed-up E/(γc+1). Where only a share f of decode steps carries a draft (n-gram lookup "
                        "drafts only on a match) the same model gives (fE + 1 − f)/(gc + 1), g = drafted tokens per "
                        "decode step; at f = 1 it is Leviathan's formula. 'From measured tokens' puts the measured "
                        "tokens per decode step in place of the model's. The model assumes that verifying γ+1 "
                        "tokens costs one target step; on a CPU it costs more. A c from cost.json (the drafter "
                        "served alone) is biased in both directions, not a bound; the replay section's cost model "
                        "measures r = γc + v instead."),
              Table(["arm", "c", "source", "how c was obtained", "draft step (s)", "target step (s)"], cost_rows,
                    "Cost ratio c per arm")]
    if rows:
        blocks.append(Table(["task", "stratum", "arm", "α", "γ", "f", "c", "tokens/step (model)", "cost factor",
                             "predicted ×", "predicted × (from measured tokens)", "measured ×"], rows,
                            f"Predicted against measured TPOT speed-up, regime {run.primary_regime}"))
    return blocks


def _lossless_section(results: Results) -> list:
    run = results.run
    rows = []
    for c in results.cells_in(run.primary_regime, _spec_names(results)):
        own, floor = c.lossless, c.lossless.baseline_self
        rows.append([c.task, c.stratum, c.arm, text.share(own), text.ci(own.ci, 2),
                     text.share(floor), text.ci(floor.ci if floor else None, 2)])
    exact = run.target_dtype == "float32"
    return [Heading(2, "Losslessness"),
            Paragraph("Share of prompts whose output hash equals the baseline's (paired request), beside the share "
                      "on which the baseline agreed with its own repeat (same dtype, same regime). Intervals: "
                      "Wilson 95%. " + ("The target ran in float32: outputs should match exactly." if exact else
                                         "In bf16, greedy outputs differ across runs and batch sizes by numerics "
                                         "alone; compare an arm's share with the baseline's own, or rerun with "
                                         "`target.dtype: float32` for an exact check.")),
            Table(["task", "stratum", "arm", "identical to baseline", "95% CI", "baseline vs itself", "95% CI"], rows,
                  f"Regime: {run.primary_regime}")]


def _triple(entry: Divergence | None) -> str:
    if entry is None or entry.js is None:
        return text.DASH
    return f"{text.num(entry.js)} / {text.num(entry.w1, 1)} / {text.num(entry.ks)}"


def _matrix_rows(matrices: dict[str, list[list]], names: list[str]) -> list[list[str]]:
    """Rows of a name x name table of JS / W1 / KS, from {measure: matrix}."""
    return [[a] + [_triple(Divergence(*(matrices[x][i][j] for x in ("js", "w1", "ks")))) for j in range(len(names))]
            for i, a in enumerate(names)]


def _divergence_section(results: Results, figures: dict) -> list:
    div = results.divergence
    tasks = div.tasks
    method = div.method
    blocks = [Heading(2, "Length divergence"),
              Paragraph("Each cell gives JS / W1 / KS. JS: Jensen–Shannon divergence, log base "
                        f"{method.js_log_base} (0 = same, 1 = disjoint), on one set of log-spaced bins "
                        f"({method.bins_per_doubling} per doubling of length) shared by every comparison. "
                        "W1: Wasserstein-1 distance in tokens. KS: two-sample Kolmogorov–Smirnov statistic. "
                        f"Task lengths: {method.task_lengths}.")]
    blocks.append(Table(["task"] + [f"{k}: n / median" for k in ("prompt", "output", "total")],
                        [[t] + [f"{div.task_lengths[t][k].n} / {text.num(div.task_lengths[t][k].median, 1)}"
                                for k in ("prompt", "output", "total")] for t in tasks], "Task lengths (tokens)"))
    blocks += _figure(figures, "divergence_tasks.png")
    for kind in ("prompt", "output", "total"):
        blocks.append(Table(["task"] + tasks, _matrix_rows(div.matrices[kind], tasks),
                            f"Task × task, {kind} length: JS / W1 / KS"))
    datasets = div.datasets
    if datasets:
        for kind, m in datasets.matrices.items():
            blocks.append(Table(["dataset"] + datasets.tasks, _matrix_rows(m, datasets.tasks),
                                f"Datasets' own lengths ({datasets.source}), {kind} length: JS / W1 / KS"))
    if div.drafters:
        blocks += _figure(figures, "divergence_drafters.png")
        rows = [[d, t] + [_triple(div.drafters[d][t].get(k)) for k in ("prompt", "output", "total")]
                for d in sorted(div.drafters) for t in tasks]
        blocks.append(Table(["drafter training split", "task", "prompt", "output", "total"], rows,
                            "Drafter training split (as the drafter saw it: cut to its training window, the "
                            "recipe's max_seq_len) × task: JS / W1 / KS"))
    else:
        blocks.append(Paragraph("No drafter card with training lengths was found in the run directory, so the "
                                "drafter-split × task table is empty."))
    return blocks


def _fit_rows(entry: Answer) -> list[list[str]]:
    rows = []
    for key, fit in entry.fits.items():
        gain, measure, kind = fit_key_parts(key)
        headline = " (headline)" if (measure, kind) == HEADLINE else ""
        rows.append([GAINS[gain], f"{measure.upper()}{headline}",
                     kind, text.num(fit.spearman.n), text.num(fit.spearman.rho, 2),
                     text.num(fit.spearman.p, 2), text.with_ci(fit.slope.value, fit.slope.ci)])
    return rows


def _answer_section(results: Results, figures: dict) -> list:
    measure, kind = HEADLINE
    blocks = [Heading(2, "The answer: does the fine-tuned drafter's advantage follow length divergence?"),
              Paragraph("Per (task, stratum) cell: the fine-tuned arm's TPOT speed-up over the generic arm (paired by "
                        "prompt, so log of it = difference of log speed-ups), and τ(fine-tuned) − τ(generic), against "
                        f"the divergence of the cell's lengths from the fine-tuning split. The headline uses "
                        f"{measure.upper()} on {kind} length, fixed before the data; the rest are shown as a "
                        "sensitivity check, not as extra chances to find an effect. Slope intervals resample cells.")]
    if results.replay is not None and results.replay.finetune:
        blocks.append(Paragraph(f"The primary answer is the replay's y = log(τ_ft/τ_gen) table in '{REPLAY_HEADING}', "
                                "over every replayed prompt; the rows here come from the few served prompts and "
                                "add the timed speed ratio."))
    if not results.answer:
        blocks.append(Paragraph("This run has no pair of arms with a fine-tuned drafter and the generic drafter it "
                                "was fine-tuned from, so the question is not answered here."))
    for name in ("answer.png", "within_task.png"):
        blocks += _figure(figures, name)
    for entry in results.answer:
        tasks = entry.finetune_tasks
        tasks = tasks if isinstance(tasks, str) else ", ".join(tasks)
        blocks.append(Heading(3, f"{entry.finetuned_arm} (fine-tuned on {tasks}) against "
                                 f"{entry.generic_arm}, {entry.regime} regime"))
        if entry.missing:
            blocks.append(Paragraph(f"Not available: {entry.missing}."))
            continue
        rows = [[r.task, r.stratum, text.num(r.speed_ratio.n), text.ratio(r.speed_ratio),
                 text.with_ci(r.tau_gain.value, r.tau_gain.ci),
                 _triple(r.divergence_finetune.get(kind)), _triple(r.divergence_generic.get(kind))]
                for r in entry.rows]
        blocks.append(Table(["task", "stratum", "prompts", "fine-tuned/generic speed [95% CI]", "τ gain [95% CI]",
                             f"{kind}: from fine-tuning split (JS / W1 / KS)", f"{kind}: from generic split"],
                            rows, "Per cell ('all' rows and controls are not in the fit)"))
        blocks.append(Table(["gain", "measure", "length", "cells", "Spearman ρ", "p", "slope [95% CI]"],
                            _fit_rows(entry), "Fits over (task, stratum) cells"))
        within = []
        for gain, label in GAINS.items():
            fit = entry.fits.get(fit_key(gain, measure, kind))
            if fit is None:
                continue
            for slope, what in ((fit.slope_within_task, "within tasks (length effect)"),
                                (fit.slope_within_stratum, "within strata (domain effect)")):
                if slope is not None:
                    within.append([label, what, text.num(slope.n), text.with_ci(slope.value, slope.ci)])
        blocks.append(Paragraph("Within-task slopes centre x and y on each task's mean, so only the variation "
                                "across strata of one task (length, same domain) is used; within-stratum slopes "
                                "centre on each stratum, leaving variation across tasks at similar length (domain)."))
        blocks.append(Table(["gain", "slope", "cells", f"slope on {measure.upper()} {kind} [95% CI]"], within))
    return blocks


def _control_section(results: Results) -> list:
    blocks = [Heading(2, "Length-matched control")]
    if not results.controls:
        return blocks + [Paragraph("The workload had no length-matched control rows (workload.controls), so "
                                   "length and domain are separated only by the within-task view.")]
    for control in results.controls:
        task, like, label = control.task, control.like, control.label
        match = control.prompt_divergence
        blocks.append(Paragraph(
            f"{label}: {task} prompts resampled to follow {like}'s prompt lengths ({match.reference}). "
            f"Prompt-length JS / W1 / KS to them: {_triple(match.control_vs_like)} for the control, "
            f"{_triple(match.task_vs_like)} for {task}'s eval prompts (lower = better matched; with a handful "
            f"of prompts JS is coarse). If a gain follows length, the control's value sits near {like}'s; if it "
            f"follows domain, near {task}'s."))
        rows = []
        for arm, by_scope in control.arms.items():
            for scope in (task, label, like):
                entry = by_scope.get(scope)
                if entry:
                    rows.append([arm, scope, text.ratio(entry.speedup_tpot), text.with_ci(entry.tau, entry.tau_ci)])
        blocks.append(Table(["arm", "task", "TPOT speed-up [95% CI]", "τ [95% CI]"], rows))
        gains = []
        for arm, by_scope in control.gains.items():
            for scope, gain in by_scope.items():
                if gain is None:
                    gains.append([arm, scope, text.DASH, text.DASH])
                else:
                    gains.append([arm, scope, text.ratio(gain.speed_ratio),
                                  text.with_ci(gain.tau_gain.value, gain.tau_gain.ci)])
        if gains:
            blocks.append(Table(["fine-tuned arm", "task", "fine-tuned/generic speed", "τ gain"], gains))
    return blocks


def _regimes_section(results: Results, figures: dict) -> list:
    blocks = [Heading(2, "Load regimes")]
    blocks += _figure(figures, "load_curve.png")
    rows = []
    for arm, curve in sorted(results.regimes.items()):
        where = {"crosses": "crosses 1× between " + " and ".join(curve.crosses_between or []),
                 "above": "above 1× throughout", "below": "below 1× throughout", "at": "at 1×",
                 "no data": "no data"}[curve.status]
        for p in curve.points:
            rows.append([arm, p.regime, text.ratio(p.tpot) + ("" if p.paired else " (unpaired)"),
                         text.ratio(p.e2e), where])
    if len(results.run.regimes) < 2:
        blocks.append(Paragraph("Only one load regime was measured; add concurrency or Poisson regimes to see "
                                "where speculation stops paying off."))
    blocks.append(Table(["arm", "regime", "TPOT speed-up", "end-to-end speed-up", "crossing"], rows))
    return blocks


def _drift_section(results: Results, figures: dict) -> list:
    blocks = [Heading(2, "Drift over time"),
              Paragraph("These machines drift; each arm's TPOT trend is a Theil–Sen slope of log TPOT on time, "
                        "written as the % change it implies over the regime's span, with its 95% interval. TPOT "
                        "also depends on the prompt, so a trend is only evidence of drift when prompts are spread "
                        "evenly over time.")]
    blocks += _figure(figures, "drift.png")
    rows = [[arm, regime, text.num(d.n), text.num(d.span_min, 3), text.percent(d.percent_over_span),
             f"[{text.percent(d.ci[0])}, {text.percent(d.ci[1])}]", text.num(d.spearman.rho, 2)]
            for arm, by_regime in results.drift.items() for regime, d in by_regime.items()]
    blocks.append(Table(["arm", "regime", "requests", "span (min)", "TPOT trend over the span", "95% CI",
                         "Spearman ρ (time, TPOT)"], rows))
    return blocks


def _flatten(value, prefix="", depth=0):
    if isinstance(value, dict) and depth < 2:
        for key in sorted(value):
            yield from _flatten(value[key], f"{prefix}{key}.", depth + 1)
    elif not isinstance(value, (dict, list)):
        yield prefix.rstrip("."), value


def _environment_section(results: Results) -> list:
    rows = [[k, str(v)] for k, v in _flatten(results.environment)]
    return [Heading(2, "Environment"), Table(["key", "value"], rows)] if rows else []


def _methods_section(results: Results) -> list:
    methods = results.methods
    boot = methods.bootstrap
    return [Heading(2, "Methods"), Bullets([
        f"Bootstrap: {boot.kind}, {boot.resamples} resamples, {int(boot.level * 100)}% level, seeded "
        f"(base seed {boot.base_seed}); unit: {boot.unit}. No interval below {boot.min_units_for_ci} units; "
        f"fewer than {boot.small_sample} prompts is called a small sample.",
        f"Pairing: {methods.pairing}.",
        f"Speed-up: {methods.speedup}.",
        f"α: {methods.alpha}.",
        f"Only requests with status '{OK}' enter the statistics; the others are counted in 'The run'.",
        f"Numbers are rounded to {methods.significant_digits} significant digits in results.json.",
        "Definitions and how to read each section: docs/report.md in the specdrift repository.",
    ])]


def build_document(results: Results, figures: dict[str, str]) -> Document:
    doc = Document(f"specdrift report: {results.run.name}")
    doc.add(Heading(2, "Summary"), Bullets(results.summary))
    for section in (_run_section(results), _design_section(results), _replay_section(results, figures),
                    _speedup_section(results, figures),
                    _acceptance_section(results, figures),
                    _model_section(results), _lossless_section(results), _divergence_section(results, figures),
                    _answer_section(results, figures), _control_section(results), _regimes_section(results, figures),
                    _drift_section(results, figures), _environment_section(results), _methods_section(results)):
        doc.add(*section)
    return doc


def results_json(results: dict) -> str:
    return json.dumps(results, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Analyse a run directory; write results.json, report.md, report.html and
    figures/ into out_dir (default: the run directory). Returns the results."""
    run = load_run(run_dir)
    results = compute_results(run)
    out = Path(out_dir) if out_dir else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(results_json(results))
    replay_rows = replayed.prompt_rows(run)
    if replay_rows:
        (out / REPLAY_PROMPTS).write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in replay_rows))
    typed = Results.from_dict(results)
    figures = draw_all(run, typed, out / FIGURES)
    document = build_document(typed, figures)
    (out / "report.md").write_text(document.to_markdown())
    (out / "report.html").write_text(document.to_html(out))
    return results
