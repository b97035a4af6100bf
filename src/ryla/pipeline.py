"""The Python API: ryla in a script or a notebook, without a server.

    >>> from ryla import Ryla
    >>> ryla = Ryla()                                # the model store, or the tiny model
    >>> result = ryla.generate("a red fox in the snow", width=256, height=256, steps=4, seed=7)
    >>> result.images[0].size, result.seed
    ((256, 256), 7)

Each method fills the same workflow template as the HTTP endpoint of the same name
(`generate` is `/flux-dev`, `generate_lora` is `/flux-lora`, `generate_identity` is
`/flux-instantid`, `run_workflow` is `/workflow`) and runs it through the same executor, so a
seed gives the same image here, on the command line and over HTTP. Bounds come from the
catalogue; a bad value raises `ValueError` naming the parameter.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from ryla import catalogue, imaging
from ryla.files import write_atomic
from ryla.runtime import RunResult, Runtime, model_label, random_seed
from ryla.workflows import (FILL_GUIDANCE, FLUX_DEV, flux_instantid_graph, flux_kontext_graph, flux_lora_graph,
                            with_fill_inpainting, with_image_input, with_loras, with_trigger_words)

log = logging.getLogger(__name__)

ImageInput = Union[Image.Image, bytes, str, Path]
LoraInput = Union[str, tuple[str, float]]
ProgressCallback = Callable[[str, int, int], None]


# FLUX.1 Kontext dev's guidance in ComfyUI's flux_kontext_dev_basic template and BFL's examples
KONTEXT_GUIDANCE = 2.5


class RylaError(ValueError):
    """A request ryla cannot run: a bad parameter, an unknown LoRA, a workflow that does not
    validate, a node that failed on its input. The message says which and why."""


@dataclass
class Generation:
    """What a call made: the images (PIL), the seed that fixes them (None for workflows), the
    seconds the run took, and the parameters that made them (written into saved files)."""

    images: list[Image.Image]
    seed: int | None
    seconds: float
    parameters: dict[str, Any] = field(default_factory=dict)
    prefixes: list[str] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        """The first image (most calls make one)."""
        return self.images[0]

    def save(self, path: str | Path, *, quality: int = 90) -> list[Path]:
        """Write the images, the format from the suffix (.png, .jpg, .webp), the parameters
        inside each file; several images get _1, _2, ... before the suffix. Each file appears
        whole or not at all."""
        path = Path(path)
        fmt = imaging.format_for_path(path)
        paths = [path] if len(self.images) == 1 else [path.with_name(f"{path.stem}_{i + 1}{path.suffix}")
                                                      for i in range(len(self.images))]
        for image, target in zip(self.images, paths):
            write_atomic(target, imaging.encode(image, fmt, quality, self.parameters or None))
        return paths


class Ryla:
    """One model store, one engine. Open it once; every call reuses the loaded models.

    models_dir: the store [default: $RYLA_MODELS_DIR, else ~/.cache/ryla/models; without FLUX
    weights there, the embedded tiny model]. speed: "eager" (default: no compile), "exact",
    "fast" or "turbo" (see `ryla serve --help`), "auto" for exact on a GPU."""

    def __init__(self, models_dir: str | Path | None = None, *, speed: str = "eager",
                 runtime: Runtime | None = None):
        self.runtime = runtime or Runtime.open(models_dir, speed=speed)

    @property
    def tiny(self) -> bool:
        """True when the embedded tiny random-weight model is in use (its images are noise)."""
        return self.runtime.store.tiny

    @property
    def loras(self):
        """The LoRA store: `list()`, `add_file(path, lora_id, trigger_word)`, `remove(id)`."""
        return self.runtime.loras

    def add_lora(self, path: str | Path, lora_id: str | None = None, trigger_word: str | None = None) -> dict:
        """Check a .safetensors LoRA against the model and add it to the store; returns its entry
        (id, format, rank, trigger_word, ...). Refused with the reason when it does not fit."""
        from ryla.models.lora_format import LoraFormatError
        from ryla.models.loras import InvalidLoraId, LoraExists

        try:
            return self.runtime.loras.add_file(Path(path), lora_id, trigger_word)
        except (LoraFormatError, InvalidLoraId, LoraExists, FileNotFoundError) as exc:
            raise RylaError(f"LoRA {path}: {exc}") from exc

    def make_example_lora(self, lora_id: str = "example", trigger_word: str = "ohwx", rank: int = 4,
                          seed: int = 0) -> dict:
        """A small random LoRA that fits the current model (the tiny one too), added to the
        store: something to try `generate_lora` with (`ryla loras make-example` on the CLI)."""
        import tempfile

        from ryla.models.tiny import write_example_lora

        for entry in self.runtime.loras.list():
            if entry["id"] == lora_id:  # made before (the store keeps it): nothing to do
                return entry
        with tempfile.TemporaryDirectory() as scratch:
            path = write_example_lora(Path(scratch) / f"{lora_id}.safetensors", self.runtime.loras.target_shapes()[0],
                                      rank=rank, seed=seed)
            return self.add_lora(path, lora_id, trigger_word)

    # ------------------------------------------------------------------------------ calls

    def generate(self, prompt: str, *, negative_prompt: str = catalogue.NEGATIVE_PROMPT.default,
                 width: int = catalogue.WIDTH.default, height: int = catalogue.HEIGHT.default,
                 steps: int = catalogue.STEPS.default, guidance: float | None = None,
                 cfg: float = catalogue.CFG.default, seed: int | None = None,
                 num_images: int = catalogue.NUM_IMAGES.default, image: ImageInput | None = None,
                 mask: ImageInput | None = None, strength: float | None = None,
                 loras: Sequence[LoraInput] = (), reference: ImageInput | None = None,
                 pose: ImageInput | None = None, identity_strength: float = catalogue.INSTANTID_STRENGTH.default,
                 controlnet_strength: float = catalogue.CONTROLNET_STRENGTH.default,
                 checkpoint: str | None = None, on_progress: ProgressCallback | None = None) -> Generation:
        """Text-to-image with FLUX.1-dev (`/flux-dev`). With `image`, image-to-image (the size
        is the image's, `strength` how much is redrawn); with `mask` too, inpainting. `loras`:
        LoRA ids from the store, or (id, strength) pairs, stacked in order, each trigger word put
        into the prompt once. `reference`: a face photo whose identity the image keeps
        (`/flux-instantid`), optionally `pose` for the face's position. `guidance`: 3.5, or 30
        when a mask's inpainting runs on FLUX.1 Fill dev (in the store, no `reference`)."""
        fill_model = self.runtime.store.fill_model() if mask is not None and image is not None \
            and reference is None else None
        explicit_guidance = guidance
        if guidance is None:
            guidance = FILL_GUIDANCE if fill_model is not None else catalogue.GUIDANCE.default
        values = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                      guidance=guidance, cfg=cfg, seed=seed, num_images=num_images)
        if reference is not None:
            values.update(instantid_strength=identity_strength, controlnet_strength=controlnet_strength)
        if strength is not None:
            values["strength"] = strength
        _check(values)
        if image is None and (mask is not None or strength is not None):
            raise RylaError(f"{'mask' if mask is not None else 'strength'} applies only with an image (`image=`)")
        if pose is not None and reference is None:
            raise RylaError("pose applies only with a reference face (`reference=`)")
        seed = random_seed() if seed is None else seed
        params = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                      guidance=guidance, cfg=cfg, seed=seed, batch_size=num_images, checkpoint=checkpoint)
        request_images: dict[str, bytes] = {}
        stack = self._lora_stack(loras)
        if stack:
            params["prompt"] = with_trigger_words(prompt, [entry.get("trigger_word") for entry, _ in stack])
        if reference is not None:
            request_images["reference"] = _image_bytes("reference", reference)
            if pose is not None:
                request_images["pose"] = _image_bytes("pose", pose)
            graph = flux_instantid_graph(pose=pose is not None, instantid_strength=identity_strength,
                                         controlnet_strength=controlnet_strength, **params)
            if stack:
                graph = with_loras(graph, [(entry["file"], weight) for entry, weight in stack])
        elif stack:
            graph = flux_lora_graph([(entry["file"], weight) for entry, weight in stack], **params)
        else:
            graph = FLUX_DEV.fill(**params)
        if image is not None:
            request_images["image"] = _image_bytes("image", image)
            width, height = _input_size(request_images["image"])
            if mask is not None:
                request_images["mask"] = _image_bytes("mask", mask)
            strength = catalogue.STRENGTH.default if strength is None else strength
            graph = with_image_input(graph, strength, width, height, mask=mask is not None, batch_size=num_images)
            if fill_model is not None:
                graph = with_fill_inpainting(graph, fill_model, explicit_guidance)
        result = self._run(graph, request_images, on_progress)
        parameters = {"prompt": params["prompt"], "negative_prompt": negative_prompt, "seed": seed, "width": width,
                      "height": height, "steps": steps, "guidance": guidance, "cfg": cfg,
                      "model": model_label(self.runtime.store, fill_model) if fill_model else self._model_name(checkpoint)}
        if stack:
            parameters["loras"] = [{"id": entry["id"], "strength": weight} for entry, weight in stack]
        if image is not None:
            parameters.update(strength=strength, inpainting=mask is not None)
        if reference is not None:
            parameters.update(identity_strength=identity_strength, controlnet_strength=controlnet_strength)
        return Generation(result.images, seed, result.seconds, parameters, result.prefixes)

    def generate_lora(self, prompt: str, lora: str, strength: float = catalogue.LORA_STRENGTH.default,
                      **options: Any) -> Generation:
        """Text-to-image with a character LoRA from the store (`/flux-lora`); `options` as
        `generate`'s (more LoRAs in `loras=`, stacked after this one)."""
        extra = list(options.pop("loras", ()))
        return self.generate(prompt, loras=[(lora, strength), *extra], **options)

    def generate_identity(self, prompt: str, reference: ImageInput, **options: Any) -> Generation:
        """Text-to-image that keeps the face of `reference` (`/flux-instantid`)."""
        return self.generate(prompt, reference=reference, **options)

    def edit(self, prompt: str, image: ImageInput, *, steps: int = catalogue.STEPS.default,
             guidance: float = KONTEXT_GUIDANCE, seed: int | None = None,
             num_images: int = catalogue.NUM_IMAGES.default, loras: Sequence[LoraInput] = (),
             on_progress: ProgressCallback | None = None) -> Generation:
        """Edit `image` as `prompt` says with FLUX.1 Kontext dev (`/flux-kontext`): the image is
        scaled to the Kontext training size nearest its aspect ratio, which is the output's
        size. `loras` go on the transformer (trigger words into the prompt once)."""
        _check(dict(prompt=prompt, steps=steps, guidance=guidance, seed=seed, num_images=num_images))
        model = self.runtime.store.kontext_model()
        if model is None:
            from ryla.models.store import KONTEXT_FILES

            raise RylaError(f"FLUX.1 Kontext dev is not in the model store {self.runtime.store.root}: put "
                            f"{KONTEXT_FILES[0]} (or {KONTEXT_FILES[1]}) in its diffusion_models folder")
        seed = random_seed() if seed is None else seed
        stack = self._lora_stack(loras)
        if stack:
            prompt = with_trigger_words(prompt, [entry.get("trigger_word") for entry, _ in stack])
        graph = flux_kontext_graph([(entry["file"], weight) for entry, weight in stack], kontext_model=model,
                                   prompt=prompt, guidance=guidance, seed=seed, steps=steps, batch_size=num_images)
        result = self._run(graph, {"image": _image_bytes("image", image)}, on_progress)
        parameters = {"prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance,
                      "model": model_label(self.runtime.store, model), "edit": True}
        if stack:
            parameters["loras"] = [{"id": entry["id"], "strength": weight} for entry, weight in stack]
        return Generation(result.images, seed, result.seconds, parameters, result.prefixes)

    def run_workflow(self, workflow: dict | str | Path, images: dict[str, ImageInput] | None = None,
                     on_progress: ProgressCallback | None = None) -> Generation:
        """Run a ComfyUI workflow (`/workflow`): a dict or a JSON file, in the API format, as a
        /prompt body, or in the editor's UI format. `images` feeds LoadImage nodes by name."""
        import json

        from ryla.graph.executor import unwrap_workflow

        if isinstance(workflow, (str, Path)):
            try:
                workflow = json.loads(Path(workflow).read_text())
            except (OSError, ValueError) as exc:
                raise RylaError(f"workflow {workflow}: {exc}") from exc
        graph, _ = unwrap_workflow(workflow)
        request_images = {name: _image_bytes(f"images[{name!r}]", value) for name, value in (images or {}).items()}
        result = self._run(graph, request_images, on_progress)
        return Generation(result.images, None, result.seconds, {}, result.prefixes)

    # ------------------------------------------------------------------------------ internals

    def _lora_stack(self, loras: Iterable[LoraInput]) -> list[tuple[dict, float]]:
        from ryla.models.loras import InvalidLora, InvalidLoraId, LoraNotFound

        stack = []
        for item in loras:
            lora_id, weight = (item, catalogue.LORA_STRENGTH.default) if isinstance(item, str) else item
            if problem := catalogue.LORA_STRENGTH.check(weight):
                raise RylaError(problem.replace("lora_strength", f"strength of LoRA {lora_id!r}"))
            try:
                stack.append((self.runtime.loras.get(lora_id), float(weight)))
            except (InvalidLoraId, LoraNotFound, InvalidLora) as exc:
                raise RylaError(str(exc)) from exc
        return stack

    def _model_name(self, checkpoint: str | None) -> str:
        return model_label(self.runtime.store, checkpoint or FLUX_DEV.graph["1"]["inputs"]["ckpt_name"])

    def _run(self, graph: dict, request_images: dict[str, bytes], on_progress: ProgressCallback | None) -> RunResult:
        from ryla.graph.executor import ExecutionError, GraphValidationError

        context = self.runtime.context(on_progress=on_progress, request_images=request_images)
        try:
            return self.runtime.run(graph, context)
        except GraphValidationError as exc:
            raise RylaError(f"invalid workflow: {exc.summary()}") from exc
        except ExecutionError as exc:
            raise RylaError(str(exc.user_error or exc)) from exc


