"""The driver's report follows the trial records: re-rendered when they change, published whole."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.seeding import trial_record
from studies.live_report import ReportRefresher
from studies.records import append_record
from studies.settings import Settings
from studies.spec import StudySpec
from studies.studydir import RECORDS, REPORT, prepare_study

SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2}
SPEC = StudySpec.model_validate(
    {"name": "live", "task": {"ladder": [[[7, 2]], [[61, 6]]]}, "model": {"sizes": [SIZE]}, "training": {}}
)


def test_the_report_is_rendered_when_records_change_and_only_then(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    sid = prepare_study(SPEC, settings=settings)
    d = settings.study_dir(sid)
    refresher = ReportRefresher(SPEC, d, {"study_id": sid})
    assert not refresher.refresh_if_changed() and not (d / REPORT).exists()  # nothing new since it started
    append_record(d / RECORDS, trial_record(sid, 0, "dpa", SIZE, "N7_T2", [0], status="solved", eval_acc=1.0))
    assert refresher.refresh_if_changed()
    html = (d / REPORT / "report.html").read_text()
    assert "N7_T2" in html
    first = (d / REPORT / "report.html").stat().st_mtime_ns
    assert not refresher.refresh_if_changed()  # unchanged records: no render
    assert (d / REPORT / "report.html").stat().st_mtime_ns == first
    assert not [p for p in d.iterdir() if p.name.startswith(".report")]  # no temporary directory left behind


def test_the_refresher_thread_publishes_while_the_study_runs(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    sid = prepare_study(SPEC, settings=settings)
    d = settings.study_dir(sid)
    with ReportRefresher(SPEC, d, {"study_id": sid}, every_s=0.05):
        append_record(d / RECORDS, trial_record(sid, 0, "ea", SIZE, "N61_T6", [1], status="unsolved", eval_acc=0.4))
        end = time.monotonic() + 120
        while not (d / REPORT / "report.html").exists() and time.monotonic() < end:
            time.sleep(0.1)
    assert "N61_T6" in (d / REPORT / "report.html").read_text()


def test_a_costly_render_spaces_out_the_next_one(tmp_path: Path) -> None:
    """Live renders take at most ``cpu_share`` of one CPU: after a render the refresher waits that much longer."""
    settings = Settings(data_dir=tmp_path)
    sid = prepare_study(SPEC, settings=settings)
    d = settings.study_dir(sid)
    html = d / REPORT / "report.html"
    with ReportRefresher(SPEC, d, {"study_id": sid}, every_s=0.05, cpu_share=1e-6) as refresher:
        append_record(d / RECORDS, trial_record(sid, 0, "ea", SIZE, "N61_T6", [1], status="unsolved", eval_acc=0.4))
        end = time.monotonic() + 120
        while not html.exists() and time.monotonic() < end:
            time.sleep(0.05)
        first = html.stat().st_mtime_ns
        while refresher.wait_s == 0.05 and time.monotonic() < end:  # the loop sets it right after the render
            time.sleep(0.01)
        assert refresher.wait_s >= 10, "a render costs over 10 us of CPU: at 1e-6 it waits 10 s or more"
        append_record(d / RECORDS, trial_record(sid, 0, "dpa", SIZE, "N7_T2", [0], status="solved", eval_acc=1.0))
        time.sleep(0.5)  # ten times every_s; the refresher waits far longer, so a stalled test cannot matter
        assert html.stat().st_mtime_ns == first
