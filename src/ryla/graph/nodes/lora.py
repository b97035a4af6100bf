"""LoRA nodes: LoraLoader (model and CLIP) and LoraLoaderModelOnly."""

from __future__ import annotations

from ryla import catalogue
from ryla.models.lora_format import LoraFormatError
from ryla.models.store import ModelNotFoundError, UnsafeNameError
from ryla.models.tensor_files import ModelFormatError
from ryla.graph.executor import NodeUserError
from ryla.graph.nodes.loaders import files
from ryla.graph.registry import InputSpec, Node, Output, from_param, link, node
from ryla.models import formats


def _load(context, lora_name, model, strength_model, clip=None, strength_clip=0.0):
    try:
        return context.engine.load_lora(lora_name, strength_model, model, strength_clip, clip)
    except ModelNotFoundError as exc:  # removed while the request waited for the GPU
        raise NodeUserError("lora_not_found", f"{lora_name}: the LoRA is no longer in the store", status=404,
                            details={"lora_name": lora_name}) from exc
    except (LoraFormatError, ModelFormatError, UnsafeNameError, OSError) as exc:
        raise NodeUserError("invalid_lora", f"{lora_name}: {exc}") from exc


LORA_NAME = InputSpec("lora_name", "COMBO", choices=files("loras", loads=(formats.LORA_FILE,)),
                      description="File in loras/.")
STRENGTH_MODEL = from_param(catalogue.LORA_STRENGTH, name="strength_model")


@node
class LoraLoader(Node):
    class_type = "LoraLoader"
    category = "loaders"
    description = "Apply a LoRA from loras/ to the model and the text encoder."
    inputs = (
        link("model", "MODEL"),
        link("clip", "CLIP"),
        LORA_NAME,
        STRENGTH_MODEL,
        from_param(catalogue.LORA_STRENGTH, name="strength_clip"),
    )
    outputs = (Output("MODEL", "MODEL"), Output("CLIP", "CLIP"))

    def run(self, context, model, clip, lora_name, strength_model, strength_clip):
        return _load(context, lora_name, model, strength_model, clip, strength_clip)


@node
class LoraLoaderModelOnly(Node):
    class_type = "LoraLoaderModelOnly"
    category = "loaders"
    description = "Apply a LoRA from loras/ to the model only."
    inputs = (
        link("model", "MODEL"),
        LORA_NAME,
        STRENGTH_MODEL,
    )
    outputs = (Output("MODEL", "MODEL"),)

    def run(self, context, model, lora_name, strength_model):
        return (_load(context, lora_name, model, strength_model)[0],)


NODES = (LoraLoader, LoraLoaderModelOnly)
