"""The study's status file (``<study dir>/status.json``), written by the driver, read by everyone."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: readers never see half a file."""
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


def read_status(study_dir: Path) -> dict[str, Any]:
    p = study_dir / "status.json"
    return json.loads(p.read_text()) if p.exists() else {}


def update_status(study_dir: Path, **fields: Any) -> dict[str, Any]:
    status = read_status(study_dir) | fields | {"updated": time.time()}
    write_json(study_dir / "status.json", status)
    return status
