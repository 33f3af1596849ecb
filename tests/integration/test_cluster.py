"""Scale-out for real, on one machine: a two-node Ray cluster with token auth, an MLflow
server on PostgreSQL and the service on PostgreSQL, submitting each study as a Ray Job.

Everything is started by the module fixture and stopped by PID (see tests/integration/cluster.py):
never ``ray stop``, never a kill by name. The data directory is shared by all since they
run on one machine (a cluster mounts it at the same path everywhere).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from studies.records import OUTCOMES
from studies.spec import StudySpec
from tests.integration.cluster import (
    Databases,
    MlflowServer,
    RayCluster,
    RayNode,
    Service,
    base_env,
    cmdline,
)
from tests.integration.helpers import trial_lines, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2}


@dataclass
class Stack:
    cluster: RayCluster
    mlflow: MlflowServer
    service: Service
    data_dir: Path
    timings: dict[str, float]

    def study_dir(self, study_id: str) -> Path:
        return self.data_dir / "studies" / study_id

    def diagnostics(self, study_id: str) -> str:
        """What to read when a study did not finish: its Ray job's logs and the service log."""
        r = self.cluster.get(f"/api/jobs/{study_id}/logs")
        logs = r.json().get("logs", "") if r.status_code == 200 else r.text
        return f"job logs:\n{logs[-6000:]}\nservice log:\n{self.service.log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("cluster")
    timings: dict[str, float] = {}
    dbs = Databases()  # fails at once, and says why, without PostgreSQL
    cluster = RayCluster()
    mlflow: MlflowServer | None = None
    service: Service | None = None
    try:
        t0 = time.monotonic()
        cluster.start()
        timings["ray_head_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        mlflow = MlflowServer(root, dbs.create("ladder_mlflow"), f"{cluster.run}-mlflow").start()
        timings["mlflow_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        data_dir = root / "data"
        env = base_env(
            f"{cluster.run}-service",
            **cluster.auth_env(),  # the service is a Ray client: it submits Ray Jobs
            LADDER_DATA_DIR=str(data_dir),
            LADDER_REGISTRY_URL=dbs.create("ladder_registry"),
            LADDER_OPTUNA_STORAGE=dbs.create("ladder_optuna"),
            LADDER_MLFLOW_TRACKING_URI=mlflow.url,
            LADDER_RAY_ADDRESS=cluster.dashboard,
            LADDER_RAY_DASHBOARD_URL=cluster.dashboard,
            LADDER_MLFLOW_UI_URL=mlflow.url,
        )
        service = Service(env, root / "service.log").start()
        timings["service_s"] = time.monotonic() - t0
        yield Stack(cluster, mlflow, service, data_dir, timings)
    finally:
        if service is not None:
            service.stop()
        if mlflow is not None:
            mlflow.stop()
        cluster.stop()
        dbs.drop_all()
        print(f"\ncluster stack timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


def _spec(name: str, rungs: list[Any], max_steps: int, eval_interval: int) -> dict[str, Any]:
    return {
        "name": name,
        "attention": ["dpa", "ea"],
        "task": {"ladder": rungs},
        "model": {"sizes": [SIZE]},
        "training": {"max_steps": max_steps, "eval_interval": eval_interval, "eval_sequences": 64},
        "search": {"method": "grid"},
        "resources": {"cpu": 1},
        "max_concurrent": 2,
    }


def _child_runs(stack: Stack, study: dict[str, Any]) -> list[Any]:
    from mlflow.tracking import MlflowClient

    ml = study["mlflow"]
    assert ml["tracking_uri"] == stack.mlflow.url  # the driver logged to the server, not to a file
    client = MlflowClient(tracking_uri=stack.mlflow.url)
    runs = client.search_runs([ml["experiment_id"]], max_results=1000)
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == ml["run_id"]]


def _check_records_and_mlflow(stack: Stack, study: dict[str, Any], planned: int) -> list[dict[str, Any]]:
    """Every planned trial recorded once with a real outcome, and exactly one MLflow child run each."""
    sid = study["id"]
    trials = stack.service.get(f"/studies/{sid}/trials", limit=1000)
    items = trials["items"]
    ids = [t["trial_id"] for t in items]
    assert trials["total"] == len(items) == planned, items
    assert len(set(ids)) == planned
    raw = [line["trial_id"] for line in trial_lines(stack.study_dir(sid))]
    assert sorted(raw) == sorted(ids), "a trial was recorded twice in trials.jsonl"
    assert {t["status"] for t in items} <= OUTCOMES, [(t["trial_id"], t["status"], t["error"]) for t in items]

    runs = _child_runs(stack, study)
    per_trial = Counter(r.data.tags["ladder.trial_id"] for r in runs)
    assert per_trial == Counter(ids), per_trial
    by_trial = {r.data.tags["ladder.trial_id"]: r for r in runs}
    for t in items:
        run = by_trial[t["trial_id"]]
        assert run.info.run_id == t["mlflow_run_id"]
        assert run.data.tags["status"] == t["status"]
        assert run.data.tags["node_id"] == t["node_id"]
        assert run.info.status == "FINISHED"
    return list(items)


def test_cluster_refuses_clients_without_the_token(stack: Stack) -> None:
    cluster = stack.cluster
    # the dashboard and Ray Jobs API (what the service talks to)
    assert cluster.get("/api/jobs/", token=None).status_code == 401
    assert cluster.get("/api/jobs/", token="0" * 64).status_code == 403
    assert cluster.get("/api/jobs/").status_code == 200
    # Ray's own clients, token-less and with a wrong token: the Jobs SDK, and a driver on the GCS
    jobs_probe = (
        "import sys\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "try:\n"
        "    JobSubmissionClient(sys.argv[1]).list_jobs()\n"
        "    print('accepted')\n"
        "except Exception as e:\n"
        "    print('refused:', type(e).__name__)\n"
    )
    gcs_probe = (
        "import sys, ray\n"
        "try:\n"
        "    ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "    print('accepted')\n"
        "except Exception as e:\n"
        "    print('refused:', type(e).__name__)\n"
    )
    home = cluster.root / "tokenless-home"  # no ~/.ray/auth_token to fall back on
    home.mkdir(exist_ok=True)
    envs = [
        base_env(f"{cluster.run}-probe", HOME=str(home)),
        base_env(f"{cluster.run}-probe", HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
    ]
    # the GCS probes retry for ~20 s before giving up: run them side by side
    gcs = [
        subprocess.Popen(
            [sys.executable, "-c", gcs_probe, f"127.0.0.1:{cluster.gcs_port}"],
            env=env,
            cwd=cluster.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in envs
    ]
    for env in envs:
        out = subprocess.run(
            [sys.executable, "-c", jobs_probe, cluster.dashboard],
            env=env,
            cwd=cluster.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.stdout.strip() == "refused: AuthenticationError", out.stdout + out.stderr[-3000:]
    for proc in gcs:
        stdout, stderr = proc.communicate(timeout=180)
        assert stdout.strip() == "refused: ConnectionError", stdout + stderr[-3000:]
        assert "InvalidAuthToken" in stderr, stderr[-3000:]


def test_study_runs_as_ray_job_on_both_nodes_and_logs_to_the_mlflow_server(stack: Stack) -> None:
    cluster, service = stack.cluster, stack.service
    t0 = time.monotonic()
    worker = cluster.add_worker("w1")
    stack.timings["ray_worker_s"] = time.monotonic() - t0
    try:
        nodes = {cluster.head.node_id, worker.node_id}
        assert cluster.alive_node_ids() == nodes

        spec = _spec("cluster", [[[5, 1]], [[7, 2]], [[11, 2]]], max_steps=100, eval_interval=50)
        planned = StudySpec.model_validate(spec).planned_trials()
        assert planned == 6
        t0 = time.monotonic()
        study = service.submit(spec)
        sid = study["id"]
        assert study["launcher"] == "ray_job"
        final = service.wait_state(sid, ("finished", "failed", "interrupted", "cancelled"), 420)
        stack.timings["study_s"] = time.monotonic() - t0
        assert final["state"] == "finished", f"{final}\n{stack.diagnostics(sid)}"
        assert final["progress"]["done"] == planned and final["progress"]["running"] == 0

        items = _check_records_and_mlflow(stack, final, planned)
        # trials ran on both nodes, and only on this cluster's nodes
        assert {t["node_id"] for t in items} == nodes, Counter(t["node_id"] for t in items)

        # the frontier report covers the whole spec
        report = service.get(f"/studies/{sid}/frontier")
        points = [p.name for p in StudySpec.model_validate(spec).task.points()]
        assert {(c["kind"], c["point"]) for c in report["cells"]} == {(k, p) for k in spec["attention"] for p in points}
        assert sum(c["n_trials"] for c in report["cells"]) == planned
        assert report["compute"]["n_trials"] == planned

        # the study is a Ray job whose submission id is the study id, run by the driver on the head
        # (the service reads the driver's status file; the job ends when the driver process exits)
        wait_for(lambda: cluster.job(sid)["status"] not in ("PENDING", "RUNNING"), 120, "the Ray job to end")
        job = cluster.job(sid)
        assert job["submission_id"] == sid
        assert job["status"] == "SUCCEEDED", job
        assert job["entrypoint"] == f"python -m workers.driver {sid} --attempt 0"
        assert job["metadata"].get("ladder.study_id") == sid
        assert job["driver_node_id"] == cluster.head.node_id
        assert final["links"]["ray_job"] == f"{cluster.dashboard}/#/jobs/{sid}"
        assert final["links"]["mlflow_run"].startswith(stack.mlflow.url)
    finally:
        worker.stop()


def _trial_on(node: RayNode) -> psutil.Process | None:
    """A Tune trial running on ``node`` (its actor: ``ray::ImplicitFunc``)."""
    for p in node.processes():
        if "ImplicitFunc" in cmdline(p):
            return p
    return None


def test_worker_node_lost_mid_study_trials_retry_and_study_finishes(stack: Stack) -> None:
    cluster, service = stack.cluster, stack.service
    doomed = cluster.add_worker("w2")
    replacement: RayNode | None = None
    try:
        # trials long enough (seconds of work after the loss) that a node joining later still gets some
        spec = _spec("fault", [[[53, 6]], [[61, 6]]], max_steps=1500, eval_interval=50)
        planned = StudySpec.model_validate(spec).planned_trials()
        t0 = time.monotonic()
        study = service.submit(spec)
        sid = study["id"]
        storage = stack.data_dir / "ray_results" / sid

        # a trial runs on the doomed node and has checkpointed at least once
        victim: dict[str, Any] = {}

        def checkpointed_on_doomed_node() -> bool:
            assert service.get(f"/studies/{sid}")["state"] in ("launching", "running"), stack.diagnostics(sid)
            p = _trial_on(doomed)
            if p is None:
                return False
            try:
                dirname = Path(p.cwd()).name  # Tune runs each trial in its own working dir
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                return False
            if list((storage / dirname).glob("checkpoint_*")):
                victim["dir"] = dirname
                return True
            return False

        wait_for(checkpointed_on_doomed_node, 300, "a checkpointed trial on the worker node", 0.5)
        assert cluster.job(sid)["driver_node_id"] == cluster.head.node_id  # the driver survives the loss

        # the machine is lost: SIGKILL the node's raylet, agents and trial workers, nothing else
        t_kill = time.monotonic()
        killed = doomed.kill()
        assert killed >= 3
        assert not doomed.processes()
        replacement = cluster.add_worker("w3")  # a new machine joins while the study goes on
        wait_for(lambda: doomed.node_id not in cluster.alive_node_ids(), 120, "the GCS to see the node dead")
        stack.timings["node_dead_after_kill_s"] = time.monotonic() - t_kill

        final = service.wait_state(sid, ("finished", "failed", "interrupted", "cancelled"), 480)
        stack.timings["fault_study_s"] = time.monotonic() - t0
        assert final["state"] == "finished", f"{final}\n{stack.diagnostics(sid)}"
        items = _check_records_and_mlflow(stack, final, planned)

        # the lost trial (a pack: one record per member, ids "<tune id>.m<i>") was retried by Tune
        # (FailureConfig) from its checkpoint and finished elsewhere
        lost = [t for t in items if f"_{t['trial_id'].rsplit('.m', 1)[0]}_" in victim["dir"]]
        assert lost, (victim, [t["trial_id"] for t in items])
        assert len({t["trial_id"] for t in lost}) == len(lost)  # each member recorded once
        assert {t["node_id"] for t in lost} <= {cluster.head.node_id, replacement.node_id}
        rec = lost[0]
        error_file = storage / victim["dir"] / "error.txt"
        assert error_file.exists() and "Failure # 1" in error_file.read_text(), list(
            (storage / victim["dir"]).iterdir()
        )
        from mlflow.tracking import MlflowClient

        history = MlflowClient(tracking_uri=stack.mlflow.url).get_metric_history(rec["mlflow_run_id"], "eval_acc")
        steps = [m.step for m in history]
        assert steps and Counter(steps)[min(steps)] == 1, f"restarted from scratch, not from a checkpoint: {steps}"
        assert rec["steps"] == max(steps) or rec["status"] == "solved"
        # the new node took work
        where = [(t["trial_id"], t["node_id"][:8], round(t["wall_s"]), t["steps"]) for t in items]
        assert replacement.node_id in {t["node_id"] for t in items}, (
            f"{where} head={cluster.head.node_id[:8]} doomed={doomed.node_id[:8]} new={replacement.node_id[:8]} "
            f"{stack.timings}\n{stack.diagnostics(sid)}"
        )
    finally:
        doomed.kill()
        if replacement is not None:
            replacement.stop()
