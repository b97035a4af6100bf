"""ComfyUI's server API on ryla's job store: the paths, bodies, status codes and message shapes
of ComfyUI's server.py, so ComfyUI clients (comfy-api-simplified, ComfyUI's
script_examples/websockets_api_example.py, RunPod's and Salad's workers, Modal's example) work
unchanged. Every route is also served under /api, as ComfyUI's newer frontend calls them.

What differs: validation errors come from ryla's node set; binary preview frames are not sent
on the websocket; `/free` answers 200 and frees nothing (models stay loaded for the next job).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import platform
import sys
from typing import Any

from fastapi import APIRouter, Depends, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError

from ryla.api.auth import websocket_authorized
from ryla.api.errors import INVALID_JSON, ApiError
from ryla.api.service import Service, get_service
from ryla.api.storage import UnsafePath
from ryla.graph.executor import RunContext
from ryla.imaging import ImageError, decode_image
from ryla.models.store import FOLDERS, GGUF_FOLDERS

log = logging.getLogger(__name__)

router = APIRouter(tags=["comfyui"])

# ComfyUI's legacy folder names (folder_paths.map_legacy).
LEGACY_FOLDERS = {"unet": "diffusion_models", "clip": "text_encoders"}


async def json_body(request: Request, default: Any = None) -> Any:
    body = await request.body()
    if not body.strip():
        return default
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8 or JSON, a huge number, nesting too deep
        raise ApiError(400, "invalid_json", INVALID_JSON)


def _ok() -> Response:
    return Response(status_code=200)


# ---------------------------------------------------------------------- queueing and results

@router.post("/prompt", summary="Queue a workflow (ComfyUI's POST /prompt)")
async def post_prompt(request: Request, service: Service = Depends(get_service)) -> dict:
    body = await json_body(request, {})
    if not isinstance(body, dict) or "prompt" not in body:
        error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}
        return JSONResponse({"error": error, "node_errors": {}}, status_code=400)
    extra_data = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
    if body.get("client_id") is not None:
        extra_data["client_id"] = str(body["client_id"])
    number = body.get("number")
    if number is not None:
        try:
            number = float(number)
        except (TypeError, ValueError):
            raise ApiError(400, "invalid_request", "number: expected a number")
    job = await service.submit(request, body["prompt"], "prompt", extra_data=extra_data, number=number,
                               front=bool(body.get("front")))
    return {"prompt_id": job.id, "number": job.number, "node_errors": {}}


@router.get("/prompt", summary="Queue length (ComfyUI's GET /prompt)")
async def get_prompt(service: Service = Depends(get_service)) -> dict:
    return service.jobs.queue_info()


@router.get("/queue", summary="Running and pending jobs (ComfyUI's queue items)")
async def get_queue(service: Service = Depends(get_service)) -> dict:
    return {"queue_running": [job.queue_item() for job in service.jobs.running()],
            "queue_pending": [job.queue_item() for job in service.jobs.pending()]}


@router.post("/queue", summary="Clear the queue or delete pending jobs")
async def post_queue(request: Request, service: Service = Depends(get_service)) -> Response:
    body = await json_body(request, {})
    if isinstance(body, dict):
        if body.get("clear"):
            for job in service.jobs.pending():
                service.delete_pending(job)
        for job_id in body.get("delete") or []:
            if isinstance(job_id, str) and (job := service.jobs.get(job_id)) is not None:
                service.delete_pending(job)
        service.jobs.broadcast_status()
    return _ok()


@router.post("/interrupt", summary="Stop the running job (or the one named by prompt_id)")
async def post_interrupt(request: Request, service: Service = Depends(get_service)) -> Response:
    body = await json_body(request, {})
    wanted = body.get("prompt_id") if isinstance(body, dict) else None
    for job in service.jobs.running():
        if wanted is None or job.id == wanted:
            log.info("[%s] interrupted", job.request_id)
            service.cancel(job, reason="interrupted", interrupted=True)
    return _ok()


@router.post("/free", summary="Accepted; ryla keeps its models loaded")
async def post_free(request: Request) -> Response:
    await json_body(request, {})
    return _ok()


@router.get("/history", summary="Finished jobs, oldest first (ComfyUI's history)")
async def get_history(max_items: int | None = None, offset: int = 0, service: Service = Depends(get_service)) -> dict:
    if max_items is not None and max_items < 0 or offset < 0:
        raise ApiError(400, "invalid_request", "max_items and offset must be >= 0")
    return service.jobs.history(max_items=max_items, offset=offset)


@router.get("/history/{prompt_id}", summary="One finished job")
async def get_history_item(prompt_id: str, service: Service = Depends(get_service)) -> dict:
    job = service.jobs.get(prompt_id)
    if job is None or not job.done or job.status == "cancelled":
        return {}
    return {job.id: job.history_entry()}


@router.post("/history", summary="Clear the history or delete entries")
async def post_history(request: Request, service: Service = Depends(get_service)) -> Response:
    body = await json_body(request, {})
    if isinstance(body, dict):
        finished = [job for job in service.jobs.jobs.values() if job.done]
        if body.get("clear"):
            for job in finished:
                service.jobs.forget(job)
        for job_id in body.get("delete") or []:
            job = service.jobs.get(job_id) if isinstance(job_id, str) else None
            if job is not None and job.done:
                service.jobs.forget(job)
    return _ok()


# ---------------------------------------------------------------------- files

@router.get("/view", summary="An image from the output, temp or input folder",
            response_class=Response, responses={200: {"content": {"image/png": {}}}})
async def view(request: Request, filename: str, subfolder: str = "", type: str = "output",
               preview: str | None = None, channel: str | None = None,
               service: Service = Depends(get_service)) -> Response:
    name, annotated = _annotated(filename)
    kind = annotated or type
    if kind not in ("output", "temp", "input"):
        raise ApiError(400, "invalid_request", f"type: must be output, temp or input, got {kind!r}")
    if not name or name.startswith("/") or ".." in name:
        raise ApiError(400, "invalid_request", f"filename {filename!r} is not a plain file name")
    try:
        path = service.folders.resolve(kind, subfolder, name)
    except UnsafePath as exc:
        raise ApiError(403, "forbidden", str(exc))
    if not path.is_file():
        raise ApiError(404, "not_found", f"no {kind} file {os.path.join(subfolder, name)!r}")
    headers = {"Content-Disposition": content_disposition(path.name)}
    if preview is None and channel in (None, "rgba"):
        return FileResponse(path, headers=headers)
    if channel not in (None, "rgba", "rgb", "a"):
        raise ApiError(400, "invalid_request", f"channel: must be rgba, rgb or a, got {channel!r}")
    return await asyncio.to_thread(_converted, path, preview, channel, headers)


def content_disposition(name: str) -> str:
    """A file name in a header: an ASCII fallback and the exact name percent-encoded (RFC 6266),
    so no name can break the header."""
    from urllib.parse import quote

    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _annotated(filename: str) -> tuple[str, str | None]:
    """ComfyUI's annotated names: 'x.png [output]' names a file in another folder."""
    for kind in ("output", "input", "temp"):
        suffix = f" [{kind}]"
        if filename.endswith(suffix):
            return filename[: -len(suffix)], kind
    return filename, None


