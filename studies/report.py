"""Capacity-frontier analysis: from a study spec and its trial records to a versioned report.

Cells aggregate seeds per (kind, model size, task point); the frontier is the set of
Pareto-maximal solved points per (kind, size); margins compare kinds at each size.
Trials without an outcome (failed, diverged, oom, preempted) never count as unsolved.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from studies.records import OUTCOMES, TrialRecord
from studies.spec import ModelSize, Point, StudySpec
from workers.model import ModelConfig, count_parameters

REPORT_VERSION = 1
MIN_SUCCESS_RATE = 0.5  # a cell is solved when at least this fraction of its outcomes are solved
WILSON_Z = 1.959963984540054  # two-sided 95%
NO_OUTCOME_STATUSES = ("failed", "diverged", "oom", "preempted")
ALL_STATUSES = ("solved", "unsolved", "stopped", *NO_OUTCOME_STATUSES)
SIGNIFICANT_DIGITS = 6

CellState = Literal["solved", "unsolved", "no_outcome", "unknown"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SizeInfo(_Model):
    """A model size with its parameter count (from the records, else computed)."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_params: int
    n_params_source: Literal["records", "computed"]


class PointInfo(_Model):
    name: str
    coords: list[int]
    members: list[tuple[int, int]]


class LrResult(_Model):
    """Outcomes of one learning rate in a cell."""

    lr: float
    n_trials: int
    n_outcomes: int
    successes: int
    success_rate: float | None
    best_acc: float | None


class Cell(_Model):
    """One (kind, size, point): seeds aggregated at the cell's chosen learning rate.

    ``n_trials``, compute and the per-status counts cover every trial of the cell (all
    learning rates); ``n_outcomes`` .. ``median_steps_to_solve`` cover the chosen ``lr``.
    """

    kind: str
    size: str
    point: str
    coords: list[int]
    state: CellState
    lr: float | None
    lrs: list[LrResult]
    n_trials: int
    n_outcomes: int
    successes: int
    success_rate: float | None
    ci_low: float | None
    ci_high: float | None
    best_acc: float | None
    median_steps_to_solve: float | None
    seeds: list[int]
    cpu_s: float
    gpu_s: float
    wall_s: float
    failed: int
    diverged: int
    oom: int
    preempted: int
    stopped: int


class FrontierPoint(_Model):
    name: str
    coords: list[int]


class Frontier(_Model):
    """The Pareto-maximal solved points of one (kind, size); for a ladder, its highest rung."""

    kind: str
    size: str
    d_model: int
    n_layers: int
    n_heads: int
    n_params: int
    points: list[FrontierPoint]
    highest_rung: int | None
    highest_rung_point: str | None
    n_solved: int
    n_unsolved: int
    n_no_outcome: int
    n_unknown: int


class Margin(_Model):
    """``kind`` against ``reference`` (the earlier kind in the spec) at one size.

    ``only_*`` and ``solved_margin`` count only points where both kinds have an outcome.
    ``rung_margin`` is the highest-rung difference (ladders; None if either solved none);
    ``beyond_*`` are frontier points of one kind that no solved point of the other reaches.
    """

    size: str
    reference: str
    kind: str
    compared: int
    only_reference: list[str]
    only_kind: list[str]
    solved_margin: int
    highest_rung_reference: int | None
    highest_rung_kind: int | None
    rung_margin: int | None
    beyond_reference: list[str]
    beyond_kind: list[str]


class KindCompute(_Model):
    n_trials: int
    cpu_s: float
    gpu_s: float
    wall_s: float
    status_counts: dict[str, int]


class Compute(_Model):
    """Compute spent, in seconds, over every record of the study (failed trials included)."""

    n_trials: int
    cpu_s: float
    gpu_s: float
    wall_s: float
    status_counts: dict[str, int]
    per_kind: dict[str, KindCompute]
    records_outside_spec: int


class Report(_Model):
    """The capacity-frontier report of one study."""

    report_version: Literal[1] = 1
    study: str
    axes: list[str]
    kinds: list[str]
    reference: str
    threshold: float
    min_success_rate: float
    sizes: list[SizeInfo]  # ascending parameter count
    points: list[PointInfo]  # spec order
    cells: list[Cell]  # kind (spec order), size (as ``sizes``), point (spec order)
    frontier: list[Frontier]
    margins: list[Margin]
    compute: Compute
    spec: dict[str, Any]
    provenance: dict[str, Any]

    @property
    def is_ladder(self) -> bool:
        return self.axes == ["rung"]

    def cell(self, kind: str, size: str, point: str) -> Cell:
        for c in self.cells:
            if (c.kind, c.size, c.point) == (kind, size, point):
                return c
        raise KeyError(f"no cell {kind=}, {size=}, {point=} in the report")

    def frontier_of(self, kind: str, size: str) -> Frontier:
        for f in self.frontier:
            if (f.kind, f.size) == (kind, size):
                return f
        raise KeyError(f"no frontier for {kind=}, {size=} in the report")


