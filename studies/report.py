"""Capacity-frontier analysis: from a study spec and its trial records to a versioned report.

Cells aggregate seeds per (kind, model size, task point) and decide with confidence: solved,
unsolved or undetermined (``studies.stats``). The frontier per (kind, size) is an interval,
from the highest rung certainly solved to the highest possibly solved; a monotone fit and
findings flag holes and bigger models solving less; kinds are compared paired over seeds.
Trials without an outcome (failed, diverged, oom, preempted) never count as unsolved.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from studies.records import OUTCOMES, TrialRecord
from studies.spec import ModelSize, Point, StudySpec
from studies.stats import (
    ALPHA,
    CONFIDENCE,
    SOLVED_AT,
    bootstrap_mean_interval,
    decide,
    exact_mcnemar,
    holm,
    monotone_fit,
    sign_test,
    wilson_interval,
)
from workers.model import ModelConfig, count_parameters

REPORT_VERSION = 2
NO_OUTCOME_STATUSES = ("failed", "diverged", "oom", "preempted")
ALL_STATUSES = ("solved", "unsolved", "stopped", *NO_OUTCOME_STATUSES)
SIGNIFICANT_DIGITS = 6

CellState = Literal["solved", "unsolved", "undetermined", "no_outcome", "unknown"]
DECIDED: frozenset[str] = frozenset({"solved", "unsolved"})


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
    """Outcomes of one learning rate in a cell (over every seed: for display, not for the decision)."""

    lr: float
    n_trials: int
    n_outcomes: int
    successes: int
    success_rate: float | None
    best_acc: float | None


class Outcome(_Model):
    """One scored trial of a cell: its seed, the lr it was scored at, and whether (and when) it solved."""

    seed: int
    lr: float
    solved: bool
    steps_to_solve: int | None


class Cell(_Model):
    """One (kind, size, point) and its decision.

    With several learning rates, selection seeds choose the lr and the other seeds score it
    (``lr_selection == "held_out_seeds"``, see ``score_outcomes``): the lr is never chosen on
    the data that scores it. ``outcomes`` .. ``ci_high`` count the scored trials; ``n_trials``,
    compute and the per-status counts cover every trial of the cell; ``lrs`` shows every lr
    on every seed (for looking, not deciding). ``fitted_rate`` is the monotone fit of P(solved).
    """

    kind: str
    size: str
    point: str
    coords: list[int]
    state: CellState
    lr: float | None
    lr_selection: Literal["single", "held_out_seeds", "prespecified"]
    lrs: list[LrResult]
    outcomes: list[Outcome]
    n_trials: int
    n_outcomes: int
    successes: int
    success_rate: float | None
    ci_low: float | None
    ci_high: float | None
    fitted_rate: float | None
    best_acc: float | None
    median_steps_to_solve: float | None
    seeds: list[int]
    cpu_s: float
    gpu_s: float
    device_s: float
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
    """The frontier of one (kind, size) as an interval.

    ``points``: Pareto-maximal solved points; ``possible_points``: Pareto-maximal points that
    are solved or undetermined. For a ladder, ``highest_rung`` is the highest rung certainly
    solved and ``highest_possible_rung`` the highest possibly solved (rungs never run are not
    counted); ``highest_observed_rung`` is the old point estimate (success rate >= 0.5), for
    reading only. ``determined``: the two agree and the rung above is unsolved (or there is none).
    ``not_solved_below``: rungs under ``highest_rung`` that are not solved (holes are findings).
    """

    kind: str
    size: str
    d_model: int
    n_layers: int
    n_heads: int
    n_params: int
    points: list[FrontierPoint]
    possible_points: list[FrontierPoint]
    highest_rung: int | None
    highest_rung_point: str | None
    highest_possible_rung: int | None
    highest_possible_point: str | None
    highest_observed_rung: int | None
    determined: bool
    not_solved_below: list[str]
    n_solved: int
    n_unsolved: int
    n_undetermined: int
    n_no_outcome: int
    n_unknown: int
    device_s: float
    cpu_s: float


class Finding(_Model):
    """A violation of monotonicity the data shows with confidence.

    ``hole``: an unsolved rung below a solved one (same kind and size). ``bigger_solves_less``:
    a bigger model unsolved where a smaller one is solved (same kind and point).
    """

    finding: Literal["hole", "bigger_solves_less"]
    kind: str
    size: str
    points: list[str]
    detail: str


class Margin(_Model):
    """``kind`` against ``reference`` (the earlier kind in the spec) at one size, on decided cells only.

    ``only_*`` and ``solved_margin`` count only points where both kinds are decided (solved or
    unsolved with confidence). ``rung_margin`` is the difference of certainly-solved highest
    rungs (ladders; None if either has none); ``beyond_*`` are frontier points of one kind that
    no solved point of the other reaches.
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


