"""Fair start: gradient sizes at init per attention kind and q/k/v init scale, and what clipping does.

For each kind and init std, over several init seeds (medians): the norm of the loss gradient with
respect to the attention scores, the global gradient norm, the q/k/v projections' share of it, and
the factor by which global clipping at 1.0 shrinks every other parameter's update.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_fair_start
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch
import torch.nn.functional as F

import workers.model as model_mod
from workers.model import ModelConfig, Transformer
from workers.tasks import NTStream, nt_family


def measure(kind: str, qkv_std: float, seed: int, point: list[tuple[int, int]], ctx: int) -> dict[str, float]:
    """Gradient norms of one freshly initialised model on one training batch."""
    torch.manual_seed(seed)
    mix = nt_family(point)
    model = Transformer(
        ModelConfig(mix.vocab_size, ctx, d_model=32, n_layers=2, n_heads=2, attention=kind, qkv_init_std=qkv_std)
    )
    grads: list[torch.Tensor] = []
    real = model_mod.weights_from_scores

    def spy(scores: torch.Tensor, *args: Any) -> torch.Tensor:
        scores.register_hook(lambda g: grads.append(g.detach()))
        return real(scores, *args)

    model_mod.weights_from_scores = spy  # type: ignore[assignment]
    try:
        b = NTStream(mix, ctx, seed).batch(64)
        logits = model(b.inputs)
        loss = F.cross_entropy(logits[b.scored], b.targets[b.scored])
        loss.backward()
    finally:
        model_mod.weights_from_scores = real  # type: ignore[assignment]
    score_norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads)))
    norms = {n: float(p.grad.norm()) for n, p in model.named_parameters() if p.grad is not None}
    total = sum(v**2 for v in norms.values()) ** 0.5
    qkv = sum(v**2 for n, v in norms.items() if "qkv.weight" in n) ** 0.5
    return {
        "score_grad": score_norm,
        "grad_norm": total,
        "qkv_share": qkv**2 / total**2,
        "clip_factor": min(1.0, 1.0 / total),
        "score_abs": 0.0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--ctx", type=int, default=16)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    point = [(16, 4)]
    print(f"point N16_T4, d32 l2 h2, context {args.ctx}, batch 64; medians over {args.seeds} init seeds")
    print(f"{'kind':8} {'qkv std':>7} {'|dL/ds|':>10} {'|grad|':>8} {'qkv share':>9} {'clip@1.0':>8}")
    base = None
    for std in (0.02, 0.2):
        for kind in ("dpa", "ea", "ea_norm"):
            rows = [measure(kind, std, s, point, args.ctx) for s in range(args.seeds)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            if kind == "dpa":
                base = med["score_grad"]
            ratio = med["score_grad"] / base if base else float("nan")
            print(
                f"{kind:8} {std:7.2f} {med['score_grad']:10.3g} {med['grad_norm']:8.3g} {med['qkv_share']:9.1%} "
                f"{med['clip_factor']:8.3f}  (score grad {ratio:.1f}x dpa)"
            )


def clipping_during_training(kind: str, qkv_std: float, seed: int, steps: int, lr: float = 3e-3) -> dict[str, float]:
    """Over the first ``steps`` of training with global clipping at 1.0: how often it clips, how much it
    shrinks the update when it does, and the q/k/v projections' share of the gradient norm then."""
    torch.manual_seed(seed)
    mix = nt_family([(16, 4)])
    model = Transformer(
        ModelConfig(mix.vocab_size, 16, d_model=32, n_layers=2, n_heads=2, attention=kind, qkv_init_std=qkv_std)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    stream = NTStream(mix, 16, seed)
    clipped, factors, shares = 0, [], []
    for _ in range(steps):
        b = stream.batch(64)
        loss = F.cross_entropy(model(b.inputs)[b.scored], b.targets[b.scored])
        opt.zero_grad()
        loss.backward()
        norms = {n: p.grad.norm() for n, p in model.named_parameters() if p.grad is not None}
        total = float(torch.stack(list(norms.values())).norm())
        qkv = float(torch.stack([v for n, v in norms.items() if "qkv.weight" in n]).norm())
        if total > 1.0:
            clipped += 1
            factors.append(1.0 / total)
            shares.append(qkv**2 / total**2)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {
        "clipped": clipped / steps,
        "factor": statistics.median(factors) if factors else 1.0,
        "qkv_share": statistics.median(shares) if shares else 0.0,
    }


def main_training(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"N16_T4, d32 l2 h2, lr 3e-3, global clip 1.0, first {args.steps} steps; medians over {args.seeds} seeds")
    print(f"{'kind':8} {'qkv std':>7} {'steps clipped':>13} {'clip factor':>11} {'qkv share':>9}")
    for std in (0.02, 0.2):
        for kind in ("dpa", "ea", "ea_norm"):
            rows = [clipping_during_training(kind, std, s, args.steps) for s in range(args.seeds)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(f"{kind:8} {std:7.2f} {med['clipped']:13.0%} {med['factor']:11.3f} {med['qkv_share']:9.1%}")


if __name__ == "__main__":
    import sys

    main_training(sys.argv[2:]) if sys.argv[1:2] == ["training"] else main(sys.argv[1:])
