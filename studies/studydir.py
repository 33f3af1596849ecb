"""A study's directory: its spec, status file, trial records and driver log (one module for all).

The service and the driver share these files. Writes are atomic (temp file + rename) and
read-modify-writes of ``status.json`` hold a file lock, so two writers never lose each
other's fields; reads tolerate a missing, empty or half-written file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from studies.settings import Settings
from studies.spec import StudySpec

SPEC = "spec.json"
STATUS = "status.json"
RECORDS = "trials.jsonl"
DRIVER_LOG = "driver.log"
REPORT = "report"


Version = tuple[int, int, int]


def file_version(path: Path) -> Version:
    """(size, mtime ns, inode) of a file, (0, 0, 0) when it is missing: changes whenever it is written or replaced."""
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def write_text_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of either."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if missing), across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_status(study_dir: Path) -> dict[str, Any]:
    """The driver's status; ``{}`` when there is none yet or it cannot be read."""
    try:
        data = json.loads((study_dir / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_status(study_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the status file under its lock; returns the new status."""
    with file_lock(study_dir / f".{STATUS}.lock"):
        status = read_status(study_dir) | fields | {"updated": time.time()}
        write_json_atomic(study_dir / STATUS, status)
    return status


def new_study_id(spec: StudySpec) -> str:
    return f"{spec.name[:40].lower()}-{uuid.uuid4().hex[:8]}"


def prepare_study(spec: StudySpec, study_id: str | None = None, settings: Settings | None = None) -> str:
    """Create the study directory with its spec and a pending status; returns the study id."""
    if settings is None:
        from studies.settings import get_settings

        settings = get_settings()
    study_id = study_id or new_study_id(spec)
    d = settings.study_dir(study_id)
    d.mkdir(parents=True, exist_ok=True)
    write_text_atomic(d / SPEC, spec.to_json())
    if not (d / STATUS).exists():
        update_status(d, study_id=study_id, state="pending", planned_trials=spec.planned_trials())
    return study_id


def read_spec(study_dir: Path) -> StudySpec:
    return StudySpec.model_validate_json((study_dir / SPEC).read_text())


def log_tail(study_dir: Path, lines: int = 20, max_bytes: int = 16_384) -> str:
    """The last lines of the driver's log ('' without one): the reason a driver died."""
    try:
        with open(study_dir / DRIVER_LOG, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


DRIVER_LOCK = "driver.lock"
DRIVER_PID = "driver.pid"


@contextlib.contextmanager
def driver_lock(study_dir: Path, wait_s: float = 0.0) -> Iterator[bool]:
    """Held by the study's one driver for its whole life; yields False when another driver holds it.

    The kernel drops the lock when the holder dies (even by SIGKILL), so it is also the
    cheapest, surest probe of whether a local driver is alive. That probe takes the lock for
    an instant: a driver passes ``wait_s`` so that a probe at its start does not look like a
    second driver to it.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + wait_s
    with open(study_dir / DRIVER_LOCK, "a") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= end:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def driver_lock_held(study_dir: Path) -> bool:
    if not (study_dir / DRIVER_LOCK).exists():
        return False
    with driver_lock(study_dir) as got:
        return not got


def read_driver_pid(study_dir: Path) -> int | None:
    try:
        text = (study_dir / DRIVER_PID).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_driver_pid(study_dir: Path, pid: int) -> None:
    write_text_atomic(study_dir / DRIVER_PID, str(pid))


def write_exit(study_dir: Path, attempt: int, code: int, reason: str) -> None:
    """The driver's own account of how it ended, so any service process can report it (not only its parent)."""
    update_status(study_dir, exit={"attempt": attempt, "code": code, "reason": reason[-2000:], "at": time.time()})


def read_exit(study_dir: Path, attempt: int) -> dict[str, Any] | None:
    """The exit record attempt ``attempt``'s driver wrote on its way out; None when it wrote none (SIGKILL)."""
    record = read_status(study_dir).get("exit")
    return record if isinstance(record, dict) and record.get("attempt") == attempt else None


def publish_dir(tmp: Path, final: Path) -> Path:
    """Move a fully written directory into place (readers never see a half-written one); returns ``final``."""
    import shutil

    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final
