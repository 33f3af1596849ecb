"""The study's report, rendered by its driver into the study directory: while trial records arrive, and at the end.

Readers (the service) serve what the driver published and never render it themselves, except
as a fallback for a study whose driver wrote none. Every render goes to a temporary directory
that is renamed into place: a reader sees the old report or the new one, never half of either.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from studies.records import read_records
from studies.spec import StudySpec
from studies.studydir import RECORDS, REPORT, file_version, publish_dir

log = logging.getLogger(__name__)

REPORT_EVERY_S = 30.0  # while a study runs, its report is at most this much (plus one render) behind its records
# ... or more, so that live renders take at most this share of one CPU: the driver shares the machine with
# the trials, and a render (four figures) costs 1-2 CPU-s on the 2-core box (docs/benchmarks.md).
RENDER_CPU_SHARE = 0.05


def publish_report(spec: StudySpec, study_dir: Path, provenance: dict[str, Any]) -> tuple[Any, Path]:
    """Render the report of the study's current records into ``<study dir>/report``; returns (report, its dir)."""
    from studies.report_html import write_report

    records = read_records(study_dir / RECORDS)
    with tempfile.TemporaryDirectory(dir=study_dir, prefix=".report-") as tmp:
        report = write_report(spec, records, Path(tmp) / REPORT, provenance)
        return report, publish_dir(Path(tmp) / REPORT, study_dir / REPORT)


class ReportRefresher:
    """Re-renders the report in a background thread whenever the records file changed.

    At most every ``every_s``, and no more often than keeps the renders' CPU time (this thread's) under
    ``cpu_share`` of one CPU.
    """

    def __init__(
        self,
        spec: StudySpec,
        study_dir: Path,
        provenance: dict[str, Any],
        every_s: float = REPORT_EVERY_S,
        cpu_share: float = RENDER_CPU_SHARE,
    ) -> None:
        self.spec, self.study_dir, self.provenance, self.every_s = spec, study_dir, provenance, every_s
        self.cpu_share = cpu_share
        self.wait_s = every_s  # until the next look: every_s, or longer after a costly render
        self._rendered = file_version(study_dir / RECORDS)  # what a report already on disk may show
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="report-refresher", daemon=True)

    def refresh_if_changed(self) -> bool:
        """Render when the records changed since the last render; returns whether it rendered."""
        version = file_version(self.study_dir / RECORDS)
        if version == self._rendered:
            return False
        publish_report(self.spec, self.study_dir, self.provenance)
        self._rendered = version
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.wait_s):
            cpu = time.thread_time()
            try:
                self.refresh_if_changed()
            except Exception:  # a failed render must not end the study: the next change tries again
                log.exception("rendering the report of %s failed", self.study_dir.name)
            self.wait_s = max(self.every_s, (time.thread_time() - cpu) / self.cpu_share)

    def __enter__(self) -> ReportRefresher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
