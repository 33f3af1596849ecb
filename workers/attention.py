"""Attention kinds: how causal scores become attention weights.

Each kind is one function from masked scores to weights; adding a kind is one entry in
``_KINDS``. All kinds share the same score matmul, so they cost the same.

Speed (docs/benchmarks.md). On scores (B, H, T, T) each elementwise op is a full memory pass,
and at Ladder's sizes on a CPU these passes cost about as much as the matmuls. So:

* masking is ``torch.where`` (one pass forward, one backward), not an out-of-place
  ``masked_fill`` (a copy plus a fill, each way), for every kind;
* ``ea`` and ``ea_norm`` run as autograd Functions that compute, bit for bit, what autograd
  computes for their plain expressions (``_ea_plain``, ``_ea_norm_plain``), forward and
  backward, in fewer passes and fewer fresh buffers: EA costs two passes over DPA (the square,
  and the chain rule through it) instead of four. Double backward works (it takes out-of-place
  branches); under ``torch.func`` transforms (packed trials), under autocast, or with a mask that
  broadcasts the scores to a bigger shape, the plain expressions run.
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


def _dpa(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Standard softmax of the scaled dot products."""
    return torch.softmax(torch.where(mask, scores, _NEG_INF), dim=-1)


def _ea_plain(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """EA as a plain expression: what ``_ea`` computes, weights and gradients alike."""
    return torch.softmax(torch.where(mask, scores.square(), _NEG_INF), dim=-1)


def _ea_norm_plain(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """EA-norm as a plain expression: what ``_ea_norm`` computes, weights and gradients alike."""
    sq = torch.where(mask, scores.square(), 0.0)
    return sq / (eps + sq.sum(dim=-1, keepdim=True))


def _may_overwrite(*tensors: Tensor) -> bool:
    """Whether a Function may write results into its own scratch buffers (``out=``, in-place).

    Not while autograd records a graph through them (double backward), and not under
    ``torch.func`` transforms, which have no ``out=`` support.
    """
    if torch._C._are_functorch_transforms_active():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _fits(mask: Tensor, x: Tensor) -> bool:
    """Whether ``mask`` broadcasts to ``x``'s shape (so that ``where(mask, x, v)`` has ``x``'s shape)."""
    if mask.dim() > x.dim():
        return False
    return all(m in (1, n) for m, n in zip(reversed(mask.shape), reversed(x.shape), strict=False))


def _where(mask: Tensor, x: Tensor, value: float, into_x: bool) -> Tensor:
    """``torch.where(mask, x, value)``, written into ``x`` (a scratch buffer) when ``into_x``."""
    if into_x and _fits(mask, x):
        return torch.where(mask, x, x.new_full((), value), out=x)
    return torch.where(mask, x, value)


def _square_backward(grad_sq: Tensor, scores: Tensor, into_grad: bool) -> Tensor:
    """``grad_sq * (2 * scores)``, autograd's derivative through ``scores**2``, in one pass.

    ``addcmul`` computes ``-0.0 + (2 * grad_sq) * scores``: doubling is exact, so the product is
    rounded once, as in ``grad_sq * (2 * scores)``, and adding ``-0.0`` changes no value, not even
    the sign of a zero. With ``into_grad`` the result overwrites ``grad_sq`` (a scratch buffer).
    """
    if into_grad and grad_sq.shape == scores.shape and grad_sq.dtype == scores.dtype:
        return torch.addcmul(scores.new_full((), -0.0), grad_sq, scores, value=2.0, out=grad_sq)
    return torch.addcmul(scores.new_full((), -0.0), grad_sq, scores, value=2.0)


class _SquaredSoftmax(torch.autograd.Function):
    """``_ea_plain``; backward in 3 passes instead of 5 (no ``pow(s, 1)`` copy, one fused multiply)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(scores: Tensor, mask: Tensor) -> Tensor:
        sq = _where(mask, scores.square(), _NEG_INF, _may_overwrite())
        return torch.softmax(sq, dim=-1)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        scores, mask = inputs
        ctx.save_for_backward(scores, mask, output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        scores, mask, weights = ctx.saved_tensors
        scratch = _may_overwrite(grad, scores, weights)
        grad_sq = torch._softmax_backward_data(grad, weights, -1, weights.dtype)
        return _square_backward(_where(mask, grad_sq, 0.0, scratch), scores, scratch), None


class _SquaredNormalised(torch.autograd.Function):
    """``_ea_norm_plain``; backward in 7 passes instead of 11."""

    generate_vmap_rule = True

    @staticmethod
    def forward(scores: Tensor, mask: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        sq = _where(mask, scores.square(), 0.0, _may_overwrite())
        z = eps + sq.sum(dim=-1, keepdim=True)
        return sq.div_(z), z  # the weights, and their normaliser for backward

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, float], output: tuple[Tensor, Tensor]) -> None:
        scores, mask, eps = inputs
        weights, z = output
        ctx.mark_non_differentiable(z)
        ctx.eps = eps
        ctx.save_for_backward(scores, mask, weights, z)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_z: Tensor | None) -> tuple[Tensor, None, None]:
        # Autograd's backward of w = sq / z, z = eps + sum(sq), sq = where(mask, s**2, 0) is
        #   grad_sq = grad / z + sum(-grad * ((sq / z) / z), -1)   and   grad_s = where(mask, grad_sq, 0) * (2 * s).
        # sq / z is w bit for bit, and -grad * (w / z) equals grad * (w / -z) exactly (negation is exact),
        # so no pass recomputes sq / z or negates grad.
        scores, mask, weights, z = ctx.saved_tensors
        if _may_overwrite(grad, scores):
            t = weights / z.neg()
            grad_z = t.mul_(grad).sum(dim=-1, keepdim=True)
            grad_sq = torch.div(grad, z, out=t).add_(grad_z)  # t is spent: reuse its buffer
            return _square_backward(_where(mask, grad_sq, 0.0, True), scores, True), None, None
        # Building a double-backward graph or under torch.func: recompute w and z differentiably (same arithmetic).
        sq = torch.where(mask, scores.square(), 0.0)
        z = ctx.eps + sq.sum(dim=-1, keepdim=True)
        grad_z = (grad * ((sq / z) / z.neg())).sum(dim=-1, keepdim=True)
        return _square_backward(torch.where(mask, grad / z + grad_z, 0.0), scores, False), None, None


def _plain_is_faster(scores: Tensor, mask: Tensor) -> bool:
    """Where the plain expression is the definition, or the cheaper way to compute it.

    Autocast may change dtypes between ops, and a mask that broadcasts the scores up makes autograd
    reduce gradients in its own order: there the plain expression is the definition. Under
    ``torch.func`` transforms (``vmap``: packed trials) the Functions could not write in place
    anyway, and their generated vmap rule runs forward and backward through Python for every call:
    EA's attention cost 1.5-2x DPA's in a pack, against ~1.1x with the plain ops (docs/benchmarks.md).
    """
    return (
        torch.is_autocast_enabled(scores.device.type)
        or not _fits(mask, scores)
        or torch._C._are_functorch_transforms_active()
    )


def _ea(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Expressive attention: softmax of the squared scaled dot products."""
    if _plain_is_faster(scores, mask):
        return _ea_plain(scores, mask, eps)
    return _SquaredSoftmax.apply(scores, mask)


def _ea_norm(scores: Tensor, mask: Tensor, eps: float) -> Tensor:
    """Squared scaled dot products normalised over the causal context, no softmax."""
    if _plain_is_faster(scores, mask):
        return _ea_norm_plain(scores, mask, eps)
    weights, _ = _SquaredNormalised.apply(scores, mask, eps)
    return weights


_KINDS: dict[str, WeightsFn] = {
    "dpa": _dpa,
    "ea": _ea,
    "ea_norm": _ea_norm,
}

ATTENTION_KINDS: tuple[str, ...] = tuple(_KINDS)

# Kinds whose weights are the softmax of the scores or of their squares: they differ in one elementwise
# step, so members of one pack may mix them (``squared_or_plain_softmax``, a flag per member).
SQUARES_SCORES: dict[str, bool] = {"dpa": False, "ea": True}


def pack_family(kind: str) -> str:
    """What members of one pack must share about their attention: DPA and EA mix, any other kind packs alone."""
    return "+".join(SQUARES_SCORES) if kind in SQUARES_SCORES else kind


def squared_or_plain_softmax(scores: Tensor, square: Tensor, mask: Tensor) -> Tensor:
    """EA's weights where ``square`` is true, DPA's where it is false (``square`` broadcasts to the scores).

    Under ``vmap`` over a pack's members ``square`` is one flag per member. ``where`` hands each
    member the branch of its kind, values and gradients unchanged, so a member computes what
    ``_dpa`` or ``_ea_plain`` computes; the price is one square and one select for the DPA members.
    """
    return _dpa(torch.where(square, scores.square(), scores), mask, 0.0)


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
