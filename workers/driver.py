"""The study driver: one process per study runs a Ray Tune experiment and tracks it.

All Ray calls live here: the trainable, the Tuner builder, callbacks, stoppers and the
``__main__`` entry (``python -m workers.driver STUDY_ID [--resume]``). The driver is the
only MLflow writer of its study (a parent run, one child run per trial), so SQLite works
on one machine; trial records go to ``<study dir>/trials.jsonl`` for the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune import Callback, Checkpoint, Stopper
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

from studies.records import OUTCOMES, TrialRecord, append_record, read_records
from studies.settings import Settings, get_settings
from studies.spec import StudySpec
from workers.search import FrontierSearch, PairedOptunaSearch, frontier_score, make_cell
from workers.trial import TrialConfig, run_trial

log = logging.getLogger(__name__)

_cancel_requested = False  # set by SIGTERM/SIGINT in the driver process


# --- trial side -----------------------------------------------------------------------


def trial_config(config: dict[str, Any]) -> TrialConfig:
    """The resolved trial config from a Tune config (``cell`` varies, ``fixed`` does not)."""
    cell, fixed = config["cell"], config["fixed"]
    return TrialConfig(
        attention=cell["kind"],
        task=cell["members"],
        d_model=cell["size"]["d_model"],
        n_layers=cell["size"]["n_layers"],
        n_heads=cell["size"]["n_heads"],
        lr=cell["lr"],
        seed=cell["seed"],
        **fixed,
    )


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}


def _inject_fault(point: str) -> None:
    """Fault injection for tests: ``LADDER_FAULTS='{"N13_T2": "raise"}'`` (``raise`` | ``oom``)."""
    fault = json.loads(os.environ.get("LADDER_FAULTS") or "{}").get(point)
    if fault == "raise":
        raise RuntimeError(f"injected fault in trial of {point}")
    if fault == "oom":
        raise MemoryError(f"injected out-of-memory in trial of {point}")


def train_point(config: dict[str, Any]) -> None:
    """Ray Tune trainable: one trial, checkpointed at every evaluation, resumable exactly."""
    cfg = trial_config(config)
    _inject_fault(config["cell"]["point"])
    node = ray.get_runtime_context().get_node_id()
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = torch.load(Path(d) / "state.pt", weights_only=False)

    coords = config["cell"]["coords"]

    def on_eval(metrics: dict[str, Any], state: Any) -> None:
        score = frontier_score(coords, metrics["solved"], metrics.get("search_acc"))
        with tempfile.TemporaryDirectory() as d:
            torch.save(state(), Path(d) / "state.pt")
            result = _scalars(metrics) | {"node_id": node, "score": score}
            tune.report(result, checkpoint=Checkpoint.from_directory(d))

    rec = run_trial(cfg, on_eval, resume)
    score = frontier_score(coords, rec["solved"], rec.get("eval_acc"))
    tune.report(_scalars(rec) | {"final": True, "node_id": node, "score": score})


# --- driver side ----------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "ray", "optuna", "mlflow", "ladder"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def git_sha() -> str:
    if os.environ.get("LADDER_GIT_SHA"):
        return os.environ["LADDER_GIT_SHA"]
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: readers never see half a file."""
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def read_status(study_dir: Path) -> dict[str, Any]:
    p = study_dir / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}


def update_status(study_dir: Path, **fields: Any) -> dict[str, Any]:
    status = read_status(study_dir) | fields | {"updated": time.time()}
    write_json(study_dir / "status.json", status)
    return status


def new_study_id(spec: StudySpec) -> str:
    return f"{spec.name[:40].lower()}-{uuid.uuid4().hex[:8]}"


def prepare_study(spec: StudySpec, study_id: str | None = None, settings: Settings | None = None) -> str:
    """Create the study directory with its spec; returns the study id."""
    settings = settings or get_settings()
    study_id = study_id or new_study_id(spec)
    d = settings.study_dir(study_id)
    d.mkdir(parents=True, exist_ok=True)
    (d / "spec.json").write_text(spec.to_json())
    if not (d / "status.json").exists():
        update_status(d, study_id=study_id, state="pending", planned_trials=spec.planned_trials())
    return study_id


class CancelStopper(Stopper):
    """Stops the whole experiment once the driver was asked to stop (SIGTERM/SIGINT)."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return _cancel_requested

    def stop_all(self) -> bool:
        return _cancel_requested


class CpuBudgetStopper(Stopper):
    """Stops the experiment when trials together used more than ``limit_s`` CPU-seconds."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.used: dict[str, float] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.used[trial_id] = float(result.get("cpu_s", 0.0))
        return False

    def stop_all(self) -> bool:
        return sum(self.used.values()) > self.limit_s


