"""The report's figures (matplotlib, Agg), drawn from results.json; only the
drift figure reads the raw request times. Each drawer takes pyplot and
returns (figure, caption), or None when the run has no data for it;
`draw_all` saves them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from analysis import text
from analysis.cells import ALL, GAINS, HEADLINE, fit_key
from analysis.rundir import RunData
from analysis.schema import Answer, Divergence, Estimate, GainRow, Results
from core.contracts import stratum_key

DPI = 110


def _pyplot():
    # matplotlib is imported here, not at the top: it takes a second to load and only the report draws.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.constrained_layout.use": True})
    return plt


def _log_axis(ax, unit: str) -> None:
    """A log y axis labelled in plain numbers ('1.2×'), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator  # lazy, as in _pyplot

    ax.set_yscale("log")
    label = FuncFormatter(lambda v, _: f"{v:g}{unit}")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)))
    ax.yaxis.set_major_formatter(label)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _err(estimate: Estimate | None):
    """(value, [below, above]) for an error bar; NaN when missing."""
    value = estimate.value if estimate else None
    if value is None:
        return math.nan, [0.0, 0.0]
    ci = estimate.ci or [value, value]
    return value, [value - ci[0], ci[1] - value]


def speedup(results: Results, plt):
    run = results.run
    regime = run.primary_regime
    scopes = [(c.task, c.stratum) for c in results.cells_in(regime, [run.baseline_arm])]
    arms = [a.name for a in run.speculative_arms if results.cell(a.name, regime)]
    if not arms or not scopes:
        return None
    fig, axes = plt.subplots(len(arms), 1, figsize=(10, 2.6 * len(arms)), sharex=True, squeeze=False)
    x = np.arange(len(scopes))
    base = results.cell(run.baseline_arm, regime)
    repeat = base.speedup.tpot.ci if base else None
    for ax, arm in zip(axes[:, 0], arms):
        cells = [results.cell(arm, regime, t, s) for t, s in scopes]
        for offset, metric, style in ((-0.12, "tpot", "o"), (0.12, "e2e", "s")):
            points = [_err(getattr(c.speedup, metric) if c else None) for c in cells]
            values = [p[0] for p in points]
            bars = np.array([p[1] for p in points]).T
            ax.errorbar(x + offset, values, yerr=bars, fmt=style, ms=4, capsize=2,
                        label=f"{metric.upper()} ratio", mfc="white" if metric == "e2e" else None)
        ax.axhline(1, color="black", lw=0.8)
        if repeat:
            ax.axhspan(*repeat, color="grey", alpha=0.2, label="baseline vs itself (95% CI)")
        _log_axis(ax, "×")
        ax.set_ylabel(f"{arm}\nspeed-up")
        ax.grid(axis="y", alpha=0.3)
        for i, (_, stratum) in enumerate(scopes):
            if stratum == ALL:
                ax.axvline(i - 0.5, color="grey", lw=0.5)
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=3)
    axes[-1, 0].set_xticks(x, [f"{t}\n{s}" if s != ALL else f"{t}\n(all)" for t, s in scopes], rotation=90, fontsize=7)
    fig.suptitle(f"Speed-up over {run.baseline_arm}, paired by prompt ({regime}); geometric mean, 95% bootstrap CI")
    return fig, (f"Speed-up against {run.baseline_arm} per task and stratum in the {regime} regime: geometric mean "
                 "of the per-prompt TPOT ratio (filled) and end-to-end ratio (open) with 95% bootstrap intervals, log "
                 "scale. The grey band is the baseline against its own repeat: the noise floor.")


def _acceptance(results: Results, arm: str, regime: str | None, task: str = ALL):
    cell = results.cell(arm, regime, task)
    return cell.acceptance if cell else None


