"""Images in and out: the one decoder every incoming image goes through (API fields, workflow
images, uploads, files read by the CLI), and IMAGE tensors to encoded bytes."""

from __future__ import annotations

import base64
import binascii
import io
import re

import numpy as np
import torch
from PIL import Image, ImageOps

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_PIXELS = 40_000_000  # default limit of one decoded image (a 6300 x 6300 photo)
# Pillow refuses images over twice its MAX_IMAGE_PIXELS while opening them (and warns over
# once); ryla checks its own limit from the header, so Pillow's guard sits above it.
Image.MAX_IMAGE_PIXELS = 4 * MAX_PIXELS


class ImageError(ValueError):
    """Not an image ryla can use; the message says why."""


_DATA_URL = re.compile(r"^data:[^,]*,", re.S)
_WHITESPACE = re.compile(r"\s+")


def base64_payload(text: str) -> str:
    """The base64 part of a bare base64 string or a data: URL, without white space."""
    text = text.strip()
    if match := _DATA_URL.match(text):
        text = text[match.end():]
    return _WHITESPACE.sub("", text)


def bytes_from_base64(text: str) -> bytes:
    """Standard or URL-safe base64, with or without padding, line breaks allowed."""
    payload = base64_payload(text)
    if "-" in payload or "_" in payload:
        payload = payload.translate(str.maketrans("-_", "+/"))
    payload += "=" * (-len(payload) % 4)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("not valid base64 (or a data: URL)")


def decode_image(data: bytes | str, max_pixels: int = MAX_PIXELS, with_alpha: bool = False):
    """Bytes, base64 or a data URL -> an RGB image (and, `with_alpha`, its alpha channel or
    None). The size is checked from the header before any pixel is decoded; EXIF orientation is
    applied; 16-bit, palette, CMYK and grey images become RGB by their values, alpha is split off
    (not composited: ComfyUI's LoadImage gives the colours and the alpha as a mask), and an
    animation gives its first frame. Any failure is an ImageError."""
    if isinstance(data, str):
        data = bytes_from_base64(data)
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ACCEPTED_FORMATS:
            raise ImageError(f"unsupported image format {image.format}; send JPEG, PNG or WebP")
        pixels = image.width * image.height
        if pixels > max_pixels or image.width < 1 or image.height < 1:
            raise ImageError(f"{image.width}x{image.height} is {pixels} pixels, over the limit of {max_pixels}")
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb, alpha = _to_rgb(image)
    except ImageError:
        raise
    except Exception as exc:  # Pillow's decoders raise many types for damaged files
        raise ImageError(f"not a readable JPEG, PNG or WebP image ({type(exc).__name__})") from None
    return (rgb, alpha) if with_alpha else rgb


def _to_rgb(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):  # 16-bit (or wider) grey: scale, do not clip
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), None
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    return image.convert("RGB"), alpha

FORMATS = {"jpeg": ("JPEG", "image/jpeg", "jpg"), "png": ("PNG", "image/png", "png"),
           "webp": ("WEBP", "image/webp", "webp")}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE [B, H, W, 3] floats in 0..1 -> PIL images (rounded as SaveImage does)."""
    array = np.clip(255.0 * images.cpu().float().numpy(), 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in array]


# Where an image's generation parameters travel inside the file: a PNG text chunk, and EXIF's
# UserComment (tag 0x9286 in the Exif IFD 0x8769; its first 8 bytes name the character code,
# EXIF 2.32 section 4.6.5) for JPEG and WebP, which Pillow writes through `exif=`.
PARAMETERS_KEY = "parameters"
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def encode(image: Image.Image, fmt: str = "jpeg", quality: int = 90, parameters: dict | None = None) -> bytes:
    """Encoded bytes; with `parameters` (prompt, seed, size, ...), those as JSON inside the file,
    so an image on disk says how it was made."""
    import json

    pil_format = FORMATS[fmt][0]
    buffer = io.BytesIO()
    options: dict = {"quality": quality} if fmt in ("jpeg", "webp") else {"optimize": False}
    if parameters is not None:
        text = json.dumps(parameters, ensure_ascii=True, sort_keys=True)
        if fmt == "png":
            from PIL.PngImagePlugin import PngInfo

            options["pnginfo"] = info = PngInfo()
            info.add_text(PARAMETERS_KEY, text)
        else:
            exif = Image.Exif()
            exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"ASCII\0\0\0" + text.encode("ascii")
            options["exif"] = exif.tobytes()
    # A copy: Image.save keeps its options on the image object (encoderinfo), so two threads
    # saving one image at once (a response encoded while the job's PNG is stored) could each
    # write with the other's options: seen as a WebP with no EXIF and quality 80, not 90.
    image.copy().save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def read_parameters(data: bytes) -> dict | None:
    """The parameters `encode` put into an image file, or None when it carries none."""
    import json

    with Image.open(io.BytesIO(data)) as image:
        text = image.info.get(PARAMETERS_KEY) if image.format == "PNG" else None
        if text is None:
            comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
            if isinstance(comment, bytes) and comment.startswith(b"ASCII\0\0\0"):
                text = comment[8:].decode("ascii", "replace")
            elif isinstance(comment, str):
                text = comment
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def format_for_path(path) -> str:
    """The image format a file name asks for (fox.png -> png); JPEG when it says nothing."""
    from pathlib import Path

    suffix = Path(path).suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}.get(suffix, "jpeg")


def media_type(fmt: str) -> str:
    return FORMATS[fmt][1]


def extension(fmt: str) -> str:
    return FORMATS[fmt][2]


# --------------------------------------------------------------------------- resampling
# ComfyUI's comfy/utils.py common_upscale, which its image and latent scaling nodes share.

UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")  # ImageScale's list
LATENT_UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")  # LatentUpscale's


def upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled") -> torch.Tensor:
    """[B, C, H, W] -> [B, C, height, width] by `method`; crop "center" first cuts the input to
    the new aspect ratio around its centre."""
    if crop == "center":
        old_width, old_height = samples.shape[-1], samples.shape[-2]
        old_aspect, new_aspect = old_width / old_height, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_width - old_width * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_height - old_height * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_height - y * 2).narrow(-1, x, old_width - x * 2)
    if method == "bislerp":
        return _bislerp(samples, width, height)
    if method == "lanczos":
        return _lanczos(samples, width, height)
    return torch.nn.functional.interpolate(samples, size=(height, width), mode=method)


def _lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pillow's Lanczos on 8-bit copies of the images, as ComfyUI does it."""
    out = []
    for image in samples:
        pixels = np.clip(255.0 * image.movedim(0, -1).cpu().numpy(), 0, 255).astype(np.uint8)
        resized = Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).resize(
            (width, height), resample=Image.Resampling.LANCZOS)
        array = np.asarray(resized).astype(np.float32) / 255.0
        out.append(torch.from_numpy(array.reshape(height, width, -1)).movedim(-1, 0))
    return torch.stack(out).to(samples.device, samples.dtype)


