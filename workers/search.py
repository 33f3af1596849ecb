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

from studies.records import OUTCOMES, TrialRecord, read_records
from studies.spec import StudySpec
from studies.stats import SOLVED_AT, decide, seeds_to_decide
from workers.model import ModelConfig, count_parameters
from workers.tracking import cell_key

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

    ``next_cells(k)`` hands out up to k twins at once (a pack; picks are asked as needed);
    ``record(cell, result)`` tells the searcher one twin's result. ``suggest`` /
    ``on_trial_complete`` wrap them for Tune.
    """

    def __init__(self, spec: StudySpec, storage_url: str, study_name: str, records: str | None = None) -> None:
        super().__init__(metric="score", mode="max")
        self.spec = spec
        self.storage_url, self.study_name = storage_url, study_name
        self.records_path = records  # the study's trials file: twins of a re-queued pick already on file
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
        self.pick_of: dict[tuple[Any, ...], str] = {}  # twin (kind, seed, size, point, lr) -> pick
        self.cell_of: dict[str, Cell] = {}  # Tune trial id -> cell (unpacked runs)
        self.number_of: dict[str, int] = {}  # pick -> Optuna trial number
        self.picked: dict[tuple[Any, ...], int] = {}  # (size_idx, point_idx, lr) -> Optuna trial number
        self.results: dict[str, list[tuple[Cell, dict[str, Any] | None]]] = defaultdict(list)
        self.completed: set[int] = set()
        self.n_picks = 0
        self.spent = False  # Optuna repeats itself: no new pick to ask
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
            if key not in self.picked:  # _queue_pick adds it
                self._asked[trial.number] = trial
                return trial
            trial.set_user_attr("ladder.repeat_of", self.picked[key])
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return None

    def _new_pick(self) -> bool:
        """Ask Optuna for one more pick and queue its twins; False once n_trials or the space is spent."""
        if self.n_picks >= (self.spec.search.n_trials or 0) or self.spent:
            return False
        trial = self._ask()
        if trial is None:
            self.spent = True
            return False
        p = trial.params
        base, keys = self._queue_pick(trial.number, p)
        trial.set_user_attr("ladder.pick", base)
        trial.set_user_attr("ladder.size", self.spec.model.all_sizes()[p["size_idx"]].name)
        trial.set_user_attr("ladder.point", self.spec.task.points()[p["point_idx"]].name)
        trial.set_user_attr("ladder.trial_keys", keys)  # stable across resumes, unlike Tune's trial ids
        return True

    def _twin_cells(self, params: dict[str, Any]) -> list[Cell]:
        """The twins of a pick with Optuna parameters ``params``."""
        size_idx, point_idx, lr = params["size_idx"], params["point_idx"], params["lr"]
        return [make_cell(self.spec, kind, size_idx, point_idx, lr, seed) for kind, seed in self.twins]

    def _queue_pick(self, number: int, params: dict[str, Any]) -> tuple[str, list[str]]:
        """Queue the twins of Optuna trial ``number`` (its ``params``) as the next pick; its name and trial keys."""
        base = f"pick{self.n_picks:05d}"
        self.n_picks += 1
        self.number_of[base] = number
        self.picked[(params["size_idx"], params["point_idx"], params["lr"])] = number
        cells = self._twin_cells(params)
        for cell in cells:
            self.pick_of[_twin(cell)] = base
            self.pending.append((base, cell))
        return base, [cell_key(c) for c in cells]

    def next_cells(self, k: int) -> list[Cell]:
        """Up to ``k`` trial cells to run now: the twins of as many picks as it takes, in order."""
        out: list[Cell] = []
        while len(out) < k and (self.pending or self._new_pick()):
            out.append(self.pending.pop(0)[1])
        return out

    def done(self) -> bool:
        """No twin left to hand out and no pick left to ask (finished picks may still be running)."""
        return not self.pending and (self.spent or self.n_picks >= (self.spec.search.n_trials or 0))

    def suggest(self, trial_id: str) -> Any:
        got = self.next_cells(1)
        if not got:
            return Searcher.FINISHED
        cell = got[0]
        self.cell_of[trial_id] = cell
        asked = self._asked.get(self.number_of[self.pick_of[_twin(cell)]])
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

    def record(self, cell: Cell, result: dict[str, Any] | None, error: bool = False) -> None:
        """One twin's result; when all twins of its pick are in, Optuna is told (once per pick)."""
        base = self.pick_of.get(_twin(cell))
        if base is None or self.number_of[base] in self.completed:
            return  # not this searcher's, or a twin seen again after a resume: its pick is told already
        got = self.results[base]
        got[:] = [(c, r) for c, r in got if _twin(c) != _twin(cell)]  # a twin recorded again counts once
        got.append((cell, None if error else result))
        if len(got) == len(self.twins):
            done = self.results.pop(base)
            values = self._values(done)
            number = self.number_of[base]
            # skip_if_finished: after a hard kill the DB can be ahead of this searcher's checkpoint
            if values is None:
                self.study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            else:
                self.study.tell(number, values, skip_if_finished=True)
            self.completed.add(number)
            self._asked.pop(number, None)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        cell = self.cell_of.pop(trial_id, None)
        if cell is not None:
            self.record(cell, result, error)

    def recover_orphans(self) -> tuple[int, int]:
        """Optuna trials left RUNNING by a hard kill that this searcher does not know; (re-queued, failed).

        Tune saves its searcher with the experiment at most every 10 s, so a driver killed in between
        forgets the picks it asked since (a driver killed before the first save leaves no searcher at all:
        the study starts afresh, and its new searcher knows none of the study's picks), while Optuna's
        storage has them RUNNING, and their Tune trials may have started (MLflow child runs) or even
        recorded a twin. A forgotten pick that was fully queued (its ``ladder.trial_keys`` are stored)
        is queued again as the same pick: its trials keep their keys, so their MLflow runs and records
        are found again rather than left as orphans, and Optuna is told its result once. Its twins with
        an outcome on file (``records``) are not trained again: the record is their result, so Optuna's
        value is the one the report scores. A pick killed mid-ask (no keys yet), a repeat of a known
        pick, or one beyond ``n_trials`` is told FAIL.
        """
        mine = set(self.number_of.values()) - self.completed
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        requeued = failed = from_records = 0
        on_file = self._outcomes_on_file() if any(t.number not in mine for t in running) else {}
        for t in sorted((t for t in running if t.number not in mine), key=lambda t: t.number):
            params = t.params
            whole = set(params) == set(self.space) and "ladder.trial_keys" in t.user_attrs
            key = (params.get("size_idx"), params.get("point_idx"), params.get("lr"))
            if (
                whole
                and key not in self.picked
                and self.n_picks < (self.spec.search.n_trials or 0)
                and [cell_key(c) for c in self._twin_cells(params)] == t.user_attrs["ladder.trial_keys"]
            ):
                base, _ = self._queue_pick(t.number, params)
                requeued += 1
                # twins recorded before the kill are not trained again: their records are their results
                for cell in [c for b, c in self.pending if b == base and cell_key(c) in on_file]:
                    self.pending.remove((base, cell))
                    self.record(cell, {"final": True} | on_file[cell_key(cell)].model_dump())
                    from_records += 1
                continue
            self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            failed += 1
        if requeued or failed:
            log.warning(
                "Optuna picks an earlier driver left RUNNING: %d queued again (%d twins taken from their records), "
                "%d failed",
                requeued,
                from_records,
                failed,
            )
        return requeued, failed

    def _outcomes_on_file(self) -> dict[str, TrialRecord]:
        """The study's records with an outcome, by trial key (none without a trials file)."""
        if not self.records_path:
            return {}
        return {r.trial_key: r for r in read_records(self.records_path) if r.status in OUTCOMES}

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._upgrade()
        self.recover_orphans()

    def _upgrade(self) -> None:
        """State a searcher pickled before ``next_cells``/``record`` lacks (it kept picks per Tune trial id)."""
        if "pick_of" not in self.__dict__:
            base_of: dict[str, str] = self.__dict__.pop("base_of", {})
            self.pick_of = {_twin(c): base_of[t] for t, c in self.cell_of.items() if t in base_of}
            self.pick_of |= {_twin(c): base for base, c in self.pending}
        self.__dict__.setdefault("spent", False)
        self.__dict__.setdefault("records_path", None)


