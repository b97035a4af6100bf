"""The HTTP API: `create_app(runtime, settings)` builds the FastAPI app served by `ryla serve`
and by the Modal deployment.

Typed endpoints are thin: validate the request, fill a workflow template, and hand the graph
to the same executor as /workflow, through the GPU work queue (ryla.api.service).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Body, FastAPI, Query, Request
from fastapi.responses import Response

from ryla import catalogue
from ryla.api import errors
from ryla.api.errors import ApiError
from ryla.api.metrics import Metrics
from ryla.api.middleware import GuardMiddleware
from ryla.api.playground import PAGE_HEADERS, STATIC_FILES, read_static
from ryla.api.responses import IMAGE_RESPONSES, header_safe, image_response
from ryla.api.schemas import (ErrorResponse, FluxDevRequest, FluxInstantIdRequest, FluxLoraRequest, HealthResponse,
                              LoraInfo, LoraList)
from ryla.api.service import ServerSettings, Service
from ryla.flux.lora import LoraFormatError
from ryla.graph.executor import RunContext
from ryla.models.loras import InvalidLoraId, LoraExists, LoraNotFound, check_id, id_from_filename
from ryla.runtime import Runtime, random_seed
from ryla.workflows import FLUX_DEV, flux_instantid_graph, flux_lora_graph, with_trigger_words

log = logging.getLogger(__name__)

__all__ = ["ServerSettings", "create_app"]


def create_app(runtime: Runtime, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings.from_env()
    metrics = Metrics()
    service = Service(runtime, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        default_checkpoint = FLUX_DEV.graph["1"]["inputs"]["ckpt_name"]
        if settings.preload and default_checkpoint in runtime.store.list("checkpoints"):
            # Load the default model (and, in a compiled speed mode, compile it for 1024x1024)
            # before serving, so the first request does not pay for it and /health means
            # ready. A broken file stops the server here, not at a request.
            await asyncio.to_thread(runtime.engine.preload, default_checkpoint)
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
                              quality=body.quality, timings=timings, headers={"X-Prompt": header_safe(params["prompt"])})

    def photo(field_name: str, data: str) -> bytes:
        """Decode a base64 / data-URL photo now, so a bad one is refused before queueing."""
        from ryla.identity.faces import ImageError, base64_payload, bytes_from_base64, decode_image

        # Size from the encoded length, before decoding anything.
        if len(base64_payload(data)) * 3 // 4 > settings.max_image_bytes:
            raise ApiError(413, "image_too_large", f"{field_name}: over the limit of {settings.max_image_bytes} bytes")
        try:
            raw = bytes_from_base64(data)
            decode_image(raw)
        except ImageError as exc:
            raise ApiError(422, "invalid_image", f"{field_name}: {exc}",
                           {"errors": [{"field": field_name, "message": str(exc)}]})
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
        return Response(read_static("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in STATIC_FILES:
            raise ApiError(404, "not_found", f"no static file {name!r}")
        return Response(read_static(name), media_type=STATIC_FILES[name], headers=PAGE_HEADERS)

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
