"""The packing-aware simulation of benchmarks/bench_frontier.py: its cost model, and the frontier search
with ``fill_packs`` driven through ``PackSearch`` on the simulated ladders (one of them non-monotone)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.bench_frontier import (
    LADDERS,
    PACK_COSTS_MS,
    compare,
    member_step_factor,
    pack_costs,
    packed_grid_records,
    packed_search_records,
    simulate,
)
from studies.records import TrialRecord
from studies.report import build_report
from workers.search import FrontierSearch


@pytest.mark.parametrize("calibration", sorted(PACK_COSTS_MS))
def test_member_step_cost_follows_the_measured_pack_sizes(calibration: str) -> None:
    curve = PACK_COSTS_MS[calibration]
    for n, ms in curve:
        assert member_step_factor(n, curve) == pytest.approx(ms / curve[0][1])
    assert member_step_factor(128, curve) == member_step_factor(64, curve)


def test_the_loaded_calibration_is_the_default_and_peaks_near_32() -> None:
    assert (
        member_step_factor(8)
        == member_step_factor(8, PACK_COSTS_MS["loaded"])
        != member_step_factor(8, PACK_COSTS_MS["quiet"])
    )
    assert member_step_factor(8) > member_step_factor(16) > member_step_factor(32) < member_step_factor(48)


def test_a_pack_splits_each_step_among_the_members_it_trains() -> None:
    (alone,), (wall,) = pack_costs([2000], 1e-3)
    assert alone == pytest.approx(2.0) and wall == pytest.approx(2.0)
    share, finish = pack_costs([1000, 2000], 1e-3)
    both = 1000 * 1e-3 * member_step_factor(2)
    assert share == pytest.approx([both, both + 1.0]), "after the solved member leaves, the other trains alone"
    assert finish == pytest.approx([2 * both, 2 * both + 1.0])
    share32, _ = pack_costs([2000] * 32, 1e-3)
    assert sum(share32) == pytest.approx(32 * 2.0 * member_step_factor(32)) and sum(share32) < 32 * 2.0 / 3


@pytest.mark.parametrize("ladder", LADDERS, ids=[ladder.name for ladder in LADDERS])
def test_fill_packs_and_mixed_kinds_find_the_grids_frontiers_cheaper_and_never_repeat_a_trial(ladder: Any) -> None:
    spec = ladder.spec
    cost: dict[tuple[bool, bool], float] = {}  # (fill_packs, mix_kinds) -> summed ratio over salts
    for fill, mix in ((False, True), (True, True), (True, False)):
        cost[fill, mix] = 0.0
        for salt in range(8):
            asked: list[tuple[Any, ...]] = []

            def oracle(cell: dict[str, Any], salt: int = salt, asked: list[tuple[Any, ...]] = asked) -> TrialRecord:
                asked.append((cell["kind"], cell["size_idx"], cell["point"], cell["seed"], cell["lr"]))
                return simulate(ladder, cell, salt)

            found = packed_search_records(spec, oracle, 4, FrontierSearch(spec, fill_packs=fill), mix_kinds=mix)
            grid = packed_grid_records(ladder, salt, 4)
            assert len(asked) == len(set(asked)), "no trial twice"
            assert {k[3] for k in asked} <= set(spec.seeds)
            got = compare(build_report(spec, grid), build_report(spec, found))
            assert got["contradictions"] == 0
            assert got["same_in_search"] == got["determined_in_grid"], got
            cost[fill, mix] += sum(r.cpu_s for r in found) / sum(r.cpu_s for r in grid)
    # over 8 salts on every ladder: filling packs, and twins sharing a pack, lower the simulated CPU-s
    assert cost[True, True] < cost[False, True]
    assert cost[True, True] < cost[True, False]
