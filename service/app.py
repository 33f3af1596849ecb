"""The Ladder REST service: a thin, durable control plane over study drivers.

It stores studies, launches one driver per study (local process or Ray Job), tracks
them and serves reports. It never trains in its own process.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from service.docs_assets import serve_docs_offline
from service.launcher import Launcher, make_launcher
from service.registry import ACTIVE, TERMINAL, Registry, Study
from service.schemas import ErrorBody, Health, Links, Progress, StudiesPublic, StudyPublic, TrialsPublic
from studies.records import TrialRecord, read_records
from studies.settings import Settings, get_settings
from studies.spec import StudySpec, json_schema

log = logging.getLogger(__name__)

PLOTS = ("frontier.png", "frontier.svg", "solved_map.png", "accuracy.png", "budget.png")
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorBody} for c in (400, 401, 404, 409, 413, 415, 422, 429)}
LAUNCH_ERRORS = ERRORS | {503: {"model": ErrorBody, "description": "the driver could not be launched"}}
EXAMPLE_SPEC = {
    "name": "quick",
    "attention": ["dpa", "ea"],
    "task": {"ladder": [[[7, 2]], [[13, 2]], [[13, 4]]]},
    "model": {"sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}]},
    "training": {"max_steps": 600, "eval_interval": 100},
    "seeds": [0],
}


def _with(base: dict[int | str, dict[str, Any]], extra: dict[int | str, dict[str, Any]]) -> dict[int | str, Any]:
    return base | extra


def api_error(status: int, loc: list[str | int], msg: str, type_: str) -> HTTPException:
    return HTTPException(status, detail=[{"loc": loc, "msg": msg, "type": type_}])


# --- dependencies -------------------------------------------------------------------


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_launcher(request: Request) -> Launcher:
    return request.app.state.launcher


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


RegistryDep = Annotated[Registry, Depends(get_registry)]
LauncherDep = Annotated[Launcher, Depends(get_launcher)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def _check_token(request: Request, settings: Settings) -> None:
    if not settings.api_token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), settings.api_token.encode()):
        raise HTTPException(
            401,
            detail=[{"loc": ["header", "Authorization"], "msg": "a valid bearer token is required", "type": "auth"}],
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_token(request: Request, settings: SettingsDep) -> None:
    _check_token(request, settings)


def require_read_token(request: Request, settings: SettingsDep) -> None:
    if settings.auth_reads:
        _check_token(request, settings)


Writer = Annotated[None, Depends(require_token)]
Reader = Annotated[None, Depends(require_read_token)]


def study_dir(settings: Settings, study_id: str) -> Path:
    return settings.study_dir(study_id)


def read_status(settings: Settings, study_id: str) -> dict[str, Any]:
    p = study_dir(settings, study_id) / "status.json"
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except (OSError, ValueError):
        return {}  # being rewritten: the next read sees it


def sync(study: Study, registry: Registry, launcher: Launcher, settings: Settings) -> Study:
    """Fold the driver's own status into the registry; a vanished driver means interrupted."""
    if study.state not in ACTIVE:
        return study
    status = read_status(settings, study.id)
    driver_state = status.get("state")
    if study.state == "cancelling":
        if not launcher.is_alive(study.id, study.handle):
            return registry.update(study.id, state="cancelled") or study
        return study
    if driver_state in ("finished", "failed", "cancelled"):
        return registry.update(study.id, state=driver_state, error=status.get("error")) or study
    if not launcher.is_alive(study.id, study.handle):
        msg = f"the driver stopped without finishing; resume with POST /studies/{study.id}/resume"
        return registry.update(study.id, state="interrupted", error=msg) or study
    if driver_state == "running" and study.state == "pending":
        return registry.update(study.id, state="running") or study
    return study


def check_capacity(registry: Registry, launcher: Launcher, settings: Settings) -> None:
    """429 when starting one more driver would pass LADDER_MAX_CONCURRENT_STUDIES."""
    active = [s for s in registry.active() if sync(s, registry, launcher, settings).state in ACTIVE]
    if len(active) >= settings.max_concurrent_studies:
        raise api_error(
            429,
            [],
            f"{len(active)} studies are running, the limit is {settings.max_concurrent_studies} "
            "(LADDER_MAX_CONCURRENT_STUDIES); retry when one finishes",
            "limit",
        )


