"""Images: decoding, output, and ComfyUI's size and batch nodes (nodes.py ImageScale ...
ImageBatch, comfy_extras/nodes_images.py ResizeAndPadImage), with its inputs and arithmetic.
An IMAGE is ComfyUI's [B, H, W, C] float tensor in 0..1."""

from __future__ import annotations

import math
import re

import torch

from ryla import catalogue, imaging
from ryla.graph.executor import NodeUserError, SavedImages
from ryla.graph.registry import InputSpec, Node, Output, from_param, link, node


@node
class VAEDecode(Node):
    class_type = "VAEDecode"
    category = "latent"
    inputs = (link("samples", "LATENT"), link("vae", "VAE"))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, samples, vae):
        latent = samples["samples"]
        channels = context.engine.vae_latent_channels(vae)
        if latent.ndim != 4 or latent.shape[1] != channels:
            raise NodeUserError("shape_mismatch", f"VAEDecode: the latent from {context.input_sources.get('samples', 'its input')} "
                                f"has shape {tuple(latent.shape)}, but this VAE decodes {channels}-channel latents "
                                f"(from {context.input_sources.get('vae', 'the VAE')}); an EmptyLatentImage's "
                                "4-channel latent must go through a sampler first", details={"node_id": context.current_node,
                                                                                            "inputs": context.input_sources})
        return (context.engine.decode(vae, latent, cancel=context.cancel),)


_PARENT_STEP = re.compile(r"(^|[\\/])\.\.($|[\\/])")


def unsafe_prefix(prefix: str) -> str | None:
    """Why a filename_prefix cannot name files in the output folder, or None. ComfyUI's
    folder_paths.get_save_image_path refuses a prefix that leaves the output folder ("Saving
    image outside the output folder is not allowed.")."""
    if prefix.startswith(("/", "\\")) or _PARENT_STEP.search(prefix) or "\x00" in prefix or ":" in prefix:
        return f"filename_prefix {prefix!r}: saving images outside the output folder is not allowed"
    return None


@node
class SaveImage(Node):
    class_type = "SaveImage"
    category = "image"
    output_node = True
    description = "Return the images to the caller (the API response, or files written by the CLI)."
    inputs = (link("images", "IMAGE"), from_param(catalogue.FILENAME_PREFIX, default="ComfyUI"))

    def validate(self, context, filename_prefix=None, **_):
        return unsafe_prefix(filename_prefix) if filename_prefix is not None else None

    def run(self, context, images, filename_prefix):
        context.outputs.append(SavedImages(context.current_node, filename_prefix, images))
        return ()


@node
class PreviewImage(Node):
    class_type = "PreviewImage"
    category = "image"
    output_node = True
    inputs = (link("images", "IMAGE"),)

    def run(self, context, images):
        context.outputs.append(SavedImages(context.current_node, "preview", images))
        return ()


MAX = catalogue.MAX_RESOLUTION
UPSCALE_METHOD = InputSpec("upscale_method", "COMBO", default="nearest-exact", choices=imaging.UPSCALE_METHODS)


