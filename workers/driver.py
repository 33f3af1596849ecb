"""The study driver: one process per study runs a Ray Tune experiment and tracks it.

All Ray calls live here: the trainable, the Tuner builder, stoppers and the ``__main__``
entry (``python -m workers.driver STUDY_ID [--attempt N] [--resume]``). The Tune callback that writes
trial records lives in :mod:`workers.callbacks`, MLflow tracking in :mod:`workers.tracking`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import ray
import torch
from ray import tune
from ray.tune import Stopper
from ray.tune.schedulers import ASHAScheduler

from studies.live_report import ReportRefresher, publish_report
from studies.records import read_records, repair_records
from studies.settings import Settings, get_settings
from studies.spec import StudySpec
from studies.studydir import (
    RECORDS,
    driver_lock,
    read_spec,
    read_status,
    update_status,
    write_driver_pid,
    write_exit,
)
from workers import tracking
from workers.callbacks import StudyCallback, fixed_config
from workers.pack_search import PackSearch
from workers.packing import max_members, plan_packs, train_pack
from workers.provenance import git_sha, versions
from workers.reporting import report_now
from workers.search import FrontierSearch, PairedOptunaSearch, frontier_score, grid_cells
from workers.tasks import GENERATOR_VERSION
from workers.trial import run_trial, trial_config

__all__ = ["run_study"]

log = logging.getLogger(__name__)

EXIT_CODES = {"finished": 0, "cancelled": 0, "interrupted": 0, "duplicate": 3}  # anything else: 1
_stop_requested = False  # set by SIGTERM/SIGINT in the driver process
DRIVER_LOCK_WAIT_S = 3.0  # the service's liveness probe holds the study's driver lock for an instant
# Tune deletes a trial's checkpoints beyond the newest KEEP_CHECKPOINTS when it registers a new one, and
# snapshots its experiment state (which names the checkpoint a resume restores) at the end of that loop
# step at the latest: a driver killed in between resumes to a deleted checkpoint. With two kept, the
# checkpoint a snapshot names is deleted only at every second registration without a snapshot since the
# one before (never when evaluations are further apart than Tune's snapshot period, >= 10 s), not at every one.
KEEP_CHECKPOINTS = 2


# --- trial side -----------------------------------------------------------------------


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
        report_now(_scalars(metrics) | {"node_id": node, "score": score}, state(), "state.pt")

    rec = run_trial(cfg, on_eval, resume)
    score = frontier_score(coords, rec["solved"], rec.get("eval_acc"))
    tune.report(_scalars(rec) | {"final": True, "node_id": node, "score": score})


# --- driver side ----------------------------------------------------------------------


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


def build_tuner(
    study_id: str, spec: StudySpec, settings: Settings, progress: bool, tracker: tracking.StudyTracker
) -> tune.Tuner:
    fixed = fixed_config(spec)
    param_space: dict[str, Any] = {"fixed": fixed}
    search_alg: Any = None
    num_samples = 1
    method = spec.search.method
    limit = max_members(spec)
    if limit > 1:
        param_space["checkpoint_every"] = spec.execution.checkpoint_every
    if method == "grid":
        cells = grid_cells(spec)
        if limit > 1:
            param_space["pack"] = tune.grid_search(plan_packs(cells, limit, fixed, spec.max_concurrent))
        else:
            param_space["cell"] = tune.grid_search(cells)
    else:
        inner: PairedOptunaSearch | FrontierSearch
        if method == "optuna":
            inner = PairedOptunaSearch(spec, settings.optuna_url, study_id, str(settings.study_dir(study_id) / RECORDS))
            # a study started afresh after a driver stopped before Tune's first save (_restorable): the picks
            # that driver asked are RUNNING in Optuna, and this searcher takes them back as a restored one would
            inner.recover_orphans()
        else:
            inner = FrontierSearch(spec, fill_packs=limit > 1)
        # packed: one Tune trial per pack, asked a pack per kind at a time so that kinds stay paired
        search_alg = PackSearch(inner, fixed, limit, limit * len(spec.attention)) if limit > 1 else inner
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
    stoppers: list[Stopper] = []
    if spec.caps.max_cpu_hours:
        stoppers.append(CpuBudgetStopper(spec.caps.max_cpu_hours * 3600))
    from ray.tune.stopper import CombinedStopper

    return tune.Tuner(
        trainable(spec),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=spec.max_concurrent,
            # LADDER_REUSE_WORKERS (default true): one worker process runs trial after trial; a fresh process
            # per Tune trial cost unpacked studies about half their wall (docs/benchmarks.md)
            reuse_actors=settings.reuse_workers,
        ),
        run_config=tune.RunConfig(
            name=study_id,
            storage_path=settings.tune_storage,
            stop=CombinedStopper(*stoppers) if stoppers else None,
            callbacks=[StudyCallback(study_id, spec, settings, tracker, progress)],
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            verbose=0,
        ),
    )


TRAINABLES = {fn.__name__: fn for fn in (train_point, train_pack)}


def _trainable_fn(spec: StudySpec) -> Any:
    return train_pack if max_members(spec) > 1 else train_point


def trainable(spec: StudySpec, fn: Any = None) -> Any:
    """The study's Tune trainable with the resources of one worker: packs, or one trial each."""
    fn = fn or _trainable_fn(spec)
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _restorable(exp_path: Path) -> bool:
    """Tune saved an experiment state to resume from, not only the tuner.

    ``Tuner()`` writes ``tuner.pkl`` at once; the experiment state follows at the end of ``fit``'s
    first step. A driver stopped in between leaves nothing to resume, and Tune's restore of it
    "restarts the experiment" without the trials' configs: the study starts afresh instead.
    """
    return tune.Tuner.can_restore(str(exp_path)) and any(exp_path.glob("experiment_state-*.json"))


