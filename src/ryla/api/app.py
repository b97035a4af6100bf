"""The HTTP API: `create_app(runtime, settings)` builds the FastAPI app served by `ryla serve`
and by the Modal deployment.

Typed endpoints are thin: validate the request, fill a workflow template, and hand the graph
to the same executor as /workflow, through the GPU work queue.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from ryla import catalogue, imaging
from ryla.api import errors
from ryla.api.errors import ApiError
from ryla.api.metrics import Metrics
from ryla.api.middleware import GuardMiddleware
from ryla.api.schemas import (ErrorResponse, FluxDevRequest, FluxInstantIdRequest, FluxLoraRequest, HealthResponse,
                              ImagesResponse, LoraInfo, LoraList)
from ryla.api.work_queue import QueueFull, WorkQueue
from ryla.flux.engine import Cancelled
from ryla.graph.executor import ExecutionError, RunContext
from ryla.runtime import RunResult, Runtime, random_seed
from ryla.flux.lora import LoraFormatError
from ryla.models.loras import InvalidLoraId, LoraExists, LoraNotFound, check_id, id_from_filename
from ryla.workflows import FLUX_DEV, flux_instantid_graph, flux_lora_graph, with_trigger_words

log = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_queue: int = 8  # requests waiting for the GPU beyond the one running
    request_timeout_s: float = 300.0
    max_body_bytes: int = 32 * MB
    max_lora_bytes: int = 2048 * MB  # a rank-128 FLUX LoRA is ~1.3 GB
    max_image_bytes: int = 10 * MB  # decoded reference / pose photo
    preload: bool = True

    @classmethod
    def from_env(cls, **overrides) -> ServerSettings:
        values: dict[str, Any] = {"api_key": os.environ.get("RYLA_API_KEY") or None}
        for name, env, cast in (("max_queue", "RYLA_MAX_QUEUE", int),
                                ("request_timeout_s", "RYLA_REQUEST_TIMEOUT", float),
                                ("max_body_bytes", "RYLA_MAX_BODY_BYTES", int),
                                ("max_lora_bytes", "RYLA_MAX_LORA_BYTES", int)):
            if os.environ.get(env):
                values[name] = cast(os.environ[env])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class Timings:
    queue: float = 0.0
    generation: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {"queue_s": round(self.queue, 4), "generation_s": round(self.generation, 4),
                "total_s": round(self.queue + self.generation, 4), **self.extra}


class Service:
    """What the routes share: the runtime, the queue and the metrics."""

    def __init__(self, runtime: Runtime, settings: ServerSettings, metrics: Metrics):
        self.runtime, self.settings, self.metrics = runtime, settings, metrics
        self.queue = WorkQueue(max_waiting=settings.max_queue)

    async def run_graph(self, request: Request, graph: dict, endpoint: str,
                        request_images: dict[str, bytes] | None = None) -> tuple[RunResult, Timings]:
        """Validate now (a bad graph gets its 400 without waiting in line), then run on the GPU
        worker; cancel if the client leaves or the time limit passes."""
        request_id = request.state.request_id
        context = self.runtime.context(request_id=request_id, request_images=request_images or {})
        validated = self.runtime.validate(graph, context)

        def work(cancel: threading.Event) -> RunResult:
            context.cancel = cancel
            return self.runtime.execute(validated, context)

        try:
            job = self.queue.submit(work, request_id)
        except QueueFull as full:
            raise ApiError(429, "queue_full", "the server is busy: too many requests waiting for the GPU",
                           {"queue_depth": self.queue.depth}, headers={"Retry-After": str(full.retry_after)})
        self.metrics.queue_depth.set(self.queue.depth)
        try:
            result = await self._wait(request, job)
        except Cancelled:
            raise ApiError(504, "timeout", f"generation did not finish within {self.settings.request_timeout_s:g}s")
        except ExecutionError as exc:
            if exc.user_error is not None:
                err = exc.user_error
                raise ApiError(err.status, err.type, err.message, err.details or None)
            if isinstance(exc.cause, Cancelled):
                raise ApiError(504, "timeout",
                               f"generation did not finish within {self.settings.request_timeout_s:g}s")
            raise
        finally:
            self.metrics.queue_depth.set(self.queue.depth)
        self.metrics.queue_wait_seconds.observe(job.wait_seconds)
        self.metrics.generation_seconds.labels(endpoint=endpoint).observe(job.run_seconds)
        return result, Timings(queue=job.wait_seconds, generation=job.run_seconds)

    async def _wait(self, request: Request, job):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.queue.abandon(job)
                raise Cancelled()
            done, _ = await asyncio.wait({job.future}, timeout=min(0.2, remaining))
            if done:
                try:
                    return job.future.result()
                except asyncio.CancelledError:
                    raise Cancelled()
            if await request.is_disconnected():
                self.queue.abandon(job)
                log.info("[%s] client disconnected; generation cancelled", job.request_id)
                raise ApiError(499, "client_closed_request", "the client closed the connection")


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


def _static(name: str) -> bytes:
    from importlib import resources

    return resources.files("ryla.api").joinpath("static", name).read_bytes()


def _ascii(text: str) -> str:
    """A header-safe rendering (HTTP headers are latin-1)."""
    return text.encode("ascii", "backslashreplace").decode()[:1000]


def image_response(request: Request, images, *, seeds: list[int | None], fmt: str, quality: int,
                   timings: Timings, headers: dict[str, str] | None = None) -> Response:
    """One image as bytes; several, or `Accept: application/json`, as JSON with base64."""
    headers = dict(headers or {})
    headers["X-Generation-Time"] = f"{timings.generation:.3f}"
    headers["X-Queue-Time"] = f"{timings.queue:.3f}"
    encoded = [imaging.encode(image, fmt, quality) for image in images]
    wants_json = "application/json" in request.headers.get("accept", "").lower() or len(encoded) != 1
    if seeds and seeds[0] is not None:
        headers["X-Seed"] = str(seeds[0])
    if not wants_json:
        return Response(encoded[0], media_type=imaging.media_type(fmt), headers=headers)
    body = ImagesResponse(
        images=[{"data": base64.b64encode(data).decode(), "seed": seed, "width": image.width,
                 "height": image.height, "format": fmt}
                for data, image, seed in zip(encoded, images, seeds)],
        request_id=request.state.request_id,
        timings=timings.as_dict(),
    )
    return JSONResponse(body.model_dump(), headers=headers)


IMAGE_RESPONSES = {
    200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {},
                      "application/json": {"schema": ImagesResponse.model_json_schema()}},
          "description": "The image (default), or JSON with base64 images (Accept: application/json, "
                         "or more than one image)."},
    422: {"model": ErrorResponse, "description": "An invalid field; the message names it."},
    429: {"model": ErrorResponse, "description": "Queue full; retry after the Retry-After header's seconds."},
    504: {"model": ErrorResponse, "description": "Generation exceeded the server's time limit."},
}


def create_app(runtime: Runtime, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings.from_env()
    metrics = Metrics()
    service = Service(runtime, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        default_checkpoint = FLUX_DEV.graph["1"]["inputs"]["ckpt_name"]
        if settings.preload and default_checkpoint in runtime.store.list("checkpoints"):
            # Load the default model before serving, so the first request does not pay for it
            # and /health reports it. A broken file stops the server here, not at a request.
            await asyncio.to_thread(runtime.engine.load_checkpoint, default_checkpoint)
        yield
        service.queue.close()

    app = FastAPI(
        title="ryla",
        summary="FLUX.1-dev image generation API: text-to-image, identity, LoRAs and ComfyUI workflows.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = service
    errors.install(app)
    # The playground page is public (it holds no data; it asks for the key and sends it).
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, api_key=settings.api_key,
                       metrics=metrics, upload_paths={"/loras": settings.max_lora_bytes},
                       public_paths=("/health", "/", *(f"/static/{name}" for name in STATIC_FILES)))

    @app.post("/flux-dev", responses=IMAGE_RESPONSES, response_class=Response, tags=["generate"],
              summary="Text-to-image with FLUX.1-dev")
    async def flux_dev(body: FluxDevRequest, request: Request) -> Response:
        seed = body.seed if body.seed is not None else random_seed()
        graph = FLUX_DEV.fill(**body.template_params(seed))
        result, timings = await service.run_graph(request, graph, "flux-dev")
        return image_response(request, result.images, seeds=[seed] * len(result.images), fmt=body.output_format,
                              quality=body.quality, timings=timings)

    @app.post("/workflow", responses={**IMAGE_RESPONSES, 400: {"description": "ComfyUI's validation error shape: "
                                                                              "{error, node_errors}."}},
              response_class=Response, tags=["generate"], summary="Run a ComfyUI API-format workflow")
    async def workflow(request: Request,
                       body: dict[str, Any] = Body(..., description="The workflow graph, bare or as ComfyUI's "
                                                   "/prompt body {\"prompt\": {...}}. The wrapped form may add "
                                                   "\"images\": {name: base64 or data URL} for LoadImage nodes."),
                       output_format: str = Query("png", pattern="^(jpeg|png|webp)$",
                                                  description=catalogue.OUTPUT_FORMAT.description),
                       quality: int = Query(catalogue.QUALITY.default, ge=catalogue.QUALITY.min,
                                            le=catalogue.QUALITY.max)) -> Response:
        wrapped = isinstance(body.get("prompt"), dict)
        graph = body["prompt"] if wrapped else body
        uploads = body.get("images") if wrapped else None
        if uploads is not None and not (isinstance(uploads, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in uploads.items()) and len(uploads) <= 8):
            raise ApiError(422, "invalid_request", "images: an object of up to 8 {name: base64 image}",
                           {"errors": [{"field": "images", "message": "expected {name: base64}"}]})
        images = {name: photo(f"images.{name}", data) for name, data in (uploads or {}).items()}
        result, timings = await service.run_graph(request, graph, "workflow", request_images=images)
        if not result.images:
            raise ApiError(422, "no_images", "the workflow ran but its output nodes produced no images")
        return image_response(request, result.images, seeds=[None] * len(result.images), fmt=output_format,
                              quality=quality, timings=timings)

    def lora_entry(lora_id: str) -> dict:
        try:
            return runtime.loras.get(lora_id)
        except InvalidLoraId as exc:
            raise ApiError(422, "invalid_lora_id", str(exc))
        except LoraNotFound as exc:
            raise ApiError(404, "lora_not_found", str(exc), {"lora_id": lora_id})

    @app.post("/flux-lora", responses={**IMAGE_RESPONSES, 404: {"model": ErrorResponse,
                                                                "description": "lora_not_found"}},
              response_class=Response, tags=["generate"], summary="Text-to-image with one or more character LoRAs")
    async def flux_lora(body: FluxLoraRequest, request: Request) -> Response:
        refs = [(body.lora_id, body.lora_strength)] + [(ref.id, ref.strength) for ref in body.loras]
        entries = [lora_entry(lora_id) for lora_id, _ in refs]
        if body.trigger_word is not None:
            words = [body.trigger_word] + [e.get("trigger_word") for e in entries[1:]]
        else:
            words = [e.get("trigger_word") for e in entries]
        seed = body.seed if body.seed is not None else random_seed()
        params = body.template_params(seed)
        params["prompt"] = with_trigger_words(body.prompt, [w for w in words if w])
        graph = flux_lora_graph([(e["file"], strength) for e, (_, strength) in zip(entries, refs)], **params)
        result, timings = await service.run_graph(request, graph, "flux-lora")
        return image_response(request, result.images, seeds=[seed] * len(result.images), fmt=body.output_format,
                              quality=body.quality, timings=timings, headers={"X-Prompt": _ascii(params["prompt"])})

    def photo(field_name: str, data: str) -> bytes:
        """Decode a base64 / data-URL photo now, so a bad one is refused before queueing."""
        from ryla.identity.faces import ImageError, decode_image

        text = data.split(",", 1)[1] if data.startswith("data:") else data
        if len(text) * 3 // 4 > settings.max_image_bytes:
            raise ApiError(413, "image_too_large", f"{field_name}: over the limit of {settings.max_image_bytes} bytes")
        try:
            raw = base64.b64decode(text.strip(), validate=True)
            decode_image(raw)
        except (ValueError, ImageError) as exc:
            message = str(exc) if isinstance(exc, ImageError) else "not valid base64 (or a data: URL)"
            raise ApiError(422, "invalid_image", f"{field_name}: {message}",
                           {"errors": [{"field": field_name, "message": message}]})
        return raw

    @app.post("/flux-instantid", responses={**IMAGE_RESPONSES, 413: {"model": ErrorResponse}},
              response_class=Response, tags=["generate"],
              summary="Text-to-image that keeps the face of a reference photo (InstantID recipe on FLUX)")
    async def flux_instantid(body: FluxInstantIdRequest, request: Request) -> Response:
        images = {"reference": photo("reference_image", body.reference_image)}
        if body.pose_image:
            images["pose"] = photo("pose_image", body.pose_image)
        seed = body.seed if body.seed is not None else random_seed()
        graph = flux_instantid_graph(pose="pose" in images, **body.template_params(seed),
                                     instantid_strength=body.instantid_strength,
                                     controlnet_strength=body.controlnet_strength,
                                     face_provider="CUDA" if body.face_provider == "gpu" else "CPU")
        result, timings = await service.run_graph(request, graph, "flux-instantid", request_images=images)
        headers = {"X-Faces-Found": str(result.annotations.get("faces_found", 0))}
        return image_response(request, result.images, seeds=[seed] * len(result.images), fmt=body.output_format,
                              quality=body.quality, timings=timings, headers=headers)

    @app.get("/loras", response_model=LoraList, tags=["loras"], summary="LoRAs in the store")
    async def list_loras() -> dict:
        return {"loras": await asyncio.to_thread(runtime.loras.list)}

    @app.post("/loras", status_code=201, response_model=LoraInfo, tags=["loras"],
              summary="Upload a LoRA (.safetensors, multipart field 'file'; optional 'id', 'trigger_word')",
              responses={413: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                         422: {"model": ErrorResponse, "description": "not a FLUX LoRA, or a bad id"}})
    async def upload_lora(request: Request) -> dict:
        from starlette.requests import ClientDisconnect

        from ryla.api.middleware import BodyTooLarge

        try:
            form = await request.form(max_files=1, max_fields=4)
        except BodyTooLarge:
            raise ApiError(413, "payload_too_large", f"LoRA upload over the limit of {settings.max_lora_bytes} bytes")
        except ClientDisconnect:
            raise ApiError(400, "upload_incomplete", "the upload was cut off; nothing was stored")
        except Exception as exc:  # malformed multipart bodies
            raise ApiError(422, "invalid_request", f"expected a multipart/form-data upload: {exc}")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "invalid_request", "file: a .safetensors file is required (multipart field 'file')",
                           {"errors": [{"field": "file", "message": "required"}]})
        raw_id = form.get("id")
        trigger = form.get("trigger_word")
        try:
            lora_id = check_id(raw_id) if isinstance(raw_id, str) and raw_id else id_from_filename(upload.filename or "")
        except InvalidLoraId as exc:
            raise ApiError(422, "invalid_lora_id", str(exc), {"errors": [{"field": "id", "message": str(exc)}]})
        if isinstance(trigger, str) and len(trigger) > 100:
            raise ApiError(422, "invalid_request", "trigger_word: at most 100 characters")

        def chunks():
            upload.file.seek(0)
            while chunk := upload.file.read(1 << 20):
                yield chunk

        try:
            return await asyncio.to_thread(runtime.loras.add_chunks, chunks(), lora_id,
                                           trigger if isinstance(trigger, str) else None)
        except LoraExists as exc:
            raise ApiError(409, "lora_exists", str(exc))
        except LoraFormatError as exc:
            raise ApiError(422, "invalid_lora", f"not a FLUX LoRA for this model: {exc}")
        finally:
            await upload.close()

    @app.delete("/loras/{lora_id}", status_code=204, tags=["loras"], response_class=Response)
    async def delete_lora(lora_id: str) -> Response:
        try:
            await asyncio.to_thread(runtime.loras.remove, lora_id)
        except InvalidLoraId as exc:
            raise ApiError(422, "invalid_lora_id", str(exc))
        except LoraNotFound as exc:
            raise ApiError(404, "lora_not_found", str(exc), {"lora_id": lora_id})
        return Response(status_code=204)

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in STATIC_FILES:
            raise ApiError(404, "not_found", f"no static file {name!r}")
        return Response(_static(name), media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

    @app.get("/health", response_model=HealthResponse, tags=["service"])
    async def health() -> dict:
        return {"status": "ok", "model_set": "tiny" if runtime.store.tiny else "real",
                "models_dir": str(runtime.store.root), "loaded_models": runtime.engine.loaded_models(),
                "queue_depth": service.queue.depth, "device": str(runtime.engine.device),
                "speed": runtime.engine.speed_info}

    @app.get("/models", tags=["service"], summary="Model files in the store, by folder")
    async def models() -> dict:
        return {"models_dir": str(runtime.store.root), "tiny": runtime.store.tiny,
                "folders": runtime.store.inventory()}

    @app.get("/object_info", tags=["service"], summary="Supported nodes, in ComfyUI's /object_info shape")
    async def object_info() -> dict:
        return runtime.registry.object_info(RunContext(engine=runtime.engine))

    @app.get("/object_info/{node_class}", tags=["service"])
    async def object_info_node(node_class: str) -> dict:
        if node_class not in runtime.registry:
            raise ApiError(404, "not_found", f"no node class {node_class!r}")
        return {node_class: runtime.registry.object_info(RunContext(engine=runtime.engine))[node_class]}

    @app.get("/metrics", tags=["service"], summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        metrics.queue_depth.set(service.queue.depth)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app
