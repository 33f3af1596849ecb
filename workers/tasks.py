"""The NT task ladder: x[t+1] = (x[t] + x[t-T]) mod N after T+1 random tokens.

A point is a mixture of one or more (N, T) members. A sequence is fixed by its first T+1
tokens, its start state; the step map moves a window of T+1 tokens one position on and is
invertible, so the state space splits into orbits (cycles). Two holdouts (``HOLDOUTS``,
docs/evaluation.md):

* ``fresh``: training and evaluation both draw start states from the whole space; the eval
  sets are drawn without replacement from an RNG stream of their own. The verdict says how
  well the model computes the task on its whole distribution.
* ``orbit``: whole orbits are held out, so no held-out state (window) occurs anywhere in a
  training sequence. The verdict says whether the model computes the rule on windows it
  never saw. Needs an enumerable state space with more than one orbit, single-member points.

Task families live in ``TASK_FAMILIES``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# nt-3: no hash split; training draws from the whole space (fresh) or from the training orbits
# (orbit), and eval sets are drawn without replacement (workers/evaluation.py).
GENERATOR_VERSION = "nt-3"
HOLDOUTS = ("fresh", "orbit")
ENUMERATE_LIMIT = 1 << 20  # state spaces up to this size are enumerated (pools, orbits)
EVAL_ORBIT_SHARE = 1 / 8  # orbit holdout: about this share of the states is held out
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class NTTask:
    """One NT task: modulus ``n`` and look-back ``t``."""

    n: int
    t: int

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"N must be >= 2, got {self.n=}")
        if self.t < 1:
            raise ValueError(f"T must be >= 1, got {self.t=}")

    @property
    def name(self) -> str:
        return f"N{self.n}_T{self.t}"

    @property
    def prefix_len(self) -> int:
        return self.t + 1

    @property
    def n_states(self) -> int:
        """Size of the state space: distinct start states, and so distinct sequences."""
        return self.n**self.prefix_len


@dataclass(frozen=True)
class TaskMix:
    """A task point: one member, or a multi-task mixture the model must infer from context.

    In a mixture, scoring starts ``identify_margin`` positions after the longest prefix,
    so that the sequence so far identifies the member.
    """

    members: tuple[NTTask, ...]
    weights: tuple[float, ...] | None = None
    identify_margin: int = 2

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a task point needs at least one member task")
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"member tasks must be distinct, got {[m.name for m in self.members]}")
        if self.weights is not None and (len(self.weights) != len(self.members) or any(w <= 0 for w in self.weights)):
            raise ValueError(f"weights must be one positive number per member, got {self.weights=}")
        if self.identify_margin < 0:
            raise ValueError(f"identify_margin must be >= 0, got {self.identify_margin=}")

    @classmethod
    def single(cls, n: int, t: int) -> TaskMix:
        return cls((NTTask(n, t),))

    @property
    def name(self) -> str:
        return "+".join(m.name for m in self.members)

    @property
    def vocab_size(self) -> int:
        return max(m.n for m in self.members)

    @property
    def score_start(self) -> int:
        """First scored target index in a mixture; single tasks use their own T."""
        return max(m.t for m in self.members) + (self.identify_margin if len(self.members) > 1 else 0)

    @property
    def probs(self) -> Tensor:
        w = torch.tensor(self.weights if self.weights else [1.0] * len(self.members), dtype=torch.float64)
        return w / w.sum()

    def min_context(self) -> int:
        """Shortest context with at least one scored position."""
        return self.score_start + 1

    def scored_per_sequence(self, context_length: int) -> int:
        """Scored target positions in one sequence of ``context_length`` inputs (same for every member)."""
        return context_length - self.score_start


@dataclass
class Batch:
    inputs: Tensor  # (B, L) token ids
    targets: Tensor  # (B, L) next tokens
    scored: Tensor  # (B, L) bool: predictable positions that count in loss and accuracy
    member: Tensor  # (B,) index of the member task of each sequence


def unroll(prefix: Tensor, n: int, t: int, length: int) -> Tensor:
    """Extend prefixes (B, T+1) by the recurrence to sequences (B, length)."""
    seq = torch.zeros(prefix.shape[0], length, dtype=torch.int64)
    seq[:, : t + 1] = prefix[:, :length]
    for p in range(t + 1, length):
        seq[:, p] = (seq[:, p - 1] + seq[:, p - 1 - t]) % n
    return seq


def all_states(task: NTTask) -> Tensor:
    """Every start state (n**(T+1), T+1), in lexicographic order (row r encodes r in base N)."""
    if task.n_states > ENUMERATE_LIMIT:
        raise ValueError(f"{task.name} has {task.n_states} states, more than the enumeration limit {ENUMERATE_LIMIT}")
    return torch.cartesian_prod(*[torch.arange(task.n)] * task.prefix_len).reshape(-1, task.prefix_len)


def encode(states: Tensor, n: int) -> Tensor:
    """Row index in ``all_states`` of each state (B, T+1) -> (B,)."""
    code = torch.zeros(states.shape[0], dtype=torch.int64)
    for j in range(states.shape[1]):
        code = code * n + states[:, j]
    return code


def step(states: Tensor, n: int) -> Tensor:
    """The step map on windows (B, T+1): drop the oldest token, append (newest + oldest) mod N."""
    return torch.cat([states[:, 1:], ((states[:, -1] + states[:, 0]) % n)[:, None]], dim=1)


def _hash(x: Tensor) -> Tensor:
    """A fixed 32-bit integer hash (xor-shift-multiply), computed in int64 without overflow."""
    x = (x * 0x9E3779B1 + 0x2545F491) & _M32
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=32)
def orbit_labels(task: NTTask) -> Tensor:
    """Each state's orbit, labelled by the smallest state code in it (n**(T+1),)."""
    nxt = encode(step(all_states(task), task.n), task.n)  # the step map as a permutation of codes
    label = torch.arange(task.n_states)
    for _ in range(max(1, math.ceil(math.log2(task.n_states))) + 1):  # pointer doubling covers any cycle
        label = torch.minimum(label, label[nxt])
        nxt = nxt[nxt]
    return label


