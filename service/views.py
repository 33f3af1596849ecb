"""What reads serve: the public view of a study and its stored results, cached by file version.

A read never re-validates a spec and never re-reads an unchanged records file: records,
the frontier report and rendered reports are cached under the records file's version
(size, mtime, inode) and the study's state. The HTML report and plots are the driver's
(``studies.live_report``); only for a study whose driver wrote none is a report rendered
here, once per version, under a lock, into a new directory renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from service.lifecycle import ACTIVE
from service.registry import Study
from service.schemas import Links, Progress, StudyPublic
from studies.records import TrialRecord, read_records
from studies.settings import Settings
from studies.spec import StudySpec
from studies.studydir import RECORDS, REPORT, Version, file_lock, file_version, read_status


def study_public(study: Study, base: str, settings: Settings) -> StudyPublic:
    """The API view of a study: its registry row plus the driver's status file (no spec parsing)."""
    status = read_status(settings.study_dir(study.id))
    ml = status.get("mlflow") or {}
    ui = settings.mlflow_ui_url.rstrip("/") if settings.mlflow_ui_url else None
    links = Links(
        self=base,
        trials=f"{base}/trials",
        frontier=f"{base}/frontier",
        report=f"{base}/report",
        # workflowType: MLflow 3.17 shows an experiment as model training (runs), not GenAI
        mlflow_experiment=f"{ui}/#/experiments/{ml['experiment_id']}/runs?workflowType=machine_learning"
        if ui and ml
        else None,
        mlflow_run=f"{ui}/#/experiments/{ml['experiment_id']}/runs/{ml['run_id']}?workflowType=machine_learning"
        if ui and ml
        else None,
        ray_job=(
            f"{settings.ray_dashboard_url.rstrip('/')}/#/jobs/{study.handle}"
            if settings.ray_dashboard_url and study.launcher == "ray_job"
            else None
        ),
    )
    planned = study.planned or int(status.get("planned_trials") or 0)
    return StudyPublic(
        id=study.id,
        name=study.name,
        state=study.state,
        created=study.created,
        updated=study.updated,
        launcher=study.launcher,
        attempts=study.attempts,
        error=study.error,
        progress=Progress(
            planned=planned,
            done=int(status.get("done", 0)),
            running=int(status.get("running", 0)) if study.state in ACTIVE else 0,
            counts=status.get("counts", {}),
        ),
        frontier=status.get("frontier", {}),
        mlflow={k: str(v) for k, v in ml.items()},
        timings=status.get("timings") or {},
        links=links,
    )


class _LRU(OrderedDict[Any, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def put(self, key: Any, value: Any) -> Any:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class Results:
    """Stored results of studies, cached by the version of their records file."""

    def __init__(self, settings: Settings, size: int = 64) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._records = _LRU(size)
        self._specs = _LRU(size)
        self._frontiers = _LRU(size)
        self._render_locks: dict[str, threading.Lock] = {}

    def spec(self, study: Study) -> StudySpec:
        with self._lock:
            if (hit := self._specs.get(study.id)) is not None:
                return hit
        spec = StudySpec.model_validate_json(study.spec_json)
        with self._lock:
            return self._specs.put(study.id, spec)

    def records(self, study_id: str) -> tuple[Version, list[TrialRecord]]:
        path = self.settings.study_dir(study_id) / RECORDS
        version = file_version(path)
        with self._lock:
            hit = self._records.get(study_id)
            if hit is not None and hit[0] == version:
                return hit
        recs = read_records(path)
        with self._lock:
            return self._records.put(study_id, (version, recs))

    def frontier_json(self, study: Study) -> str:
        from studies.report import build_report, report_json

        version, recs = self.records(study.id)
        key = (version, study.state)
        with self._lock:
            hit = self._frontiers.get(study.id)
            if hit is not None and hit[0] == key:
                return hit[1]
        text = report_json(build_report(self.spec(study), recs, {"study_id": study.id, "state": study.state}))
        with self._lock:
            self._frontiers.put(study.id, (key, text))
        return text

    def report_dir(self, study: Study) -> Path:
        """A directory with the whole report: the driver's, else (no report by the driver) a cached render.

        A running study's driver re-renders its report as records arrive (``REPORT_EVERY_S``):
        served as it is. A stopped study's report is served when it is current; a stale or
        missing one (a study from a version whose driver rendered none) is rendered here, once
        per records version, under a lock, into the cache.
        """
        d = self.settings.study_dir(study.id)
        version = file_version(d / RECORDS)
        driver_html = d / REPORT / "report.html"
        with contextlib.suppress(FileNotFoundError):  # none yet, or the driver is swapping in a new one
            if driver_html.stat().st_mtime_ns >= version[1] or study.state in ACTIVE:
                return d / REPORT
        cache = self.settings.data_dir / "cache" / "reports" / study.id
        out = cache / f"{version[0]}-{version[1]}-{version[2]}-{study.state}"
        if (out / "report.html").exists():
            return out
        with self._lock:
            lock = self._render_locks.setdefault(study.id, threading.Lock())
        with lock, file_lock(cache / ".lock"):  # one render per version, across processes (DELETE takes it too)
            if not (out / "report.html").exists():
                self._render(study, out)
        return out

    def _render(self, study: Study, out: Path) -> None:
        from studies.report_html import write_report

        _, recs = self.records(study.id)
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
        try:
            write_report(self.spec(study), recs, tmp, {"study_id": study.id, "state": study.state})
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in out.parent.iterdir():  # older versions: no reader needs them once this one exists
            if old != out and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
