"""Service fixtures: the app on a fresh registry (SQLite file or a fresh PostgreSQL database).

Every test gets its own data directory and registry; whatever drivers a test launched are
stopped at teardown (and a leak is reported as a warning).
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.main import create_app
from studies.settings import Settings
from tests.service import Service, stop_leftovers

# The local server (trust auth); override for another one.
POSTGRES = os.environ.get("LADDER_TEST_POSTGRES", "host=127.0.0.1 port=5432 user=postgres")


def hermetic_settings(data_dir: Path, registry_url: str, **overrides: Any) -> Settings:
    """Settings that depend on nothing in the environment: every URL and limit is explicit."""
    base: dict[str, Any] = {
        "data_dir": data_dir,
        "registry_url": registry_url,
        "mlflow_tracking_uri": None,
        "optuna_storage": None,
        "ray_address": None,
        "storage_path": None,
        "mlflow_ui_url": None,
        "ray_dashboard_url": None,
        "api_token": None,
        "auth_reads": False,
        "max_body_bytes": 1_000_000,
        "max_trials_per_study": 2000,
        "max_concurrent_studies": 4,
        "cancel_grace_s": 3.0,
        "allowed_hosts": [
            "testserver",
            "localhost",
            "127.0.0.1",
        ],  # drivers in these tests have nothing worth a longer grace
    }
    return Settings(**(base | overrides))


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database; dropped (connections and all) afterwards."""
    name = f"ladder_test_{uuid.uuid4().hex}"
    with psycopg.connect(f"{POSTGRES} dbname=postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        info = psycopg.conninfo.conninfo_to_dict(POSTGRES)
        host, port, user = info.get("host", "127.0.0.1"), info.get("port", "5432"), info.get("user", "postgres")
        yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES} dbname=postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The registry database: a SQLite file under tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
    else:
        with postgres_database() as url:
            yield url


OpenService = Callable[..., AbstractContextManager[Service]]


@pytest.fixture
def open_service(data_dir: Path, registry_url: str) -> Iterator[OpenService]:
    """Opens the app (lifespan and all) on this test's registry and data dir; Settings overrides as kwargs.

    Several apps may be opened in turn on the same registry (a restart); at teardown every
    study they left active is stopped and every driver process group is reaped.
    """
    apps: list[FastAPI] = []

    @contextmanager
    def open_(**overrides: Any) -> Iterator[Service]:
        settings = hermetic_settings(data_dir, registry_url, **overrides)
        app = create_app(settings)
        apps.append(app)
        with TestClient(app) as client:
            yield Service(settings, app, client)

    yield open_
    leaks: list[str] = []
    for app in apps:
        leaks += stop_leftovers(app.state.registry, app.state.settings, app.state.launcher)
        app.state.registry.engine.dispose()
    if leaks:
        warnings.warn(f"stopped after the test: {leaks}", stacklevel=1)


@pytest.fixture
def svc(open_service: OpenService) -> Iterator[Service]:
    """The app with default (hermetic) settings."""
    with open_service() as s:
        yield s