def _converted(path, preview: str | None, channel: str | None, headers: dict) -> Response:
    """ComfyUI's /view conversions: `preview=webp;90` (or jpeg) re-encodes, `channel=rgb` drops
    alpha, `channel=a` returns the alpha as an RGBA image's alpha."""
    try:
        with Image.open(path) as opened:
            image = opened.copy()
    except (UnidentifiedImageError, OSError):
        raise ApiError(415, "unsupported_media_type", f"{path.name} is not an image")
    buffer = io.BytesIO()
    if preview is not None:
        parts = preview.split(";")
        fmt = parts[0] if parts[0] in ("webp", "jpeg") and channel != "a" else "webp"
        quality = int(parts[-1]) if parts[-1].isdigit() else 90
        if fmt == "jpeg" or channel == "rgb":
            image = image.convert("RGB")
        image.save(buffer, format=fmt.upper(), quality=min(quality, 100))
        headers = {"Content-Disposition": content_disposition(f"{path.stem}.{fmt}")}
        return Response(buffer.getvalue(), media_type=f"image/{fmt}", headers=headers)
    if channel == "rgb":
        image.convert("RGB").save(buffer, format="PNG")
    else:  # "a"
        alpha = image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)
        out = Image.new("RGBA", image.size)
        out.putalpha(alpha)
        out.save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png", headers=headers)