@functools.lru_cache(maxsize=32)
def orbit_split(task: NTTask) -> dict[str, Tensor]:
    """Start states of the training and the held-out orbits: ``{"train": (S1, T+1), "eval": (S2, T+1)}``.

    Orbits are taken in the order of a fixed hash of their label while the held-out share stays
    within ``EVAL_ORBIT_SHARE`` (at least one orbit, never all of them).

    Raises:
        ValueError: if the space is too large to enumerate or is a single orbit.
    """
    label = orbit_labels(task)
    orbits, sizes = torch.unique(label, return_counts=True)
    if len(orbits) < 2:
        raise ValueError(f"{task.name} is a single orbit of the step map: nothing can be held out by orbit")
    chosen, budget, taken = [], EVAL_ORBIT_SHARE * task.n_states, 0
    for i, size in zip(
        torch.argsort(_hash(orbits)).tolist(), sizes[torch.argsort(_hash(orbits))].tolist(), strict=True
    ):
        if taken + size <= budget:
            chosen.append(i)
            taken += size
    if not chosen:  # every orbit is larger than the share: hold out the smallest one
        chosen = [int(torch.argmin(sizes))]
    held = torch.isin(label, orbits[chosen])
    states = all_states(task)
    return {"train": states[~held], "eval": states[held]}


def pool_size(task: NTTask, holdout: str) -> int:
    """Distinct held-out sequences of ``task`` the eval sets can draw from."""
    _check_holdout(holdout)
    return task.n_states if holdout == "fresh" else len(orbit_split(task)["eval"])


def _check_holdout(holdout: str) -> None:
    if holdout not in HOLDOUTS:
        raise ValueError(f"unknown holdout {holdout=}; known: {', '.join(HOLDOUTS)}")


