"""FLUX.1 Redux: ComfyUI's CLIPVisionLoader, CLIPVisionEncode, StyleModelLoader and
StyleModelApply (nodes.py). A reference image's SigLIP tokens, projected by Redux to T5's width,
are appended to the prompt's T5 tokens: the image steers style and content beside the text."""

from __future__ import annotations

import torch

from ryla.graph.executor import NodeUserError
from ryla.graph.nodes.loaders import files
from ryla.graph.registry import InputSpec, Node, Output, link, node
from ryla.models import formats


@node
class CLIPVisionLoader(Node):
    class_type = "CLIPVisionLoader"
    category = "loaders"
    description = "A SigLIP vision model from clip_vision/ (sigclip_vision_patch14_384.safetensors for Redux)."
    inputs = (InputSpec("clip_name", "COMBO", choices=files("clip_vision", loads=(formats.CLIP_VISION_FILE,)),
                        description="File in clip_vision/."),)
    outputs = (Output("CLIP_VISION", "CLIP_VISION"),)

    def run(self, context, clip_name):
        return (context.engine.load_clip_vision(clip_name),)


@node
class CLIPVisionEncode(Node):
    class_type = "CLIPVisionEncode"
    category = "conditioning"
    description = "Encode an image with the vision model (its last hidden state, what Redux takes)."
    inputs = (link("clip_vision", "CLIP_VISION"), link("image", "IMAGE"),
              InputSpec("crop", "COMBO", default="center", choices=("center", "none"),
                        description="center: scale the short side and crop the middle; none: squash to a square."))
    outputs = (Output("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT"),)

    def run(self, context, clip_vision, image, crop):
        return (context.engine.encode_clip_vision(clip_vision, image, crop == "center"),)


@node
class StyleModelLoader(Node):
    class_type = "StyleModelLoader"
    category = "loaders"
    description = "FLUX.1 Redux (flux1-redux-dev.safetensors) from style_models/."
    inputs = (InputSpec("style_model_name", "COMBO", choices=files("style_models", loads=(formats.REDUX_FILE,)),
                        description="File in style_models/."),)
    outputs = (Output("STYLE_MODEL", "STYLE_MODEL"),)

    def run(self, context, style_model_name):
        return (context.engine.load_style_model(style_model_name),)


@node
class StyleModelApply(Node):
    class_type = "StyleModelApply"
    category = "conditioning/style_model"
    description = ("Append the image's Redux tokens to each conditioning entry's T5 tokens (ComfyUI's "
                   "StyleModelApply, multiply: the tokens scaled by strength).")
    inputs = (link("conditioning", "CONDITIONING"), link("style_model", "STYLE_MODEL"),
              link("clip_vision_output", "CLIP_VISION_OUTPUT"),
              InputSpec("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.001,
                        description="Scale of the image tokens."),
              InputSpec("strength_type", "COMBO", default="multiply", choices=("multiply", "attn_bias"),
                        description="multiply scales the tokens; attn_bias (an attention bias of log strength) "
                                    "is accepted only at strength 1, where the two are the same."))
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning, style_model, clip_vision_output, strength, strength_type):
        if strength_type == "attn_bias" and strength != 1.0:
            raise NodeUserError("invalid_input", "StyleModelApply: strength_type attn_bias needs attention masks, "
                                "which ryla's FLUX attention does not take; use multiply (or strength 1)",
                                details={"node_id": context.current_node})
        # comfy's apply_stylemodel: the batch's tokens flattened into one sequence
        tokens = context.engine.redux_tokens(style_model, clip_vision_output).flatten(0, 1).unsqueeze(0)
        if strength_type == "multiply":
            tokens = tokens * strength
        out = []
        for cond in conditioning:
            if cond.t5.shape[-1] != tokens.shape[-1]:
                raise NodeUserError("shape_mismatch", f"StyleModelApply: the style model gives {tokens.shape[-1]}-wide "
                                    f"tokens; the conditioning's T5 tokens are {cond.t5.shape[-1]} wide",
                                    details={"node_id": context.current_node})
            extended = type(cond)(torch.cat([cond.t5.float(), tokens.to(cond.t5.device)], dim=1).to(cond.t5.dtype),
                                  cond.pooled, cond.guidance, cond.extras)
            out.append(extended)
        return (tuple(out),)

NODES = (CLIPVisionLoader, CLIPVisionEncode, StyleModelLoader, StyleModelApply)
