"""The study lifecycle: states, the allowed transitions, who may make each, all atomic in the registry.

Every state change is one transaction: a compare-and-set on the study's state plus, when a
study becomes active or stops being active, claiming or releasing its concurrency slot
(``active_slots``, whose primary key keeps the cap with any number of service processes).

    create ──> launching ──> running ──> finished | failed | interrupted
                   │             │
                   └── cancel ───┴──> cancelling ──> cancelled
    failed | interrupted | cancelled ── resume ──> launching
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.registry import Registry, Slot, Study

ACTIVE = ("launching", "running", "cancelling")
TERMINAL = ("finished", "failed", "cancelled", "interrupted")
STATES = ACTIVE + TERMINAL
RESUMABLE = ("failed", "interrupted", "cancelled")


class Actor(StrEnum):
    API = "api"  # a request: create, cancel, resume, delete, a failed launch
    RECONCILER = "reconciler"  # the service's loop, folding in what the driver reported or that it died


@dataclass(frozen=True)
class Transition:
    sources: tuple[str, ...]
    target: str
    actors: frozenset[Actor]


_API, _REC = frozenset({Actor.API}), frozenset({Actor.RECONCILER})
TRANSITIONS: dict[str, Transition] = {
    "start": Transition(("launching",), "running", _REC),
    "relaunch": Transition(("launching",), "launching", _REC),
    "finish": Transition(("launching", "running", "cancelling"), "finished", _REC),
    "fail": Transition(("launching", "running", "cancelling"), "failed", _API | _REC),
    "interrupt": Transition(("launching", "running"), "interrupted", _REC),
    "cancel": Transition(("launching", "running"), "cancelling", _API),
    "cancelled": Transition(("launching", "running", "cancelling"), "cancelled", _REC),
    "resume": Transition(RESUMABLE, "launching", _API),
}
DRIVER_VERDICTS = {"finished": "finish", "failed": "fail", "interrupted": "interrupt", "cancelled": "cancelled"}


class Refused(Exception):
    """A transition that the study's current state (or the service's limits) does not allow."""


class AtCapacity(Refused):
    def __init__(self, active: int, cap: int) -> None:
        super().__init__(f"{active} studies are active, the limit is {cap}")
        self.active, self.cap = active, cap


class KeyTaken(Refused):
    def __init__(self, existing: Study) -> None:
        super().__init__(f"idempotency key already used by study {existing.id}")
        self.existing = existing


class WrongState(Refused):
    def __init__(self, current: Study | None, name: str) -> None:
        state = current.state if current else "gone"
        super().__init__(f"cannot {name} a study that is {state}")
        self.current = current


_RETRIES = 20  # slot races: each retry sees the slots the winner took


def _claim_slot(s: Session, study_id: str, cap: int) -> None:
    taken = set(s.scalars(select(Slot.slot)).all())
    free = [i for i in range(cap) if i not in taken]
    if not free:
        raise AtCapacity(len(taken), cap)
    s.add(Slot(slot=free[0], study_id=study_id))
    s.flush()  # a concurrent claim of the same slot fails here (primary key)


def create(registry: Registry, study: Study, cap: int) -> Study:
    """Insert a new study as ``launching`` and claim its slot, in one transaction.

    Raises:
        KeyTaken: the idempotency key belongs to another study (the database's unique constraint).
        AtCapacity: ``cap`` studies are active already.
    """
    study.state = "launching"
    for _ in range(_RETRIES):
        key_clash = False
        try:
            with registry.session() as s:
                s.add(study)
                try:
                    s.flush()
                except IntegrityError:
                    key_clash = True
                    raise
                _claim_slot(s, study.id, cap)
            return study
        except IntegrityError:
            if key_clash and (existing := registry.by_idempotency_key(study.idempotency_key or "")) is not None:
                raise KeyTaken(existing) from None
            time.sleep(0.01)  # a slot race (or the key's winner rolled back): try again
    raise AtCapacity(cap, cap)


def transition(
    registry: Registry, study_id: str, name: str, actor: Actor, cap: int | None = None, **fields: Any
) -> Study:
    """Move a study along ``TRANSITIONS[name]`` if it is in one of its source states (compare-and-set).

    Raises:
        WrongState: the study is not (any longer) in a source state, or is gone.
        AtCapacity: becoming active would pass ``cap``.
    """
    t = TRANSITIONS[name]
    if actor not in t.actors:
        raise ValueError(f"{actor} may not {name} a study")
    for _ in range(_RETRIES):
        try:
            with registry.session() as s:
                values = fields | {"state": t.target, "updated": time.time()}
                stmt = update(Study).where(Study.id == study_id, Study.state.in_(t.sources)).values(**values)
                if s.execute(stmt).rowcount != 1:  # type: ignore[attr-defined]
                    raise _NotInSource
                if t.target in ACTIVE and not set(t.sources) & set(ACTIVE):
                    assert cap is not None, "becoming active needs the cap"
                    _claim_slot(s, study_id, cap)
                elif t.target not in ACTIVE:
                    s.execute(delete(Slot).where(Slot.study_id == study_id))
                study = s.get(Study, study_id)
                assert study is not None
            return study
        except _NotInSource:
            raise WrongState(registry.get(study_id), name) from None
        except IntegrityError:
            time.sleep(0.01)
    raise AtCapacity(cap or 0, cap or 0)


def remove(registry: Registry, study_id: str) -> None:
    """Delete a stopped study's row (compare-and-set on a terminal state)."""
    try:
        with registry.session() as s:
            gone = s.execute(delete(Study).where(Study.id == study_id, Study.state.in_(TERMINAL)))
            if gone.rowcount != 1:  # type: ignore[attr-defined]
                raise _NotInSource
            s.execute(delete(Slot).where(Slot.study_id == study_id))
    except _NotInSource:
        raise WrongState(registry.get(study_id), "delete") from None


class _NotInSource(Exception):
    pass
