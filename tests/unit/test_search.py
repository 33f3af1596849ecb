"""Searchers without Ray Tune: boundary search on simulated truths, paired Optuna twins, save/restore, scores."""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from ray.tune.search import Searcher

from studies.records import TrialRecord, append_record
from studies.spec import StudySpec
from workers.search import FrontierSearch, PairedOptunaSearch, frontier_score, highest_rung_value, make_cell
from workers.tracking import cell_key

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
    return (cell["kind"], cell["size_idx"], tuple(cell["coords"][:-1]))


def probe_key(cell: Cell) -> tuple[Any, ...]:
    """What twins of different kinds share."""
    return (cell["size_idx"], tuple(cell["coords"]), cell["lr"], cell["seed"])


class Sim:
    """Drives a searcher as Tune would: up to ``concurrency`` trials in flight, oldest finishes first.

    ``truth(cell)`` is the highest rung the cell's lane solves (a deterministic truth);
    ``fail(cell, attempt)`` makes that attempt of a trial fail (censored) instead.
    """

    def __init__(
        self,
        searcher: Searcher,
        truth: Callable[[Cell], int],
        concurrency: int,
        fail: Callable[[Cell, int], bool] | None = None,
    ) -> None:
        self.searcher, self.truth, self.concurrency = searcher, truth, concurrency
        self.fail = fail or (lambda cell, attempt: False)
        self.running: deque[tuple[str, Cell]] = deque()
        self.done: list[tuple[str, Cell, bool]] = []
        self.failed: list[tuple[str, Cell]] = []
        self.suggested: list[tuple[str, Cell]] = []
        self.attempts: dict[tuple[Any, ...], int] = {}
        self.finished = False
        self.next_id = 0

    def solved(self, cell: Cell) -> bool:
        return cell["coords"][-1] <= self.truth(cell)

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
            self.running.append((trial_id, got["cell"]))
            self.suggested.append((trial_id, got["cell"]))

    def step(self) -> bool:
        """Fill, then finish the oldest running trial; False once nothing is left to do."""
        self.fill()
        if not self.running:
            return False
        trial_id, cell = self.running.popleft()
        key = (cell["kind"], *probe_key(cell))
        attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
        if self.fail(cell, attempt):
            self.searcher.on_trial_complete(trial_id, None, error=True)
            self.failed.append((trial_id, cell))
            return True
        solved = self.solved(cell)
        self.searcher.on_trial_complete(trial_id, {"final": True, "status": "solved" if solved else "unsolved"})
        self.done.append((trial_id, cell, solved))
        return True

    def run(self, max_trials: int = 10_000) -> None:
        while self.step():
            assert len(self.done) + len(self.failed) <= max_trials


LADDER_TOPS = {("dpa", 0): -1, ("ea", 0): 2, ("dpa", 1): 4, ("ea", 1): 7}


def ladder_truth(cell: Cell) -> int:
    """A known monotone frontier per (kind, size), from -1 (nothing solved) to 7 (everything solved)."""
    return LADDER_TOPS[(cell["kind"], cell["size_idx"])]


SEEDS8 = list(range(8))
LADDER = spec_of(seeds=SEEDS8, search={"method": "frontier"})
LADDER_2LR = spec_of(
    seeds=SEEDS8, hparams={"lr": {"values": [1e-3, 3e-3]}}, search={"method": "frontier"}, caps={"max_trials": 1000}
)
GRID = spec_of(
    task={"grid": {"N": [5, 7, 11], "T": [1, 2, 3, 4, 5]}},
    model={"sizes": SIZES[:1]},
    seeds=SEEDS8,
    search={"method": "frontier"},
)


def boundaries(search: FrontierSearch, spec: StudySpec) -> dict[Lane, tuple[int, int, bool]]:
    rests = sorted({tuple(p.coords[:-1]) for p in spec.task.points()})
    return {
        (k, si, rest): search.lane_status(k, si, rest)
        for k in spec.attention
        for si in range(len(spec.model.all_sizes()))
        for rest in rests
    }


def settled(search: FrontierSearch, spec: StudySpec, concurrency: int) -> Sim:
    """Runs the search on ``ladder_truth`` to the end; asserts it found every lane's boundary."""
    sim = Sim(search, ladder_truth, concurrency)
    sim.run()
    assert sim.finished and search.done()
    for (kind, si, _), (lo, hi, monotone) in boundaries(search, spec).items():
        assert monotone and lo == LADDER_TOPS[(kind, si)] and hi == lo + 1, (kind, si, lo, hi)
    return sim


