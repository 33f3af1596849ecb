"""Packed search without Ray Tune: packs of one shape, every member told to the searcher once, save/restore."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pytest
from ray.tune.search import Searcher

from studies.spec import StudySpec
from workers.callbacks import fixed_config
from workers.pack_search import PackSearch
from workers.search import FrontierSearch, PairedOptunaSearch

SIZES = [{"d_model": 16, "n_layers": 1, "n_heads": 2}, {"d_model": 32, "n_layers": 2, "n_heads": 2}]
RUNGS = [[[5, 1]], [[7, 1]], [[7, 2]], [[11, 2]], [[13, 2]]]
Cell = dict[str, Any]


def spec_of(**fields: Any) -> StudySpec:
    data: dict[str, Any] = {"name": "s", "task": {"ladder": RUNGS}, "model": {"sizes": SIZES}} | fields
    return StudySpec.model_validate(data)


OPTUNA = spec_of(
    seeds=[0, 1],
    hparams={"lr": {"low": 1e-4, "high": 1e-2}},
    search={"method": "optuna", "n_trials": 6, "sampler_seed": 7},
)


@pytest.fixture
def storage(tmp_path: Path) -> str:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def packed(spec: StudySpec, inner: Any, limit: int) -> PackSearch:
    return PackSearch(inner, fixed_config(spec), limit, limit * len(spec.attention))


def member_final(cell: Cell, solved: bool) -> dict[str, Any]:
    """A member's record as train_pack reports it (no ``final`` or ``score``: the wrapper adds them)."""
    return {"status": "solved" if solved else "unsolved", "solved": solved, "eval_acc": 1.0, "n_params": 99}


def finals(pack: list[Cell], which: range | list[int]) -> dict[str, Any]:
    return {"finals": {str(i): member_final(pack[i], pack[i]["seed"] == 0) for i in which}}


def states(storage: str) -> Counter[str]:
    return Counter(t.state.name for t in optuna.load_study(study_name="p", storage=storage).get_trials())


def test_optuna_picks_run_as_packs_of_one_size_and_each_pick_is_told_once(storage: str) -> None:
    search = packed(OPTUNA, PairedOptunaSearch(OPTUNA, storage, "p"), limit=4)
    packs: dict[str, list[Cell]] = {}
    while isinstance(got := search.suggest(f"t{len(packs)}"), dict):
        packs[f"t{len(packs)}"] = got["pack"]
    assert got == Searcher.FINISHED
    cells = [c for p in packs.values() for c in p]
    assert len(cells) == OPTUNA.planned_trials() == 24, "every twin of every pick, once"
    assert len({(c["kind"], c["seed"], c["size_idx"], c["point"], c["lr"]) for c in cells}) == 24
    for pack in packs.values():
        assert 1 <= len(pack) <= 4
        assert len({c["size_idx"] for c in pack}) == 1, "one shape a pack"
        assert {c["kind"] for c in pack} == {"dpa", "ea"}, "a pick's few twins share a pack"
    ids = list(packs)
    first = packs[ids[0]]
    search.on_trial_result(ids[0], finals(first, [0]))  # a member finishes early: recorded now
    flat = {f"finals/0/{k}": v for k, v in finals(first, [0])["finals"]["0"].items()}
    search.on_trial_result(ids[0], flat)  # reported again (a resumed pack; as Tune hands it, flattened): once
    for tid in ids:  # the last result holds every member's record; Tune flattens it
        last = finals(packs[tid], range(len(packs[tid])))["finals"]
        search.on_trial_complete(tid, {f"finals/{i}/{k}": v for i, m in last.items() for k, v in m.items()})
    assert states(storage) == Counter({"COMPLETE": 6})
    for t in optuna.load_study(study_name="p", storage=storage).get_trials():
        assert t.values[-1] == 99  # n_params from the members' records
        assert t.values[0] == t.params["point_idx"], "half the seeds solved: the value is the rung"


