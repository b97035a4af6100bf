"""The API key: what counts as presenting it.

`Authorization: Bearer <key>` everywhere (the OpenAI client sends its api_key this way);
HTTP Basic with the key as the password (any user name), which ComfyUI clients built for
password-protected ComfyUI servers send (comfy-api-simplified's user/password); and, for the
websocket only, since browsers cannot set headers on one, a `token` query parameter. ComfyUI's
editor, which cannot be taught to send a header, signs in once at /login: the server then sets
a session cookie (a keyed hash of the key, never the key itself; HttpOnly, SameSite=Strict).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from http.cookies import CookieError, SimpleCookie

SESSION_COOKIE = "ryla_session"


def check_key(api_key: str | None) -> str | None:
    """A key must travel in a header: no control characters, no spaces at its ends. Any other
    text, non-ASCII included, works (it is compared as UTF-8 bytes)."""
    if api_key is None:
        return None
    if not api_key or api_key != api_key.strip() or any(ord(c) < 32 or ord(c) == 127 for c in api_key):
        raise ValueError("RYLA_API_KEY must be non-empty text without control characters or surrounding spaces")
    return api_key


def key_matches(authorization: str, api_key: str) -> bool:
    """`authorization` as the server decoded it (HTTP headers are bytes, read as latin-1)."""
    try:
        raw = authorization.encode("latin-1")
    except UnicodeEncodeError:
        return False
    scheme, _, credentials = raw.strip().partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        given = credentials.strip()
    elif scheme == b"basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        given = decoded.partition(b":")[2]
    else:
        return False
    return hmac.compare_digest(given, api_key.encode("utf-8"))


def websocket_authorized(websocket, api_key: str | None) -> bool:
    if api_key is None:
        return True
    token = websocket.query_params.get("token")
    if token is not None and hmac.compare_digest(token.encode(), api_key.encode()):
        return True
    # the editor's session cookie: browsers send cookies on a same-site websocket
    if cookie_matches(websocket.headers.get("cookie", ""), api_key):
        return True
    return key_matches(websocket.headers.get("authorization", ""), api_key)


def session_token(api_key: str) -> str:
    """The editor's session cookie value: changes when the key changes, reveals nothing of it."""
    return hmac.new(api_key.encode("utf-8"), b"ryla editor session", hashlib.sha256).hexdigest()


def cookie_matches(cookie_header: str, api_key: str) -> bool:
    try:
        morsel = SimpleCookie(cookie_header).get(SESSION_COOKIE)
    except CookieError:
        return False
    return morsel is not None and hmac.compare_digest(morsel.value.encode(), session_token(api_key).encode())
