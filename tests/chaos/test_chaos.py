"""Chaos: kill -9 the service, drivers and Ray trial workers at seeded random moments, under steady reads.

One run, real parts only: the service (``ladder serve``, uvicorn) over HTTP, local Ray per
driver, MLflow and Optuna on SQLite in a temp data dir. A seeded schedule kills the service
10 times (restarted on the same data dir), a study's driver 10 times (the study is resumed
through the API) and a Ray worker running a trial 10 times (Tune retries it), runs bursts
of concurrent submits against the concurrency cap and one cancel-then-resume cycle. After
every event and at the end: no answer >= 500, never two drivers of one study at work, and
every finished study has each planned trial exactly once in its records, its MLflow child
runs and (``search: optuna``) its Optuna trials, none left RUNNING.

``LADDER_CHAOS_SEED`` picks the schedule (printed first, so a failure shows it);
``LADDER_CHAOS_FIGURES`` names a JSON file for the figures (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import optuna
import psutil
import pytest

from studies.records import OUTCOMES, read_records
from studies.settings import get_settings
from studies.spec import StudySpec
from studies.studydir import read_status
from tests.chaos.harness import (
    Client,
    DriverWatch,
    Readers,
    Tally,
    kill_ours,
    live_driver,
    trial_workers,
    wait_until,
)
from tests.integration.helpers import Server, child_runs, kill_tree, trial_lines
from workers.search import grid_cells
from workers.tracking import cell_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILLS = int(os.environ.get("LADDER_CHAOS_KILLS", "10"))  # of each kind (fewer only to debug the suite)
CAP = 1  # LADDER_MAX_CONCURRENT_STUDIES: one local Ray at a time on a shared 2-core box
BURST = 3  # concurrent submits per new study: exactly CAP accepted, the rest 429
MAX_FAILURES = 2  # FailureConfig(max_failures) in workers/driver.py: a trial killed more often errors
SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2}
TRAINING = {"max_steps": 200, "eval_interval": 50, "eval_sequences": 128}
LADDER = [[[7, 2]], [[13, 2]], [[61, 6]]]
GRID: dict[str, Any] = {
    "task": {"ladder": LADDER},
    "model": {"sizes": [SIZE]},
    "training": TRAINING,
    "seeds": [0, 1],
    "max_concurrent": 2,
}  # 12 trials in two packs (execution.pack: auto)
OPTUNA: dict[str, Any] = {
    "task": {"ladder": LADDER},
    "model": {"sizes": [SIZE]},
    "training": TRAINING,
    "hparams": {"lr": {"low": 1e-3, "high": 1e-2}},
    "search": {"method": "optuna", "n_trials": 2},
    "max_concurrent": 2,
}  # 2 picks x 2 kinds: 4 solo trials


class Chaos:
    """The run's state: the service, the studies, the schedule's log and what went wrong."""

    def __init__(self, data_dir: Path, seed: int) -> None:
        self.data_dir, self.seed = data_dir, seed
        self.rng = random.Random(seed)
        self.server = Server(data_dir, LADDER_MAX_CONCURRENT_STUDIES=str(CAP))
        self.tally = Tally()
        self.client = Client(self.server.url, self.tally)
        self.specs: dict[str, StudySpec] = {}
        self.current: str | None = None
        self.killed_driver: set[str] = set()  # studies whose driver we killed since their last resume
        self.violations: list[str] = []
        self.events: Counter[str] = Counter()
        self.resumes = 0
        self.worker_kills: Counter[str] = Counter()  # Tune trial -> times its worker was killed
        self.checked: set[str] = set()
        self.log: list[str] = []
        self.start = time.monotonic()
        self.service = threading.Lock()  # held around mutating requests and around a service kill+restart
        self.watch = DriverWatch(lambda: list(self.specs))
        self.readers = Readers(self.client, lambda: list(self.specs), seed)

    def note(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.start:7.1f}s] {msg}"
        self.log.append(line)
        print(line, flush=True)

    def study_dir(self, sid: str) -> Path:
        return get_settings().study_dir(sid)

    # -- the API, tolerant of a service that is being restarted --------------------------------
    def state(self, sid: str) -> dict[str, Any] | None:
        try:
            r = self.client.get(f"/studies/{sid}")
        except httpx.TransportError:
            return None
        assert r.status_code == 200, r.text
        return dict(r.json())

    def mutate(self, path: str, ok: tuple[int, ...], **kw: Any) -> httpx.Response:
        """A POST while the service is up (a service kill waits for it); retried if the connection broke."""
        for _ in range(5):
            with self.service:
                try:
                    r = self.client.post(path, **kw)
                except httpx.TransportError:
                    continue
            assert r.status_code in ok, f"POST {path}: {r.status_code} {r.text[:500]}"
            return r
        raise AssertionError(f"POST {path}: no answer")

    # -- studies ---------------------------------------------------------------------------
    def submit_burst(self) -> str:
        """BURST concurrent submits with no study active: exactly CAP are accepted, the rest get 429."""
        n = len(self.specs)
        base = OPTUNA if n % 3 == 0 else GRID
        bodies = [base | {"name": f"chaos{n}-{j}"} for j in range(BURST)]
        answers: list[httpx.Response | None] = [None] * BURST
        barrier = threading.Barrier(BURST)

        def send(j: int) -> None:
            barrier.wait()
            answers[j] = self.client.post("/studies", json=bodies[j], timeout=120)

        with self.service:
            threads = [threading.Thread(target=send, args=(j,)) for j in range(BURST)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        codes = sorted(a.status_code for a in answers if a is not None)
        assert codes == [201] * CAP + [429] * (BURST - CAP), [(a.status_code, a.text[:300]) for a in answers if a]
        won = next(a for a in answers if a is not None and a.status_code == 201).json()
        self.specs[won["id"]] = StudySpec.model_validate(bodies[[b["name"] for b in bodies].index(won["name"])])
        self.events["submit_burst"] += 1
        self.note(f"burst of {BURST} submits: {codes}; study {won['id']} ({self.specs[won['id']].search.method})")
        return str(won["id"])

    def resume(self, sid: str) -> None:
        end = time.monotonic() + 120
        while True:
            with self.service:
                try:
                    r = self.client.post(f"/studies/{sid}/resume")
                except httpx.TransportError:
                    continue
            if r.status_code == 202:
                break
            # 409: the killed driver's lock is not released yet, or the study is no longer resumable
            assert r.status_code == 409 and time.monotonic() < end, f"resume of {sid}: {r.status_code} {r.text}"
            st = self.state(sid)
            if st and st["state"] not in ("failed", "interrupted", "cancelled"):
                break
            time.sleep(1)
        self.killed_driver.discard(sid)
        self.resumes += 1
        self.note(f"resumed {sid}")

    def settle(self) -> str:
        """The active study, after folding in what happened: a finished one is checked and the next submitted."""
        while True:
            if self.current is None:
                self.current = self.submit_burst()
            st = self.state(self.current)
            if st is None:
                time.sleep(0.5)
                continue
            if st["state"] == "finished":
                self.check_finished(self.current)
                self.current = None
                continue
            if st["state"] in ("failed", "interrupted"):
                if self.current not in self.killed_driver:
                    self.violations.append(f"{self.current} became {st['state']} without a driver kill: {st['error']}")
                self.note(f"{self.current} is {st['state']}: {str(st['error'])[:120]!r}")
                self.resume(self.current)
                continue
            return self.current

    def find(self, what: str, probe: Any, timeout: float = 400) -> Any:
        """Wait for ``probe(study_id)`` to find a target in the active study, moving on to new studies as they end."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            sid = self.settle()
            got = probe(sid)
            if got:
                return sid, got
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout}s")

    # -- events ----------------------------------------------------------------------------
    def kill_driver(self) -> None:
        sid, drv = self.find("live driver", lambda s: live_driver(self.study_dir(s), s))
        time.sleep(self.rng.uniform(0, 12))  # a random moment of its life: starting Ray, training, reporting
        if not drv.is_running() or self.current != sid:
            return self.kill_driver()
        seen = self.watch.descendants_of(drv.pid)
        kill_tree(drv.pid, seen)  # kill -9; then whatever of its local Ray outlived it
        self.killed_driver.add(sid)
        self.events["driver"] += 1
        self.note(f"kill -9 driver {drv.pid} of {sid} ({len(trial_lines(self.study_dir(sid)))} records)")

    def kill_worker(self) -> None:
        def workers(sid: str) -> list[Any]:
            drv = live_driver(self.study_dir(sid), sid)
            found = trial_workers(drv) if drv else []
            return [(p, t) for p, t in found if self.worker_kills[f"{sid}/{t}"] < MAX_FAILURES]

        sid, found = self.find("Ray worker running a trial", workers)
        time.sleep(self.rng.uniform(0, 4))
        # A reused worker (reuse_actors) may have moved on to another trial during the sleep: name its
        # trial again just before the kill, or a kill is counted against a trial it did not hit.
        found = workers(sid)
        if not found:
            return self.kill_worker()
        proc, trial = self.rng.choice(found)
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            return self.kill_worker()
        self.worker_kills[f"{sid}/{trial}"] += 1
        self.events["worker"] += 1
        self.note(f"kill -9 Ray worker {proc.pid} of {sid}, trial {trial}")

    def kill_service(self) -> None:
        with self.service:
            assert self.server.proc is not None
            pid = self.server.proc.pid
            self.server.proc.kill()
            self.server.proc.wait(30)
            t0 = time.monotonic()
            self.server.start()
        self.events["service"] += 1
        self.note(f"kill -9 service {pid}; restarted as {self.server.proc.pid} in {time.monotonic() - t0:.1f}s")
        r = self.client.get("/studies?limit=200")
        assert r.status_code == 200, r.text

    def cancel_then_resume(self) -> None:
        def running(sid: str) -> bool:  # some trials recorded, some still to run
            st = self.state(sid)
            progress = st["progress"] if st else {}
            return bool(st and st["state"] == "running" and 1 <= progress["done"] < progress["planned"])

        sid, _ = self.find("running study with a record", running)
        r = self.mutate(f"/studies/{sid}/cancel", (202, 409))
        if r.status_code == 409:  # it finished meanwhile
            return self.cancel_then_resume()
        got = wait_until(lambda: (st := self.state(sid)) and st["state"] in ("cancelled", "finished"), 300)
        assert got, f"{sid} not cancelled within 300s: {self.state(sid)}"
        st = self.state(sid) or {}
        self.note(f"cancel of {sid}: {st.get('state')}, {st.get('progress')}")
        if st.get("state") != "cancelled":  # it finished before the cancel reached its driver: try the next study
            return self.cancel_then_resume()
        self.resume(sid)
        self.events["cancel_resume"] += 1

    def service_killer(self, n: int, stop: threading.Event) -> None:
        """Kills the service ``n`` times at seeded random moments, alongside the other events."""
        rng = random.Random(self.seed + 1)
        try:
            for _ in range(n):
                if stop.wait(rng.uniform(10, 40)):
                    return
                self.kill_service()
                self.check()
        except BaseException as e:
            self.violations.append(f"service killer: {e!r}")

    # -- checks ----------------------------------------------------------------------------
    def check(self) -> None:
        """After every event: no 5xx, never two drivers, no study failed by anything but a driver kill."""
        assert not self.tally.server_errors, self.tally.server_errors
        assert not self.watch.violations, self.watch.violations
        assert not self.violations, self.violations

    def planned_keys(self, sid: str) -> set[str] | None:
        spec = self.specs[sid]
        return {cell_key(c) for c in grid_cells(spec)} if spec.search.method == "grid" else None

    def check_finished(self, sid: str) -> None:
        """Every planned trial once in the records, the MLflow child runs and the Optuna study; none RUNNING."""
        if sid in self.checked:
            return
        spec, d = self.specs[sid], self.study_dir(sid)
        raw = trial_lines(d)
        records = read_records(d / "trials.jsonl")
        keys = {r.trial_key for r in records}
        assert len(raw) == len(keys) == spec.planned_trials(), (sid, len(raw), sorted(keys))
        assert all(r.status in OUTCOMES for r in records), [(r.trial_key, r.status, r.error) for r in records]
        if (planned := self.planned_keys(sid)) is not None:
            assert keys == planned, (sid, keys ^ planned)
        ml = read_status(d)["mlflow"]
        runs = child_runs(ml["tracking_uri"], ml["experiment_id"], ml["run_id"])
        run_keys = Counter(r.data.tags["ladder.trial_key"] for r in runs)
        assert run_keys == Counter(keys), (sid, run_keys)
        ended = {r.data.tags["ladder.trial_key"]: r.info.status for r in runs}
        assert set(ended.values()) == {"FINISHED"}, (sid, ended)
        if spec.search.method == "optuna":
            study = optuna.load_study(study_name=sid, storage=get_settings().optuna_url)
            states = Counter(t.state.name for t in study.trials)
            assert states["RUNNING"] == 0, (sid, states)
            complete = [t for t in study.trials if t.state.name == "COMPLETE"]
            picked = Counter(k for t in complete for k in t.user_attrs.get("ladder.trial_keys", []))
            assert len(complete) == spec.search.n_trials, (sid, states)
            assert picked == Counter(keys), (sid, picked, keys)
        self.checked.add(sid)
        self.note(f"{sid} finished: {len(keys)} trials, each once in records, MLflow and Optuna")


