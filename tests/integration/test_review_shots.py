"""The MLflow queries behind docs/review.md find what the doc promises, on a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from studies.report_html import write_report
from studies.review_shots import experiment_url, review_queries
from studies.settings import get_settings
from tests.integration.test_tracking import SPEC, _record
from workers.search import make_cell
from workers.tracking import StudyTracker, artifact_location, ensure_study_run, log_report

pytestmark = pytest.mark.integration


def test_review_queries_find_kinds_pairs_verdicts_and_the_frontier_summary(data_dir: Path) -> None:
    settings = get_settings()
    uri = settings.mlflow_uri
    parent = ensure_study_run(uri, "rev", SPEC, artifact_location(uri, settings.data_dir, "rev"))
    tracker = StudyTracker("rev", parent)
    records = []
    for kind, solved_points in (("dpa", {0, 1}), ("ea", {0})):
        for point_idx in (0, 1):
            for seed in SPEC.seeds:
                cell = make_cell(SPEC, kind, 0, point_idx, 0.003, seed)
                status = "solved" if point_idx in solved_points else "unsolved"
                rec = _record(cell, tracker.trial_run(f"{kind}{point_idx}{seed}", cell, {}), status, eval_acc=0.5)
                tracker.finish(rec)
                records.append(rec)
    out = data_dir / "report"
    log_report(uri, parent["run_id"], write_report(SPEC, records, out, {"study_id": "rev"}), out)

    review = review_queries(uri, "rev")
    # "Group by kind": one group per attention kind, every trial in one
    assert review.runs_per_kind == {"dpa": 4, "ea": 4}
    assert review.solved_per_kind == {"dpa": 4, "ea": 2}
    # "Group by pair": each pair lines up one run of each kind
    assert len(review.pairs) == 4 and all(kinds == ["dpa", "ea"] for kinds in review.pairs.values())
    # the parent's summary and report
    for kind in ("dpa", "ea"):
        assert {f"frontier_rung/{kind}/d16_l1_h2", f"solved_trials/{kind}/d16_l1_h2"} <= set(review.summary)
    assert review.summary["solved_trials/dpa/d16_l1_h2"] == 4
    assert {"frontier.json", "report", "images"} <= set(review.parent_artifacts)
    assert {"solved", "final_eval_acc"} <= review.child_metrics
    assert review.experiment_kind == "custom_model_development"
    assert review.artifact_location.startswith(data_dir.resolve().as_uri())
    assert experiment_url("http://ui", review.experiment_id).endswith("/runs?workflowType=machine_learning")
