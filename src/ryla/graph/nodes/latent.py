"""Empty latents: EmptySD3LatentImage (16 channels, FLUX's) and EmptyLatentImage."""

from __future__ import annotations

import torch

from ryla import catalogue
from ryla.graph.registry import Node, Output, from_param, node

LATENT_CHANNELS = 16


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
    channels = 4


NODES = (EmptySD3LatentImage, EmptyLatentImage)
