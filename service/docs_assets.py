"""``/docs`` and ``/redoc`` from an installed package, so the API docs work with no network.

FastAPI's default pages load Swagger UI, ReDoc and Google fonts from public CDNs; behind a
firewall or on an air-gapped cluster they render blank. The ``fastapi-offline`` package
ships the Swagger UI and ReDoc bundles; they are served from ``/docs-assets``.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"


def serve_docs_offline(app: FastAPI) -> None:
    """Replace the app's ``/docs`` and ``/redoc`` pages by ones whose scripts the app serves itself."""
    static = files("fastapi_offline") / "static"
    pages = {app.docs_url, app.redoc_url} - {None}
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in pages]
    app.mount(ASSETS_URL, StaticFiles(directory=str(static)), name="docs-assets")

    def assets(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{ASSETS_URL}"

    def openapi(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{app.openapi_url}"

    if app.docs_url:

        @app.get(app.docs_url, include_in_schema=False)
        def swagger_ui(request: Request) -> HTMLResponse:
            return get_swagger_ui_html(
                openapi_url=openapi(request),
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
                swagger_js_url=f"{assets(request)}/swagger-ui-bundle.js",
                swagger_css_url=f"{assets(request)}/swagger-ui.css",
                swagger_favicon_url=f"{assets(request)}/favicon.png",
                swagger_ui_parameters=app.swagger_ui_parameters,
            )

    if app.redoc_url:

        @app.get(app.redoc_url, include_in_schema=False)
        def redoc(request: Request) -> HTMLResponse:
            return get_redoc_html(
                openapi_url=openapi(request),
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{assets(request)}/redoc.standalone.js",
                redoc_favicon_url=f"{assets(request)}/favicon.png",
                with_google_fonts=False,
            )
