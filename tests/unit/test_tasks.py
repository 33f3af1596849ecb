"""The NT task ladder: recurrence, scoring, uniform prefixes, disjoint train/eval streams, mixtures."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.tasks import (
    EVAL_ORBIT_SHARE,
    NTStream,
    NTTask,
    TaskMix,
    draw_held_out,
    encode,
    nt_family,
    orbit_labels,
    orbit_split,
    pool_size,
    step,
)


def _full(batch) -> torch.Tensor:
    """The whole sequence (B, L+1) a batch was cut from."""
    return torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)


def _chi2_upper(df: int, z: float = 4.5) -> float:
    """Upper chi-square quantile (Wilson-Hilferty), z standard deviations out (p ~ 3e-6 at z=4.5)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def _chi2(counts: list[int], expected: float) -> float:
    return sum((c - expected) ** 2 / expected for c in counts)


def _check_recurrence(batch, mix: TaskMix) -> None:
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1]), "targets must be inputs shifted by one"
    for row in range(batch.inputs.shape[0]):
        task = mix.members[int(batch.member[row])]
        x, y, s = batch.inputs[row].tolist(), batch.targets[row].tolist(), batch.scored[row].tolist()
        assert all(0 <= v < task.n for v in x + y)
        for i, scored in enumerate(s):
            if scored:
                assert y[i] == (x[i] + x[i - task.t]) % task.n, (task, row, i)


# --- the recurrence and the scored positions ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 7, 13, 97])
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8])
def test_recurrence_and_scored_mask_single_task(n, t):
    mix = TaskMix.single(n, t)
    ctx = t + 6
    batch = NTStream(mix, ctx, seed=n * 10 + t).batch(16)
    assert batch.inputs.shape == batch.targets.shape == batch.scored.shape == (16, ctx)
    _check_recurrence(batch, mix)
    # Tokens 0..T are the random prefix; target index T predicts token T+1, the first predictable one.
    expected = torch.arange(ctx) >= t
    assert torch.equal(batch.scored, expected.expand(16, ctx))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 97),
    t=st.integers(1, 8),
    extra=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_recurrence_holds_at_every_scored_position(n, t, extra, seed):
    mix = TaskMix.single(n, t)
    batch = NTStream(mix, t + extra, seed).batch(8)
    _check_recurrence(batch, mix)
    assert batch.scored.sum() == 8 * extra


