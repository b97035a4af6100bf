"""The browser playground: its page and files (shipped in the package), and their headers."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ryla.api.errors import ApiError

# The browser playground: files shipped in the package, served with a restrictive CSP (only
# this origin's scripts, styles and API; images also from data:/blob: URLs).
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "playground.js": "text/javascript; charset=utf-8",
                "playground.css": "text/css; charset=utf-8"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def read_static(name: str) -> bytes:
    return resources.files("ryla.api").joinpath("static", name).read_bytes()


router = APIRouter(include_in_schema=False)


@router.get("/playground")
async def page() -> Response:
    return Response(read_static("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/")
async def home(request: Request) -> Response:
    """ComfyUI's editor when its package is installed (`ryla[ui]`), else the playground."""
    from ryla.api.routes.editor import editor_page, frontend_root

    return editor_page(request) if frontend_root() is not None else await page()


@router.get("/static/{name}")
async def static_file(name: str) -> Response:
    if name not in STATIC_FILES:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    return Response(read_static(name), media_type=STATIC_FILES[name], headers=PAGE_HEADERS)
