"""An optional NSFW check of generated images, after decoding and off the sampling path.

Modes, per server (`--safety`, RYLA_SAFETY) and per request (`enable_safety_checker`, which can
only make a request stricter than the server, never looser):

    off    no check (the default: FLUX.1-dev's own behaviour)
    flag   each image is checked and reported (`has_nsfw_concepts`)
    block  flagged images are replaced by a black image of the same size, and the response says so

Checkers (RYLA_SAFETY_CHECKER):

    nudenet     NudeNet 3.4's detector (its ONNX model ships inside the `nudenet` wheel; run by
                onnxruntime, on the GPU where onnxruntime-gpu is installed). An image is
                flagged when an exposed-anatomy class scores at least 0.5. Works offline. The
                wheel's LICENSE file is the AGPL-3.0 (its metadata says MIT): it is an optional
                extra, `pip install "ryla[safety]"`, for the deployer to accept.
    clip        diffusers' StableDiffusionSafetyChecker (CLIP ViT-L/14 and concept embeddings,
                the checker hosted image APIs inherited from Stable Diffusion), from a local
                diffusers folder (RYLA_SAFETY_MODEL), run by PyTorch on the GPU when there is one.
    module:Name any class with `name` and `check(images) -> list[bool]` (a stronger model, a test's
                stand-in).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

MODES = ("off", "flag", "block")
# NudeNet's classes that count as explicit; covered, face and feet classes do not.
NUDENET_UNSAFE = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
                  "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
NUDENET_SCORE = 0.5


class SafetyUnavailable(RuntimeError):
    """The configured checker cannot be loaded (a missing package or model)."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"safety must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def stricter(server_mode: str, requested: bool | None) -> str:
    """A request may raise the server's mode to `flag`, never lower it."""
    if requested and server_mode == "off":
        return "flag"
    return server_mode


def blacked(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, (0, 0, 0))


class NudeNetChecker:
    name = "nudenet"

    def __init__(self):
        try:
            from nudenet import NudeDetector
        except ImportError as exc:
            raise SafetyUnavailable("the nudenet checker needs `pip install \"ryla[safety]\"`") from exc
        import onnxruntime

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers()]
        self.detector = NudeDetector(providers=providers)
        self.device = "gpu" if providers[0] == "CUDAExecutionProvider" else "cpu"

    def detections(self, image: Image.Image) -> list[dict]:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        return self.detector.detect(bgr)

    def check(self, images: Sequence[Image.Image]) -> list[bool]:
        return [any(d["class"] in NUDENET_UNSAFE and d["score"] >= NUDENET_SCORE for d in self.detections(image))
                for image in images]


class ClipChecker:
    """diffusers' StableDiffusionSafetyChecker from a local folder (config.json and weights, and
    the CLIP image processor's preprocessor_config.json beside them)."""

    name = "clip"

    def __init__(self, folder: str | None = None, device: str | None = None):
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        folder = folder or os.environ.get("RYLA_SAFETY_MODEL")
        if not folder:
            raise SafetyUnavailable("the clip checker needs RYLA_SAFETY_MODEL: a folder with "
                                    "CompVis/stable-diffusion-safety-checker's files")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.model = StableDiffusionSafetyChecker.from_pretrained(folder, torch_dtype=dtype).to(self.device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(folder)

    def check(self, images: Sequence[Image.Image]) -> list[bool]:
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt")
        pixels = inputs.pixel_values.to(self.device, self.model.dtype)
        with torch.no_grad():
            _, flags = self.model(images=np.zeros((len(images), 8, 8, 3)), clip_input=pixels)
        return [bool(flag) for flag in flags]


def load_checker(spec: str):
    if spec == "nudenet":
        return NudeNetChecker()
    if spec == "clip":
        return ClipChecker()
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise SafetyUnavailable(f"unknown safety checker {spec!r}: nudenet, clip, or module:Class")
    try:
        return getattr(importlib.import_module(module_name), attribute)()
    except (ImportError, AttributeError) as exc:
        raise SafetyUnavailable(f"cannot load the safety checker {spec!r}: {exc}") from exc


class Safety:
    """The server's mode and its checker, loaded on first use (or at start when the mode is on)."""

    def __init__(self, mode: str = "off", checker: str = "nudenet"):
        self.mode = check_mode(mode)
        self.spec = checker
        self._checker = None
        self._lock = threading.Lock()

    @property
    def checker(self):
        with self._lock:
            if self._checker is None:
                self._checker = load_checker(self.spec)
                log.info("safety checker %s loaded (%s)", self._checker.name, getattr(self._checker, "device", "cpu"))
            return self._checker

    def describe(self) -> dict:
        return {"mode": self.mode, "checker": self.spec}

    def apply(self, images: list[Image.Image], mode: str) -> tuple[list[Image.Image], list[bool] | None]:
        """(the images to return, each image's flag) under `mode`; flagged images are black in
        `block` mode. No check at all in `off` mode."""
        if mode == "off":
            return images, None
        flags = self.checker.check(images)
        if mode == "block":
            images = [blacked(image) if flag else image for image, flag in zip(images, flags)]
        return images, flags
