"""Capacity-frontier analysis: frontier, seeds, confidence, non-outcomes, determinism, files."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from studies.records import TrialRecord
from studies.report import (
    Report,
    build_report,
    frontier_table,
    pareto_maximal,
    report_json,
)
from studies.report_html import write_report
from studies.spec import ModelSize, Point, StudySpec
from studies.stats import wilson_interval
from workers.model import ModelConfig, count_parameters

LADDER = StudySpec.model_validate(
    {
        "name": "t",
        "task": {"ladder": [[[7, 2]], [[13, 2]], [[13, 4]], [[23, 4]]]},
        "model": {
            "sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}, {"d_model": 32, "n_layers": 2, "n_heads": 2}]
        },
        "seeds": list(range(8)),
    }
)
GRID = StudySpec.model_validate(
    {
        "name": "g",
        "task": {"grid": {"N": [5, 7, 11], "T": [1, 2, [1, 2]]}},
        "model": {
            "sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}, {"d_model": 32, "n_layers": 2, "n_heads": 2}]
        },
        "seeds": list(range(8)),
        "training": {"context_length": 20},
    }
)
NO_OUTCOME = ["failed", "diverged", "oom", "preempted", "stopped"]  # stopped: censored, not unsolved
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_ids = iter(range(10**9))


def rec(kind: str, size: ModelSize, point: Point, seed: int, status: str, **kw: Any) -> TrialRecord:
    solved = status == "solved"
    fields: dict[str, Any] = {
        "study_id": "s",
        "trial_id": f"t{next(_ids)}",
        "kind": kind,
        "d_model": size.d_model,
        "n_layers": size.n_layers,
        "n_heads": size.n_heads,
        "point": point.name,
        "coords": list(point.coords),
        "seed": seed,
        "lr": 3e-3,
        "status": status,
        "eval_acc": 1.0 if solved else (0.5 if status in ("unsolved", "stopped") else None),
        "steps": 500,
        "steps_to_solve": 300 if solved else None,
        "cpu_s": 1.25,
    }
    fields.update(kw)
    return TrialRecord.model_validate(fields)


def seed_statuses(solved: bool, spoil: bool, seeds: list[int], outcome: str) -> list[str]:
    """Statuses for a cell whose truth is ``solved``; ``spoil`` flips a minority of seeds."""
    main, other = ("solved", "unsolved") if solved else (outcome, "solved")
    out = [main] * len(seeds)
    if spoil:
        out[0] = other  # one seed of eight: 7/8 and 1/8 are still decided with 95% confidence
    return out


def records_for(
    spec: StudySpec, truth: dict[tuple[str, str, tuple[int, ...]], bool], data: st.DataObject
) -> tuple[list[TrialRecord], list[TrialRecord]]:
    """Outcome records following ``truth`` and, separately, random non-outcome records."""
    clean, noise = [], []
    for kind in spec.attention:
        for size in spec.model.all_sizes():
            for p in spec.task.points():
                key = (kind, size.name, p.coords)
                if key not in truth:
                    continue
                spoil = data.draw(st.booleans())
                outcome = data.draw(st.sampled_from(["unsolved"]))
                for seed, status in zip(spec.seeds, seed_statuses(truth[key], spoil, spec.seeds, outcome), strict=True):
                    clean.append(rec(kind, size, p, seed, status))
    cells = [(k, s, p) for k in spec.attention for s in spec.model.all_sizes() for p in spec.task.points()]
    for _ in range(data.draw(st.integers(0, 12))):
        kind, size, p = data.draw(st.sampled_from(cells))
        status = data.draw(st.sampled_from(NO_OUTCOME))
        noise.append(rec(kind, size, p, data.draw(st.sampled_from(spec.seeds)), status, cpu_s=2.0))
    return clean, noise


def shuffled(records: list[TrialRecord], rng: random.Random) -> list[TrialRecord]:
    out = list(records)
    rng.shuffle(out)
    return out


def decisions(report: Report) -> list[dict[str, Any]]:
    """The frontier without compute (non-outcome trials cost compute, but decide nothing)."""
    return [f.model_dump(exclude={"cpu_s", "device_s"}) for f in report.frontier]


def frontier_coords(report: Report, kind: str, size: str) -> list[tuple[int, ...]]:
    return [tuple(p.coords) for p in report.frontier_of(kind, size).points]


def brute_pareto(solved: set[tuple[int, ...]]) -> list[tuple[int, ...]]:
    def dominated(p: tuple[int, ...]) -> bool:
        return any(q != p and q[0] >= p[0] and q[-1] >= p[-1] for q in solved)

    return sorted(p for p in solved if not dominated(p))


# --- properties ---------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), rng=st.randoms(use_true_random=False))
def test_ladder_frontier_is_the_highest_solved_rung(data: st.DataObject, rng: random.Random) -> None:
    n = len(LADDER.task.points())
    highest = {
        (k, s.name): data.draw(st.integers(-1, n - 1)) for k in LADDER.attention for s in LADDER.model.all_sizes()
    }
    truth = {
        (k, s, p.coords): p.coords[0] <= h for (k, s), h in highest.items() for p in LADDER.task.points()
    }  # monotone: every rung up to h solved
    clean, noise = records_for(LADDER, truth, data)
    report = build_report(LADDER, shuffled(clean + noise, rng))
    names = [p.name for p in LADDER.task.points()]
    for (kind, size), h in highest.items():
        f = report.frontier_of(kind, size)
        assert f.highest_rung == (None if h < 0 else h)
        assert f.highest_rung_point == (None if h < 0 else names[h])
        assert frontier_coords(report, kind, size) == ([] if h < 0 else [(h,)])
        assert f.n_solved == h + 1 and f.n_unsolved == n - h - 1 and f.n_unknown == 0
    for c in report.cells:
        assert c.state == ("solved" if truth[(c.kind, c.size, tuple(c.coords))] else "unsolved")
    # non-outcomes never move the frontier or the states
    plain = build_report(LADDER, clean)
    assert decisions(report) == decisions(plain)
    assert [c.state for c in report.cells] == [c.state for c in plain.cells]
    # record order does not matter, to the byte
    assert report_json(report) == report_json(build_report(LADDER, shuffled(clean + noise, rng)))


def staircase(data: st.DataObject, n_rows: int, n_cols: int) -> list[int]:
    """Solved columns per row, non-increasing: a monotone (down-closed) solved set."""
    return sorted(data.draw(st.lists(st.integers(0, n_cols), min_size=n_rows, max_size=n_rows)), reverse=True)


@SETTINGS
@given(data=st.data(), rng=st.randoms(use_true_random=False))
def test_grid_frontier_is_the_staircase_corners(data: st.DataObject, rng: random.Random) -> None:
    assert GRID.task.grid is not None
    n_rows, n_cols = len(GRID.task.grid.N), len(GRID.task.grid.T)
    stairs = {(k, s.name): staircase(data, n_rows, n_cols) for k in GRID.attention for s in GRID.model.all_sizes()}
    truth = {(k, s, p.coords): p.coords[1] < c[p.coords[0]] for (k, s), c in stairs.items() for p in GRID.task.points()}
    clean, noise = records_for(GRID, truth, data)
    records = shuffled(clean + noise, rng)
    report = build_report(GRID, records)
    for (kind, size), cols in stairs.items():
        corners = [(i, cols[i] - 1) for i in range(n_rows) if cols[i] and (i == n_rows - 1 or cols[i + 1] < cols[i])]
        got = frontier_coords(report, kind, size)
        assert got == sorted(corners)
        solved = {tuple(c.coords) for c in report.cells if (c.kind, c.size, c.state) == (kind, size, "solved")}
        assert len(solved) == sum(cols)
        # Pareto-maximal: on the frontier, not dominated, and every solved point lies under one
        for p in got:
            assert p in solved
            assert not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in solved)
        assert all(any(f[0] >= s[0] and f[1] >= s[1] for f in got) for s in solved)
        assert report.frontier_of(kind, size).highest_rung is None
    assert decisions(report) == decisions(build_report(GRID, clean))
    assert report_json(report) == report_json(build_report(GRID, list(reversed(records))))


@SETTINGS
@given(data=st.data(), grid=st.booleans())
def test_unrun_and_no_outcome_cells_are_never_unsolved(data: st.DataObject, grid: bool) -> None:
    spec = GRID if grid else LADDER
    keys = [(k, s.name, p.coords) for k in spec.attention for s in spec.model.all_sizes() for p in spec.task.points()]
    truth = {key: data.draw(st.booleans()) for key in keys if data.draw(st.integers(0, 3))}  # ~1/4 not run
    clean, noise = records_for(spec, truth, data)
    report = build_report(spec, clean + noise)
    noisy = {(r.kind, r.size_name, tuple(r.coords)) for r in noise}
    for c in report.cells:
        key = (c.kind, c.size, tuple(c.coords))
        if key in truth:
            assert c.state == ("solved" if truth[key] else "unsolved")
        else:
            assert c.state == ("no_outcome" if key in noisy else "unknown")
            assert c.n_outcomes == 0 and c.success_rate is None and c.ci_low is None and c.lr is None
    for f in report.frontier:
        solved = {key[2] for key, v in truth.items() if v and key[:2] == (f.kind, f.size)}
        assert [tuple(p.coords) for p in f.points] == brute_pareto(solved)
        assert [tuple(p.coords) for p in f.points] == pareto_maximal(solved)


# --- seeds, confidence, learning rates ------------------------------------------------------


def test_seeds_are_aggregated_with_a_wilson_interval() -> None:
    size, p = LADDER.model.all_sizes()[0], LADDER.task.points()[1]
    records = [
        rec("dpa", size, p, 0, "solved", steps_to_solve=200),
        rec("dpa", size, p, 1, "solved", steps_to_solve=400),
        rec("dpa", size, p, 2, "unsolved", eval_acc=0.93),
        rec("dpa", size, p, 2, "failed", cpu_s=10.0),
        rec("dpa", size, p, 1, "oom", gpu_s=3.0),
    ]
    c = build_report(LADDER, records).cell("dpa", size.name, p.name)
    assert (c.n_trials, c.n_outcomes, c.successes, c.state) == (5, 3, 2, "undetermined")
    assert c.success_rate == pytest.approx(2 / 3)
    # by hand, z = 1.96: centre (2/3 + z²/6) / (1 + z²/3), half z/(1 + z²/3) * sqrt(2/27 + z²/36)
    assert c.ci_low == pytest.approx(0.2077, abs=1e-4)
    assert c.ci_high == pytest.approx(0.9385, abs=1e-4)
    assert (c.failed, c.oom, c.diverged, c.preempted, c.stopped) == (1, 1, 0, 0, 0)
    assert c.cpu_s == pytest.approx(4 * 1.25 + 10.0) and c.gpu_s == pytest.approx(3.0)
    assert c.median_steps_to_solve == 300 and c.best_acc == 1.0 and c.seeds == [0, 1, 2]


@pytest.mark.parametrize(
    ("statuses", "state"),
    [
        (["solved"], "undetermined"),  # 1/1: Wilson [0.21, 1]
        (["solved", "stopped"], "undetermined"),  # 1/1: a stopped trial is censored, not a failure
        (["solved"] * 3, "undetermined"),  # 3/3: lower bound 0.44
        (["solved"] * 4, "solved"),  # 4/4: lower bound 0.51
        (["solved"] * 7 + ["unsolved"], "solved"),  # 7/8: lower bound 0.53
        (["solved"] * 5 + ["unsolved"], "undetermined"),  # 5/6: lower bound 0.44
        (["stopped", "stopped", "failed"], "no_outcome"),  # stopped is censored: no outcome at all
        (["unsolved", "unsolved", "stopped"], "undetermined"),  # 0/2: upper bound 0.66
        (["unsolved"] * 4 + ["failed"] * 3, "unsolved"),  # 0/4: upper bound 0.49
        (["diverged", "oom", "preempted", "failed"], "no_outcome"),
    ],
)
def test_cell_state_has_three_decisions_on_outcomes_only(statuses: list[str], state: str) -> None:
    size, p = LADDER.model.all_sizes()[0], LADDER.task.points()[0]
    records = [rec("ea", size, p, i, s) for i, s in enumerate(statuses)]
    report = build_report(LADDER, records)
    assert report.cell("ea", size.name, p.name).state == state
    f = report.frontier_of("ea", size.name)
    assert f.highest_rung == (0 if state == "solved" else None)
    assert f.highest_possible_rung == (0 if state in ("solved", "undetermined") else None)


@SETTINGS
@given(n=st.integers(1, 40), data=st.data())
def test_wilson_interval_matches_the_formula_and_scipy(n: int, data: st.DataObject) -> None:
    from scipy.stats import binomtest

    k = data.draw(st.integers(0, n))
    lo, hi = wilson_interval(k, n)
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=1e-12)
    z = 1.959963984540054
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    assert (lo, hi) == pytest.approx((max(0.0, centre - half), min(1.0, centre + half)), abs=1e-9)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 3)[0] == 0.0 and wilson_interval(3, 3)[1] == 1.0
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi) and 0.23 < lo < 0.24
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(1, 0)


def test_selection_seeds_choose_the_lr_and_the_other_seeds_score_it() -> None:
    size, p = LADDER.model.all_sizes()[0], LADDER.task.points()[2]
    spec = LADDER.model_copy(update={"hparams": LADDER.hparams.model_copy(update={"selection_seeds": 2})})
    # lr 1e-2 solves seeds 0, 1 (the selection seeds) and 4; lr 1e-3 solves seeds 2, 3, 4
    low = [rec("dpa", size, p, s, "solved" if s >= 2 else "unsolved", lr=1e-3) for s in range(5)]
    high = [rec("dpa", size, p, s, "solved" if s in (0, 1, 4) else "unsolved", lr=1e-2) for s in range(5)]
    c = build_report(spec, low + high).cell("dpa", size.name, p.name)
    assert c.lr_selection == "held_out_seeds" and c.lr == 1e-2
    # seeds 2-4 score lr 1e-2: 1/3, although lr 1e-3 would have looked perfect on them
    assert [(o.seed, o.lr, o.solved) for o in c.outcomes] == [(2, 1e-2, False), (3, 1e-2, False), (4, 1e-2, True)]
    assert (c.successes, c.n_outcomes, c.n_trials, c.state) == (1, 3, 10, "undetermined")
    assert [r.lr for r in c.lrs] == [1e-3, 1e-2] and [r.successes for r in c.lrs] == [3, 3]
    # one seed: no seed left to score, so the spec's first lr (chosen before any data) is scored
    one = [rec("dpa", size, p, 0, "unsolved", lr=1e-3), rec("dpa", size, p, 0, "solved", lr=3e-3)]
    c = build_report(LADDER.model_copy(update={"seeds": [0]}), one).cell("dpa", size.name, p.name)
    assert c.lr_selection == "prespecified" and [(o.lr, o.solved) for o in c.outcomes] == [(3e-3, True)]
    # an lr with no outcome is never chosen
    a = [rec("dpa", size, p, s, "unsolved", lr=1e-3) for s in range(3)]
    c = build_report(LADDER, [*a, *(rec("dpa", size, p, s, "diverged", lr=1e-1) for s in range(3))]).cell(
        "dpa", size.name, p.name
    )
    assert c.lr == 1e-3 and c.diverged == 3 and c.n_outcomes == 2 and c.seeds == [1, 2]


def test_held_out_lr_selection_removes_the_inflation_of_picking_the_best_lr() -> None:
    """The issue's example: 2 lrs, 3 scoring seeds, true rate 0.3 at both; 'solved' at a rate >= 0.5.

    Picking the best lr on the seeds that score it calls a cell solved with probability
    1 - (1 - 0.216)^2 = 0.385; choosing on a held-out selection seed and scoring the three
    others gives the nominal P(Binomial(3, 0.3) >= 2) = 0.216.
    """
    rng = random.Random(11)
    sizes, pts = LADDER.model.all_sizes(), LADDER.task.points()
    spec = LADDER.model_copy(update={"seeds": [0, 1, 2, 3]})  # seed 0 selects, seeds 1-3 score
    naive = held_out = total = 0
    for _ in range(250):
        records = [
            rec(k, s, p, seed, "solved" if rng.random() < 0.3 else "unsolved", lr=lr)
            for k in spec.attention
            for s in sizes
            for p in pts
            for lr in (1e-3, 1e-2)
            for seed in spec.seeds
        ]
        by_cell: dict[tuple[str, str, str], list[TrialRecord]] = {}
        for r in records:
            by_cell.setdefault((r.kind, r.size_name, r.point), []).append(r)
        for c in build_report(spec, records).cells:
            assert c.lr_selection == "held_out_seeds" and c.seeds == [1, 2, 3]
            total += 1
            held_out += c.successes / c.n_outcomes >= 0.5
            scoring = [r for r in by_cell[(c.kind, c.size, c.point)] if r.seed != 0]
            naive += max(sum(r.status == "solved" for r in scoring if r.lr == lr) for lr in (1e-3, 1e-2)) >= 2
    assert total == 250 * 16
    assert naive / total == pytest.approx(0.385, abs=0.025)
    assert held_out / total == pytest.approx(0.216, abs=0.025)
    nominal = 3 * 0.3**2 * 0.7 + 0.3**3
    assert nominal == pytest.approx(0.216) and 1 - (1 - nominal) ** 2 == pytest.approx(0.385, abs=1e-3)


def test_non_finite_accuracy_is_ignored() -> None:
    size, p = LADDER.model.all_sizes()[0], LADDER.task.points()[0]
    report = build_report(LADDER, [rec("dpa", size, p, 0, "unsolved", eval_acc=math.nan, eval_loss=math.inf)])
    assert report.cell("dpa", size.name, p.name).best_acc is None
    assert "NaN" not in report_json(report) and "Infinity" not in report_json(report)


# --- margins, parameters, output ---------------------------------------------------------------


def ladder_records(
    highest: dict[tuple[str, str], int], skip: frozenset[tuple[str, str, int]] = frozenset()
) -> list[TrialRecord]:
    out = []
    for kind in LADDER.attention:
        for size in LADDER.model.all_sizes():
            for p in LADDER.task.points():
                if (kind, size.name, p.coords[0]) in skip:
                    continue
                status = "solved" if p.coords[0] <= highest[(kind, size.name)] else "unsolved"
                out += [rec(kind, size, p, s, status) for s in LADDER.seeds]
    return out


def test_margin_compares_only_points_where_both_kinds_have_outcomes() -> None:
    small, big = (s.name for s in LADDER.model.all_sizes())
    highest = {("dpa", small): 0, ("ea", small): 2, ("dpa", big): 1, ("ea", big): 3}
    report = build_report(LADDER, ladder_records(highest, skip=frozenset({("dpa", small, 2)})))
    m_small = next(m for m in report.margins if m.size == small)
    assert (m_small.reference, m_small.kind) == ("dpa", "ea")
    assert m_small.compared == 3 and m_small.only_kind == ["N13_T2"] and m_small.only_reference == []
    assert m_small.rung_margin == 2 and m_small.solved_margin == 1
    assert m_small.beyond_kind == ["N13_T4"] and m_small.beyond_reference == []
    m_big = next(m for m in report.margins if m.size == big)
    assert m_big.only_kind == ["N13_T4", "N23_T4"] and m_big.rung_margin == 2
    table = frontier_table(report)
    assert "+2 rung" in table and "N23_T4" in table and "ea-dpa" in table
    assert table.splitlines()[3].split()[:2] == [small, f"{report.sizes[0].n_params:,}"]


def test_n_params_from_records_else_computed() -> None:
    sizes = LADDER.model.all_sizes()
    report = build_report(LADDER, [])
    for info, size in zip(report.sizes, sizes, strict=True):
        cfg = ModelConfig(vocab_size=23, context_length=16, d_model=size.d_model, n_layers=size.n_layers)
        assert (info.n_params, info.n_params_source) == (count_parameters(cfg), "computed")
        assert report.frontier_of("ea", size.name).n_params == info.n_params
    p = LADDER.task.points()[0]
    report = build_report(
        LADDER, [rec("dpa", sizes[1], p, 0, "solved", n_params=10), rec("ea", sizes[1], p, 0, "solved")]
    )
    assert [s.name for s in report.sizes] == [sizes[1].name, sizes[0].name]  # ascending params
    assert (report.sizes[0].n_params, report.sizes[0].n_params_source) == (10, "records")


def test_unknown_everywhere_without_records() -> None:
    report = build_report(GRID, [], provenance={"git_sha": "abc"})
    assert report.report_version == 2 and report.provenance == {"git_sha": "abc"}
    assert len(report.cells) == 2 * 2 * 9 and {c.state for c in report.cells} == {"unknown"}
    assert all(f.points == [] and f.n_unknown == 9 for f in report.frontier)
    assert all(m.compared == 0 for m in report.margins)
    assert "none" in frontier_table(report)
    data = json.loads(report_json(report))
    assert data["spec"] == json.loads(GRID.to_json()) and data["compute"]["n_trials"] == 0


def test_records_outside_the_spec_are_counted_not_analysed() -> None:
    size, p = LADDER.model.all_sizes()[0], LADDER.task.points()[0]
    stray = [
        rec("ea_norm", size, p, 0, "solved"),
        rec("dpa", ModelSize(d_model=8, n_layers=1, n_heads=1), p, 0, "solved"),
        rec("dpa", size, p, 0, "solved").model_copy(update={"point": "N99_T9"}),
    ]
    report = build_report(LADDER, stray)
    assert report.compute.records_outside_spec == 3 and report.compute.n_trials == 3
    assert {c.state for c in report.cells} == {"unknown"}


def test_report_json_rounds_and_sorts() -> None:
    size, p = LADDER.model.all_sizes()[0], LADDER.task.points()[0]
    report = build_report(LADDER, [rec("dpa", size, p, 0, "solved", cpu_s=1 / 3)], provenance={"b": 1, "a": 2})
    text = report_json(report)
    assert '"cpu_s": 0.333333' in text
    data = json.loads(text)
    assert list(data) == sorted(data) and list(data["provenance"]) == ["a", "b"]
    assert Report.model_validate(report.model_dump()).report_version == 2


@pytest.mark.parametrize("spec", [LADDER, GRID], ids=["ladder", "grid"])
def test_write_report_writes_a_self_contained_page(spec: StudySpec, tmp_path: Path) -> None:
    rng = random.Random(0)
    records = [
        rec(k, s, p, seed, rng.choice(["solved", "unsolved", "stopped", "failed"]))
        for k in spec.attention
        for s in spec.model.all_sizes()
        for p in spec.task.points()[:-1]  # the hardest point stays unknown
        for seed in spec.seeds
    ]
    report = write_report(spec, records, tmp_path / "out", provenance={"git_sha": "deadbeef"})
    out = tmp_path / "out"
    names = {"report.json", "report.html", "frontier.txt", "frontier.png", "frontier.svg", "solved_map.png"}
    assert names | {"accuracy.png", "budget.png"} <= {f.name for f in out.iterdir()}
    assert (out / "report.json").read_text() == report_json(report)
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4
    assert "<script" not in page and "http://" not in page and "https://" not in page and "<link" not in page
    assert "deadbeef" in page and "unknown" in page and spec.name in page
    assert (out / "frontier.svg").read_text().lstrip().startswith("<?xml")
    for name in ("frontier.png", "solved_map.png", "accuracy.png", "budget.png"):
        with Image.open(out / name) as im:
            assert im.width > 600 and im.height > 300


# --- interval frontier, findings, paired verdict, budget curve, compute ---------------------------


def lane(kind: str, size: ModelSize, solved_per_rung: list[int], n: int = 8, **kw: Any) -> list[TrialRecord]:
    """``n`` seeds per rung; ``solved_per_rung[r]`` of them solve rung r (the first ones by seed)."""
    return [
        rec(kind, size, p, seed, "solved" if seed < k else "unsolved", **kw)
        for p, k in zip(LADDER.task.points(), solved_per_rung, strict=True)
        for seed in range(n)
    ]


def test_the_frontier_is_an_interval_from_certainly_to_possibly_solved() -> None:
    small, big = LADDER.model.all_sizes()
    records = [
        *lane("dpa", small, [8, 8, 4, 0]),  # rung 2 undetermined (4/8)
        *lane("ea", small, [8, 8, 8, 0]),  # determined: 2
        *lane("dpa", big, [8, 8, 8, 8]),  # determined: the top rung
        *lane("ea", big, [0, 0, 0, 0]),  # determined: none
    ]
    report = build_report(LADDER, records)
    f = report.frontier_of("dpa", small.name)
    assert (f.highest_rung, f.highest_possible_rung, f.determined) == (1, 2, False)
    assert (f.n_solved, f.n_undetermined, f.n_unsolved) == (2, 1, 1)
    assert [p.name for p in f.possible_points] == ["N13_T4"] and [p.name for p in f.points] == ["N13_T2"]
    assert (report.frontier_of("ea", small.name).highest_rung, report.frontier_of("ea", small.name).determined) == (
        2,
        True,
    )
    assert report.frontier_of("dpa", big.name).determined and report.frontier_of("dpa", big.name).highest_rung == 3
    assert report.frontier_of("ea", big.name).determined and report.frontier_of("ea", big.name).highest_rung is None
    table = frontier_table(report)
    row = next(line for line in table.splitlines() if line.startswith(small.name))
    assert "[1, 2] seen 2" in row and "2 N13_T4" in row
    assert "undetermined cells: 1 of 16" in table


def test_holes_and_bigger_models_solving_less_are_findings() -> None:
    small, big = LADDER.model.all_sizes()
    records = [
        *lane("dpa", small, [8, 0, 8, 0]),  # a hole at rung 1 below solved rung 2
        *lane("ea", small, [8, 8, 0, 0]),
        *lane("dpa", big, [8, 8, 8, 0]),
        *lane("ea", big, [8, 0, 0, 0]),  # the bigger model unsolved at rung 1, where the small one solved it
    ]
    report = build_report(LADDER, records)
    kinds = {(f.finding, f.kind, f.size, tuple(f.points)) for f in report.findings}
    assert kinds == {
        ("hole", "dpa", small.name, ("N13_T2", "N13_T4")),
        ("bigger_solves_less", "ea", big.name, ("N13_T2",)),
    }
    f = report.frontier_of("dpa", small.name)
    assert f.highest_rung == 2 and f.not_solved_below == ["N13_T2"]
    table = frontier_table(report)
    assert "2 N13_T4!" in table and "finding: dpa at d16_l1_h2: N13_T2 unsolved (0/8)" in table
    # the monotone fit pools the hole; with monotone_in_size, the bigger model is lifted to the smaller one
    fit = [report.cell("dpa", small.name, p.name).fitted_rate for p in LADDER.task.points()]
    assert fit == pytest.approx([1.0, 0.5, 0.5, 0.0])
    spec = LADDER.model_copy(update={"model": LADDER.model.model_copy(update={"monotone_in_size": True})})
    both = build_report(spec, records)
    assert both.monotone_in_size
    for p in LADDER.task.points():
        assert both.cell("ea", big.name, p.name).fitted_rate >= both.cell("ea", small.name, p.name).fitted_rate - 1e-6


def test_paired_verdict_names_the_kinds_and_needs_the_seeds() -> None:
    small, big = LADDER.model.all_sizes()
    # ea solves one rung more than dpa at both sizes, on every one of 8 seeds
    records = [
        *lane("dpa", small, [8, 0, 0, 0]),
        *lane("ea", small, [8, 8, 0, 0]),
        *lane("dpa", big, [8, 8, 0, 0]),
        *lane("ea", big, [8, 8, 8, 0]),
    ]
    report = build_report(LADDER, records)
    v = report.verdict_of("dpa", "ea")
    assert v.verdict == "kind_ahead" and v.headline.startswith("ea ahead of dpa.")
    assert (v.only_kind, v.only_reference, v.n_pairs, v.n_seeds) == (16, 0, 64, 8)
    assert v.p_value == pytest.approx(2 * 0.5**16)
    for p in report.paired_sizes:
        assert p.per_seed == {str(s): 1.0 for s in range(8)} and p.mean_margin == 1.0 and p.sign_p < 0.01
        assert (p.ci_low, p.ci_high) == (1.0, 1.0)
    point = next(p for p in report.paired_points if (p.size, p.point) == (small.name, "N13_T2"))
    assert (point.only_kind, point.only_reference, point.both, point.neither) == (8, 0, 0, 0)
    assert point.p_value == pytest.approx(2 * 0.5**8)
    # the same one-rung lead from a single seed: no detectable difference, and the table says so
    one = LADDER.model_copy(update={"seeds": [0]})
    single = build_report(one, [r for r in records if r.seed == 0])
    v1 = single.verdict_of("dpa", "ea")
    assert v1.verdict == "no_detectable_difference" and v1.n_seeds == 1
    assert v1.headline.startswith("no detectable difference between ea and dpa at this budget (1000 steps)")
    assert "seed count (1)" in v1.headline and "ea alone solved 2, dpa alone solved 0" in v1.headline
    assert {c.state for c in single.cells} == {"undetermined"}
    assert all(p.ci_low is None for p in single.paired_sizes)
    table = frontier_table(single)
    assert "verdict: no detectable difference between ea and dpa" in table
    assert "[none, 3] seen 0" in table and "[none, 3] seen 1" in table and "+1 rung n=1" in table


def test_budget_curve_is_the_frontier_at_every_evaluation_step() -> None:
    small, big = LADDER.model.all_sizes()
    spec = LADDER.model_copy(update={"training": LADDER.training.model_copy(update={"max_steps": 400})})
    spec = StudySpec.model_validate(spec.model_dump() | {"training": {"max_steps": 400, "eval_interval": 100}})
    records = [
        *lane("dpa", small, [8, 8, 0, 0], steps_to_solve=100),
        *(r for r in lane("dpa", small, [8, 8, 8, 0], steps_to_solve=350) if r.point == "N13_T4"),
    ]
    records = [r for r in records if not (r.point == "N13_T4" and r.steps_to_solve == 100 and r.status == "unsolved")]
    report = build_report(spec, records)
    curve = {b.budget: b for b in report.budget_curve if (b.kind, b.size) == ("dpa", small.name)}
    assert sorted(curve) == [100, 200, 300, 400]
    assert [curve[b].highest_rung for b in (100, 200, 300, 400)] == [1, 1, 1, 2]
    assert report.frontier_of("dpa", small.name).highest_rung == 2
    assert all(b.highest_rung is None for b in report.budget_curve if b.size == big.name)


def test_device_seconds_are_the_share_held() -> None:
    size, p = LADDER.model.all_sizes()[0], LADDER.task.points()[0]
    spec = StudySpec.model_validate(LADDER.model_dump() | {"resources": {"cpu": 1, "gpu": 0.25}})
    records = [
        rec("dpa", size, p, 0, "solved", gpu_s=8.0),  # no share recorded: the spec's 0.25
        rec("dpa", size, p, 1, "solved", gpu_s=8.0, gpu_share=0.5),
    ]
    report = build_report(spec, records)
    c = report.cell("dpa", size.name, p.name)
    assert c.gpu_s == 16.0 and c.device_s == pytest.approx(8 * 0.25 + 8 * 0.5)
    assert report.compute.device_s == pytest.approx(6.0) and report.compute.per_kind["dpa"].device_s == 6.0
    assert report.frontier_of("dpa", size.name).device_s == pytest.approx(6.0)


def test_html_is_autoescaped(tmp_path: Path) -> None:
    size, p = LADDER.model.all_sizes()[0], LADDER.task.points()[0]
    write_report(LADDER, [rec("dpa", size, p, 0, "solved")], tmp_path, provenance={"note": "<b>x</b> & <script>"})
    page = (tmp_path / "report.html").read_text()
    assert "&lt;b&gt;x&lt;/b&gt; &amp; &lt;script&gt;" in page and "<script" not in page and "<b>x" not in page