def _check(values: dict[str, Any]) -> None:
    params = {p.name: p for p in (catalogue.PROMPT, catalogue.NEGATIVE_PROMPT, catalogue.WIDTH, catalogue.HEIGHT,
                                  catalogue.STEPS, catalogue.GUIDANCE, catalogue.CFG, catalogue.SEED,
                                  catalogue.NUM_IMAGES, catalogue.STRENGTH, catalogue.INSTANTID_STRENGTH,
                                  catalogue.CONTROLNET_STRENGTH)}
    for name, value in values.items():
        if value is None:
            continue
        param = params[name]
        if param.type is str and not isinstance(value, str):
            raise RylaError(f"{name} must be text, got {type(value).__name__}")
        if param.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise RylaError(f"{name} must be a whole number, got {value!r}")
        if param.type is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RylaError(f"{name} must be a number, got {value!r}")
        if name == "prompt" and not value.strip():
            raise RylaError("prompt must not be empty")
        if problem := param.check(value):
            raise RylaError(problem)


def _image_bytes(name: str, value: ImageInput) -> bytes:
    """A PIL image, encoded bytes or a file path, as the bytes LoadImage decodes (checked now,
    so a bad file is named before anything runs)."""
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data = buffer.getvalue()
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, (str, Path)):
        try:
            data = Path(value).read_bytes()
        except OSError as exc:
            raise RylaError(f"{name}: cannot read {value}: {exc.strerror}") from exc
    else:
        raise RylaError(f"{name}: expected a PIL image, bytes or a file path, got {type(value).__name__}")
    try:
        imaging.decode_image(data)
    except imaging.ImageError as exc:
        raise RylaError(f"{name}: {exc}") from exc
    return data


def _input_size(data: bytes) -> tuple[int, int]:
    """The image-to-image size: the image's, cut to whole 8-pixel blocks, within the catalogue's
    bounds (as the typed endpoints take it)."""
    picture = imaging.decode_image(data)
    width, height = (picture.width // 8) * 8, (picture.height // 8) * 8
    low, high = int(catalogue.WIDTH.min), int(catalogue.WIDTH.max)
    if not (low <= width <= high and low <= height <= high):
        raise RylaError(f"image is {picture.width}x{picture.height}; generate takes {low} to {high} pixels a side "
                        "(resize it, or run a workflow)")
    return width, height
