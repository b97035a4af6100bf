"""Image routes. Each typed endpoint is thin: fill its workflow template from the request and
hand the graph to the same executor as /workflow, through the GPU work queue."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import Response

from ryla import catalogue
from ryla.imaging import ImageError, base64_payload, bytes_from_base64, decode_image
from ryla.api.errors import ApiError
from ryla.api.responses import IMAGE_RESPONSES, header_safe, image_response
from ryla.api.routes.jobs import accepted, wants_async
from ryla.api.routes.loras import lora_entry
from ryla.api.schemas import ErrorResponse, FluxDevRequest, FluxInstantIdRequest, FluxKontextRequest, FluxLoraRequest
from ryla.api.service import ServerSettings, Service, Timings, get_service
from ryla.api.webhooks import validate_webhook
from ryla.graph.executor import unwrap_workflow
from ryla.models.store import KONTEXT_FILES
from ryla.runtime import model_label, random_seed
from ryla.workflows import (FLUX_DEV, flux_instantid_graph, flux_kontext_graph, flux_lora_graph, with_fill_inpainting,
                            with_image_input, with_trigger_words)

router = APIRouter(tags=["generate"])
MAX_WORKFLOW_IMAGES = 8

PREFER_ASYNC = "Send `Prefer: respond-async` to get 202 with the job's links at once instead of the image."


async def run_or_accept(request: Request, service: Service, graph: dict, endpoint: str, *,
                        seeds: list, webhook: str | None = None, request_images: dict | None = None,
                        safety: bool | None = None, parameters: dict | None = None, make_response):
    """The one place a typed or workflow request becomes a job: 202 with its links when the
    client prefers async, else the image once made (`make_response(result, timings)`). A typed
    request's `parameters` also go into the PNGs the job stores (a "parameters" chunk beside
    ComfyUI's "prompt"), so an image fetched later from /view says how it was made too."""
    webhook = await validate_webhook(webhook, service.settings.allow_private_webhooks)
    extra_data = {"extra_pnginfo": {"parameters": parameters}} if parameters is not None else None
    job = await service.submit(request, graph, endpoint, request_images=request_images, seeds=seeds, webhook=webhook,
                               safety=safety, extra_data=extra_data)
    if wants_async(request):
        return accepted(job)
    result = await service.wait_for_images(request, job)
    response = make_response(result, Timings(queue=job.queue_seconds, generation=job.run_seconds, job_id=job.id))
    return await response if asyncio.iscoroutine(response) else response


def decode_photo(settings: ServerSettings, field_name: str, data: str, sizes: dict | None = None) -> bytes:
    """Check a base64 / data-URL photo now, so a bad one is refused before queueing (`sizes`,
    a dict, receives its (width, height) after EXIF rotation under `field_name`)."""
    if not isinstance(data, str):
        raise ApiError(422, "invalid_image", f"{field_name}: expected a base64 string or a data: URL",
                       {"errors": [{"field": field_name, "message": "expected a string"}]})
    # Size from the encoded length, before decoding anything.
    if len(base64_payload(data)) * 3 // 4 > settings.max_image_bytes:
        raise ApiError(413, "image_too_large", f"{field_name}: over the limit of {settings.max_image_bytes} bytes")
    try:
        raw = bytes_from_base64(data)
        picture = decode_image(raw, max_pixels=settings.max_image_pixels)
        if sizes is not None:
            sizes[field_name] = picture.size
    except ImageError as exc:
        raise ApiError(422, "invalid_image", f"{field_name}: {exc}",
                       {"errors": [{"field": field_name, "message": str(exc)}]})
    return raw