@settings(max_examples=25, deadline=None)
@given(
    members=st.lists(st.tuples(st.integers(2, 31), st.integers(1, 6)), min_size=2, max_size=3, unique=True),
    margin=st.integers(0, 3),
    extra=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_mixture_recurrence_and_scoring_start(members, margin, extra, seed):
    mix = nt_family(members, identify_margin=margin)
    start = max(t for _, t in members) + margin
    assert mix.score_start == start
    ctx = start + extra
    batch = NTStream(mix, ctx, seed).batch(32)
    _check_recurrence(batch, mix)
    assert torch.equal(batch.scored, (torch.arange(ctx) >= start).expand(32, ctx))
    assert batch.inputs.max() < mix.vocab_size == max(n for n, _ in members)


def test_single_task_scoring_ignores_identify_margin():
    batch = NTStream(nt_family([(7, 3)], identify_margin=5), 10, 0).batch(4)
    assert batch.scored[0].tolist() == [False] * 3 + [True] * 7


def test_context_of_exactly_min_context_scores_one_position():
    mix = TaskMix.single(7, 4)
    batch = NTStream(mix, mix.min_context(), 0).batch(4)
    assert batch.scored.sum(1).tolist() == [1, 1, 1, 1]


# --- uniform start states and the two holdouts ---------------------------------------------------------------------


@pytest.mark.parametrize(("n", "t"), [(7, 2), (13, 3), (41, 2)])
def test_fresh_training_draws_start_states_uniformly_from_the_whole_space(n, t):
    stream = NTStream(TaskMix.single(n, t), t + 2, seed=3)
    p = torch.cat([stream.batch(4096).inputs[:, : t + 1] for _ in range(4)])
    for pos in range(t + 1):  # per-position marginals, and the pair (first, last)
        counts = torch.bincount(p[:, pos], minlength=n).tolist()
        assert _chi2(counts, len(p) / n) < _chi2_upper(n - 1), pos
    if n * n * 5 <= len(p):
        counts = torch.bincount(p[:, 0] * n + p[:, t], minlength=n * n).tolist()
        assert _chi2(counts, len(p) / n**2) < _chi2_upper(n * n - 1)


def _windows(seq: torch.Tensor, t: int) -> set[tuple[int, ...]]:
    """Every state (window of T+1 consecutive tokens) in the rows of ``seq``."""
    w = seq.unfold(1, t + 1, 1).reshape(-1, t + 1)
    return set(map(tuple, w.tolist()))


# (N, T) with enumerable state spaces and more than one orbit, small to large orbits.
ORBIT_CASES = [
    (2, 1),
    (3, 1),
    (5, 1),
    (7, 1),
    (10, 1),
    (7, 2),
    (4, 3),
    (6, 2),
    (11, 2),
    (13, 3),
    (2, 5),
    (16, 3),
    (3, 6),
]


@pytest.mark.parametrize(("n", "t"), ORBIT_CASES)
def test_orbit_holdout_no_held_out_state_occurs_anywhere_in_training(n, t):
    task = NTTask(n, t)
    split = orbit_split(task)
    train, held = set(map(tuple, split["train"].tolist())), set(map(tuple, split["eval"].tolist()))
    assert train and held and not train & held and len(train) + len(held) == task.n_states
    assert len(held) <= max(EVAL_ORBIT_SHARE * task.n_states, min(len(held), len(train)))
    # The held-out part is closed under the step map and its inverse: whole orbits.
    nxt = set(map(tuple, step(split["eval"], n).tolist()))
    assert nxt == held
    # Real training batches: no window of any training sequence is a held-out state, at any position.
    ctx = t + 1 + 24
    batch = NTStream(TaskMix.single(n, t), ctx, seed=n + t, holdout="orbit").batch(512)
    seen = _windows(torch.cat([batch.inputs, batch.targets[:, -1:]], 1), t)
    assert seen <= train
    # Eval sets of the same holdout only start at held-out states, and so stay in held-out orbits.
    ev = draw_held_out(task, "orbit", len(held), torch.Generator().manual_seed(0))
    assert set(map(tuple, ev.tolist())) == held


def test_orbit_labels_match_orbits_walked_by_hand():
    task = NTTask(5, 1)  # Fibonacci mod 5: the zero state, a 4-cycle and a 20-cycle (Pisano period 20)
    label = orbit_labels(task)
    sizes = sorted(torch.unique(label, return_counts=True)[1].tolist())
    assert sizes == [1, 4, 20]
    walk, state = [], torch.tensor([[1, 3]])
    for _ in range(4):
        walk.append(int(encode(state, 5)))
        state = step(state, 5)
    assert len(set(label[walk].tolist())) == 1 and int(encode(state, 5)) == walk[0]


def test_orbit_split_refuses_spaces_too_large_to_enumerate():
    with pytest.raises(ValueError, match="enumeration limit"):
        orbit_split(NTTask(97, 8))


@pytest.mark.parametrize(("n", "t", "holdout"), [(5, 1, "fresh"), (7, 2, "fresh"), (13, 3, "orbit"), (97, 6, "fresh")])
def test_held_out_draws_are_distinct_and_from_the_pool(n, t, holdout):
    task = NTTask(n, t)
    size = pool_size(task, holdout)
    count = min(size, 3000)
    p = draw_held_out(task, holdout, count, torch.Generator().manual_seed(1))
    assert p.shape == (count, t + 1)
    assert len(set(map(tuple, p.tolist()))) == count  # without replacement
    assert (p >= 0).all() and (p < n).all()
    if size < 10**6:
        with pytest.raises(ValueError, match="pool"):
            draw_held_out(task, holdout, size + 1, torch.Generator())


# --- determinism ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("members", [[(7, 2)], [(31, 4)], [(5, 1), (13, 2)]])
def test_same_seed_same_batches_other_seed_other_batches(members):
    mix = nt_family(members)
    ctx = mix.min_context() + 4

    def batches(seed: int) -> list[torch.Tensor]:
        s = NTStream(mix, ctx, seed)
        return [torch.cat([s.batch(64).inputs, s.batch(64).targets]) for _ in range(3)]

    a, b, c = batches(1), batches(1), batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not torch.equal(a[0], a[1])  # the stream moves on


# --- mixture proportions --------------------------------------------------------------------------------------------


def test_weighted_mixture_draws_members_in_proportion():
    mix = TaskMix((NTTask(5, 1), NTTask(7, 2)), weights=(3.0, 1.0))
    stream = NTStream(mix, 8, 0)
    member = torch.cat([stream.batch(1000).member for _ in range(8)])
    frac = (member == 0).double().mean().item()
    assert abs(frac - 0.75) < 0.02  # binomial sd ~0.005


def test_unweighted_mixture_is_uniform_over_members():
    mix = nt_family([(5, 1), (7, 2), (11, 1)])
    member = NTStream(mix, 8, 0).batch(6000).member
    freq = torch.bincount(member, minlength=3).double() / 6000
    assert (freq - 1 / 3).abs().max() < 0.025


# --- invalid inputs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: NTTask(1, 2), "N"),
        (lambda: NTTask(0, 2), "N"),
        (lambda: NTTask(5, 0), "T"),
        (lambda: NTTask(5, -1), "T"),
        (lambda: TaskMix(()), "member"),
        (lambda: nt_family([(5, 1), (5, 1)]), "distinct"),
        (lambda: TaskMix((NTTask(5, 1), NTTask(7, 1)), weights=(1.0,)), "weights"),
        (lambda: TaskMix((NTTask(5, 1), NTTask(7, 1)), weights=(1.0, 0.0)), "weights"),
        (lambda: TaskMix((NTTask(5, 1), NTTask(7, 1)), weights=(1.0, -2.0)), "weights"),
        (lambda: nt_family([(5, 1), (7, 2)], identify_margin=-1), "identify_margin"),
        (lambda: NTStream(TaskMix.single(7, 4), 4, 0), "context_length"),
        (lambda: NTStream(nt_family([(7, 4), (5, 1)]), 6, 0), "context_length"),
        (lambda: NTStream(TaskMix.single(7, 2), 8, 0, holdout="test"), "holdout"),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()
