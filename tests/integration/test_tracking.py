"""MLflow tracking on a real SQLite store: one parent run per study, one child run per trial key."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from studies.records import TrialRecord
from studies.report_html import write_report
from studies.settings import get_settings
from studies.spec import StudySpec
from workers.search import make_cell
from workers.tracking import StudyTracker, artifact_location, cell_key, ensure_study_run, flush, log_report

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


def _record(cell: dict, run_id: str, status: str, **kw: object) -> TrialRecord:
    return TrialRecord(
        study_id="s2",
        trial_id=f"t-{cell['kind']}-{cell['point']}-{cell['seed']}",
        kind=cell["kind"],
        **cell["size"],
        point=cell["point"],
        coords=cell["coords"],
        seed=cell["seed"],
        lr=cell["lr"],
        status=status,  # type: ignore[arg-type]
        mlflow_run_id=run_id,
        **kw,  # type: ignore[arg-type]
    )


def test_runs_carry_what_a_reviewer_groups_and_charts_by(data_dir: Path) -> None:
    settings = get_settings()
    uri = settings.mlflow_uri
    parent = ensure_study_run(uri, "s2", SPEC, artifact_location(uri, settings.data_dir, "s2"))
    tracker = StudyTracker("s2", parent)
    exp = tracker.client.get_experiment(parent["experiment_id"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (data_dir / "mlartifacts" / "s2").as_uri(), "artifacts stay under the data dir"
    assert artifact_location("http://mlflow:5000", settings.data_dir, "s2") is None, "a server keeps its own store"

    records = []
    for kind in SPEC.attention:
        for point_idx, status in ((0, "solved"), (1, "unsolved")):
            cell = make_cell(SPEC, kind, 0, point_idx, 0.003, 0)
            run_id = tracker.trial_run(f"{kind}{point_idx}", cell, {"lr": 0.003})
            solved = status == "solved"
            rec = _record(cell, run_id, status, eval_acc=0.995 if solved else 0.4, eval_acc_lo=0.99, eval_acc_hi=0.998)
            rec = rec.model_copy(update={"steps_to_solve": 300 if solved else None, "steps": 300 if solved else 600})
            tracker.finish(rec)
            records.append(rec)
    failed_cell = make_cell(SPEC, "ea", 0, 1, 0.003, 1)
    failed = _record(failed_cell, tracker.trial_run("f", failed_cell, {}), "diverged", error="loss nan")
    tracker.finish(failed)

    found = tracker.client.search_runs([parent["experiment_id"]])
    runs = {r.data.tags["ladder.trial_key"]: r for r in found if r.info.run_id != parent["run_id"]}
    for rec in records:
        run = runs[rec.trial_key]
        m, tags = run.data.metrics, run.data.tags
        assert m["solved"] == (rec.status == "solved")
        assert ("steps_to_solve" in m) == (rec.status == "solved")
        assert (m["final_eval_acc"], m["final_eval_acc_lo"], m["final_eval_acc_hi"]) == (rec.eval_acc, 0.99, 0.998)
        assert tags["pair"] == rec.pair_key and tags["cell"] == f"{rec.kind}/{rec.size_name}/{rec.point}"
        assert tags["mlflow.source.git.commit"] and tags["version.mlflow"]
        assert run.info.run_name.startswith(f"{rec.kind} {rec.size_name} {rec.point}")
    twins = [r for r in runs.values() if r.data.tags["pair"] == records[0].pair_key]
    assert sorted(r.data.tags["kind"] for r in twins) == sorted(SPEC.attention), "a pair lines up one run per kind"
    assert "solved" not in runs[failed.trial_key].data.metrics, "no verdict for a trial without an outcome"
    assert runs[failed.trial_key].info.status == "FAILED"

    out = data_dir / "report"
    report = write_report(SPEC, [*records, failed], out, {"study_id": "s2"})
    log_report(uri, parent["run_id"], report, out)
    metrics = tracker.client.get_run(parent["run_id"]).data.metrics
    for kind in SPEC.attention:
        front = report.frontier_of(kind, "d16_l1_h2")
        assert metrics[f"frontier_rung/{kind}/d16_l1_h2"] == (-1 if front.highest_rung is None else front.highest_rung)
        assert metrics[f"frontier_rung_possible/{kind}/d16_l1_h2"] == front.highest_possible_rung >= 0
        assert metrics[f"solved_cells/{kind}/d16_l1_h2"] == front.n_solved
        assert metrics[f"solved_trials/{kind}/d16_l1_h2"] == 1
    paths = {a.path for a in tracker.client.list_artifacts(parent["run_id"])}
    assert {"frontier.json", "report", "images"} <= paths
    assert "report/report.html" in {a.path for a in tracker.client.list_artifacts(parent["run_id"], "report")}
    local = data_dir / "mlartifacts" / "s2" / parent["run_id"] / "artifacts"
    assert (local / "report" / "frontier.png").is_file() and list((local / "images").glob("frontier*.png"))


def test_a_pack_run_again_under_a_new_tune_trial_keeps_the_first_record_and_its_run(data_dir: Path) -> None:
    """A driver killed before Tune saved its experiment forgets the pack's Tune trial; the resumed
    searcher hands out the same cells again (``PairedOptunaSearch.recover_orphans``) under a new id."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from studies.records import read_records
    from workers.callbacks import StudyCallback, fixed_config
    from workers.packing import plan_packs

    settings = get_settings()
    settings.study_dir("s3").mkdir(parents=True)
    parent = ensure_study_run(settings.mlflow_uri, "s3", SPEC)
    fixed = fixed_config(SPEC)
    (pack,) = plan_packs([make_cell(SPEC, "dpa", 0, p, 0.003, 0) for p in (0, 1)], 8, fixed)
    progress = {"members": {str(i): {"step": 50, "eval_acc": 0.5} for i in range(2)}, "finals": {}}
    solved = {"status": "solved", "solved": True, "eval_acc": 1.0, "steps": 100}

    def trial(tid: str) -> SimpleNamespace:
        return SimpleNamespace(trial_id=tid, config={"pack": pack, "fixed": fixed}, status=Trial.RUNNING)

    first, t1 = StudyCallback("s3", SPEC, settings, StudyTracker("s3", parent)), trial("t1")
    first.on_trial_start(0, [t1], t1)
    first.on_trial_result(0, [t1], t1, progress)
    first.on_trial_result(0, [t1], t1, {"members": {}, "finals": {"1": solved}})  # member 1 recorded; then kill -9

    again = pickle.loads(pickle.dumps(first))  # what Tune restores: the callback as it was saved (caches empty)
    again.tracker.runs.clear()  # saved before t1 started
    t2 = trial("t2")
    again.on_trial_start(0, [t2], t2)
    again.on_trial_result(
        0, [t2], t2, progress | {"members": {str(i): {"step": 100, "eval_acc": 0.9} for i in range(2)}}
    )
    finals = {"0": solved | {"steps": 150}, "1": solved}
    t2.last_result = {"final": True, "finals": finals}
    again.on_trial_result(0, [t2], t2, {"members": {}, "finals": finals})
    again.on_trial_complete(0, [t2], t2)

    flush()
    records = read_records(settings.study_dir("s3") / "trials.jsonl")
    assert sorted(r.trial_id for r in records) == ["t1.m1", "t2.m0"], "each member recorded once, the first time"
    runs = [r for r in again.tracker.client.search_runs([parent["experiment_id"]]) if r.info.run_id != parent["run_id"]]
    assert sorted(r.data.tags["ladder.trial_id"] for r in runs) == ["t1.m1", "t2.m0"], "MLflow names the records"
    assert all(r.info.status == "FINISHED" for r in runs)
    by_id = {r.data.tags["ladder.trial_id"]: r.info.run_id for r in runs}
    curve = again.tracker.client.get_metric_history(by_id["t1.m1"], "eval_acc")
    assert [m.step for m in curve] == [50], "the re-run of a recorded member adds nothing to its curve"


