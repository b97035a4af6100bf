"""A local HTTP server speaking the Hugging Face Hub's file protocol (the part
hf_hub_download uses): HEAD/GET /{repo}/resolve/{revision}/{path}, with the LFS headers
(X-Repo-Commit, ETag = sha256, X-Linked-Size) and byte ranges for resumed downloads.
Faults can be injected: cut a response off after N bytes, or serve corrupt bytes once.

Accounts, as the Hub's API answers them: GET /api/whoami-v2 (401 for an unknown token) and
GET /api/models/{repo}/auth-check (403 with X-Error-Code GatedRepo for a gated repo whose
licence the token's account has not accepted)."""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, files: dict[tuple[str, str], bytes]):
        self.files = files
        self.cut_after: dict[tuple[str, str], int] = {}  # next GET stops after N bytes
        self.corrupt_once: set[tuple[str, str]] = set()
        self.gets: list[tuple[str, str, str | None]] = []  # (repo, path, Range header)
        self.on_get = lambda: None  # called at every GET (tests look at the disk then)
        self.tokens: dict[str, str] = {"hf_valid": "anna"}  # token -> account name
        self.gated: set[str] = set()  # repos whose licence must be accepted
        self.accepted: set[tuple[str, str]] = set()  # (account, repo)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _lookup(self):
                m = re.match(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", self.path.split("?")[0])
                if not m or (m["repo"], m["path"]) not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return (m["repo"], m["path"])

            def _headers(self, key, data, status=200, length=None, extra=()):
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) if length is None else length))
                for name, value in extra:
                    self.send_header(name, value)
                self.end_headers()

            def do_HEAD(self):
                key = self._lookup()
                if key:
                    self._headers(key, hub.files[key])

            def _json(self, status, body, error_code=None):
                import json

                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.end_headers()
                self.wfile.write(data)

            def _api(self) -> bool:
                path = self.path.split("?")[0]
                token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                account = hub.tokens.get(token)
                if path == "/api/whoami-v2":
                    if account is None:
                        self._json(401, {"error": "Invalid credentials in Authorization header"})
                    else:
                        self._json(200, {"type": "user", "name": account})
                    return True
                if m := re.match(r"^/api/models/(?P<repo>[^/]+/[^/]+)/auth-check$", path):
                    if m["repo"] in hub.gated and (account, m["repo"]) not in hub.accepted:
                        self._json(403, {"error": "Access to this gated repo is restricted"}, "GatedRepo")
                    else:
                        self._json(200, {})
                    return True
                return False

            def do_GET(self):
                if self._api():
                    return
                key = self._lookup()
                if not key:
                    return
                data = hub.files[key]
                range_header = self.headers.get("Range")
                hub.gets.append((key[0], key[1], range_header))
                hub.on_get()
                start = 0
                if range_header and (m := re.match(r"bytes=(\d+)-", range_header)):
                    start = int(m.group(1))
                body = data[start:]
                if key in hub.corrupt_once:
                    hub.corrupt_once.discard(key)
                    body = bytes(b ^ 0xFF for b in body)
                if start:
                    self._headers(key, data, 206, len(body),
                                  [("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")])
                else:
                    self._headers(key, data)
                if key in hub.cut_after:
                    self.wfile.write(body[: hub.cut_after.pop(key)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
