"""MLflow tracking of a study: one experiment and parent run per study, one child run per trial.

Everything Ladder says to MLflow goes through this module (like Ray's
``air/integrations/mlflow.py``). The driver is the only MLflow writer of its study, so the
SQLite store works on one machine. A trial's child run is found again by its trial key
(tag ``ladder.trial_key``) before one is created, so a resumed or re-run trial never gets
a second run. What a reviewer finds where in the MLflow UI is in docs/review.md.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studies.records import OUTCOMES, TrialRecord, pair_key, trial_key
from studies.spec import StudySpec
from workers.provenance import generator_version, git_sha, versions

if TYPE_CHECKING:
    from studies.report import Report

log = logging.getLogger(__name__)

STUDY_ROLE = "study"
# The UI opens an experiment of this kind on its runs, not on the GenAI overview (traces,
# tokens). The tag is the one the MLflow 3 UI reads; "custom_model_development" is its
# "machine learning / model training" kind.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# MLflow's system tags for the code that made a run (shown in the UI's Source column).
SOURCE_TAGS = {"mlflow.source.type": "JOB", "mlflow.source.name": "ladder (workers.driver)"}
GIT_COMMIT_TAG = "mlflow.source.git.commit"
REMOTE_SCHEMES = ("http://", "https://", "databricks")  # a tracking server keeps its own artifact store
PROGRESS_METRICS = ("eval_acc", "eval_loss", "search_acc", "search_loss", "train_loss", "lr", "wall_s", "cpu_s")


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _metrics(values: dict[str, Any], step: int) -> list[Any]:
    """MLflow metrics of the finite numbers in ``values`` (None, NaN and inf are left out)."""
    from mlflow.entities import Metric

    now = _now_ms()
    return [
        Metric(k, float(v), now, step)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]


def size_name(cell: dict[str, Any]) -> str:
    s = cell["size"]
    return f"d{s['d_model']}_l{s['n_layers']}_h{s['n_heads']}"


def cell_key(cell: dict[str, Any]) -> str:
    """The trial key of a Tune config's cell (see :func:`studies.records.trial_key`)."""
    return trial_key(cell["kind"], size_name(cell), cell["point"], cell["lr"], cell["seed"])


def provenance_tags() -> dict[str, str]:
    """Git commit as MLflow's own source tag; package versions and the task generator as Ladder's."""
    tags = SOURCE_TAGS | {GIT_COMMIT_TAG: git_sha(), "generator_version": generator_version()}
    return tags | {f"version.{k}": v for k, v in versions().items()}


def artifact_location(tracking_uri: str, data_dir: Path, study_id: str) -> str | None:
    """Where a new experiment keeps its artifacts: under the data directory for a local store.

    MLflow's default is ``./mlruns`` of whatever directory the driver started in. With a
    tracking server (``http(s)://``) the server's artifact store decides (None).
    """
    if tracking_uri.startswith(REMOTE_SCHEMES):
        return None
    return (data_dir / "mlartifacts" / study_id).resolve().as_uri()


# --- the study: experiment and parent run -----------------------------------------------


def ensure_study_run(
    tracking_uri: str, study_id: str, spec: StudySpec, artifact_root: str | None = None
) -> dict[str, str]:
    """The study's experiment and parent run, created once and found again by tag on resume.

    Args:
        artifact_root: the experiment's artifact location (see :func:`artifact_location`);
            None leaves it to the tracking server.

    Returns:
        ``experiment_id``, ``run_id`` and ``tracking_uri`` (what the driver keeps in the status file).
    """
    client = _client(tracking_uri)
    name = f"ladder/{study_id}"
    exp = client.get_experiment_by_name(name)
    tags = {"ladder.study_id": study_id, EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_root, tags=tags)
    found = client.search_runs([exp_id], filter_string=f"tags.`ladder.role` = '{STUDY_ROLE}'")
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {"ladder.study_id": study_id, "ladder.role": STUDY_ROLE} | provenance_tags()
        run_id = client.create_run(exp_id, tags=tags, run_name=f"study {spec.name}").info.run_id
        client.log_param(run_id, "search", spec.search.method)
        client.log_param(run_id, "attention", ",".join(spec.attention))
        client.log_param(run_id, "planned_trials", spec.planned_trials())
        client.log_text(run_id, spec.to_json(), "spec.json")
    return {"experiment_id": exp_id, "run_id": run_id, "tracking_uri": tracking_uri}


def finish_study_run(tracking_uri: str, run_id: str, state: str) -> None:
    """Close the parent run with the study's final state."""
    status = {"finished": "FINISHED", "cancelled": "KILLED"}.get(state, "FAILED")
    _client(tracking_uri).set_terminated(run_id, status)


LOST = "started by a Tune trial that a driver kill lost before Tune saved it; never recorded"


