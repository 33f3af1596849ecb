"""The NT task ladder: recurrence, scoring, uniform prefixes, disjoint train/eval streams, mixtures."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.tasks import NTStream, NTTask, TaskMix, is_eval_prefix, nt_family


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
    split=st.sampled_from(["train", "eval"]),
)
def test_recurrence_holds_at_every_scored_position(n, t, extra, seed, split):
    mix = TaskMix.single(n, t)
    batch = NTStream(mix, t + extra, seed, split).batch(8)
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


# --- uniform prefixes -----------------------------------------------------------------------------------------------


def _prefixes(n: int, t: int, split: str, count: int, seed: int = 0, chunk: int = 4096) -> torch.Tensor:
    stream = NTStream(TaskMix.single(n, t), t + 2, seed, split)
    out = [stream.batch(min(chunk, count - i)).inputs[:, : t + 1] for i in range(0, count, chunk)]
    return torch.cat(out)


def _part(n: int, t: int, split: str) -> torch.Tensor:
    """Every prefix of the ``split`` part of a single task's prefix space (member 0)."""
    space = torch.cartesian_prod(*[torch.arange(n)] * (t + 1))
    return space[is_eval_prefix(space) == (split == "eval")]


@pytest.mark.parametrize(
    ("n", "t", "split", "count"),
    [
        (13, 3, "train", 16384),  # 28,561 prefixes: below the enumeration limit
        (17, 3, "train", 16384),  # 83,521 prefixes: rejection sampling
        (17, 3, "eval", 8192),
        (41, 2, "train", 16384),  # 68,921 prefixes: rejection sampling, larger N
    ],
)
def test_prefixes_are_uniform_within_their_part(n, t, split, count):
    part = _part(n, t, split)
    assert 0.1 < len(part) / n ** (t + 1) < 0.9 if split == "eval" else len(part) / n ** (t + 1) > 0.8
    p = _prefixes(n, t, split, count)
    assert is_eval_prefix(p).eq(split == "eval").all()
    # Chi-square of per-position marginals, and of pairs of positions (which would catch correlated draws),
    # against the exact distribution of a uniform draw from the part.
    cols = [(pos,) for pos in range(t + 1)] + [(0, t)] * (split == "train" and n * n * 5 <= count)
    for c in cols:
        bins = n ** len(c)
        weights = torch.tensor([n**i for i in range(len(c))])
        want = torch.bincount(part[:, c] @ weights, minlength=bins).double() / len(part) * count
        got = torch.bincount(p[:, c] @ weights, minlength=bins).double()
        assert want.min() > 5
        assert ((got - want) ** 2 / want).sum() < _chi2_upper(bins - 1), c
    # The train part is most of the space: its marginals are uniform to within a few percent.
    if split == "train":
        for pos in range(t + 1):
            freq = torch.bincount(part[:, pos], minlength=n).double() / len(part)
            assert (freq * n - 1).abs().max() < 0.05


def test_small_space_split_is_a_partition_and_each_part_is_sampled_uniformly():
    n, t = 7, 2
    space = set(itertools.product(range(n), repeat=t + 1))
    counts = {}
    for split, count in [("train", 343 * 60), ("eval", 343 * 10)]:
        counts[split] = Counter(map(tuple, _prefixes(n, t, split, count).tolist()))
    train, ev = set(counts["train"]), set(counts["eval"])
    assert not train & ev
    assert train | ev == space  # with ~60 draws per prefix, every prefix of a part shows up
    assert 0 < len(ev) < len(train)
    for split, c in counts.items():
        total = sum(c.values())
        assert _chi2(list(c.values()), total / len(c)) < _chi2_upper(len(c) - 1), split
    # Marginals of the train part stay near uniform (the held-out part is spread evenly).
    p = torch.tensor(list(counts["train"].elements()))
    for pos in range(t + 1):
        freq = torch.bincount(p[:, pos], minlength=n).double() / len(p)
        assert (freq - 1 / n).abs().max() < 0.03, (pos, freq)


