"""IMAGE tensors to encoded bytes."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

FORMATS = {"jpeg": ("JPEG", "image/jpeg", "jpg"), "png": ("PNG", "image/png", "png"),
           "webp": ("WEBP", "image/webp", "webp")}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE [B, H, W, 3] floats in 0..1 -> PIL images (rounded as SaveImage does)."""
    array = np.clip(255.0 * images.cpu().float().numpy(), 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def encode(image: Image.Image, fmt: str = "jpeg", quality: int = 90) -> bytes:
    pil_format = FORMATS[fmt][0]
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt in ("jpeg", "webp") else {"optimize": False}
    image.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def format_for_path(path) -> str:
    """The image format a file name asks for (fox.png -> png); JPEG when it says nothing."""
    from pathlib import Path

    suffix = Path(path).suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}.get(suffix, "jpeg")


def media_type(fmt: str) -> str:
    return FORMATS[fmt][1]


def extension(fmt: str) -> str:
    return FORMATS[fmt][2]