def image_parameters(body: FluxDevRequest, service: Service, seed: int, graph: dict, *, prompt: str | None = None,
                     loras: list[dict] | None = None) -> dict:
    """What made a typed endpoint's image, written into the file (PNG text chunk, EXIF comment
    for JPEG and WebP), as `ryla generate` and the Python API write it."""
    sampler = graph["6"]["inputs"]  # ModelSamplingFlux: the size actually made (the image's, for img2img)
    # the transformer: FLUX.1 Fill's file when inpainting moved there, else the checkpoint's
    model = next((node["inputs"]["unet_name"] for node in graph.values() if node["class_type"] == "UNETLoader"),
                 graph["1"]["inputs"].get("ckpt_name"))
    guidance = next(node["inputs"]["guidance"] for node in graph.values() if node["class_type"] == "FluxGuidance")
    parameters = {"prompt": prompt or body.prompt, "negative_prompt": body.negative_prompt, "seed": seed,
                  "width": sampler["width"], "height": sampler["height"], "steps": body.steps,
                  "guidance": guidance, "cfg": body.cfg, "model": model_label(service.runtime.store, model)}
    if loras:
        parameters["loras"] = loras
    if body.image is not None:
        parameters.update(strength=body.strength, inpainting=body.mask is not None)
    if isinstance(body, FluxInstantIdRequest):
        parameters.update(identity_strength=body.instantid_strength, controlnet_strength=body.controlnet_strength)
    return parameters


def field_error(field_name: str, message: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field_name}: {message}",
                    {"errors": [{"field": field_name, "message": message}]})