@pytest.mark.parametrize("concurrency", [1, 3, 64])
def test_boundary_search_settles_a_monotone_ladder_with_a_fraction_of_the_grid(concurrency: int) -> None:
    search = FrontierSearch(LADDER)
    sim = settled(search, LADDER, concurrency)
    expected = LADDER_TOPS
    # a probe is one seed; only the cells the report needs decided get more: 4 (Wilson: 4/4 > 0.5,
    # 0/4 < 0.5), never more, and those are the boundary cells or rungs probed above the boundary
    per_cell: dict[tuple[Any, ...], set[int]] = {}
    for _, c, _ in sim.done:
        per_cell.setdefault((c["kind"], c["size_idx"], c["coords"][0]), set()).add(c["seed"])
    assert {len(v) for v in per_cell.values()} <= {1, 4}
    for (kind, si, rung), seeds in per_cell.items():
        top = expected[(kind, si)]
        assert len(seeds) == 4 if rung in (top, top + 1) else rung < top or len(seeds) == 4, (kind, si, rung)
        assert seeds == set(SEEDS8[: len(seeds)]), "seeds in spec order"
    assert len(sim.done) <= 0.35 * LADDER.planned_trials()
    assert search.suggest("after") == FINISHED


def test_a_cells_first_probe_runs_all_kinds_and_lrs_on_the_same_seeds() -> None:
    search = FrontierSearch(LADDER_2LR)
    sim = Sim(search, ladder_truth, concurrency=5)
    sim.run()
    seeds: dict[tuple[Any, ...], dict[tuple[str, float], list[int]]] = {}
    for _, c in sim.suggested:
        seeds.setdefault((c["size_idx"], tuple(c["coords"])), {}).setdefault((c["kind"], c["lr"]), []).append(c["seed"])
    for per in seeds.values():
        assert set(per) == {(k, lr) for k in ("dpa", "ea") for lr in (1e-3, 3e-3)}, "every kind and lr, paired"
        assert all(v == SEEDS8[: len(v)] for v in per.values()), "seeds in spec order"
        assert min(len(v) for v in per.values()) >= 1, "the first probe runs every kind and lr on one seed"
    assert len({(*probe_key(c), c["kind"]) for _, c in sim.suggested}) == len(sim.suggested), "no trial twice"


def tell(search: FrontierSearch, spec: StudySpec, kind: str, si: int, rung: int, seeds: list[int], solved: int) -> None:
    """Record outcomes without asking: the first ``solved`` of ``seeds`` solved the cell."""
    for i, seed in enumerate(seeds):
        status = "solved" if i < solved else "unsolved"
        search.record(
            make_cell(spec, kind, si, rung, spec.hparams.lr.grid_values()[0], seed), {"final": True, "status": status}
        )


def test_extra_seeds_go_only_to_the_kind_still_undetermined() -> None:
    spec = spec_of(seeds=SEEDS8, model={"sizes": SIZES[:1]}, search={"method": "frontier"})
    search = FrontierSearch(spec)
    for kind in spec.attention:
        for rung in range(3):
            tell(search, spec, kind, 0, rung, [0], 1)
    tell(search, spec, "dpa", 0, 3, [0, 1, 2, 3], 0)  # 0/4: unsolved, decided
    tell(search, spec, "ea", 0, 3, [0, 1, 2, 3], 1)  # 1/4: undetermined, most likely unsolved
    got = search.next_cells(100)
    at = {r: sorted((c["kind"], c["seed"]) for c in got if c["coords"] == [r]) for r in range(len(RUNGS))}
    assert at[3] == [("ea", 4)], "outcomes disagree: one seed at a time, to the undetermined kind only"
    assert at[2] == [(k, s) for k in ("dpa", "ea") for s in (1, 2, 3)], "the boundary's solved side: 3 more seeds"
    assert all(not at[r] for r in (0, 1, 4, 5, 6, 7)), "nothing below the boundary, nothing above it"