# --- train and eval never share a sequence --------------------------------------------------------------------------


def _seen(mix: TaskMix, split: str, batches: int, ctx: int, seed: int = 0, size: int = 1024) -> set[tuple[int, ...]]:
    stream, out = NTStream(mix, ctx, seed, split), set()
    for _ in range(batches):
        b = stream.batch(size)
        rows = torch.cat([b.member[:, None], _full(b)], dim=1)
        out |= set(map(tuple, rows.tolist()))
    return out


@pytest.mark.parametrize(
    "members",
    [
        [(7, 2)],  # small, enumerated
        [(2, 1)],  # tiny: 4 prefixes
        [(97, 2)],  # large, rejection sampled: random draws would collide hundreds of times
        [(5, 1), (7, 2), (11, 2)],
    ],
)
def test_train_and_eval_share_no_member_sequence(members):
    mix = nt_family(members)
    ctx = mix.min_context() + 3
    train = _seen(mix, "train", 20, ctx)
    ev = _seen(mix, "eval", 20, ctx)
    assert train and ev
    assert not train & ev


@pytest.mark.parametrize("members", [[(7, 1), (7, 2)], [(5, 2), (7, 2)]])
def test_mixture_train_and_eval_share_no_token_sequence(members):
    mix = nt_family(members)
    ctx = mix.min_context() + 8
    strip = lambda rows: {r[1:] for r in rows}  # noqa: E731 - drop the member index, keep the tokens
    train = strip(_seen(mix, "train", 10, ctx))
    ev = strip(_seen(mix, "eval", 10, ctx))
    assert not train & ev


# --- determinism ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("members", [[(7, 2)], [(31, 4)], [(5, 1), (13, 2)]])
def test_same_seed_same_batches_other_seed_other_batches(members):
    mix = nt_family(members)
    ctx = mix.min_context() + 4

    def batches(seed: int, split: str = "train") -> list[torch.Tensor]:
        s = NTStream(mix, ctx, seed, split)
        return [torch.cat([s.batch(64).inputs, s.batch(64).targets]) for _ in range(3)]

    a, b, c, e = batches(1), batches(1), batches(2), batches(1, "eval")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert not any(torch.equal(x, y) for x, y in zip(a, e, strict=True))
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


@pytest.mark.parametrize(
    ("weights", "size", "expected"),
    [((3.0, 1.0), 64, [48, 16]), ((1.0, 2.0, 5.0), 80, [10, 20, 50]), (None, 512, [256, 256])],
)
def test_stratified_batches_have_exact_counts(weights, size, expected):
    members = tuple(NTTask(n, t) for n, t in [(5, 1), (7, 2), (11, 1)][: len(expected)])
    stream = NTStream(TaskMix(members, weights=weights), 8, 0)
    for _ in range(3):
        assert torch.bincount(stream.batch(size, stratified=True).member, minlength=len(expected)).tolist() == expected


@pytest.mark.parametrize(
    ("weights", "size", "expected"),
    [((1.0, 2.0), 10, [3, 7]), ((2.0, 1.0), 10, [7, 3]), ((1.0, 1.0, 1.0), 10, None), ((5.0, 3.0, 2.0), 7, [4, 2, 1])],
)
def test_stratified_counts_round_to_the_nearest_whole_row(weights, size, expected):
    members = tuple(NTTask(n, 1) for n in (5, 7, 11)[: len(weights)])
    stream = NTStream(TaskMix(members, weights=weights), 8, 0)
    counts = torch.bincount(stream.batch(size, stratified=True).member, minlength=len(weights)).tolist()
    assert sum(counts) == size
    exact = [w / sum(weights) * size for w in weights]
    assert all(math.floor(e) <= c <= math.ceil(e) for c, e in zip(counts, exact, strict=True))
    if expected is not None:
        assert counts == expected


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
        (lambda: NTStream(TaskMix.single(7, 2), 8, 0, split="test"), "split"),
    ],
)
def test_invalid_inputs_raise_value_error_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()