class PairedPoint(_Model):
    """Paired outcomes of two kinds at one (size, point) over shared seeds; exact McNemar test."""

    size: str
    point: str
    reference: str
    kind: str
    n_pairs: int
    both: int
    only_kind: int
    only_reference: int
    neither: int
    p_value: float


class PairedSize(_Model):
    """Per size: the per-seed margin (kind − reference) in highest solved rung (ladder) or solved points
    (grid), its mean, a bootstrap interval over seeds (None below two seeds) and a sign test."""

    size: str
    reference: str
    kind: str
    unit: Literal["rungs", "points"]
    n_seeds: int
    per_seed: dict[str, float]
    mean_margin: float | None
    ci_low: float | None
    ci_high: float | None
    sign_p: float


class Verdict(_Model):
    """Headline for one pair of kinds: pooled exact McNemar over every shared (size, point, seed)."""

    reference: str
    kind: str
    verdict: Literal["kind_ahead", "reference_ahead", "no_detectable_difference"]
    headline: str
    n_pairs: int
    n_seeds: int
    only_kind: int
    only_reference: int
    p_value: float
    p_holm: float


class BudgetFrontier(_Model):
    """The frontier interval of one (kind, size) had training stopped after ``budget`` steps."""

    budget: int
    kind: str
    size: str
    highest_rung: int | None
    highest_possible_rung: int | None
    n_solved: int
    n_undetermined: int


class KindCompute(_Model):
    n_trials: int
    cpu_s: float
    gpu_s: float
    device_s: float
    wall_s: float
    status_counts: dict[str, int]


class Compute(_Model):
    """Compute spent, in seconds, over every record of the study (failed trials included).

    ``gpu_s`` is wall time on a device; ``device_s`` is the share of a device actually held
    (``gpu_s`` times the trial's ``gpu_share``, else the spec's ``resources.gpu``).
    """

    n_trials: int
    cpu_s: float
    gpu_s: float
    device_s: float
    wall_s: float
    status_counts: dict[str, int]
    per_kind: dict[str, KindCompute]
    records_outside_spec: int


class Report(_Model):
    """The capacity-frontier report of one study."""

    report_version: Literal[2] = 2
    study: str
    axes: list[str]
    kinds: list[str]
    reference: str
    threshold: float
    solved_at: float
    confidence: float
    alpha: float
    monotone_in_size: bool
    max_steps: int
    sizes: list[SizeInfo]  # ascending parameter count
    points: list[PointInfo]  # spec order
    cells: list[Cell]  # kind (spec order), size (as ``sizes``), point (spec order)
    frontier: list[Frontier]
    findings: list[Finding]
    margins: list[Margin]
    paired_points: list[PairedPoint]
    paired_sizes: list[PairedSize]
    verdicts: list[Verdict]
    budget_curve: list[BudgetFrontier]
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

    def verdict_of(self, reference: str, kind: str) -> Verdict:
        for v in self.verdicts:
            if (v.reference, v.kind) == (reference, kind):
                return v
        raise KeyError(f"no verdict for {reference=}, {kind=} in the report")