@pytest.fixture
def chaos(data_dir: Path) -> Iterator[Chaos]:
    seed = int(os.environ.get("LADDER_CHAOS_SEED", "1"))
    run = Chaos(data_dir, seed)
    try:
        yield run
    finally:
        run.readers.stop.set()
        run.watch.stop.set()
        if run.server.proc is not None and run.server.proc.poll() is None:
            run.server.proc.kill()
            run.server.proc.wait(30)
        left = kill_ours(data_dir, run.watch.all_seen())
        print(f"teardown: killed {left} leftover process(es) of this run", flush=True)


def test_chaos(chaos: Chaos) -> None:
    c = chaos
    schedule = ["driver"] * KILLS + ["worker"] * KILLS
    c.rng.shuffle(schedule)
    schedule.insert(c.rng.randrange(len(schedule) // 2), "cancel_resume")
    load0 = os.getloadavg()
    c.note(f"seed {c.seed}; schedule {schedule}; service kills from seed {c.seed + 1}; load {load0}")
    c.server.start()
    c.readers.start()
    c.watch.start()
    stop = threading.Event()
    killer = threading.Thread(target=c.service_killer, args=(KILLS, stop), name="chaos-service-killer")
    killer.start()
    try:
        for i, event in enumerate(schedule):
            time.sleep(c.rng.uniform(0, 3))
            {"driver": c.kill_driver, "worker": c.kill_worker, "cancel_resume": c.cancel_then_resume}[event]()
            c.check()
            c.note(f"event {i + 1}/{len(schedule)} ({event}) survived")
        killer.join(timeout=600)
        assert not killer.is_alive(), "the service killer did not finish"
        # The last study runs to its end (resumed if its driver was the last thing killed).
        end = time.monotonic() + 600
        while c.current is not None and time.monotonic() < end:
            st = c.state(c.current)
            if st and st["state"] in ("failed", "interrupted"):
                c.settle()
            elif st and st["state"] == "finished":
                c.check_finished(c.current)
                c.current = None
            time.sleep(1)
        assert c.current is None, f"{c.current} did not finish: {c.state(c.current)}"
    finally:
        stop.set()
        killer.join(timeout=120)
    c.readers.stop.set()
    c.watch.stop.set()
    c.readers.join(30)
    c.check()
    for sid in c.specs:
        st = c.state(sid)
        assert st is not None and st["state"] == "finished", (sid, st)
        c.check_finished(sid)
    refused = sum(
        (c.study_dir(s) / "driver.log").read_text(errors="replace").count("another driver of study") for s in c.specs
    )
    figures = {
        "seed": c.seed,
        "events": dict(c.events),
        "studies": len(c.specs),
        "optuna_studies": sum(s.search.method == "optuna" for s in c.specs.values()),
        "trials": sum(s.planned_trials() for s in c.specs.values()),
        "resumes": c.resumes,
        "requests": c.tally.requests,
        "statuses": dict(sorted(c.tally.statuses.items())),
        "no_answer_while_down": c.tally.transport_errors,
        "5xx": len(c.tally.server_errors),
        "duplicate_drivers_refused": refused,
        "driver_watch_scans": c.watch.scans,
        "wall_s": round(time.monotonic() - c.start, 1),
        "load_start": load0,
        "load_end": os.getloadavg(),
    }
    c.note("figures " + json.dumps(figures))
    if out := os.environ.get("LADDER_CHAOS_FIGURES"):
        Path(out).write_text(json.dumps(figures, indent=2) + "\n")
    assert c.events["driver"] == c.events["worker"] == c.events["service"] == KILLS, c.events
