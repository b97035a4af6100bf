"""Image responses: bytes for one image, JSON with base64 for several."""

from __future__ import annotations

import base64

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ryla import imaging
from ryla.api.schemas import ErrorResponse, ImagesResponse
from ryla.api.service import Timings

def header_safe(text: str) -> str:
    """User text for a response header: percent-encoded UTF-8 (RFC 3986), so no line break,
    control character or non-ASCII byte reaches the header; at most 1000 characters."""
    from urllib.parse import quote

    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[]^_`{|}~")[:1000]


def image_response(request: Request, images, *, seeds: list[int | None], fmt: str, quality: int,
                   timings: Timings, headers: dict[str, str] | None = None, prompt: str | None = None,
                   identity: dict | None = None, annotations: dict | None = None,
                   prefixes: list[str] | None = None, parameters: dict | None = None) -> Response:
    """One image as bytes; several, or `Accept: application/json`, as JSON with base64. With
    `parameters` (the typed endpoints'), each file carries them: what made it, on disk."""
    headers = dict(headers or {})
    headers["X-Generation-Time"] = f"{timings.generation:.3f}"
    headers["X-Queue-Time"] = f"{timings.queue:.3f}"
    if timings.job_id:
        headers["X-Job-Id"] = timings.job_id
    encoded = [imaging.encode(image, fmt, quality, parameters) for image in images]
    wants_json = "application/json" in request.headers.get("accept", "").lower() or len(encoded) != 1
    if seeds and seeds[0] is not None:
        headers["X-Seed"] = str(seeds[0])
    flags = (annotations or {}).get("has_nsfw_concepts")
    if flags is not None:
        headers["X-NSFW"] = ",".join("true" if flag else "false" for flag in flags)
        if annotations.get("nsfw_blocked"):
            headers["X-NSFW-Blocked"] = "true"
    if not wants_json:
        return Response(encoded[0], media_type=imaging.media_type(fmt), headers=headers)
    body = ImagesResponse(
        images=[{"data": base64.b64encode(data).decode(), "seed": seed, "width": image.width,
                 "height": image.height, "format": fmt,
                 **({"filename_prefix": prefixes[index]} if prefixes else {})}
                for index, (data, image, seed) in enumerate(zip(encoded, images, seeds))],
        request_id=request.state.request_id,
        timings=timings.as_dict(),
        prompt=prompt,
        job_id=timings.job_id,
        identity=identity,
        has_nsfw_concepts=flags,
        nsfw_blocked=bool((annotations or {}).get("nsfw_blocked")) if flags is not None else None,
    )
    return JSONResponse(body.model_dump(), headers=headers)


IMAGE_RESPONSES = {
    # "model" makes FastAPI put ImagesResponse (and ImageOut) into components/schemas and refer
    # to it there; an inline model_json_schema() would carry "#/$defs/..." references that do
    # not resolve in the OpenAPI document (ReDoc refuses them).
    200: {"model": ImagesResponse, "content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}},
          "description": "The image (default), or JSON with base64 images (Accept: application/json, "
                         "or more than one image)."},
    202: {"description": "With `Prefer: respond-async`: the job was queued; the body has job_id, status_url "
                         "(GET /jobs/{id}) and events_url (server-sent events)."},
    409: {"model": ErrorResponse, "description": "The job was interrupted (POST /interrupt, DELETE /jobs/{id})."},
    422: {"model": ErrorResponse, "description": "An invalid field; the message names it."},
    429: {"model": ErrorResponse, "description": "Queue full; retry after the Retry-After header's seconds."},
    504: {"model": ErrorResponse, "description": "Generation exceeded the server's time limit."},
}
