"""The study driver on real local Ray, real MLflow (SQLite) and a real Optuna RDB study."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from studies.records import read_records
from studies.settings import get_settings
from studies.spec import StudySpec
from studies.studydir import prepare_study, read_status
from tests.integration.helpers import (
    child_runs,
    driver_env,
    driver_mid_study,
    kill_tree,
    resume_to_end,
    start_driver,
    trial_lines,
)
from workers.tasks import GENERATOR_VERSION

pytestmark = pytest.mark.integration

SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2}


def _run_to_end(study_id: str, data_dir: Path, timeout: float = 900, **env: str) -> None:
    log = data_dir / f"{study_id}.log"
    proc = start_driver(study_id, driver_env(data_dir, **env), log)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        kill_tree(proc)
    assert rc == 0, log.read_text()[-4000:]


def test_grid_study_tracks_every_trial_and_survives_failures(data_dir: Path) -> None:
    spec = StudySpec.model_validate(
        {
            "name": "faults",
            "task": {"ladder": [[[7, 2]], [[11, 2]], [[13, 3]]]},
            "model": {"sizes": [SIZE]},
            "training": {"max_steps": 200, "eval_interval": 100, "eval_sequences": 128},
            "hparams": {"lr": {"values": [0.003, 1e5]}},
            "execution": {"pack": "off"},  # faults are injected per solo trial
        }
    )
    study_id = prepare_study(spec, settings=get_settings())
    _run_to_end(study_id, data_dir, LADDER_FAULTS=json.dumps({"N11_T2": "raise", "N13_T3": "oom"}))

    study_dir = get_settings().study_dir(study_id)
    status = read_status(study_dir)
    assert status["state"] == "finished"
    records = read_records(study_dir / "trials.jsonl")
    assert len(records) == spec.planned_trials() == 12
    by = {(r.kind, r.point, r.lr): r.status for r in records}
    for kind in ("dpa", "ea"):
        for lr in (0.003, 1e5):
            assert by[(kind, "N11_T2", lr)] == "failed"
            assert by[(kind, "N13_T3", lr)] == "oom"
        assert by[(kind, "N7_T2", 1e5)] == "diverged"
        assert by[(kind, "N7_T2", 0.003)] in ("solved", "unsolved")

    ml = status["mlflow"]
    children = child_runs(ml["tracking_uri"], ml["experiment_id"], ml["run_id"])
    assert Counter(r.data.tags["ladder.trial_id"] for r in children) == Counter(r.trial_id for r in records)
    tags = {r.data.tags["ladder.trial_id"]: r for r in children}
    for rec in records:
        run = tags[rec.trial_id]
        assert run.data.tags["status"] == rec.status
        assert run.data.tags["kind"] == rec.kind and run.data.tags["point"] == rec.point
        assert run.data.tags["generator_version"] == GENERATOR_VERSION
        assert run.data.params["seed"] == str(rec.seed)
        assert "version.torch" in run.data.tags and "mlflow.source.git.commit" in run.data.tags
        assert run.data.tags["pair"] == rec.pair_key
        if rec.status in ("solved", "unsolved"):
            assert run.data.metrics["eval_acc"] == pytest.approx(rec.eval_acc)
            assert run.data.metrics["solved"] == (rec.status == "solved")
            assert run.info.status == "FINISHED"
        else:
            assert "solved" not in run.data.metrics
            assert run.info.status == "FAILED"
    client = MlflowClient(ml["tracking_uri"])
    exp = client.get_experiment(ml["experiment_id"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location.startswith(data_dir.resolve().as_uri())
    parent = client.get_run(ml["run_id"])
    for kind in spec.attention:
        assert f"frontier_rung/{kind}/d16_l1_h2" in parent.data.metrics
    assert "report/report.html" in {a.path for a in client.list_artifacts(ml["run_id"], "report")}


def test_killed_packed_optuna_study_resumes_without_loss_or_duplicates(data_dir: Path) -> None:
    spec = StudySpec.model_validate(
        {
            "name": "crash",
            "task": {"ladder": [[[13, 4]], [[23, 4]], [[31, 4]]]},
            "model": {"sizes": [SIZE, {"d_model": 24, "n_layers": 1, "n_heads": 2}]},
            "training": {"max_steps": 600, "eval_interval": 50, "eval_sequences": 128},
            "hparams": {"lr": {"low": 1e-3, "high": 1e-2}},
            "search": {"method": "optuna", "n_trials": 4},
            "execution": {"pack": 2},  # two picks a pack: a member can finish while its pack runs on
        }
    )
    settings = get_settings()
    study_id = prepare_study(spec, settings=settings)
    study_dir = settings.study_dir(study_id)
    env = driver_env(data_dir)
    log = data_dir / "driver.log"
    with driver_mid_study(study_id, env, log, 2, 240, "two finished trials and one running"):
        pass  # kill -9 mid-study
    before = {r["trial_id"] for r in trial_lines(study_dir)}
    assert 2 <= len(before) < spec.planned_trials()
    assert all(".m" in t for t in before), "optuna picks run packed"

    resume_to_end(study_id, env, log, timeout=300)

    status = read_status(study_dir)
    assert status["state"] == "finished"
    lines = [r["trial_id"] for r in trial_lines(study_dir)]
    assert len(lines) == len(set(lines)), "every member recorded once"
    records = read_records(study_dir / "trials.jsonl")
    assert len(records) == spec.planned_trials() == 8
    assert before <= {r.trial_id for r in records}
    ml = status["mlflow"]
    children = child_runs(ml["tracking_uri"], ml["experiment_id"], ml["run_id"])
    ids = [r.data.tags["ladder.trial_id"] for r in children]
    assert sorted(ids) == sorted(r.trial_id for r in records), "each trial exactly once in MLflow"

    study = optuna.load_study(study_name=study_id, storage=settings.optuna_url)
    states = Counter(t.state.name for t in study.trials)
    assert states["RUNNING"] == 0
    assert states["COMPLETE"] == 4, "each pick told once"
    told = [k for t in study.trials if t.state.name == "COMPLETE" for k in t.user_attrs["ladder.trial_keys"]]
    assert sorted(told) == sorted(r.trial_key for r in records), "every member in exactly one told pick"
    # every Optuna pick ran once per kind: its params match the trials' configs
    done = [t for t in study.trials if t.state.name == "COMPLETE"]  # a pick killed mid-ask has no params
    picks = {(t.params["size_idx"], t.params["point_idx"], round(t.params["lr"], 12)) for t in done}
    sizes = spec.model.all_sizes()
    points = [p.name for p in spec.task.points()]
    for r in records:
        key = (sizes.index(next(s for s in sizes if s.d_model == r.d_model)), points.index(r.point), round(r.lr, 12))
        assert key in picks


def test_asha_within_one_cell_cuts_hopeless_lrs_and_survives_a_trial_that_diverges_before_its_first_eval(
    data_dir: Path,
) -> None:
    # One cell (ASHA is refused across kinds, sizes or points). One trial at a time, in grid order, so every
    # rung decision is fixed: the good lr sets the rungs, the hopeless lrs fall below them at the first rung
    # (step 100), and lr 1e5 diverges within the warm-up, before any evaluation, so it reports no accuracy.
    spec = StudySpec.model_validate(
        {
            "name": "asha",
            "attention": ["dpa"],
            "task": {"ladder": [[[7, 2]]]},
            "model": {"sizes": [SIZE]},
            "hparams": {"lr": {"values": [0.01, 1e-6, 2e-6, 1e5]}},
            "training": {"max_steps": 400, "eval_interval": 50},
            "early_stopping": {"asha": True, "grace_period": 100, "reduction_factor": 2},
            "max_concurrent": 1,
        }
    )
    study_id = prepare_study(spec, settings=get_settings())
    _run_to_end(study_id, data_dir)
    study_dir = get_settings().study_dir(study_id)
    assert read_status(study_dir)["state"] == "finished"
    by_lr = {r.lr: r for r in read_records(study_dir / "trials.jsonl")}
    assert len(by_lr) == spec.planned_trials() == 4
    assert by_lr[1e5].status == "diverged" and by_lr[1e5].search_acc is None
    for lr in (1e-6, 2e-6):
        assert (by_lr[lr].status, by_lr[lr].steps) == ("stopped", 100), by_lr[lr]
    assert by_lr[0.01].status in ("solved", "unsolved") and by_lr[0.01].steps > 100
    # stopped is censored: the report scores only real outcomes
    from studies.records import OUTCOMES

    assert "stopped" not in OUTCOMES


def test_killed_packed_grid_study_resumes_with_every_member_recorded_once(data_dir: Path) -> None:
    spec = StudySpec.model_validate(
        {
            "name": "packed",
            "task": {"ladder": [[[5, 1]], [[13, 2]], [[23, 4]]]},
            "model": {"sizes": [SIZE]},
            "training": {"max_steps": 400, "eval_interval": 50, "eval_sequences": 128},
            "hparams": {"lr": {"values": [0.003, 1e5]}},
            "seeds": [0, 1],
        }
    )
    settings = get_settings()
    study_id = prepare_study(spec, settings=settings)
    study_dir = settings.study_dir(study_id)
    env = driver_env(data_dir)
    log = data_dir / "driver.log"
    with driver_mid_study(study_id, env, log, 2, 240, "finished members and a running pack"):
        pass  # kill -9 mid-pack
    before = {r["trial_id"] for r in trial_lines(study_dir)}
    assert 2 <= len(before) < spec.planned_trials()
    assert all(".m" in t for t in before), "grid trials run packed by default"

    resume_to_end(study_id, env, log, timeout=300)

    status = read_status(study_dir)
    assert status["state"] == "finished"
    lines = [r["trial_id"] for r in trial_lines(study_dir)]
    assert len(lines) == len(set(lines)) == spec.planned_trials() == 24, "every member recorded exactly once"
    records = read_records(study_dir / "trials.jsonl")
    configs = Counter((r.kind, r.point, r.lr, r.seed) for r in records)
    assert len(configs) == 24 and set(configs.values()) == {1}
    for r in records:
        if r.lr == 1e5:
            assert r.status == "diverged", r
        else:
            assert r.status in ("solved", "unsolved"), r
            assert r.eval_acc is not None and r.cpu_s > 0
    assert any(r.status == "solved" for r in records), [(r.kind, r.point, r.status) for r in records]
    ml = status["mlflow"]
    children = child_runs(ml["tracking_uri"], ml["experiment_id"], ml["run_id"])
    ids = [r.data.tags["ladder.trial_id"] for r in children]
    assert sorted(ids) == sorted(lines), "each member exactly once in MLflow"
    assert all(r.info.status in ("FINISHED", "FAILED") for r in children)