def test_a_failed_pack_fails_its_unfinished_members_only(storage: str) -> None:
    spec = spec_of(seeds=[0, 1], hparams={"lr": {"values": [1e-3]}}, search={"method": "optuna", "n_trials": 1})
    search = packed(spec, PairedOptunaSearch(spec, storage, "p"), limit=2)
    a, b = search.suggest("a")["pack"], search.suggest("b")["pack"]
    assert {c["kind"] for c in a} | {c["kind"] for c in b} == {"dpa", "ea"}
    search.on_trial_result("a", finals(a, [0]))
    search.on_trial_complete("a", {}, error=True)  # member 1 of a never finished
    search.on_trial_complete("b", finals(b, [0, 1]))
    (trial,) = optuna.load_study(study_name="p", storage=storage).get_trials()
    assert trial.state.name == "COMPLETE"  # seed 0 has both kinds' outcomes; seed 1 lost one twin


def test_a_restored_packed_searcher_records_every_member_once(storage: str, tmp_path: Path) -> None:
    search = packed(OPTUNA, PairedOptunaSearch(OPTUNA, storage, "p"), limit=4)
    a, b = search.suggest("a")["pack"], search.suggest("b")["pack"]
    search.on_trial_result("a", finals(a, [0]))
    path = tmp_path / "searcher.pkl"
    search.save(str(path))
    search.on_trial_result("a", finals(a, [1]))  # then the driver is killed
    fresh = packed(OPTUNA, PairedOptunaSearch(OPTUNA, storage, "p"), limit=4)
    fresh.restore(str(path))
    assert fresh.packs == {"a": a, "b": b}
    for tid, pack in (("a", a), ("b", b)):  # the resumed packs end; their last results hold every record
        fresh.on_trial_complete(tid, finals(pack, range(len(pack))))
    while isinstance(got := fresh.suggest(f"n{len(fresh.packs)}"), dict):
        pass
    for tid, pack in list(fresh.packs.items()):
        fresh.on_trial_complete(tid, finals(pack, range(len(pack))))
    got = states(storage)  # repeated picks are told PRUNED (Optuna's repeats); none FAIL or left RUNNING
    assert got["COMPLETE"] == 6 and set(got) <= {"COMPLETE", "PRUNED"}, got


def test_frontier_search_runs_packed_to_the_end_with_every_cell_recorded_once() -> None:
    spec = spec_of(seeds=[0, 1, 2, 3], hparams={"lr": {"values": [1e-3]}}, search={"method": "frontier"})
    inner = FrontierSearch(spec)
    search = packed(spec, inner, limit=8)
    ran: list[Cell] = []
    twins = 0  # packs holding both kinds: a probe's twins train together
    for n in range(200):
        got = search.suggest(f"t{n}")
        if got == Searcher.FINISHED:
            break
        assert isinstance(got, dict), "nothing in flight: the searcher must hand out work or finish"
        pack = got["pack"]
        assert len({c["size_idx"] for c in pack}) == 1
        ran += pack
        twins += {c["kind"] for c in pack} == {"dpa", "ea"}
        # truth: d16 solves rungs <= 1, d32 rungs <= 3, both kinds
        solved = [c["coords"][-1] <= (1 if c["size_idx"] == 0 else 3) for c in pack]
        search.on_trial_complete(
            f"t{n}", {"finals": {str(i): member_final(c, s) for i, (c, s) in enumerate(zip(pack, solved, strict=True))}}
        )
    assert got == Searcher.FINISHED and inner.done()
    keys = [(c["kind"], c["seed"], c["size_idx"], c["point"]) for c in ran]
    assert len(keys) == len(set(keys)), "no trial twice"
    assert twins
    for kind in spec.attention:
        assert inner.lane_status(kind, 0, ())[:2] == (1, 2)
        assert inner.lane_status(kind, 1, ())[:2] == (3, 4)