async def _form(request: Request, service: Service):
    try:
        return await request.form(max_files=1, max_fields=16, max_part_size=service.settings.max_body_bytes)
    except Exception as exc:  # python-multipart's errors for a body that is not multipart
        raise ApiError(400, "invalid_request", f"expected a multipart/form-data body with an 'image' file: {exc}")


def _upload_target(form) -> tuple[Any, str, str, bool]:
    image = form.get("image")
    if image is None or isinstance(image, str) or not image.filename:
        raise ApiError(400, "invalid_request", "image: a file is required (multipart field 'image')")
    subfolder = form.get("subfolder") or ""
    kind = form.get("type") or "input"
    overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
    return image, str(subfolder), str(kind), overwrite


@router.post("/upload/image", summary="Upload an image for LoadImage (multipart 'image')")
async def upload_image(request: Request, service: Service = Depends(get_service)) -> dict:
    form = await _form(request, service)
    image, subfolder, kind, overwrite = _upload_target(form)
    data = await image.read()
    try:  # the one decoder every incoming image goes through: refuse what LoadImage could not read
        await asyncio.to_thread(decode_image, data, service.settings.max_image_pixels)
    except ImageError as exc:
        raise ApiError(422, "invalid_image", f"image: {exc}", {"errors": [{"field": "image", "message": str(exc)}]})
    try:
        stored = await asyncio.to_thread(service.folders.upload, data, image.filename, subfolder, kind, overwrite)
    except UnsafePath as exc:
        raise ApiError(400, "invalid_request", str(exc))
    return {"name": stored.filename, "subfolder": stored.subfolder, "type": stored.type}


@router.post("/upload/mask", summary="Upload a mask: its alpha applied to an earlier image (original_ref)")
async def upload_mask(request: Request, service: Service = Depends(get_service)) -> dict:
    form = await _form(request, service)
    image, subfolder, kind, overwrite = _upload_target(form)
    try:
        ref = json.loads(form.get("original_ref") or "")
        ref_name, annotated = _annotated(str(ref["filename"]))
        original = service.folders.resolve(annotated or ref.get("type", "output"), ref.get("subfolder", ""), ref_name)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ApiError(400, "invalid_request", "original_ref: a JSON object with the original image's filename")
    except UnsafePath as exc:
        raise ApiError(403, "forbidden", str(exc))
    if not original.is_file():
        raise ApiError(404, "not_found", f"original_ref: no file {ref_name!r}")
    mask_bytes = await image.read()

    def compose() -> bytes:
        with Image.open(original) as base, Image.open(io.BytesIO(mask_bytes)) as mask:
            out = base.convert("RGBA")
            out.putalpha(mask.convert("RGBA").getchannel("A").resize(out.size))
        buffer = io.BytesIO()
        out.save(buffer, format="PNG", compress_level=4)
        return buffer.getvalue()

    try:
        data = await asyncio.to_thread(compose)
        stored = await asyncio.to_thread(service.folders.upload, data, image.filename, subfolder, kind, overwrite)
    except (UnidentifiedImageError, OSError) as exc:
        raise ApiError(422, "invalid_image", f"image: {exc}")
    except UnsafePath as exc:
        raise ApiError(400, "invalid_request", str(exc))
    return {"name": stored.filename, "subfolder": stored.subfolder, "type": stored.type}


# ---------------------------------------------------------------------- what the server has

@router.get("/object_info", summary="Supported nodes, in ComfyUI's /object_info shape")
async def object_info(service: Service = Depends(get_service)) -> dict:
    return service.runtime.registry.object_info(_info_context(service))


@router.get("/object_info/{node_class}", summary="One node's info; {} when there is no such node (as ComfyUI)")
async def object_info_node(node_class: str, service: Service = Depends(get_service)) -> dict:
    if node_class not in service.runtime.registry:
        return {}
    return {node_class: service.runtime.registry.object_info(_info_context(service))[node_class]}