def acceptance_per_position(results: Results, plt):
    regime = results.run.primary_regime
    arms = [a.name for a in results.run.speculative_arms
            if (accepted := _acceptance(results, a.name, regime)) and accepted.tau]
    if not arms:
        return None
    tasks = [c.task for c in results.cells_in(regime, [arms[0]], strata=False)]
    fig, axes = plt.subplots(1, len(arms), figsize=(3.6 * len(arms), 3.2), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for task in tasks:
            accepted = _acceptance(results, arm, regime, task)
            rates = accepted.position_rate if accepted else []
            if rates:
                ax.plot(np.arange(1, len(rates) + 1), rates, marker="o", lw=2 if task == ALL else 1,
                        color="black" if task == ALL else None, label=task)
        ax.set_title(arm)
        ax.set_xlabel("draft position")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("share of drafts accepted at position")
    axes[0, -1].legend(fontsize=7)
    return fig, (f"Acceptance per draft position ({regime}): the share of drafts whose position i was accepted "
                 "(which requires every earlier position to be accepted), per task; black: all tasks.")


def acceptance_context(results: Results, plt):
    profiles = results.replay.profiles if results.replay else {}
    if not profiles:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, (kind, label) in zip(axes, (("position", "output position t"),
                                        ("context", "context length (prompt tokens + t)"))):
        for i, (arm, profile) in enumerate(sorted(profiles.items())):
            binned = getattr(profile, kind)
            centres = [math.sqrt(lo * hi) for lo, hi in zip(binned.edges, binned.edges[1:])]
            rates = [math.nan if r is None else r for r in binned.rate]
            ax.plot(centres[:len(rates)], rates, marker="o", ms=3, color=f"C{i}", label=arm)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{label} (doubling bins)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("match rate m[t]")
    axes[1].legend(fontsize=7)
    return fig, ("Replay: the share of output tokens the drafter matches given the target's own prefix (the "
                 "acceptance of a draft's first position when a step starts there), by output position and by "
                 "context length, every replayed prompt pooled; one line per draft-model arm (n-gram arms have "
                 "no match vector).")


def _heatmap(ax, matrix, rows, columns, title):
    data = np.array([[math.nan if v is None else v for v in row] for row in matrix], dtype=float)
    image = ax.imshow(data, cmap="viridis", vmin=0, vmax=max(1e-9, np.nanmax(data)) if np.isfinite(data).any() else 1)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] < 0.6 * np.nanmax(data) else "black")
    ax.set_title(title)
    return image


def _measure(entry: Divergence | None, measure: str) -> float | None:
    """One of a divergence's measures (divergence.MEASURES), None when not compared."""
    return getattr(entry, measure) if entry else None


def divergence_tasks(results: Results, plt):
    div = results.divergence
    tasks = div.tasks
    if len(tasks) < 2:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, kind in zip(axes, ("prompt", "output", "total")):
        image = _heatmap(ax, div.matrices[kind]["js"], tasks, tasks, f"{kind} length")
    fig.colorbar(image, ax=axes, shrink=0.8, label="JS divergence (bits)")
    return fig, ("Jensen–Shannon divergence (log base 2) between the tasks' length distributions, on shared "
                 "log-spaced bins. Wasserstein-1 and KS are in the tables.")


def divergence_drafters(results: Results, plt):
    div = results.divergence
    drafters, tasks = sorted(div.drafters), div.tasks
    if not drafters or not tasks:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(11, 1.2 + 0.5 * len(drafters) + 1.6))
    for ax, kind in zip(axes, ("prompt", "output", "total")):
        matrix = [[_measure(div.drafters[d][t].get(kind), "js") for t in tasks] for d in drafters]
        image = _heatmap(ax, matrix, drafters, tasks, f"{kind} length")
    fig.colorbar(image, ax=axes, shrink=0.8, label="JS divergence (bits)")
    return fig, "JS divergence between each drafter's training split and each task (rows: drafters)."


def _answered(results: Results) -> list[tuple[Answer, list[GainRow]]]:
    """Each answered pair with the rows that went into its fits (per stratum, no controls)."""
    return [(a, [r for r in a.rows if r.stratum != ALL and not r.is_control]) for a in results.answer if a.rows]


