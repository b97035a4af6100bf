"""Node definitions: typed inputs declared once, outputs, and a registry passed to the executor.

A node is a small class (after InvokeAI's invocations): it declares its inputs with bounds,
its outputs, and a `run` method that calls the engine. `@node` checks the definition when
the class is created, so a misdeclared node fails at import, not in a user's request.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ryla.catalogue import Param

# Literal widget types, as ComfyUI names them in /object_info.
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str  # a widget type, or a port type such as "MODEL", "CONDITIONING"
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    multiple_of: int | None = None
    # COMBO choices: a fixed tuple, or a function of the run context (model file lists).
    choices: tuple[str, ...] | Callable[[Any], list[str]] | None = None
    optional: bool = False
    multiline: bool = False
    description: str = ""
    # What ComfyUI's editor draws beside the widget: a "control after generate" menu on seeds,
    # an upload button on LoadImage's image ("image_upload").
    control_after_generate: bool = False
    upload: str | None = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def options(self, context) -> list[str]:
        if callable(self.choices):
            options = self.choices(context)
            # A list subclass may widen what validates (LoadImage: any file under input/).
            return options if isinstance(options, list) else list(options)
        return list(self.choices or ())


def from_param(param: Param, name: str | None = None, **overrides) -> InputSpec:
    """A node input whose description, default and bounds come from the shared catalogue:
    ComfyUI's own where the catalogue records them (`Param.comfyui`), so a workflow is
    validated as ComfyUI validates it; `overrides` last (one node's own default, say)."""
    kind = {int: "INT", float: "FLOAT", str: "STRING", bool: "BOOLEAN"}[param.type]
    if param.choices is not None:
        kind = "COMBO"
    values = dict(
        name=name or param.name, type=kind, default=param.default, description=param.description,
        choices=param.choices,
    )
    comfyui = dict(param.comfyui or {})
    if kind in ("INT", "FLOAT"):
        values.update(min=param.min, max=param.max, multiple_of=param.multiple_of,
                      step=param.multiple_of or (1 if kind == "INT" else 0.01))
    elif kind == "STRING":
        values.update(max=param.max)  # a length bound
        comfyui.pop("min", None)
    values.update(comfyui)
    values.update(overrides)
    return InputSpec(**values)


def link(name: str, port_type: str, description: str = "", optional: bool = False) -> InputSpec:
    return InputSpec(name=name, type=port_type, description=description, optional=optional)


@dataclass(frozen=True)
class Output:
    type: str
    name: str


class Node:
    """Base class. Subclasses set the class variables and implement run(context, **inputs),
    returning a tuple with one value per output."""

    class_type: ClassVar[str]
    inputs: ClassVar[tuple[InputSpec, ...]] = ()
    outputs: ClassVar[tuple[Output, ...]] = ()
    output_node: ClassVar[bool] = False
    category: ClassVar[str] = "ryla"
    description: ClassVar[str] = ""

    def run(self, context, **inputs) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def validate(self, context, **values) -> str | None:
        """Cross-field checks on literal values; a message makes custom_validation_failed."""
        return None

    def cost(self, **values) -> dict[str, float]:
        """What running this node costs, from its literal inputs (those given as links are
        absent): "pixels" of the largest latent batch it makes, sampling "steps", the length of
        the sigma "schedule" it builds. Checked against the server's limits before queueing."""
        return {}

    @classmethod
    def input_spec(cls, name: str) -> InputSpec | None:
        return next((spec for spec in cls.inputs if spec.name == name), None)


def node(cls: type[Node]) -> type[Node]:
    """Class decorator: check a node definition when it is defined."""
    if not getattr(cls, "class_type", None):
        raise TypeError(f"{cls.__name__}: class_type is required")
    names = [spec.name for spec in cls.inputs]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.class_type}: duplicate input names {names}")
    params = inspect.signature(cls.run).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [n for n in names if n not in params and not accepts_any]
    if missing:
        raise TypeError(f"{cls.class_type}: run() does not accept inputs {missing}")
    if not cls.outputs and not cls.output_node:
        raise TypeError(f"{cls.class_type}: a node needs outputs or must be an output node")
    for spec in cls.inputs:
        if spec.type == "COMBO" and spec.choices is None:
            raise TypeError(f"{cls.class_type}.{spec.name}: COMBO input needs choices")
    return cls


@dataclass
class NodeRegistry:
    """The node classes a graph may use. Built explicitly and handed to the executor."""

    classes: dict[str, type[Node]] = field(default_factory=dict)

    def register(self, cls: type[Node]) -> None:
        if cls.class_type in self.classes:
            raise ValueError(f"node {cls.class_type} registered twice")
        self.classes[cls.class_type] = node(cls)

    def register_all(self, classes: Iterable[type[Node]]) -> NodeRegistry:
        for cls in classes:
            self.register(cls)
        return self

    def get(self, class_type: str) -> type[Node] | None:
        return self.classes.get(class_type)

    def __contains__(self, class_type: str) -> bool:
        return class_type in self.classes

    def object_info(self, context) -> dict[str, dict]:
        """Node definitions in the shape of ComfyUI's GET /object_info."""
        return {name: _object_info(cls, context) for name, cls in sorted(self.classes.items())}


# ComfyUI's display names (nodes.py NODE_DISPLAY_NAME_MAPPINGS) for the nodes that have one.
DISPLAY_NAMES = {
    "KSampler": "KSampler", "CheckpointLoaderSimple": "Load Checkpoint", "CLIPTextEncode": "CLIP Text Encode (Prompt)",
    "VAEDecode": "VAE Decode", "SaveImage": "Save Image", "PreviewImage": "Preview Image", "LoadImage": "Load Image",
    "EmptyLatentImage": "Empty Latent Image", "LoraLoader": "Load LoRA", "VAELoader": "Load VAE",
    "UNETLoader": "Load Diffusion Model", "ControlNetLoader": "Load ControlNet Model",
    "ConditioningCombine": "Conditioning (Combine)",
}


def _object_info(cls: type[Node], context) -> dict:
    required: dict[str, list] = {}
    optional: dict[str, list] = {}
    for spec in cls.inputs:
        if spec.type == "COMBO":
            entry: list = [spec.options(context)]
            extras = {"default": spec.default} if spec.default is not None else {}
            if spec.description:
                extras["tooltip"] = spec.description
            if spec.upload:
                extras[spec.upload] = True
            if extras:
                entry.append(extras)
        elif spec.is_widget:
            options = {k: v for k, v in (("default", spec.default), ("min", spec.min), ("max", spec.max),
                                         ("step", spec.step), ("multiline", spec.multiline or None),
                                         ("tooltip", spec.description or None),
                                         ("control_after_generate", spec.control_after_generate or None))
                       if v is not None}
            entry = [spec.type, options]
        else:
            entry = [spec.type, {"tooltip": spec.description}] if spec.description else [spec.type]
        (optional if spec.optional else required)[spec.name] = entry
    return {
        "input": {"required": required, **({"optional": optional} if optional else {})},
        "input_order": {"required": [s.name for s in cls.inputs if not s.optional],
                        "optional": [s.name for s in cls.inputs if s.optional]},
        "output": [o.type for o in cls.outputs],
        "output_is_list": [False for _ in cls.outputs],
        "output_name": [o.name for o in cls.outputs],
        "name": cls.class_type,
        "display_name": DISPLAY_NAMES.get(cls.class_type, cls.class_type),
        "description": cls.description,
        "python_module": cls.__module__,
        "category": cls.category,
        "output_node": cls.output_node,
    }