def image_input(body: FluxDevRequest, service: Service, graph: dict, images: dict[str, bytes],
                fill: bool = True) -> dict:
    """The typed endpoints' image-to-image and inpainting: with `image` the template becomes
    ComfyUI's img2img graph (and with `mask` its inpainting one), its size the image's; without,
    `mask` and `strength` have nothing to act on and are refused rather than ignored. With a
    mask, `fill` and FLUX.1 Fill dev in the store, the inpainting runs on Fill (at its guidance
    of 30 unless the request gives one)."""
    given = body.model_fields_set
    if body.image is None:
        for name in ("mask", "strength"):
            if name in given:
                raise field_error(name, "applies only with an image (the `image` field)")
        return graph
    for name in ("width", "height"):
        if name in given:
            raise field_error(name, "comes from the image when `image` is given; leave it out, or resize the image")
    sizes: dict[str, tuple[int, int]] = {}
    images["image"] = decode_photo(service.settings, "image", body.image, sizes)
    width, height = ((side // 8) * 8 for side in sizes["image"])
    low, high = int(catalogue.WIDTH.min), int(catalogue.WIDTH.max)
    if not (low <= width <= high and low <= height <= high):
        raise field_error("image", f"is {sizes['image'][0]}x{sizes['image'][1]}; this endpoint takes {low} to {high} "
                                   "pixels a side (resize it, or send a ComfyUI workflow to /workflow)")
    if body.mask is not None:
        images["mask"] = decode_photo(service.settings, "mask", body.mask)
    graph = with_image_input(graph, body.strength, width, height, mask=body.mask is not None,
                             batch_size=body.num_images)
    fill_model = service.runtime.store.fill_model() if fill and body.mask is not None else None
    if fill_model is not None:
        graph = with_fill_inpainting(graph, fill_model, body.guidance if "guidance" in given else None)
    return graph


@router.post("/flux-dev", responses=IMAGE_RESPONSES, response_class=Response, summary="Text-to-image with FLUX.1-dev",
             description=PREFER_ASYNC)
async def flux_dev(body: FluxDevRequest, request: Request, service: Service = Depends(get_service)) -> Response:
    seed = body.seed if body.seed is not None else random_seed()
    images: dict[str, bytes] = {}
    graph = image_input(body, service, FLUX_DEV.fill(**body.template_params(seed)), images)
    parameters = image_parameters(body, service, seed, graph)
    return await run_or_accept(
        request, service, graph, "flux-dev", seeds=[seed] * body.num_images, webhook=body.webhook,
        safety=body.enable_safety_checker, request_images=images, parameters=parameters,
        make_response=lambda result, timings: image_response(
            request, result.images, seeds=[seed] * len(result.images), fmt=body.output_format,
            quality=body.quality, timings=timings, annotations=result.annotations, parameters=parameters))


@router.post("/workflow", responses={**IMAGE_RESPONSES, 400: {"description": "ComfyUI's validation error shape: "
                                                                           "{error, node_errors}."}},
             response_class=Response, summary="Run a ComfyUI API-format workflow", description=PREFER_ASYNC)
async def workflow(request: Request,
                   body: dict[str, Any] = Body(..., description="The workflow graph, bare or as ComfyUI's "
                                               "/prompt body {\"prompt\": {...}}. The wrapped form may add "
                                               "\"images\": {name: base64 or data URL} for LoadImage nodes, "
                                               "and \"webhook\": a URL called when the job is done."),
                   output_format: str = Query("png", pattern="^(jpeg|png|webp)$",
                                              description=catalogue.OUTPUT_FORMAT.description),
                   quality: int = Query(catalogue.QUALITY.default, ge=catalogue.QUALITY.min,
                                        le=catalogue.QUALITY.max),
                   service: Service = Depends(get_service)) -> Response:
    wrapped = isinstance(body.get("prompt"), dict)
    graph, uploads = unwrap_workflow(body)  # bare, ComfyUI's /prompt body, or RunPod's {"input": ...}
    if uploads is not None and not (isinstance(uploads, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in uploads.items())
            and len(uploads) <= MAX_WORKFLOW_IMAGES):
        raise ApiError(422, "invalid_request", f"images: an object of up to {MAX_WORKFLOW_IMAGES} {{name: base64 image}}",
                       {"errors": [{"field": "images", "message": "expected {name: base64}"}]})
    images = {name: decode_photo(service.settings, f"images.{name}", data) for name, data in (uploads or {}).items()}
    webhook = body.get("webhook") if wrapped else None
    if webhook is not None and not isinstance(webhook, str):
        raise ApiError(422, "invalid_request", "webhook: expected a URL string",
                       {"errors": [{"field": "webhook", "message": "expected a URL string"}]})

    def respond(result, timings):
        if not result.images:
            raise ApiError(422, "no_images", "the workflow ran but its output nodes produced no images")
        return image_response(request, result.images, seeds=[None] * len(result.images), fmt=output_format,
                              quality=quality, timings=timings, annotations=result.annotations,
                              prefixes=list(result.prefixes))

    return await run_or_accept(request, service, graph, "workflow", seeds=[], webhook=webhook, request_images=images,
                               make_response=respond)


@router.post("/flux-lora", responses={**IMAGE_RESPONSES, 404: {"model": ErrorResponse, "description": "lora_not_found"}},
             response_class=Response, summary="Text-to-image with one or more character LoRAs",
             description=PREFER_ASYNC)
async def flux_lora(body: FluxLoraRequest, request: Request, service: Service = Depends(get_service)) -> Response:
    refs = [(body.lora_id, body.lora_strength)] + [(ref.id, ref.strength) for ref in body.loras]
    entries = [await lora_entry(service.runtime, lora_id) for lora_id, _ in refs]
    if body.trigger_word is not None:
        words = [body.trigger_word] + [e.get("trigger_word") for e in entries[1:]]
    else:
        words = [e.get("trigger_word") for e in entries]
    seed = body.seed if body.seed is not None else random_seed()
    params = body.template_params(seed)
    params["prompt"] = with_trigger_words(body.prompt, [w for w in words if w])
    images: dict[str, bytes] = {}
    graph = image_input(body, service, flux_lora_graph([(e["file"], strength) for e, (_, strength) in
                                                        zip(entries, refs)], **params), images)
    parameters = image_parameters(body, service, seed, graph, prompt=params["prompt"],
                                  loras=[{"id": lora_id, "strength": strength} for lora_id, strength in refs])
    return await run_or_accept(
        request, service, graph, "flux-lora", seeds=[seed] * body.num_images, webhook=body.webhook,
        safety=body.enable_safety_checker, request_images=images, parameters=parameters,
        make_response=lambda result, timings: image_response(
            request, result.images, seeds=[seed] * len(result.images), fmt=body.output_format, quality=body.quality,
            timings=timings, headers={"X-Prompt": header_safe(params["prompt"])}, prompt=params["prompt"],
            annotations=result.annotations, parameters=parameters))


@router.post("/flux-instantid", responses={**IMAGE_RESPONSES, 413: {"model": ErrorResponse}}, response_class=Response,
             summary="Text-to-image that keeps the face of a reference photo (InstantID recipe on FLUX)",
             description=PREFER_ASYNC)
async def flux_instantid(body: FluxInstantIdRequest, request: Request,
                         service: Service = Depends(get_service)) -> Response:
    images = {"reference": decode_photo(service.settings, "reference_image", body.reference_image)}
    if body.pose_image:
        images["pose"] = decode_photo(service.settings, "pose_image", body.pose_image)
    seed = body.seed if body.seed is not None else random_seed()
    graph = image_input(body, service, flux_instantid_graph(
        pose="pose" in images, **body.template_params(seed), instantid_strength=body.instantid_strength,
        controlnet_strength=body.controlnet_strength, face_provider="CUDA" if body.face_provider == "gpu" else "CPU"),
        images, fill=False)  # InfuseNet is trained with FLUX.1-dev
    parameters = image_parameters(body, service, seed, graph)

    def respond(result, timings, scores):
        headers = {"X-Faces-Found": str(result.annotations.get("faces_found", 0))}
        if scores and scores["scores"][0] is not None:
            headers["X-Identity-Score"] = f"{scores['scores'][0]:.4f}"
        return image_response(request, result.images, seeds=[seed] * len(result.images), fmt=body.output_format,
                              quality=body.quality, timings=timings, headers=headers, identity=scores,
                              annotations=result.annotations, parameters=parameters)

    async def respond_with_scores(result, timings):
        scores = await asyncio.to_thread(identity_scores, service, result)
        return respond(result, timings, scores)

    return await run_or_accept(request, service, graph, "flux-instantid", seeds=[seed] * body.num_images,
                               webhook=body.webhook, request_images=images, safety=body.enable_safety_checker,
                               parameters=parameters, make_response=respond_with_scores)


@router.post("/flux-kontext", responses={**IMAGE_RESPONSES, 404: {"model": ErrorResponse,
                                                                   "description": "model_not_found, lora_not_found"}},
             response_class=Response, summary="Edit an image with FLUX.1 Kontext dev (outfit, pose, background, "
             "style) keeping the person", description=PREFER_ASYNC)
async def flux_kontext(body: FluxKontextRequest, request: Request, service: Service = Depends(get_service)) -> Response:
    model = service.runtime.store.kontext_model()
    if model is None:
        raise ApiError(404, "model_not_found", "FLUX.1 Kontext dev is not in this server's model store: put "
                       f"{KONTEXT_FILES[0]} (or {KONTEXT_FILES[1]}) in its diffusion_models folder")
    images = {"image": decode_photo(service.settings, "image", body.image)}
    seed = body.seed if body.seed is not None else random_seed()
    loras, lora_files, prompt = None, [], body.prompt
    if body.lora_id is not None:
        entry = await lora_entry(service.runtime, body.lora_id)
        loras, lora_files = [{"id": body.lora_id, "strength": body.lora_strength}], [(entry["file"], body.lora_strength)]
        prompt = with_trigger_words(prompt, [entry.get("trigger_word")])  # as /flux-lora does
    graph = flux_kontext_graph(lora_files, kontext_model=model, prompt=prompt, guidance=body.guidance, seed=seed,
                               steps=body.steps, batch_size=body.num_images)
    parameters = {"prompt": prompt, "seed": seed, "steps": body.steps, "guidance": body.guidance,
                  "model": model, "edit": True, **({"loras": loras} if loras else {})}
    return await run_or_accept(
        request, service, graph, "flux-kontext", seeds=[seed] * body.num_images, webhook=body.webhook,
        safety=body.enable_safety_checker, request_images=images, parameters=parameters,
        make_response=lambda result, timings: image_response(
            request, result.images, seeds=[seed] * len(result.images), fmt=body.output_format, quality=body.quality,
            timings=timings, annotations=result.annotations, parameters=parameters))


def identity_scores(service: Service, result) -> dict | None:
    """How alike each generated face is to the reference: the recogniser's cosine, with its
    backend's threshold for "the same person" (off the GPU worker, after generation)."""
    from ryla.identity.faces import cosine, largest_face, open_analyzer

    reference = result.annotations.get("reference_identity")
    if reference is None:
        return None
    engine = service.runtime.engine
    analyzer = engine.cached(("faces", "cpu"), lambda: open_analyzer(engine.store, "cpu"))
    scores = []
    for image in result.images:
        faces = analyzer.faces(image, remember=False)  # generated: will not come again
        scores.append(round(cosine(reference, largest_face(faces).identity), 4) if faces else None)
    threshold = analyzer.threshold
    found = [score for score in scores if score is not None]
    return {"backend": analyzer.recognizer, "threshold": threshold, "scores": scores,
            "share_above_threshold": round(sum(score >= threshold for score in found) / len(scores), 4)}