def _dominates(q: Sequence[int], p: Sequence[int]) -> bool:
    """q is at least as hard as p on every axis."""
    return all(a >= b for a, b in zip(q, p, strict=True))


def pareto_maximal(coords: Iterable[Sequence[int]]) -> list[tuple[int, ...]]:
    """The points not dominated by another (q >= p in every coordinate, q != p), sorted."""
    pts = sorted({tuple(c) for c in coords})
    return [p for p in pts if not any(q != p and _dominates(q, p) for q in pts)]


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


# --- cells -------------------------------------------------------------------------------


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


def choose_lr(trials: list[TrialRecord]) -> float | None:
    """The lr with the highest success rate; ties: best accuracy, then the smaller lr. None without outcomes."""
    by_lr: dict[float, list[TrialRecord]] = {}
    for r in trials:
        by_lr.setdefault(r.lr, []).append(r)
    results = [_lr_result(lr, rs) for lr, rs in by_lr.items()]
    with_outcomes = [r for r in results if r.n_outcomes]
    if not with_outcomes:
        return None
    best = min(
        with_outcomes,
        key=lambda r: (-(r.success_rate or 0.0), -(r.best_acc if r.best_acc is not None else -1.0), r.lr),
    )
    return best.lr


def _order(r: TrialRecord) -> tuple[Any, ...]:
    return (r.seed, r.lr, r.trial_id)


def score_outcomes(trials: list[TrialRecord], spec: StudySpec) -> tuple[list[TrialRecord], str]:
    """The trials that score a cell, at an lr chosen on other data.

    One lr: every outcome scores. Several: the spec's first ``hparams.selection_seeds`` seeds
    choose the lr (``choose_lr``) and only the other seeds score it, so the scored outcomes
    are independent draws at a fixed lr. With no selection outcome, or no seed left to score,
    the spec's first lr (chosen before any data) is scored on every seed.

    Returns:
        The scoring trials (ordered by seed, lr, trial id) and how the lr was selected.
    """
    outcomes = sorted((r for r in trials if r.status in OUTCOMES), key=_order)
    if len({r.lr for r in trials}) <= 1:
        return outcomes, "single"
    k = spec.hparams.selection_seeds
    select = set(spec.seeds[:k])
    lr = choose_lr([r for r in outcomes if r.seed in select]) if len(spec.seeds) > k else None
    if lr is None:
        first = spec.hparams.lr.grid_values()[0]
        return [r for r in outcomes if r.lr == first], "prespecified"
    return [r for r in outcomes if r.seed not in select and r.lr == lr], "held_out_seeds"


def _state(trials: list[TrialRecord], scored: list[TrialRecord]) -> CellState:
    if not trials:
        return "unknown"
    if not scored:
        return "no_outcome"
    return decide(sum(r.status == "solved" for r in scored), len(scored))


def _device_share(r: TrialRecord, spec: StudySpec) -> float:
    return r.gpu_share if r.gpu_share is not None else spec.resources.gpu


def _device_s(records: Iterable[TrialRecord], spec: StudySpec) -> float:
    return math.fsum(r.gpu_s * _device_share(r, spec) for r in records)


