"""The lifecycle in the registry database: compare-and-set transitions, the cap and idempotency keys.

Two registries on one database stand for two service processes: the limits hold because
the database enforces them (primary key on the slot, unique key), not a lock in a process.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from service import lifecycle
from service.lifecycle import ACTIVE, Actor, AtCapacity, KeyTaken, WrongState
from service.registry import Registry, Study
from studies.records import append_record, read_records, repair_records
from tests.service.conftest import postgres_database

SPEC_JSON = '{"name": "t"}'


def row(study_id: str, key: str | None = None) -> Study:
    now = time.time()
    return Study(
        id=study_id,
        name="t",
        spec_json=SPEC_JSON,
        created=now,
        updated=now,
        idempotency_key=key,
        launcher="local",
        handle="local-0",
        attempts=0,
        planned=1,
        cancel_requested=False,
    )


@pytest.fixture
def registries(registry_url: str) -> list[Registry]:
    regs = [Registry(registry_url), Registry(registry_url)]
    regs[0].migrate()
    yield regs
    for r in regs:
        r.engine.dispose()


def race(n: int, fn: object) -> list[object]:
    """Run ``fn(i)`` in ``n`` threads released together; returns each result or exception."""
    barrier = threading.Barrier(n)
    out: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fn(i)  # type: ignore[operator]
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_creates_from_two_services_never_pass_the_cap(registries: list[Registry]) -> None:
    results = race(8, lambda i: lifecycle.create(registries[i % 2], row(f"s{i}"), cap=3))
    created = [r for r in results if isinstance(r, Study)]
    refused = [r for r in results if isinstance(r, AtCapacity)]
    assert len(created) == 3 and len(refused) == 5, results
    assert len(registries[0].in_states(ACTIVE)) == 3 and len(registries[1].slots()) == 3
    # A study that stops frees its slot in the same transaction.
    lifecycle.transition(registries[1], created[0].id, "fail", Actor.RECONCILER, error="x")
    assert lifecycle.create(registries[0], row("late"), cap=3).state == "launching"
    with pytest.raises(AtCapacity):
        lifecycle.create(registries[1], row("later"), cap=3)


def test_one_idempotency_key_makes_one_study(registries: list[Registry]) -> None:
    results = race(6, lambda i: lifecycle.create(registries[i % 2], row(f"k{i}", key="same"), cap=10))
    created = [r for r in results if isinstance(r, Study)]
    taken = [r for r in results if isinstance(r, KeyTaken)]
    assert len(created) == 1 and len(taken) == 5, results
    assert {t.existing.id for t in taken} == {created[0].id}
    assert registries[0].page(10, 0)[1] == 1 and len(registries[0].slots()) == 1


def test_transitions_are_compare_and_set(registries: list[Registry]) -> None:
    lifecycle.create(registries[0], row("a"), cap=5)
    lifecycle.transition(registries[0], "a", "fail", Actor.RECONCILER, error="died")
    # Two resumes at once (two services): exactly one wins.
    results = race(
        4,
        lambda i: lifecycle.transition(
            registries[i % 2], "a", "resume", Actor.API, cap=5, attempts=1, handle="local-1", error=None
        ),
    )
    assert sum(isinstance(r, Study) for r in results) == 1
    assert all(isinstance(r, WrongState) for r in results if not isinstance(r, Study))
    study = registries[1].get("a")
    assert study is not None and (study.state, study.attempts, study.error) == ("launching", 1, None)
    with pytest.raises(WrongState):  # a finished study cannot be cancelled, a running one not deleted
        lifecycle.remove(registries[0], "a")
    with pytest.raises(ValueError, match="may not"):  # who may make a transition is part of it
        lifecycle.transition(registries[0], "a", "start", Actor.API)


def test_resume_respects_the_cap(registries: list[Registry]) -> None:
    lifecycle.create(registries[0], row("x"), cap=1)
    lifecycle.transition(registries[0], "x", "cancel", Actor.API)
    lifecycle.transition(registries[0], "x", "cancelled", Actor.RECONCILER)
    lifecycle.create(registries[1], row("y"), cap=1)
    with pytest.raises(AtCapacity):
        lifecycle.transition(registries[0], "x", "resume", Actor.API, cap=1, attempts=1)
    assert registries[0].get("x").state == "cancelled"  # type: ignore[union-attr]


def test_a_torn_last_record_is_skipped_and_repaired(tmp_path: Path) -> None:
    path = tmp_path / "trials.jsonl"
    rec = {"study_id": "s", "trial_id": "t0", "kind": "dpa", "d_model": 16, "n_layers": 1, "n_heads": 2}
    rec |= {"point": "N7_T2", "coords": [0], "seed": 0, "lr": 0.003, "status": "solved", "steps": 100}
    append_record(path, rec)
    append_record(path, rec | {"trial_id": "t1", "seed": 1})
    with open(path, "a") as f:
        f.write('{"study_id": "s", "trial_id": "t2", "kind": "dp')  # the driver died mid-write
    assert [r.trial_id for r in read_records(path)] == ["t0", "t1"]
    assert repair_records(path) > 0
    assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 2
    append_record(path, rec | {"trial_id": "t2", "seed": 2})
    assert [r.trial_id for r in read_records(path)] == ["t0", "t1", "t2"]
    # A trial run again after a resume (same trial key, new Tune id) counts once: the last record wins.
    append_record(path, rec | {"trial_id": "t0-again", "status": "unsolved"})
    records = read_records(path)
    assert len(records) == 3 and [r.status for r in records if r.seed == 0] == ["unsolved"]


@pytest.mark.integration
def test_service_processes_starting_together_migrate_one_fresh_database() -> None:
    """Several services starting at once on an empty PostgreSQL registry: each migrates it, none fails."""
    with postgres_database() as url:
        regs = [Registry(url) for _ in range(4)]
        try:
            results = race(4, lambda i: regs[i].migrate())
            assert results == [None] * 4, results
            lifecycle.create(regs[1], row("after"), cap=1)
        finally:
            for r in regs:
                r.engine.dispose()
