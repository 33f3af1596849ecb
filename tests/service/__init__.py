"""REST service tests: shared helpers (fixtures live in ``conftest.py``).

Helpers talk to the real app, the real registry and real driver processes; the only
shortcut is inserting registry rows (plus the study's files) for a study in a given state.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import delete, select, update

from benchmarks.seeding import study_row
from service.lifecycle import ACTIVE
from service.registry import Registry, Slot, Study
from studies.settings import Settings
from studies.spec import StudySpec
from studies.studydir import new_study_id, prepare_study, read_driver_pid

SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2}
# Two kinds x two rungs = 4 trials of 200 steps: the smallest study that has a frontier to compare.
TINY_SPEC: dict[str, Any] = {
    "name": "t",
    "task": {"ladder": [[[7, 2]], [[61, 6]]]},
    "model": {"sizes": [SIZE]},
    "training": {"max_steps": 200, "eval_interval": 100, "eval_sequences": 128},
}
TINY_YAML = """\
name: t
task:
  ladder:
    - [[7, 2]]
    - [[61, 6]]
model:
  sizes:
    - {d_model: 16, n_layers: 1, n_heads: 2}
training: {max_steps: 200, eval_interval: 100, eval_sequences: 128}
"""
YAML = {"Content-Type": "application/yaml"}


@dataclass
class Service:
    """One running app: its settings, the app and a TestClient whose lifespan has run."""

    settings: Settings
    app: FastAPI
    client: TestClient

    @property
    def registry(self) -> Registry:
        registry: Registry = self.app.state.registry
        return registry


def assert_error(
    resp: httpx.Response, status: int, loc: list[str | int] | None = None, *fragments: str
) -> list[dict[str, Any]]:
    """``resp`` is a ``status`` error in the API's one error shape; with ``loc``, an item there says every fragment.

    Returns the error items.
    """
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:2000]}"
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert isinstance(body, dict) and set(body) == {"detail"}, body
    items = body["detail"]
    assert isinstance(items, list) and items, body
    for item in items:
        assert isinstance(item, dict) and set(item) == {"loc", "msg", "type"}, item
        assert isinstance(item["loc"], list), item
        assert all(isinstance(x, str | int) and not isinstance(x, bool) for x in item["loc"]), item
        assert isinstance(item["msg"], str) and item["msg"], item
        assert isinstance(item["type"], str) and item["type"], item
    if loc is not None:
        at = [i["msg"] for i in items if i["loc"] == loc]
        assert at, f"no error at {loc}: {items}"
        assert any(all(f in m for f in fragments) for m in at), f"no error at {loc} says {fragments}: {items}"
    return list(items)


def insert_study(
    svc: Service,
    state: str,
    *,
    spec: dict[str, Any] | None = None,
    handle: str | None = None,
    created: float | None = None,
    error: str | None = None,
) -> str:
    """A registry row in ``state`` plus the study's files, as ``POST /studies`` would have left them."""
    parsed = StudySpec.model_validate(spec or TINY_SPEC)
    study_id = new_study_id(parsed)
    prepare_study(parsed, study_id, svc.settings)
    with svc.registry.session() as s:
        s.add(study_row(parsed, study_id, state, created, handle=handle, error=error))
        if state in ACTIVE:  # an active study holds a concurrency slot
            taken = set(s.scalars(select(Slot.slot)).all())
            s.add(Slot(slot=min(set(range(len(taken) + 1)) - taken), study_id=study_id))
    return study_id


def force_state(registry: Registry, study_id: str, state: str) -> None:
    """Put a study in ``state`` behind the lifecycle's back (test setup and teardown only)."""
    with registry.session() as s:
        s.execute(update(Study).where(Study.id == study_id).values(state=state))
        if state not in ACTIVE:
            s.execute(delete(Slot).where(Slot.study_id == study_id))


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def wait_state(client: TestClient, study_id: str, done: Any, timeout: float, what: str, **kw: Any) -> dict[str, Any]:
    """Poll ``GET /studies/{id}`` until ``done(body)``; returns that body."""
    end = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < end:
        r = client.get(f"/studies/{study_id}", **kw)
        assert r.status_code == 200, r.text
        body = r.json()
        if done(body):
            return body
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {body}")


def join_stop_threads(timeout: float = 30) -> None:
    """Wait for the service's background cancel threads (``stop-<study id>``) to finish.

    The API may report a study cancelled (its driver is dead) while that thread still tears
    down the driver's local Ray and writes the final status.
    """
    end = time.monotonic() + timeout
    for t in threading.enumerate():
        if t.name.startswith("stop-"):
            t.join(max(0.0, end - time.monotonic()))
            assert not t.is_alive(), f"{t.name} still running after {timeout}s"


def cancel_and_wait(client: TestClient, study_id: str, timeout: float = 60, **kw: Any) -> dict[str, Any]:
    """``POST cancel`` (202), wait until the study is no longer active and the cancel is done; returns the body."""
    r = client.post(f"/studies/{study_id}/cancel", **kw)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "cancelling"
    wait_state(client, study_id, lambda b: b["state"] not in ACTIVE, timeout, "cancel to finish", **kw)
    join_stop_threads()
    return wait_state(client, study_id, lambda b: True, timeout, "", **kw)


def handle_pid(svc: Service, study_id: str) -> int:
    """The pid of the study's local driver (the launcher writes it as it starts the process)."""
    pid = read_driver_pid(svc.settings.study_dir(study_id))
    assert pid is not None, study_id
    return pid


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(data_dir: Path) -> list[str]:
    """SIGKILL every process that carries this data dir as LADDER_DATA_DIR; returns what it killed.

    That is exactly what this test's service started: drivers get the variable from the
    launcher, and their local Ray (raylet, GCS, workers) inherits it.
    """
    found: list[psutil.Process] = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and p.environ().get("LADDER_DATA_DIR") == str(data_dir):
                found.append(p)
    killed = []
    for p in found:
        with contextlib.suppress(psutil.Error):
            killed.append(f"{p.pid} {p.name()}")
            p.kill()
    psutil.wait_procs(found, timeout=10)
    return killed


def stop_leftovers(registry: Registry, settings: Settings, launcher: Any) -> list[str]:
    """Teardown safety net: stop studies a test left active, then reap what their drivers left.

    Returns a description of anything it had to stop (a test or the service leaked it).
    """
    join_stop_threads()
    leaks: list[str] = []
    for study in registry.in_states(ACTIVE):
        if launcher.liveness(study.id, study.handle) != "dead":
            leaks.append(f"study {study.id} left {study.state}")
            launcher.cancel(study.id, study.handle)
        force_state(registry, study.id, "cancelled")
    killed = reap(settings.data_dir)
    if killed:
        leaks.append(f"processes left behind: {killed}")
    return leaks