def _cell(spec: StudySpec, kind: str, size: str, point: Point, trials: list[TrialRecord]) -> Cell:
    by_lr: dict[float, list[TrialRecord]] = {}
    for r in trials:
        by_lr.setdefault(r.lr, []).append(r)
    lrs = [_lr_result(lr, by_lr[lr]) for lr in sorted(by_lr)]
    scored, selection = score_outcomes(trials, spec)
    n_out = len(scored)
    successes = sum(r.status == "solved" for r in scored)
    steps = sorted(r.steps_to_solve for r in scored if r.status == "solved" and r.steps_to_solve is not None)
    ci = wilson_interval(successes, n_out) if n_out else (None, None)
    accs = [a for r in scored if (a := _finite(r.eval_acc)) is not None]
    counts = {s: sum(r.status == s for r in trials) for s in ALL_STATUSES}
    return Cell(
        kind=kind,
        size=size,
        point=point.name,
        coords=list(point.coords),
        state=_state(trials, scored),
        lr=scored[0].lr if scored else None,
        lr_selection=selection,  # type: ignore[arg-type]
        lrs=lrs,
        outcomes=[
            Outcome(seed=r.seed, lr=r.lr, solved=r.status == "solved", steps_to_solve=r.steps_to_solve) for r in scored
        ],
        n_trials=len(trials),
        n_outcomes=n_out,
        successes=successes,
        success_rate=successes / n_out if n_out else None,
        ci_low=ci[0],
        ci_high=ci[1],
        fitted_rate=None,
        best_acc=max(accs) if accs else None,
        median_steps_to_solve=float(statistics.median(steps)) if steps else None,
        seeds=sorted({r.seed for r in scored}),
        cpu_s=math.fsum(r.cpu_s for r in trials),
        gpu_s=math.fsum(r.gpu_s for r in trials),
        device_s=_device_s(trials, spec),
        wall_s=math.fsum(r.wall_s for r in trials),
        failed=counts["failed"],
        diverged=counts["diverged"],
        oom=counts["oom"],
        preempted=counts["preempted"],
        stopped=counts["stopped"],
    )


def _with_fit(cells: dict[tuple[str, str], list[Cell]], kinds: list[str], sizes: list[SizeInfo], in_size: bool) -> None:
    """Set ``fitted_rate`` in place: P(solved) non-increasing in rung (and non-decreasing in size if asked)."""
    for kind in kinds:
        rows = [cells[(kind, s.name)] for s in sizes]
        rates = np.array([[c.success_rate if c.success_rate is not None else 0.5 for c in row] for row in rows])
        weights = np.array([[float(c.n_outcomes) for c in row] for row in rows])
        if not weights.any():
            continue
        fit = monotone_fit(rates, weights, in_rows=True, in_cols=in_size)
        for i, s in enumerate(sizes):
            cells[(kind, s.name)] = [
                c.model_copy(update={"fitted_rate": float(fit[i, j])}) for j, c in enumerate(cells[(kind, s.name)])
            ]


# --- frontier, findings, margins -----------------------------------------------------------


def _front_points(cells: list[Cell], states: set[str]) -> tuple[list[FrontierPoint], dict[tuple[int, ...], Cell]]:
    chosen = {tuple(c.coords): c for c in cells if c.state in states}
    return [FrontierPoint(name=chosen[p].point, coords=list(p)) for p in pareto_maximal(chosen)], chosen


def _highest(cells: list[Cell], states: set[str]) -> Cell | None:
    hit = [c for c in cells if c.state in states]
    return max(hit, key=lambda c: c.coords[0]) if hit else None


def _frontier(kind: str, size: SizeInfo, cells: list[Cell], ladder: bool) -> Frontier:
    points, _ = _front_points(cells, {"solved"})
    possible, _ = _front_points(cells, {"solved", "undetermined"})
    top = _highest(cells, {"solved"}) if ladder else None
    top_possible = _highest(cells, {"solved", "undetermined"}) if ladder else None
    h = top.coords[0] if top else -1
    hp = top_possible.coords[0] if top_possible else -1
    above = next((c for c in cells if c.coords[0] == h + 1), None) if ladder else None
    determined = ladder and h == hp and (above is None or above.state == "unsolved")
    below = [c.point for c in cells if ladder and c.coords[0] < h and c.state != "solved"]
    observed = [c.coords[0] for c in cells if c.success_rate is not None and c.success_rate >= SOLVED_AT]
    return Frontier(
        kind=kind,
        size=size.name,
        d_model=size.d_model,
        n_layers=size.n_layers,
        n_heads=size.n_heads,
        n_params=size.n_params,
        points=points,
        possible_points=possible,
        highest_rung=top.coords[0] if top else None,
        highest_rung_point=top.point if top else None,
        highest_possible_rung=top_possible.coords[0] if top_possible else None,
        highest_possible_point=top_possible.point if top_possible else None,
        highest_observed_rung=max(observed) if ladder and observed else None,
        determined=determined,
        not_solved_below=below,
        n_solved=sum(c.state == "solved" for c in cells),
        n_unsolved=sum(c.state == "unsolved" for c in cells),
        n_undetermined=sum(c.state == "undetermined" for c in cells),
        n_no_outcome=sum(c.state == "no_outcome" for c in cells),
        n_unknown=sum(c.state == "unknown" for c in cells),
        device_s=math.fsum(c.device_s for c in cells),
        cpu_s=math.fsum(c.cpu_s for c in cells),
    )