def close_lost_runs(tracking_uri: str, experiment_id: str, parent_run_id: str, recorded: set[str]) -> int:
    """End the study's child runs still RUNNING whose trial key has no record; returns how many.

    Called once a study has finished, when every trial Tune ran has a record: such a run was started
    by a Tune trial created after Tune's last experiment snapshot and lost at a driver kill, whose cells
    the resumed search did not ask again (an Optuna pick is asked again, ``PairedOptunaSearch.recover_orphans``;
    the frontier search decides afresh). The run stays for the record of what ran, ended ``KILLED``
    with ``status`` ``lost``, rather than RUNNING for ever.
    """
    from mlflow.entities import RunTag

    client = _client(tracking_uri)
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=50000)
    lost = [r for r in runs if r.data.tags.get("ladder.trial_key") not in recorded]
    for run in lost:
        client.log_batch(run.info.run_id, tags=[RunTag("status", "lost"), RunTag("ladder.lost", LOST)])
        client.set_terminated(run.info.run_id, "KILLED")
    return len(lost)


def summary_metrics(report: Report) -> dict[str, float]:
    """Per kind and size: the frontier and the solved count, named ``<what>/<kind>/<size>``.

    For a ladder, ``frontier_rung`` is the highest rung certainly solved and
    ``frontier_rung_possible`` the highest possibly solved (the frontier's interval; -1: none).
    ``frontier_points`` counts the Pareto-maximal solved points; ``solved_cells`` the solved
    (size, point) cells; ``solved_trials`` the solved trials over all seeds.
    """
    out: dict[str, float] = {}
    for f in report.frontier:
        at = f"{f.kind}/{f.size}"
        if report.is_ladder:
            out[f"frontier_rung/{at}"] = -1 if f.highest_rung is None else f.highest_rung
            out[f"frontier_rung_possible/{at}"] = -1 if f.highest_possible_rung is None else f.highest_possible_rung
        out[f"frontier_points/{at}"] = len(f.points)
        out[f"solved_cells/{at}"] = f.n_solved
        out[f"solved_trials/{at}"] = sum(c.successes for c in report.cells if (c.kind, c.size) == (f.kind, f.size))
    return out


def log_report(tracking_uri: str, run_id: str, report: Report, report_dir: Path) -> None:
    """The report on the parent run: summary metrics, ``frontier.json``, the files under ``report/``,
    and the frontier plot as an image (shown with the run's charts)."""
    from PIL import Image

    client = _client(tracking_uri)
    client.log_batch(run_id, metrics=_metrics(summary_metrics(report), 0))
    frontier = {"study": report.study, "axes": report.axes, "threshold": report.threshold}
    client.log_dict(run_id, frontier | {"frontier": [f.model_dump() for f in report.frontier]}, "frontier.json")
    client.log_artifacts(run_id, str(report_dir), "report")
    png = report_dir / "frontier.png"
    if png.exists():
        with Image.open(png) as img:
            client.log_image(run_id, img.convert("RGB"), key="frontier", step=0)


# --- trials: child runs --------------------------------------------------------------------