def test_a_disagreeing_cell_gets_one_seed_at_a_time_even_when_packs_are_filled() -> None:
    spec = spec_of(seeds=SEEDS8, model={"sizes": SIZES[:1]}, search={"method": "frontier"})
    search = FrontierSearch(spec, fill_packs=True)
    for kind in spec.attention:
        for rung in range(3):
            tell(search, spec, kind, 0, rung, [0], 1)
    tell(search, spec, "dpa", 0, 3, [0, 1, 2, 3], 0)
    tell(search, spec, "ea", 0, 3, [0, 1, 2, 3], 1)  # 1/4: four more unsolved seeds would make it 1/8, unsolved
    got = search.next_cells(100)
    at = {r: sorted((c["kind"], c["seed"]) for c in got if c["coords"] == [r]) for r in range(len(RUNGS))}
    # four at once would save packs, but a cell that disagrees may turn out undecidable, and one seed at a
    # time stops as soon as it does (then the lane's frontier is open and nothing above it gets seeds)
    assert at[3] == [("ea", 4)]
    assert at[2] == [(k, s) for k in ("dpa", "ea") for s in (1, 2, 3)]
    assert at[0] == [], "the easiest rung already has an outcome: no check"
    assert all(not at[r] for r in (1, 4, 5, 6, 7))


def test_fill_packs_checks_the_easiest_rung_in_the_first_pack_and_never_asks_for_it_again() -> None:
    search = FrontierSearch(LADDER, fill_packs=True)
    batch = search.next_cells(100)
    # the middle rung of each fresh lane, and the easiest rung, one seed, for each kind that opens a pack
    assert sorted((c["kind"], c["size_idx"], c["coords"][0], c["seed"]) for c in batch) == sorted(
        (k, si, r, 0) for k in ("dpa", "ea") for si in (0, 1) for r in (0, 3)
    )
    assert search.next_cells(100) == [], "every lane busy; the easiest rung is in flight"
    for c in batch:
        search.record(c, {"final": True, "status": "solved" if c["coords"][0] == 0 else "unsolved"})
    nxt = search.next_cells(100)
    assert nxt and all(c["coords"][0] != 0 for c in nxt), "the easiest rung has its outcome"
    plain = FrontierSearch(LADDER)
    assert all(c["coords"][0] != 0 for c in plain.next_cells(100)), "without fill_packs it waits for the end"


@pytest.mark.parametrize("concurrency", [1, 3, 64])
def test_fill_packs_settles_the_ladder_within_the_spec_seeds_and_never_repeats_a_trial(concurrency: int) -> None:
    search = FrontierSearch(LADDER_2LR, fill_packs=True)
    sim = settled(search, LADDER_2LR, concurrency)
    keys = [(c["kind"], *probe_key(c)) for _, c in sim.suggested]
    assert len(keys) == len(set(keys)), "no trial twice"
    assert {c["seed"] for _, c in sim.suggested} <= set(SEEDS8)
    assert len(sim.done) <= 0.35 * LADDER_2LR.planned_trials()


def test_a_lane_left_open_by_an_undecidable_rung_settles_only_the_rungs_below_it() -> None:
    spec = spec_of(seeds=SEEDS8, model={"sizes": SIZES[:1]}, attention=["dpa"], search={"method": "frontier"})
    search = FrontierSearch(spec)
    for rung in range(3):
        tell(search, spec, "dpa", 0, rung, [0], 1)
    tell(search, spec, "dpa", 0, 3, [0, 1, 2, 3], 2)  # 2/4: even 4 more agreeing seeds leave it undetermined
    tell(search, spec, "dpa", 0, 4, [0], 0)  # the rung above: one seed failed it
    assert search._open_at("dpa", 0, ()) == (None, {4: 1}), "a second look at the rung above first"
    assert [(c["coords"][0], c["seed"]) for c in search.next_cells(100)] == [(4, 1)]
    tell(search, spec, "dpa", 0, 4, [1], 0)  # 0/2 there: the frontier can no longer be determined
    assert search._open_at("dpa", 0, ()) == (3, {})
    got = search.next_cells(100)
    # rung 3 stays possibly solved whatever comes; the interval's lower end can still be settled: rung 2
    # gets the seeds that could settle it solved, and nothing at or above rung 3 is run
    assert sorted((c["coords"][0], c["seed"]) for c in got) == [(2, 1), (2, 2), (2, 3)]
    for c in got:
        search.record(c, {"final": True, "status": "solved"})
    assert search.next_cells(100) == [] and search.done(), "rung 2 settled solved, the lane's interval is [2, 4]"