def scaled(context, image: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled"):
    """An IMAGE resized with ComfyUI's common_upscale, checked against max_pixels first."""
    context.check_pixels(image.shape[0] * width * height)
    return imaging.upscale(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


@node
class ImageScale(Node):
    class_type = "ImageScale"
    category = "image/upscaling"
    description = "Resize to width x height; a size of 0 keeps the aspect ratio from the other."
    inputs = (link("image", "IMAGE"), UPSCALE_METHOD,
              InputSpec("width", "INT", default=512, min=0, max=MAX, step=1),
              InputSpec("height", "INT", default=512, min=0, max=MAX, step=1),
              InputSpec("crop", "COMBO", default="disabled", choices=("disabled", "center")))
    outputs = (Output("IMAGE", "IMAGE"),)

    def cost(self, width=0, height=0, **_):
        return {"pixels": width * height}

    def run(self, context, image, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (image,)
        if width == 0:
            width = max(1, round(image.shape[2] * height / image.shape[1]))
        elif height == 0:
            height = max(1, round(image.shape[1] * width / image.shape[2]))
        return (scaled(context, image, width, height, upscale_method, crop),)


@node
class ImageScaleBy(Node):
    class_type = "ImageScaleBy"
    category = "image/upscaling"
    inputs = (link("image", "IMAGE"), UPSCALE_METHOD,
              InputSpec("scale_by", "FLOAT", default=1.0, min=0.01, max=8.0, step=0.01))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, image, upscale_method, scale_by):
        width, height = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
        return (scaled(context, image, width, height, upscale_method),)


@node
class ImageScaleToTotalPixels(Node):
    class_type = "ImageScaleToTotalPixels"
    category = "image/upscaling"
    description = "Resize to about this many megapixels, keeping the aspect ratio."
    inputs = (link("image", "IMAGE"), UPSCALE_METHOD,
              InputSpec("megapixels", "FLOAT", default=1.0, min=0.01, max=16.0, step=0.01),
              InputSpec("resolution_steps", "INT", default=1, min=1, max=256, optional=True))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, image, upscale_method, megapixels, resolution_steps=1):
        steps = resolution_steps or 1
        scale_by = math.sqrt(megapixels * 1024 * 1024 / (image.shape[2] * image.shape[1]))
        width = round(image.shape[2] * scale_by / steps) * steps
        height = round(image.shape[1] * scale_by / steps) * steps
        return (scaled(context, image, int(width), int(height), upscale_method),)


@node
class ImageCrop(Node):
    class_type = "ImageCrop"
    category = "image/transform"
    inputs = (link("image", "IMAGE"),
              InputSpec("width", "INT", default=512, min=1, max=MAX, step=8),
              InputSpec("height", "INT", default=512, min=1, max=MAX, step=8),
              InputSpec("x", "INT", default=0, min=0, max=MAX, step=8),
              InputSpec("y", "INT", default=0, min=0, max=MAX, step=8))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, image, width, height, x, y):
        x, y = min(x, image.shape[2] - 1), min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :],)


@node
class ImageInvert(Node):
    class_type = "ImageInvert"
    category = "image"
    inputs = (link("image", "IMAGE"),)
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, image):
        return (1.0 - image,)


@node
class ImagePadForOutpaint(Node):
    class_type = "ImagePadForOutpaint"
    category = "image"
    description = ("Extend the canvas with grey on each side; the MASK marks the new area (and a feathered "
                   "band inside the old edge) for inpainting.")
    inputs = (link("image", "IMAGE"),
              *(InputSpec(side, "INT", default=0, min=0, max=MAX, step=8) for side in ("left", "top", "right", "bottom")),
              InputSpec("feathering", "INT", default=40, min=0, max=MAX, step=1))
    outputs = (Output("IMAGE", "IMAGE"), Output("MASK", "MASK"))

    def run(self, context, image, left, top, right, bottom, feathering):
        batch, height, width, channels = image.shape
        context.check_pixels(batch * (height + top + bottom) * (width + left + right))
        out = torch.ones((batch, height + top + bottom, width + left + right, channels), dtype=torch.float32) * 0.5
        out[:, top:top + height, left:left + width, :] = image
        mask = torch.ones((height + top + bottom, width + left + right), dtype=torch.float32)
        inner = torch.zeros((height, width), dtype=torch.float32)
        if feathering > 0 and feathering * 2 < height and feathering * 2 < width:
            # nodes.py computes this per pixel in a Python loop; the same numbers, at once: the
            # distance to the nearest padded side (a side not padded counts as far away).
            rows = torch.arange(height, dtype=torch.float32)[:, None].expand(height, width)
            cols = torch.arange(width, dtype=torch.float32)[None, :].expand(height, width)
            far_rows, far_cols = torch.full_like(rows, height), torch.full_like(cols, width)
            distance = torch.minimum(
                torch.minimum(rows if top != 0 else far_rows, height - rows if bottom != 0 else far_rows),
                torch.minimum(cols if left != 0 else far_cols, width - cols if right != 0 else far_cols))
            near = distance < feathering
            inner[near] = ((feathering - distance[near]) / feathering) ** 2
        mask[top:top + height, left:left + width] = inner
        return out, mask[None]


