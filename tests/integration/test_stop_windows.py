"""A stop signal at any moment of the driver's start is a resumable stop, never a failure or a lost signal.

The driver's start has three windows where a plain SIGTERM handler is not enough: inside
``ray.init`` (Ray's own handler, ``sys.exit``, holds SIGTERM there), after Ray while the tuner is
built, and inside ``Tuner.fit`` before Tune installs its interrupt handler. The service's cancel
lands in any of them when it follows a study's start closely (a CI run saw "failed" for a cancel
that came during ``ray.init``). Each test sends SIGTERM exactly there, from inside the real
driver process, then resumes the study to its end.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from studies.records import read_records
from studies.settings import get_settings
from studies.spec import StudySpec
from studies.studydir import prepare_study, read_status
from tests.integration.helpers import driver_env, kill_tree, resume_to_end

pytestmark = pytest.mark.integration

# The driver, with one step of its start wrapped to send the process SIGTERM at that moment.
DRIVER_WITH_SIGNAL = """
import os, signal, sys, time
import ray
from ray import tune
from workers import driver

study_id, where = sys.argv[1:]

def term():
    os.kill(os.getpid(), signal.SIGTERM)

if where == "ray.init":
    real_init = ray.init
    def init(*a, **k):
        out = real_init(*a, **k)
        term()  # Ray's handlers still hold SIGTERM: sys.exit(15) on the next bytecode
        time.sleep(5)
        return out
    ray.init = init
    real_exit = driver._exit_now
    def exit_late(code):
        time.sleep(4)  # a slow exit: past the 3 s abort alarm abseil's handler arms when it sees a signal
        real_exit(code)
    driver._exit_now = exit_late
elif where == "build_tuner":
    real_build = driver.build_tuner
    def build(*a, **k):
        out = real_build(*a, **k)
        term()
        return out
    driver.build_tuner = build
else:
    real_fit = tune.Tuner.fit
    def fit(self):
        term()  # Tune's SIGUSR1 handler is not installed yet
        return real_fit(self)
    tune.Tuner.fit = fit
driver._exit_now(driver.main([study_id]))
"""


@pytest.mark.parametrize("where", ["ray.init", "build_tuner", "fit"])
def test_a_stop_during_the_start_is_an_interrupt_that_resumes(data_dir: Path, where: str) -> None:
    spec = StudySpec.model_validate(
        {
            "name": "stop-window",
            "task": {"ladder": [[[7, 2]]]},
            "model": {"sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}]},
            "training": {"max_steps": 200, "eval_interval": 50, "eval_sequences": 64},
        }
    )
    settings = get_settings()
    study_id = prepare_study(spec, settings=settings)
    study_dir = settings.study_dir(study_id)
    env, log = driver_env(data_dir), data_dir / "driver.log"
    args = [sys.executable, "-c", DRIVER_WITH_SIGNAL, study_id, where]
    with log.open("ab") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=180)
    finally:
        kill_tree(proc)
    status = read_status(study_dir)
    assert (rc, status["state"], status.get("error")) == (0, "interrupted", None), log.read_text()[-4000:]
    assert not list(read_records(study_dir / "trials.jsonl")), "stopped before any trial could finish"
    assert "signal 15: stopping the study" in log.read_text() or where == "ray.init"

    resume_to_end(study_id, env, log, timeout=300)
    keys = [r.trial_key for r in read_records(study_dir / "trials.jsonl")]
    assert read_status(study_dir)["state"] == "finished"
    assert len(keys) == len(set(keys)) == spec.planned_trials() == 2, keys
