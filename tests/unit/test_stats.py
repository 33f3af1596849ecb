"""The report's statistics on simulated trials with a known truth: three-state calls, monotone fit, paired tests."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from studies.stats import (
    bootstrap_mean_interval,
    decide,
    exact_mcnemar,
    holm,
    monotone_fit,
    seeds_to_decide,
    sign_test,
    wilson_interval,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- three-state decisions --------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(1, 60), data=st.data())
def test_a_decision_never_contradicts_its_own_interval_and_more_successes_never_hurt(
    n: int, data: st.DataObject
) -> None:
    k = data.draw(st.integers(0, n))
    d = decide(k, n)
    lo, hi = wilson_interval(k, n)
    assert (d == "solved") == (lo > 0.5) and (d == "unsolved") == (hi < 0.5)
    if d == "solved":
        assert k / n > 0.5
    if d == "unsolved":
        assert k / n < 0.5
    order = {"unsolved": 0, "undetermined": 1, "solved": 2}
    if k < n:
        assert order[decide(k + 1, n)] >= order[d]
    assert order[decide(k, n + 1)] <= order[d] or k == n  # one more failure never makes a cell more solved


@pytest.mark.parametrize("truth", [0.0, 0.1, 0.35, 0.65, 0.9, 1.0])
def test_decisions_on_simulated_cells_are_wrong_rarely_and_settle_with_seeds(truth: float) -> None:
    """Cells with a known success probability: a confident call against the truth is rare (<= ~2.5%)."""
    rng = random.Random(int(truth * 100))
    for n in (1, 3, 8, 20):
        calls = [decide(sum(rng.random() < truth for _ in range(n)), n) for _ in range(2000)]
        wrong = calls.count("unsolved" if truth > 0.5 else "solved") / len(calls)
        assert wrong <= 0.03, (truth, n, wrong)
        if n <= 3:
            assert set(calls) == {"undetermined"}, "three seeds or fewer never decide anything"
    if truth in (0.0, 1.0):  # deterministic cells are decided from four seeds
        assert decide(4 * int(truth), 4) == ("solved" if truth else "unsolved")


@SETTINGS
@given(n=st.integers(0, 30), data=st.data())
def test_seeds_to_decide_is_the_fewest_extra_seeds_that_can_settle_a_cell(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, n))
    extra = seeds_to_decide(k, n)
    assert extra is not None
    if n and decide(k, n) != "undetermined":
        assert extra == 0
        return
    assert decide(k + extra, n + extra) == "solved" or decide(k, n + extra) == "unsolved"
    if extra > 1:
        e = extra - 1
        assert decide(k + e, n + e) != "solved" and decide(k, n + e) != "unsolved"


# --- monotone fit -------------------------------------------------------------------------------


def sse(fit: np.ndarray, rates: np.ndarray, weights: np.ndarray) -> float:
    return float((weights * (fit - rates) ** 2).sum())


def monotone_candidates(shape: tuple[int, int], rng: random.Random, in_cols: bool) -> list[np.ndarray]:
    """Random matrices non-increasing along rows (and non-decreasing down columns)."""
    out = []
    for _ in range(40):
        m = np.array([[rng.random() for _ in range(shape[1])] for _ in range(shape[0])])
        m = -np.sort(-m, axis=1)
        if in_cols:
            m = np.maximum.accumulate(m, axis=0)
        out.append(m)
    return out


@SETTINGS
@given(data=st.data(), in_cols=st.booleans())
def test_monotone_fit_is_monotone_and_the_closest_monotone_fit(data: st.DataObject, in_cols: bool) -> None:
    rows, cols = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6))
    n = data.draw(st.lists(st.integers(0, 8), min_size=rows * cols, max_size=rows * cols))
    weights = np.array(n, dtype=float).reshape(rows, cols)
    k = [data.draw(st.integers(0, x)) for x in n]
    rates = np.array([a / b if b else 0.5 for a, b in zip(k, n, strict=True)]).reshape(rows, cols)
    fit = monotone_fit(rates, weights, in_rows=True, in_cols=in_cols)
    assert fit.shape == rates.shape
    assert (np.diff(fit, axis=1) <= 1e-6).all(), "P(solved) never rises with the rung"
    if in_cols:
        assert (np.diff(fit, axis=0) >= -1e-6).all(), "P(solved) never falls with model size"
    assert ((fit >= -1e-9) & (fit <= 1 + 1e-9)).all()
    rng = random.Random(rows * 100 + cols)
    best = sse(fit, rates, weights)
    slack = 1e-6 if weights.all() else 1e-2  # cells without data carry a token weight in the fit
    for cand in monotone_candidates(rates.shape, rng, in_cols):
        assert best <= sse(cand, rates, weights) + slack
    if (np.diff(rates, axis=1) <= 0).all() and (not in_cols or (np.diff(rates, axis=0) >= 0).all()) and weights.all():
        assert fit == pytest.approx(rates, abs=1e-6), "already monotone data is left alone"


def test_monotone_fit_pools_a_hole_and_a_bigger_model_solving_less() -> None:
    rates = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    weights = np.full_like(rates, 4.0)
    fit = monotone_fit(rates, weights)
    assert fit[0] == pytest.approx([1.0, 0.5, 0.5, 0.0]) and fit[1] == pytest.approx([0, 0, 0, 0])
    both = monotone_fit(rates, weights, in_cols=True)
    assert both[0] == pytest.approx(both[1], abs=1e-6), "the bigger row may not do worse: both rows pool"
    assert both[0] == pytest.approx([0.5, 0.25, 0.25, 0.0], abs=1e-6)


@pytest.mark.parametrize("in_cols", [False, True])
def test_monotone_fit_of_simulated_trials_is_never_further_from_a_known_truth_than_the_raw_rates(in_cols: bool) -> None:
    """A known P(solved) falling with the rung and rising with size; 4 seeds per cell, 300 studies:
    the fit is never further from the truth than the raw success rates (a projection onto a convex
    set that holds the truth)."""
    truth = np.array([[0.95, 0.9, 0.6, 0.3, 0.1, 0.05], [0.97, 0.95, 0.9, 0.6, 0.3, 0.1]])
    rng = np.random.default_rng(11)
    weights = np.full_like(truth, 4.0)
    better = 0
    for _ in range(300):
        rates = rng.binomial(4, truth) / 4
        fit = monotone_fit(rates, weights, in_rows=True, in_cols=in_cols)
        better += sse(fit, truth, weights) <= sse(rates, truth, weights) + 1e-9
    assert better == 300, "a monotone truth: projecting onto the monotone fits never moves away from it"


# --- paired tests --------------------------------------------------------------------------------


@SETTINGS
@given(b=st.integers(0, 30), c=st.integers(0, 30))
def test_exact_mcnemar_is_a_two_sided_binomial_test_on_discordant_pairs(b: int, c: int) -> None:
    from math import comb

    n = b + c
    p = exact_mcnemar(b, c)
    if n == 0:
        assert p == 1.0
        return
    tail = sum(comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    assert p == pytest.approx(min(1.0, 2 * tail) if b != c else 1.0)
    assert p == exact_mcnemar(c, b)
    assert sign_test([1] * b + [-1] * c + [0] * 5) == pytest.approx(p)


@pytest.mark.parametrize(("advantage", "n_seeds"), [(0.0, 12), (0.6, 12), (0.6, 1)])
def test_paired_test_on_simulated_kinds_detects_a_real_advantage_and_only_then(advantage: float, n_seeds: int) -> None:
    """Kinds share seeds; kind B solves each of 5 rungs with P = A's + advantage (capped). 400 studies."""
    rng = random.Random(int(advantage * 10) + n_seeds)
    detected = 0
    for _ in range(400):
        b = c = 0
        for _rung, _seed in itertools.product(range(5), range(n_seeds)):
            base = rng.random() * 0.4
            a_solved = rng.random() < base
            b_solved = rng.random() < min(1.0, base + advantage)
            b += b_solved and not a_solved
            c += a_solved and not b_solved
        detected += exact_mcnemar(b, c) < 0.05 and b > c
    if advantage == 0.0:
        assert detected / 400 <= 0.05, "false detections stay at the test's level"
    elif n_seeds == 1:
        assert detected / 400 < 0.5, "one seed rarely suffices"
    else:
        assert detected / 400 > 0.95


def test_bootstrap_interval_covers_the_mean_and_needs_two_seeds() -> None:
    assert bootstrap_mean_interval([1.0]) is None and bootstrap_mean_interval([]) is None
    lo, hi = bootstrap_mean_interval([0, 1, 2, 1, 0, 2, 1, 1]) or (0, 0)
    assert lo < 1.0 < hi and lo >= 0 and hi <= 2
    assert bootstrap_mean_interval([0, 1, 2]) == bootstrap_mean_interval([0, 1, 2]), "deterministic"


def test_holm_adjusts_in_order_and_caps_at_one() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
