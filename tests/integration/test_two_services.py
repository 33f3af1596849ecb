"""Two service processes (two uvicorns, real HTTP) on one PostgreSQL registry and one data directory.

The concurrency cap and Idempotency-Key are enforced by the registry database, not by a lock
in a process: creates raced through both services never pass the cap, a key replayed through
either service returns the one study it made, nothing answers 5xx, and no study is launched
twice (every launch writes one line to the study's driver.log before it starts the driver).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.launcher import LAUNCH_MARK
from service.lifecycle import ACTIVE
from studies.studydir import DRIVER_LOG
from tests.integration.helpers import driver_env, wait_for
from tests.service import TINY_SPEC, reap
from tests.service.conftest import postgres_database

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~90 s on the loaded 2-core box
CAP = 3


class Uvicorn:
    """``uvicorn --factory service.app:create_app`` in its own process, on its own port; stopped by PID."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port)]
        self.log = log
        self.proc = subprocess.Popen(args, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def services(data_dir: Path) -> Iterator[list[Uvicorn]]:
    """Two services started at once on a fresh PostgreSQL registry (both migrate it at start-up)."""
    with postgres_database() as url:
        env = driver_env(data_dir, LADDER_REGISTRY_URL=url, LADDER_MAX_CONCURRENT_STUDIES=str(CAP))
        env["LADDER_CANCEL_GRACE_S"] = "3"
        data_dir.mkdir(parents=True, exist_ok=True)
        svcs = [Uvicorn(env, port, data_dir / f"service-{i}.log") for i, port in enumerate(free_ports(2))]
        try:
            for s in svcs:
                wait_for(s.ready, 180, f"{s.url} to be ready")
            yield svcs
        finally:
            for s in svcs:
                s.stop()
            reap(data_dir)  # drivers the services launched, and anything they started


def race(calls: list[Any]) -> list[httpx.Response]:
    """Run the calls in threads released together; returns their responses in order."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except Exception as e:  # a transport error is a failure the assertions below report
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def launches(data_dir: Path) -> dict[str, int]:
    """Study id -> how many times a service launched its driver (study directories that exist)."""
    return {
        d.name: (d / DRIVER_LOG).read_text().count(LAUNCH_MARK) if (d / DRIVER_LOG).exists() else 0
        for d in (data_dir / "studies").iterdir()
    }


def stop_all(svcs: list[Uvicorn], ids: list[str]) -> None:
    for i, sid in enumerate(ids):  # cancelled through either service
        r = httpx.post(f"{svcs[i % 2].url}/studies/{sid}/cancel", timeout=60)
        assert r.status_code in (202, 409), r.text

    def stopped() -> bool:
        return all(httpx.get(f"{svcs[0].url}/studies/{sid}", timeout=30).json()["state"] not in ACTIVE for sid in ids)

    wait_for(stopped, 120, "the studies to stop", 1.0)


def test_two_services_hold_the_cap_and_idempotency_keys(services: list[Uvicorn], data_dir: Path) -> None:
    a, b = services
    start = time.monotonic()
    # 10 different creates through both services at once: exactly CAP win, the rest are 429.
    calls = [
        (lambda svc=svc, i=i: httpx.post(f"{svc.url}/studies", json=TINY_SPEC | {"name": f"cap{i}"}, timeout=120))
        for i, svc in enumerate([a, b] * 5)
    ]
    answers = race(calls)
    assert all(isinstance(r, httpx.Response) for r in answers), answers
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * CAP + [429] * (10 - CAP), [(r.status_code, r.text[:300]) for r in answers]
    won = [r.json()["id"] for r in answers if r.status_code == 201]
    listed = httpx.get(f"{b.url}/studies", params={"limit": 200}, timeout=30).json()
    assert listed["total"] == CAP and {s["id"] for s in listed["items"]} == set(won)
    assert launches(data_dir) == dict.fromkeys(won, 1)  # one launch each; the refused left no directory
    stop_all(services, won)

    # One Idempotency-Key, 8 submits through both services at once: one study, launched once.
    key = {"Idempotency-Key": "same-key-twice"}
    spec = TINY_SPEC | {"name": "keyed"}
    calls = [
        (lambda svc=svc: httpx.post(f"{svc.url}/studies", json=spec, headers=key, timeout=120)) for svc in [a, b] * 4
    ]
    answers = race(calls)
    assert all(isinstance(r, httpx.Response) for r in answers), answers
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 7 + [201], [(r.status_code, r.text[:300]) for r in answers]
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == 1, ids
    (keyed,) = ids
    for svc in (a, b):  # a later replay through either service: the same study, 200
        again = httpx.post(f"{svc.url}/studies", json=spec, headers=key, timeout=60)
        assert (again.status_code, again.json()["id"]) == (200, keyed), again.text
        other = httpx.post(f"{svc.url}/studies", json=spec | {"seeds": [1]}, headers=key, timeout=60)
        assert other.status_code == 409 and other.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert httpx.get(f"{a.url}/studies", timeout=30).json()["total"] == CAP + 1
    assert launches(data_dir) == dict.fromkeys(won, 1) | {keyed: 1}
    stop_all(services, [keyed])
    print(f"two services: races and replays took {time.monotonic() - start:.1f} s")
