"""Evaluation: eval sets (sized, disjoint, without replacement), scoring, intervals, verdicts, ceilings."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from workers.evaluation import (
    RESOLUTION,
    Z95,
    build_eval_sets,
    ceiling_problem,
    identifiability_ceiling,
    is_solved,
    pool_problem,
    required_tokens,
    score,
    solvable_bound,
    wilson_interval,
)
from workers.tasks import GENERATOR_VERSION, Batch, NTStream, nt_family

# The generator pinned: a change to any of these sequences changes every verdict, so it must come with a
# new GENERATOR_VERSION (workers/tasks.py) and README's generator section. Context 10, seed 0.
PINNED = {
    "version": "nt-3",
    "train": {  # the first two training sequences (inputs + last target) and their members
        "N7_T2": ([[1, 2, 6, 0, 2, 1, 1, 3, 4, 5, 1], [3, 4, 5, 1, 5, 3, 4, 2, 5, 2, 4]], [0, 0]),
        "N13_T4": ([[12, 4, 3, 12, 4, 3, 7, 10, 9, 0, 3], [4, 12, 11, 3, 8, 12, 11, 9, 12, 7, 6]], [0, 0]),
        "N5_T1+N7_T2": ([[1, 2, 6, 0, 2, 1, 1, 3, 4, 5, 1], [3, 4, 5, 1, 5, 3, 4, 2, 5, 2, 4]], [1, 1]),
    },
    "confirm": {  # the first sequence of set B at threshold 0.99
        "N7_T2": [5, 3, 0, 5, 1, 1, 6, 0, 1, 0, 0],
        "N13_T4": [10, 2, 11, 11, 6, 3, 5, 3, 1, 7, 10],
        "N5_T1+N7_T2": [4, 0, 4, 4, 3, 2, 0, 2, 2, 4, 1],
    },
    "orbit_search_N13_T3": [6, 4, 4, 1, 7, 11, 2, 3, 10, 8, 10],  # threshold 0.9
}
POINTS = {"N7_T2": [(7, 2)], "N13_T4": [(13, 4)], "N5_T1+N7_T2": [(5, 1), (7, 2)]}


def _rows(inputs: torch.Tensor, targets: torch.Tensor) -> list[list[int]]:
    return torch.cat([inputs, targets[:, -1:]], 1).tolist()


def test_generated_sequences_are_pinned_to_the_generator_version():
    assert PINNED["version"] == GENERATOR_VERSION, "pins changed: update PINNED together with the version"
    for name, members in POINTS.items():
        mix = nt_family(members)
        b = NTStream(mix, 10, seed=0).batch(2)
        assert (_rows(b.inputs, b.targets), b.member.tolist()) == PINNED["train"][name]
        sets = build_eval_sets(mix, 10, 0, 0.99)
        assert _rows(sets.confirm.inputs[:1], sets.confirm.targets[:1])[0] == PINNED["confirm"][name]
    sets = build_eval_sets(nt_family([(13, 3)]), 10, 0, 0.9, "orbit")
    assert _rows(sets.search.inputs[:1], sets.search.targets[:1])[0] == PINNED["orbit_search_N13_T3"]


# --- resolution and intervals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.95, 0.99, 0.995, 0.999])
def test_required_tokens_make_the_interval_narrow_next_to_one_minus_threshold(threshold):
    n = required_tokens(threshold)
    lo, hi = wilson_interval(round(threshold * n), n)
    assert (hi - lo) / 2 <= RESOLUTION * (1 - threshold) * 1.05  # Wilson is within a hair of the normal width
    fewer = n // 2
    lo, hi = wilson_interval(round(threshold * fewer), fewer)
    assert (hi - lo) / 2 > RESOLUTION * (1 - threshold)


def test_threshold_one_is_sized_like_a_large_finite_threshold():
    assert required_tokens(1.0) == required_tokens(0.999) > 60_000


def test_wilson_interval_known_values_and_edges():
    lo, hi = wilson_interval(0, 100)
    assert lo == pytest.approx(0.0, abs=1e-15) and hi == pytest.approx(Z95**2 / (100 + Z95**2), rel=1e-9)
    lo, hi = wilson_interval(100, 100)
    assert hi == pytest.approx(1.0, abs=1e-15) and lo == pytest.approx(100 / (100 + Z95**2), rel=1e-9)
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)


@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.99])
@pytest.mark.parametrize(("k", "n"), [(0, 7), (3, 7), (7, 7), (40, 97)])
def test_wilson_interval_at_other_confidences_matches_scipy(k: int, n: int, confidence: float) -> None:
    from scipy.stats import binomtest  # the reference only: the workers no longer import scipy.stats

    ref = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(k, n, confidence) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_a_trial_worker_does_not_import_scipy_stats() -> None:
    """Every trial's worker process imports the trainers; scipy.stats alone cost it about a second."""
    code = "import sys, workers.packing, workers.trial; print('scipy.stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- eval sets --------------------------------------------------------------------------------------------------


