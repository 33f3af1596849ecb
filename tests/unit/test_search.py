"""Searchers without Ray Tune: frontier bisection, paired Optuna twins, save/restore, scores."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from ray.tune.search import Searcher

from studies.spec import StudySpec
from workers.search import FrontierSearch, PairedOptunaSearch, frontier_score

FINISHED = Searcher.FINISHED
SIZES = [{"d_model": 16, "n_layers": 1, "n_heads": 2}, {"d_model": 32, "n_layers": 2, "n_heads": 2}]
RUNGS = [[[5, 1]], [[7, 1]], [[7, 2]], [[11, 2]], [[13, 2]], [[13, 3]], [[17, 3]], [[19, 4]]]


def spec_of(**fields: Any) -> StudySpec:
    data: dict[str, Any] = {"name": "s", "task": {"ladder": RUNGS}, "model": {"sizes": SIZES}} | fields
    return StudySpec.model_validate(data)


LADDER = spec_of(seeds=[0, 1], hparams={"lr": {"values": [1e-3, 3e-3]}}, search={"method": "frontier"})
GRID = spec_of(
    task={"grid": {"N": [5, 7, 11], "T": [1, 2, 3, 4, 5]}},
    model={"sizes": SIZES[:1]},
    search={"method": "frontier"},
)

Cell = dict[str, Any]
Lane = tuple[Any, ...]


def lane_key(cell: Cell) -> Lane:
    return (cell["kind"], cell["size_idx"], cell["lr"], cell["seed"], tuple(cell["coords"][:-1]))


class Sim:
    """Drives a searcher as Tune would: up to ``concurrency`` trials in flight, oldest finishes first."""

    def __init__(self, searcher: Searcher, truth: Callable[[Cell], int], concurrency: int) -> None:
        self.searcher, self.truth, self.concurrency = searcher, truth, concurrency
        self.running: deque[tuple[str, Cell]] = deque()
        self.done: list[tuple[str, Cell, bool]] = []
        self.suggested: list[tuple[str, Cell]] = []
        self.finished = False
        self.next_id = 0

    def result(self, cell: Cell) -> dict[str, Any]:
        return {"solved": cell["coords"][-1] <= self.truth(cell)}

    def fill(self) -> None:
        while len(self.running) < self.concurrency:
            trial_id = f"trial{self.next_id:04d}"
            got = self.searcher.suggest(trial_id)
            if got is None:
                return
            if got == FINISHED:
                self.finished = True
                return
            self.next_id += 1
            cell = got["cell"]
            assert lane_key(cell) not in {lane_key(c) for _, c in self.running}, "a lane has two trials in flight"
            self.running.append((trial_id, cell))
            self.suggested.append((trial_id, cell))

    def step(self) -> bool:
        """Fill, then finish the oldest running trial; False once nothing is left to do."""
        self.fill()
        if not self.running:
            return False
        trial_id, cell = self.running.popleft()
        result = self.result(cell)
        self.searcher.on_trial_complete(trial_id, result)
        self.done.append((trial_id, cell, result["solved"]))
        return True

    def run(self, max_trials: int = 10_000) -> None:
        while self.step():
            assert len(self.done) <= max_trials


def ladder_truth(cell: Cell) -> int:
    """A known monotone frontier per lane, from -1 (nothing solved) to 7 (everything solved)."""
    kind_bonus = 2 if cell["kind"] == "ea" else 0
    return min(7, -1 + 4 * cell["size_idx"] + kind_bonus + cell["seed"] + (cell["lr"] > 2e-3))


def recovered(done: list[tuple[str, Cell, bool]]) -> dict[Lane, int]:
    """Per lane: the highest solved probe, checked against the lowest unsolved probe above it."""
    out: dict[Lane, tuple[int, int]] = {}
    for _, cell, solved in done:
        lo, hi = out.get(lane_key(cell), (-1, 10**9))
        x = cell["coords"][-1]
        out[lane_key(cell)] = (max(lo, x), hi) if solved else (lo, min(hi, x))
    return {k: lo for k, (lo, hi) in out.items()}


def bracketed(done: list[tuple[str, Cell, bool]], length: int) -> dict[Lane, bool]:
    """Whether each lane's trials prove its frontier: solved at f (or f = -1), unsolved at f + 1 (or f = top)."""
    probes: dict[Lane, dict[int, bool]] = {}
    for _, cell, solved in done:
        probes.setdefault(lane_key(cell), {})[cell["coords"][-1]] = solved
    front = recovered(done)
    return {
        k: (front[k] == -1 or p.get(front[k]) is True) and (front[k] == length - 1 or p.get(front[k] + 1) is False)
        for k, p in probes.items()
    }


