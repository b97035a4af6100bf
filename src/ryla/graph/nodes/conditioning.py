"""Conditioning: text encoding (CLIPTextEncode, CLIPTextEncodeFlux), FluxGuidance, and
ComfyUI's conditioning tools (nodes.py ConditioningCombine ... InpaintModelConditioning,
comfy_extras/nodes_flux.py), with its inputs and arithmetic."""

from __future__ import annotations

import torch

from ryla import catalogue
from ryla.flux.components import Cond
from ryla.graph.nodes.latent import crop_to_blocks, grey_out, image_mask
from ryla.graph.registry import InputSpec, Node, Output, from_param, link, node


@node
class CLIPTextEncode(Node):
    class_type = "CLIPTextEncode"
    category = "conditioning"
    description = "Encode a prompt with CLIP-L (pooled) and T5-XXL (tokens)."
    inputs = (
        InputSpec("text", "STRING", default="", multiline=True,
                  description=catalogue.PROMPT.description),
        link("clip", "CLIP"),
    )
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, text, clip):
        return ((context.engine.encode(clip, text),),)


@node
class FluxGuidance(Node):
    class_type = "FluxGuidance"
    category = "advanced/conditioning/flux"
    inputs = (link("conditioning", "CONDITIONING"), from_param(catalogue.GUIDANCE, step=0.1))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning, guidance):
        return (tuple(c.with_options(guidance=guidance) for c in conditioning),)


@node
class ConditioningCombine(Node):
    class_type = "ConditioningCombine"
    category = "conditioning"
    description = "Use both conditionings; their predictions are averaged at each step."
    inputs = (link("conditioning_1", "CONDITIONING"), link("conditioning_2", "CONDITIONING"))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning_1, conditioning_2):
        return (tuple(conditioning_1) + tuple(conditioning_2),)


@node
class CLIPTextEncodeFlux(Node):
    class_type = "CLIPTextEncodeFlux"
    category = "advanced/conditioning/flux"
    description = "Separate texts for CLIP-L (clip_l) and T5-XXL (t5xxl), with FLUX's guidance."
    inputs = (link("clip", "CLIP"), InputSpec("clip_l", "STRING", default="", multiline=True),
              InputSpec("t5xxl", "STRING", default="", multiline=True), from_param(catalogue.GUIDANCE, step=0.1))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, clip, clip_l, t5xxl, guidance):
        return ((context.engine.encode(clip, clip_l, t5_text=t5xxl).with_options(guidance=guidance),),)


@node
class ConditioningZeroOut(Node):
    class_type = "ConditioningZeroOut"
    category = "advanced/conditioning"
    description = "The same conditioning with its tokens and pooled vector zeroed (an empty negative for FLUX)."
    inputs = (link("conditioning", "CONDITIONING"),)
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning):
        return (tuple(Cond(torch.zeros_like(c.t5), torch.zeros_like(c.pooled), c.guidance, c.extras)
                      for c in conditioning),)


@node
class ConditioningSetTimestepRange(Node):
    class_type = "ConditioningSetTimestepRange"
    category = "advanced/conditioning"
    description = "Apply the conditioning only between start and end (fractions of the schedule)."
    inputs = (link("conditioning", "CONDITIONING"),
              InputSpec("start", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.001),
              InputSpec("end", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.001))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning, start, end):
        return (tuple(c.with_options(start_percent=start, end_percent=end) for c in conditioning),)


@node
class ConditioningAverage(Node):
    class_type = "ConditioningAverage"
    category = "conditioning"
    description = "A weighted average of two conditionings' tokens and pooled vectors."
    inputs = (link("conditioning_to", "CONDITIONING"), link("conditioning_from", "CONDITIONING"),
              InputSpec("conditioning_to_strength", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.01))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning_to, conditioning_from, conditioning_to_strength):
        strength = conditioning_to_strength
        source = conditioning_from[0]
        out = []
        for target in conditioning_to:
            tokens = source.t5[:, :target.t5.shape[1]]
            if tokens.shape[1] < target.t5.shape[1]:
                padding = torch.zeros(1, target.t5.shape[1] - tokens.shape[1], target.t5.shape[2], dtype=tokens.dtype)
                tokens = torch.cat([tokens, padding], dim=1)
            mixed = target.t5 * strength + tokens * (1.0 - strength)
            pooled = target.pooled * strength + source.pooled * (1.0 - strength)
            out.append(Cond(mixed, pooled, target.guidance, target.extras))
        return (tuple(out),)


