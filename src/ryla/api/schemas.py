"""Typed request and response bodies. Every bound comes from ryla.catalogue."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ryla import catalogue


_CATALOGUE_DEFAULT = object()


def field(param: catalogue.Param, default: Any = _CATALOGUE_DEFAULT, **overrides) -> Any:
    """A pydantic Field with the catalogue's default, bounds and description
    (pass default=... for a required field)."""
    options: dict[str, Any] = {"description": param.description}
    if param.type in (int, float):
        if param.min is not None:
            options["ge"] = param.min
        if param.max is not None:
            options["le"] = param.max
        if param.multiple_of:
            options["multiple_of"] = param.multiple_of
    elif param.type is str:
        if param.max is not None:
            options["max_length"] = int(param.max)
        if param.min is not None:
            options["min_length"] = int(param.min)
    options.update(overrides)
    return Field(param.default if default is _CATALOGUE_DEFAULT else default, **options)


Prompt = Annotated[str, StringConstraints(strip_whitespace=False, min_length=1, max_length=int(catalogue.PROMPT.max))]


class StrictModel(BaseModel):
    # Unknown fields are an error naming the field, not silently ignored: a typo such as
    # "setps" must not quietly give the default. Values are taken as JSON gives them: `true` is
    # not the number 1, "7" is not 7; NaN and infinities are refused by name.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class FluxDevRequest(StrictModel):
    prompt: Prompt = field(catalogue.PROMPT, default=..., examples=["a red fox in the snow, golden hour"])
    negative_prompt: str = field(catalogue.NEGATIVE_PROMPT)
    width: int = field(catalogue.WIDTH)
    height: int = field(catalogue.HEIGHT)
    steps: int = field(catalogue.STEPS)
    guidance: float = field(catalogue.GUIDANCE)
    cfg: float = field(catalogue.CFG)
    seed: int | None = field(catalogue.SEED)
    num_images: int = field(catalogue.NUM_IMAGES)
    image: str | None = field(catalogue.IMAGE, min_length=1)
    strength: float = field(catalogue.STRENGTH)
    mask: str | None = field(catalogue.MASK, min_length=1)
    output_format: Literal["jpeg", "png", "webp"] = field(catalogue.OUTPUT_FORMAT)
    quality: int = field(catalogue.QUALITY)
    enable_safety_checker: bool | None = Field(None, description="check the images for NSFW content and report "
                                               "has_nsfw_concepts; can make the server's --safety stricter, never "
                                               "looser")
    webhook: str | None = Field(None, max_length=2048, examples=["https://example.com/hooks/ryla"],
                                description="URL that gets one POST of the finished job (GET /jobs/{id}'s body), "
                                            "retried on failure; public addresses only unless the server allows "
                                            "private ones. Most useful with `Prefer: respond-async`.")

    def template_params(self, seed: int) -> dict[str, Any]:
        """The FLUX_DEV template's parameters for this request."""
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, width=self.width, height=self.height,
                    steps=self.steps, guidance=self.guidance, cfg=self.cfg, seed=seed, batch_size=self.num_images)


LoraId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]


class LoraRef(StrictModel):
    id: LoraId = Field(description=catalogue.LORA_ID.description)
    strength: float = field(catalogue.LORA_STRENGTH)


class FluxLoraRequest(FluxDevRequest):
    lora_id: LoraId = field(catalogue.LORA_ID, default=..., examples=["anna-v2"])
    lora_strength: float = field(catalogue.LORA_STRENGTH)
    trigger_word: str | None = field(catalogue.TRIGGER_WORD)
    loras: list[LoraRef] = Field(default_factory=list, max_length=3,
                                 description="More LoRAs stacked after lora_id, each with its own strength.")


class FluxInstantIdRequest(FluxDevRequest):
    reference_image: str = Field(..., min_length=1, description="The face photo: base64 or a data: URL of a JPEG, "
                                 "PNG or WebP. The largest face is used.")
    instantid_strength: float = field(catalogue.INSTANTID_STRENGTH)
    controlnet_strength: float = field(catalogue.CONTROLNET_STRENGTH)
    face_provider: Literal["cpu", "gpu"] = field(catalogue.FACE_PROVIDER)
    pose_image: str | None = Field(None, description="Optional photo whose face position and pose to follow "
                                   "(base64 or data: URL).")


class FluxKontextRequest(StrictModel):
    prompt: Prompt = field(catalogue.PROMPT, default=..., examples=["make her jacket red, keep her face and pose"])
    image: str = Field(..., min_length=1, description="The image to edit: base64 or a data: URL of a JPEG, PNG or "
                       "WebP. It is scaled to the FLUX.1 Kontext training size nearest its aspect ratio, which is "
                       "also the output's size.")
    steps: int = field(catalogue.STEPS)
    guidance: float = field(catalogue.GUIDANCE, default=2.5)
    seed: int | None = field(catalogue.SEED)
    num_images: int = field(catalogue.NUM_IMAGES)
    lora_id: LoraId | None = Field(None, description="A LoRA from the store applied to Kontext (a character or "
                                   "style LoRA trained on FLUX.1-dev).")
    lora_strength: float = field(catalogue.LORA_STRENGTH)
    output_format: Literal["jpeg", "png", "webp"] = field(catalogue.OUTPUT_FORMAT)
    quality: int = field(catalogue.QUALITY)
    enable_safety_checker: bool | None = Field(None, description="as for /flux-dev")
    webhook: str | None = Field(None, max_length=2048, description="as for /flux-dev")


class LoraInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    file: str
    trigger_word: str | None = None
    size: int


class LoraList(BaseModel):
    loras: list[LoraInfo]


class ImageOut(BaseModel):
    data: str = Field(description="base64 of the encoded image")
    seed: int | None = Field(description="seed of this image's batch (null for workflows)")
    width: int
    height: int
    format: str
    filename_prefix: str | None = Field(None, description="/workflow: the SaveImage (or PreviewImage) prefix "
                                        "this image was saved under")


class ImagesResponse(BaseModel):
    images: list[ImageOut]
    request_id: str
    timings: dict[str, float] = Field(description="seconds: queue wait, generation, total")
    prompt: str | None = Field(None, description="the prompt used, when the server changed it (a LoRA's trigger word)")
    job_id: str | None = Field(None, description="the job (ComfyUI prompt_id) that made the images")
    identity: dict[str, Any] | None = Field(None, description="/flux-instantid: each image's likeness to the "
                                            "reference (backend, threshold, scores, share_above_threshold)")
    has_nsfw_concepts: list[bool] | None = Field(None, description="each image's NSFW flag, when the safety "
                                                 "checker ran (server --safety flag/block, or enable_safety_checker)")
    nsfw_blocked: bool | None = Field(None, description="true when flagged images were replaced by black ones")


class ErrorBody(BaseModel):
    type: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model_set: Literal["real", "tiny"]
    models_dir: str | None = Field(description="the store's folder; only with the API key when one is set")
    loaded_models: list[str]
    queue_depth: int
    device: str
    speed: dict[str, Any]
    safety: dict[str, Any] = Field(description="the NSFW check: mode (off, flag, block) and checker")
    parallel: dict[str, Any] = Field(description="how the server uses its devices: mode (single, replicas, context) "
                                                 "and devices")
    face_analysis: str = Field(description="antelopev2, or yunet+sface (bundled; no identity conditioning with "
                                           "real FLUX weights)")