# --- statistics ------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default).

    Raises:
        ValueError: if ``n`` is not positive or ``successes`` is outside ``0..n``.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need n >= 1 and 0 <= successes <= n, got {successes=}, {n=}")
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def pareto_maximal(coords: Iterable[Sequence[int]]) -> list[tuple[int, ...]]:
    """The points not dominated by another (q >= p in every coordinate, q != p), sorted."""
    pts = sorted({tuple(c) for c in coords})
    return [p for p in pts if not any(q != p and all(a >= b for a, b in zip(q, p, strict=True)) for q in pts)]


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# --- building ---------------------------------------------------------------------------


def _unique_sizes(spec: StudySpec) -> list[ModelSize]:
    seen: dict[str, ModelSize] = {}
    for s in spec.model.all_sizes():
        seen.setdefault(s.name, s)
    return list(seen.values())


def _size_infos(spec: StudySpec, records: list[TrialRecord]) -> list[SizeInfo]:
    vocab = max(n for p in spec.task.points() for n, _ in p.members)
    out = []
    for s in _unique_sizes(spec):
        counts = [r.n_params for r in records if r.size_name == s.name and r.n_params is not None]
        if counts:
            n_params, source = max(counts), "records"
        else:
            cfg = ModelConfig(
                vocab_size=vocab,
                context_length=spec.training.context_length,
                d_model=s.d_model,
                n_layers=s.n_layers,
                n_heads=s.n_heads,
            )
            n_params, source = count_parameters(cfg), "computed"
        out.append(
            SizeInfo(
                name=s.name,
                d_model=s.d_model,
                n_layers=s.n_layers,
                n_heads=s.n_heads,
                n_params=n_params,
                n_params_source=source,  # type: ignore[arg-type]
            )
        )
    order = {s.name: i for i, s in enumerate(out)}
    return sorted(out, key=lambda s: (s.n_params, order[s.name]))


def _lr_result(lr: float, trials: list[TrialRecord]) -> LrResult:
    outcomes = [r for r in trials if r.status in OUTCOMES]
    successes = sum(r.status == "solved" for r in outcomes)
    accs = [a for r in outcomes if (a := _finite(r.eval_acc)) is not None]
    return LrResult(
        lr=lr,
        n_trials=len(trials),
        n_outcomes=len(outcomes),
        successes=successes,
        success_rate=successes / len(outcomes) if outcomes else None,
        best_acc=max(accs) if accs else None,
    )


def _choose_lr(results: list[LrResult]) -> LrResult | None:
    """Highest success rate; ties: best accuracy, then the smaller lr. None without outcomes."""
    with_outcomes = [r for r in results if r.n_outcomes]
    if not with_outcomes:
        return None
    return min(
        with_outcomes,
        key=lambda r: (-(r.success_rate or 0.0), -(r.best_acc if r.best_acc is not None else -1.0), r.lr),
    )


def _cell(kind: str, size: str, point: Point, trials: list[TrialRecord]) -> Cell:
    by_lr: dict[float, list[TrialRecord]] = {}
    for r in trials:
        by_lr.setdefault(r.lr, []).append(r)
    lrs = [_lr_result(lr, by_lr[lr]) for lr in sorted(by_lr)]
    chosen = _choose_lr(lrs)
    chosen_trials = by_lr[chosen.lr] if chosen else []
    outcomes = [r for r in chosen_trials if r.status in OUTCOMES]
    n_out = len(outcomes)
    successes = sum(r.status == "solved" for r in outcomes)
    steps = sorted(r.steps_to_solve for r in outcomes if r.status == "solved" and r.steps_to_solve is not None)
    rate = successes / n_out if n_out else None
    ci = wilson_interval(successes, n_out) if n_out else (None, None)
    state: CellState
    if not trials:
        state = "unknown"
    elif not n_out:
        state = "no_outcome"
    else:
        state = "solved" if successes / n_out >= MIN_SUCCESS_RATE else "unsolved"
    counts = {s: sum(r.status == s for r in trials) for s in ALL_STATUSES}
    return Cell(
        kind=kind,
        size=size,
        point=point.name,
        coords=list(point.coords),
        state=state,
        lr=chosen.lr if chosen else None,
        lrs=lrs,
        n_trials=len(trials),
        n_outcomes=n_out,
        successes=successes,
        success_rate=rate,
        ci_low=ci[0],
        ci_high=ci[1],
        best_acc=chosen.best_acc if chosen else None,
        median_steps_to_solve=float(statistics.median(steps)) if steps else None,
        seeds=sorted({r.seed for r in outcomes}),
        cpu_s=math.fsum(r.cpu_s for r in trials),
        gpu_s=math.fsum(r.gpu_s for r in trials),
        wall_s=math.fsum(r.wall_s for r in trials),
        failed=counts["failed"],
        diverged=counts["diverged"],
        oom=counts["oom"],
        preempted=counts["preempted"],
        stopped=counts["stopped"],
    )


