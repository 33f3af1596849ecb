"""Launching study drivers: one interface, a local process or a Ray Job per study.

The service never trains: it starts ``python -m workers.driver STUDY_ID --attempt N`` and
watches it. A launch's handle is known before the launch (it is written in the same
transaction that makes the study ``launching``), so a study whose service died mid-launch
is found again from its handle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from enum import StrEnum
from typing import Protocol

import psutil

from studies.settings import Settings
from studies.studydir import DRIVER_LOG, driver_lock_held, read_driver_pid, write_driver_pid

log = logging.getLogger(__name__)


class Liveness(StrEnum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"  # could not ask (Ray unreachable): no verdict, ask again later


class Launcher(Protocol):
    kind: str

    def handle(self, study_id: str, attempt: int) -> str:
        """The handle attempt ``attempt`` of the study will have (known before launching)."""
        ...

    def launch(self, study_id: str, handle: str, resume: bool, attempt: int) -> None:
        """Start the study's driver under ``handle``; launching a live handle again does nothing."""
        ...

    def liveness(self, study_id: str, handle: str | None) -> Liveness: ...

    def exit_code(self, study_id: str, handle: str | None) -> int | None:
        """The driver's exit code when this launcher saw it exit, else None."""
        ...

    def cancel(self, study_id: str, handle: str | None) -> None:
        """Ask the driver to stop (it records its state); force it after the grace period."""
        ...


LAUNCH_MARK = "ladder: launching driver"


def launch_line(attempt: int, resume: bool) -> str:
    """The line a launch writes to driver.log first: which service process launched which attempt, and when."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    what = f"attempt {attempt}{' (resume)' if resume else ''}"
    return f"--- {LAUNCH_MARK} {what} from service pid {os.getpid()} at {when}\n"


def driver_args(study_id: str, resume: bool, attempt: int) -> list[str]:
    return ["-m", "workers.driver", study_id, "--attempt", str(attempt), *(["--resume"] if resume else [])]


# What a local driver inherits from the service's environment: the interpreter, threads, devices,
# Ray/MLflow/Tune tuning. Not the API token, not the registry URL (it may carry a password).
_INHERIT: tuple[str, ...] = ("PATH", "HOME", "USER", "LANG", "LC_", "TMPDIR", "TZ", "PYTHON", "VIRTUAL_ENV")
_INHERIT += ("OMP_", "MKL_", "CUDA_", "NVIDIA_", "TORCH", "RAY_", "TUNE_", "MLFLOW_", "LADDER_", "DO_NOT_TRACK")
_WITHHOLD = ("LADDER_API_TOKEN", "LADDER_REGISTRY_URL", "LADDER_RAY_ADDRESS", "RAY_ADDRESS", "LADDER_AUTH_READS")


def driver_env(settings: Settings) -> dict[str, str]:
    """The settings a driver needs, passed explicitly so it sees what the service sees."""
    return {
        "LADDER_DATA_DIR": str(settings.data_dir),
        "LADDER_MLFLOW_TRACKING_URI": settings.mlflow_uri,
        "LADDER_OPTUNA_STORAGE": settings.optuna_url,
        "LADDER_STORAGE_PATH": settings.tune_storage,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def local_env(settings: Settings, environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    inherited = {k: v for k, v in environ.items() if k.startswith(_INHERIT) and k not in _WITHHOLD}
    return inherited | driver_env(settings)


class LocalLauncher:
    """A driver process per study, each on a local Ray started for the purpose."""

    kind = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # handle -> the driver this process started
        self._lock = threading.Lock()

    def handle(self, study_id: str, attempt: int) -> str:
        return f"local-{attempt}"

    def launch(self, study_id: str, handle: str, resume: bool, attempt: int) -> None:
        d = self.settings.study_dir(study_id)
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self.liveness(study_id, handle) is Liveness.ALIVE:
                return
            with open(d / DRIVER_LOG, "ab") as logf:
                logf.write(launch_line(attempt, resume).encode())
                logf.flush()
                proc = subprocess.Popen(
                    [sys.executable, *driver_args(study_id, resume, attempt)],
                    env=local_env(self.settings),
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group: cancel reaches its local Ray too
                )
            write_driver_pid(d, proc.pid)
            self._procs[f"{study_id}/{handle}"] = proc
        log.info("launched driver of %s (%s) as pid %d", study_id, handle, proc.pid)

    def _process(self, study_id: str, handle: str | None) -> psutil.Process | None:
        """The driver's process, from its pid file (or a pid handle); None when it is gone."""
        d = self.settings.study_dir(study_id)
        pid = int(handle) if handle and handle.isdigit() else read_driver_pid(d)
        if pid is None:
            return self._find(study_id)
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                self._reap(study_id, handle)
                return None
            cmd = p.cmdline()
            return p if study_id in cmd and "workers.driver" in cmd else None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    @staticmethod
    def _find(study_id: str) -> psutil.Process | None:
        """A driver of the study by its command line (a launch the service died in before writing the pid)."""
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if study_id in cmd and "workers.driver" in cmd:
                return p
        return None

    def _reap(self, study_id: str, handle: str | None) -> None:
        proc = self._procs.get(f"{study_id}/{handle}")
        if proc is not None:
            proc.poll()

    def liveness(self, study_id: str, handle: str | None) -> Liveness:
        if driver_lock_held(self.settings.study_dir(study_id)):
            return Liveness.ALIVE
        return Liveness.ALIVE if self._process(study_id, handle) is not None else Liveness.DEAD

    def exit_code(self, study_id: str, handle: str | None) -> int | None:
        proc = self._procs.get(f"{study_id}/{handle}")
        return None if proc is None else proc.poll()

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
        self._reap(study_id, handle)


