"""The workload summary: counts and length quantiles per (split, task,
stratum), what the build excluded, and a histogram of lengths per task."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

QUANTILES = (0.1, 0.5, 0.9)


def _quantiles(values: list[int]) -> str:
    if not values:
        return "-"
    q = np.quantile(np.asarray(values), QUANTILES, method="inverted_cdf")
    return "/".join(str(int(v)) for v in q)


def length_table(rows: list[dict]) -> str:
    """Markdown: one line per (split, task, stratum) and per (split, task)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["split"], row["task"], row["stratum"])].append(row)
        groups[(row["split"], row["task"], "all")].append(row)
    lines = [
        "| split | task | stratum | n | prompt tokens p10/p50/p90 | max | ref tokens p10/p50/p90 (n) | max_tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {"eval": 0, "train": 1}

    def key(group):  # strata by their bounds (p64-256 before p256-1024), the task's total last
        split, task, stratum = group
        return order.get(split, 2), task, stratum == "all", [int(n) for n in re.findall(r"\d+", stratum)]

    for split, task, stratum in sorted(groups, key=key):
        members = groups[(split, task, stratum)]
        prompt = [r["prompt_tokens"] for r in members]
        ref = [r["ref_tokens"] for r in members if r.get("ref_tokens") is not None]
        budgets = sorted({r["max_tokens"] for r in members})
        name = f"**{stratum}**" if stratum == "all" else stratum
        lines.append(f"| {split} | {task} | {name} | {len(members)} | {_quantiles(prompt)} | {max(prompt)} | "
                     f"{_quantiles(ref)} ({len(ref)}) | {','.join(map(str, budgets))} |")
    return "\n".join(lines)


def report_text(report: dict) -> str:
    """What the build read, dropped, excluded and could not fill."""
    lines = []
    settings = report.get("settings", {})
    if settings:
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    for d in report.get("datasets", []):
        dupes = ", ".join(f"{n} of {src}" for src, n in d["duplicates_of"].items()) or "none"
        lines.append(f"dataset {d['adapter']}: read {d['read']}, duplicates dropped: {dupes}, kept {d['kept']}")
    too_long = report.get("too_long", {})
    lines.append("excluded as longer than max_model_len (prompt + max_tokens): "
                 + (", ".join(f"{t} {n}" for t, n in sorted(too_long.items())) or "none"))
    shortfall = report.get("shortfall", [])
    lines.append("eval cells short of n_per_cell: "
                 + (", ".join(f"{s['task']}/{s['stratum']} {s['got']}/{s['wanted']}" for s in shortfall) or "none"))
    for c in report.get("controls", []):
        lines.append(f"control {c['task']}: {c['got']}/{c['wanted']} rows, KS against the target lengths "
                     f"{c['ks_statistic']:.3f} (p={c['ks_pvalue']:.3f})")
    return "\n".join(lines)


def summary_markdown(rows: list[dict], report: dict | None) -> str:
    parts = ["# Workload summary", "", length_table(rows)]
    if report:
        parts += ["", "## Build", "", "```", report_text(report), "```"]
    return "\n".join(parts) + "\n"


def plot_lengths(report: dict, path: Path) -> Path:
    """Histograms of prompt and reference lengths per task, on log-spaced
    bins, over every kept prompt (both splits), with the stratum edges."""
    # Here, not at the top: matplotlib is slow to import and only this figure needs it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = report["lengths"]
    colours = plt.get_cmap("tab10" if len(lengths) <= 10 else "tab20").colors
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "prompt_tokens", "prompt length (chat template included)"),
                           (axes[1], "ref_tokens", "reference output length")):
        every = [v for values in lengths.values() for v in values[key]] or [1]
        bins = np.geomspace(max(1, min(every)), max(every) * 1.05 + 1, 40)
        for i, (task, values) in enumerate(lengths.items()):
            if values[key]:
                # weights make each task's bars sum to 1: tasks of 80 and of 3,000 prompts compare
                ax.hist(values[key], bins=bins, weights=np.full(len(values[key]), 1 / len(values[key])),
                        histtype="step", linewidth=1.5, color=colours[i % len(colours)],
                        label=f"{task} (n={len(values[key])})")
        ax.set_xscale("log")
        ax.set_xlabel("tokens")
        ax.set_title(title)
    for edge in report["settings"]["prompt_strata"][1:]:
        axes[0].axvline(edge, color="grey", linestyle=":", linewidth=1)
    axes[0].set_ylabel("share of the task's prompts")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
