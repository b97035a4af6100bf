"""The API key: what counts as presenting it.

`Authorization: Bearer <key>` everywhere (the OpenAI client sends its api_key this way);
HTTP Basic with the key as the password (any user name), which ComfyUI clients built for
password-protected ComfyUI servers send (comfy-api-simplified's user/password); and, for the
websocket only, since browsers cannot set headers on one, a `token` query parameter.
"""

from __future__ import annotations

import base64
import binascii
import hmac


def key_matches(authorization: str, api_key: str) -> bool:
    scheme, _, credentials = authorization.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        given = credentials.strip()
    elif scheme == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        given = decoded.partition(":")[2]
    else:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), api_key.encode("utf-8"))


def websocket_authorized(websocket, api_key: str | None) -> bool:
    if api_key is None:
        return True
    token = websocket.query_params.get("token")
    if token is not None and hmac.compare_digest(token.encode(), api_key.encode()):
        return True
    return key_matches(websocket.headers.get("authorization", ""), api_key)