def _classify_error(trial: Trial) -> str:
    text = str(getattr(trial, "error_msg", "") or "")
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        text += Path(path).read_text(errors="replace")
    if "OutOfMemoryError" in text or "MemoryError" in text:
        return "oom"
    if any(s in text for s in ("NodeDiedError", "ActorDiedError", "RayActorError", "node", "preempt")):
        return "preempted"
    return "failed"


class StudyCallback(Callback):
    """Writes trial records, MLflow runs (parent + children), status and progress.

    Picklable (Tune stores it with the experiment): clients are made lazily.
    """

    def __init__(self, study_id: str, spec: StudySpec, settings: Settings, progress: bool = False) -> None:
        self.study_id, self.spec, self.progress = study_id, spec, progress
        self.study_dir = settings.study_dir(study_id)
        self.mlflow_uri = settings.mlflow_uri
        self._client: Any = None
        self._bar: Any = None
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self.running: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_client": None, "_bar": None}

    # MLflow -------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.mlflow_uri)
        return self._client

    @property
    def parent(self) -> dict[str, str]:
        return read_status(self.study_dir)["mlflow"]

    def _child(self, trial: Trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        found = self.client.search_runs(
            [self.parent["experiment_id"]], filter_string=f"tags.`ladder.trial_id` = '{trial.trial_id}'"
        )
        if found:
            run_id = found[0].info.run_id
        else:
            cell = trial.config["cell"]
            tags = {
                "mlflow.parentRunId": self.parent["run_id"],
                "ladder.study_id": self.study_id,
                "ladder.trial_id": trial.trial_id,
                "kind": cell["kind"],
                "point": cell["point"],
                "size": f"d{cell['size']['d_model']}_l{cell['size']['n_layers']}_h{cell['size']['n_heads']}",
                "seed": str(cell["seed"]),
                "status": "running",
            } | {f"version.{k}": v for k, v in versions().items()}
            tags |= {"git_sha": git_sha(), "generator_version": _generator_version()}
            name = f"{cell['kind']} {tags['size']} {cell['point']} lr={cell['lr']:.2g} s{cell['seed']}"
            run = self.client.create_run(self.parent["experiment_id"], tags=tags, run_name=name)
            run_id = run.info.run_id
            from mlflow.entities import Param

            resolved = asdict(trial_config(trial.config))
            params = [Param(k, json.dumps(v) if isinstance(v, list) else str(v)) for k, v in resolved.items()]
            self.client.log_batch(run_id, params=[*params, Param("coords", json.dumps(cell["coords"]))])
        self.runs[trial.trial_id] = run_id
        return run_id

    # Tune hooks ---------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._child(trial)
        self.running.add(trial.trial_id)
        self._refresh(trials)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        step = int(result.get("step", 0))
        now = int(time.time() * 1000)
        keys = ("eval_acc", "eval_loss", "search_acc", "search_loss", "train_loss", "lr", "wall_s", "cpu_s")
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in result.items()
            if (k in keys or k.startswith("acc_")) and isinstance(v, int | float) and math.isfinite(v)
        ]
        if metrics and not result.get("final"):
            self.client.log_batch(self._child(trial), metrics=metrics)
        self._refresh(trials)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        status = result.get("status", "failed") if result.get("final") else "stopped"
        self._finish(trial, status, result, result.get("error"))
        self._refresh(trials)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finish(
            trial, _classify_error(trial), trial.last_result or {}, str(getattr(trial, "error_msg", "") or "")[:2000]
        )
        self._refresh(trials)

    def _finish(self, trial: Trial, status: str, result: dict[str, Any], error: str | None) -> None:
        self.running.discard(trial.trial_id)
        cell = trial.config["cell"]
        run_id = self._child(trial)
        acc = {k[4:]: v for k, v in result.items() if k.startswith("acc_")}
        rec = TrialRecord(
            study_id=self.study_id,
            trial_id=trial.trial_id,
            kind=cell["kind"],
            **cell["size"],
            n_params=result.get("n_params"),
            point=cell["point"],
            coords=cell["coords"],
            seed=cell["seed"],
            lr=cell["lr"],
            status=status,  # type: ignore[arg-type]
            eval_acc=result.get("eval_acc"),
            acc_per_task=acc,
            eval_loss=result.get("eval_loss"),
            eval_acc_lo=result.get("eval_acc_lo"),
            eval_acc_hi=result.get("eval_acc_hi"),
            eval_pool=result.get("eval_pool"),
            eval_exhaustive=result.get("eval_exhaustive"),
            search_acc=result.get("search_acc"),
            eval_tokens=None if result.get("eval_tokens") is None else int(result["eval_tokens"]),
            config=asdict(trial_config(trial.config)),
            steps=int(result.get("steps", result.get("step", 0)) or 0),
            steps_to_solve=result.get("steps_to_solve"),
            wall_s=float(result.get("wall_s", 0.0) or 0.0),
            cpu_s=float(result.get("cpu_s", 0.0) or 0.0),
            gpu_s=float(result.get("gpu_s", 0.0) or 0.0),
            node_id=result.get("node_id"),
            mlflow_run_id=run_id,
            error=error,
        )
        append_record(self.study_dir / "trials.jsonl", rec)
        from mlflow.entities import Metric, RunTag

        step = rec.steps
        now = int(time.time() * 1000)
        finals = {"final_eval_acc": rec.eval_acc, "cpu_s": rec.cpu_s, "gpu_s": rec.gpu_s, "n_params": rec.n_params}
        if rec.steps_to_solve is not None:
            finals["steps_to_solve"] = rec.steps_to_solve
        metrics = [Metric(k, float(v), now, step) for k, v in finals.items() if v is not None and math.isfinite(v)]
        tags = [RunTag("status", status), RunTag("node_id", str(rec.node_id))]
        if error:
            tags.append(RunTag("error", error[:4000]))
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, "FINISHED" if status in OUTCOMES else "FAILED")

    def _refresh(self, trials: list[Trial]) -> None:
        records = read_records(self.study_dir / "trials.jsonl")
        counts: dict[str, int] = {}
        for r in records:
            counts[r.status] = counts.get(r.status, 0) + 1
        running = sum(1 for t in trials if t.status == Trial.RUNNING)
        update_status(
            self.study_dir,
            counts=counts,
            done=len(records),
            running=running,
            frontier=frontier_summary(self.spec, records),
        )
        if self.progress:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.spec.planned_trials(), unit="trial", dynamic_ncols=True)
            self._bar.n = len(records)
            bad = sum(v for k, v in counts.items() if k not in OUTCOMES)
            self._bar.set_postfix_str(f"running={running} failed={bad} frontier={_short(records, self.spec)}")
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _generator_version() -> str:
    from workers.tasks import GENERATOR_VERSION

    return GENERATOR_VERSION


