"""ASGI middleware: request ids, body size limit, API-key auth, metrics and access logs.

Written as plain ASGI (not BaseHTTPMiddleware) so the body limit also holds for chunked
uploads that send no Content-Length, and so responses pass through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from ryla.api.auth import cookie_matches, key_matches
from ryla.api.errors import OPENAI_PREFIX, openai_error_body
from ryla.api.metrics import Metrics
from ryla.logs import request_id_var

log = logging.getLogger("ryla.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class BodyTooLarge(Exception):
    """Raised from receive() when an upload passes its limit; the upload route lets it pass."""


def _json_error(status: int, type_: str, message: str, extra_headers: list | None = None, path: str = ""):
    if path.startswith(OPENAI_PREFIX):
        body = json.dumps(openai_error_body(status, type_, message)).encode()
    else:
        body = json.dumps({"error": {"type": type_, "message": message, "details": None}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return status, headers + (extra_headers or []), body


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def printable(text: str) -> str:
    """User text for a log line: control characters escaped, so a request cannot forge lines."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)[:2000]


def _hostname(netloc: str) -> str:
    """'localhost:8000' -> 'localhost'; '[::1]:8000' -> '::1'."""
    from urllib.parse import urlsplit

    try:
        return (urlsplit("//" + netloc).hostname or "").lower()
    except ValueError:
        return ""


class GuardMiddleware:
    def __init__(self, app, *, max_body_bytes: int, api_key: str | None, metrics: Metrics,
                 public_paths: tuple[str, ...] = ("/health",), upload_paths: dict[str, int] | None = None,
                 allowed_hosts: frozenset[str] | None = None, body_timeout_s: float = 60.0):
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Uploads (LoRA files) stream to disk under their own, larger limit instead of being
        # buffered here.
        self.upload_paths = upload_paths or {}
        self.api_key = api_key or None
        self.metrics = metrics
        self.public_paths = public_paths
        # Served on loopback: the Host a browser sends must name loopback too, or a page whose
        # domain re-resolves to 127.0.0.1 (DNS rebinding) could drive the server.
        self.allowed_hosts = allowed_hosts
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-request-id", "")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex[:16]
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        path, method = scope.get("path", ""), scope.get("method", "")
        start = time.perf_counter()
        status_holder = {"status": 500, "started": False}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        async def reply(status, headers, body):
            await send_with_id({"type": "http.response.start", "status": status, "headers": headers})
            await send_with_id({"type": "http.response.body", "body": body})

        try:
            if self.allowed_hosts is not None and _hostname(headers.get("host", "")) not in self.allowed_hosts:
                return await reply(*_json_error(403, "host_not_allowed", "the Host header does not name this "
                                                "server's address (it serves on loopback only)", path=path))
            origin = headers.get("origin")
            if (self.api_key is None and method in STATE_CHANGING and origin and origin != "null"
                    and _netloc(origin) != headers.get("host", "").lower()):
                # Without a key, a web page of another origin must not drive the server through a
                # visitor's browser (CSRF); the playground, on this origin, is unaffected.
                return await reply(*_json_error(403, "cross_origin", "a request from another origin "
                                                f"({printable(origin)}) may not change state on a server "
                                                "without an API key", path=path))
            if self.api_key is not None and path not in self.public_paths:
                by_key = key_matches(headers.get("authorization", ""), self.api_key)
                by_cookie = not by_key and cookie_matches(headers.get("cookie", ""), self.api_key)
                if by_cookie and method in STATE_CHANGING and origin and _netloc(origin) != headers.get(
                        "host", "").lower():
                    by_cookie = False  # the editor's cookie acts only for pages of this origin
                if not (by_key or by_cookie):
                    return await reply(*_json_error(401, "unauthorized", "missing or wrong API key: send "
                                                    "'Authorization: Bearer <key>' (in a browser: sign in at "
                                                    "/login)", [(b"www-authenticate", b"Bearer")], path))
            limit = self.upload_paths.get(path, self.max_body_bytes) if method == "POST" else self.max_body_bytes
            too_large = _json_error(413, "payload_too_large", f"request body over the limit of {limit} bytes",
                                    path=path)
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await reply(*too_large)
            if method == "POST" and path in self.upload_paths:
                received = 0

                async def counted_receive():
                    nonlocal received
                    message = await receive()
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise BodyTooLarge()
                    return message

                try:
                    return await self.app(scope, counted_receive, send_with_id)
                except BodyTooLarge:
                    if not status_holder["started"]:
                        await reply(*too_large)
                    return
            # Read the body here, up to the limit, then replay it: FastAPI turns any error raised
            # while it reads into a 400, so the limit must be enforced before the app reads.
            chunks, size, more = [], 0, scope.get("method") in ("POST", "PUT", "PATCH")
            while more:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout_s)
                except asyncio.TimeoutError:
                    return await reply(*_json_error(408, "request_timeout", "the request body did not arrive within "
                                                    f"{self.body_timeout_s:g}s", path=path))
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await reply(*too_large)
                chunks.append(chunk)
                more = message.get("more_body", False)
            replayed = False

            async def replay_receive():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                return await receive()  # afterwards: disconnect detection

            await self.app(scope, replay_receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = _route_label(scope)
            self.metrics.requests.labels(route=route, method=method, status=str(status_holder["status"])).inc()
            log.info("%s %s -> %s in %.3fs", method, printable(path), status_holder["status"], elapsed)
            request_id_var.reset(token)


def _netloc(origin: str) -> str:
    from urllib.parse import urlsplit

    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return ""


def _route_label(scope) -> str:
    """The route template, not the raw path, so metrics stay bounded (no label per LoRA id)."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    return "unmatched"
