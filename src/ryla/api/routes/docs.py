"""The API's documentation pages, /docs (Swagger UI) and /redoc, with their scripts served from
an installed package (fastapi-offline's copies of Swagger UI and ReDoc) instead of a CDN, as
FastAPI's "self-hosting JavaScript and CSS for docs" recipe does: they work with no internet.

The pages and the OpenAPI document are public (they hold no data). With an API key set, the
Swagger page's "Authorize" button asks for it (a Bearer scheme in the document) and keeps it
in the tab while the page is open, so "Try it out" works.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response

from ryla.api.errors import ApiError

ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
          "redoc.standalone.js": "text/javascript; charset=utf-8", "favicon.png": "image/png"}
ASSET_PREFIX = "/docs-assets/"
PUBLIC_PATHS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect",
                *(ASSET_PREFIX + name for name in ASSETS))
SECURITY_SCHEME = "apiKey"

router = APIRouter(include_in_schema=False)


@cache
def _asset(name: str) -> bytes:
    return resources.files("fastapi_offline").joinpath("static", name).read_bytes()


@router.get("/docs")
async def swagger_page() -> HTMLResponse:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="ryla API", oauth2_redirect_url="/docs/oauth2-redirect",
                               swagger_js_url=ASSET_PREFIX + "swagger-ui-bundle.js",
                               swagger_css_url=ASSET_PREFIX + "swagger-ui.css",
                               swagger_favicon_url=ASSET_PREFIX + "favicon.png",
                               swagger_ui_parameters={"persistAuthorization": True})


@router.get("/docs/oauth2-redirect")
async def swagger_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc_page() -> HTMLResponse:
    return get_redoc_html(openapi_url="/openapi.json", title="ryla API",
                          redoc_js_url=ASSET_PREFIX + "redoc.standalone.js",
                          redoc_favicon_url=ASSET_PREFIX + "favicon.png", with_google_fonts=False)


@router.get(ASSET_PREFIX + "{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, "not_found", f"no documentation file {name!r}")
    return Response(_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})


def install(app: FastAPI, api_key_required: bool) -> None:
    """The OpenAPI document with the API key as a Bearer scheme on every operation (when the
    server has a key), so Swagger UI's "Authorize" asks for it and sends it."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes,
                                 description=app.description)
            if api_key_required:
                schema.setdefault("components", {})["securitySchemes"] = {SECURITY_SCHEME: {
                    "type": "http", "scheme": "bearer",
                    "description": "The server's RYLA_API_KEY, sent as `Authorization: Bearer <key>`."}}
                schema["security"] = [{SECURITY_SCHEME: []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
