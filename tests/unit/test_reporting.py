"""The pack trainable's reporting thread (``workers.reporting.Reporter``): order, no waiting, errors, stop."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from workers.reporting import Reporter


class SlowTune:
    """Stands in for ``tune.report``'s round trip: each send waits until the test lets the driver answer."""

    def __init__(self, fail_at: int | None = None, exc: BaseException | None = None) -> None:
        self.sent: list[tuple[int, Any]] = []
        self.answer = threading.Semaphore(0)
        self.fail_at, self.exc = fail_at, exc

    def send(self, result: dict[str, Any], state: Any, filename: str) -> None:
        assert filename == "pack.pt"
        self.answer.acquire()
        if result["n"] == self.fail_at:
            assert self.exc is not None
            raise self.exc
        self.sent.append((result["n"], state))


def test_put_does_not_wait_for_the_driver_and_order_is_kept() -> None:
    tune = SlowTune()
    rep = Reporter("pack.pt", depth=2, send=tune.send)
    # one result is in the thread's hands, two wait: these puts return with no answer given yet
    for n in range(3):
        rep.put({"n": n}, {"state": n} if n % 2 else None)
    assert tune.sent == []
    blocked = threading.Thread(target=rep.put, args=({"n": 3},))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()  # no room: the trainer waits until Tune has taken one
    tune.answer.release()
    blocked.join(60)  # returns as soon as the put is done; generous for a loaded machine
    assert not blocked.is_alive()
    for _ in range(4):
        tune.answer.release()
    rep.close()  # waits for everything queued
    assert tune.sent == [(0, None), (1, {"state": 1}), (2, None), (3, None)]


def test_an_error_in_the_thread_is_raised_in_the_trainer() -> None:
    tune = SlowTune(fail_at=1, exc=OSError("storage gone"))
    rep = Reporter("pack.pt", depth=1, send=tune.send)
    for _ in range(3):
        tune.answer.release()
    rep.put({"n": 0})
    rep.put({"n": 1})
    rep.thread.join(60)
    with pytest.raises(OSError, match="storage gone"):
        rep.put({"n": 2})
    with pytest.raises(OSError, match="storage gone"):
        rep.close()
    assert tune.sent == [(0, None)]


def test_tune_stopping_the_trial_stops_the_trainer() -> None:
    """Tune's graceful stop is SystemExit(0) inside tune.report; the trainer gets it too (Tune's runner
    thread treats it as a clean end), even when it is blocked waiting for room."""
    tune = SlowTune(fail_at=0, exc=SystemExit(0))
    rep = Reporter("pack.pt", depth=1, send=tune.send)
    rep.put({"n": 0})
    rep.put({"n": 1})  # waits in the queue
    got: list[BaseException] = []

    def trainer() -> None:
        try:
            rep.put({"n": 2})  # no room until the thread dies
        except BaseException as e:
            got.append(e)

    t = threading.Thread(target=trainer)
    t.start()
    tune.answer.release()
    t.join(60)
    assert not t.is_alive()
    assert len(got) == 1 and isinstance(got[0], SystemExit) and got[0].code == 0
    with pytest.raises(SystemExit):
        rep.close()