def frontier_summary(spec: StudySpec, records: list[TrialRecord]) -> dict[str, dict[str, Any]]:
    """Best solved coordinates so far per kind and size (a quick view for progress)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.status == "solved":
            cur = out.setdefault(r.kind, {}).get(r.size_name)
            if cur is None or sum(r.coords) > sum(cur["coords"]):
                out[r.kind][r.size_name] = {"coords": r.coords, "point": r.point}
    return out


def _short(records: list[TrialRecord], spec: StudySpec) -> str:
    s = frontier_summary(spec, records)
    return " ".join(
        f"{k}:{max((sum(v['coords']) for v in s[k].values()), default=-1)}" for k in spec.attention if k in s
    )


def build_tuner(study_id: str, spec: StudySpec, settings: Settings, progress: bool) -> tune.Tuner:
    fixed = {
        "identify_margin": spec.task.identify_margin,
        "context_length": spec.training.context_length,
        "eps": spec.eps,
        "warmup_steps": spec.training.warmup_steps,
        "weight_decay": spec.training.weight_decay,
        "grad_clip": spec.training.grad_clip,
        "batch_size": spec.training.batch_size,
        "max_steps": spec.training.max_steps,
        "eval_interval": spec.training.eval_interval,
        "eval_sequences": spec.training.eval_sequences or 0,
        "holdout": spec.evaluation.holdout,
        "threshold": spec.threshold,
    }
    param_space: dict[str, Any] = {"fixed": fixed}
    search_alg: Any = None
    num_samples = 1
    method = spec.search.method
    if method == "grid":
        cells = [
            make_cell(spec, kind, si, pi, lr, seed)
            for si in range(len(spec.model.all_sizes()))
            for pi in range(len(spec.task.points()))
            for lr in spec.hparams.lr.grid_values()
            for seed in spec.seeds
            for kind in spec.attention
        ]
        param_space["cell"] = tune.grid_search(cells)
    elif method == "optuna":
        search_alg = PairedOptunaSearch(spec, settings.optuna_url, study_id)
        num_samples = spec.planned_trials()
    else:
        search_alg = FrontierSearch(spec)
        num_samples = spec.planned_trials()
    scheduler = None
    if spec.early_stopping.asha:
        scheduler = ASHAScheduler(
            time_attr="step",
            metric="search_acc",
            mode="max",
            max_t=spec.training.max_steps,
            grace_period=spec.early_stopping.grace_period,
            reduction_factor=spec.early_stopping.reduction_factor,
        )
    stoppers: list[Stopper] = [CancelStopper()]
    if spec.caps.max_cpu_hours:
        stoppers.append(CpuBudgetStopper(spec.caps.max_cpu_hours * 3600))
    from ray.tune.stopper import CombinedStopper

    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    return tune.Tuner(
        tune.with_resources(train_point, resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=spec.max_concurrent,
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=study_id,
            storage_path=settings.tune_storage,
            stop=CombinedStopper(*stoppers),
            callbacks=[StudyCallback(study_id, spec, settings, progress)],
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )


def _init_ray(settings: Settings) -> None:
    if ray.is_initialized():
        return
    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    env_vars = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    # Inside a Ray Job the job's runtime env already reaches every worker, and ray.init refuses
    # a runtime env that repeats one of its env vars ("Failed to merge the Job's runtime env").
    job_vars = (job.get("runtime_env") or {}).get("env_vars") or {}
    env = {"env_vars": {k: v for k, v in env_vars.items() if k not in job_vars}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:  # "local": never attach to a stale cluster file
        ray.init(address="local", include_dashboard=False, runtime_env=env, log_to_driver=False)


def _ensure_parent_run(study_id: str, spec: StudySpec, settings: Settings) -> dict[str, str]:
    """The study's MLflow experiment and parent run (found again on resume)."""
    from mlflow.tracking import MlflowClient

    d = settings.study_dir(study_id)
    status = read_status(d)
    if "mlflow" in status:
        return dict(status["mlflow"])
    client = MlflowClient(settings.mlflow_uri)
    name = f"ladder/{study_id}"
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, tags={"ladder.study_id": study_id})
    found = client.search_runs([exp_id], filter_string="tags.`ladder.role` = 'study'")
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {"ladder.study_id": study_id, "ladder.role": "study", "git_sha": git_sha()}
        tags |= {f"version.{k}": v for k, v in versions().items()}
        run_id = client.create_run(exp_id, tags=tags, run_name=f"study {spec.name}").info.run_id
        client.log_param(run_id, "search", spec.search.method)
        client.log_param(run_id, "attention", ",".join(spec.attention))
        client.log_param(run_id, "planned_trials", spec.planned_trials())
        client.log_text(run_id, spec.to_json(), "spec.json")
    info = {"experiment_id": exp_id, "run_id": run_id, "tracking_uri": settings.mlflow_uri}
    update_status(d, mlflow=info)
    return info