def _slerp(low: torch.Tensor, high: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of rows (N x C) by ratio (N x 1), norms interpolated linearly;
    nearly equal directions keep `low`, opposite ones fall back to linear."""
    channels = low.shape[-1]
    low_norm, high_norm = low.norm(dim=-1, keepdim=True), high.norm(dim=-1, keepdim=True)
    low_unit, high_unit = low / low_norm, high / high_norm
    low_unit[low_norm.expand(-1, channels) == 0.0] = 0.0
    high_unit[high_norm.expand(-1, channels) == 0.0] = 0.0
    dot = (low_unit * high_unit).sum(1)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    result = ((torch.sin((1.0 - ratio.squeeze(1)) * omega) / sin_omega).unsqueeze(1) * low_unit
              + (torch.sin(ratio.squeeze(1) * omega) / sin_omega).unsqueeze(1) * high_unit)
    result *= (low_norm * (1.0 - ratio) + high_norm * ratio).expand(-1, channels)
    result[dot > 1 - 1e-5] = low[dot > 1 - 1e-5]
    result[dot < 1e-5 - 1] = (low * (1.0 - ratio) + high * ratio)[dot < 1e-5 - 1]
    return result


def _bilinear_taps(old: int, new: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each new position: the two source indices bilinear resampling reads, and the ratio."""
    first = torch.nn.functional.interpolate(torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1),
                                            size=(1, new), mode="bilinear")
    ratios = first - first.floor()
    second = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1) + 1
    second[:, :, :, -1] -= 1
    second = torch.nn.functional.interpolate(second, size=(1, new), mode="bilinear")
    return ratios, first.to(torch.int64), second.to(torch.int64)


def _bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's "bislerp": bilinear taps along width then height, each blended by slerp over
    the channel vector (keeps latent vectors' lengths where bilinear shrinks them)."""
    dtype = samples.dtype
    samples = samples.float()
    n, c, h, w = samples.shape
    ratios, first, second = _bilinear_taps(w, width, samples.device)
    low = samples.gather(-1, first.expand(n, c, h, -1)).movedim(1, -1).reshape(-1, c)
    high = samples.gather(-1, second.expand(n, c, h, -1)).movedim(1, -1).reshape(-1, c)
    rows = _slerp(low, high, ratios.expand(n, 1, h, -1).movedim(1, -1).reshape(-1, 1))
    rows = rows.reshape(n, h, width, c).movedim(-1, 1)
    ratios, first, second = _bilinear_taps(h, height, samples.device)
    low = rows.gather(-2, first.reshape(1, 1, -1, 1).expand(n, c, -1, width)).movedim(1, -1).reshape(-1, c)
    high = rows.gather(-2, second.reshape(1, 1, -1, 1).expand(n, c, -1, width)).movedim(1, -1).reshape(-1, c)
    out = _slerp(low, high, ratios.reshape(1, 1, -1, 1).expand(n, 1, -1, width).movedim(1, -1).reshape(-1, 1))
    return out.reshape(n, height, width, c).movedim(-1, 1).to(dtype)
