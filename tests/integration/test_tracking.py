"""MLflow tracking on a real SQLite store: one parent run per study, one child run per trial key."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from studies.records import TrialRecord
from studies.settings import get_settings
from studies.spec import StudySpec
from workers.search import make_cell
from workers.tracking import StudyTracker, cell_key, ensure_study_run

pytestmark = pytest.mark.integration

SPEC = StudySpec.model_validate(
    {
        "name": "track",
        "task": {"ladder": [[[7, 2]], [[11, 2]]]},
        "model": {"sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}]},
        "seeds": [0, 1],
    }
)


def test_a_trial_gets_one_child_run_however_often_it_is_started(data_dir: Path) -> None:
    uri = get_settings().mlflow_uri
    parent = ensure_study_run(uri, "s1", SPEC)
    assert ensure_study_run(uri, "s1", SPEC) == parent, "the parent run is found again by tag"
    cell = make_cell(SPEC, "ea", 0, 1, 0.003, 1)
    first = StudyTracker("s1", parent)
    run_id = first.trial_run("tune_a", cell, {"lr": 0.003})
    assert first.trial_run("tune_a", cell, {"lr": 0.003}) == run_id
    # a resumed driver (restored callback, or a fresh Tune trial id for the same configuration)
    again = pickle.loads(pickle.dumps(first))
    again.runs.clear()
    assert again.trial_run("tune_b", cell, {"lr": 0.003}) == run_id
    twin = again.trial_run("tune_c", make_cell(SPEC, "dpa", 0, 1, 0.003, 1), {"lr": 0.003})
    other_seed = again.trial_run("tune_d", make_cell(SPEC, "ea", 0, 1, 0.003, 0), {"lr": 0.003})
    assert len({run_id, twin, other_seed}) == 3

    run = again.client.get_run(run_id)
    assert run.data.tags["ladder.trial_id"] == "tune_b", "the run names the trial that ran last"
    assert run.data.tags["mlflow.parentRunId"] == parent["run_id"]
    size = {"d_model": 16, "n_layers": 1, "n_heads": 2}
    rec = TrialRecord(
        study_id="s1",
        trial_id="tune_b",
        kind="ea",
        **size,
        point="N11_T2",
        coords=[1],
        seed=1,
        lr=0.003,
        status="solved",
    )
    assert run.data.tags["ladder.trial_key"] == cell_key(cell) == rec.trial_key