# --- FrontierSearch ---------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 3, 64])
def test_frontier_recovers_a_monotone_ladder_frontier(concurrency: int) -> None:
    search = FrontierSearch(LADDER)
    sim = Sim(search, ladder_truth, concurrency)
    sim.run()
    assert sim.finished
    n_lanes = len(LADDER.attention) * len(SIZES) * len(LADDER.seeds) * 2
    lanes = {lane_key(c) for _, c, _ in sim.done}
    assert len(lanes) == n_lanes, "every lane was probed"
    expected = {lane_key(c): ladder_truth(c) for _, c, _ in sim.done}
    assert recovered(sim.done) == expected
    assert {-1, 7} <= set(expected.values()), "the truth covers both ends of the ladder"
    assert all(bracketed(sim.done, len(RUNGS)).values())
    # bisection: at most ceil(log2(9)) = 4 probes per lane, far fewer than the full grid
    per_lane = [sum(lane_key(c) == k for _, c, _ in sim.done) for k in lanes]
    assert max(per_lane) <= math.ceil(math.log2(len(RUNGS) + 1))
    assert len(sim.done) < LADDER.planned_trials() / 2
    # every lane converged, and the searcher says so
    assert all(ln["hi"] - ln["lo"] == 1 for ln in search.lanes)
    assert search.suggest("after") == FINISHED
    assert search.suggest("after2") == FINISHED


def test_frontier_first_probe_is_the_middle_rung() -> None:
    search = FrontierSearch(LADDER)
    first = search.suggest("t0")
    assert first["cell"]["coords"] == [3]  # (-1 + 8) // 2
    assert first["cell"]["point"] == "N11_T2"
    assert first["cell"]["members"] == [[11, 2]]


def test_frontier_returns_none_while_every_open_lane_waits() -> None:
    spec = spec_of(attention=["dpa", "ea"], model={"sizes": SIZES[:1]})  # two lanes
    search = FrontierSearch(spec)
    a, b = search.suggest("a"), search.suggest("b")
    assert isinstance(a, dict) and isinstance(b, dict)
    assert {a["cell"]["kind"], b["cell"]["kind"]} == {"dpa", "ea"}
    assert search.suggest("c") is None
    assert search.suggest("c") is None  # asking again does not hand out a lane twice
    search.on_trial_complete("a", {"solved": True})
    c = search.suggest("c")
    assert c["cell"]["kind"] == a["cell"]["kind"]
    assert c["cell"]["coords"][0] > a["cell"]["coords"][0]  # solved: probe harder
    assert search.suggest("d") is None


def test_frontier_treats_a_failed_trial_as_an_upper_bound_and_ignores_strangers() -> None:
    spec = spec_of(attention=["dpa"], model={"sizes": SIZES[:1]})
    search = FrontierSearch(spec)
    first = search.suggest("a")["cell"]["coords"][0]
    search.on_trial_complete("stranger", {"solved": True})  # not ours: no effect
    assert search.suggest("x") is None
    search.on_trial_complete("a", None, error=True)
    nxt = search.suggest("b")["cell"]["coords"][0]
    assert nxt < first


def test_frontier_bisects_along_T_in_each_N_row() -> None:
    g = GRID.task.grid
    assert g is not None
    top = len(g.T) - 1

    def truth(cell: Cell) -> int:  # a staircase: a larger N solves fewer T; ea one more
        return min(top, 3 - 2 * cell["coords"][0] + (cell["kind"] == "ea"))

    search = FrontierSearch(GRID)
    sim = Sim(search, truth, concurrency=4)
    sim.run()
    assert sim.finished
    rows = {(c["kind"], c["coords"][0]) for _, c, _ in sim.done}
    assert rows == {(k, i) for k in GRID.attention for i in range(len(g.N))}, "one lane per kind and N row"
    for _, cell, _ in sim.done:
        n_idx, t_idx = cell["coords"]
        assert cell["members"] == [[g.N[n_idx], g.T[t_idx]]]
    first_in_row: dict[Lane, int] = {}
    for _, cell, _ in sim.done:
        first_in_row.setdefault(lane_key(cell), cell["coords"][1])
    assert set(first_in_row.values()) == {2}  # (-1 + 5) // 2
    assert recovered(sim.done) == {lane_key(c): truth(c) for _, c, _ in sim.done}
    assert set(recovered(sim.done).values()) == {-1, 0, 1, 2, 3, 4}
    assert all(bracketed(sim.done, top + 1).values())
    assert len(sim.done) < GRID.planned_trials()