class RayJobsLauncher:
    """A Ray Job per study on a cluster (``LADDER_RAY_ADDRESS``); the submission id is the handle."""

    kind = "ray_job"

    def __init__(self, settings: Settings) -> None:
        from ray.job_submission import JobSubmissionClient  # only on a cluster: local studies never import Ray here

        self.settings = settings
        assert settings.ray_address
        self.client = JobSubmissionClient(settings.ray_address)

    def handle(self, study_id: str, attempt: int) -> str:
        return study_id if attempt == 0 else f"{study_id}-r{attempt}"

    def launch(self, study_id: str, handle: str, resume: bool, attempt: int) -> None:
        if self.liveness(study_id, handle) is not Liveness.DEAD or self._info(handle) is not None:
            return  # idempotent: the same attempt is never submitted twice
        self.client.submit_job(
            entrypoint=shlex.join(["python", *driver_args(study_id, resume, attempt)]),
            submission_id=handle,
            runtime_env={"env_vars": driver_env(self.settings)},
            metadata={"ladder.study_id": study_id},
        )

    def _info(self, handle: str) -> object | None:
        try:
            return self.client.get_job_info(handle)
        except Exception:
            return None

    def liveness(self, study_id: str, handle: str | None) -> Liveness:
        if not handle:
            return Liveness.DEAD
        from ray.job_submission import JobStatus

        try:
            status = self.client.get_job_status(handle)
        except Exception as e:
            if "does not exist" in str(e) or "404" in str(e):
                return Liveness.DEAD
            log.warning("could not ask Ray about job %s: %s", handle, e)
            return Liveness.UNKNOWN
        return Liveness.ALIVE if status in (JobStatus.PENDING, JobStatus.RUNNING) else Liveness.DEAD

    def exit_code(self, study_id: str, handle: str | None) -> int | None:
        info = self._info(handle) if handle else None
        code = getattr(info, "driver_exit_code", None)
        return int(code) if isinstance(code, int) else None

    def cancel(self, study_id: str, handle: str | None) -> None:
        if handle:
            self.client.stop_job(handle)  # SIGTERM to the driver, then SIGKILL after Ray's grace period
            end = time.monotonic() + self.settings.cancel_grace_s + 5
            while self.liveness(study_id, handle) is not Liveness.DEAD and time.monotonic() < end:
                time.sleep(0.5)


def make_launcher(settings: Settings) -> Launcher:
    return RayJobsLauncher(settings) if settings.ray_address else LocalLauncher(settings)
