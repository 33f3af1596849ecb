"""Plots and a self-contained HTML page for a capacity-frontier report.

Figures use matplotlib's object API (no pyplot state, Agg rendering); the page is a Jinja2
template (``templates/report.html.j2``, autoescaped) that embeds them as base64 PNG and
needs no network, script or external stylesheet.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from studies.records import TrialRecord
from studies.report import (
    ALL_STATUSES,
    Cell,
    Compute,
    KindCompute,
    Report,
    SizeInfo,
    build_report,
    format_params,
    frontier_table,
    frontier_text,
    report_json,
)
from studies.spec import StudySpec

CMAP = "RdYlGn"  # success rate: red 0 .. green 1
UNKNOWN_STYLE: dict[str, Any] = {"facecolor": "#e6e6e6", "hatch": "//", "edgecolor": "#9a9a9a"}
NO_OUTCOME_STYLE: dict[str, Any] = {"facecolor": "#b8b8b8", "hatch": "xx", "edgecolor": "#6e6e6e"}
UNDETERMINED_EDGE = "#d08c00"  # amber frame and "?" mark: more seeds needed
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
DPI = 110


def _kind_color(i: int) -> str:
    return f"C{i % 10}"


def _cells(report: Report) -> dict[tuple[str, str, str], Cell]:
    return {(c.kind, c.size, c.point): c for c in report.cells}


def _size_label(report: Report, name: str) -> str:
    s = next(s for s in report.sizes if s.name == name)
    return f"d{s.d_model} L{s.n_layers} H{s.n_heads}\n{format_params(s.n_params)} params"


def _criterion(report: Report) -> str:
    return (
        f"solved: success rate (seeds reaching eval accuracy ≥ {report.threshold:g}) above {report.solved_at:g} "
        f"with {report.confidence:.0%} confidence (Wilson); unsolved: below it; otherwise undetermined"
    )


# --- figures -----------------------------------------------------------------------------


def _rung_ticks(ax: Axes, report: Report) -> None:
    n = len(report.points)
    ax.set_yticks(range(-1, n), ["none solved"] + [f"{p.coords[0]}: {p.name}" for p in report.points], fontsize=8)
    ax.set_ylim(-1.5, n - 0.5)


def frontier_figure(report: Report) -> Figure:
    """Model size (parameters, log) vs the frontier: a marker at the highest rung certainly solved and
    a bar up to the highest possibly solved (ladder), or solved points with undetermined ones (grid)."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    sizes = report.sizes
    xs = [s.n_params for s in sizes]
    n_kinds = len(report.kinds)
    for i, kind in enumerate(report.kinds):
        shift = 1.06 ** (i - (n_kinds - 1) / 2)  # kinds side by side, so intervals do not hide each other
        ys, tops, open_, seen = [], [], [], []
        for s in sizes:
            f = report.frontier_of(kind, s.name)
            seen.append(math.nan if f.highest_observed_rung is None or f.determined else f.highest_observed_rung)
            if f.n_solved + f.n_unsolved + f.n_undetermined == 0:
                ys.append(math.nan)  # nothing with an outcome at this size
                tops.append(math.nan)
            elif report.is_ladder:
                ys.append(-1 if f.highest_rung is None else f.highest_rung)
                tops.append(-1 if f.highest_possible_rung is None else f.highest_possible_rung)
            else:
                ys.append(f.n_solved)
                tops.append(f.n_solved + f.n_undetermined)
            open_.append(not f.determined)
        x = [v * shift for v in xs]
        color = _kind_color(i)
        marker = MARKERS[i % len(MARKERS)]
        ax.plot(x, ys, color=color, linestyle="-" if i == 0 else "--", linewidth=1.8, label=kind)
        if report.is_ladder and not all(math.isnan(v) for v in seen):
            ax.plot(
                x,
                seen,
                linestyle="none",
                marker="x",
                markersize=9,
                markeredgewidth=2,
                color=color,
                label=f"{kind}: seen (most seeds solved; not a decision)",
            )
        for xi, y, top, hollow in zip(x, ys, tops, open_, strict=True):
            if math.isnan(y):
                continue
            if top > y:
                ax.vlines(xi, y, top, color=color, linewidth=5, alpha=0.35)
                ax.plot([xi], [top], marker="_", markersize=14, color=color)
            ax.plot(
                [xi],
                [y],
                marker=marker,
                markersize=10,
                color=color,
                markerfacecolor="white" if hollow else color,
                markeredgewidth=2,
            )
    ax.set_xscale("log")
    ax.minorticks_off()
    ticks: dict[int, list[str]] = {}
    for s in sizes:
        ticks.setdefault(s.n_params, []).append(f"{format_params(s.n_params)}\nd{s.d_model} L{s.n_layers} H{s.n_heads}")
    ax.set_xticks(list(ticks), ["\n".join(v) for v in ticks.values()], fontsize=8)
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo / 1.5, hi * 1.5)
    ax.set_xlabel("model size (trainable parameters, log scale)")
    note = "marker: certainly solved (hollow: not determined); bar: up to possibly solved; x: seen"
    if report.is_ladder:
        _rung_ticks(ax, report)
        ax.set_ylabel("highest rung solved (index: task point)")
        ax.set_title(f"Capacity frontier of {report.study} per model size\n{note}", fontsize=10)
    else:
        n = len(report.points)
        ax.set_ylim(-0.5, n + 0.5)
        ax.set_yticks(range(0, n + 1, max(1, math.ceil(n / 12))))
        ax.set_ylabel(f"solved task points (of {n} on the N x T grid)")
        ax.set_title(f"Capacity frontier of {report.study}: solved grid points per model size\n{note}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(title="attention kind", loc="best")
    return fig


def _size_panels(report: Report, panel_width: float, panel_height: float) -> tuple[Figure, list[Axes]]:
    """One panel per model size, up to three a row; panels past the last size hidden."""
    n = len(report.sizes)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(min(20.0, 1.5 + panel_width * ncols), 0.7 + panel_height * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _size_title(ax: Axes, s: SizeInfo) -> None:
    ax.set_title(f"d{s.d_model} L{s.n_layers} H{s.n_heads} ({format_params(s.n_params)} params)", fontsize=10)


def budget_figure(report: Report) -> Figure:
    """The frontier had training stopped after b steps, per model size: certain (line) to possible (band)."""
    fig, axes = _size_panels(report, 4.6, 3.4)
    for ax, s in zip(axes, report.sizes, strict=True):
        for i, kind in enumerate(report.kinds):
            rows = [b for b in report.budget_curve if (b.kind, b.size) == (kind, s.name)]
            xs = [b.budget for b in rows]
            if report.is_ladder:
                lo = [-1 if b.highest_rung is None else b.highest_rung for b in rows]
                hi = [-1 if b.highest_possible_rung is None else b.highest_possible_rung for b in rows]
            else:
                lo = [b.n_solved for b in rows]
                hi = [b.n_solved + b.n_undetermined for b in rows]
            color = _kind_color(i)
            ax.step(xs, lo, where="post", color=color, linestyle="-" if i == 0 else "--", label=f"{kind} certain")
            ax.fill_between(xs, lo, hi, step="post", color=color, alpha=0.18, label=f"{kind} possible")
        if report.is_ladder:
            _rung_ticks(ax, report)
        ax.set_xlabel("training budget (steps)")
        ax.set_ylabel("highest rung solved" if report.is_ladder else "solved points")
        _size_title(ax, s)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Frontier against training budget, {report.study} (from steps-to-solve)", fontsize=11)
    return fig


def _draw_cell(ax: Axes, x: float, y: float, cell: Cell, on_frontier: bool, norm: Normalize, fontsize: float) -> None:
    if cell.state == "unknown":
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, linewidth=0.5, **UNKNOWN_STYLE))
        ax.text(x, y, "not run", ha="center", va="center", fontsize=fontsize, color="#444444")
    elif cell.state == "no_outcome":
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, linewidth=0.5, **NO_OUTCOME_STYLE))
        ax.text(x, y, f"no outcome\n({cell.n_trials} runs)", ha="center", va="center", fontsize=fontsize * 0.9)
    else:
        rate = cell.success_rate or 0.0
        rgba = colormaps[CMAP](norm(rate), alpha=1.0 if cell.state in ("solved", "unsolved") else 0.35)
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=rgba, edgecolor="white", linewidth=1))
        if cell.state == "undetermined":  # pale, framed: the colour is a rate, not a decision
            ax.add_patch(
                Rectangle((x - 0.42, y - 0.42), 0.84, 0.84, fill=False, edgecolor=UNDETERMINED_EDGE, linewidth=2.5)
            )
        dark = rgba[3] == 1.0 and 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
        mark = {"solved": "✓", "unsolved": "✗"}.get(cell.state, "?")
        ax.text(
            x,
            y,
            f"{mark} {cell.successes}/{cell.n_outcomes}",
            ha="center",
            va="center",
            fontsize=fontsize,
            color="white" if dark else "black",
        )
    if on_frontier:
        ax.add_patch(Rectangle((x - 0.46, y - 0.46), 0.92, 0.92, fill=False, edgecolor="black", linewidth=2.5))


