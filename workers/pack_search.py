"""Packed search: a searcher's trial cells run as packs, one Tune trial per pack.

``PackSearch`` wraps a searcher that hands out cells (``next_cells(k)``) and takes results
one cell at a time (``record(cell, result, error)``): Optuna's paired picks and the frontier
search. It asks for a few packs' worth of cells at once, groups them by what a pack shares
(``workers.packing.group_key``; a probe's DPA and EA twins train in one pack while they are
few) and hands Tune the largest pack; every member's final record
is told to the inner searcher once, as the pack reports it or when the pack ends.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from typing import Any, Protocol

from ray.tune.search import Searcher

from workers.packing import plan_packs
from workers.search import Cell, frontier_score


def _finals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The members' final records in a pack's result; Tune hands searchers results flattened (``finals/3/status``)."""
    out: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (result.get("finals") or {}).items()}
    for key, value in result.items():
        if key.startswith("finals/"):
            _, index, name = key.split("/", 2)
            out.setdefault(index, {})[name] = value
    return out


class CellSearcher(Protocol):
    """A searcher that works in trial cells (``PairedOptunaSearch``, ``FrontierSearch``)."""

    def next_cells(self, k: int) -> list[Cell]: ...
    def record(self, cell: Cell, result: dict[str, Any] | None, error: bool = False) -> None: ...
    def done(self) -> bool: ...
    def save(self, checkpoint_path: str) -> None: ...
    def restore(self, checkpoint_path: str) -> None: ...


class PackSearch(Searcher):
    """Hands Tune packs of at most ``limit`` cells of ``inner``; records every member in ``inner`` once.

    Args:
        inner: the searcher that chooses cells.
        fixed: the study's fixed trial config (what packs are grouped by needs it).
        limit: most members a pack may have.
        ask: cells asked of ``inner`` at a time (packs of several kinds come from one ask).
        mix_kinds: DPA and EA cells may share a pack (``workers.packing.plan_packs``).
    """

    mix_kinds = False  # a searcher pickled before packs mixed kinds resumes packing them apart

    def __init__(
        self, inner: CellSearcher, fixed: dict[str, Any], limit: int, ask: int, mix_kinds: bool = True
    ) -> None:
        super().__init__(metric="score", mode="max")
        self.inner, self.fixed, self.limit, self.ask = inner, fixed, limit, ask
        self.mix_kinds = mix_kinds
        self.waiting: list[Cell] = []  # asked of the inner searcher, not yet in a pack
        self.packs: dict[str, list[Cell]] = {}  # Tune trial id -> its members' cells
        self.recorded: dict[str, set[int]] = {}  # Tune trial id -> members told to the inner searcher

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> Any:
        if len(self.waiting) < self.ask:
            self.waiting += self.inner.next_cells(self.ask - len(self.waiting))
        if not self.waiting:
            return Searcher.FINISHED if self.inner.done() else None
        pack = max(plan_packs(self.waiting, self.limit, self.fixed, mix_kinds=self.mix_kinds), key=len)
        taken = {id(c) for c in pack}
        self.waiting = [c for c in self.waiting if id(c) not in taken]
        self.packs[trial_id], self.recorded[trial_id] = pack, set()
        return {"pack": pack}

    def _record(self, trial_id: str, index: int, metrics: dict[str, Any] | None, error: bool = False) -> None:
        if index in self.recorded[trial_id]:
            return
        self.recorded[trial_id].add(index)
        cell = self.packs[trial_id][index]
        if metrics is not None:  # a member's record is what a solo trial's last result would be
            score = frontier_score(cell["coords"], bool(metrics.get("solved")), metrics.get("eval_acc"))
            metrics = metrics | {"final": True, "score": score}
        self.inner.record(cell, metrics, error)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.packs:
            for index, metrics in _finals(result).items():
                self._record(trial_id, int(index), metrics)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.packs:
            return
        self.on_trial_result(trial_id, result or {})  # a resumed pack's last result holds every member's record
        for index in range(len(self.packs[trial_id])):  # a pack that failed or was stopped: the rest have no outcome
            self._record(trial_id, index, None, error=True)
        del self.packs[trial_id], self.recorded[trial_id]

    def save(self, checkpoint_path: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            self.inner.save(os.path.join(d, "inner"))
            with open(os.path.join(d, "inner"), "rb") as f:
                inner = f.read()
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__ | {"inner": None, "_inner_state": inner}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        inner = state.pop("_inner_state")
        state.pop("inner")
        self.__dict__.update(state)
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "inner"), "wb") as f:
                f.write(inner)
            self.inner.restore(os.path.join(d, "inner"))