def _frontier(kind: str, size: SizeInfo, cells: list[Cell], ladder: bool) -> Frontier:
    solved = {tuple(c.coords): c for c in cells if c.state == "solved"}
    top = pareto_maximal(solved)
    highest = top[-1][0] if ladder and top else None
    return Frontier(
        kind=kind,
        size=size.name,
        d_model=size.d_model,
        n_layers=size.n_layers,
        n_heads=size.n_heads,
        n_params=size.n_params,
        points=[FrontierPoint(name=solved[p].point, coords=list(p)) for p in top],
        highest_rung=highest,
        highest_rung_point=solved[top[-1]].point if highest is not None else None,
        n_solved=len(solved),
        n_unsolved=sum(c.state == "unsolved" for c in cells),
        n_no_outcome=sum(c.state == "no_outcome" for c in cells),
        n_unknown=sum(c.state == "unknown" for c in cells),
    )


def _beyond(front: Frontier, other_cells: list[Cell]) -> list[str]:
    """Frontier points of ``front`` that no solved point of the other kind reaches (>=)."""
    solved = [c.coords for c in other_cells if c.state == "solved"]
    return [
        p.name for p in front.points if not any(all(a >= b for a, b in zip(q, p.coords, strict=True)) for q in solved)
    ]


def _margin(size: str, ref: str, kind: str, cells: dict[str, list[Cell]], fronts: dict[str, Frontier]) -> Margin:
    decided = ("solved", "unsolved")
    only_ref, only_kind, compared = [], [], 0
    for a, b in zip(cells[ref], cells[kind], strict=True):
        if a.state in decided and b.state in decided:
            compared += 1
            if a.state == "solved" and b.state != "solved":
                only_ref.append(a.point)
            if b.state == "solved" and a.state != "solved":
                only_kind.append(b.point)
    hr_ref, hr_kind = fronts[ref].highest_rung, fronts[kind].highest_rung
    return Margin(
        size=size,
        reference=ref,
        kind=kind,
        compared=compared,
        only_reference=only_ref,
        only_kind=only_kind,
        solved_margin=len(only_kind) - len(only_ref),
        highest_rung_reference=hr_ref,
        highest_rung_kind=hr_kind,
        rung_margin=hr_kind - hr_ref if hr_ref is not None and hr_kind is not None else None,
        beyond_reference=_beyond(fronts[ref], cells[kind]),
        beyond_kind=_beyond(fronts[kind], cells[ref]),
    )


def _kind_compute(records: list[TrialRecord]) -> KindCompute:
    return KindCompute(
        n_trials=len(records),
        cpu_s=math.fsum(r.cpu_s for r in records),
        gpu_s=math.fsum(r.gpu_s for r in records),
        wall_s=math.fsum(r.wall_s for r in records),
        status_counts={s: sum(r.status == s for r in records) for s in ALL_STATUSES},
    )


