"""The API documentation pages, served without a CDN: Swagger UI at /docs, ReDoc at /redoc.

FastAPI's default pages load Swagger UI, ReDoc and a favicon from public CDNs, so they are blank on a
network without internet. Here the pages are FastAPI's own (`get_swagger_ui_html`, `get_redoc_html`)
pointed at copies of the assets served by the app under `ASSETS_PATH`. The copies are those shipped by
the `fastapi-offline` package (Swagger UI 5 bundle and CSS, ReDoc 2 standalone bundle, favicon), a
pinned dependency, so they are updated by bumping its pin, not by hand. Swagger UI's online validator
badge (a request to a public validator) is switched off.

Who may read the pages and their assets is decided by the edge middleware: they are discovery paths,
public only with `public_discovery` (see tta_server.app).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS", "ASSETS_PATH", "DOCS_PATHS", "assets_dir", "install"]

ASSETS_PATH = "/docs-assets"
DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
#: Exact paths of the documentation pages (the assets are everything under ASSETS_PATH).
DOCS_PATHS = frozenset({DOCS_PATH, REDOC_PATH, OAUTH2_REDIRECT_PATH})
#: The files the pages reference, by role.
ASSETS = {
    "swagger_js": "swagger-ui-bundle.js",
    "swagger_css": "swagger-ui.css",
    "redoc_js": "redoc.standalone.js",
    "favicon": "favicon.png",
}


def assets_dir() -> Path:
    """The folder of the packaged assets; a clear error when the package or a file is missing."""
    try:
        folder = Path(str(resources.files("fastapi_offline") / "static"))
    except ModuleNotFoundError as exc:  # pragma: no cover - a pinned dependency of the server
        raise RuntimeError(
            "the API docs assets come from the `fastapi-offline` package: pip install the server's "
            "dependencies (pyproject.toml)"
        ) from exc
    missing = [name for name in ASSETS.values() if not (folder / name).is_file()]
    if missing:  # pragma: no cover - a package release that moved its files
        raise RuntimeError(f"API docs assets {missing} not found in {folder}: check the fastapi-offline pin")
    return folder


def install(app: FastAPI) -> None:
    """Mount the assets and add the /docs, /docs/oauth2-redirect and /redoc pages to `app` (built with
    `docs_url=None, redoc_url=None`)."""
    app.mount(ASSETS_PATH, StaticFiles(directory=assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    def asset(request: Request, role: str) -> str:
        return f"{request.scope.get('root_path', '')}{ASSETS_PATH}/{ASSETS[role]}"

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_PATH}",
            swagger_js_url=asset(request, "swagger_js"),
            swagger_css_url=asset(request, "swagger_css"),
            swagger_favicon_url=asset(request, "favicon"),
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(OAUTH2_REDIRECT_PATH, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=asset(request, "redoc_js"),
            redoc_favicon_url=asset(request, "favicon"),
            with_google_fonts=False,
        )