@node
class ResizeAndPadImage(Node):
    class_type = "ResizeAndPadImage"
    category = "image/transform"
    description = "Fit the image inside target_width x target_height and pad the rest."
    inputs = (link("image", "IMAGE"),
              InputSpec("target_width", "INT", default=512, min=1, max=MAX, step=1),
              InputSpec("target_height", "INT", default=512, min=1, max=MAX, step=1),
              InputSpec("padding_color", "COMBO", default="white", choices=("white", "black")),
              InputSpec("interpolation", "COMBO", default="area",
                        choices=("area", "bicubic", "nearest-exact", "bilinear", "lanczos")))
    outputs = (Output("IMAGE", "IMAGE"),)

    def cost(self, target_width=0, target_height=0, **_):
        return {"pixels": target_width * target_height}

    def run(self, context, image, target_width, target_height, padding_color, interpolation):
        batch, height, width, channels = image.shape
        scale = min(target_width / width, target_height / height)
        new_width, new_height = int(width * scale), int(height * scale)
        resized = scaled(context, image, new_width, new_height, interpolation).movedim(-1, 1)
        padded = torch.full((batch, channels, target_height, target_width), 0.0 if padding_color == "black" else 1.0,
                            dtype=image.dtype)
        top, left = (target_height - new_height) // 2, (target_width - new_width) // 2
        padded[:, :, top:top + new_height, left:left + new_width] = resized
        return (padded.movedim(1, -1),)


@node
class ImageBatch(Node):
    class_type = "ImageBatch"
    category = "image"
    description = "Two images in one batch; the second is resized (centre crop) to the first's size."
    inputs = (link("image1", "IMAGE"), link("image2", "IMAGE"))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, image1, image2):
        context.check_pixels((image1.shape[0] + image2.shape[0]) * image1.shape[1] * image1.shape[2])
        if image1.shape[1:] != image2.shape[1:]:
            image2 = imaging.upscale(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bilinear",
                                     "center").movedim(1, -1)
        return (torch.cat((image1, image2), dim=0),)


STITCH_COLORS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (1.0, 0.0, 0.0),
                 "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def _repeat_last(image: torch.Tensor, batch: int) -> torch.Tensor:
    return image if image.shape[0] >= batch else torch.cat([image, image[-1:].repeat(batch - image.shape[0], 1, 1, 1)])


def _pad_centred(image: torch.Tensor, dim: int, size: int, value: float) -> torch.Tensor:
    missing = size - image.shape[dim]
    if missing <= 0:
        return image
    pad = [0, 0, 0, 0, 0, 0]  # channels, width, height (torch.nn.functional.pad's order from the last dim)
    index = 2 if dim == 2 else 4
    pad[index], pad[index + 1] = missing // 2, missing - missing // 2
    return torch.nn.functional.pad(image, pad, mode="constant", value=value)


