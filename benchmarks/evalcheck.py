"""The before/after study of docs/evaluation.md: the trials of ``benchmarks/evalcheck.yaml``, run
with ``run_trial`` directly (no Ray), in whichever tree ``PYTHONPATH`` names; then a comparison.

    # in a worktree of 47a9739 (before) and in this tree (after), two processes each:
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.evalcheck run OUT.jsonl PART PARTS
    python -m benchmarks.evalcheck compare BEFORE.jsonl AFTER.jsonl

(The old tree has no ``benchmarks.evalcheck``: run this file by path there, with ``PYTHONPATH`` the old tree.)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

SPEC = Path(__file__).with_name("evalcheck.yaml")


def run(out: str, part: int, parts: int) -> None:
    import torch

    from studies.spec import StudySpec
    from workers.trial import TrialConfig, run_trial

    torch.set_num_threads(1)
    spec = StudySpec.from_file(SPEC)
    fields = {f.name for f in dataclasses.fields(TrialConfig)}
    size = spec.model.all_sizes()[0]
    cells = [(p, k, s) for p in spec.task.points() for s in spec.seeds for k in spec.attention]
    for i, (p, kind, seed) in enumerate(cells):
        if i % parts != part:
            continue
        # the spec's fields that TrialConfig shares by name (works for the old spec and the new one)
        flat = spec.training.model_dump() | spec.task.model_dump() | {"eps": spec.eps, "threshold": spec.threshold}
        flat["eval_sequences"] = flat["eval_sequences"] or 0  # the old spec's default is 512, the new one's None
        flat |= {"attention": kind, "task": [list(m) for m in p.members], "seed": seed, "device": "cpu"}
        flat |= size.model_dump() | {"lr": spec.hparams.lr.grid_values()[0]}
        r = run_trial(TrialConfig(**{k: v for k, v in flat.items() if k in fields}))
        keep = {k: v for k, v in r.items() if k != "config"} | {"point": p.name, "kind": kind, "seed": seed}
        with open(out, "a") as f:
            f.write(json.dumps(keep) + "\n")


def compare(before: str, after: str) -> None:
    def load(p: str) -> dict[tuple[str, str, int], dict]:
        return {(r["point"], r["kind"], r["seed"]): r for r in map(json.loads, open(p))}

    def verdict(r: dict | None) -> str:
        if r is None:
            return "not run"
        at = f" at {r['steps']}" if r["status"] == "solved" else f" ({r['steps']} steps)"
        return f"{r['status']}{at}, acc {r.get('eval_acc', float('nan')):.4f}"

    b, a = load(before), load(after)
    print("| point | kind | seed | nt-2 (47a9739) | nt-3 | nt-3 set B |")
    print("|---|---|---|---|---|---|")
    for k in sorted(set(a) | set(b)):
        rb, ra = b.get(k), a.get(k)
        changed = " **changed**" if rb and ra and rb["status"] != ra["status"] else ""
        ev = ""
        if ra is not None:
            how = "whole pool" if ra["eval_exhaustive"] else "disjoint A/B"
            interval = f"[{ra['eval_acc_lo']:.4f}, {ra['eval_acc_hi']:.4f}]"
            ev = f"pool {ra['eval_pool']}, {how}, {int(ra['eval_tokens'])} tokens, {interval}"
        print(f"| {k[0]} | {k[1]} | {k[2]} | {verdict(rb)} | {verdict(ra)}{changed} | {ev} |")


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        compare(sys.argv[2], sys.argv[3])