class FrontierSearch(_PicklingSearcher):
    """Boundary search: settle each (kind, size) frontier with as few trials as the decisions allow.

    Seeds are pooled per cell (kind, size, point). A cell's first probe runs every kind (and every
    lr) on the same seed, so kinds stay paired; more seeds go only to kinds whose cell is still
    undetermined. Per lane (a size and, on a grid, the other axes) and kind, the search steers on
    point estimates and decides only where the report needs a decision (``studies.stats.decide``,
    the report's rule): the highest rung solved and the rung above it. A probe is one seed: a
    solved trial stops early, so probing below the boundary is cheap, while any probed rung above
    it has to be settled unsolved on several full-budget seeds. So a lane walks up one rung at a
    time from its highest likely-solved rung (a bigger model starts at the smaller one's; a fresh
    lane at the middle rung, bisecting down from a failure), then adds seeds to the two cells at
    the boundary until both are decided. Seeds come in the smallest batch that could decide a cell,
    one at a time once its outcomes disagree, and stop when the remaining seeds could not decide
    it (the grid could not either). Such a rung above every certainly solved one leaves the lane's
    frontier undetermined for good on a monotone lane (``_open_at``): from then on only the rungs
    below it get seeds (the interval's lower end, mostly solved trials that stop early), none go
    to settling rungs above it unsolved at full budget. For the same reason a lower boundary cell
    whose outcomes disagree is settled before the cell above it gets more seeds. Rungs above a
    rung settled unsolved are inferred unsolved until the data contradict monotonicity: a
    confident hole (a rung settled unsolved below one settled solved; a failure below the
    boundary is given seeds to tell a hole from noise) turns the lane to scanning every rung
    above its highest solved one. With ``verify``, a lane is checked with one
    seed at its easiest rung, where a hole shows itself cheaply. Failed, OOM, preempted, diverged
    and early-stopped trials are censored: retried up to ``max_retries`` times on the same seed,
    never counted as unsolved. With too few seeds to decide any cell, it runs the whole grid.

    With ``fill_packs`` (set when the study trains packs, ``workers.pack_search``), the ``verify``
    check of a lane's easiest rung, which every lane needs (the walk or the check probes it), joins
    the first pack the lane opens for that kind instead of running alone at the end: a pack's
    member-step costs less than a trial alone (docs/benchmarks.md, "Throughput by pack size").
    Speculating further (a disagreeing cell's deciding seeds at once, the probed rung's, the top
    rung's, the next rung up) costs more than it saves in the packing-aware simulation
    (``benchmarks/bench_frontier.py``).

    ``next_cells(k)`` hands out up to k trial cells at once (a pack); ``record(cell, result)``
    tells the searcher one cell's result. ``suggest`` / ``on_trial_complete`` wrap them for Tune.
    """

    fill_packs = False  # a searcher pickled before fill_packs existed resumes without it

    def __init__(self, spec: StudySpec, max_retries: int = 2, verify: bool = True, fill_packs: bool = False) -> None:
        super().__init__(metric="score", mode="max")
        self.spec = spec
        self.max_retries = max_retries
        self.verify = verify
        self.fill_packs = fill_packs
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
        # no cell can be decided on this many seeds: nothing to steer by, so the grid is the search
        self.whole_grid = seeds_to_decide(0, 0, max_extra=len(spec.seeds)) is None

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

    def _seeds_needed(self, kind: str, si: int, pi: int) -> int | None:
        """The fewest seeds that could still decide a cell: 0 if unprobed or decided, None if no seeds left could."""
        k, n = self._counts(kind, si, pi)
        if not n or decide(k, n) != "undetermined":
            return 0
        return seeds_to_decide(k, n, max_extra=len(self._free_seeds(si, pi, [kind])))

    def _more_seeds(self, kind: str, si: int, pi: int) -> int:
        """Seeds to add to a probed cell now: 0 once it is decided or the seeds left cannot decide it.

        The fewest that could decide it while its outcomes agree; one at a time once they disagree,
        so a cell that turns out undecidable stops as soon as it is.
        """
        need = self._seeds_needed(kind, si, pi)
        if not need:
            return 0
        k, n = self._counts(kind, si, pi)
        return need if k in (0, n) else 1

    def _flying(self, kind: str, si: int, pi: int) -> bool:
        """Some seed of this kind's cell is in flight."""
        return any(v and key[:3] == (kind, si, pi) for key, v in self.in_flight.items())

    def _undecidable(self, kind: str, si: int, pi: int) -> bool:
        """Probed, undetermined, nothing in flight, and no outcomes of the seeds left could decide it."""
        return self._seeds_needed(kind, si, pi) is None and not self._flying(kind, si, pi)

    def _undecidable_above(self, kind: str, si: int, rest: tuple[int, ...]) -> int | None:
        """On a monotone lane, the lowest undecidable rung at or above its top and above every certainly solved rung."""
        lo, _, monotone = self.lane_status(kind, si, rest)
        if not monotone:
            return None
        return next(
            (
                r
                for r in range(max(lo + 1, self._top(kind, si, rest)), self.length)
                if (pi := self.index.get((*rest, r))) is not None and self._undecidable(kind, si, pi)
            ),
            None,
        )

    def _open_at(self, kind: str, si: int, rest: tuple[int, ...]) -> tuple[int | None, dict[int, int]]:
        """The rung that leaves this lane's frontier undetermined for good, or (None, what to look at first).

        The report determines a frontier when its highest certainly solved rung is also its highest
        possibly solved one. An undecidable rung above every certainly solved rung stays possibly
        solved, so only a rung above it settled solved could still determine the frontier: on a
        monotone lane only by noise, or on a plateau (two rungs near the same rate, where the grid's
        eight seeds may settle the upper one by luck). So the rung right above gets a second look
        when a single seed failed it; a success there keeps the lane walking as before. A lane with
        a confident hole is scanned instead.
        """
        r = self._undecidable_above(kind, si, rest)
        nxt = self.index.get((*rest, r + 1)) if r is not None else None
        if r is None or nxt is None:
            return r, {}
        k, n = self._counts(kind, si, nxt)
        if n == 0 or decide(k, n) == "unsolved" or (k == 0 and n >= 2):
            return r, {}
        if (k, n) == (0, 1) and self._more_seeds(kind, si, nxt):
            return None, {r + 1: 1}
        return None, {}

    def _top(self, kind: str, si: int, rest: tuple[int, ...], limit: int | None = None) -> int:
        """The highest rung below ``limit`` most of whose seeds solved it on this lane (-1: none)."""
        likely = [
            r
            for r in range(self.length if limit is None else limit)
            if (pi := self.index.get((*rest, r))) is not None and _likely(*self._counts(kind, si, pi))
        ]
        return max(likely, default=-1)

    def _start_rung(self, kind: str, si: int, rest: tuple[int, ...]) -> int | None:
        """A fresh lane of a bigger model starts at the next smaller model's highest likely-solved rung."""
        pos = self.size_order.index(si)
        if pos == 0:
            return None
        top = self._top(kind, self.size_order[pos - 1], rest)
        return top if top >= 0 else None

    def _wants(self, kind: str, si: int, rest: tuple[int, ...]) -> dict[int, int]:
        """What one kind needs next on a lane: {rung: new seeds}; {} once its boundary is settled.

        Once the lane's frontier can no longer be determined (``_open_at``), only the rungs below the
        rung that keeps it open are worth seeds: they settle the interval's lower end, mostly with
        solved trials that stop early, while settling rungs above it unsolved costs full budgets
        and can determine nothing.
        """
        open_at, first = self._open_at(kind, si, rest)
        if first:
            return first
        limit = self.length if open_at is None else open_at
        rungs = [r for r in range(limit) if (*rest, r) in self.index]
        pis = {r: self.index[(*rest, r)] for r in rungs}
        counts = {r: self._counts(kind, si, pis[r]) for r in rungs}
        probed = [r for r in rungs if counts[r][1]]
        more = {r: self._more_seeds(kind, si, pis[r]) for r in probed}
        _, _, monotone = self.lane_status(kind, si, rest)
        a = self._top(kind, si, rest, limit)
        # the walk stops at the first rung above a that is, or can still be, settled unsolved
        above = [r for r in probed if r > a and (more[r] or decide(*counts[r]) == "unsolved")]
        b = min(above, default=limit) if monotone else limit
        gap = [r for r in rungs if a < r < b and r not in probed]
        if gap and more.get(a) and counts[a][1] < 2 and any(r < a and not _likely(*counts[r]) for r in probed):
            return {a: 1}  # one seed solved it above a failure: noise or a jump? a second seed, before walking on
        if gap:
            start = self._start_rung(kind, si, rest)
            if not probed and start in gap:
                return {start: 1}
            return {gap[0] if a >= 0 else gap[(len(gap) - 1) // 2]: 1}
        if monotone and more.get(a) and 0 < counts[a][0] < counts[a][1]:
            # a's outcomes disagree: if it turns out undecidable, nothing above it is worth settling
            return {a: more[a]}
        wants = {r: more[r] for r in (a, b) if more.get(r)}
        # rungs probed above the boundary must be settled, or the report counts them possibly solved:
        # above a rung settled unsolved on a monotone lane, above the highest solved one when scanning
        floor = (b if b < limit and decide(*counts[b]) == "unsolved" else None) if monotone else a
        if floor is not None:
            wants |= {r: more[r] for r in probed if r > floor and more[r]}
        # a failure below the top: a hole (the lane is then scanned) or noise? one seed at a time
        wants |= {
            r: 1 for r in probed if r < a and more[r] and not _likely(*counts[r]) and 2 * counts[r][0] < counts[r][1]
        }
        if not wants and self.verify and a > 0 and rungs[0] not in probed:
            wants = {rungs[0]: 1}
        return wants

    def _key(self, cell: Cell) -> tuple[str, int, int, int, float]:
        return cell["kind"], cell["size_idx"], self.index[tuple(cell["coords"])], cell["seed"], cell["lr"]

    def _grid_left(self) -> list[Cell]:
        """Grid trials not run yet, not in flight and not retried out."""
        return [
            c
            for c in grid_cells(self.spec)
            if not self.in_flight[key := self._key(c)]
            and (key[3], key[4]) not in self.outcomes.get(key[:3], {})
            and self.censored.get(key, 0) <= self.max_retries
        ]

    def _lane_busy(self, si: int, rest: tuple[int, ...]) -> bool:
        return any(v and s == si and self._rest_of(p) == rest for (_, s, p, _, _), v in self.in_flight.items())

    def _rest_of(self, pi: int) -> tuple[int, ...]:
        return tuple(self.points[pi].coords[:-1])

    def _plan(self) -> list[Cell]:
        """Next probes: on each idle lane, what each kind wants, a fresh cell run for every kind (paired)."""
        if self.whole_grid:
            cells = self._grid_left()
        else:
            cells = [
                make_cell(self.spec, kind, si, self.index[(*rest, r)], lr, seed)
                for si, rest in self.lanes
                if not self._lane_busy(si, rest)  # one probe per lane at a time: its result steers the next
                for r, per_kind in sorted(self._lane_wants(si, rest).items())
                for kind, n in per_kind.items()
                for seed in self._free_seeds(si, self.index[(*rest, r)], [kind])[:n]
                for lr in self.lrs
            ]
            if self.fill_packs:
                cells += self._early_checks(cells)
        for c in cells:
            self.in_flight[self._key(c)] += 1
        return sorted(
            cells, key=lambda c: (c["size_idx"], c["coords"], c["seed"], c["lr"], self.kinds.index(c["kind"]))
        )

    def _early_checks(self, planned: list[Cell]) -> list[Cell]:
        """``fill_packs``: the easiest rung's one-seed check (``verify``), in the pack each kind opens on a lane.

        Every lane ends up probing its easiest rung (the walk reaches it, or ``verify`` checks it once
        the boundary is settled), so running it now, in a pack, only saves a pack of one later.
        Only for a kind with cells planned on the lane (a pack it opens anyway), where that rung has
        no outcome and nothing in flight for the kind: a seed ``_free_seeds`` allows.
        """
        if not self.verify:
            return []
        out: list[Cell] = []
        for kind, si, rest in sorted({(c["kind"], c["size_idx"], tuple(c["coords"][:-1])) for c in planned}):
            first = min(r for r in range(self.length) if (*rest, r) in self.index)
            pi = self.index[(*rest, first)]
            if any(c["kind"] == kind and c["size_idx"] == si and c["coords"] == [*rest, first] for c in planned):
                continue
            if self.outcomes.get((kind, si, pi)) or self._flying(kind, si, pi):
                continue
            seeds = self._free_seeds(si, pi, [kind])[:1]
            out += [make_cell(self.spec, kind, si, pi, lr, seed) for seed in seeds for lr in self.lrs]
        return out

    def _lane_wants(self, si: int, rest: tuple[int, ...]) -> dict[int, dict[str, int]]:
        """{rung: {kind: new seeds}} on one lane; a cell's first probe runs every kind (paired seeds)."""
        wants: dict[int, dict[str, int]] = defaultdict(dict)
        for kind in self.kinds:
            for r, n in self._wants(kind, si, rest).items():
                wants[r][kind] = n
        for r, per_kind in wants.items():
            if not any(self.outcomes.get((k, si, self.index[(*rest, r)])) for k in self.kinds):
                wants[r] = dict.fromkeys(self.kinds, max(per_kind.values()))
        return wants

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
        if self.whole_grid:
            return bool(self._grid_left())
        return any(self._wants(kind, si, rest) for si, rest in self.lanes for kind in self.kinds)

    def record(self, cell: Cell, result: dict[str, Any] | None, error: bool = False) -> None:
        """One cell's result: an outcome (solved/unsolved at full budget) or censored (anything else)."""
        key = self._key(cell)
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


def _twin(cell: Cell) -> tuple[Any, ...]:
    """What tells one trial cell from another within a study (its Tune trial id may change)."""
    return (cell["kind"], cell["seed"], cell["size_idx"], cell["point"], cell["lr"])


def _likely(successes: int, n: int) -> bool:
    """Most of a cell's seeds solved it: the point estimate the search steers by (never a decision)."""
    return 2 * successes > n


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
