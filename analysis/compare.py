"""`specdrift compare RUN_A RUN_B`: two runs side by side.

Both runs are re-analysed from their records (nothing is written into them).
Runs are independent samples, so no paired statistic is formed across them:
each figure keeps its own interval, and a row is marked when the two
intervals do not overlap.
"""

from __future__ import annotations

import json
from pathlib import Path

from analysis import text
from analysis.cells import ALL, GAINS, HEADLINE, fit_key
from analysis.document import Bullets, Document, Heading, Paragraph, Table
from analysis.results import compute_results
from analysis.rundir import load_run
from analysis.schema import Estimate, Fit, Results


def _disjoint(a, b) -> bool:
    return bool(a and b and (a[1] < b[0] or b[1] < a[0]))


def _scopes(results: Results) -> set[tuple[str, str, str]]:
    return {(c.arm, c.regime, c.task) for c in results.cells if c.stratum == ALL}


def compare_results(a: dict, b: dict) -> dict:
    """The side-by-side numbers (written as compare.json) of two results.json dicts."""
    ra, rb = Results.from_dict(a), Results.from_dict(b)
    order = {arm.name: i for i, arm in enumerate(ra.run.arms + rb.run.arms)}
    rows = []
    scopes = sorted(_scopes(ra) | _scopes(rb), key=lambda k: (order.get(k[0], 99), k[1], k[2] != ALL, k[2]))
    for arm, regime, task in scopes:
        cells = [r.cell(arm, regime, task) for r in (ra, rb)]
        speed = [c.speedup.tpot if c else None for c in cells]
        tau = [c.acceptance if c else None for c in cells]
        if not any(s and s.value is not None for s in speed) and not any(t and t.tau for t in tau):
            continue  # e.g. the baseline under load: no repeat, no drafts
        rows.append({
            "arm": arm, "regime": regime, "task": task, "tpot_speedup": [s.raw if s else None for s in speed],
            "tau": [{"value": t.tau if t else None, "ci": t.tau_ci if t else None} for t in tau],
            "speedup_intervals_disjoint": _disjoint(*(s.ci if s else None for s in speed)),
            "tau_intervals_disjoint": _disjoint(*(t.tau_ci if t else None for t in tau)),
        })
    measure, kind = HEADLINE
    answers = {}
    for label, results in (("a", ra), ("b", rb)):
        for entry in results.answer:
            fits = {gain: entry.fits.get(fit_key(gain, measure, kind)) for gain in GAINS}
            answers.setdefault(f"{entry.finetuned_arm} vs {entry.generic_arm}", {})[label] = {
                gain: fit.raw if fit else None for gain, fit in fits.items()}
    return {
        "runs": {label: {"run_id": r.run.run_id, "name": r.run.name, "records": r.inputs.records,
                         "regimes": r.run.regimes, "target_dtype": r.run.target_dtype,
                         "duration_s": r.run.duration_s} for label, r in (("a", ra), ("b", rb))},
        "cells": rows,
        "answer": answers,
        "summaries": {"a": ra.summary, "b": rb.summary},
    }


def _estimate(raw: dict | None) -> Estimate | None:
    return Estimate.from_dict(raw) if raw else None


def _fit(raw: dict | None) -> str:
    if not raw:
        return text.DASH
    fit = Fit.from_dict(raw)
    return f"ρ = {text.num(fit.spearman.rho, 2)}, slope {text.with_ci(fit.slope.value, fit.slope.ci)}"


def build_document(comparison: dict) -> Document:
    runs = comparison["runs"]
    doc = Document(f"specdrift compare: {runs['a']['name']} (A) and {runs['b']['name']} (B)")
    doc.add(Table(["", "run id", "records", "regimes", "target dtype", "duration (s)"],
                  [[label.upper(), r["run_id"], text.num(r["records"]), ", ".join(r["regimes"]),
                    r["target_dtype"] or text.DASH, text.num(r["duration_s"], 1)] for label, r in runs.items()]))
    doc.add(Heading(2, "Speed-up and acceptance per arm, regime and task"),
            Paragraph("Each run keeps its own 95% interval; '≠' marks rows whose intervals do not overlap."),
            Table(["arm", "regime", "task", "TPOT speed-up A", "TPOT speed-up B", "", "τ A", "τ B", ""],
                  [[r["arm"], r["regime"], r["task"],
                    text.ratio(_estimate(r["tpot_speedup"][0])), text.ratio(_estimate(r["tpot_speedup"][1])),
                    "≠" if r["speedup_intervals_disjoint"] else "",
                    text.with_ci(r["tau"][0]["value"], r["tau"][0]["ci"]),
                    text.with_ci(r["tau"][1]["value"], r["tau"][1]["ci"]),
                    "≠" if r["tau_intervals_disjoint"] else ""] for r in comparison["cells"]]))
    measure, kind = HEADLINE
    doc.add(Heading(2, f"The answer ({measure.upper()} of {kind} length from the fine-tuning split)"))
    if comparison["answer"]:
        doc.add(Table(["pair", "gain", "A", "B"],
                      [[pair, y, _fit(fits.get("a", {}).get(y)), _fit(fits.get("b", {}).get(y))]
                       for pair, fits in comparison["answer"].items() for y in GAINS]))
    else:
        doc.add(Paragraph("Neither run measured a fine-tuned/generic pair of arms."))
    for label in ("a", "b"):
        doc.add(Heading(2, f"Summary of {label.upper()}"), Bullets(comparison["summaries"][label]))
    return doc


def compare_runs(run_a: str | Path, run_b: str | Path, out_dir: str | Path | None = None) -> tuple[dict, Document]:
    comparison = compare_results(compute_results(load_run(run_a)), compute_results(load_run(run_b)))
    document = build_document(comparison)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(comparison, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        (out / "compare.md").write_text(document.to_markdown())
        (out / "compare.html").write_text(document.to_html(out))
    return comparison, document