def _legend_handles() -> list[Any]:
    return [
        Patch(label="not run (unknown)", linewidth=0.5, **UNKNOWN_STYLE),
        Patch(label="no outcome (failed / diverged / oom / preempted)", linewidth=0.5, **NO_OUTCOME_STYLE),
        Patch(label="? undetermined (more seeds needed)", fill=False, edgecolor=UNDETERMINED_EDGE, linewidth=2.5),
        Patch(label="frontier (hardest certainly solved)", fill=False, edgecolor="black", linewidth=2.5),
    ]


def solved_map_figure(report: Report) -> Figure:
    """Success rate per cell: ladder size x rung per kind; grid N x T per kind and size."""
    cells = _cells(report)
    norm = Normalize(0, 1)
    frontier = {(f.kind, f.size, p.name) for f in report.frontier for p in f.points}
    if report.is_ladder:
        n_pts, n_sz = len(report.points), len(report.sizes)
        nrows = len(report.kinds)
        width = min(16.0, max(7.0, 2.8 + 1.3 * n_pts))
        fig = Figure(figsize=(width, nrows * (1.5 + 0.6 * n_sz) + 1.0), layout="constrained")
        axes = fig.subplots(nrows, 1, squeeze=False, sharex=True)[:, 0]
        fontsize = 9 if n_pts <= 10 else 7
        for ax, kind in zip(axes, report.kinds, strict=True):
            for y, s in enumerate(report.sizes):
                for p in report.points:
                    key = (kind, s.name, p.name)
                    _draw_cell(ax, p.coords[0], y, cells[key], key in frontier, norm, fontsize)
            ax.set_xlim(-0.5, n_pts - 0.5)
            ax.set_ylim(-0.5, n_sz - 0.5)
            ax.set_yticks(range(n_sz), [_size_label(report, s.name) for s in report.sizes], fontsize=8)
            ax.set_ylabel("model size")
            ax.set_title(f"{kind}", fontsize=12, fontweight="bold")
        axes[-1].set_xticks(range(n_pts), [f"{p.coords[0]}\n" + p.name.replace("+", "+\n") for p in report.points])
        axes[-1].tick_params(axis="x", labelsize=8)
        axes[-1].set_xlabel("rung (task point, easiest → hardest)")
    else:
        grid = report.spec["task"]["grid"]
        ns, ts = grid["N"], grid["T"]
        nrows, ncols = len(report.kinds), len(report.sizes)
        fig = Figure(
            figsize=(min(24.0, max(7.0, ncols * (1.2 + 0.95 * len(ts)))), nrows * (1.4 + 0.6 * len(ns)) + 0.8),
            layout="constrained",
        )
        axes_grid = fig.subplots(nrows, ncols, squeeze=False)
        names = {tuple(p.coords): p.name for p in report.points}
        fontsize = 8 if len(ts) <= 5 else 6
        for r, kind in enumerate(report.kinds):
            for c, s in enumerate(report.sizes):
                ax = axes_grid[r][c]
                for (i, j), name in names.items():
                    key = (kind, s.name, name)
                    _draw_cell(ax, j, i, cells[key], key in frontier, norm, fontsize)
                ax.set_xlim(-0.5, len(ts) - 0.5)
                ax.set_ylim(-0.5, len(ns) - 0.5)
                t_labels = [("{" + ",".join(map(str, t)) + "}") if isinstance(t, list) else str(t) for t in ts]
                ax.set_xticks(range(len(ts)), t_labels, fontsize=8)
                ax.set_yticks(range(len(ns)), [str(n) for n in ns], fontsize=8)
                ax.set_xlabel("T (look-back)", fontsize=8)
                ax.set_ylabel("N (modulus)", fontsize=8)
                title = f"{kind} · d{s.d_model} L{s.n_layers} H{s.n_heads} ({format_params(s.n_params)})"
                ax.set_title(title, fontsize=9, fontweight="bold")
    fig.colorbar(ScalarMappable(norm=norm, cmap=CMAP), ax=fig.axes, label="success rate over seeds", shrink=0.9)
    fig.legend(handles=_legend_handles(), loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle(
        f"Solved map of {report.study} — ✓ solved, ✗ unsolved, ? undetermined: solved seeds / scored seeds",
        fontsize=11,
    )
    return fig


def accuracy_figure(report: Report) -> Figure:
    """Best held-out accuracy vs task complexity, one panel per model size, one line per kind."""
    cells = _cells(report)
    n_pts = len(report.points)
    fig, axes = _size_panels(report, max(4.0, 0.45 * n_pts), 3.6)
    xs = list(range(n_pts))
    for ax, s in zip(axes, report.sizes, strict=True):
        for i, kind in enumerate(report.kinds):
            ys = [cells[(kind, s.name, p.name)].best_acc for p in report.points]
            ax.plot(
                xs,
                [math.nan if y is None else y for y in ys],
                marker=MARKERS[i % len(MARKERS)],
                color=_kind_color(i),
                linestyle="-" if i == 0 else "--",
                label=kind,
            )
        ax.axhline(report.threshold, color="black", linestyle=":", linewidth=1, label=f"threshold {report.threshold:g}")
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlim(-0.5, n_pts - 0.5)
        labels = [f"{p.coords[0]}: {p.name}" if report.is_ladder else p.name for p in report.points]
        ax.set_xticks(xs, labels, rotation=40 if n_pts > 4 or not report.is_ladder else 0, ha="right", fontsize=7)
        _size_title(ax, s)
        ax.set_xlabel("rung (easiest → hardest)" if report.is_ladder else "task point (N-major grid order)")
        ax.set_ylabel("best eval accuracy (fraction)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Accuracy vs task complexity, {report.study} (best seed at each cell's chosen lr)", fontsize=11)
    return fig


def figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    """Render a figure; metadata that would change between runs is left out."""
    buf = io.BytesIO()
    metadata: dict[str, Any] = {"Date": None} if fmt == "svg" else {"Software": None}
    fig.savefig(buf, format=fmt, dpi=DPI, metadata=metadata)
    return buf.getvalue()


# --- HTML -------------------------------------------------------------------------------

_ENV = Environment(loader=PackageLoader("studies", "templates"), autoescape=True, undefined=StrictUndefined)


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "–" if x is None else format(x, fmt)


def _interval(lo: float | None, hi: float | None) -> str:
    return "–" if lo is None or hi is None else f"{lo:.2f} – {hi:.2f}"


def _seeds_text(per_seed: dict[str, float]) -> str:
    return ", ".join(f"s{k}: {v:+g}" for k, v in per_seed.items()) or "–"


def _frontier_rows(report: Report) -> list[list[dict[str, str]]]:
    rows = []
    for s in report.sizes:
        row = [
            {"text": s.name, "cls": ""},
            {"text": f"{s.n_params:,}", "cls": "num"},
            {"text": f"{s.d_model} / {s.n_layers} / {s.n_heads}", "cls": ""},
        ]
        for k in report.kinds:
            f = report.frontier_of(k, s.name)
            cls = "solved" if f.determined else "undetermined"
            row.append({"text": frontier_text(report, f), "cls": cls})
        for p in report.paired_sizes:
            if p.size == s.name:
                ci = "" if p.ci_low is None else f" [{p.ci_low:+.2g}, {p.ci_high:+.2g}]"
                text = "n/a" if p.mean_margin is None else f"{p.mean_margin:+.2g} {p.unit}{ci}, {p.n_seeds} seed(s)"
                row.append({"text": text, "cls": ""})
        rows.append(row)
    return rows


def report_html(report: Report, images: dict[str, bytes]) -> str:
    """The report page; ``images`` maps frontier / solved_map / accuracy / budget to PNG bytes."""
    c = report.compute
    named: list[tuple[str, KindCompute | Compute]] = [*c.per_kind.items(), ("all records", c)]
    legend = (
        "Per kind and size: the highest rung certainly solved when determined (the rung above is certainly "
        "unsolved); otherwise [certainly solved, possibly solved], ‘?’ when the top is not settled; ‘!’ when a "
        "rung below is not solved."
        if report.is_ladder
        else "Per kind and size: solved points, and undetermined points that more seeds could settle."
    )
    return _ENV.get_template("report.html.j2").render(
        r=report,
        criterion=_criterion(report),
        frontier_legend=legend,
        pair_names=[f"{p.kind} − {p.reference}" for p in report.paired_sizes if p.size == report.sizes[0].name],
        frontier_rows=_frontier_rows(report),
        images={k: base64.b64encode(v).decode() for k, v in images.items()},
        statuses=ALL_STATUSES,
        compute_rows=named,
        text=frontier_table(report),
        spec_json=json.dumps(report.spec, indent=2, sort_keys=True),
        provenance_json=json.dumps(report.provenance, indent=2, sort_keys=True, default=str),
        num=_num,
        interval=_interval,
        fmt_seeds=_seeds_text,
    )


def write_report(
    spec: StudySpec,
    records: list[TrialRecord],
    out_dir: str | Path,
    provenance: dict[str, Any] | None = None,
) -> Report:
    """Build the report and write it under ``out_dir``.

    Writes report.json, report.html (self-contained), frontier.txt, frontier.png,
    frontier.svg, solved_map.png, accuracy.png and budget.png.

    Returns:
        The report that was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(spec, records, provenance)
    (out / "report.json").write_text(report_json(report))
    (out / "frontier.txt").write_text(frontier_table(report))
    front = frontier_figure(report)
    images = {
        "frontier": figure_bytes(front),
        "solved_map": figure_bytes(solved_map_figure(report)),
        "accuracy": figure_bytes(accuracy_figure(report)),
        "budget": figure_bytes(budget_figure(report)),
    }
    (out / "frontier.svg").write_bytes(figure_bytes(front, "svg"))
    for name, png in images.items():
        (out / f"{name}.png").write_bytes(png)
    (out / "report.html").write_text(report_html(report, images))
    return report
