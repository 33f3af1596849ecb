"""Resume after a hard kill and across code versions: every trial counted once, nothing left RUNNING.

A kill -9 gives the driver no chance to save anything: Tune restores the experiment from its
last saved state, and the Optuna study may hold trials that nobody will ever finish. A study
started by an older Ladder whose trainable was ``train_point`` must resume with that trainable
(``Tuner.restore`` refuses any other) even where this version would pack its trials.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest

from studies.records import read_records
from studies.settings import get_settings
from studies.spec import StudySpec
from studies.studydir import SPEC, STATUS, prepare_study, read_exit, read_status, write_json_atomic
from tests.integration.helpers import driver_env, driver_mid_study, resume_to_end, trial_lines
from workers.packing import max_members

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2}
TRAINING = {"max_steps": 800, "eval_interval": 50, "eval_sequences": 128}


def _stop_mid_run(study_id: str, data_dir: Path, hard: bool) -> None:
    """Run the driver until one trial is recorded and another runs, then SIGKILL its tree (hard) or SIGTERM it."""
    log = data_dir / "driver.log"
    # On leaving: the driver, its local Ray and the trials, all by SIGKILL at once (hard), or what is left of them.
    with driver_mid_study(study_id, driver_env(data_dir), log, 1, 400, "a finished trial and a running one") as proc:
        if not hard:
            proc.terminate()
            assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]


def _resume_to_end(study_id: str, data_dir: Path) -> None:
    log = data_dir / "driver.log"
    resume_to_end(study_id, driver_env(data_dir), log, timeout=900)
    assert read_status(get_settings().study_dir(study_id))["state"] == "finished", log.read_text()[-4000:]


def _keys_once(study_id: str, planned: int) -> list[str]:
    study_dir = get_settings().study_dir(study_id)
    lines = trial_lines(study_dir)
    keys = [r.trial_key for r in read_records(study_dir / "trials.jsonl")]
    assert len(lines) == len(keys) == len(set(keys)) == planned, lines
    return keys


def test_kill9_of_an_unpacked_optuna_study_then_resume_leaves_no_optuna_trial_running(data_dir: Path) -> None:
    spec = StudySpec.model_validate(
        {
            "name": "kill9",
            "task": {"ladder": [[[7, 2]], [[13, 2]], [[61, 6]]]},
            "model": {"sizes": [SIZE]},
            "training": TRAINING,
            "hparams": {"lr": {"values": [0.003, 0.01]}},
            "search": {"method": "optuna", "n_trials": 3, "sampler_seed": 0},
            # One trial per Tune trial: Tune restores PairedOptunaSearch itself (restore() -> fail_orphans).
            # The packed path (PackSearch) is test_driver's test_killed_packed_optuna_study_resumes_...
            "execution": {"pack": "off"},
        }
    )
    study_id = prepare_study(spec, settings=get_settings())
    _stop_mid_run(study_id, data_dir, hard=True)
    storage = optuna.storages.RDBStorage(get_settings().optuna_url)
    running = [t for t in optuna.load_study(study_name=study_id, storage=storage).trials if t.state.name == "RUNNING"]
    assert running, "the kill left no Optuna trial RUNNING: this test tests nothing"
    assert read_exit(get_settings().study_dir(study_id), 0) is None  # SIGKILL: no exit record

    _resume_to_end(study_id, data_dir)
    trials = optuna.load_study(study_name=study_id, storage=storage).trials
    assert [t.number for t in trials if t.state.name == "RUNNING"] == [], [(t.number, t.state) for t in trials]
    _keys_once(study_id, spec.planned_trials())
    exit_record = read_exit(get_settings().study_dir(study_id), 0)
    assert exit_record is not None and exit_record["code"] == 0, read_status(get_settings().study_dir(study_id))


def test_a_study_started_unpacked_resumes_with_its_own_trainable(data_dir: Path) -> None:
    """An older version ran every trial alone (``train_point``); this one would pack the same spec."""
    settings = get_settings()
    raw: dict[str, Any] = {
        "name": "oldver",
        "task": {"ladder": [[[7, 2]], [[13, 2]], [[61, 6]]]},
        "model": {"sizes": [SIZE]},
        "training": TRAINING,
    }
    spec = StudySpec.model_validate(raw | {"execution": {"pack": "off"}})
    study_id = prepare_study(spec, settings=settings)
    study_dir = settings.study_dir(study_id)
    _stop_mid_run(study_id, data_dir, hard=False)
    assert read_status(study_dir)["trainable"] == "train_point"

    # What the older version left: its spec had no `execution` (this version reads it as pack: auto)
    # and its status file no record of the trainable.
    newer = StudySpec.model_validate(raw)
    assert max_members(newer) > 1
    (study_dir / SPEC).write_text(newer.to_json())
    status = json.loads((study_dir / STATUS).read_text())
    status.pop("trainable")
    write_json_atomic(study_dir / STATUS, status)

    _resume_to_end(study_id, data_dir)
    _keys_once(study_id, spec.planned_trials())
    assert read_status(study_dir)["trainable"] == "train_point"  # recorded again for the next resume
