"""Route dependencies as ``Annotated`` aliases: the app's parts, auth, and the one study lookup that 404s."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.launcher import Launcher
from service.registry import Registry, Study
from service.supervisor import Supervisor
from studies.settings import Settings


def api_error(status: int, loc: list[str | int], msg: str, type_: str, **kw: Any) -> HTTPException:
    """An HTTPException in the API's one error shape."""
    return HTTPException(status, detail=[{"loc": loc, "msg": msg, "type": type_}], **kw)


def get_registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def get_launcher(request: Request) -> Launcher:
    launcher: Launcher = request.app.state.launcher
    return launcher


def get_supervisor(request: Request) -> Supervisor:
    supervisor: Supervisor = request.app.state.supervisor
    return supervisor


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


RegistryDep = Annotated[Registry, Depends(get_registry)]
LauncherDep = Annotated[Launcher, Depends(get_launcher)]
SupervisorDep = Annotated[Supervisor, Depends(get_supervisor)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]

bearer = HTTPBearer(auto_error=False, description="LADDER_API_TOKEN, sent as 'Authorization: Bearer <token>'")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _check_token(credentials: HTTPAuthorizationCredentials | None, settings: Settings) -> None:
    if not settings.api_token:
        return
    token = credentials.credentials if credentials and credentials.scheme.lower() == "bearer" else ""
    if not secrets.compare_digest(token.encode(), settings.api_token.encode()):
        raise api_error(
            401,
            ["header", "Authorization"],
            "a valid bearer token is required",
            "auth",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_token(credentials: Credentials, settings: SettingsDep) -> None:
    _check_token(credentials, settings)


def require_read_token(credentials: Credentials, settings: SettingsDep) -> None:
    if settings.auth_reads:
        _check_token(credentials, settings)


Writer = Annotated[None, Depends(require_token)]
Reader = Annotated[None, Depends(require_read_token)]


def get_study(study_id: str, registry: RegistryDep) -> Study:
    """The one place a study lookup can 404."""
    # An id that cannot exist never reaches the database (PostgreSQL refuses NUL in text).
    study = registry.get(study_id) if len(study_id) <= 64 and "\x00" not in study_id else None
    if study is None:
        raise api_error(404, ["path", "study_id"], f"no study with id {study_id!r}", "not_found")
    return study


StudyDep = Annotated[Study, Depends(get_study)]
