"""The study directory's driver lock: one driver per study, and a liveness probe that never turns one away."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from studies.studydir import driver_lock, driver_lock_held


def test_a_second_driver_is_refused_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    with driver_lock(tmp_path) as first:
        assert first
        assert driver_lock_held(tmp_path)
        with driver_lock(tmp_path, wait_s=0.2) as second:
            assert not second
    assert not driver_lock_held(tmp_path)


def test_a_driver_starting_while_the_service_probes_still_gets_the_lock(tmp_path: Path) -> None:
    """The probe holds the lock for an instant; a driver that waits a little is not taken for a duplicate."""
    probing = threading.Event()
    release = threading.Event()

    def probe() -> None:  # a liveness probe caught holding the lock (here, on purpose, for 0.3 s)
        with driver_lock(tmp_path) as got:
            assert got
            probing.set()
            release.wait(5)

    t = threading.Thread(target=probe)
    t.start()
    probing.wait(5)
    threading.Timer(0.3, release.set).start()
    start = time.monotonic()
    with driver_lock(tmp_path, wait_s=3.0) as mine:
        assert mine
        assert 0.2 < time.monotonic() - start < 3.0
    t.join(5)
