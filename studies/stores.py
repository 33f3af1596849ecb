"""The shared stores (MLflow, Optuna) initialised once, under a lock, before any driver uses them.

Several processes that open one fresh SQLite store at once race on its schema migration
(MLflow: ``duplicate column name: step``). The service runs this at start-up and every
driver runs it before it starts; the lock makes the first one do the work and the others wait.
"""

from __future__ import annotations

import threading

from studies.settings import Settings
from studies.studydir import file_lock

_ready: set[tuple[str, str]] = set()  # stores this process initialised already
_lock = threading.Lock()


def init_stores(settings: Settings) -> None:
    """Create (or migrate) the MLflow and Optuna stores; idempotent and safe across processes."""
    key = (settings.mlflow_uri, settings.optuna_url)
    if key in _ready:
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with _lock, file_lock(settings.data_dir / ".stores.lock"):
        from mlflow.tracking import MlflowClient

        MlflowClient(settings.mlflow_uri).search_experiments(max_results=1)  # creates and migrates the store
        import optuna

        optuna.storages.RDBStorage(settings.optuna_url)  # creates its tables
    _ready.add(key)
