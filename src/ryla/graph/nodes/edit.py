"""Edit models: FLUX.1 Kontext's reference latents (comfy_extras/nodes_edit_model.py
ReferenceLatent, comfy_extras/nodes_flux.py FluxKontextImageScale and
FluxKontextMultiReferenceLatentMethod) and the control image of FLUX.1 Canny and Depth
(comfy_extras/nodes_ip2p.py InstructPixToPixConditioning). The engine places what they store
on the conditioning; these nodes only record it, as ComfyUI's do."""

from __future__ import annotations

import torch

from ryla import imaging
from ryla.graph.registry import InputSpec, Node, Output, link, node

# The sizes FLUX.1 Kontext was trained at (comfy_extras/nodes_flux.py PREFERED_KONTEXT_RESOLUTIONS,
# from Black Forest Labs' flux repository), width x height.
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))


def kontext_size(width: int, height: int) -> tuple[int, int]:
    """The Kontext training size whose aspect ratio is nearest the image's (ties: the first)."""
    aspect = width / height
    _, best_w, best_h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return best_w, best_h


@node
class ReferenceLatent(Node):
    class_type = "ReferenceLatent"
    category = "advanced/conditioning/edit_models"
    description = ("Set the image an edit model (FLUX.1 Kontext) works from; chain several for several "
                   "reference images.")
    inputs = (link("conditioning", "CONDITIONING"), link("latent", "LATENT", optional=True))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning, latent=None):
        if latent is None:
            return (conditioning,)
        samples = latent["samples"]
        # node_helpers.conditioning_set_values(..., append=True): added after any earlier ones
        return (tuple(c.with_options(reference_latents=tuple(c.option("reference_latents", ())) + (samples,))
                      for c in conditioning),)


@node
class FluxKontextImageScale(Node):
    class_type = "FluxKontextImageScale"
    category = "advanced/conditioning/flux"
    description = "Resize the image to the FLUX.1 Kontext training size nearest its aspect ratio."
    inputs = (link("image", "IMAGE"),)
    outputs = (Output("IMAGE", "IMAGE"),)

    def run(self, context, image):
        width, height = kontext_size(image.shape[2], image.shape[1])
        # common_upscale(..., "lanczos", "center"), as the ComfyUI node resizes
        return (imaging.upscale(image.movedim(-1, 1), width, height, "lanczos", "center").movedim(1, -1),)


@node
class FluxKontextMultiReferenceLatentMethod(Node):
    class_type = "FluxKontextMultiReferenceLatentMethod"
    category = "advanced/conditioning/flux"
    description = "How several reference latents are placed: offset (Kontext's), index, or uxo/uno."
    inputs = (link("conditioning", "CONDITIONING"),
              InputSpec("reference_latents_method", "COMBO", default="offset", choices=("offset", "index", "uxo/uno")))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning, reference_latents_method):
        method = "uxo" if "uxo" in reference_latents_method or "uso" in reference_latents_method \
            else reference_latents_method
        return (tuple(c.with_options(reference_latents_method=method) for c in conditioning),)


@node
class InstructPixToPixConditioning(Node):
    class_type = "InstructPixToPixConditioning"
    category = "conditioning/instructpix2pix"
    description = ("Give the model a control image (FLUX.1 Canny or Depth: the edge or depth map) beside the "
                   "latent; the latent output is an empty one of the image's size.")
    inputs = (link("positive", "CONDITIONING"), link("negative", "CONDITIONING"), link("vae", "VAE"),
              link("pixels", "IMAGE"))
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def run(self, context, positive, negative, vae, pixels):
        # encode_image cuts the image to whole 8-pixel blocks around its centre, as the node does
        concat = context.engine.encode_image(vae, pixels, cancel=context.cancel)
        latent = {"samples": torch.zeros_like(concat)}
        return (tuple(c.with_options(concat_latent_image=concat) for c in positive),
                tuple(c.with_options(concat_latent_image=concat) for c in negative), latent)


NODES = (ReferenceLatent, FluxKontextImageScale, FluxKontextMultiReferenceLatentMethod, InstructPixToPixConditioning)