def test_a_success_right_above_an_undecidable_rung_keeps_the_lane_walking() -> None:
    # a plateau: rungs 1 and 2 both near 3/4, so eight seeds may settle rung 2 solved (a determined
    # frontier above an undetermined rung) while rung 1 stays undetermined
    spec = spec_of(seeds=SEEDS8, model={"sizes": SIZES[:1]}, attention=["dpa"], search={"method": "frontier"})
    search = FrontierSearch(spec, verify=False)
    tell(search, spec, "dpa", 0, 0, [0, 1, 2, 3], 4)
    tell(search, spec, "dpa", 0, 1, [0, 1, 2, 3, 4], 2)  # 2/5: undecidable
    tell(search, spec, "dpa", 0, 2, [0, 1], 1)  # 1/2 at the rung above: it may still be settled solved
    assert search._open_at("dpa", 0, ()) == (None, {})
    got = search.next_cells(100)
    assert {c["coords"][0] for c in got} == {2}, "the walk settles the rung above, as on any lane"


def test_a_lane_still_determinable_settles_both_boundary_cells_and_a_disagreeing_lower_one_first() -> None:
    spec = spec_of(seeds=SEEDS8, model={"sizes": SIZES[:1]}, attention=["dpa"], search={"method": "frontier"})
    search = FrontierSearch(spec, verify=False)
    for rung in range(3):
        tell(search, spec, "dpa", 0, rung, [0], 1)
    tell(search, spec, "dpa", 0, 3, [0], 0)
    assert search._open_at("dpa", 0, ()) == (None, {})
    got = search.next_cells(100)
    assert sorted((c["coords"][0], c["seed"]) for c in got) == [(2, s) for s in (1, 2, 3)] + [(3, s) for s in (1, 2, 3)]
    # outcomes that agree: both cells at once (one pack). Outcomes that disagree at the lower cell:
    search2 = FrontierSearch(spec, verify=False)
    for rung in range(2):
        tell(search2, spec, "dpa", 0, rung, [0], 1)
    tell(search2, spec, "dpa", 0, 2, [0, 1, 2], 2)  # 2/3: most seeds solved it, but they disagree
    tell(search2, spec, "dpa", 0, 3, [0], 0)
    nxt = search2.next_cells(100)
    # rung 3's full-budget seeds wait until rung 2 is decided: if it turns out undecidable, they decide nothing
    assert sorted((c["coords"][0], c["seed"]) for c in nxt) == [(2, 3)]


def test_next_cells_hands_out_a_batch_and_waits_for_results() -> None:
    search = FrontierSearch(LADDER)
    batch = search.next_cells(100)
    # first probe: the middle rung of each fresh lane, 1 seed x 2 kinds; lanes of both sizes
    assert len(batch) == 1 * 2 * 2 and {c["seed"] for c in batch} == {0}
    assert {tuple(c["coords"]) for c in batch} == {(3,)}
    assert search.next_cells(5) == [] and search.suggest("t") is None and not search.done()
    for c in batch:
        search.record(c, {"final": True, "status": "solved" if c["kind"] == "ea" else "unsolved"})
    nxt = search.next_cells(100)
    assert {tuple(c["coords"]) for c in nxt} == {(1,), (4,)}, "dpa bisects down, ea walks up: both kinds probe both"
    assert {c["kind"] for c in nxt} == {"dpa", "ea"}


def test_a_bigger_model_starts_at_the_smaller_models_boundary() -> None:
    spec = spec_of(seeds=SEEDS8, model={"sizes": SIZES}, search={"method": "frontier"})
    search = FrontierSearch(spec)
    for kind, top in (("dpa", 2), ("ea", 4)):  # the small model's lanes, settled
        for rung in range(top):
            tell(search, spec, kind, 0, rung, [0], 1)
        tell(search, spec, kind, 0, top, [0, 1, 2, 3], 4)
        tell(search, spec, kind, 0, top + 1, [0, 1, 2, 3], 0)
    big = [c for c in search.next_cells(100) if c["size_idx"] == 1]
    assert {c["coords"][0] for c in big} == {2, 4}, "each kind at its smaller model's boundary"
    assert sorted((c["kind"], c["coords"][0]) for c in big) == [("dpa", 2), ("dpa", 4), ("ea", 2), ("ea", 4)]


def test_failed_trials_are_censored_and_retried_never_unsolved() -> None:
    search = FrontierSearch(LADDER, max_retries=2)
    # the first attempt of every trial at rung 2 fails: retried on the same seed, then counted
    sim = Sim(search, ladder_truth, concurrency=3, fail=lambda c, attempt: c["coords"][0] == 2 and attempt == 1)
    sim.run()
    assert sim.failed and sim.finished
    clean = FrontierSearch(LADDER)
    Sim(clean, ladder_truth, concurrency=3).run()
    assert boundaries(search, LADDER) == boundaries(clean, LADDER)
    retried = {(c["kind"], *probe_key(c)) for _, c in sim.failed}
    done = {(c["kind"], *probe_key(c)) for _, c, _ in sim.done}
    assert retried <= done, "every failed trial was run again on the same seed"


