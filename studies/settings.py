"""Settings from the environment (prefix ``LADDER_``), read once through ``get_settings()``.

The embedded default keeps everything under one data directory: SQLite for the registry,
Optuna and MLflow, Ray Tune results beside them. Scale-out changes only these settings.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (``127.0.0.1``, ``::1``, ``[::1]``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LADDER_", extra="ignore")

    data_dir: Path = Field(default=Path("ladder-data"), description="where studies, results and SQLite files live")
    mlflow_tracking_uri: str | None = Field(default=None, description="default: sqlite:///<data_dir>/mlflow.db")
    optuna_storage: str | None = Field(default=None, description="default: sqlite:///<data_dir>/optuna.db")
    registry_url: str | None = Field(default=None, description="default: sqlite:///<data_dir>/registry.db")
    ray_address: str | None = Field(default=None, description="a Ray cluster (Ray Jobs) address; unset: local Ray")
    storage_path: str | None = Field(default=None, description="Ray Tune results; default <data_dir>/ray_results")
    mlflow_ui_url: str | None = Field(default=None, description="base URL of the MLflow UI for deep links")
    ray_dashboard_url: str | None = Field(default=None, description="base URL of the Ray dashboard for job links")
    api_token: str | None = Field(default=None, description="bearer token for the API; required off loopback")
    auth_reads: bool = Field(default=False, description="require the token on read endpoints too")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="Host header values the API answers (comma-separated; '*.example.org' and '*' allowed); "
        "default: localhost names without a token, any host with one",
    )
    host: str = Field(default="127.0.0.1", description="address `ladder serve` listens on")
    port: int = Field(default=8000, ge=1, le=65535, description="port `ladder serve` listens on")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="largest accepted request body")
    max_trials_per_study: int = Field(default=2000, ge=1, description="cap on a study's planned trials")
    max_concurrent_studies: int = Field(default=4, ge=1, description="cap on studies running at once")
    cancel_grace_s: float = Field(default=15.0, gt=0, description="seconds a cancelled driver gets before SIGKILL")
    reuse_workers: bool = Field(
        default=True,
        description="run a study's Tune trials one after another in the same Ray worker processes "
        "(false: a new worker process per Tune trial, which costs an unpacked study about half its wall time)",
    )

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_list(cls, v: object) -> object:
        return [h.strip() for h in v.split(",") if h.strip()] if isinstance(v, str) else v

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()  # trials chdir: every path must be absolute

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.data_dir / 'mlflow.db'}"

    @property
    def optuna_url(self) -> str:
        return self.optuna_storage or f"sqlite:///{self.data_dir / 'optuna.db'}"

    @property
    def registry(self) -> str:
        return self.registry_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def tune_storage(self) -> str:
        return self.storage_path or str(self.data_dir / "ray_results")

    def study_dir(self, study_id: str) -> Path:
        return self.data_dir / "studies" / study_id


@lru_cache
def get_settings() -> Settings:
    s = Settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    return s
