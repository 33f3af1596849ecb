"""``/docs`` and ``/redoc`` from an installed package, so the API docs work with no network.

FastAPI's default pages load Swagger UI, ReDoc and Google fonts from public CDNs; behind a
firewall or on an air-gapped cluster they render blank. The ``fastapi-offline`` package
ships the Swagger UI and ReDoc bundles; they are served from ``/docs-assets``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"

Page = Callable[[FastAPI, str, str], HTMLResponse]  # (app, OpenAPI URL, assets URL) -> page


def _swagger_ui(app: FastAPI, openapi_url: str, assets: str) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
        swagger_js_url=f"{assets}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters,
    )


def _redoc(app: FastAPI, openapi_url: str, assets: str) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=openapi_url,
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{assets}/redoc.standalone.js",
        redoc_favicon_url=f"{assets}/favicon.png",
        with_google_fonts=False,
    )


def _route(app: FastAPI, page: Page) -> Callable[[Request], HTMLResponse]:
    def handler(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return page(app, f"{root}{app.openapi_url}", f"{root}{ASSETS_URL}")

    return handler


def serve_docs_offline(app: FastAPI) -> None:
    """Replace the app's ``/docs`` and ``/redoc`` pages by ones whose scripts the app serves itself."""
    pages = {url: page for url, page in ((app.docs_url, _swagger_ui), (app.redoc_url, _redoc)) if url}
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in pages]
    app.mount(ASSETS_URL, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")
    for url, page in pages.items():
        app.add_api_route(url, _route(app, page), include_in_schema=False, response_class=HTMLResponse)
