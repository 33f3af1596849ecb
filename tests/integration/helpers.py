"""Helpers for integration tests: run the driver in its own process, stop only what we started."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil


def driver_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("LADDER_MLFLOW_TRACKING_URI", "LADDER_OPTUNA_STORAGE", "LADDER_REGISTRY_URL", "LADDER_RAY_ADDRESS"):
        env.pop(name, None)
    env.pop("RAY_ADDRESS", None)
    env |= {"LADDER_DATA_DIR": str(data_dir), "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    return env | extra


def start_driver(study_id: str, env: dict[str, str], log: Path, resume: bool = False) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "workers.driver", study_id] + (["--resume"] if resume else [])
    return subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def resume_to_end(study_id: str, env: dict[str, str], log: Path, timeout: float) -> None:
    """Resume the study's driver and wait for it to exit 0; its process tree is stopped either way."""
    proc = start_driver(study_id, env, log, resume=True)
    try:
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-4000:]
    finally:
        kill_tree(proc)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(proc: subprocess.Popen[bytes] | int, known: list[psutil.Process] | None = None) -> None:
    """SIGKILL the process (a Popen we started, or a pid) and every descendant we saw: its local Ray, nothing else."""
    pid = proc if isinstance(proc, int) else proc.pid
    procs = (known or []) + descendants(pid)
    if isinstance(proc, int):
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.insert(0, psutil.Process(pid))
    else:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=30)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=20)


def wait_for(cond: Any, timeout: float, what: str, interval: float = 0.5) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def trial_lines(study_dir: Path) -> list[dict[str, Any]]:
    p = study_dir / "trials.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


@contextlib.contextmanager
def driver_mid_study(
    study_id: str,
    env: dict[str, str],
    log: Path,
    done: int,
    timeout: float,
    what: str,
    on_lock: Callable[[], None] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start the study's driver and wait until ``done`` trials are recorded and one runs; yields the driver.

    ``on_lock`` runs once the driver holds the study's lock, before any trial can have finished: what
    takes time there (a second driver's start) does not eat into the moment the caller acts on.
    On leaving, the driver and every descendant seen meanwhile (its local Ray, the trials) are
    killed with SIGKILL: a leave without stopping it first is a kill -9 mid-study.
    """
    from studies.settings import get_settings
    from studies.studydir import read_driver_pid, read_status

    study_dir = get_settings().study_dir(study_id)
    proc = start_driver(study_id, env, log)
    seen: list[psutil.Process] = []
    try:
        if on_lock is not None:
            wait_for(lambda: read_driver_pid(study_dir) == proc.pid, timeout, "the driver holding the study's lock")
            on_lock()

        def some_done_one_running() -> bool:
            assert proc.poll() is None, log.read_text()[-4000:]
            seen[:] = list({p.pid: p for p in seen + descendants(proc.pid)}.values())
            return len(trial_lines(study_dir)) >= done and read_status(study_dir).get("running", 0) >= 1

        wait_for(some_done_one_running, timeout, what)
        yield proc
    finally:
        kill_tree(proc, seen)


def child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(tracking_uri).search_runs([experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_run_id]


class Server:
    """`ladder serve` in its own process; stopped by PID."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = driver_env(data_dir, **env)
        self.log = data_dir / "service.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "studies.cli", "serve", "--port", str(self.port)]
        self.proc = subprocess.Popen(args, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(self._ready, 180, "the service to be ready")  # a loaded 2-core box starts slowly

    def _ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    def study(self, study_id: str) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/studies/{study_id}", timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{self.url}/studies", json=spec, timeout=60)
        assert r.status_code == 201, r.text
        assert r.headers["location"].endswith(f"/studies/{r.json()['id']}")
        return r.json()

    def wait_state(self, study_id: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        wait_for(lambda: self.study(study_id)["state"] in states, timeout, f"study {study_id} in {states}", 1.0)
        return self.study(study_id)
