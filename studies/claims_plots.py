"""Figures for docs/findings.md: success rate per rung with Wilson intervals, and the budget curves."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from studies.claims import Study
from studies.stats import wilson_interval

COLORS = {"dpa": "#1f77b4", "ea": "#d62728", "ea_norm": "#2ca02c"}
DPI = 110


def cells_figure(study: Study) -> Figure:
    """Per size: each kind's success rate over scoring seeds per rung, with its Wilson 95% interval."""
    fig = Figure(figsize=(4.2 * len(study.sizes), 3.4), layout="constrained")
    axes = fig.subplots(1, len(study.sizes), squeeze=False)[0]
    names = [f"{r}: {p}" for r, p, _ in study.points]
    for ax, size in zip(axes, study.sizes, strict=True):
        for i, kind in enumerate(study.kinds):
            xs, ys, lo, hi = [], [], [], []
            for j, (_, p, _) in enumerate(study.points):
                s, n = study.cell(kind, size, p)
                if n:
                    a, b = wilson_interval(s, n)
                    xs.append(j + (i - 1) * 0.15)
                    ys.append(s / n)
                    lo.append(s / n - a)
                    hi.append(b - s / n)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, color=COLORS.get(kind), label=kind)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(size, fontsize=9)
        ax.set_ylabel("solved (fraction of seeds)")
    axes[0].legend(fontsize=7)
    return fig


def budget_figure(study: Study, points: int = 10) -> Figure:
    """Per size: each kind's mean highest solved single-task rung (over complete seeds) against the budget."""
    fig = Figure(figsize=(4.2 * len(study.sizes), 3.0), layout="constrained")
    axes = fig.subplots(1, len(study.sizes), squeeze=False)[0]
    budgets = [study.budget * (i + 1) // points for i in range(points)]
    for ax, size in zip(axes, study.sizes, strict=True):
        for kind in study.kinds:
            ys = [study.mean_highest(kind, size, False, b) for b in budgets]
            if all(y is not None for y in ys):
                ax.plot(budgets, ys, marker=".", color=COLORS.get(kind), label=kind)
        ax.axvline(study.budget / 2, color="grey", lw=0.8, ls=":")
        ax.set_title(size, fontsize=9)
        ax.set_xlabel("step budget b")
        ax.set_ylabel("highest solved rung (mean over seeds)")
    axes[0].legend(fontsize=7)
    return fig


def write_figures(study: Study, out: Path, prefix: str) -> list[Path]:
    paths = []
    for name, fig in (("cells", cells_figure(study)), ("budget", budget_figure(study))):
        path = out / f"{prefix}-{name}.png"
        fig.savefig(path, dpi=DPI, metadata={"Software": None})
        paths.append(path)
    return paths
