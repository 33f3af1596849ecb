"""Plots and a self-contained HTML page for a capacity-frontier report.

Figures use matplotlib's object API (no pyplot state, Agg rendering); the HTML embeds
them as base64 PNG and needs no network, script or external stylesheet.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

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
    Margin,
    Report,
    build_report,
    format_params,
    frontier_table,
    report_json,
)
from studies.spec import StudySpec

CMAP = "RdYlGn"  # success rate: red 0 .. green 1
UNKNOWN_STYLE: dict[str, Any] = {"facecolor": "#e6e6e6", "hatch": "//", "edgecolor": "#9a9a9a"}
NO_OUTCOME_STYLE: dict[str, Any] = {"facecolor": "#b8b8b8", "hatch": "xx", "edgecolor": "#6e6e6e"}
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
    return f"solved: ≥{report.min_success_rate:.0%} of seeds reach eval accuracy ≥ {report.threshold:g}"


# --- figures -----------------------------------------------------------------------------


def frontier_figure(report: Report) -> Figure:
    """Model size (parameters, log) vs highest solved rung (ladder) or solved points (grid)."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.add_subplot()
    sizes = report.sizes
    xs = [s.n_params for s in sizes]
    for i, kind in enumerate(report.kinds):
        ys = []
        for s in sizes:
            f = report.frontier_of(kind, s.name)
            if f.n_solved == 0 and f.n_unsolved == 0:
                ys.append(math.nan)  # nothing decided at this size
            elif report.is_ladder:
                ys.append(-1 if f.highest_rung is None else f.highest_rung)
            else:
                ys.append(f.n_solved)
        big = i == 0
        ax.plot(
            xs,
            ys,
            marker=MARKERS[i % len(MARKERS)],
            markersize=13 if big else 7,
            markerfacecolor="none" if big else _kind_color(i),
            markeredgewidth=2.2 if big else 1.0,
            linewidth=2.2 if big else 1.6,
            linestyle="-" if big else "--",
            color=_kind_color(i),
            label=kind,
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
    if report.is_ladder:
        n = len(report.points)
        ax.set_yticks(range(-1, n), ["none solved"] + [f"{p.coords[0]}: {p.name}" for p in report.points], fontsize=8)
        ax.set_ylim(-1.5, n - 0.5)
        ax.set_ylabel("highest solved rung (index: task point)")
        ax.set_title(f"Capacity frontier of {report.study}: highest rung solved per model size\n{_criterion(report)}")
    else:
        n = len(report.points)
        ax.set_ylim(-0.5, n + 0.5)
        ax.set_yticks(range(0, n + 1, max(1, math.ceil(n / 12))))
        ax.set_ylabel(f"solved task points (of {n} on the N x T grid)")
        ax.set_title(f"Capacity frontier of {report.study}: solved grid points per model size\n{_criterion(report)}")
    ax.grid(True, alpha=0.3)
    ax.legend(title="attention kind", loc="best")
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
        rgba = colormaps[CMAP](norm(rate))
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, facecolor=rgba, edgecolor="white", linewidth=1))
        dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
        mark = "✓" if cell.state == "solved" else "✗"
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
        Patch(label="frontier (hardest solved)", fill=False, edgecolor="black", linewidth=2.5),
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
    fig.legend(handles=_legend_handles(), loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(f"Solved map of {report.study} — cell text: solved seeds / seeds with an outcome", fontsize=11)
    return fig


def accuracy_figure(report: Report) -> Figure:
    """Best held-out accuracy vs task complexity, one panel per model size, one line per kind."""
    cells = _cells(report)
    n = len(report.sizes)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    n_pts = len(report.points)
    fig = Figure(figsize=(min(20.0, 1.5 + ncols * max(4.0, 0.45 * n_pts)), 0.6 + 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    xs = list(range(n_pts))
    for ax, s in zip(axes, report.sizes, strict=False):
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
        ax.set_title(f"d{s.d_model} L{s.n_layers} H{s.n_heads} ({format_params(s.n_params)} params)", fontsize=10)
        ax.set_xlabel("rung (easiest → hardest)" if report.is_ladder else "task point (N-major grid order)")
        ax.set_ylabel("best eval accuracy (fraction)")
        ax.grid(True, alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
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

_CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 24px auto; max-width: 1220px; color: #222; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; border-bottom: 1px solid #ccc; margin-top: 28px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.solved { background: #c8e6c9; } .unsolved { background: #ffcdd2; }
.no_outcome { background: #d5d5d5; } .unknown { background: #f2f2f2; color: #777; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
.muted { color: #666; font-size: 13px; } .nw { white-space: nowrap; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "–" if x is None else format(x, fmt)


def _table(head: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _margin_cell(report: Report, m: Margin) -> str:
    if report.is_ladder:
        return "n/a" if m.rung_margin is None else f"{m.rung_margin:+d} rung"
    return f"{m.solved_margin:+d} point(s)" if m.compared else "n/a"


def _frontier_rows(report: Report) -> list[list[str]]:
    rows = []
    for s in report.sizes:
        row = [_e(s.name), f"{s.n_params:,}", f"{s.d_model} / {s.n_layers} / {s.n_heads}"]
        for k in report.kinds:
            f = report.frontier_of(k, s.name)
            if report.is_ladder:
                row.append("none" if f.highest_rung is None else f"rung {f.highest_rung}: {_e(f.highest_rung_point)}")
            else:
                pts = ", ".join(_e(p.name) for p in f.points) or "none"
                row.append(f"{f.n_solved} solved; frontier {pts}")
        row += [_margin_cell(report, m) for m in report.margins if m.size == s.name]
        rows.append(row)
    return rows


def _margin_rows(report: Report) -> list[list[str]]:
    return [
        [
            _e(m.size),
            f"{_e(m.kind)} vs {_e(m.reference)}",
            str(m.compared),
            _e(", ".join(m.only_kind) or "–"),
            _e(", ".join(m.only_reference) or "–"),
            _margin_cell(report, m),
            _e(", ".join(m.beyond_kind) or "–"),
            _e(", ".join(m.beyond_reference) or "–"),
        ]
        for m in report.margins
    ]


def _compute_rows(report: Report) -> list[list[str]]:
    c = report.compute
    rows = []
    named: list[tuple[str, KindCompute | Compute]] = [*c.per_kind.items(), ("all records", c)]
    for name, kc in named:
        counts = kc.status_counts
        rows.append(
            [
                _e(name),
                str(kc.n_trials),
                f"{kc.cpu_s:,.1f}",
                f"{kc.gpu_s:,.1f}",
                f"{kc.wall_s:,.1f}",
                *(str(counts.get(s, 0)) for s in ALL_STATUSES),
            ]
        )
    return rows


def _cell_rows(report: Report) -> tuple[list[list[str]], list[str]]:
    rows: list[list[str]] = []
    classes: list[str] = []
    for c in report.cells:
        ci = "–" if c.ci_low is None else f'<span class="nw">{c.ci_low:.2f}–{c.ci_high:.2f}</span>'
        rows.append(
            [
                _e(c.kind),
                _e(c.size),
                _e(c.point),
                _e(c.state),
                _num(c.lr),
                f"{c.successes}/{c.n_outcomes}",
                _num(c.success_rate, ".2f"),
                ci,
                _num(c.best_acc, ".4f"),
                _num(c.median_steps_to_solve, ".0f"),
                str(c.n_trials),
                f"{c.failed}/{c.diverged}/{c.oom}/{c.preempted}/{c.stopped}",
                f"{c.cpu_s:,.1f}",
                f"{c.gpu_s:,.1f}",
            ]
        )
        classes.append(c.state)
    return rows, classes


def report_html(report: Report, images: dict[str, bytes]) -> str:
    """The report page; ``images`` maps frontier / solved_map / accuracy to PNG bytes."""
    pairs = [f"{m.kind} − {m.reference}" for m in report.margins if m.size == report.sizes[0].name]
    frontier_head = ["size", "params", "d_model / layers / heads", *report.kinds, *pairs]
    margin_head = ["size", "pair", "points compared", "solved only by kind", "solved only by reference"]
    margin_head += [
        "margin (highest rung)" if report.is_ladder else "margin (net solved points)",
        "kind's frontier beyond reference",
        "reference's frontier beyond kind",
    ]
    compute_head = ["kind", "trials", "CPU s", "GPU s", "wall s", *ALL_STATUSES]
    cell_head = ["kind", "size", "point", "state", "lr", "solved/outcomes", "rate", "95% CI (Wilson)"]
    cell_head += ["best acc", "median steps to solve", "trials", "failed/diverged/oom/preempted/stopped"]
    cell_head += ["CPU s", "GPU s"]
    cell_rows, cell_classes = _cell_rows(report)
    c = report.compute
    summary = (
        f"Kinds: {_e(', '.join(report.kinds))} (reference {_e(report.reference)}). "
        f"{len(report.sizes)} model sizes, {len(report.points)} task points ({_e(' x '.join(report.axes))}), "
        f"seeds {_e(report.spec.get('seeds'))}. {_e(_criterion(report))}. "
        f"{c.n_trials} trial records, {c.cpu_s:,.0f} CPU-s, {c.gpu_s:,.0f} GPU-s."
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Ladder report: {_e(report.study)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Ladder capacity-frontier report: {_e(report.study)}</h1>",
        f'<p class="muted">{summary}</p>',
        "<h2>Frontier</h2>",
        _table(frontier_head, _frontier_rows(report)),
        _img(images["frontier"], "capacity frontier: model size vs highest solved complexity"),
        "<h2>Solved map</h2>",
        _img(images["solved_map"], "solved map: success rate per cell"),
        "<h2>Margins between kinds</h2>",
        _table(margin_head, _margin_rows(report)),
        "<h2>Accuracy vs complexity</h2>",
        _img(images["accuracy"], "best eval accuracy vs task complexity"),
        "<h2>Compute</h2>",
        _table(compute_head, _compute_rows(report)),
        f'<p class="muted">{c.records_outside_spec} record(s) outside the spec are counted only in "all records".</p>',
        "<h2>Cells</h2>",
        _table(cell_head, cell_rows, cell_classes),
        "<h2>Frontier (text)</h2>",
        f"<pre>{_e(frontier_table(report))}</pre>",
        "<h2>Spec</h2>",
        f"<pre>{_e(json.dumps(report.spec, indent=2, sort_keys=True))}</pre>",
        "<h2>Provenance</h2>",
        f"<pre>{_e(json.dumps(report.provenance, indent=2, sort_keys=True, default=str))}</pre>",
        f'<p class="muted">report_version {report.report_version}</p>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(
    spec: StudySpec,
    records: list[TrialRecord],
    out_dir: str | Path,
    provenance: dict[str, Any] | None = None,
) -> Report:
    """Build the report and write it under ``out_dir``.

    Writes report.json, report.html (self-contained), frontier.txt, frontier.png,
    frontier.svg, solved_map.png and accuracy.png.

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
    }
    (out / "frontier.svg").write_bytes(figure_bytes(front, "svg"))
    for name, png in images.items():
        (out / f"{name}.png").write_bytes(png)
    (out / "report.html").write_text(report_html(report, images))
    return report