def build_report(spec: StudySpec, records: list[TrialRecord], provenance: dict[str, Any] | None = None) -> Report:
    """Analyse a study's trial records against its spec.

    Args:
        spec: the study spec; every (kind, size, point) it names gets a cell, run or not.
        records: one record per trial (as ``read_records`` gives them); their order does
            not matter. Records of kinds, sizes or points outside the spec are counted in
            ``compute.records_outside_spec`` and otherwise ignored.
        provenance: stored as given (git SHA, package versions, dates...).

    Returns:
        The report; ``report_json`` serialises it deterministically.
    """
    points = spec.task.points()
    ladder = spec.task.axes == ["rung"]
    sizes = _size_infos(spec, records)
    kinds = list(spec.attention)
    key_of = {(k, s.name, p.name) for k in kinds for s in sizes for p in points}
    by_cell: dict[tuple[str, str, str], list[TrialRecord]] = {}
    outside = 0
    for r in records:
        key = (r.kind, r.size_name, r.point)
        if key in key_of:
            by_cell.setdefault(key, []).append(r)
        else:
            outside += 1

    by_kind_size: dict[tuple[str, str], list[Cell]] = {}
    fronts: list[Frontier] = []
    margins: list[Margin] = []
    for size in sizes:
        size_cells: dict[str, list[Cell]] = {}
        size_fronts: dict[str, Frontier] = {}
        for kind in kinds:
            size_cells[kind] = [_cell(kind, size.name, p, by_cell.get((kind, size.name, p.name), [])) for p in points]
            size_fronts[kind] = _frontier(kind, size, size_cells[kind], ladder)
            by_kind_size[(kind, size.name)] = size_cells[kind]
        for ref, kind in itertools.combinations(kinds, 2):
            margins.append(_margin(size.name, ref, kind, size_cells, size_fronts))
        fronts.extend(size_fronts.values())
    cells = [c for kind in kinds for size in sizes for c in by_kind_size[(kind, size.name)]]
    kind_order = {k: i for i, k in enumerate(kinds)}
    size_order = {s.name: i for i, s in enumerate(sizes)}
    fronts.sort(key=lambda f: (kind_order[f.kind], size_order[f.size]))

    in_spec = [r for r in records if (r.kind, r.size_name, r.point) in key_of]
    total = _kind_compute(records)
    compute = Compute(
        n_trials=total.n_trials,
        cpu_s=total.cpu_s,
        gpu_s=total.gpu_s,
        wall_s=total.wall_s,
        status_counts=total.status_counts,
        per_kind={k: _kind_compute([r for r in in_spec if r.kind == k]) for k in kinds},
        records_outside_spec=outside,
    )
    return Report(
        study=spec.name,
        axes=list(spec.task.axes),
        kinds=kinds,
        reference=kinds[0],
        threshold=spec.threshold,
        min_success_rate=MIN_SUCCESS_RATE,
        sizes=sizes,
        points=[PointInfo(name=p.name, coords=list(p.coords), members=list(p.members)) for p in points],
        cells=cells,
        frontier=fronts,
        margins=margins,
        compute=compute,
        spec=spec.model_dump(mode="json"),
        provenance=dict(provenance or {}),
    )


# --- output -----------------------------------------------------------------------------


def _normalise(x: Any) -> Any:
    """Round floats to SIGNIFICANT_DIGITS, non-finite floats to None, recursively."""
    if isinstance(x, bool) or x is None or isinstance(x, int | str):
        return x
    if isinstance(x, float):
        return float(f"{x:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _normalise(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_normalise(v) for v in x]
    return str(x)


def report_json(report: Report) -> str:
    """Deterministic JSON: sorted keys, rounded floats; equal inputs give equal bytes."""
    return json.dumps(_normalise(report.model_dump(mode="json")), sort_keys=True, indent=2) + "\n"


def format_params(n: int) -> str:
    """A parameter count for people: 980, 4,327, 27.5k, 4.56M."""
    if n < 10_000:
        return f"{n:,}"
    if n < 1_000_000:
        return f"{n / 1e3:.3g}k"
    return f"{n / 1e6:.3g}M"


def _frontier_text(report: Report, f: Frontier) -> str:
    if report.is_ladder:
        return "none" if f.highest_rung is None else f"{f.highest_rung} {f.highest_rung_point}"
    if not f.points:
        return "none"
    return f"{f.n_solved} solved: " + ", ".join(p.name for p in f.points)


def _margin_text(report: Report, m: Margin) -> str:
    if report.is_ladder:
        diff = "n/a" if m.rung_margin is None else f"{m.rung_margin:+d} rung"
    elif not m.compared:
        diff = "n/a"
    else:
        diff = f"{m.solved_margin:+d} pt"
        if m.beyond_kind:
            diff += f" (beyond: {', '.join(m.beyond_kind)})"
    return diff


def frontier_table(report: Report) -> str:
    """A plain-text table: one row per model size, the frontier per kind, the margins."""
    head = ["size", "params", *report.kinds]
    pairs = [(m.reference, m.kind) for m in report.margins if m.size == report.sizes[0].name]
    head += [f"{k}-{r}" for r, k in pairs]
    rows = [head]
    for s in report.sizes:
        row = [s.name, f"{s.n_params:,}"]
        row += [_frontier_text(report, report.frontier_of(k, s.name)) for k in report.kinds]
        row += [_margin_text(report, m) for m in report.margins if m.size == s.name]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    what = "highest solved rung" if report.is_ladder else "solved points and frontier"
    title = f"{report.study}: {what} (solved = success rate >= {report.min_success_rate:g} over seeds)"
    return "\n".join([title, *lines]) + "\n"