def test_a_seed_that_keeps_failing_is_given_up_and_another_seed_used() -> None:
    search = FrontierSearch(LADDER, max_retries=1)
    sim = Sim(search, ladder_truth, concurrency=2, fail=lambda c, attempt: c["seed"] == 0)
    sim.run()
    assert sim.finished
    assert not any(c["seed"] == 0 for _, c, _ in sim.done)
    attempts = [(c["kind"], *probe_key(c)) for _, c in sim.failed]
    assert max(attempts.count(a) for a in attempts) == 2, "one try and one retry, then the seed is given up"
    for (kind, si, _), (lo, hi, _) in boundaries(search, LADDER).items():
        assert lo == ladder_truth({"kind": kind, "size_idx": si}) and hi == lo + 1


def test_a_non_monotone_lane_is_detected_and_scanned() -> None:
    """The quick-start's miss: rung 0 unsolved, rung 1 solved. Bisection concluded 'nothing solved'."""

    def holey(cell: Cell) -> int:
        return 10 if cell["coords"][0] in (1, 2, 5) else -1  # solved exactly at rungs 1, 2 and 5

    class Holey(Sim):
        def solved(self, cell: Cell) -> bool:
            return cell["coords"][0] in (1, 2, 5)

    spec = spec_of(seeds=SEEDS8, model={"sizes": SIZES[:1]}, search={"method": "frontier"})
    search = FrontierSearch(spec)
    sim = Holey(search, holey, concurrency=4)
    sim.run()
    assert sim.finished
    for kind in spec.attention:
        lo, _, monotone = search.lane_status(kind, 0, ())
        assert not monotone and lo == 5
        states = search._states(kind, 0, ())
        assert states[0] == "unsolved" and states[2] == "solved", "the hole that turned the lane to scanning"
        assert states[5:] == ["solved", "unsolved", "unsolved"], "every rung above the hole is settled"


def test_one_seed_decides_nothing_so_the_search_runs_the_whole_grid() -> None:
    spec = spec_of(seeds=[0], model={"sizes": SIZES[:1]}, search={"method": "frontier"})
    search = FrontierSearch(spec)
    sim = Sim(search, lambda c: 1, concurrency=2)
    sim.run()
    assert sim.finished
    assert sorted(c["coords"][0] for _, c, _ in sim.done if c["kind"] == "dpa") == list(range(len(RUNGS)))
    assert len(sim.done) == spec.planned_trials()


def test_boundary_search_on_a_grid_settles_each_N_row() -> None:
    g = GRID.task.grid
    assert g is not None
    top = len(g.T) - 1

    def truth(cell: Cell) -> int:  # a staircase: a larger N solves fewer T; ea one more
        return min(top, 3 - 2 * cell["coords"][0] + (cell["kind"] == "ea"))

    search = FrontierSearch(GRID)
    sim = Sim(search, truth, concurrency=4)
    sim.run()
    assert sim.finished
    for _, cell, _ in sim.done:
        n_idx, t_idx = cell["coords"]
        assert cell["members"] == [[g.N[n_idx], g.T[t_idx]]]
    for (kind, _, rest), (lo, hi, _) in boundaries(search, GRID).items():
        assert lo == truth({"kind": kind, "coords": [rest[0], 0]}) and hi == lo + 1
    assert len(sim.done) < GRID.planned_trials()


def test_boundary_search_save_restore_continues_identically(tmp_path: Path) -> None:
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
    assert [(t, c) for t, c, _ in again.done] == [(t, c) for t, c, _ in sim.done[n_done:]]
    assert boundaries(fresh, LADDER) == boundaries(search, LADDER)


def test_a_boundary_searcher_pickled_before_fill_packs_resumes(tmp_path: Path) -> None:
    search = FrontierSearch(LADDER)
    sim = Sim(search, ladder_truth, concurrency=3)
    for _ in range(5):
        sim.step()
    del search.__dict__["fill_packs"]  # the state an older version pickled
    path = tmp_path / "searcher.pkl"
    search.save(str(path))
    fresh = FrontierSearch.__new__(FrontierSearch)  # as Tune unpickles a searcher: no __init__
    fresh.restore(str(path))
    assert fresh.fill_packs is False  # resumes as it was started
    again = Sim(fresh, ladder_truth, concurrency=3)
    again.running, again.next_id = deque(sim.running), sim.next_id  # the trials in flight at the save
    again.run()
    assert again.finished


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


