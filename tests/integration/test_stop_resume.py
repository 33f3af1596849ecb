"""Stop a driver with a signal, then resume: every planned trial is recorded and tracked exactly once.

SIGTERM and SIGINT both end Tune's run the way Tune ends it on an interrupt (experiment
state saved, in-flight trials resumable); the study is ``interrupted``, not ``failed``, and
a second driver of the same study refuses to start while the first lives.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from studies.records import read_records
from studies.settings import get_settings
from studies.spec import StudySpec
from studies.studydir import prepare_study, read_status
from tests.integration.helpers import (
    child_runs,
    driver_env,
    driver_mid_study,
    resume_to_end,
    trial_lines,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_then_resume_counts_every_trial_once(data_dir: Path, signum: int) -> None:
    spec = StudySpec.model_validate(
        {
            "name": "stop",
            "task": {"ladder": [[[7, 2]], [[13, 2]], [[61, 6]]]},
            "model": {"sizes": [SIZE]},
            # N61_T6 is never solved: its two trials run the whole budget, so trials are still in flight
            # when the signal comes, right after a finished and a running trial are seen
            "training": {"max_steps": 3000, "eval_interval": 50, "eval_sequences": 128},
            "execution": {"pack": "off"},  # one trial per Tune trial: some finish, some are in flight
        }
    )
    settings = get_settings()
    study_id = prepare_study(spec, settings=settings)
    study_dir = settings.study_dir(study_id)
    env = driver_env(data_dir)
    log = data_dir / "driver.log"
    refusals: list[subprocess.CompletedProcess[str]] = []

    def second_driver() -> None:  # while the first holds the lock, before its trials get far
        args = [sys.executable, "-m", "workers.driver", study_id]
        refusals.append(subprocess.run(args, env=env, capture_output=True, text=True, timeout=300))

    with driver_mid_study(
        study_id, env, log, 1, 400, "a finished trial and a running one", on_lock=second_driver
    ) as proc:
        # A second driver of the same study refused while this one lived.
        (second,) = refusals
        assert second.returncode == 3, second.stdout[-2000:] + second.stderr[-2000:]
        proc.send_signal(signum)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
    status = read_status(study_dir)
    assert status["state"] == "interrupted", status
    before = {r.trial_key for r in read_records(study_dir / "trials.jsonl")}
    assert 1 <= len(before) < spec.planned_trials()

    resume_to_end(study_id, env, log, timeout=600)
    assert read_status(study_dir)["state"] == "finished"
    lines = trial_lines(study_dir)
    keys = [r.trial_key for r in read_records(study_dir / "trials.jsonl")]
    assert len(lines) == len(keys) == len(set(keys)) == spec.planned_trials() == 6, lines
    assert before <= set(keys)
    ml = read_status(study_dir)["mlflow"]
    runs = child_runs(ml["tracking_uri"], ml["experiment_id"], ml["run_id"])
    finished = sorted(r.data.tags["ladder.trial_key"] for r in runs if r.info.status == "FINISHED")
    assert finished == sorted(keys), "each trial exactly once, finished, in MLflow"
    assert all(r.info.status != "RUNNING" for r in runs)
