"""Attention kinds: how causal scores become attention weights.

Each kind is one function from masked scores to weights; adding a kind is one entry in
``_KINDS``. All kinds share the same score matmul, so they cost the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# A kind maps scaled scores (B, H, T, T), the causal mask (T, T, True = allowed) and eps
# to weights (B, H, T, T) whose rows sum to 1 over allowed keys.
WeightsFn = Callable[[Tensor, Tensor, float], Tensor]


def _dpa(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Standard softmax of the scaled dot products."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def _ea(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Expressive attention: softmax of the squared scaled dot products."""
    return torch.softmax(scores.square().masked_fill(~mask, float("-inf")), dim=-1)


def _ea_norm(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Squared scaled dot products normalised over the causal context, no softmax."""
    sq = scores.square().masked_fill(~mask, 0.0)
    return sq / (eps + sq.sum(dim=-1, keepdim=True))


_KINDS: dict[str, WeightsFn] = {
    "dpa": _dpa,
    "ea": _ea,
    "ea_norm": _ea_norm,
}

ATTENTION_KINDS: tuple[str, ...] = tuple(_KINDS)


def causal_mask(t: int, device: torch.device | str | None = None) -> Tensor:
    """Lower-triangular boolean mask (T, T): query i may attend to keys j <= i."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def weights_from_scores(scores: Tensor, kind: str, eps: float = 1e-6, mask: Tensor | None = None) -> Tensor:
    """Turn scaled scores (B, H, T, T) into causal attention weights of ``kind``.

    Raises:
        ValueError: if ``kind`` is not registered.
    """
    try:
        fn = _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown attention kind {kind=}; registered kinds: {', '.join(ATTENTION_KINDS)}") from None
    if mask is None:
        mask = causal_mask(scores.shape[-1], scores.device)
    return fn(scores, mask, eps)


def attention_weights(q: Tensor, k: Tensor, kind: str, eps: float = 1e-6) -> Tensor:
    """Causal attention weights (B, H, T, T) for queries and keys (B, H, T, d)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    return weights_from_scores(scores, kind, eps)
