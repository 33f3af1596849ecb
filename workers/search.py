"""Searchers for Ray Tune: paired Optuna search and the adaptive frontier search.

Both keep the comparison fair: every configuration is run once per attention kind (and
per seed), so all kinds get the same points, seeds, data streams and budget.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
from collections import defaultdict
from typing import Any

import optuna
from ray.tune.search import Searcher
from scipy.optimize import isotonic_regression

from studies.records import OUTCOMES, trial_key
from studies.spec import StudySpec
from studies.stats import SOLVED_AT, decide, seeds_to_decide
from workers.model import ModelConfig, count_parameters

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


def grid_cells(spec: StudySpec) -> list[Cell]:
    """Every trial of the full grid (size x point x lr x seed x kind), twins of a cell adjacent."""
    return [
        make_cell(spec, kind, si, pi, lr, seed)
        for si in range(len(spec.model.all_sizes()))
        for pi in range(len(spec.task.points()))
        for lr in spec.hparams.lr.grid_values()
        for seed in spec.seeds
        for kind in spec.attention
    ]


def frontier_score(coords: list[int], solved: bool, acc: float | None) -> float:
    """Optuna's objective: solved points score 1 + their complexity rank, unsolved ones their accuracy (< 1)."""
    if solved:
        return 1.0 + float(sum(coords))
    return float(acc or 0.0) * 0.999


