"""Evaluation shared by every trainer: eval sets, scoring, verdicts, submit-time checks.

Pure functions, tensors in and dicts out, so ``run_trial`` and a packed trainer score each
model the same way. What the sets show and why they are sized so: docs/evaluation.md.

* Two held-out sets per trial, drawn without replacement from the holdout's pool and disjoint:
  set A (``search``) is looked at every evaluation to stop when solved; set B (``confirm``)
  confirms a solve, and the recorded accuracy is B's. A pool smaller than both sets together
  is evaluated whole (``fresh`` only): A = B = every sequence, an exact accuracy.
* Each set holds enough scored tokens per member that the 95% interval is narrow next to
  ``1 - threshold`` (``required_tokens``).
* A mixture whose members a Bayes-optimal predictor cannot tell apart often enough has an
  accuracy ceiling (``identifiability_ceiling``); the spec refuses a threshold above it.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.tasks import ENUMERATE_LIMIT, Batch, TaskMix, all_states, draw_held_out, make_batch, pool_size, unroll

Z95 = 1.959963984540054  # two-sided 95% normal quantile
RESOLUTION = 0.25  # the interval's half-width at the threshold may be at most this share of 1 - threshold
THRESHOLD_ONE_AS = 0.999  # threshold 1.0 has no width to compare with: sized as this threshold
CEILING_ENUMERATE = 1 << 16  # member state spaces up to this size are enumerated for the ceiling
CEILING_SAMPLES = 1 << 12  # else this many sampled sequences per member
CEILING_POSITIONS = 64  # scored positions looked at; later ones count as right (an upper bound, and cheap)
CEILING_ELEMENTS = 1 << 23  # at most this many tokens per member in the computation

# Metric names per role: (prefix of the overall metrics, prefix of the per-member accuracies).
# "eval" (set B) keeps the names the records and the report read; "search" is set A.
ROLES: dict[str, tuple[str, str]] = {"eval": ("eval_", "acc_"), "search": ("search_", "search_acc_")}


def required_tokens(threshold: float) -> int:
    """Scored tokens per member per set so that, at accuracy = threshold, the 95% half-width is at most
    ``RESOLUTION * (1 - threshold)``: n = z^2 p (1 - p) / (r (1 - p))^2 = z^2 p / (r^2 (1 - p))."""
    p = min(threshold, THRESHOLD_ONE_AS)
    return math.ceil(Z95**2 * p / (RESOLUTION**2 * (1 - p)))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion, in closed form; (0, 1) when n is 0.

    The one implementation: the trainers' accuracy intervals and the report's success rates use it.
    Closed form rather than scipy's ``binomtest(...).proportion_ci(method="wilson")`` (the tests compare
    the two): importing ``scipy.stats`` cost every trial worker about a second.

    Raises:
        ValueError: if ``successes`` is outside ``0..n``.
    """
    if not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes=}, {n=}")
    if n <= 0:
        return 0.0, 1.0
    z = Z95 if confidence == 0.95 else NormalDist().inv_cdf(0.5 + confidence / 2)
    z2 = z * z
    center = (successes + z2 / 2) / (n + z2)
    half = z / (n + z2) * math.sqrt(successes * (n - successes) / n + z2 / 4)
    lo = 0.0 if successes == 0 else max(0.0, center - half)  # exact at the edges, where the form is 0 or 1
    hi = 1.0 if successes == n else min(1.0, center + half)
    return lo, hi


def sequences_per_member(mix: TaskMix, context_length: int, threshold: float, minimum: int = 0) -> int:
    """Sequences per member per set: enough scored tokens for ``required_tokens``, at least ``minimum``."""
    per_seq = mix.scored_per_sequence(context_length)
    return max(minimum, math.ceil(required_tokens(threshold) / per_seq))


@dataclass(frozen=True)
class EvalSets:
    """A trial's two held-out sets and how they were drawn."""

    search: Batch  # set A: stop-when-solved looks at it
    confirm: Batch  # set B: confirms a solve; the recorded accuracy
    pool: int  # distinct held-out sequences of the smallest member pool
    exhaustive: bool  # some member's pool was too small for two disjoint sets: evaluated whole (its A = B)

    def info(self) -> dict[str, Any]:
        """Fields for the trial record."""
        return {
            "eval_pool": self.pool,
            "eval_exhaustive": self.exhaustive,
            "eval_sequences": int(self.confirm.inputs.shape[0]),
        }


