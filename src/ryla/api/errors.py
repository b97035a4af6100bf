"""One error shape for every failure: `{"error": {"type", "message", "details"}}`.

Workflow validation failures are the exception: they keep ComfyUI's /prompt shape (with
`node_errors`), because that is what ComfyUI clients parse. Bad input never becomes a 500;
an unexpected exception is logged with its traceback and the client gets a generic message
with the request id to quote.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ryla.graph.executor import GraphValidationError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None):
        self.status, self.type, self.message, self.details = status, type_, message, details
        self.headers = headers or {}
        super().__init__(message)


def error_response(status: int, type_: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    if path.startswith(OPENAI_PREFIX):
        return JSONResponse(openai_error_body(status, type_, message, details), status_code=status, headers=headers)
    return JSONResponse({"error": {"type": type_, "message": message, "details": details}},
                        status_code=status, headers=headers)


# OpenAI's API (ryla.api.routes.openai) answers errors in OpenAI's shape:
# {"error": {"message", "type", "param", "code"}}, with 400 for invalid parameters.
OPENAI_PREFIX = "/v1/"


def openai_error_body(status: int, type_: str, message: str, details: Any = None) -> dict:
    param = details.get("param") if isinstance(details, dict) else None
    if param is None and isinstance(details, dict) and details.get("errors"):
        param = details["errors"][0].get("field")
    kind = "server_error" if status >= 500 else "invalid_request_error"
    code = "invalid_api_key" if status == 401 else type_
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_HTTP_TYPES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type", 429: "queue_full"}


INVALID_JSON = ("the body is not JSON this server can read: it must be UTF-8, with numbers of at most 4300 "
                "digits and at most a few hundred levels of nesting")


def _field_error(error: dict) -> dict:
    """One pydantic error as {field, message, type}; NaN and infinities are named as such."""
    field, value = _field_name(tuple(error.get("loc", ()))), error.get("input")
    if isinstance(value, float) and not math.isfinite(value):
        return {"field": field, "message": f"must be a finite number, got {value!r}".replace("nan", "NaN"),
                "type": "finite_number"}
    if isinstance(value, bool) and error.get("type") in ("int_type", "float_type"):
        return {"field": field, "message": f"must be a number, got the boolean {str(value).lower()}",
                "type": error["type"]}
    return {"field": field, "message": error.get("msg", "invalid"), "type": error.get("type", "invalid")}


def _field_name(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.type, exc.message, exc.details, exc.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = [_field_error(e) for e in exc.errors()]
        first = errors[0] if errors else {"field": "body", "message": "invalid request"}
        message = f"{first['field']}: {first['message']}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        status = 400 if request.url.path.startswith(OPENAI_PREFIX) else 422
        return error_response(status, "invalid_request", message, {"errors": errors}, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        type_ = _HTTP_TYPES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else type_.replace("_", " ")
        if exc.status_code == 400 and message.startswith("There was an error parsing the body"):
            # FastAPI's own JSON parsing failed: bytes that are not UTF-8, a number of thousands
            # of digits, nesting deeper than the parser goes.
            type_, message = "invalid_json", INVALID_JSON
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, type_, message, None, getattr(exc, "headers", None), request.url.path)

    @app.exception_handler(GraphValidationError)
    async def invalid_graph(request: Request, exc: GraphValidationError):
        return JSONResponse(exc.body, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        request_id = getattr(request.state, "request_id", "-")
        log.error("[%s] unhandled error", request_id, exc_info=exc)
        return error_response(500, "internal_error",
                              f"internal server error; the server log has the details under request id {request_id}",
                              path=request.url.path)
