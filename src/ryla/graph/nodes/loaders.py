"""Model loaders: CheckpointLoaderSimple, UNETLoader, DualCLIPLoader, VAELoader."""

from __future__ import annotations

from ryla.flux.engine import WEIGHT_DTYPES
from ryla.graph.registry import InputSpec, Node, Output, node


def files(kind: str):
    """COMBO choices listed from the model store at validation time, as ComfyUI does."""
    return lambda context: context.store.list(kind)


@node
class CheckpointLoaderSimple(Node):
    class_type = "CheckpointLoaderSimple"
    category = "loaders"
    description = "Load an all-in-one FLUX checkpoint (transformer, CLIP-L, T5-XXL and VAE in one file)."
    inputs = (InputSpec("ckpt_name", "COMBO", choices=files("checkpoints"), description="File in checkpoints/."),)
    outputs = (Output("MODEL", "MODEL"), Output("CLIP", "CLIP"), Output("VAE", "VAE"))

    def run(self, context, ckpt_name):
        return context.engine.load_checkpoint(ckpt_name)


@node
class UNETLoader(Node):
    class_type = "UNETLoader"
    category = "advanced/loaders"
    description = "Load a FLUX transformer from diffusion_models/ (or unet/)."
    inputs = (
        InputSpec("unet_name", "COMBO", choices=files("diffusion_models"), description="File in diffusion_models/."),
        InputSpec("weight_dtype", "COMBO", default="default", choices=WEIGHT_DTYPES,
                  description="fp8 keeps the weights in 8 bits in memory and computes in bf16."),
    )
    outputs = (Output("MODEL", "MODEL"),)

    def run(self, context, unet_name, weight_dtype):
        return (context.engine.load_diffusion_model(unet_name, weight_dtype),)


@node
class DualCLIPLoader(Node):
    class_type = "DualCLIPLoader"
    category = "advanced/loaders"
    description = "Load CLIP-L and T5-XXL from text_encoders/ (or clip/)."
    inputs = (
        InputSpec("clip_name1", "COMBO", choices=files("text_encoders")),
        InputSpec("clip_name2", "COMBO", choices=files("text_encoders")),
        InputSpec("type", "COMBO", default="flux", choices=("flux",), description="Only FLUX is served here."),
        InputSpec("device", "COMBO", default="default", choices=("default",), optional=True),
    )
    outputs = (Output("CLIP", "CLIP"),)

    def run(self, context, clip_name1, clip_name2, type, device=None):
        return (context.engine.load_text_encoders(clip_name1, clip_name2),)


@node
class VAELoader(Node):
    class_type = "VAELoader"
    category = "loaders"
    inputs = (InputSpec("vae_name", "COMBO", choices=files("vae"), description="File in vae/."),)
    outputs = (Output("VAE", "VAE"),)

    def run(self, context, vae_name):
        return (context.engine.load_vae(vae_name),)


NODES = (CheckpointLoaderSimple, UNETLoader, DualCLIPLoader, VAELoader)
