"""The service's watch over its drivers: folds each driver's report (or its death) into the lifecycle.

One loop per service process asks every active study's driver whether it lives and reads
its status file; a verdict becomes a lifecycle transition (compare-and-set, so several
service processes may watch the same registry). Cancels are sent from here too, and a
``cancelling`` study found on start-up has its cancel sent again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from service import lifecycle
from service.launcher import Launcher, Liveness
from service.lifecycle import ACTIVE, DRIVER_VERDICTS, TERMINAL, Actor, Refused
from service.registry import Registry, Study
from studies.settings import Settings
from studies.studydir import log_tail, read_exit, read_status, update_status

log = logging.getLogger(__name__)

LAUNCH_GRACE_S = 30.0  # a launch in flight may not have a driver process yet


def died_reason(study: Study, launcher: Launcher, settings: Settings) -> str:
    d = settings.study_dir(study.id)
    code = launcher.exit_code(study.id, study.handle)
    own = read_exit(d, study.attempts)  # what the driver wrote on its way out: any service process can read it
    if own is not None:
        said = f"exited with code {own['code'] if code is None else code} ({own['reason']})"
    elif code is not None:
        said = f"exited with code {code}"
    else:
        said = "was killed (SIGKILL, out of memory or a lost machine: it wrote no exit record)"
    tail = log_tail(d, lines=15)
    msg = f"the driver {said} without reporting a result; resume with POST /studies/{study.id}/resume"
    return msg + (f"\nlast lines of driver.log:\n{tail}" if tail else "")


class Supervisor:
    """Reconciles active studies with their drivers; sends cancels (again after a restart)."""

    def __init__(self, registry: Registry, launcher: Launcher, settings: Settings) -> None:
        self.registry, self.launcher, self.settings = registry, launcher, settings
        self._stopping: set[str] = set()  # studies with a cancel in flight from this process
        self._launching: set[str] = set()  # studies this process is launching right now
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- cancel ---------------------------------------------------------------------------
    def send_cancel(self, study: Study) -> None:
        """Stop the study's driver in the background (SIGTERM, grace, SIGKILL); once per process."""
        with self._lock:
            if study.id in self._stopping:
                return
            self._stopping.add(study.id)
            t = threading.Thread(target=self._stop, args=(study.id, study.handle), name=f"stop-{study.id}", daemon=True)
            self._threads.append(t)
        t.start()

    def _stop(self, study_id: str, handle: str | None) -> None:
        try:
            self.launcher.cancel(study_id, handle)
        except Exception:
            log.exception("cancel of %s failed; the next reconcile sends it again", study_id)
        finally:
            with self._lock:
                self._stopping.discard(study_id)
        study = self.registry.get(study_id)
        # A reconcile that saw the driver dead may have ended the cancel meanwhile ("cancelled"): the
        # driver's status file is still this cancel's to settle. A resume or delete overtook it otherwise.
        if study is None or study.state not in ("cancelling", "cancelled") or study.handle != handle:
            return
        d = self.settings.study_dir(study_id)
        if self.launcher.liveness(study_id, handle) is Liveness.DEAD and read_status(d).get("state") not in TERMINAL:
            update_status(d, state="cancelled", running=0)  # killed before it could say so itself
        self.reconcile(study)

    def join(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, end - time.monotonic()))

    # -- launch -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def launching(self, study_id: str) -> Iterator[None]:
        """While a request launches the study's driver, no reconcile judges it by its (missing) process."""
        with self._lock:
            self._launching.add(study_id)
        try:
            yield
        finally:
            with self._lock:
                self._launching.discard(study_id)

    # -- reconcile ------------------------------------------------------------------------
    def reconcile_all(self) -> None:
        for study in self.registry.in_states(ACTIVE):
            try:
                self.reconcile(study)
            except Exception:  # one study's trouble must not stop the watch over the others
                log.exception("reconcile of %s failed", study.id)

    def reconcile(self, study: Study) -> Study:
        """Fold the driver's report or death into the study's state; returns the study as it now is."""
        if study.state not in ACTIVE or study.id in self._launching:
            return study
        live = self.launcher.liveness(study.id, study.handle)
        if live is Liveness.UNKNOWN:  # no verdict from an error: ask again next time
            return study
        status = read_status(self.settings.study_dir(study.id))
        mine = status.get("attempt", 0) == study.attempts  # a report of this attempt, not an older one
        reported = status.get("state") if mine else None
        try:
            if live is Liveness.ALIVE:
                if study.state == "cancelling":
                    self.send_cancel(study)
                elif study.state == "launching" and reported in ("running", *DRIVER_VERDICTS):
                    return lifecycle.transition(self.registry, study.id, "start", Actor.RECONCILER)
                return study
            # The driver is gone.
            if reported in DRIVER_VERDICTS:
                verdict = DRIVER_VERDICTS[str(reported)]
                if study.state == "cancelling" and verdict == "interrupt":
                    verdict = "cancelled"
                return lifecycle.transition(
                    self.registry, study.id, verdict, Actor.RECONCILER, error=status.get("error")
                )
            if study.state == "cancelling":
                return lifecycle.transition(self.registry, study.id, "cancelled", Actor.RECONCILER)
            if study.state == "launching" and time.time() - study.updated < LAUNCH_GRACE_S:
                return study  # the launch may still be on its way
            if study.state == "launching" and reported in (None, "pending") and study.error is None:
                # The service died before the driver started: launch it again, once, from the handle.
                study = lifecycle.transition(
                    self.registry, study.id, "relaunch", Actor.RECONCILER, error="relaunched after a lost launch"
                )
                self.launcher.launch(study.id, study.handle or "", study.attempts > 0, study.attempts)
                return study
            reason = died_reason(study, self.launcher, self.settings)
            return lifecycle.transition(self.registry, study.id, "fail", Actor.RECONCILER, error=reason)
        except Refused:  # another process (or request) moved it first
            return self.registry.get(study.id) or study
