"""Statistics behind the report's decisions: intervals, three-state calls, monotone fits, paired tests.

Pure functions over counts and arrays (scipy for the exact parts), so the report and the
search make the same call from the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy.optimize import isotonic_regression, minimize
from scipy.stats import binomtest

from workers.evaluation import wilson_interval

CONFIDENCE = 0.95  # two-sided, for every interval and decision
SOLVED_AT = 0.5  # a cell is solved when its success rate is above this with confidence
ALPHA = 0.05  # paired tests: a difference is detected at p < ALPHA (Holm-adjusted across kind pairs)
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: equal records give equal reports

Decision = Literal["solved", "unsolved", "undetermined"]


def decide(successes: int, n: int) -> Decision:
    """Solved if the lower bound of the success rate is above SOLVED_AT, unsolved if the upper bound is below."""
    lo, hi = wilson_interval(successes, n)
    if lo > SOLVED_AT:
        return "solved"
    if hi < SOLVED_AT:
        return "unsolved"
    return "undetermined"


def seeds_to_decide(successes: int, n: int, max_extra: int = 64) -> int | None:
    """Fewest extra outcomes that could settle an undetermined cell (all solved or all unsolved); 0 if decided."""
    if n and decide(successes, n) != "undetermined":
        return 0
    for extra in range(1, max_extra + 1):
        if decide(successes + extra, n + extra) == "solved" or decide(successes, n + extra) == "unsolved":
            return extra
    return None


def monotone_fit(rates: np.ndarray, weights: np.ndarray, in_rows: bool = True, in_cols: bool = False) -> np.ndarray:
    """Weighted least-squares fit of P(solved), non-increasing along rows (rungs) and, optionally,
    non-decreasing down columns (bigger models; row index = size, ascending).

    ``rates`` and ``weights`` are (sizes, rungs) arrays; a cell of weight 0 carries no data and
    takes a value its neighbours allow. One order is a weighted isotonic (PAVA) regression per
    row or column; both at once are a small quadratic program (SLSQP, a few dozen cells).
    """
    y = np.asarray(rates, dtype=float)
    w = np.asarray(weights, dtype=float)
    y = np.where(w > 0, y, 0.5)
    w_pava = np.where(w > 0, w, 1e-9 * max(1.0, float(w.max(initial=0.0))))

    def pava(a: np.ndarray, wa: np.ndarray) -> np.ndarray:
        return np.vstack([isotonic_regression(r, weights=wr, increasing=False).x for r, wr in zip(a, wa, strict=True)])

    if not (in_rows and in_cols):
        if in_rows:
            return pava(y, w_pava)
        if in_cols:  # non-decreasing down a column = non-increasing up it
            return pava(y.T[:, ::-1], w_pava.T[:, ::-1])[:, ::-1].T
        return y
    rows, cols = y.shape
    idx = np.arange(rows * cols).reshape(rows, cols)
    pairs = [(idx[i, j], idx[i, j + 1]) for i in range(rows) for j in range(cols - 1)]  # x[i,j] >= x[i,j+1]
    pairs += [(idx[i + 1, j], idx[i, j]) for i in range(rows - 1) for j in range(cols)]  # x[i+1,j] >= x[i,j]
    if not pairs:
        return y
    a = np.zeros((len(pairs), rows * cols))
    for r, (hi, lo) in enumerate(pairs):
        a[r, hi], a[r, lo] = 1.0, -1.0
    wf, yf = w.ravel(), y.ravel()
    x0 = pava(y, w_pava)  # feasible in rows; SLSQP does the rest
    res = minimize(
        lambda x: float(np.sum(wf * (x - yf) ** 2)),
        x0.ravel(),
        jac=lambda x: 2 * wf * (x - yf),
        constraints=[{"type": "ineq", "fun": lambda x: a @ x, "jac": lambda x: a}],
        bounds=[(0.0, 1.0)] * (rows * cols),
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    return np.clip(np.asarray(res.x).reshape(rows, cols), 0.0, 1.0)


@lru_cache(maxsize=4096)
def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a sign test on the discordant pairs)."""
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def sign_test(differences: Sequence[float]) -> float:
    """Two-sided exact sign test of paired differences (zeros dropped); 1.0 with no non-zero difference."""
    pos = sum(d > 0 for d in differences)
    neg = sum(d < 0 for d in differences)
    return exact_mcnemar(pos, neg)


def bootstrap_mean_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean over resampled units (seeds); None below two units."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = v[rng.integers(0, v.size, size=(BOOTSTRAP_RESAMPLES, v.size))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order as given)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out