def test_frontier_gives_every_kind_the_same_lanes_and_budget() -> None:
    search = FrontierSearch(LADDER)
    sim = Sim(search, lambda c: min(7, c["size_idx"] * 4 + c["seed"]), concurrency=5)  # kind-blind truth
    sim.run()

    def probes(kind: str) -> dict[Lane, list[int]]:
        out: dict[Lane, list[int]] = {}
        for _, c, _ in sim.done:
            if c["kind"] == kind:
                out.setdefault(lane_key(c)[1:], []).append(c["coords"][0])
        return out

    dpa, ea = probes("dpa"), probes("ea")
    assert set(dpa) == set(ea)
    assert {(k[0], k[1], k[2]) for k in dpa} == {
        (s, lr, seed) for s in (0, 1) for lr in (1e-3, 3e-3) for seed in (0, 1)
    }
    assert dpa == ea, "same truth: the same probes, in the same order"
    lanes_by_kind = {
        k: sorted((ln["size_idx"], ln["lr"], ln["seed"]) for ln in search.lanes if ln["kind"] == k)
        for k in LADDER.attention
    }
    assert lanes_by_kind["dpa"] == lanes_by_kind["ea"]


def test_frontier_save_restore_continues_identically(tmp_path: Path) -> None:
    search = FrontierSearch(LADDER)
    sim = Sim(search, ladder_truth, concurrency=3)
    for _ in range(10):
        sim.step()
    sim.fill()
    assert sim.running, "save while trials are in flight"
    path = tmp_path / "searcher.pkl"
    search.save(str(path))
    in_flight, next_id, n_done = list(sim.running), sim.next_id, len(sim.done)
    sim.run()
    assert sim.finished

    fresh = FrontierSearch(LADDER)
    again = Sim(fresh, ladder_truth, concurrency=3)
    fresh.restore(str(path))
    again.running, again.next_id = deque(in_flight), next_id
    again.run()
    assert again.finished
    assert [(t, lane_key(c), c["coords"]) for t, c, _ in again.done] == [
        (t, lane_key(c), c["coords"]) for t, c, _ in sim.done[n_done:]
    ]
    assert fresh.lanes == search.lanes


# --- PairedOptunaSearch -----------------------------------------------------------------------

PAIRED = spec_of(
    task={"ladder": RUNGS[:4]},
    seeds=[0, 1],
    hparams={"lr": {"low": 1e-4, "high": 1e-2}},
    search={"method": "optuna", "n_trials": 3, "sampler_seed": 7},
)
TWINS = len(PAIRED.attention) * len(PAIRED.seeds)


@pytest.fixture
def storage(tmp_path: Path) -> str:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def study(storage: str, name: str = "paired") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def take(search: PairedOptunaSearch, n: int, prefix: str = "t") -> list[tuple[str, Cell]]:
    out = []
    for i in range(n):
        got = search.suggest(f"{prefix}{i}")
        assert isinstance(got, dict), got
        out.append((f"{prefix}{i}", got["cell"]))
    return out


def test_paired_pick_runs_every_kind_and_seed_on_one_config(storage: str) -> None:
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    got = take(search, TWINS * 2)
    trials = study(storage).get_trials()
    assert len(trials) == 2, "one Optuna trial per pick, asked when the pick starts"
    for pick, ot in enumerate(trials):
        block = [c for _, c in got[pick * TWINS : (pick + 1) * TWINS]]
        assert sorted((c["kind"], c["seed"]) for c in block) == sorted(
            (k, s) for k in PAIRED.attention for s in PAIRED.seeds
        )
        for c in block:
            assert c["size_idx"] == ot.params["size_idx"]
            assert c["size"] == SIZES[ot.params["size_idx"]]
            assert c["coords"] == [ot.params["point_idx"]]
            assert c["point"] == PAIRED.task.points()[ot.params["point_idx"]].name
            assert c["lr"] == ot.params["lr"]
            assert 1e-4 <= c["lr"] <= 1e-2


