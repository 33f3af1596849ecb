"""Launching study drivers: one interface, a local process or a Ray Job per study.

The service never trains: it starts ``python -m workers.driver STUDY_ID`` and watches it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Protocol

import psutil

from studies.settings import Settings

log = logging.getLogger(__name__)


class Launcher(Protocol):
    kind: str

    def launch(self, study_id: str, resume: bool, attempt: int) -> str:
        """Start the study's driver; returns a handle (a pid or a Ray job submission id)."""
        ...

    def is_alive(self, study_id: str, handle: str | None) -> bool: ...

    def cancel(self, study_id: str, handle: str | None) -> None:
        """Ask the driver to stop (it records a cancelled study); force it after a grace period."""
        ...


def _driver_args(study_id: str, resume: bool) -> list[str]:
    return ["-m", "workers.driver", study_id, *(["--resume"] if resume else [])]


def _driver_env(settings: Settings) -> dict[str, str]:
    """The settings a driver needs, passed explicitly so it sees what the service sees."""
    env = {
        "LADDER_DATA_DIR": str(settings.data_dir),
        "LADDER_MLFLOW_TRACKING_URI": settings.mlflow_uri,
        "LADDER_OPTUNA_STORAGE": settings.optuna_url,
        "LADDER_STORAGE_PATH": settings.tune_storage,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    return env


class LocalLauncher:
    """A driver process per study, each on a local Ray started for the purpose."""

    kind = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def launch(self, study_id: str, resume: bool, attempt: int) -> str:
        d = self.settings.study_dir(study_id)
        d.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LADDER_RAY_ADDRESS")}
        env |= _driver_env(self.settings)
        with open(d / "driver.log", "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, *_driver_args(study_id, resume)],
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: cancel reaches the local Ray too
            )
        log.info("launched driver of %s as pid %d", study_id, proc.pid)
        return str(proc.pid)

    def _process(self, study_id: str, handle: str | None) -> psutil.Process | None:
        if not handle or not handle.isdigit():
            return None
        try:
            p = psutil.Process(int(handle))
            if p.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p.pid, os.WNOHANG)
                return None
            return p if study_id in " ".join(p.cmdline()) else None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def is_alive(self, study_id: str, handle: str | None) -> bool:
        return self._process(study_id, handle) is not None

    def cancel(self, study_id: str, handle: str | None) -> None:
        p = self._process(study_id, handle)
        if p is None:
            return
        tree = [p, *p.children(recursive=True)]
        p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs([p], timeout=self.settings.cancel_grace_s)
        tree += [c for c in p.children(recursive=True)] if alive else []
        # The driver leads its own process group (start_new_session): killing the group also
        # reaches what it spawned after the snapshot above (a local Ray still starting up).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        for q in tree:  # the driver, its local Ray and the trials: only what this study started
            with contextlib.suppress(psutil.NoSuchProcess):
                q.kill()
        psutil.wait_procs(tree, timeout=10)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(p.pid, os.WNOHANG)


class RayJobsLauncher:
    """A Ray Job per study on a cluster (``LADDER_RAY_ADDRESS``); submission id = study id."""

    kind = "ray_job"

    def __init__(self, settings: Settings) -> None:
        from ray.job_submission import JobSubmissionClient

        self.settings = settings
        assert settings.ray_address
        self.client = JobSubmissionClient(settings.ray_address)

    def launch(self, study_id: str, resume: bool, attempt: int) -> str:
        submission_id = study_id if attempt == 0 else f"{study_id}-r{attempt}"
        existing = None
        with contextlib.suppress(Exception):
            existing = self.client.get_job_info(submission_id)
        if existing is not None:  # idempotent: the same attempt is never submitted twice
            return submission_id
        self.client.submit_job(
            entrypoint=" ".join(["python", *_driver_args(study_id, resume)]),
            submission_id=submission_id,
            runtime_env={"env_vars": _driver_env(self.settings)},
            metadata={"ladder.study_id": study_id},
        )
        return submission_id

    def is_alive(self, study_id: str, handle: str | None) -> bool:
        if not handle:
            return False
        from ray.job_submission import JobStatus

        try:
            return self.client.get_job_status(handle) in (JobStatus.PENDING, JobStatus.RUNNING)
        except Exception:
            return False

    def cancel(self, study_id: str, handle: str | None) -> None:
        if handle:
            self.client.stop_job(handle)  # SIGTERM to the driver, then SIGKILL after Ray's grace period
            end = time.monotonic() + self.settings.cancel_grace_s + 5
            while self.is_alive(study_id, handle) and time.monotonic() < end:
                time.sleep(0.5)


def make_launcher(settings: Settings) -> Launcher:
    return RayJobsLauncher(settings) if settings.ray_address else LocalLauncher(settings)