def final(score: float, status: str, n_params: int = 1234, eval_acc: float | None = None) -> dict[str, Any]:
    acc = eval_acc if eval_acc is not None else 1.0 if status == "solved" else 0.5
    return {
        "final": True,
        "status": status,
        "score": score,
        "n_params": n_params,
        "solved": status == "solved",
        "eval_acc": acc,
    }


def test_paired_tells_optuna_each_kinds_highest_rung_and_the_size_after_the_last_twin(storage: str) -> None:
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    got = take(search, TWINS)
    rung = got[0][1]["coords"][0]
    solved = {("dpa", 0): False, ("ea", 0): True, ("dpa", 1): False, ("ea", 1): False}
    accs = {("dpa", 0): 0.6, ("dpa", 1): 0.8, ("ea", 1): 0.98}
    for trial_id, cell in got[:-1]:
        key = (cell["kind"], cell["seed"])
        search.on_trial_complete(trial_id, final(0.0, "solved" if solved[key] else "unsolved", eval_acc=accs.get(key)))
        assert study(storage).get_trials()[0].state == optuna.trial.TrialState.RUNNING
    last_id, last = got[-1]
    key = (last["kind"], last["seed"])
    search.on_trial_complete(last_id, final(0.0, "solved" if solved[key] else "unsolved", eval_acc=accs.get(key)))
    done = study(storage).get_trials()[0]
    assert done.state == optuna.trial.TrialState.COMPLETE
    # ea solved the rung on half its seeds: it reached that rung; dpa on none: mean accuracy - 1
    assert done.values == [pytest.approx(0.7 - 1), rung, 1234], "one objective per kind, not their mean"
    assert done.user_attrs["ladder.size"] == PAIRED.model.all_sizes()[done.params["size_idx"]].name
    assert done.user_attrs["ladder.pick"] == "pick00000"
    assert {k for k in done.user_attrs if k.startswith("ladder.trial.")} == {
        f"ladder.trial.{k}.s{s}" for k in PAIRED.attention for s in PAIRED.seeds
    }
    assert isinstance(done.distributions["size_idx"], optuna.distributions.IntDistribution)
    assert isinstance(done.distributions["point_idx"], optuna.distributions.IntDistribution)
    search.on_trial_complete("stranger", {"score": 9.0, "n_params": 1})  # not ours: ignored
    assert len(study(storage).get_trials()) == 1


def test_margin_objective_is_the_paired_success_difference(storage: str) -> None:
    spec = PAIRED.model_copy(update={"search": PAIRED.search.model_copy(update={"objective": "margin"})})
    search = PairedOptunaSearch(spec, storage, "margin")
    for trial_id, cell in take(search, TWINS):
        ok = cell["kind"] == "ea" or cell["seed"] == 0
        search.on_trial_complete(trial_id, final(1.0, "solved" if ok else "unsolved"))
    done = study(storage, "margin").get_trials()[0]
    assert done.values == [pytest.approx(0.5)]  # ea solved 2 of 2 seeds, dpa 1 of 2


def test_an_identical_pick_is_never_run_twice(storage: str) -> None:
    spec = spec_of(
        task={"ladder": RUNGS[:2]},
        model={"sizes": SIZES[:1]},
        seeds=[0],
        hparams={"lr": {"values": [1e-3]}},
        search={"method": "optuna", "n_trials": 5, "sampler_seed": 3},
    )
    search = PairedOptunaSearch(spec, storage, "small")
    picks = []
    while (got := search.suggest(f"t{len(picks)}")) != FINISHED:
        picks.append(got["cell"])
        search.on_trial_complete(f"t{len(picks) - 1}", final(1.0, "solved"))
    runs = {(c["size_idx"], tuple(c["coords"]), c["lr"], c["kind"]) for c in picks}
    assert len(runs) == len(picks) == 2 * 2, "two distinct picks exist; each ran once per kind"
    trials = study(storage, "small").get_trials()
    repeats = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert repeats and all("ladder.repeat_of" in t.user_attrs for t in repeats)


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
        search.on_trial_complete(trial_id, final(frontier_score(cell["coords"], False, 0.5), "unsolved", 10))
    assert search.suggest("more") == FINISHED
    trials = study(storage).get_trials()
    assert len(trials) == n
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