def highest_rung_value(rung: float, outcomes: list[dict[str, Any]]) -> float:
    """Optuna's ``frontier`` objective for one kind at one pick: the highest rung it solved there.

    The pick's seeds solve its rung when at least half of them do (the point estimate: Optuna
    steers, the report decides with confidence): the value is then the rung itself. Otherwise
    no rung is solved at this pick, and the value is the mean accuracy minus 1, in [-1, 0): below
    every solved rung, and higher the nearer the seeds came. Maximised with the parameter count
    minimised, the Pareto front holds, per size, the highest rung each kind solved.
    """
    solved = sum(r.get("status") == "solved" for r in outcomes)
    if solved >= SOLVED_AT * len(outcomes):
        return rung
    accs = [float(a) for r in outcomes if isinstance(a := r.get("eval_acc"), int | float) and math.isfinite(a)]
    return (sum(accs) / len(outcomes) if accs else 0.0) - 1.0


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

    Size and point are ordered integer indices. A pick is never run twice: a repeat is told to
    Optuna as pruned (user attribute ``ladder.repeat_of``) and Optuna is asked again. When a
    pick's twins have all finished, Optuna is told what the user asked for
    (``search.objective``): ``frontier``, one objective per kind, the highest rung it solved at
    the pick (``highest_rung_value``, maximised), and the parameter count (minimised), so the
    Pareto front gives the highest rung per kind and size; ``margin``, the second kind's
    paired success rate minus the first kind's. A pick without any outcome is told FAIL. Only
    Optuna's public ask/tell API is used; the study lives in the given RDB storage.
    """

    def __init__(self, spec: StudySpec, storage_url: str, study_name: str) -> None:
        super().__init__(metric="score", mode="max")
        self.spec = spec
        self.storage_url, self.study_name = storage_url, study_name
        lr = spec.hparams.lr
        self.space: dict[str, optuna.distributions.BaseDistribution] = {
            "size_idx": optuna.distributions.IntDistribution(0, len(spec.model.all_sizes()) - 1),
            "point_idx": optuna.distributions.IntDistribution(0, len(spec.task.points()) - 1),
            "lr": optuna.distributions.CategoricalDistribution(lr.values)
            if lr.values is not None
            else optuna.distributions.FloatDistribution(lr.low or 0.0, lr.high or 1.0, log=lr.log),
        }
        self.twins = [(k, s) for s in spec.seeds for k in spec.attention]
        self.pending: list[tuple[str, Cell]] = []  # twins waiting to be handed out
        self.base_of: dict[str, str] = {}
        self.cell_of: dict[str, Cell] = {}
        self.number_of: dict[str, int] = {}  # pick -> Optuna trial number
        self.picked: dict[tuple[Any, ...], int] = {}  # (size_idx, point_idx, lr) -> Optuna trial number
        self.results: dict[str, list[tuple[Cell, dict[str, Any] | None]]] = defaultdict(list)
        self.completed: set[int] = set()
        self.n_picks = 0
        self._study: optuna.Study | None = None
        self._asked: dict[int, optuna.trial.Trial] = {}  # live trial objects (not pickled)

    @property
    def directions(self) -> list[optuna.study.StudyDirection]:
        up, down = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
        return [up] if self.spec.search.objective == "margin" else [up] * len(self.spec.attention) + [down]

    @property
    def metric_names(self) -> list[str]:
        """The objectives by name (shown by optuna-dashboard)."""
        kinds = self.spec.attention
        return ["margin"] if self.spec.search.objective == "margin" else [f"rung_{k}" for k in kinds] + ["n_params"]

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = optuna.create_study(
                storage=optuna.storages.RDBStorage(self.storage_url),
                study_name=self.study_name,
                sampler=optuna.samplers.TPESampler(seed=self.spec.search.sampler_seed, n_startup_trials=4),
                directions=self.directions,
                load_if_exists=True,
            )
            with warnings.catch_warnings():  # set_metric_names is marked experimental since Optuna 3.2
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._study.set_metric_names(self.metric_names)
        return self._study

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__ | {"_study": None, "_asked": {}}, f)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def _ask(self) -> optuna.trial.Trial | None:
        """A pick not run before; None once Optuna keeps repeating itself (the space is spent)."""
        for _ in range(50):
            trial = self.study.ask(self.space)
            key = (trial.params["size_idx"], trial.params["point_idx"], trial.params["lr"])
            if key not in self.picked:
                self.picked[key] = trial.number
                self._asked[trial.number] = trial
                return trial
            trial.set_user_attr("ladder.repeat_of", self.picked[key])
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return None

    def suggest(self, trial_id: str) -> Any:
        if not self.pending:
            if self.n_picks >= (self.spec.search.n_trials or 0):
                return Searcher.FINISHED
            trial = self._ask()
            if trial is None:
                return Searcher.FINISHED
            base = f"pick{self.n_picks:05d}"
            self.n_picks += 1
            self.number_of[base] = trial.number
            p = trial.params
            size, point = self.spec.model.all_sizes()[p["size_idx"]], self.spec.task.points()[p["point_idx"]]
            trial.set_user_attr("ladder.pick", base)
            trial.set_user_attr("ladder.size", size.name)
            trial.set_user_attr("ladder.point", point.name)
            keys = [trial_key(kind, size.name, point.name, p["lr"], seed) for kind, seed in self.twins]
            trial.set_user_attr("ladder.trial_keys", keys)  # stable across resumes, unlike Tune's trial ids
            for kind, seed in self.twins:
                self.pending.append((base, make_cell(self.spec, kind, p["size_idx"], p["point_idx"], p["lr"], seed)))
        base, cell = self.pending.pop(0)
        self.base_of[trial_id] = base
        self.cell_of[trial_id] = cell
        asked = self._asked.get(self.number_of[base])
        if asked is not None:  # ties the Optuna trial to its Tune trials (lost for picks asked before a restore)
            asked.set_user_attr(f"ladder.trial.{cell['kind']}.s{cell['seed']}", trial_id)
        return {"cell": cell}

    def _values(self, done: list[tuple[Cell, dict[str, Any] | None]]) -> list[float] | None:
        outcome = {(c["kind"], c["seed"]): r for c, r in done if r and r.get("final") and r.get("status") in OUTCOMES}
        if not outcome:
            return None
        kinds = self.spec.attention
        if self.spec.search.objective == "margin":
            ref, kind = kinds[0], kinds[1] if len(kinds) > 1 else kinds[0]
            seeds = [s for s in self.spec.seeds if (ref, s) in outcome and (kind, s) in outcome]
            if not seeds:
                return None
            solved = {k: [outcome[(k, s)]["status"] == "solved" for s in seeds] for k in (ref, kind)}
            return [(sum(solved[kind]) - sum(solved[ref])) / len(seeds)]
        rung = float(sum(done[0][0]["coords"]))  # every twin of a pick is at the same point
        per_kind = []
        for k in kinds:
            mine = [r for (kk, _), r in outcome.items() if kk == k]
            if not mine:
                return None
            per_kind.append(highest_rung_value(rung, mine))
        n_params = next((r["n_params"] for r in outcome.values() if r.get("n_params")), None)
        return None if n_params is None else [*per_kind, float(n_params)]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        base = self.base_of.get(trial_id)
        if base is None:
            return
        self.results[base].append((self.cell_of[trial_id], None if error else result))
        if len(self.results[base]) == len(self.twins):
            done = self.results.pop(base)
            values = self._values(done)
            number = self.number_of[base]
            if values is None:
                self.study.tell(number, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(number, values)
            self.completed.add(number)
            self._asked.pop(number, None)

    def fail_orphans(self) -> int:
        """Mark Optuna trials left RUNNING by a hard kill, which no restored trial will finish."""
        mine = set(self.number_of.values()) - self.completed
        orphans = [
            t.number
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.number not in mine
        ]
        for number in orphans:
            self.study.tell(number, state=optuna.trial.TrialState.FAIL)
        return len(orphans)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        n = self.fail_orphans()
        if n:
            log.warning("marked %d stale RUNNING Optuna trial(s) failed after resume", n)


class FrontierSearch(_PicklingSearcher):
    """Boundary search: settle each (kind, size) frontier with as few trials as the decisions allow.

    Seeds are pooled per cell (kind, size, point); the first probe of a cell runs all kinds (and
    every lr) on the same seeds, so kinds stay paired, and more seeds go only to kinds whose
    cell is still undetermined. Per lane (a size and, on a grid, the other axes)
    and kind, the boundary lies between the highest rung solved with confidence and the lowest
    unsolved one above it (``studies.stats.decide``, the report's rule); rungs are inferred from
    monotonicity until the data contradict it (a confident hole), after which that lane is
    scanned rung by rung. The next probe is the open rung whose monotone estimate of P(solved)
    is nearest 0.5 (bisection on a fresh lane); a bigger model starts at the smaller one's
    boundary. A probe adds just enough seeds that the cell could be decided, and only to cells
    still undetermined. Failed, OOM, preempted, diverged and early-stopped trials are censored:
    retried up to ``max_retries`` times on the same seed, never counted as unsolved. With
    ``verify``, a settled lane is checked at its easiest rung (a hole there turns it to scanning).

    ``next_cells(k)`` hands out up to k trial cells at once (a pack); ``record(cell, result)``
    tells the searcher one cell's result. ``suggest`` / ``on_trial_complete`` wrap them for Tune.
    """

    def __init__(self, spec: StudySpec, max_retries: int = 2, verify: bool = True) -> None:
        super().__init__(metric="score", mode="max")
        self.spec = spec
        self.max_retries = max_retries
        self.verify = verify
        points = spec.task.points()
        self.points = points
        self.index = {tuple(p.coords): i for i, p in enumerate(points)}
        self.length = max(p.coords[-1] for p in points) + 1
        rests = sorted({tuple(p.coords[:-1]) for p in points})
        self.size_order = _sizes_by_params(spec)
        self.lanes = [(si, rest) for si in self.size_order for rest in rests]
        self.kinds = list(spec.attention)
        self.lrs = spec.hparams.lr.grid_values()
        # outcomes[(kind, size_idx, point_idx)][(seed, lr)] = solved; tried/censored per (cell, seed, lr)
        self.outcomes: dict[tuple[str, int, int], dict[tuple[int, float], bool]] = defaultdict(dict)
        self.censored: dict[tuple[str, int, int, int, float], int] = defaultdict(int)
        self.in_flight: dict[tuple[str, int, int, int, float], int] = defaultdict(int)
        self.queue: list[Cell] = []
        self.cell_of: dict[str, Cell] = {}
        self.n_suggested = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    # --- decisions -----------------------------------------------------------------------

    def _counts(self, kind: str, si: int, pi: int) -> tuple[int, int]:
        """(successes, outcomes) of a cell at its best lr (for steering; the report scores lrs honestly)."""
        obs = self.outcomes.get((kind, si, pi), {})
        best = (0, 0)
        for lr in self.lrs:
            got = [v for (_, x), v in obs.items() if x == lr]
            k, n = sum(got), len(got)
            if n and (k / n, n) > ((best[0] / best[1]) if best[1] else -1.0, best[1]):
                best = (k, n)
        return best

    def _states(self, kind: str, si: int, rest: tuple[int, ...]) -> list[str]:
        out: list[str] = []
        for r in range(self.length):
            pi = self.index.get((*rest, r))
            k, n = self._counts(kind, si, pi) if pi is not None else (0, 0)
            out.append(decide(k, n) if n else "unknown")
        return out

    def lane_status(self, kind: str, si: int, rest: tuple[int, ...]) -> tuple[int, int, bool]:
        """(lo, hi, monotone): rungs <= lo are solved, rungs >= hi unsolved (inferred where monotone).

        A confident hole (an unsolved rung below a solved one) makes the lane non-monotone;
        then lo and hi bound only the rungs decided directly.
        """
        states = self._states(kind, si, rest)
        solved = [r for r, st in enumerate(states) if st == "solved"]
        unsolved = [r for r, st in enumerate(states) if st == "unsolved"]
        lo = max(solved, default=-1)
        monotone = not any(u < lo for u in unsolved)
        hi = min((u for u in unsolved if u > lo), default=self.length)
        return lo, hi, monotone

    def _open_rungs(self, kind: str, si: int, rest: tuple[int, ...]) -> list[int]:
        states = self._states(kind, si, rest)
        lo, hi, monotone = self.lane_status(kind, si, rest)
        if monotone:
            open_ = [r for r in range(lo + 1, hi) if (*rest, r) in self.index]
            if open_:
                return open_
            # settled: cells probed on the way that are still undetermined get seeds too, so the
            # report (which infers nothing) can call the boundary determined
            open_ = [r for r, st in enumerate(states) if st == "undetermined"]
            if open_ or not self.verify:
                return open_
            # settled if monotone: check the easiest rung, where a hole shows itself cheaply (solved
            # trials stop early); a contradiction turns the lane to scanning. A jump above an unsolved
            # rung is not looked for: every check there costs the full budget (the grid finds those).
            return [r for r in (0,) if r < lo and (*rest, r) in self.index and states[r] not in ("solved", "unsolved")]
        return [r for r, st in enumerate(states) if st not in ("solved", "unsolved") and (*rest, r) in self.index]

    def _estimate(self, kind: str, si: int, rest: tuple[int, ...], open_: list[int]) -> dict[int, float]:
        """P(solved) per open rung: observed rates shrunk toward a straight line from the solved side
        (1) to the unsolved side (0), made non-increasing by weighted PAVA."""
        lo, hi, _ = self.lane_status(kind, si, rest)
        rates, weights = [], []
        for r in open_:
            k, n = self._counts(kind, si, self.index[(*rest, r)])
            prior = (hi - r) / (hi - lo) if hi > lo else 0.5
            rates.append((k + prior) / (n + 1))
            weights.append(n + 1.0)
        fit = isotonic_regression(rates, weights=weights, increasing=False).x
        return {r: float(p) for r, p in zip(open_, fit, strict=True)}

    def _start_rung(self, kind: str, si: int, rest: tuple[int, ...]) -> int | None:
        """A fresh lane of a bigger model starts at the next smaller model's boundary."""
        pos = self.size_order.index(si)
        if pos == 0:
            return None
        lo, _, _ = self.lane_status(kind, self.size_order[pos - 1], rest)
        return lo if lo >= 0 else None

    def _free_seeds(self, si: int, pi: int, kinds: list[str]) -> list[int]:
        """Seeds not yet run at this cell by any of ``kinds`` at any lr (nor retried out), in spec order."""
        free = []
        for seed in self.spec.seeds:
            keys = [(kind, si, pi, seed, lr) for kind in kinds for lr in self.lrs]
            if any(
                (seed, k[4]) in self.outcomes.get(k[:3], {})
                or self.in_flight.get(k)
                or self.censored.get(k, 0) > self.max_retries
                for k in keys
            ):
                continue
            free.append(seed)
        return free

    def _probe_rung(self, kind: str, si: int, rest: tuple[int, ...]) -> int | None:
        """The rung to probe next for one kind on a lane, or None when its boundary is settled (or seeds ran out)."""
        open_ = [r for r in self._open_rungs(kind, si, rest) if self._free_seeds(si, self.index[(*rest, r)], [kind])]
        if not open_:
            return None
        fresh = not any(
            self._counts(kind, si, self.index[(*rest, r)])[1] for r in range(self.length) if (*rest, r) in self.index
        )
        start = self._start_rung(kind, si, rest)
        if fresh and start in open_:
            return start
        est = self._estimate(kind, si, rest, open_)
        mid = (open_[0] + open_[-1]) / 2
        return min(open_, key=lambda r: (abs(est[r] - 0.5), abs(r - mid), r))

    def _lane_busy(self, si: int, rest: tuple[int, ...]) -> bool:
        return any(v and s == si and self._rest_of(p) == rest for (_, s, p, _, _), v in self.in_flight.items())

    def _rest_of(self, pi: int) -> tuple[int, ...]:
        return tuple(self.points[pi].coords[:-1])

    def _plan(self) -> list[Cell]:
        """Next probes: on each idle lane, each kind's rung (P(solved) nearest 0.5), run for every lr."""
        planned: list[Cell] = []
        for si, rest in self.lanes:
            if self._lane_busy(si, rest):
                continue  # one probe per lane at a time: its result decides where the next goes
            rungs = sorted({r for kind in self.kinds if (r := self._probe_rung(kind, si, rest)) is not None})
            for r in rungs:
                pi = self.index[(*rest, r)]
                # a cell's first probe runs every kind (paired seeds); more seeds go only where undetermined
                fresh = not any(self.outcomes.get((k, si, pi)) for k in self.kinds)
                kinds = [
                    k for k in self.kinds if fresh or decide_or_unknown(*self._counts(k, si, pi)) == "undetermined"
                ]
                if not kinds:
                    continue
                need = max(seeds_to_decide(*self._counts(kind, si, pi)) or 1 for kind in kinds)
                for seed in self._free_seeds(si, pi, kinds)[:need]:
                    for lr in self.lrs:
                        for kind in kinds:
                            self.in_flight[(kind, si, pi, seed, lr)] += 1
                            planned.append(make_cell(self.spec, kind, si, pi, lr, seed))
        return planned

    # --- public API ------------------------------------------------------------------------

    def next_cells(self, k: int) -> list[Cell]:
        """Up to ``k`` trial cells to run now (all kinds of a probe together); [] while waiting or done."""
        if len(self.queue) < k:
            self.queue += self._plan()
        out, self.queue = self.queue[:k], self.queue[k:]
        return out

    def done(self) -> bool:
        """Nothing in flight and nothing left worth running."""
        return not self.queue and not any(self.in_flight.values()) and not self._plan_preview()

    def _plan_preview(self) -> bool:
        return any(self._probe_rung(kind, si, rest) is not None for si, rest in self.lanes for kind in self.kinds)

    def record(self, cell: Cell, result: dict[str, Any] | None, error: bool = False) -> None:
        """One cell's result: an outcome (solved/unsolved at full budget) or censored (anything else)."""
        key = (cell["kind"], cell["size_idx"], self.index[tuple(cell["coords"])], cell["seed"], cell["lr"])
        self.in_flight[key] = max(0, self.in_flight[key] - 1)
        status = (result or {}).get("status") if (result or {}).get("final") and not error else None
        if status in ("solved", "unsolved"):
            self.outcomes[key[:3]][(key[3], key[4])] = status == "solved"
        else:
            self.censored[key] += 1
            if self.censored[key] <= self.max_retries:
                log.info("retrying censored trial %s (%s)", key, status or "error")

    def suggest(self, trial_id: str) -> Any:
        got = self.next_cells(1)
        if not got:
            return Searcher.FINISHED if self.done() else None
        self.cell_of[trial_id] = got[0]
        self.n_suggested += 1
        return {"cell": got[0]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        cell = self.cell_of.pop(trial_id, None)
        if cell is not None:
            self.record(cell, result, error)


def decide_or_unknown(successes: int, n: int) -> str:
    """``decide`` for a cell with outcomes; a cell without any is undetermined (it needs seeds)."""
    return decide(successes, n) if n else "undetermined"


def _sizes_by_params(spec: StudySpec) -> list[int]:
    """Size indices, smallest model first (parameter count; spec order breaks ties)."""
    vocab = max(n for p in spec.task.points() for n, _ in p.members)
    sizes = spec.model.all_sizes()
    n = [
        count_parameters(
            ModelConfig(
                vocab_size=vocab,
                context_length=spec.training.context_length,
                d_model=s.d_model,
                n_layers=s.n_layers,
                n_heads=s.n_heads,
            )
        )
        for s in sizes
    ]
    return sorted(range(len(sizes)), key=lambda i: (n[i], i))
