"""Attention-space geometry of a trained model on NT tasks: where each head looks, and with what sign.

For a query at input position i, the next token ``x[i+1] = (x[i] + x[i-T]) mod N`` needs the keys
at i and i-T. Per layer and head this measures the attention weight on those two keys, the score
``q.k/sqrt(d)`` there and how much of that weight comes with a negative score (query and key
anti-aligned), and the share of all attention mass on negative-score keys. DPA's weights shrink as
a score turns negative; EA's are symmetric in its sign, so only the data can say whether it uses
anti-aligned keys. ``python -m workers.geometry`` trains one model per kind and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor

import workers.model as model_module
from workers.evaluation import build_eval_sets
from workers.model import Transformer
from workers.trial import TrialConfig, run_trial

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadGeometry:
    """One head's attention at the two keys the NT rule needs, averaged over scored queries.

    ``mass_*`` is the mean weight on the key; ``neg_share_*`` the part of that weight that comes
    with a negative score; ``score_*`` the mean score; ``neg_mass`` the share of all attention
    weight (every key) that sits on keys with a negative score.
    """

    layer: int
    head: int
    mass_t: float
    mass_t_minus_T: float
    score_t: float
    score_t_minus_T: float
    neg_share_t: float
    neg_share_t_minus_T: float
    neg_mass: float
    queries: int


@contextlib.contextmanager
def captured_attention() -> Iterator[list[tuple[Tensor, Tensor]]]:
    """Record (scores, weights) of every attention layer the model runs, in call order.

    It wraps the one function through which the model turns scores into weights, so what it
    records is exactly what the attention kind saw and gave, whatever produced the scores.
    """
    calls: list[tuple[Tensor, Tensor]] = []
    real = model_module.weights_from_scores

    def recording(scores: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        weights = real(scores, *args, **kwargs)
        calls.append((scores.detach(), weights.detach()))
        return weights

    model_module.weights_from_scores = recording
    try:
        yield calls
    finally:
        model_module.weights_from_scores = real


def head_geometry(scores: Tensor, weights: Tensor, lookback: Tensor, scored: Tensor, layer: int) -> list[HeadGeometry]:
    """Geometry of one layer's heads.

    Args:
        scores: scaled scores (B, H, L, L).
        weights: attention weights (B, H, L, L).
        lookback: each sequence's T (B,).
        scored: (B, L) bool, the query positions whose prediction counts (each has i - T >= 0).
        layer: the layer index, for the rows.

    Raises:
        ValueError: if a scored position has no key at i - T.
    """
    b_idx, i_idx = scored.nonzero(as_tuple=True)  # (Q,) scored queries
    j_idx = i_idx - lookback[b_idx]
    if (j_idx < 0).any():
        raise ValueError("a scored query has no key at i - T: the scored mask does not fit the lookbacks")
    rows = []
    for h in range(scores.shape[1]):
        s, w = scores[:, h], weights[:, h]  # (B, L, L)
        s_t, w_t = s[b_idx, i_idx, i_idx], w[b_idx, i_idx, i_idx]  # (Q,)
        s_tt, w_tt = s[b_idx, i_idx, j_idx], w[b_idx, i_idx, j_idx]  # (Q,)
        w_rows, s_rows = w[b_idx, i_idx], s[b_idx, i_idx]  # (Q, L): every key of each scored query
        rows.append(
            HeadGeometry(
                layer=layer,
                head=h,
                mass_t=float(w_t.mean()),
                mass_t_minus_T=float(w_tt.mean()),
                score_t=float(s_t.mean()),
                score_t_minus_T=float(s_tt.mean()),
                neg_share_t=_share(w_t, s_t < 0),
                neg_share_t_minus_T=_share(w_tt, s_tt < 0),
                neg_mass=_share(w_rows, s_rows < 0),
                queries=int(b_idx.numel()),
            )
        )
    return rows


def _share(w: Tensor, neg: Tensor) -> float:
    """The part of the weight ``w`` that sits where ``neg`` holds (0 when there is no weight)."""
    total = float(w.sum())
    return float((w * neg).sum()) / total if total > 0 else 0.0


@torch.no_grad()
def attention_geometry(model: Transformer, inputs: Tensor, lookback: Tensor, scored: Tensor) -> list[HeadGeometry]:
    """Per layer and head geometry of ``model`` on token ids (B, L).

    Raises:
        RuntimeError: if the model ran a number of attention layers other than its ``n_layers``.
    """
    model.eval()
    with captured_attention() as calls:
        model(inputs)
    if len(calls) != model.cfg.n_layers:
        raise RuntimeError(f"captured {len(calls)} attention layers, the model has {model.cfg.n_layers}")
    return [row for layer, (s, w) in enumerate(calls) for row in head_geometry(s, w, lookback, scored, layer)]


def trained_geometry(cfg: TrialConfig) -> tuple[dict[str, Any], list[HeadGeometry]]:
    """Train one trial as ``run_trial`` does, then measure its final model on its held-out
    confirmation set (set B, the set its recorded accuracy comes from).

    Returns:
        The trial's record and the geometry of its final model.
    """
    final: dict[str, Tensor] = {}

    def keep(metrics: dict[str, Any], state: Any) -> None:
        final.clear()
        final.update({k: v.detach().clone() for k, v in state()["model"].items()})

    record = run_trial(cfg, keep)
    if not final:
        raise RuntimeError(f"trial ended without an evaluation ({record['status']}: {record.get('error')})")
    model = Transformer(cfg.model_config())
    model.load_state_dict(final)
    mix = cfg.mix()
    data = build_eval_sets(mix, cfg.context_length, cfg.seed, cfg.threshold, cfg.holdout).confirm
    lookback = torch.tensor([m.t for m in mix.members])[data.member]
    return record, attention_geometry(model, data.inputs, lookback, data.scored)


def geometry_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of geometry rows (``HeadGeometry`` fields plus trial columns)."""
    cols = [
        ("kind", "kind", "{}"),
        ("size", "size", "{}"),
        ("point", "point", "{}"),
        ("seed", "seed", "{}"),
        ("status", "trial", "{}"),
        ("eval_acc", "acc", "{:.3f}"),
        ("layer", "layer", "{}"),
        ("head", "head", "{}"),
        ("mass_t", "w(t)", "{:.2f}"),
        ("mass_t_minus_T", "w(t-T)", "{:.2f}"),
        ("score_t", "s(t)", "{:+.2f}"),
        ("score_t_minus_T", "s(t-T)", "{:+.2f}"),
        ("neg_share_t", "neg w(t)", "{:.2f}"),
        ("neg_share_t_minus_T", "neg w(t-T)", "{:.2f}"),
        ("neg_mass", "neg w(all)", "{:.2f}"),
    ]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Train one model per kind, size, point and seed; print its attention geometry."
    )
    p.add_argument("--kinds", nargs="+", default=["dpa", "ea", "ea_norm"])
    p.add_argument("--point", action="append", required=True, help="task point as N,T[+N,T...]; repeatable")
    p.add_argument("--size", action="append", required=True, help="d_model,n_layers,n_heads; repeatable")
    p.add_argument("--lr", type=json.loads, default="{}", help='per-kind lr as JSON, e.g. {"dpa": 0.003}')
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--context-length", type=int, default=16)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for size in args.size:
        d, n_layers, n_heads = (int(x) for x in size.split(","))
        for point in args.point:
            members = [[int(x) for x in m.split(",")] for m in point.split("+")]
            name = "+".join(f"N{n}_T{t}" for n, t in members)
            for seed in args.seeds:
                for kind in args.kinds:
                    cfg = TrialConfig(
                        attention=kind, task=members, d_model=d, n_layers=n_layers, n_heads=n_heads, seed=seed
                    )
                    lr = float(args.lr.get(kind, cfg.lr))
                    cfg = replace(cfg, lr=lr, max_steps=args.max_steps, context_length=args.context_length)
                    record, heads = trained_geometry(cfg)
                    log.info("%s d%d %s s%d: %s acc=%s", kind, d, name, seed, record["status"], record.get("eval_acc"))
                    trial = {
                        "kind": kind,
                        "point": name,
                        "status": record["status"],
                        "eval_acc": record.get("eval_acc"),
                    }
                    trial |= {"lr": lr, "seed": seed, "size": f"d{d}_l{n_layers}_h{n_heads}", "steps": record["steps"]}
                    rows += [trial | asdict(h) for h in heads]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
            f.write("\n")
    print(geometry_table(rows))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