def test_recover_orphans_fails_running_trials_the_searcher_cannot_take_back(storage: str) -> None:
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    first = take(search, TWINS, "a")
    for trial_id, _ in first:
        search.on_trial_complete(trial_id, final(1.0, "solved", 10))
    take(search, 1, "b")  # pick 1 is in flight: RUNNING and known
    orphan = study(storage).ask()  # RUNNING, killed mid-ask: no parameters, no trial keys
    assert search.recover_orphans() == (0, 1)
    states = {t.number: t.state for t in study(storage).get_trials()}
    assert states == {
        0: optuna.trial.TrialState.COMPLETE,
        1: optuna.trial.TrialState.RUNNING,
        orphan.number: optuna.trial.TrialState.FAIL,
    }
    assert search.recover_orphans() == (0, 0)


def test_paired_restore_requeues_picks_made_after_the_checkpoint(storage: str, tmp_path: Path) -> None:
    # Tune saves its searcher at most every 10 s: a driver killed after asking pick 2 forgets it, while
    # Optuna has it RUNNING and its Tune trials may have started (MLflow runs found again by trial key).
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    got = take(search, TWINS + 1)
    path = tmp_path / "searcher.pkl"
    search.save(str(path))
    late = take(search, TWINS, "late")  # the rest of pick 1 and the first of pick 2, then the kill
    fresh = PairedOptunaSearch(PAIRED, storage, "paired")
    fresh.restore(str(path))
    trials = study(storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.RUNNING] * 3, "pick 2 is taken back, not failed"
    # the restored searcher hands out the rest of pick 1, then pick 2 again: the same cells, the same trial keys
    rest = take(fresh, 2 * TWINS - 1, "r")
    assert [c for _, c in rest][: TWINS - 1] == [c for _, c in late][: TWINS - 1]
    again = [c for _, c in rest][TWINS - 1 :]
    assert again[0] == late[-1][1]
    assert [cell_key(c) for c in again] == trials[2].user_attrs["ladder.trial_keys"]
    for trial_id, _ in [*got, *rest]:
        fresh.on_trial_complete(trial_id, final(2.0, "solved", 10))
    assert [t.state for t in study(storage).get_trials()] == [optuna.trial.TrialState.COMPLETE] * 3
    # the space of n_trials picks is spent: nothing more is asked
    assert fresh.suggest("more") == FINISHED


