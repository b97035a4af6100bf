"""ControlNets: ComfyUI's ControlNetLoader, ControlNetApplyAdvanced, ControlNetApplySD3 (the
"Apply ControlNet with VAE" node), ControlNetApply and SetUnionControlNetType (nodes.py,
comfy_extras/nodes_controlnet.py), for FLUX ControlNets in one file: InstantX, Shakker-Labs'
Union and XLabs-AI's layouts. A diffusers-format folder in controlnet/ is InfiniteYou's
InfuseNet, the identity network, which ApplyInstantID takes (graph/nodes/identity.py)."""

from __future__ import annotations

import dataclasses

from ryla.flux.components import ControlHint, ControlNet
from ryla.graph.executor import NodeUserError
from ryla.graph.nodes.loaders import files
from ryla.graph.registry import InputSpec, Node, Output, link, node
from ryla.models import formats

# comfy/cldm/control_types.py UNION_CONTROLNET_TYPES: xinsir's SDXL Union numbering, which
# ComfyUI passes to every Union ControlNet as it is (Shakker-Labs' FLUX Union numbers its own
# modes differently: canny 0, tile 1, depth 2, blur 3, pose 4, gray 5, low quality 6).
UNION_CONTROLNET_TYPES = {"openpose": 0, "depth": 1, "hed/pidi/scribble/ted": 2,
                          "canny/lineart/anime_lineart/mlsd": 3, "normal": 4, "segment": 5, "tile": 6, "repaint": 7}


@node
class ControlNetLoader(Node):
    class_type = "ControlNetLoader"
    category = "loaders"
    description = ("A FLUX ControlNet from controlnet/: one file in InstantX's, Shakker-Labs Union's or XLabs' "
                   "layout, or a diffusers folder (InfiniteYou's InfuseNet, for ApplyInstantID).")
    inputs = (InputSpec("control_net_name", "COMBO",
                        choices=files("controlnet", loads=(formats.CONTROLNET_FILE,), folders=True)),)
    outputs = (Output("CONTROL_NET", "CONTROL_NET"),)

    def run(self, context, control_net_name):
        if control_net_name in context.store.list_folders("controlnet"):
            return (context.engine.load_controlnet(control_net_name),)
        return (context.engine.load_controlnet_file(control_net_name),)


def _control_net(context, control_net, node_name: str) -> ControlNet:
    if not isinstance(control_net, ControlNet):
        raise NodeUserError("invalid_input", f"{node_name}: {context.input_sources.get('control_net', 'control_net')} "
                            "is InfuseNet, the identity network: it goes into ApplyInstantID; this node takes a "
                            "single-file ControlNet (InstantX, Union or XLabs)",
                            details={"node_id": context.current_node})
    return control_net


def apply_control(context, conditioning, control_net: ControlNet, image, strength, start, end, vae):
    """Each entry of the conditioning with one more hint, after those it has (their residuals
    add up). A strength of 0 leaves it as it is, as ComfyUI's nodes do."""
    if strength == 0:
        return conditioning
    hint = ControlHint(control_net, image, float(strength), float(start), float(end), vae)
    return tuple(c.with_options(controls=tuple(c.option("controls", ())) + (hint,)) for c in conditioning)


PERCENTS = (InputSpec("start_percent", "FLOAT", default=0.0, min=0.0, max=1.0, step=0.001,
                      description="Where in the schedule the ControlNet starts to act."),
            InputSpec("end_percent", "FLOAT", default=1.0, min=0.0, max=1.0, step=0.001,
                      description="Where it stops."))
STRENGTH = InputSpec("strength", "FLOAT", default=1.0, min=0.0, max=10.0, step=0.01,
                     description="Scale of the ControlNet's residuals; 0 turns it off.")


@node
class ControlNetApplyAdvanced(Node):
    class_type = "ControlNetApplyAdvanced"
    category = "conditioning/controlnet"
    description = ("Steer the image with a ControlNet and a control image (an edge, depth or pose map) on both "
                   "conditionings. InstantX and Union ControlNets need the VAE.")
    inputs = (link("positive", "CONDITIONING"), link("negative", "CONDITIONING"), link("control_net", "CONTROL_NET"),
              link("image", "IMAGE"), STRENGTH, *PERCENTS,
              link("vae", "VAE", "Encodes the control image (InstantX, Union).", optional=True))
    outputs = (Output("CONDITIONING", "positive"), Output("CONDITIONING", "negative"))

    def run(self, context, positive, negative, control_net, image, strength, start_percent, end_percent, vae=None):
        control_net = _control_net(context, control_net, self.class_type)
        return (apply_control(context, positive, control_net, image, strength, start_percent, end_percent, vae),
                apply_control(context, negative, control_net, image, strength, start_percent, end_percent, vae))


@node
class ControlNetApplySD3(ControlNetApplyAdvanced):
    """ComfyUI's "Apply Controlnet with VAE" (deprecated there for ControlNetApplyAdvanced with
    its optional vae; kept for the graphs that use it)."""

    class_type = "ControlNetApplySD3"
    inputs = (link("positive", "CONDITIONING"), link("negative", "CONDITIONING"), link("control_net", "CONTROL_NET"),
              link("vae", "VAE"), link("image", "IMAGE"), STRENGTH, *PERCENTS)


@node
class ControlNetApply(Node):
    """ComfyUI's older single-conditioning node (deprecated there): the whole schedule."""

    class_type = "ControlNetApply"
    category = "conditioning/controlnet"
    inputs = (link("conditioning", "CONDITIONING"), link("control_net", "CONTROL_NET"), link("image", "IMAGE"),
              STRENGTH)
    outputs = (Output("CONDITIONING", "CONDITIONING"),)

    def run(self, context, conditioning, control_net, image, strength):
        control_net = _control_net(context, control_net, self.class_type)
        return (apply_control(context, conditioning, control_net, image, strength, 0.0, 1.0, None),)


@node
class SetUnionControlNetType(Node):
    class_type = "SetUnionControlNetType"
    category = "conditioning/controlnet"
    description = ("Pick the control type of a Union ControlNet; auto gives none. The index is ComfyUI's "
                   "(xinsir's numbering), passed to the model as it is.")
    inputs = (link("control_net", "CONTROL_NET"),
              InputSpec("type", "COMBO", default="auto", choices=("auto", *UNION_CONTROLNET_TYPES)))
    outputs = (Output("CONTROL_NET", "CONTROL_NET"),)

    def run(self, context, control_net, type):
        control_net = _control_net(context, control_net, self.class_type)
        mode = UNION_CONTROLNET_TYPES.get(type)
        if mode is not None and control_net.modes and mode >= control_net.modes:
            raise NodeUserError("invalid_input", f"SetUnionControlNetType: {control_net.name} has "
                                f"{control_net.modes} control types; {type!r} is number {mode}",
                                details={"node_id": context.current_node})
        return (dataclasses.replace(control_net, union_mode=mode),)


NODES = (ControlNetLoader, ControlNetApplyAdvanced, ControlNetApplySD3, ControlNetApply, SetUnionControlNetType)