def build_eval_sets(
    mix: TaskMix, context_length: int, seed: int, threshold: float, holdout: str = "fresh", minimum: int = 0
) -> EvalSets:
    """Sets A and B for one trial; a function of the data seed only, so paired trials share them.

    Raises:
        ValueError: if a pool cannot hold two disjoint sets and cannot be evaluated whole
            (``orbit``: the spec refuses such points, see ``check_point``).
    """
    need = sequences_per_member(mix, context_length, threshold, minimum)
    g = torch.Generator().manual_seed(seed * 3 + 1)  # training uses seed * 3
    a, b, pools, whole = [], [], [], []
    for task in mix.members:
        size = pool_size(task, holdout)
        pools.append(size)
        whole.append(size < 2 * need)
        if whole[-1]:  # too small for two disjoint sets: every sequence once, in both (fresh only)
            problem = pool_problem(mix, context_length, threshold, holdout, minimum)
            if problem:
                raise ValueError(problem)
            every = draw_held_out(task, holdout, size, g)
            a.append(every)
            b.append(every)
        else:
            both = draw_held_out(task, holdout, 2 * need, g)
            a.append(both[:need])
            b.append(both[need:])
    return EvalSets(
        search=make_batch(mix, context_length, a),
        confirm=make_batch(mix, context_length, b),
        pool=min(pools),
        exhaustive=any(whole),
    )


def pool_problem(mix: TaskMix, context_length: int, threshold: float, holdout: str, minimum: int = 0) -> str | None:
    """Why the held-out pool cannot support the threshold's resolution, or None.

    A ``fresh`` pool is the whole distribution: when it is too small for two disjoint sets it is
    evaluated whole and its accuracy is exact, so only ``orbit`` pools can fall short.
    """
    need = sequences_per_member(mix, context_length, threshold, minimum)
    for task in mix.members:
        if holdout == "orbit" and len(mix.members) > 1:
            return f"holdout 'orbit' is for single-member points; {mix.name} is a mixture"
        if holdout == "orbit" and task.n_states > ENUMERATE_LIMIT:
            return (
                f"holdout 'orbit' needs an enumerable state space: {task.name} has {task.n_states} states "
                f"(limit {ENUMERATE_LIMIT})"
            )
        try:
            size = pool_size(task, holdout)
        except ValueError as e:
            return str(e)
        if holdout == "orbit" and size < 2 * need:
            return (
                f"the held-out pool of {task.name} holds {size} distinct sequences, fewer than the 2 x {need} "
                f"(sets A and B) that threshold {threshold} needs ({required_tokens(threshold)} scored tokens "
                f"per set, {mix.scored_per_sequence(context_length)} per sequence)"
            )
    return None


# --- scoring and verdicts -----------------------------------------------------------------------


def score(logits: Tensor, batch: Batch, names: Sequence[str], role: str = "eval") -> dict[str, float]:
    """Loss and accuracy on the scored positions, overall (with its 95% interval) and per member.

    Args:
        logits: (B, L, vocab) of one model for ``batch``'s inputs.
        batch: the set scored; unscored positions count nowhere.
        names: member task names, in member order.
        role: ``eval`` (set B) or ``search`` (set A); decides the metric names (``ROLES``).
    """
    overall, per_member = ROLES[role]
    targets, scored = batch.targets.to(logits.device), batch.scored.to(logits.device)
    member = batch.member.to(logits.device)
    correct = (logits.argmax(-1) == targets) & scored
    n, c = int(scored.sum()), int(correct.sum())
    lo, hi = wilson_interval(c, n)
    out = {
        f"{overall}loss": float(F.cross_entropy(logits[scored].float(), targets[scored])),
        f"{overall}acc": c / n,
        f"{overall}acc_lo": lo,
        f"{overall}acc_hi": hi,
        f"{overall}tokens": float(n),
    }
    for i, name in enumerate(names):
        rows = member == i
        out[f"{per_member}{name}"] = float(correct[rows].sum()) / max(1, int(scored[rows].sum()))
    return out


def is_solved(metrics: dict[str, Any], names: Sequence[str], threshold: float, role: str = "eval") -> bool:
    """Solved when every member reaches the threshold (the whole point for one task)."""
    return all(metrics[f"{ROLES[role][1]}{name}"] >= threshold for name in names)


# --- identifiability of mixtures ----------------------------------------------------------------


@dataclass(frozen=True)
class _Evidence:
    """What a predictor that knows every rule sees, for the sequences of one member."""

    likelihood: Tensor  # (S, scored, members): log P(tokens so far | member j), -inf where inconsistent
    guess: Tensor  # (S, scored, members): member j's continuation
    truth: Tensor  # (S, scored, 1): the real continuation