def get_study(study_id: str, registry: RegistryDep, launcher: LauncherDep, settings: SettingsDep) -> Study:
    """The one place a study lookup can 404."""
    # An id that cannot exist never reaches the database (PostgreSQL refuses NUL in text).
    study = registry.get(study_id) if len(study_id) <= 64 and "\x00" not in study_id else None
    if study is None:
        raise api_error(404, ["path", "study_id"], f"no study with id {study_id!r}", "not_found")
    return sync(study, registry, launcher, settings)


StudyDep = Annotated[Study, Depends(get_study)]


def public(study: Study, request: Request, settings: Settings) -> StudyPublic:
    status = read_status(settings, study.id)
    spec = StudySpec.model_validate_json(study.spec_json)
    base = str(request.url_for("get_study_route", study_id=study.id))
    ml = status.get("mlflow", {})
    ui = settings.mlflow_ui_url.rstrip("/") if settings.mlflow_ui_url else None
    links = Links(
        self=base,
        trials=f"{base}/trials",
        frontier=f"{base}/frontier",
        report=f"{base}/report",
        mlflow_experiment=f"{ui}/#/experiments/{ml['experiment_id']}" if ui and ml else None,
        mlflow_run=f"{ui}/#/experiments/{ml['experiment_id']}/runs/{ml['run_id']}" if ui and ml else None,
        ray_job=(
            f"{settings.ray_dashboard_url.rstrip('/')}/#/jobs/{study.handle}"
            if settings.ray_dashboard_url and study.launcher == "ray_job"
            else None
        ),
    )
    return StudyPublic(
        id=study.id,
        name=study.name,
        state=study.state,
        created=study.created,
        updated=study.updated,
        launcher=study.launcher,
        attempts=study.attempts,
        error=study.error,
        progress=Progress(
            planned=spec.planned_trials(),
            done=int(status.get("done", 0)),
            running=int(status.get("running", 0)) if study.state in ACTIVE else 0,
            counts=status.get("counts", {}),
        ),
        frontier=status.get("frontier", {}),
        mlflow={k: str(v) for k, v in ml.items()},
        links=links,
    )


# --- app ------------------------------------------------------------------------------


class BodyLimit(BaseHTTPMiddleware):
    """Refuses bodies over the configured size before they are parsed."""

    def __init__(self, app: Any, limit: int) -> None:
        super().__init__(app)
        self.limit = limit

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        length = request.headers.get("content-length")
        too_big = length is not None and (not length.isdigit() or int(length) > self.limit)
        if not too_big and request.method in ("POST", "PUT", "PATCH"):
            too_big = len(await request.body()) > self.limit
        if too_big:
            body = {"detail": [{"loc": ["body"], "msg": f"body larger than {self.limit} bytes", "type": "too_large"}]}
            return JSONResponse(body, status_code=413)
        return await call_next(request)


def reconcile(registry: Registry, launcher: Launcher, settings: Settings) -> None:
    """On start-up: studies whose driver is gone are marked interrupted (resumable)."""
    for study in registry.active():
        sync(study, registry, launcher, settings)


def create_app(settings: Settings | None = None, launcher: Launcher | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.registry.migrate()
        reconcile(app.state.registry, app.state.launcher, settings)
        yield

    app = FastAPI(
        title="Ladder",
        version="0.1.0",
        summary="Capacity-frontier studies: dot-product vs expressive attention, on Ray Tune, Optuna and MLflow.",
        lifespan=lifespan,
    )
    serve_docs_offline(app)
    app.state.settings = settings
    app.state.registry = Registry(settings.registry)
    app.state.launcher = launcher or make_launcher(settings)
    app.state.lock = threading.Lock()
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        items = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": items}, status_code=422)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException and the router's 404/405
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail: Any = exc.detail
        if not isinstance(detail, list):
            detail = [{"loc": [], "msg": str(detail), "type": "http_error"}]
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)

    _routes(app)
    _openapi(app)
    return app