def _findings(cells: dict[tuple[str, str], list[Cell]], kinds: list[str], sizes: list[SizeInfo]) -> list[Finding]:
    """Holes along each lane and, at each point, bigger models unsolved where smaller ones are solved."""
    out: list[Finding] = []
    for kind in kinds:
        for s in sizes:
            row = cells[(kind, s.name)]
            for c in row:
                if c.state != "unsolved":
                    continue
                harder = [
                    d for d in row if d.state == "solved" and d.coords != c.coords and _dominates(d.coords, c.coords)
                ]
                if harder:
                    out.append(
                        Finding(
                            finding="hole",
                            kind=kind,
                            size=s.name,
                            points=[c.point, *(d.point for d in harder)],
                            detail=f"{kind} at {s.name}: {c.point} unsolved ({c.successes}/{c.n_outcomes}) but harder "
                            + ", ".join(f"{d.point} solved ({d.successes}/{d.n_outcomes})" for d in harder),
                        )
                    )
        for small, big in itertools.combinations(sizes, 2):
            if small.n_params == big.n_params:
                continue
            for a, b in zip(cells[(kind, small.name)], cells[(kind, big.name)], strict=True):
                if a.state == "solved" and b.state == "unsolved":
                    out.append(
                        Finding(
                            finding="bigger_solves_less",
                            kind=kind,
                            size=big.name,
                            points=[a.point],
                            detail=f"{kind} at {a.point}: {big.name} ({format_params(big.n_params)} params) unsolved "
                            f"({b.successes}/{b.n_outcomes}) where {small.name} ({format_params(small.n_params)}) "
                            f"is solved ({a.successes}/{a.n_outcomes})",
                        )
                    )
    return out


def _beyond(front: Frontier, other_cells: list[Cell]) -> list[str]:
    """Frontier points of ``front`` that no solved point of the other kind reaches (>=)."""
    solved = [c.coords for c in other_cells if c.state == "solved"]
    return [p.name for p in front.points if not any(_dominates(q, p.coords) for q in solved)]


def _margin(size: str, ref: str, kind: str, cells: dict[str, list[Cell]], fronts: dict[str, Frontier]) -> Margin:
    only_ref, only_kind, compared = [], [], 0
    for a, b in zip(cells[ref], cells[kind], strict=True):
        if a.state in DECIDED and b.state in DECIDED:
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


# --- paired comparison -----------------------------------------------------------------------


def _by_seed(cell: Cell) -> dict[int, bool]:
    """One scored outcome per seed (the first by lr and trial order: re-runs of a seed are rare)."""
    out: dict[int, bool] = {}
    for o in cell.outcomes:
        out.setdefault(o.seed, o.solved)
    return out


def _paired_point(size: str, ref: Cell, kind: Cell) -> PairedPoint:
    a, b = _by_seed(ref), _by_seed(kind)
    shared = sorted(set(a) & set(b))
    both = sum(a[s] and b[s] for s in shared)
    only_kind = sum(b[s] and not a[s] for s in shared)
    only_ref = sum(a[s] and not b[s] for s in shared)
    return PairedPoint(
        size=size,
        point=ref.point,
        reference=ref.kind,
        kind=kind.kind,
        n_pairs=len(shared),
        both=both,
        only_kind=only_kind,
        only_reference=only_ref,
        neither=len(shared) - both - only_kind - only_ref,
        p_value=exact_mcnemar(only_kind, only_ref),
    )


