"""The Ladder REST service: ``create_app``, its middleware and error handlers.

A thin, durable control plane over study drivers: it stores studies, launches one driver
per study (a local process or a Ray Job), watches them (``service.supervisor``) and serves
their results. It never trains in its own process. Run it with ``ladder serve`` or
``uvicorn --factory service.main:create_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.docs_assets import serve_docs_offline
from service.launcher import Launcher, make_launcher
from service.registry import Registry
from service.routes import ops, results, studies
from service.supervisor import Supervisor
from service.views import Results
from studies.settings import Settings, get_settings, is_loopback
from studies.spec import StudySpec

log = logging.getLogger(__name__)
RECONCILE_EVERY_S = 1.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


async def _send_error(send: Send, status: int, loc: list[str], msg: str, type_: str) -> None:
    body = json.dumps({"detail": [{"loc": loc, "msg": msg, "type": type_}]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuses a body over ``limit`` bytes while it streams in: memory never holds more than the limit.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body
    is buffered up to the limit and replayed to the app, or refused the moment it passes it.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        msg = f"body larger than {self.limit} bytes (LADDER_MAX_BODY_BYTES)"
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                return await _send_error(send, 413, ["body"], msg, "too_large")
            return await self.app(scope, receive, send)  # the server stops at the declared length
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _send_error(send, 413, ["body"], msg, "too_large")
            chunks.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


class HostGuard:
    """The Host header must name this service (against DNS rebinding); off loopback, a token is required."""

    def __init__(self, app: ASGIApp, allowed: list[str], has_token: bool) -> None:
        self.app, self.allowed, self.has_token = app, [a.lower() for a in allowed], has_token

    def _allowed(self, host: str) -> bool:
        return any(a == "*" or host == a or (a.startswith("*.") and host.endswith(a[1:])) for a in self.allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server = scope.get("server") or ("", 0)
        if not self.has_token and _is_ip(server[0]) and not is_loopback(server[0]):
            msg = f"this service has no LADDER_API_TOKEN and answers on loopback only, not on {server[0]}"
            return await _send_error(send, 403, [], msg, "no_token")
        name = _host_name(dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower())
        if not self._allowed(name):
            msg = f"host {name!r} is not served here; allowed: {', '.join(self.allowed)} (LADDER_ALLOWED_HOSTS)"
            return await _send_error(send, 400, ["header", "Host"], msg, "bad_host")
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name in a Host header, without the port (``[::1]:8000`` -> ``[::1]``)."""
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def allowed_hosts(settings: Settings) -> list[str]:
    """LADDER_ALLOWED_HOSTS, or localhost names without a token (loopback only) and any host with one."""
    if settings.allowed_hosts:
        return list(settings.allowed_hosts)
    return ["*"] if settings.api_token else list(LOOPBACK_NAMES)


def _on_startup(registry: Registry, supervisor: Supervisor) -> None:
    registry.migrate()
    supervisor.reconcile_all()  # studies whose driver died meanwhile; cancels lost in a restart are re-sent


async def _watch(supervisor: Supervisor) -> None:
    while True:
        await asyncio.sleep(RECONCILE_EVERY_S)
        try:
            await run_in_threadpool(supervisor.reconcile_all)
        except Exception:
            log.exception("reconcile failed")


def create_app(settings: Settings | None = None, launcher: Launcher | None = None) -> FastAPI:
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_on_startup, app.state.registry, app.state.supervisor)
        watch = asyncio.create_task(_watch(app.state.supervisor))
        yield
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        await run_in_threadpool(app.state.supervisor.join)

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
    app.state.supervisor = Supervisor(app.state.registry, app.state.launcher, settings)
    app.state.results = Results(settings)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(HostGuard, allowed=allowed_hosts(settings), has_token=bool(settings.api_token))

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

    for router in (ops.router, studies.router, results.router):
        app.include_router(router)
    _openapi(app)
    return app


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
