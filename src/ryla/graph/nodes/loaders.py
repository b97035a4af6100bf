"""Model loaders: CheckpointLoaderSimple, UNETLoader, DualCLIPLoader, VAELoader, and city96's
ComfyUI-GGUF loaders UnetLoaderGGUF, UnetLoaderGGUFAdvanced and DualCLIPLoaderGGUF."""

from __future__ import annotations

from ryla.flux.engine import WEIGHT_DTYPES
from ryla.graph.registry import InputSpec, Node, Output, node
from ryla.models import formats
from ryla.models.gguf_files import is_gguf

TEXT_ENCODERS = (formats.CLIP_L_FILE, formats.T5_FILE)


class StoreFiles(list):
    """A loader's COMBO choices: the files of its folder that it can load (what /object_info
    and the editor list); any file of the folder still validates, so a workflow naming another
    one gets the loader's own reason ("it looks like a LoRA") rather than "not in list"."""

    def __init__(self, listed: list[str], present: list[str]):
        super().__init__(listed)
        self.present = set(present)

    def __contains__(self, name) -> bool:
        return list.__contains__(self, name) or name in self.present


def files(kind: str, gguf: bool | None = False, loads: tuple[str, ...] | None = None, folders: bool = False):
    """COMBO choices listed from the model store at validation time, as ComfyUI does. ComfyUI's
    own loaders list no .gguf files (folder_paths' supported_pt_extensions); ComfyUI-GGUF's
    UnetLoaderGGUF lists only those (its `unet_gguf` folder key) and its CLIP loaders both
    kinds (`clip` + `clip_gguf`): gguf False, True and None. With `loads` (file kinds of
    ryla.models.formats.file_kind), only the files whose tensors that loader takes are listed.
    With `folders`, the folder's diffusers folders (config.json and shards) too, one choice each."""
    def choices(context):
        present = [name for name in context.store.list(kind) if gguf is None or is_gguf(name) == gguf]
        if loads is not None:
            listed = set(context.store.list_loadable(kind, loads))
            listed = [name for name in present if name in listed]
        else:
            listed = present
        if folders:
            packaged = context.store.list_folders(kind)
            present, listed = present + packaged, sorted(listed + packaged)
        return StoreFiles(listed, present)
    return choices


@node
class CheckpointLoaderSimple(Node):
    class_type = "CheckpointLoaderSimple"
    category = "loaders"
    description = "Load an all-in-one FLUX checkpoint (transformer, CLIP-L, T5-XXL and VAE in one file)."
    inputs = (InputSpec("ckpt_name", "COMBO", choices=files("checkpoints", loads=(formats.FLUX_CHECKPOINT_FILE,)),
                        description="File in checkpoints/."),)
    outputs = (Output("MODEL", "MODEL"), Output("CLIP", "CLIP"), Output("VAE", "VAE"))

    def run(self, context, ckpt_name):
        return context.engine.load_checkpoint(ckpt_name)


@node
class UNETLoader(Node):
    class_type = "UNETLoader"
    category = "advanced/loaders"
    description = "Load a FLUX transformer from diffusion_models/ (or unet/)."
    inputs = (
        InputSpec("unet_name", "COMBO", choices=files("diffusion_models", loads=(formats.FLUX_TRANSFORMER_FILE,),
                                                      folders=True),
                  description="File in diffusion_models/ (or a diffusers folder there: config.json and shards)."),
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
        InputSpec("clip_name1", "COMBO", choices=files("text_encoders", loads=TEXT_ENCODERS)),
        InputSpec("clip_name2", "COMBO", choices=files("text_encoders", loads=TEXT_ENCODERS)),
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
    inputs = (InputSpec("vae_name", "COMBO", choices=files("vae", loads=(formats.VAE_FILE,)), description="File in vae/."),)
    outputs = (Output("VAE", "VAE"),)

    def run(self, context, vae_name):
        return (context.engine.load_vae(vae_name),)


@node
class UnetLoaderGGUF(Node):
    class_type = "UnetLoaderGGUF"
    category = "bootleg"
    description = ("Load a GGUF-quantised FLUX transformer (city96's ComfyUI-GGUF files: Q8_0, Q4_K, ...) "
                   "from diffusion_models/ (or unet/). ryla expands it to the compute dtype once, at load.")
    inputs = (InputSpec("unet_name", "COMBO", choices=files("diffusion_models", gguf=True,
                                                            loads=(formats.FLUX_TRANSFORMER_FILE,)),
                        description="A .gguf file in diffusion_models/."),)
    outputs = (Output("MODEL", "MODEL"),)

    def run(self, context, unet_name, **_advanced):
        return (context.engine.load_diffusion_model(unet_name),)


# ComfyUI-GGUF's choices for where and in what dtype to expand weights at each step; ryla
# expands once at load into the compute dtype, so they are accepted and change nothing.
_GGUF_DTYPES = ("default", "target", "float32", "float16", "bfloat16")


@node
class UnetLoaderGGUFAdvanced(UnetLoaderGGUF):
    class_type = "UnetLoaderGGUFAdvanced"
    inputs = UnetLoaderGGUF.inputs + (
        InputSpec("dequant_dtype", "COMBO", default="default", choices=_GGUF_DTYPES,
                  description="Accepted for ComfyUI-GGUF's graphs; ryla dequantises once at load."),
        InputSpec("patch_dtype", "COMBO", default="default", choices=_GGUF_DTYPES,
                  description="Accepted for ComfyUI-GGUF's graphs; LoRAs patch ryla's expanded weights."),
        InputSpec("patch_on_device", "BOOLEAN", default=False,
                  description="Accepted for ComfyUI-GGUF's graphs; patches are always made on the GPU."),
    )


@node
class DualCLIPLoaderGGUF(Node):
    class_type = "DualCLIPLoaderGGUF"
    category = "bootleg"
    description = "Load CLIP-L and T5-XXL, either or both as GGUF (a llama.cpp T5 encoder), from text_encoders/."
    inputs = (
        InputSpec("clip_name1", "COMBO", choices=files("text_encoders", gguf=None, loads=TEXT_ENCODERS)),
        InputSpec("clip_name2", "COMBO", choices=files("text_encoders", gguf=None, loads=TEXT_ENCODERS)),
        InputSpec("type", "COMBO", default="flux", choices=("flux",), description="Only FLUX is served here."),
    )
    outputs = (Output("CLIP", "CLIP"),)

    def run(self, context, clip_name1, clip_name2, type):
        return (context.engine.load_text_encoders(clip_name1, clip_name2),)


NODES = (CheckpointLoaderSimple, UNETLoader, DualCLIPLoader, VAELoader, UnetLoaderGGUF, UnetLoaderGGUFAdvanced,
         DualCLIPLoaderGGUF)