def _keys(batch: Batch) -> list[tuple[int, ...]]:
    return [(m, *row) for m, row in zip(batch.member.tolist(), _rows(batch.inputs, batch.targets), strict=True)]


@pytest.mark.parametrize(
    ("members", "ctx", "threshold"), [([(13, 4)], 16, 0.99), ([(97, 3)], 12, 0.995), ([(11, 2), (13, 3)], 14, 0.95)]
)
def test_sets_a_and_b_are_disjoint_distinct_and_sized_from_the_threshold(members, ctx, threshold):
    mix = nt_family(members)
    sets = build_eval_sets(mix, ctx, seed=4, threshold=threshold)
    a, b = _keys(sets.search), _keys(sets.confirm)
    assert not sets.exhaustive
    assert len(set(a)) == len(a) and len(set(b)) == len(b) and not set(a) & set(b)
    for i in range(len(members)):
        for s in (sets.search, sets.confirm):
            rows = s.member == i
            assert int(s.scored[rows].sum()) >= required_tokens(threshold)
    # a function of the data seed only: every kind of a pair is judged on the same sequences
    again = build_eval_sets(mix, ctx, seed=4, threshold=threshold)
    assert _keys(again.confirm) == b
    assert _keys(build_eval_sets(mix, ctx, seed=5, threshold=threshold).confirm) != b


def test_a_small_fresh_pool_is_evaluated_whole_and_exactly():
    mix = nt_family([(5, 1)])
    sets = build_eval_sets(mix, 16, seed=0, threshold=0.99)
    assert sets.exhaustive and sets.pool == 25
    assert sorted(_keys(sets.search)) == sorted(_keys(sets.confirm))
    assert len(set(_keys(sets.search))) == 25  # every start state once


def test_orbit_pool_too_small_for_the_threshold_is_named_with_numbers():
    problem = pool_problem(nt_family([(13, 2)]), 16, 0.99, "orbit")
    assert problem and "N13_T2" in problem and "181" in problem and str(required_tokens(0.99)) in problem
    assert pool_problem(nt_family([(13, 3)]), 16, 0.9, "orbit") is None
    assert "mixture" in (pool_problem(nt_family([(5, 1), (7, 1)]), 16, 0.9, "orbit") or "")
    assert pool_problem(nt_family([(5, 1)]), 16, 0.99, "fresh") is None  # evaluated whole


# --- scoring ----------------------------------------------------------------------------------------------------


