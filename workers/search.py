"""Searchers for Ray Tune: paired Optuna search and the adaptive frontier search.

Both keep the comparison fair: every configuration is run once per attention kind (and
per seed), so all kinds get the same points, seeds, data streams and budget.
"""

from __future__ import annotations

import logging
import pickle
from collections import defaultdict
from typing import Any

import optuna
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from studies.spec import StudySpec

log = logging.getLogger(__name__)

Cell = dict[str, Any]


def make_cell(spec: StudySpec, kind: str, size_idx: int, point_idx: int, lr: float, seed: int) -> Cell:
    """The varying part of one trial's config (JSON-able)."""
    size = spec.model.all_sizes()[size_idx]
    point = spec.task.points()[point_idx]
    return {
        "kind": kind,
        "size": size.model_dump(),
        "size_idx": size_idx,
        "point": point.name,
        "members": [list(m) for m in point.members],
        "coords": list(point.coords),
        "lr": lr,
        "seed": seed,
    }


def frontier_score(coords: list[int], solved: bool, acc: float | None) -> float:
    """Optuna's objective: solved points score 1 + their complexity rank, unsolved ones their accuracy (< 1)."""
    if solved:
        return 1.0 + float(sum(coords))
    return float(acc or 0.0) * 0.999


class _PicklingSearcher(Searcher):
    """Save and restore the whole searcher state (Tune checkpoints it with the experiment)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class PairedOptunaSearch(_PicklingSearcher):
    """Optuna picks (model size, task point, lr); each pick runs for every kind and seed.

    Optuna sees one trial per pick, told when all its twins finished: objectives are the
    mean frontier score (max) and the parameter count (min), so Optuna's Pareto front is
    the capacity frontier.
    """

    def __init__(self, spec: StudySpec, storage_url: str, study_name: str) -> None:
        super().__init__(metric="score", mode="max")
        self.spec = spec
        lr = spec.hparams.lr
        lr_dist: optuna.distributions.BaseDistribution = (
            optuna.distributions.CategoricalDistribution(lr.values)
            if lr.values is not None
            else optuna.distributions.FloatDistribution(lr.low or 0.0, lr.high or 1.0, log=lr.log)
        )
        space = {
            "size_idx": optuna.distributions.CategoricalDistribution(list(range(len(spec.model.all_sizes())))),
            "point_idx": optuna.distributions.CategoricalDistribution(list(range(len(spec.task.points())))),
            "lr": lr_dist,
        }
        sampler = optuna.samplers.TPESampler(seed=spec.search.sampler_seed, n_startup_trials=4)
        self.inner = OptunaSearch(
            space=space,
            metric=["score", "n_params"],
            mode=["max", "min"],
            sampler=sampler,
            storage=optuna.storages.RDBStorage(storage_url),
            study_name=study_name,
        )
        self.twins = [(k, s) for s in spec.seeds for k in spec.attention]
        self.pending: list[tuple[str, Cell]] = []  # twins waiting to be handed out
        self.base_of: dict[str, str] = {}
        self.results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.n_picks = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> Any:
        if not self.pending:
            if self.n_picks >= (self.spec.search.n_trials or 0):
                return Searcher.FINISHED
            base = f"pick{self.n_picks:05d}"
            params = self.inner.suggest(base)
            if params is None or params == Searcher.FINISHED:
                return params
            self.n_picks += 1
            for kind, seed in self.twins:
                cell = make_cell(self.spec, kind, params["size_idx"], params["point_idx"], params["lr"], seed)
                self.pending.append((base, cell))
        base, cell = self.pending.pop(0)
        self.base_of[trial_id] = base
        return {"cell": cell}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        base = self.base_of.get(trial_id)
        if base is None:
            return
        self.results[base].append(result or {})
        if len(self.results[base]) == len(self.twins):
            done = self.results.pop(base)
            scores = [r["score"] for r in done if "score" in r]
            n_params = next((r["n_params"] for r in done if "n_params" in r), None)
            combined = {"score": sum(scores) / len(scores), "n_params": n_params} if scores and n_params else None
            self.inner.on_trial_complete(base, combined, error=combined is None)

    def fail_orphans(self) -> int:
        """Mark Optuna trials left RUNNING by a hard kill, which no restored trial will finish."""
        study: Any = self.inner._ot_study
        known = {t.number for t in self.inner._ot_trials.values()} - {
            self.inner._ot_trials[b].number for b in self.inner._completed_trials if b in self.inner._ot_trials
        }
        orphans = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING" and t.number not in known]
        for t in orphans:
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        return len(orphans)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        n = self.fail_orphans()
        if n:
            log.warning("marked %d stale RUNNING Optuna trial(s) failed after resume", n)


class FrontierSearch(_PicklingSearcher):
    """Adaptive search along the last complexity axis, by bisection in each lane.

    A lane is (kind, size, seed, lr, the other axes); harder points on the lane are
    assumed unsolved once a point is unsolved (monotonicity), easier ones solved once a
    point is solved. A trial without an outcome (diverged, failed) bounds from above,
    conservatively.
    """

    def __init__(self, spec: StudySpec) -> None:
        super().__init__(metric="score", mode="max")
        self.spec = spec
        points = spec.task.points()
        self.index = {tuple(p.coords): i for i, p in enumerate(points)}
        lanes_rest = sorted({tuple(p.coords[:-1]) for p in points})
        self.length = max(p.coords[-1] for p in points) + 1
        self.lanes: list[dict[str, Any]] = []
        for size_idx in range(len(spec.model.all_sizes())):
            for rest in lanes_rest:
                for lr in spec.hparams.lr.grid_values():
                    for seed in spec.seeds:
                        for kind in spec.attention:
                            self.lanes.append(
                                {"kind": kind, "size_idx": size_idx, "rest": rest, "lr": lr, "seed": seed}
                                | {"lo": -1, "hi": self.length, "busy": None}
                            )
        self.lane_of: dict[str, int] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> Any:
        open_lanes = [i for i, ln in enumerate(self.lanes) if ln["hi"] - ln["lo"] > 1]
        if not open_lanes:
            return Searcher.FINISHED
        for i in open_lanes:
            lane = self.lanes[i]
            if lane["busy"] is None:
                mid = (lane["lo"] + lane["hi"]) // 2
                lane["busy"] = mid
                self.lane_of[trial_id] = i
                point_idx = self.index[(*lane["rest"], mid)]
                cell = make_cell(self.spec, lane["kind"], lane["size_idx"], point_idx, lane["lr"], lane["seed"])
                return {"cell": cell}
        return None  # every open lane waits for a result

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        i = self.lane_of.pop(trial_id, None)
        if i is None:
            return
        lane = self.lanes[i]
        probe, lane["busy"] = lane["busy"], None
        if result and result.get("solved"):
            lane["lo"] = max(lane["lo"], probe)
        else:
            lane["hi"] = min(lane["hi"], probe)