def run_study(study_id: str, resume: bool = False, progress: bool = False, settings: Settings | None = None) -> str:
    """Run (or resume) a prepared study to the end; returns its final state."""
    global _cancel_requested
    settings = settings or get_settings()
    d = settings.study_dir(study_id)
    spec = StudySpec.model_validate_json((d / "spec.json").read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    _cancel_requested = False

    def _on_signal(signum: int, frame: Any) -> None:
        global _cancel_requested
        _cancel_requested = True
        log.warning("signal %d: stopping study %s", signum, study_id)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    update_status(d, state="running", pid=os.getpid(), started=time.time(), error=None)
    mlinfo = _ensure_parent_run(study_id, spec, settings)
    exp_path = Path(settings.tune_storage) / study_id
    state, error = "failed", None
    try:
        _init_ray(settings)
        if resume and tune.Tuner.can_restore(str(exp_path)):
            tuner = tune.Tuner.restore(
                str(exp_path),
                trainable=tune.with_resources(train_point, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}),
                resume_unfinished=True,
                resume_errored=False,
            )
        else:
            tuner = build_tuner(study_id, spec, settings, progress)
        tuner.fit()
        state = "cancelled" if _cancel_requested else "finished"
    except Exception as e:
        log.exception("study %s failed", study_id)
        error = f"{type(e).__name__}: {e}. Resume with: ladder resume {study_id}"
    finally:
        _write_outputs(study_id, spec, settings, mlinfo)
        update_status(d, state=state, error=error, finished=time.time(), pid=None, running=0)
        from mlflow.tracking import MlflowClient

        MlflowClient(settings.mlflow_uri).set_terminated(
            mlinfo["run_id"], {"finished": "FINISHED", "cancelled": "KILLED"}.get(state, "FAILED")
        )
    return state


def _write_outputs(study_id: str, spec: StudySpec, settings: Settings, mlinfo: dict[str, str]) -> None:
    """The report from the trial records, logged to the parent run."""
    try:
        from studies.report_html import write_report

        out = settings.study_dir(study_id) / "report"
        records = read_records(settings.study_dir(study_id) / "trials.jsonl")
        provenance = {"study_id": study_id, "git_sha": git_sha(), "versions": versions()}
        write_report(spec, records, out, provenance)
        from mlflow.tracking import MlflowClient

        MlflowClient(settings.mlflow_uri).log_artifacts(mlinfo["run_id"], str(out), "report")
    except ImportError:
        log.info("report module not available; skipping report")
    except Exception:
        log.exception("writing the report of %s failed", study_id)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.driver", description="Run one Ladder study (one process).")
    p.add_argument("study_id")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    state = run_study(args.study_id, resume=args.resume, progress=args.progress)
    return 0 if state in ("finished", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