@functools.lru_cache(maxsize=64)
def _evidence(mix: TaskMix, context_length: int) -> tuple[_Evidence, ...]:
    length, start = context_length + 1, mix.score_start
    g = torch.Generator().manual_seed(0)
    out = []
    for task in mix.members:
        if task.n_states <= CEILING_ENUMERATE and task.n_states * length <= CEILING_ELEMENTS:
            prefixes = all_states(task)
        else:
            count = max(1, min(CEILING_SAMPLES, CEILING_ELEMENTS // length))
            prefixes = torch.randint(task.n, (count, task.prefix_len), generator=g)
        seq = unroll(prefixes, task.n, task.t, length)  # (S, L+1)
        likelihood, guess = [], []
        for other in mix.members:
            fits = seq < other.n  # tokens 0..i could come from ``other``: its vocabulary and its recurrence
            fits[:, other.t + 1 :] &= seq[:, other.t + 1 :] == (seq[:, other.t : -1] + seq[:, : -other.t - 1]) % other.n
            consistent = fits.int().cumprod(1).bool()[:, :context_length]  # (S, L)
            log_p = -other.prefix_len * math.log(other.n)  # log P(start state): n_states may not fit a float
            likelihood.append(torch.where(consistent, log_p, -math.inf).double())
            pred = torch.zeros_like(seq[:, :context_length])
            pred[:, other.t :] = (seq[:, other.t : context_length] + seq[:, : context_length - other.t]) % other.n
            guess.append(pred)
        out.append(
            _Evidence(
                torch.stack(likelihood, 2)[:, start:],
                torch.stack(guess, 2)[:, start:],
                seq[:, start + 1 : context_length + 1, None],
            )
        )
    return tuple(out)


def _bayes_accuracy(mix: TaskMix, context_length: int, prior: Tensor) -> list[float]:
    """Each member's accuracy under the Bayes-optimal predictor for member prior ``prior``.

    Beyond ``CEILING_POSITIONS`` scored positions every prediction counts as right, so for a long
    context this is an upper bound (positions late in a sequence are the easiest to attribute).
    """
    window = min(context_length, mix.score_start + CEILING_POSITIONS)
    seen, total = window - mix.score_start, context_length - mix.score_start
    accs = []
    for ev in _evidence(mix, window):
        log_w = ev.likelihood + prior.log()
        w, pr = (log_w - log_w.max(-1, keepdim=True).values).exp(), ev.guess  # the true member is always consistent
        mass = ((pr[..., :, None] == pr[..., None, :]) * w[..., None, :]).sum(-1)  # weight behind each guess
        top = (mass >= mass.max(-1, keepdim=True).values * (1 - 1e-9)) & (w > 0)
        first = top.clone()  # distinct winning tokens, each counted at the first winning member that guesses it
        for j in range(1, pr.shape[-1]):
            first[..., j] &= ~(top[..., :j] & (pr[..., :j] == pr[..., j : j + 1])).any(-1)
        right = (first & (pr == ev.truth)).any(-1).double() / first.sum(-1).clamp(min=1)  # ties split evenly
        accs.append((float(right.mean()) * seen + (total - seen)) / total)
    return accs


@functools.lru_cache(maxsize=128)
def identifiability_ceiling(mix: TaskMix, context_length: int) -> dict[str, float]:
    """Each member's accuracy under the Bayes-optimal predictor, which knows every rule.

    At each scored position the predictor weighs the members still consistent with the tokens
    so far (prior x probability of the start state) and predicts the continuation with the most
    weight (ties split evenly): what a model that learned the posterior gets. Enumerated exactly
    up to ``CEILING_ENUMERATE`` states per member, else estimated from ``CEILING_SAMPLES`` draws.
    A model can shift errors between members, so a member may beat its number here (see
    ``solvable_bound``). Single-member points have ceiling 1.
    """
    if len(mix.members) == 1:
        return {mix.members[0].name: 1.0}
    accs = _bayes_accuracy(mix, context_length, mix.probs)
    return {t.name: a for t, a in zip(mix.members, accs, strict=True)}


def _prior_grid(members: int) -> list[tuple[float, ...]]:
    """Interior member priors on a grid: tenths for two members, quarters for three, none beyond."""
    steps = {2: 10, 3: 4}.get(members, 0)
    cuts = [c for c in itertools.product(range(1, steps), repeat=members - 1) if sum(c) < steps]
    return [(*(x / steps for x in c), 1 - sum(c) / steps) for c in cuts]


@functools.lru_cache(maxsize=128)
def solvable_bound(mix: TaskMix, context_length: int) -> float:
    """An upper bound on the worst member's accuracy of any predictor: a point whose bound is below the
    threshold can never be solved.

    For any predictor and any member prior p, min_m acc_m <= sum_m p_m acc_m <= the Bayes accuracy under p;
    the bound is the smallest of these over the mixture's own prior and a grid of priors (up to 3 members).
    """
    if len(mix.members) == 1:
        return 1.0
    bounds = []
    for prior in [tuple(mix.probs.tolist()), *_prior_grid(len(mix.members))]:
        p = torch.tensor(prior, dtype=torch.float64)
        accs = _bayes_accuracy(mix, context_length, p)
        bounds.append(float(sum(pi * a for pi, a in zip(prior, accs, strict=True))))
    return min(bounds)


def ceiling_problem(mix: TaskMix, context_length: int, threshold: float) -> str | None:
    """Why no model can solve the mixture at ``threshold``, or None."""
    bound = solvable_bound(mix, context_length)
    if bound < threshold:
        ceiling = identifiability_ceiling(mix, context_length)
        per = ", ".join(f"{k} {v:.4f}" for k, v in ceiling.items())
        return (
            f"task point {mix.name} cannot reach threshold {threshold} at context_length {context_length} and "
            f"identify_margin {mix.identify_margin}: its members are too often indistinguishable, so no model's "
            f"worst member can exceed {bound:.4f} (Bayes-optimal per member: {per}); lower the threshold, raise "
            "identify_margin or change the mixture"
        )
    return None
