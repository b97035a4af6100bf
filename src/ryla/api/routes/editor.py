"""ComfyUI's web editor on ryla: the frontend's built files (the optional `comfyui-frontend-package`,
`pip install "ryla[ui]"`) at `/`, and the endpoints it calls at start and while editing, in the
shapes of ComfyUI's server (app/user_manager.py, app/app_settings.py, app/model_manager.py,
server.py). Running a graph uses the ComfyUI protocol routes (routes/comfy.py) and /ws.

User files (settings, saved workflows) live in the data folder's user/default/, with
ComfyUI's rule that a path may not leave that folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
from functools import cache
from pathlib import Path
from urllib.parse import unquote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from ryla.api.errors import ApiError
from ryla.api.service import Service, get_service
from ryla.files import write_atomic

log = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)


@cache
def frontend_root() -> Path | None:
    """The editor's static files, when the frontend package is installed."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    root = Path(comfyui_frontend_package.__file__).parent / "static"
    return root if (root / "index.html").is_file() else None


@cache
def templates_root() -> Path | None:
    """Comfy-Org's workflow templates (their index.json and files), when installed."""
    try:
        import comfyui_workflow_templates_json
    except ImportError:
        return None
    root = Path(comfyui_workflow_templates_json.__file__).parent / "templates"
    return root if root.is_dir() else None


# ------------------------------------------------------------------ user files