class _ProgressWriter:
    """Progress metrics written to MLflow in order by one background thread of the driver.

    Not MLflow's own asynchronous logging: ``MlflowClient.set_terminated`` drains that queue (it
    stops the store's logging thread and joins it), so every trial that ended waited for the
    queue, 0.7 s a trial in the quick-start while every running trial waited in ``tune.report``
    for the driver (docs/benchmarks.md). With this writer, ending a run waits for nothing.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, str, list[Any]]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._clients: dict[str, Any] = {}  # used by the writer thread only

    def put(self, tracking_uri: str, run_id: str, metrics: list[Any]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="mlflow-progress", daemon=True)
                self._thread.start()
        self._queue.put((tracking_uri, run_id, metrics))

    def _loop(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:  # what queued up meanwhile goes in the same round: one batch per run, not per point
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for tracking_uri, run_id, metrics in coalesce(items):
                try:
                    if tracking_uri not in self._clients:
                        self._clients[tracking_uri] = _client(tracking_uri)
                    self._clients[tracking_uri].log_batch(run_id, metrics=metrics)
                except Exception:  # progress is best-effort: the record and the final metrics are written in line
                    log.warning("progress metrics of run %s not logged", run_id, exc_info=True)
            for _ in items:
                self._queue.task_done()

    def join(self) -> None:
        self._queue.join()


_progress = _ProgressWriter()
MAX_BATCH_METRICS = 1000  # MLflow's limit on metrics in one log_batch


def coalesce(items: list[tuple[str, str, list[Any]]]) -> list[tuple[str, str, list[Any]]]:
    """Queued progress points as one batch per (store, run), in order, within MLflow's batch limit.

    Each queued point is a store round trip (about 5 ms of CPU on SQLite, docs/benchmarks.md); a pack
    reports every member at every evaluation, so when the writer falls behind (big packs, many
    trials) the points waiting for the same run go in one call instead of one call each.
    """
    runs: dict[tuple[str, str], list[Any]] = {}
    for tracking_uri, run_id, metrics in items:
        runs.setdefault((tracking_uri, run_id), []).extend(metrics)
    return [
        (uri, run_id, metrics[i : i + MAX_BATCH_METRICS])
        for (uri, run_id), metrics in runs.items()
        for i in range(0, len(metrics), MAX_BATCH_METRICS)
    ]


def flush() -> None:
    """Wait until the progress metrics queued so far are in the store."""
    _progress.join()


class StudyTracker:
    """Child runs of one study's trials. Picklable (Tune stores its callbacks): the client is lazy.

    Args:
        study_id: the Ladder study.
        parent: what :func:`ensure_study_run` returned.
    """

    def __init__(self, study_id: str, parent: dict[str, str]) -> None:
        self.study_id = study_id
        self.tracking_uri = parent["tracking_uri"]
        self.experiment_id = parent["experiment_id"]
        self.parent_run_id = parent["run_id"]
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_client": None}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _client(self.tracking_uri)
        return self._client

    def trial_run(self, trial_id: str, cell: dict[str, Any], params: dict[str, Any]) -> str:
        """The child run of a trial: cached, else found by trial key, else created with tags and params.

        Args:
            trial_id: Tune's trial id (tagged ``ladder.trial_id``; updated when a run is found again).
            cell: the trial's cell (kind, size, point, lr, seed, coords).
            params: the resolved trial config, logged as parameters.
        """
        if trial_id in self.runs:
            return self.runs[trial_id]
        key = cell_key(cell)
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`ladder.trial_key` = '{key}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            if found[0].data.tags.get("ladder.trial_id") != trial_id:
                self.client.set_tag(run_id, "ladder.trial_id", trial_id)
        else:
            run_id = self._create(trial_id, key, cell, params)
        self.runs[trial_id] = run_id
        return run_id

    def _create(self, trial_id: str, key: str, cell: dict[str, Any], params: dict[str, Any]) -> str:
        from mlflow.entities import Param

        size = size_name(cell)
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "ladder.study_id": self.study_id,
            "ladder.trial_id": trial_id,
            "ladder.trial_key": key,
            "kind": cell["kind"],
            "point": cell["point"],
            "size": size,
            "seed": str(cell["seed"]),
            "lr": f"{cell['lr']:.6g}",
            "cell": f"{cell['kind']}/{size}/{cell['point']}",
            "pair": pair_key(size, cell["point"], cell["lr"], cell["seed"]),
            "status": "running",
        } | provenance_tags()
        name = f"{cell['kind']} {size} {cell['point']} lr={cell['lr']:.2g} s{cell['seed']}"
        run_id: str = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
        logged = [Param(k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in params.items()]
        self.client.log_batch(run_id, params=[*logged, Param("coords", json.dumps(cell["coords"]))])
        return run_id

    def log_progress(self, run_id: str, result: dict[str, Any], synchronous: bool = False) -> None:
        """Metrics of one evaluation (a Tune result) at its training step.

        Queued by default (``_ProgressWriter``, flushed by :func:`flush`): the driver does not wait
        on the store while trials wait for it to take their next result. A hard kill can lose the
        queued progress points; records and final metrics are written in line.
        """
        values = {k: v for k, v in result.items() if k in PROGRESS_METRICS or k.startswith("acc_")}
        metrics = _metrics(values, int(result.get("step", 0)))
        if not metrics:
            return
        if synchronous:
            self.client.log_batch(run_id, metrics=metrics)
        else:
            _progress.put(self.tracking_uri, run_id, metrics)

    def finish(self, record: TrialRecord) -> None:
        """Final metrics and status of a recorded trial; the run ends FINISHED for an outcome, else FAILED."""
        from mlflow.entities import RunTag

        run_id = record.mlflow_run_id
        if run_id is None:
            raise ValueError(f"record of trial {record.trial_id} has no MLflow run id to finish")
        finals = {"final_eval_acc": record.eval_acc, "cpu_s": record.cpu_s, "gpu_s": record.gpu_s}
        finals |= {"final_eval_acc_lo": record.eval_acc_lo, "final_eval_acc_hi": record.eval_acc_hi}
        finals |= {"n_params": record.n_params, "steps_to_solve": record.steps_to_solve}
        if record.status in OUTCOMES:  # no verdict for a failed, diverged or preempted trial
            finals["solved"] = int(record.status == "solved")
        # the trial id of the record on file: a pick re-run after a resume may have re-tagged the run with its own
        tags = [RunTag("status", record.status), RunTag("node_id", str(record.node_id))]
        tags.append(RunTag("ladder.trial_id", record.trial_id))
        if record.error:
            tags.append(RunTag("error", record.error[:4000]))
        self.client.log_batch(run_id, metrics=_metrics(finals, record.steps), tags=tags)
        ended = "FINISHED" if record.status in OUTCOMES else "KILLED" if record.status == "stopped" else "FAILED"
        self.client.set_terminated(run_id, ended)