def _seed_score(cells: list[Cell], seed: int, ladder: bool) -> float | None:
    """One seed's reach at one (kind, size): highest rung it solved (-1: none), or points solved (grid)."""
    seen = [(c, _by_seed(c)) for c in cells]
    seen = [(c, o) for c, o in seen if seed in o]
    if not seen:
        return None
    solved = [c for c, o in seen if o[seed]]
    if ladder:
        return float(max((c.coords[0] for c in solved), default=-1))
    return float(len(solved))


def _paired_size(size: str, ref: str, kind: str, cells: dict[str, list[Cell]], ladder: bool) -> PairedSize:
    seeds = sorted({o.seed for k in (ref, kind) for c in cells[k] for o in c.outcomes})
    per_seed: dict[str, float] = {}
    for seed in seeds:
        a, b = _seed_score(cells[ref], seed, ladder), _seed_score(cells[kind], seed, ladder)
        if a is not None and b is not None:
            per_seed[str(seed)] = b - a
    diffs = list(per_seed.values())
    ci = bootstrap_mean_interval(diffs)
    return PairedSize(
        size=size,
        reference=ref,
        kind=kind,
        unit="rungs" if ladder else "points",
        n_seeds=len(diffs),
        per_seed=per_seed,
        mean_margin=statistics.fmean(diffs) if diffs else None,
        ci_low=ci[0] if ci else None,
        ci_high=ci[1] if ci else None,
        sign_p=sign_test(diffs),
    )


def _num(x: float | None, fmt: str = "+.2g") -> str:
    return "n/a" if x is None else format(x, fmt)


def _margin_phrase(p: PairedSize) -> str:
    ci = "no interval below two seeds" if p.ci_low is None else f"95% CI [{p.ci_low:+.2g}, {p.ci_high:+.2g}]"
    return f"{p.size} {_num(p.mean_margin)} {p.unit} ({ci}, {p.n_seeds} seed(s))"


def _verdicts(
    pairs: list[tuple[str, str]], points: list[PairedPoint], sizes: list[PairedSize], spec: StudySpec
) -> list[Verdict]:
    raw = []
    for ref, kind in pairs:
        mine = [p for p in points if (p.reference, p.kind) == (ref, kind)]
        b, c = sum(p.only_kind for p in mine), sum(p.only_reference for p in mine)
        raw.append((ref, kind, b, c, sum(p.n_pairs for p in mine), exact_mcnemar(b, c)))
    adjusted = holm([r[-1] for r in raw])
    out = []
    for (ref, kind, b, c, n, p), p_adj in zip(raw, adjusted, strict=True):
        per_size = [s for s in sizes if (s.reference, s.kind) == (ref, kind)]
        n_seeds = max((s.n_seeds for s in per_size), default=0)
        if p_adj < ALPHA and b != c:
            verdict = "kind_ahead" if b > c else "reference_ahead"
            lead, lag = (kind, ref) if b > c else (ref, kind)
            head = f"{lead} ahead of {lag}"
        else:
            verdict = "no_detectable_difference"
            head = (
                f"no detectable difference between {kind} and {ref} at this budget "
                f"({spec.training.max_steps} steps) and seed count ({n_seeds})"
            )
        numbers = (
            f"{n} paired trials: {kind} alone solved {b}, {ref} alone solved {c}; exact McNemar p={p:.3g}"
            f" (Holm {p_adj:.3g}); margin {kind} − {ref}: " + "; ".join(_margin_phrase(s) for s in per_size)
        )
        out.append(
            Verdict(
                reference=ref,
                kind=kind,
                verdict=verdict,  # type: ignore[arg-type]
                headline=f"{head}. {numbers}",
                n_pairs=n,
                n_seeds=n_seeds,
                only_kind=b,
                only_reference=c,
                p_value=p,
                p_holm=p_adj,
            )
        )
    return out


# --- budget curve ------------------------------------------------------------------------------