@node
class ConditioningConcat(Node):
    class_type = "ConditioningConcat"
    category = "conditioning"
    description = "conditioning_from's tokens appended to each of conditioning_to's (its pooled vector kept)."
    inputs = (link("conditioning_to", "CONDITIONING"), link("conditioning_from", "CONDITIONING"))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning_to, conditioning_from):
        tokens = conditioning_from[0].t5
        return (tuple(Cond(torch.cat((c.t5, tokens.to(c.t5.dtype)), dim=1), c.pooled, c.guidance, c.extras)
                      for c in conditioning_to),)


@node
class InpaintModelConditioning(Node):
    class_type = "InpaintModelConditioning"
    category = "conditioning/inpaint"
    description = ("Inpaint with the image and mask: the image encoded as the latent, the mask as its noise mask, "
                   "and the masked image given to the conditioning for models that take it (FLUX Fill).")
    inputs = (link("positive", "CONDITIONING"), link("negative", "CONDITIONING"), link("vae", "VAE"),
              link("pixels", "IMAGE"), link("mask", "MASK"),
              InputSpec("noise_mask", "BOOLEAN", default=True,
                        description="Add a noise mask to the latent so sampling only happens within the mask."))
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"), Output("LATENT", "latent"))

    def run(self, context, positive, negative, vae, pixels, mask, noise_mask):
        mask = image_mask(mask, pixels)
        cropped, mask = crop_to_blocks(pixels, mask)
        concat = context.engine.encode_image(vae, grey_out(cropped, mask), cancel=context.cancel)
        # encode_image cuts the whole image to the same 8-pixel blocks
        samples = context.engine.encode_image(vae, pixels, cancel=context.cancel)
        latent = {"samples": samples, **({"noise_mask": mask} if noise_mask else {})}
        extras = dict(concat_latent_image=concat, concat_mask=mask)
        return (tuple(c.with_options(**extras) for c in positive), tuple(c.with_options(**extras) for c in negative),
                latent)


AREA_STRENGTH = InputSpec("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01)


@node
class ConditioningSetArea(Node):
    class_type = "ConditioningSetArea"
    category = "conditioning"
    description = ("Apply the conditioning to one region (pixels): combined with others, each region is "
                   "predicted on its own and blended, feathered at its inner edges.")
    inputs = (link("conditioning", "CONDITIONING"),
              InputSpec("width", "INT", default=64, min=64, max=catalogue.MAX_RESOLUTION, step=8),
              InputSpec("height", "INT", default=64, min=64, max=catalogue.MAX_RESOLUTION, step=8),
              InputSpec("x", "INT", default=0, min=0, max=catalogue.MAX_RESOLUTION, step=8),
              InputSpec("y", "INT", default=0, min=0, max=catalogue.MAX_RESOLUTION, step=8),
              AREA_STRENGTH)
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning, width, height, x, y, strength):
        area = (height // 8, width // 8, y // 8, x // 8)  # latent units, as nodes.py stores it
        return (tuple(c.with_options(area=area, strength=strength) for c in conditioning),)


@node
class ConditioningSetAreaPercentage(Node):
    class_type = "ConditioningSetAreaPercentage"
    category = "conditioning"
    description = "ConditioningSetArea with the region as fractions of the image."
    inputs = (link("conditioning", "CONDITIONING"),
              *(InputSpec(name, "FLOAT", default=default, min=0.0, max=1.0, step=0.01)
                for name, default in (("width", 1.0), ("height", 1.0), ("x", 0.0), ("y", 0.0))),
              AREA_STRENGTH)
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning, width, height, x, y, strength):
        area = ("percentage", height, width, y, x)
        return (tuple(c.with_options(area=area, strength=strength) for c in conditioning),)


@node
class ConditioningSetAreaStrength(Node):
    class_type = "ConditioningSetAreaStrength"
    category = "conditioning"
    inputs = (link("conditioning", "CONDITIONING"), AREA_STRENGTH)
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning, strength):
        return (tuple(c.with_options(strength=strength) for c in conditioning),)


NODES = (CLIPTextEncode, FluxGuidance, ConditioningCombine, CLIPTextEncodeFlux, ConditioningZeroOut,
         ConditioningSetTimestepRange, ConditioningAverage, ConditioningConcat, InpaintModelConditioning,
         ConditioningSetArea, ConditioningSetAreaPercentage, ConditioningSetAreaStrength)