def test_paired_tells_optuna_mean_score_and_size_after_the_last_twin(storage: str) -> None:
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    got = take(search, TWINS)
    scores = [1.0, 3.0, 0.5, 2.5]
    for (trial_id, _), score in zip(got[:-1], scores[:-1], strict=True):
        search.on_trial_complete(trial_id, {"score": score, "n_params": 1234, "solved": score > 1})
        assert study(storage).get_trials()[0].state == optuna.trial.TrialState.RUNNING
    search.on_trial_complete(got[-1][0], {"score": scores[-1], "n_params": 1234})
    done = study(storage).get_trials()[0]
    assert done.state == optuna.trial.TrialState.COMPLETE
    assert done.values == [pytest.approx(sum(scores) / len(scores)), 1234]
    search.on_trial_complete("stranger", {"score": 9.0, "n_params": 1})  # not ours: ignored
    assert len(study(storage).get_trials()) == 1


def test_paired_pick_whose_twins_all_failed_is_failed(storage: str) -> None:
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    for trial_id, _ in take(search, TWINS):
        search.on_trial_complete(trial_id, None, error=True)
    assert study(storage).get_trials()[0].state == optuna.trial.TrialState.FAIL


def test_paired_stops_after_n_trials_picks(storage: str) -> None:
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    n = PAIRED.search.n_trials or 0
    got = take(search, n * TWINS)
    assert len(got) == PAIRED.planned_trials()
    assert search.suggest("more") == FINISHED
    for trial_id, cell in got:
        search.on_trial_complete(trial_id, {"score": frontier_score(cell["coords"], False, 0.5), "n_params": 10})
    assert search.suggest("more") == FINISHED
    trials = study(storage).get_trials()
    assert len(trials) == n
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_fail_orphans_fails_only_running_trials_the_searcher_does_not_know(storage: str) -> None:
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    first = take(search, TWINS, "a")
    for trial_id, _ in first:
        search.on_trial_complete(trial_id, {"score": 1.0, "n_params": 10})
    take(search, 1, "b")  # pick 1 is in flight: RUNNING and known
    orphan = study(storage).ask()  # RUNNING, asked by a process that died
    assert search.fail_orphans() == 1
    states = {t.number: t.state for t in study(storage).get_trials()}
    assert states == {
        0: optuna.trial.TrialState.COMPLETE,
        1: optuna.trial.TrialState.RUNNING,
        orphan.number: optuna.trial.TrialState.FAIL,
    }
    assert search.fail_orphans() == 0


def test_paired_restore_fails_picks_made_after_the_checkpoint(storage: str, tmp_path: Path) -> None:
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    got = take(search, TWINS + 1)
    path = tmp_path / "searcher.pkl"
    search.save(str(path))
    take(search, TWINS, "late")  # pick 2 asked, then the driver is killed before the next checkpoint
    fresh = PairedOptunaSearch(PAIRED, storage, "paired")
    fresh.restore(str(path))
    states = [t.state for t in study(storage).get_trials()]
    assert states == [optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL]
    # the restored searcher hands out the rest of pick 1, then finishes it with Optuna
    rest = take(fresh, TWINS - 1, "r")
    assert {c["lr"] for _, c in rest} == {got[-1][1]["lr"]}
    for trial_id, _ in [*got[TWINS:], *rest]:
        fresh.on_trial_complete(trial_id, {"score": 2.0, "n_params": 10})
    assert study(storage).get_trials()[1].state == optuna.trial.TrialState.COMPLETE


# --- frontier_score ---------------------------------------------------------------------------

COORDS = [[0], [1], [5], [0, 0], [0, 3], [2, 0], [2, 3], [4, 4]]


def dominates(a: list[int], b: list[int]) -> bool:
    return a != b and all(x >= y for x, y in zip(a, b, strict=True))


def test_any_solved_point_scores_above_any_unsolved_one() -> None:
    accs: list[float | None] = [None, 0.0, 0.5, 0.98, 0.999, 1.0]
    unsolved = [frontier_score(c, False, a) for c in COORDS for a in accs]
    solved = [frontier_score(c, True, 1.0) for c in COORDS]
    assert max(unsolved) < min(solved)
    assert frontier_score([3], False, None) == 0.0


def test_harder_solved_points_score_higher() -> None:
    pairs = [(a, b) for a in COORDS for b in COORDS if len(a) == len(b) and dominates(a, b)]
    assert len(pairs) > 10
    for harder, easier in pairs:
        assert frontier_score(harder, True, 1.0) > frontier_score(easier, True, 1.0), (harder, easier)


def test_unsolved_points_rank_by_accuracy() -> None:
    assert frontier_score([0], False, 0.9) > frontier_score([0], False, 0.5) > frontier_score([0], False, None)
