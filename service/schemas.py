"""API schemas: one per job (after the FastAPI full-stack template)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorItem(BaseModel):
    loc: list[str | int] = Field(description="where the problem is, e.g. ['body', 'model', 'sizes', 0]")
    msg: str = Field(description="the rule that was broken, in words")
    type: str = Field(description="a machine-readable error code")


class ErrorBody(BaseModel):
    detail: list[ErrorItem]


class Progress(BaseModel):
    planned: int
    done: int
    running: int
    counts: dict[str, int] = {}


class Links(BaseModel):
    self: str
    trials: str
    frontier: str
    report: str
    mlflow_experiment: str | None = None
    mlflow_run: str | None = None
    ray_job: str | None = None


class StudyPublic(BaseModel):
    id: str
    name: str
    state: str = Field(description="launching | running | cancelling | finished | failed | cancelled | interrupted")
    created: float
    updated: float
    launcher: str
    attempts: int
    error: str | None = None
    progress: Progress
    frontier: dict[str, Any] = Field(
        default={},
        description="per kind and model size, the frontier so far: certainly and possibly solved points, "
        "[certain, possible] rungs, whether it is determined, undetermined cells",
    )
    mlflow: dict[str, str] = {}
    timings: dict[str, float] = Field(
        default={},
        description="where the latest driver's wall time went, in seconds: imports_s (process start and imports), "
        "startup_s (stores, MLflow parent run, Ray), fit_s (Ray Tune: every trial with its worker start, "
        "checkpoints and callbacks), outputs_s (report, plots, MLflow artifacts); set when a driver ends",
    )
    links: Links


class StudiesPublic(BaseModel):
    items: list[StudyPublic]
    total: int
    limit: int
    offset: int


class TrialsPublic(BaseModel):
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorBody} for c in (400, 401, 404, 409, 413, 415, 422, 429)}
LAUNCH_ERRORS = ERRORS | {503: {"model": ErrorBody, "description": "the driver could not be launched or asked"}}
