"""Text conditioning: CLIPTextEncode, FluxGuidance, ConditioningCombine."""

from __future__ import annotations

from ryla import catalogue
from ryla.graph.registry import InputSpec, Node, Output, from_param, link, node


@node
class CLIPTextEncode(Node):
    class_type = "CLIPTextEncode"
    category = "conditioning"
    description = "Encode a prompt with CLIP-L (pooled) and T5-XXL (tokens)."
    inputs = (
        InputSpec("text", "STRING", default="", max=catalogue.PROMPT.max, multiline=True,
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


NODES = (CLIPTextEncode, FluxGuidance, ConditioningCombine)
