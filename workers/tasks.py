"""The NT task ladder: x[t+1] = (x[t] + x[t-T]) mod N after T+1 random tokens.

A point is a mixture of one or more (N, T) members. Streams are deterministic per seed;
the prefix space is split by a fixed hash into train and held-out eval parts, so the two
streams never share a sequence. Task families live in ``TASK_FAMILIES``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

GENERATOR_VERSION = "nt-2"  # nt-2: the split hashes the tokens, so mixture members never share a sequence
EVAL_FRACTION_DENOM = 8  # one prefix in 8 (by hash) is held out for evaluation
_ENUMERATE_LIMIT = 1 << 16  # prefix spaces up to this size are enumerated exactly
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


@dataclass
class Batch:
    inputs: Tensor  # (B, L) token ids
    targets: Tensor  # (B, L) next tokens
    scored: Tensor  # (B, L) bool: predictable positions that count in loss and accuracy
    member: Tensor  # (B,) index of the member task of each sequence


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply), computed in int64 without overflow."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def _key_hash(key: Tensor) -> Tensor:
    """A fixed hash of each row of leading tokens (B, K) -> (B,) int64."""
    h = torch.full((key.shape[0],), 0x2545F491, dtype=torch.int64)
    for j in range(key.shape[1]):
        h = _mix32((h * 31 + key[:, j] + 1) & _M32)
    return h


def is_eval_prefix(key: Tensor) -> Tensor:
    """Whether each row of leading tokens (B, K) belongs to the held-out evaluation part.

    The key is the first K tokens of the sequence, K the longest prefix of the point's
    members: a token sequence that two members both generate lands on one side only.
    """
    return _key_hash(key) % EVAL_FRACTION_DENOM == 0


@functools.lru_cache(maxsize=64)
def _enumerated_split(task: NTTask, key_len: int) -> dict[str, Tensor]:
    """All prefixes of a small task, split into train and eval (eval never empty)."""
    allp = torch.tensor(list(itertools.product(range(task.n), repeat=task.prefix_len)), dtype=torch.int64)
    keys = unroll(allp, task.n, task.t, key_len)
    ev = is_eval_prefix(keys)
    if not ev.any() or ev.all():  # tiny spaces: hold out the prefix with the smallest hash
        ev = torch.zeros_like(ev)
        ev[int(torch.argmin(_key_hash(keys)))] = True
    return {"train": allp[~ev], "eval": allp[ev]}


def _sample_prefixes(task: NTTask, key_len: int, count: int, split: str, g: torch.Generator) -> Tensor:
    """``count`` uniform prefixes (count, T+1) from the ``split`` part of the prefix space."""
    if task.n**task.prefix_len <= _ENUMERATE_LIMIT:
        pool = _enumerated_split(task, key_len)[split]
        return pool[torch.randint(len(pool), (count,), generator=g)]
    out = torch.randint(task.n, (count, task.prefix_len), generator=g)
    bad = is_eval_prefix(unroll(out, task.n, task.t, key_len)) != (split == "eval")
    while bad.any():  # rejection sampling keeps prefixes uniform within the part
        out[bad] = torch.randint(task.n, (int(bad.sum()), task.prefix_len), generator=g)
        bad = is_eval_prefix(unroll(out, task.n, task.t, key_len)) != (split == "eval")
    return out


def unroll(prefix: Tensor, n: int, t: int, length: int) -> Tensor:
    """Extend prefixes (B, T+1) by the recurrence to sequences (B, length)."""
    seq = torch.zeros(prefix.shape[0], length, dtype=torch.int64)
    seq[:, : t + 1] = prefix[:, :length]
    for p in range(t + 1, length):
        seq[:, p] = (seq[:, p - 1] + seq[:, p - 1 - t]) % n
    return seq


class NTStream:
    """A deterministic stream of batches of one task point.

    Args:
        mix: the task point.
        context_length: model context; sequences hold ``context_length + 1`` tokens.
        seed: data seed; the train and eval streams of one seed never share a sequence.
        split: ``"train"`` or ``"eval"``.
    """

    def __init__(self, mix: TaskMix, context_length: int, seed: int, split: str = "train") -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split=}")
        if context_length < mix.min_context():
            raise ValueError(f"context_length={context_length} too short for {mix.name}: need >= {mix.min_context()}")
        self.mix, self.length, self.split = mix, context_length + 1, split
        self.g = torch.Generator().manual_seed(seed * 2 + (split == "eval"))

    def _members(self, batch_size: int, stratified: bool) -> Tensor:
        probs = self.mix.probs
        if not stratified:
            return torch.multinomial(probs, batch_size, replacement=True, generator=self.g)
        counts = torch.floor(probs * batch_size).long()
        rest = batch_size - int(counts.sum())
        counts[torch.argsort(probs * batch_size - counts, descending=True)[:rest]] += 1
        return torch.repeat_interleave(torch.arange(len(probs)), counts)

    def batch(self, batch_size: int, stratified: bool = False) -> Batch:
        """Next ``batch_size`` sequences; ``stratified`` gives exact member proportions."""
        member = self._members(batch_size, stratified)
        seq = torch.zeros(batch_size, self.length, dtype=torch.int64)
        start = torch.zeros(batch_size, dtype=torch.int64)
        for i, task in enumerate(self.mix.members):
            rows = (member == i).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            key_len = max(m.prefix_len for m in self.mix.members)
            prefix = _sample_prefixes(task, key_len, len(rows), self.split, self.g)
            seq[rows] = unroll(prefix, task.n, task.t, self.length)
            start[rows] = task.t if len(self.mix.members) == 1 else self.mix.score_start
        positions = torch.arange(self.length - 1)
        scored = positions[None, :] >= start[:, None]  # target index i predicts token i+1
        return Batch(seq[:, :-1], seq[:, 1:], scored, member)


def nt_family(points: Sequence[tuple[int, int]], identify_margin: int = 2) -> TaskMix:
    """The NT family: a point is a list of (N, T) members."""
    return TaskMix(tuple(NTTask(n, t) for n, t in points), identify_margin=identify_margin)


TASK_FAMILIES: dict[str, Callable[..., TaskMix]] = {"nt": nt_family}
