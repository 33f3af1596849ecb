"""Claims verdicts on simulated trials with a known truth, the statistics under them, and the CSV round trip."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from studies.claims import (
    Bench,
    Study,
    Trial,
    budget_moves,
    cell_state,
    choose,
    claim1,
    claim2,
    claim3,
    claim4,
    mean_ci,
    paired,
    read_benchmark,
    read_csv,
    render,
    write_csv,
)

ROOT = Path(__file__).resolve().parents[2]
LADDER = [(0, "N7_T2", False), (1, "N13_T2", False), (2, "N13_T4", False), (3, "N23_T4", False)]
MULTI = [(4, "N7_T1+N7_T2", True), (5, "N13_T1+N13_T2", True)]
BASE = Trial(
    study="sim", kind="dpa", size="d16_l1_h2", n_params=4000, point="N7_T2", rung=0, multi=False, seed=0,
    role="scoring", lr=0.003, setting="default", status="unsolved", eval_acc=0.5, eval_acc_lo=0.49,
    eval_acc_hi=0.51, steps=800,
    steps_to_solve=None, max_steps=800, cpu_s=1.0, gpu_s=0.0,
)  # fmt: skip


def sim(solves: dict[str, set[int]], seeds: range = range(5), points: list = LADDER, step: int = 200) -> list[Trial]:
    """Trials where ``kind`` solves exactly the rungs in ``solves[kind]`` at every seed, at ``step``."""
    out = []
    for kind, rungs in solves.items():
        for rung, point, multi in points:
            for seed in seeds:
                ok = rung in rungs
                out.append(
                    replace(
                        BASE, kind=kind, point=point, rung=rung, multi=multi, seed=seed,
                        status="solved" if ok else "unsolved", eval_acc=1.0 if ok else 0.4,
                        steps=step if ok else 800, steps_to_solve=step if ok else None,
                    )
                )  # fmt: skip
    return out


def test_mean_ci_uses_the_reports_bootstrap() -> None:
    assert mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    m, lo, hi = mean_ci([0.0, 1.0, 3.0, 4.0])
    assert lo is not None and hi is not None and lo < m < hi
    assert mean_ci([1.0]) == (1.0, None, None)
    with pytest.raises(ValueError):
        mean_ci([])


def test_cell_state_needs_enough_seeds() -> None:
    assert cell_state(5, 5) == "solved"  # Wilson lower bound 0.57
    assert cell_state(3, 3) == "undetermined"  # lower bound 0.44: three seeds cannot decide
    assert cell_state(0, 5) == "unsolved"
    assert cell_state(2, 4) == "undetermined"
    assert cell_state(0, 0) == "undetermined"


def test_csv_round_trip(tmp_path: Path) -> None:
    trials = sim({"dpa": {0}, "ea": {0, 1}})
    write_csv(trials, tmp_path / "t.csv")
    assert read_csv(tmp_path / "t.csv") == trials
    (tmp_path / "bad.csv").write_text("kind,size\nea,d16\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_csv(tmp_path / "bad.csv")


def test_lr_is_chosen_on_selection_seeds_and_scored_on_the_others() -> None:
    good = sim({"ea": {0, 1, 2}}, seeds=range(1))
    bad = [replace(t, lr=0.01, status="unsolved", steps_to_solve=None) for t in good]
    selection = [replace(t, role="selection") for t in good + bad]
    # scoring seeds: at lr 0.003 EA solves nothing, at 0.01 everything; selection must not look at them
    scoring = [replace(t, seed=s, status="unsolved", steps_to_solve=None) for t in good for s in (1, 2)]
    scoring += [replace(t, seed=s, lr=0.01) for t in good for s in (1, 2)]
    c = choose(selection + scoring)[("ea", "d16_l1_h2")]
    assert (c.lr, c.selection_solved, c.selection_trials) == (0.003, 3, 4)
    study = Study.of(selection + scoring + sim({"dpa": set()}, seeds=range(1, 3)))
    assert study.seeds == [1, 2]
    assert study.cell("ea", "d16_l1_h2", "N7_T2") == (0, 2)  # the chosen lr's scoring outcomes only


def test_several_settings_without_selection_seeds_are_refused() -> None:
    t = sim({"ea": {0}}, seeds=range(1))
    with pytest.raises(ValueError, match="no selection seeds"):
        choose(t + [replace(x, lr=0.01) for x in t])


def test_claim2_follows_the_paired_truth() -> None:
    # EA ahead in 10 of 20 pairs, never behind: sign test p = 2/1024
    assert claim2(Study.of(sim({"dpa": {0}, "ea": {0, 1, 2}})), "ea").state == "supported"
    assert claim2(Study.of(sim({"dpa": {0, 1, 2}, "ea": {0}})), "ea").state == "contradicted"
    assert claim2(Study.of(sim({"dpa": set(), "ea": set()})), "ea").state == "undetermined"  # nothing solved
    mixed = sim({"dpa": {0}, "ea": {0}})
    mixed = [
        replace(t, status="solved", steps_to_solve=200) if (t.kind, t.rung, t.seed) == ("ea", 1, 0) else t
        for t in mixed
    ]
    mixed = [
        replace(t, status="solved", steps_to_solve=200) if (t.kind, t.rung, t.seed) == ("dpa", 2, 1) else t
        for t in mixed
    ]
    assert claim2(Study.of(mixed), "ea").state == "undetermined"
    # level everywhere: supported only once DPA-only pairs are rare with confidence (Wilson upper <= 0.1)
    level = sim({"dpa": {0, 1}, "ea": {0, 1}}, seeds=range(5))
    assert claim2(Study.of(level), "ea").state == "undetermined"  # 0 of 20 pairs: upper bound 0.16
    level = sim({"dpa": {0, 1}, "ea": {0, 1}}, seeds=range(10))
    assert claim2(Study.of(level), "ea").state == "supported"  # 0 of 40: upper bound 0.088


def test_claim3_growth_on_both_ladders() -> None:
    six = range(6)  # six (size, seed) units all one way: sign test p = 1/32; five would give 1/16
    grows = sim({"dpa": {0, 1, 4}, "ea": {0, 1, 2, 3, 4, 5}}, seeds=six, points=LADDER + MULTI)
    assert claim3(Study.of(grows), "ea").state == "supported"
    assert claim3(Study.of(sim({"dpa": {0, 1, 4}, "ea": {0, 1, 2, 3, 4, 5}}, points=LADDER + MULTI)), "ea").state == (
        "undetermined"
    )
    shrinks = sim({"dpa": {2, 3, 4, 5}, "ea": {0, 1, 2, 3, 4, 5}}, seeds=six, points=LADDER + MULTI)
    assert claim3(Study.of(shrinks), "ea").state == "contradicted"
    single_only = sim({"dpa": {0, 1}, "ea": {0, 1, 2, 3}}, points=LADDER + MULTI[:1])
    v = claim3(Study.of(single_only), "ea")
    assert v.state == "undetermined" and "no trend" in v.evidence


def test_claim4_needs_decided_cells() -> None:
    assert claim4(Study.of(sim({"dpa": {0, 1}, "ea": {0, 1, 2}})), "ea").state == "supported"
    assert claim4(Study.of(sim({"dpa": {0, 1}, "ea": {0, 1, 2}}, seeds=range(3))), "ea").state == "undetermined"
    assert claim4(Study.of(sim({"dpa": {0, 1, 2}, "ea": {0, 1}})), "ea").state == "contradicted"
    # DPA solved every rung run: its limit was never reached, so nothing contradicts the claim
    assert claim4(Study.of(sim({"dpa": {0, 1, 2, 3}, "ea": {0, 1}})), "ea").state == "undetermined"


def test_a_rung_not_run_is_not_an_unsolved_rung() -> None:
    trials = sim({"dpa": {0, 1}, "ea": {0, 1}})
    trials = [t for t in trials if not (t.kind == "ea" and t.seed == 4 and t.rung == 3)]  # one trial missing
    study = Study.of(trials)
    assert study.complete(["ea"], "d16_l1_h2", False) == [0, 1, 2, 3]
    assert study.mean_highest("ea", "d16_l1_h2", False) == 1.0
    assert paired(study, "ea", "d16_l1_h2").rung_margin == (0.0, 0.0, 0.0)


def test_budget_rule_sees_a_moving_dpa_frontier() -> None:
    assert budget_moves(Study.of(sim({"dpa": {0, 1}, "ea": {0}}, step=300))) == {"d16_l1_h2": False}
    assert budget_moves(Study.of(sim({"dpa": {0, 1}, "ea": {0}}, step=500))) == {"d16_l1_h2": True}


def test_claim1_from_the_committed_benchmarks() -> None:
    bench = read_benchmark(ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "data" / "attention-memory.json")
    assert set(bench.time["ea"]) >= {"d32", "d64", "d128", "d256"}
    assert set(bench.memory["ea_norm"]) == {"d32", "d64", "d128", "d256"}
    fast, slow, noisy = (1.01, 0.99, 1.03), (1.2, 1.1, 1.3), (1.04, 1.01, 1.07)
    assert claim1(Bench({"ea": {"d32": fast}}, {"ea": {"d32": 1.0}}), "ea").state == "supported"
    assert claim1(Bench({"ea": {"d32": slow}}, {"ea": {"d32": 1.0}}), "ea").state == "contradicted"
    assert claim1(Bench({"ea": {"d32": noisy}}, {"ea": {"d32": 1.0}}), "ea").state == "undetermined"
    assert claim1(Bench({"ea": {"d32": fast}}, {"ea": {"d32": 1.2}}), "ea").state == "contradicted"  # memory
    assert claim1(Bench({"ea": {"d32": fast}}, {}), "ea").state == "undetermined"  # memory not measured


def test_render_replaces_blocks_and_refuses_unknown_ones() -> None:
    doc = "a\n<!-- claims:x:claims -->\nold\n<!-- /claims:x:claims -->\nb\n"
    assert render(doc, {"x": {"claims": "new\n"}}) == "a\n<!-- claims:x:claims -->\nnew\n<!-- /claims:x:claims -->\nb\n"
    with pytest.raises(ValueError, match="unknown block"):
        render(doc, {"x": {"paired": ""}})