def budgets(spec: StudySpec) -> list[int]:
    """Training budgets the records can answer for: every evaluation step up to ``max_steps``."""
    t = spec.training
    return sorted({*range(t.eval_interval, t.max_steps + 1, t.eval_interval), t.max_steps})


def _at_budget(cell: Cell, budget: int) -> CellState:
    if cell.state in ("unknown", "no_outcome"):
        return cell.state
    hits = sum(o.solved and o.steps_to_solve is not None and o.steps_to_solve <= budget for o in cell.outcomes)
    return decide(hits, len(cell.outcomes))


def _budget_curve(spec: StudySpec, cells: dict[tuple[str, str], list[Cell]], kinds: list[str], sizes: list[SizeInfo]):
    out = []
    for b in budgets(spec):
        for kind in kinds:
            for s in sizes:
                states = [(c, _at_budget(c, b)) for c in cells[(kind, s.name)]]
                certain = [c.coords[0] for c, st in states if st == "solved"]
                possible = [c.coords[0] for c, st in states if st in ("solved", "undetermined")]
                ladder = spec.task.ladder is not None
                out.append(
                    BudgetFrontier(
                        budget=b,
                        kind=kind,
                        size=s.name,
                        highest_rung=max(certain) if ladder and certain else None,
                        highest_possible_rung=max(possible) if ladder and possible else None,
                        n_solved=sum(st == "solved" for _, st in states),
                        n_undetermined=sum(st == "undetermined" for _, st in states),
                    )
                )
    return out


# --- building ----------------------------------------------------------------------------------


