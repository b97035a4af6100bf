"""Masks: ComfyUI's MASK is [B, H, W] floats in 0..1, 1 where an inpainting sampler repaints.
The nodes of nodes.py (LoadImageMask) and comfy_extras/nodes_mask.py (ImageToMask,
MaskToImage, InvertMask, GrowMask, SolidMask), with its inputs and arithmetic."""

from __future__ import annotations

import numpy as np
import torch

from ryla import catalogue
from ryla.graph.executor import NodeUserError
from ryla.graph.nodes.identity import InputImages, read_input_image
from ryla.graph.registry import InputSpec, Node, Output, link, node

MAX = catalogue.MAX_RESOLUTION
CHANNELS = ("red", "green", "blue", "alpha")


@node
class LoadImageMask(Node):
    class_type = "LoadImageMask"
    category = "mask"
    description = "One channel of an image as a mask (alpha: 1 where the image is transparent)."
    inputs = (InputSpec("image", "COMBO", choices=InputImages, upload="image_upload",
                        description="Name of an image sent with the request or of a file in the input folder."),
              InputSpec("channel", "COMBO", default="alpha", choices=("alpha", "red", "green", "blue")))
    outputs = (Output("MASK", "MASK"),)

    def run(self, context, image, channel):
        picture, alpha = read_input_image(context, image)
        if channel == "alpha":
            if alpha is None:  # opaque: converted to RGBA, alpha is 255 everywhere
                return (torch.zeros(1, picture.height, picture.width),)
            return (1.0 - torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)[None],)
        values = np.asarray(picture.getchannel("RGB".index(channel[0].upper())), dtype=np.float32) / 255.0
        return (torch.from_numpy(values)[None],)


@node
class ImageToMask(Node):
    class_type = "ImageToMask"
    category = "mask"
    inputs = (link("image", "IMAGE"), InputSpec("channel", "COMBO", default="red", choices=CHANNELS))
    outputs = (Output("MASK", "MASK"),)

    def run(self, context, image, channel):
        index = CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise NodeUserError("invalid_input", f"ImageToMask: the image has no {channel} channel "
                                f"({image.shape[-1]} channels)")
        return (image[:, :, :, index],)


@node
class MaskToImage(Node):
    class_type = "MaskToImage"
    category = "mask"
    inputs = (link("mask", "MASK"),)
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, mask):
        return (mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).movedim(1, -1).expand(-1, -1, -1, 3),)


@node
class InvertMask(Node):
    class_type = "InvertMask"
    category = "mask"
    inputs = (link("mask", "MASK"),)
    outputs = (Output("MASK", "MASK"),)

    def run(self, context, mask):
        return (1.0 - mask,)


@node
class GrowMask(Node):
    class_type = "GrowMask"
    category = "mask"
    description = "Grow (expand > 0) or shrink (< 0) a mask by that many pixels, one grey dilation per pixel."
    inputs = (link("mask", "MASK"), InputSpec("expand", "INT", default=0, min=-MAX, max=MAX, step=1),
              InputSpec("tapered_corners", "BOOLEAN", default=True))
    outputs = (Output("MASK", "MASK"),)

    def run(self, context, mask, expand, tapered_corners):
        from scipy import ndimage

        corner = 0 if tapered_corners else 1
        footprint = np.array([[corner, 1, corner], [1, 1, 1], [corner, 1, corner]])
        out = []
        for single in mask.reshape(-1, mask.shape[-2], mask.shape[-1]):
            values = single.numpy()
            for _ in range(abs(expand)):
                context.check_cancelled()
                values = (ndimage.grey_erosion if expand < 0 else ndimage.grey_dilation)(values, footprint=footprint)
            out.append(torch.from_numpy(values))
        return (torch.stack(out),)


@node
class SolidMask(Node):
    class_type = "SolidMask"
    category = "mask"
    inputs = (InputSpec("value", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01),
              InputSpec("width", "INT", default=512, min=1, max=MAX, step=1),
              InputSpec("height", "INT", default=512, min=1, max=MAX, step=1))
    outputs = (Output("MASK", "MASK"),)

    def cost(self, width=0, height=0, **_):
        return {"pixels": width * height}

    def run(self, context, value, width, height):
        return (torch.full((1, height, width), value, dtype=torch.float32),)


NODES = (LoadImageMask, ImageToMask, MaskToImage, InvertMask, GrowMask, SolidMask)