def test_runs_of_trials_lost_at_a_kill_end_as_lost_once_the_study_finishes(data_dir: Path) -> None:
    from workers.tracking import close_lost_runs

    settings = get_settings()
    parent = ensure_study_run(settings.mlflow_uri, "s4", SPEC)
    tracker = StudyTracker("s4", parent)
    recorded_cell, lost_cell = make_cell(SPEC, "ea", 0, 0, 0.003, 0), make_cell(SPEC, "ea", 0, 1, 0.003, 0)
    recorded_run = tracker.trial_run("a", recorded_cell, {})
    lost_run = tracker.trial_run("b", lost_cell, {})  # its Tune trial was lost; no record will name it
    other = ensure_study_run(settings.mlflow_uri, "s5", SPEC)  # another study in another experiment
    untouched = StudyTracker("s5", other).trial_run("c", lost_cell, {})
    keys = {cell_key(recorded_cell)}
    assert close_lost_runs(settings.mlflow_uri, parent["experiment_id"], parent["run_id"], keys) == 1
    client = tracker.client
    lost = client.get_run(lost_run)
    assert (lost.info.status, lost.data.tags["status"]) == ("KILLED", "lost") and "ladder.lost" in lost.data.tags
    assert client.get_run(recorded_run).info.status == "RUNNING", "a recorded trial's run is the callback's to finish"
    assert client.get_run(untouched).info.status == "RUNNING"
    assert close_lost_runs(settings.mlflow_uri, parent["experiment_id"], parent["run_id"], keys) == 0


def test_progress_points_queued_for_a_run_reach_mlflow_whole(data_dir: Path) -> None:
    """The writer puts what queued up for one run in one batch: every point arrives, once."""
    from mlflow.entities import Metric

    from workers.tracking import MAX_BATCH_METRICS, coalesce

    uri = get_settings().mlflow_uri
    tracker = StudyTracker("s4", ensure_study_run(uri, "s4", SPEC))
    runs = [tracker.trial_run(f"t{s}", make_cell(SPEC, "ea", 0, 0, 0.003, s), {"lr": 0.003}) for s in (0, 1)]
    for step in range(0, 3000, 100):  # 30 evaluations of a pack of two, queued faster than they are written
        for i, run_id in enumerate(runs):
            tracker.log_progress(run_id, {"step": step, "search_acc": step / 3000 + i, "train_loss": 1.0})
    flush()
    for i, run_id in enumerate(runs):
        history = sorted((m.step, m.value) for m in tracker.client.get_metric_history(run_id, "search_acc"))
        assert history == [(s, s / 3000 + i) for s in range(0, 3000, 100)]

    # one batch per run and store, in first-seen order, split at MLflow's limit
    m = [Metric("k", 1.0, 0, s) for s in range(MAX_BATCH_METRICS + 5)]
    batches = coalesce([("u", "a", m[:3]), ("u", "b", m[:1]), ("u", "a", m[3:]), ("v", "a", m[:2])])
    assert [(u, r, len(x)) for u, r, x in batches] == [
        ("u", "a", MAX_BATCH_METRICS),
        ("u", "a", 5),
        ("u", "b", 1),
        ("v", "a", 2),
    ]
    assert [x.step for _, _, batch in batches[:2] for x in batch] == list(range(MAX_BATCH_METRICS + 5))