def _kind_compute(records: list[TrialRecord], spec: StudySpec) -> KindCompute:
    return KindCompute(
        n_trials=len(records),
        cpu_s=math.fsum(r.cpu_s for r in records),
        gpu_s=math.fsum(r.gpu_s for r in records),
        device_s=_device_s(records, spec),
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
    ladder = spec.task.ladder is not None
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

    cells: dict[tuple[str, str], list[Cell]] = {
        (k, s.name): [_cell(spec, k, s.name, p, by_cell.get((k, s.name, p.name), [])) for p in points]
        for k in kinds
        for s in sizes
    }
    in_size = spec.model.monotone_in_size
    if ladder:
        _with_fit(cells, kinds, sizes, in_size)
    pairs = list(itertools.combinations(kinds, 2))
    fronts: list[Frontier] = []
    margins: list[Margin] = []
    paired_points: list[PairedPoint] = []
    paired_sizes: list[PairedSize] = []
    for size in sizes:
        size_cells = {k: cells[(k, size.name)] for k in kinds}
        size_fronts = {k: _frontier(k, size, size_cells[k], ladder) for k in kinds}
        for ref, kind in pairs:
            margins.append(_margin(size.name, ref, kind, size_cells, size_fronts))
            paired_points += [
                _paired_point(size.name, a, b) for a, b in zip(size_cells[ref], size_cells[kind], strict=True)
            ]
            paired_sizes.append(_paired_size(size.name, ref, kind, size_cells, ladder))
        fronts.extend(size_fronts.values())
    kind_order = {k: i for i, k in enumerate(kinds)}
    size_order = {s.name: i for i, s in enumerate(sizes)}
    fronts.sort(key=lambda f: (kind_order[f.kind], size_order[f.size]))

    in_spec = [r for r in records if (r.kind, r.size_name, r.point) in key_of]
    total = _kind_compute(records, spec)
    compute = Compute(
        n_trials=total.n_trials,
        cpu_s=total.cpu_s,
        gpu_s=total.gpu_s,
        device_s=total.device_s,
        wall_s=total.wall_s,
        status_counts=total.status_counts,
        per_kind={k: _kind_compute([r for r in in_spec if r.kind == k], spec) for k in kinds},
        records_outside_spec=outside,
    )
    return Report(
        study=spec.name,
        axes=list(spec.task.axes),
        kinds=kinds,
        reference=kinds[0],
        threshold=spec.threshold,
        solved_at=SOLVED_AT,
        confidence=CONFIDENCE,
        alpha=ALPHA,
        monotone_in_size=in_size,
        max_steps=spec.training.max_steps,
        sizes=sizes,
        points=[PointInfo(name=p.name, coords=list(p.coords), members=list(p.members)) for p in points],
        cells=[c for k in kinds for s in sizes for c in cells[(k, s.name)]],
        frontier=fronts,
        findings=_findings(cells, kinds, sizes),
        margins=margins,
        paired_points=paired_points,
        paired_sizes=paired_sizes,
        verdicts=_verdicts(pairs, paired_points, paired_sizes, spec),
        budget_curve=_budget_curve(spec, cells, kinds, sizes),
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


def frontier_text(report: Report, f: Frontier) -> str:
    """One (kind, size) frontier for people: ``2 N13_T4`` when determined, else ``[certain, possible]``.

    ``none`` is no rung certainly solved; ``?`` marks an interval whose top is not settled;
    ``seen r``: the highest rung most seeds solved (a point estimate); ``!`` marks unsolved or
    unsettled rungs under the certain one.
    """
    if not report.is_ladder:
        if not f.points and not f.possible_points:
            return "none"
        text = f"{f.n_solved} solved"
        if f.n_undetermined:
            text += f" +{f.n_undetermined} undetermined"
        return text
    if f.n_solved + f.n_unsolved + f.n_undetermined == 0:
        return "not run" if not f.n_no_outcome else "no outcome"
    lo = "none" if f.highest_rung is None else str(f.highest_rung)
    hi = "none" if f.highest_possible_rung is None else str(f.highest_possible_rung)
    if f.determined:
        text = "none" if f.highest_rung is None else f"{f.highest_rung} {f.highest_rung_point}"
    elif lo == hi:
        text = f"{lo}?"
    else:
        text = f"[{lo}, {hi}]"
    if not f.determined and f.highest_observed_rung is not None:
        text += f" seen {f.highest_observed_rung}"
    return text + ("!" if f.not_solved_below else "")


def _margin_text(report: Report, m: Margin) -> str:
    p = next(p for p in report.paired_sizes if (p.size, p.reference, p.kind) == (m.size, m.reference, m.kind))
    if p.mean_margin is None:
        return "n/a"
    unit = "rung" if report.is_ladder else "pt"
    ci = "" if p.ci_low is None else f" [{p.ci_low:+.2g},{p.ci_high:+.2g}]"
    return f"{p.mean_margin:+.2g} {unit}{ci} n={p.n_seeds}"


def frontier_table(report: Report) -> str:
    """A plain-text summary: the frontier interval per size and kind, the paired margins, the verdicts."""
    head = ["size", "params", *report.kinds]
    pairs = [(m.reference, m.kind) for m in report.margins if m.size == report.sizes[0].name]
    head += [f"{k}-{r}" for r, k in pairs]
    rows = [head]
    for s in report.sizes:
        row = [s.name, f"{s.n_params:,}"]
        row += [frontier_text(report, report.frontier_of(k, s.name)) for k in report.kinds]
        row += [_margin_text(report, m) for m in report.margins if m.size == s.name]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    what = "highest rung solved, [certain, possible]" if report.is_ladder else "solved points"
    title = (
        f"{report.study}: {what} (solved: success rate > {report.solved_at:g} with {report.confidence:.0%} "
        f"confidence over seeds, Wilson; unsolved: < {report.solved_at:g})"
    )
    out = [title, *lines]
    n_und = sum(c.state == "undetermined" for c in report.cells)
    if n_und:
        out.append(f"undetermined cells: {n_und} of {len(report.cells)} (more seeds would settle them)")
    if report.is_ladder and any(f.not_solved_below for f in report.frontier):
        out.append("! rungs below the certain rung are not all solved (see findings)")
    out += [f"finding: {f.detail}" for f in report.findings]
    out += [f"verdict: {v.headline}" for v in report.verdicts]
    return "\n".join(out) + "\n"
