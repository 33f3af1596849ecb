"""Attention kinds: how causal scores become attention weights.

Each kind is one function from masked scores to weights; adding a kind is one entry in
``_KINDS``. All kinds share the same score matmul, so they cost the same.

Performance notes (see docs/benchmarks.md). On scores (B, H, T, T) every elementwise op is a
full memory pass, and at the sizes Ladder trains the passes cost as much as the matmuls:

* masking uses ``torch.where`` (one pass forward, one backward) instead of an out-of-place
  ``masked_fill`` (a copy plus a fill each way), for every kind;
* ``ea`` and ``ea_norm`` are autograd Functions whose backward replays, bit for bit, the
  arithmetic autograd derives for the plain expressions (``softmax(where(mask, s**2, -inf))``
  and ``sq / (eps + sum sq)`` with ``sq = where(mask, s**2, 0)``), but with in-place ops and
  fused multiplies, so EA costs two passes over DPA (the square, and the chain rule through
  it) rather than four. Weights and gradients are identical to the plain expressions;
  double backward and ``torch.func`` transforms still work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

# A kind maps scaled scores (B, H, T, T), the causal mask (T, T, True = allowed) and eps
# to weights (B, H, T, T) whose rows sum to 1 over allowed keys.
WeightsFn = Callable[[Tensor, Tensor, float], Tensor]

_NEG_INF = float("-inf")


def _inplace_ok(*tensors: Tensor) -> bool:
    """Whether a backward may overwrite its intermediates (not when building a double-backward graph)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _square_backward(grad_sq: Tensor, scores: Tensor) -> Tensor:
    """``grad_sq * (2 * scores)`` (autograd's derivative of ``scores**2``) in one pass.

    ``addcmul`` computes ``-0.0 + (2 * grad_sq) * scores``: doubling is exact, so the product is
    rounded once, as in ``grad_sq * (2 * scores)``, and adding ``-0.0`` leaves every value,
    signed zeros included, unchanged.
    """
    return torch.addcmul(scores.new_full((), -0.0), grad_sq, scores, value=2.0)


class _SquaredSoftmax(torch.autograd.Function):
    """``softmax(where(mask, scores**2, -inf), -1)`` with a cheaper, bit-identical backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(scores: Tensor, mask: Tensor) -> Tensor:
        sq = scores.square()
        sq.masked_fill_(~mask, _NEG_INF)  # sq is our own buffer: fill it in place
        return torch.softmax(sq, dim=-1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        scores, mask = inputs
        ctx.save_for_backward(scores, mask, output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        scores, mask, weights = ctx.saved_tensors
        grad_sq = torch._softmax_backward_data(grad, weights, -1, weights.dtype)
        if _inplace_ok(grad, scores, weights):
            grad_sq.masked_fill_(~mask, 0.0)
        else:
            grad_sq = torch.where(mask, grad_sq, 0.0)
        return _square_backward(grad_sq, scores), None


class _SquaredNormalised(torch.autograd.Function):
    """``sq / (eps + sq.sum(-1))`` with ``sq = where(mask, scores**2, 0)``; cheaper, bit-identical backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(scores: Tensor, mask: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        sq = scores.square()
        sq.masked_fill_(~mask, 0.0)
        z = eps + sq.sum(dim=-1, keepdim=True)
        return sq.div_(z), z  # the weights, and their normaliser (kept for backward)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, float], output: tuple[Tensor, Tensor]) -> None:
        scores, mask, eps = inputs
        weights, z = output
        ctx.mark_non_differentiable(z)
        ctx.eps = eps
        ctx.save_for_backward(scores, mask, weights, z)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_z: Tensor | None) -> tuple[Tensor, None, None]:
        # Autograd's backward of w = sq / z, z = eps + sum(sq), sq = where(mask, s**2, 0):
        #   grad_sq = grad / z + sum(-grad * ((sq / z) / z), -1)   (sq / z is w, bit for bit)
        #   grad_s  = where(mask, grad_sq, 0) * (2 * s)
        # -grad * (w / z) == grad * (w / -z) exactly (IEEE negation is exact), so no pass negates grad.
        scores, mask, weights, z = ctx.saved_tensors
        if _inplace_ok(grad, scores):
            t = weights / z.neg()
            grad_z = t.mul_(grad).sum(dim=-1, keepdim=True)
            grad_sq = (grad / z).add_(grad_z)
            grad_sq.masked_fill_(~mask, 0.0)
        else:  # building a double-backward graph: recompute z and w differentiably, same arithmetic
            sq = torch.where(mask, scores.square(), 0.0)
            z = ctx.eps + sq.sum(dim=-1, keepdim=True)
            w = sq / z
            grad_z = (grad * (w / z.neg())).sum(dim=-1, keepdim=True)
            grad_sq = torch.where(mask, grad / z + grad_z, 0.0)
        return _square_backward(grad_sq, scores), None, None


def _dpa(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Standard softmax of the scaled dot products."""
    return torch.softmax(torch.where(mask, scores, _NEG_INF), dim=-1)


def _ea(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Expressive attention: softmax of the squared scaled dot products."""
    return _SquaredSoftmax.apply(scores, mask)


def _ea_norm(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Squared scaled dot products normalised over the causal context, no softmax."""
    weights, _ = _SquaredNormalised.apply(scores, mask, eps)
    return weights


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