def _parse_spec(body: bytes, content_type: str) -> StudySpec:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype not in ("application/json", "application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml", ""):
        raise api_error(415, ["header", "Content-Type"], f"send JSON or YAML, not {ctype!r}", "unsupported_media")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise api_error(400, ["body"], "the body must be UTF-8 text", "decode_error") from None
    try:
        data = json.loads(text) if ctype == "application/json" else StudySpec.parse_text(text)
    except (ValueError, yaml.YAMLError, RecursionError) as e:
        raise api_error(400, ["body"], f"cannot parse the spec: {str(e)[:500]}", "parse_error") from None
    if not isinstance(data, dict):
        raise api_error(422, ["body"], "a study spec must be an object (mapping)", "type_error")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as e:
        items = [
            {"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]}
            for e_ in e.errors(include_url=False, include_input=False)
        ]
        raise HTTPException(422, detail=items) from None


def _routes(app: FastAPI) -> None:
    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}}, tags=["ops"])
    def readyz(registry: RegistryDep, settings: SettingsDep) -> Any:
        """Readiness: the registry answers and the data directory is writable."""
        checks: dict[str, str] = {}
        try:
            registry.ping()
            checks["registry"] = "ok"
        except Exception as e:
            checks["registry"] = f"error: {type(e).__name__}"
        probe = settings.data_dir / f".ready-{uuid.uuid4().hex[:6]}"
        try:
            probe.write_text("ok")
            probe.unlink()
            checks["data_dir"] = "ok"
        except OSError as e:
            checks["data_dir"] = f"error: {e.strerror}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            Health(status="ok" if ok else "unavailable", checks=checks).model_dump(), 200 if ok else 503
        )

    @app.get("/schema/study", tags=["studies"])
    def schema() -> dict[str, Any]:
        """The study spec's JSON Schema."""
        return json_schema()

    @app.post(
        "/studies",
        status_code=201,
        response_model=StudyPublic,
        responses=_with(LAUNCH_ERRORS, {200: {"model": StudyPublic, "description": "an existing study with this key"}}),
        tags=["studies"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/StudySpec"},
                        "example": EXAMPLE_SPEC,
                    },
                    "application/yaml": {"schema": {"type": "string"}},
                },
            },
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 200},
                    "description": "repeat a submission safely: the same key returns the same study",
                }
            ],
        },
    )
    async def create_study(
        request: Request,
        response: Response,
        _: Writer,
        registry: RegistryDep,
        launcher: LauncherDep,
        settings: SettingsDep,
    ) -> StudyPublic:
        """Submit a study (JSON or YAML spec); it starts at once."""
        key = request.headers.get("idempotency-key")
        if key is not None and not (0 < len(key) <= 200):
            raise api_error(422, ["header", "Idempotency-Key"], "must be 1 to 200 characters", "value_error")
        spec = _parse_spec(await request.body(), request.headers.get("content-type", "application/json"))
        if spec.planned_trials() > settings.max_trials_per_study:
            raise api_error(
                422,
                ["body", "caps", "max_trials"],
                f"the study plans {spec.planned_trials()} trials; this service allows at most "
                f"{settings.max_trials_per_study} per study (LADDER_MAX_TRIALS_PER_STUDY)",
                "limit",
            )
        with app.state.lock:
            if key is not None and (existing := registry.by_idempotency_key(key)) is not None:
                if existing.spec_json != spec.to_json():
                    raise api_error(
                        409, ["header", "Idempotency-Key"], "key already used for a different spec", "conflict"
                    )
                response.status_code = 200
                return public(existing, request, settings)
            check_capacity(registry, launcher, settings)
            from workers.driver import new_study_id, prepare_study

            study_id = new_study_id(spec)
            prepare_study(spec, study_id, settings)
            now = time.time()
            study = registry.add(
                Study(
                    id=study_id,
                    name=spec.name,
                    spec_json=spec.to_json(),
                    state="pending",
                    created=now,
                    updated=now,
                    idempotency_key=key,
                    launcher=launcher.kind,
                    attempts=0,
                )
            )
            try:
                handle = launcher.launch(study_id, resume=False, attempt=0)
            except Exception as e:
                log.exception("launch of %s failed", study_id)
                registry.update(study_id, state="failed", error=f"launch failed: {e}")
                raise api_error(503, [], f"could not launch the study driver: {e}", "launch_failed") from None
            study = registry.update(study_id, handle=handle) or study
        response.headers["Location"] = str(request.url_for("get_study_route", study_id=study_id))
        return public(study, request, settings)

    @app.get("/studies", response_model=StudiesPublic, responses=ERRORS, tags=["studies"])
    def list_studies(
        request: Request,
        _: Reader,
        registry: RegistryDep,
        launcher: LauncherDep,
        settings: SettingsDep,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        state: Annotated[
            Literal["pending", "running", "cancelling", "finished", "failed", "cancelled", "interrupted"] | None,
            Query(),
        ] = None,
    ) -> StudiesPublic:
        """Studies, newest first, with paging and a state filter."""
        for s in registry.active():
            sync(s, registry, launcher, settings)
        rows, total = registry.page(limit, offset, state)
        return StudiesPublic(
            items=[public(s, request, settings) for s in rows], total=total, limit=limit, offset=offset
        )

    @app.get(
        "/studies/{study_id}", response_model=StudyPublic, responses=ERRORS, tags=["studies"], name="get_study_route"
    )
    def get_study_route(request: Request, _: Reader, study: StudyDep, settings: SettingsDep) -> StudyPublic:
        """A study: state, progress, the frontier so far and links (MLflow, Ray job)."""
        return public(study, request, settings)

    @app.post(
        "/studies/{study_id}/cancel", status_code=202, response_model=StudyPublic, responses=ERRORS, tags=["studies"]
    )
    def cancel_study(
        request: Request,
        _: Writer,
        study: StudyDep,
        registry: RegistryDep,
        launcher: LauncherDep,
        settings: SettingsDep,
    ) -> StudyPublic:
        """Stop a running study; finished trials stay in MLflow and the report."""
        if study.state not in ("pending", "running"):
            raise api_error(
                409, ["path", "study_id"], f"study is {study.state}, only a running study can be cancelled", "conflict"
            )
        study = registry.update(study.id, state="cancelling") or study

        def stop(study_id: str, handle: str | None) -> None:
            launcher.cancel(study_id, handle)
            with app.state.lock:  # a resume (or delete) may have overtaken this stop: never clobber it
                current = registry.get(study_id)
                if current is None or current.handle != handle or current.state not in ("cancelling", "cancelled"):
                    return
                registry.update(study_id, state="cancelled")
                status = read_status(settings, study_id)
                if status.get("state") not in ("cancelled", "finished", "failed"):
                    from workers.driver import update_status

                    update_status(settings.study_dir(study_id), state="cancelled", running=0)

        threading.Thread(target=stop, args=(study.id, study.handle), daemon=True).start()
        return public(study, request, settings)

    @app.post(
        "/studies/{study_id}/resume",
        status_code=202,
        response_model=StudyPublic,
        responses=LAUNCH_ERRORS,
        tags=["studies"],
    )
    def resume_study(
        request: Request,
        _: Writer,
        study: StudyDep,
        registry: RegistryDep,
        launcher: LauncherDep,
        settings: SettingsDep,
    ) -> StudyPublic:
        """Resume an interrupted, failed or cancelled study exactly where it stopped."""
        with app.state.lock:  # one resume wins; the others see it pending
            study = registry.get(study.id) or study
            if study.state not in ("interrupted", "failed", "cancelled"):
                raise api_error(
                    409,
                    ["path", "study_id"],
                    f"study is {study.state}; only interrupted, failed or cancelled studies can be resumed",
                    "conflict",
                )
            check_capacity(registry, launcher, settings)
            attempt = study.attempts + 1
            from workers.driver import update_status

            # The last attempt's terminal state must not be read back as this attempt's (see sync).
            update_status(settings.study_dir(study.id), state="pending", error=None, running=0)
            try:
                handle = launcher.launch(study.id, resume=True, attempt=attempt)
            except Exception as e:
                log.exception("resume of %s failed", study.id)
                raise api_error(503, [], f"could not launch the study driver: {e}", "launch_failed") from None
            study = registry.update(study.id, state="pending", handle=handle, attempts=attempt, error=None) or study
        return public(study, request, settings)

    @app.delete("/studies/{study_id}", status_code=204, responses=ERRORS, tags=["studies"])
    def delete_study(_: Writer, study: StudyDep, registry: RegistryDep, settings: SettingsDep) -> Response:
        """Delete a finished, failed, cancelled or interrupted study and its files (MLflow runs stay)."""
        if study.state not in TERMINAL:
            raise api_error(409, ["path", "study_id"], f"study is {study.state}; cancel it first", "conflict")
        registry.delete(study.id)
        shutil.rmtree(settings.study_dir(study.id), ignore_errors=True)
        return Response(status_code=204)

    @app.get(
        "/studies/{study_id}/trials",
        response_model=TrialsPublic,
        responses=_with(ERRORS, {200: {"content": {"text/csv": {}}}}),
        tags=["results"],
    )
    def list_trials(
        request: Request,
        _: Reader,
        study: StudyDep,
        settings: SettingsDep,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        status: Annotated[str | None, Query(max_length=20)] = None,
        kind: Annotated[str | None, Query(max_length=50)] = None,
        point: Annotated[str | None, Query(max_length=500)] = None,
        format: Annotated[Literal["json", "csv"], Query()] = "json",
    ) -> Any:
        """Finished trials with paging and filters; ``format=csv`` (or Accept: text/csv) exports CSV."""
        records = read_records(settings.study_dir(study.id) / "trials.jsonl")
        rows = [
            r
            for r in records
            if (status is None or r.status == status)
            and (kind is None or r.kind == kind)
            and (point is None or r.point == point)
        ]
        page = [r.model_dump(mode="json") for r in rows[offset : offset + limit]]
        if format == "csv" or "text/csv" in request.headers.get("accept", ""):
            return Response(
                _csv(page),
                media_type="text/csv",
                headers={"Content-Disposition": f'attachment; filename="{study.id}-trials.csv"'},
            )
        return TrialsPublic(items=page, total=len(rows), limit=limit, offset=offset)

    @app.get("/studies/{study_id}/frontier", responses=ERRORS, tags=["results"])
    def frontier(_: Reader, study: StudyDep, settings: SettingsDep) -> Response:
        """The capacity-frontier report (JSON, versioned schema); partial while the study runs."""
        from studies.report import build_report, report_json

        spec = StudySpec.model_validate_json(study.spec_json)
        records = read_records(settings.study_dir(study.id) / "trials.jsonl")
        report = build_report(spec, records, {"study_id": study.id, "state": study.state})
        return Response(report_json(report), media_type="application/json")

    @app.get(
        "/studies/{study_id}/report",
        responses=_with(ERRORS, {200: {"content": {"text/html": {"schema": {"type": "string"}}}}}),
        tags=["results"],
    )
    def report_html(_: Reader, study: StudyDep, settings: SettingsDep) -> HTMLResponse:
        """The HTML report (self-contained: plots embedded)."""
        out = _ensure_report(study, settings)
        return HTMLResponse((out / "report.html").read_text())

    @app.get(
        "/studies/{study_id}/plots/{name}",
        responses=_with(ERRORS, {200: {"content": {"image/png": {}, "image/svg+xml": {}}}}),
        tags=["results"],
    )
    def plot(_: Reader, study: StudyDep, settings: SettingsDep, name: str) -> FileResponse:
        """A report plot: frontier.png, frontier.svg, solved_map.png, accuracy.png or budget.png."""
        if name not in PLOTS:
            raise api_error(404, ["path", "name"], f"no plot {name!r}; plots: {', '.join(PLOTS)}", "not_found")
        out = _ensure_report(study, settings)
        return FileResponse(out / name, media_type="image/svg+xml" if name.endswith(".svg") else "image/png")


def _ensure_report(study: Study, settings: Settings) -> Path:
    """Write the report unless an up-to-date one exists (newer than the trial records)."""
    from studies.report_html import write_report

    d = settings.study_dir(study.id)
    out = d / "report"
    trials = d / "trials.jsonl"
    html = out / "report.html"
    fresh = html.exists() and (not trials.exists() or html.stat().st_mtime >= trials.stat().st_mtime)
    if not fresh or study.state in ACTIVE:
        spec = StudySpec.model_validate_json(study.spec_json)
        write_report(spec, read_records(trials), out, {"study_id": study.id, "state": study.state})
    return out


def _csv(rows: list[dict[str, Any]]) -> str:
    cols = list(TrialRecord.model_fields)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()})
    return buf.getvalue()


def _openapi(app: FastAPI) -> None:
    """Publish the study spec's schema in the OpenAPI components (the body is parsed by hand for YAML)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        spec_schema = StudySpec.model_json_schema(ref_template="#/components/schemas/{model}")
        defs = spec_schema.pop("$defs", {})
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.update(defs)
        comps["StudySpec"] = spec_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