def answer(results: Results, plt):
    answers = _answered(results)
    if not answers:
        return None
    measure, kind = HEADLINE
    fig, axes = plt.subplots(len(answers), 2, figsize=(10, 3.8 * len(answers)), squeeze=False)
    for row_axes, (entry, rows) in zip(axes, answers):
        tasks = sorted({r.task for r in rows})
        strata = sorted({r.stratum for r in rows}, key=stratum_key)
        markers = "osD^vP*X"
        for ax, (y_name, label) in zip(row_axes, (("log_speed_ratio", "log speed-up, fine-tuned − generic"),
                                                  ("tau_gain", "τ, fine-tuned − generic"))):
            xs, ys = [], []
            for r in rows:
                x = _measure(r.divergence_finetune.get(kind), measure)
                value = r.gain(y_name)
                if y_name == "log_speed_ratio":
                    ci = [math.log(bound) for bound in r.speed_ratio.ci] if r.speed_ratio.ci else None
                else:
                    ci = r.tau_gain.ci
                if x is None or value is None:
                    continue
                xs.append(x)
                ys.append(value)
                yerr = [[value - ci[0]], [ci[1] - value]] if ci else None
                ax.errorbar([x], [value], yerr=yerr, fmt=markers[strata.index(r.stratum) % len(markers)],
                            color=f"C{tasks.index(r.task)}", capsize=2, ms=6)
            fit = entry.fits[fit_key(y_name, measure, kind)]
            slope = fit.slope
            if slope.value is not None and len(xs) >= 2:
                grid = np.linspace(min(xs), max(xs), 20)
                ax.plot(grid, np.mean(ys) + slope.value * (grid - np.mean(xs)), color="black", lw=1)
            ax.set_title(f"Spearman ρ = {text.num(fit.spearman.rho, 2)}, slope = "
                         f"{text.num(slope.value, 2)} {text.ci(slope.ci, 2)}  (n = {len(xs)} cells)")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel(f"JS divergence of {kind} length from {entry.drafter}'s training split (bits)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        handles = [plt.Line2D([], [], color=f"C{i}", marker="o", ls="", label=t) for i, t in enumerate(tasks)]
        handles += [plt.Line2D([], [], color="grey", marker=markers[i % len(markers)], ls="", label=s)
                    for i, s in enumerate(strata)]
        row_axes[1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig, ("The answer: per (task, stratum) cell, the fine-tuned drafter's gain over the generic one, against "
                 f"the divergence ({measure.upper()}, {kind} length) of the cell's lengths from the fine-tuning split. "
                 "Colour: task; marker: stratum; bars: 95% bootstrap CIs; line: least-squares fit.")


def within_task(results: Results, plt):
    answers = _answered(results)
    if not answers:
        return None
    fig, axes = plt.subplots(len(answers), 2, figsize=(10, 3.2 * len(answers)), squeeze=False)
    for row_axes, (entry, rows) in zip(axes, answers):
        strata = sorted({r.stratum for r in rows}, key=stratum_key)
        for ax, (y_name, label) in zip(row_axes, GAINS.items()):
            for i, task in enumerate(sorted({r.task for r in rows})):
                mine = sorted((r for r in rows if r.task == task), key=lambda r: strata.index(r.stratum))
                xs = [strata.index(r.stratum) + 0.05 * i for r in mine]
                ys = [math.nan if r.gain(y_name) is None else r.gain(y_name) for r in mine]
                ax.plot(xs, ys, marker="o", label=task, color=f"C{i}")
            ax.set_xticks(range(len(strata)), strata, fontsize=7)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("prompt-length stratum")
            ax.set_ylabel(f"{label} ({entry.finetuned_arm} − {entry.generic_arm})")
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7)
    return fig, ("Within each task, the fine-tuned drafter's gain per length stratum: a slope along a line is a "
                 "length effect within one domain; an offset between lines at the same stratum is a domain effect.")


def load_curve(results: Results, plt):
    curves = {a: c for a, c in results.regimes.items() if c.points}
    regimes = results.run.regimes
    if not curves or len(regimes) < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, metric in zip(axes, ("tpot", "e2e")):
        for i, (arm, curve) in enumerate(sorted(curves.items())):
            xs = [regimes.index(p.regime) + 0.04 * i for p in curve.points]
            points = [_err(getattr(p, metric)) for p in curve.points]
            crossing = curve.crosses_between
            label = f"{arm} (crosses 1× between {' and '.join(crossing)})" if crossing else arm
            ax.errorbar(xs, [p[0] for p in points], yerr=np.array([p[1] for p in points]).T, marker="o", capsize=2,
                        label=label, color=f"C{i}")
            unpaired = [(x, p[0]) for x, p, point in zip(xs, points, curve.points) if not point.paired]
            if unpaired:  # open markers: arms compared over different prompts
                ax.scatter(*zip(*unpaired), marker="o", s=40, facecolor="white", edgecolor=f"C{i}", zorder=3)
        ax.axhline(1, color="black", lw=0.8)
        ax.set_xticks(range(len(regimes)), regimes, fontsize=8)
        ax.set_title(f"{metric.upper()} speed-up over the baseline")
        _log_axis(ax, "×")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up (×), 95% CI")
    axes[1].legend(fontsize=7)
    return fig, ("Speed-up under each load regime (all tasks): where a line falls below 1×, speculation costs more "
                 "than it saves. Open markers: unpaired comparisons (the arms answered different prompts).")


def drift(run: RunData, plt):
    ok = run.ok[run.ok["tpot_s"] > 0]
    if ok.empty:
        return None
    t0 = run.records["t_start"].min()
    fig, ax = plt.subplots(figsize=(10, 3.4))
    for i, arm in enumerate(a.name for a in run.arms):
        rows = ok[ok["arm"] == arm]
        if rows.empty:
            continue
        ax.scatter((rows["t_start"] - t0) / 60, rows["tpot_s"] * 1000, s=6, alpha=0.5, color=f"C{i}", label=arm)
        for _, block in rows.groupby("regime"):  # one median line per regime: their TPOTs differ by design
            window = max(3, len(block) // 10)
            ax.plot((block["t_start"] - t0) / 60, (block["tpot_s"] * 1000).rolling(window, center=True, min_periods=1)
                    .median(), color=f"C{i}", lw=1.2)
    for regime in run.regimes:
        times = ok.loc[ok["regime"] == regime, "t_start"]
        if len(times):
            start = (times.min() - t0) / 60
            ax.axvline(start, color="grey", lw=0.6, ls=":")
            ax.text(start, 0.98, f" {regime}", transform=ax.get_xaxis_transform(),
                    fontsize=7, va="top", color="grey")
    ax.set_xlabel("minutes since the first request")
    ax.set_ylabel("TPOT (ms)")
    _log_axis(ax, "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, markerscale=2)
    return fig, ("Each arm's TPOT over the run (points: requests; lines: rolling median). Pairing in time means arms "
                 "alternate, so drift of the machine affects paired requests alike.")


def draw_all(run: RunData, results: Results, directory: Path) -> dict[str, str]:
    """{file name: caption} of the figures drawn into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    drawers = {"acceptance_context": acceptance_context, "speedup": speedup,
               "acceptance_per_position": acceptance_per_position,
               "divergence_tasks": divergence_tasks, "divergence_drafters": divergence_drafters,
               "answer": answer, "within_task": within_task, "load_curve": load_curve,
               "drift": lambda _, plt: drift(run, plt)}
    drawn = {}
    for name, draw in drawers.items():
        path = directory / f"{name}.png"
        path.unlink(missing_ok=True)  # a figure this run has no data for must not survive from an earlier render
        drawing = draw(results, plt)
        if drawing:
            fig, caption = drawing
            fig.savefig(path, dpi=DPI, metadata={"Software": None})
            fig.clf()
            plt.close(fig)
            drawn[path.name] = caption
    return drawn