def _restore_tuner(exp_path: Path, spec: StudySpec, recorded: str | None) -> tuple[tune.Tuner, str]:
    """Tune's experiment restored with the trainable it was built with, which may not be this version's choice.

    ``Tuner.restore`` refuses any other trainable. A study started by a version that ran every
    trial alone (``train_point``) resumes with ``train_point`` even where this version would pack;
    drivers record the name (``status.json``), and studies from before that are restored by trying
    this version's choice, then the other.
    """
    names = list(dict.fromkeys([n for n in (recorded, _trainable_fn(spec).__name__) if n in TRAINABLES]))
    names += [n for n in TRAINABLES if n not in names]
    refusals = []
    for name in names:
        try:
            tuner = tune.Tuner.restore(
                str(exp_path), trainable=trainable(spec, TRAINABLES[name]), resume_unfinished=True, resume_errored=False
            )
        except ValueError as e:  # "Invalid `trainable` input to `Tuner.restore()`": built with another one
            if "trainable" not in str(e):
                raise
            refusals.append(f"{name}: {e}")
            continue
        if refusals:
            log.warning("the experiment was built with %s, not this version's choice: resuming with it", name)
        return tuner, name
    raise RuntimeError(
        f"cannot resume: the Tune experiment at {exp_path} was built with a trainable this version does not "
        f"have ({'; '.join(refusals)}); run it with the Ladder version that started it"
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


def _on_stop_signal(signum: int, frame: Any) -> None:
    """SIGTERM and SIGINT alike: end Tune's run the way Tune ends it on an interrupt (state saved, resumable).

    Before Tune runs, the flag is checked at each step of the start; while ``Tuner.fit`` runs,
    :class:`_StopRelay` passes it on to Tune.
    """
    global _stop_requested
    _stop_requested = True
    log.warning("signal %d: stopping the study (resumable)", signum)


class _StopRelay:
    """While ``Tuner.fit`` runs: a stop request becomes SIGUSR1, Tune's own interrupt, once Tune listens for it.

    Tune installs its SIGUSR1 handler a moment after ``fit`` is entered; SIGUSR1 before that would
    kill the process (its default action). A signal handler cannot wait for it, so a thread watches
    for both the request and Tune's handler and sends the interrupt once.
    """

    POLL_S = 0.2

    def __init__(self) -> None:
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stop-relay", daemon=True)

    def __enter__(self) -> _StopRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(self.POLL_S):
            if _stop_requested and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
                os.kill(os.getpid(), signal.SIGUSR1)
                return


def _final_state(study_dir: Path) -> str:
    """A stopped study is 'cancelled' when the service asked for it, else 'interrupted'; both resumable."""
    return "cancelled" if read_status(study_dir).get("cancel_requested") else "interrupted"


def run_study(
    study_id: str, resume: bool = False, progress: bool = False, settings: Settings | None = None, attempt: int = 0
) -> str:
    """Run (or resume) a prepared study to the end; returns its final state.

    Trials already recorded are not run again (resume restores Tune's experiment; records
    and MLflow runs are idempotent by trial key). Only one driver runs a study at a time:
    a second one returns ``"duplicate"`` at once.
    """
    global _stop_requested
    settings = settings or get_settings()
    d = settings.study_dir(study_id)
    spec = read_spec(d)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own per-result loggers (result.json, progress.csv, TensorBoard events) duplicate the trial
    # records and MLflow runs, and cost the driver CPU on every result (docs/benchmarks.md).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Without those files Tune's end-of-run result grid (which Ladder does not use) warns once per trial.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # A trial that diverges (or fails) before its first evaluation reports no accuracy. Strict metric
    # checking would then fail the whole study; without it ASHA simply skips that result.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # SIGINT goes through _on_stop_signal, like SIGTERM
    _stop_requested = False
    signal.signal(signal.SIGTERM, _on_stop_signal)
    signal.signal(signal.SIGINT, _on_stop_signal)
    with driver_lock(d, wait_s=DRIVER_LOCK_WAIT_S) as mine:
        if not mine:
            log.error("another driver of study %s is running; this one exits", study_id)
            return "duplicate"
        write_driver_pid(d, os.getpid())
        state, reason = "failed", "the driver raised before it reported a result"
        try:
            if read_status(d).get("cancel_requested"):  # cancelled before this driver got going
                update_status(d, state="cancelled", attempt=attempt, error=None, running=0, pid=None)
                state = reason = "cancelled"
                return state
            state = _run_locked(study_id, spec, settings, resume, progress, attempt)
            reason = str(read_status(d).get("error") or state)
            return state
        except BaseException as e:
            reason = f"{type(e).__name__}: {e}"
            raise
        finally:  # still under the lock: a duplicate driver never overwrites the live one's record
            write_exit(d, attempt, EXIT_CODES.get(state, 1), reason)


def _run_locked(study_id: str, spec: StudySpec, settings: Settings, resume: bool, progress: bool, attempt: int) -> str:
    d = settings.study_dir(study_id)
    phases = _Phases()
    update_status(d, state="running", attempt=attempt, pid=os.getpid(), started=time.time(), error=None)
    # The stores and the study's MLflow run are made ready while Ray starts: about 3 s each on a fresh data
    # dir, mostly waiting (migrations, Ray's processes starting), so they overlap (docs/benchmarks.md).
    # What Ray's start raised is raised below, once the study's MLflow run exists to record the outcome.
    with ThreadPoolExecutor(1, thread_name_prefix="stores") as pool:
        tracking_ready = pool.submit(_open_tracking, study_id, spec, settings)
        ray_error = _start_ray(settings)
        mlinfo = tracking_ready.result()
    update_status(d, mlflow=mlinfo)
    exp_path = Path(settings.tune_storage) / study_id
    state, error = "failed", None
    try:
        if ray_error is not None:
            raise ray_error
        phases.mark("startup_s")
        if resume and _restorable(exp_path):
            tuner, used = _restore_tuner(exp_path, spec, read_status(d).get("trainable"))
        else:
            tuner = build_tuner(study_id, spec, settings, progress, tracking.StudyTracker(study_id, mlinfo))
            used = _trainable_fn(spec).__name__
        update_status(d, trainable=used)
        if _stop_requested:  # a stop while the tuner was built or restored
            raise _Stopped
        try:
            # the report follows the records
            with _StopRelay(), ReportRefresher(spec, d, _provenance(study_id, spec)):
                tuner.fit()
        finally:
            phases.mark("fit_s")
        state = _final_state(d) if _stop_requested else "finished"
        if state == "finished":
            _close_lost_runs(d, mlinfo)
    except _Stopped:
        state = _final_state(d)
    except Exception as e:
        log.exception("study %s failed", study_id)
        error = f"{type(e).__name__}: {e}. Resume with: ladder resume {study_id}"
    finally:
        phases.restart()  # what ran before (if the study stopped early) is not the outputs' time
        tracking.flush()  # progress metrics logged asynchronously
        _write_outputs(study_id, spec, settings, mlinfo)
        phases.mark("outputs_s")
        log.info("driver phases (s): %s", phases.timings)
        done = {"finished": time.time(), "pid": None, "running": 0, "timings": phases.timings}
        update_status(d, state=state, attempt=attempt, error=error, **done)
        tracking.finish_study_run(mlinfo["tracking_uri"], mlinfo["run_id"], state)
    return state


class _Stopped(Exception):
    """A stop signal arrived before Tune started."""


def _open_tracking(study_id: str, spec: StudySpec, settings: Settings) -> dict[str, str]:
    """The stores ready, the records whole, the study's MLflow parent run found or created; its ids."""
    from studies.stores import init_stores

    d = settings.study_dir(study_id)
    init_stores(settings)  # before MLflow or Optuna is touched: a fresh store is migrated once
    repair_records(d / RECORDS)  # a driver killed mid-write left half a line
    return read_status(d).get("mlflow") or tracking.ensure_study_run(
        settings.mlflow_uri,
        study_id,
        spec,
        tracking.artifact_location(settings.mlflow_uri, settings.data_dir, study_id),
    )


def _start_ray(settings: Settings) -> Exception | None:
    """Ray started, the stop signals ours again; what prevented it (a stop: :class:`_Stopped`), returned."""
    global _stop_requested
    if _stop_requested:
        return _Stopped()
    try:
        _init_ray(settings)
    except SystemExit as e:  # ray.init's own SIGTERM handler (sys.exit) while it starts: a stop all the same
        if e.code != signal.SIGTERM:
            raise
        _stop_requested = True
        return _Stopped()
    except Exception as e:
        return e
    finally:  # ray.init installs its own SIGTERM handler (sys.exit, above): take the signals back
        signal.signal(signal.SIGTERM, _on_stop_signal)
        signal.signal(signal.SIGINT, _on_stop_signal)
        if _stop_requested:
            _disarm_abort_alarm()
    return None


def _disarm_abort_alarm() -> None:
    """Cancel the alarm that Ray's C++ signal handler may have armed for a stop during ``ray.init``.

    While Ray starts, its core worker installs abseil's failure signal handler, SIGTERM included. When
    that handler sees a signal it prints a stack, passes the signal on (to ray.init's ``sys.exit``),
    and first arms a 3 s alarm that aborts the process (abseil's ``alarm_on_failure_secs``, meant for
    a handler that hangs). A driver that then needs more than 3 s to record the stop and shut Ray
    down died with SIGABRT (exit -6) instead of exiting 0 as interrupted. Left alone when someone in
    Python owns SIGALRM (a test timeout, say).
    """
    if signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


class _Phases:
    """Where this driver's wall time went, for ``status.json`` (``timings``) and the API.

    ``imports_s``: from the process's start to the driver's work (interpreter, torch, Ray, MLflow
    imports); ``startup_s``: stores, the MLflow parent run and Ray; ``fit_s``: Tune's run (every
    trial, with actor starts, checkpoints and callbacks); ``outputs_s``: the report, its plots and
    their MLflow artifacts. A phase the driver did not reach is absent.
    """

    def __init__(self) -> None:
        self.last = time.time()
        self.timings = {"imports_s": round(self.last - psutil.Process().create_time(), 3)}

    def mark(self, phase: str) -> None:
        """``phase`` took the time since the last mark (or restart)."""
        now = time.time()
        self.timings[phase] = round(now - self.last, 3)
        self.last = now

    def restart(self) -> None:
        """The next phase starts now: time since the last mark belongs to no phase."""
        self.last = time.time()


def _close_lost_runs(study_dir: Path, mlinfo: dict[str, str]) -> None:
    """End the MLflow runs of trials lost at a driver kill (``tracking.close_lost_runs``); never fails the study."""
    try:
        keys = {r.trial_key for r in read_records(study_dir / RECORDS)}
        n = tracking.close_lost_runs(mlinfo["tracking_uri"], mlinfo["experiment_id"], mlinfo["run_id"], keys)
    except Exception:
        log.exception("ending the MLflow runs of lost trials failed")
        return
    if n:
        log.warning("%d MLflow child run(s) of trials lost at a driver kill ended as lost", n)


def _provenance(study_id: str, spec: StudySpec) -> dict[str, Any]:
    provenance = {"study_id": study_id, "git_sha": git_sha(), "versions": versions()}
    return provenance | {
        "generator_version": GENERATOR_VERSION,
        "evaluation": spec.evaluation.model_dump() | {"threshold": spec.threshold},
        "fairness": spec.fairness.model_dump() | {"ea_norm_eps": spec.eps},
    }


def _write_outputs(study_id: str, spec: StudySpec, settings: Settings, mlinfo: dict[str, str]) -> None:
    """The report from the trial records, logged to the parent run."""
    try:
        report, out = publish_report(spec, settings.study_dir(study_id), _provenance(study_id, spec))
        tracking.log_report(mlinfo["tracking_uri"], mlinfo["run_id"], report, out)
    except ImportError:
        log.info("report module not available; skipping report")
    except Exception:
        log.exception("writing the report of %s failed", study_id)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.driver", description="Run one Ladder study (one process).")
    p.add_argument("study_id")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--attempt", type=int, default=0, help="which launch of the study this is (0: the first)")
    args = p.parse_args(argv)
    state = run_study(args.study_id, resume=args.resume, progress=args.progress, attempt=args.attempt)
    return EXIT_CODES.get(state, 1)


def _exit_now(code: int) -> None:
    """End the driver process without the interpreter's teardown.

    Everything the study needs is on disk by now (records, status, report; the MLflow progress queue
    was drained and the parent run ended). What remains at a normal exit is Ray's shutdown (stopping
    a local cluster's processes, done here explicitly) and then finalising the interpreter's modules
    (torch, Ray, MLflow), which took 1.4 s of every quick-start driver's wall time (docs/benchmarks.md).
    """
    ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())  # an exception still exits the usual way, with its traceback