def _info_context(service: Service) -> RunContext:
    return RunContext(engine=service.runtime.engine, input_dir=service.folders.folder("input"))


@router.get("/models", summary="Model folder names (ComfyUI's list, with ComfyUI-GGUF's unet_gguf and clip_gguf)")
async def model_folders() -> list[str]:
    return sorted(set(FOLDERS) | set(LEGACY_FOLDERS) | set(GGUF_FOLDERS))


@router.get("/models/{folder}", summary="The files of one model folder that its loaders can load")
async def model_files(folder: str, service: Service = Depends(get_service)) -> list[str]:
    kind = LEGACY_FOLDERS.get(folder, folder)
    if kind not in FOLDERS and kind not in GGUF_FOLDERS:
        raise ApiError(404, "not_found", f"no model folder {folder!r}")
    return service.runtime.store.listing(kind)


@router.get("/embeddings", summary="Textual-inversion embeddings (none: FLUX has no use for them)")
async def embeddings() -> list[str]:
    return []


@router.get("/extensions", summary="Frontend extensions (none)")
async def extensions() -> list[str]:
    return []


@router.get("/features", summary="Server feature flags, as ComfyUI reports them")
async def features(service: Service = Depends(get_service)) -> dict:
    return {"supports_preview_metadata": False, "max_upload_size": service.settings.max_body_bytes}


@router.get("/system_stats", summary="System and device memory (ComfyUI's shape)")
async def system_stats(service: Service = Depends(get_service)) -> dict:
    import psutil
    import torch

    device = service.runtime.engine.device
    memory = psutil.virtual_memory()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = f"{device} {torch.cuda.get_device_name(device)}"
        torch_total = torch.cuda.memory_reserved(device)
        torch_free = torch_total - torch.cuda.memory_allocated(device)
    else:
        free, total, name = memory.available, memory.total, "cpu"
        torch_free = torch_total = 0
    from ryla import __version__

    return {
        "system": {"os": os.name, "ram_total": memory.total, "ram_free": memory.available,
                   "comfyui_version": f"ryla {__version__}", "python_version": sys.version,
                   "pytorch_version": torch.__version__, "embedded_python": False, "argv": [],
                   "platform": platform.platform()},
        "devices": [{"name": name, "type": device.type, "index": device.index, "vram_total": total,
                     "vram_free": free, "torch_vram_total": torch_total, "torch_vram_free": torch_free}],
    }


# ---------------------------------------------------------------------- the websocket

@router.websocket("/ws")
async def websocket_events(websocket: WebSocket) -> None:
    """ComfyUI's event socket: `status` on connect and whenever the queue changes; a job's
    `execution_start`, `execution_cached`, `executing`, `progress`, `executed`,
    `execution_success` / `execution_error` / `execution_interrupted` to the socket of the
    job's client_id (every socket when the job has none)."""
    service: Service = websocket.app.state.service
    if not websocket_authorized(websocket, service.settings.api_key):
        await websocket.close(code=4401, reason="missing or wrong API key")
        return
    await websocket.accept()
    client_id = websocket.query_params.get("clientId") or os.urandom(16).hex()
    messages = service.jobs.connect(client_id)
    try:
        await websocket.send_json({"type": "status", "data": {"status": service.jobs.queue_info(), "sid": client_id}})
        running = [job for job in service.jobs.running() if job.client_id == client_id and job.current_node]
        for job in running:  # a reconnect mid-job learns where the job is
            await websocket.send_json({"type": "executing", "data": {"node": job.current_node,
                                                                     "display_node": job.current_node,
                                                                     "prompt_id": job.id}})
        receiver = asyncio.create_task(_drain_client(websocket))
        try:
            while not receiver.done():
                getter = asyncio.ensure_future(messages.get())
                done, _ = await asyncio.wait({getter, receiver}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    await websocket.send_json(getter.result())
                else:
                    getter.cancel()
        finally:
            receiver.cancel()
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        service.jobs.disconnect(client_id, messages)


async def _drain_client(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends, so a close is noticed."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
