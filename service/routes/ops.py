"""Operations: liveness and readiness."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.deps import RegistryDep, SettingsDep
from service.registry import Registry
from service.schemas import Health
from studies.settings import Settings

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers (on the event loop itself: a blocked loop shows here)."""
    return Health(status="ok")


def _checks(registry: Registry, settings: Settings) -> dict[str, str]:
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
    return checks


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    """Readiness: the registry answers and the data directory is writable."""
    checks = await run_in_threadpool(_checks, registry, settings)
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks).model_dump()
    return JSONResponse(body, 200 if ok else 503)