def user_root(service: Service) -> Path:
    root = service.folders.root / "user" / "default"
    if not root.is_dir():
        # the folders the editor lists at start (saved workflows, subgraph blueprints)
        for folder in ("workflows", "subgraphs"):
            (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def user_path(service: Service, name: str) -> Path:
    """A file or folder under the user's folder; 400 for a name that leaves it (ComfyUI's
    get_request_user_filepath)."""
    name = unquote(name)
    if not name or "\x00" in name or name.startswith(("/", "\\")) or ":" in name:
        raise ApiError(400, "invalid_path", f"{name!r} is not a path inside the user's folder")
    root = user_root(service)
    path = (root / os.path.normpath(name)).resolve()
    if not path.is_relative_to(root.resolve()) or path == root.resolve():
        raise ApiError(403, "invalid_path", f"{name!r} leaves the user's folder")
    return path


SETTINGS_FILE = "comfy.settings.json"


def read_settings(service: Service) -> dict:
    path = user_root(service) / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text())
        return settings if isinstance(settings, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def write_settings(service: Service, settings: dict) -> None:
    write_atomic(user_root(service) / SETTINGS_FILE, json.dumps(settings, indent=2).encode())


@router.get("/api/users")
async def users() -> dict:
    # one user: ComfyUI without --multi-user answers that its user folder exists
    return {"storage": "server", "migrated": True}


@router.get("/api/settings")
async def get_settings(service: Service = Depends(get_service)) -> dict:
    return read_settings(service)


@router.post("/api/settings")
async def post_settings(request: Request, service: Service = Depends(get_service)) -> Response:
    values = await request.json()
    if not isinstance(values, dict):
        raise ApiError(400, "invalid_request", "settings: expected an object")
    write_settings(service, {**read_settings(service), **values})
    return Response(status_code=200)


@router.get("/api/settings/{setting_id}")
async def get_setting(setting_id: str, service: Service = Depends(get_service)):
    return JSONResponse(read_settings(service).get(setting_id))


@router.post("/api/settings/{setting_id}")
async def post_setting(setting_id: str, request: Request, service: Service = Depends(get_service)) -> Response:
    write_settings(service, {**read_settings(service), setting_id: await request.json()})
    return Response(status_code=200)


def file_info(root: Path, path: Path) -> dict:
    stat = path.stat()
    return {"path": path.relative_to(root).as_posix(), "size": stat.st_size, "modified": stat.st_mtime}


@router.get("/api/userdata")
async def list_userdata(dir: str = Query(...), recurse: bool = False, full_info: bool = False,
                        split: bool = False, service: Service = Depends(get_service)):
    folder = user_path(service, dir)
    if not folder.is_dir():
        raise ApiError(404, "not_found", f"no folder {dir!r}")
    files = sorted(folder.rglob("*") if recurse else folder.glob("*"))
    files = [path for path in files if path.is_file()]
    if full_info:
        return [file_info(folder, path) for path in files]
    names = [path.relative_to(folder).as_posix() for path in files]
    return [[name, *name.split("/")] for name in names] if split else names


@router.get("/api/v2/userdata")
async def list_userdata_v2(path: str = "", service: Service = Depends(get_service)):
    folder = user_root(service) if not path else user_path(service, path)
    if not folder.is_dir():
        raise ApiError(404, "not_found", f"no folder {path!r}")
    root = user_root(service)
    out = []
    for entry in sorted(folder.iterdir()):
        item = {"name": entry.name, "path": entry.relative_to(root).as_posix(),
                "type": "directory" if entry.is_dir() else "file"}
        if entry.is_file():
            item.update(size=entry.stat().st_size, modified=entry.stat().st_mtime)
        out.append(item)
    return out


@router.get("/api/userdata/{name:path}")
async def get_userdata(name: str, service: Service = Depends(get_service)):
    if name.endswith("/move") or "/move/" in name:
        raise ApiError(405, "method_not_allowed", "moves are POST")
    path = user_path(service, name)
    if not path.is_file():
        # what a fresh ComfyUI install has in these: no user stylesheet, no saved templates
        if unquote(name) == "user.css":
            return Response("", media_type="text/css")
        if unquote(name) == "comfy.templates.json":
            return JSONResponse([])
        raise ApiError(404, "not_found", f"no file {unquote(name)!r}")
    return FileResponse(path)


@router.post("/api/userdata/{name:path}")
async def post_userdata(name: str, request: Request, overwrite: bool = True, full_info: bool = False,
                        service: Service = Depends(get_service)):
    if "/move/" in name:  # POST /userdata/{file}/move/{dest}
        source, dest = name.split("/move/", 1)
        return move_userdata(service, source, dest, overwrite, full_info)
    path = user_path(service, name)
    if path.exists() and not overwrite:
        raise ApiError(409, "exists", f"{unquote(name)!r} exists")
    write_atomic(path, await request.body())
    return file_info(user_root(service), path) if full_info else path.relative_to(user_root(service)).as_posix()


def move_userdata(service: Service, source: str, dest: str, overwrite: bool, full_info: bool):
    origin, target = user_path(service, source), user_path(service, dest)
    if not origin.is_file():
        raise ApiError(404, "not_found", f"no file {unquote(source)!r}")
    if target.exists() and not overwrite:
        raise ApiError(409, "exists", f"{unquote(dest)!r} exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(origin), str(target))
    return file_info(user_root(service), target) if full_info else target.relative_to(user_root(service)).as_posix()


@router.delete("/api/userdata/{name:path}")
async def delete_userdata(name: str, service: Service = Depends(get_service)) -> Response:
    path = user_path(service, name)
    if not path.is_file():
        raise ApiError(404, "not_found", f"no file {unquote(name)!r}")
    path.unlink()
    return Response(status_code=204)


# ------------------------------------------------------------------ what the editor lists


@router.get("/api/i18n")
async def i18n() -> dict:
    return {}  # custom nodes' translations: there are none


@router.get("/api/workflow_templates")
async def custom_node_templates() -> dict:
    return {}  # templates of custom nodes; the core templates are under /templates


@router.get("/api/experiment/models")
async def model_folders(service: Service = Depends(get_service)) -> list:
    store = service.runtime.store
    return [{"name": kind, "folders": [str(store.folder(kind))]} for kind in store.inventory()]


@router.get("/api/experiment/models/{folder}")
async def model_files(folder: str, service: Service = Depends(get_service)) -> list:
    store = service.runtime.store
    if folder not in store.inventory():
        raise ApiError(404, "not_found", f"no model folder {folder!r}")
    return [{"name": name, "pathIndex": 0} for name in store.listing(folder)]


@router.get("/api/view_metadata/{folder}")
async def view_metadata(folder: str, filename: str, service: Service = Depends(get_service)):
    """A .safetensors file's __metadata__ (ComfyUI shows it for LoRAs and checkpoints)."""
    from ryla.models.store import ModelNotFoundError, UnsafeNameError

    store = service.runtime.store
    try:
        path = store.resolve(folder, filename)
    except (ModelNotFoundError, UnsafeNameError, KeyError, ValueError):
        raise ApiError(404, "not_found", f"no file {filename!r} in {folder!r}")
    if not filename.endswith(".safetensors"):
        raise ApiError(404, "not_found", "metadata is read from .safetensors files only")
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= 100 << 20:
            raise ApiError(404, "not_found", "no safetensors header")
        header = json.loads(f.read(size))
    return header.get("__metadata__") or {}


@router.get("/templates/{name:path}")
async def template_file(name: str):
    root = templates_root()
    if root is None:
        raise ApiError(404, "not_found", "the workflow templates package is not installed "
                                         "(pip install \"ryla[ui]\")")
    path = (root / os.path.normpath(unquote(name))).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ApiError(404, "not_found", f"no template file {name!r}")
    if not path.is_file():
        if path.suffix.lower() in (".webp", ".png", ".jpg", ".jpeg"):
            # The templates' thumbnails ship in separate media packages (hundreds of MB) that
            # ryla does not install: a blank preview rather than a broken image.
            return Response(BLANK_PNG, media_type="image/png", headers={"Cache-Control": "max-age=86400"})
        raise ApiError(404, "not_found", f"no template file {name!r}")
    return FileResponse(path)


# a 1x1 transparent PNG
BLANK_PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                          "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


# ------------------------------------------------------------------ ComfyUI's jobs API (its queue panel)

JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")


def comfy_job(job, include_outputs: bool = False) -> dict:
    """One job as ComfyUI's GET /api/jobs lists it (comfy_execution/jobs.py's normalized job)."""
    from ryla.api import jobs as job_states

    if job.status == job_states.PENDING:
        status = "pending"
    elif not job.done:
        status = "in_progress"
    elif job.status == job_states.SUCCESS:
        status = "completed"
    elif job.status in (job_states.CANCELLED, job_states.INTERRUPTED):
        status = "cancelled"
    else:
        status = "failed"
    entry = {"id": job.id, "status": status, "priority": job.number, "create_time": int(job.created_at * 1000),
             "outputs_count": 0}
    workflow = (job.extra_data.get("extra_pnginfo") or {}).get("workflow") if isinstance(
        job.extra_data.get("extra_pnginfo"), dict) else None
    if isinstance(workflow, dict) and workflow.get("id"):
        entry["workflow_id"] = workflow["id"]
    if job.started_at:
        entry["execution_start_time"] = int(job.started_at * 1000)
    if job.done and job.finished_at:
        entry["execution_end_time"] = int(job.finished_at * 1000)
    if status == "failed" and job.error:
        entry["execution_error"] = job.error
    images = [dict(image, nodeId=node_id, mediaType="images") for node_id, output in job.outputs.items()
              for image in output.get("images", [])]
    entry["outputs_count"] = len(images)
    if images:
        entry["preview_output"] = next((image for image in images if image.get("type") == "output"), images[0])
    if include_outputs:
        entry["outputs"] = job.outputs
        entry["execution_status"] = job.history_entry()["status"] if job.done else None
        entry["workflow"] = {"prompt": job.graph, "extra_data": job.extra_data}
    return entry


@router.get("/api/jobs")
async def comfy_jobs(status: str | None = None, workflow_id: str | None = None, sort_by: str = "created_at",
                     sort_order: str = "desc", limit: int | None = Query(None, ge=1), offset: int = Query(0, ge=0),
                     service: Service = Depends(get_service)) -> dict:
    wanted = [part.strip() for part in status.split(",")] if status else list(JOB_STATUSES)
    unknown = [part for part in wanted if part not in JOB_STATUSES]
    if unknown:
        raise ApiError(400, "invalid_request", f"status: unknown {unknown}; use {', '.join(JOB_STATUSES)}")
    if sort_by not in ("created_at", "execution_duration") or sort_order not in ("asc", "desc"):
        raise ApiError(400, "invalid_request", "sort_by is created_at or execution_duration, sort_order asc or desc")
    listed = [comfy_job(job) for job in service.jobs.jobs.values()]
    listed = [job for job in listed if job["status"] in wanted
              and (workflow_id is None or job.get("workflow_id") == workflow_id)]

    def duration(job):
        return (job.get("execution_end_time") or 0) - (job.get("execution_start_time") or 0)

    listed.sort(key=duration if sort_by == "execution_duration" else (lambda job: job["create_time"]),
                reverse=sort_order == "desc")
    total = len(listed)
    listed = listed[offset:]
    if limit is not None:
        listed = listed[:limit]
    return {"jobs": listed, "pagination": {"offset": offset, "limit": limit, "total": total,
                                           "has_more": offset + len(listed) < total}}


@router.get("/api/jobs/{job_id}")
async def comfy_job_detail(job_id: str, service: Service = Depends(get_service)) -> dict:
    job = service.jobs.get(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id!r}")
    return comfy_job(job, include_outputs=True)


@router.get("/api/global_subgraphs")
async def global_subgraphs() -> dict:
    return {}  # subgraph blueprints shipped by custom nodes: none


# ------------------------------------------------------------------ the editor's files and sign-in


def editor_page(request: Request) -> Response:
    """The editor, or the sign-in page when the server has a key and the browser no session."""
    from fastapi.responses import RedirectResponse

    from ryla.api.auth import cookie_matches, key_matches

    api_key = request.app.state.service.settings.api_key
    if api_key and not (cookie_matches(request.headers.get("cookie", ""), api_key)
                        or key_matches(request.headers.get("authorization", ""), api_key)):
        return RedirectResponse("/login", status_code=303)
    return FileResponse(frontend_root() / "index.html", headers={"Cache-Control": "no-cache"})


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>ryla: sign in</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>body{font:16px system-ui,sans-serif;background:#171718;color:#eee;display:grid;place-items:center;
height:100vh;margin:0}form{display:grid;gap:.8em;width:20em}input,button{font:inherit;padding:.5em}
p.error{color:#f77}</style></head><body><form method="post" action="/login">
<h1>ryla</h1><label for="key">This server's API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>{error}</form></body></html>"""
LOGIN_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                            "frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


@router.get("/login")
async def login_page() -> Response:
    return Response(LOGIN_PAGE.replace("{error}", ""), media_type="text/html; charset=utf-8", headers=LOGIN_HEADERS)


@router.post("/login")
async def login(request: Request, service: Service = Depends(get_service)) -> Response:
    """The editor's sign-in: the key from the form, checked, exchanged for a session cookie."""
    import hmac
    from urllib.parse import parse_qs

    from fastapi.responses import RedirectResponse

    from ryla.api.auth import SESSION_COOKIE, session_token

    api_key = service.settings.api_key
    if api_key is None:
        return RedirectResponse("/", status_code=303)
    body = (await request.body())[:4096].decode("utf-8", "replace")
    given = (parse_qs(body).get("key") or [""])[0]
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        page = LOGIN_PAGE.replace("{error}", '<p class="error">That is not this server\'s key.</p>')
        return Response(page, status_code=401, media_type="text/html; charset=utf-8", headers=LOGIN_HEADERS)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(SESSION_COOKIE, session_token(api_key), httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", max_age=30 * 86400, path="/")
    return response


@router.get("/user.css")
async def user_css() -> Response:
    return Response("", media_type="text/css")  # ComfyUI's optional user stylesheet (none)


# Registered after every other route (app.py): the editor's files at the top level.
static_router = APIRouter(include_in_schema=False)


@static_router.get("/{name:path}")
async def editor_file(name: str, request: Request) -> Response:
    if frontend_root() is None or not (frontend_root() / os.path.normpath(unquote(name))).is_file():
        # A path another route serves with other methods stays a 405, as without this route.
        from starlette.routing import Match

        for route in request.app.router.routes:
            if route is not request.scope.get("route") and route.matches(request.scope)[0] == Match.PARTIAL:
                raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed on /{name}")
    return static_file(name)


def static_file(name: str) -> Response:
    root = frontend_root()
    if root is None:
        raise ApiError(404, "not_found", f"no such path /{name}")
    path = (root / os.path.normpath(unquote(name))).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        raise ApiError(404, "not_found", f"no such path /{name}")
    return FileResponse(path)
