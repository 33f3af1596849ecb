"""Shared test setup: telemetry off, every test gets its own data directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["DO_NOT_TRACK"] = "1"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh LADDER_DATA_DIR with settings re-read from the environment."""
    from studies.settings import get_settings

    d = tmp_path / "data"
    monkeypatch.setenv("LADDER_DATA_DIR", str(d))
    for name in ("LADDER_MLFLOW_TRACKING_URI", "LADDER_OPTUNA_STORAGE", "LADDER_REGISTRY_URL", "LADDER_RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield d
    get_settings.cache_clear()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """Trials run one thread per CPU (as Ray gives them); two threads on a shared 2-core box crawl."""
    import torch

    torch.set_num_threads(1)
