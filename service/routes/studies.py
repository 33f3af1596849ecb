"""Studies: submit, list, get, cancel, resume, delete; the spec's schema.

Routes stay thin: parsing and checks, then one lifecycle transition; the work that blocks
(validation, the database, files, launching) runs in the thread pool, never on the loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from service import lifecycle
from service.deps import (
    LauncherDep,
    Reader,
    RegistryDep,
    SettingsDep,
    StudyDep,
    SupervisorDep,
    Writer,
    api_error,
)
from service.launcher import Launcher, Liveness
from service.lifecycle import STATES, Actor, AtCapacity, KeyTaken, WrongState
from service.registry import Registry, Study
from service.schemas import ERRORS, LAUNCH_ERRORS, StudiesPublic, StudyPublic
from service.supervisor import Supervisor
from service.views import study_public
from studies.settings import Settings
from studies.spec import StudySpec, json_schema
from studies.studydir import new_study_id, prepare_study, update_status

log = logging.getLogger(__name__)
router = APIRouter(tags=["studies"])

JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
EXAMPLE_SPEC = {
    "name": "quick",
    "attention": ["dpa", "ea"],
    "task": {"ladder": [[[7, 2]], [[13, 2]], [[13, 4]]]},
    "model": {"sizes": [{"d_model": 16, "n_layers": 1, "n_heads": 2}]},
    "training": {"max_steps": 600, "eval_interval": 100},
    "seeds": [0],
}


def _base(request: Request, study_id: str) -> str:
    return str(request.url_for("get_study_route", study_id=study_id))


def _capacity_error(e: AtCapacity) -> HTTPException:
    return api_error(
        429,
        [],
        f"{e.active} studies are active, the limit is {e.cap} (LADDER_MAX_CONCURRENT_STUDIES); retry when one finishes",
        "limit",
        headers={"Retry-After": "10"},
    )


def _conflict(e: WrongState, rule: str) -> HTTPException:
    state = e.current.state if e.current else "gone"
    return api_error(409, ["path", "study_id"], f"study is {state}; {rule}", "conflict")


def parse_spec(body: bytes, ctype: str) -> StudySpec:
    """The spec from a JSON or YAML body; 400 when it cannot be read, 422 at the field that is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise api_error(400, ["body"], "the body must be UTF-8 text", "decode_error") from None
    try:
        data = json.loads(text) if ctype in JSON_TYPES else StudySpec.parse_text(text)
    except (ValueError, yaml.YAMLError, RecursionError) as e:
        raise api_error(400, ["body"], f"cannot parse the spec: {str(e)[:500]}", "parse_error") from None
    if not isinstance(data, dict):
        raise api_error(422, ["body"], "a study spec must be an object (mapping)", "type_error")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as e:
        items = [
            {"loc": ["body", *err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in e.errors(include_url=False, include_input=False)
        ]
        raise HTTPException(422, detail=items) from None


def _init_stores(settings: Settings) -> None:
    """Before any driver: drivers must not race on a fresh store's schema (once per store, under a file lock)."""
    from studies.stores import init_stores

    try:
        init_stores(settings)
    except Exception as e:
        log.exception("initialising the stores failed")
        raise api_error(503, [], f"could not initialise the MLflow/Optuna stores: {e}", "stores") from None


def _launch(registry: Registry, supervisor: Supervisor, study: Study, resume: bool) -> Study:
    try:
        with supervisor.launching(study.id):
            supervisor.launcher.launch(study.id, study.handle or "", resume, study.attempts)
    except Exception as e:
        log.exception("launch of %s failed", study.id)
        lifecycle.transition(registry, study.id, "fail", Actor.API, error=f"launch failed: {e}")
        raise api_error(503, [], f"could not launch the study driver: {e}", "launch_failed") from None
    return study


def _create(
    body: bytes, ctype: str, key: str | None, registry: Registry, supervisor: Supervisor, settings: Settings
) -> tuple[int, Study]:
    launcher = supervisor.launcher
    spec = parse_spec(body, ctype)
    planned = spec.planned_trials()
    if planned > settings.max_trials_per_study:
        raise api_error(
            422,
            ["body", "caps", "max_trials"],
            f"the study plans {planned} trials; this service allows at most "
            f"{settings.max_trials_per_study} per study (LADDER_MAX_TRIALS_PER_STUDY)",
            "limit",
        )
    spec_json = spec.to_json()

    def replay(existing: Study) -> tuple[int, Study]:
        if existing.spec_json != spec_json:
            raise api_error(409, ["header", "Idempotency-Key"], "key already used for a different spec", "conflict")
        return 200, existing

    if key is not None and (existing := registry.by_idempotency_key(key)) is not None:
        return replay(existing)
    _init_stores(settings)
    study_id = new_study_id(spec)
    prepare_study(spec, study_id, settings)
    now = time.time()
    row = Study(
        id=study_id,
        name=spec.name,
        spec_json=spec_json,
        created=now,
        updated=now,
        idempotency_key=key,
        launcher=launcher.kind,
        handle=launcher.handle(study_id, 0),  # known before the launch, written with the new row
        attempts=0,
        planned=planned,
        cancel_requested=False,
    )
    try:
        study = lifecycle.create(registry, row, settings.max_concurrent_studies)
    except KeyTaken as e:  # another request with this key won the race: the database decided
        shutil.rmtree(settings.study_dir(study_id), ignore_errors=True)
        return replay(e.existing)
    except AtCapacity as e:
        shutil.rmtree(settings.study_dir(study_id), ignore_errors=True)
        raise _capacity_error(e) from None
    return 201, _launch(registry, supervisor, study, resume=False)


@router.get("/schema/study")
async def schema() -> dict[str, Any]:
    """The study spec's JSON Schema."""
    return json_schema()


@router.post(
    "/studies",
    status_code=201,
    response_model=StudyPublic,
    responses=LAUNCH_ERRORS | {200: {"model": StudyPublic, "description": "an existing study with this key"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/StudySpec"}, "example": EXAMPLE_SPEC},
                "application/yaml": {"schema": {"type": "string"}},
            },
        },
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 200},
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
    supervisor: SupervisorDep,
    settings: SettingsDep,
) -> StudyPublic:
    """Submit a study (JSON or YAML spec, by Content-Type); it starts at once."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in JSON_TYPES + YAML_TYPES:
        raise api_error(
            415,
            ["header", "Content-Type"],
            f"send the spec as application/json or application/yaml, not {ctype or 'no Content-Type'!r}",
            "unsupported_media",
        )
    key = request.headers.get("idempotency-key")
    if key is not None and not (0 < len(key) <= 200):
        raise api_error(422, ["header", "Idempotency-Key"], "must be 1 to 200 characters", "value_error")
    body = await request.body()  # bounded by the body-limit middleware
    status, study = await run_in_threadpool(_create, body, ctype, key, registry, supervisor, settings)
    response.status_code = status
    base = _base(request, study.id)
    if status == 201:
        response.headers["Location"] = base
    return await run_in_threadpool(study_public, study, base, settings)


@router.get("/studies", response_model=StudiesPublic, responses=ERRORS)
def list_studies(
    request: Request,
    _: Reader,
    registry: RegistryDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    state: Annotated[Literal[STATES] | None, Query()] = None,  # type: ignore[valid-type]
) -> StudiesPublic:
    """Studies, newest first, with paging and a state filter."""
    rows, total = registry.page(limit, offset, state)
    items = [study_public(s, _base(request, s.id), settings) for s in rows]
    return StudiesPublic(items=items, total=total, limit=limit, offset=offset)


@router.get("/studies/{study_id}", response_model=StudyPublic, responses=ERRORS, name="get_study_route")
def get_study_route(request: Request, _: Reader, study: StudyDep, settings: SettingsDep) -> StudyPublic:
    """A study: state, progress, the frontier so far and links (MLflow, Ray job)."""
    return study_public(study, _base(request, study.id), settings)


@router.post("/studies/{study_id}/cancel", status_code=202, response_model=StudyPublic, responses=ERRORS)
def cancel_study(
    request: Request,
    _: Writer,
    study: StudyDep,
    registry: RegistryDep,
    supervisor: SupervisorDep,
    settings: SettingsDep,
) -> StudyPublic:
    """Stop a running study; finished trials stay in MLflow and the report. Resume picks up the rest."""
    if study.state != "cancelling":  # a repeated cancel is accepted again (and re-sent)
        try:
            study = lifecycle.transition(registry, study.id, "cancel", Actor.API, cancel_requested=True)
        except WrongState as e:
            if e.current is None or e.current.state != "cancelling":
                raise _conflict(e, "only a launching or running study can be cancelled") from None
            study = e.current
    update_status(settings.study_dir(study.id), cancel_requested=True)  # the driver reports 'cancelled'
    supervisor.send_cancel(study)
    return study_public(study, _base(request, study.id), settings)


def _no_live_driver(launcher: Launcher, study: Study, doing: str) -> None:
    live = launcher.liveness(study.id, study.handle)
    if live is Liveness.ALIVE:
        raise api_error(
            409,
            ["path", "study_id"],
            f"a driver of study {study.id} is still running ({study.handle}); wait for it to stop before you {doing}",
            "conflict",
        )
    if live is Liveness.UNKNOWN:
        raise api_error(
            503,
            ["path", "study_id"],
            f"cannot tell whether a driver of study {study.id} still runs (Ray did not answer); retry",
            "unknown",
            headers={"Retry-After": "5"},
        )


@router.post("/studies/{study_id}/resume", status_code=202, response_model=StudyPublic, responses=LAUNCH_ERRORS)
def resume_study(
    request: Request,
    _: Writer,
    study: StudyDep,
    registry: RegistryDep,
    supervisor: SupervisorDep,
    settings: SettingsDep,
) -> StudyPublic:
    """Resume an interrupted, failed or cancelled study where it stopped; finished trials are not rerun."""
    if study.state not in lifecycle.RESUMABLE:
        raise _conflict(WrongState(study, "resume"), "only interrupted, failed or cancelled studies can be resumed")
    launcher = supervisor.launcher
    _no_live_driver(launcher, study, "resume")
    _init_stores(settings)
    attempt = study.attempts + 1
    try:
        study = lifecycle.transition(
            registry,
            study.id,
            "resume",
            Actor.API,
            cap=settings.max_concurrent_studies,
            handle=launcher.handle(study.id, attempt),
            attempts=attempt,
            error=None,
            cancel_requested=False,
        )
    except WrongState as e:  # another resume won
        raise _conflict(e, "only interrupted, failed or cancelled studies can be resumed") from None
    except AtCapacity as e:
        raise _capacity_error(e) from None
    update_status(settings.study_dir(study.id), cancel_requested=False)
    study = _launch(registry, supervisor, study, resume=True)
    return study_public(study, _base(request, study.id), settings)


def _remove_files(study_id: str, settings: Settings) -> None:
    shutil.rmtree(settings.study_dir(study_id), ignore_errors=True)
    shutil.rmtree(settings.data_dir / "cache" / "reports" / study_id, ignore_errors=True)
    if "://" not in settings.tune_storage:  # a local Tune results directory (a cluster's belongs to the cluster)
        shutil.rmtree(Path(settings.tune_storage) / study_id, ignore_errors=True)
    import optuna

    with contextlib.suppress(KeyError):  # a grid or frontier study has no Optuna study
        optuna.delete_study(study_name=study_id, storage=settings.optuna_url)


@router.delete("/studies/{study_id}", status_code=204, responses=LAUNCH_ERRORS)
def delete_study(
    _: Writer, study: StudyDep, registry: RegistryDep, launcher: LauncherDep, settings: SettingsDep
) -> Response:
    """Delete a stopped study: its record, files, Ray Tune results and Optuna study (MLflow runs stay)."""
    if study.state not in lifecycle.TERMINAL:
        raise _conflict(WrongState(study, "delete"), "cancel it first")
    _no_live_driver(launcher, study, "delete it")
    try:
        lifecycle.remove(registry, study.id)
    except WrongState as e:
        raise _conflict(e, "cancel it first") from None
    _remove_files(study.id, settings)
    return Response(status_code=204)