def _perfect_logits(batch: Batch, vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(batch.targets, vocab).float() * 10


def test_score_ignores_unscored_positions_and_counts_every_scored_one():
    mix = nt_family([(5, 1), (7, 2)])
    batch = build_eval_sets(mix, 12, 0, 0.9).search
    names = [m.name for m in mix.members]
    logits = _perfect_logits(batch, 7)
    wrong = logits.clone()
    wrong[~batch.scored] = torch.roll(wrong[~batch.scored], 1, dims=-1)  # every unscored guess wrong
    assert score(wrong, batch, names) == score(logits, batch, names)
    assert score(logits, batch, names)["eval_acc"] == 1.0
    m = score(logits, batch, names)
    assert m["eval_tokens"] == batch.scored.sum()
    one = logits.clone()
    r, c = torch.nonzero(batch.scored & (batch.member[:, None] == 1))[0].tolist()
    one[r, c] = torch.roll(one[r, c], 1)  # one scored guess of member 1 wrong
    s = score(one, batch, names)
    n1 = int(batch.scored[batch.member == 1].sum())
    assert s["acc_N7_T2"] == pytest.approx(1 - 1 / n1) and s["acc_N5_T1"] == 1.0
    assert s["eval_acc"] == pytest.approx(1 - 1 / m["eval_tokens"])
    assert s["eval_acc_lo"] < s["eval_acc"] < s["eval_acc_hi"] <= 1.0


def test_score_roles_name_set_a_and_set_b_metrics_apart():
    mix = nt_family([(7, 2)])
    batch = build_eval_sets(mix, 10, 0, 0.9).search
    a = score(_perfect_logits(batch, 7), batch, ["N7_T2"], role="search")
    b = score(_perfect_logits(batch, 7), batch, ["N7_T2"], role="eval")
    assert {"search_acc", "search_acc_lo", "search_acc_hi", "search_loss", "search_acc_N7_T2"} <= set(a)
    assert {"eval_acc", "eval_acc_lo", "eval_acc_hi", "eval_loss", "acc_N7_T2"} <= set(b)
    assert not set(a) & set(b)


def test_is_solved_needs_every_member():
    names = ["N5_T1", "N7_T2"]
    assert is_solved({"acc_N5_T1": 1.0, "acc_N7_T2": 0.99}, names, 0.99)
    assert not is_solved({"acc_N5_T1": 1.0, "acc_N7_T2": 0.989}, names, 0.99)
    assert not is_solved({"acc_N5_T1": 0.5, "acc_N7_T2": 1.0, "eval_acc": 0.999}, names, 0.99)
    assert is_solved({"search_acc_N5_T1": 1.0, "search_acc_N7_T2": 1.0}, names, 0.99, role="search")


# --- identifiability --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "worst", "value"),
    [([(5, 1), (7, 1)], "N7_T1", 0.9874), ([(6, 2), (7, 2)], "N7_T2", 0.9866), ([(4, 1), (5, 1)], "N5_T1", 0.9846)],
)
def test_identifiability_ceiling_matches_the_reference_numbers(members, worst, value):
    mix = nt_family(members, identify_margin=2)
    ceiling = identifiability_ceiling(mix, 16)
    assert min(ceiling, key=lambda k: ceiling[k]) == worst
    assert ceiling[worst] == pytest.approx(value, abs=5e-5)
    # No predictor's worst member beats the bound; the Bayes predictor's worst member does not exceed it.
    bound = solvable_bound(mix, 16)
    assert ceiling[worst] <= bound <= sum(ceiling.values()) / len(ceiling) + 1e-12


def test_a_mixture_of_identical_rules_cannot_be_solved_and_is_refused_with_the_number():
    mix = nt_family([(5, 1), (5, 2)], identify_margin=0)  # at margin 0 the first scored token is a coin flip
    bound = solvable_bound(mix, 4)
    assert bound < 0.95
    problem = ceiling_problem(mix, 4, 0.95)
    assert problem and f"{bound:.4f}" in problem and "N5_T1+N5_T2" in problem
    assert ceiling_problem(nt_family([(7, 1), (7, 2)]), 16, 0.99) is None
    assert math.isclose(identifiability_ceiling(nt_family([(7, 3)]), 16)["N7_T3"], 1.0)


def test_the_bound_of_a_long_context_is_cheap_and_still_an_upper_bound():
    import time

    mix = nt_family([(5, 1), (7, 1)])
    t0 = time.process_time()
    long = solvable_bound(mix, 4096)
    assert time.process_time() - t0 < 20
    # beyond the first positions every guess counts as right: the long context's bound is at least the short one's
    assert solvable_bound(mix, 16) <= long <= 1.0
    big = nt_family([(97, 300), (89, 2)])
    assert 0.9 < solvable_bound(big, 4096) <= 1.0


def test_readme_names_the_generator_version_the_code_records():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"Generator version `{GENERATOR_VERSION}`" in readme