def draw_held_out(task: NTTask, holdout: str, count: int, g: torch.Generator) -> Tensor:
    """``count`` distinct start states (count, T+1), uniform without replacement from the held-out pool.

    Raises:
        ValueError: if the pool holds fewer than ``count`` states.
    """
    size = pool_size(task, holdout)
    if count > size:
        raise ValueError(f"{task.name}: {count} distinct eval sequences asked of a pool of {size}")
    if holdout == "orbit":
        pool = orbit_split(task)["eval"]
        return pool[torch.randperm(len(pool), generator=g)[:count]]
    if size <= ENUMERATE_LIMIT:
        codes = torch.randperm(size, generator=g)[:count]
        return all_states(task)[codes]
    out = torch.randint(task.n, (0, task.prefix_len))
    while len(out) < count:  # huge space: draw, drop repeats, keep the first draw of each state
        more = torch.randint(task.n, (2 * (count - len(out)), task.prefix_len), generator=g)
        both = torch.cat([out, more])
        _, inverse = torch.unique(both, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(both), dtype=torch.int64).scatter_reduce(
            0, inverse, torch.arange(len(both)), reduce="amin"
        )
        out = both[torch.sort(first).values]
    return out[:count]


def make_batch(mix: TaskMix, context_length: int, prefixes: Sequence[Tensor]) -> Batch:
    """The batch of sequences that start with ``prefixes[i]`` (rows of member i), members in order."""
    length = context_length + 1
    seqs, members = [], []
    for i, (task, p) in enumerate(zip(mix.members, prefixes, strict=True)):
        seqs.append(unroll(p, task.n, task.t, length))
        members.append(torch.full((len(p),), i, dtype=torch.int64))
    seq, member = torch.cat(seqs), torch.cat(members)
    start = mix.members[0].t if len(mix.members) == 1 else mix.score_start
    scored = (torch.arange(context_length) >= start).expand(len(seq), context_length).clone()
    return Batch(seq[:, :-1], seq[:, 1:], scored, member)  # target index i predicts token i+1


class NTStream:
    """A deterministic stream of training batches of one task point.

    Args:
        mix: the task point.
        context_length: model context; sequences hold ``context_length + 1`` tokens.
        seed: data seed (eval sets use other streams of the same seed).
        holdout: ``fresh`` draws start states from the whole space, ``orbit`` from the training orbits.
    """

    def __init__(self, mix: TaskMix, context_length: int, seed: int, holdout: str = "fresh") -> None:
        _check_holdout(holdout)
        if context_length < mix.min_context():
            raise ValueError(f"context_length={context_length} too short for {mix.name}: need >= {mix.min_context()}")
        self.mix, self.context_length, self.holdout = mix, context_length, holdout
        self.g = torch.Generator().manual_seed(seed * 3)

    def _members(self, batch_size: int) -> Tensor:
        return torch.multinomial(self.mix.probs, batch_size, replacement=True, generator=self.g)

    def _prefixes(self, task: NTTask, count: int) -> Tensor:
        if self.holdout == "orbit":
            pool = orbit_split(task)["train"]
            return pool[torch.randint(len(pool), (count,), generator=self.g)]
        return torch.randint(task.n, (count, task.prefix_len), generator=self.g)

    def batch(self, batch_size: int) -> Batch:
        """The next ``batch_size`` sequences (members drawn by the mixture's weights)."""
        member = self._members(batch_size)
        prefixes = [self._prefixes(task, int((member == i).sum())) for i, task in enumerate(self.mix.members)]
        b = make_batch(self.mix, self.context_length, prefixes)
        order = torch.argsort(torch.argsort(member, stable=True))  # back to the drawn member order
        return Batch(b.inputs[order], b.targets[order], b.scored[order], b.member[order])


def nt_family(points: Sequence[tuple[int, int]], identify_margin: int = 2) -> TaskMix:
    """The NT family: a point is a list of (N, T) members."""
    return TaskMix(tuple(NTTask(n, t) for n, t in points), identify_margin=identify_margin)


TASK_FAMILIES: dict[str, Callable[..., TaskMix]] = {"nt": nt_family}