@node
class ImageStitch(Node):
    class_type = "ImageStitch"
    category = "image/transform"
    description = ("image2 joined to image1 on one side (FLUX.1 Kontext's several references in one image); "
                   "without image2, image1 unchanged.")
    inputs = (link("image1", "IMAGE"),
              InputSpec("direction", "COMBO", default="right", choices=("right", "down", "left", "up")),
              InputSpec("match_image_size", "BOOLEAN", default=True),
              InputSpec("spacing_width", "INT", default=0, min=0, max=1024, step=2),
              InputSpec("spacing_color", "COMBO", default="white", choices=tuple(STITCH_COLORS)),
              link("image2", "IMAGE", optional=True))
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, image1, direction, match_image_size, spacing_width, spacing_color, image2=None):
        """comfy_extras/nodes_images.py ImageStitch: batches evened by repeating the last image;
        image2 scaled (Lanczos) to image1's height (left, right) or width (up, down), keeping
        its aspect ratio, or else the smaller one padded centred; an even spacer between."""
        if image2 is None:
            return (image1,)
        batch = max(image1.shape[0], image2.shape[0])
        image1, image2 = _repeat_last(image1, batch), _repeat_last(image2, batch)
        sideways = direction in ("left", "right")
        color = STITCH_COLORS[spacing_color]
        if match_image_size:
            (h1, w1), (h2, w2) = image1.shape[1:3], image2.shape[1:3]
            width, height = (int(h1 * w2 / h2), h1) if sideways else (w1, int(w1 / (w2 / h2)))
            image2 = imaging.upscale(image2.movedim(-1, 1), width, height, "lanczos").movedim(1, -1)
        else:
            # ComfyUI pads with the spacer's grey level, or black for the coloured spacers
            value = color[0] if spacing_color in ("white", "black") else 0.0
            dim = 1 if sideways else 2
            size = max(image1.shape[dim], image2.shape[dim])
            image1, image2 = _pad_centred(image1, dim, size, value), _pad_centred(image2, dim, size, value)
        channels = max(image1.shape[-1], image2.shape[-1])
        image1, image2 = (torch.cat([im, torch.ones(*im.shape[:-1], channels - im.shape[-1])], dim=-1)
                          if im.shape[-1] < channels else im for im in (image1, image2))
        parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
        if spacing_width > 0:
            spacing_width += spacing_width % 2
            shape = ((batch, max(image1.shape[1], image2.shape[1]), spacing_width, channels) if sideways
                     else (batch, spacing_width, max(image1.shape[2], image2.shape[2]), channels))
            spacer = torch.zeros(shape)
            spacer[..., :min(3, channels)] = torch.tensor(color[:min(3, channels)])
            if channels == 4:
                spacer[..., 3] = 1.0
            parts.insert(1, spacer)
        out = torch.cat(parts, dim=2 if sideways else 1)
        context.check_pixels(out.shape[0] * out.shape[1] * out.shape[2])
        return (out,)


@node
class Canny(Node):
    """comfy_extras/nodes_canny.py: kornia's Canny edge detector on the image (kornia makes it
    grey first; Gaussian 5x5, sigma 1; hysteresis), its edge map repeated into three channels."""

    class_type = "Canny"
    category = "image/preprocessors"
    description = "Detect edges (Canny), for FLUX.1 Canny dev's control image or a ControlNet."
    inputs = (
        link("image", "IMAGE"),
        InputSpec("low_threshold", "FLOAT", default=0.4, min=0.01, max=0.99, step=0.01,
                  description="Gradients below this are not edges."),
        InputSpec("high_threshold", "FLOAT", default=0.8, min=0.01, max=0.99, step=0.01,
                  description="Gradients above this are strong edges; weaker ones count where they join one."),
        InputSpec("device", "COMBO", default="cpu", choices=("cpu", "gpu"), optional=True,
                  description="Where to run it; gpu is the engine's device."),
    )
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, image, low_threshold, high_threshold, device="cpu"):
        from kornia.filters import canny

        if low_threshold > high_threshold:
            raise NodeUserError("invalid_input", f"Canny: low_threshold {low_threshold} is above high_threshold "
                                f"{high_threshold}", details={"node_id": context.current_node})
        where = context.engine.device if device == "gpu" else torch.device("cpu")
        _, edges = canny(image.to(where).movedim(-1, 1), low_threshold, high_threshold)
        return (edges.to(image.device).repeat(1, 3, 1, 1).movedim(1, -1),)


NODES = (VAEDecode, SaveImage, PreviewImage, ImageScale, ImageScaleBy, ImageScaleToTotalPixels, ImageCrop, ImageInvert,
         ImagePadForOutpaint, ResizeAndPadImage, ImageBatch, ImageStitch, Canny)
