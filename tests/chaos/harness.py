"""The chaos suite's parts: readers that never stop, a watch for double drivers, the processes we own.

Everything here acts only on processes of one data directory: the service we start, the
drivers it launches (they carry ``LADDER_DATA_DIR`` in their environment) and their
descendants (local Ray, trial workers). Nothing is found or killed by name alone.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from studies.studydir import read_driver_pid
from tests.integration.cluster import kill_all, kill_marked

TRAINABLES = ("/working_dirs/train_pack", "/working_dirs/train_point")  # a Tune trial's working directory


@dataclass
class Tally:
    """Every HTTP answer the readers and clients got; a status >= 500 is kept with its body."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0  # no answer: the service was down (killed) at that moment
    server_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, method: str, path: str, r: httpx.Response) -> httpx.Response:
        with self.lock:
            self.requests += 1
            self.statuses[r.status_code] += 1
            if r.status_code >= 500:
                self.server_errors.append(f"{method} {path} -> {r.status_code}: {r.text[:800]}")
        return r

    def no_answer(self) -> None:
        with self.lock:
            self.transport_errors += 1


class Client:
    """HTTP to the service with every answer tallied."""

    def __init__(self, url: str, tally: Tally) -> None:
        self.url, self.tally = url, tally

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = httpx.request(method, f"{self.url}{path}", timeout=kw.pop("timeout", 60), **kw)
        except httpx.TransportError:
            self.tally.no_answer()
            raise
        return self.tally.answer(method, path, r)

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)


class Readers(threading.Thread):
    """A steady stream of reads: /healthz, /studies, and a known study's page, frontier and trials."""

    def __init__(self, client: Client, study_ids: Callable[[], list[str]], seed: int) -> None:
        super().__init__(name="chaos-readers", daemon=True)
        self.client, self.study_ids, self.rng = client, study_ids, random.Random(seed)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            ids = self.study_ids()
            paths = ["/healthz", "/studies"]
            if ids:
                sid = self.rng.choice(ids)
                paths += [f"/studies/{sid}", f"/studies/{sid}/frontier", f"/studies/{sid}/trials"]
            try:
                self.client.get(self.rng.choice(paths))
            except httpx.TransportError:
                self.stop.wait(0.5)  # the service is down: it is being restarted
            self.stop.wait(0.05)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def drivers(study_ids: list[str]) -> dict[str, list[psutil.Process]]:
    """Live driver processes per study (``python -m workers.driver STUDY_ID``)."""
    out: dict[str, list[psutil.Process]] = {}
    wanted = set(study_ids)
    for p in psutil.process_iter():
        cmd = _cmdline(p)
        if "workers.driver" in cmd:
            sid = cmd[cmd.index("workers.driver") + 1] if cmd.index("workers.driver") + 1 < len(cmd) else ""
            if sid in wanted and _alive(p):
                out.setdefault(sid, []).append(p)
    return out


class DriverWatch(threading.Thread):
    """Twice a second: never two drivers of one study at work; remembers every descendant it saw.

    A driver is at work once it has started its local Ray (it has children): a second driver
    that starts, finds the study's lock taken and exits never gets that far.
    """

    def __init__(self, study_ids: Callable[[], list[str]]) -> None:
        super().__init__(name="chaos-driver-watch", daemon=True)
        self.study_ids = study_ids
        self.stop = threading.Event()
        self.violations: list[str] = []
        self.seen: dict[int, tuple[psutil.Process, int]] = {}  # pid -> (process, its driver's pid), to clean up
        self.scans = 0
        self.lock = threading.Lock()

    def scan(self) -> None:
        for sid, procs in drivers(self.study_ids()).items():
            working = []
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                    kids = p.children(recursive=True)
                    with self.lock:
                        self.seen |= {q.pid: (q, p.pid) for q in [p, *kids]}
                    if kids:
                        working.append(p)
            if len(working) > 1:
                self.violations.append(f"two drivers of {sid} at work: {[(p.pid, _cmdline(p)) for p in working]}")
        self.scans += 1

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.scan()
            except Exception as e:  # a process vanished mid-scan: scan again
                if not isinstance(e, psutil.Error):
                    self.violations.append(f"watch error: {e!r}")
            self.stop.wait(0.5)

    def descendants_of(self, pid: int) -> list[psutil.Process]:
        """What the watch saw under driver ``pid`` that still lives (its Ray, after the driver was killed)."""
        with self.lock:
            return [p for p, d in self.seen.values() if d == pid and p.pid != pid and _alive(p)]

    def all_seen(self) -> list[psutil.Process]:
        with self.lock:
            return [p for p, _ in self.seen.values()]


def live_driver(study_dir: Path, study_id: str) -> psutil.Process | None:
    """The study's driver by its pid file, when it lives and is that study's driver."""
    pid = read_driver_pid(study_dir)
    if pid is None:
        return None
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        p = psutil.Process(pid)
        cmd = _cmdline(p)
        if _alive(p) and "workers.driver" in cmd and study_id in cmd:
            return p
    return None


def trial_workers(driver: psutil.Process) -> list[tuple[psutil.Process, str]]:
    """Ray workers running a trial under ``driver``, each with its Tune trial's name (``train_pack_<exp>_<n>``)."""
    out = []
    with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
        for p in driver.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                if not p.name().startswith("ray::ImplicitFunc"):
                    continue
                cwd = p.cwd()
                if any(t in cwd for t in TRAINABLES):
                    name = cwd.rsplit("/working_dirs/", 1)[1]
                    out.append((p, "_".join(name.split("_")[:4])))
    return out


def kill_ours(data_dir: Path, also: list[psutil.Process]) -> int:
    """SIGKILL what this data directory's run started (by ``LADDER_DATA_DIR`` in its environment, with its
    descendants) and ``also`` (descendants seen earlier, whose driver is gone); returns how many."""
    killed = kill_marked(lambda d: d == str(data_dir), var="LADDER_DATA_DIR")
    rest = [p for p in also if _alive(p)]
    kill_all(rest)
    return killed + len(rest)


def wait_until(cond: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """``cond()``'s first truthy value within ``timeout`` seconds, else None."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(interval)
    return None
