"""Stopped studies with trial records, written the way a driver leaves them, for benchmarks and tests of reads."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from service.registry import Registry, Study
from studies.records import append_record
from studies.settings import Settings
from studies.spec import StudySpec
from studies.studydir import RECORDS, new_study_id, prepare_study, update_status


def trial_record(
    study_id: str, n: int, kind: str, size: dict[str, int], point: str, coords: list[int], **more: Any
) -> dict[str, Any]:
    """A trial record (seed 0, lr 0.003, 200 steps unless ``more`` says otherwise)."""
    rec: dict[str, Any] = {"study_id": study_id, "trial_id": f"t{n}", "kind": kind, **size, "point": point}
    return rec | {"coords": coords, "seed": 0, "lr": 0.003, "steps": 200} | more


def study_row(spec: StudySpec, study_id: str, state: str, created: float | None = None, **fields: Any) -> Study:
    """The registry row ``POST /studies`` would have written for ``spec``, in ``state``."""
    now = time.time() if created is None else created
    row: dict[str, Any] = {"launcher": "local", "attempts": 0, "cancel_requested": False} | fields
    return Study(
        id=study_id,
        name=spec.name,
        spec_json=spec.to_json(),
        state=state,
        created=now,
        updated=now,
        planned=spec.planned_trials(),
        **row,
    )


def seed_stopped_study(
    data_dir: Path, spec: StudySpec, records: Callable[[str], Iterable[dict[str, Any]]], state: str
) -> str:
    """One study in ``state`` (not active): its spec, ``records(study_id)``, a status file and a registry row."""
    settings = Settings(data_dir=data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    registry = Registry(settings.registry)
    try:
        registry.migrate()
        sid = prepare_study(spec, new_study_id(spec), settings)
        n = 0
        for rec in records(sid):
            append_record(settings.study_dir(sid) / RECORDS, rec)
            n += 1
        update_status(settings.study_dir(sid), state=state, done=n, attempt=0)
        with registry.session() as s:
            s.add(study_row(spec, sid, state))
    finally:
        registry.engine.dispose()
    return sid
