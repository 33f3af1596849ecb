"""Packs on Ray Tune: which trials train together, and the pack trainable.

A study's cells are grouped by what a pack shares (``workers.packed.pack_key``: in one study,
the attention kind and model size; a searcher's few DPA and EA cells at a time may share a
pack) and cut into balanced packs: a grid study's all at once,
a searcher's as it hands them out (``workers.pack_search``). One Tune trial
runs one pack (``train_pack``) with the resources of one worker; it reports each member's
evaluations and final record, which the study callback turns into one trial record and
one MLflow child run per member (``member_results``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from studies.spec import StudySpec
from workers.packed import pack_key, run_pack
from workers.reporting import Reporter
from workers.trial import TrialConfig, trial_config

Cell = dict[str, Any]

AUTO_MAX_MEMBERS = 32  # pack: auto on CPU; per-member step time stops falling beyond ~16-32 (bench_packing.py)
# A kind with this many cells of its own in a group trains in packs of its own: DPA and EA mixed in one
# pack cost 0.75-0.93x of a pack of 1-4 members per kind, but 0.99-1.04x at 8 and 1.04-1.13x at 16 (the
# mixed step squares every member's scores; docs/benchmarks.md, "DPA and EA twins in one pack").
MIX_KINDS_BELOW = 8
_STATE = "pack.pt"


OPTUNA_ROUNDS = 4  # pack: auto with Optuna keeps at least this many rounds of picks, so TPE learns between them


def max_members(spec: StudySpec) -> int:
    """Most members a pack of this study may have (1: the study runs unpacked)."""
    pack = spec.execution.pack
    if pack == "off" or (pack == "auto" and spec.early_stopping.asha):  # ASHA cuts trials one by one
        return 1
    if pack == "auto" and spec.search.method == "optuna":
        per_kind = spec.planned_trials() // len(spec.attention)
        packs_per_kind = max(1, spec.max_concurrent // len(spec.attention))  # packs of one kind running at once
        return max(1, min(AUTO_MAX_MEMBERS, per_kind // (OPTUNA_ROUNDS * packs_per_kind)))
    if pack == "auto":
        return AUTO_MAX_MEMBERS
    return int(pack)


def group_key(cell: Cell, fixed: dict[str, Any]) -> tuple[Any, ...]:
    """What a pack's members share (``workers.packed.pack_key`` of the cell's resolved trial config)."""
    return pack_key(trial_config({"cell": cell, "fixed": fixed}))


def plan_packs(
    cells: list[Cell], limit: int, fixed: dict[str, Any], min_packs: int = 1, mix_kinds: bool = False
) -> list[list[Cell]]:
    """Cells grouped by what a pack shares (``group_key``), cut into balanced packs of at most ``limit``.

    DPA and EA cells share a group only with ``mix_kinds``, and only while some kind has fewer
    than ``MIX_KINDS_BELOW`` cells in it (``_by_kind``): a searcher's few cells at a time. A grid
    plans every pack at once, one kind per pack, so that its packs balance over the workers.
    Packs are split further (largest first) until there are ``min_packs`` of them, so that every
    worker gets one. Cell order is kept within a pack.
    """
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for c in cells:
        groups.setdefault(group_key(c, fixed), []).append(c)
    packs: list[list[Cell]] = []
    for group in (part for g in groups.values() for part in _by_kind(g, mix_kinds)):
        packs += _cut(group, math.ceil(len(group) / limit))
    while len(packs) < min_packs and any(len(p) > 1 for p in packs):
        big = max(packs, key=len)
        packs.remove(big)
        packs += _cut(big, 2)
    return packs


def _by_kind(group: list[Cell], mix: bool) -> list[list[Cell]]:
    """A group's cells in one part if ``mix`` and some kind has too few to fill a pack alone; else a part per kind."""
    kinds: dict[str, list[Cell]] = {}
    for c in group:
        kinds.setdefault(c["kind"], []).append(c)
    if mix and min(map(len, kinds.values())) < MIX_KINDS_BELOW:
        return [group]
    return list(kinds.values())


def _cut(cells: list[Cell], n: int) -> list[list[Cell]]:
    """``cells`` in ``n`` contiguous parts whose sizes differ by at most one."""
    size, extra = divmod(len(cells), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(cells[start:end])
        start = end
    return out


def is_pack(config: dict[str, Any]) -> bool:
    return "pack" in config


def member_id(trial_id: str, index: int) -> str:
    """A member's trial id: the pack's Tune trial id and its place in the pack (stable across resumes)."""
    return f"{trial_id}.m{index}"


def cells_of(trial_id: str, config: dict[str, Any]) -> list[tuple[str, Cell]]:
    """(trial id, cell) of every trial a Tune trial stands for: its members, or itself."""
    if is_pack(config):
        return [(member_id(trial_id, i), c) for i, c in enumerate(config["pack"])]
    return [(trial_id, config["cell"])]


def member_results(
    trial_id: str, config: dict[str, Any], result: dict[str, Any]
) -> Iterator[tuple[str, Cell, str, dict[str, Any]]]:
    """(trial id, cell, what, metrics) per trial in one Tune result; ``what`` is ``progress`` or ``final``.

    A solo trial's result is its own; a pack's carries ``members`` (evaluations) and
    ``finals`` (records), keyed by member index.
    """
    if not is_pack(config):
        yield trial_id, config["cell"], "final" if result.get("final") else "progress", result
        return
    for what, key in (("progress", "members"), ("final", "finals")):
        for index, metrics in (result.get(key) or {}).items():
            yield member_id(trial_id, int(index)), config["pack"][int(index)], what, metrics


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}


def train_pack(config: dict[str, Any]) -> None:
    """Ray Tune trainable: one pack; checkpointed every ``checkpoint_every`` evaluations and when a member finishes."""
    cells, fixed = config["pack"], config["fixed"]
    cfgs: list[TrialConfig] = [trial_config({"cell": c, "fixed": fixed}) for c in cells]
    every = int(config.get("checkpoint_every", 1))
    node = {"node_id": ray.get_runtime_context().get_node_id()}
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = torch.load(Path(d) / _STATE, weights_only=False)
    n_evals = 0
    reporter = Reporter(_STATE)  # results go to Tune from a thread: training does not wait for the driver

    def on_eval(
        evaluated: list[tuple[int, dict[str, Any]]], finished: list[tuple[int, dict[str, Any]]], state: Any
    ) -> None:
        nonlocal n_evals
        n_evals += 1
        members = {str(i): _scalars(m) | node for i, m in evaluated}
        finals = {str(i): _scalars(r) | node for i, r in finished}
        result = {"step": evaluated[0][1]["step"], "members": members, "finals": finals}
        result["cpu_s"] = max(m["pack_cpu_s"] for m in members.values())  # what CpuBudgetStopper adds up
        reporter.put(result, state() if finished or n_evals % every == 0 else None)

    records = run_pack(cfgs, on_eval, resume)
    finals = {str(i): _scalars(r) | node for i, r in enumerate(records)}
    cpu = sum(r["cpu_s"] for r in records)
    reporter.put({"final": True, "finals": finals, "step": max(r["steps"] for r in records), "cpu_s": cpu})
    reporter.close()
