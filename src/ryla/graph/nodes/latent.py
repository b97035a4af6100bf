"""Latents: empty ones, images encoded into them (with inpainting masks), and ComfyUI's latent
size and batch nodes (nodes.py EmptyLatentImage ... LatentFromBatch), with its inputs,
defaults and arithmetic.

A LATENT is ComfyUI's dict: "samples" [B, 16, H/8, W/8] in the VAE's latent space, and
optionally "noise_mask" (where a sampler may repaint) and "batch_index" (which noise each image
of a batch gets)."""

from __future__ import annotations

import math

import torch

from ryla import catalogue, imaging
from ryla.graph.registry import InputSpec, Node, Output, from_param, link, node

LATENT_CHANNELS = 16
MAX = catalogue.MAX_RESOLUTION


def latent_pixels(samples: torch.Tensor) -> int:
    """The image pixels a latent batch stands for (what the server's max_pixels counts)."""
    return samples.shape[0] * samples.shape[-2] * samples.shape[-1] * 64


def size(name: str, default: int = 512, minimum: int = 0, step: int = 8) -> InputSpec:
    return InputSpec(name, "INT", default=default, min=minimum, max=MAX, step=step)


@node
class EmptySD3LatentImage(Node):
    class_type = "EmptySD3LatentImage"
    category = "latent/sd3"
    description = "A zero latent of FLUX's 16 channels, 1/8 of the image size."
    inputs = (from_param(catalogue.WIDTH), from_param(catalogue.HEIGHT), from_param(catalogue.BATCH_SIZE))
    outputs = (Output("LATENT", "LATENT"),)

    channels = LATENT_CHANNELS

    def cost(self, width=0, height=0, batch_size=1, **_):
        return {"pixels": width * height * batch_size}

    def run(self, context, width, height, batch_size):
        return ({"samples": torch.zeros(batch_size, self.channels, height // 8, width // 8)},)


@node
class EmptyLatentImage(EmptySD3LatentImage):
    class_type = "EmptyLatentImage"
    category = "latent"
    description = "A zero 4-channel latent; the samplers widen it to FLUX's 16 channels, as ComfyUI does."
    inputs = (from_param(catalogue.WIDTH, default=512, step=8), from_param(catalogue.HEIGHT, default=512, step=8),
              from_param(catalogue.BATCH_SIZE))
    channels = 4


@node
class VAEEncode(Node):
    class_type = "VAEEncode"
    category = "latent"
    description = "Encode an image into a latent (image-to-image: sample it with denoise below 1)."
    inputs = (link("pixels", "IMAGE"), link("vae", "VAE"))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, context, pixels, vae):
        return ({"samples": context.engine.encode_image(vae, pixels, cancel=context.cancel)},)


def crop_to_blocks(pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and its [B, 1, H, W] mask cut to whole 8-pixel blocks around the centre, as
    VAEEncodeForInpaint and InpaintModelConditioning cut them."""
    height, width = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
    if (pixels.shape[1], pixels.shape[2]) != (height, width):
        top, left = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
        pixels = pixels[:, top:top + height, left:left + width, :]
        mask = mask[:, :, top:top + height, left:left + width]
    return pixels, mask


def image_mask(mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """A MASK resized (bilinear) to the image's size, as [B, 1, H, W]."""
    return torch.nn.functional.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float(),
                                           size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")


def grey_out(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the masked region (mask rounded) set to mid grey."""
    keep = (1.0 - mask.round()).squeeze(1)
    pixels = pixels[..., :3].clone()
    for channel in range(3):
        pixels[:, :, :, channel] = (pixels[:, :, :, channel] - 0.5) * keep + 0.5
    return pixels


@node
class VAEEncodeForInpaint(Node):
    class_type = "VAEEncodeForInpaint"
    category = "latent/inpaint"
    description = ("Encode an image for inpainting: the masked region greyed out before encoding, and the mask, "
                   "grown by a few pixels, as the latent's noise mask (use denoise 1.0).")
    inputs = (link("pixels", "IMAGE"), link("vae", "VAE"), link("mask", "MASK"),
              InputSpec("grow_mask_by", "INT", default=6, min=0, max=64, step=1))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, context, pixels, vae, mask, grow_mask_by):
        mask = image_mask(mask, pixels)
        pixels, mask = crop_to_blocks(pixels, mask)
        if grow_mask_by == 0:
            grown = mask
        else:
            kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
            grown = torch.clamp(torch.nn.functional.conv2d(mask.round(), kernel,
                                                           padding=math.ceil((grow_mask_by - 1) / 2)), 0, 1)
        samples = context.engine.encode_image(vae, grey_out(pixels, mask), cancel=context.cancel)
        height, width = pixels.shape[1], pixels.shape[2]
        return ({"samples": samples, "noise_mask": grown[:, :, :height, :width].round()},)


@node
class SetLatentNoiseMask(Node):
    class_type = "SetLatentNoiseMask"
    category = "latent/inpaint"
    description = "Limit sampling to the mask's region of the latent (1 = repaint, 0 = keep)."
    inputs = (link("samples", "LATENT"), link("mask", "MASK"))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, context, samples, mask):
        return ({**samples, "noise_mask": mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])},)


def _scaled(context, latent: dict, width: int, height: int, method: str, crop: str) -> dict:
    samples = latent["samples"]
    context.check_pixels(samples.shape[0] * width * height * 64)
    return {**latent, "samples": imaging.upscale(samples, width, height, method, crop)}


@node
class LatentUpscale(Node):
    class_type = "LatentUpscale"
    category = "latent"
    inputs = (link("samples", "LATENT"),
              InputSpec("upscale_method", "COMBO", default="nearest-exact", choices=imaging.LATENT_UPSCALE_METHODS),
              size("width"), size("height"),
              InputSpec("crop", "COMBO", default="disabled", choices=("disabled", "center")))
    outputs = (Output("LATENT", "LATENT"),)

    def cost(self, width=0, height=0, **_):
        return {"pixels": width * height}

    def run(self, context, samples, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (samples,)
        latent = samples["samples"]
        if width == 0:
            height = max(64, height)
            width = max(64, round(latent.shape[-1] * height / latent.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(latent.shape[-2] * width / latent.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        return (_scaled(context, samples, width // 8, height // 8, upscale_method, crop),)


@node
class LatentUpscaleBy(Node):
    class_type = "LatentUpscaleBy"
    category = "latent"
    inputs = (link("samples", "LATENT"),
              InputSpec("upscale_method", "COMBO", default="nearest-exact", choices=imaging.LATENT_UPSCALE_METHODS),
              InputSpec("scale_by", "FLOAT", default=1.5, min=0.01, max=8.0, step=0.01))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, context, samples, upscale_method, scale_by):
        latent = samples["samples"]
        width, height = round(latent.shape[-1] * scale_by), round(latent.shape[-2] * scale_by)
        return (_scaled(context, samples, width, height, upscale_method, "disabled"),)


@node
class LatentCrop(Node):
    class_type = "LatentCrop"
    category = "latent/transform"
    inputs = (link("samples", "LATENT"), size("width", minimum=64), size("height", minimum=64),
              size("x", default=0), size("y", default=0))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, context, samples, width, height, x, y):
        latent = samples["samples"]
        x, y = x // 8, y // 8
        x = min(x, latent.shape[3] - 8)
        y = min(y, latent.shape[2] - 8)
        return ({**samples, "samples": latent[:, :, y:y + height // 8, x:x + width // 8]},)


@node
class LatentComposite(Node):
    class_type = "LatentComposite"
    category = "latent"
    description = "Paste samples_from into samples_to at (x, y), optionally feathering the edges."
    inputs = (link("samples_to", "LATENT"), link("samples_from", "LATENT"),
              size("x", default=0), size("y", default=0), size("feather", default=0))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, context, samples_to, samples_from, x, y, feather):
        x, y, feather = x // 8, y // 8, feather // 8
        target = samples_to["samples"]
        out = target.clone()
        source = samples_from["samples"][:, :, :target.shape[2] - y, :target.shape[3] - x]
        region = (slice(None), slice(None), slice(y, y + source.shape[2]), slice(x, x + source.shape[3]))
        if feather == 0:
            out[region] = source
        else:
            mask = torch.ones_like(source)
            for t in range(feather):
                weight = (1.0 / feather) * (t + 1)
                if y != 0:
                    mask[:, :, t:1 + t, :] *= weight
                if y + source.shape[2] < target.shape[2]:
                    mask[:, :, mask.shape[2] - 1 - t:mask.shape[2] - t, :] *= weight
                if x != 0:
                    mask[:, :, :, t:1 + t] *= weight
                if x + source.shape[3] < target.shape[3]:
                    mask[:, :, :, mask.shape[3] - 1 - t:mask.shape[3] - t] *= weight
            out[region] = source * mask + out[region] * (torch.ones_like(mask) - mask)
        return ({**samples_to, "samples": out},)


def _batched_masks(masks: torch.Tensor, batch: int) -> torch.Tensor:
    if masks.shape[0] < batch:
        masks = masks.repeat(math.ceil(batch / masks.shape[0]), 1, 1, 1)[:batch]
    return masks


@node
class RepeatLatentBatch(Node):
    class_type = "RepeatLatentBatch"
    category = "latent/batch"
    inputs = (link("samples", "LATENT"), InputSpec("amount", "INT", default=1, min=1, max=64))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, context, samples, amount):
        latent = samples["samples"]
        context.check_pixels(latent_pixels(latent) * amount)
        out = {**samples, "samples": latent.repeat(amount, 1, 1, 1)}
        if "noise_mask" in samples and samples["noise_mask"].shape[0] > 1:
            out["noise_mask"] = _batched_masks(samples["noise_mask"], latent.shape[0]).repeat(amount, 1, 1, 1)
        if "batch_index" in samples:
            offset = max(samples["batch_index"]) - min(samples["batch_index"]) + 1
            out["batch_index"] = samples["batch_index"] + [index + i * offset for i in range(1, amount)
                                                           for index in samples["batch_index"]]
        return (out,)


@node
class LatentFromBatch(Node):
    class_type = "LatentFromBatch"
    category = "latent/batch"
    description = "Some images of a batch; each keeps the noise it had in the batch (batch_index)."
    inputs = (link("samples", "LATENT"), InputSpec("batch_index", "INT", default=0, min=0, max=63),
              InputSpec("length", "INT", default=1, min=1, max=64))
    outputs = (Output("LATENT", "LATENT"),)

    def run(self, context, samples, batch_index, length):
        latent = samples["samples"]
        batch_index = min(latent.shape[0] - 1, batch_index)
        length = min(latent.shape[0] - batch_index, length)
        out = {**samples, "samples": latent[batch_index:batch_index + length].clone()}
        if "noise_mask" in samples:
            masks = samples["noise_mask"]
            out["noise_mask"] = (masks.clone() if masks.shape[0] == 1 else
                                 _batched_masks(masks, latent.shape[0])[batch_index:batch_index + length].clone())
        previous = samples.get("batch_index")
        out["batch_index"] = (list(range(batch_index, batch_index + length)) if previous is None
                              else previous[batch_index:batch_index + length])
        return (out,)


NODES = (EmptySD3LatentImage, EmptyLatentImage, VAEEncode, VAEEncodeForInpaint, SetLatentNoiseMask, LatentUpscale,
         LatentUpscaleBy, LatentCrop, LatentComposite, RepeatLatentBatch, LatentFromBatch)
