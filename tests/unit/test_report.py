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
    MIN_SUCCESS_RATE,
    Report,
    build_report,
    frontier_table,
    pareto_maximal,
    report_json,
    wilson_interval,
)
from studies.report_html import write_report
from studies.spec import ModelSize, Point, StudySpec
from workers.model import ModelConfig, count_parameters

LADDER = StudySpec.model_validate(
    {
        "name": "t",
        "task": {"ladder": [[[7, 2]], [[13, 2]], [[13, 4]], [[23, 4]]]},
        "model": {
            "sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}, {"d_model": 32, "n_layers": 2, "n_heads": 2}]
        },
        "seeds": [0, 1, 2],
    }
)
GRID = StudySpec.model_validate(
    {
        "name": "g",
        "task": {"grid": {"N": [5, 7, 11], "T": [1, 2, [1, 2]]}},
        "model": {
            "sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}, {"d_model": 32, "n_layers": 2, "n_heads": 2}]
        },
        "seeds": [0, 1, 2],
        "training": {"context_length": 20},
    }
)
NO_OUTCOME = ["failed", "diverged", "oom", "preempted"]
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
        out[0] = other  # one seed of three: the majority still decides the cell
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
                outcome = data.draw(st.sampled_from(["unsolved", "stopped"]))
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
    assert report.frontier == plain.frontier
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
    assert report.frontier == build_report(GRID, clean).frontier
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
    assert (c.n_trials, c.n_outcomes, c.successes, c.state) == (5, 3, 2, "solved")
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
        (["solved", "unsolved", "stopped"], "unsolved"),
        (["solved", "stopped"], "solved"),  # exactly MIN_SUCCESS_RATE
        (["stopped", "stopped", "failed"], "unsolved"),
        (["diverged", "oom", "preempted", "failed"], "no_outcome"),
    ],
)
def test_cell_state_counts_only_outcomes(statuses: list[str], state: str) -> None:
    size, p = LADDER.model.all_sizes()[0], LADDER.task.points()[0]
    records = [rec("ea", size, p, i, s) for i, s in enumerate(statuses)]
    report = build_report(LADDER, records)
    assert report.cell("ea", size.name, p.name).state == state
    assert MIN_SUCCESS_RATE == 0.5
    assert report.frontier_of("ea", size.name).highest_rung == (0 if state == "solved" else None)


def test_wilson_interval_edges() -> None:
    assert wilson_interval(0, 3)[0] == 0.0 and wilson_interval(3, 3)[1] == 1.0
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(1 - hi) and 0.23 < lo < 0.24
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(1, 0)


def test_the_best_learning_rate_is_chosen_per_cell() -> None:
    size, p = LADDER.model.all_sizes()[0], LADDER.task.points()[2]
    low = [rec("dpa", size, p, s, st_, lr=1e-3) for s, st_ in enumerate(["solved", "unsolved", "unsolved"])]
    high = [rec("dpa", size, p, s, "solved", lr=1e-2) for s in range(3)]
    c = build_report(LADDER, low + high).cell("dpa", size.name, p.name)
    assert (c.lr, c.successes, c.n_outcomes, c.n_trials, c.state) == (1e-2, 3, 3, 6, "solved")
    assert [r.lr for r in c.lrs] == [1e-3, 1e-2]
    # equal success rates: the better accuracy wins, then the smaller lr
    a = [rec("dpa", size, p, 0, "unsolved", lr=1e-3, eval_acc=0.7)]
    b = [rec("dpa", size, p, 0, "unsolved", lr=1e-2, eval_acc=0.9)]
    assert build_report(LADDER, a + b).cell("dpa", size.name, p.name).lr == 1e-2
    b = [rec("dpa", size, p, 0, "unsolved", lr=1e-2, eval_acc=0.7)]
    assert build_report(LADDER, a + b).cell("dpa", size.name, p.name).lr == 1e-3
    # an lr with no outcome is never chosen
    c = build_report(LADDER, [*a, rec("dpa", size, p, 0, "diverged", lr=1e-1)]).cell("dpa", size.name, p.name)
    assert c.lr == 1e-3 and c.diverged == 1


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
    assert report.report_version == 1 and report.provenance == {"git_sha": "abc"}
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
    assert Report.model_validate(report.model_dump()).report_version == 1


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
    assert names | {"accuracy.png"} <= {f.name for f in out.iterdir()}
    assert (out / "report.json").read_text() == report_json(report)
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "<script" not in page and "http://" not in page and "https://" not in page and "<link" not in page
    assert "deadbeef" in page and "unknown" in page and spec.name in page
    assert (out / "frontier.svg").read_text().lstrip().startswith("<?xml")
    for name in ("frontier.png", "solved_map.png", "accuracy.png"):
        with Image.open(out / name) as im:
            assert im.width > 600 and im.height > 300
