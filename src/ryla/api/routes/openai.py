"""OpenAI's Images API: `POST /v1/images/generations` (and `GET /v1/models`), in OpenAI's request,
response and error shapes, so the official `openai` client and tools built on it (Open WebUI's
image generation) work with `base_url` at ryla and the API key as their OpenAI key.

`model` picks the route: `flux-dev` (also `flux.1-dev`, and OpenAI's own image model names, so
a client's default works) is text-to-image; the id of a LoRA in the store is `/flux-lora` with
that LoRA and its trigger word. `size` is any "WxH" within ryla's bounds (multiples of 16);
`response_format` is `b64_json` (the default here: it needs no second request) or `url` (a
`/view` link, which needs the API key when one is set). Parameters ryla has no use for
(`quality`, `style`, `background`, `moderation`) are accepted and ignored; `seed` is ryla's
extension.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from ryla import catalogue, imaging
from ryla.api.errors import ApiError
from ryla.api.jobs import view_url
from ryla.api.routes.loras import lora_entry
from ryla.api.service import Service, get_service
from ryla.runtime import random_seed
from ryla.workflows import FLUX_DEV, flux_lora_graph, with_trigger_words

router = APIRouter(tags=["openai"])

BASE_MODEL_NAMES = ("flux-dev", "flux.1-dev", "flux1-dev", "black-forest-labs/FLUX.1-dev",
                    "dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageGenerationRequest(BaseModel):
    # OpenAI's clients send parameters for OpenAI's models; unknown ones are ignored, not refused.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    prompt: str = Field(..., min_length=1, max_length=int(catalogue.PROMPT.max))
    model: str | None = Field(None, description="flux-dev (or an OpenAI image model name) or a LoRA id from /loras")
    n: int = Field(1, ge=1, le=int(catalogue.NUM_IMAGES.max))
    size: str | None = Field("1024x1024", description='"WxH" (multiples of 16 within ryla\'s bounds) or "auto"')
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    user: str | None = None
    seed: int | None = Field(None, ge=0, le=int(catalogue.SEED.max), description="ryla's extension: a fixed seed")


def _size(text: str | None) -> tuple[int, int]:
    if text in (None, "auto"):
        return 1024, 1024
    match = _SIZE.match(text)
    if not match:
        raise ApiError(400, "invalid_size", f"size: expected 'WxH' such as '1024x1024', got {text!r}",
                       {"param": "size"})
    width, height = int(match[1]), int(match[2])
    for value, param in ((width, catalogue.WIDTH), (height, catalogue.HEIGHT)):
        if problem := param.check(value):
            raise ApiError(400, "invalid_size", f"size: {problem}", {"param": "size"})
    return width, height


@router.post("/v1/images/generations", summary="OpenAI Images API: create images from a prompt")
async def create_image(body: ImageGenerationRequest, request: Request, service: Service = Depends(get_service)) -> dict:
    width, height = _size(body.size)
    seed = body.seed if body.seed is not None else random_seed()
    params = dict(prompt=body.prompt, width=width, height=height, seed=seed, batch_size=body.n)
    if body.model is None or body.model in BASE_MODEL_NAMES:
        graph = FLUX_DEV.fill(**params)
    else:
        try:
            entry = await lora_entry(service.runtime, body.model)
        except ApiError as exc:
            if exc.type not in ("lora_not_found", "invalid_lora_id"):
                raise
            raise ApiError(404, "model_not_found", f"The model '{body.model}' does not exist: use flux-dev or the "
                                                   "id of a LoRA in GET /loras", {"param": "model"})
        params["prompt"] = with_trigger_words(body.prompt, [entry["trigger_word"]] if entry.get("trigger_word") else [])
        graph = flux_lora_graph([(entry["file"], 1.0)], **params)
    job = await service.submit(request, graph, "openai", seeds=[seed] * body.n)
    result = await service.wait_for_images(request, job)
    if body.response_format == "url":
        await job.finished.wait()  # the files are written after the images are made
        data = [{"url": view_url(job.base_url, image), "revised_prompt": params["prompt"]} for image in job.images]
    else:
        fmt = body.output_format or "png"
        data = [{"b64_json": base64.b64encode(imaging.encode(image, fmt, 95)).decode(),
                 "revised_prompt": params["prompt"]} for image in result.images]
    return {"created": int(time.time()), "data": data, "output_format": body.output_format or "png",
            "size": f"{width}x{height}"}


@router.get("/v1/models", summary="OpenAI's model list: flux-dev and the LoRAs in the store")
async def list_models(service: Service = Depends(get_service)) -> dict:
    ids = ["flux-dev"] + [entry["id"] for entry in service.runtime.loras.list()]
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "ryla"}
                                       for model_id in ids]}