def test_a_fresh_searcher_takes_back_the_picks_of_a_driver_stopped_before_tunes_first_save(storage: str) -> None:
    # Tune saves the experiment (and its searcher) first at the end of fit's first step: a driver killed
    # before that leaves nothing to restore, so the study starts afresh over the Optuna study it had begun.
    before = PairedOptunaSearch(PAIRED, storage, "paired")
    late = take(before, TWINS + 1)  # pick 0 whole and the first twin of pick 1, then the kill
    fresh = PairedOptunaSearch(PAIRED, storage, "paired")
    assert fresh.recover_orphans() == (2, 0)
    again = take(fresh, 2 * TWINS, "r")
    assert [c for _, c in again][: TWINS + 1] == [c for _, c in late], "the same cells, the same trial keys"
    for trial_id, _ in again:
        fresh.on_trial_complete(trial_id, final(2.0, "solved", 10))
    trials = study(storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2, "each pick told once, none re-asked"


def test_a_requeued_pick_takes_its_twins_on_file_from_the_records(storage: str, tmp_path: Path) -> None:
    # Pick 1 was asked after the searcher's last save; both its dpa twins were recorded before the kill.
    # They are not trained again, and Optuna's value for dpa is the one the records (and the report) hold.
    records = tmp_path / "trials.jsonl"
    search = PairedOptunaSearch(PAIRED, storage, "paired", str(records))
    first = take(search, TWINS)
    path = tmp_path / "searcher.pkl"
    search.save(str(path))
    late = take(search, TWINS, "late")
    for _, cell in late:
        if cell["kind"] == "dpa":
            size = cell["size"]
            kw = {k: size[k] for k in ("d_model", "n_layers", "n_heads")} | {"eval_acc": 0.25, "n_params": 1234}
            fields = {k: cell[k] for k in ("kind", "point", "coords", "seed", "lr")}
            append_record(records, TrialRecord(study_id="s", trial_id="x", status="unsolved", **fields, **kw))
    fresh = PairedOptunaSearch(PAIRED, storage, "paired", str(records))
    fresh.restore(str(path))
    rest = take(fresh, 2, "r")
    assert [c for _, c in rest] == [c for _, c in late if c["kind"] == "ea"], "only the twins not on file run again"
    for trial_id, _ in [*first, *rest]:
        fresh.on_trial_complete(trial_id, final(2.0, "solved", 1234))
    told = study(storage).get_trials()[1]
    rung = float(sum(late[0][1]["coords"]))
    assert told.state == optuna.trial.TrialState.COMPLETE
    assert told.values == [pytest.approx(0.25 - 1), rung, 1234]  # dpa: its records (unsolved); ea: the re-runs


def test_paired_restore_fails_a_forgotten_pick_beyond_n_trials(storage: str, tmp_path: Path) -> None:
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    take(search, (PAIRED.search.n_trials or 0) * TWINS)
    path = tmp_path / "searcher.pkl"
    search.save(str(path))
    extra = study(storage).ask(search.space)  # a whole pick past the budget (it cannot be this study's)
    p = extra.params
    twins = [
        make_cell(PAIRED, k, p["size_idx"], p["point_idx"], p["lr"], s) for s in PAIRED.seeds for k in PAIRED.attention
    ]
    extra.set_user_attr("ladder.trial_keys", [cell_key(c) for c in twins])
    fresh = PairedOptunaSearch(PAIRED, storage, "paired")
    fresh.restore(str(path))
    assert study(storage).get_trials()[extra.number].state == optuna.trial.TrialState.FAIL
    assert fresh.suggest("more") == FINISHED


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


@pytest.mark.parametrize(
    ("statuses", "accs", "value"),
    [
        (["solved", "solved", "solved"], [1.0, 1.0, 1.0], 4.0),
        (["solved", "solved", "unsolved"], [1.0, 1.0, 0.9], 4.0),
        (["solved", "unsolved", "unsolved"], [1.0, 0.9, 0.9], pytest.approx(0.9333 - 1, abs=1e-4)),
        (["unsolved", "unsolved"], [0.5, float("nan")], -0.75),
    ],
)
def test_frontier_objective_is_the_rung_when_most_seeds_solve_it_else_below_every_rung(
    statuses: list[str], accs: list[float], value: Any
) -> None:
    outcomes = [{"status": s, "eval_acc": a} for s, a in zip(statuses, accs, strict=True)]
    assert highest_rung_value(4.0, outcomes) == value


def test_frontier_objective_prefers_a_rung_the_seeds_solve_to_a_higher_one_solved_once() -> None:
    """The old objective (the mean per-seed score, 1 + rung or accuracy) ranked a harder rung solved
    on 1 of 3 seeds above an easier one solved on all three; the highest rung solved does not."""
    once = [{"status": "solved", "eval_acc": 1.0}] + [{"status": "unsolved", "eval_acc": 0.95}] * 2
    always = [{"status": "solved", "eval_acc": 1.0}] * 3
    old = [
        sum(frontier_score([r], o["status"] == "solved", o["eval_acc"]) for o in os) / 3
        for r, os in ((7, once), (1, always))
    ]
    assert old[0] > old[1]
    assert highest_rung_value(7.0, once) < 0 <= highest_rung_value(0.0, always) < highest_rung_value(1.0, always)


def test_a_paired_searcher_pickled_before_next_cells_resumes(storage: str, tmp_path: Path) -> None:
    search = PairedOptunaSearch(PAIRED, storage, "paired")
    got = take(search, TWINS)
    old = dict(search.__dict__)  # the state as the version before next_cells/record kept it
    old["base_of"] = {tid: search.pick_of[(c["kind"], c["seed"], c["size_idx"], c["point"], c["lr"])] for tid, c in got}
    for name in ("pick_of", "spent"):
        del old[name]
    path = tmp_path / "old.pkl"
    with open(path, "wb") as f:
        pickle.dump(old | {"_study": None, "_asked": {}}, f)
    fresh = PairedOptunaSearch.__new__(PairedOptunaSearch)  # as Tune unpickles it: no __init__
    fresh.restore(str(path))
    for trial_id, _ in got:
        fresh.on_trial_complete(trial_id, final(2.0, "solved", 10))
    assert study(storage).get_trials()[0].state == optuna.trial.TrialState.COMPLETE
    assert isinstance(fresh.suggest("next"), dict)
