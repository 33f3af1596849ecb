"""Handing a pack's results to Ray Tune from a thread, so that training does not wait for the driver.

A function trainable's ``tune.report`` blocks until the driver has taken the result, run its
callbacks (trial records, MLflow, status) and asked the trainable for the next one: a round trip
through the driver per evaluation, during which the pack does not train (0.3-0.5 s per
quick-start pack of 8 evaluations on a 2-core box, docs/benchmarks.md). ``Reporter`` takes
results in order and reports them from its own thread, each with its checkpoint written there
from a state the trainer copied at that evaluation, so the trainer goes on at once.

What stays as it was: results reach Tune in the order they were made, each one with the
checkpoint of the same moment (a resume restores exactly what the synchronous report would
have restored, only later); at most ``depth`` results wait, so a stop reaches the trainer at
most that many evaluations late; an exception in the thread (Tune's graceful stop is a
``SystemExit(0)`` raised inside ``tune.report``) is raised again in the trainer at its next
report or at ``close``. Not for trials an early-stopping scheduler judges result by result
(ASHA never runs packs: ``workers.packing.max_members``).
"""

from __future__ import annotations

import queue
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ray import tune
from ray.tune import Checkpoint

DEPTH = 2  # results waiting at most: the trainer runs at most this many evaluations ahead of Tune
_POLL_S = 0.5  # how often a trainer waiting for room looks whether the thread has died


def report_now(result: dict[str, Any], state: dict[str, Any] | None, filename: str) -> None:
    """``tune.report`` of one result, with a checkpoint holding ``state`` (``torch.save``) when given."""
    if state is None:
        tune.report(result)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / filename)
        tune.report(result, checkpoint=Checkpoint.from_directory(d))


class Reporter:
    """Reports results to Tune in order from a daemon thread; ``put`` returns at once while there is room."""

    def __init__(
        self, filename: str, depth: int = DEPTH, send: Callable[[dict[str, Any], Any, str], None] = report_now
    ) -> None:
        self.filename, self.send = filename, send
        self.waiting: queue.Queue[tuple[dict[str, Any], dict[str, Any] | None] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="ladder-report", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.waiting.get()) is not None:
            try:
                self.send(*item, self.filename)
            except BaseException as e:  # SystemExit(0) is Tune stopping the trial: the trainer must stop too
                self.error = e
                return

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _offer(self, item: tuple[dict[str, Any], dict[str, Any] | None] | None) -> bool:
        """Queue ``item``, waiting for room while the thread lives; False once it has ended."""
        while self.thread.is_alive():
            try:
                self.waiting.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def put(self, result: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        """Queue one result (and the state to checkpoint with it: a copy the trainer no longer changes)."""
        self._check()
        if not self._offer((result, state)):
            self._check()
            raise RuntimeError("the reporting thread ended")

    def close(self) -> None:
        """Wait until every queued result is reported; raise what the thread raised, if anything."""
        self._offer(None)
        self.thread.join()
        self._check()
